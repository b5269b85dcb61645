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
//!   per packet (a GSO super-packet that crosses the underlay veth whole is far over the MTU);
//! - the per-datagram budget: during UDP 64 B cross agent on the raw lab and on the ebpf-overlay
//!   lab, one after the other in the same run, where each CPU's time goes, in nanoseconds per
//!   datagram sent, by what the sampled call chain was doing ([`Part`]): what the overlay adds
//!   over the wire, part by part.

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

/// Sampling frequency of the CPU recordings (Hz).
const SAMPLE_HZ: u32 = 4999;

/// `perf record` of every CPU's `cpu-clock` samples with call chains into `data`, for `dur`
/// seconds.
fn record_cpu(data: &Path, dur: &str) -> anyhow::Result<std::process::Child> {
    let hz = SAMPLE_HZ.to_string();
    perf(&[
        "record",
        "-q",
        "-a",
        "-g",
        "-F",
        &hz,
        "-e",
        "cpu-clock",
        "-o",
        data.to_str().unwrap(),
        "--",
        "sleep",
        dur,
    ])
}

/// `perf stat` counting `event` (with `filter`) on every CPU into `out`, for `dur` seconds
/// (read back with [`perf_stat_event`]).
fn count_event(
    out: &Path,
    event: &str,
    filter: &str,
    dur: &str,
) -> anyhow::Result<std::process::Child> {
    perf(&[
        "stat",
        "-a",
        "-x",
        ",",
        "-o",
        out.to_str().unwrap(),
        "-e",
        event,
        "--filter",
        filter,
        "--",
        "sleep",
        dur,
    ])
}

/// iperf3 UDP 64-byte datagrams, unthrottled, from `target` for `secs` seconds.
fn udp64(target: &super::Target, secs: u32) -> anyhow::Result<serde_json::Value> {
    traffic::iperf(
        &target.client,
        target.server,
        secs,
        &["-u", "-l", "64", "-b", "0"],
    )
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

/// The count `perf stat -x ,` wrote for `kmem:kmalloc` (NaN if it wrote none).
fn perf_stat_count(path: &Path) -> f64 {
    perf_stat_event(path, "kmem:kmalloc")
}

/// The count `perf stat -x ,` wrote for `event` (NaN if it wrote none).
fn perf_stat_event(path: &Path, event: &str) -> f64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains(event))
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

/// `agent_args`: extra arguments of the ebpf-overlay agents (`--agent-arg`), to measure an
/// agent setting's budget against the defaults' in another run.
pub fn run(bin_dir: &Path, secs: u32, out_dir: &Path, agent_args: &[String]) -> anyhow::Result<()> {
    if Command::new("perf").arg("--version").output().is_err() {
        bail!("perf missing (Debian's linux-perf)");
    }
    std::fs::create_dir_all(out_dir)?;
    budget(bin_dir, secs, out_dir, agent_args).context("the per-datagram budget")?;
    let setup = super::ebpf_setup("ebpf", bin_dir, agent_args).context("ebpf-overlay cluster")?;
    let Some((_, Ok(target))) = setup.paths.iter().find(|(p, _)| *p == "cross_agent") else {
        bail!("no cross-agent path");
    };
    let agent = setup.agent_nodes.first().context("no agent node")?.clone();

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
    let mut counting = count_event(&stat_out, "kmem:kmalloc", &f1, &dur)?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let udp = udp64(target, secs.saturating_sub(1).max(1))?;
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
    let mut rec = record_cpu(&cpu_data, &dur)?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    udp64(target, secs.saturating_sub(1).max(1))?;
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
    let mut rec = record_cpu(&gso_data, &dur)?;
    let tcp_stat = out_dir.join("levers-tcp-alloc.stat");
    let mut counting = count_event(&tcp_stat, "kmem:kmalloc", &f1, &dur)?;
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
    chains.sort_by_key(|c| std::cmp::Reverse(c.1));
    for (chain, n) in chains.iter().take(4) {
        println!("levers:   {n} segmentation samples: {chain}");
    }
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

/// What a CPU sample was doing, by the innermost frame of its call chain that names a part
/// (leaf first: a sample in `memcpy` under `pskb_expand_head` under a program is the head
/// reallocation's; one in `__netif_receive_skb_core` under `process_backlog` is the device
/// hop's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    HeadRealloc,
    Programs,
    Redirect,
    WakeReceiver,
    UdpIpReceive,
    FabricBridge,
    DeviceHops,
    SocketSend,
    SocketReceive,
    SyscallOther,
    UserSpace,
    Idle,
    Other,
}

impl Part {
    const ALL: [Part; 13] = [
        Part::HeadRealloc,
        Part::Programs,
        Part::Redirect,
        Part::WakeReceiver,
        Part::UdpIpReceive,
        Part::FabricBridge,
        Part::DeviceHops,
        Part::SocketSend,
        Part::SocketReceive,
        Part::SyscallOther,
        Part::UserSpace,
        Part::Idle,
        Part::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            Part::HeadRealloc => "skb head reallocation (pskb_expand_head)",
            Part::Programs => "eBPF programs and their helpers",
            Part::Redirect => "redirect after the program (neighbour, peer)",
            Part::WakeReceiver => "waking the receiver (sock_def_readable)",
            Part::UdpIpReceive => "IP and UDP receive (but the wake-up)",
            Part::FabricBridge => "fabric bridge and its netfilter hooks",
            Part::DeviceHops => "device hops (veth transmit, backlog, receive core)",
            Part::SocketSend => "socket send (udp_sendmsg down to the first device)",
            Part::SocketReceive => "socket receive (udp_recvmsg)",
            Part::SyscallOther => "other kernel work in system calls",
            Part::UserSpace => "user space (iperf3)",
            Part::Idle => "idle",
            Part::Other => "other",
        }
    }

    /// The part a frame (a kernel function name or a `bpf_prog_<tag>_<name>`) names, if any.
    fn of_frame(f: &str) -> Option<Part> {
        let any = |names: &[&str]| names.contains(&f);
        let prefix = |names: &[&str]| names.iter().any(|n| f.starts_with(n));
        Some(if f == "pskb_expand_head" {
            Part::HeadRealloc
        } else if f.starts_with("bpf_prog_") {
            Part::Programs
        } else if any(&[
            "skb_do_redirect",
            "__bpf_redirect_neigh",
            "bpf_out_neigh_v4",
            "bpf_out_neigh_v6",
        ]) {
            Part::Redirect
        } else if f == "sock_def_readable" {
            // The datagram queued, the sleeping iperf3 woken on the other CPU: an IPI, which on
            // a virtual machine is an exit to the hypervisor.
            Part::WakeReceiver
        } else if any(&[
            "ip_rcv",
            "ip_rcv_core",
            "ip_local_deliver",
            "ip_list_rcv",
            "ip_sublist_rcv",
            "__udp4_lib_rcv",
            "udp_rcv",
            "udp_queue_rcv_skb",
            "udp_unicast_rcv_skb",
            "ipv6_rcv",
            "__udp6_lib_rcv",
        ]) {
            Part::UdpIpReceive
        } else if prefix(&["br_", "nf_hook", "ipt_do_table", "nf_conntrack", "nf_nat"]) {
            Part::FabricBridge
        } else if any(&[
            "veth_xmit",
            "__netif_rx",
            "netif_rx",
            "enqueue_to_backlog",
            "process_backlog",
            "__netif_receive_skb",
            "__netif_receive_skb_core",
            "__netif_receive_skb_one_core",
            "netif_receive_skb",
            "__dev_queue_xmit",
            "dev_hard_start_xmit",
            "net_rx_action",
            "__do_softirq",
            "handle_softirqs",
            "do_softirq",
        ]) {
            Part::DeviceHops
        } else if any(&[
            "udp_sendmsg",
            "ip_make_skb",
            "udp_send_skb",
            "ip_send_skb",
            "__sys_sendto",
            "sock_sendmsg",
            "__sys_sendmsg",
            "sock_write_iter",
        ]) {
            Part::SocketSend
        } else if any(&[
            "udp_recvmsg",
            "__sys_recvfrom",
            "sock_recvmsg",
            "__skb_recv_udp",
            "sock_read_iter",
        ]) {
            Part::SocketReceive
        } else if any(&["do_syscall_64", "entry_SYSCALL_64"]) {
            Part::SyscallOther
        } else if any(&[
            "do_idle",
            "cpuidle_enter",
            "default_idle",
            "default_idle_call",
            "poll_idle",
            "cpu_startup_entry",
            "acpi_idle_do_entry",
            "intel_idle",
            "pv_native_safe_halt",
            "native_safe_halt",
        ]) {
            Part::Idle
        } else {
            return None;
        })
    }

    /// The part of one `perf script` block (header line, then frames leaf first).
    fn of_sample(block: &str) -> Part {
        let frames: Vec<&str> = block
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|f| f.split('+').next().unwrap_or(f))
            .collect();
        if let Some(p) = frames.iter().find_map(|f| Part::of_frame(f)) {
            return p;
        }
        // No kernel frame named a part: a user-space sample has user addresses only.
        let user = block.lines().skip(1).all(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|a| !a.starts_with("ffff"))
        });
        if user && block.lines().nth(1).is_some() {
            Part::UserSpace
        } else {
            Part::Other
        }
    }
}

/// The CPU a `perf script` block's sample was taken on (`[001]` in its header).
fn sample_cpu(block: &str) -> Option<usize> {
    let header = block.lines().next()?;
    let open = header.find('[')?;
    let close = header[open..].find(']')? + open;
    header[open + 1..close].trim().parse().ok()
}

/// CPU samples per (CPU, part) during UDP 64 B, and the datagrams sent and received.
struct UdpProfile {
    samples: std::collections::BTreeMap<(usize, Part), u64>,
    sent: f64,
    received: f64,
    /// The test's duration as iperf3 measured it.
    seconds: f64,
    /// Wake-ups of iperf3 threads (`sched:sched_waking`), machine-wide.
    wakeups: f64,
}

impl UdpProfile {
    /// Nanoseconds of `cpu` in `part` per datagram sent.
    fn ns(&self, cpu: usize, part: Part) -> f64 {
        self.samples.get(&(cpu, part)).copied().unwrap_or(0) as f64 / SAMPLE_HZ as f64 * 1e9
            / self.sent.max(1.0)
    }

    fn received_kpps(&self) -> f64 {
        self.received / self.seconds.max(f64::MIN_POSITIVE) / 1e3
    }

    fn wakeups_per_datagram(&self) -> f64 {
        self.wakeups / self.sent.max(1.0)
    }
}

/// The [`UdpProfile`] of UDP 64 B from `target` for `secs` seconds; with `data`, CPU samples
/// recorded there (which slows every path), without, the wake-ups only (nearly free).
fn udp_profile(
    target: &super::Target,
    secs: u32,
    data: Option<&Path>,
) -> anyhow::Result<UdpProfile> {
    let dur = secs.to_string();
    let mut rec = data.map(|data| record_cpu(data, &dur)).transpose()?;
    let wakeups_out = std::env::temp_dir().join(format!("levers-wakeups-{}", std::process::id()));
    let mut counting = count_event(
        &wakeups_out,
        "sched:sched_waking",
        "comm == \"iperf3\"",
        &dur,
    )?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let udp = udp64(target, secs.saturating_sub(1).max(1))?;
    if let Some(rec) = rec.as_mut() {
        rec.wait()?;
    }
    counting.wait()?;
    let wakeups = perf_stat_event(&wakeups_out, "sched:sched_waking");
    let _ = std::fs::remove_file(&wakeups_out);
    let (sent, lost, seconds) = traffic::udp_totals(&udp)?;
    let mut parts = std::collections::BTreeMap::new();
    for block in data.map(script).transpose()?.unwrap_or_default() {
        if let Some(cpu) = sample_cpu(&block) {
            *parts.entry((cpu, Part::of_sample(&block))).or_insert(0) += 1;
        }
    }
    // The recording stays in the output directory, for `perf report -i` on a part's functions.
    Ok(UdpProfile {
        samples: parts,
        sent,
        received: (sent - lost).max(0.0),
        seconds,
        wakeups,
    })
}

/// The per-datagram budget (see the module doc): raw, then ebpf-overlay, UDP 64 B cross agent,
/// each CPU's samples turned into nanoseconds per datagram sent. The client is pinned to CPU 0
/// and the server to CPU 1 (as in the traffic tables), so CPU 0 carries the sender and every
/// softirq its packets raise on the way (veth queues to the CPU it was sent from), CPU 1 the
/// receiving iperf3.
fn budget(bin_dir: &Path, secs: u32, out_dir: &Path, agent_args: &[String]) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut profiles = vec![];
    for name in ["raw", "ebpf"] {
        let setup = if name == "raw" {
            super::raw_setup().context("raw lab")?
        } else {
            super::ebpf_setup("ebpf", bin_dir, agent_args).context("ebpf-overlay cluster")?
        };
        let Some((_, Ok(target))) = setup.paths.iter().find(|(p, _)| *p == "cross_agent") else {
            bail!("{name}: no cross-agent path");
        };
        let plain = udp_profile(target, secs, None)?;
        println!(
            "levers: budget {name}, not profiled: {:.0} kpps received; iperf3 woken {:.3} times \
             per datagram sent",
            plain.received_kpps(),
            plain.wakeups_per_datagram()
        );
        let data = out_dir.join(format!("levers-budget-{name}.data"));
        let profile = udp_profile(target, secs, Some(&data))?;
        println!(
            "levers: budget {name}: {:.0} datagrams sent, {:.0} received in {:.1} s ({:.0} kpps \
             received); iperf3 woken {:.0} times ({:.3} per datagram sent)",
            profile.sent,
            profile.received,
            profile.seconds,
            profile.received_kpps(),
            profile.wakeups,
            profile.wakeups_per_datagram()
        );
        profiles.push((name, profile));
        drop(setup);
    }
    let (raw, ebpf) = (&profiles[0].1, &profiles[1].1);
    println!(
        "levers: per-datagram budget, UDP 64 B cross agent, ns per datagram sent (samples at {SAMPLE_HZ} Hz):"
    );
    for cpu in 0..cpus.min(2) {
        println!(
            "levers:   CPU {cpu} ({})  raw  ebpf  ebpf-raw",
            if cpu == 0 {
                "client and its softirqs"
            } else {
                "server"
            }
        );
        let (mut tr, mut te) = (0.0, 0.0);
        for part in Part::ALL {
            let (r, e) = (raw.ns(cpu, part), ebpf.ns(cpu, part));
            if part != Part::Idle {
                tr += r;
                te += e;
            }
            if r > 0.0 || e > 0.0 {
                println!(
                    "levers:     {:<55} {r:6.0} {e:6.0} {:+6.0}",
                    part.label(),
                    e - r
                );
            }
        }
        println!(
            "levers:     {:<55} {tr:6.0} {te:6.0} {:+6.0}",
            "busy (all but idle)",
            te - tr
        );
    }
    Ok(())
}
