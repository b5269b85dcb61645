//! Smoke test of the real eBPF object: loaded into an agent namespace, attached with TCX to the
//! underlay NIC and a container veth, maps pinned and readable as structs through bpftool, and
//! packets between two local containers delivered by the programs.

use overlay_common::{counters::Counter, maps::names};
use overlay_datapath::attached_ingress_programs;
use overlay_lab::in_netns;
use overlay_tests::fixtures::{LabExt, lab};
use overlay_tests::{endpoint_of, install_datapath, lab_pins};
use serde_json::Value;

const VNI: u32 = 1024;

fn bpftool_json(args: &[&str]) -> Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = overlay_lab::run("bpftool", &full).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool output is not JSON ({e}): {out}"))
}

#[test]
fn programs_attach_maps_pin_and_print_as_structs() {
    let mut lab = lab(1);
    let c1 = lab.container("a1", "9.0.1.2/25");
    let c2 = lab.container("a1", "9.0.1.3/25");
    let agent = lab.node("a1").unwrap().clone();
    let pins = lab_pins(&lab, "a1");
    let pin_dir = pins.dir().to_owned();

    // Endpoint facts as the agent would gather them.
    let endpoints: Vec<_> = [&c1, &c2]
        .iter()
        .map(|c| endpoint_of(&agent, c, VNI))
        .collect();
    install_datapath(
        &lab,
        "a1",
        [0x70, 0xb3, 0xd5, 0x80, 0, 1],
        VNI,
        None,
        &[&c1, &c2],
        &[],
    )
    .unwrap();
    // The loader is gone; pinned links keep the programs attached and pinned maps keep state.

    // Attached: the kernel reports our programs on TCX ingress of both interfaces.
    let host_veth = c1.host_veth.clone();
    let (on_eth0, on_veth) = in_netns(&agent, move || {
        Ok((
            attached_ingress_programs("eth0")?,
            attached_ingress_programs(&host_veth)?,
        ))
    })
    .unwrap();
    assert_eq!(on_eth0, ["from_underlay"], "programs on eth0");
    assert_eq!(on_veth, ["from_container"], "programs on {}", c1.host_veth);

    // Pinned and printed as structs with their field names (BTF).
    for name in names::ALL {
        assert!(pins.map(name).exists(), "map {name} not pinned");
    }
    let dump = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        pins.map(names::ENDPOINTS).to_str().unwrap(),
    ]);
    let entries = dump.as_array().expect("dump is a list");
    assert_eq!(entries.len(), 2, "{dump}");
    let values: Vec<&Value> = entries.iter().map(|e| &e["formatted"]["value"]).collect();
    for (_, ep) in &endpoints {
        assert!(
            values
                .iter()
                .any(|v| v["ifindex"] == ep.ifindex && v["network"] == VNI),
            "endpoint with ifindex {} not in bpftool's formatted dump: {dump}",
            ep.ifindex
        );
    }
    assert!(
        entries[0]["formatted"]["key"]["addr"].is_array(),
        "key not formatted: {dump}"
    );
    let cfg = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        pins.map(names::CONFIG).to_str().unwrap(),
    ]);
    assert_eq!(cfg[0]["formatted"]["value"]["vxlan_port"], 64000, "{cfg}");

    // Real packets: the containers resolve the gateway through the BPF ARP responder and reach
    // each other by bpf_redirect_peer, with no bridge and no address on the host side.
    let stats_path = pins.map(names::STATS);
    let stats_now = || bpftool_json(&["map", "dump", "pinned", stats_path.to_str().unwrap()]);
    assert!(
        c1.node.ping(c2.node.ip.unwrap()),
        "c1 cannot reach c2 through the datapath; counters: {}",
        stats_now()
    );
    assert!(
        c2.node.ping(c1.node.ip.unwrap()),
        "c2 cannot reach c1 through the datapath"
    );
    let stats = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        pins.map(names::STATS).to_str().unwrap(),
    ]);
    // A per-CPU array: each entry's values (one per CPU) name their network and counter.
    let counted = |stats: &serde_json::Value, network: Option<u32>, counter: Counter| {
        stats.as_array().unwrap().iter().any(|e| {
            e["formatted"]["values"].as_array().is_some_and(|cpus| {
                cpus.iter().any(|c| {
                    let v = &c["value"];
                    v["counter"] == counter as u32
                        && network.is_none_or(|n| v["network"] == n)
                        && v["packets"].as_u64().is_some_and(|p| p > 0)
                })
            })
        })
    };
    let has = |counter: Counter| counted(&stats, Some(VNI), counter);
    assert!(
        has(Counter::LocalDelivered),
        "no local_delivered counter: {stats}"
    );
    assert!(has(Counter::ArpReplied), "no arp_replied counter: {stats}");

    // A container that lies about its address is dropped and counted.
    c1.node
        .exec("ip", &["addr", "add", "9.0.1.99/25", "dev", "eth0"])
        .unwrap();
    assert!(
        !c1.node
            .try_exec("ping", &["-c", "1", "-W", "1", "-I", "9.0.1.99", "9.0.1.3"]),
        "a spoofed source got through"
    );
    let stats = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        pins.map(names::STATS).to_str().unwrap(),
    ]);
    assert!(
        counted(&stats, None, Counter::DropSpoofedSource),
        "spoofed packet not counted: {stats}"
    );

    // overlayctl reads the same pinned maps through the façade.
    let out = std::process::Command::new(overlay_tests::bin_path("overlayctl"))
        .args(["datapath", "--instance", &lab.pin_instance("a1")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "overlayctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "9.0.1.2",
        "9.0.1.3",
        "local_delivered",
        "drop_spoofed_source",
        "vxlan port 64000",
    ] {
        assert!(
            text.contains(needle),
            "overlayctl output lacks {needle:?}:\n{text}"
        );
    }

    drop(lab);
    assert!(!pin_dir.exists(), "pins left at {}", pin_dir.display());
}
