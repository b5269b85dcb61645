//! The kernel side as userspace sees it: loading the eBPF object, pinning its maps and TCX links
//! so they outlive the agent (hitless restarts), and the typed façade over the maps.

mod loader;
mod maps;
mod pins;

pub use loader::{Datapath, OBJECT, XdpAttached, XdpMode, attached_ingress_programs, driver_of};
pub use maps::{
    AgentSettings, OverlayMaps, ProtectedDestination, StatRow, addr16, from_addr16, prefix_key,
};
pub use pins::{PIN_ROOT, PinLayout};
