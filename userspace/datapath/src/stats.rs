//! The kernel's run-time statistics of the datapath's programs (`run_cnt`, `run_time_ns`), as
//! `bpftool prog show` prints them, read through aya: which programs an agent instance attached
//! (its pinned TCX links) and what they cost.

use std::{collections::BTreeMap, os::fd::OwnedFd};

use anyhow::Context as _;
use aya::{
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
    sys::{Stats, enable_stats},
};

use crate::PinLayout;

/// Keeps the kernel's run-time accounting of BPF programs on while it lives
/// (`BPF_ENABLE_STATS`; `kernel.bpf_stats_enabled` without touching the sysctl). Dropping it
/// turns the accounting off again unless something else keeps it on, also when the holder dies.
#[derive(Debug)]
pub struct RunTimeStats {
    _enabled: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> anyhow::Result<RunTimeStats> {
        let fd = enable_stats(Stats::RunTime)
            .context("enabling BPF run-time statistics (BPF_ENABLE_STATS, needs CAP_SYS_ADMIN)")?;
        Ok(RunTimeStats { _enabled: fd })
    }
}

/// Ids of the programs attached through the pinned links of this instance (none if it has no
/// pins; a link pin that is not a link is skipped).
pub fn attached_program_ids(pins: &PinLayout) -> anyhow::Result<Vec<u32>> {
    let dir = pins.links_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut ids = vec![];
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let Ok(pinned) = PinnedLink::from_pin(&path) else {
            continue;
        };
        let link = FdLink::from(pinned);
        let info = link
            .info()
            .with_context(|| format!("reading link info of {}", path.display()))?;
        ids.push(info.program_id());
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// One program's accounting so far (zeros while run-time statistics are off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// The accounting of the loaded programs among `ids`, by id (a program unloaded meanwhile is
/// missing).
pub fn program_stats(ids: &[u32]) -> anyhow::Result<BTreeMap<u32, ProgramStats>> {
    let mut out = BTreeMap::new();
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if !ids.contains(&info.id()) {
            continue;
        }
        out.insert(
            info.id(),
            ProgramStats {
                name: info.name_as_str().unwrap_or("?").to_owned(),
                run_count: info.run_count(),
                run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            },
        );
    }
    Ok(out)
}

/// Names of the programs attached (TCX) to the ingress of `ifname`, in the calling thread's
/// network namespace, as the kernel reports them. Debian's bpftool 7.1 does not list TCX.
pub fn attached_ingress_programs(ifname: &str) -> anyhow::Result<Vec<String>> {
    let (_, programs) = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
        .with_context(|| format!("querying TCX ingress programs of {ifname}"))?;
    Ok(programs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("?").to_owned())
        .collect())
}
