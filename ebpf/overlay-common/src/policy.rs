//! What a container may never send, whatever its destination: the pure checks behind the
//! datapath's guards (VLAN tags, IPv6 until the IPv6 datapath exists, VXLAN smuggled through
//! masquerade), unit-tested on the host.

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
}
