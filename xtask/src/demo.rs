//! `cargo xtask demo`: a local cluster on the embedded defaults, shown working.
//!
//! A real `overlay-master` and two real `overlay-agent`s run in lab namespaces; containers on
//! DC/OS's two default networks (`dcos`, IPv4, and `dcos6`, IPv6) and on `blue` sit on both
//! agents. The demo shows the master's allocation, the datapath as `overlayctl` reads it from the
//! pinned maps, traffic flowing within a network (on one agent and across agents, in VXLAN built
//! by BPF; ping6 on `dcos6`), and isolation holding between networks, with the drop counters that
//! say why.

use std::{net::IpAddr, process::Command};

use anyhow::{Context as _, bail};
use overlay_lab::{
    Container,
    cluster::{Cluster, ClusterSpec},
};

/// DC/OS's default networks (`dcos`, `dcos6`) and a second IPv4 one.
const CONFIG: &str = "\
vtep_subnet: 44.128.0.0/20
vtep_subnet6: fd01:a::/64
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - name: dcos
    subnet: 9.0.0.0/8
    prefix: 24
  - name: dcos6
    subnet6: fd01:b::/64
    prefix6: 80
  - name: blue
    subnet: 10.1.0.0/16
    prefix: 24
";

use crate::workspace_root;

pub fn run(keep: bool) -> anyhow::Result<()> {
    let bin_dir = workspace_root().join("target/debug");
    for bin in ["overlay-master", "overlay-agent", "overlayctl"] {
        if !bin_dir.join(bin).exists() {
            bail!(
                "{} missing: run `cargo build --bins`",
                bin_dir.join(bin).display()
            );
        }
    }
    let mut spec = ClusterSpec::new(2, &bin_dir);
    spec.config = CONFIG.into();
    let mut cluster = Cluster::up(spec)?;
    println!(
        "== lab {}: master at {}, agents a1 and a2, external host; fabric 10.250.0.0/24",
        cluster.lab.id(),
        cluster.master_url()
    );
    for agent in ["a1", "a2"] {
        let info = cluster.agent_info(agent)?;
        for ov in &info.overlays {
            let v = &ov.backend.vxlan;
            println!(
                "   {agent} ({}): network {:<5} vni {:<5} subnet {:<18} vtep {} {}",
                info.ip,
                ov.info.name,
                v.vni,
                ov.subnet
                    .map(|s| s.to_string())
                    .or(ov.subnet6.map(|s| s.to_string()))
                    .unwrap_or_default(),
                v.vtep_ip.map(|s| s.to_string()).unwrap_or_default(),
                v.vtep_mac.map(|s| s.to_string()).unwrap_or_default(),
            );
        }
    }

    let mut add = |agent: &str, net: &str| -> anyhow::Result<(Container, IpAddr)> {
        let (c, addrs) = cluster.add_container_addrs(agent, net)?;
        let ip = addrs
            .ip4
            .map(IpAddr::V4)
            .or(addrs.ip6.map(IpAddr::V6))
            .context("a container without an address")?;
        println!("   container {ip} on {agent}, network {net}");
        Ok((c, ip))
    };
    println!("== containers, connected through the agents' API:");
    let d1 = add("a1", "dcos")?;
    let d2 = add("a1", "dcos")?;
    let d3 = add("a2", "dcos")?;
    let b1 = add("a1", "blue")?;
    let b2 = add("a2", "blue")?;
    let s1 = add("a1", "dcos6")?;
    let s2 = add("a1", "dcos6")?;
    let s3 = add("a2", "dcos6")?;

    println!("== traffic");
    let checks = [
        (&d1, &d2, "dcos -> dcos, same agent", true),
        (&d1, &d3, "dcos -> dcos, across agents (VXLAN)", true),
        (&b1, &b2, "blue -> blue, across agents (VXLAN)", true),
        (&d1, &b1, "dcos -> blue, same agent", false),
        (&d1, &b2, "dcos -> blue, across agents", false),
        (&s1, &s2, "dcos6 -> dcos6, same agent (ping6)", true),
        (&s1, &s3, "dcos6 -> dcos6, across agents (ping6)", true),
    ];
    let mut all_ok = true;
    for ((from, from_ip), (_, to_ip), what, expect) in checks {
        let replied = from.node.ping_ip(*to_ip);
        let verdict = if replied {
            "reply"
        } else {
            "no reply (dropped)"
        };
        let ok = replied == expect;
        all_ok &= ok;
        println!(
            "   {:<20} -> {:<20} {what:<38} {verdict}{}",
            from_ip.to_string(),
            to_ip.to_string(),
            if ok { "" } else { "   <-- UNEXPECTED" }
        );
    }

    println!("== agent a1's datapath, as `overlayctl datapath` reads it from the pinned maps:");
    let ctl = bin_dir.join("overlayctl");
    let out = Command::new(&ctl)
        .args(["datapath", "--instance", &cluster.lab.pin_instance("a1")])
        .output()
        .with_context(|| format!("running {}", ctl.display()))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("== the same counters in agent a1's /metrics (Prometheus):");
    for line in cluster
        .agent("a1")
        .metrics()?
        .lines()
        .filter(|l| l.starts_with("overlay_datapath_packets_total"))
    {
        println!("   {line}");
    }
    if !all_ok {
        bail!("the demo did not behave as expected (see UNEXPECTED above)");
    }
    println!(
        "== traffic flows within each network, on one agent and across agents; isolation holds between networks"
    );
    if keep {
        let id = cluster.keep().id;
        println!("lab {id} left running; remove it with `cargo xtask lab down --id {id}`");
    } else {
        println!("== tearing the lab down (use --keep to explore it)");
    }
    Ok(())
}
