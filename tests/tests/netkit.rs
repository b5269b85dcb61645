//! netkit container devices on a kernel without them (this machine's host kernel is built with
//! `# CONFIG_NETKIT is not set`; netkit itself is exercised in the VM lab's guests, `vm.rs`):
//! creating a pair is a typed error naming the missing option, and an agent asked for
//! `--container-device netkit` says so, falls back to veth (in its CNI configs and metrics) and
//! carries traffic as usual.

use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_netlink::{Handle, Netns};
use overlay_tests::bin_path;

/// Removes the namespace even when an assertion fails.
struct TempNetns(String);
impl Drop for TempNetns {
    fn drop(&mut self) {
        let _ = Netns::delete_named(&self.0);
    }
}

#[test]
fn creating_a_netkit_pair_without_netkit_is_a_typed_error() {
    let name = format!("nk-test-{}", std::process::id());
    let ns = Netns::create_named(&name).unwrap();
    let _cleanup = TempNetns(name);
    let mut nl = Handle::in_netns(&ns).unwrap();
    match nl.add_netkit("nk0", "nk1", 1420, None) {
        Err(e) => {
            assert!(e.is_unsupported(), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("CONFIG_NETKIT") && msg.contains("adding netkit pair nk0 / nk1"),
                "{msg}"
            );
            // Nothing half-made is left behind, and the probe agrees.
            assert!(nl.link("nk0").unwrap_err().is_not_found());
            assert!(!nl.netkit_supported("nkprobe").unwrap());
            assert!(nl.link("nkprobe").unwrap_err().is_not_found());
        }
        // A kernel with netkit: the pair is one, in L2 mode (a MAC on both sides).
        Ok(()) => {
            let host = nl.link("nk0").unwrap();
            assert_eq!(host.kind.as_deref(), Some("netkit"));
            assert_ne!(host.mac, [0; 6]);
            assert_ne!(nl.link("nk1").unwrap().mac, [0; 6]);
            assert!(nl.netkit_supported("nkprobe").unwrap());
        }
    }
}

#[test]
fn an_agent_asked_for_netkit_on_a_kernel_without_it_falls_back_to_veth() {
    let name = format!("nk-probe-{}", std::process::id());
    let ns = Netns::create_named(&name).unwrap();
    let cleanup = TempNetns(name);
    let supported = Handle::in_netns(&ns)
        .unwrap()
        .netkit_supported("nkprobe")
        .unwrap();
    drop(cleanup);
    if supported {
        eprintln!("this kernel has netkit: the fallback is tested on kernels without it");
        return;
    }
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let mut spec = ClusterSpec::new(2, &bin_dir);
    spec.agent_args = vec!["--container-device".into(), "netkit".into()];
    let mut c = Cluster::up(spec).unwrap();
    for agent in ["a1", "a2"] {
        let log = std::fs::read_to_string(c.log_path(agent)).unwrap();
        assert!(
            log.contains("--container-device netkit: this kernel has no netkit devices (CONFIG_NETKIT is not set")
                && log.contains("containers get veth pairs instead"),
            "{agent} did not say why it uses veth:\n{log}"
        );
        let metrics = c.agent(agent).metrics().unwrap();
        assert!(
            metrics
                .contains(r#"overlay_agent_container_device{requested="netkit",device="veth"} 1"#),
            "{agent}: {metrics}"
        );
        // The plugin is not told to make netkit pairs: its default, veth.
        let dir = c.cni_conf_dir(agent);
        let mut lists = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "conflist") {
                lists += 1;
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(!text.contains("container_device"), "{}", path.display());
            }
        }
        assert!(lists > 0, "no CNI configs in {}", dir.display());
    }
    // Traffic as on any veth agent.
    let x = c.add_container("a1", "dcos").unwrap();
    let y = c.add_container("a2", "dcos").unwrap();
    assert!(x.node.ping(y.node.ip.unwrap()), "a1 -> a2 container ping");
}
