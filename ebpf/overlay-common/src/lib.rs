//! Everything the eBPF programs and userspace must agree on, defined once.
//!
//! - [`maps`]: map names, keys and values (`#[repr(C)]`, explicit padding, size asserts). The
//!   layout is versioned by [`maps::MAP_LAYOUT_VERSION`], which is part of every pin path, so an
//!   agent never reuses a pinned map whose layout it does not understand.
//! - [`counters`]: the datapath's counters and drop reasons.
//! - [`packet`]: header layouts and the pure logic the programs run on them (parsing, VXLAN header
//!   construction, checksums). It has no aya-ebpf dependency, so it is unit-tested on the host.
//! - [`policy`]: what a container may never send (VLAN tags, VXLAN through masquerade, the
//!   control plane), and masquerade's destination and handshake rules.
//! - [`ipv6`]: the IPv6 header, address classes, ICMPv6 roles and the neighbour-discovery
//!   responder's reply.
//! - [`monitor`]: the drop monitor's event, configuration and per-CPU rate limit.
//! - [`underlay6`]: the IPv6 underlay's outer headers (encap, classification, MTU overhead,
//!   the zero UDP checksum and why).
//! - [`too_big`]: the frag-needed / Packet Too Big errors the datapath answers too-big packets
//!   with.
//!
//! This crate is `no_std` so the kernel side can use it; the `user` feature adds `aya::Pod`.
#![no_std]

pub mod counters;
pub mod ipv6;
pub mod maps;
pub mod monitor;
pub mod nat;
pub mod packet;
pub mod policy;
pub mod too_big;
pub mod underlay6;

#[cfg(test)]
extern crate std;
