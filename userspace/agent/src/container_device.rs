//! Which device pair connects this agent's containers (`--container-device veth|netkit`), and
//! what happens when netkit is asked for on a kernel without it: the agent falls back to veth
//! (the default, on every kernel) with a warning naming the missing `CONFIG_NETKIT`, and says so
//! in its metrics (`overlay_agent_container_device`), rather than refusing to start: the
//! datapath works the same on both, only slower on veth, and an agent that stays down takes its
//! containers' connectivity with it.

use std::sync::OnceLock;

pub use overlay_netlink::ContainerDevice;

/// The name of the throwaway pair the probe creates (and deletes) in the host namespace.
const PROBE: &str = "ovl-nkprobe";

/// What was asked for and what the agent uses, once chosen.
static CHOSEN: OnceLock<(ContainerDevice, ContainerDevice)> = OnceLock::new();

/// The device for new containers: `requested`, or veth where netkit was requested and the
/// kernel has none. Logs the fallback and remembers the choice for [`metric`].
pub fn choose(requested: ContainerDevice) -> anyhow::Result<ContainerDevice> {
    let used = match requested {
        ContainerDevice::Veth => ContainerDevice::Veth,
        ContainerDevice::Netkit => {
            let supported = overlay_netlink::Handle::new()
                .and_then(|mut nl| nl.netkit_supported(PROBE))
                .map_err(|e| {
                    anyhow::anyhow!("--container-device netkit: probing for netkit: {e}")
                })?;
            if supported {
                tracing::info!("containers get netkit pairs (--container-device netkit)");
                ContainerDevice::Netkit
            } else {
                tracing::warn!(
                    "--container-device netkit: this kernel has no netkit devices (CONFIG_NETKIT is not set, or the kernel is older than 6.7); containers get veth pairs instead"
                );
                ContainerDevice::Veth
            }
        }
    };
    let _ = CHOSEN.set((requested, used));
    Ok(used)
}

/// The Prometheus lines of the choice (none before [`choose`] ran).
pub fn metric() -> String {
    let Some((requested, used)) = CHOSEN.get() else {
        return String::new();
    };
    format!(
        "# HELP overlay_agent_container_device The device pair new containers get (device), and what --container-device asked for (requested): they differ when the kernel lacks netkit.\n# TYPE overlay_agent_container_device gauge\noverlay_agent_container_device{{requested=\"{requested}\",device=\"{used}\"}} 1\n"
    )
}
