//! The embedded default store: one redb file, one table per record kind, JSON values.
//! Every commit is `Durability::Immediate` (fsync before returning), so an answer the API has
//! sent survives a SIGKILL; redb's copy-on-write commit makes a transaction all-or-nothing.

use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{AgentRecord, NetworkRecord, Op, SettingsRecord, Snapshot, Store, StoreError};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
const NETWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("networks");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");

const REVISION_KEY: &str = "revision";
const SETTINGS_KEY: &str = "network";
/// File name inside the data directory.
pub const DB_FILE: &str = "overlay-master.redb";

pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

fn backend(context: impl Into<String>) -> impl FnOnce(redb::Error) -> StoreError {
    let context = context.into();
    move |error| StoreError::Backend {
        context,
        reason: error.to_string(),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialise")
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

impl RedbStore {
    /// Opens (or creates) the store in `data_dir`, creating the directory if needed.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Backend {
            context: format!("creating data directory {}", data_dir.display()),
            reason: e.to_string(),
        })?;
        let path = data_dir.join(DB_FILE);
        let db = Database::create(&path)
            .map_err(|e| backend(format!("opening {}", path.display()))(e.into()))?;
        // Create the tables up front so reads of a fresh store find them.
        let txn = db
            .begin_write()
            .map_err(|e| backend("starting the first transaction")(e.into()))?;
        {
            let open = |e: redb::TableError| backend("creating tables")(e.into());
            txn.open_table(META).map_err(open)?;
            txn.open_table(SETTINGS).map_err(open)?;
            txn.open_table(NETWORKS).map_err(open)?;
            txn.open_table(AGENTS).map_err(open)?;
        }
        txn.commit()
            .map_err(|e| backend("creating tables")(e.into()))?;
        Ok(RedbStore { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let read = |e: redb::Error| backend("loading the store")(e);
        let txn = self.db.begin_read().map_err(|e| read(e.into()))?;
        let meta = txn.open_table(META).map_err(|e| read(e.into()))?;
        let revision = meta
            .get(REVISION_KEY)
            .map_err(|e| read(e.into()))?
            .map(|v| v.value())
            .unwrap_or(0);

        let settings_table = txn.open_table(SETTINGS).map_err(|e| read(e.into()))?;
        let settings = match settings_table
            .get(SETTINGS_KEY)
            .map_err(|e| read(e.into()))?
        {
            Some(value) => Some(decode::<SettingsRecord>("settings/network", value.value())?),
            None => None,
        };

        let mut networks = Vec::new();
        let table = txn.open_table(NETWORKS).map_err(|e| read(e.into()))?;
        for entry in table.iter().map_err(|e| read(e.into()))? {
            let (key, value) = entry.map_err(|e| read(e.into()))?;
            networks.push(decode::<NetworkRecord>(
                &format!("networks/{}", key.value()),
                value.value(),
            )?);
        }

        let mut agents = Vec::new();
        let table = txn.open_table(AGENTS).map_err(|e| read(e.into()))?;
        for entry in table.iter().map_err(|e| read(e.into()))? {
            let (key, value) = entry.map_err(|e| read(e.into()))?;
            agents.push(decode::<AgentRecord>(
                &format!("agents/{}", key.value()),
                value.value(),
            )?);
        }
        Ok(Snapshot {
            revision,
            settings,
            networks,
            agents,
        })
    }

    fn commit(&self, expected_revision: u64, ops: &[Op]) -> Result<u64, StoreError> {
        let fail = |e: redb::Error| backend("committing a transaction")(e);
        let mut txn = self.db.begin_write().map_err(|e| fail(e.into()))?;
        txn.set_durability(Durability::Immediate);
        let new_revision = {
            let mut meta = txn.open_table(META).map_err(|e| fail(e.into()))?;
            let actual = meta
                .get(REVISION_KEY)
                .map_err(|e| fail(e.into()))?
                .map(|v| v.value())
                .unwrap_or(0);
            if actual != expected_revision {
                // Dropping the transaction aborts it.
                return Err(StoreError::Conflict {
                    expected: expected_revision,
                    actual,
                });
            }
            let mut settings = txn.open_table(SETTINGS).map_err(|e| fail(e.into()))?;
            let mut networks = txn.open_table(NETWORKS).map_err(|e| fail(e.into()))?;
            let mut agents = txn.open_table(AGENTS).map_err(|e| fail(e.into()))?;
            for op in ops {
                match op {
                    Op::PutSettings(record) => {
                        settings
                            .insert(SETTINGS_KEY, encode(record).as_slice())
                            .map_err(|e| fail(e.into()))?;
                    }
                    Op::PutNetwork(record) => {
                        networks
                            .insert(record.info.name.as_str(), encode(record).as_slice())
                            .map_err(|e| fail(e.into()))?;
                    }
                    Op::DeleteNetwork(name) => {
                        networks.remove(name.as_str()).map_err(|e| fail(e.into()))?;
                    }
                    Op::PutAgent(record) => {
                        agents
                            .insert(record.ip.to_string().as_str(), encode(record).as_slice())
                            .map_err(|e| fail(e.into()))?;
                    }
                    Op::DeleteAgent(ip) => {
                        agents
                            .remove(ip.to_string().as_str())
                            .map_err(|e| fail(e.into()))?;
                    }
                }
            }
            let new_revision = expected_revision + 1;
            meta.insert(REVISION_KEY, new_revision)
                .map_err(|e| fail(e.into()))?;
            new_revision
        };
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok(new_revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    fn agent(ip: &str) -> AgentRecord {
        AgentRecord {
            ip: ip.parse::<IpAddr>().unwrap(),
            vtep_ip: Some("44.128.0.1".parse().unwrap()),
            vtep_ip6: None,
            vtep_error: None,
            networks: BTreeMap::new(),
        }
    }

    #[test]
    fn commits_survive_reopen_and_cas_refuses_stale_revision() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            assert_eq!(store.load().unwrap(), Snapshot::default());
            let rev = store
                .commit(
                    0,
                    &[
                        Op::PutAgent(agent("10.0.0.1")),
                        Op::PutAgent(agent("10.0.0.2")),
                    ],
                )
                .unwrap();
            assert_eq!(rev, 1);
            assert!(matches!(
                store.commit(0, &[Op::DeleteAgent("10.0.0.1".parse().unwrap())]),
                Err(StoreError::Conflict {
                    expected: 0,
                    actual: 1
                })
            ));
            store
                .commit(1, &[Op::DeleteAgent("10.0.0.2".parse().unwrap())])
                .unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let snapshot = store.load().unwrap();
        assert_eq!(snapshot.revision, 2);
        assert_eq!(snapshot.agents, vec![agent("10.0.0.1")]);
    }
}
