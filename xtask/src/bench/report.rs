//! The benchmark's outputs: markdown table with ratios and targets, JSON for tracking, chart.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::json;

use super::{
    DATAPATHS, PATHS,
    control::{JoinSample, JoinSet, ScaleResult},
    traffic::PathSample,
};

type Getter = fn(&PathSample) -> f64;

/// (name, getter) of every data-plane figure.
pub const METRICS: [(&str, Getter); 7] = [
    ("tcp1_gbps", |s| s.tcp1_gbps),
    ("tcp4_gbps", |s| s.tcp4_gbps),
    ("udp64_kpps", |s| s.udp64_kpps),
    ("lat_mean_us", |s| s.lat_mean_us),
    ("lat_p99_us", |s| s.lat_p99_us),
    ("cpu_s_per_gbit", |s| s.cpu_s_per_gbit),
    ("tcp_cps", |s| s.tcp_cps),
];

fn label(metric: &str) -> &'static str {
    match metric {
        "tcp1_gbps" => "TCP 1 stream (Gbit/s)",
        "tcp4_gbps" => "TCP 4 streams (Gbit/s)",
        "udp64_kpps" => "UDP 64 B received (kpps)",
        "lat_mean_us" => "TCP RTT mean (us)",
        "lat_p99_us" => "TCP RTT p99 (us)",
        "cpu_s_per_gbit" => "CPU s per Gbit (1 stream)",
        "tcp_cps" => "TCP connections/s",
        _ => "?",
    }
}

fn unit(metric: &str) -> &'static str {
    match metric {
        "tcp1_gbps" | "tcp4_gbps" => "Gbit/s",
        "udp64_kpps" => "kpps",
        "lat_mean_us" | "lat_p99_us" => "us",
        "cpu_s_per_gbit" => "cpu-s/Gbit",
        _ => "",
    }
}

/// Lower is better for these.
fn lower_is_better(metric: &str) -> bool {
    matches!(metric, "lat_mean_us" | "lat_p99_us" | "cpu_s_per_gbit")
}

#[derive(Clone, Debug)]
pub struct Figure {
    pub metric: String,
    pub path: String,
    pub datapath: String,
    pub runs: Vec<f64>,
    /// Why there is no value (None: measured).
    pub unavailable: Option<String>,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}
fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

impl Figure {
    pub fn measured(metric: &str, path: &str, datapath: &str, runs: Vec<f64>) -> Figure {
        Figure {
            metric: metric.into(),
            path: path.into(),
            datapath: datapath.into(),
            runs,
            unavailable: None,
        }
    }

    pub fn unavailable(metric: &str, path: &str, datapath: &str, why: &str) -> Figure {
        Figure {
            metric: metric.into(),
            path: path.into(),
            datapath: datapath.into(),
            runs: vec![],
            unavailable: Some(why.into()),
        }
    }

    fn median(&self) -> Option<f64> {
        (self.unavailable.is_none() && !self.runs.is_empty()).then(|| median(&self.runs))
    }
}

pub struct Results {
    pub mode: String,
    pub runs: usize,
    pub secs: u32,
    pub load_before: String,
    pub load_after: String,
    pub elapsed_s: f64,
    pub figures: Vec<Figure>,
    pub joins: Vec<JoinSet>,
    pub scale: Option<ScaleResult>,
    /// `kernel.bpf_stats_enabled` during the data-plane figures.
    pub bpf_stats_enabled: bool,
    /// (path, program) -> (runs, run time ns), ebpf-overlay's programs over all tests of a path
    /// (`--bpf-stats`).
    pub bpf_programs: std::collections::BTreeMap<(String, String), (u64, u64)>,
    /// The micro-benchmark table (per-packet program cost by test run).
    pub micro: Option<super::micro::MicroResults>,
    /// Extra arguments the ebpf-overlay agents ran with (`--agent-arg`): a lever, not the
    /// defaults.
    pub agent_args: Vec<String>,
}

impl Results {
    pub fn new(mode: &str, runs: usize, secs: u32) -> Results {
        Results {
            mode: mode.into(),
            runs,
            secs,
            load_before: String::new(),
            load_after: String::new(),
            elapsed_s: 0.0,
            figures: vec![],
            joins: vec![],
            scale: None,
            bpf_stats_enabled: false,
            bpf_programs: Default::default(),
            micro: None,
            agent_args: vec![],
        }
    }

    fn get(&self, metric: &str, path: &str, datapath: &str) -> Option<&Figure> {
        self.figures
            .iter()
            .find(|f| f.metric == metric && f.path == path && f.datapath == datapath)
    }

    fn ratio(&self, metric: &str, path: &str, over: &str) -> Option<f64> {
        let e = self.get(metric, path, "ebpf")?.median()?;
        let o = self.get(metric, path, over)?.median()?;
        (o > 0.0).then(|| e / o)
    }
}

pub fn spread(v: &[f64]) -> String {
    fn f(x: f64) -> String {
        if x.abs() >= 100.0 {
            format!("{x:.0}")
        } else if x.abs() >= 10.0 {
            format!("{x:.1}")
        } else if x.abs() >= 1.0 {
            format!("{x:.2}")
        } else {
            format!("{x:.3}")
        }
    }
    if v.len() > 1 {
        format!("{} ({}–{})", f(median(v)), f(min(v)), f(max(v)))
    } else if v.len() == 1 {
        f(v[0])
    } else {
        "–".into()
    }
}

fn cell(f: Option<&Figure>) -> String {
    match f {
        None => "–".into(),
        Some(f) if f.unavailable.is_some() => "not available".into(),
        Some(f) => spread(&f.runs),
    }
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "–".into())
}

fn join_times(joins: &[JoinSample]) -> Vec<f64> {
    joins.iter().map(|j| j.from_register_ms).collect()
}

/// Whether the run measured any of the main table's datapaths (raw, kernel, ebpf).
fn has_main_rows(r: &Results) -> bool {
    r.figures
        .iter()
        .any(|f| DATAPATHS.contains(&f.datapath.as_str()))
}

/// Target checks: (description, measured, met).
fn targets(r: &Results) -> Vec<(String, String, Option<bool>)> {
    let mut out = vec![];
    let mut check = |what: String, ratio: Option<f64>, ok: &dyn Fn(f64) -> bool| {
        out.push((what, ratio_cell(ratio), ratio.map(|x| ok(x))));
    };
    for path in PATHS.iter().filter(|_| has_main_rows(r)) {
        for metric in ["tcp1_gbps", "tcp4_gbps"] {
            check(
                format!("{metric} {path}: ≥0.95x raw"),
                r.ratio(metric, path, "raw"),
                &|x| x >= 0.95,
            );
            check(
                format!("{metric} {path}: ≥1.3x kernel"),
                r.ratio(metric, path, "kernel"),
                &|x| x >= 1.3,
            );
        }
        for metric in ["lat_mean_us", "lat_p99_us"] {
            check(
                format!("{metric} {path}: ≤1.2x raw"),
                r.ratio(metric, path, "raw"),
                &|x| x <= 1.2,
            );
            check(
                format!("{metric} {path}: ≤0.5x kernel"),
                r.ratio(metric, path, "kernel"),
                &|x| x <= 0.5,
            );
        }
        check(
            format!("cpu_s_per_gbit {path}: ≤0.8x kernel"),
            r.ratio("cpu_s_per_gbit", path, "kernel"),
            &|x| x <= 0.8,
        );
    }
    if let Some(s) = &r.scale {
        // The registration request of one more agent until every other agent routes to it
        // (a real agent's start-up, BPF loading included, is reported separately).
        let worst = s.one_more_ms.iter().copied().fold(f64::NAN, f64::max);
        out.push((
            format!(
                "new agent routed by all others within 1 s at {} agents",
                s.fake_agents
            ),
            if worst.is_nan() {
                "–".into()
            } else {
                format!("{worst:.0} ms (worst)")
            },
            (!worst.is_nan()).then(|| worst < 1000.0),
        ));
    }
    out
}

/// The IPv6 underlay's table (`--datapaths ...,raw6,ebpf6`): ebpf-overlay with outer IPv6 VXLAN
/// against agent-to-agent IPv6 on the same fabric, measured in the same run.
fn ipv6_underlay_table(r: &Results, s: &mut String) {
    if !r
        .figures
        .iter()
        .any(|f| f.datapath == "raw6" || f.datapath == "ebpf6")
    {
        return;
    }
    let _ = writeln!(
        s,
        "\n| figure (IPv6 underlay) | path | raw IPv6 | ebpf-overlay over IPv6 | ebpf6/raw6 |\n|---|---|---|---|---|"
    );
    for (metric, _) in METRICS {
        for path in ["same_agent", "cross_agent"] {
            let ratio = r
                .get(metric, path, "ebpf6")
                .and_then(Figure::median)
                .zip(r.get(metric, path, "raw6").and_then(Figure::median))
                .and_then(|(e, o)| (o > 0.0).then(|| e / o));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                label(metric),
                path.replace('_', " "),
                cell(r.get(metric, path, "raw6")),
                cell(r.get(metric, path, "ebpf6")),
                ratio_cell(ratio)
            );
        }
    }
    let _ = writeln!(
        s,
        "\nraw6: agent to agent over the IPv6-only fabric (stands for both rows); ebpf6: \
         containers on the IPv4 `dcos` network of agents with an IPv6 underlay (outer \
         IPv6/UDP/VXLAN, 70 bytes of headers)."
    );
}

/// The next-hop lever's tables (`--datapaths ...,ebpf_kernel_next_hop,ebpf`, and over the IPv6
/// underlay `...,ebpf6_kernel_next_hop,ebpf6`): ebpf-overlay with the agents' next-hop cache (the
/// default) against the same agents with `--next-hop-cache false` (every encapsulated packet's
/// next hop looked up by the kernel), in the same run.
fn next_hop_table(r: &Results, s: &mut String) {
    // (raw, kernel's lookup, cached, the paths, which of them is the control, the title)
    let tables = [
        (
            "raw",
            "ebpf_kernel_next_hop",
            "ebpf",
            ["cross_agent", "external"],
            "external: masqueraded, not encapsulated",
            "next hop",
        ),
        (
            "raw6",
            "ebpf6_kernel_next_hop",
            "ebpf6",
            ["cross_agent", "same_agent"],
            "same agent: delivered on the agent, not encapsulated",
            "next hop, IPv6 underlay",
        ),
    ];
    for (raw, off, on, paths, control, title) in tables {
        if !r.figures.iter().any(|f| f.datapath == off) {
            continue;
        }
        let _ = writeln!(
            s,
            "\n| figure ({title}) | path | {raw} | {on}, kernel's lookup | {on}, cached | cached/kernel's | cached/{raw} |\n|---|---|---|---|---|---|---|"
        );
        for (metric, _) in METRICS {
            for path in paths {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    label(metric),
                    path.replace('_', " "),
                    cell(r.get(metric, path, raw)),
                    cell(r.get(metric, path, off)),
                    cell(r.get(metric, path, on)),
                    ratio_cell(ratio_of(r, metric, path, on, off)),
                    ratio_cell(ratio_of(r, metric, path, on, raw)),
                );
            }
        }
        let _ = writeln!(
            s,
            "\n{on}, kernel's lookup: the agents run with --next-hop-cache false \
             (bpf_redirect_neigh for every encapsulated packet); {on}, cached: the default (the \
             agent's mirror of the neighbour entry, a plain bpf_redirect). The control row \
             ({control}) does not use the cache."
        );
    }
}

/// The ratio of two datapaths' medians of one figure.
fn ratio_of(r: &Results, metric: &str, path: &str, num: &str, den: &str) -> Option<f64> {
    let n = r.get(metric, path, num)?.median()?;
    let d = r.get(metric, path, den)?.median()?;
    (d > 0.0).then(|| n / d)
}

/// Inner IPv6 across agents over the IPv4 underlay: raw IPv6 between the agents, DC/OS's
/// kernel datapath carrying `dcos6`, ebpf-overlay carrying IPv6, measured in the same run.
fn inner_ipv6_table(r: &Results, s: &mut String) {
    const DPS: [&str; 3] = ["raw_ipv6", "kernel_ipv6", "ebpf_ipv6"];
    if !r.figures.iter().any(|f| DPS.contains(&f.datapath.as_str())) {
        return;
    }
    let _ = writeln!(
        s,
        "\n| figure (inner IPv6, cross agent) | raw IPv6 | kernel (DC/OS, dcos6) | ebpf-overlay | ebpf/raw | ebpf/kernel |\n|---|---|---|---|---|---|"
    );
    for (metric, _) in METRICS {
        let path = "cross_agent";
        let label = match metric {
            "lat_mean_us" => "TCP RTT mean (us, xtask ping-pong)",
            "lat_p99_us" => "TCP RTT p99 (us, xtask ping-pong)",
            m => label(m),
        };
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {} | {} |",
            cell(r.get(metric, path, "raw_ipv6")),
            cell(r.get(metric, path, "kernel_ipv6")),
            cell(r.get(metric, path, "ebpf_ipv6")),
            ratio_cell(ratio_of(r, metric, path, "ebpf_ipv6", "raw_ipv6")),
            ratio_cell(ratio_of(r, metric, path, "ebpf_ipv6", "kernel_ipv6")),
        );
    }
    let _ = writeln!(
        s,
        "\nInner IPv6 over the IPv4 underlay. raw IPv6: agent namespace to agent namespace over \
         the fabric bridge. kernel: DC/OS's `dcos6` (Docker containers on `d-dcos6`, \
         `vtep1024` with `vtep_ip6`, neighbour entry and route per peer). ebpf-overlay: the real \
         agents and programs, CNI containers on `dcos6` addressed by the agents' IPAM. RTT: the xtask's TCP ping-pong \
         (14-byte messages; sockperf 3.7 has no IPv6), not comparable with sockperf's figures."
    );
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Mode `{}`: {} run(s) per figure, {} s per iperf3 test; median (min–max). Load average \
         before/after: {} / {}; {:.0} s in all; kernel.bpf_stats_enabled {}.\n",
        r.mode,
        r.runs,
        r.secs,
        r.load_before,
        r.load_after,
        r.elapsed_s,
        u8::from(r.bpf_stats_enabled)
    );
    if !r.agent_args.is_empty() {
        let _ = writeln!(
            s,
            "ebpf-overlay's agents ran with `{}` (not the defaults).\n",
            r.agent_args.join(" ")
        );
    }
    if has_main_rows(r) {
        let _ = writeln!(
            s,
            "| figure | path | raw | kernel (DC/OS) | ebpf-overlay | ebpf/raw | ebpf/kernel |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for (metric, _) in METRICS {
            for path in PATHS {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    label(metric),
                    path.replace('_', " "),
                    cell(r.get(metric, path, "raw")),
                    cell(r.get(metric, path, "kernel")),
                    cell(r.get(metric, path, "ebpf")),
                    ratio_cell(r.ratio(metric, path, "raw")),
                    ratio_cell(r.ratio(metric, path, "kernel")),
                );
            }
        }
        let _ = writeln!(
            s,
            "\nraw: agent namespace to agent namespace over the fabric bridge (the same \
             measurement stands for both container rows); external: to the external host, \
             through masquerade on the overlays. RTT is sockperf TCP ping-pong round trip. CPU is \
             all CPUs' busy time from /proc/stat during the 1-stream test (both ends and the \
             datapath) per Gbit moved. Lower is better for RTT and CPU."
        );
        for f in &r.figures {
            if let (Some(why), "tcp1_gbps") = (&f.unavailable, f.metric.as_str()) {
                let _ = writeln!(s, "\n{} {}: {why}", f.datapath, f.path);
            }
        }
    }
    inner_ipv6_table(r, &mut s);
    ipv6_underlay_table(r, &mut s);
    next_hop_table(r, &mut s);
    if !r.joins.is_empty() || r.scale.is_some() {
        let _ = writeln!(
            s,
            "\n| control plane (ebpf-overlay) | ms, median (min–max) |\n|---|---|"
        );
        for j in &r.joins {
            let n = j.agents;
            let _ = writeln!(
                s,
                "| agent joins {n} agents: registration request → every other agent's maps route to it | {} |",
                spread(&j.simulated_ms)
            );
            let _ = writeln!(
                s,
                "| real agent joins {n} agents: master commit seen → routed by all (lower bound) | {} |",
                spread(&join_times(&j.real))
            );
            let _ = writeln!(
                s,
                "| real agent joins {n} agents: process start → routed by all (upper bound) | {} |",
                spread(&j.real.iter().map(|x| x.from_spawn_ms).collect::<Vec<_>>())
            );
        }
        if let Some(sc) = &r.scale {
            let n = sc.fake_agents;
            let _ = writeln!(
                s,
                "| {n} simulated agents: all registrations answered | {:.0} |",
                sc.register_ms
            );
            let _ = writeln!(
                s,
                "| {n} simulated agents: first registration → real agents' maps hold all {n} routes | {:.0} |",
                sc.all_routed_ms
            );
            let _ = writeln!(
                s,
                "| one more simulated agent at {n}: registration request → routed by all | {} |",
                spread(&sc.one_more_ms)
            );
            let _ = writeln!(
                s,
                "| real agent joins at {n}+: master commit seen → routed by all (lower bound) | {} |",
                spread(&join_times(&sc.real_join))
            );
            let _ = writeln!(
                s,
                "| real agent joins at {n}+: process start → routed by all (upper bound) | {} |",
                spread(
                    &sc.real_join
                        .iter()
                        .map(|j| j.from_spawn_ms)
                        .collect::<Vec<_>>()
                )
            );
        }
    }
    if let Some(m) = &r.micro {
        s.push_str(&super::micro::markdown(m));
    }
    if !r.bpf_programs.is_empty() {
        let _ = writeln!(
            s,
            "\n| ebpf-overlay program (run_cnt / run_time_ns, bpf_stats) | path | runs | avg ns/run | total ms |\n|---|---|---|---|---|"
        );
        for ((path, prog), (cnt, ns)) in &r.bpf_programs {
            let _ = writeln!(
                s,
                "| {prog} | {} | {cnt} | {:.0} | {:.1} |",
                path.replace('_', " "),
                *ns as f64 / (*cnt).max(1) as f64,
                *ns as f64 / 1e6
            );
        }
    }
    let t = targets(r);
    if !t.is_empty() {
        let _ = writeln!(s, "\n| target | measured | met |\n|---|---|---|");
        for (what, measured, met) in t {
            let met = match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            };
            let _ = writeln!(s, "| {what} | {measured} | {met} |");
        }
    }
    s
}

fn summary(v: &[f64]) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    json!({"runs": v, "median": median(v), "min": min(v), "max": max(v)})
}

pub fn to_json(r: &Results, timestamp: &str) -> serde_json::Value {
    let figures: Vec<_> = r
        .figures
        .iter()
        .map(|f| {
            let mut v = json!({
                "metric": f.metric,
                "path": f.path,
                "datapath": f.datapath,
                "unit": unit(&f.metric),
                "lower_is_better": lower_is_better(&f.metric),
                "available": f.unavailable.is_none(),
            });
            match &f.unavailable {
                Some(why) => v["reason"] = json!(why),
                None => {
                    v["runs"] = json!(f.runs);
                    v["median"] = json!(median(&f.runs));
                    v["min"] = json!(min(&f.runs));
                    v["max"] = json!(max(&f.runs));
                }
            }
            v
        })
        .collect();
    let ratios: Vec<_> = METRICS
        .iter()
        .flat_map(|(m, _)| PATHS.iter().map(move |p| (*m, *p)))
        .map(|(m, p)| {
            json!({"metric": m, "path": p,
                   "ebpf_over_raw": r.ratio(m, p, "raw"),
                   "ebpf_over_kernel": r.ratio(m, p, "kernel")})
        })
        .collect();
    let ratios_ipv6: Vec<_> = METRICS
        .iter()
        .map(|(m, _)| {
            json!({"metric": m, "path": "cross_agent",
                   "ebpf_over_raw": ratio_of(r, m, "cross_agent", "ebpf_ipv6", "raw_ipv6"),
                   "ebpf_over_kernel": ratio_of(r, m, "cross_agent", "ebpf_ipv6", "kernel_ipv6")})
        })
        .collect();
    let joins: Vec<_> = r
        .joins
        .iter()
        .map(|j| {
            json!({"agents": j.agents,
                   "registration_request_ms": summary(&j.simulated_ms),
                   "real_from_register_ms": summary(&join_times(&j.real)),
                   "real_from_spawn_ms": summary(&j.real.iter().map(|x| x.from_spawn_ms).collect::<Vec<_>>())})
        })
        .collect();
    let scale = r.scale.as_ref().map(|s| {
        json!({
            "simulated_agents": s.fake_agents,
            "register_all_ms": s.register_ms,
            "all_routed_ms": s.all_routed_ms,
            "one_more_ms": summary(&s.one_more_ms),
            "real_join_from_register_ms": summary(&join_times(&s.real_join)),
            "real_join_from_spawn_ms": summary(&s.real_join.iter().map(|x| x.from_spawn_ms).collect::<Vec<_>>()),
        })
    });
    let targets: Vec<_> = targets(r)
        .into_iter()
        .map(|(what, measured, met)| json!({"target": what, "measured": measured, "met": met}))
        .collect();
    json!({
        "timestamp": timestamp,
        "mode": r.mode,
        "runs": r.runs,
        "secs_per_test": r.secs,
        "load_before": r.load_before,
        "load_after": r.load_after,
        "elapsed_s": r.elapsed_s,
        "agent_args": r.agent_args,
        "datapaths": DATAPATHS,
        "paths": PATHS,
        "figures": figures,
        "ratios": ratios,
        "ratios_inner_ipv6": ratios_ipv6,
        "control_plane": {"joins": joins, "scale": scale},
        "targets": targets,
        "micro": r.micro.as_ref().map(super::micro::to_json),
        "bpf_stats_enabled": r.bpf_stats_enabled,
        "bpf_programs": r.bpf_programs.iter().map(|((path, prog), (cnt, ns))| json!({
            "path": path, "program": prog, "runs": cnt, "run_time_ns": ns,
            "avg_ns": *ns as f64 / (*cnt).max(1) as f64,
        })).collect::<Vec<_>>(),
    })
}

const CHART_PY: &str = r##"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.load(open(sys.argv[1]))
metrics = [("tcp1_gbps", "TCP 1 stream, Gbit/s"), ("tcp4_gbps", "TCP 4 streams, Gbit/s"),
           ("udp64_kpps", "UDP 64 B, kpps received"), ("lat_mean_us", "TCP RTT mean, us"),
           ("lat_p99_us", "TCP RTT p99, us"), ("cpu_s_per_gbit", "CPU s per Gbit")]
paths = data["paths"]
dps = data["datapaths"]
colors = {"raw": "#999999", "kernel": "#d95f02", "ebpf": "#1b9e77"}
fig, axes = plt.subplots(2, 3, figsize=(15, 8))
for ax, (m, title) in zip(axes.flat, metrics):
    w = 0.26
    for i, dp in enumerate(dps):
        xs, ys, lo, hi = [], [], [], []
        for j, p in enumerate(paths):
            f = [f for f in data["figures"] if f["metric"] == m and f["path"] == p and f["datapath"] == dp]
            if f and f[0]["available"]:
                f = f[0]
                xs.append(j + (i - 1) * w); ys.append(f["median"])
                lo.append(f["median"] - f["min"]); hi.append(f["max"] - f["median"])
        ax.bar(xs, ys, w, yerr=[lo, hi], label=dp, color=colors.get(dp), capsize=3)
    ax.set_xticks(range(len(paths)))
    ax.set_xticklabels([p.replace("_", " ") for p in paths])
    ax.set_title(title)
axes.flat[0].legend()
fig.suptitle("ebpf-overlay bench %s (%s mode, %d runs, load %s)" % (data["timestamp"], data["mode"], data["runs"], data["load_before"]))
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=90)
"##;

/// Writes `<timestamp>.json`, `latest.md`, `latest.json` and `<timestamp>.png` (if matplotlib
/// is there) under `dir`.
pub fn write(r: &Results, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let ts = overlay_lab::run("date", &["-u", "+%Y%m%dT%H%M%SZ"])?
        .trim()
        .to_owned();
    let mut written = vec![];
    let v = to_json(r, &ts);
    let text = serde_json::to_string_pretty(&v)?;
    let json_path = dir.join(format!("{ts}.json"));
    std::fs::write(&json_path, &text)?;
    std::fs::write(dir.join("latest.json"), &text)?;
    written.push(json_path.clone());
    let md = dir.join("latest.md");
    std::fs::write(&md, format!("# ebpf-overlay bench {ts}\n\n{}", markdown(r)))?;
    written.push(md);
    if !r.figures.is_empty() {
        let png = dir.join(format!("{ts}.png"));
        let script = dir.join(".chart.py");
        std::fs::write(&script, CHART_PY)?;
        let res = overlay_lab::run(
            "/usr/bin/python3",
            &[
                script.to_str().unwrap(),
                json_path.to_str().unwrap(),
                png.to_str().unwrap(),
            ],
        )
        .context("drawing the chart (python3-matplotlib)");
        let _ = std::fs::remove_file(&script);
        match res {
            Ok(_) => {
                let _ = std::fs::copy(&png, dir.join("latest.png"));
                written.push(png);
            }
            Err(e) => eprintln!("bench: no chart: {e:#}"),
        }
    }
    Ok(written)
}
