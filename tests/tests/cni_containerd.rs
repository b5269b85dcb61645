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
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::bin_path;
use serde_json::{Value, json};

const BUSYBOX: &str = "/bin/busybox";
const IMAGE: &str = "localhost/eo-busybox:latest";

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Moves `file` into the layout's blobs, returning its descriptor fields.
fn blob(layout: &Path, file: &Path) -> (String, u64) {
    let digest = sha256(file);
    let size = std::fs::metadata(file).unwrap().len();
    std::fs::rename(file, layout.join("blobs/sha256").join(&digest)).unwrap();
    (format!("sha256:{digest}"), size)
}

/// An OCI image layout (as a tar) holding one layer: busybox-static and the applets used.
fn busybox_oci_tar(root: &Path) -> PathBuf {
    let rootfs = root.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    for d in ["proc", "sys", "dev", "etc", "tmp", "run"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "ip", "ping", "sleep", "cat", "echo"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let layout = root.join("oci");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let layer = root.join("layer.tar");
    let ok = Command::new("tar")
        .args([
            "-C",
            rootfs.to_str().unwrap(),
            "-cf",
            layer.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar failed");
    let (layer_digest, layer_size) = blob(&layout, &layer);
    let config = root.join("config.json");
    std::fs::write(
        &config,
        json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        })
        .to_string(),
    )
    .unwrap();
    let (config_digest, config_size) = blob(&layout, &config);
    let manifest = root.join("manifest.json");
    std::fs::write(
        &manifest,
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
        })
        .to_string(),
    )
    .unwrap();
    let (manifest_digest, manifest_size) = blob(&layout, &manifest);
    std::fs::write(
        layout.join("index.json"),
        json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "latest"},
            }],
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tar = root.join("image.tar");
    let ok = Command::new("tar")
        .args([
            "-C",
            layout.to_str().unwrap(),
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

/// A containerd of the test's own; killed and its directories removed on drop.
struct Containerd {
    dir: PathBuf,
    child: std::process::Child,
}

impl Containerd {
    fn start(dir: &Path) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\naddress = \"{d}/containerd.sock\"\n\
                 [ttrpc]\naddress = \"{d}/containerd.sock.ttrpc\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\npath = \"{d}/opt\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd {
            dir: dir.to_owned(),
            child,
        };
        let start = Instant::now();
        while !c.ctr_cmd(&["version"]).output().unwrap().status.success() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "containerd did not start: {}",
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.args([
            "--address",
            self.dir.join("containerd.sock").to_str().unwrap(),
        ])
        .args(["--namespace", "eo-test"])
        .args(args);
        cmd
    }

    fn ctr(&self, args: &[&str]) -> String {
        let out = self.ctr_cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "ctr {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr run --rm --cni` in `netns` (the lab agent's), with a private mount namespace in
    /// which `/etc/cni/net.d` is `conf_dir` and `/opt/cni/bin` holds the plugin. Returns
    /// ctr's exit status and the container's output.
    fn run_cni(
        &self,
        netns: &Path,
        conf_dir: &Path,
        plugin_dir: &Path,
        id: &str,
        script: &str,
    ) -> (bool, String) {
        let address = self.dir.join("containerd.sock");
        let cache = self.dir.join("cni-cache");
        std::fs::create_dir_all(&cache).unwrap();
        let setup = format!(
            "set -e; mount --bind {conf} /etc/cni/net.d; \
             mount -t tmpfs eo-test /opt; mkdir -p /opt/cni/bin; mount --bind {plugins} /opt/cni/bin; \
             mount -t tmpfs eo-test /var/lib; mkdir -p /var/lib/cni; mount --bind {cache} /var/lib/cni; \
             exec ctr --address {address} --namespace eo-test run --rm --cni --snapshotter native {IMAGE} {id} /bin/sh -c \"$0\"",
            conf = conf_dir.display(),
            plugins = plugin_dir.display(),
            cache = cache.display(),
            address = address.display(),
        );
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &setup,
                script,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(tasks) = self.ctr_cmd(&["task", "ls", "-q"]).output() {
            for t in String::from_utf8_lossy(&tasks.stdout).lines() {
                let _ = self.ctr_cmd(&["task", "kill", "-s", "KILL", t]).output();
                std::thread::sleep(Duration::from_millis(200));
                let _ = self.ctr_cmd(&["task", "rm", "-f", t]).output();
            }
        }
        if let Ok(cs) = self.ctr_cmd(&["container", "ls", "-q"]).output() {
            for c in String::from_utf8_lossy(&cs.stdout).lines() {
                let _ = self.ctr_cmd(&["container", "rm", c]).output();
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // containerd's shim mounts rootfs under its state dir; none is left once tasks are gone.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn used(c: &Cluster, agent: &str) -> u32 {
    c.agent(agent).ipam().unwrap().iter().map(|u| u.used).sum()
}

fn plugin_veths(c: &Cluster, agent: &str) -> usize {
    let out = overlay_lab::run("ip", &["-n", &c.node(agent).unwrap().netns, "-o", "link"]).unwrap();
    out.lines().filter(|l| l.contains(": eo")).count()
}

fn inet_of(out: &str) -> Option<Ipv4Addr> {
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

#[test]
fn ctr_run_cni_uses_the_first_list_and_leaves_nothing_behind() {
    assert!(
        Path::new(BUSYBOX).exists() && Command::new("ctr").arg("--version").output().is_ok(),
        "needs containerd and busybox-static (cargo xtask setup)"
    );
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
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
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
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
