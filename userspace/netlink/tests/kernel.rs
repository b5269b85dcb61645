//! Against the real kernel, inside namespaces this test creates (needs root): veth pairs across
//! namespaces, MTU, MAC, addresses, routes, sysctls, typed errors, and child processes started
//! inside a namespace.

use std::{net::Ipv4Addr, process::Command};

use overlay_netlink::{Address, Error, Handle, Netns, Route, read_sysctl, write_sysctl};

/// A named namespace removed on drop (also when an assertion fails).
struct TestNs(String);

impl TestNs {
    fn new(tag: &str) -> TestNs {
        let name = format!("eonl{}-{tag}", std::process::id());
        Netns::create_named(&name).unwrap();
        TestNs(name)
    }
    fn open(&self) -> Netns {
        Netns::named(&self.0).unwrap()
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Netns::delete_named(&self.0);
    }
}

#[test]
fn veth_address_route_and_errors_in_test_namespaces() {
    let a = TestNs::new("a");
    let b = TestNs::new("b");
    assert!(Netns::list_named().contains(&a.0));
    // A second namespace of the same name is refused, typed.
    assert!(Netns::create_named(&a.0).unwrap_err().is_exists());

    let (na, nb) = (a.open(), b.open());
    let mut ha = Handle::in_netns(&na).unwrap();
    let mut hb = Handle::in_netns(&nb).unwrap();

    // Fresh namespaces hold only lo.
    let links = ha.links().unwrap();
    assert_eq!(
        links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["lo"]
    );
    ha.set_up("lo").unwrap();
    assert!(ha.link("lo").unwrap().up);

    // A veth pair whose peer is born in the other namespace.
    ha.add_veth("ve-a", "ve-b", 1400, Some(&nb)).unwrap();
    let va = ha.link("ve-a").unwrap();
    assert_eq!(
        (va.mtu, va.kind.as_deref(), va.up),
        (1400, Some("veth"), false)
    );
    assert!(
        ha.link("ve-b").unwrap_err().is_not_found(),
        "peer must not be in a"
    );
    let vb = hb.link("ve-b").unwrap();
    assert_eq!(vb.mtu, 1400);
    assert_eq!(hb.link_by_index(vb.ifindex).unwrap().name, "ve-b");
    // The same name again: Exists.
    assert!(matches!(
        ha.add_veth("ve-a", "ve-x", 1400, None),
        Err(Error::Exists { .. })
    ));

    ha.set_mtu("ve-a", 1350).unwrap();
    ha.set_mac("ve-a", [0x02, 0, 0, 0, 0, 0xaa]).unwrap();
    ha.set_up("ve-a").unwrap();
    let va = ha.link("ve-a").unwrap();
    assert_eq!(
        (va.mtu, va.mac, va.up),
        (1350, [0x02, 0, 0, 0, 0, 0xaa], true)
    );
    hb.set_mtu("ve-b", 1350).unwrap();
    hb.set_up("ve-b").unwrap();

    // Addresses.
    let addr_a = Address {
        ifindex: va.ifindex,
        ip: Ipv4Addr::new(10, 77, 0, 1),
        prefix_len: 24,
    };
    let addr_b = Address {
        ifindex: vb.ifindex,
        ip: Ipv4Addr::new(10, 77, 0, 2),
        prefix_len: 24,
    };
    ha.add_address(addr_a).unwrap();
    hb.add_address(addr_b).unwrap();
    assert!(ha.add_address(addr_a).unwrap_err().is_exists());
    assert_eq!(ha.addresses(Some(va.ifindex)).unwrap(), vec![addr_a]);
    assert_eq!(addr_a.broadcast(), Some(Ipv4Addr::new(10, 77, 0, 255)));

    // Routes: a subnet route with a source and our protocol, and an on-link default route.
    let r = Route::new(Ipv4Addr::new(10, 88, 0, 0), 16, va.ifindex)
        .src(addr_a.ip)
        .protocol(77);
    ha.add_route(r).unwrap();
    assert!(ha.add_route(r).unwrap_err().is_exists());
    ha.replace_route(r).unwrap();
    let gw = Ipv4Addr::new(169, 254, 1, 1);
    hb.add_route(Route::default_via(gw, vb.ifindex)).unwrap();
    let ours: Vec<Route> = ha
        .routes()
        .unwrap()
        .into_iter()
        .filter(|x| x.protocol == 77)
        .collect();
    assert_eq!(ours.len(), 1);
    assert_eq!(
        (ours[0].dst, ours[0].prefix_len, ours[0].oif, ours[0].src),
        (r.dst, 16, Some(va.ifindex), Some(addr_a.ip))
    );
    let def = hb
        .routes()
        .unwrap()
        .into_iter()
        .find(Route::is_default)
        .unwrap();
    assert_eq!(
        (def.gateway, def.oif, def.onlink),
        (Some(gw), Some(vb.ifindex), true)
    );
    ha.del_route(r).unwrap();
    assert!(ha.del_route(r).unwrap_err().is_not_found());
    assert!(ha.routes().unwrap().iter().all(|x| x.protocol != 77));

    // Packets cross the pair: ping from a process started inside namespace a (no nsenter).
    let mut ping = Command::new("ping");
    ping.args(["-c", "1", "-W", "2", "-q", "10.77.0.2"]);
    na.prepare_command(&mut ping);
    assert!(
        ping.status().unwrap().success(),
        "ping across the veth pair"
    );

    // Sysctls, per namespace: set in a, unchanged in b.
    let knob = "net/ipv4/conf/all/forwarding";
    na.run(|| write_sysctl(knob, "1")).unwrap().unwrap();
    assert_eq!(na.run(|| read_sysctl(knob)).unwrap().unwrap(), "1");
    assert_eq!(nb.run(|| read_sysctl(knob)).unwrap().unwrap(), "0");
    assert!(matches!(
        na.run(|| write_sysctl("net/ipv4/conf/no-such-dev/forwarding", "1"))
            .unwrap(),
        Err(Error::NotFound { .. })
    ));

    // Addresses go, then the pair (both ends).
    ha.del_address(addr_a).unwrap();
    assert!(ha.addresses(Some(va.ifindex)).unwrap().is_empty());
    ha.del_link("ve-a").unwrap();
    assert!(hb.link("ve-b").unwrap_err().is_not_found());

    // Typed errors for a device that is not there.
    assert!(matches!(
        ha.link("no-such-dev"),
        Err(Error::NoSuchDevice { .. })
    ));
    assert!(matches!(
        ha.del_link("no-such-dev"),
        Err(Error::NoSuchDevice { .. })
    ));
    assert!(!ha.del_link_if_exists("no-such-dev").unwrap());
    assert!(ha.set_up("no-such-dev").unwrap_err().is_not_found());

    drop((ha, hb, na, nb));
    let name = a.0.clone();
    drop(a);
    assert!(!Netns::list_named().contains(&name));
}

#[test]
fn moving_a_link_between_namespaces_and_bridging() {
    let a = TestNs::new("m");
    let b = TestNs::new("n");
    let (na, nb) = (a.open(), b.open());
    let mut ha = Handle::in_netns(&na).unwrap();
    let mut hb = Handle::in_netns(&nb).unwrap();
    ha.add_bridge("br0").unwrap();
    ha.add_veth("p0", "q0", 1500, None).unwrap();
    let br = ha.link("br0").unwrap();
    assert_eq!(br.kind.as_deref(), Some("bridge"));
    ha.set_master("p0", br.ifindex).unwrap();
    ha.move_to_netns("q0", &nb).unwrap();
    assert!(ha.link("q0").unwrap_err().is_not_found());
    assert!(hb.link("q0").is_ok());
    // The thread that ran those is back in its own namespace.
    assert!(Handle::new().unwrap().link("br0").is_err());
}

#[test]
fn ipv6_addresses_report_prefix_and_tentative_state() {
    let a = TestNs::new("v6");
    let b = TestNs::new("v6peer");
    let (na, nb) = (a.open(), b.open());
    let mut ha = Handle::in_netns(&na).unwrap();
    ha.add_veth("v6-a", "v6-b", 1500, Some(&nb)).unwrap();
    let ifindex = ha.link("v6-a").unwrap().ifindex;
    let ip = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &a.0, "ip"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    // One address usable at once, one still in duplicate-address detection (the link is up and
    // its peer down: DAD cannot finish before we look).
    ip(&[
        "-6",
        "addr",
        "add",
        "fd00:250::11/64",
        "dev",
        "v6-a",
        "nodad",
    ]);
    ip(&["link", "set", "v6-a", "up"]);
    ip(&["-6", "addr", "add", "fd00:250::12/64", "dev", "v6-a"]);
    let found = ha.addresses6(Some(ifindex)).unwrap();
    let get = |a: &str| {
        let a: std::net::Ipv6Addr = a.parse().unwrap();
        found.iter().find(|x| x.ip == a).copied()
    };
    let usable = get("fd00:250::11").unwrap_or_else(|| panic!("{found:?}"));
    assert_eq!(
        (usable.prefix_len, usable.tentative, usable.ifindex),
        (64, false, ifindex)
    );
    assert!(
        get("fd00:250::12")
            .unwrap_or_else(|| panic!("{found:?}"))
            .tentative
    );
    // No IPv4 address is reported as IPv6, and other interfaces' are left out.
    assert!(found.iter().all(|x| x.ifindex == ifindex));
    assert!(ha.addresses(Some(ifindex)).unwrap().is_empty());
}

#[test]
fn ipv6_addresses_are_added_listed_with_their_state_and_deleted() {
    let a = TestNs::new("v6add");
    let b = TestNs::new("v6addb");
    let (na, nb) = (a.open(), b.open());
    let mut h = Handle::in_netns(&na).unwrap();
    h.add_veth("v6-a", "v6-b", 1500, Some(&nb)).unwrap();
    h.set_up("v6-a").unwrap();
    Handle::in_netns(&nb).unwrap().set_up("v6-b").unwrap();
    let ifindex = h.link("v6-a").unwrap().ifindex;
    let ula: std::net::Ipv6Addr = "fd00:fab::11".parse().unwrap();
    h.add_address6(overlay_netlink::Address6::new(ifindex, ula, 64))
        .unwrap();
    assert!(
        h.add_address6(overlay_netlink::Address6::new(ifindex, ula, 64))
            .unwrap_err()
            .is_exists()
    );
    let found = h.addresses6(Some(ifindex)).unwrap();
    let ours = found
        .iter()
        .find(|x| x.ip == ula)
        .unwrap_or_else(|| panic!("{found:?}"));
    assert_eq!(ours.prefix_len, 64);
    assert!(
        ours.global && !ours.tentative && !ours.dad_failed && !ours.deprecated,
        "nodad: usable at once: {ours:?}"
    );
    // The kernel's own link-local address of the veth, if it made one, is not global.
    for x in found.iter().filter(|x| x.ip.segments()[0] == 0xfe80) {
        assert!(!x.global, "{x:?}");
    }
    // Not among the IPv4 addresses, and the IPv4 listing is not among these.
    assert!(h.addresses(Some(ifindex)).unwrap().is_empty());
    h.del_address6(overlay_netlink::Address6::new(ifindex, ula, 64))
        .unwrap();
    assert!(
        !h.addresses6(Some(ifindex))
            .unwrap()
            .iter()
            .any(|x| x.ip == ula)
    );
}

#[test]
fn ipv6_routes_are_added_replaced_listed_and_deleted() {
    let a = TestNs::new("v6rt");
    let b = TestNs::new("v6rtb");
    let (na, nb) = (a.open(), b.open());
    let mut h = Handle::in_netns(&na).unwrap();
    h.add_veth("r6-a", "r6-b", 1500, Some(&nb)).unwrap();
    h.set_up("r6-a").unwrap();
    let ifindex = h.link("r6-a").unwrap().ifindex;
    let ula: std::net::Ipv6Addr = "fd00:fab::11".parse().unwrap();
    h.add_address6(overlay_netlink::Address6::new(ifindex, ula, 128))
        .unwrap();
    let dst: std::net::Ipv6Addr = "fd01:b::".parse().unwrap();
    let gw: std::net::Ipv6Addr = "fd01:a::1".parse().unwrap();
    // A subnet route with a preferred source and our protocol, as the host link writes them.
    let subnet = overlay_netlink::Route6::new(dst, 64, ifindex)
        .src(ula)
        .protocol(77);
    h.add_route6(subnet).unwrap();
    assert!(h.add_route6(subnet).unwrap_err().is_exists());
    h.replace_route6(subnet).unwrap();
    // The default route via an on-link gateway, as a container gets it.
    h.add_route6(overlay_netlink::Route6::default_via(gw, ifindex))
        .unwrap();
    let routes = h.routes6().unwrap();
    let ours = routes
        .iter()
        .find(|r| r.dst == dst && r.prefix_len == 64)
        .unwrap_or_else(|| panic!("{routes:?}"));
    assert_eq!(
        (ours.oif, ours.src, ours.protocol, ours.gateway),
        (Some(ifindex), Some(ula), 77, None)
    );
    let default = routes
        .iter()
        .find(|r| r.is_default())
        .unwrap_or_else(|| panic!("{routes:?}"));
    assert_eq!((default.gateway, default.oif), (Some(gw), Some(ifindex)));
    assert!(default.onlink, "{default:?}");
    // Not among the IPv4 routes.
    assert!(h.routes().unwrap().iter().all(|r| r.oif != Some(ifindex)));
    h.del_route6(*ours).unwrap();
    h.del_route6(*default).unwrap();
    let left = h.routes6().unwrap();
    assert!(
        !left.iter().any(|r| r.dst == dst && r.prefix_len == 64)
            && !left.iter().any(|r| r.is_default()),
        "{left:?}"
    );
    assert!(h.del_route6(*ours).unwrap_err().is_not_found());
}
