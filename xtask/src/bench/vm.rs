//! `cargo xtask bench --vm`: iperf3 between containers in two QEMU VMs (`overlay_lab::vm`), over
//! their virtio-net NICs, five ways in one lab run:
//!
//! - `ebpf`: ebpf-overlay as the package installs it (agents started by systemd at boot, CNI
//!   containers on `dcos`, XDP native on virtio_net, TC programs);
//! - `ebpf, --xdp off`: the same agents restarted without XDP (native XDP turns virtio_net's
//!   receive offloads off);
//! - `ebpf, netkit`: the agents restarted with `OVERLAY_CONTAINER_DEVICE=netkit` (XDP on again),
//!   new containers on netkit pairs;
//! - `raw`: VM to VM over the same NICs, nothing of the overlay loaded (measured after the
//!   agents were stopped and `overlayctl cleanup` detached everything);
//! - `kernel`: DC/OS's kernel datapath built in the guests the way dcos-net builds it (bridge
//!   `m-dcos`, `vtep1024` VNI 1024 on UDP 64000 `nolearning`, permanent neighbour + FDB entries
//!   and a route via the peer's VTEP), containers on veths into the bridge.
//!
//! Under software emulation (TCG) the figures measure the emulator's CPU, not the network: the
//! report names the accelerator, and the ratios are the figures that count.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, bail};
use overlay_lab::vm::{GuestKernel, Vm, VmLab, VmLabSpec};

use super::report::{median, spread};

const IPERF_PORT: u16 = 5201;

/// What each datapath is measured on, in this order: iperf3 TCP with 1 and 4 streams (Gbit/s
/// received), UDP datagrams of 64 bytes sent as fast as the client can (thousands received a
/// second: the per-packet cost, where headroom and the programs show), and in that UDP run the
/// sending VM's skb head reallocations (`pskb_expand_head`, a kprobe's hit count) per datagram
/// sent: the cost of encapsulating into a packet without headroom.
#[derive(Clone, Copy, PartialEq)]
enum Figure {
    Tcp(u32),
    Udp64,
    Udp64HeadReallocs,
}

const FIGURES: [Figure; 4] = [
    Figure::Tcp(1),
    Figure::Tcp(4),
    Figure::Udp64,
    Figure::Udp64HeadReallocs,
];

impl Figure {
    fn label(self) -> String {
        match self {
            Figure::Tcp(1) => "TCP 1 stream (Gbit/s)".into(),
            Figure::Tcp(p) => format!("TCP {p} streams (Gbit/s)"),
            Figure::Udp64 => "UDP 64 B received (kpps)".into(),
            Figure::Udp64HeadReallocs => "UDP 64 B: head reallocations per datagram sent".into(),
        }
    }

    fn key(self) -> String {
        match self {
            Figure::Tcp(p) => format!("tcp{p}_gbit_s"),
            Figure::Udp64 => "udp64_kpps".into(),
            Figure::Udp64HeadReallocs => "udp64_head_reallocs_per_datagram".into(),
        }
    }
}

/// The kprobe counting `pskb_expand_head` calls in a guest (tracefs).
const REALLOC_PROBE: &str = "eo_pskb_expand";

/// Puts the reallocation kprobe in place in `vm` (idempotent); `false` where tracefs or kprobe
/// events are missing (the figure is then not measured).
fn add_realloc_probe(vm: &Vm) -> bool {
    let sh = format!(
        "cd /sys/kernel/tracing && {{ grep -q {REALLOC_PROBE} kprobe_events || \
         echo 'p:{REALLOC_PROBE} pskb_expand_head' >> kprobe_events; }} && \
         echo 1 > events/kprobes/{REALLOC_PROBE}/enable"
    );
    vm.ok(&sh).is_ok()
}

/// The reallocation kprobe's hits so far in `vm`.
fn realloc_hits(vm: &Vm) -> Option<f64> {
    let out = vm.ok("cat /sys/kernel/tracing/kprobe_profile").ok()?;
    out.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next()? == REALLOC_PROBE).then(|| w.next()?.parse().ok())?
    })
}

/// Counts the reallocations by call chain from now on (a hist trigger on the kprobe); `false`
/// where hist triggers are missing.
fn start_realloc_chains(vm: &Vm) -> bool {
    let trigger = format!("/sys/kernel/tracing/events/kprobes/{REALLOC_PROBE}/trigger");
    vm.ok(&format!("echo 'hist:keys=common_stacktrace' > {trigger}"))
        .is_ok()
}

/// The call chains counted since [`start_realloc_chains`], most frequent first (each the first
/// frames above `pskb_expand_head`, with its count), and the trigger removed.
fn take_realloc_chains(vm: &Vm) -> Vec<(u64, String)> {
    let dir = format!("/sys/kernel/tracing/events/kprobes/{REALLOC_PROBE}");
    let hist = vm.ok(&format!("cat {dir}/hist")).unwrap_or_default();
    let _ = vm.ok(&format!(
        "echo '!hist:keys=common_stacktrace' > {dir}/trigger"
    ));
    let mut chains = vec![];
    for entry in hist.split("{ common_stacktrace:").skip(1) {
        let Some((frames, rest)) = entry.split_once('}') else {
            continue;
        };
        let Some(hits) = rest
            .split_once("hitcount:")
            .and_then(|(_, h)| h.split_whitespace().next())
            .and_then(|h| h.parse().ok())
        else {
            continue;
        };
        let chain: Vec<&str> = frames
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(|f| f.split('+').next().unwrap_or(f))
            .take(6)
            .collect();
        chains.push((hits, chain.join(" < ")));
    }
    chains.sort_by_key(|c| std::cmp::Reverse(c.0));
    chains.truncate(3);
    chains
}

/// Removes the kprobe again.
fn remove_realloc_probe(vm: &Vm) {
    let _ = vm.ok(&format!(
        "cd /sys/kernel/tracing && echo 0 > events/kprobes/{REALLOC_PROBE}/enable; \
         echo '-:{REALLOC_PROBE}' >> kprobe_events"
    ));
}

/// One iperf3 run of `figure` (TCP or UDP) from `client` (a netns or the root namespace of vm1)
/// to `server`: the figure, and for UDP also the head reallocations per datagram sent (NaN when
/// the kprobe is missing).
fn iperf(
    vm: &Vm,
    netns: Option<&str>,
    server: &str,
    secs: u32,
    figure: Figure,
) -> anyhow::Result<(f64, f64)> {
    let exec = netns.map_or(String::new(), |n| format!("ip netns exec {n} "));
    let what = match figure {
        Figure::Tcp(streams) => format!("-P {streams}"),
        _ => "-u -l 64 -b 0".into(),
    };
    let chains = figure != Figure::Udp64 || start_realloc_chains(vm);
    let hits_before = realloc_hits(vm);
    let out = vm.sh(
        &format!(
            "{exec}iperf3 -J -c {server} -p {IPERF_PORT} -t {secs} {what} --connect-timeout 5000"
        ),
        Duration::from_secs(secs as u64 + 120),
    )?;
    let hits = realloc_hits(vm).zip(hits_before).map(|(a, b)| a - b);
    if figure == Figure::Udp64 && chains {
        for (n, chain) in take_realloc_chains(vm) {
            eprintln!(
                "{}: {n} head reallocations from {chain}",
                netns.unwrap_or("vm1")
            );
        }
    }
    let v: serde_json::Value = serde_json::from_str(out.text.trim())
        .with_context(|| format!("{}: iperf3 output is not JSON: {}", vm.name, out.text))?;
    if let Some(e) = v["error"].as_str() {
        bail!("{}: iperf3 to {server}: {e}", vm.name);
    }
    match figure {
        Figure::Tcp(_) => v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| (b / 1e9, f64::NAN))
            .context("iperf3: no end.sum_received.bits_per_second"),
        _ => {
            let sum = &v["end"]["sum"];
            let (Some(sent), Some(lost), Some(secs)) = (
                sum["packets"].as_f64(),
                sum["lost_packets"].as_f64(),
                sum["seconds"].as_f64(),
            ) else {
                bail!("iperf3 UDP: no end.sum.packets/lost_packets/seconds: {sum}");
            };
            let per_datagram = hits.map_or(f64::NAN, |h| h / sent.max(1.0));
            Ok(((sent - lost) / secs / 1e3, per_datagram))
        }
    }
}

/// Restarts the agent of each VM after `edit` (a shell command on its settings) and waits until
/// `until` (a shell condition and its timeout) holds there; `failed` says what it means if not.
fn restart_agents(
    vms: [&Vm; 2],
    edit: &str,
    (until, timeout): (&str, Duration),
    failed: &str,
) -> anyhow::Result<()> {
    for vm in vms {
        vm.restart_agent(edit, Duration::from_secs(240))?;
        vm.wait_for(until, timeout)
            .with_context(|| format!("{}: {failed}", vm.name))?;
    }
    Ok(())
}

/// Starts an iperf3 server (daemon) in `netns` of `vm` (or its root namespace).
fn iperf_server(vm: &Vm, netns: Option<&str>) -> anyhow::Result<()> {
    let exec = netns.map_or(String::new(), |n| format!("ip netns exec {n} "));
    vm.ok(&format!("{exec}iperf3 -s -D -p {IPERF_PORT}"))?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// DC/OS's datapath in VM `i` (1-based) of `vms`: agent subnet 9.0.i.0/24 on bridge `m-dcos`,
/// VTEP 44.128.0.i, one container netns `k-dcos` at 9.0.i.2.
fn kernel_datapath(vm: &Vm, i: usize, vms: &[&Vm]) -> anyhow::Result<String> {
    let mut script = format!(
        "set -e
ip link add m-dcos type bridge
ip addr add 9.0.{i}.1/24 dev m-dcos
ip link set m-dcos mtu 1420 up
ip link add vtep1024 address 70:b3:d5:80:00:{i:02x} type vxlan id 1024 dstport 64000 local {local} dev eth0 nolearning
ip addr add 44.128.0.{i}/20 dev vtep1024
ip link set vtep1024 up
sysctl -qw net.ipv4.ip_forward=1
ip netns add k-dcos
ip link add k-veth type veth peer name eth0 netns k-dcos
ip link set k-veth master m-dcos mtu 1420 up
ip -n k-dcos link set lo up
ip -n k-dcos link set eth0 mtu 1420 up
ip -n k-dcos addr add 9.0.{i}.2/24 dev eth0
ip -n k-dcos route add default via 9.0.{i}.1
",
        local = vm.ip
    );
    for (jdx, peer) in vms.iter().enumerate() {
        let j = jdx + 1;
        if j == i {
            continue;
        }
        script.push_str(&format!(
            "ip neigh replace 44.128.0.{j} lladdr 70:b3:d5:80:00:{j:02x} dev vtep1024 nud permanent
bridge fdb append 70:b3:d5:80:00:{j:02x} dev vtep1024 dst {peer_ip}
ip route replace 9.0.{j}.0/24 via 44.128.0.{j} dev vtep1024 onlink
",
            peer_ip = peer.ip
        ));
    }
    vm.ok(&format!("sh -c '{script}'"))
        .with_context(|| format!("kernel datapath in {}", vm.name))?;
    Ok(format!("9.0.{i}.2"))
}

pub struct VmBenchArgs<'a> {
    pub runs: usize,
    pub secs: u32,
    pub out_dir: &'a Path,
    pub kernel: GuestKernel,
}

/// Runs the VM benchmark; prints the table and writes `vm-<timestamp>.{md,json}`.
pub fn run(args: VmBenchArgs<'_>) -> anyhow::Result<()> {
    let load_before = super::load();
    let (bin_dir, deb) = crate::vm::build_package()?;
    let lab = VmLab::up(VmLabSpec {
        vms: 2,
        debs: vec![deb],
        bin_dir,
        master_config: overlay_lab::cluster::TWO_NETWORKS.into(),
        mem_mib: 512,
        extra_files: vec![],
        kernel: args.kernel,
    })?;
    eprintln!(
        "vm lab {}: {}; boot to shell {:.0}s",
        lab.id, lab.accel_reason, lab.boot_secs
    );
    let accel = format!("{:?}", lab.accel);
    let accel_reason = lab.accel_reason.clone();
    let (vm1, vm2) = (lab.vm("vm1"), lab.vm("vm2"));
    for vm in [vm1, vm2] {
        vm.wait_for(
            "systemctl is-active overlay-agent",
            Duration::from_secs(420),
        )
        .with_context(|| format!("{}: agent not active", vm.name))?;
    }
    let xdp = vm2
        .ok("ip link show dev eth0")?
        .split_whitespace()
        .find(|w| w.starts_with("xdp"))
        .unwrap_or("none")
        .to_owned();
    let kernel_release = vm1.ok("uname -r")?.trim().to_owned();
    let probed = add_realloc_probe(vm1);
    if !probed {
        eprintln!("vm1 has no kprobe events in tracefs: head reallocations are not measured");
    }
    // samples[datapath][FIGURES index]
    // raw, kernel, ebpf (as installed), ebpf with --xdp off, ebpf with netkit containers
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![]; 5];
    // One datapath's figures: `runs` rounds of each stream count, vm1 (`netns`) to `server`.
    let measure = |netns: Option<&str>, server: &str| -> anyhow::Result<Vec<Vec<f64>>> {
        let mut figures = vec![vec![]; FIGURES.len()];
        for _ in 0..args.runs {
            for (k, f) in FIGURES.iter().enumerate() {
                match f {
                    // Taken in the UDP 64 B run, below.
                    Figure::Udp64HeadReallocs => {}
                    Figure::Udp64 => {
                        let (kpps, reallocs) = iperf(vm1, netns, server, args.secs, *f)?;
                        figures[k].push(kpps);
                        figures[k + 1].push(reallocs);
                    }
                    Figure::Tcp(_) => figures[k].push(iperf(vm1, netns, server, args.secs, *f)?.0),
                }
            }
        }
        Ok(figures)
    };

    // ebpf-overlay, as installed.
    vm1.add_cni_container("c-dcos", "dcos")?;
    let server = vm2.add_cni_container("c-dcos", "dcos")?.to_string();
    iperf_server(vm2, Some("c-dcos"))?;
    samples[2] = measure(Some("c-dcos"), &server)?;
    // The same without XDP: attaching native XDP turns virtio_net's receive offloads (guest
    // GRO) off, which this shows apart from the programs' own cost. The restarted agents take
    // the pinned datapath over; the containers stay.
    restart_agents(
        [vm1, vm2],
        "sed -i 's|^OVERLAY_AGENT_ARGS=.*|OVERLAY_AGENT_ARGS=--xdp off|' /etc/ebpf-overlay/agent.env",
        (
            "! ip link show dev eth0 | grep -q ' xdp'",
            Duration::from_secs(240),
        ),
        "XDP still attached with --xdp off",
    )?;
    samples[3] = measure(Some("c-dcos"), &server)?;
    // netkit containers (the guest kernel has CONFIG_NETKIT): the agents, XDP back on as
    // installed, restarted with `OVERLAY_CONTAINER_DEVICE=netkit`, give new containers netkit
    // pairs (from_container as the pair's policy, 128 bytes of headroom for the encapsulation).
    restart_agents(
        [vm1, vm2],
        "sed -i 's|^OVERLAY_AGENT_ARGS=.*|OVERLAY_AGENT_ARGS=|' /etc/ebpf-overlay/agent.env && echo OVERLAY_CONTAINER_DEVICE=netkit >> /etc/ebpf-overlay/agent.env",
        (
            "journalctl -b -u overlay-agent --no-pager | grep -q 'containers get netkit pairs'",
            Duration::from_secs(60),
        ),
        "the agent did not switch to netkit",
    )?;
    vm1.add_cni_container("c-nk", "dcos")?;
    let server = vm2.add_cni_container("c-nk", "dcos")?.to_string();
    for vm in [vm1, vm2] {
        if vm.netkit_devices()? == 0 {
            bail!("{}: c-nk got no netkit pair", vm.name);
        }
    }
    iperf_server(vm2, Some("c-nk"))?;
    samples[4] = measure(Some("c-nk"), &server)?;
    // Nothing of the overlay left for the other two.
    for vm in [vm1, vm2] {
        vm.ok(
            "systemctl stop overlay-agent && overlayctl cleanup >/dev/null && ip netns del c-dcos && ip netns del c-nk",
        )?;
        let left = vm.ok("ip link show dev eth0")?;
        if left.contains(" xdp") {
            bail!("{}: XDP still attached after cleanup: {left}", vm.name);
        }
    }
    vm2.ok("pkill -x iperf3 || true")?;
    iperf_server(vm2, None)?;
    samples[0] = measure(None, &vm2.ip.to_string())?;
    vm2.ok("pkill -x iperf3 || true")?;
    kernel_datapath(vm1, 1, &[vm1, vm2])?;
    let server = kernel_datapath(vm2, 2, &[vm1, vm2])?;
    iperf_server(vm2, Some("k-dcos"))?;
    samples[1] = measure(Some("k-dcos"), &server)?;

    let when = overlay_lab::run("date", &["-u", "+%Y%m%dT%H%M%SZ"])?
        .trim()
        .to_owned();
    let mut md = format!(
        "VM benchmark `cargo xtask bench --vm` ({when}): 2 QEMU VMs, 1 vCPU and 512 MiB each, \
         guest kernel {kernel_release}, virtio-net NICs on a bridge; accelerator: **{}**; \
         {} run(s) of {} s per figure, iperf3 TCP and UDP (64-byte datagrams) container to \
         container across the VMs (raw: VM to VM). ebpf-overlay as installed (XDP on the receiving NIC: `{xdp}`). Host load \
         before/after: {load_before} / {}.\n\n",
        accel_reason,
        args.runs,
        args.secs,
        super::load(),
    );
    md.push_str(
        "| figure | raw | kernel (DC/OS) | ebpf-overlay | ebpf-overlay, `--xdp off` | \
         ebpf-overlay, netkit | ebpf/raw | ebpf/kernel | ebpf without XDP/kernel | netkit/raw | \
         netkit/veth | kernel/raw |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut json_rows = vec![];
    for (k, f) in FIGURES.iter().enumerate() {
        let m: Vec<f64> = (0..5).map(|d| median(&samples[d][k])).collect();
        if *f == Figure::Udp64HeadReallocs {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | – | – | – | – | – | – |\n",
                f.label(),
                spread(&samples[0][k]),
                spread(&samples[1][k]),
                spread(&samples[2][k]),
                spread(&samples[3][k]),
                spread(&samples[4][k]),
            ));
            json_rows.push(serde_json::json!({
                "figure": f.key(), "raw": samples[0][k], "kernel": samples[1][k],
                "ebpf": samples[2][k], "ebpf_xdp_off": samples[3][k], "ebpf_netkit": samples[4][k],
            }));
            continue;
        }
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x |\n",
            f.label(),
            spread(&samples[0][k]),
            spread(&samples[1][k]),
            spread(&samples[2][k]),
            spread(&samples[3][k]),
            spread(&samples[4][k]),
            m[2] / m[0],
            m[2] / m[1],
            m[3] / m[1],
            m[4] / m[0],
            m[4] / m[2],
            m[1] / m[0],
        ));
        json_rows.push(serde_json::json!({
            "figure": f.key(), "raw": samples[0][k], "kernel": samples[1][k],
            "ebpf": samples[2][k], "ebpf_xdp_off": samples[3][k], "ebpf_netkit": samples[4][k],
        }));
    }
    remove_realloc_probe(vm1);
    drop(lab);
    println!("{md}");
    std::fs::create_dir_all(args.out_dir)?;
    let md_path = args.out_dir.join(format!("vm-{when}.md"));
    std::fs::write(&md_path, &md)?;
    let json_path = args.out_dir.join(format!("vm-{when}.json"));
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&serde_json::json!({
            "accelerator": accel,
            "accelerator_reason": accel_reason,
            "kernel": kernel_release,
            "runs": args.runs, "secs": args.secs, "xdp": xdp,
            "figures": json_rows,
        }))?,
    )?;
    println!("wrote {}\nwrote {}", md_path.display(), json_path.display());
    Ok(())
}
