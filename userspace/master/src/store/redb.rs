//! The embedded default store: one redb file, one table per record kind, JSON values.
//! Every commit is `Durability::Immediate` (fsync before returning), so an answer the API has
//! sent survives a SIGKILL; redb's copy-on-write commit makes a transaction all-or-nothing.
//!
//! After an I/O error (full or read-only disk) redb refuses every further operation ("Previous
//! I/O error occurred"), so the database is closed at once and reopened on the next request:
//! writes are refused while the disk has no room and resume by themselves when it has, without
//! a restart. A commit that failed was not acknowledged; reopening shows whether it reached the
//! disk (the master reloads and compares revisions), so nothing acknowledged is lost.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

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
    /// `None` after an I/O error: reopened by the next `load` or `commit`.
    db: Mutex<Option<Database>>,
    path: PathBuf,
}

/// A redb failure as a `StoreError` naming the file, what was being done and, for the usual
/// disk faults, what the operator can expect.
fn backend(path: &Path, action: &str, error: impl Into<redb::Error>) -> StoreError {
    let error = error.into();
    let hint = match &error {
        redb::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                "; the disk is full: writes are refused until it has room, then resume by themselves"
            }
            std::io::ErrorKind::ReadOnlyFilesystem => {
                "; the file system is read-only: writes are refused until it is writable again"
            }
            _ => "",
        },
        redb::Error::PreviousIo => "; the store is reopened on the next request",
        _ => "",
    };
    StoreError::Backend {
        context: format!("{action} (redb store {})", path.display()),
        reason: format!("{error}{hint}"),
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
        let db = Database::create(&path).map_err(|e| backend(&path, "opening", e))?;
        // Create the tables up front so reads of a fresh store find them.
        let txn = db
            .begin_write()
            .map_err(|e| backend(&path, "starting the first transaction", e))?;
        {
            let open = |e: redb::TableError| backend(&path, "creating tables", e);
            txn.open_table(META).map_err(open)?;
            txn.open_table(SETTINGS).map_err(open)?;
            txn.open_table(NETWORKS).map_err(open)?;
            txn.open_table(AGENTS).map_err(open)?;
        }
        txn.commit()
            .map_err(|e| backend(&path, "creating tables", e))?;
        Ok(RedbStore {
            db: Mutex::new(Some(db)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `action` on the open database, reopening it first if an I/O error closed it; a
    /// backend error closes it (redb refuses everything after one).
    fn with_db<T>(
        &self,
        action: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut slot: MutexGuard<'_, Option<Database>> = self
            .db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_none() {
            let db = Database::create(&self.path)
                .map_err(|e| backend(&self.path, "reopening after an I/O error", e))?;
            tracing::info!(path = %self.path.display(), "store reopened after an I/O error");
            *slot = Some(db);
        }
        let result = action(slot.as_ref().expect("opened above"));
        if let Err(error @ StoreError::Backend { .. }) = &result {
            tracing::warn!(%error, "closing the store; it is reopened on the next request");
            *slot = None;
        }
        result
    }

    fn load_from(&self, db: &Database) -> Result<Snapshot, StoreError> {
        let read = |e: redb::Error| backend(&self.path, "loading the store", e);
        let txn = db.begin_read().map_err(|e| read(e.into()))?;
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

    fn commit_to(
        &self,
        db: &Database,
        expected_revision: u64,
        ops: &[Op],
    ) -> Result<u64, StoreError> {
        let new_revision = expected_revision + 1;
        let action = format!("committing revision {new_revision}");
        let fail = |e: redb::Error| backend(&self.path, &action, e);
        let mut txn = db.begin_write().map_err(|e| fail(e.into()))?;
        txn.set_durability(Durability::Immediate);
        {
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
            meta.insert(REVISION_KEY, new_revision)
                .map_err(|e| fail(e.into()))?;
        }
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok(new_revision)
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.with_db(|db| self.load_from(db))
    }

    fn commit(&self, expected_revision: u64, ops: &[Op]) -> Result<u64, StoreError> {
        self.with_db(|db| self.commit_to(db, expected_revision, ops))
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
            order: 0,
            mesos_bridge: true,
            docker_bridge: true,
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
