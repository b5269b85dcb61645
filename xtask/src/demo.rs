//! `cargo xtask demo`: a local cluster on the embedded defaults, shown working.
//!
//! Two agents in lab namespaces each run the real `overlay-agent`; containers on two virtual
//! networks (DC/OS's `dcos`, VNI 1024, and a second one, VNI 1025) get their traffic from the
//! eBPF datapath alone. The demo shows the programs attached, the maps as bpftool prints them,
//! traffic flowing within a network and isolation holding between networks.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_common::{counters::Counter, maps::names};
use overlay_lab::{Lab, LabSpec, Node};

use crate::workspace_root;

struct DemoContainer {
    node: Node,
    host_veth: String,
    vni: u32,
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    let agent_bin = workspace_root().join("target/debug/overlay-agent");
    if !agent_bin.exists() {
        bail!("{} missing: run `cargo build --bins`", agent_bin.display());
    }
    let mut lab = Lab::up(LabSpec {
        agents: 2,
        id: None,
    })?;
    println!(
        "== lab {} up: master, 2 agents, external host on a bridge fabric",
        lab.id()
    );

    // Containers: two on network dcos (VNI 1024) and one on network blue (VNI 1025), agent a1.
    let plan = [
        (
            Ipv4Addr::new(9, 0, 1, 2),
            25,
            Ipv4Addr::new(9, 0, 1, 1),
            1024,
        ),
        (
            Ipv4Addr::new(9, 0, 1, 3),
            25,
            Ipv4Addr::new(9, 0, 1, 1),
            1024,
        ),
        (
            Ipv4Addr::new(10, 1, 1, 2),
            25,
            Ipv4Addr::new(10, 1, 1, 1),
            1025,
        ),
    ];
    let mut containers = vec![];
    for (ip, len, gw, vni) in plan {
        let c = lab.add_container("a1", ip, len, gw, 1420)?;
        containers.push(DemoContainer {
            node: c.node,
            host_veth: c.host_veth,
            vni,
        });
    }

    for agent in ["a1", "a2"] {
        let mut args = vec![
            "--underlay-iface".to_owned(),
            "eth0".into(),
            "--instance".into(),
            lab.pin_instance(agent),
        ];
        for c in containers.iter().filter(|_| agent == "a1") {
            let mac = c.node.mac("eth0")?;
            let mac = mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            args.push("--endpoint".into());
            args.push(format!(
                "{},{},{},{mac}",
                c.host_veth,
                c.node.ip.unwrap(),
                c.vni
            ));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(agent, &agent_bin, &args)?;
    }
    let pins = |agent: &str| {
        Path::new("/sys/fs/bpf/ebpf-overlay/v1").join(format!("{}-{agent}", lab.id()))
    };
    for agent in ["a1", "a2"] {
        wait_for(
            &pins(agent).join("links").join("from_underlay@eth0"),
            Duration::from_secs(20),
        )
        .with_context(|| format!("agent {agent} did not attach its programs"))?;
    }
    let a1 = pins("a1");
    wait_for(
        &a1.join("links")
            .join(format!("from_container@{}", containers[2].host_veth)),
        Duration::from_secs(20),
    )?;
    println!(
        "== both agents loaded the datapath; pinned under {}",
        a1.parent().unwrap().display()
    );
    for entry in std::fs::read_dir(a1.join("links"))? {
        println!(
            "   attached (TCX ingress, pinned link): {}",
            entry?.file_name().to_string_lossy()
        );
    }

    println!("== OVL_ENDPOINTS on agent a1, as `bpftool map dump` prints it:");
    let dump = bpftool_json(&a1.join("maps").join(names::ENDPOINTS))?;
    for e in dump.as_array().into_iter().flatten() {
        println!("   {}", e["formatted"]);
    }

    println!("== traffic");
    let (c1, c2, c3) = (&containers[0], &containers[1], &containers[2]);
    let same = c1.node.ping(c2.node.ip.unwrap());
    println!(
        "   {} -> {} (same network, VNI 1024): {}",
        c1.node.ip.unwrap(),
        c2.node.ip.unwrap(),
        verdict(same)
    );
    let cross = c1.node.ping(c3.node.ip.unwrap());
    println!(
        "   {} -> {} (other network, VNI 1025):  {}",
        c1.node.ip.unwrap(),
        c3.node.ip.unwrap(),
        verdict(cross)
    );

    println!("== counters on agent a1 (OVL_STATS):");
    let stats = bpftool_json(&a1.join("maps").join(names::STATS))?;
    for e in stats.as_array().into_iter().flatten() {
        let key = &e["formatted"]["key"];
        let packets: u64 = e["formatted"]["values"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v["value"]["packets"].as_u64().unwrap_or(0))
            .sum();
        let name = key["counter"]
            .as_u64()
            .and_then(|c| Counter::from_u32(c as u32))
            .map_or("?", Counter::name);
        println!("   vni {:>5}  {:<22} {packets} packets", key["vni"], name);
    }
    println!(
        "== the same, as `overlayctl datapath --instance {}` shows it:",
        lab.pin_instance("a1")
    );
    let ctl = workspace_root().join("target/debug/overlayctl");
    let out = std::process::Command::new(&ctl)
        .args(["datapath", "--instance", &lab.pin_instance("a1")])
        .output()
        .with_context(|| format!("running {}", ctl.display()))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !same || cross {
        bail!(
            "the demo did not behave: same-network ping ok={same}, cross-network ping blocked={}",
            !cross
        );
    }
    println!("== traffic flows within a network and isolation holds between networks");
    if keep {
        let rec = lab.keep();
        println!(
            "lab {} left running; remove it with `cargo xtask lab down --id {}`",
            rec.id, rec.id
        );
    } else {
        println!("== tearing the lab down (use --keep to explore it)");
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "reply" } else { "no reply (dropped)" }
}

fn wait_for(path: &Path, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > timeout {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn bpftool_json(pinned: &Path) -> anyhow::Result<serde_json::Value> {
    let out = overlay_lab::run(
        "bpftool",
        &["-j", "map", "dump", "pinned", pinned.to_str().unwrap()],
    )?;
    Ok(serde_json::from_str(&out)?)
}
