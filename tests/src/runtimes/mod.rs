//! Real container runtimes driven on lab agents, shared by the per-runtime tests and the
//! runtimes matrix: Mesos' CNI isolator (emulated), dockerd, containerd (`ctr run --cni`) and
//! podman, plus what every test checks of an agent (addresses in use, veths, drop counters).

pub mod containerd;
pub mod docker;
pub mod mesos;
pub mod podman;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use overlay_lab::cluster::Cluster;

/// Debian's busybox-static, the only thing in the test images.
pub const BUSYBOX: &str = "/bin/busybox";
/// The busybox applets the images link.
pub const APPLETS: &[&str] = &["sh", "ip", "ping", "sleep", "cat", "echo", "nc"];

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a root directory holding busybox-static and [`APPLETS`] under `root`.
pub fn busybox_rootfs(root: &Path) -> PathBuf {
    let rootfs = root.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    for d in ["proc", "sys", "dev", "etc", "tmp", "run"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    rootfs
}

/// Tars directory `dir` into `tar`.
pub fn tar_dir(dir: &Path, tar: &Path) {
    let ok = Command::new("tar")
        .args([
            "-C",
            dir.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar of {} failed", dir.display());
}

/// A tar of [`busybox_rootfs`] (for `docker import` / `podman import`).
pub fn busybox_tar(root: &Path) -> PathBuf {
    let rootfs = busybox_rootfs(root);
    let tar = root.join("rootfs.tar");
    tar_dir(&rootfs, &tar);
    tar
}

/// Addresses in use in `agent`'s IPAM, over every network and half.
pub fn used(c: &Cluster, agent: &str) -> u32 {
    c.agent(agent).ipam().unwrap().iter().map(|u| u.used).sum()
}

/// The plugin's and driver's host veths (`eo...`) in `agent`'s namespace.
pub fn agent_veths(c: &Cluster, agent: &str) -> usize {
    // The cluster's own containers (`Cluster::add_container`) come through the plugin too;
    // only the runtime's count.
    let lab_veths: Vec<&str> = c
        .lab
        .containers()
        .iter()
        .map(|x| x.host_veth.as_str())
        .collect();
    let out = overlay_lab::run("ip", &["-n", &c.node(agent).unwrap().netns, "-o", "link"]).unwrap();
    out.lines()
        .filter(|l| l.contains(": eo"))
        .filter(|l| {
            !lab_veths
                .iter()
                .any(|v| l.contains(&format!(": {v}@")) || l.contains(&format!(": {v}:")))
        })
        .count()
}

/// The agent's `drop_cross_network` counter of `network`.
pub fn cross_drops(c: &Cluster, agent: &str, network: &str) -> u64 {
    let m = c.agent(agent).metrics().unwrap();
    let needle = format!("network=\"{network}\",counter=\"drop_cross_network\"}} ");
    m.lines()
        .filter(|l| l.starts_with("overlay_datapath_packets_total") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The first `inet` address in `ip -o addr` output.
pub fn inet_of(out: &str) -> Option<Ipv4Addr> {
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()
}
