//! Mesos UCR's `network/cni` isolator, emulated (no Mesos agent can run here): every regular
//! file of the agent's `--mesos-cni-conf-dir` is one single-plugin config; the plugin gets
//! exactly six environment variables; the task's `NetworkInfo` is injected on stdin under
//! `args["org.apache.mesos"]["network_info"]`, checkpointed and replayed verbatim on DEL
//! (without CNI_NETNS once the netns is gone); the result is read with the CNI 0.1/0.2 schema.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicUsize, Ordering},
};

use overlay_lab::cluster::Cluster;
use serde_json::Value;

use crate::bin_path;

/// Mesos' default PATH for what it runs (stout's `os::host_default_path`).
pub const MESOS_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static NEXT: AtomicUsize = AtomicUsize::new(1);

/// The isolator's view of one agent: its config directory (loaded as Mesos loads it), its
/// plugin directory and its runtime directory of checkpoints.
pub struct Isolator<'a> {
    pub c: &'a Cluster,
    pub agent: &'a str,
    pub plugins_dir: PathBuf,
    pub runtime_dir: PathBuf,
    /// Network name -> the config file's JSON.
    pub configs: BTreeMap<String, Value>,
}

/// A launched task: its netns (bind-mounted under the runtime directory, as Mesos does).
pub struct Task {
    pub container_id: String,
    pub netns_name: String,
    pub ns_path: PathBuf,
    /// The address Mesos parsed from the result.
    pub ip: Ipv4Addr,
}

impl<'a> Isolator<'a> {
    /// Loads every regular file of the agent's Mesos config directory, as the isolator does:
    /// each is one single-plugin config with `name` and `type`, whose `type` binary exists.
    pub fn load(c: &'a Cluster, agent: &'a str) -> Isolator<'a> {
        let plugins_dir = bin_path("ebpf-overlay").parent().unwrap().to_owned();
        let mut configs = BTreeMap::new();
        for entry in std::fs::read_dir(c.mesos_cni_conf_dir(agent)).unwrap() {
            let path = entry.unwrap().path();
            if !path.is_file() {
                continue;
            }
            let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: Mesos cannot parse it: {e}", path.display()));
            assert!(
                v.get("plugins").is_none(),
                "{}: Mesos refuses a list",
                path.display()
            );
            let name = v["name"].as_str().expect("name").to_owned();
            let ty = v["type"].as_str().expect("type");
            assert!(plugins_dir.join(ty).is_file(), "plugin {ty} not found");
            assert!(
                configs.insert(name.clone(), v).is_none(),
                "two configs name network {name}"
            );
        }
        let runtime_dir = c.work_dir().join(format!("mesos-{agent}"));
        std::fs::create_dir_all(&runtime_dir).unwrap();
        Isolator {
            c,
            agent,
            plugins_dir,
            runtime_dir,
            configs,
        }
    }

    /// Runs the plugin with the isolator's exact environment, in the agent's namespace.
    pub fn plugin(
        &self,
        command: &str,
        container_id: &str,
        ifname: &str,
        netns: Option<&Path>,
        stdin: &[u8],
    ) -> (i32, String) {
        use std::io::Write as _;
        let ty = serde_json::from_slice::<Value>(stdin).unwrap()["type"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut cmd = self
            .c
            .node(self.agent)
            .unwrap()
            .command(self.plugins_dir.join(ty));
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_PATH", &self.plugins_dir)
            .env("CNI_IFNAME", ifname)
            .env("PATH", MESOS_PATH);
        if let Some(ns) = netns {
            cmd.env("CNI_NETNS", ns);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    }

    /// Launches a task on `network_info.name` with interface `eth0`: netns, bind mount,
    /// injected NetworkInfo, ADD, checkpoint, result parsed as Mesos parses it.
    pub fn launch(&self, network_info: Value) -> Task {
        // Nested-container style (`parent.child`), as Mesos names them.
        let container_id = format!(
            "{}-{}.{}",
            self.c.lab.id(),
            self.agent,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let netns_name = format!(
            "{}-k{}",
            self.c.lab.id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        overlay_lab::run("ip", &["netns", "add", &netns_name]).unwrap();
        overlay_lab::run("ip", &["-n", &netns_name, "link", "set", "lo", "up"]).unwrap();
        let dir = self.runtime_dir.join(&container_id);
        std::fs::create_dir_all(&dir).unwrap();
        let ns_path = dir.join("ns");
        std::fs::write(&ns_path, b"").unwrap();
        overlay_lab::run(
            "mount",
            &[
                "--bind",
                &format!("/run/netns/{netns_name}"),
                ns_path.to_str().unwrap(),
            ],
        )
        .unwrap();
        let mut task = Task {
            container_id,
            netns_name,
            ns_path,
            ip: Ipv4Addr::UNSPECIFIED,
        };
        task.ip = self.attach(&task, network_info, "eth0");
        task
    }

    /// One more network of the task (Mesos: the next NetworkInfo, the next `ethN`).
    pub fn attach(&self, task: &Task, network_info: Value, ifname: &str) -> Ipv4Addr {
        let network = network_info["name"].as_str().unwrap();
        let conf = self.configs.get(network).expect("a config for the network");
        let dir = self.runtime_dir.join(&task.container_id).join(network);
        std::fs::create_dir_all(dir.join(ifname)).unwrap();
        let mut stdin = conf.clone();
        stdin["args"]["org.apache.mesos"]["network_info"] = network_info.clone();
        let stdin = stdin.to_string();
        // Checkpointed before the call, replayed verbatim on DEL.
        std::fs::write(dir.join("network.conf"), &stdin).unwrap();
        let (code, out) = self.plugin(
            "ADD",
            &task.container_id,
            ifname,
            Some(&task.ns_path),
            stdin.as_bytes(),
        );
        assert_eq!(code, 0, "ADD failed: {out}");
        std::fs::write(dir.join(ifname).join("network.info"), &out).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        // Mesos' spec::NetworkInfo: ip4, ip6, dns. A 0.3+ result would leave the task without
        // an address.
        let ip = v["ip4"]["ip"]
            .as_str()
            .unwrap_or_else(|| panic!("no ip4.ip for Mesos in {out}"));
        assert!(v["ip4"]["gateway"].is_string(), "{out}");
        ip.split('/').next().unwrap().parse().unwrap()
    }

    /// Removes the task's network on `eth0`.
    pub fn destroy(&self, task: &Task, network: &str) {
        self.detach(task, network, "eth0");
    }

    /// DEL with the checkpointed JSON, with CNI_NETNS only while the netns still exists.
    pub fn detach(&self, task: &Task, network: &str, ifname: &str) {
        let dir = self.runtime_dir.join(&task.container_id).join(network);
        let conf = std::fs::read(dir.join("network.conf")).unwrap();
        let netns = task.ns_path.exists().then_some(task.ns_path.as_path());
        let netns = netns.filter(|p| is_mounted(p));
        let (code, out) = self.plugin("DEL", &task.container_id, ifname, netns, &conf);
        assert_eq!(code, 0, "DEL failed: {out}");
        let _ = std::fs::remove_dir_all(dir);
    }
}

pub fn is_mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(p.to_str().unwrap()))
}

impl Task {
    /// The task's netns goes away (the agent rebooted, the task died).
    pub fn lose_netns(&self) {
        let _ = overlay_lab::run("umount", &[self.ns_path.to_str().unwrap()]);
        let _ = overlay_lab::run("ip", &["netns", "del", &self.netns_name]);
    }

    pub fn addr(&self) -> Option<Ipv4Addr> {
        let out = overlay_lab::run(
            "ip",
            &[
                "-n",
                &self.netns_name,
                "-j",
                "-4",
                "addr",
                "show",
                "dev",
                "eth0",
            ],
        )
        .ok()?;
        let v: Value = serde_json::from_str(&out).ok()?;
        v[0]["addr_info"][0]["local"].as_str()?.parse().ok()
    }

    /// Runs `script` with `sh` in the task's netns; its output, or the error.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        overlay_lab::run(
            "ip",
            &["netns", "exec", &self.netns_name, "sh", "-c", script],
        )
    }

    pub fn ping(&self, dst: Ipv4Addr) -> bool {
        overlay_lab::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns_name,
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                "-q",
                &dst.to_string(),
            ],
        )
        .is_ok()
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.lose_netns();
    }
}
