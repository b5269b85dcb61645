//! XDP on the underlay NIC (`xdp_underlay`), run by the kernel on frames we build
//! (`BPF_PROG_TEST_RUN`): VXLAN that `from_underlay` would drop on its outer headers (unknown
//! VTEP, unknown VNI, malformed, truncated, fragments, bad flags, from the masquerade ports) is
//! dropped early, under the same counters; everything else passes to TC untouched. The same
//! frames through XDP then TC (as the kernel runs them) and through TC alone leave the same
//! per-reason counters. Native attach on a real driver (virtio_net) is checked in vm.rs.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use overlay_agent::datapath::{AgentSettings, Datapath, PinLayout, StatRow, addr16};
use overlay_common::{
    counters::Counter,
    maps::{Endpoint, NatConfig, Network, OverlaySubnet, RemoteRoute, Vtep, WireVni, programs},
};
use overlay_tests::support_packets::*;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const VNI_A: u32 = 1024;
const LOCAL_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
const LOCAL_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 1];
const R_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 12);
const R_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 2];
const EP_IP: Ipv4Addr = Ipv4Addr::new(9, 0, 1, 2);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A loaded datapath (its pins removed on drop) configured as an agent at `LOCAL_UNDERLAY` with
/// one network, one endpoint and one known peer R.
struct Fixture {
    dp: Datapath,
    pins: PinLayout,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.pins.remove_all();
    }
}

impl Fixture {
    fn new() -> Fixture {
        overlay_lab::ensure_bpffs().unwrap();
        let instance = format!(
            "xdptest-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let pins = PinLayout::new(Path::new(overlay_lab::BPFFS), &instance).unwrap();
        let mut dp = Datapath::load(pins.clone()).unwrap();
        let m = dp.maps_mut();
        m.set_config(&AgentSettings {
            underlay_ip: IpAddr::V4(LOCAL_UNDERLAY),
            underlay_ifindex: 1,
            vtep_mac: LOCAL_VTEP_MAC,
            vxlan_port: VXLAN_PORT,
            overlay_mtu: 1420,
            spare_headroom: false,
        })
        .unwrap();
        m.set_nat_config(&NatConfig {
            port_min: 61000,
            port_max: 63999,
            max_probes: 32,
            ..Default::default()
        })
        .unwrap();
        m.put_network(VNI_A, Network::default()).unwrap();
        m.put_vni(VNI_A, WireVni::carrying(&[VNI_A])).unwrap();
        m.put_subnet("9.0.0.0/16".parse().unwrap(), OverlaySubnet::new(VNI_A))
            .unwrap();
        m.put_endpoint(
            IpAddr::V4(EP_IP),
            Endpoint {
                ifindex: 1,
                network: VNI_A,
                mac: [2, 0, 0, 0, 1, 2],
                gateway_mac: [2, 0, 0, 0, 1, 1],
                ..Default::default()
            },
        )
        .unwrap();
        m.put_vtep(
            IpAddr::V4(R_UNDERLAY),
            Vtep {
                vtep_mac: R_VTEP_MAC,
                ..Default::default()
            },
        )
        .unwrap();
        m.put_route(
            "9.0.2.0/24".parse().unwrap(),
            RemoteRoute::new(addr16(IpAddr::V4(R_UNDERLAY)), R_VTEP_MAC, VNI_A, VNI_A),
        )
        .unwrap();
        Fixture { dp, pins }
    }

    fn run(&self, program: &str, frame: &[u8]) -> u32 {
        self.dp.test_run(program, frame).unwrap().0
    }

    /// Every counter that is not zero, sorted.
    fn counters(&self) -> Vec<(u32, &'static str, u64, u64)> {
        let mut rows: Vec<_> = self
            .dp
            .maps()
            .stats()
            .unwrap()
            .into_iter()
            .filter(|r: &StatRow| r.packets > 0)
            .map(|r| (r.network, r.counter.name(), r.packets, r.bytes))
            .collect();
        rows.sort();
        rows
    }
}

/// Sets the IPv4 header's flags/fragment-offset field and fixes its checksum.
fn with_fragment_field(frame: &[u8], field: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[20..22].copy_from_slice(&field.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = inet_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

fn good() -> VxlanFrame {
    VxlanFrame {
        outer_src: R_UNDERLAY,
        outer_dst: LOCAL_UNDERLAY,
        src_port: 51234,
        dst_port: VXLAN_PORT,
        flags: 0x08,
        vni: VNI_A,
        inner_dst_mac: LOCAL_VTEP_MAC,
        inner_src_mac: R_VTEP_MAC,
        inner_ip: ping_packet(Ipv4Addr::new(9, 0, 2, 2), EP_IP, 56),
    }
}

/// (what, frame, XDP verdict, the counter an early drop goes under).
fn cases() -> Vec<(&'static str, Vec<u8>, u32, Option<Counter>)> {
    let ok = good();
    let full = ok.frame();
    let mut bad_checksum = full.clone();
    bad_checksum[24] ^= 0xff;
    let mut short_udp_len = full.clone();
    // UDP length 8 bytes short of the IP payload.
    let udp_len = u16::from_be_bytes([full[38], full[39]]) - 8;
    short_udp_len[38..40].copy_from_slice(&udp_len.to_be_bytes());
    vec![
        (
            "well-formed VXLAN from a known agent",
            full.clone(),
            XDP_PASS,
            None,
        ),
        (
            "unknown VTEP",
            VxlanFrame {
                outer_src: Ipv4Addr::new(10, 250, 0, 99),
                ..ok.clone()
            }
            .frame(),
            XDP_DROP,
            Some(Counter::DropUnknownVtep),
        ),
        (
            "unknown VNI",
            VxlanFrame {
                vni: 4096,
                ..ok.clone()
            }
            .frame(),
            XDP_DROP,
            Some(Counter::DropUnknownVni),
        ),
        (
            "VXLAN flags 0x0c",
            VxlanFrame {
                flags: 0x0c,
                ..ok.clone()
            }
            .frame(),
            XDP_DROP,
            Some(Counter::DropBadVxlanFlags),
        ),
        (
            "from the masquerade ports",
            VxlanFrame {
                src_port: 61500,
                ..ok.clone()
            }
            .frame(),
            XDP_DROP,
            Some(Counter::DropVxlanNatPort),
        ),
        (
            "first fragment",
            with_fragment_field(&full, 0x2000),
            XDP_DROP,
            Some(Counter::DropFragmented),
        ),
        (
            "IPv4 checksum wrong",
            bad_checksum,
            XDP_DROP,
            Some(Counter::DropMalformed),
        ),
        (
            "UDP length disagrees with IP",
            short_udp_len,
            XDP_DROP,
            Some(Counter::DropMalformed),
        ),
        (
            "cut after the UDP header",
            full[..42].to_vec(),
            XDP_DROP,
            Some(Counter::DropTruncated),
        ),
        // A later fragment has no UDP header: the host stack's (TC passes it too).
        (
            "later fragment",
            with_fragment_field(&full, 0x0010),
            XDP_PASS,
            None,
        ),
        // Inner checks are TC's: XDP passes, TC drops.
        (
            "inner destination not local",
            VxlanFrame {
                inner_ip: ping_packet(Ipv4Addr::new(9, 0, 2, 2), Ipv4Addr::new(9, 0, 1, 77), 56),
                ..ok.clone()
            }
            .frame(),
            XDP_PASS,
            None,
        ),
        (
            "the host's own UDP",
            eth(
                [2, 0, 0, 0, 0xee, 1],
                [2, 0, 0, 0, 0xee, 2],
                ETH_P_IP,
                &ipv4(
                    R_UNDERLAY,
                    LOCAL_UNDERLAY,
                    IPPROTO_UDP,
                    &udp(5353, 53, b"query"),
                ),
            ),
            XDP_PASS,
            None,
        ),
        (
            "ARP",
            arp_request([2, 0, 0, 0, 0xee, 2], R_UNDERLAY, LOCAL_UNDERLAY),
            XDP_PASS,
            None,
        ),
    ]
}

#[test]
fn xdp_drops_early_what_tc_would_drop_and_counts_it_alike() {
    let with_xdp = Fixture::new();
    let tc_only = Fixture::new();
    let mut early = 0;
    for (what, frame, expected, reason) in cases() {
        let before = with_xdp.counters();
        let verdict = with_xdp.run(programs::XDP_UNDERLAY, &frame);
        assert_eq!(verdict, expected, "{what}: XDP verdict");
        if verdict == XDP_PASS {
            // Passed frames reach TC as they were, and XDP counted nothing for them.
            assert_eq!(
                with_xdp.counters(),
                before,
                "{what}: XDP counted a passed frame"
            );
            with_xdp.run(programs::FROM_UNDERLAY, &frame);
        } else {
            early += 1;
            let reason = reason.unwrap();
            let got = with_xdp.dp.maps().stat(0, reason).unwrap();
            let was = before
                .iter()
                .find(|r| r.0 == 0 && r.1 == reason.name())
                .map_or(0, |r| r.2);
            assert_eq!(got, was + 1, "{what}: {} not counted once", reason.name());
        }
        let tc_verdict = tc_only.run(programs::FROM_UNDERLAY, &frame);
        if expected == XDP_DROP {
            assert_eq!(tc_verdict, TC_ACT_SHOT, "{what}: TC would not drop it");
        }
    }
    assert_eq!(
        with_xdp.dp.maps().stat(0, Counter::XdpDropped).unwrap(),
        early
    );
    // Every per-reason counter (packets and bytes) agrees; only xdp_dropped is XDP's own.
    let agreed: Vec<_> = with_xdp
        .counters()
        .into_iter()
        .filter(|r| r.1 != Counter::XdpDropped.name())
        .collect();
    assert_eq!(agreed, tc_only.counters());
    assert!(agreed.iter().any(|r| r.1 == "decapsulated"));
}

#[test]
fn xdp_passes_everything_before_the_agent_configured_the_datapath() {
    overlay_lab::ensure_bpffs().unwrap();
    let instance = format!("xdptest-{}-unconfigured", std::process::id());
    let pins = PinLayout::new(Path::new(overlay_lab::BPFFS), &instance).unwrap();
    let f = Fixture {
        dp: Datapath::load(pins.clone()).unwrap(),
        pins,
    };
    let stranger = VxlanFrame {
        outer_src: Ipv4Addr::new(10, 250, 0, 99),
        ..good()
    };
    assert_eq!(f.run(programs::XDP_UNDERLAY, &stranger.frame()), XDP_PASS);
    assert!(f.counters().is_empty());
}

/// The program id attached as XDP to `eth0` of `node`, and whether in generic (skb) mode.
fn xdp_of_eth0(node: &overlay_lab::Node) -> Option<(u64, bool)> {
    let out = node
        .command("ip")
        .args(["-d", "-j", "link", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let xdp = &link[0]["xdp"];
    // iproute2: mode 1 = driver, 2 = generic (skb), 3 = offload.
    let mode = xdp["mode"].as_u64()?;
    Some((xdp["prog"]["id"].as_u64()?, mode == 2))
}

#[test]
fn generic_xdp_on_a_lab_agent_drops_real_frames_early_and_survives_a_restart() {
    use overlay_lab::cluster::{Cluster, ClusterSpec};
    let bin_dir = overlay_tests::bin_path("overlay-agent")
        .parent()
        .unwrap()
        .to_owned();
    let mut spec = ClusterSpec::new(2, &bin_dir);
    // Lab underlays are veths: `auto` leaves XDP off there; generic mode runs it after the skb.
    spec.agent_args = vec!["--xdp".into(), "generic".into()];
    let mut c = Cluster::up(spec).unwrap();
    let (a1, a2) = (
        c.lab.node("a1").unwrap().clone(),
        c.lab.node("a2").unwrap().clone(),
    );
    let (prog, generic) = xdp_of_eth0(&a1).expect("no XDP on a1's eth0");
    assert!(generic, "XDP not in generic mode");
    let pin = overlay_tests::lab_pins(&c.lab, "a1").link(programs::XDP_UNDERLAY, "eth0-generic");
    assert!(pin.exists(), "{} missing", pin.display());
    let maps = || overlay_tests::lab_pins(&c.lab, "a1");
    let stat = |counter| {
        overlay_agent::datapath::OverlayMaps::open_pinned(&maps())
            .unwrap()
            .stat(0, counter)
            .unwrap()
    };
    // From a known agent (a2), an unknown VNI: dropped in XDP, counted as TC would count it.
    let bogus: Vec<Vec<u8>> = (0..10).map(|_| vxlan(0x08, 4096, &[0u8; 34])).collect();
    let (vni_before, early_before) = (stat(Counter::DropUnknownVni), stat(Counter::XdpDropped));
    send_udp(&a2, a1.ip.unwrap(), VXLAN_PORT, &bogus).unwrap();
    assert_eq!(stat(Counter::DropUnknownVni), vni_before + 10);
    assert_eq!(stat(Counter::XdpDropped), early_before + 10);
    // Overlay traffic still flows through XDP to TC.
    let x = c.add_container("a1", "dcos").unwrap();
    let y = c.add_container("a2", "dcos").unwrap();
    assert!(x.node.ping(y.node.ip.unwrap()));

    // A restarted agent swaps its program into the pinned XDP link: one program, a new one.
    c.stop_agent("a1");
    assert_eq!(
        xdp_of_eth0(&a1).map(|x| x.0),
        Some(prog),
        "XDP left with the agent"
    );
    c.start_agent("a1").unwrap();
    let (after, generic) = xdp_of_eth0(&a1).expect("no XDP after the restart");
    assert!(generic);
    assert_ne!(after, prog, "the old program is still attached");
    assert!(x.node.ping(y.node.ip.unwrap()));
}
