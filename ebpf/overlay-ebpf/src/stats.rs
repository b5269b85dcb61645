//! Per-CPU, per-network counters (`OVL_STATS`): every verdict the datapath takes is counted.

use aya_ebpf::bindings::{BPF_NOEXIST, TC_ACT_SHOT};
use overlay_common::{
    counters::{Counter, Drop},
    maps::{Stat, StatKey},
};

use crate::maps::OVL_STATS;

/// Adds one packet of `bytes` to `counter` of network (id) `network`.
#[inline(always)]
pub fn count(network: u32, counter: Counter, bytes: u32) {
    let key = StatKey::new(network, counter as u32);
    let stat = match OVL_STATS.get_ptr_mut(key) {
        Some(stat) => stat,
        None => {
            // First packet of this counter on this network: create it. A concurrent insert by
            // another CPU is fine (NOEXIST fails, the lookup below finds theirs).
            let _ = OVL_STATS.insert(key, Stat::default(), BPF_NOEXIST as u64);
            match OVL_STATS.get_ptr_mut(key) {
                Some(stat) => stat,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value, and programs do not preempt each other on one CPU.
    unsafe {
        (*stat).packets += 1;
        (*stat).bytes += bytes as u64;
    }
}

/// Counts a drop of a packet of `bytes` (its length as it arrived) and returns the TC verdict
/// that drops it.
#[inline(always)]
pub fn drop_packet(drop: Drop, bytes: u32) -> i32 {
    count(drop.network, drop.reason, bytes);
    TC_ACT_SHOT as i32
}
