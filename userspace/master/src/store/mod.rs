//! Persistence behind a small key-value-like trait: one record per agent, one per network and
//! one for the cluster-wide settings, changed only by compare-and-swap transactions on a
//! global revision (the model of etcd, so an etcd backend can implement it as it is).

pub mod etcd;
pub mod memory;
pub mod redb;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay_api::{MacOui, OverlayInfo};
use serde::{Deserialize, Serialize};

/// Cluster-wide settings (everything of `NetworkConfig` except the networks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsRecord {
    pub vtep_subnet: Ipv4Network,
    pub vtep_subnet6: Option<Ipv6Network>,
    pub vtep_mac_oui: MacOui,
    pub vtep_mtu: Option<u32>,
    pub vxlan_port: u16,
}

/// Where a network was defined: config-file networks follow the file on reload and restart;
/// networks added through the API stay until removed through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    File,
    Api,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub info: OverlayInfo,
    pub origin: Origin,
    /// Position in the state's network list (config order, API additions last).
    pub position: u32,
}

/// One agent's allocations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub ip: IpAddr,
    pub vtep_ip: Option<Ipv4Addr>,
    pub vtep_ip6: Option<Ipv6Addr>,
    /// Why the agent has no VTEP (exhaustion), shown as STATUS_FAILED on every network.
    pub vtep_error: Option<String>,
    /// Per network name.
    pub networks: BTreeMap<String, AgentNetworkRecord>,
    /// Place in registration order (the state lists agents in it, as DC/OS does); records
    /// stored before it existed have 0 and sort by address among themselves.
    #[serde(default)]
    pub order: u64,
    /// Whether the agent wants the Mesos / Docker bridges (halves) of its subnets: DC/OS's
    /// `AgentNetworkConfig`; master nodes register without them.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub mesos_bridge: bool,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub docker_bridge: bool,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

impl AgentRecord {
    pub fn new(ip: IpAddr) -> Self {
        AgentRecord {
            ip,
            vtep_ip: None,
            vtep_ip6: None,
            vtep_error: None,
            networks: BTreeMap::new(),
            order: 0,
            mesos_bridge: true,
            docker_bridge: true,
        }
    }
}

/// One agent's share of one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentNetworkRecord {
    pub subnet: Option<Ipv4Network>,
    pub subnet6: Option<Ipv6Network>,
    /// Why the agent has no share of this network (exhaustion).
    pub error: Option<String>,
}

/// Everything stored, as of `revision`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: u64,
    pub settings: Option<SettingsRecord>,
    pub networks: Vec<NetworkRecord>,
    pub agents: Vec<AgentRecord>,
}

/// One change inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    PutSettings(SettingsRecord),
    PutNetwork(NetworkRecord),
    DeleteNetwork(String),
    PutAgent(AgentRecord),
    DeleteAgent(IpAddr),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else committed first (only possible with a shared backend).
    #[error("store revision is {actual}, expected {expected}: concurrent writer")]
    Conflict { expected: u64, actual: u64 },
    #[error("stored record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("store backend failed while {context}: {reason}")]
    Backend { context: String, reason: String },
}

/// Durable storage of the master's state.
pub trait Store: Send + Sync {
    /// Reads everything.
    fn load(&self) -> Result<Snapshot, StoreError>;

    /// Applies `ops` atomically if the stored revision still is `expected_revision`; the new
    /// revision is `expected_revision + 1` and is durable when this returns.
    fn commit(&self, expected_revision: u64, ops: &[Op]) -> Result<u64, StoreError>;

    /// For a store shared with other writers: the stored revision each time it changes (by
    /// anyone), so the master can reload when another writer committed. Taken once; `None`
    /// for a store only this process writes.
    fn changes(&self) -> Option<std::sync::mpsc::Receiver<u64>> {
        None
    }

    /// Whether the store answers a read now (`/health`); the default reads everything.
    fn probe(&self) -> Result<(), StoreError> {
        self.load().map(|_| ())
    }
}
