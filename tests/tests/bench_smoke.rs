//! `cargo xtask bench --quick` runs end to end and its JSON has every figure with sane values,
//! the inner-IPv6 rows (and their ratios) and the micro-benchmark table's included.
//!
//! Uses the debug binaries that `cargo xtask test` builds (`--bin-dir`), writes into a temporary
//! directory (`--out`), and runs the quick mode: one run, 2 s per test, small agent counts.

use std::process::Command;

use overlay_tests::bin_path;

const METRICS: [&str; 7] = [
    "tcp1_gbps",
    "tcp4_gbps",
    "udp64_kpps",
    "lat_mean_us",
    "lat_p99_us",
    "cpu_s_per_gbit",
    "tcp_cps",
];
const PATHS: [&str; 3] = ["same_agent", "cross_agent", "external"];
const DATAPATHS: [&str; 3] = ["raw", "kernel", "ebpf"];
/// Inner IPv6 across agents: raw IPv6, DC/OS's kernel datapath carrying dcos6, ebpf-overlay.
const DATAPATHS_IPV6: [&str; 3] = ["raw_ipv6", "kernel_ipv6", "ebpf_ipv6"];

/// Whether a figure's median is in a plausible range for its metric.
fn sane(metric: &str, median: f64) -> bool {
    median.is_finite()
        && median > 0.0
        && match metric {
            "tcp1_gbps" | "tcp4_gbps" => median < 1000.0,
            "udp64_kpps" => median < 100_000.0,
            "lat_mean_us" | "lat_p99_us" => median < 1_000_000.0,
            "tcp_cps" => median < 10_000_000.0,
            _ => median < 100.0,
        }
}

#[test]
fn quick_bench_reports_every_figure() {
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let out = tempfile::tempdir().unwrap();
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = std::time::Instant::now();
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "run",
            "-q",
            "-p",
            "xtask",
            "--",
            "bench",
            "--quick",
            "--bin-dir",
        ])
        .arg(&bin_dir)
        .arg("--out")
        .arg(out.path())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cargo xtask bench --quick failed: {status}"
    );
    eprintln!("quick bench took {:?}", started.elapsed());

    let text = std::fs::read_to_string(out.path().join("latest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let figures = v["figures"].as_array().unwrap();
    for metric in METRICS {
        for path in PATHS {
            for dp in DATAPATHS {
                let f = figures
                    .iter()
                    .find(|f| f["metric"] == metric && f["path"] == path && f["datapath"] == dp)
                    .unwrap_or_else(|| panic!("no figure {metric} {path} {dp}"));
                if f["available"] == false {
                    // Only the eBPF masquerade row may be missing, and it must say why.
                    assert_eq!((dp, path), ("ebpf", "external"), "{f}");
                    assert!(f["reason"].as_str().unwrap().contains("not available"));
                    continue;
                }
                let median = f["median"].as_f64().unwrap();
                assert!(
                    sane(metric, median),
                    "{metric} {path} {dp}: implausible {median}"
                );
            }
        }
    }
    // The inner-IPv6 rows: across agents, every figure measured (RTT by the ping-pong).
    for metric in METRICS {
        for dp in DATAPATHS_IPV6 {
            let f = figures
                .iter()
                .find(|f| {
                    f["metric"] == metric && f["path"] == "cross_agent" && f["datapath"] == dp
                })
                .unwrap_or_else(|| panic!("no figure {metric} cross_agent {dp}"));
            assert_eq!(f["available"], true, "{f}");
            let median = f["median"].as_f64().unwrap();
            assert!(sane(metric, median), "{metric} {dp}: implausible {median}");
        }
    }
    let ratios = v["ratios_inner_ipv6"].as_array().unwrap();
    assert_eq!(ratios.len(), METRICS.len());
    assert!(
        ratios
            .iter()
            .all(|r| r["ebpf_over_raw"].as_f64().is_some()
                && r["ebpf_over_kernel"].as_f64().is_some()),
        "{ratios:?}"
    );
    let cp = &v["control_plane"];
    let joins = cp["joins"].as_array().unwrap();
    assert!(!joins.is_empty());
    for j in joins {
        let ms = j["registration_request_ms"]["median"].as_f64().unwrap();
        assert!((0.0..30_000.0).contains(&ms), "join: {j}");
    }
    let scale = &cp["scale"];
    assert!(scale["simulated_agents"].as_u64().unwrap() >= 100);
    assert!(scale["all_routed_ms"].as_f64().unwrap() > 0.0);
    assert!(scale["one_more_ms"]["median"].as_f64().unwrap() >= 0.0);
    assert!(
        scale["real_join_from_register_ms"]["median"]
            .as_f64()
            .unwrap()
            >= 0.0
    );
    assert!(out.path().join("latest.md").exists());

    // The micro-benchmark table: every path measured, with the verdict it was checked against.
    let rows = v["micro"]["current"]["rows"].as_array().unwrap();
    let paths: Vec<_> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    for want in [
        "local delivery",
        "encap",
        "decap",
        "masquerade egress",
        "reply translation",
        "ARP reply",
        "NDP reply",
        "drop (cross network)",
    ] {
        assert!(
            paths.contains(&want),
            "no micro-benchmark row {want}: {paths:?}"
        );
    }
    for r in rows {
        let ns = r["median_ns"].as_f64().unwrap();
        assert!(ns > 0.0 && ns < 1_000_000.0, "implausible micro figure {r}");
        let verdict = r["verdict"].as_str().unwrap();
        assert!(
            verdict == "TC_ACT_REDIRECT" || verdict == "TC_ACT_SHOT",
            "{r}"
        );
    }
}
