//! What a container may never send, whatever its destination: the pure checks behind the
//! datapath's guards (VLAN tags, VXLAN smuggled through masquerade, IPv6 extension headers),
//! unit-tested on the host.

/// 802.1Q (C-tag).
pub const ETH_P_8021Q: u16 = 0x8100;
/// 802.1ad (S-tag, QinQ).
pub const ETH_P_8021AD: u16 = 0x88a8;
/// The pre-standard QinQ tag some switches still accept.
pub const ETH_P_QINQ_LEGACY: u16 = 0x9100;

/// Whether an in-band ethertype is a VLAN tag. (A tag the kernel already stripped into the skb's
/// metadata is seen through `__sk_buff.vlan_present` instead; both must be refused.)
#[inline(always)]
pub const fn is_vlan_ethertype(ethertype: u16) -> bool {
    matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_LEGACY)
}

/// Whether a frame carries a VLAN tag, in band or as skb metadata (`vlan_present`, with the tag's
/// protocol in `vlan_proto`, both as `__sk_buff` gives them).
#[inline(always)]
pub const fn is_vlan_tagged(ethertype: u16, vlan_present: u32, vlan_proto: u32) -> bool {
    vlan_present != 0 || is_vlan_ethertype(ethertype) || is_vlan_ethertype(vlan_proto as u16)
}

/// IPv6 next-header value of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;
/// Length of the fixed IPv6 header.
pub const IPV6_HLEN: usize = 40;
/// ICMPv6 types (RFC 4861) a container may never send: the RA guard.
pub const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
pub const ICMPV6_REDIRECT: u8 = 137;

/// Whether an IPv6 next-header value is an extension header (hop-by-hop, routing, fragment,
/// destination options, mobility, HIP, shim6): the transport header is not right behind the
/// fixed header.
#[inline(always)]
pub const fn is_ipv6_extension_header(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | 44 | 60 | 135 | 139 | 140)
}

/// Whether an IPv4 destination outside every overlay is no destination at all for masquerade:
/// "this network" (0/8), loopback (127/8), multicast (224/4), reserved and the limited broadcast
/// (240/4, 255.255.255.255 included), or the underlay's directed broadcast (`underlay_broadcast`,
/// zeros if unknown). Such packets get no NAT state and are dropped as `drop_no_route`.
#[inline(always)]
pub const fn is_unroutable_destination(dst: [u8; 4], underlay_broadcast: [u8; 4]) -> bool {
    let known_broadcast = u32::from_be_bytes(underlay_broadcast) != 0
        && u32::from_be_bytes(dst) == u32::from_be_bytes(underlay_broadcast);
    dst[0] == 0 || dst[0] == 127 || dst[0] >= 224 || known_broadcast
}

/// Whether an IPv6 destination outside every overlay is no destination at all for masquerade or
/// the host: `::/96` (unspecified, loopback, the deprecated IPv4-compatible addresses), IPv4-mapped
/// addresses (`::ffff:0:0/96`: IPv4 in IPv6 clothes, which would alias IPv4 flows), link-local
/// (`fe80::/10`) and multicast (`ff00::/8`). Dropped as `drop_no_route`, with no NAT state.
#[inline(always)]
pub const fn is_unroutable_destination6(dst: &[u8; 16]) -> bool {
    let mut high_zero = true;
    let mut i = 0;
    while i < 10 {
        if dst[i] != 0 {
            high_zero = false;
        }
        i += 1;
    }
    let v4_compatible_or_loopback = high_zero && dst[10] == 0 && dst[11] == 0;
    let v4_mapped = high_zero && dst[10] == 0xff && dst[11] == 0xff;
    let link_local = dst[0] == 0xfe && dst[1] & 0xc0 == 0x80;
    v4_compatible_or_loopback || v4_mapped || link_local || dst[0] == 0xff
}

/// Whether `port` lies in `min..=max` (a masquerade port range).
#[inline(always)]
pub const fn in_port_range(port: u16, min: u16, max: u16) -> bool {
    port >= min && port <= max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_tags_in_band_and_in_metadata_are_recognised() {
        assert!(is_vlan_tagged(ETH_P_8021Q, 0, 0));
        assert!(is_vlan_tagged(ETH_P_8021AD, 0, 0));
        assert!(is_vlan_tagged(ETH_P_QINQ_LEGACY, 0, 0));
        // Stripped by the kernel: the frame's ethertype is the inner one.
        assert!(is_vlan_tagged(0x0800, 1, ETH_P_8021Q as u32));
        assert!(is_vlan_tagged(0x0800, 1, 0));
        assert!(!is_vlan_tagged(0x0800, 0, 0));
        assert!(!is_vlan_tagged(0x0806, 0, 0));
        assert!(!is_vlan_tagged(0x86dd, 0, 0));
    }

    #[test]
    fn extension_headers_are_recognised() {
        for next in [0, 43, 44, 60] {
            assert!(is_ipv6_extension_header(next), "{next}");
        }
        for next in [6, 17, IPPROTO_ICMPV6, 50, 51] {
            assert!(!is_ipv6_extension_header(next), "{next}");
        }
    }

    #[test]
    fn loopback_multicast_and_broadcast_are_no_destinations() {
        let bcast = [10, 250, 0, 255];
        for dst in [
            [127, 0, 0, 1],
            [127, 255, 0, 9],
            [0, 0, 0, 0],
            [224, 0, 0, 1],
            [239, 255, 255, 250],
            [255, 255, 255, 255],
            [240, 0, 0, 1],
            [10, 250, 0, 255],
        ] {
            assert!(is_unroutable_destination(dst, bcast), "{dst:?}");
        }
        for dst in [
            [10, 250, 0, 254],
            [8, 8, 8, 8],
            [223, 255, 255, 255],
            [10, 250, 1, 255],
        ] {
            assert!(!is_unroutable_destination(dst, bcast), "{dst:?}");
        }
        assert!(!is_unroutable_destination([10, 250, 0, 254], [0; 4]));
        assert!(!is_unroutable_destination([0x0a, 0, 0, 1], [0; 4]));
    }

    #[test]
    fn ipv6_loopback_mapped_link_local_and_multicast_are_no_destinations() {
        let a = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        for dst in [
            "::",
            "::1",
            "::10.250.0.254",
            "::ffff:10.250.0.254",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "ff05::1:3",
        ] {
            assert!(is_unroutable_destination6(&a(dst)), "{dst}");
        }
        for dst in [
            "2001:db8::1",
            "fd00:fab::fe",
            "fec0::1",
            "64:ff9b::a00:1",
            "::1:0:0:1",
            "1::",
        ] {
            assert!(!is_unroutable_destination6(&a(dst)), "{dst}");
        }
    }

    #[test]
    fn port_ranges_are_inclusive() {
        assert!(in_port_range(61000, 61000, 63999));
        assert!(in_port_range(63999, 61000, 63999));
        assert!(!in_port_range(60999, 61000, 63999));
        assert!(!in_port_range(64000, 61000, 63999));
        // Our VXLAN source ports never fall into the default masquerade range.
        use crate::packet::{VXLAN_SOURCE_PORT_MAX, VXLAN_SOURCE_PORT_MIN, vxlan_source_port};
        const { assert!(VXLAN_SOURCE_PORT_MAX < 61000 && VXLAN_SOURCE_PORT_MIN > 1024) };
        for h in [0u32, 7, 0xffff_ffff, 0x1234_5678] {
            assert!(!in_port_range(vxlan_source_port(h), 61000, 63999));
        }
    }
}
