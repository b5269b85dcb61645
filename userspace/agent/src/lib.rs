//! The ebpf-overlay agent: loads the datapath, keeps its maps in step with the master's state,
//! and serves the local endpoint API.

pub mod datapath;
