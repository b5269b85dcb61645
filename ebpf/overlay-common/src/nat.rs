//! The pure parts of masquerade: where a packet's ports and checksums are, port candidates,
//! timeouts, the flow an ICMP error quotes, and the checksum arithmetic of rewriting a packet
//! (RFC 1624 incremental updates) and an ICMP error's embedded header (RFC 5508), for IPv4 and
//! IPv6 (whose transport checksums all cover the pseudo-header, ICMPv6's included), unit-tested
//! on the host.

use crate::{
    counters::Counter,
    ipv6::add_folding,
    maps::{Addr16, NatConfig, NatEntry},
    packet::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, Ipv4Header},
    policy::{IPPROTO_ICMPV6, IPV6_HLEN},
};

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;

pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// Whether an ICMPv6 type is an error masquerade translates back (RFC 4443): destination
/// unreachable, packet too big (path MTU discovery) and time exceeded.
#[inline(always)]
pub const fn is_icmpv6_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED
    )
}

/// Whether an ICMP type is an error that quotes the packet it is about (and so may be about a
/// masqueraded flow): destination unreachable (frag-needed included) and time exceeded.
#[inline(always)]
pub const fn is_icmp_error(icmp_type: u8) -> bool {
    icmp_type == ICMP_DEST_UNREACH || icmp_type == ICMP_TIME_EXCEEDED
}

/// Bytes of a TCP header masquerade reads: ports, sequence numbers and the flags byte.
pub const TCP_PREFIX_LEN: usize = 14;
/// Bytes of a UDP header, and of an ICMP echo header (type, code, checksum, id, sequence).
pub const UDP_HEADER_LEN: usize = 8;
pub const ICMP_ECHO_HEADER_LEN: usize = 8;

/// The transport facts of a packet that masquerade needs. Offsets count from the start of the
/// frame (the transport header is at `l4`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    /// Source port, or the echo identifier.
    pub src_port: u16,
    /// Destination port; 0 for ICMP echo.
    pub dst_port: u16,
    /// Offset of the transport checksum.
    pub check_at: usize,
    /// Offset of the source port (or identifier).
    pub src_port_at: usize,
    /// Offset of the destination port (the identifier for ICMP echo: it names the flow both
    /// ways).
    pub dst_port_at: usize,
    /// TCP flags (0 for UDP and ICMP).
    pub tcp_flags: u8,
    /// ICMP echo: the identifier stands for the local port in both directions.
    pub is_echo: bool,
}

impl Transport {
    /// A TCP segment whose header (its first [`TCP_PREFIX_LEN`] bytes, `h`) is at `l4`.
    #[inline(always)]
    pub const fn tcp(l4: usize, h: &[u8; TCP_PREFIX_LEN]) -> Transport {
        Transport {
            src_port: u16::from_be_bytes([h[0], h[1]]),
            dst_port: u16::from_be_bytes([h[2], h[3]]),
            check_at: l4 + 16,
            src_port_at: l4,
            dst_port_at: l4 + 2,
            tcp_flags: h[13],
            is_echo: false,
        }
    }

    /// A UDP datagram whose header `h` is at `l4`.
    #[inline(always)]
    pub const fn udp(l4: usize, h: &[u8; UDP_HEADER_LEN]) -> Transport {
        Transport {
            src_port: u16::from_be_bytes([h[0], h[1]]),
            dst_port: u16::from_be_bytes([h[2], h[3]]),
            check_at: l4 + 6,
            src_port_at: l4,
            dst_port_at: l4 + 2,
            tcp_flags: 0,
            is_echo: false,
        }
    }

    /// An ICMP echo whose header `h` is at `l4`: a request going out (`egress`), a reply coming
    /// back; any other ICMP message cannot be masqueraded as a flow of its own.
    #[inline(always)]
    pub const fn icmp_echo(
        l4: usize,
        h: &[u8; ICMP_ECHO_HEADER_LEN],
        egress: bool,
    ) -> Result<Transport, Counter> {
        Transport::echo(l4, h, egress, (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY))
    }

    /// An ICMPv6 echo (same layout as ICMP's, types 128 and 129).
    #[inline(always)]
    pub const fn icmpv6_echo(
        l4: usize,
        h: &[u8; ICMP_ECHO_HEADER_LEN],
        egress: bool,
    ) -> Result<Transport, Counter> {
        Transport::echo(l4, h, egress, (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY))
    }

    #[inline(always)]
    const fn echo(
        l4: usize,
        h: &[u8; ICMP_ECHO_HEADER_LEN],
        egress: bool,
        (request, reply): (u8, u8),
    ) -> Result<Transport, Counter> {
        let wanted = if egress { request } else { reply };
        if h[0] != wanted {
            return Err(Counter::DropNatUnsupported);
        }
        Ok(Transport {
            src_port: u16::from_be_bytes([h[4], h[5]]),
            dst_port: 0,
            check_at: l4 + 2,
            src_port_at: l4 + 4,
            dst_port_at: l4 + 4,
            tcp_flags: 0,
            is_echo: true,
        })
    }

    /// On a packet coming back (outside -> agent): the far end's port (0 for echo) and the
    /// translated local port with its offset (the echo identifier, else the destination port).
    #[inline(always)]
    pub const fn ingress_ports(&self) -> (u16, u16, usize) {
        if self.is_echo {
            (0, self.src_port, self.src_port_at)
        } else {
            (self.src_port, self.dst_port, self.dst_port_at)
        }
    }
}

/// The masqueraded flow an ICMP error is about, read from its quotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotedFlow {
    pub protocol: u8,
    /// Destination of the quoted packet: the far end.
    pub remote: [u8; 4],
    pub remote_port: u16,
    /// Source port (or echo identifier) of the quoted packet: the port masquerade allocated.
    pub local_port: u16,
}

/// The flow an ICMP error's quotation (`quote`: the quoted IPv4 header and 8 bytes after it)
/// names, if it is one masquerade could have sent from `underlay`: an IPv4 header without
/// options from that address, carrying TCP, UDP or an ICMP echo request.
#[inline(always)]
pub const fn quoted_flow(quote: &[u8; ICMP_QUOTE_LEN], underlay: [u8; 4]) -> Option<QuotedFlow> {
    let q = quote;
    let header: [u8; IPV4_HLEN] = [
        q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9], q[10], q[11], q[12], q[13],
        q[14], q[15], q[16], q[17], q[18], q[19],
    ];
    let Ok(inner) = Ipv4Header::parse(&header) else {
        return None;
    };
    if u32::from_be_bytes(inner.src) != u32::from_be_bytes(underlay)
        || inner.header_len != IPV4_HLEN
    {
        return None;
    }
    let (remote_port, local_port) = match inner.protocol {
        IPPROTO_TCP | IPPROTO_UDP => (
            u16::from_be_bytes([q[22], q[23]]),
            u16::from_be_bytes([q[20], q[21]]),
        ),
        IPPROTO_ICMP if q[20] == ICMP_ECHO_REQUEST => (0, u16::from_be_bytes([q[24], q[25]])),
        _ => return None,
    };
    Some(QuotedFlow {
        protocol: inner.protocol,
        remote: inner.dst,
        remote_port,
        local_port,
    })
}

/// The `attempt`-th port to try for a new flow: the container's own port first when it lies in
/// the range, otherwise a hash-chosen start, then linear probing; never `avoid` (the VXLAN port).
#[inline(always)]
pub fn port_candidate(
    cfg: &NatConfig,
    original: u16,
    flow_hash: u32,
    attempt: u32,
    avoid: u16,
) -> u16 {
    // Written without panicking operations: the kernel side cannot have a panic path.
    let (min, max) = (cfg.port_min as u32, cfg.port_max as u32);
    let size = max.saturating_sub(min).saturating_add(1);
    let start = if original as u32 >= min && original as u32 <= max {
        original as u32 - min
    } else {
        flow_hash.checked_rem(size).unwrap_or(0)
    };
    let offset = |n: u32| start.wrapping_add(n).checked_rem(size).unwrap_or(0);
    let mut port = min + offset(attempt);
    if port == avoid as u32 {
        port = min + offset(attempt.wrapping_add(1));
    }
    port as u16
}

/// TCP flag bits.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The handshake state of a masqueraded TCP flow after a segment with `tcp_flags`, `egress`
/// (container -> outside) or not: SYN out, SYN-ACK back, ACK out makes it established (as
/// conntrack's SYN_SENT -> SYN_RECV -> ESTABLISHED); FIN or RST makes it closing. Anything out of
/// order (a bare ACK first, a SYN-ACK nobody asked for) leaves it where it was.
#[inline(always)]
pub const fn tcp_track(flags: u16, tcp_flags: u8, egress: bool) -> u16 {
    let mut f = flags;
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        f |= NatEntry::FLAG_CLOSING;
    }
    let syn_ack = tcp_flags & (TCP_SYN | TCP_ACK);
    if egress && syn_ack == TCP_SYN {
        f |= NatEntry::FLAG_SYN_SENT;
    } else if !egress && syn_ack == TCP_SYN | TCP_ACK && f & NatEntry::FLAG_SYN_SENT != 0 {
        f |= NatEntry::FLAG_SYN_ACKED;
    } else if egress && syn_ack == TCP_ACK && f & NatEntry::FLAG_SYN_ACKED != 0 {
        f |= NatEntry::FLAG_ESTABLISHED;
    }
    f
}

/// Whether a container with `flows` live flows towards a destination may open another.
#[inline(always)]
pub const fn within_quota(cfg: &NatConfig, flows: u32) -> bool {
    cfg.max_flows_per_destination == 0 || flows < cfg.max_flows_per_destination
}

/// How long an idle entry of `protocol` lives, in nanoseconds.
#[inline(always)]
pub fn timeout_ns(cfg: &NatConfig, protocol: u8, flags: u16) -> u64 {
    let seconds = match protocol {
        IPPROTO_TCP if flags & NatEntry::FLAG_CLOSING != 0 => cfg.tcp_closing_timeout_s,
        IPPROTO_TCP if flags & NatEntry::FLAG_ESTABLISHED != 0 => cfg.tcp_timeout_s,
        IPPROTO_TCP => cfg.tcp_handshake_timeout_s,
        IPPROTO_UDP => cfg.udp_timeout_s,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => cfg.icmp_timeout_s,
        _ => cfg.udp_timeout_s,
    };
    seconds as u64 * 1_000_000_000
}

/// Whether an entry last seen at `last_seen_ns` is expired at `now_ns`.
#[inline(always)]
pub fn is_expired(cfg: &NatConfig, protocol: u8, entry: &NatEntry, now_ns: u64) -> bool {
    now_ns.saturating_sub(entry.last_seen_ns) > timeout_ns(cfg, protocol, entry.flags)
}

/// Folds a 32-bit ones'-complement sum to 16 bits.
#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changes from `old` to `new`.
#[inline(always)]
pub const fn csum_replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// The checksum after a 4-byte field changes.
#[inline(always)]
pub const fn csum_replace32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let c = csum_replace16(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    csum_replace16(
        c,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

/// Bytes of an ICMP error's quotation that masquerade rewrites: the embedded IPv4 header
/// (without options) and the first 8 bytes of its transport header.
pub const ICMP_QUOTE_LEN: usize = 28;

/// Rewrites the quotation of an ICMP error about a masqueraded flow so that the container sees
/// its own packet quoted: source address and port (or echo identifier) back to the container's,
/// the quoted IPv4 checksum and (UDP, when not zero) the quoted UDP checksum adjusted. Returns the
/// ICMP checksum adjusted for every changed byte (ICMPv4 has no pseudo-header).
#[inline(always)]
pub fn rewrite_icmp_quote(
    icmp_check: u16,
    quote: &mut [u8; ICMP_QUOTE_LEN],
    new_src: [u8; 4],
    new_port: u16,
) -> u16 {
    let before = *quote;
    let old_src = [quote[12], quote[13], quote[14], quote[15]];
    let protocol = quote[9];
    // Quoted IPv4 header: source address, then its checksum.
    quote[12..16].copy_from_slice(&new_src);
    let ip_check = csum_replace32(u16::from_be_bytes([quote[10], quote[11]]), old_src, new_src);
    quote[10..12].copy_from_slice(&ip_check.to_be_bytes());
    // Quoted transport header: the source port is at 20..22 for TCP and UDP; the echo
    // identifier of a quoted ICMP echo request is at 24..26. (Constant indices only: no panic
    // path may reach the kernel side.)
    let new = new_port.to_be_bytes();
    let old_port = if protocol == IPPROTO_ICMP {
        let old = u16::from_be_bytes([quote[24], quote[25]]);
        quote[24] = new[0];
        quote[25] = new[1];
        old
    } else {
        let old = u16::from_be_bytes([quote[20], quote[21]]);
        quote[20] = new[0];
        quote[21] = new[1];
        old
    };
    if protocol == IPPROTO_UDP {
        let udp_check = u16::from_be_bytes([quote[26], quote[27]]);
        if udp_check != 0 {
            // The UDP checksum covers the pseudo-header's source address and the port.
            let c = csum_replace32(udp_check, old_src, new_src);
            let c = csum_replace16(c, old_port, new_port);
            quote[26..28].copy_from_slice(&c.to_be_bytes());
        }
    } else if protocol == IPPROTO_ICMP {
        // The quoted echo request's own checksum covers its identifier.
        let c = csum_replace16(
            u16::from_be_bytes([quote[22], quote[23]]),
            old_port,
            new_port,
        );
        quote[22..24].copy_from_slice(&c.to_be_bytes());
    }
    let mut check = icmp_check;
    let mut i = 0;
    while i < ICMP_QUOTE_LEN {
        let old = u16::from_be_bytes([before[i], before[i + 1]]);
        let new = u16::from_be_bytes([quote[i], quote[i + 1]]);
        if old != new {
            check = csum_replace16(check, old, new);
        }
        i += 2;
    }
    check
}

/// The masqueraded IPv6 flow an ICMPv6 error is about, read from its quotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotedFlow6 {
    pub protocol: u8,
    /// Destination of the quoted packet: the far end.
    pub remote: Addr16,
    pub remote_port: u16,
    /// Source port (or echo identifier) of the quoted packet: the port masquerade allocated.
    pub local_port: u16,
}

/// Bytes of an ICMPv6 error's quotation that masquerade reads and rewrites: the embedded IPv6
/// header and the first 8 bytes of its transport header.
pub const ICMPV6_QUOTE_LEN: usize = IPV6_HLEN + 8;

#[inline(always)]
const fn addr_at(b: &[u8; ICMPV6_QUOTE_LEN], at: usize) -> Addr16 {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        a[i] = b[at + i];
        i += 1;
    }
    a
}

#[inline(always)]
const fn same_addr(a: &Addr16, b: &Addr16) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The flow an ICMPv6 error's quotation names, if it is one masquerade could have sent from
/// `underlay`: an IPv6 packet from that address whose transport header follows the fixed header
/// (TCP, UDP or an ICMPv6 echo request).
#[inline(always)]
pub const fn quoted_flow6(
    quote: &[u8; ICMPV6_QUOTE_LEN],
    underlay: &Addr16,
) -> Option<QuotedFlow6> {
    let q = quote;
    if q[0] >> 4 != 6 {
        return None;
    }
    let src = addr_at(q, 8);
    if !same_addr(&src, underlay) {
        return None;
    }
    let protocol = q[6];
    let (remote_port, local_port) = match protocol {
        IPPROTO_TCP | IPPROTO_UDP => (
            u16::from_be_bytes([q[42], q[43]]),
            u16::from_be_bytes([q[40], q[41]]),
        ),
        IPPROTO_ICMPV6 if q[40] == ICMPV6_ECHO_REQUEST => (0, u16::from_be_bytes([q[44], q[45]])),
        _ => return None,
    };
    Some(QuotedFlow6 {
        protocol,
        remote: addr_at(q, 24),
        remote_port,
        local_port,
    })
}

/// The checksum after a 16-byte address in its coverage changes (RFC 1624, word by word).
#[inline(always)]
pub const fn csum_replace_addr16(check: u16, old: &Addr16, new: &Addr16) -> u16 {
    let mut c = check;
    let mut i = 0;
    while i < 16 {
        c = csum_replace16(
            c,
            u16::from_be_bytes([old[i], old[i + 1]]),
            u16::from_be_bytes([new[i], new[i + 1]]),
        );
        i += 2;
    }
    c
}

/// The checksum difference of replacing `old` by `new` (a 16-byte address) as the kernel's
/// checksum helpers take it (`bpf_l4_csum_replace` with a size of 0: the sum of the words in
/// memory order, `~old + new`), for an IPv6 address in a pseudo-header.
#[inline(always)]
pub const fn addr16_csum_diff(old: &Addr16, new: &Addr16) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 16 {
        let o = u16::from_ne_bytes([old[i], old[i + 1]]);
        let n = u16::from_ne_bytes([new[i], new[i + 1]]);
        sum = add_folding(sum, !o as u32);
        sum = add_folding(sum, n as u32);
        i += 2;
    }
    sum
}

/// Rewrites the quotation of an ICMPv6 error about a masqueraded flow so that the container sees
/// its own packet quoted: the quoted source address and port (or echo identifier) back to the
/// container's, the quoted UDP checksum (when not zero) or ICMPv6 echo checksum adjusted (both
/// cover the quoted source through the pseudo-header). Returns the error's own ICMPv6 checksum
/// adjusted for every changed quote byte and for its destination changing from `outer_dst.0` to
/// `outer_dst.1` (the pseudo-header of the error itself).
#[inline(always)]
pub fn rewrite_icmpv6_quote(
    icmp_check: u16,
    quote: &mut [u8; ICMPV6_QUOTE_LEN],
    (new_src, new_port): (&Addr16, u16),
    outer_dst: (&Addr16, &Addr16),
) -> u16 {
    let before = *quote;
    let old_src = addr_at(quote, 8);
    let protocol = quote[6];
    quote[8..24].copy_from_slice(new_src);
    let new = new_port.to_be_bytes();
    // Constant indices only (no panic path may reach the kernel side).
    let (old_port, check_at) = if protocol == IPPROTO_ICMPV6 {
        let old = u16::from_be_bytes([quote[44], quote[45]]);
        quote[44] = new[0];
        quote[45] = new[1];
        (old, 42)
    } else {
        let old = u16::from_be_bytes([quote[40], quote[41]]);
        quote[40] = new[0];
        quote[41] = new[1];
        // TCP's checksum lies beyond the 8 quoted bytes: nobody can check it (RFC 5508 4.2).
        (old, 46)
    };
    if protocol != IPPROTO_TCP {
        let c = u16::from_be_bytes([quote[check_at], quote[check_at + 1]]);
        if c != 0 || protocol == IPPROTO_ICMPV6 {
            let c = csum_replace_addr16(c, &old_src, new_src);
            let c = csum_replace16(c, old_port, new_port).to_be_bytes();
            if check_at == 42 {
                quote[42] = c[0];
                quote[43] = c[1];
            } else {
                quote[46] = c[0];
                quote[47] = c[1];
            }
        }
    }
    let mut check = csum_replace_addr16(icmp_check, outer_dst.0, outer_dst.1);
    let mut i = 0;
    while i < ICMPV6_QUOTE_LEN {
        let old = u16::from_be_bytes([before[i], before[i + 1]]);
        let new = u16::from_be_bytes([quote[i], quote[i + 1]]);
        if old != new {
            check = csum_replace16(check, old, new);
        }
        i += 2;
    }
    check
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    use crate::packet::ipv4_header_checksum;

    fn cfg() -> NatConfig {
        NatConfig {
            port_min: 61000,
            port_max: 61009,
            max_probes: 16,
            tcp_timeout_s: 7440,
            tcp_closing_timeout_s: 10,
            udp_timeout_s: 120,
            icmp_timeout_s: 60,
            tcp_handshake_timeout_s: 30,
            max_flows_per_destination: 4,
            underlay_broadcast: [0; 4],
            ..Default::default()
        }
    }

    #[test]
    fn only_a_full_handshake_makes_tcp_established() {
        let syn = TCP_SYN;
        let syn_ack = TCP_SYN | TCP_ACK;
        let ack = TCP_ACK;
        let est = NatEntry::FLAG_ESTABLISHED;
        let f = tcp_track(0, syn, true);
        let f = tcp_track(f, syn_ack, false);
        assert_eq!(f & est, 0, "not before the container's ACK");
        let f = tcp_track(f, ack, true);
        assert_ne!(f & est, 0);
        assert_eq!(tcp_track(0, ack, true) & est, 0, "a bare ACK");
        assert_eq!(tcp_track(tcp_track(0, ack, true), ack, true) & est, 0);
        assert_eq!(tcp_track(0, syn, true) & est, 0, "SYN only");
        assert_eq!(
            tcp_track(tcp_track(0, syn_ack, false), ack, true) & est,
            0,
            "an unsolicited SYN-ACK"
        );
        // SYN-ACK going out (the container as server) is no handshake of ours either.
        assert_eq!(tcp_track(tcp_track(0, syn, true), syn_ack, true) & est, 0);
        assert_ne!(tcp_track(0, TCP_RST, true) & NatEntry::FLAG_CLOSING, 0);
        // Timeouts follow the state.
        let c = cfg();
        let t = |flags| timeout_ns(&c, IPPROTO_TCP, flags) / 1_000_000_000;
        assert_eq!(t(0), 30);
        assert_eq!(t(NatEntry::FLAG_SYN_SENT | NatEntry::FLAG_SYN_ACKED), 30);
        assert_eq!(t(est), 7440);
        assert_eq!(t(est | NatEntry::FLAG_CLOSING), 10);
    }

    #[test]
    fn quota_counts_live_flows() {
        let mut c = cfg();
        assert!(within_quota(&c, 3));
        assert!(!within_quota(&c, 4));
        c.max_flows_per_destination = 0;
        assert!(within_quota(&c, u32::MAX), "0: no limit");
    }

    /// RFC 1071 checksum of a byte string (odd length padded).
    fn full(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for chunk in data.chunks(2) {
            let w = if chunk.len() == 2 {
                u16::from_be_bytes([chunk[0], chunk[1]])
            } else {
                (chunk[0] as u16) << 8
            };
            sum += w as u32;
        }
        !fold(sum)
    }

    #[test]
    fn candidates_keep_the_original_port_in_range_probe_linearly_and_avoid_vxlan() {
        let c = cfg();
        assert_eq!(port_candidate(&c, 61003, 0, 0, 64000), 61003);
        assert_eq!(port_candidate(&c, 61003, 0, 1, 64000), 61004);
        assert_eq!(port_candidate(&c, 61009, 0, 1, 64000), 61000, "wraps");
        assert_eq!(
            port_candidate(&c, 40000, 7, 0, 64000),
            61007,
            "out of range: hashed start"
        );
        assert_eq!(
            port_candidate(&c, 61003, 0, 0, 61003),
            61004,
            "never the VXLAN port"
        );
        for a in 0..100 {
            let p = port_candidate(&c, 12345, 0xdead_beef, a, 64000);
            assert!((61000..=61009).contains(&p));
        }
    }

    #[test]
    fn timeouts_by_protocol_and_closing() {
        let c = cfg();
        let mut e = NatEntry {
            last_seen_ns: 1_000_000_000,
            ..Default::default()
        };
        assert!(!is_expired(&c, IPPROTO_UDP, &e, 100_000_000_000));
        assert!(is_expired(&c, IPPROTO_UDP, &e, 122_000_000_000));
        e.flags = NatEntry::FLAG_ESTABLISHED;
        assert!(!is_expired(&c, IPPROTO_TCP, &e, 122_000_000_000));
        e.flags = NatEntry::FLAG_CLOSING;
        assert!(is_expired(&c, IPPROTO_TCP, &e, 12_000_000_000));
    }

    #[test]
    fn incremental_updates_match_recomputation() {
        let mut h: [u8; 20] = [
            0x45, 0, 0, 84, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0, 9, 0, 1, 2, 192, 0, 2, 7,
        ];
        let c = ipv4_header_checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let updated = csum_replace32(c, [9, 0, 1, 2], [10, 250, 0, 11]);
        h[12..16].copy_from_slice(&[10, 250, 0, 11]);
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, ipv4_header_checksum(&h));
    }

    #[test]
    fn transport_fields_sit_where_each_protocol_has_them() {
        let l4 = 14 + 20;
        let mut tcp = [0u8; TCP_PREFIX_LEN];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&443u16.to_be_bytes());
        tcp[13] = TCP_SYN;
        let t = Transport::tcp(l4, &tcp);
        assert_eq!((t.src_port, t.dst_port, t.tcp_flags), (40000, 443, TCP_SYN));
        assert_eq!((t.src_port_at, t.dst_port_at, t.check_at), (34, 36, 50));
        assert_eq!(t.ingress_ports(), (40000, 443, 36));
        let mut udp = [0u8; UDP_HEADER_LEN];
        udp[0..2].copy_from_slice(&53u16.to_be_bytes());
        udp[2..4].copy_from_slice(&61000u16.to_be_bytes());
        let u = Transport::udp(l4, &udp);
        assert_eq!((u.src_port, u.dst_port, u.tcp_flags), (53, 61000, 0));
        assert_eq!((u.src_port_at, u.dst_port_at, u.check_at), (34, 36, 40));
        // A reply from port 53 to our port 61000: remote 53, local 61000 at the destination port.
        assert_eq!(u.ingress_ports(), (53, 61000, 36));
        let echo = [ICMP_ECHO_REQUEST, 0, 0xab, 0xcd, 0x12, 0x34, 0, 1];
        let e = Transport::icmp_echo(l4, &echo, true).unwrap();
        assert_eq!(
            (e.src_port, e.dst_port, e.src_port_at, e.check_at),
            (0x1234, 0, 38, 36)
        );
        assert_eq!(
            Transport::icmp_echo(l4, &echo, false),
            Err(Counter::DropNatUnsupported),
            "a request coming in is no reply to a flow of ours"
        );
        let reply = [ICMP_ECHO_REPLY, 0, 0, 0, 0xf0, 0x01, 0, 1];
        let r = Transport::icmp_echo(l4, &reply, false).unwrap();
        assert_eq!(
            r.ingress_ports(),
            (0, 0xf001, 38),
            "the identifier names the flow"
        );
        assert_eq!(
            Transport::icmp_echo(l4, &reply, true),
            Err(Counter::DropNatUnsupported)
        );
        assert!(is_icmp_error(ICMP_DEST_UNREACH) && is_icmp_error(ICMP_TIME_EXCEEDED));
        assert!(
            !is_icmp_error(ICMP_ECHO_REPLY) && !is_icmp_error(5),
            "redirect"
        );
    }

    /// A quotation of a packet from `src` to 192.0.2.7 with `l4` as its first 8 transport bytes.
    fn quote_of(src: [u8; 4], protocol: u8, l4: [u8; 8]) -> [u8; ICMP_QUOTE_LEN] {
        let mut ip: [u8; 20] = [
            0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, protocol, 0, 0, 0, 0, 0, 0, 192, 0, 2, 7,
        ];
        ip[12..16].copy_from_slice(&src);
        let c = ipv4_header_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut q = [0u8; ICMP_QUOTE_LEN];
        q[..20].copy_from_slice(&ip);
        q[20..].copy_from_slice(&l4);
        q
    }

    #[test]
    fn quoted_flows_are_read_only_from_our_own_packets() {
        let underlay = [10, 250, 0, 11];
        let ports = [0xee, 0x48, 0x23, 0x28, 0, 20, 0, 0]; // 61000 -> 9000
        let udp = quote_of(underlay, IPPROTO_UDP, ports);
        assert_eq!(
            quoted_flow(&udp, underlay),
            Some(QuotedFlow {
                protocol: IPPROTO_UDP,
                remote: [192, 0, 2, 7],
                remote_port: 9000,
                local_port: 61000,
            })
        );
        let tcp = quote_of(underlay, IPPROTO_TCP, ports);
        assert_eq!(
            quoted_flow(&tcp, underlay).map(|f| f.protocol),
            Some(IPPROTO_TCP)
        );
        let echo = quote_of(underlay, IPPROTO_ICMP, [8, 0, 0, 0, 0xf0, 0x01, 0, 1]);
        let f = quoted_flow(&echo, underlay).unwrap();
        assert_eq!((f.remote_port, f.local_port), (0, 0xf001));
        // Not ours to translate: another source, an echo reply, another protocol, options, junk.
        assert_eq!(
            quoted_flow(&quote_of([10, 250, 0, 12], IPPROTO_UDP, ports), underlay),
            None
        );
        assert_eq!(
            quoted_flow(
                &quote_of(underlay, IPPROTO_ICMP, [0, 0, 0, 0, 0xf0, 1, 0, 1]),
                underlay
            ),
            None
        );
        assert_eq!(
            quoted_flow(&quote_of(underlay, 47, ports), underlay),
            None,
            "GRE"
        );
        let mut options = udp;
        options[0] = 0x46;
        assert_eq!(quoted_flow(&options, underlay), None);
        let mut not_ipv4 = udp;
        not_ipv4[0] = 0x65;
        assert_eq!(quoted_flow(&not_ipv4, underlay), None);
    }

    #[test]
    fn icmp_error_quote_is_rewritten_with_every_checksum_right() {
        // An ICMP frag-needed error (type 3 code 4, MTU 1300) quoting a masqueraded UDP packet
        // 10.250.0.11:61005 -> 192.0.2.7:9000, plus 4 more quoted payload bytes.
        let mut inner_ip: [u8; 20] = [
            0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 250, 0, 11, 192, 0, 2, 7,
        ];
        let c = ipv4_header_checksum(&inner_ip);
        inner_ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut udp = [0u8; 8];
        udp[0..2].copy_from_slice(&61005u16.to_be_bytes());
        udp[2..4].copy_from_slice(&9000u16.to_be_bytes());
        udp[4..6].copy_from_slice(&20u16.to_be_bytes());
        let payload = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let udp_sum = |src: [u8; 4], udp: &[u8; 8]| {
            let mut pseudo = vec![];
            pseudo.extend_from_slice(&src);
            pseudo.extend_from_slice(&[192, 0, 2, 7, 0, 17, 0, 20]);
            let mut u = *udp;
            u[6] = 0;
            u[7] = 0;
            pseudo.extend_from_slice(&u);
            pseudo.extend_from_slice(&payload);
            full(&pseudo)
        };
        let s = udp_sum([10, 250, 0, 11], &udp);
        udp[6..8].copy_from_slice(&s.to_be_bytes());
        let mut icmp = vec![3u8, 4, 0, 0, 0, 0, 0x05, 0x14];
        icmp.extend_from_slice(&inner_ip);
        icmp.extend_from_slice(&udp);
        icmp.extend_from_slice(&payload[..4]);
        let c = full(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());

        let mut quote: [u8; ICMP_QUOTE_LEN] = icmp[8..36].try_into().unwrap();
        let new_check = rewrite_icmp_quote(c, &mut quote, [9, 0, 1, 2], 40000);
        icmp[8..36].copy_from_slice(&quote);
        icmp[2..4].copy_from_slice(&new_check.to_be_bytes());
        assert_eq!(full(&icmp), 0, "ICMP checksum of the rewritten error");
        let ip: [u8; 20] = icmp[8..28].try_into().unwrap();
        assert_eq!(&ip[12..16], &[9, 0, 1, 2]);
        assert_eq!(full(&ip), 0, "quoted IPv4 checksum");
        assert_eq!(&icmp[28..30], &40000u16.to_be_bytes());
        let mut rewritten_udp: [u8; 8] = icmp[28..36].try_into().unwrap();
        let got = u16::from_be_bytes([rewritten_udp[6], rewritten_udp[7]]);
        rewritten_udp[6] = 0;
        assert_eq!(
            got,
            udp_sum([9, 0, 1, 2], &rewritten_udp),
            "quoted UDP checksum"
        );
    }

    fn a6(s: &str) -> Addr16 {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    /// The RFC 8200 8.1 pseudo-header sum input for an upper-layer packet of `len` bytes.
    fn pseudo6(src: &Addr16, dst: &Addr16, next: u8, body: &[u8]) -> std::vec::Vec<u8> {
        let mut p = vec![];
        p.extend_from_slice(src);
        p.extend_from_slice(dst);
        p.extend_from_slice(&(body.len() as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, next]);
        p.extend_from_slice(body);
        p
    }

    /// An IPv6 packet (fixed header only) carrying `body`.
    fn ipv6_packet(src: &Addr16, dst: &Addr16, next: u8, body: &[u8]) -> std::vec::Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(body.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(src);
        p.extend_from_slice(dst);
        p.extend_from_slice(body);
        p
    }

    /// A UDP datagram over IPv6 with its checksum right.
    fn udp6(src: &Addr16, dst: &Addr16, sport: u16, dport: u16) -> std::vec::Vec<u8> {
        let mut u = vec![];
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&20u16.to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(&[9u8; 12]);
        let c = full(&pseudo6(src, dst, IPPROTO_UDP, &u));
        u[6..8].copy_from_slice(&c.to_be_bytes());
        u
    }

    /// An ICMPv6 echo request with its checksum right.
    fn echo6(src: &Addr16, dst: &Addr16, id: u16) -> std::vec::Vec<u8> {
        let mut m = vec![ICMPV6_ECHO_REQUEST, 0, 0, 0];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0xaa, 0xbb, 0xcc]);
        let c = full(&pseudo6(src, dst, IPPROTO_ICMPV6, &m));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    #[test]
    fn icmpv6_echo_and_errors_are_recognised() {
        let l4 = 14 + 40;
        let req = [ICMPV6_ECHO_REQUEST, 0, 0xab, 0xcd, 0x12, 0x34, 0, 1];
        let e = Transport::icmpv6_echo(l4, &req, true).unwrap();
        assert_eq!((e.src_port, e.src_port_at, e.check_at), (0x1234, 58, 56));
        assert!(Transport::icmpv6_echo(l4, &req, false).is_err());
        let reply = [ICMPV6_ECHO_REPLY, 0, 0, 0, 0xf0, 0x01, 0, 1];
        let r = Transport::icmpv6_echo(l4, &reply, false).unwrap();
        assert_eq!(r.ingress_ports(), (0, 0xf001, 58));
        assert!(Transport::icmpv6_echo(l4, &reply, true).is_err());
        // ICMPv4's echo types mean nothing in ICMPv6 and the other way round.
        assert!(Transport::icmpv6_echo(l4, &[8, 0, 0, 0, 0, 1, 0, 1], true).is_err());
        assert!(Transport::icmp_echo(l4, &req, true).is_err());
        for t in [1, 2, 3] {
            assert!(is_icmpv6_error(t), "{t}");
        }
        for t in [0, 4, 128, 129, 135, 137] {
            assert!(!is_icmpv6_error(t), "{t}");
        }
        let c = cfg();
        assert_eq!(timeout_ns(&c, IPPROTO_ICMPV6, 0), 60_000_000_000, "ICMP's");
    }

    #[test]
    fn an_address_diff_applied_as_the_kernel_does_matches_recomputation() {
        let (old, new) = (a6("fd01:b::2"), a6("fd00:fab::11"));
        let dst = a6("fd00:fab::fe");
        let before = udp6(&old, &dst, 40000, 9000);
        let after = udp6(&new, &dst, 40000, 9000);
        let check = u16::from_be_bytes([before[6], before[7]]);
        // inet_proto_csum_replace_by_diff: *sum = csum_fold(csum_add(diff, ~csum_unfold(*sum))),
        // on the field as it sits in memory.
        let field = u16::from_ne_bytes(check.to_be_bytes()) as u32;
        let folded = !crate::ipv6::fold(add_folding(addr16_csum_diff(&old, &new), !field));
        let updated = u16::from_be_bytes(folded.to_ne_bytes());
        assert_eq!(updated, u16::from_be_bytes([after[6], after[7]]));
        assert_eq!(
            csum_replace_addr16(check, &old, &new),
            updated,
            "the network-order update agrees"
        );
        assert_eq!(
            addr16_csum_diff(&old, &old) % 0xffff,
            0,
            "no change, no difference"
        );
    }

    #[test]
    fn quoted_ipv6_flows_are_read_only_from_our_own_packets() {
        let underlay = a6("fd00:fab::11");
        let far = a6("fd00:fab::fe");
        let quote = |p: std::vec::Vec<u8>| -> [u8; ICMPV6_QUOTE_LEN] {
            p[..ICMPV6_QUOTE_LEN].try_into().unwrap()
        };
        let udp = quote(ipv6_packet(
            &underlay,
            &far,
            IPPROTO_UDP,
            &udp6(&underlay, &far, 61000, 9000),
        ));
        assert_eq!(
            quoted_flow6(&udp, &underlay),
            Some(QuotedFlow6 {
                protocol: IPPROTO_UDP,
                remote: far,
                remote_port: 9000,
                local_port: 61000,
            })
        );
        let mut tcp = udp;
        tcp[6] = IPPROTO_TCP;
        assert_eq!(
            quoted_flow6(&tcp, &underlay).map(|f| f.protocol),
            Some(IPPROTO_TCP)
        );
        let echo = quote(ipv6_packet(
            &underlay,
            &far,
            IPPROTO_ICMPV6,
            &echo6(&underlay, &far, 0xf001),
        ));
        let f = quoted_flow6(&echo, &underlay).unwrap();
        assert_eq!(
            (f.protocol, f.remote_port, f.local_port),
            (IPPROTO_ICMPV6, 0, 0xf001)
        );
        // Not ours: another source, an echo reply, a fragment header in front, not IPv6.
        let other = a6("fd00:fab::12");
        let theirs = quote(ipv6_packet(
            &other,
            &far,
            IPPROTO_UDP,
            &udp6(&other, &far, 61000, 9000),
        ));
        assert_eq!(quoted_flow6(&theirs, &underlay), None);
        let mut reply = echo;
        reply[40] = ICMPV6_ECHO_REPLY;
        assert_eq!(quoted_flow6(&reply, &underlay), None);
        let mut fragment = udp;
        fragment[6] = 44;
        assert_eq!(quoted_flow6(&fragment, &underlay), None);
        let mut v4 = udp;
        v4[0] = 0x45;
        assert_eq!(quoted_flow6(&v4, &underlay), None);
    }

    /// An ICMPv6 error of `icmp_type` from `router` to `to` quoting `quoted` (as much as given).
    fn icmpv6_error(
        router: &Addr16,
        to: &Addr16,
        icmp_type: u8,
        quoted: &[u8],
    ) -> std::vec::Vec<u8> {
        let mut m = vec![icmp_type, 0, 0, 0, 0, 0, 0x05, 0x00];
        m.extend_from_slice(quoted);
        let c = full(&pseudo6(router, to, IPPROTO_ICMPV6, &m));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    #[test]
    fn icmpv6_error_quote_is_rewritten_with_every_checksum_right() {
        let underlay = a6("fd00:fab::11");
        let far = a6("fd00:fab::fe");
        let router = a6("fd00:fab::1");
        let container = a6("fd01:b::2");
        for protocol in [IPPROTO_UDP, IPPROTO_ICMPV6, IPPROTO_TCP] {
            let l4 = match protocol {
                IPPROTO_UDP => udp6(&underlay, &far, 61005, 9000),
                IPPROTO_ICMPV6 => echo6(&underlay, &far, 61005),
                _ => {
                    let mut t = udp6(&underlay, &far, 61005, 9000);
                    t.truncate(8);
                    t
                }
            };
            let inner = ipv6_packet(&underlay, &far, protocol, &l4);
            let mut error = icmpv6_error(&router, &underlay, ICMPV6_PACKET_TOO_BIG, &inner);
            let check = u16::from_be_bytes([error[2], error[3]]);
            let mut quote: [u8; ICMPV6_QUOTE_LEN] =
                error[8..8 + ICMPV6_QUOTE_LEN].try_into().unwrap();
            let new_check = rewrite_icmpv6_quote(
                check,
                &mut quote,
                (&container, 40000),
                (&underlay, &container),
            );
            error[8..8 + ICMPV6_QUOTE_LEN].copy_from_slice(&quote);
            error[2..4].copy_from_slice(&new_check.to_be_bytes());
            assert_eq!(
                full(&pseudo6(&router, &container, IPPROTO_ICMPV6, &error)),
                0,
                "protocol {protocol}: the error's own checksum, to the container"
            );
            let quoted = &error[8..];
            assert_eq!(&quoted[8..24], &container, "quoted source");
            assert_eq!(&quoted[24..40], &far, "quoted destination untouched");
            let port_at = if protocol == IPPROTO_ICMPV6 { 44 } else { 40 };
            assert_eq!(&quoted[port_at..port_at + 2], &40000u16.to_be_bytes());
            if protocol != IPPROTO_TCP {
                assert_eq!(
                    full(&pseudo6(&container, &far, protocol, &quoted[40..])),
                    0,
                    "protocol {protocol}: the quoted packet's checksum, as the container sent it"
                );
            }
        }
    }
}
