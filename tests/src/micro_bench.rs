//! The datapath micro-benchmark's fixture (`cargo xtask bench --micro`, binary
//! `overlay-microbench`; checked by `tests/tests/datapath_test_run.rs`): the real programs, the
//! maps filled as in the test-run tests, and one fixed packet per program path, each with the
//! verdict, the counter and the output it must produce. A packet that took another path (a drop
//! instead of an encapsulation, say) fails the run instead of passing as fast.
//!
//! Timing is the kernel's, two ways: the program's run-time statistics (`run_time_ns` /
//! `run_cnt`, the clock read around the program alone, as for attached programs during traffic)
//! and the test run's `duration` (adds the harness's clock reads). One program run per call,
//! since the kernel runs repetitions on the same skb and every path but a drop rewrites its
//! packet (an encapsulated packet run again is a different packet); [`MicroBench::run_repeated`]
//! measures the idempotent drop path with `repeat`, which shows what a one-run call adds.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail, ensure};
use overlay_agent::datapath::Datapath;
use overlay_common::{
    counters::Counter,
    maps::{Endpoint, Network, OverlaySubnet, RemoteRoute, Vtep, WireVni, programs},
};
use overlay_datapath::{AgentSettings, PinLayout, addr16};

use crate::support_packets::*;

const VNI_A: u32 = 1024;
const VNI_B: u32 = 2048;
/// The kernel hands a test-run skb to the caller's loopback: senders live on ifindex 1.
const LOOPBACK: u32 = 1;
const LOCAL_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 11);
const LOCAL_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 1];
const REMOTE_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 12);
const REMOTE_VTEP_MAC: [u8; 6] = [0x70, 0xb3, 0xd5, 0x80, 0, 2];
/// The remote VTEP's next hop on the underlay (its MAC, or a gateway's), and this agent's NIC.
const REMOTE_NEXT_HOP_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x12];
const LOCAL_NIC_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x11];
/// A host outside every overlay (the packets never leave the test run).
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

const SENDER_IP: Ipv4Addr = Ipv4Addr::new(9, 0, 1, 2);
const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
const SENDER_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const NEIGHBOUR_IP: Ipv4Addr = Ipv4Addr::new(9, 0, 1, 3);
const NEIGHBOUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x03];
const NEIGHBOUR_IFINDEX: u32 = 77;
const REMOTE_CONTAINER: Ipv4Addr = Ipv4Addr::new(9, 0, 2, 2);
const OTHER_NETWORK_IP: Ipv4Addr = Ipv4Addr::new(9, 1, 1, 2);
const SENDER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xa, 0, 1, 0, 0, 0, 2);
const GATEWAY_IP6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0xa, 0, 1, 0, 0, 0, 1);
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
const HOST_PEER_IFINDEX: u32 = 55;
/// 18 bytes of UDP payload: the 64-byte frames of the UDP benchmark.
const PAYLOAD: [u8; 18] = [0x5a; 18];

/// One program path with its fixed packet and what it must produce.
pub struct Case {
    /// Row name in the table.
    pub name: &'static str,
    pub program: &'static str,
    pub packet: Vec<u8>,
    /// The verdict every run must return (`TC_ACT_*`).
    pub verdict: u32,
    /// The one counter every run must move, by one packet: `(vni, counter)`.
    pub counter: (u32, Counter),
    /// Checks the output of a run against its input; an error says what differs.
    pub check: fn(&[u8], &[u8]) -> Result<(), String>,
}

/// The programs loaded with their own pins, the maps filled for every [`Case`].
pub struct MicroBench {
    dp: Datapath,
    pins: PinLayout,
}

impl Drop for MicroBench {
    fn drop(&mut self) {
        if let Err(e) = self.pins.remove_all() {
            eprintln!("removing micro-benchmark pins: {e:#}");
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn container_udp(dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    eth(
        SENDER_GW_MAC,
        SENDER_MAC,
        ETH_P_IP,
        &ipv4(SENDER_IP, dst, IPPROTO_UDP, &udp(sport, dport, &PAYLOAD)),
    )
}

fn ipv4_src(frame: &[u8]) -> [u8; 4] {
    frame[26..30].try_into().unwrap()
}

fn ipv4_dst(frame: &[u8]) -> [u8; 4] {
    frame[30..34].try_into().unwrap()
}

fn check_local(input: &[u8], out: &[u8]) -> Result<(), String> {
    if out[..6] != NEIGHBOUR_MAC || out[6..12] != SENDER_GW_MAC || out[12..] != input[12..] {
        return Err("not re-addressed to the neighbour, or the packet changed".into());
    }
    Ok(())
}

fn check_encap(input: &[u8], out: &[u8]) -> Result<(), String> {
    if out.len() != input.len() + 50 || out[64..] != input[14..] {
        return Err(format!("{} bytes, not the input wrapped in 50", out.len()));
    }
    if ipv4_dst(out) != REMOTE_UNDERLAY.octets() {
        return Err("outer destination is not the remote agent".into());
    }
    if out[..6] != REMOTE_NEXT_HOP_MAC || out[6..12] != LOCAL_NIC_MAC {
        return Err("outer MACs are not the cached next hop's".into());
    }
    Ok(())
}

fn check_decap(input: &[u8], out: &[u8]) -> Result<(), String> {
    if out.len() + 50 != input.len() || out[..6] != SENDER_MAC || out[14..] != input[64..] {
        return Err("not the inner packet addressed to the endpoint".into());
    }
    Ok(())
}

fn check_masquerade(_: &[u8], out: &[u8]) -> Result<(), String> {
    if ipv4_src(out) != LOCAL_UNDERLAY.octets() || ipv4_dst(out) != EXTERNAL.octets() {
        return Err("source not translated to the underlay address".into());
    }
    Ok(())
}

fn check_reply(_: &[u8], out: &[u8]) -> Result<(), String> {
    if ipv4_dst(out) != SENDER_IP.octets() || out[..6] != SENDER_MAC {
        return Err("destination not translated back to the container".into());
    }
    if u16::from_be_bytes([out[36], out[37]]) != 40000 {
        return Err("destination port not translated back".into());
    }
    Ok(())
}

fn check_arp(_: &[u8], out: &[u8]) -> Result<(), String> {
    if out.len() < 42 || out[20..22] != [0, 2] || out[..6] != SENDER_MAC {
        return Err("not an ARP reply to the sender".into());
    }
    Ok(())
}

fn check_ndp(_: &[u8], out: &[u8]) -> Result<(), String> {
    if out.len() < 78 || out[54] != 136 || out[..6] != SENDER_MAC {
        return Err("not a Neighbor Advertisement to the sender".into());
    }
    Ok(())
}

fn check_unchanged(input: &[u8], out: &[u8]) -> Result<(), String> {
    if input != out {
        return Err("a dropped packet was changed".into());
    }
    Ok(())
}

impl MicroBench {
    /// Loads the programs under a pin instance of their own (removed on drop) and fills the maps:
    /// network A (masquerading) with the sender and a neighbour on this agent and a subnet behind
    /// one remote agent, network B with one container, IPv6 on network A.
    pub fn new() -> anyhow::Result<MicroBench> {
        overlay_lab::ensure_bpffs()?;
        let instance = format!(
            "microbench-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let pins = PinLayout::new(Path::new(overlay_lab::BPFFS), &instance)?;
        let dp = match Datapath::load(pins.clone()) {
            Ok(dp) => dp,
            Err(e) => {
                let _ = pins.remove_all();
                return Err(e);
            }
        };
        let mut bench = MicroBench { dp, pins };
        bench.fill().context("filling the micro-benchmark's maps")?;
        Ok(bench)
    }

    fn fill(&mut self) -> anyhow::Result<()> {
        let m = self.dp.maps_mut();
        m.set_config(&AgentSettings {
            underlay_ip: IpAddr::V4(LOCAL_UNDERLAY),
            underlay_ifindex: LOOPBACK,
            vtep_mac: LOCAL_VTEP_MAC,
            vxlan_port: VXLAN_PORT,
            overlay_mtu: 1420,
            spare_headroom: false,
        })?;
        m.set_nat_config(&overlay_agent::masquerade::nat_config(
            &(61000..=63999),
            Default::default(),
            32,
            1024,
            None,
        ))?;
        m.put_network(VNI_A, Network::new(true))?;
        m.put_network(VNI_B, Network::default())?;
        // Each network on its own VNI (the option), so decap's VNI check passes for A's frames.
        m.put_vni(VNI_A, WireVni::carrying(&[VNI_A]))?;
        m.put_vni(VNI_B, WireVni::carrying(&[VNI_B]))?;
        m.put_subnet("9.0.0.0/16".parse()?, OverlaySubnet::new(VNI_A))?;
        m.put_subnet("9.1.0.0/16".parse()?, OverlaySubnet::new(VNI_B))?;
        m.put_subnet("fd01:a::/48".parse()?, OverlaySubnet::new(VNI_A))?;
        let ep = |ifindex, vni, mac| Endpoint::container(ifindex, vni, mac, SENDER_GW_MAC);
        m.put_endpoint(IpAddr::V4(SENDER_IP), ep(LOOPBACK, VNI_A, SENDER_MAC))?;
        m.put_endpoint(IpAddr::V6(SENDER_IP6), ep(LOOPBACK, VNI_A, SENDER_MAC))?;
        m.put_endpoint(
            IpAddr::V4(NEIGHBOUR_IP),
            ep(NEIGHBOUR_IFINDEX, VNI_A, NEIGHBOUR_MAC),
        )?;
        m.put_endpoint(
            IpAddr::V4(OTHER_NETWORK_IP),
            ep(78, VNI_B, [0x02, 0, 0, 0, 0x02, 0x02]),
        )?;
        m.put_endpoint(
            IpAddr::V6(GATEWAY_IP6),
            Endpoint::host(HOST_PEER_IFINDEX, VNI_A, HOST_MAC),
        )?;
        m.put_vtep(
            IpAddr::V4(REMOTE_UNDERLAY),
            Vtep::new(REMOTE_VTEP_MAC, [0; 4]),
        )?;
        // The remote VTEP's next hop as the agent mirrors it: the encap row is the path a
        // resolved VTEP's packets take (no kernel lookup after the program).
        m.sync_next_hops(&std::collections::BTreeMap::from([(
            IpAddr::V4(REMOTE_UNDERLAY),
            overlay_common::maps::NextHop::new(
                LOOPBACK,
                REMOTE_NEXT_HOP_MAC,
                LOCAL_NIC_MAC,
                overlay_agent::next_hops::coarse_now_ns() + 24 * 3_600_000_000_000,
            ),
        )]))?;
        m.put_route(
            "9.0.2.0/24".parse()?,
            RemoteRoute::new(
                addr16(IpAddr::V4(REMOTE_UNDERLAY)),
                REMOTE_VTEP_MAC,
                VNI_A,
                VNI_A,
            ),
        )?;
        Ok(())
    }

    /// Every case, in table order. The masquerade case's flow is set up first (one run, not
    /// measured: the table's masquerade rows are an established flow's packets), and the reply
    /// is addressed to the port it got.
    pub fn cases(&self) -> anyhow::Result<Vec<Case>> {
        let masquerade = container_udp(EXTERNAL, 40000, 5001);
        let (verdict, out) = self.dp.test_run(programs::FROM_CONTAINER, &masquerade)?;
        ensure!(
            verdict == TC_ACT_REDIRECT,
            "the masquerade flow was not set up (verdict {verdict}; counters {:?})",
            self.dp.maps().stats()?
        );
        check_masquerade(&masquerade, &out).map_err(anyhow::Error::msg)?;
        let nat_port = u16::from_be_bytes([out[34], out[35]]);
        let reply = eth(
            LOCAL_VTEP_MAC,
            [0x02, 0, 0, 0, 0xee, 0x02],
            ETH_P_IP,
            &ipv4(
                EXTERNAL,
                LOCAL_UNDERLAY,
                IPPROTO_UDP,
                &udp(5001, nat_port, &PAYLOAD),
            ),
        );
        let vxlan = VxlanFrame {
            outer_src: REMOTE_UNDERLAY,
            outer_dst: LOCAL_UNDERLAY,
            src_port: 51234,
            dst_port: VXLAN_PORT,
            flags: 0x08,
            vni: VNI_A,
            inner_dst_mac: LOCAL_VTEP_MAC,
            inner_src_mac: REMOTE_VTEP_MAC,
            inner_ip: ipv4(
                REMOTE_CONTAINER,
                SENDER_IP,
                IPPROTO_UDP,
                &udp(40000, 5001, &PAYLOAD),
            ),
        };
        Ok(vec![
            Case {
                name: "local delivery",
                program: programs::FROM_CONTAINER,
                packet: container_udp(NEIGHBOUR_IP, 40000, 5001),
                verdict: TC_ACT_REDIRECT,
                counter: (VNI_A, Counter::LocalDelivered),
                check: check_local,
            },
            Case {
                name: "encap",
                program: programs::FROM_CONTAINER,
                packet: container_udp(REMOTE_CONTAINER, 40000, 5001),
                verdict: TC_ACT_REDIRECT,
                counter: (VNI_A, Counter::Encapsulated),
                check: check_encap,
            },
            Case {
                name: "decap",
                program: programs::FROM_UNDERLAY,
                packet: vxlan.frame(),
                verdict: TC_ACT_REDIRECT,
                counter: (VNI_A, Counter::Decapsulated),
                check: check_decap,
            },
            Case {
                name: "masquerade egress",
                program: programs::FROM_CONTAINER,
                packet: masquerade,
                verdict: TC_ACT_REDIRECT,
                counter: (VNI_A, Counter::Masqueraded),
                check: check_masquerade,
            },
            Case {
                name: "reply translation",
                program: programs::FROM_UNDERLAY,
                packet: reply,
                verdict: TC_ACT_REDIRECT,
                counter: (VNI_A, Counter::Unmasqueraded),
                check: check_reply,
            },
            Case {
                name: "ARP reply",
                program: programs::FROM_CONTAINER,
                packet: arp_request(SENDER_MAC, SENDER_IP, Ipv4Addr::new(9, 0, 1, 1)),
                verdict: TC_ACT_REDIRECT,
                counter: (VNI_A, Counter::ArpReplied),
                check: check_arp,
            },
            Case {
                name: "NDP reply",
                program: programs::FROM_CONTAINER,
                packet: neighbor_solicitation(SENDER_MAC, SENDER_IP6, GATEWAY_IP6),
                verdict: TC_ACT_REDIRECT,
                counter: (VNI_A, Counter::NdReplied),
                check: check_ndp,
            },
            Case {
                name: "drop (cross network)",
                program: programs::FROM_CONTAINER,
                packet: container_udp(OTHER_NETWORK_IP, 40000, 5001),
                verdict: TC_ACT_SHOT,
                counter: (VNI_A, Counter::DropCrossNetwork),
                check: check_unchanged,
            },
        ])
    }

    fn counters(&self) -> anyhow::Result<BTreeMap<(u32, u32), u64>> {
        Ok(self
            .dp
            .maps()
            .stats()?
            .into_iter()
            .map(|r| ((r.network, r.counter as u32), r.packets))
            .collect())
    }

    /// Checks that the counters moved from `before` by exactly `runs` packets of the case's
    /// counter and nothing else.
    fn check_counted(
        &self,
        case: &Case,
        before: &BTreeMap<(u32, u32), u64>,
        runs: u64,
    ) -> anyhow::Result<()> {
        // An experiment's build that counts elsewhere (or not at all) is still held to its
        // verdicts and outputs.
        if std::env::var_os("OVERLAY_MICROBENCH_NO_COUNTER_CHECK").is_some() {
            return Ok(());
        }
        let after = self.counters()?;
        let (vni, counter) = case.counter;
        for (key, n) in &after {
            let moved = n - before.get(key).copied().unwrap_or(0);
            let want = if *key == (vni, counter as u32) {
                runs
            } else {
                0
            };
            if moved != want {
                let name = Counter::from_u32(key.1).map_or("?", |c| c.name());
                bail!(
                    "{}: counter {name} of network {} moved by {moved}, expected {want}",
                    case.name,
                    key.0
                );
            }
        }
        ensure!(
            runs == 0 || after.contains_key(&(vni, counter as u32)),
            "{}: {} of network {vni} never counted",
            case.name,
            counter.name()
        );
        Ok(())
    }

    /// Runs the case `calls` times, one program run per call, and returns each run's times in ns
    /// as the kernel measured them. Every verdict, the output of the first run and the counters
    /// afterwards are checked.
    pub fn run(&self, case: &Case, calls: usize) -> anyhow::Result<Vec<Timing>> {
        let before = self.counters()?;
        let mut ns = Vec::with_capacity(calls);
        for i in 0..calls {
            let run = self.dp.test_run_repeated(case.program, &case.packet, 1)?;
            if run.verdict != case.verdict {
                bail!(
                    "{}: run {i} returned verdict {}, expected {}; counters {:?}",
                    case.name,
                    run.verdict,
                    case.verdict,
                    self.dp.maps().stats()?
                );
            }
            if i == 0 {
                (case.check)(&case.packet, &run.packet)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", case.name))?;
            }
            ns.push(Timing::of(&run));
        }
        self.check_counted(case, &before, calls as u64)?;
        Ok(ns)
    }

    /// One call running the case `repeat` times on one skb; returns the times per run. Only for a case
    /// whose program leaves the packet as it found it (a drop), checked on the output.
    pub fn run_repeated(&self, case: &Case, repeat: u32) -> anyhow::Result<Timing> {
        // A drop leaves the packet as it found it (checked below); any other path would run
        // again on its own output.
        ensure!(
            case.verdict == TC_ACT_SHOT,
            "{}: repeats would run on the program's own output",
            case.name
        );
        let before = self.counters()?;
        let run = self
            .dp
            .test_run_repeated(case.program, &case.packet, repeat)?;
        ensure!(
            run.verdict == case.verdict,
            "{}: verdict {} after {repeat} runs, expected {}",
            case.name,
            run.verdict,
            case.verdict
        );
        (case.check)(&case.packet, &run.packet).map_err(anyhow::Error::msg)?;
        self.check_counted(case, &before, u64::from(repeat))?;
        Ok(Timing::of(&run))
    }
}

/// One call's times per program run, in ns.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// The program alone, from the kernel's run-time statistics (None while they are off).
    pub program: Option<u64>,
    /// The test run's `duration` (adds reading the clock around the run).
    pub test_run: u64,
}

impl Timing {
    fn of(run: &overlay_agent::datapath::TestRunOutcome) -> Timing {
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Timing {
            program: run.per_run_stats.map(ns),
            test_run: ns(run.per_run),
        }
    }
}

/// The name of a TC verdict.
pub fn verdict_name(verdict: u32) -> &'static str {
    match verdict {
        TC_ACT_OK => "TC_ACT_OK",
        TC_ACT_SHOT => "TC_ACT_SHOT",
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT",
        _ => "other",
    }
}

/// The median of `v` (sorted in place); 0 for none.
pub fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}
