//! XDP on the underlay NIC (`xdp_underlay`): where it runs and how it is attached.
//!
//! Native mode runs in the driver before an skb exists, which is where early drops pay off
//! (virtio_net, mlx5, ixgbe, ...). Generic (skb) mode runs the same program after the skb is
//! built: the verdicts are the same, the savings small; it is for testing on software devices.
//! `auto`, the default, is native except on veth, where XDP would switch the pair's receive
//! path to NAPI with page copies and cost more than it saves (the lab's agents run on veths),
//! and falls back to no XDP, with a warning, where the driver has no native XDP: the TC program
//! makes every one of these drops anyway.

use std::{fmt, str::FromStr};

use anyhow::{Context as _, anyhow, bail};
use aya::programs::{Xdp, links::FdLink};
use overlay_common::maps::programs;

use super::{Datapath, replace_in_pinned_link};

/// `--xdp`: how the agent runs XDP on the underlay NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Auto,
    Native,
    Generic,
    Off,
}

impl FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(XdpMode::Auto),
            "native" => Ok(XdpMode::Native),
            "generic" => Ok(XdpMode::Generic),
            "off" => Ok(XdpMode::Off),
            _ => Err(format!("{s:?}: one of auto, native, generic, off")),
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Off => "off",
        })
    }
}

/// How XDP ended up on the underlay NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdpAttached {
    Native,
    Generic,
    /// Not attached, and why.
    Off(String),
}

/// The two attachments a NIC can have, each pinned under its own name so that a restart with
/// another `--xdp` knows what to replace.
const MODES: [(XdpAttached, &str, aya::programs::XdpMode); 2] = [
    (
        XdpAttached::Native,
        "native",
        aya::programs::XdpMode::Driver,
    ),
    (XdpAttached::Generic, "generic", aya::programs::XdpMode::Skb),
];

fn pin_key(ifname: &str, mode: &str) -> String {
    format!("{ifname}-{mode}")
}

impl Datapath {
    /// Attaches `xdp_underlay` to `ifname` as `mode` says, through a pinned bpf_link (so it
    /// outlives the agent like the TC links, and the next agent swaps the program in place).
    pub fn attach_xdp(&mut self, ifname: &str, mode: XdpMode) -> anyhow::Result<XdpAttached> {
        let wanted = match mode {
            XdpMode::Off => None,
            XdpMode::Native => Some(0),
            XdpMode::Generic => Some(1),
            XdpMode::Auto => match driver_of(ifname) {
                Ok(d) if d == "veth" => None,
                _ => Some(0),
            },
        };
        // A NIC runs XDP in one mode at a time: the other attachment goes first.
        for (i, (_, name, _)) in MODES.iter().enumerate() {
            if Some(i) != wanted {
                self.detach(programs::XDP_UNDERLAY, &pin_key(ifname, name))?;
            }
        }
        let Some(i) = wanted else {
            return Ok(XdpAttached::Off(match mode {
                XdpMode::Off => "--xdp off".into(),
                _ => format!("{ifname} is a veth (--xdp auto)"),
            }));
        };
        let (attached, name, aya_mode) = MODES[i].clone();
        let pin = self
            .pins
            .link(programs::XDP_UNDERLAY, &pin_key(ifname, name));
        if replace_in_pinned_link(&mut self.ebpf, programs::XDP_UNDERLAY, &pin)
            .with_context(|| format!("replacing XDP on {ifname}"))?
        {
            return Ok(attached);
        }
        let program: &mut Xdp = self
            .ebpf
            .program_mut(programs::XDP_UNDERLAY)
            .ok_or_else(|| anyhow!("no program {}", programs::XDP_UNDERLAY))?
            .try_into()?;
        let link_id = match program.attach(ifname, aya_mode) {
            Ok(id) => id,
            Err(e) if mode == XdpMode::Auto => {
                let driver = driver_of(ifname).unwrap_or_else(|_| "?".into());
                return Ok(XdpAttached::Off(format!(
                    "{ifname} (driver {driver}) refused native XDP: {e}"
                )));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("attaching XDP in {name} mode to {ifname} (--xdp {mode})")
                });
            }
        };
        let link: FdLink = program.take_link(link_id)?.try_into().map_err(|_| {
            anyhow!("XDP on {ifname} was attached without a bpf_link (kernel older than 5.9?)")
        })?;
        link.pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        Ok(attached)
    }
}

/// The driver of network interface `ifname` in the calling thread's network namespace, as
/// `ethtool -i` reports it (`virtio_net`, `veth`, `mlx5_core`, ...).
pub fn driver_of(ifname: &str) -> anyhow::Result<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    /// `struct ifreq` with its `ifr_data` member.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _rest: [u8; 16],
    }
    if ifname.len() >= libc::IFNAMSIZ {
        bail!("interface name {ifname:?} is too long");
    }
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _rest: [0; 16],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for the ethtool ioctl");
    }
    // SAFETY: `req` and the `info` it points to outlive the call; the kernel writes within
    // `info`'s size for ETHTOOL_GDRVINFO.
    let r = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut IfReq) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(err).with_context(|| format!("ETHTOOL_GDRVINFO of {ifname}"));
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in ["auto", "native", "generic", "off"] {
            assert_eq!(m.parse::<XdpMode>().unwrap().to_string(), m);
        }
        assert!("drv".parse::<XdpMode>().unwrap_err().contains("one of"));
    }

    #[test]
    fn a_missing_interface_is_an_error_naming_it() {
        let e = driver_of("no-such-if0").unwrap_err();
        assert!(format!("{e:#}").contains("no-such-if0"));
        assert!(driver_of("a-name-longer-than-ifnamsiz").is_err());
    }
}
