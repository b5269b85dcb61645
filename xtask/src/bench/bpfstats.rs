//! Per-program run time of ebpf-overlay's programs (`--bpf-stats`): `kernel.bpf_stats_enabled`
//! on for the run, and `bpftool prog show` deltas of run_cnt / run_time_ns around each measured
//! path, for the programs attached by the lab's agents only (found through their pinned links).

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use overlay_common::maps::MAP_LAYOUT_VERSION;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns statistics on; restores the previous setting when dropped.
pub struct StatsGuard {
    previous: String,
}

impl StatsGuard {
    pub fn enable() -> anyhow::Result<StatsGuard> {
        let previous = std::fs::read_to_string(SYSCTL)
            .context("reading kernel.bpf_stats_enabled")?
            .trim()
            .to_owned();
        std::fs::write(SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(StatsGuard { previous })
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.previous);
    }
}

/// Ids of the programs attached through the pinned links of these agent instances.
pub fn lab_prog_ids(instances: &[String]) -> Vec<u32> {
    let mut ids = vec![];
    for inst in instances {
        let dir = Path::new(overlay_lab::BPFFS)
            .join("ebpf-overlay")
            .join(format!("v{MAP_LAYOUT_VERSION}"))
            .join(inst)
            .join("links");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(out) = overlay_lab::run(
                "bpftool",
                &["-j", "link", "show", "pinned", p.to_str().unwrap_or("")],
            ) else {
                continue;
            };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&out)
                && let Some(id) = v["prog_id"].as_u64()
            {
                ids.push(id as u32);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// (name, run_cnt, run_time_ns) of each program id.
pub type Snapshot = BTreeMap<u32, (String, u64, u64)>;

pub fn snapshot(ids: &[u32]) -> anyhow::Result<Snapshot> {
    let out = overlay_lab::run("bpftool", &["-j", "prog", "show"])?;
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).context("bpftool prog show JSON")?;
    Ok(v.iter()
        .filter_map(|p| {
            let id = p["id"].as_u64()? as u32;
            ids.contains(&id).then(|| {
                (
                    id,
                    (
                        p["name"].as_str().unwrap_or("?").to_owned(),
                        p["run_cnt"].as_u64().unwrap_or(0),
                        p["run_time_ns"].as_u64().unwrap_or(0),
                    ),
                )
            })
        })
        .collect())
}

/// Runs and nanoseconds per program name between two snapshots (all agents summed).
pub fn delta(before: &Snapshot, after: &Snapshot) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (id, (name, cnt, ns)) in after {
        let (c0, n0) = before.get(id).map(|b| (b.1, b.2)).unwrap_or((0, 0));
        let e = out.entry(name.clone()).or_default();
        e.0 += cnt.saturating_sub(c0);
        e.1 += ns.saturating_sub(n0);
    }
    out
}
