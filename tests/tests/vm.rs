//! ebpf-overlay on real (virtual) hosts: two QEMU VMs boot Debian's 6.12 kernel and a systemd
//! root with the project's `.deb` installed (`overlay_lab::vm`); systemd starts the agent at
//! boot; containers (network namespaces in the VMs, attached by the CNI plugin) talk across the
//! VMs over virtio-net; a package upgrade in one VM keeps a ping from the other going; that VM
//! reboots and its agent comes back at boot with the same allocation while the other starts the
//! packaged master unit; purge removes the datapath. One lab boot for the whole sequence: boots
//! under software emulation take a minute.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use overlay_lab::vm::{VmLab, VmLabSpec};
use overlay_tests::bin_path;

fn build_package(version: &str, out: &std::path::Path) -> std::path::PathBuf {
    let bin_dir = bin_path("overlay-agent").parent().unwrap().to_owned();
    let st = Command::new(bin_path("xtask"))
        .args(["package", "--version", version, "--bin-dir"])
        .arg(&bin_dir)
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "cargo xtask package failed");
    out.join(format!("ebpf-overlay_{version}_amd64.deb"))
}

/// Adds a CNI container on `network` in `vm`; returns its address.
fn add_container(vm: &overlay_lab::vm::Vm, name: &str, network: &str) -> String {
    vm.add_cni_container(name, network)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .to_string()
}

fn pings(vm: &overlay_lab::vm::Vm, netns: &str, dst: &str) -> bool {
    vm.sh(
        &format!("ip netns exec {netns} ping -c 2 -W 2 -i 0.5 {dst}"),
        Duration::from_secs(30),
    )
    .unwrap()
    .status
        == 0
}

/// Programs attached through TCX, as the guest kernel reports them: every link of type tcx
/// (bpftool 7.1 prints its number, 11) and the name of its program.
fn tcx_programs(vm: &overlay_lab::vm::Vm) -> Vec<String> {
    let links: serde_json::Value =
        serde_json::from_str(vm.ok("bpftool -j link show").unwrap().trim()).unwrap();
    let mut names = vec![];
    for link in links.as_array().unwrap() {
        if link["type"] == 11 || link["type"] == "tcx" {
            let id = link["prog_id"].as_u64().unwrap();
            let prog: serde_json::Value = serde_json::from_str(
                vm.ok(&format!("bpftool -j prog show id {id}"))
                    .unwrap()
                    .trim(),
            )
            .unwrap();
            names.push(prog["name"].as_str().unwrap().to_owned());
        }
    }
    names.sort();
    names
}

/// The XDP program on eth0 as the guest kernel reports it: (mode, program name).
fn xdp_on_eth0(vm: &overlay_lab::vm::Vm) -> Option<(String, String)> {
    // [{"xdp":[{"devname":"eth0","ifindex":2,"mode":"driver","id":N}],"tc":[...],...}]
    let net: serde_json::Value =
        serde_json::from_str(vm.ok("bpftool -j net show dev eth0").unwrap().trim()).unwrap();
    let xdp = net[0]["xdp"].as_array()?.first()?.clone();
    let id = xdp["id"].as_u64().unwrap();
    let prog: serde_json::Value = serde_json::from_str(
        vm.ok(&format!("bpftool -j prog show id {id}"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    // The driver really is virtio_net (native XDP on a real driver, not a veth).
    assert_eq!(
        vm.ok("basename $(readlink /sys/class/net/eth0/device/driver)")
            .unwrap()
            .trim(),
        "virtio_net"
    );
    Some((
        xdp["mode"].as_str().unwrap_or_default().to_owned(),
        prog["name"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// A datapath counter of network `vni` on `vm`, from `overlayctl datapath` (0 if never hit).
fn counter(vm: &overlay_lab::vm::Vm, vni: u32, name: &str) -> u64 {
    let out = vm.ok("overlayctl datapath").unwrap();
    out.lines()
        .filter_map(|l| {
            // "  dcos (id 1024)           drop_unknown_vni        20 packets   1520 bytes"
            let f: Vec<&str> = l.split_whitespace().collect();
            let at = f.iter().position(|t| *t == "(id")?;
            (f.get(at + 1) == Some(&format!("{vni})").as_str()) && f.get(at + 2) == Some(&name))
                .then(|| f[at + 3].parse::<u64>().unwrap())
        })
        .sum()
}

#[test]
fn vms_boot_the_agent_with_systemd_and_containers_talk_across_them() {
    let started = Instant::now();
    let out = tempfile::tempdir().unwrap();
    let deb = build_package("0.1.0", out.path());
    let upgrade = build_package("0.1.1", out.path());
    let lab = VmLab::up(VmLabSpec {
        vms: 2,
        debs: vec![deb],
        bin_dir: bin_path("overlay-master").parent().unwrap().to_owned(),
        master_config: overlay_lab::cluster::TWO_NETWORKS.into(),
        mem_mib: 512,
        extra_files: vec![upgrade],
        kernel: Default::default(),
    })
    .unwrap();
    eprintln!(
        "vm lab {}: {}; image {:.0}s (0 = cached), root image {:.1}s, boot to shell {:.0}s",
        lab.id, lab.accel_reason, lab.image_secs, lab.root_image_secs, lab.boot_secs
    );
    let (vm1, vm2) = (lab.vm("vm1"), lab.vm("vm2"));
    let phase = Instant::now();

    // systemd started the agent at boot and it reported ready (Type=notify: programs attached,
    // master state applied).
    for vm in [vm1, vm2] {
        let state = vm
            .wait_for(
                "systemctl is-active overlay-agent",
                Duration::from_secs(120),
            )
            .unwrap_or_else(|e| panic!("{e:#}\n{}", vm.agent_journal()));
        assert_eq!(state.trim(), "active");
        // Ready came from the agent itself (sd_notify), once its state was applied.
        let status = vm.ok("systemctl show -P StatusText overlay-agent").unwrap();
        assert!(
            status.contains("datapath attached, master revision"),
            "{status}"
        );
        assert_eq!(
            vm.ok("systemctl is-enabled overlay-agent").unwrap().trim(),
            "enabled"
        );
        let programs = tcx_programs(vm);
        assert_eq!(
            programs,
            ["from_host", "from_underlay"],
            "{}: TCX programs",
            vm.name
        );
        vm.ok("test -e /sys/fs/bpf/ebpf-overlay/v*/default/links/from_underlay@eth0")
            .unwrap();
        assert_eq!(
            xdp_on_eth0(vm),
            Some(("driver".into(), "xdp_underlay".into()))
        );
        // The agent runs with the unit's capabilities only.
        let caps = vm
            .ok("grep CapEff /proc/$(systemctl show -P MainPID overlay-agent)/status")
            .unwrap();
        // CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
        assert_eq!(
            caps.split_whitespace().nth(1),
            Some("000000c000001000"),
            "{caps}"
        );
    }
    // Both registered with the master (read from inside vm1, as any host would).
    let state: serde_json::Value = serde_json::from_str(
        vm1.ok(&format!(
            "overlayctl state --master {} --ca {}",
            lab.master_url(),
            VmLab::GUEST_CA
        ))
        .unwrap()
        .trim(),
    )
    .unwrap();
    let agents: Vec<&str> = state["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap())
        .collect();
    assert!(
        agents.contains(&"10.251.0.11") && agents.contains(&"10.251.0.12"),
        "{agents:?}"
    );

    eprintln!(
        "agents active, attached and registered: {:.0}s",
        phase.elapsed().as_secs_f64()
    );
    let phase = Instant::now();

    // Containers on two networks in each VM.
    let a1 = add_container(vm1, "c-dcos", "dcos");
    let b1 = add_container(vm1, "c-blue", "blue");
    let a2 = add_container(vm2, "c-dcos", "dcos");
    let b2 = add_container(vm2, "c-blue", "blue");
    assert!(pings(vm1, "c-dcos", &a2), "dcos container vm1 -> vm2");
    assert!(pings(vm2, "c-blue", &b1), "blue container vm2 -> vm1");
    assert!(!pings(vm1, "c-dcos", &b2), "dcos reached blue across VMs");
    assert!(!pings(vm1, "c-blue", &a2), "blue reached dcos across VMs");

    // VXLAN the TC path would drop (here: a known VTEP, an unknown VNI) is dropped by XDP in
    // vm2's virtio_net driver, counted under TC's reason and as xdp_dropped.
    let unknown_vni = |vm| counter(vm, 0, "drop_unknown_vni");
    let early = |vm| counter(vm, 0, "xdp_dropped");
    let (vni_before, early_before) = (unknown_vni(vm2), early(vm2));
    // VXLAN header (I flag, VNI 4096) and 34 bytes of inner frame, from an ephemeral port
    // (bash's /dev/udp; the guest's sh is dash).
    let datagram = format!(
        "\\x08\\x00\\x00\\x00\\x00\\x10\\x00\\x00{}",
        "\\x00".repeat(34)
    );
    vm1.ok(&format!(
        "bash -c 'for i in $(seq 20); do printf \"{datagram}\" > /dev/udp/10.251.0.12/64000; done'"
    ))
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(unknown_vni(vm2), vni_before + 20, "drop_unknown_vni");
    assert_eq!(early(vm2), early_before + 20, "xdp_dropped");

    eprintln!(
        "containers across VMs: {:.0}s",
        phase.elapsed().as_secs_f64()
    );
    let phase = Instant::now();

    // netkit (the guest kernel has CONFIG_NETKIT): both agents restarted with
    // `--container-device netkit` write it into their CNI configs, so new containers get netkit
    // pairs with from_container as the pair's policy (a netkit link, not TCX), and they reach
    // each other across the VMs as veth containers do (ping, TCP), isolation included. The
    // veth containers keep working beside them.
    std::thread::scope(|s| {
        let other = s.spawn(|| restart_with_netkit(vm2));
        restart_with_netkit(vm1);
        if let Err(e) = other.join() {
            std::panic::resume_unwind(e);
        }
    });
    for vm in [vm1, vm2] {
        assert!(
            vm.ok("cat /etc/cni/net.d/*-dcos.conflist")
                .unwrap()
                .contains(r#""container_device": "netkit""#),
            "{}: the agent's conflist does not ask for netkit",
            vm.name
        );
        vm.ok("journalctl -b -u overlay-agent --no-pager | grep -q 'containers get netkit pairs'")
            .unwrap_or_else(|e| panic!("{}: the agent did not say netkit: {e:#}", vm.name));
    }
    let nk1 = add_container(vm1, "c-nk", "dcos");
    let nk2 = add_container(vm2, "c-nk", "dcos");
    let nkb2 = add_container(vm2, "c-nkblue", "blue");
    for vm in [vm1, vm2] {
        // One netkit link per netkit container, each running from_container.
        let netkit = netkit_programs(vm);
        assert!(
            !netkit.is_empty() && netkit.iter().all(|p| p == "from_container"),
            "{}: netkit links {netkit:?}",
            vm.name
        );
        assert_eq!(
            netkit.len(),
            vm.netkit_devices().unwrap(),
            "{}: netkit devices",
            vm.name
        );
        // The veth containers' programs stay on TCX.
        assert!(
            tcx_programs(vm).contains(&"from_container".to_owned()),
            "{}: {:?}",
            vm.name,
            tcx_programs(vm)
        );
    }
    assert!(pings(vm1, "c-nk", &nk2), "netkit container vm1 -> vm2");
    assert!(pings(vm2, "c-nk", &nk1), "netkit container vm2 -> vm1");
    assert!(
        pings(vm1, "c-nk", &a2),
        "netkit container vm1 -> veth container vm2"
    );
    assert!(
        pings(vm2, "c-dcos", &nk1),
        "veth container vm2 -> netkit container vm1"
    );
    assert!(
        !pings(vm1, "c-nk", &nkb2),
        "netkit dcos reached blue across VMs"
    );
    // Same agent, both ways: from a netkit policy the program hands the frame to the target's
    // host-side device (a peer redirect works at TC ingress only); from a veth's TC ingress it
    // redirects into the netkit pair's peer.
    assert!(
        pings(vm1, "c-nk", &a1),
        "same agent: netkit -> veth container"
    );
    assert!(
        pings(vm1, "c-dcos", &nk1),
        "same agent: veth -> netkit container"
    );
    let (nk_bytes, nk_gbps) = tcp_transfer(vm1, "c-nk", vm2, "c-nk", &nk2);
    let (veth_bytes, veth_gbps) = tcp_transfer(vm1, "c-dcos", vm2, "c-dcos", &a2);
    eprintln!(
        "iperf3 -t 3 across the VMs: netkit {nk_gbps:.3} Gbit/s ({nk_bytes} bytes), veth {veth_gbps:.3} Gbit/s ({veth_bytes} bytes)"
    );
    assert!(nk_bytes > 100_000, "netkit TCP transfer: {nk_bytes} bytes");
    assert!(
        veth_bytes > 100_000,
        "veth TCP transfer: {veth_bytes} bytes"
    );
    eprintln!("netkit containers: {:.0}s", phase.elapsed().as_secs_f64());
    let phase = Instant::now();

    // A package upgrade inside vm2 keeps a running ping from vm1's container going: the new
    // agent takes the pinned datapath over.
    vm1.ok(&format!(
        "ip netns exec c-dcos sh -c 'ping -i 0.2 -c 60 {a2} > /tmp/ping.log 2>&1 &'; \
         ip netns exec c-nk sh -c 'ping -i 0.2 -c 60 {nk2} > /tmp/ping-nk.log 2>&1 &'"
    ))
    .unwrap();
    let pid_before = vm2.ok("systemctl show -P MainPID overlay-agent").unwrap();
    // Unpacking the debug binaries under emulation takes most of a minute on a loaded host.
    let dpkg = vm2
        .sh(
            "mkdir -p /mnt/extra && mount -o ro /dev/vdb /mnt/extra && dpkg -i /mnt/extra/ebpf-overlay_0.1.1_amd64.deb",
            Duration::from_secs(240),
        )
        .unwrap();
    assert_eq!(dpkg.status, 0, "dpkg -i: {}", dpkg.text);
    vm2.wait_for(
        &format!(
            "systemctl is-active overlay-agent && [ \"$(systemctl show -P MainPID overlay-agent)\" != \"{}\" ]",
            pid_before.trim()
        ),
        Duration::from_secs(90),
    )
    .unwrap();
    assert!(
        vm2.ok("dpkg-query -W -f='${Version}' ebpf-overlay")
            .unwrap()
            .contains("0.1.1")
    );
    let summary = vm1
        .wait_for(
            "grep 'packets transmitted' /tmp/ping.log",
            Duration::from_secs(60),
        )
        .unwrap();
    // "60 packets transmitted, 60 received, 0% packet loss"
    let fields: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(
        fields[0], fields[3],
        "pings lost across the upgrade: {summary}"
    );
    // The netkit link got the new program in place (BPF_LINK_UPDATE) just as the TCX ones.
    let summary = vm1
        .wait_for(
            "grep 'packets transmitted' /tmp/ping-nk.log",
            Duration::from_secs(60),
        )
        .unwrap();
    let fields: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(
        fields[0], fields[3],
        "netkit pings lost across the upgrade: {summary}"
    );
    assert!(
        !netkit_programs(vm2).is_empty(),
        "netkit links gone after the upgrade"
    );

    eprintln!("upgrade under ping: {:.0}s", phase.elapsed().as_secs_f64());
    let phase = Instant::now();

    // vm2 reboots (its upgraded agent enabled at boot): systemd brings the agent back with the
    // same allocation, and traffic from vm1's container resumes. Meanwhile vm1 starts the
    // packaged master unit (Type=notify). (A `Vm` serves one command at a time: each thread
    // drives its own VM.)
    let before = agent_info(&lab, "10.251.0.12");
    std::thread::scope(|s| {
        let reboot = s.spawn(|| reboot_brings_the_agent_back(vm2));
        master_unit_is_ready_when_it_serves(vm1);
        if let Err(e) = reboot.join() {
            std::panic::resume_unwind(e);
        }
    });
    assert_eq!(
        agent_info(&lab, "10.251.0.12"),
        before,
        "allocation changed across the reboot"
    );
    let a2 = add_container(vm2, "c-dcos2", "dcos");
    assert!(
        pings(vm1, "c-dcos", &a2),
        "traffic does not resume after the reboot"
    );
    eprintln!("reboot: {:.0}s", phase.elapsed().as_secs_f64());

    // Purge removes the datapath with the package: programs detached, pins, host link and the
    // generated CNI configs gone; the agent stopped.
    vm1.ok("dpkg --purge ebpf-overlay").unwrap();
    assert!(
        tcx_programs(vm1).is_empty(),
        "programs still attached after purge"
    );
    assert_eq!(xdp_on_eth0(vm1), None, "XDP still attached after purge");
    assert!(
        netkit_programs(vm1).is_empty(),
        "netkit links still attached after purge"
    );
    vm1.ok("! test -e /sys/fs/bpf/ebpf-overlay && ! ip link show ovl-host && ! ls /etc/cni/net.d/*.conf && ! test -e /var/lib/ebpf-overlay && ! test -e /usr/bin/overlay-agent")
        .unwrap();
    assert_ne!(
        vm1.sh("systemctl is-active overlay-agent", Duration::from_secs(30))
            .unwrap()
            .text
            .trim(),
        "active"
    );

    eprintln!("vm test: {:.0}s in all", started.elapsed().as_secs_f64());
}

/// Programs attached to netkit pairs (link type netkit; bpftool 7.1 prints its number, 13, and
/// nothing of the device).
fn netkit_programs(vm: &overlay_lab::vm::Vm) -> Vec<String> {
    let links: serde_json::Value =
        serde_json::from_str(vm.ok("bpftool -j link show").unwrap().trim()).unwrap();
    let mut out = vec![];
    for link in links.as_array().unwrap() {
        if link["type"] == 13 || link["type"] == "netkit" {
            let id = link["prog_id"].as_u64().unwrap();
            let prog: serde_json::Value = serde_json::from_str(
                vm.ok(&format!("bpftool -j prog show id {id}"))
                    .unwrap()
                    .trim(),
            )
            .unwrap();
            out.push(prog["name"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// A 3-second iperf3 TCP transfer from container `from` in `client` to `to_ip` (container
/// `server_ns` in `server`): bytes received and Gbit/s.
fn tcp_transfer(
    client: &overlay_lab::vm::Vm,
    from: &str,
    server: &overlay_lab::vm::Vm,
    server_ns: &str,
    to_ip: &str,
) -> (u64, f64) {
    server
        .ok(&format!("ip netns exec {server_ns} iperf3 -s -1 -D"))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let out = client
        .sh(
            &format!("ip netns exec {from} iperf3 -c {to_ip} -t 3 -J"),
            Duration::from_secs(60),
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(out.text.trim())
        .unwrap_or_else(|e| panic!("iperf3 {from} -> {to_ip} ({e}): {}", out.text));
    let sum = &v["end"]["sum_received"];
    (
        sum["bytes"].as_u64().unwrap_or_default(),
        sum["bits_per_second"].as_f64().unwrap_or_default() / 1e9,
    )
}

/// Restarts the agent of `vm` with `--container-device netkit` (through its environment file,
/// as an operator would) and waits until it is active again.
fn restart_with_netkit(vm: &overlay_lab::vm::Vm) {
    let start = Instant::now();
    vm.restart_agent(
        "echo OVERLAY_CONTAINER_DEVICE=netkit >> /etc/ebpf-overlay/agent.env",
        Duration::from_secs(240),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "{}: agent restarted with netkit in {:.0}s",
        vm.name,
        start.elapsed().as_secs_f64()
    );
}

/// The master's record of the agent at `ip` (read from inside vm1, as any host would).
fn agent_info(lab: &VmLab, ip: &str) -> serde_json::Value {
    let state: serde_json::Value = serde_json::from_str(
        lab.vm("vm1")
            .ok(&format!(
                "overlayctl state --master {} --ca {}",
                lab.master_url(),
                VmLab::GUEST_CA
            ))
            .unwrap()
            .trim(),
    )
    .unwrap();
    state["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["ip"] == ip)
        .unwrap_or_else(|| panic!("agent {ip} not in the master's state: {state}"))
        .clone()
}

/// Reboots `vm` and waits for its agent: back at boot (systemd, not the test, starts it), ready
/// and with its programs attached again.
fn reboot_brings_the_agent_back(vm: &overlay_lab::vm::Vm) {
    let start = Instant::now();
    let rebooted = vm.reboot(Duration::from_secs(300)).unwrap();
    vm.wait_for(
        "systemctl is-active overlay-agent",
        Duration::from_secs(180),
    )
    .unwrap();
    eprintln!(
        "{} rebooted in {:.0}s, agent active {:.0}s after the reboot request",
        vm.name,
        rebooted.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(tcx_programs(vm), ["from_host", "from_underlay"]);
    let status = vm.ok("systemctl show -P StatusText overlay-agent").unwrap();
    assert!(
        status.contains("datapath attached, master revision"),
        "{status}"
    );
}

/// The packaged master unit on its shipped defaults: `systemctl start` returns once the master
/// said READY=1 (Type=notify), and by then it answers on its port.
fn master_unit_is_ready_when_it_serves(vm: &overlay_lab::vm::Vm) {
    assert_eq!(
        vm.ok("systemctl show -P Type overlay-master")
            .unwrap()
            .trim(),
        "notify"
    );
    // The VM is an agent too, and its host link holds the dcos network's gateway: the master
    // refuses an overlay that overlaps its own addresses, so this one gets the shipped
    // configuration moved to another range (through its settings file, as an operator would).
    vm.ok(
        "sed 's|9.0.0.0/8|10.99.0.0/16|' /etc/ebpf-overlay/master.yaml > /etc/ebpf-overlay/vmtest.yaml && \
         sed -i 's|^OVERLAY_MASTER_CONFIG=.*|OVERLAY_MASTER_CONFIG=/etc/ebpf-overlay/vmtest.yaml|' \
         /etc/ebpf-overlay/master.env",
    )
    .unwrap();
    vm.sh("systemctl start overlay-master", Duration::from_secs(180))
        .and_then(|o| {
            if o.status == 0 {
                Ok(())
            } else {
                anyhow::bail!("systemctl start overlay-master: {}", o.text)
            }
        })
        .unwrap_or_else(|e| {
            let log = vm
                .sh(
                    "journalctl -b -u overlay-master --no-pager | tail -30",
                    Duration::from_secs(30),
                )
                .map(|o| o.text)
                .unwrap_or_default();
            panic!("{e:#}\n{log}")
        });
    // No retry: ready means serving.
    let state = vm
        .ok("overlayctl state --master https://127.0.0.1:5055 --ca /var/lib/overlay-master/tls/ca.crt \
             --admin-token-file /var/lib/overlay-master/tls/admin.token")
        .unwrap();
    let state: serde_json::Value = serde_json::from_str(state.trim())
        .unwrap_or_else(|e| panic!("master state is not JSON ({e}): {state}"));
    // A master with no agents yet leaves `agents` out, as DC/OS's does.
    assert!(state["network"]["overlays"].is_array(), "{state}");
    assert!(
        state["agents"].is_null() || state["agents"].is_array(),
        "{state}"
    );
    vm.ok("systemctl stop overlay-master").unwrap();
}
