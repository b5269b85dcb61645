//! Datapath counters: what happened to a packet, and why a packet was dropped.
//!
//! Counters are kept per network (network id, not the VNI on the wire: networks may share one)
//! and per counter in `OVL_STATS`; a counter that cannot be attributed to a network (a packet
//! from an unknown VTEP, say) uses the network id [`NO_NETWORK`].

/// Network id used for counters that belong to no network.
pub const NO_NETWORK: u32 = 0;

macro_rules! counters {
    ($( $(#[$doc:meta])* $variant:ident = $value:literal => $name:literal, )*) => {
        /// One datapath counter. Values below [`Counter::FIRST_DROP`] count packets handled;
        /// values from it on count drops, and their names are the drop reasons.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $( $(#[$doc])* $variant = $value, )*
        }

        impl Counter {
            /// Every counter, in numeric order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// The stable, metric-friendly name of the counter (`drop_spoofed_source`, ...).
            pub const fn name(self) -> &'static str {
                match self { $( Counter::$variant => $name, )* }
            }

            /// The counter with this numeric value, if any.
            pub const fn from_u32(value: u32) -> Option<Counter> {
                match value { $( $value => Some(Counter::$variant), )* _ => None }
            }
        }
    };
}

counters! {
    /// Delivered straight to a container on this agent.
    LocalDelivered = 0 => "local_delivered",
    /// Encapsulated in VXLAN towards another agent.
    Encapsulated = 1 => "encapsulated",
    /// VXLAN from another agent, decapsulated and delivered.
    Decapsulated = 2 => "decapsulated",
    /// ARP request from a container answered in BPF.
    ArpReplied = 3 => "arp_replied",
    /// Left to the host stack (destination outside every overlay).
    PassedToHost = 4 => "passed_to_host",
    /// ARP from a container that needs no answer (replies, gratuitous ARP, probes): dropped,
    /// since nothing behind the veth is there to hear it.
    ArpIgnored = 5 => "arp_ignored",
    /// Container packet to outside every overlay, source translated to the underlay address.
    Masqueraded = 6 => "masqueraded",
    /// Reply (or ICMP error) to a masqueraded flow, translated back and delivered.
    Unmasqueraded = 7 => "unmasqueraded",
    /// A new masqueraded flow got a port.
    NatCreated = 8 => "nat_created",
    /// A port candidate was taken and the next one was tried.
    NatPortRetries = 9 => "nat_port_retries",
    /// IPv6 Neighbor Solicitation (a container's or the host's) answered in BPF.
    NdReplied = 10 => "nd_replied",
    /// IPv6 link housekeeping from a container that needs no answer (duplicate-address probes,
    /// MLD reports, Router Solicitations, Neighbor Advertisements): dropped, as `arp_ignored`.
    NdIgnored = 11 => "nd_ignored",
    /// A packet over the overlay MTU answered with ICMP frag-needed / ICMPv6 Packet Too Big
    /// carrying the overlay MTU (it is counted as `drop_too_big` as well).
    TooBigAnswered = 12 => "too_big_answered",
    /// VXLAN dropped early by XDP on the underlay NIC; each is also counted under the drop reason
    /// `from_underlay` would have given it, so those agree with or without XDP.
    XdpDropped = 13 => "xdp_dropped",
    /// Encapsulated towards a VTEP with no fresh cached next hop (`OVL_NEXT_HOPS`): the kernel's
    /// route and neighbour lookup addressed it (`bpf_redirect_neigh`). The agent has not resolved
    /// that VTEP's neighbour yet, it is unresolved, the underlay is IPv6, or the agent stopped
    /// confirming the cache. Each is counted as `encapsulated` as well.
    NextHopByKernel = 14 => "next_hop_by_kernel",

    /// A container sent with an IP or MAC that is not its own.
    DropSpoofedSource = 16 => "drop_spoofed_source",
    /// Source and destination are on different virtual networks.
    DropCrossNetwork = 17 => "drop_cross_network",
    /// Destination is inside an overlay subnet, but no agent owns it.
    DropNoRoute = 18 => "drop_no_route",
    /// VXLAN from an address that is not a known agent.
    DropUnknownVtep = 19 => "drop_unknown_vtep",
    /// VXLAN with a VNI that is no network of ours.
    DropUnknownVni = 20 => "drop_unknown_vni",
    /// VXLAN header flags other than exactly the I flag.
    DropBadVxlanFlags = 21 => "drop_bad_vxlan_flags",
    /// Headers shorter than they claim, or cut off.
    DropTruncated = 22 => "drop_truncated",
    /// Decapsulated packet for an address that is not a local endpoint.
    DropNoEndpoint = 23 => "drop_no_endpoint",
    /// The kernel refused to grow the packet for encapsulation.
    DropEncapFailed = 24 => "drop_encap_failed",
    /// The kernel refused to shrink the packet for decapsulation.
    DropDecapFailed = 25 => "drop_decap_failed",
    /// Headers that are not valid (IPv4 version or length fields, say).
    DropMalformed = 26 => "drop_malformed",
    /// Inner packet larger than the overlay MTU allows (would need fragmentation).
    DropTooBig = 27 => "drop_too_big",
    /// Agent configuration missing (datapath not initialised yet).
    DropNotReady = 28 => "drop_not_ready",
    /// First fragment of a fragmented VXLAN datagram: VTEPs do not reassemble (RFC 7348), and a
    /// part of a frame must not reach a container as if it were whole.
    DropFragmented = 29 => "drop_fragmented",
    /// No free port for a new masqueraded flow within the probe limit.
    DropNatNoPort = 30 => "drop_nat_no_port",
    /// Traffic to outside the overlay that masquerade cannot translate (not TCP, UDP or ICMP
    /// echo), or from a network that does not masquerade and has nowhere else to go.
    DropNatUnsupported = 31 => "drop_nat_unsupported",
    /// A frame from a container with a VLAN tag (in band, or stripped by the kernel into the skb's
    /// metadata): it would leave the agent's NIC tagged, VLAN hopping on a trunk port.
    DropVlanTagged = 32 => "drop_vlan_tagged",
    /// UDP from a container to an agent's underlay address on the VXLAN port: VXLAN smuggled
    /// through masquerade would arrive from a known VTEP and bypass isolation and anti-spoofing.
    DropContainerVxlan = 33 => "drop_container_vxlan",
    /// VXLAN on the underlay whose outer UDP source port lies in the masquerade range: a
    /// masqueraded container datagram, never an agent's VTEP (whose source ports are disjoint).
    DropVxlanNatPort = 34 => "drop_vxlan_nat_port",
    /// IPv6 from a container's address that no IPv6 overlay has (a container on an IPv4-only
    /// network, say): not carried, and never the host stack's.
    DropIpv6 = 35 => "drop_ipv6",
    /// An ICMPv6 Router Advertisement or Redirect from a container: always refused, so a container
    /// can never configure the host's addresses or routes.
    DropRouterMessage = 36 => "drop_ra_or_redirect",
    /// A frame from a container that is neither IPv4, ARP nor IPv6: nothing of ours to carry, and
    /// not the host stack's to receive.
    DropUnsupportedEth = 37 => "drop_unsupported_eth",
    /// A container's packet to the control plane (the master's API, an agent's control port:
    /// `OVL_PROTECTED`), which containers may not reach unless the agent allows it.
    DropControlPlane = 38 => "drop_control_plane",
    /// A container already holds its quota of masquerade ports towards this destination
    /// (address, port, protocol): one container may not take every port towards one server.
    DropNatQuota = 39 => "drop_nat_quota",
    /// IPv6 link-local traffic that is not neighbour discovery with the gateway: a container
    /// reaches no other container, and not the host, by link-local address.
    DropLinkLocal = 40 => "drop_link_local",
    /// VXLAN whose inner source and destination are on one network, but whose VNI is not the
    /// one that network's frames carry (a network with its own VNI, reached in another one).
    DropVniMismatch = 70 => "drop_vni_mismatch",
    /// A remote VTEP whose underlay address is of the other family than this agent's (an IPv4
    /// underlay agent with a route to an IPv6-underlay one, or the reverse): no outer header
    /// can carry the packet, so it is not sent.
    DropUnderlayFamily = 65 => "drop_underlay_family",
    /// IPv6 from a masquerading network to outside every overlay while the underlay NIC has no
    /// global IPv6 address to masquerade it to: never sent out with its overlay (ULA) source.
    DropNat6NoAddress = 55 => "drop_nat6_no_address",
}

/// A packet the datapath refuses: why, and the network it is counted under. Every program
/// path returns `Result<verdict, Drop>` and one place per program counts and drops it; `?` on a
/// bare [`Counter`] attributes the drop to no network, [`Counter::in_network`] to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drop {
    /// Network id the drop is counted under.
    pub network: u32,
    pub reason: Counter,
}

impl From<Counter> for Drop {
    #[inline(always)]
    fn from(reason: Counter) -> Drop {
        Drop {
            network: NO_NETWORK,
            reason,
        }
    }
}

/// Attributes a path's drop reason to a network: `step().in_network(network)?`.
pub trait InNetwork<T> {
    fn in_network(self, network: u32) -> Result<T, Drop>;
}

impl<T> InNetwork<T> for Result<T, Counter> {
    #[inline(always)]
    fn in_network(self, network: u32) -> Result<T, Drop> {
        self.map_err(|reason| reason.in_network(network))
    }
}

impl Counter {
    /// This drop reason, counted under network (id) `network`.
    #[inline(always)]
    pub const fn in_network(self, network: u32) -> Drop {
        Drop {
            network,
            reason: self,
        }
    }

    /// The first counter that counts drops.
    pub const FIRST_DROP: u32 = 16;

    /// Whether this counter counts dropped packets.
    pub const fn is_drop(self) -> bool {
        self as u32 >= Self::FIRST_DROP
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut seen = std::collections::BTreeSet::new();
        for &c in Counter::ALL {
            assert!(seen.insert(c.name()), "duplicate name {}", c.name());
            assert_eq!(Counter::from_u32(c as u32), Some(c));
            assert_eq!(c.is_drop(), c.name().starts_with("drop_"), "{}", c.name());
            assert!(
                c.name().len() <= 22,
                "{} is too long for the tables",
                c.name()
            );
        }
        assert_eq!(Counter::from_u32(999), None);
    }

    #[test]
    fn drops_without_a_network_count_under_no_network() {
        let d: Drop = Counter::DropTruncated.into();
        assert_eq!((d.network, d.reason), (NO_NETWORK, Counter::DropTruncated));
        let d = Counter::DropCrossNetwork.in_network(1024);
        assert_eq!((d.network, d.reason), (1024, Counter::DropCrossNetwork));
        let via_question_mark = || -> Result<(), Drop> { Err(Counter::DropMalformed)? };
        assert_eq!(via_question_mark(), Err(Counter::DropMalformed.into()));
        let step: Result<u8, Counter> = Err(Counter::DropNoRoute);
        assert_eq!(step.in_network(7), Err(Counter::DropNoRoute.in_network(7)));
        assert_eq!(Ok::<u8, Counter>(3).in_network(7), Ok(3));
    }
}
