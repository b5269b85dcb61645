//! The Debian package (`cargo xtask package`) and the cleanup it runs on removal
//! (`overlayctl cleanup`). Installing it on a booted Debian system is tested in the VM lab
//! (tests/tests/vm.rs).

use std::{path::Path, process::Command};

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::bin_path;
use overlay_tests::fixtures::bin_dir;

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dpkg-deb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn package_holds_binaries_units_config_man_pages_and_scripts() {
    let bin_dir = bin_dir();
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(bin_path("xtask"))
        .args(["package", "--version", "0.1.0+test", "--bin-dir"])
        .arg(&bin_dir)
        .arg("--out")
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "cargo xtask package failed");
    let deb = out.path().join("ebpf-overlay_0.1.0+test_amd64.deb");
    let listing = dpkg_deb(&["-c"], &deb);
    let entry = |path: &str| -> String {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"))
            .to_owned()
    };
    for exe in [
        "/usr/bin/overlay-agent",
        "/usr/bin/overlay-master",
        "/usr/bin/overlayctl",
        "/opt/cni/bin/ebpf-overlay",
    ] {
        let line = entry(exe);
        assert!(line.starts_with("-rwxr-xr-x root/root"), "{line}");
    }
    for file in [
        "/lib/systemd/system/overlay-agent.service",
        "/lib/systemd/system/overlay-master.service",
        "/etc/ebpf-overlay/agent.env",
        "/etc/ebpf-overlay/master.env",
        "/etc/ebpf-overlay/master.yaml",
        "/usr/share/man/man8/overlay-agent.8.gz",
        "/usr/share/man/man8/overlay-master.8.gz",
        "/usr/share/man/man1/overlayctl.1.gz",
        "/usr/share/man/man8/ebpf-overlay.8.gz",
        "/usr/share/doc/ebpf-overlay/copyright",
    ] {
        let line = entry(file);
        assert!(line.starts_with("-rw-r--r-- root/root"), "{line}");
    }
    entry("/etc/cni/net.d/");
    assert_eq!(
        dpkg_deb(&["-f"], &deb).lines().next(),
        Some("Package: ebpf-overlay")
    );
    assert!(dpkg_deb(&["-f"], &deb).contains("Version: 0.1.0+test"));

    // Control area: the maintainer scripts and the conffiles.
    let control = out.path().join("control");
    let st = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(&control)
        .status()
        .unwrap();
    assert!(st.success());
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(
        conffiles,
        "/etc/ebpf-overlay/agent.env\n/etc/ebpf-overlay/master.env\n/etc/ebpf-overlay/master.yaml\n"
    );
    let prerm = std::fs::read_to_string(control.join("prerm")).unwrap();
    assert!(prerm.contains("overlayctl cleanup"), "{prerm}");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("enable overlay-agent.service"),
        "{postinst}"
    );
    assert!(
        postinst.contains("try-restart overlay-agent.service"),
        "{postinst}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let st = Command::new("sh")
            .arg("-n")
            .arg(control.join(script))
            .status()
            .unwrap();
        assert!(st.success(), "{script} is not valid sh");
    }

    // The man pages are the binaries' own help: every agent flag is in its page.
    let tree = out.path().join("tree");
    let page = Command::new("zcat")
        .arg(tree.join("usr/share/man/man8/overlay-agent.8.gz"))
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    for flag in [
        "--master",
        "--underlay-iface",
        "--cni-conf-dir",
        "--masquerade-ports",
    ] {
        assert!(page.contains(flag), "{flag} missing from overlay-agent(8)");
    }
    // The agent unit keeps the datapath on stop and runs with exactly the capabilities the
    // agent's preflight checks.
    let unit =
        std::fs::read_to_string(tree.join("lib/systemd/system/overlay-agent.service")).unwrap();
    let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    assert!(
        !exec.contains("cleanup-on-exit"),
        "stopping must not tear the datapath down"
    );
    assert!(unit.contains("CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON\n"));
    assert!(unit.contains("Type=notify\n") && unit.contains("Restart=on-failure\n"));
}

#[test]
fn master_starts_on_the_packaged_default_config() {
    // The shipped master.yaml is DC/OS's defaults and the master accepts it: it serves the
    // `dcos` network with DC/OS's VNI.
    let yaml = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config/master.yaml");
    let data = tempfile::tempdir().unwrap();
    let tls = data.path().join("tls");
    let mut master = Command::new(bin_path("overlay-master"))
        .arg("--config")
        .arg(&yaml)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--tls-dir")
        .arg(&tls)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read the bound port from the log line.
    let mut stderr = std::io::BufReader::new(master.stderr.take().unwrap());
    let mut addr = None;
    for _ in 0..50 {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() == 0 {
            break;
        }
        if let Some(rest) = line.split("listen=").nth(1) {
            addr = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    let addr = addr.expect("master did not report its address");
    let state: serde_json::Value = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let admin = overlay_api::MasterTls::from_files(
            &tls.join("ca.crt"),
            None,
            Some(&tls.join("admin.token")),
        )
        .unwrap();
        let client =
            overlay_api::MasterClient::with_tls([format!("https://{addr}")], &admin).unwrap();
        rt.block_on(async { serde_json::to_value(client.state().await.unwrap()).unwrap() })
    };
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(master.id() as i32, libc::SIGTERM) };
    master.wait().unwrap();
    let networks = state["network"]["overlays"]
        .as_array()
        .unwrap_or_else(|| panic!("{state}"));
    let dcos = networks.iter().find(|n| n["name"] == "dcos").unwrap();
    assert_eq!(dcos["subnet"], "9.0.0.0/8");
    assert_eq!(dcos["prefix"], 24);
    // DC/OS's shape: no VNI in the network (every backend says 1024); our id beside it.
    assert!(dcos.get("vni").is_none(), "{dcos}");
    assert_eq!(dcos["id"], 1024);
    assert_eq!(state["network"]["vtep_subnet"], "44.128.0.0/20");
}

#[test]
fn overlayctl_cleanup_removes_pins_links_host_link_and_generated_cni_configs() {
    let mut c = Cluster::up(ClusterSpec::new(
        1,
        bin_path("overlay-agent").parent().unwrap(),
    ))
    .unwrap();
    let node = c.lab.node("a1").unwrap().clone();
    let instance = c.lab.pin_instance("a1");
    let pins = overlay_datapath::PinLayout::new(Path::new(overlay_lab::BPFFS), &instance)
        .unwrap()
        .dir()
        .to_owned();
    let cni_dir = c.log_path("a1").parent().unwrap().join("a1-cni");
    // Someone else's CNI config next to the agent's.
    std::fs::write(
        cni_dir.join("10-other.conf"),
        r#"{"type":"bridge","name":"other"}"#,
    )
    .unwrap();
    assert!(pins.join("links").exists());
    assert!(
        std::fs::read_dir(&cni_dir).unwrap().count() >= 2,
        "agent wrote no CNI config"
    );
    let attached = |node: &overlay_lab::Node| {
        overlay_lab::in_netns(node, || overlay_datapath::attached_ingress_programs("eth0")).unwrap()
    };
    assert_eq!(attached(&node), ["from_underlay"]);
    assert!(node.try_exec("ip", &["link", "show", "ovl-host"]));

    c.stop_agent("a1");
    // The stopped agent left its datapath attached (hitless restarts).
    assert_eq!(attached(&node), ["from_underlay"]);
    let out = node
        .command(bin_path("overlayctl"))
        .args(["cleanup", "--instance", &instance, "--cni-conf-dir"])
        .arg(&cni_dir)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("removed pins") && report.contains("removed host link"),
        "{report}"
    );
    assert!(!pins.exists(), "pins left at {}", pins.display());
    assert!(attached(&node).is_empty(), "programs still attached");
    assert!(
        !node.try_exec("ip", &["link", "show", "ovl-host"]),
        "host link left"
    );
    let left: Vec<_> = std::fs::read_dir(&cni_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["10-other.conf"]);
    // Twice is fine: nothing left to remove.
    let out = node
        .command(bin_path("overlayctl"))
        .args(["cleanup", "--instance", &instance, "--cni-conf-dir"])
        .arg(&cni_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to remove"));
}

#[test]
fn agent_refuses_to_start_without_its_capabilities_naming_them() {
    // Root, but CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN taken out of the bounding set (so they
    // are not effective after exec): the preflight refuses before loading anything.
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-bpf,-perfmon,-sys_admin", "--"])
        .arg(bin_path("overlay-agent"))
        .args(["--master", "http://127.0.0.1:9", "--underlay-iface", "lo"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("missing capability CAP_BPF"), "{stderr}");
    assert!(
        stderr.contains("missing capability CAP_PERFMON"),
        "{stderr}"
    );
    assert!(!stderr.contains("CAP_NET_ADMIN"), "{stderr}");
}
