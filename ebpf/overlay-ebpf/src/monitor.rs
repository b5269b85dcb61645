//! The drop monitor's BPF side (`overlay_common::monitor`): at a program's one drop site, while
//! the agent has switched reporting on, a [`DropEvent`] describing the packet goes into the ring
//! buffer, within this CPU's budget. The event is filled in place in the ring's memory (no
//! copy, no stack), and only after the switch and the budget said yes.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    counters::Drop,
    monitor::{DropEvent, MonitorConfig},
    packet::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, UDP_HLEN,
        VXLAN_HLEN,
    },
};

use crate::maps::{OVL_DROP_BUDGET, OVL_DROP_EVENTS, OVL_MONITOR, config};

const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
const IPV6_HLEN: u32 = 40;

/// A frame the monitor can read bytes of: the TC programs' skb or XDP's buffer.
pub trait Frame {
    /// Copies `len` bytes at `offset` to `to`; false if the frame is shorter.
    fn copy_out(&self, offset: u32, to: *mut u8, len: u32) -> bool;
    /// The device the frame arrived on.
    fn arrived_on(&self) -> u32;
}

impl Frame for TcContext {
    #[inline(always)]
    fn copy_out(&self, offset: u32, to: *mut u8, len: u32) -> bool {
        // SAFETY: the helper writes at most `len` bytes to `to`, which points into the event
        // being filled (callers pass a field of matching size).
        unsafe { bpf_skb_load_bytes(self.skb.skb as *const _, offset, to as *mut _, len) == 0 }
    }

    #[inline(always)]
    fn arrived_on(&self) -> u32 {
        crate::skb::ingress_ifindex(self)
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn copy_out(&self, offset: u32, to: *mut u8, len: u32) -> bool {
        // SAFETY: as above; the helper checks the frame's bounds.
        unsafe { bpf_xdp_load_bytes(self.ctx, offset, to as *mut _, len) == 0 }
    }

    #[inline(always)]
    fn arrived_on(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*self.ctx).ingress_ifindex }
    }
}

/// Reports `drop` of a packet of `len` bytes seen by program `hook`, if it is a drop
/// (`Counter::is_drop`), reporting is on and this CPU's budget allows; otherwise (over budget,
/// ring full) counts it as skipped.
#[inline(always)]
pub fn report<F: Frame>(frame: &F, hook: u8, drop: Drop, len: u32) {
    // Link housekeeping nobody needs to hear (`arp_ignored`, `nd_ignored`) is not a drop: what
    // is reported is what the drop counters count.
    if !drop.reason.is_drop() {
        return;
    }
    // Off: one array lookup, nothing else.
    let Some(cfg) = OVL_MONITOR.get(0) else {
        return;
    };
    if !cfg.reports_drops() {
        return;
    }
    report_on(frame, hook, drop, len, cfg)
}

#[inline(always)]
fn report_on<F: Frame>(frame: &F, hook: u8, drop: Drop, len: u32, cfg: &MonitorConfig) {
    let Some(budget) = OVL_DROP_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
    let budget = unsafe { &mut *budget };
    // SAFETY: plain helper.
    let now = unsafe { bpf_ktime_get_ns() };
    if !budget.admit(now, cfg) {
        return;
    }
    let Some(mut entry) = OVL_DROP_EVENTS.reserve(0) else {
        budget.skipped += 1;
        return;
    };
    let ev = entry.as_mut_ptr();
    let vxlan_port = config().map_or(0, |c| c.vxlan_port);
    // SAFETY: `ev` points to a reserved, exclusively ours event in the ring; every field is
    // written before submit.
    unsafe {
        (*ev).time_ns = now;
        (*ev).network = drop.network;
        (*ev).reason = drop.reason as u32;
        (*ev).ifindex = frame.arrived_on();
        (*ev).len = len;
        (*ev).hook = hook;
        (*ev)._pad0 = 0;
        (*ev)._pad = [0; 6];
        describe(frame, ev, 0);
        // VXLAN from another agent: what matters is the packet inside.
        if (*ev).protocol == IPPROTO_UDP
            && (*ev).flags & DropEvent::FLAG_PORTS != 0
            && vxlan_port != 0
            && (*ev).dst_port == vxlan_port
        {
            let ihl = outer_ihl(frame);
            let inner = ETH_HLEN as u32 + ihl + (UDP_HLEN + VXLAN_HLEN) as u32;
            // Only an inner IP packet says more than the outer one (garbage inside a VXLAN
            // header from an unknown VTEP is described by who sent it).
            let mut ethertype = [0u8; 2];
            if ihl != 0
                && frame.copy_out(inner + 12, ethertype.as_mut_ptr(), 2)
                && matches!(u16::from_be_bytes(ethertype), ETH_P_IP | ETH_P_IPV6)
            {
                describe(frame, ev, inner);
                (*ev).flags |= DropEvent::FLAG_INNER;
            }
        }
    }
    entry.submit(0);
}

/// IPv4 header length of the outer packet (0 if unreadable or not IPv4 with a valid length).
#[inline(always)]
fn outer_ihl<F: Frame>(frame: &F) -> u32 {
    let mut v = 0u8;
    if !frame.copy_out(ETH_HLEN as u32, &mut v, 1) {
        return 0;
    }
    let ihl = (v & 0x0f) as u32 * 4;
    if v >> 4 != 4 || ihl < 20 { 0 } else { ihl }
}

/// Fills addresses, ports, protocol and ethertype of the frame starting at `base`.
///
/// # Safety
/// `ev` must point to a writable event.
#[inline(always)]
unsafe fn describe<F: Frame>(frame: &F, ev: *mut DropEvent, base: u32) {
    unsafe {
        (*ev).src = [0; 16];
        (*ev).dst = [0; 16];
        (*ev).src_port = 0;
        (*ev).dst_port = 0;
        (*ev).protocol = 0;
        (*ev).flags = 0;
        (*ev).ethertype = 0;
        let mut ethertype = [0u8; 2];
        if !frame.copy_out(base + 12, ethertype.as_mut_ptr(), 2) {
            return;
        }
        let ethertype = u16::from_be_bytes(ethertype);
        (*ev).ethertype = ethertype;
        let l3 = base + ETH_HLEN as u32;
        let src = (*ev).src.as_mut_ptr();
        let dst = (*ev).dst.as_mut_ptr();
        let mut protocol = 0u8;
        let l4 = match ethertype {
            ETH_P_IP => {
                let mut vihl = 0u8;
                if !frame.copy_out(l3, &mut vihl, 1) || !frame.copy_out(l3 + 9, &mut protocol, 1) {
                    return;
                }
                (*ev).src[10] = 0xff;
                (*ev).src[11] = 0xff;
                (*ev).dst[10] = 0xff;
                (*ev).dst[11] = 0xff;
                if !frame.copy_out(l3 + 12, src.add(12), 4)
                    || !frame.copy_out(l3 + 16, dst.add(12), 4)
                {
                    return;
                }
                l3 + (vihl & 0x0f) as u32 * 4
            }
            ETH_P_IPV6 => {
                if !frame.copy_out(l3 + 6, &mut protocol, 1)
                    || !frame.copy_out(l3 + 8, src, 16)
                    || !frame.copy_out(l3 + 24, dst, 16)
                {
                    return;
                }
                l3 + IPV6_HLEN
            }
            _ => return,
        };
        (*ev).protocol = protocol;
        (*ev).flags = DropEvent::FLAG_ADDRESSES;
        let mut ports = [0u8; 4];
        match protocol {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
                if frame.copy_out(l4, ports.as_mut_ptr(), 4) {
                    (*ev).src_port = u16::from_be_bytes([ports[0], ports[1]]);
                    (*ev).dst_port = u16::from_be_bytes([ports[2], ports[3]]);
                    (*ev).flags |= DropEvent::FLAG_PORTS;
                }
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                if frame.copy_out(l4, ports.as_mut_ptr(), 2) {
                    (*ev).src_port = ports[0] as u16;
                    (*ev).dst_port = ports[1] as u16;
                    (*ev).flags |= DropEvent::FLAG_PORTS;
                }
            }
            _ => {}
        }
    }
}
