//! The datapath's holes closed (issue 17), tried as an attacker in a container would, against a
//! real cluster (master, agents, containers in lab namespaces) with real packets: what must never
//! leave an agent does not show up on the fabric or at the receiver, and is counted.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use overlay_common::counters::{Counter, NO_NETWORK};
use overlay_datapath::OverlayMaps;
use overlay_lab::{Container, cluster::Cluster};
use overlay_tests::fixtures::cluster_spec;
use overlay_tests::support_peers::{nat_peers_script, start_peer_server};
use overlay_tests::{lab_pins, support_packets::*};

const DCOS: u32 = 1024;
const EXT: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 254);

fn cluster(agents: usize, agent_args: &[&str]) -> Cluster {
    let mut spec = cluster_spec(agents);
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
    let dropped = wait_for_stat(&c, "a1", NO_NETWORK, Counter::DropVlanTagged, want);
    let a2_lines = on_a2.finish(&mut c);
    let ext_lines = on_ext.finish(&mut c);
    for (what, lines) in [("a2", &a2_lines), ("ext", &ext_lines)] {
        let tagged: Vec<_> = lines
            .iter()
            .filter(|l| l.contains("802.1Q") || l.contains("802.1ad") || l.contains("vlan "))
            .collect();
        assert!(
            tagged.is_empty(),
            "tagged frames reached {what}: {tagged:#?}"
        );
    }
    assert!(
        a2_lines
            .iter()
            .any(|l| l.contains(&format!("> {a2_ip}.64000"))),
        "the untagged control never reached a2 in VXLAN: {a2_lines:#?}"
    );
    assert!(
        ext_lines
            .iter()
            .any(|l| l.contains(&format!("> {EXT}.7102"))),
        "the untagged control was never masqueraded to ext: {ext_lines:#?}"
    );
    assert_eq!(
        dropped,
        want,
        "drop_vlan_tagged; counters:\n{}",
        all_stats(&c, "a1")
    );
    // Nothing tagged was masqueraded or encapsulated: only the two controls were.
    assert_eq!(stat(&c, "a1", DCOS, Counter::Encapsulated), 1);
    assert_eq!(stat(&c, "a1", DCOS, Counter::Masqueraded), 1);
}

/// Starts a UDP listener on `port` in the container (killed with the lab): it counts the
/// datagrams it gets into `<file>` when it ends, after `seconds`.
fn udp_listener(c: &mut Cluster, x: &Container, port: u16, seconds: u32) -> PathBuf {
    const SCRIPT: &str = "import socket, sys, time\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.bind(('0.0.0.0', int(sys.argv[1])))\n\
        s.settimeout(0.1)\n\
        open(sys.argv[3] + '.ready', 'w').close()\n\
        n, end = 0, time.time() + float(sys.argv[2])\n\
        while time.time() < end:\n    try:\n        s.recv(2048); n += 1\n    except socket.timeout:\n        pass\n\
        open(sys.argv[3], 'w').write(str(n))\n";
    let out = std::env::temp_dir().join(format!("{}-{}-{port}.udp", c.lab.id(), x.host_veth));
    let mut cmd = x.node.command("python3");
    cmd.args(["-c", SCRIPT, &port.to_string(), &seconds.to_string()])
        .arg(&out)
        .stdin(Stdio::null());
    c.lab.spawn_command(cmd).unwrap();
    let ready = out.with_extension("udp.ready");
    let start = Instant::now();
    while !ready.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "listener did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(ready);
    out
}

/// What a listener from [`udp_listener`] counted (waits for it to finish).
fn received(out: &PathBuf) -> u64 {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(out)
            && let Ok(n) = text.trim().parse()
        {
            let _ = std::fs::remove_file(out);
            return n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "listener never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Finding 2: a container sends an ordinary UDP datagram to another agent's underlay address on
/// the VXLAN port, with a VXLAN frame as payload (into another network, with an inner source
/// the sending agent owns there). Masquerade would give it the sending agent's address, a known
/// VTEP, and the peer would deliver the inner frame. It is dropped on the sending agent, and a
/// peer refuses VXLAN from a masquerade port (the second line) even from elsewhere.
#[test]
fn vxlan_in_udp_from_a_container_never_reaches_a_peer_container() {
    let mut c = cluster(2, &[]);
    let x = c.add_container("a1", "dcos").unwrap();
    let y = c.add_container("a2", "blue").unwrap();
    let z = c.add_container("a2", "dcos").unwrap();
    let a1_ip = c.lab.node("a1").unwrap().ip.unwrap();
    let a2_ip = c.lab.node("a2").unwrap().ip.unwrap();
    let a2 = maps(&c, "a2");
    let a2_vtep_mac = a2.config().unwrap().unwrap().vtep_mac;
    let endpoints = a2.endpoints().unwrap();
    let vni_of = |t: &Container| endpoints[&std::net::IpAddr::V4(ip(t))].network;
    // An inner source the sending agent owns on each victim's network: the peer's anti-spoofing
    // check (inner source inside a subnet of the outer source's) passes.
    let owned_by_a1 = |vni: u32| -> Ipv4Addr {
        let (net, _) = a2
            .routes()
            .unwrap()
            .into_iter()
            .find(|(_, r)| {
                r.network == vni
                    && overlay_datapath::from_addr16(&r.underlay_ip) == std::net::IpAddr::V4(a1_ip)
            })
            .expect("a route to a1 on the network");
        match net.network() {
            std::net::IpAddr::V4(n) => Ipv4Addr::from(u32::from(n) + 77),
            _ => unreachable!(),
        }
    };
    let crafted = |victim: &Container, src: Ipv4Addr| {
        let inner = ipv4(src, ip(victim), IPPROTO_UDP, &udp(5555, 9999, b"smuggled"));
        // Every network's frames carry the shared VNI 1024: the addresses say the network.
        vxlan(
            0x08,
            overlay_common::maps::SHARED_VNI,
            &eth(
                victim.node.mac(&victim.ifname).unwrap(),
                a2_vtep_mac,
                ETH_P_IP,
                &inner,
            ),
        )
    };
    let payloads = vec![
        // Into another network (x is on dcos, y on blue).
        crafted(&y, owned_by_a1(vni_of(&y))),
        // On x's own network but with a spoofed inner source.
        crafted(&z, owned_by_a1(vni_of(&z))),
    ];
    let y_out = udp_listener(&mut c, &y, 9999, 3);
    let z_out = udp_listener(&mut c, &z, 9999, 3);
    send_udp(&x.node, a2_ip, VXLAN_PORT, &payloads).unwrap();
    // To this agent itself on the VXLAN port, too.
    send_udp(&x.node, a1_ip, VXLAN_PORT, &payloads[..1]).unwrap();
    // Both read before asserting, so neither result file is left behind on failure.
    let (into_y, into_z) = (received(&y_out), received(&z_out));
    assert_eq!(into_y, 0, "the smuggled frame reached another network");
    assert_eq!(into_z, 0, "the spoofed frame reached a peer container");
    assert_eq!(
        wait_for_stat(&c, "a1", DCOS, Counter::DropContainerVxlan, 3),
        3,
        "drop_container_vxlan; counters:\n{}",
        all_stats(&c, "a1")
    );
    assert_eq!(stat(&c, "a2", vni_of(&y), Counter::Decapsulated), 0);
    assert_eq!(stat(&c, "a1", DCOS, Counter::Masqueraded), 0);

    // The second line: VXLAN from a masquerade port is refused before anything else, whoever
    // sends it (here the external host, from port 61500).
    let before = stat(&c, "a2", NO_NETWORK, Counter::DropVxlanNatPort);
    let script = "import socket, sys\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.bind(('0.0.0.0', 61500))\n\
        s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 64000))\n";
    c.lab
        .external()
        .exec(
            "python3",
            &["-c", script, &hex(&payloads[1]), &a2_ip.to_string()],
        )
        .unwrap();
    assert_eq!(
        wait_for_stat(&c, "a2", NO_NETWORK, Counter::DropVxlanNatPort, before + 1),
        before + 1,
        "drop_vxlan_nat_port; counters:\n{}",
        all_stats(&c, "a2")
    );
}

/// An IPv6 frame from `src_mac` (link-local source derived from it) to all nodes, carrying an
/// ICMPv6 message whose checksum is computed here.
fn icmpv6_frame(src_mac: [u8; 6], icmp: &[u8]) -> Vec<u8> {
    let mut src = [0u8; 16];
    src[0] = 0xfe;
    src[1] = 0x80;
    src[8] = src_mac[0] ^ 0x02;
    src[9] = src_mac[1];
    src[10] = src_mac[2];
    src[11] = 0xff;
    src[12] = 0xfe;
    src[13] = src_mac[3];
    src[14] = src_mac[4];
    src[15] = src_mac[5];
    let mut dst = [0u8; 16];
    dst[0] = 0xff;
    dst[1] = 0x02;
    dst[15] = 1;
    let mut msg = icmp.to_vec();
    let mut pseudo = vec![];
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&msg);
    let c = inet_checksum(&pseudo);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.push(58);
    p.push(255); // hop limit: RFC 4861 messages must arrive with 255
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&msg);
    eth([0x33, 0x33, 0, 0, 0, 1], src_mac, ETH_P_IPV6, &p)
}

/// A Router Advertisement (RFC 4861 4.2): default router for 1800 s, with the container's MAC
/// and an autonomous on-link prefix 2001:db8:17::/64 (SLAAC would give the host an address).
fn router_advertisement(src_mac: [u8; 6]) -> Vec<u8> {
    let mut m = vec![134, 0, 0, 0, 64, 0];
    m.extend_from_slice(&1800u16.to_be_bytes()); // router lifetime
    m.extend_from_slice(&[0; 8]); // reachable time, retrans timer
    m.extend_from_slice(&[1, 1]); // source link-layer address option
    m.extend_from_slice(&src_mac);
    m.extend_from_slice(&[3, 4, 64, 0xc0]); // prefix information: /64, on-link + autonomous
    m.extend_from_slice(&86400u32.to_be_bytes()); // valid lifetime
    m.extend_from_slice(&14400u32.to_be_bytes()); // preferred lifetime
    m.extend_from_slice(&[0; 4]);
    m.extend_from_slice(&[
        0x20, 0x01, 0x0d, 0xb8, 0, 0x17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    m
}

/// A Redirect (RFC 4861 4.5): "reach 2001:db8:99::1 through me".
fn redirect() -> Vec<u8> {
    let mut m = vec![137, 0, 0, 0, 0, 0, 0, 0];
    let mut target = [0u8; 16];
    target[0] = 0xfe;
    target[1] = 0x80;
    target[15] = 0x99;
    m.extend_from_slice(&target);
    m.extend_from_slice(&[
        0x20, 0x01, 0x0d, 0xb8, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ]);
    m
}

/// The agent namespace's IPv6 routes (every table) and addresses, for before/after comparison.
fn ipv6_config(node: &overlay_lab::Node) -> String {
    let routes = node
        .exec("ip", &["-6", "route", "show", "table", "all"])
        .unwrap();
    let addrs = node.exec("ip", &["-6", "-o", "addr", "show"]).unwrap();
    // Lifetimes count down; the rest must not change.
    let addrs: Vec<String> = addrs
        .lines()
        .map(|l| l.split("valid_lft").next().unwrap_or(l).trim().to_owned())
        .collect();
    format!("{routes}\n{}", addrs.join("\n"))
}

/// Finding 4: a container's Router Advertisement (default route + autonomous prefix) and
/// Redirect change nothing on the agent host; they and any other IPv6 are dropped and counted,
/// and the host-side veth does not accept router messages at all.
#[test]
fn a_router_advertisement_from_a_container_changes_nothing_on_the_host() {
    let mut c = cluster(1, &[]);
    let x = c.add_container("a1", "dcos").unwrap();
    let a1 = c.lab.node("a1").unwrap().clone();
    let (x_mac, gw_mac) = macs(&c, &x);
    // Let the veth's link-local address settle (DAD) so the host would process an RA, and so
    // that its end of DAD is not mistaken for a change below: a busy machine takes longer than
    // the kernel's one second.
    // (Past the deadline the test goes on: the comparison below then says what changed.)
    let _ = overlay_tests::fixtures::eventually(Duration::from_secs(15), || {
        match a1.exec("ip", &["-6", "addr", "show", "tentative"]) {
            Ok(out) if !out.trim().is_empty() => Err(format!("still tentative: {out}")),
            _ => Ok(()),
        }
    });
    let before = ipv6_config(&a1);
    let counted = |c: &Cluster| {
        (
            stat(c, "a1", NO_NETWORK, Counter::DropRouterMessage),
            stat(c, "a1", NO_NETWORK, Counter::DropIpv6),
        )
    };
    let (ra_before, v6_before) = counted(&c);
    send_frames(
        &x,
        &[
            icmpv6_frame(x_mac, &router_advertisement(x_mac)),
            icmpv6_frame(x_mac, &router_advertisement(x_mac)),
            icmpv6_frame(x_mac, &redirect()),
            ipv6_udp_frame(gw_mac, x_mac, 9999),
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    let (ra, v6) = counted(&c);
    assert_eq!(
        ra - ra_before,
        3,
        "drop_ra_or_redirect; counters:\n{}",
        all_stats(&c, "a1")
    );
    assert!(v6 > v6_before, "drop_ipv6 not counted");
    let after = ipv6_config(&a1);
    assert_eq!(before, after, "the agent host's IPv6 configuration changed");
    assert!(!after.contains("2001:db8:17"), "{after}");
    assert!(!after.contains("default"), "{after}");
    // Second line: the host side would not listen anyway.
    for knob in ["accept_ra", "accept_redirects"] {
        let path = format!("/proc/sys/net/ipv6/conf/{}/{knob}", x.host_veth);
        assert_eq!(a1.exec("cat", &[&path]).unwrap().trim(), "0", "{path}");
    }
    for dev in ["ovl-host", "ovl-net"] {
        let path = format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra");
        assert_eq!(a1.exec("cat", &[&path]).unwrap().trim(), "0", "{path}");
    }

    // Control: the same RA on a link of the agent namespace without the datapath (a veth pair
    // with the kernel's defaults) does configure the host, so the frames above were real RAs.
    let (probe, probe_peer) = ("rat0", "rat1");
    a1.exec(
        "ip",
        &[
            "link", "add", probe, "type", "veth", "peer", "name", probe_peer,
        ],
    )
    .unwrap();
    let configured = (|| {
        a1.exec("ip", &["link", "set", probe, "up"])?;
        a1.exec("ip", &["link", "set", probe_peer, "up"])?;
        std::thread::sleep(Duration::from_secs(2));
        let peer_mac = a1.mac(probe_peer)?;
        let frame = hex(&icmpv6_frame(peer_mac, &router_advertisement(peer_mac)));
        a1.exec(
            "python3",
            &[
                "-c",
                "import socket, sys\n\
                 s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
                 s.bind((sys.argv[1], 0))\n\
                 s.send(bytes.fromhex(sys.argv[2]))\n",
                probe_peer,
                &frame,
            ],
        )?;
        std::thread::sleep(Duration::from_millis(500));
        a1.exec("ip", &["-6", "route", "show", "default"])
    })();
    a1.exec("ip", &["link", "del", probe]).unwrap();
    let configured = configured.unwrap();
    assert!(
        configured.contains(probe),
        "the control RA did not configure the host either: {configured:?}"
    );
}

/// Whether a TCP connection from `node` to `dst:port` is accepted within 1.5 s.
fn tcp_connects(node: &overlay_lab::Node, dst: Ipv4Addr, port: u16) -> bool {
    const SCRIPT: &str = "import socket, sys\n\
        try:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()\n    print('ok')\n\
        except OSError:\n    print('refused')\n";
    node.exec(
        "python3",
        &["-c", SCRIPT, &dst.to_string(), &port.to_string()],
    )
    .unwrap()
    .trim()
        == "ok"
}

/// The container's default gateway: its agent's host in the container's network.
fn gateway_of(x: &Container) -> Ipv4Addr {
    let route = x.node.exec("ip", &["route", "show", "default"]).unwrap();
    let via = route.split_whitespace().skip_while(|w| *w != "via").nth(1);
    via.and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no gateway in {route:?}"))
}

/// Finding 1's datapath half: containers cannot reach the master's API (it is reachable through
/// masquerade like any outside address) nor an agent's control port (`--metrics-listen`) on any
/// agent's address, while the agents themselves can; `--allow-containers-to-master` opens the
/// master and only the master.
#[test]
fn containers_cannot_reach_the_control_plane_unless_allowed() {
    let master = overlay_lab::fabric_ip(1);
    let master_port = overlay_lab::cluster::MASTER_PORT;
    {
        let mut c = cluster(2, &["--metrics-listen", "0.0.0.0:9101"]);
        let x = c.add_container("a1", "dcos").unwrap();
        let a1 = c.lab.node("a1").unwrap().clone();
        let a1_ip = a1.ip.unwrap();
        let a2_ip = c.lab.node("a2").unwrap().ip.unwrap();
        assert!(
            tcp_connects(&a1, master, master_port),
            "the agent's own way to the master"
        );
        assert!(tcp_connects(&a1, a1_ip, 9101), "the metrics port listens");
        assert!(
            !tcp_connects(&x.node, master, master_port),
            "a container reached the master's API"
        );
        for dst in [a1_ip, gateway_of(&x), a2_ip] {
            assert!(
                !tcp_connects(&x.node, dst, 9101),
                "a container reached {dst}:9101"
            );
        }
        let denied = stat(&c, "a1", DCOS, Counter::DropControlPlane);
        assert!(
            denied >= 4,
            "drop_control_plane {denied}; counters:\n{}",
            all_stats(&c, "a1")
        );
        // A container on another agent, through the overlay to a1's gateway address: refused
        // by a1 on decapsulation.
        let y = c.add_container("a2", "dcos").unwrap();
        assert!(
            !tcp_connects(&y.node, gateway_of(&x), 9101),
            "a remote container reached a1's gateway:9101"
        );
        assert!(
            stat(&c, "a1", DCOS, Counter::DropControlPlane) > denied,
            "not counted on a1; counters:\n{}",
            all_stats(&c, "a1")
        );
        assert!(
            y.node.ping(gateway_of(&x)),
            "a1's gateway itself stays reachable"
        );
        // Everything else outside still works.
        assert!(x.node.ping(EXT), "masquerade to the outside");
    }
    let mut c = cluster(
        1,
        &[
            "--allow-containers-to-master",
            "--metrics-listen",
            "0.0.0.0:9101",
        ],
    );
    let x = c.add_container("a1", "dcos").unwrap();
    let a1_ip = c.lab.node("a1").unwrap().ip.unwrap();
    assert!(
        tcp_connects(&x.node, master, master_port),
        "--allow-containers-to-master: the container should reach the master"
    );
    assert!(
        !tcp_connects(&x.node, a1_ip, 9101),
        "the agent port stays closed"
    );
    assert_eq!(
        maps(&c, "a1")
            .protected()
            .unwrap()
            .iter()
            .filter(|d| d.addr.is_some())
            .count(),
        0,
        "no master entry with the allow flag"
    );
}

const PEER_PORT: u16 = 8000;

/// The masquerade egress entries of container `x` (by protocol and destination).
fn nat_flows_of(c: &Cluster, x: &Container) -> Vec<(u8, std::net::IpAddr, u16)> {
    use overlay_datapath::from_addr16;
    maps(c, &x.agent)
        .nat_entries()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| {
            k.direction == overlay_common::maps::nat_direction::EGRESS
                && from_addr16(&k.local) == std::net::IpAddr::V4(ip(x))
        })
        .map(|(k, _)| (k.protocol, from_addr16(&k.remote), k.remote_port))
        .collect()
}

/// Finding 5, the quota: one container sends 3,000 datagrams from distinct source ports towards
/// one server:port (a port each, before); it gets its quota of ports and no more, and another
/// container's new flow to the same server:port still works.
#[test]
fn one_container_cannot_take_every_port_towards_one_server() {
    let mut c = cluster(1, &["--nat-max-flows-per-destination", "1000"]);
    let x = c.add_container("a1", "dcos").unwrap();
    let w = c.add_container("a1", "dcos").unwrap();
    start_peer_server(&mut c, PEER_PORT);
    const FLOOD: &str = "import socket, sys\n\
        for p in range(20000, 23000):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.bind(('0.0.0.0', p))\n    s.sendto(b'x', (sys.argv[1], int(sys.argv[2])))\n    s.close()\n";
    x.node
        .exec(
            "python3",
            &["-c", FLOOD, &EXT.to_string(), &PEER_PORT.to_string()],
        )
        .unwrap();
    let flows = nat_flows_of(&c, &x).len();
    assert_eq!(flows, 1000, "flows of the flooding container");
    let refused = stat(&c, "a1", DCOS, Counter::DropNatQuota);
    assert_eq!(
        refused,
        2000,
        "drop_nat_quota; counters:\n{}",
        all_stats(&c, "a1")
    );
    assert_eq!(stat(&c, "a1", DCOS, Counter::DropNatNoPort), 0);
    let script = nat_peers_script();
    let answered = w
        .node
        .exec(
            "python3",
            &[
                script.to_str().unwrap(),
                "udp-flows",
                &EXT.to_string(),
                &PEER_PORT.to_string(),
                "5",
            ],
        )
        .unwrap();
    assert_eq!(
        answered.trim(),
        "5",
        "another container's new flows to the same server:port"
    );
    // The flooding container's own flows keep working: a known flow is no new one.
    let quota = maps(&c, "a1").nat_quotas().unwrap();
    assert!(
        quota.iter().any(|(_, q)| q.flows == 1000),
        "OVL_NAT_QUOTA: {quota:?}"
    );
}

/// A TCP segment with `flags` and a correct checksum.
fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = tcp_syn(src, dst, sport, dport);
    t[13] = flags;
    t[16] = 0;
    t[17] = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
    pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&t);
    let c = inet_checksum(&pseudo);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// Finding 5, the handshake: a bare ACK and a SYN that nobody answers create entries that expire
/// at the short handshake timeout, not the 2-hour established one; a real connection is
/// established and stays.
#[test]
fn tcp_entries_without_a_handshake_expire_at_the_short_timeout() {
    let mut c = cluster(1, &["--nat-tcp-handshake-timeout", "3"]);
    let x = c.add_container("a1", "dcos").unwrap();
    start_peer_server(&mut c, PEER_PORT);
    let (x_mac, gw_mac) = macs(&c, &x);
    // Nobody on the fabric has this address: no RST will close the entries.
    let silent = Ipv4Addr::new(10, 250, 0, 200);
    let frame = |dport: u16, flags: u8| {
        let seg = tcp_segment(ip(&x), silent, 40000 + dport, dport, flags);
        eth(
            gw_mac,
            x_mac,
            ETH_P_IP,
            &ipv4(ip(&x), silent, IPPROTO_TCP, &seg),
        )
    };
    // An established connection to the peer server, held open for 10 s.
    let held = {
        let script = nat_peers_script();
        let mut cmd = x.node.command("python3");
        cmd.arg(script)
            .args([
                "tcp-hold",
                &EXT.to_string(),
                &PEER_PORT.to_string(),
                "0",
                "10",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c.lab.spawn_command(cmd).unwrap()
    };
    let tcp_to = |c: &Cluster, port: u16, dst: Ipv4Addr| {
        nat_flows_of(c, &x).contains(&(IPPROTO_TCP, std::net::IpAddr::V4(dst), port))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tcp_to(&c, PEER_PORT, EXT) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    send_frames(&x, &[frame(81, 0x10), frame(82, 0x02)]);
    assert!(tcp_to(&c, 81, silent), "no entry for the bare ACK");
    assert!(tcp_to(&c, 82, silent), "no entry for the SYN");
    assert!(tcp_to(&c, PEER_PORT, EXT), "no entry for the connection");
    let established = maps(&c, "a1")
        .nat_entries()
        .unwrap()
        .into_iter()
        .any(|(k, e)| {
            k.remote_port == PEER_PORT
                && e.flags & overlay_common::maps::NatEntry::FLAG_ESTABLISHED != 0
        });
    assert!(
        established,
        "the real connection is not tracked as established"
    );
    // The sweeper runs every second: both half-open entries are gone within 3 s + 2 sweeps.
    let deadline = Instant::now() + Duration::from_secs(6);
    while (tcp_to(&c, 81, silent) || tcp_to(&c, 82, silent)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !tcp_to(&c, 81, silent),
        "the bare ACK's entry outlived the handshake timeout"
    );
    assert!(
        !tcp_to(&c, 82, silent),
        "the SYN's entry outlived the handshake timeout"
    );
    assert!(
        tcp_to(&c, PEER_PORT, EXT),
        "the established connection's entry went too"
    );
    c.lab.stop(held, Duration::from_secs(1));
}

/// Finding 5, echo identifiers: the host and a container ping the same external host with the
/// same identifier (one inside the masquerade range, one outside) at the same time; both get
/// every answer.
#[test]
fn host_and_container_pings_with_the_same_identifier_both_get_answers() {
    let mut c = cluster(1, &[]);
    let x = c.add_container("a1", "dcos").unwrap();
    let a1 = c.lab.node("a1").unwrap().clone();
    for id in ["61500", "1234"] {
        let args = ["-c", "4", "-i", "0.3", "-W", "2", "-e", id, "-q"];
        let ext = EXT.to_string();
        let (host, container) = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let mut a = args.to_vec();
                a.push(&ext);
                a1.try_exec("ping", &a)
            });
            let k = s.spawn(|| {
                let mut a = args.to_vec();
                a.push(&ext);
                x.node.try_exec("ping", &a)
            });
            (h.join().unwrap(), k.join().unwrap())
        });
        assert!(host, "the host's ping with identifier {id} lost answers");
        assert!(
            container,
            "the container's ping with identifier {id} lost answers"
        );
    }
    let ids: Vec<u16> = maps(&c, "a1")
        .nat_entries()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| {
            k.protocol == 1 && k.direction == overlay_common::maps::nat_direction::INGRESS
        })
        .map(|(k, _)| k.local_port)
        .collect();
    assert!(!ids.is_empty());
    for id in ids {
        assert!(
            (61000..=63999).contains(&id),
            "identifier {id} outside the masquerade range"
        );
        assert_ne!(id, 61500, "the container's identifier was kept");
    }
}

/// Finding 5, destinations: loopback, multicast, the limited broadcast and the underlay's
/// broadcast get no NAT entry, are not counted as masqueraded, and count as drop_no_route.
#[test]
fn loopback_multicast_and_broadcast_destinations_get_no_nat_state() {
    let mut c = cluster(1, &[]);
    let x = c.add_container("a1", "dcos").unwrap();
    let (x_mac, gw_mac) = macs(&c, &x);
    let dsts = [
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(224, 0, 0, 251),
        Ipv4Addr::new(239, 1, 2, 3),
        Ipv4Addr::BROADCAST,
        Ipv4Addr::new(10, 250, 0, 255),
    ];
    let before = stat(&c, "a1", DCOS, Counter::DropNoRoute);
    let frames: Vec<_> = dsts
        .iter()
        .map(|d| {
            eth(
                gw_mac,
                x_mac,
                ETH_P_IP,
                &ipv4(ip(&x), *d, IPPROTO_UDP, &udp(5353, 5353, b"q")),
            )
        })
        .collect();
    send_frames(&x, &frames);
    let want = before + dsts.len() as u64;
    assert_eq!(
        wait_for_stat(&c, "a1", DCOS, Counter::DropNoRoute, want),
        want,
        "drop_no_route; counters:\n{}",
        all_stats(&c, "a1")
    );
    assert_eq!(
        nat_flows_of(&c, &x),
        vec![],
        "NAT state for a non-destination"
    );
    assert_eq!(stat(&c, "a1", DCOS, Counter::Masqueraded), 0);
    assert_eq!(stat(&c, "a1", DCOS, Counter::NatCreated), 0);
    // A real outside address still is one.
    assert!(x.node.ping(EXT));
}
