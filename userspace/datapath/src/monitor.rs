//! The drop monitor's maps (`overlay_common::monitor`) as userspace uses them: the switch and
//! rate (`OVL_MONITOR`), each CPU's skipped events (`OVL_DROP_BUDGET`) and the ring buffer of
//! events (`OVL_DROP_EVENTS`). Opened from the pins, so the agent's monitor runs off the owner
//! thread and tools (tests, `overlayctl`) can see whether reporting is on.

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use overlay_common::{
    maps::names,
    monitor::{DropBudget, MonitorConfig},
};

use crate::PinLayout;

fn pinned(pins: &PinLayout, name: &str) -> anyhow::Result<MapData> {
    let path = pins.map(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is an agent of this version running with this instance?)",
            path.display()
        )
    })
}

/// `OVL_MONITOR` and `OVL_DROP_BUDGET`.
pub struct MonitorSwitch {
    config: Array<MapData, MonitorConfig>,
    budget: PerCpuArray<MapData, DropBudget>,
}

impl MonitorSwitch {
    pub fn open_pinned(pins: &PinLayout) -> anyhow::Result<MonitorSwitch> {
        Ok(MonitorSwitch {
            config: Map::Array(pinned(pins, names::MONITOR)?).try_into()?,
            budget: Map::PerCpuArray(pinned(pins, names::DROP_BUDGET)?).try_into()?,
        })
    }

    /// What the programs read.
    pub fn config(&self) -> anyhow::Result<MonitorConfig> {
        self.config
            .get(&0, 0)
            .with_context(|| format!("reading {}", names::MONITOR))
    }

    pub fn set(&mut self, cfg: &MonitorConfig) -> anyhow::Result<()> {
        self.config
            .set(0, cfg, 0)
            .with_context(|| format!("writing {}", names::MONITOR))
    }

    /// Whether drops are being reported.
    pub fn reports_drops(&self) -> anyhow::Result<bool> {
        Ok(self.config()?.reports_drops())
    }

    /// Events skipped (over budget or ring full) since the map was created, over all CPUs.
    pub fn skipped(&self) -> anyhow::Result<u64> {
        let per_cpu = self
            .budget
            .get(&0, 0)
            .with_context(|| format!("reading {}", names::DROP_BUDGET))?;
        Ok(per_cpu.iter().map(|b| b.skipped).sum())
    }
}

/// The ring buffer of events, to be polled (it is a file descriptor: `AsRawFd`).
pub fn open_events(pins: &PinLayout) -> anyhow::Result<RingBuf<MapData>> {
    Ok(Map::RingBuf(pinned(pins, names::DROP_EVENTS)?).try_into()?)
}
