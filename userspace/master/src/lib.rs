//! The overlay master: allocates VTEPs and per-agent overlay subnets the way DC/OS does,
//! persists them transactionally, and serves them over DC/OS's HTTP/JSON API.

pub mod alloc;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod hostaddr;
pub mod import;
pub mod master;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod store;
pub mod ui;
pub mod validate;
