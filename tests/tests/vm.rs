//! ebpf-overlay on real (virtual) hosts: two QEMU VMs boot Debian's 6.12 kernel and a systemd
//! root with the project's `.deb` installed (`overlay_lab::vm`); systemd starts the agent at
//! boot; containers (network namespaces in the VMs, attached by the CNI plugin) talk across the
//! VMs over virtio-net; a package upgrade in one VM keeps a ping from the other going. One boot
//! for the whole sequence: boots under software emulation take a minute. (A guest reboot is
//! not in the sequence yet: under TCG on this loaded machine the second boot took over four
//! minutes, see `Vm::reboot`.)

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

/// Adds a container (network namespace `name`) on `network` in `vm` with the CNI plugin, as a
/// runtime would; returns its address.
fn add_container(vm: &overlay_lab::vm::Vm, name: &str, network: &str) -> String {
    // The agent's list for the network, turned into the plugin's config as libcni does
    // (the list's cniVersion and name added to its one plugin).
    let list: serde_json::Value = serde_json::from_str(
        vm.ok(&format!("cat /etc/cni/net.d/*-{network}.conflist"))
            .unwrap()
            .trim(),
    )
    .unwrap_or_else(|e| panic!("{}: the agent's {network} conflist ({e})", vm.name));
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let conf = conf.to_string();
    assert!(
        !conf.contains('\''),
        "config must fit in single quotes: {conf}"
    );
    let out = vm
        .ok(&format!(
            "ip netns add {name} && printf '%s' '{conf}' | CNI_COMMAND=ADD CNI_CONTAINERID={name} \
             CNI_NETNS=/run/netns/{name} CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin \
             /opt/cni/bin/ebpf-overlay"
        ))
        .unwrap();
    let result: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{}: CNI ADD answer is not JSON ({e}): {out}", vm.name));
    let addr = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {result}"));
    addr.split('/').next().unwrap().to_owned()
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
            .wait_for("systemctl is-active overlay-agent", Duration::from_secs(120))
            .unwrap_or_else(|e| {
                let log = vm
                    .sh(
                        "systemctl status overlay-agent --no-pager; journalctl -b -u overlay-agent --no-pager | tail -30",
                        Duration::from_secs(30),
                    )
                    .map(|o| o.text)
                    .unwrap_or_default();
                panic!("{e:#}\n{log}")
            });
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
    let _ = a1;

    eprintln!(
        "containers across VMs: {:.0}s",
        phase.elapsed().as_secs_f64()
    );
    let phase = Instant::now();

    // A package upgrade inside vm2 keeps a running ping from vm1's container going: the new
    // agent takes the pinned datapath over.
    vm1.ok(&format!(
        "ip netns exec c-dcos sh -c 'ping -i 0.2 -c 60 {a2} > /tmp/ping.log 2>&1 &'"
    ))
    .unwrap();
    let pid_before = vm2.ok("systemctl show -P MainPID overlay-agent").unwrap();
    vm2.ok("mkdir -p /mnt/extra && mount -o ro /dev/vdb /mnt/extra && dpkg -i /mnt/extra/ebpf-overlay_0.1.1_amd64.deb")
        .unwrap();
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

    eprintln!("upgrade under ping: {:.0}s", phase.elapsed().as_secs_f64());

    // vm2 reboots: systemd brings the agent back with the same allocation, and a new container
    // there is reachable from vm1's. Only with OVERLAY_VM_REBOOT=1: under TCG here the guest's
    // second boot took 195 s (against 30-50 s for the first), which would double the suite's
    // VM budget.
    if std::env::var_os("OVERLAY_VM_REBOOT").is_some() {
        reboot_keeps_allocation_and_traffic(&lab);
    }

    // Purge removes the datapath with the package: programs detached, pins, host link and the
    // generated CNI configs gone; the agent stopped.
    vm1.ok("dpkg --purge ebpf-overlay").unwrap();
    assert!(
        tcx_programs(vm1).is_empty(),
        "programs still attached after purge"
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

fn reboot_keeps_allocation_and_traffic(lab: &VmLab) {
    let (vm1, vm2) = (lab.vm("vm1"), lab.vm("vm2"));
    let info = |lab: &VmLab| -> serde_json::Value {
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
        state["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["ip"] == "10.251.0.12")
            .unwrap()
            .clone()
    };
    let before = info(&lab);
    let rebooted = vm2.reboot(Duration::from_secs(300)).unwrap();
    vm2.wait_for(
        "systemctl is-active overlay-agent",
        Duration::from_secs(180),
    )
    .unwrap();
    eprintln!(
        "vm2 rebooted, agent active again: {:.0}s",
        rebooted.as_secs_f64()
    );
    assert_eq!(tcx_programs(vm2), ["from_host", "from_underlay"]);
    assert_eq!(info(&lab), before, "allocation changed across the reboot");
    let a2 = add_container(vm2, "c-dcos2", "dcos");
    assert!(
        pings(vm1, "c-dcos", &a2),
        "traffic does not resume after the reboot"
    );
}
