//! Checks, before anything is loaded, that this kernel and process can run the datapath, so the
//! agent refuses to start with a message naming the missing piece instead of failing halfway
//! through loading. [`evaluate`] is the pure decision (unit-tested); [`check`] gathers the facts
//! from the running host and mounts bpffs when it is missing.

use std::{ffi::CString, fmt, os::unix::ffi::OsStrExt as _, path::Path};

/// TCX (`BPF_LINK_TYPE_TCX`, the attach type the datapath uses) arrived in Linux 6.6.
pub const TCX_MIN_KERNEL: KernelVersion = KernelVersion { major: 6, minor: 6 };
/// The kernel's own BTF: CO-RE relocations and BTF maps need it.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// statfs(2) f_type of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// `major.minor` of a kernel release string (`uname -r`: `6.12.48+deb12-cloud-amd64`,
/// `6.6.0-rc1`, `5.15.0-91-generic`).
pub fn parse_release(release: &str) -> Option<KernelVersion> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some(KernelVersion { major, minor })
}

/// What the host offers, as gathered by [`check`] (or given by a test).
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub kernel_release: String,
    pub vmlinux_btf: bool,
    /// `Ok(())` when a bpffs is (now) mounted at the agent's `--bpffs`, otherwise why not.
    pub bpffs: Result<(), String>,
    /// The effective capability set (`CapEff` of /proc/self/status).
    pub effective_caps: u64,
}

/// One thing the agent needs and does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    KernelTooOld {
        release: String,
    },
    UnknownKernel {
        release: String,
    },
    NoVmlinuxBtf,
    NoBpffs {
        why: String,
    },
    Capability {
        name: &'static str,
        why: &'static str,
    },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::KernelTooOld { release } => write!(
                f,
                "kernel {release} is too old: the datapath attaches with TCX, which needs Linux {TCX_MIN_KERNEL} or later"
            ),
            Missing::UnknownKernel { release } => write!(
                f,
                "cannot read the kernel version from {release:?} (need Linux {TCX_MIN_KERNEL} or later for TCX)"
            ),
            Missing::NoVmlinuxBtf => write!(
                f,
                "no kernel BTF at {VMLINUX_BTF}: build the kernel with CONFIG_DEBUG_INFO_BTF=y"
            ),
            Missing::NoBpffs { why } => write!(f, "no bpffs for the pinned datapath: {why}"),
            Missing::Capability { name, why } => write!(f, "missing capability {name} ({why})"),
        }
    }
}

fn has_cap(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Everything missing, in the order an operator would fix it (empty: good to go).
pub fn evaluate(facts: &HostFacts) -> Vec<Missing> {
    let mut missing = Vec::new();
    match parse_release(&facts.kernel_release) {
        Some(v) if v >= TCX_MIN_KERNEL => {}
        Some(_) => missing.push(Missing::KernelTooOld {
            release: facts.kernel_release.clone(),
        }),
        None => missing.push(Missing::UnknownKernel {
            release: facts.kernel_release.clone(),
        }),
    }
    if !facts.vmlinux_btf {
        missing.push(Missing::NoVmlinuxBtf);
    }
    if let Err(why) = &facts.bpffs {
        missing.push(Missing::NoBpffs { why: why.clone() });
    }
    let caps = facts.effective_caps;
    // CAP_SYS_ADMIN still grants what CAP_BPF and CAP_PERFMON were split out of.
    let admin = has_cap(caps, CAP_SYS_ADMIN);
    if !has_cap(caps, CAP_BPF) && !admin {
        missing.push(Missing::Capability {
            name: "CAP_BPF",
            why: "loading programs and maps",
        });
    }
    if !has_cap(caps, CAP_PERFMON) && !admin {
        missing.push(Missing::Capability {
            name: "CAP_PERFMON",
            why: "the verifier's rules for networking programs",
        });
    }
    if !has_cap(caps, CAP_NET_ADMIN) {
        missing.push(Missing::Capability {
            name: "CAP_NET_ADMIN",
            why: "attaching to interfaces, creating the host link",
        });
    }
    missing
}

/// The preflight failed: every missing piece, one per line.
#[derive(Debug)]
pub struct PreflightError(pub Vec<Missing>);

impl fmt::Display for PreflightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "this host cannot run the ebpf-overlay datapath:")?;
        for m in &self.0 {
            write!(f, "\n  - {m}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PreflightError {}

/// Exit status of an agent refused by the preflight (the unit does not restart on it).
pub const EXIT_PREFLIGHT: i32 = 3;

/// Gathers the facts of this host (mounting bpffs at `bpffs` if nothing is mounted there) and
/// evaluates them.
pub fn check(bpffs: &Path) -> Result<(), PreflightError> {
    let facts = HostFacts {
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        vmlinux_btf: Path::new(VMLINUX_BTF).exists(),
        bpffs: ensure_bpffs(bpffs),
        effective_caps: effective_caps().unwrap_or(0),
    };
    let missing = evaluate(&facts);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError(missing))
    }
}

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// A bpffs at `path`, mounting one if missing (systemd mounts /sys/fs/bpf at boot; a host
/// without it gets one here).
pub fn ensure_bpffs(path: &Path) -> Result<(), String> {
    if is_bpffs(path) {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(|e| {
        format!(
            "{} is not a bpffs and cannot be created: {e}",
            path.display()
        )
    })?;
    let target = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let bpf = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe {
        libc::mount(
            bpf.as_ptr(),
            target.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "{} is not a bpffs and mounting one failed ({e}); mount it with `mount -t bpf bpf {}`",
            path.display(),
            path.display()
        ));
    }
    tracing::info!(path = %path.display(), "bpffs was not mounted: mounted it");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_CAPS: u64 = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);

    fn good() -> HostFacts {
        HostFacts {
            kernel_release: "6.12.48+deb12-cloud-amd64".into(),
            vmlinux_btf: true,
            bpffs: Ok(()),
            effective_caps: ALL_CAPS,
        }
    }

    #[test]
    fn releases_parse_to_major_minor() {
        let v = |major, minor| Some(KernelVersion { major, minor });
        assert_eq!(parse_release("6.12.48+deb12-cloud-amd64"), v(6, 12));
        assert_eq!(parse_release("6.6.0-rc1"), v(6, 6));
        assert_eq!(parse_release("5.15.0-91-generic\n"), v(5, 15));
        assert_eq!(parse_release("6.18"), v(6, 18));
        assert_eq!(parse_release("6"), None);
        assert_eq!(parse_release(""), None);
        assert_eq!(parse_release("linux"), None);
    }

    #[test]
    fn tcx_needs_6_6() {
        assert!(evaluate(&good()).is_empty());
        for ok in ["6.6.0", "6.18.1", "7.0.0"] {
            let facts = HostFacts {
                kernel_release: ok.into(),
                ..good()
            };
            assert!(evaluate(&facts).is_empty(), "{ok}");
        }
        for old in ["6.5.13", "5.15.0-91-generic", "4.19.0"] {
            let facts = HostFacts {
                kernel_release: old.into(),
                ..good()
            };
            let missing = evaluate(&facts);
            assert_eq!(
                missing,
                vec![Missing::KernelTooOld {
                    release: old.into()
                }]
            );
            let msg = missing[0].to_string();
            assert!(
                msg.contains("TCX") && msg.contains("6.6") && msg.contains(old),
                "{msg}"
            );
        }
        let facts = HostFacts {
            kernel_release: "weird".into(),
            ..good()
        };
        assert!(matches!(
            evaluate(&facts)[..],
            [Missing::UnknownKernel { .. }]
        ));
    }

    #[test]
    fn missing_btf_and_bpffs_are_named() {
        let facts = HostFacts {
            vmlinux_btf: false,
            bpffs: Err("/x is not a bpffs".into()),
            ..good()
        };
        let err = PreflightError(evaluate(&facts)).to_string();
        assert!(err.contains(VMLINUX_BTF), "{err}");
        assert!(err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
        assert!(err.contains("bpffs") && err.contains("/x"), "{err}");
    }

    #[test]
    fn capabilities_are_checked_one_by_one() {
        let names = |caps: u64| -> Vec<&'static str> {
            evaluate(&HostFacts {
                effective_caps: caps,
                ..good()
            })
            .into_iter()
            .map(|m| match m {
                Missing::Capability { name, .. } => name,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
        };
        assert_eq!(names(0), ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        assert_eq!(names(ALL_CAPS & !(1 << CAP_NET_ADMIN)), ["CAP_NET_ADMIN"]);
        assert_eq!(names(ALL_CAPS & !(1 << CAP_BPF)), ["CAP_BPF"]);
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, not for CAP_NET_ADMIN.
        assert_eq!(names(1 << CAP_SYS_ADMIN), ["CAP_NET_ADMIN"]);
        assert!(names((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN)).is_empty());
    }

    #[test]
    fn this_host_passes() {
        // The test suite runs as root on a 6.6+ kernel with BTF and bpffs.
        check(Path::new("/sys/fs/bpf")).unwrap();
    }
}
