//! IPv6 masquerade: a container's IPv6 to outside every overlay (ULA networks such as `dcos6`
//! reach nothing otherwise) leaves with the underlay NIC's IPv6 address
//! (`NatConfig::underlay_ip6`), and replies and ICMPv6 errors about it are translated back.
//!
//! The flow table, port allocation, quotas and timeouts are IPv4's ([`crate::nat`]); what differs
//! is the packet: no header checksum, but every transport checksum (ICMPv6's too) covers the
//! 16-byte addresses of the pseudo-header. Without an IPv6 address on the underlay nothing is
//! masqueraded: the packet is dropped (`drop_nat6_no_address`), never sent with its ULA source.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK},
    btf_maps::PerCpuArray,
    helpers::generated::bpf_redirect_neigh,
    macros::btf_map,
    programs::TcContext,
};
use overlay_common::{
    counters::{Counter, Drop, InNetwork},
    ipv6::Ipv6Header,
    maps::{Addr16, AgentConfig, NatConfig, NatKey, ProtectedKey, ipv4_unmapped, tail_calls},
    nat::{
        ICMP_ECHO_HEADER_LEN, ICMPV6_QUOTE_LEN, TCP_PREFIX_LEN, Transport, UDP_HEADER_LEN,
        addr16_csum_diff, is_icmpv6_error, quoted_flow6, rewrite_icmpv6_quote,
    },
    packet::{ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP},
    policy::{IPPROTO_ICMPV6, IPV6_HLEN, is_ipv6_extension_header, is_unroutable_destination6},
};

use crate::{
    deliver,
    maps::{
        OVL_TAIL_CALLS, config, endpoint, is_known_vtep, is_protected, masquerades, nat_config,
    },
    nat::{PROBE_LIMIT_IPV6, allocate, live, now_ns, raw16, refresh},
    skb,
    stats::count_in_slot,
};

/// The flow being masqueraded, parked in a per-CPU slot between parsing and rewriting: off
/// `masquerade_ipv6`'s stack, and read back as values the verifier does not know, so that port
/// allocation is verified once for every protocol (with each protocol's constant offsets known, the
/// probing loop was walked once per protocol, past the verifier's 1M-instruction budget).
#[repr(C)]
pub struct PendingFlow {
    key: NatKey,
    check_at: u32,
    port_at: u32,
    port: u32,
    tcp_flags: u32,
}

/// Not pinned: its content never outlives one program run.
#[btf_map]
static OVL_SCRATCH_NAT6: PerCpuArray<PendingFlow, 1> = PerCpuArray::new();

/// Reads a field of the pending flow as the verifier must: from the map, not from what the
/// compiler remembers storing there.
#[inline(always)]
fn reread<T: Copy>(field: &T) -> T {
    // SAFETY: a reference to initialised map memory.
    unsafe { core::ptr::read_volatile(field) }
}

/// Offsets within the frame: the IPv6 addresses and the transport header right behind the fixed
/// header (extension headers are never translated).
const IP6_SRC: usize = ETH_HLEN + 8;
const IP6_DST: usize = ETH_HLEN + 24;
const L4: usize = ETH_HLEN + IPV6_HLEN;

/// `bpf_l4_csum_replace` flag (kernel 6.16+): the packet is IPv6, so with CHECKSUM_COMPLETE the
/// pseudo-header change is not added to `skb->csum` (the changed address is part of the bytes
/// that sum covers, unlike IPv4's, whose header checksum compensates). Not in aya's bindings yet.
const BPF_F_IPV6: u64 = 1 << 7;

/// Ports (or echo identifier) of an IPv6 packet whose transport header is `next_header`;
/// `egress` selects the acceptable echo type (requests go out, replies come in).
#[inline(always)]
fn transport(ctx: &TcContext, next_header: u8, egress: bool) -> Result<Transport, Counter> {
    match next_header {
        IPPROTO_TCP => Ok(Transport::tcp(L4, &skb::load::<TCP_PREFIX_LEN>(ctx, L4)?)),
        IPPROTO_UDP => Ok(Transport::udp(L4, &skb::load::<UDP_HEADER_LEN>(ctx, L4)?)),
        IPPROTO_ICMPV6 => {
            Transport::icmpv6_echo(L4, &skb::load::<ICMP_ECHO_HEADER_LEN>(ctx, L4)?, egress)
        }
        // Extension headers (fragments included) and other protocols.
        _ => Err(Counter::DropNatUnsupported),
    }
}

/// Whether an agent (this one, by either of its addresses, or a known VTEP) has this address.
#[inline(always)]
fn is_agent(cfg: &AgentConfig, nat: Option<&NatConfig>, dst: &Addr16) -> bool {
    *dst == cfg.underlay_ip
        || nat.is_some_and(|n| n.has_ipv6_source() && *dst == n.underlay_ip6)
        || is_known_vtep(*dst)
}

/// The checks of `guard::to_outside`, for IPv6: nothing to addresses that are no destination
/// (loopback, IPv4-mapped, link-local, multicast), no VXLAN to an agent, nothing to a protected
/// control-plane destination; a packet to an agent whose transport header hides behind
/// extension headers could be for any port, so it does not reach an agent at all.
#[inline(always)]
fn guard(
    ctx: &TcContext,
    cfg: &AgentConfig,
    nat: Option<&NatConfig>,
    ip: &Ipv6Header,
) -> Result<(), Counter> {
    if is_unroutable_destination6(&ip.dst) {
        return Err(Counter::DropNoRoute);
    }
    let agent = is_agent(cfg, nat, &ip.dst);
    let protocol = ip.next_header;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return if agent && is_ipv6_extension_header(protocol) {
            Err(Counter::DropControlPlane)
        } else {
            Ok(())
        };
    }
    let ports = skb::load::<4>(ctx, L4)?;
    let port = u16::from_be_bytes([ports[2], ports[3]]);
    if protocol == IPPROTO_UDP && port == cfg.vxlan_port && agent {
        return Err(Counter::DropContainerVxlan);
    }
    if is_protected(ip.dst, port, protocol)
        || (agent && is_protected(ProtectedKey::ANY_AGENT, port, protocol))
    {
        return Err(Counter::DropControlPlane);
    }
    Ok(())
}

/// A verified container's IPv6 packet (network `network`, counter slot `slot`: its endpoint's) to
/// outside every overlay: checked, then
/// left to the host stack (to this agent's own addresses, or from a network that does not
/// masquerade: IPv4's opt-out) or masqueraded.
#[inline(always)]
pub fn to_outside(
    ctx: &TcContext,
    cfg: &AgentConfig,
    ip: &Ipv6Header,
    (network, slot): (u32, u32),
) -> Result<i32, Drop> {
    // An IPv4 endpoint's address in IPv6 form (`::ffff:a.b.c.d`, the maps' key of its IPv4
    // address) passes anti-spoofing, but it is no IPv6 address of the container's: never on the
    // wire (RFC 4291 2.5.5.2), never a flow of ours.
    if ipv4_unmapped(&ip.src).is_some() {
        return Err(Counter::DropSpoofedSource.in_network(network));
    }
    let nat = nat_config();
    guard(ctx, cfg, nat, ip).in_network(network)?;
    let to_host = ip.dst == cfg.underlay_ip
        || nat.is_some_and(|n| n.has_ipv6_source() && ip.dst == n.underlay_ip6);
    if to_host || !masquerades(network) {
        count_in_slot(slot, Counter::PassedToHost, ctx.len());
        return Ok(TC_ACT_OK as i32);
    }
    // SAFETY: on success `masquerade_ipv6` takes the packet and this program ends here.
    unsafe { OVL_TAIL_CALLS.tail_call(ctx, tail_calls::MASQUERADE_IPV6) };
    // Its slot is empty until the loader has filled it.
    Err(Counter::DropNotReady.in_network(network))
}

/// `masquerade_ipv6`, tail-called by `to_outside` (its own stack: masquerade on top of the
/// IPv6 checks exceeds the verifier's 512 bytes). The sender was verified there; its endpoint
/// names the network again.
#[inline(always)]
pub fn try_masquerade(ctx: &TcContext) -> Result<i32, Drop> {
    let cfg = config().ok_or(Counter::DropNotReady)?;
    // Only what masquerade needs of the header (this program's stack is tight).
    let next_header = skb::load::<1>(ctx, ETH_HLEN + 6)?[0];
    let src = skb::load::<16>(ctx, IP6_SRC)?;
    let dst = skb::load::<16>(ctx, IP6_DST)?;
    let sender = endpoint(src).ok_or(Counter::DropSpoofedSource)?;
    let (network, slot) = (sender.network, sender.slot);
    masquerade(ctx, cfg, (next_header, &src, &dst), (network, slot)).in_network(network)
}

/// Adds the checksum difference `diff` of a pseudo-header address change to the transport
/// checksum at `check_at`.
#[inline(always)]
fn pseudo_header_changed(
    ctx: &TcContext,
    check_at: usize,
    diff: u32,
    zero_ok: u64,
) -> Result<(), Counter> {
    let flags = BPF_F_PSEUDO_HDR as u64 | zero_ok;
    if ctx
        .l4_csum_replace(check_at, 0, diff as u64, flags | BPF_F_IPV6)
        .is_ok()
    {
        return Ok(());
    }
    // A kernel without BPF_F_IPV6 refuses the flag; the checksum itself comes out the same.
    ctx.l4_csum_replace(check_at, 0, diff as u64, flags)
        .map_err(|_| Counter::DropMalformed)
}

/// Replaces the IPv6 address at `addr_at` (source or destination) and the transport port (or
/// echo identifier) at `port_at`, fixing the transport checksum at `check_at` for both (a zero
/// UDP checksum stays zero).
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    protocol: u8,
    (addr_at, old_addr, new_addr): (usize, &Addr16, &Addr16),
    (check_at, port_at): (usize, usize),
    (old_port, new_port): (u16, u16),
) -> Result<(), Counter> {
    let fail = |_| Counter::DropMalformed;
    let zero_ok = if protocol == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    pseudo_header_changed(ctx, check_at, addr16_csum_diff(old_addr, new_addr), zero_ok)?;
    ctx.store(addr_at, new_addr, 0).map_err(fail)?;
    ctx.l4_csum_replace(check_at, raw16(old_port), raw16(new_port), zero_ok | 2)
        .map_err(fail)?;
    ctx.store(port_at, &new_port.to_be_bytes(), 0).map_err(fail)
}

/// Rewrites the source of a container's IPv6 packet to the underlay's IPv6 address and a flow
/// port and sends it out of the underlay NIC.
#[inline(always)]
fn masquerade(
    ctx: &TcContext,
    cfg: &AgentConfig,
    (protocol, src, dst): (u8, &Addr16, &Addr16),
    (network, counter_slot): (u32, u32),
) -> Result<i32, Counter> {
    let nat = nat_config().ok_or(Counter::DropNotReady)?;
    if !nat.has_ipv6_source() {
        return Err(Counter::DropNat6NoAddress);
    }
    let t = transport(ctx, protocol, true)?;
    let slot = OVL_SCRATCH_NAT6
        .get_ptr_mut(0)
        .ok_or(Counter::DropNotReady)?;
    // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
    let flow = unsafe {
        *slot = PendingFlow {
            key: NatKey::egress(protocol, *src, t.src_port, *dst, t.dst_port),
            check_at: t.check_at as u32,
            port_at: t.src_port_at as u32,
            port: t.src_port as u32,
            tcp_flags: t.tcp_flags as u32,
        };
        &*slot
    };
    // From here on, only what the slot holds.
    let key = &flow.key;
    let now = now_ns();
    let out = match live(nat, key, now) {
        Some(e) => e,
        None => allocate::<PROBE_LIMIT_IPV6>(
            ctx,
            nat,
            key,
            &nat.underlay_ip6,
            network,
            cfg.vxlan_port,
            now,
        )?,
    };
    // The flow's own source (the underlay address when it was created): its replies are keyed
    // by it.
    // SAFETY: a pointer into the map value (see `nat::live`), read before `refresh` writes it.
    let (source, out_port) = unsafe { ((*out).addr, (*out).port) };
    refresh(key, out, now, reread(&flow.tcp_flags) as u8, true);
    let container = reread(&key.local);
    rewrite(
        ctx,
        reread(&key.protocol),
        (IP6_SRC, &container, &source),
        (
            reread(&flow.check_at) as usize,
            reread(&flow.port_at) as usize,
        ),
        (reread(&flow.port) as u16, out_port),
    )?;
    count_in_slot(counter_slot, Counter::Masqueraded, ctx.len());
    // SAFETY: plain helper call; the FIB picks the next hop of the outside address.
    Ok(unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

/// Translates an IPv6 packet from outside back to the container whose flow it answers:
/// `Ok(None)` when it answers none (the host's own traffic), a [`Drop`] when it does but cannot be
/// delivered.
#[inline(always)]
pub fn unmasquerade(ctx: &TcContext) -> Result<Option<i32>, Drop> {
    let Some(nat) = nat_config() else {
        return Ok(None);
    };
    if !nat.has_ipv6_source() {
        return Ok(None);
    }
    let Ok(header) = skb::load::<IPV6_HLEN>(ctx, ETH_HLEN) else {
        return Ok(None);
    };
    let Ok(ip) = Ipv6Header::parse(&header) else {
        return Ok(None);
    };
    if ip.dst != nat.underlay_ip6 {
        return Ok(None);
    }
    if ip.next_header == IPPROTO_ICMPV6 {
        let Ok(h) = skb::load::<1>(ctx, L4) else {
            return Ok(None);
        };
        if is_icmpv6_error(h[0]) {
            return icmp_error(ctx, nat, &ip);
        }
    }
    let Ok(t) = transport(ctx, ip.next_header, false) else {
        return Ok(None);
    };
    let (remote_port, local_port, local_port_at) = t.ingress_ports();
    let key = NatKey::ingress(ip.next_header, ip.src, remote_port, ip.dst, local_port);
    let now = now_ns();
    let Some(entry) = live(nat, &key, now) else {
        return Ok(None);
    };
    // SAFETY: a pointer into the map value (see `nat::live`), read before `refresh` writes it.
    let (network, port, container) = unsafe { ((*entry).network, (*entry).port, (*entry).addr) };
    let ep = endpoint(container)
        .ok_or(Counter::DropNoEndpoint)
        .in_network(network)?;
    refresh(&key, entry, now, t.tcp_flags, false);
    rewrite(
        ctx,
        ip.next_header,
        (IP6_DST, &ip.dst, &container),
        (t.check_at, local_port_at),
        (local_port, port),
    )
    .in_network(network)?;
    let verdict = deliver::to_endpoint(ctx, ep).in_network(network)?;
    count_in_slot(ep.slot, Counter::Unmasqueraded, ctx.len());
    Ok(Some(verdict))
}

/// An ICMPv6 error (destination unreachable, packet too big, time exceeded) about a masqueraded
/// flow: the quoted header is rewritten to the container's tuple (RFC 5508) so that path MTU
/// discovery and error reporting keep working, the error is readdressed to the container and
/// delivered.
#[inline(always)]
fn icmp_error(ctx: &TcContext, nat: &NatConfig, ip: &Ipv6Header) -> Result<Option<i32>, Drop> {
    let Ok(head) = skb::load::<4>(ctx, L4) else {
        return Ok(None);
    };
    let Ok(mut quote) = skb::load::<ICMPV6_QUOTE_LEN>(ctx, L4 + 8) else {
        return Ok(None);
    };
    let Some(flow) = quoted_flow6(&quote, &ip.dst) else {
        return Ok(None);
    };
    let key = NatKey::ingress(
        flow.protocol,
        flow.remote,
        flow.remote_port,
        ip.dst,
        flow.local_port,
    );
    let Some(back) = live(nat, &key, now_ns()) else {
        return Ok(None);
    };
    // SAFETY: a pointer into the map value (see `nat::live`), only read here.
    let back = unsafe { &*back };
    let network = back.network;
    let ep = endpoint(back.addr)
        .ok_or(Counter::DropNoEndpoint)
        .in_network(network)?;
    let container = back.addr;
    let check = rewrite_icmpv6_quote(
        u16::from_be_bytes([head[2], head[3]]),
        &mut quote,
        (&container, back.port),
        (&ip.dst, &container),
    );
    let fail = |_| Counter::DropMalformed.in_network(network);
    // Whole-field stores that keep a CHECKSUM_COMPLETE skb's sum right.
    let recompute = BPF_F_RECOMPUTE_CSUM as u64;
    ctx.store(L4 + 8, &quote, recompute).map_err(fail)?;
    ctx.store(L4 + 2, &check.to_be_bytes(), recompute)
        .map_err(fail)?;
    ctx.store(IP6_DST, &container, recompute).map_err(fail)?;
    let verdict = deliver::to_endpoint(ctx, ep).in_network(network)?;
    count_in_slot(ep.slot, Counter::Unmasqueraded, ctx.len());
    Ok(Some(verdict))
}
