//! The ebpf-overlay agent: loads the datapath, keeps its maps in step with the master's state,
//! and serves the local endpoint API.
//!
//! The flow: master state -> [`desired`] (what the maps should hold) -> [`reconcile`] (the
//! difference, applied) -> [`datapath`] (the typed façade over the maps) -> the programs.
//! [`agent`] is what the running agent owns (the datapath, its knowledge, its [`endpoints`]);
//! [`runtime`] runs it on one owner that everyone else sends commands; [`api`] serves it.

pub mod agent;
pub mod api;
pub mod cleanup;
pub mod cni_conf;
pub mod container_device;
pub mod control_plane;
pub mod datapath;
pub mod desired;
pub mod docker;
pub mod endpoint_report;
pub mod endpoints;
pub mod host_link;
pub mod identity;
pub mod ipam;
pub mod masquerade;
pub mod metrics;
pub mod monitor;
pub mod netdev;
pub mod next_hops;
pub mod preflight;
pub mod recent_drops;
pub mod reconcile;
pub mod runtime;
pub mod saved;
pub mod service;
pub mod vtep_mtu;
