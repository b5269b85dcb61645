//! Upgrading across a `MAP_LAYOUT_VERSION` change: the new agent takes over the pins an agent of
//! the older layout left (its links get the new programs in place, its maps' entries are carried
//! over where the layout is the same, its pins go), so no hook ever runs two program sets and
//! traffic keeps flowing.

use std::{path::Path, process::Command, time::Duration};

use overlay_agent::datapath::{OverlayMaps, attached_ingress_programs};
use overlay_common::{
    counters::Counter,
    maps::{HOST_LINK_PEER, MAP_LAYOUT_VERSION, names},
};
use overlay_lab::cluster::{Cluster, ClusterSpec};
use overlay_tests::fixtures::bin_dir;
use overlay_tests::lab_pins;

/// The program id in the link pinned at `pin`, as the kernel reports it.
fn linked_program(pin: &Path) -> u64 {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool link show pinned {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    link["prog_id"].as_u64().unwrap()
}

/// Pins the test moved, removed even if the test fails before the agent takes them over.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        if let Some(version_dir) = self.0.parent() {
            let _ = std::fs::remove_dir(version_dir);
        }
    }
}

fn encapsulated(maps: &OverlayMaps) -> u64 {
    maps.stats()
        .unwrap()
        .iter()
        .filter(|r| r.counter == Counter::Encapsulated)
        .map(|r| r.packets)
        .sum()
}

#[test]
fn agent_of_a_new_layout_takes_over_the_old_pins_with_one_program_set_and_no_loss() {
    assert!(
        MAP_LAYOUT_VERSION > 1,
        "the test plays an agent of layout 1"
    );
    let bin_dir = bin_dir();
    let mut c = Cluster::up(ClusterSpec::new(2, &bin_dir)).unwrap();
    let a = c.add_container("a1", "dcos").unwrap();
    let b = c.add_container("a2", "dcos").unwrap();
    let b_ip = b.node.ip.unwrap();
    assert!(a.node.ping(b_ip));
    let node = c.lab.node("a1").unwrap().clone();
    let pins = lab_pins(&c.lab, "a1");
    let current = pins.dir().to_owned();
    let root = current.parent().unwrap().parent().unwrap().to_owned();
    let older = root.join("v1").join(current.file_name().unwrap());
    let underlay_pin = pins.link("from_underlay", "eth0");
    let old_program = linked_program(&underlay_pin);

    // A steady stream across agents through the whole upgrade.
    let mut stream = a.node.command("ping");
    stream
        .args(["-q", "-i", "0.01", "-c", "400", "-W", "1"])
        .arg(b_ip.to_string())
        .stdout(std::process::Stdio::piped());
    let stream = stream.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c.stop_agent("a1");
    let counted_before = encapsulated(&OverlayMaps::open_pinned(&pins).unwrap());
    assert!(counted_before > 0);
    // What an agent of layout 1 leaves behind: its pins under v1/<instance>, without the map
    // layout 1 did not have. (Its programs are this build's: what matters to the new agent is
    // the layout version the pins are recorded under.)
    let _leftover = RemoveOnDrop(older.clone());
    std::fs::create_dir_all(root.join("v1")).unwrap();
    std::fs::rename(&current, &older).unwrap();
    std::fs::remove_file(older.join("maps").join(names::NAT_QUOTA)).unwrap();
    assert!(a.node.ping(b_ip), "the old datapath stopped with its agent");

    c.start_agent("a1").unwrap();
    let out = String::from_utf8(stream.wait_with_output().unwrap().stdout).unwrap();
    assert!(
        out.contains("400 packets transmitted, 400 received"),
        "packets lost across the layout upgrade: {out}"
    );

    // The old layout's pins are gone; ours hold the links, with the new agent's programs.
    assert!(!older.exists(), "{} left behind", older.display());
    assert!(underlay_pin.exists());
    assert_ne!(
        linked_program(&underlay_pin),
        old_program,
        "the underlay link still runs the old program"
    );
    // One program per hook: the old links were reused, not joined by new ones.
    let veth = a.host_veth.clone();
    let attached = overlay_lab::in_netns(&node, move || {
        Ok((
            attached_ingress_programs("eth0")?,
            attached_ingress_programs(&veth)?,
            attached_ingress_programs(HOST_LINK_PEER)?,
        ))
    })
    .unwrap();
    assert_eq!(
        attached,
        (
            vec!["from_underlay".to_owned()],
            vec!["from_container".to_owned()],
            vec!["from_host".to_owned()]
        )
    );
    // Entries carried over: the endpoint and the counters (not recounted from zero).
    let maps = OverlayMaps::open_pinned(&pins).unwrap();
    assert!(
        maps.endpoints()
            .unwrap()
            .contains_key(&std::net::IpAddr::V4(a.node.ip.unwrap()))
    );
    // (The stream started before `counted_before` was read: with counters reset by the
    // upgrade, fewer than the stream's 400 plus the first ping would show.)
    let counted_after = encapsulated(&maps);
    assert!(
        counted_after >= counted_before && counted_after > 400,
        "encapsulated {counted_before} before the upgrade, {counted_after} after"
    );
    assert!(a.node.ping(b_ip), "traffic broken after the upgrade");
    // A container added after the upgrade works too.
    let a2 = c.add_container("a1", "dcos").unwrap();
    assert!(a2.node.ping(b_ip));
}
