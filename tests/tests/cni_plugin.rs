//! The CNI plugin `ebpf-overlay` driven as a runtime drives it (CNI_* environment, config on
//! stdin, result on stdout, exit code), run in a lab agent's namespace against the real agent.

use std::{
    net::Ipv4Addr,
    process::Stdio,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::bin_path;
use serde_json::{Value, json};

fn cluster_with(agents: usize, config: Option<&str>) -> Cluster {
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let mut spec = ClusterSpec::new(agents, &bin_dir);
    if let Some(c) = config {
        spec.config = c.into();
    }
    Cluster::up(spec).unwrap()
}

/// The plugin config the agent wrote for `network` (what a runtime hands the plugin: the
/// list's one plugin with the list's name), at `version`.
fn agent_conf(c: &Cluster, agent: &str, network: &str, version: &str) -> Value {
    let dir = c.cni_conf_dir(agent);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&format!("-{network}.conflist")))
        })
        .unwrap_or_else(|| panic!("no list for {network} in {}", dir.display()));
    let list: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let mut v = list["plugins"][0].clone();
    v["name"] = list["name"].clone();
    v["cniVersion"] = json!(version);
    v
}

struct Answer {
    code: i32,
    stdout: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }
    fn ok(&self) -> &Answer {
        assert_eq!(self.code, 0, "plugin failed: {}", self.stdout);
        self
    }
    /// Asserts a CNI error with `code`; returns its message.
    fn err(&self, code: u64) -> String {
        assert_ne!(
            self.code, 0,
            "expected error {code}, got success: {}",
            self.stdout
        );
        let v = self.json();
        assert_eq!(v["code"].as_u64(), Some(code), "{}", self.stdout);
        assert!(v["cniVersion"].is_string(), "{}", self.stdout);
        v["msg"].as_str().unwrap().to_owned()
    }
}

/// One plugin invocation in `agent`'s namespace.
fn cni(c: &Cluster, agent: &str, env: &[(&str, &str)], stdin: &[u8]) -> Answer {
    use std::io::Write as _;
    let mut cmd = c.node(agent).unwrap().command(bin_path("ebpf-overlay"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .env("CNI_PATH", bin_path("ebpf-overlay").parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    Answer {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(1);

/// A container network namespace named after the lab (the lab's teardown removes it too).
struct Netns {
    name: String,
}

impl Netns {
    fn new(c: &Cluster) -> Netns {
        let name = format!("{}-k{}", c.lab.id(), NEXT.fetch_add(1, Ordering::Relaxed));
        overlay_lab::run("ip", &["netns", "add", &name]).unwrap();
        overlay_lab::run("ip", &["-n", &name, "link", "set", "lo", "up"]).unwrap();
        Netns { name }
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
    fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        overlay_lab::run("ip", &a)
    }
    fn ping(&self, dst: Ipv4Addr) -> bool {
        overlay_lab::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
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

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = overlay_lab::run("ip", &["netns", "del", &self.name]);
    }
}

fn op<'a>(cmd: &'a str, id: &'a str, ns: &'a str, ifname: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", id),
        ("CNI_IFNAME", ifname),
    ];
    if !ns.is_empty() {
        v.push(("CNI_NETNS", ns));
    }
    v
}

fn add(c: &Cluster, agent: &str, conf: &Value, id: &str, ns: &Netns) -> Answer {
    cni(
        c,
        agent,
        &op("ADD", id, &ns.path(), "eth0"),
        conf.to_string().as_bytes(),
    )
}

fn del(c: &Cluster, agent: &str, conf: &Value, id: &str, ns: Option<&Netns>) -> Answer {
    let path = ns.map(Netns::path).unwrap_or_default();
    cni(
        c,
        agent,
        &op("DEL", id, &path, "eth0"),
        conf.to_string().as_bytes(),
    )
}

fn result_ip(a: &Answer) -> Ipv4Addr {
    let v = a.json();
    v["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Host veths the plugin made in `agent`'s namespace.
fn plugin_veths(c: &Cluster, agent: &str) -> Vec<String> {
    let ns = &c.node(agent).unwrap().netns;
    let out = overlay_lab::run("ip", &["-n", ns, "-j", "link", "show"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with("eo"))
        .map(str::to_owned)
        .collect()
}

fn used(c: &Cluster, agent: &str, network: &str) -> u32 {
    c.agent(agent)
        .ipam()
        .unwrap()
        .iter()
        .filter(|u| u.network == network)
        .map(|u| u.used)
        .sum()
}

/// Nothing of the plugin's left on `agent`: no address, veth or endpoint.
fn assert_clean(c: &Cluster, agent: &str) {
    for u in c.agent(agent).ipam().unwrap() {
        assert_eq!(u.used, 0, "addresses left: {u:?}");
    }
    assert_eq!(plugin_veths(c, agent), Vec::<String>::new(), "veths left");
    assert_eq!(
        c.agent(agent).endpoints().unwrap(),
        vec![],
        "endpoints left"
    );
}

#[test]
fn add_check_del_for_every_version_against_a_real_agent() {
    let c = cluster_with(2, None);
    // The agent wrote one config per network, named like DC/OS's.
    for net in ["dcos", "blue"] {
        let conf = agent_conf(&c, "a1", net, "1.0.0");
        assert_eq!(conf["type"], "ebpf-overlay");
        assert_eq!(conf["network"], net);
    }
    let remote_ns = Netns::new(&c);
    let remote_conf = agent_conf(&c, "a2", "dcos", "1.0.0");
    let remote = add(&c, "a2", &remote_conf, "remote", &remote_ns);
    let remote_ip = result_ip(remote.ok());
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let conf = agent_conf(&c, "a1", "dcos", version);
        let ns = Netns::new(&c);
        let id = format!("ctr-{}", version.replace('.', ""));
        let a = add(&c, "a1", &conf, &id, &ns);
        let v = a.ok().json();
        assert_eq!(v["cniVersion"], version);
        assert_eq!(
            v["ips"][0].get("version").is_some(),
            version == "0.4.0",
            "ips[].version only in 0.4.0: {v}"
        );
        let ip = result_ip(&a);
        let gw: Ipv4Addr = v["ips"][0]["gateway"].as_str().unwrap().parse().unwrap();
        let host_veth = v["interfaces"][0]["name"].as_str().unwrap().to_owned();
        assert!(host_veth.starts_with("eo") && host_veth.len() <= 15);
        assert_eq!(v["interfaces"][1]["sandbox"], ns.path());
        // In the container: address, MTU, default route; the agent's endpoint entry.
        let link: Value =
            serde_json::from_str(&ns.ip(&["-j", "addr", "show", "dev", "eth0"]).unwrap()).unwrap();
        assert_eq!(link[0]["mtu"], 1420);
        assert_eq!(link[0]["addr_info"][0]["local"], ip.to_string());
        let routes = ns.ip(&["route", "show", "default"]).unwrap();
        assert!(routes.contains(&format!("via {gw}")), "{routes}");
        let ep = c
            .agent("a1")
            .endpoints()
            .unwrap()
            .into_iter()
            .find(|e| e.ip == ip)
            .expect("endpoint registered before ADD returned");
        assert_eq!(ep.host_veth, host_veth);
        assert_eq!(
            ep.attachment.as_deref(),
            Some(format!("{id}/eth0").as_str())
        );
        // It works: across agents through the datapath.
        assert!(
            ns.ping(remote_ip),
            "{version}: {ip} cannot reach {remote_ip}"
        );
        // CHECK passes, then says what differs once the route is gone.
        let mut check_conf = conf.clone();
        check_conf["prevResult"] = v.clone();
        let check = cni(
            &c,
            "a1",
            &op("CHECK", &id, &ns.path(), "eth0"),
            check_conf.to_string().as_bytes(),
        );
        check.ok();
        assert_eq!(check.stdout, "");
        ns.ip(&["route", "del", "default"]).unwrap();
        let msg = cni(
            &c,
            "a1",
            &op("CHECK", &id, &ns.path(), "eth0"),
            check_conf.to_string().as_bytes(),
        )
        .err(104);
        assert!(msg.contains("default route"), "{msg}");
        // DEL frees everything and is idempotent, also once the netns is gone.
        del(&c, "a1", &conf, &id, Some(&ns)).ok();
        assert!(
            c.agent("a1")
                .endpoints()
                .unwrap()
                .iter()
                .all(|e| e.ip != ip)
        );
        assert!(!plugin_veths(&c, "a1").contains(&host_veth));
        del(&c, "a1", &conf, &id, Some(&ns)).ok();
        drop(ns);
        del(&c, "a1", &conf, &id, None).ok();
        let msg = cni(
            &c,
            "a1",
            &op("CHECK", &id, "/run/netns/none", "eth0"),
            conf.to_string().as_bytes(),
        )
        .err(104);
        assert!(msg.contains("no endpoint"), "{msg}");
    }
    assert_clean(&c, "a1");
    // DEL after the container's netns vanished without a DEL: address and veth go.
    let conf = agent_conf(&c, "a1", "dcos", "1.0.0");
    let ns = Netns::new(&c);
    add(&c, "a1", &conf, "vanish", &ns).ok();
    drop(ns);
    del(&c, "a1", &conf, "vanish", None).ok();
    assert_clean(&c, "a1");
    del(&c, "a2", &remote_conf, "remote", Some(&remote_ns)).ok();
    assert_clean(&c, "a2");
}

#[test]
fn pre_0_4_versions_and_configs_without_a_version_get_their_result_shape() {
    let c = cluster_with(1, None);
    for version in ["0.1.0", "0.2.0", "0.3.0", "0.3.1", ""] {
        let mut conf = agent_conf(&c, "a1", "dcos", version);
        if version.is_empty() {
            conf.as_object_mut().unwrap().remove("cniVersion");
        }
        let ns = Netns::new(&c);
        let id = format!("old-{}", version.replace('.', ""));
        let a = add(&c, "a1", &conf, &id, &ns);
        let v = a.ok().json();
        let addr = if version.starts_with("0.3") {
            assert_eq!(v["cniVersion"], version);
            assert_eq!(v["ips"][0]["version"], "4", "{v}");
            v["ips"][0]["address"].as_str().unwrap().to_owned()
        } else {
            // 0.1/0.2 (and no version: 0.2.0): the ip4 object, nothing of the later shapes.
            assert_eq!(
                v["cniVersion"],
                if version.is_empty() { "0.2.0" } else { version }
            );
            assert!(
                v.get("ips").is_none() && v.get("interfaces").is_none(),
                "{v}"
            );
            assert!(v["ip4"]["gateway"].is_string(), "{v}");
            v["ip4"]["ip"].as_str().unwrap().to_owned()
        };
        let link: Value =
            serde_json::from_str(&ns.ip(&["-j", "addr", "show", "dev", "eth0"]).unwrap()).unwrap();
        let have = format!(
            "{}/{}",
            link[0]["addr_info"][0]["local"].as_str().unwrap(),
            link[0]["addr_info"][0]["prefixlen"]
        );
        assert_eq!(
            have, addr,
            "{version}: the result names the container's address"
        );
        del(&c, "a1", &conf, &id, Some(&ns)).ok();
    }
    assert_clean(&c, "a1");
}

#[test]
fn version_status_gc_static_addresses_and_the_docker_half() {
    let c = cluster_with(1, None);
    let conf = agent_conf(&c, "a1", "dcos", "1.1.0");
    // VERSION
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        let a = cni(
            &c,
            "a1",
            &[("CNI_COMMAND", "VERSION")],
            json!({"cniVersion": v}).to_string().as_bytes(),
        );
        let out = a.ok().json();
        assert_eq!(out["cniVersion"], v);
        assert_eq!(
            out["supportedVersions"],
            json!([
                "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"
            ])
        );
    }
    // STATUS: up, and a network the agent has no subnet on.
    let status = cni(
        &c,
        "a1",
        &[("CNI_COMMAND", "STATUS")],
        conf.to_string().as_bytes(),
    );
    status.ok();
    let mut unknown = conf.clone();
    unknown["network"] = json!("nosuchnet");
    cni(
        &c,
        "a1",
        &[("CNI_COMMAND", "STATUS")],
        unknown.to_string().as_bytes(),
    )
    .err(50);
    // Static addresses: CNI_ARGS IP= and runtimeConfig.ips; the Docker half.
    let info = c.agent_info("a1").unwrap();
    let subnet = info
        .overlays
        .iter()
        .find(|o| o.info.name == "dcos")
        .unwrap()
        .subnet
        .unwrap();
    let base = u32::from(subnet.network());
    let want = Ipv4Addr::from(base + 42);
    let ns1 = Netns::new(&c);
    let args = format!("IgnoreUnknown=1;IP={want}");
    let p1 = ns1.path();
    let env = [
        op("ADD", "static1", &p1, "eth0"),
        vec![("CNI_ARGS", args.as_str())],
    ]
    .concat();
    let a = cni(&c, "a1", &env, conf.to_string().as_bytes());
    assert_eq!(result_ip(a.ok()), want);
    let want2 = Ipv4Addr::from(base + 43);
    let mut rc = conf.clone();
    rc["runtimeConfig"] = json!({"ips": [format!("{want2}/25")]});
    let ns2 = Netns::new(&c);
    assert_eq!(result_ip(add(&c, "a1", &rc, "static2", &ns2).ok()), want2);
    // The same address again: refused, nothing left behind.
    let ns3 = Netns::new(&c);
    let veths = plugin_veths(&c, "a1").len();
    add(&c, "a1", &rc, "static3", &ns3).err(101);
    assert_eq!(plugin_veths(&c, "a1").len(), veths);
    let mut docker = conf.clone();
    docker["half"] = json!("docker");
    let a = add(&c, "a1", &docker, "dock", &ns3);
    let dip = result_ip(a.ok());
    assert!(
        u32::from(dip) >= base + 128,
        "{dip} is not in the docker half of {subnet}"
    );
    assert_eq!(
        a.json()["ips"][0]["gateway"],
        Ipv4Addr::from(base + 129).to_string()
    );
    assert_eq!(used(&c, "a1", "dcos"), 3);
    // GC keeps only the listed attachments.
    let mut gc = conf.clone();
    gc["cni.dev/attachments"] = json!([{"containerID": "static2", "ifname": "eth0"}]);
    cni(
        &c,
        "a1",
        &[("CNI_COMMAND", "GC")],
        gc.to_string().as_bytes(),
    )
    .ok();
    assert_eq!(used(&c, "a1", "dcos"), 1);
    let eps = c.agent("a1").endpoints().unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].ip, want2);
    assert_eq!(plugin_veths(&c, "a1").len(), 1);
    gc["cni.dev/attachments"] = json!([]);
    cni(
        &c,
        "a1",
        &[("CNI_COMMAND", "GC")],
        gc.to_string().as_bytes(),
    )
    .ok();
    assert_clean(&c, "a1");
    // GC and STATUS need 1.1.0.
    cni(
        &c,
        "a1",
        &[("CNI_COMMAND", "GC")],
        agent_conf(&c, "a1", "dcos", "1.0.0").to_string().as_bytes(),
    )
    .err(1);
}

#[test]
fn fifty_parallel_adds_then_an_add_del_storm_leave_nothing_behind() {
    let c = cluster_with(1, None);
    let conf = agent_conf(&c, "a1", "dcos", "1.0.0");
    let nss: Vec<Netns> = (0..50).map(|_| Netns::new(&c)).collect();
    let start = Instant::now();
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let hs: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let (c, conf) = (&c, &conf);
                s.spawn(move || add(c, "a1", conf, &format!("p{i}"), ns))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = start.elapsed();
    let ips: Vec<Ipv4Addr> = answers.iter().map(|a| result_ip(a.ok())).collect();
    let distinct: std::collections::BTreeSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), 50, "{ips:?}");
    println!("50 parallel ADDs on one agent: {took:?}");
    assert_eq!(used(&c, "a1", "dcos"), 50);
    for (from, to) in [(0, 49), (10, 20), (30, 5), (49, 0)] {
        assert!(
            nss[from].ping(ips[to]),
            "{} cannot reach {}",
            ips[from],
            ips[to]
        );
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        for (i, ns) in nss.iter().enumerate() {
            let (c, conf) = (&c, &conf);
            s.spawn(move || del(c, "a1", conf, &format!("p{i}"), Some(ns)).ok().code);
        }
    });
    println!("50 parallel DELs: {:?}", start.elapsed());
    assert_clean(&c, "a1");
    // Storm: ADD and DEL of the same attachments interleaved from many threads.
    std::thread::scope(|s| {
        for (i, ns) in nss.iter().enumerate().take(20) {
            let (c, conf) = (&c, &conf);
            s.spawn(move || {
                for round in 0..3 {
                    let id = format!("s{i}");
                    let a = add(c, "a1", conf, &id, ns);
                    assert_eq!(a.code, 0, "round {round}: {}", a.stdout);
                    if i % 2 == 0 {
                        // A second DEL racing the first, and one for an unknown container.
                        del(c, "a1", conf, &id, Some(ns)).ok();
                        del(c, "a1", conf, &id, Some(ns)).ok();
                    } else {
                        del(c, "a1", conf, &id, None).ok();
                    }
                    del(c, "a1", conf, &format!("never{i}"), None).ok();
                }
            });
        }
    });
    assert_clean(&c, "a1");
}

const SMALL: &str = "\
vtep_subnet: 44.128.0.0/20
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - name: dcos
    subnet: 9.0.0.0/24
    prefix: 28
";

#[test]
fn exhaustion_is_error_100_with_the_metric_and_leaves_nothing_behind() {
    let c = cluster_with(1, Some(SMALL));
    let conf = agent_conf(&c, "a1", "dcos", "1.0.0");
    let nss: Vec<Netns> = (0..6).map(|_| Netns::new(&c)).collect();
    // A /28 per agent: each half a /29 with 5 usable addresses.
    for (i, ns) in nss.iter().enumerate().take(5) {
        add(&c, "a1", &conf, &format!("x{i}"), ns).ok();
    }
    let veths = plugin_veths(&c, "a1");
    let msg = add(&c, "a1", &conf, "x5", &nss[5]).err(100);
    let subnet = c.agent_info("a1").unwrap().overlays[0].subnet.unwrap();
    assert!(
        msg.contains("dcos") && msg.contains(&subnet.to_string()),
        "{msg}"
    );
    assert_eq!(plugin_veths(&c, "a1"), veths, "failed ADD left a veth");
    assert!(
        nss[5].ip(&["link", "show", "eth0"]).is_err(),
        "failed ADD left eth0"
    );
    assert_eq!(used(&c, "a1", "dcos"), 5);
    let m = c.agent("a1").metrics().unwrap();
    assert!(
        m.contains("network=\"dcos\",family=\"ipv4\",state=\"used\"} 5"),
        "{m}"
    );
    assert!(m.contains("network=\"dcos\",family=\"ipv4\"} 1"), "{m}");
    // Freeing one makes room again.
    del(&c, "a1", &conf, "x0", Some(&nss[0])).ok();
    add(&c, "a1", &conf, "x5", &nss[5]).ok();
}

#[test]
fn agent_down_is_error_11_and_leaves_nothing_behind() {
    let mut c = cluster_with(1, None);
    let conf = agent_conf(&c, "a1", "dcos", "1.0.0");
    let ns = Netns::new(&c);
    c.stop_agent("a1");
    let msg = add(&c, "a1", &conf, "down", &ns).err(11);
    assert!(msg.contains("try again"), "{msg}");
    assert!(
        ns.ip(&["link", "show", "eth0"]).is_err(),
        "eth0 left in the container"
    );
    assert_eq!(plugin_veths(&c, "a1"), Vec::<String>::new());
    del(&c, "a1", &conf, "down", Some(&ns)).err(11);
    let mut v11 = conf.clone();
    v11["cniVersion"] = json!("1.1.0");
    cni(
        &c,
        "a1",
        &[("CNI_COMMAND", "STATUS")],
        v11.to_string().as_bytes(),
    )
    .err(50);
    c.start_agent("a1").unwrap();
    assert_clean(&c, "a1");
    add(&c, "a1", &conf, "up", &ns).ok();
}

#[test]
fn allocations_survive_an_agent_restart_and_sigkill() {
    let mut c = cluster_with(1, None);
    let conf = agent_conf(&c, "a1", "dcos", "1.0.0");
    let nss: Vec<Netns> = (0..3).map(|_| Netns::new(&c)).collect();
    let before: Vec<Ipv4Addr> = nss
        .iter()
        .enumerate()
        .map(|(i, ns)| result_ip(add(&c, "a1", &conf, &format!("r{i}"), ns).ok()))
        .collect();
    // SIGKILL: the lab's stop sends TERM; kill the process outright instead.
    let pid: i32 = overlay_lab::run("pgrep", &["-f", c.socket("a1").to_str().unwrap()])
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    c.stop_agent("a1");
    c.start_agent("a1").unwrap();
    assert_eq!(used(&c, "a1", "dcos"), 3);
    let ns = Netns::new(&c);
    let new = result_ip(add(&c, "a1", &conf, "after", &ns).ok());
    assert!(!before.contains(&new), "{new} handed out twice");
    for (i, ns) in nss.iter().enumerate() {
        del(&c, "a1", &conf, &format!("r{i}"), Some(ns)).ok();
    }
    del(&c, "a1", &conf, "after", Some(&ns)).ok();
    assert_clean(&c, "a1");
}

#[test]
fn malformed_environment_and_config_get_the_right_codes() {
    let c = cluster_with(1, None);
    let conf = agent_conf(&c, "a1", "dcos", "1.0.0").to_string();
    let ns = Netns::new(&c);
    let p = ns.path();
    let cases: Vec<(Vec<(&str, &str)>, &[u8], u64)> = vec![
        (vec![("CNI_COMMAND", "")], conf.as_bytes(), 4),
        (vec![("CNI_COMMAND", "FROB")], conf.as_bytes(), 4),
        (op("ADD", "c1", "", "eth0"), conf.as_bytes(), 4),
        (op("ADD", "c1", &p, ""), conf.as_bytes(), 4),
        (op("ADD", "bad id!", &p, "eth0"), conf.as_bytes(), 4),
        (
            op("ADD", "c1", &p, "way-too-long-ifname"),
            conf.as_bytes(),
            4,
        ),
        (
            [op("ADD", "c1", &p, "eth0"), vec![("CNI_ARGS", "IP")]].concat(),
            conf.as_bytes(),
            4,
        ),
        (op("ADD", "c1", &p, "eth0"), b"{not json", 6),
        (op("ADD", "c1", &p, "eth0"), b"", 6),
        (op("ADD", "c1", &p, "eth0"), br#"{"cniVersion":"1.0.0"}"#, 7),
        (
            op("ADD", "c1", &p, "eth0"),
            br#"{"cniVersion":"1.0.0","name":"dcos","mtu":"big"}"#,
            7,
        ),
        (
            op("ADD", "c1", &p, "eth0"),
            br#"{"cniVersion":"0.5.0","name":"dcos"}"#,
            1,
        ),
        (
            op("CHECK", "c1", &p, "eth0"),
            br#"{"cniVersion":"0.3.1","name":"dcos"}"#,
            1,
        ),
        (
            op("ADD", "c1", "/run/netns/does-not-exist", "eth0"),
            conf.as_bytes(),
            3,
        ),
    ];
    for (env, stdin, code) in cases {
        let a = cni(&c, "a1", &env, stdin);
        a.err(code);
    }
    // Run by hand, without CNI_COMMAND: what it is, its version, the versions it speaks.
    let out = std::process::Command::new(bin_path("ebpf-overlay"))
        .env_remove("CNI_COMMAND")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let about = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    assert!(
        about.contains(&format!(
            "ebpf-overlay CNI plugin v{}",
            env!("CARGO_PKG_VERSION")
        )) && about.contains("0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
        "{about}"
    );
    // A network this agent does not have: our own code, nothing created.
    let mut other = agent_conf(&c, "a1", "dcos", "1.0.0");
    other["network"] = json!("green");
    add(&c, "a1", &other, "c1", &ns).err(102);
    assert_clean(&c, "a1");
}

#[test]
fn a_container_on_two_networks_gets_an_address_and_a_route_per_interface() {
    let c = cluster_with(2, None);
    let (dcos1, blue1) = (
        agent_conf(&c, "a1", "dcos", "1.0.0"),
        agent_conf(&c, "a1", "blue", "1.0.0"),
    );
    // Peers on a2: one on each network.
    let (dcos_peer, blue_peer) = (Netns::new(&c), Netns::new(&c));
    let dcos_peer_ip = result_ip(
        add(
            &c,
            "a2",
            &agent_conf(&c, "a2", "dcos", "1.0.0"),
            "pd",
            &dcos_peer,
        )
        .ok(),
    );
    let blue_peer_ip = result_ip(
        add(
            &c,
            "a2",
            &agent_conf(&c, "a2", "blue", "1.0.0"),
            "pb",
            &blue_peer,
        )
        .ok(),
    );
    // One container: eth0 on dcos, then net1 on blue (a Mesos task naming two networks).
    let ns = Netns::new(&c);
    let a0 = cni(
        &c,
        "a1",
        &op("ADD", "multi", &ns.path(), "eth0"),
        dcos1.to_string().as_bytes(),
    );
    let a1 = cni(
        &c,
        "a1",
        &op("ADD", "multi", &ns.path(), "net1"),
        blue1.to_string().as_bytes(),
    );
    let (ip0, ip1) = (result_ip(a0.ok()), result_ip(a1.ok()));
    assert_ne!(ip0, ip1);
    assert_eq!(a0.json()["routes"][0]["dst"], "0.0.0.0/0");
    assert_eq!(
        a1.json()["routes"][0]["dst"],
        "10.1.0.0/16",
        "{}",
        a1.stdout
    );
    let routes = ns.ip(&["route"]).unwrap();
    assert!(
        routes.contains("default via") && routes.contains("dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("10.1.0.0/16 via") && routes.contains("dev net1"),
        "{routes}"
    );
    let eps = c.agent("a1").endpoints().unwrap();
    let net_of = |ip: Ipv4Addr| eps.iter().find(|e| e.ip == ip).map(|e| e.network.clone());
    assert_eq!(net_of(ip0).as_deref(), Some("dcos"));
    assert_eq!(net_of(ip1).as_deref(), Some("blue"));
    // Each network through its interface.
    assert!(ns.ping(dcos_peer_ip), "eth0 -> dcos peer");
    assert!(ns.ping(blue_peer_ip), "net1 -> blue peer");
    assert!(
        dcos_peer.ping(ip0) && blue_peer.ping(ip1),
        "peers -> the container"
    );
    // Isolation per interface: a dcos peer does not reach the blue address, nor does traffic
    // forced out of eth0 reach the blue peer.
    assert!(
        !dcos_peer.ping(ip1),
        "dcos reached the container's blue address"
    );
    let forced = overlay_lab::run(
        "ip",
        &[
            "netns",
            "exec",
            &ns.name,
            "ping",
            "-I",
            "eth0",
            "-c",
            "1",
            "-W",
            "1",
            "-q",
            &blue_peer_ip.to_string(),
        ],
    );
    assert!(forced.is_err(), "eth0 (dcos) reached the blue peer");
    // CHECK holds for both, DEL frees both.
    for (ifname, conf, a) in [("eth0", &dcos1, &a0), ("net1", &blue1, &a1)] {
        let mut check = conf.clone();
        check["prevResult"] = a.json();
        cni(
            &c,
            "a1",
            &op("CHECK", "multi", &ns.path(), ifname),
            check.to_string().as_bytes(),
        )
        .ok();
    }
    cni(
        &c,
        "a1",
        &op("DEL", "multi", &ns.path(), "net1"),
        blue1.to_string().as_bytes(),
    )
    .ok();
    cni(
        &c,
        "a1",
        &op("DEL", "multi", &ns.path(), "eth0"),
        dcos1.to_string().as_bytes(),
    )
    .ok();
    assert_clean(&c, "a1");
    del(
        &c,
        "a2",
        &agent_conf(&c, "a2", "dcos", "1.0.0"),
        "pd",
        Some(&dcos_peer),
    )
    .ok();
    del(
        &c,
        "a2",
        &agent_conf(&c, "a2", "blue", "1.0.0"),
        "pb",
        Some(&blue_peer),
    )
    .ok();
    assert_clean(&c, "a2");
}

#[test]
fn the_plugin_needs_no_ip_or_nsenter_on_its_path() {
    // The plugin spawns nothing (netlink and setns): with a PATH holding no iproute2 or
    // util-linux, ADD, CHECK and DEL work and the container is reachable.
    let c = cluster_with(1, None);
    let empty = std::env::temp_dir().join(format!("{}-empty-path", c.lab.id()));
    std::fs::create_dir_all(&empty).unwrap();
    let path = empty.to_str().unwrap();
    let conf = agent_conf(&c, "a1", "dcos", "1.0.0");
    let ns = Netns::new(&c);
    let with_path = |cmd: &'static str| {
        let mut env = op(cmd, "nopath", Box::leak(ns.path().into_boxed_str()), "eth0");
        env.push(("PATH", path));
        env
    };
    let a = cni(&c, "a1", &with_path("ADD"), conf.to_string().as_bytes());
    let ip = result_ip(a.ok());
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = a.json();
    cni(
        &c,
        "a1",
        &with_path("CHECK"),
        check_conf.to_string().as_bytes(),
    )
    .ok();
    // The container's side as ADD left it, seen by iproute2 from outside.
    let addr = ns.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(addr.contains(&format!("inet {ip}/")), "{addr}");
    // A second container, and the datapath carries packets between the two.
    let peer_ns = Netns::new(&c);
    let peer = add(&c, "a1", &conf, "nopath-peer", &peer_ns);
    let peer_ip = result_ip(peer.ok());
    assert!(ns.ping(peer_ip), "{ip} -> {peer_ip}");
    del(&c, "a1", &conf, "nopath-peer", Some(&peer_ns)).ok();
    cni(&c, "a1", &with_path("DEL"), conf.to_string().as_bytes()).ok();
    assert_clean(&c, "a1");
    let _ = std::fs::remove_dir(&empty);
}

const DUAL: &str = "\
vtep_subnet: 44.128.0.0/20
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - name: dual
    subnet: 9.0.0.0/8
    prefix: 24
    subnet6: fd01:c::/112
    prefix6: 124
  - name: dcos6
    subnet6: fd01:b::/64
    prefix6: 80
";

/// The addresses of a result in any shape, by family (`ip4`/`ip6` objects or the `ips` list).
fn result_addrs(v: &Value) -> Vec<String> {
    match v.get("ips") {
        Some(ips) => ips
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["address"].as_str().unwrap().to_owned())
            .collect(),
        None => ["ip4", "ip6"]
            .iter()
            .filter_map(|k| v.get(*k).map(|o| o["ip"].as_str().unwrap().to_owned()))
            .collect(),
    }
}

#[test]
fn dual_stack_results_check_del_and_ipv6_exhaustion_per_version() {
    let c = cluster_with(1, Some(DUAL));
    let me = c.agent_info("a1").unwrap();
    let dual = me.overlays.iter().find(|o| o.info.name == "dual").unwrap();
    let (cni4, _) = overlay_api::subnets::halves4(dual.subnet.unwrap());
    let (cni6, _) = overlay_api::subnets::halves6(dual.subnet6.unwrap());
    let gw4 = overlay_api::subnets::gateway4(cni4).to_string();
    let gw6 = overlay_api::subnets::gateway6(cni6).to_string();
    // One ADD per version, each checked in its own shape, then CHECK (0.4.0 on) and DEL.
    let versions = ["0.2.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
    let nss: Vec<Netns> = versions.iter().map(|_| Netns::new(&c)).collect();
    for (i, (version, ns)) in versions.iter().zip(&nss).enumerate() {
        let conf = agent_conf(&c, "a1", "dual", version);
        let id = format!("d{i}");
        let r = add(&c, "a1", &conf, &id, ns);
        let v = r.ok().json();
        assert_eq!(v["cniVersion"], *version);
        match *version {
            "0.2.0" => {
                assert!(v.get("ips").is_none(), "{v}");
                assert_eq!(v["ip4"]["gateway"], gw4.as_str());
                assert_eq!(v["ip6"]["gateway"], gw6.as_str());
                assert_eq!(v["ip6"]["routes"][0], json!({"dst": "::/0", "gw": gw6}));
            }
            _ => {
                let ips = v["ips"].as_array().unwrap();
                assert_eq!(ips.len(), 2, "{v}");
                assert_eq!(ips[1]["gateway"], gw6.as_str());
                assert_eq!(ips[1]["interface"], 1);
                let versioned = version.starts_with("0.");
                assert_eq!(ips[0].get("version").is_some(), versioned, "{v}");
                if versioned {
                    assert_eq!(
                        (ips[0]["version"].as_str(), ips[1]["version"].as_str()),
                        (Some("4"), Some("6"))
                    );
                }
                let routes = v["routes"].as_array().unwrap();
                assert!(routes.contains(&json!({"dst": "::/0", "gw": gw6})), "{v}");
                assert!(
                    routes.contains(&json!({"dst": "0.0.0.0/0", "gw": gw4})),
                    "{v}"
                );
            }
        }
        let addrs = result_addrs(&v);
        assert_eq!(addrs.len(), 2, "{v}");
        let v6: std::net::Ipv6Addr = addrs[1].split('/').next().unwrap().parse().unwrap();
        assert!(cni6.contains(v6), "{v6} outside {cni6}");
        assert!(
            addrs[1].ends_with(&format!("/{}", cni6.prefix())),
            "{addrs:?}"
        );
        // The container has both, its default routes and no router advertisements heeded.
        let shown = ns.ip(&["-6", "addr", "show", "dev", "eth0"]).unwrap();
        assert!(shown.contains(&addrs[1]), "{shown}");
        let route6 = ns.ip(&["-6", "route", "show", "default"]).unwrap();
        assert!(route6.contains(&gw6), "{route6}");
        if !matches!(*version, "0.2.0" | "0.3.1") {
            let mut checked = conf.clone();
            checked["prevResult"] = v.clone();
            cni(
                &c,
                "a1",
                &op("CHECK", &id, &ns.path(), "eth0"),
                checked.to_string().as_bytes(),
            )
            .ok();
            // CHECK sees a missing IPv6 address (and says which).
            ns.ip(&["-6", "addr", "del", &addrs[1], "dev", "eth0"])
                .unwrap();
            let msg = cni(
                &c,
                "a1",
                &op("CHECK", &id, &ns.path(), "eth0"),
                checked.to_string().as_bytes(),
            )
            .err(104);
            assert!(msg.contains(&addrs[1]), "{msg}");
            ns.ip(&["-6", "addr", "add", &addrs[1], "dev", "eth0", "nodad"])
                .unwrap();
            // ... and a missing IPv6 default route.
            let _ = ns.ip(&["-6", "route", "del", "default"]);
            let msg = cni(
                &c,
                "a1",
                &op("CHECK", &id, &ns.path(), "eth0"),
                checked.to_string().as_bytes(),
            )
            .err(104);
            assert!(msg.contains(&gw6), "{msg}");
        }
        assert_eq!(used(&c, "a1", "dual"), 2, "one address per family");
        del(&c, "a1", &conf, &id, Some(ns)).ok();
        assert_eq!(used(&c, "a1", "dual"), 0, "DEL frees both families");
        // DEL again: nothing left to free, still fine.
        del(&c, "a1", &conf, &id, Some(ns)).ok();
    }
    assert_clean(&c, "a1");

    // An IPv6-only network: one address, the IPv6 one.
    let conf6 = agent_conf(&c, "a1", "dcos6", "1.0.0");
    let ns = Netns::new(&c);
    let v = add(&c, "a1", &conf6, "only6", &ns).ok().json();
    let addrs = result_addrs(&v);
    assert_eq!(addrs.len(), 1, "{v}");
    assert!(addrs[0].contains(':'), "{addrs:?}");
    let conf020 = agent_conf(&c, "a1", "dcos6", "0.2.0");
    let v = serde_json::from_str::<Value>(
        &cni(
            &c,
            "a1",
            &op("ADD", "only6", &ns.path(), "eth1"),
            conf020.to_string().as_bytes(),
        )
        .ok()
        .stdout,
    )
    .unwrap();
    assert!(v.get("ip4").is_none() && v["ip6"]["ip"].is_string(), "{v}");
    cni(
        &c,
        "a1",
        &op("DEL", "only6", &ns.path(), "eth1"),
        conf020.to_string().as_bytes(),
    )
    .ok();
    del(&c, "a1", &conf6, "only6", Some(&ns)).ok();
    assert_clean(&c, "a1");

    // The IPv6 half runs out first (a /124 per agent: /125 halves, 5 usable addresses each):
    // the error names the network and the family, and the IPv4 address taken before it is
    // given back (nothing leaks).
    let conf = agent_conf(&c, "a1", "dual", "1.0.0");
    let nss: Vec<Netns> = (0..6).map(|_| Netns::new(&c)).collect();
    for (i, ns) in nss.iter().enumerate().take(5) {
        add(&c, "a1", &conf, &format!("x{i}"), ns).ok();
    }
    let veths = plugin_veths(&c, "a1");
    let msg = add(&c, "a1", &conf, "x5", &nss[5]).err(100);
    assert!(
        msg.contains("network dual") && msg.contains("IPv6") && msg.contains(&cni6.to_string()),
        "{msg}"
    );
    assert_eq!(plugin_veths(&c, "a1"), veths, "failed ADD left a veth");
    assert!(
        nss[5].ip(&["link", "show", "eth0"]).is_err(),
        "failed ADD left eth0"
    );
    let usage = c.agent("a1").ipam().unwrap();
    let by_family = |f: overlay_api::agent::Family| -> u32 {
        usage
            .iter()
            .filter(|u| u.network == "dual" && u.family == f)
            .map(|u| u.used)
            .sum()
    };
    assert_eq!(
        by_family(overlay_api::agent::Family::Ipv4),
        5,
        "the IPv4 address of the failed ADD leaked"
    );
    assert_eq!(by_family(overlay_api::agent::Family::Ipv6), 5);
    assert_eq!(c.agent("a1").endpoints().unwrap().len(), 5);
    let m = c.agent("a1").metrics().unwrap();
    assert!(m.contains("network=\"dual\",family=\"ipv6\"} 1"), "{m}");
    assert!(m.contains("network=\"dual\",family=\"ipv4\"} 0"), "{m}");
    for (i, ns) in nss.iter().enumerate().take(5) {
        del(&c, "a1", &conf, &format!("x{i}"), Some(ns)).ok();
    }
    assert_clean(&c, "a1");
}
