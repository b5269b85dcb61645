//! The VM lab's guest: a Debian kernel (>= 6.12) from the package registry, a tiny initramfs
//! that loads virtio_blk, and a bookworm root built with mmdebstrap, cached on this machine under
//! [`CACHE_DIR`]`/<hash of the inputs>/` (never in the repository). Each lab run installs the
//! project's `.deb` into a copy-on-write view of the cached root and makes one ext4 image of it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::run;

pub const CACHE_DIR: &str = "/var/cache/ebpf-overlay/vm";
/// Meta-package naming the newest 6.12 cloud kernel of bookworm-security.
const KERNEL_META: &str = "linux-image-6.12-cloud-amd64";
const SUITE: &str = "bookworm";
const MIRRORS: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];
/// The guest's packages: systemd as PID 1, what the package depends on, inspection and tests.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "iproute2",
    "iputils-ping",
    "bpftool",
    "procps",
    "iperf3",
    "util-linux",
    "libc6",
];
/// Bump when the customisation below changes (part of the cache key).
const RECIPE_VERSION: &str = "3";

/// Units and scripts baked into the root.
const VM_NET_SCRIPT: &str = r#"#!/bin/sh
# The VM lab: the underlay address comes from the kernel command line (vmlab.ip=A/N).
set -e
for w in $(cat /proc/cmdline); do
    case "$w" in vmlab.ip=*) addr="${w#vmlab.ip=}" ;; esac
done
ip link set lo up
ip link set eth0 up
[ -n "$addr" ] && ip addr replace "$addr" dev eth0
"#;
const VM_NET_UNIT: &str = "[Unit]
Description=VM lab underlay address (vmlab.ip= on the kernel command line)
DefaultDependencies=no
BindsTo=sys-subsystem-net-devices-eth0.device
After=sys-subsystem-net-devices-eth0.device
Before=network.target network-online.target
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/vm-net

[Install]
WantedBy=network-online.target
";
const VM_CTL_SCRIPT: &str = r#"#!/bin/sh
# The VM lab's command channel: a shell on the virtio serial port named vmlab.ctl.
while :; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = vmlab.ctl ] && dev="/dev/${p##*/}"
    done
    [ -n "$dev" ] && [ -e "$dev" ] && break
    sleep 0.2
done
# A virtio port can be open only once: one read-write descriptor for all three.
exec /bin/sh <>"$dev" >&0 2>&0
"#;
const VM_CTL_UNIT: &str = "[Unit]
Description=VM lab command channel (virtio serial port vmlab.ctl)
DefaultDependencies=no
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/local/sbin/vm-ctl
Restart=always
RestartSec=500ms

[Install]
WantedBy=sysinit.target
";
/// Units that only cost boot time in a lab VM.
const MASKED: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "systemd-timesyncd.service",
    "man-db.timer",
    "dpkg-db-backup.timer",
];

/// The cached base: kernel, initramfs, root directory.
#[derive(Debug, Clone)]
pub struct BaseImage {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub kernel_release: String,
    /// Seconds spent building (0 when it came from the cache).
    pub build_secs: f64,
}

fn sha256_hex(data: &[u8]) -> anyhow::Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    child.stdin.take().unwrap().write_all(data)?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout)[..16].to_owned())
}

/// Which Debian kernel the guests boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestKernel {
    /// The newest 6.12 cloud kernel of bookworm-security, from this machine's apt lists: what the
    /// tests boot.
    #[default]
    Bookworm,
    /// The newest 6.x cloud kernel of trixie-backports (6.14 and later honour netkit's
    /// `IFLA_NETKIT_HEADROOM`), read from the registry's package index: for measurements.
    TrixieBackports,
}

/// trixie-backports' package index and pool.
const BACKPORTS: &str = "http://deb.debian.org/debian";
const BACKPORTS_INDEX: &str = "dists/trixie-backports/main/binary-amd64/Packages.xz";

/// Where a guest kernel comes from: its image package's name (the cache key and the release)
/// and, for one outside this machine's apt lists, the pool files to fetch (newer Debian kernels
/// split the image into `linux-image-*`, `linux-binary-*` (vmlinuz) and `linux-modules-*`).
struct KernelSource {
    package: String,
    pool_files: Vec<String>,
}

/// The concrete kernel package the meta-package points at (resolved from the local apt lists).
fn bookworm_kernel() -> anyhow::Result<KernelSource> {
    let out = run("apt-cache", &["depends", KERNEL_META])?;
    let dep = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .with_context(|| format!("{KERNEL_META} has no Depends (run apt-get update)"))?;
    Ok(KernelSource {
        package: format!("{}-unsigned", dep.trim()),
        pool_files: vec![],
    })
}

/// The newest 6.x cloud kernel of trixie-backports: its image package and, where split off, its
/// binary and modules packages (the signed image: its vmlinuz boots without Secure Boot too).
fn backports_kernel() -> anyhow::Result<KernelSource> {
    let sh = format!(
        "curl -fsS --max-time 120 {BACKPORTS}/{BACKPORTS_INDEX} | xz -dc | \
         awk '/^Package: linux-(image|binary|modules)-6[.][0-9]+[.][0-9]+[+]deb13-cloud-amd64$/ {{p=$2}} \
              /^Filename: / && p {{print p, $2; p=\"\"}}'"
    );
    let out = run("sh", &["-c", &sh]).context("reading trixie-backports' package index")?;
    let files: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    let has = |kind: &str, release: &str| {
        files
            .iter()
            .any(|(pkg, _)| pkg.strip_prefix(kind) == Some(release))
    };
    // A split image whose modules package has left the index cannot be put together.
    let release = files
        .iter()
        .filter_map(|(pkg, _)| pkg.strip_prefix("linux-image-"))
        .filter(|r| !has("linux-binary-", r) || has("linux-modules-", r))
        .max_by_key(|r| kernel_version(r))
        .context("no complete 6.x cloud kernel in trixie-backports' index")?;
    let pool_files = files
        .iter()
        .filter(|(pkg, _)| {
            ["linux-image-", "linux-binary-", "linux-modules-"]
                .iter()
                .any(|kind| pkg.strip_prefix(kind) == Some(release))
        })
        .map(|(_, file)| file.to_string())
        .collect();
    Ok(KernelSource {
        package: format!("linux-image-{release}"),
        pool_files,
    })
}

/// `(major, minor, patch)` of a release `M.m.p+...`, for choosing the newest.
fn kernel_version(release: &str) -> (u32, u32, u32) {
    let v = release.split('+').next().unwrap_or("");
    let mut n = v.split('.').map(|x| x.parse().unwrap_or(0));
    (
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
        n.next().unwrap_or(0),
    )
}

/// The cached base image for the current inputs, built if missing.
pub fn ensure_base(kernel: GuestKernel) -> anyhow::Result<BaseImage> {
    let source = match kernel {
        GuestKernel::Bookworm => bookworm_kernel()?,
        GuestKernel::TrixieBackports => backports_kernel()?,
    };
    let kernel_pkg = source.package.clone();
    let key_input = format!(
        "{RECIPE_VERSION}\n{SUITE}\n{}\n{}\n{kernel_pkg}\n{}",
        MIRRORS.join("\n"),
        PACKAGES.join(","),
        MASKED.join(",")
    );
    let dir = Path::new(CACHE_DIR).join(sha256_hex(key_input.as_bytes())?);
    let done = dir.join("complete");
    let release = kernel_pkg
        .strip_prefix("linux-image-")
        .map(|s| s.strip_suffix("-unsigned").unwrap_or(s))
        .context("kernel package name")?
        .to_owned();
    let base = BaseImage {
        kernel: dir.join(format!("vmlinuz-{release}")),
        initrd: dir.join("initrd.img"),
        rootfs: dir.join("rootfs"),
        kernel_release: release.clone(),
        dir: dir.clone(),
        build_secs: 0.0,
    };
    if done.exists() {
        return Ok(base);
    }
    let started = Instant::now();
    eprintln!(
        "vm: building the guest image in {} (kernel {release})",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let kdir = dir.join("kernel");
    extract_kernel(&source, &dir, &kdir)?;
    // Newer packages ship the modules under /usr (merged /usr); the guest finds them under
    // /lib/modules either way (bookworm's root has /lib -> usr/lib).
    let usr_modules = kdir.join("usr/lib/modules");
    if usr_modules.exists() && !kdir.join("lib/modules").exists() {
        std::fs::create_dir_all(kdir.join("lib"))?;
        std::fs::rename(&usr_modules, kdir.join("lib/modules"))?;
    }
    std::fs::copy(kdir.join(format!("boot/vmlinuz-{release}")), &base.kernel)?;
    build_initramfs(&kdir, &release, &dir.join("initrd"), &base.initrd)?;
    build_rootfs(&base.rootfs, &kdir, &release)?;
    std::fs::remove_dir_all(&kdir)?;
    std::fs::write(&done, "")?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!("vm: guest image built in {secs:.0}s");
    Ok(BaseImage {
        build_secs: secs,
        ..base
    })
}

fn extract_kernel(source: &KernelSource, dir: &Path, kdir: &Path) -> anyhow::Result<()> {
    let dl = dir.join("download");
    std::fs::create_dir_all(&dl)?;
    let pkg = &source.package;
    if source.pool_files.is_empty() {
        let st = Command::new("apt-get")
            .args(["download", "-q", pkg])
            .current_dir(&dl)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .context("apt-get download")?;
        if !st.success() {
            bail!("apt-get download {pkg} failed");
        }
    }
    for (i, file) in source.pool_files.iter().enumerate() {
        let st = Command::new("curl")
            .args(["-fsS", "--max-time", "600", "-o", &format!("{i}.deb")])
            .arg(format!("{BACKPORTS}/{file}"))
            .current_dir(&dl)
            .stdin(Stdio::null())
            .status()
            .context("curl")?;
        if !st.success() {
            bail!("downloading {BACKPORTS}/{file} failed");
        }
    }
    let mut debs = 0;
    for deb in std::fs::read_dir(&dl)? {
        let deb = deb?.path();
        run(
            "dpkg",
            &["-x", deb.to_str().unwrap(), kdir.to_str().unwrap()],
        )?;
        debs += 1;
    }
    if debs == 0 {
        bail!("downloading {pkg} left no file");
    }
    std::fs::remove_dir_all(&dl)?;
    Ok(())
}

/// busybox + virtio_blk (a module in Debian's cloud kernel) + an /init that mounts the root.
fn build_initramfs(kdir: &Path, release: &str, tree: &Path, out: &Path) -> anyhow::Result<()> {
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib/modules"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static)")?;
    let module = kdir.join(format!(
        "lib/modules/{release}/kernel/drivers/block/virtio_blk.ko.xz"
    ));
    let ko = Command::new("xz")
        .arg("-dc")
        .arg(&module)
        .output()
        .context("xz")?;
    if !ko.status.success() {
        bail!("decompressing {}", module.display());
    }
    std::fs::write(tree.join("lib/modules/virtio_blk.ko"), ko.stdout)?;
    let init = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
insmod /lib/modules/virtio_blk.ko
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 -o rw /dev/vda /newroot || { echo "vmlab initramfs: cannot mount /dev/vda"; exec sh; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"#;
    std::fs::write(tree.join("init"), init)?;
    run("chmod", &["755", tree.join("init").to_str().unwrap()])?;
    let sh = format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
        tree.display(),
        out.display()
    );
    run("sh", &["-c", &sh])?;
    std::fs::remove_dir_all(tree)?;
    Ok(())
}

fn build_rootfs(rootfs: &Path, kdir: &Path, release: &str) -> anyhow::Result<()> {
    let include = PACKAGES.join(",");
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--quiet", "--variant=minbase", "--format=directory"])
        .arg(format!("--include={include}"))
        .args([SUITE, rootfs.to_str().unwrap()])
        .args(MIRRORS)
        .stdin(Stdio::null());
    let st = cmd
        .status()
        .context("running mmdebstrap (cargo xtask setup installs it)")?;
    if !st.success() {
        bail!("mmdebstrap failed ({st})");
    }
    // The kernel's modules (virtio_net, veth, sch_ingress, ... are modules).
    let modules = rootfs.join("lib/modules");
    std::fs::create_dir_all(&modules)?;
    run(
        "cp",
        &[
            "-a",
            kdir.join(format!("lib/modules/{release}"))
                .to_str()
                .unwrap(),
            modules.to_str().unwrap(),
        ],
    )?;
    run("depmod", &["-b", rootfs.to_str().unwrap(), release])?;
    // Cloned images must not share a machine id (udev derives software devices' MACs from it):
    // empty here, given per VM with systemd.machine_id= on the command line.
    std::fs::write(rootfs.join("etc/machine-id"), "")?;
    let _ = std::fs::remove_file(rootfs.join("var/lib/dbus/machine-id"));
    std::fs::write(rootfs.join("etc/fstab"), "/dev/vda / ext4 rw,noatime 0 0\n")?;
    std::fs::write(rootfs.join("etc/hostname"), "vmlab\n")?;
    let units = rootfs.join("etc/systemd/system");
    for unit in MASKED {
        let _ = std::fs::remove_file(units.join(unit));
        std::os::unix::fs::symlink("/dev/null", units.join(unit))?;
    }
    // Apt caches are not needed in the guest.
    let _ = std::fs::remove_dir_all(rootfs.join("var/cache/apt/archives"));
    let _ = std::fs::remove_dir_all(rootfs.join("var/lib/apt/lists"));
    Ok(())
}

/// The lab's guest-side helpers (underlay address, command channel), written into each run's
/// root rather than the cached base, so changing them costs no image rebuild.
fn install_helpers(rootfs: &Path) -> anyhow::Result<()> {
    let sbin = rootfs.join("usr/local/sbin");
    std::fs::create_dir_all(&sbin)?;
    for (name, text) in [("vm-net", VM_NET_SCRIPT), ("vm-ctl", VM_CTL_SCRIPT)] {
        std::fs::write(sbin.join(name), text)?;
        run("chmod", &["755", sbin.join(name).to_str().unwrap()])?;
    }
    // A lab VM has nothing worth 90 s of waiting at shutdown (the default for a stop job
    // that hangs): reboots in the tests stay short.
    let conf = rootfs.join("etc/systemd/system.conf.d");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(
        conf.join("vmlab.conf"),
        "[Manager]\nDefaultTimeoutStopSec=10s\n",
    )?;
    let units = rootfs.join("etc/systemd/system");
    for (name, text, target) in [
        ("vm-net.service", VM_NET_UNIT, "network-online.target"),
        ("vm-ctl.service", VM_CTL_UNIT, "sysinit.target"),
    ] {
        std::fs::write(units.join(name), text)?;
        let wants = units.join(format!("{target}.wants"));
        std::fs::create_dir_all(&wants)?;
        let _ = std::fs::remove_file(wants.join(name));
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{name}"), wants.join(name))?;
    }
    Ok(())
}

/// One run's root image: the cached root with `debs` installed (`dpkg -i` in a chroot over a
/// copy-on-write overlay of the cache) and `files` written, as an ext4 image at `out`.
pub fn make_root_image(
    base: &BaseImage,
    work: &Path,
    debs: &[PathBuf],
    files: &[(&str, String)],
    out: &Path,
) -> anyhow::Result<()> {
    let (upper, ovwork, merged) = (work.join("upper"), work.join("ovwork"), work.join("merged"));
    for d in [&upper, &ovwork, &merged] {
        std::fs::create_dir_all(d)?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        base.rootfs.display(),
        upper.display(),
        ovwork.display()
    );
    run(
        "mount",
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts,
            merged.to_str().unwrap(),
        ],
    )?;
    let result = (|| -> anyhow::Result<()> {
        for deb in debs {
            let name = deb.file_name().unwrap().to_string_lossy().into_owned();
            std::fs::copy(deb, merged.join("tmp").join(&name))?;
            let out = Command::new("chroot")
                .arg(&merged)
                .args(["dpkg", "-i", &format!("/tmp/{name}")])
                .stdin(Stdio::null())
                .output()?;
            if !out.status.success() {
                bail!(
                    "dpkg -i {name} in the guest root failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::fs::remove_file(merged.join("tmp").join(&name))?;
        }
        install_helpers(&merged)?;
        for (path, content) in files {
            let p = merged.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap())?;
            std::fs::write(&p, content)?;
        }
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                "vmroot",
                "-d",
                merged.to_str().unwrap(),
                out.to_str().unwrap(),
                "1536M",
            ],
        )?;
        Ok(())
    })();
    let umount = run("umount", &[merged.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&upper);
    let _ = std::fs::remove_dir_all(&ovwork);
    let _ = std::fs::remove_dir_all(&merged);
    result?;
    umount?;
    Ok(())
}
