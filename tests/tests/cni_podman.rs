//! A real container runtime: Debian's podman (CNI backend) runs containers on two lab agents
//! through the `ebpf-overlay` plugin; they reach each other across agents, and removing them
//! frees their addresses.
//!
//! podman runs inside each agent's network namespace (`nsenter --net`, so that the host side of
//! the veth lands there), with its own temporary storage, config and plugin directories. The
//! image is imported from a tar of busybox-static (nothing can be pulled).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::bin_path;

const BUSYBOX: &str = "/bin/busybox";
const IMAGE: &str = "localhost/eo-busybox:latest";

/// podman's state for one agent; everything is removed on drop.
struct Podman {
    dir: PathBuf,
    /// The agent's `--cni-conf-dir`.
    net_d: PathBuf,
    netns: String,
}

impl Podman {
    fn new(c: &Cluster, agent: &str, root: &Path) -> Podman {
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

    fn cmd(&self, args: &[&str]) -> Command {
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

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
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

    fn import(&self, tar: &Path) {
        self.run(&["import", tar.to_str().unwrap(), IMAGE]).unwrap();
    }

    fn container_ip(&self, name: &str) -> Ipv4Addr {
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

/// A tar of a root directory holding busybox-static and its applets we use.
fn busybox_tar(root: &Path) -> PathBuf {
    let rootfs = root.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    for d in ["proc", "sys", "dev", "etc", "tmp", "run"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "ip", "ping", "sleep", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let tar = root.join("rootfs.tar");
    let ok = Command::new("tar")
        .args([
            "-C",
            rootfs.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar failed");
    tar
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn podman_containers_on_two_agents_reach_each_other_and_free_their_addresses() {
    assert!(
        Path::new(BUSYBOX).exists() && Command::new("podman").arg("--version").output().is_ok(),
        "needs podman and busybox-static (cargo xtask setup)"
    );
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let c = Cluster::up(ClusterSpec::new(2, &bin_dir)).unwrap();
    let tmp = TempDir(std::env::temp_dir().join(format!("{}-podman", c.lab.id())));
    std::fs::create_dir_all(&tmp.0).unwrap();
    let tar = busybox_tar(&tmp.0);
    let p1 = Podman::new(&c, "a1", &tmp.0);
    let p2 = Podman::new(&c, "a2", &tmp.0);
    p1.import(&tar);
    p2.import(&tar);
    let run = |p: &Podman, name: &str| {
        p.run(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "dcos",
            "--cap-add",
            "NET_RAW",
            // podman asks for more open files than this machine allows
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
            // this machine mixes cgroup v1 and v2, which crun refuses to manage
            "--cgroups",
            "disabled",
            IMAGE,
            "/bin/sleep",
            "600",
        ])
        .unwrap()
    };
    run(&p1, "one");
    run(&p2, "two");
    let (ip1, ip2) = (p1.container_ip("one"), p2.container_ip("two"));
    let used = |agent: &str| -> u32 {
        c.agent(agent)
            .ipam()
            .unwrap()
            .iter()
            .filter(|u| u.network == "dcos")
            .map(|u| u.used)
            .sum()
    };
    assert_eq!((used("a1"), used("a2")), (1, 1));
    // The agents' endpoints are the podman containers.
    assert!(
        c.agent("a1")
            .endpoints()
            .unwrap()
            .iter()
            .any(|e| e.ip == ip1)
    );
    assert!(
        c.agent("a2")
            .endpoints()
            .unwrap()
            .iter()
            .any(|e| e.ip == ip2)
    );
    for (p, from, to) in [(&p1, "one", ip2), (&p2, "two", ip1)] {
        let out = p.run(&["exec", from, "ping", "-c", "2", "-W", "2", &to.to_string()]);
        assert!(out.is_ok(), "{from} cannot reach {to}: {out:?}");
    }
    // Removing the containers frees their addresses and endpoints.
    p1.run(&["rm", "--force", "--time", "0", "one"]).unwrap();
    p2.run(&["rm", "--force", "--time", "0", "two"]).unwrap();
    assert_eq!((used("a1"), used("a2")), (0, 0));
    assert!(c.agent("a1").endpoints().unwrap().is_empty());
    assert!(c.agent("a2").endpoints().unwrap().is_empty());
}
