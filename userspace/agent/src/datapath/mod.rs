//! The kernel side as userspace sees it: loading the eBPF object and attaching its programs with
//! pinned TCX links so they outlive the agent (hitless restarts) here; the typed façade over the
//! maps and the pin layout live in the `overlay-datapath` crate, re-exported under their old
//! paths.

mod loader;

pub use loader::{Datapath, OBJECT, TestRunOutcome, XdpAttached, XdpMode, driver_of};
pub use overlay_datapath::{
    AgentSettings, OverlayMaps, PIN_ROOT, PinLayout, ProtectedDestination, StatRow, addr16,
    from_addr16, maps, pins, prefix_key, stats::attached_ingress_programs,
};
