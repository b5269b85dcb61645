//! `cargo xtask bench`: the same lab topology three ways, measured in one run.
//!
//! - `raw`: agent namespaces talking directly over the fabric bridge, no overlay (the physical
//!   limit of the lab: veth + bridge + veth);
//! - `kernel`: DC/OS's kernel datapath as DC/OS builds it (see [`kernel`]);
//! - `ebpf`: ebpf-overlay, a real master and real agents ([`overlay_lab::cluster::Cluster`]).
//! - on request (`--datapaths ...,raw6,ebpf6`), the IPv6 underlay: `raw6`, agent to agent over
//!   an IPv6-only fabric, and `ebpf6`, ebpf-overlay on that fabric (outer IPv6 VXLAN, containers
//!   on the IPv4 `dcos` network), in a table of their own.
//! - inner IPv6 over the IPv4 underlay (`raw_ipv6,kernel_ipv6,ebpf_ipv6`, measured by default,
//!   across agents only), in a table of their own: `raw_ipv6`, agent to agent by IPv6 over the
//!   fabric bridge; `kernel_ipv6`, DC/OS's kernel datapath carrying `dcos6` (Docker containers
//!   on `d-dcos6`, `vtep_ip6`, see [`kernel`]); `ebpf_ipv6`, ebpf-overlay's real agents and
//!   programs, CNI containers on `dcos6` with the addresses the agents give them. RTT there is the xtask's own TCP ping-pong ([`traffic::Rtt`]).
//!
//! The three labs exist side by side and every run measures all of them in turn, so that drift in
//! machine load hits every datapath alike. Paths: two containers on one agent, on two agents, and
//! container -> external host (through masquerade). For `raw` the "same agent" and "different
//! agents" rows are the same measurement (agent to agent), and "external" is agent to external
//! host. Then the control plane: joins at several cluster sizes and 1,000 simulated agents.
//!
//! Output: a markdown table (stdout and `bench-results/latest.md`), JSON
//! (`bench-results/<timestamp>.json`), and a chart (`bench-results/<timestamp>.png`, via Debian's
//! python3-matplotlib).

mod bpfstats;
mod control;
mod kernel;
mod levers;
mod micro;
mod report;
pub mod traffic;
mod vm;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};
use overlay_lab::{
    Fabric, Lab, LabSpec, Node,
    cluster::{Cluster, ClusterSpec},
};

use crate::workspace_root;
pub use report::{Figure, Results};
use traffic::{PathSample, Rtt};

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Smoke mode: 1 run, 2 s per test, small agent counts.
    #[arg(long)]
    pub quick: bool,
    /// Runs per figure (default 3; 1 with --quick).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Seconds per iperf3 test (default 10; 2 with --quick).
    #[arg(long)]
    pub secs: Option<u32>,
    /// Use overlay-master/overlay-agent from this directory instead of building
    /// `target/release` (`cargo build --release --bins`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where results go (default `bench-results/` in the workspace).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip the control-plane figures.
    #[arg(long)]
    pub no_control: bool,
    /// Skip the data-plane figures.
    #[arg(long)]
    pub no_data: bool,
    /// Turn on `kernel.bpf_stats_enabled` for the run (restored after) and report each
    /// ebpf-overlay program's runs and average run time per path (adds a little per-run cost).
    #[arg(long)]
    pub bpf_stats: bool,
    /// Data-plane datapaths to measure (comma-separated subset of raw,kernel,ebpf, inner IPv6's
    /// raw_ipv6,kernel_ipv6,ebpf_ipv6, the IPv6 underlay's raw6,ebpf6, and ebpf_kernel_next_hop
    /// and ebpf6_kernel_next_hop (ebpf-overlay with --next-hop-cache false, against ebpf or
    /// ebpf6), measured only when asked for).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "raw,kernel,ebpf,raw_ipv6,kernel_ipv6,ebpf_ipv6"
    )]
    pub datapaths: Vec<String>,
    /// An extra argument for the ebpf-overlay agents of the IPv4 data-plane lab (repeatable), to
    /// measure an agent setting against the defaults, e.g.
    /// `--agent-arg=--nat-tcp-closing-timeout=1`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Only the micro-benchmark table (per-packet program cost by BPF_PROG_TEST_RUN).
    #[arg(long)]
    pub micro: bool,
    /// Skip the micro-benchmark table.
    #[arg(long, conflicts_with = "micro")]
    pub no_micro: bool,
    /// An earlier build of `overlay-microbench`, measured in the same run as this one (rounds in
    /// turn): the micro table shows before, after and the ratio.
    #[arg(long)]
    pub micro_baseline: Option<PathBuf>,
    /// Micro-benchmark rounds (default 5; 1 with --quick).
    #[arg(long)]
    pub micro_rounds: Option<usize>,
    /// Program runs per case and round (default 2000; 200 with --quick).
    #[arg(long)]
    pub micro_calls: Option<usize>,
    /// Instead: what the kernel does around the programs on the cross-agent path (head
    /// reallocations under UDP 64 B, software GSO under TCP), measured with perf.
    #[arg(long)]
    pub levers: bool,
    /// Instead: iperf3 between containers in two QEMU VMs (the VM lab), raw vs DC/OS kernel
    /// datapath vs ebpf-overlay in one lab run (default 1 run of 10 s per figure).
    #[arg(long)]
    pub vm: bool,
    /// With --vm: the guests' kernel, `bookworm` (6.12, what the tests boot) or
    /// `trixie-backports` (the newest 6.x there; netkit headroom needs 6.14 or later).
    #[arg(long, default_value = "bookworm", value_parser = ["bookworm", "trixie-backports"])]
    pub guest_kernel: String,
}

pub const DATAPATHS: [&str; 3] = ["raw", "kernel", "ebpf"];
pub const PATHS: [&str; 3] = ["same_agent", "cross_agent", "external"];

struct Plan {
    runs: usize,
    secs: u32,
    lat_secs: u32,
    join_sizes: Vec<usize>,
    fake_agents: usize,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.vm {
        let out_dir = args
            .out
            .clone()
            .unwrap_or_else(|| workspace_root().join("bench-results"));
        return vm::run(vm::VmBenchArgs {
            runs: args.runs.unwrap_or(1).max(1),
            secs: args.secs.unwrap_or(10).max(1),
            out_dir: &out_dir,
            kernel: match args.guest_kernel.as_str() {
                "trixie-backports" => overlay_lab::vm::GuestKernel::TrixieBackports,
                _ => overlay_lab::vm::GuestKernel::Bookworm,
            },
        });
    }
    let plan = Plan {
        runs: args.runs.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        secs: args.secs.unwrap_or(if args.quick { 2 } else { 10 }).max(1),
        lat_secs: if args.quick { 1 } else { 5 },
        join_sizes: if args.quick {
            vec![2, 4]
        } else {
            vec![2, 10, 50]
        },
        fake_agents: if args.quick { 100 } else { 1000 },
    };
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => {
            crate::cargo(&["build", "--release", "--bins"])?;
            workspace_root().join("target/release")
        }
    };
    if args.levers {
        let out_dir = args
            .out
            .clone()
            .unwrap_or_else(|| workspace_root().join("bench-results"));
        return levers::run(
            &bin_dir,
            args.secs.unwrap_or(3).max(2),
            &out_dir,
            &args.agent_args,
        );
    }
    let mut needed = vec!["overlay-master", "overlay-agent"];
    if !args.no_micro {
        needed.push("overlay-microbench");
    }
    if args.micro {
        needed = vec!["overlay-microbench"];
    }
    for bin in needed {
        if !bin_dir.join(bin).exists() {
            bail!("{} missing", bin_dir.join(bin).display());
        }
    }
    for tool in ["iperf3", "sockperf", "iptables"] {
        if args.micro {
            break;
        }
        if overlay_lab::run("sh", &["-c", &format!("command -v {tool}")]).is_err() {
            bail!("{tool} missing: run `cargo xtask setup`");
        }
    }
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("bench-results"));
    std::fs::create_dir_all(&out_dir)?;

    let started = Instant::now();
    let mut results = Results::new(
        if args.micro {
            "micro"
        } else if args.quick {
            "quick"
        } else {
            "full"
        },
        plan.runs,
        plan.secs,
    );
    results.load_before = load();
    results.agent_args = args.agent_args.clone();
    if !args.no_micro {
        let micro = micro::run(
            &bin_dir.join("overlay-microbench"),
            args.micro_baseline.as_deref(),
            args.micro_rounds
                .unwrap_or(if args.quick { 1 } else { 5 })
                .max(1),
            args.micro_calls
                .unwrap_or(if args.quick { 200 } else { 2000 })
                .max(1),
        )
        .context("micro-benchmark")?;
        println!("{}", micro::markdown(&micro));
        results.micro = Some(micro);
    }
    if !args.no_data && !args.micro {
        let stats = if args.bpf_stats {
            Some(bpfstats::StatsGuard::enable()?)
        } else {
            None
        };
        // On through our fd, or by the sysctl (which does not show what an fd turned on).
        results.bpf_stats_enabled = stats.is_some()
            || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                .is_ok_and(|s| s.trim() == "1");
        data_plane(
            &plan,
            &bin_dir,
            &args.datapaths,
            args.bpf_stats,
            &mut results,
        )?;
    }
    if !args.no_control && !args.micro {
        control_plane(&plan, &bin_dir, &mut results)?;
    }
    results.load_after = load();
    results.elapsed_s = started.elapsed().as_secs_f64();
    let written = report::write(&results, &out_dir)?;
    println!("{}", report::markdown(&results));
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Client node, server address for one measured path.
struct Target {
    client: Node,
    server: IpAddr,
}

/// The labs of one datapath: the paths it can measure (None: not available, with why).
struct Setup {
    name: &'static str,
    paths: Vec<(&'static str, Result<Target, String>)>,
    /// Programs attached by this setup's agents (ebpf only).
    prog_ids: Vec<u32>,
    /// The agents' own namespaces (ebpf only).
    agent_nodes: Vec<Node>,
    /// How RTT is measured on its paths.
    rtt: Rtt,
    _keep: Box<dyn std::any::Any>,
}

fn raw_setup() -> anyhow::Result<Setup> {
    let mut lab = Lab::up(LabSpec {
        agents: 2,
        id: None,
    })?;
    let a1 = lab.node("a1")?.clone();
    let a2 = lab.node("a2")?.clone();
    let ext = lab.external().clone();
    for n in [&a2, &ext] {
        traffic::start_servers(&mut lab, n, n.ip.unwrap().into())?;
    }
    for n in [&a2, &ext] {
        traffic::wait_servers(n)?;
    }
    let t = |s: &Node| {
        Ok(Target {
            client: a1.clone(),
            server: s.ip.unwrap().into(),
        })
    };
    Ok(Setup {
        name: "raw",
        // same_agent is filled from cross_agent (one measurement, see the module doc).
        paths: vec![("cross_agent", t(&a2)), ("external", t(&ext))],
        prog_ids: vec![],
        agent_nodes: vec![],
        rtt: Rtt::Sockperf,
        _keep: Box::new(lab),
    })
}

fn kernel_setup() -> anyhow::Result<Setup> {
    let mut k = kernel::KernelCluster::up(2)?;
    let c1 = k.add_container(1)?;
    let c2 = k.add_container(1)?;
    let c3 = k.add_container(2)?;
    let ext = k.lab.external().clone();
    for n in [&c2, &c3, &ext] {
        traffic::start_servers(&mut k.lab, n, n.ip.unwrap().into())?;
    }
    for n in [&c2, &c3, &ext] {
        traffic::wait_servers(n)?;
    }
    for n in [&c2, &c3, &ext] {
        if !ping(&c1, n.ip.unwrap()) {
            bail!(
                "kernel datapath: {} cannot reach {}",
                c1.netns,
                n.ip.unwrap()
            );
        }
    }
    let t = |s: &Node| {
        Ok(Target {
            client: c1.clone(),
            server: s.ip.unwrap().into(),
        })
    };
    Ok(Setup {
        name: "kernel",
        paths: vec![
            ("same_agent", t(&c2)),
            ("cross_agent", t(&c3)),
            ("external", t(&ext)),
        ],
        prog_ids: vec![],
        agent_nodes: vec![],
        rtt: Rtt::Sockperf,
        _keep: Box::new(k),
    })
}

fn ping(from: &Node, to: Ipv4Addr) -> bool {
    (0..3).any(|_| from.ping(to))
}

fn ebpf_setup(name: &'static str, bin_dir: &Path, agent_args: &[String]) -> anyhow::Result<Setup> {
    let mut spec = ClusterSpec::new(2, bin_dir);
    spec.agent_args.extend(agent_args.iter().cloned());
    let mut c = Cluster::up(spec)?;
    let c1 = c.add_container("a1", "dcos")?.node;
    let c2 = c.add_container("a1", "dcos")?.node;
    let c3 = c.add_container("a2", "dcos")?.node;
    let ext = c.lab.external().clone();
    for n in [&c2, &c3, &ext] {
        traffic::start_servers(&mut c.lab, n, n.ip.unwrap().into())?;
    }
    for n in [&c2, &c3, &ext] {
        traffic::wait_servers(n)?;
    }
    for n in [&c2, &c3] {
        if !ping(&c1, n.ip.unwrap()) {
            bail!("ebpf-overlay: {} cannot reach {}", c1.netns, n.ip.unwrap());
        }
    }
    let ext_ip = ext.ip.unwrap();
    let external = if ping(&c1, ext_ip) {
        Ok(Target {
            client: c1.clone(),
            server: ext_ip.into(),
        })
    } else {
        Err(format!(
            "not available: container {} cannot reach the external host {ext_ip} (no masquerade in the eBPF datapath yet)",
            c1.ip.unwrap()
        ))
    };
    let t = |s: &Node| {
        Ok(Target {
            client: c1.clone(),
            server: s.ip.unwrap().into(),
        })
    };
    let instances: Vec<String> = ["a1", "a2"].iter().map(|a| c.lab.pin_instance(a)).collect();
    let agent_nodes = vec![c.lab.node("a1")?.clone(), c.lab.node("a2")?.clone()];
    Ok(Setup {
        name,
        prog_ids: bpfstats::lab_prog_ids(&instances)?,
        agent_nodes,
        paths: vec![
            ("same_agent", t(&c2)),
            ("cross_agent", t(&c3)),
            ("external", external),
        ],
        rtt: Rtt::Sockperf,
        _keep: Box::new(c),
    })
}

/// `raw6`: agent to agent over an IPv6-only fabric (the IPv6 underlay's physical limit).
fn raw6_setup() -> anyhow::Result<Setup> {
    let mut lab = Lab::up_on(
        LabSpec {
            agents: 2,
            id: None,
        },
        Fabric::Ipv6,
    )?;
    let a1 = lab.node("a1")?.clone();
    let a2 = lab.node("a2")?.clone();
    let server = lab.fabric_address("a2")?;
    traffic::start_servers(&mut lab, &a2, server)?;
    traffic::wait_servers_on(&a2, server)?;
    Ok(Setup {
        name: "raw6",
        paths: vec![(
            "cross_agent",
            Ok(Target {
                client: a1.clone(),
                server,
            }),
        )],
        prog_ids: vec![],
        agent_nodes: vec![a1, a2],
        rtt: Rtt::Unavailable,
        _keep: Box::new(lab),
    })
}

/// `ebpf6`: ebpf-overlay on an IPv6-only fabric (outer IPv6 VXLAN), IPv4 containers.
fn ebpf6_setup(name: &'static str, bin_dir: &Path, agent_args: &[String]) -> anyhow::Result<Setup> {
    let mut spec = ClusterSpec::new(2, bin_dir);
    spec.fabric = Fabric::Ipv6;
    spec.master_args = vec!["--ipv6-underlay".into()];
    spec.agent_args.extend(agent_args.iter().cloned());
    let mut c = Cluster::up(spec)?;
    let c1 = c.add_container("a1", "dcos")?.node;
    let c2 = c.add_container("a1", "dcos")?.node;
    let c3 = c.add_container("a2", "dcos")?.node;
    for n in [&c2, &c3] {
        traffic::start_servers(&mut c.lab, n, n.ip.unwrap().into())?;
    }
    for n in [&c2, &c3] {
        traffic::wait_servers(n)?;
        if !ping(&c1, n.ip.unwrap()) {
            bail!("{name}: {} cannot reach {}", c1.netns, n.ip.unwrap());
        }
    }
    let t = |s: &Node| {
        Ok(Target {
            client: c1.clone(),
            server: s.ip.unwrap().into(),
        })
    };
    let instances: Vec<String> = ["a1", "a2"].iter().map(|a| c.lab.pin_instance(a)).collect();
    Ok(Setup {
        name,
        prog_ids: bpfstats::lab_prog_ids(&instances)?,
        paths: vec![("same_agent", t(&c2)), ("cross_agent", t(&c3))],
        agent_nodes: vec![c.lab.node("a1")?.clone(), c.lab.node("a2")?.clone()],
        rtt: Rtt::Sockperf,
        _keep: Box::new(c),
    })
}

/// `raw_ipv6`: agent to agent by IPv6 over the same fabric bridge as the other inner-IPv6 rows
/// (an IPv4 lab, each agent's eth0 given its fabric IPv6 address too).
fn raw_ipv6_setup() -> anyhow::Result<Setup> {
    let mut lab = Lab::up(LabSpec {
        agents: 2,
        id: None,
    })?;
    let a1 = lab.node("a1")?.clone();
    let a2 = lab.node("a2")?.clone();
    let addr6 = |n: &Node| overlay_lab::fabric_ip6(n.ip.unwrap().octets()[3]);
    for n in [&a1, &a2] {
        let cidr = format!("{}/{}", addr6(n), overlay_lab::FABRIC6_PREFIX_LEN);
        n.exec("ip", &["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"])?;
    }
    let server = IpAddr::V6(addr6(&a2));
    traffic::start_servers(&mut lab, &a2, server)?;
    traffic::wait_servers_on(&a2, server)?;
    if !ping_ip(&a1, server) {
        bail!("raw_ipv6: {} cannot reach {server}", a1.netns);
    }
    Ok(Setup {
        name: "raw_ipv6",
        paths: vec![(
            "cross_agent",
            Ok(Target {
                client: a1.clone(),
                server,
            }),
        )],
        prog_ids: vec![],
        agent_nodes: vec![],
        rtt: Rtt::PingPong,
        _keep: Box::new(lab),
    })
}

/// `kernel_ipv6`: DC/OS's kernel datapath carrying `dcos6`, a Docker container on each agent.
fn kernel_ipv6_setup() -> anyhow::Result<Setup> {
    let mut k = kernel::KernelCluster::up_with_ipv6(2)?;
    let (c1, _) = k.add_container6(1)?;
    let (c3, c3_ip) = k.add_container6(2)?;
    let server = IpAddr::V6(c3_ip);
    traffic::start_servers(&mut k.lab, &c3, server)?;
    traffic::wait_servers_on(&c3, server)?;
    if !ping_ip(&c1, server) {
        bail!("kernel_ipv6: {} cannot reach {server}", c1.netns);
    }
    Ok(Setup {
        name: "kernel_ipv6",
        paths: vec![(
            "cross_agent",
            Ok(Target {
                client: c1.clone(),
                server,
            }),
        )],
        prog_ids: vec![],
        agent_nodes: vec![],
        rtt: Rtt::PingPong,
        _keep: Box::new(k),
    })
}

/// The bench's inner-IPv6 cluster: DC/OS's `dcos6` (fd01:b::/64, a /80 per agent) beside
/// `dcos`.
const DCOS6_CONFIG: &str = "\
vtep_subnet: 44.128.0.0/20
vtep_subnet6: fd01:a::/64
vtep_mac_oui: 70:B3:D5:00:00:00
overlays:
  - {name: dcos, subnet: 9.0.0.0/8, prefix: 24}
  - {name: dcos6, subnet6: 'fd01:b::/64', prefix6: 80}
";

/// `ebpf_ipv6`: ebpf-overlay's real agents and programs, a CNI container on `dcos6` on each
/// agent, addressed by the agents' IPAM as a runtime's container would be.
fn ebpf_ipv6_setup(bin_dir: &Path) -> anyhow::Result<Setup> {
    let mut spec = ClusterSpec::new(2, bin_dir);
    spec.config = DCOS6_CONFIG.into();
    let mut c = Cluster::up(spec)?;
    let (c1, _) = c.add_container_addrs("a1", "dcos6")?;
    let (c3, c3_addrs) = c.add_container_addrs("a2", "dcos6")?;
    let server = IpAddr::V6(
        c3_addrs
            .ip6
            .context("the plugin gave the dcos6 container on a2 no IPv6 address")?,
    );
    let instances: Vec<String> = ["a1", "a2"].iter().map(|a| c.lab.pin_instance(a)).collect();
    let agent_nodes = vec![c.lab.node("a1")?.clone(), c.lab.node("a2")?.clone()];
    let prog_ids = bpfstats::lab_prog_ids(&instances)?;
    let (c1, c3) = (c1.node, c3.node);
    traffic::start_servers(&mut c.lab, &c3, server)?;
    traffic::wait_servers_on(&c3, server)?;
    if !ping_ip(&c1, server) {
        bail!("ebpf_ipv6: {} cannot reach {server}", c1.netns);
    }
    Ok(Setup {
        name: "ebpf_ipv6",
        prog_ids,
        agent_nodes,
        paths: vec![("cross_agent", Ok(Target { client: c1, server }))],
        rtt: Rtt::PingPong,
        _keep: Box::new(c),
    })
}

fn ping_ip(from: &Node, to: IpAddr) -> bool {
    (0..3).any(|_| from.ping_ip(to))
}

fn data_plane(
    plan: &Plan,
    bin_dir: &Path,
    which: &[String],
    bpf_stats: bool,
    results: &mut Results,
) -> anyhow::Result<()> {
    println!("bench: building the {} labs", which.join(", "));
    let want = |d: &str| which.iter().any(|w| w == d);
    let mut setups = vec![];
    if want("raw") {
        setups.push(raw_setup().context("raw underlay lab")?);
    }
    if want("kernel") {
        setups.push(kernel_setup().context("DC/OS kernel datapath lab")?);
    }
    if want("ebpf") {
        setups.push(
            ebpf_setup("ebpf", bin_dir, &results.agent_args).context("ebpf-overlay cluster")?,
        );
    }
    // After ebpf: the lab set up and measured last of the two ran slower in one run, on every
    // path alike; with the other order the same lab position falls to the kernel's lookup.
    if want("ebpf_kernel_next_hop") {
        let mut args = results.agent_args.clone();
        args.extend(["--next-hop-cache".to_owned(), "false".to_owned()]);
        setups.push(
            ebpf_setup("ebpf_kernel_next_hop", bin_dir, &args)
                .context("ebpf-overlay cluster without the next-hop cache")?,
        );
    }
    if want("raw_ipv6") {
        setups.push(raw_ipv6_setup().context("raw IPv6 lab (agent to agent)")?);
    }
    if want("kernel_ipv6") {
        setups.push(kernel_ipv6_setup().context("DC/OS kernel datapath lab carrying IPv6")?);
    }
    if want("ebpf_ipv6") {
        setups.push(ebpf_ipv6_setup(bin_dir).context("ebpf-overlay cluster carrying IPv6")?);
    }
    if want("raw6") {
        setups.push(raw6_setup().context("raw IPv6 underlay lab")?);
    }
    if want("ebpf6") {
        setups.push(
            ebpf6_setup("ebpf6", bin_dir, &[])
                .context("ebpf-overlay cluster on an IPv6 underlay")?,
        );
    }
    if want("ebpf6_kernel_next_hop") {
        let args = ["--next-hop-cache".to_owned(), "false".to_owned()];
        setups.push(
            ebpf6_setup("ebpf6_kernel_next_hop", bin_dir, &args)
                .context("ebpf-overlay cluster on an IPv6 underlay without the next-hop cache")?,
        );
    }
    let mut samples: Vec<(&str, &str, Vec<PathSample>)> = vec![];
    let mut unavailable: Vec<(&str, &str, String)> = vec![];
    for s in &setups {
        for (path, t) in &s.paths {
            match t {
                Ok(_) => samples.push((s.name, path, vec![])),
                Err(why) => unavailable.push((s.name, path, why.clone())),
            }
        }
    }
    for run in 1..=plan.runs {
        for s in &setups {
            for (path, t) in &s.paths {
                let Ok(t) = t else { continue };
                let t0 = Instant::now();
                let track = bpf_stats && !s.prog_ids.is_empty();
                let before = if track {
                    Some(bpfstats::snapshot(&s.prog_ids)?)
                } else {
                    None
                };
                let m = traffic::measure(&t.client, t.server, plan.secs, plan.lat_secs, s.rtt)
                    .with_context(|| format!("{} {path}, run {run}", s.name))?;
                if let Some(before) = before {
                    let after = bpfstats::snapshot(&s.prog_ids)?;
                    for (prog, (cnt, ns)) in bpfstats::delta(&before, &after) {
                        let e = results
                            .bpf_programs
                            .entry((path.to_string(), prog))
                            .or_default();
                        e.0 += cnt;
                        e.1 += ns;
                    }
                }
                println!(
                    "bench: run {run} {:<11} {:<11} tcp1 {:6.2} Gbit/s  tcp4 {:6.2} Gbit/s  udp64 {:7.1} kpps  rtt {:6.1}/{:6.1} us  cpu {:.3} s/Gbit  {:7.0} conn/s  ({:.0} s)",
                    s.name,
                    path,
                    m.tcp1_gbps,
                    m.tcp4_gbps,
                    m.udp64_kpps,
                    m.lat_mean_us,
                    m.lat_p99_us,
                    m.cpu_s_per_gbit,
                    m.tcp_cps,
                    t0.elapsed().as_secs_f64()
                );
                samples
                    .iter_mut()
                    .find(|(d, p, _)| d == &s.name && p == path)
                    .unwrap()
                    .2
                    .push(m);
            }
        }
    }
    // raw: one agent-to-agent measurement stands for both container rows.
    for raw in ["raw", "raw6"] {
        if let Some((_, _, v)) = samples
            .iter()
            .find(|(d, p, _)| *d == raw && *p == "cross_agent")
        {
            let v = v.clone();
            samples.push((raw, "same_agent", v));
        }
    }
    let rtt_of = |d: &str| setups.iter().find(|s| s.name == d).map(|s| s.rtt);
    for (datapath, path, v) in &samples {
        for (metric, f) in report::METRICS {
            if rtt_of(datapath) == Some(Rtt::Unavailable) && metric.starts_with("lat_") {
                let why = "sockperf 3.7 (Debian 12) has no IPv6";
                results
                    .figures
                    .push(Figure::unavailable(metric, path, datapath, why));
                continue;
            }
            results.figures.push(Figure::measured(
                metric,
                path,
                datapath,
                v.iter().map(|s| f(s)).collect(),
            ));
        }
    }
    for (datapath, path, why) in &unavailable {
        for (metric, _) in report::METRICS {
            results
                .figures
                .push(Figure::unavailable(metric, path, datapath, why));
        }
    }
    drop(setups);
    Ok(())
}

fn control_plane(plan: &Plan, bin_dir: &Path, results: &mut Results) -> anyhow::Result<()> {
    for &n in &plan.join_sizes {
        println!("bench: control plane, {n} agents, {} join(s)", plan.runs);
        let joins = control::joins(bin_dir, n, plan.runs)
            .with_context(|| format!("control plane with {n} agents"))?;
        println!(
            "bench:   registration request -> routed by all: {:?} ms; real joins: {:?}",
            joins.simulated_ms, joins.real
        );
        results.joins.push(joins);
    }
    println!(
        "bench: control plane, {} simulated agents",
        plan.fake_agents
    );
    let s = control::scale(bin_dir, plan.fake_agents, plan.runs)
        .with_context(|| format!("{} simulated agents", plan.fake_agents))?;
    println!(
        "bench:   registered in {:.0} ms, all routed {:.0} ms after the first; one more: {:?} ms; real join: {:?}",
        s.register_ms, s.all_routed_ms, s.one_more_ms, s.real_join
    );
    results.scale = Some(s);
    Ok(())
}
