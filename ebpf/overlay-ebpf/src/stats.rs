//! Per-CPU, per-network counters (`OVL_STATS`, a per-CPU array): every verdict the datapath
//! takes is counted. A network's counters sit in its slot (`OVL_NET_SLOTS`); the fast paths
//! take the slot from the endpoint or route they already hold ([`count_in_slot`]), the others
//! look it up from the network id ([`count`]).

use aya_ebpf::bindings::TC_ACT_SHOT;
use overlay_common::{
    counters::{Counter, Drop, NO_NETWORK},
    maps::{NetworkKey, stat_index},
};

use crate::maps::{OVL_NET_SLOTS, OVL_STATS};

/// Adds one packet of `bytes` to `counter` in counter slot `slot`.
#[inline(always)]
pub fn count_in_slot(slot: u32, counter: Counter, bytes: u32) {
    add_in_slot(slot, counter, 1, bytes)
}

/// Adds `packets` packets of `bytes` in all to `counter` in counter slot `slot`.
#[inline(always)]
fn add_in_slot(slot: u32, counter: Counter, packets: u32, bytes: u32) {
    let Some(stat) = OVL_STATS.get_ptr_mut(stat_index(slot, counter as u32)) else {
        return;
    };
    // SAFETY: per-CPU value, and programs do not preempt each other on one CPU.
    unsafe {
        (*stat).packets += packets as u64;
        (*stat).bytes += bytes as u64;
    }
}

/// Adds `packets` events without bytes (port retries, say) to `counter` of network (id)
/// `network` at once: one count for a loop's worth.
#[inline(always)]
pub fn count_events(network: u32, counter: Counter, packets: u32) {
    if packets != 0 {
        add_in_slot(slot_of(network), counter, packets, 0)
    }
}

/// The counter slot of network (id) `network`: 0 (no network's) if it has none.
#[inline(always)]
fn slot_of(network: u32) -> u32 {
    if network == NO_NETWORK {
        return 0;
    }
    // SAFETY: entries are replaced whole.
    unsafe { OVL_NET_SLOTS.get(NetworkKey::new(network)) }.map_or(0, |s| s.slot)
}

/// Adds one packet of `bytes` to `counter` of network (id) `network`.
#[inline(always)]
pub fn count(network: u32, counter: Counter, bytes: u32) {
    count_in_slot(slot_of(network), counter, bytes)
}

/// Adds one packet of `bytes` to `counter` of network (id) `network`, in `slot` when that is
/// the slot of a value (an endpoint) of `of_network`, the same network as far as the caller
/// knows: no lookup then.
#[inline(always)]
pub fn count_known(network: u32, of_network: u32, slot: u32, counter: Counter, bytes: u32) {
    if network == of_network {
        count_in_slot(slot, counter, bytes)
    } else {
        count(network, counter, bytes)
    }
}

/// Counts a drop of a packet of `bytes` (its length as it arrived) and returns the TC verdict
/// that drops it.
#[inline(always)]
pub fn drop_packet(drop: Drop, bytes: u32) -> i32 {
    count(drop.network, drop.reason, bytes);
    TC_ACT_SHOT as i32
}
