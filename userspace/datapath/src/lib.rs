//! The datapath as userspace sees it without loading it: the typed façade over the maps
//! ([`maps`]), the drop monitor's maps ([`monitor`]), where the maps and links are pinned ([`pins`], the one place a pin path is built)
//! and the kernel's statistics of the programs ([`stats`]).
//!
//! The agent loads the eBPF object and hands its maps to [`OverlayMaps::take_from`]; `overlayctl`,
//! `xtask` and the tests open the pins an agent left ([`OverlayMaps::open_pinned`]). Neither needs
//! the eBPF toolchain to build this crate.

pub mod batch;
pub mod maps;
pub mod monitor;
pub mod pins;
pub mod stats;
pub mod sys;

pub use maps::{
    AgentSettings, OverlayMaps, ProtectedDestination, StatRow, addr16, from_addr16, prefix_key,
};
pub use pins::{PIN_ROOT, PinLayout};
pub use stats::attached_ingress_programs;
