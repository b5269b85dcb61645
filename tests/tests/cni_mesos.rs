//! Mesos UCR: the plugin driven exactly as Mesos' `network/cni` isolator drives it (no Mesos
//! agent can run here, so the test is the isolator): every regular file of the agent's
//! `--mesos-cni-conf-dir` is one single-plugin config; the plugin gets exactly six environment
//! variables (no CNI_ARGS, nothing inherited); the task's `NetworkInfo` is injected on stdin
//! under `args["org.apache.mesos"]["network_info"]`; that JSON is checkpointed and replayed
//! verbatim on DEL, without CNI_NETNS once the netns is gone; the result is read with the CNI
//! 0.1/0.2 schema only (`ip4.ip`), as Mesos does.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicUsize, Ordering},
};

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::bin_path;
use serde_json::{Value, json};

/// Mesos' default PATH for what it runs (stout's `os::host_default_path`).
const MESOS_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static NEXT: AtomicUsize = AtomicUsize::new(1);

/// The isolator's view of one agent: its config directory (loaded as Mesos loads it), its
/// plugin directory and its runtime directory of checkpoints.
struct Isolator<'a> {
    c: &'a Cluster,
    agent: &'a str,
    plugins_dir: PathBuf,
    runtime_dir: PathBuf,
    /// Network name -> the config file's JSON.
    configs: BTreeMap<String, Value>,
}

/// A launched task: its netns (bind-mounted under the runtime directory, as Mesos does).
struct Task {
    container_id: String,
    netns_name: String,
    ns_path: PathBuf,
    /// The address Mesos parsed from the result.
    ip: Ipv4Addr,
}

impl<'a> Isolator<'a> {
    /// Loads every regular file of the agent's Mesos config directory, as the isolator does:
    /// each is one single-plugin config with `name` and `type`, whose `type` binary exists.
    fn load(c: &'a Cluster, agent: &'a str) -> Isolator<'a> {
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
    fn plugin(
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
    fn launch(&self, network_info: Value) -> Task {
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
    fn attach(&self, task: &Task, network_info: Value, ifname: &str) -> Ipv4Addr {
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
    fn destroy(&self, task: &Task, network: &str) {
        self.detach(task, network, "eth0");
    }

    /// DEL with the checkpointed JSON, with CNI_NETNS only while the netns still exists.
    fn detach(&self, task: &Task, network: &str, ifname: &str) {
        let dir = self.runtime_dir.join(&task.container_id).join(network);
        let conf = std::fs::read(dir.join("network.conf")).unwrap();
        let netns = task.ns_path.exists().then_some(task.ns_path.as_path());
        let netns = netns.filter(|p| is_mounted(p));
        let (code, out) = self.plugin("DEL", &task.container_id, ifname, netns, &conf);
        assert_eq!(code, 0, "DEL failed: {out}");
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn is_mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(p.to_str().unwrap()))
}

impl Task {
    /// The task's netns goes away (the agent rebooted, the task died).
    fn lose_netns(&self) {
        let _ = overlay_lab::run("umount", &[self.ns_path.to_str().unwrap()]);
        let _ = overlay_lab::run("ip", &["netns", "del", &self.netns_name]);
    }

    fn addr(&self) -> Option<Ipv4Addr> {
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

    fn ping(&self, dst: Ipv4Addr) -> bool {
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

fn used(c: &Cluster, agent: &str) -> u32 {
    c.agent(agent).ipam().unwrap().iter().map(|u| u.used).sum()
}

fn plugin_veths(c: &Cluster, agent: &str) -> usize {
    let out = overlay_lab::run("ip", &["-n", &c.node(agent).unwrap().netns, "-o", "link"]).unwrap();
    out.lines().filter(|l| l.contains(": eo")).count()
}

#[test]
fn mesos_tasks_get_the_address_mesos_parses_and_reach_each_other_across_agents() {
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let c = Cluster::up(ClusterSpec::new(2, &bin_dir)).unwrap();
    let m1 = Isolator::load(&c, "a1");
    let m2 = Isolator::load(&c, "a2");
    // One single-plugin file per network, without a cniVersion (as DC/OS generated them).
    for m in [&m1, &m2] {
        assert_eq!(m.configs.keys().collect::<Vec<_>>(), ["blue", "dcos"]);
        for conf in m.configs.values() {
            assert!(conf.get("cniVersion").is_none(), "{conf}");
        }
    }
    let ni = |name: &str, extra: Value| {
        let mut v = json!({
            "name": name,
            "labels": {"labels": [{"key": "DCOS_SPACE", "value": "/web"}, {"key": "bare"}]},
            "port_mappings": [{"host_port": 31000, "container_port": 80, "protocol": "tcp"}],
            "groups": [],
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    // A task on a1 with an address of its choosing, one on a2 with any.
    let a1_subnet = c
        .agent_info("a1")
        .unwrap()
        .overlays
        .iter()
        .find(|o| o.info.name == "dcos")
        .and_then(|o| o.subnet)
        .unwrap();
    let wanted = Ipv4Addr::from(u32::from(a1_subnet.network()) + 9);
    let t1 = m1.launch(ni(
        "dcos",
        json!({"ip_addresses": [{"protocol": "IPv4", "ip_address": wanted.to_string()}]}),
    ));
    assert_eq!(t1.ip, wanted, "the requested ip_addresses entry");
    let t2 = m2.launch(ni("dcos", json!({"ip_addresses": [{"protocol": "IPv4"}]})));
    let t3 = m1.launch(ni("dcos", json!({})));
    // What Mesos parsed is what the task has.
    for t in [&t1, &t2, &t3] {
        assert_eq!(t.addr(), Some(t.ip), "task {}", t.container_id);
    }
    assert!(t1.ping(t2.ip), "a1 -> a2");
    assert!(t2.ping(t1.ip), "a2 -> a1");
    assert!(t3.ping(t1.ip), "same agent");
    // Another network is cut off.
    let blue = m1.launch(ni("blue", json!({})));
    assert_eq!(blue.addr(), Some(blue.ip));
    assert!(!blue.ping(t1.ip) && !blue.ping(t2.ip), "blue reached dcos");
    // A task naming two networks: eth0 on dcos, eth1 on blue, each reaching its own.
    let both = m1.launch(ni("dcos", json!({})));
    let both_blue = m1.attach(&both, ni("blue", json!({})), "eth1");
    assert!(both.ping(t2.ip), "eth0 -> dcos across agents");
    assert!(both.ping(blue.ip), "eth1 -> blue");
    assert!(
        blue.ping(both_blue) && !blue.ping(both.ip),
        "blue reaches only eth1"
    );
    m1.detach(&both, "blue", "eth1");
    m1.destroy(&both, "dcos");
    drop(both);
    assert_eq!((used(&c, "a1"), used(&c, "a2")), (3, 1));
    // DEL replays the checkpoint: while the netns exists, and after it is gone.
    m1.destroy(&t3, "dcos");
    t1.lose_netns();
    m1.destroy(&t1, "dcos");
    blue.lose_netns();
    m1.destroy(&blue, "blue");
    t2.lose_netns();
    m2.destroy(&t2, "dcos");
    // Replayed again (Mesos retries a failed cleanup): still fine.
    let replay = m2.configs["dcos"].to_string();
    assert_eq!(
        m2.plugin("DEL", &t2.container_id, "eth0", None, replay.as_bytes())
            .0,
        0
    );
    for agent in ["a1", "a2"] {
        assert_eq!(used(&c, agent), 0, "{agent}: addresses left");
        assert!(
            c.agent(agent).endpoints().unwrap().is_empty(),
            "{agent}: endpoints left"
        );
        assert_eq!(plugin_veths(&c, agent), 0, "{agent}: veths left");
    }
}
