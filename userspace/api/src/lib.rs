//! Types and client of the overlay master's HTTP/JSON API.
//!
//! The JSON shapes are DC/OS's (`/overlay-master/state`), so existing tooling keeps working;
//! our additions are extra fields only (`vxlan_port`, per-network `id`, `vni` and `masquerade`,
//! watch `revision`).

pub mod agent;
pub mod build;
mod client;
pub mod monitor;
pub mod sd_notify;
pub mod subnets;
pub mod tls;
mod types;

pub use client::{ClientError, MasterClient};
pub use tls::{Identity, MasterTls};
pub use types::*;

/// Route prefix shared by the master's endpoints.
pub const MASTER_PREFIX: &str = "/overlay-master";
