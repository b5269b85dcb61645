//! A store in memory, for tests of the allocation logic without a disk.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use super::{AgentRecord, NetworkRecord, Op, SettingsRecord, Snapshot, Store, StoreError};

#[derive(Debug, Default)]
struct Contents {
    revision: u64,
    settings: Option<SettingsRecord>,
    networks: BTreeMap<String, NetworkRecord>,
    agents: BTreeMap<IpAddr, AgentRecord>,
}

#[derive(Debug, Default)]
pub struct MemoryStore {
    contents: Mutex<Contents>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `snapshot`.
    pub fn from_snapshot(snapshot: Snapshot) -> Self {
        let store = Self::new();
        store.replace(snapshot);
        store
    }

    /// Replaces the whole contents with `snapshot`.
    pub fn replace(&self, snapshot: Snapshot) {
        let mut contents = self.contents.lock().expect("memory store lock");
        *contents = Contents {
            revision: snapshot.revision,
            settings: snapshot.settings,
            networks: snapshot
                .networks
                .into_iter()
                .map(|n| (n.info.name.clone(), n))
                .collect(),
            agents: snapshot.agents.into_iter().map(|a| (a.ip, a)).collect(),
        };
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let contents = self.contents.lock().expect("memory store lock");
        Ok(Snapshot {
            revision: contents.revision,
            settings: contents.settings.clone(),
            networks: contents.networks.values().cloned().collect(),
            agents: contents.agents.values().cloned().collect(),
        })
    }

    fn commit(&self, expected_revision: u64, ops: &[Op]) -> Result<u64, StoreError> {
        let mut contents = self.contents.lock().expect("memory store lock");
        if contents.revision != expected_revision {
            return Err(StoreError::Conflict {
                expected: expected_revision,
                actual: contents.revision,
            });
        }
        for op in ops {
            match op {
                Op::PutSettings(settings) => contents.settings = Some(settings.clone()),
                Op::PutNetwork(network) => {
                    contents
                        .networks
                        .insert(network.info.name.clone(), network.clone());
                }
                Op::DeleteNetwork(name) => {
                    contents.networks.remove(name);
                }
                Op::PutAgent(agent) => {
                    contents.agents.insert(agent.ip, agent.clone());
                }
                Op::DeleteAgent(ip) => {
                    contents.agents.remove(ip);
                }
            }
        }
        contents.revision += 1;
        Ok(contents.revision)
    }
}
