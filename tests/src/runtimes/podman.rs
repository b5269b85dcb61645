//! podman (CNI backend) inside a lab agent's network namespace (`nsenter --net`, so that the
//! host side of the veth lands there), with its own temporary storage, config and plugin
//! directories; it reads the agent's own `.conflist` files, unmodified.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use overlay_lab::cluster::Cluster;

use crate::bin_path;

/// The image `import` makes, from [`super::busybox_tar`].
pub const IMAGE: &str = "localhost/eo-busybox:latest";

/// podman's state for one agent; everything is removed on drop.
pub struct Podman {
    pub dir: PathBuf,
    /// The agent's `--cni-conf-dir`.
    pub net_d: PathBuf,
    pub netns: String,
}

impl Podman {
    pub fn new(c: &Cluster, agent: &str, root: &Path) -> Podman {
        let dir = root.join(format!("podman-{agent}"));
        for d in ["plugins", "root", "runroot", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy(bin_path("ebpf-overlay"), dir.join("plugins/ebpf-overlay")).unwrap();
        // podman reads the agent's own lists, unmodified.
        let net_d = c.cni_conf_dir(agent);
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"crun\"\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{p}\"]\nnetwork_config_dir = \"{n}\"\n",
                p = dir.join("plugins").display(),
                n = net_d.display(),
            ),
        )
        .unwrap();
        Podman {
            dir,
            net_d,
            netns: c.node(agent).unwrap().netns_path().display().to_string(),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        // This machine mounts cgroup v1 controllers with hugetlb on the unified (v2) hierarchy,
        // a hybrid crun refuses: podman gets a private mount namespace without the v2 mount
        // (propagation of everything else unchanged, so its /run/netns mounts stay visible).
        c.arg(format!("--net={}", self.netns))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "unchanged",
                "sh",
                "-c",
                "mount --make-rprivate /sys/fs/cgroup && umount /sys/fs/cgroup/unified; exec podman \"$@\"",
                "podman",
            ])
            .args([
                "--root",
                self.dir.join("root").to_str().unwrap(),
                "--runroot",
                self.dir.join("runroot").to_str().unwrap(),
                "--tmpdir",
                self.dir.join("tmp").to_str().unwrap(),
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                "--network-backend",
                "cni",
                "--network-config-dir",
                self.net_d.to_str().unwrap(),
            ])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env_remove("CONTAINERS_CONF_OVERRIDE");
        c
    }

    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cmd(args).output()?;
        if !out.status.success() {
            anyhow::bail!(
                "podman {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub fn import(&self, tar: &Path) {
        self.run(&["import", tar.to_str().unwrap(), IMAGE]).unwrap();
    }

    pub fn container_ip(&self, name: &str) -> Ipv4Addr {
        let out = self
            .run(&[
                "exec", name, "ip", "-4", "-o", "addr", "show", "dev", "eth0",
            ])
            .unwrap();
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {out:?}"))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.run(&["rmi", "--all", "--force"]);
        let _ = self.run(&["system", "reset", "--force"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
