//! Per-program run time of ebpf-overlay's programs (`--bpf-stats`): the kernel's run-time
//! accounting on for the run (`BPF_ENABLE_STATS`), and deltas of run_cnt / run_time_ns around
//! each measured path, for the programs attached by the lab's agents only (found through their
//! pinned links). All through `overlay-datapath` (aya): no bpftool, no hand-written bpf(2).

use std::{collections::BTreeMap, path::Path};

use overlay_datapath::{PinLayout, stats};

pub use stats::RunTimeStats as StatsGuard;

/// Ids of the programs attached through the pinned links of these agent instances.
pub fn lab_prog_ids(instances: &[String]) -> anyhow::Result<Vec<u32>> {
    let mut ids = vec![];
    for inst in instances {
        let pins = PinLayout::new(Path::new(overlay_lab::BPFFS), inst)?;
        ids.extend(stats::attached_program_ids(&pins)?);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// (name, run_cnt, run_time_ns) of each program id.
pub type Snapshot = BTreeMap<u32, (String, u64, u64)>;

pub fn snapshot(ids: &[u32]) -> anyhow::Result<Snapshot> {
    Ok(stats::program_stats(ids)?
        .into_iter()
        .map(|(id, s)| (id, (s.name, s.run_count, s.run_time_ns)))
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
