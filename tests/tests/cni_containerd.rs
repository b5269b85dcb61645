//! containerd and Kubernetes-style callers on the overlay.
//!
//! - `ctr run --cni` with a real containerd (Debian's 1.6, private root, state and socket): ctr
//!   reads the first file of `/etc/cni/net.d` and plugins from `/opt/cni/bin`, so it runs in a
//!   private mount namespace (inside the lab agent's network namespace) where the agent's
//!   `--cni-conf-dir` and the plugin directory are mounted there; the host's `/etc/cni` is never
//!   touched. The image is an OCI layout of busybox-static written by hand (no registry).
//! - The CRI path (containerd's CRI plugin through go-cni): CNI_ARGS with the `K8S_POD_*` keys,
//!   `runtimeConfig.portMappings` with capitalised keys, prevResult on DEL, DEL twice, the
//!   second with `CNI_NETNS=""`.
//!
//! Both reach containers on the same and another agent, and leave no address, endpoint or veth.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::fixtures::bin_dir;
use overlay_tests::{
    bin_path,
    runtimes::{
        BUSYBOX, TempDir, agent_veths as plugin_veths,
        containerd::{Containerd, IMAGE, busybox_oci_tar},
        inet_of, used,
    },
};
use serde_json::{Value, json};

#[test]
fn ctr_run_cni_uses_the_first_list_and_leaves_nothing_behind() {
    assert!(
        Path::new(BUSYBOX).exists() && Command::new("ctr").arg("--version").output().is_ok(),
        "needs containerd and busybox-static (cargo xtask setup)"
    );
    let bin_dir = bin_dir();
    let mut c = Cluster::up(ClusterSpec::new(2, &bin_dir)).unwrap();
    let same = c.add_container("a1", "dcos").unwrap();
    let remote = c.add_container("a2", "dcos").unwrap();
    let other_net = c.add_container("a1", "blue").unwrap();
    let (same_ip, remote_ip, blue_ip) = (
        same.node.ip.unwrap(),
        remote.node.ip.unwrap(),
        other_net.node.ip.unwrap(),
    );
    let base = used(&c, "a1");
    let tmp = TempDir(std::env::temp_dir().join(format!("{}-containerd", c.lab.id())));
    std::fs::create_dir_all(&tmp.0).unwrap();
    let plugins = tmp.0.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(bin_path("ebpf-overlay"), plugins.join("ebpf-overlay")).unwrap();
    let tar = busybox_oci_tar(&tmp.0);
    let containerd = Containerd::start(&tmp.0.join("containerd"));
    containerd.ctr(&[
        "image",
        "import",
        "--snapshotter",
        "native",
        tar.to_str().unwrap(),
    ]);
    assert!(containerd.ctr(&["image", "ls", "-q"]).contains(IMAGE));
    let host_opt = Path::new("/opt/containerd").exists();
    let host_etc = std::fs::read_dir("/etc/cni/net.d")
        .map(|d| d.count())
        .unwrap_or(0);
    let script = format!(
        "ip -4 -o addr show dev eth0; \
         ping -c 1 -W 2 {same_ip} >/dev/null && echo SAME_OK; \
         ping -c 1 -W 2 {remote_ip} >/dev/null && echo REMOTE_OK; \
         ping -c 1 -W 1 {blue_ip} >/dev/null && echo BLUE_REACHED; true"
    );
    let agent_ns = c.node("a1").unwrap().netns_path();
    let (ok, out) = containerd.run_cni(
        &agent_ns,
        &c.cni_conf_dir("a1"),
        &plugins,
        "eo-ctr-1",
        &script,
    );
    assert!(ok, "ctr run --cni failed: {out}");
    let ip = inet_of(&out).unwrap_or_else(|| panic!("no address in {out}"));
    // The first list is dcos (10-dcos.conflist): the address is in a1's dcos subnet.
    let dcos = c
        .agent_info("a1")
        .unwrap()
        .overlays
        .into_iter()
        .find(|o| o.info.name == "dcos")
        .and_then(|o| o.subnet)
        .unwrap();
    assert!(dcos.contains(ip), "{ip} not in {dcos}: {out}");
    assert!(out.contains("SAME_OK"), "same agent unreachable: {out}");
    assert!(out.contains("REMOTE_OK"), "other agent unreachable: {out}");
    assert!(!out.contains("BLUE_REACHED"), "isolation broken: {out}");
    // --rm ran DEL: nothing left.
    assert_eq!(used(&c, "a1"), base, "address leaked");
    assert!(
        c.agent("a1")
            .endpoints()
            .unwrap()
            .iter()
            .all(|e| e.ip != ip)
    );
    assert_eq!(plugin_veths(&c, "a1"), 0, "veth leaked");
    assert_eq!(
        std::fs::read_dir("/etc/cni/net.d")
            .map(|d| d.count())
            .unwrap_or(0),
        host_etc,
        "the host's /etc/cni/net.d was touched"
    );
    assert!(!Path::new("/opt/cni/bin/ebpf-overlay").exists());
    assert_eq!(
        Path::new("/opt/containerd").exists(),
        host_opt,
        "containerd wrote to /opt"
    );
}

/// One plugin call as containerd's CRI makes it (go-cni), in `agent`'s namespace.
fn cri_call(c: &Cluster, agent: &str, env: &[(&str, &str)], stdin: &Value) -> (i32, String) {
    use std::io::Write as _;
    let mut cmd = c.node(agent).unwrap().command(bin_path("ebpf-overlay"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .envs(env.iter().copied())
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

#[test]
fn cri_style_calls_with_pod_args_port_mappings_and_a_double_del_leak_nothing() {
    let bin_dir = bin_dir();
    let mut c = Cluster::up(ClusterSpec::new(2, &bin_dir)).unwrap();
    let remote = c.add_container("a2", "dcos").unwrap();
    let remote_ip = remote.node.ip.unwrap();
    let base = used(&c, "a1");
    // go-cni turns the list into one plugin call: the list's name and version.
    let file = std::fs::read_dir(c.cni_conf_dir("a1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-dcos.conflist"))
        .unwrap();
    let list: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["runtimeConfig"] = json!({"portMappings": [
        {"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""},
        {"HostPort": 8443, "ContainerPort": 443, "Protocol": "tcp", "HostIP": "0.0.0.0"},
    ]});
    let sandbox = "5c1e0e1e0e1e0e1e0e1e0e1e0e1e0e1e0e1e0e1e0e1e0e1e0e1e0e1e0e1e0e1e";
    let netns = format!("{}-k-cri", c.lab.id());
    overlay_lab::run("ip", &["netns", "add", &netns]).unwrap();
    let ns_path = format!("/run/netns/{netns}");
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = overlay_lab::run("ip", &["netns", "del", &self.0]);
        }
    }
    let _ns = Ns(netns.clone());
    let args = format!(
        "K8S_POD_INFRA_CONTAINER_ID={sandbox};K8S_POD_UID=1b4e28ba-2fa1-11d2-883f-0016d3cca427;IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"
    );
    let env = |cmd: &'static str, netns: &'static str| {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", sandbox),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns),
        ]
    };
    let with_args = |e: [(&'static str, &'static str); 4]| {
        let mut v: Vec<(&str, &str)> = e.to_vec();
        v.push(("CNI_ARGS", args.as_str()));
        v
    };
    let ns_static: &'static str = Box::leak(ns_path.clone().into_boxed_str());
    let (code, out) = cri_call(&c, "a1", &with_args(env("ADD", ns_static)), &conf);
    assert_eq!(code, 0, "ADD: {out}");
    let result: Value = serde_json::from_str(&out).unwrap();
    let ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ping = overlay_lab::run(
        "ip",
        &[
            "netns",
            "exec",
            &netns,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            &remote_ip.to_string(),
        ],
    );
    assert!(ping.is_ok(), "pod {ip} cannot reach {remote_ip}: {ping:?}");
    assert_eq!(used(&c, "a1"), base + 1);
    // CRI's teardown: DEL with prevResult, then again with CNI_NETNS="" once the sandbox's
    // netns is gone.
    let mut del_conf = conf.clone();
    del_conf["prevResult"] = result;
    let (code, out) = cri_call(&c, "a1", &with_args(env("DEL", ns_static)), &del_conf);
    assert_eq!(code, 0, "DEL: {out}");
    overlay_lab::run("ip", &["netns", "del", &netns]).unwrap();
    let (code, out) = cri_call(&c, "a1", &with_args(env("DEL", "")), &del_conf);
    assert_eq!(code, 0, "second DEL with CNI_NETNS=\"\": {out}");
    assert_eq!(used(&c, "a1"), base, "address leaked");
    assert!(
        c.agent("a1")
            .endpoints()
            .unwrap()
            .iter()
            .all(|e| e.ip != ip)
    );
    assert_eq!(plugin_veths(&c, "a1"), 0, "veth leaked");
}
