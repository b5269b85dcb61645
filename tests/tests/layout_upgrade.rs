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
    // The carried VTEP and routes have their next-hop slots (`fill_slots`): once the new agent
    // has mirrored a2's next hop, encapsulation takes it from the cache, not the kernel.
    let a2_underlay = c.lab.fabric_address("a2").unwrap();
    let mirrored = overlay_tests::fixtures::eventually(Duration::from_secs(10), || {
        let hops = OverlayMaps::open_pinned(&pins)
            .unwrap()
            .next_hops()
            .unwrap();
        hops.contains_key(&a2_underlay)
            .then_some(())
            .ok_or(format!("no next hop of {a2_underlay}: {hops:?}"))
    });
    assert!(mirrored.is_ok(), "{mirrored:?}");
    overlay_tests::fixtures::assert_next_hop_cached(&c, "a1", a2_underlay, &a, b_ip);
    // A container added after the upgrade works too.
    let a2 = c.add_container("a1", "dcos").unwrap();
    assert!(a2.node.ping(b_ip));
}

/// Runs bpftool (text output); panics with its error.
fn bpftool(args: &[String]) -> String {
    let out = Command::new("bpftool").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `bpftool map create` of a map the way a v3 agent pinned it, with one entry.
fn old_map(dir: &Path, name: &str, shape: &str, key: &[u8], value: &[u8]) {
    let pin = dir.join(name).display().to_string();
    let mut args: Vec<String> = vec!["map".into(), "create".into(), pin.clone()];
    args.extend(shape.split(' ').map(str::to_owned));
    args.extend(["name".into(), name.into()]);
    bpftool(&args);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
    let mut args: Vec<String> = vec!["map".into(), "update".into(), "pinned".into(), pin];
    args.push("key".into());
    args.push("hex".into());
    args.extend(hex(key));
    args.push("value".into());
    args.push("hex".into());
    args.extend(hex(value));
    bpftool(&args);
}

#[test]
fn v3_counters_endpoints_vteps_and_routes_are_translated_into_the_current_layout() {
    use overlay_agent::datapath::Datapath;
    use overlay_common::maps::ipv4_mapped;
    use overlay_datapath::PinLayout;
    overlay_lab::ensure_bpffs().unwrap();
    let instance = format!("upgrade-v3-{}", std::process::id());
    let pins = PinLayout::new(Path::new(overlay_lab::BPFFS), &instance).unwrap();
    let root = pins.dir().parent().unwrap().parent().unwrap().to_owned();
    let old = root.join("v3").join(&instance);
    let _old = RemoveOnDrop(old.clone());
    let maps_dir = old.join("maps");
    std::fs::create_dir_all(&maps_dir).unwrap();
    let network = 7u32;
    // v3 OVL_CONFIG: underlay 10.250.0.11, ifindex 1, VTEP MAC, port 64000, MTU 1420, ready.
    let mut cfg = ipv4_mapped([10, 250, 0, 11]).to_vec();
    cfg.extend_from_slice(&1u32.to_ne_bytes());
    cfg.extend_from_slice(&[0x70, 0xb3, 0xd5, 0x80, 0, 1]);
    cfg.extend_from_slice(&64000u16.to_ne_bytes());
    cfg.extend_from_slice(&1420u32.to_ne_bytes());
    cfg.extend_from_slice(&1u32.to_ne_bytes());
    old_map(
        &maps_dir,
        names::CONFIG,
        "type array key 4 value 36 entries 1",
        &[0; 4],
        &cfg,
    );
    // A v3 endpoint of the network (its last 4 bytes were padding).
    let mut ep = 9u32.to_ne_bytes().to_vec();
    ep.extend_from_slice(&network.to_ne_bytes());
    ep.extend_from_slice(&[2, 0, 0, 0, 1, 2, 2, 0, 0, 0, 1, 1]);
    ep.extend_from_slice(&[0; 8]);
    let ep_key = ipv4_mapped([9, 0, 1, 2]);
    old_map(
        &maps_dir,
        names::ENDPOINTS,
        "type hash key 16 value 28 entries 16",
        &ep_key,
        &ep,
    );
    // A v3 route (36 bytes) of the network to 9.0.2.0/24 behind 10.250.0.12.
    let mut route = ipv4_mapped([10, 250, 0, 12]).to_vec();
    route.extend_from_slice(&[0x70, 0xb3, 0xd5, 0x80, 0, 2, 0, 0]);
    route.extend_from_slice(&network.to_ne_bytes());
    route.extend_from_slice(&1024u32.to_ne_bytes());
    route.extend_from_slice(&0u32.to_ne_bytes());
    let mut route_key = 120u32.to_ne_bytes().to_vec();
    route_key.extend_from_slice(&ipv4_mapped([9, 0, 2, 0]));
    old_map(
        &maps_dir,
        names::ROUTES,
        "type lpm_trie key 20 value 36 entries 16 flags 1",
        &route_key,
        &route,
    );
    // The v3 VTEP of that route's agent (its MAC, two bytes of padding, its VTEP IP).
    let mut vtep = vec![0x70, 0xb3, 0xd5, 0x80, 0, 2, 0, 0];
    vtep.extend_from_slice(&[44, 128, 0, 2]);
    old_map(
        &maps_dir,
        names::VTEPS,
        "type hash key 16 value 12 entries 16",
        &ipv4_mapped([10, 250, 0, 12]),
        &vtep,
    );
    // v3 counters: a per-CPU hash by (network, counter); 5 packets of 500 bytes on every CPU.
    let mut stat_key = network.to_ne_bytes().to_vec();
    stat_key.extend_from_slice(&(Counter::Encapsulated as u32).to_ne_bytes());
    let mut stat = 5u64.to_ne_bytes().to_vec();
    stat.extend_from_slice(&500u64.to_ne_bytes());
    old_map(
        &maps_dir,
        names::STATS,
        "type percpu_hash key 8 value 16 entries 16",
        &stat_key,
        &stat,
    );

    let dp = Datapath::load(pins.clone());
    let _ = std::fs::remove_dir_all(&old);
    let dp = dp.unwrap();
    let cleanup = RemoveOnDrop(pins.dir().to_owned());
    assert!(!old.exists(), "v3 pins left behind");
    let cpus = aya::util::nr_cpus().unwrap() as u64;
    let maps = dp.maps();
    let slots = maps.counter_slots().unwrap();
    let slot = *slots.get(&network).expect("the network got a counter slot");
    assert_ne!(slot, 0);
    let row = maps
        .stats()
        .unwrap()
        .into_iter()
        .find(|r| r.network == network && r.counter == Counter::Encapsulated)
        .expect("v3 counter carried over");
    assert_eq!((row.packets, row.bytes), (5 * cpus, 500 * cpus));
    // Endpoint and route carry the slot.
    let dump = |name: &str| -> serde_json::Value {
        let pin = pins.map(name).display().to_string();
        serde_json::from_str(&bpftool(&[
            "-j".into(),
            "map".into(),
            "dump".into(),
            "pinned".into(),
            pin,
        ]))
        .unwrap()
    };
    let eps = dump(names::ENDPOINTS);
    assert_eq!(eps[0]["formatted"]["value"]["slot"], slot, "{eps}");
    assert_eq!(eps[0]["formatted"]["value"]["network"], network, "{eps}");
    let routes = dump(names::ROUTES);
    let r = &routes[0]["formatted"]["value"];
    assert_eq!(r["slot"], slot, "{routes}");
    assert_eq!(
        (r["network"].clone(), r["vni"].clone()),
        (network.into(), 1024.into())
    );
    // The VTEP got a next-hop slot (v5), and the route through it carries it.
    let hop_slot = maps
        .next_hop_slot("10.250.0.12".parse().unwrap())
        .expect("the carried VTEP got a next-hop slot");
    assert_ne!(hop_slot, 0);
    let vteps = dump(names::VTEPS);
    assert_eq!(
        vteps[0]["formatted"]["value"]["next_hop"], hop_slot,
        "{vteps}"
    );
    assert_eq!(r["next_hop"], hop_slot, "{routes}");
    drop(dp);
    drop(cleanup);
    let _ = pins.remove_all();
}
