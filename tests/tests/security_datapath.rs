//! The datapath's holes closed (issue 17), tried as an attacker in a container would, against a
//! real cluster (master, agents, containers in lab namespaces) with real packets: what must never
//! leave an agent does not show up on the fabric or at the receiver, and is counted.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use overlay_agent::datapath::OverlayMaps;
use overlay_common::counters::{Counter, NO_NETWORK};
use overlay_lab::{
    Container,
    cluster::{Cluster, ClusterSpec},
};
use overlay_tests::{bin_path, lab_pins, support_packets::*};

const DCOS: u32 = 1024;
const EXT: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 254);

fn cluster(agents: usize, agent_args: &[&str]) -> Cluster {
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let mut spec = ClusterSpec::new(agents, &bin_dir);
    spec.agent_args = agent_args.iter().map(|s| s.to_string()).collect();
    Cluster::up(spec).unwrap()
}

fn maps(c: &Cluster, agent: &str) -> OverlayMaps {
    OverlayMaps::open_pinned(&lab_pins(&c.lab, agent)).unwrap()
}

fn stat(c: &Cluster, agent: &str, vni: u32, counter: Counter) -> u64 {
    maps(c, agent).stat(vni, counter).unwrap()
}

fn all_stats(c: &Cluster, agent: &str) -> String {
    maps(c, agent)
        .stats()
        .unwrap()
        .iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits (up to 3 s) until `counter` reaches `want`; returns its last value.
fn wait_for_stat(c: &Cluster, agent: &str, vni: u32, counter: Counter, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = stat(c, agent, vni, counter);
        if now >= want || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ip(c: &Container) -> Ipv4Addr {
    c.node.ip.unwrap()
}

/// Sends raw Ethernet frames out of the container's interface (AF_PACKET), byte for byte.
fn send_frames(c: &Container, frames: &[Vec<u8>]) {
    const SCRIPT: &str = "import socket, sys\n\
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
        s.bind((sys.argv[1], 0))\n\
        for h in sys.argv[2:]:\n    s.send(bytes.fromhex(h))\n";
    let hexes: Vec<String> = frames.iter().map(|f| hex(f)).collect();
    let mut args = vec!["-c", SCRIPT, &c.ifname];
    args.extend(hexes.iter().map(String::as_str));
    c.node.exec("python3", &args).unwrap();
}

/// The container's MAC and its gateway's (the host-side veth's).
fn macs(c: &Cluster, x: &Container) -> ([u8; 6], [u8; 6]) {
    let agent = c.lab.node(&x.agent).unwrap();
    (
        x.node.mac(&x.ifname).unwrap(),
        agent.mac(&x.host_veth).unwrap(),
    )
}

/// A frame from `src_mac` to `dst_mac` whose IPv4 packet sits behind the given VLAN tags
/// (outermost first: (TPID, VLAN id)).
fn tagged_frame(dst_mac: [u8; 6], src_mac: [u8; 6], tags: &[(u16, u16)], ip: &[u8]) -> Vec<u8> {
    let mut f = vec![];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// A packet capture (tcpdump, link-level headers shown) on one interface of a lab node.
struct Capture {
    pid: u32,
    out: PathBuf,
}

impl Capture {
    fn start(c: &mut Cluster, role: &str, ifname: &str) -> Capture {
        let out = std::env::temp_dir().join(format!("{}-{role}-{ifname}.capture", c.lab.id()));
        let err = out.with_extension("err");
        let mut cmd = c.lab.node(role).unwrap().command("tcpdump");
        cmd.args(["-i", ifname, "-nn", "-e", "-l", "-U", "-p"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        let pid = c.lab.spawn_command(cmd).unwrap();
        let start = Instant::now();
        while !std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("listening on")
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "tcpdump did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(err);
        Capture { pid, out }
    }

    /// Stops the capture and returns one line per frame seen.
    fn finish(self, c: &mut Cluster) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        c.lab.stop(self.pid, Duration::from_secs(2));
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let _ = std::fs::remove_file(&self.out);
        text.lines().map(str::to_owned).collect()
    }
}

/// Finding 3: a container's VLAN tags (one tag, which the kernel strips into the skb's metadata
/// before TC, and QinQ, whose inner tag stays in band) never leave the agent's NIC, on the VXLAN
/// path and on the masquerade path; untagged traffic on the same paths does.
#[test]
fn vlan_tagged_frames_from_a_container_are_dropped_and_counted() {
    let mut c = cluster(2, &[]);
    let x = c.add_container("a1", "dcos").unwrap();
    let y = c.add_container("a2", "dcos").unwrap();
    let (x_mac, gw_mac) = macs(&c, &x);
    let a2_ip = c.lab.node("a2").unwrap().ip.unwrap();

    let on_a2 = Capture::start(&mut c, "a2", "eth0");
    let on_ext = Capture::start(&mut c, "ext", "eth0");
    let before = stat(&c, "a1", NO_NETWORK, Counter::DropVlanTagged);
    let mut frames = vec![];
    for (dst, port) in [(ip(&y), 7001u16), (EXT, 7002)] {
        let packet = ipv4(ip(&x), dst, IPPROTO_UDP, &udp(40000, port, b"tagged"));
        for tags in [
            &[(0x8100, 100)][..],
            &[(0x88a8, 200)][..],
            &[(0x88a8, 200), (0x8100, 100)][..],
        ] {
            frames.push(tagged_frame(gw_mac, x_mac, tags, &packet));
        }
    }
    send_frames(&x, &frames);
    // Controls: the same packets untagged do leave (so the captures would have seen a tag).
    for (dst, port) in [(ip(&y), 7101u16), (EXT, 7102)] {
        let packet = ipv4(ip(&x), dst, IPPROTO_UDP, &udp(40000, port, b"untagged"));
        send_frames(&x, &[eth(gw_mac, x_mac, ETH_P_IP, &packet)]);
    }
    let want = before + frames.len() as u64;
    assert_eq!(
        wait_for_stat(&c, "a1", NO_NETWORK, Counter::DropVlanTagged, want),
        want,
        "drop_vlan_tagged; counters:\n{}",
        all_stats(&c, "a1")
    );
    let a2_lines = on_a2.finish(&mut c);
    let ext_lines = on_ext.finish(&mut c);
    for (what, lines) in [("a2", &a2_lines), ("ext", &ext_lines)] {
        let tagged: Vec<_> = lines
            .iter()
            .filter(|l| l.contains("802.1Q") || l.contains("802.1ad") || l.contains("vlan "))
            .collect();
        assert!(tagged.is_empty(), "tagged frames reached {what}: {tagged:#?}");
    }
    assert!(
        a2_lines
            .iter()
            .any(|l| l.contains(&format!("> {a2_ip}.64000"))),
        "the untagged control never reached a2 in VXLAN: {a2_lines:#?}"
    );
    assert!(
        ext_lines.iter().any(|l| l.contains(&format!("> {EXT}.7102"))),
        "the untagged control was never masqueraded to ext: {ext_lines:#?}"
    );
    // Nothing tagged was masqueraded or encapsulated: only the two controls were.
    assert_eq!(stat(&c, "a1", DCOS, Counter::Encapsulated), 1);
    assert_eq!(stat(&c, "a1", DCOS, Counter::Masqueraded), 1);
}
