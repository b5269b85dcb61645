//! `cargo xtask bench --levers`: what the kernel does around the programs on the cross-agent
//! path of the ebpf-overlay lab, measured with Debian's `perf` (this kernel has no kprobes, so
//! tracepoints and CPU samples):
//!
//! - headroom: during iperf3 UDP 64-byte datagrams, the head reallocations (`pskb_expand_head`,
//!   counted as the `kmem:kmalloc` / `kmem:kmem_cache_alloc` tracepoints it fires, with their call
//!   chains, attributed to `bpf_skb_adjust_room`) per datagram sent, and the share of the
//!   encapsulating program's CPU samples spent in them;
//! - GSO: during iperf3 TCP 1 stream, CPU samples in software segmentation (`skb_segment`,
//!   `__skb_gso_segment`) against those in the programs, and the sending agent's underlay bytes
//!   per packet (a GSO super-packet that crosses the underlay veth whole is far over the MTU).

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use overlay_lab::Node;

use super::traffic;

/// `[start, end)` of a kernel function, from /proc/kallsyms (end = the next symbol's address).
fn symbol_range(name: &str) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
    let mut addrs: Vec<u64> = vec![];
    let mut start = None;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(a), Some(_), Some(sym)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(a) = u64::from_str_radix(a, 16) else {
            continue;
        };
        addrs.push(a);
        if sym == name {
            start = Some(a);
        }
    }
    let start = start.with_context(|| format!("{name} not in /proc/kallsyms"))?;
    let end = addrs
        .iter()
        .copied()
        .filter(|a| *a > start)
        .min()
        .context("no symbol after it")?;
    Ok((start, end))
}

fn perf(args: &[&str]) -> anyhow::Result<std::process::Child> {
    Command::new("perf")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("running perf (Debian's linux-perf)")
}

/// `perf script` of a recording: one block per event (header line, then its call chain).
fn script(data: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new("perf")
        .args(["script", "-i"])
        .arg(data)
        .output()
        .context("perf script")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

fn has_frame(block: &str, function: &str) -> bool {
    block.lines().skip(1).any(|l| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|f| f.starts_with(&format!("{function}+")) || f == function)
    })
}

/// Frames of a BPF program in a call chain (`bpf_prog_<tag>_<name>`).
fn in_program(block: &str, program: &str) -> bool {
    block.lines().skip(1).any(|l| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|f| f.starts_with("bpf_prog_") && f.contains(program))
    })
}

/// The count `perf stat -x ,` wrote for its one event (NaN if it wrote none).
fn perf_stat_count(path: &Path) -> f64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("kmem:kmalloc"))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn stat(node: &Node, dev: &str, what: &str) -> anyhow::Result<u64> {
    node.exec("cat", &[&format!("/sys/class/net/{dev}/statistics/{what}")])?
        .trim()
        .parse()
        .with_context(|| format!("{what} of {dev} in {}", node.netns))
}

pub fn run(bin_dir: &Path, secs: u32, out_dir: &Path) -> anyhow::Result<()> {
    if Command::new("perf").arg("--version").output().is_err() {
        bail!("perf missing (Debian's linux-perf)");
    }
    let setup = super::ebpf_setup(bin_dir, &[]).context("ebpf-overlay cluster")?;
    let Some((_, Ok(target))) = setup.paths.iter().find(|(p, _)| *p == "cross_agent") else {
        bail!("no cross-agent path");
    };
    let agent = setup.agent_nodes.first().context("no agent node")?.clone();
    std::fs::create_dir_all(out_dir)?;

    // Headroom: every head allocation of pskb_expand_head, with call chains.
    let (pe0, pe1) = symbol_range("pskb_expand_head")?;
    let (kr0, kr1) = symbol_range("kmalloc_reserve")?;
    let alloc_data = out_dir.join("levers-alloc.data");
    let f1 = format!("call_site >= {pe0:#x} && call_site < {pe1:#x}");
    let f2 = format!("call_site >= {kr0:#x} && call_site < {kr1:#x}");
    let dur = secs.to_string();
    let mut rec = perf(&[
        "record",
        "-q",
        "-a",
        "-g",
        "-m",
        "16M",
        "-e",
        "kmem:kmalloc",
        "--filter",
        &f1,
        "-e",
        "kmem:kmem_cache_alloc",
        "--filter",
        &f2,
        "-o",
        alloc_data.to_str().unwrap(),
        "--",
        "sleep",
        &dur,
    ])?;
    let stat_out = out_dir.join("levers-alloc.stat");
    let mut counting = perf(&[
        "stat",
        "-a",
        "-x",
        ",",
        "-o",
        stat_out.to_str().unwrap(),
        "-e",
        "kmem:kmalloc",
        "--filter",
        &f1,
        "--",
        "sleep",
        &dur,
    ])?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let udp = traffic::iperf(
        &target.client,
        target.server,
        secs.saturating_sub(1).max(1),
        &["-u", "-l", "64", "-b", "0"],
    )?;
    rec.wait()?;
    counting.wait()?;
    let counted = perf_stat_count(&stat_out);
    let _ = std::fs::remove_file(&stat_out);
    let sent = udp["end"]["sum"]["packets"].as_f64().unwrap_or(0.0);
    println!(
        "levers: perf stat: pskb_expand_head kmalloc allocations machine-wide {counted:.0} \
         ({:.2} per datagram sent)",
        counted / sent.max(1.0)
    );
    let blocks = script(&alloc_data)?;
    let expand: Vec<_> = blocks
        .iter()
        .filter(|b| has_frame(b, "pskb_expand_head"))
        .collect();
    let by_encap = expand
        .iter()
        .filter(|b| has_frame(b, "bpf_skb_adjust_room"))
        .count();
    let by_program = expand
        .iter()
        .filter(|b| in_program(b, "from_container"))
        .count();
    println!(
        "levers: UDP 64 B cross agent, {secs} s: {sent:.0} datagrams sent; pskb_expand_head \
         allocations machine-wide {}, under bpf_skb_adjust_room {by_encap}, in from_container \
         {by_program} ({:.2} per datagram sent)",
        expand.len(),
        by_program as f64 / sent.max(1.0)
    );

    // Their cost: CPU samples during the same test.
    let cpu_data = out_dir.join("levers-cpu-udp.data");
    let mut rec = perf(&[
        "record",
        "-q",
        "-a",
        "-g",
        "-F",
        "4999",
        "-e",
        "cpu-clock",
        "-o",
        cpu_data.to_str().unwrap(),
        "--",
        "sleep",
        &dur,
    ])?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    traffic::iperf(
        &target.client,
        target.server,
        secs.saturating_sub(1).max(1),
        &["-u", "-l", "64", "-b", "0"],
    )?;
    rec.wait()?;
    let samples = script(&cpu_data)?;
    let prog: Vec<_> = samples
        .iter()
        .filter(|b| in_program(b, "from_container"))
        .collect();
    let realloc = prog
        .iter()
        .filter(|b| has_frame(b, "pskb_expand_head"))
        .count();
    let adjust = prog
        .iter()
        .filter(|b| has_frame(b, "bpf_skb_adjust_room"))
        .count();
    println!(
        "levers: CPU samples in from_container (callees included) {}: bpf_skb_adjust_room {adjust} \
         ({:.0}%), of which pskb_expand_head {realloc} ({:.0}% of the program)",
        prog.len(),
        100.0 * adjust as f64 / prog.len().max(1) as f64,
        100.0 * realloc as f64 / prog.len().max(1) as f64
    );

    // GSO: TCP 1 stream.
    let gso_data = out_dir.join("levers-cpu-tcp.data");
    let receiver = setup.agent_nodes.get(1).context("no second agent")?.clone();
    let (p0, b0) = (
        stat(&agent, "eth0", "tx_packets")?,
        stat(&agent, "eth0", "tx_bytes")?,
    );
    let (r0, rb0) = (
        stat(&receiver, "eth0", "rx_packets")?,
        stat(&receiver, "eth0", "rx_bytes")?,
    );
    let mut rec = perf(&[
        "record",
        "-q",
        "-a",
        "-g",
        "-F",
        "4999",
        "-e",
        "cpu-clock",
        "-o",
        gso_data.to_str().unwrap(),
        "--",
        "sleep",
        &dur,
    ])?;
    let tcp_stat = out_dir.join("levers-tcp-alloc.stat");
    let mut counting = perf(&[
        "stat",
        "-a",
        "-x",
        ",",
        "-o",
        tcp_stat.to_str().unwrap(),
        "-e",
        "kmem:kmalloc",
        "--filter",
        &f1,
        "--",
        "sleep",
        &dur,
    ])?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let tcp = traffic::iperf(
        &target.client,
        target.server,
        secs.saturating_sub(1).max(1),
        &[],
    )?;
    rec.wait()?;
    counting.wait()?;
    let tcp_expand = perf_stat_count(&tcp_stat);
    let _ = std::fs::remove_file(&tcp_stat);
    let (p1, b1) = (
        stat(&agent, "eth0", "tx_packets")?,
        stat(&agent, "eth0", "tx_bytes")?,
    );
    let (r1, rb1) = (
        stat(&receiver, "eth0", "rx_packets")?,
        stat(&receiver, "eth0", "rx_bytes")?,
    );
    println!(
        "levers: receiving agent's eth0 {} packets, {:.0} bytes per packet (after the fabric \
         bridge)",
        r1 - r0,
        (rb1 - rb0) as f64 / (r1 - r0).max(1) as f64
    );
    let samples = script(&gso_data)?;
    let seg_blocks: Vec<_> = samples
        .iter()
        .filter(|b| has_frame(b, "skb_segment") || has_frame(b, "__skb_gso_segment"))
        .collect();
    let seg = seg_blocks.len();
    // Where segmentation runs: the most frequent call chains (innermost frames dropped).
    let mut chains: std::collections::BTreeMap<String, usize> = Default::default();
    for b in &seg_blocks {
        let frames: Vec<&str> = b
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|f| f.split('+').next().unwrap_or(f))
            .skip_while(|f| *f != "skb_segment" && *f != "__skb_gso_segment")
            .take(10)
            .collect();
        *chains.entry(frames.join(" < ")).or_default() += 1;
    }
    let mut chains: Vec<_> = chains.into_iter().collect();
    chains.sort_by(|a, b| b.1.cmp(&a.1));
    for (chain, n) in chains.iter().take(4) {
        println!("levers:   {n} segmentation samples: {chain}");
    }
    let header = samples
        .first()
        .map(|b| b.lines().next().unwrap_or(""))
        .unwrap_or("");
    let _ = header;
    let progs = samples.iter().filter(|b| in_program(b, "from_")).count();
    let gbps = tcp["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    println!(
        "levers: TCP 1 stream cross agent {gbps:.1} Gbit/s: sending agent's eth0 {} packets, {:.0} \
         bytes per packet; CPU samples in software segmentation {seg}, in the programs {progs} \
         (of {} machine-wide); pskb_expand_head kmalloc allocations machine-wide {tcp_expand:.0}",
        p1 - p0,
        (b1 - b0) as f64 / (p1 - p0).max(1) as f64,
        samples.len()
    );
    for f in [alloc_data, cpu_data, gso_data] {
        let _ = std::fs::remove_file(f);
    }
    drop(setup);
    Ok(())
}
