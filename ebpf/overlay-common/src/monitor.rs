//! The drop monitor: every dropped packet can be reported as a [`DropEvent`] through the ring
//! buffer `OVL_DROP_EVENTS`, while the agent has a subscriber and has switched it on in
//! `OVL_MONITOR` ([`MonitorConfig`]). Events are rate-limited per CPU by a token bucket (GCRA,
//! [`DropBudget`] in the per-CPU array `OVL_DROP_BUDGET`); what the budget refuses, or what
//! finds the ring full, is counted in [`DropBudget::skipped`] so the monitor can say how many
//! it missed. Off (the default) costs one array lookup per drop and nothing per packet.

use crate::maps::Addr16;

/// Size of the ring buffer in bytes (a power of two and a multiple of the page size): room for
/// about 3,000 events between two reads of the agent.
pub const RING_BYTES: u32 = 256 * 1024;

/// Which program reported an event.
pub mod hook {
    pub const FROM_CONTAINER: u8 = 1;
    pub const FROM_HOST: u8 = 2;
    pub const FROM_UNDERLAY: u8 = 3;
    /// XDP on the underlay NIC (`xdp_underlay`).
    pub const XDP_UNDERLAY: u8 = 4;

    /// The name operators see.
    pub const fn name(hook: u8) -> &'static str {
        match hook {
            FROM_CONTAINER => "from_container",
            FROM_HOST => "from_host",
            FROM_UNDERLAY => "from_underlay",
            XDP_UNDERLAY => "xdp_underlay",
            _ => "unknown",
        }
    }
}

/// `OVL_MONITOR[0]`: whether drops are reported, and how many per second per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorConfig {
    /// [`MonitorConfig::FLAG_DROPS`] while someone follows the drops.
    pub flags: u32,
    pub _pad: u32,
    /// Nanoseconds between two events at the sustained rate (1e9 / events per second).
    pub interval_ns: u64,
    /// How far ahead of time the budget may run: `(burst - 1) * interval_ns`.
    pub tolerance_ns: u64,
}

impl MonitorConfig {
    pub const FLAG_DROPS: u32 = 1;

    /// Nothing reported (the state with no subscriber).
    pub const fn off() -> MonitorConfig {
        MonitorConfig {
            flags: 0,
            _pad: 0,
            interval_ns: 0,
            tolerance_ns: 0,
        }
    }

    /// Drops reported, at most `per_second` events per second per CPU sustained and `burst`
    /// back to back (both at least 1).
    pub const fn drops(per_second: u32, burst: u32) -> MonitorConfig {
        let per_second = if per_second == 0 { 1 } else { per_second };
        let burst = if burst == 0 { 1 } else { burst };
        let interval_ns = 1_000_000_000 / per_second as u64;
        MonitorConfig {
            flags: MonitorConfig::FLAG_DROPS,
            _pad: 0,
            interval_ns,
            tolerance_ns: (burst as u64 - 1) * interval_ns,
        }
    }

    pub const fn reports_drops(&self) -> bool {
        self.flags & MonitorConfig::FLAG_DROPS != 0
    }
}

/// `OVL_DROP_BUDGET[0]`, one per CPU: the token bucket of the events this CPU may send, and
/// how many it did not.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropBudget {
    /// Theoretical arrival time of the next event (GCRA), CLOCK_MONOTONIC nanoseconds.
    pub next_ns: u64,
    /// Events not sent since the map was created: over budget, or the ring was full.
    pub skipped: u64,
}

impl DropBudget {
    /// Whether an event at `now_ns` is within budget (then it is taken from it); counts it as
    /// skipped if not. No division: the BPF side runs this on every reported drop.
    #[inline(always)]
    pub fn admit(&mut self, now_ns: u64, cfg: &MonitorConfig) -> bool {
        let next = if self.next_ns > now_ns {
            self.next_ns
        } else {
            now_ns
        };
        if next - now_ns > cfg.tolerance_ns {
            self.skipped += 1;
            return false;
        }
        self.next_ns = next + cfg.interval_ns;
        true
    }
}

/// One dropped packet, as the datapath saw it at its drop site. Addresses are 16 bytes
/// (IPv4-mapped for IPv4, network order); ports in host order. For ICMP and ICMPv6,
/// `src_port` holds the type and `dst_port` the code. VXLAN on the underlay is described by its
/// inner packet ([`DropEvent::FLAG_INNER`]), whose addresses are the containers'.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`).
    pub time_ns: u64,
    /// The network the drop is counted under (the Drop verdict's; 0: none).
    pub network: u32,
    /// The drop reason ([`crate::counters::Counter`]).
    pub reason: u32,
    /// The device the packet arrived on (a container's host-side veth for `from_container`).
    pub ifindex: u32,
    /// The packet's length as it arrived.
    pub len: u32,
    pub src: Addr16,
    pub dst: Addr16,
    pub src_port: u16,
    pub dst_port: u16,
    /// IP protocol (next header); 0 when the frame is not IP.
    pub protocol: u8,
    /// [`hook`].
    pub hook: u8,
    pub flags: u8,
    pub _pad0: u8,
    /// Ethertype of the (inner) frame.
    pub ethertype: u16,
    pub _pad: [u8; 6],
}

impl DropEvent {
    /// Addresses and ports are the inner packet's of a VXLAN datagram.
    pub const FLAG_INNER: u8 = 1;
    /// Source and destination addresses were read (an IPv4 or IPv6 packet).
    pub const FLAG_ADDRESSES: u8 = 2;
    /// Ports (or ICMP type and code) were read.
    pub const FLAG_PORTS: u8 = 4;

    /// The event as bytes are read back from the ring (`None` if too short).
    pub fn from_bytes(bytes: &[u8]) -> Option<DropEvent> {
        if bytes.len() < size_of::<DropEvent>() {
            return None;
        }
        // SAFETY: every bit pattern is a valid DropEvent (integers and byte arrays only), and
        // the read is unaligned-safe.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const DropEvent) })
    }
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<MonitorConfig>() == 24);
    assert!(size_of::<DropBudget>() == 16);
    assert!(size_of::<DropEvent>() == 72);
    assert!(RING_BYTES.is_power_of_two());
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), integers and byte arrays only, explicit padding.
    unsafe impl aya::Pod for MonitorConfig {}
    unsafe impl aya::Pod for DropBudget {}
    unsafe impl aya::Pod for DropEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_lets_a_burst_through_then_the_rate() {
        // 10 per second (one per 100 ms), bursts of 3.
        let cfg = MonitorConfig::drops(10, 3);
        assert_eq!(cfg.interval_ns, 100_000_000);
        let mut b = DropBudget::default();
        let t0 = 5_000_000_000;
        let admitted: usize = (0..10).filter(|_| b.admit(t0, &cfg)).count();
        assert_eq!((admitted, b.skipped), (3, 7));
        // 100 ms later one more token; 50 ms after that none.
        assert!(b.admit(t0 + 100_000_000, &cfg));
        assert!(!b.admit(t0 + 150_000_000, &cfg));
        // After a quiet second the whole burst again, not more.
        let t1 = t0 + 2_000_000_000;
        let admitted: usize = (0..10).filter(|_| b.admit(t1, &cfg)).count();
        assert_eq!(admitted, 3);
        assert_eq!(b.skipped, 7 + 1 + 7);
    }

    #[test]
    fn a_sustained_flood_gets_the_rate() {
        let cfg = MonitorConfig::drops(100, 10);
        let mut b = DropBudget::default();
        // 100,000 drops per second for 2 s, one every 10 us.
        let admitted = (0..200_000u64)
            .filter(|i| b.admit(1_000_000_000 + i * 10_000, &cfg))
            .count();
        assert!((200..=211).contains(&admitted), "{admitted}");
        assert_eq!(admitted as u64 + b.skipped, 200_000);
    }

    #[test]
    fn zero_rate_or_burst_still_means_one() {
        let cfg = MonitorConfig::drops(0, 0);
        assert!(cfg.reports_drops());
        let mut b = DropBudget::default();
        assert!(b.admit(1, &cfg));
        assert!(!b.admit(1, &cfg));
        assert!(!MonitorConfig::off().reports_drops());
    }

    #[test]
    fn events_read_back_from_bytes() {
        let ev = DropEvent {
            time_ns: 7,
            network: 1024,
            reason: 17,
            src_port: 5,
            hook: hook::FROM_CONTAINER,
            ..Default::default()
        };
        // SAFETY: plain bytes of a repr(C) value.
        let bytes = unsafe {
            core::slice::from_raw_parts(
                &ev as *const DropEvent as *const u8,
                size_of::<DropEvent>(),
            )
        };
        assert_eq!(DropEvent::from_bytes(bytes), Some(ev));
        assert_eq!(DropEvent::from_bytes(&bytes[..10]), None);
        assert_eq!(hook::name(ev.hook), "from_container");
    }
}
