//! Masquerade: container traffic to outside every overlay leaves with the agent's underlay address
//! (no iptables), and replies and ICMP errors about it are translated back.
//!
//! `OVL_NAT` holds two entries per flow: the egress key (original tuple) and the ingress key
//! (translated tuple). A port is claimed by inserting the ingress key with `BPF_NOEXIST`, so two
//! CPUs can never hand out the same tuple. The flow table, its ports and quotas are shared with
//! IPv6 ([`crate::nat6`]): only the packet rewriting differs by family.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_EXIST, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM,
        BPF_NOEXIST,
    },
    helpers::generated::{bpf_get_hash_recalc, bpf_ktime_get_ns, bpf_redirect_neigh},
    programs::TcContext,
};
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    maps::{
        Addr16, AgentConfig, NatConfig, NatEntry, NatKey, NatQuota, NatQuotaKey, ipv4_mapped,
        ipv4_unmapped,
    },
    nat::{
        ICMP_ECHO_HEADER_LEN, ICMP_QUOTE_LEN, TCP_PREFIX_LEN, Transport, UDP_HEADER_LEN,
        csum_replace32, is_expired, is_icmp_error, port_candidate, quoted_flow, rewrite_icmp_quote,
        tcp_track, within_quota,
    },
    packet::{ETH_HLEN, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, Ipv4Header},
    policy::IPPROTO_ICMPV6,
};

use crate::{
    deliver,
    maps::{
        OVL_NAT, OVL_NAT_QUOTA, OVL_SCRATCH_NAT_KEY, OVL_SCRATCH_QUOTA_KEY, endpoint, nat_config,
    },
    skb,
    stats::{count, count_events, count_in_slot, count_known},
};

/// Upper bound of the probing loop, for the verifier; `NatConfig::max_probes` is the real limit.
const PROBE_LIMIT: u32 = 64;
/// The same for IPv6 (`crate::nat6`): its program walks the loop with more state, and 64 probes
/// exceed the verifier's 1M-instruction budget there. 32 is `--nat-max-probes`' default, so by
/// default both families probe alike; a larger setting only applies to IPv4.
pub(crate) const PROBE_LIMIT_IPV6: u32 = 32;

/// Offsets within the IPv4 header.
const IP_CHECK: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;

/// Checksum helpers take the raw (network-order) field as it sits in memory.
#[inline(always)]
pub(crate) fn raw16(v: u16) -> u64 {
    u16::from_ne_bytes(v.to_be_bytes()) as u64
}

#[inline(always)]
fn raw32(a: [u8; 4]) -> u64 {
    u32::from_ne_bytes(a) as u64
}

#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// Ports (or echo identifier) of a packet with the IPv4 header `ip`; `egress` selects which ICMP
/// echo type is acceptable (requests go out, replies come in).
#[inline(always)]
fn transport(ctx: &TcContext, ip: &Ipv4Header, egress: bool) -> Result<Transport, Counter> {
    let l4 = ETH_HLEN + ip.header_len;
    match ip.protocol {
        IPPROTO_TCP => Ok(Transport::tcp(l4, &skb::load::<TCP_PREFIX_LEN>(ctx, l4)?)),
        IPPROTO_UDP => Ok(Transport::udp(l4, &skb::load::<UDP_HEADER_LEN>(ctx, l4)?)),
        IPPROTO_ICMP => {
            Transport::icmp_echo(l4, &skb::load::<ICMP_ECHO_HEADER_LEN>(ctx, l4)?, egress)
        }
        _ => Err(Counter::DropNatUnsupported),
    }
}

/// The entry for `key` if it is live (a pointer into the map, not a copy: stack; [`refresh`]
/// writes through it, without looking the key up again).
#[inline(always)]
pub(crate) fn live(cfg: &NatConfig, key: &NatKey, now: u64) -> Option<*mut NatEntry> {
    let e = OVL_NAT.get_ptr_mut(key)?;
    // SAFETY: a pointer into the map value; entries are replaced whole or have only
    // `last_seen_ns`/`flags` updated in place.
    if is_expired(cfg, key.protocol, unsafe { &*e }, now) {
        None
    } else {
        Some(e)
    }
}

/// The quota key of a flow from either of its entries (an ingress entry's value holds the
/// container's address), written into the per-CPU scratch slot rather than onto the stack:
/// `from_container` is close to the verifier's 512-byte stack limit.
#[inline(always)]
fn quota_key(key: &NatKey, container: Addr16) -> Option<&'static NatQuotaKey> {
    let q = OVL_SCRATCH_QUOTA_KEY.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
    unsafe {
        *q = NatQuotaKey::new(container, key.remote, key.remote_port, key.protocol);
        Some(&*q)
    }
}

/// Marks the entry at `e` (in the map) as used now with `flags` added.
#[inline(always)]
fn touch_entry(e: *mut NatEntry, now: u64, flags: u16) {
    // SAFETY: a pointer into the map value; racing writers only store timestamps/flags.
    unsafe {
        (*e).last_seen_ns = now;
        (*e).flags |= flags;
    }
}

/// Marks one entry as used now with `flags` added.
#[inline(always)]
fn touch(key: &NatKey, now: u64, flags: u16) {
    if let Some(e) = OVL_NAT.get_ptr_mut(key) {
        touch_entry(e, now, flags);
    }
}

/// Marks both directions of a flow as used now, and moves a TCP flow's handshake state on
/// (`tcp_track`); a flow that starts closing gives its quota back. `entry` is `key`'s entry in
/// the map (from [`live`] or [`allocate`]).
#[inline(always)]
pub(crate) fn refresh(key: &NatKey, entry: *mut NatEntry, now: u64, tcp_flags: u8, egress: bool) {
    // Everything of the entry is read before it is written: the flags it had, the other
    // direction's key (through the scratch slot, stack as in `quota_key`), the container.
    // SAFETY: a pointer into the map value (see `live`).
    let old_flags = unsafe { (*entry).flags };
    let flags = if key.protocol == IPPROTO_TCP {
        tcp_track(old_flags, tcp_flags, egress)
    } else {
        old_flags
    };
    let closing = NatEntry::FLAG_CLOSING;
    let starts_closing = old_flags & closing == 0 && flags & closing != 0;
    // SAFETY: as above.
    let container = if egress {
        key.local
    } else {
        unsafe { (*entry).addr }
    };
    if let Some(k) = OVL_SCRATCH_NAT_KEY.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; `entry` as above.
        unsafe {
            *k = key.paired(&*entry);
            touch(&*k, now, flags);
        }
    }
    touch_entry(entry, now, flags);
    if starts_closing
        && let Some(q) = quota_key(key, container)
        && let Some(c) = OVL_NAT_QUOTA.get_ptr_mut(q)
    {
        // SAFETY: as above; a lost race only leaves the count high until the agent's
        // recount.
        unsafe { (*c).flows = (*c).flows.saturating_sub(1) };
    }
}

/// Whether a container may open another flow towards the key's destination (its quota).
#[inline(always)]
fn quota_admits(nat: &NatConfig, key: &NatKey) -> bool {
    let Some(q) = quota_key(key, key.local) else {
        return true;
    };
    // SAFETY: plain values, read once.
    let flows = unsafe { OVL_NAT_QUOTA.get(q) }.map_or(0, |c| c.flows);
    within_quota(nat, flows)
}

/// Counts a new flow against its container's quota.
#[inline(always)]
fn take_quota(key: &NatKey) {
    let Some(q) = quota_key(key, key.local) else {
        return;
    };
    match OVL_NAT_QUOTA.get_ptr_mut(q) {
        // SAFETY: as in `refresh`.
        Some(c) => unsafe { (*c).flows = (*c).flows.saturating_add(1) },
        None => {
            let _ = OVL_NAT_QUOTA.insert(q, NatQuota::new(1), BPF_NOEXIST as u64);
        }
    }
}

/// Replaces the IPv4 address at `at` (source or destination) and fixes the header checksum,
/// in place (RFC 1624, as `bpf_l3_csum_replace` would: the IPv4 header checksum involves no
/// skb checksum state), two helper calls fewer per packet.
#[inline(always)]
fn set_ip_addr(ctx: &TcContext, at: usize, old: [u8; 4], new: [u8; 4]) -> Result<(), Counter> {
    let fail = |_| Counter::DropMalformed;
    let check = skb::load::<2>(ctx, IP_CHECK)?;
    let check = csum_replace32(u16::from_be_bytes(check), old, new);
    skb::store(ctx, IP_CHECK, &check.to_be_bytes()).map_err(fail)?;
    skb::store(ctx, at, &new).map_err(fail)
}

/// Replaces the transport port (or echo identifier) at `port_at` and fixes the transport
/// checksum at `check_at` for it and, for TCP and UDP, for the address change in the
/// pseudo-header (a zero UDP checksum stays zero). ICMP has no pseudo-header.
#[inline(always)]
fn set_transport_port(
    ctx: &TcContext,
    protocol: u8,
    (check_at, port_at): (usize, usize),
    (old_addr, new_addr): ([u8; 4], [u8; 4]),
    (old_port, new_port): (u16, u16),
) -> Result<(), Counter> {
    let fail = |_| Counter::DropMalformed;
    let zero_ok = if protocol == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if protocol == IPPROTO_TCP || protocol == IPPROTO_UDP {
        let flags = BPF_F_PSEUDO_HDR as u64 | zero_ok | 4;
        ctx.l4_csum_replace(check_at, raw32(old_addr), raw32(new_addr), flags)
            .map_err(fail)?;
    }
    ctx.l4_csum_replace(check_at, raw16(old_port), raw16(new_port), zero_ok | 2)
        .map_err(fail)?;
    skb::store(ctx, port_at, &new_port.to_be_bytes()).map_err(|_| Counter::DropMalformed)
}

/// Claims a port for a new flow of either family, whose packets leave from `underlay`. Returns
/// the egress entry (in the map).
#[inline(always)]
pub(crate) fn allocate<const PROBES: u32>(
    ctx: &TcContext,
    nat: &NatConfig,
    key: &NatKey,
    underlay: &Addr16,
    network: u32,
    vxlan_port: u16,
    now: u64,
) -> Result<*mut NatEntry, Counter> {
    // SAFETY: plain helper call on the program's own context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let back = NatEntry {
        addr: key.local,
        port: key.local_port,
        flags: 0,
        network,
        last_seen_ns: now,
    };
    if !quota_admits(nat, key) {
        return Err(Counter::DropNatQuota);
    }
    // Echo identifiers are never kept as the container sent them: the translated one could be
    // an identifier the host itself pings with.
    let (original, avoid) = if key.protocol == IPPROTO_ICMP || key.protocol == IPPROTO_ICMPV6 {
        (0, key.local_port)
    } else {
        (key.local_port, vxlan_port)
    };
    // Retries are counted once, after the loop (a count per probe puts two map lookups in
    // every iteration the verifier walks).
    let mut retries = 0;
    let mut claimed_port = None;
    for attempt in 0..PROBES {
        if attempt >= nat.max_probes {
            break;
        }
        let port = port_candidate(nat, original, hash, attempt, avoid);
        let ingress = NatKey::ingress(key.protocol, key.remote, key.remote_port, *underlay, port);
        let claimed = if OVL_NAT.insert(&ingress, &back, BPF_NOEXIST as u64).is_ok() {
            true
        } else {
            // Taken: the tuple of an expired or closed (FIN/RST seen) flow may be reused, as the
            // kernel's conntrack lets a new SYN take over a closing entry; otherwise a closing
            // timeout caps new connections to one server at ports/timeout per second. The old
            // flow's egress entry goes with it.
            let reusable = match live(nat, &ingress, now) {
                // SAFETY: as in `live`.
                Some(e) => (unsafe { (*e).flags }) & NatEntry::FLAG_CLOSING != 0,
                None => true,
            };
            if reusable {
                // SAFETY: as in `live`.
                if let Some(old) = unsafe { OVL_NAT.get(&ingress) } {
                    let _ = OVL_NAT.remove(ingress.paired(old));
                }
                OVL_NAT.insert(&ingress, &back, BPF_EXIST as u64).is_ok()
            } else {
                false
            }
        };
        if claimed {
            claimed_port = Some(port);
            break;
        }
        retries += 1;
    }
    count_events(network, Counter::NatPortRetries, retries);
    let port = claimed_port.ok_or(Counter::DropNatNoPort)?;
    let out = NatEntry {
        addr: *underlay,
        port,
        flags: 0,
        network,
        last_seen_ns: now,
    };
    OVL_NAT
        .insert(key, &out, BPF_ANY as u64)
        .map_err(|_| Counter::DropNatNoPort)?;
    take_quota(key);
    count(network, Counter::NatCreated, 0);
    OVL_NAT.get_ptr_mut(key).ok_or(Counter::DropNatNoPort)
}

/// Rewrites the source of a container's packet to the underlay address and a flow port and sends
/// it out of the underlay NIC.
#[inline(always)]
pub fn masquerade(
    ctx: &TcContext,
    cfg: &AgentConfig,
    ip: &Ipv4Header,
    network: u32,
    slot: u32,
) -> Result<i32, Counter> {
    let nat = nat_config().ok_or(Counter::DropNotReady)?;
    let underlay = ipv4_unmapped(&cfg.underlay_ip).ok_or(Counter::DropNoRoute)?;
    if ip.is_fragment {
        return Err(Counter::DropNatUnsupported);
    }
    let t = transport(ctx, ip, true)?;
    let key = NatKey::egress(
        ip.protocol,
        ipv4_mapped(ip.src),
        t.src_port,
        ipv4_mapped(ip.dst),
        t.dst_port,
    );
    let now = now_ns();
    let out = match live(nat, &key, now) {
        Some(e) => e,
        None => allocate::<PROBE_LIMIT>(
            ctx,
            nat,
            &key,
            &ipv4_mapped(underlay),
            network,
            cfg.vxlan_port,
            now,
        )?,
    };
    // SAFETY: a pointer into the map value (see `live`).
    let port = unsafe { (*out).port };
    refresh(&key, out, now, t.tcp_flags, true);

    set_ip_addr(ctx, IP_SRC, ip.src, underlay)?;
    set_transport_port(
        ctx,
        ip.protocol,
        (t.check_at, t.src_port_at),
        (ip.src, underlay),
        (t.src_port, port),
    )?;
    count_in_slot(slot, Counter::Masqueraded, ctx.len());
    // SAFETY: plain helper call; the FIB picks the next hop of the outside address.
    Ok(unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

/// Translates a packet from outside back to the container whose flow it answers: `Ok(None)` when
/// it answers none (the host's own traffic), a [`Drop`] when it does but cannot be delivered.
#[inline(always)]
pub fn unmasquerade(
    ctx: &TcContext,
    cfg: &AgentConfig,
    ip: &Ipv4Header,
) -> Result<Option<i32>, Drop> {
    let Some(nat) = nat_config() else {
        return Ok(None);
    };
    let Some(underlay) = ipv4_unmapped(&cfg.underlay_ip) else {
        return Ok(None);
    };
    if ip.dst != underlay || ip.is_fragment || ip.header_len != IPV4_HLEN {
        return Ok(None);
    }
    let l4 = ETH_HLEN + IPV4_HLEN;
    if ip.protocol == IPPROTO_ICMP {
        let Ok(h) = skb::load::<2>(ctx, l4) else {
            return Ok(None);
        };
        if is_icmp_error(h[0]) {
            return icmp_error(ctx, nat, underlay);
        }
    }
    let Ok(t) = transport(ctx, ip, false) else {
        return Ok(None);
    };
    let (remote_port, local_port, local_port_at) = t.ingress_ports();
    let key = NatKey::ingress(
        ip.protocol,
        ipv4_mapped(ip.src),
        remote_port,
        ipv4_mapped(underlay),
        local_port,
    );
    let now = now_ns();
    let Some(entry) = live(nat, &key, now) else {
        return Ok(None);
    };
    // SAFETY: a pointer into the map value (see `live`); read before `refresh` writes it.
    let (network, port, addr) = unsafe { ((*entry).network, (*entry).port, (*entry).addr) };
    let ep = endpoint(addr)
        .ok_or(Counter::DropNoEndpoint)
        .in_network(network)?;
    let container = ipv4_unmapped(&addr).ok_or(Counter::DropMalformed)?;
    refresh(&key, entry, now, t.tcp_flags, false);
    set_ip_addr(ctx, IP_DST, underlay, container).in_network(network)?;
    set_transport_port(
        ctx,
        ip.protocol,
        (t.check_at, local_port_at),
        (underlay, container),
        (local_port, port),
    )
    .in_network(network)?;
    let verdict = deliver::to_endpoint(ctx, ep).in_network(network)?;
    count_known(
        network,
        ep.network,
        ep.slot,
        Counter::Unmasqueraded,
        ctx.len(),
    );
    Ok(Some(verdict))
}

/// An ICMP error (destination unreachable, frag-needed included, or time exceeded) about a
/// masqueraded flow: the quoted header is rewritten to the container's tuple (RFC 5508) so that
/// path-MTU discovery and error reporting keep working, and the error is delivered.
#[inline(always)]
fn icmp_error(ctx: &TcContext, nat: &NatConfig, underlay: [u8; 4]) -> Result<Option<i32>, Drop> {
    let l4 = ETH_HLEN + IPV4_HLEN;
    let Ok(head) = skb::load::<4>(ctx, l4) else {
        return Ok(None);
    };
    let Ok(mut quote) = skb::load::<ICMP_QUOTE_LEN>(ctx, l4 + 8) else {
        return Ok(None);
    };
    let Some(flow) = quoted_flow(&quote, underlay) else {
        return Ok(None);
    };
    let key = NatKey::ingress(
        flow.protocol,
        ipv4_mapped(flow.remote),
        flow.remote_port,
        ipv4_mapped(underlay),
        flow.local_port,
    );
    let Some(back) = live(nat, &key, now_ns()) else {
        return Ok(None);
    };
    // SAFETY: a pointer into the map value (see `live`), only read here.
    let back = unsafe { &*back };
    let network = back.network;
    let ep = endpoint(back.addr)
        .ok_or(Counter::DropNoEndpoint)
        .in_network(network)?;
    let container = ipv4_unmapped(&back.addr)
        .ok_or(Counter::DropMalformed)
        .in_network(network)?;
    let check = rewrite_icmp_quote(
        u16::from_be_bytes([head[2], head[3]]),
        &mut quote,
        container,
        back.port,
    );
    let fail = |_| Counter::DropMalformed.in_network(network);
    let recompute = BPF_F_RECOMPUTE_CSUM as u64;
    ctx.store(l4 + 8, &quote, recompute).map_err(fail)?;
    ctx.store(l4 + 2, &check.to_be_bytes(), recompute)
        .map_err(fail)?;
    set_ip_addr(ctx, IP_DST, underlay, container).in_network(network)?;
    let verdict = deliver::to_endpoint(ctx, ep).in_network(network)?;
    count_known(
        network,
        ep.network,
        ep.slot,
        Counter::Unmasqueraded,
        ctx.len(),
    );
    Ok(Some(verdict))
}
