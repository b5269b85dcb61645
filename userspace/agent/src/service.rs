//! Running under systemd: readiness once the datapath serves the master's state.

use std::time::Duration;

use crate::runtime::Handle;

/// Tells systemd the agent is ready (`Type=notify`) once the programs are attached (done before
/// this is spawned) and the master's first state is applied to the maps, so that units ordered
/// after the agent (container runtimes) find the networks in place.
pub async fn notify_ready_when_applied(agent: Handle) {
    loop {
        let Ok(status) = agent.status().await else {
            return; // the agent is stopping
        };
        let revision = status.applied_revision;
        if revision > 0 {
            let status =
                format!("READY=1\nSTATUS=datapath attached, master revision {revision} applied");
            if let Err(e) = overlay_api::sd_notify::notify(&status) {
                tracing::warn!("telling systemd we are ready: {e}");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
