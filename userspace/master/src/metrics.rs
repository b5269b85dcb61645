//! Prometheus text metrics. Counters live here; gauges are read from the master's state at
//! scrape time so they cannot drift from it.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::alloc::Failure;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Register/heartbeat calls answered successfully.
    pub registrations: AtomicU64,
    /// Registrations that created an agent.
    pub agents_created: AtomicU64,
    pub agents_deleted: AtomicU64,
    /// Allocation failures by (reason, network).
    failures: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// Long-poll watchers waiting right now.
    pub watchers: AtomicI64,
    pub store_commits: AtomicU64,
    pub store_commit_errors: AtomicU64,
    pub config_reloads: AtomicU64,
    pub config_reload_errors: AtomicU64,
}

/// Values read from the state at scrape time.
#[derive(Debug, Default)]
pub struct Gauges {
    pub revision: u64,
    pub agents: usize,
    /// Agents with at least one network in STATUS_FAILED.
    pub agents_failed: usize,
    /// Agents without a heartbeat for the heartbeat timeout.
    pub agents_stale: usize,
    pub vteps_allocated: u128,
    /// Freed VTEPs and subnets held back from reuse (counted in the allocated gauges too).
    pub quarantined: usize,
    /// (network, IPv4 blocks, IPv6 blocks)
    pub subnets_allocated: Vec<(String, u128, u128)>,
}

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn record_failures(&self, failures: &[Failure]) {
        if failures.is_empty() {
            return;
        }
        let mut map = self.failures.lock().expect("metrics lock");
        for failure in failures {
            let key = (
                failure.reason.label(),
                failure.network.clone().unwrap_or_default(),
            );
            *map.entry(key).or_default() += 1;
        }
    }

    pub fn failure_count(&self, reason: &str) -> u64 {
        let map = self.failures.lock().expect("metrics lock");
        map.iter()
            .filter(|((r, _), _)| *r == reason)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = overlay_api::build::build_info_metric("overlay_master");
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "overlay_master_revision",
            "Revision of the stored state.",
            gauges.revision.to_string(),
        );
        gauge(
            &mut out,
            "overlay_master_agents",
            "Registered agents.",
            gauges.agents.to_string(),
        );
        gauge(
            &mut out,
            "overlay_master_agents_failed",
            "Agents with a failed allocation.",
            gauges.agents_failed.to_string(),
        );
        gauge(
            &mut out,
            "overlay_master_agents_stale",
            "Agents not heard from within the heartbeat timeout.",
            gauges.agents_stale.to_string(),
        );
        gauge(
            &mut out,
            "overlay_master_vteps_allocated",
            "Allocated VTEP addresses.",
            gauges.vteps_allocated.to_string(),
        );
        gauge(
            &mut out,
            "overlay_master_quarantined_allocations",
            "Freed VTEP addresses and subnets not reusable yet (quarantine).",
            gauges.quarantined.to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP overlay_master_subnets_allocated Allocated per-agent blocks by network and family.\n\
             # TYPE overlay_master_subnets_allocated gauge"
        );
        for (network, v4, v6) in &gauges.subnets_allocated {
            let network = label(network);
            let _ = writeln!(
                out,
                "overlay_master_subnets_allocated{{network=\"{network}\",family=\"ipv4\"}} {v4}"
            );
            let _ = writeln!(
                out,
                "overlay_master_subnets_allocated{{network=\"{network}\",family=\"ipv6\"}} {v6}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP overlay_master_allocation_failures_total Failed allocations by reason and network.\n\
             # TYPE overlay_master_allocation_failures_total counter"
        );
        for ((reason, network), count) in self.failures.lock().expect("metrics lock").iter() {
            let network = label(network);
            let _ = writeln!(
                out,
                "overlay_master_allocation_failures_total{{reason=\"{reason}\",network=\"{network}\"}} {count}"
            );
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            &mut out,
            "overlay_master_registrations_total",
            "Successful register/heartbeat calls.",
            load(&self.registrations),
        );
        counter(
            &mut out,
            "overlay_master_agents_created_total",
            "Registrations that created an agent.",
            load(&self.agents_created),
        );
        counter(
            &mut out,
            "overlay_master_agents_deleted_total",
            "Agents deleted.",
            load(&self.agents_deleted),
        );
        counter(
            &mut out,
            "overlay_master_store_commits_total",
            "Store transactions committed.",
            load(&self.store_commits),
        );
        counter(
            &mut out,
            "overlay_master_store_commit_errors_total",
            "Store transactions that failed.",
            load(&self.store_commit_errors),
        );
        counter(
            &mut out,
            "overlay_master_config_reloads_total",
            "Configuration reloads applied.",
            load(&self.config_reloads),
        );
        counter(
            &mut out,
            "overlay_master_config_reload_errors_total",
            "Configuration reloads rejected.",
            load(&self.config_reload_errors),
        );
        gauge(
            &mut out,
            "overlay_master_watchers",
            "Long-poll watchers waiting.",
            self.watchers.load(Ordering::Relaxed).to_string(),
        );
        out
    }
}
