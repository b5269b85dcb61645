//! Data-plane measurements between two lab nodes: iperf3 (TCP 1 and 4 streams, UDP 64-byte
//! packets), sockperf TCP ping-pong (or, where sockperf cannot go, over IPv6, the xtask's own
//! TCP ping-pong: [`Rtt`]), and CPU time from /proc/stat across the single-stream run.

use std::{net::IpAddr, process::Stdio, time::Instant};

use anyhow::{Context as _, bail};
use overlay_lab::{Lab, Node};

pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
/// Port of the connection-rate server (`xtask bench-cps-server`).
pub const CPS_PORT: u16 = 5301;
/// Client threads opening connections in the connection-rate test.
const CPS_THREADS: usize = 4;
/// Port of the TCP ping-pong server (`xtask bench-rtt-server`).
pub const RTT_PORT: u16 = 5311;
/// Bytes per ping-pong message: sockperf's default message size.
const RTT_MSG: usize = 14;

/// How a path's round-trip time is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rtt {
    /// sockperf TCP ping-pong (sockperf 3.7, Debian 12's, speaks IPv4 only).
    Sockperf,
    /// The xtask's own TCP ping-pong (`bench-rtt-server`, either family): one connection,
    /// `TCP_NODELAY`, 14-byte messages echoed, each round trip timed. Not the same tool as
    /// sockperf, so its figures compare only with each other.
    PingPong,
    /// Not measured (reported as not available).
    Unavailable,
}

/// One measurement of one path.
#[derive(Clone, Debug, Default)]
pub struct PathSample {
    pub tcp1_gbps: f64,
    pub tcp4_gbps: f64,
    pub udp64_kpps: f64,
    pub lat_mean_us: f64,
    pub lat_p99_us: f64,
    pub cpu_s_per_gbit: f64,
    /// TCP connections opened (handshake completed) per second, each closed with RST.
    pub tcp_cps: f64,
}

/// CPUs the client and the server are pinned to (`taskset`), so that every datapath runs with
/// the same placement: on 2 CPUs, leaving it to the scheduler makes results bimodal (both ends on
/// one CPU or not). None on a single-CPU machine.
fn pinning() -> Option<(&'static str, &'static str)> {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (n >= 2).then_some(("0", "1"))
}

/// `cmd args` pinned to `cpu` (if pinning is on).
fn pinned<'a>(cpu: Option<&'a str>, cmd: &'a str, args: &[&'a str]) -> (String, Vec<&'a str>) {
    match cpu {
        Some(c) => {
            let mut v = vec!["-c", c, cmd];
            v.extend_from_slice(args);
            ("taskset".into(), v)
        }
        None => (cmd.into(), args.to_vec()),
    }
}

/// Starts the iperf3 and sockperf servers on `node` (listening on `ip`); the lab kills them on
/// teardown.
pub fn start_servers(lab: &mut Lab, node: &Node, ip: IpAddr) -> anyhow::Result<()> {
    let ip_s = ip.to_string();
    let mut iperf = node.command("iperf3");
    iperf
        .args(["-s", "-B", &ip_s, "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn_command(iperf)?;
    // sockperf 3.7 (Debian 12) has no IPv6: over IPv6 the ping-pong below measures RTT.
    if ip.is_ipv4() {
        let mut sp = node.command("sockperf");
        sp.args(["sr", "--tcp", "-i", &ip_s, "-p", &SOCKPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        lab.spawn_command(sp)?;
    } else {
        // The ping-pong instead, for the RTT of IPv6 paths (`Rtt::PingPong`).
        let mut rtt = node.command(std::env::current_exe()?);
        rtt.args([
            "bench-rtt-server",
            &std::net::SocketAddr::new(ip, RTT_PORT).to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        lab.spawn_command(rtt)?;
    }
    let mut cps = node.command(std::env::current_exe()?);
    cps.args([
        "bench-cps-server",
        &std::net::SocketAddr::new(ip, CPS_PORT).to_string(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    lab.spawn_command(cps)?;
    Ok(())
}

/// Closes a socket with RST (SO_LINGER 0): no TIME_WAIT, so the connection rate is not capped by
/// the client's port range.
fn close_with_reset(s: std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// `xtask bench-cps-server ADDR`: accepts TCP connections and closes them, as fast as it can.
pub fn cps_server(addr: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    // A deep accept queue: with std's 128, a burst of handshakes while this one thread is off
    // the CPU overflows it, the kernel drops the SYN, and that client waits the 1 s SYN
    // retransmission (its connect times out): runs swung tenfold on every path from that
    // alone (`TcpExtListenOverflows`). Listening again on a listening socket resizes its queue.
    // SAFETY: a valid listening socket.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(std::io::Error::last_os_error()).context("resizing the accept queue");
    }
    loop {
        if let Ok((s, _)) = listener.accept() {
            close_with_reset(s);
        }
    }
}

/// `xtask bench-rtt-server ADDR`: echoes every 14-byte message on every connection.
pub fn rtt_server(addr: &str) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; RTT_MSG];
            while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
        });
    }
    Ok(())
}

/// Pins the calling thread to `cpu`.
fn pin_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The xtask's TCP ping-pong from `client` to `server` for `secs` seconds: (mean, p99) round trip
/// in microseconds. The client thread is pinned like sockperf's client.
fn ping_pong(client: &Node, server: IpAddr, secs: u32) -> anyhow::Result<(f64, f64)> {
    use std::io::{Read as _, Write as _};
    let addr = std::net::SocketAddr::from((server, RTT_PORT));
    let cpu = pinning().map(|p| p.0.parse::<usize>().unwrap_or(0));
    let mut rtts = overlay_lab::in_netns(client, move || {
        if let Some(c) = cpu {
            pin_thread(c);
        }
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
            .with_context(|| format!("ping-pong: connecting to {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        let msg = [0x5au8; RTT_MSG];
        let mut buf = [0u8; RTT_MSG];
        let mut rtts = Vec::new();
        let deadline = Instant::now() + std::time::Duration::from_secs(secs as u64);
        while Instant::now() < deadline {
            let t = Instant::now();
            s.write_all(&msg)?;
            s.read_exact(&mut buf).context("ping-pong: no echo")?;
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(rtts)
    })?;
    if rtts.is_empty() {
        bail!("ping-pong to {addr}: no round trip");
    }
    rtts.sort_by(f64::total_cmp);
    let mean = rtts.iter().sum::<f64>() / rtts.len() as f64;
    let p99 = rtts[(rtts.len() * 99).div_ceil(100) - 1];
    Ok((mean, p99))
}

/// Connections per second from `client` to `server`: threads in the client's namespace open and
/// reset connections for `secs` seconds.
fn tcp_cps(client: &Node, server: IpAddr, secs: u32) -> anyhow::Result<f64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let addr = std::net::SocketAddr::from((server, CPS_PORT));
    overlay_lab::in_netns(client, move || {
        let opened = AtomicU64::new(0);
        let deadline = Instant::now() + std::time::Duration::from_secs(secs as u64);
        let started = Instant::now();
        // Threads spawned here inherit this thread's network namespace.
        std::thread::scope(|s| {
            for _ in 0..CPS_THREADS {
                s.spawn(|| {
                    while Instant::now() < deadline {
                        let t = std::time::Duration::from_secs(1);
                        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, t) {
                            opened.fetch_add(1, Ordering::Relaxed);
                            close_with_reset(c);
                        }
                    }
                });
            }
        });
        Ok(opened.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
    })
}

/// Waits until both servers listen on `node` (bounded).
pub fn wait_servers(node: &Node) -> anyhow::Result<()> {
    wait_servers_of(node, true)
}

/// [`wait_servers`] for servers started on an address of `ip`'s family (no sockperf over IPv6).
pub fn wait_servers_on(node: &Node, ip: IpAddr) -> anyhow::Result<()> {
    wait_servers_of(node, ip.is_ipv4())
}

fn wait_servers_of(node: &Node, ipv4: bool) -> anyhow::Result<()> {
    let start = Instant::now();
    let ports: &[u16] = if ipv4 {
        &[IPERF_PORT, SOCKPERF_PORT, CPS_PORT]
    } else {
        &[IPERF_PORT, RTT_PORT, CPS_PORT]
    };
    loop {
        let out = node.exec("ss", &["-Htln"]).unwrap_or_default();
        if ports.iter().all(|p| out.contains(&format!(":{p}"))) {
            return Ok(());
        }
        if start.elapsed().as_secs() > 10 {
            bail!("servers in {} did not listen within 10 s", node.netns);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Busy and total jiffies of all CPUs.
fn cpu_jiffies() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest counted in user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

fn clk_tck() -> f64 {
    overlay_lab::run("getconf", &["CLK_TCK"])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub(super) fn iperf(
    client: &Node,
    server: IpAddr,
    secs: u32,
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let limit = (secs + 20).to_string();
    let secs_s = secs.to_string();
    let server_s = server.to_string();
    let port = IPERF_PORT.to_string();
    let cpu = pinning().map(|p| p.0);
    let mut args = vec![limit.as_str()];
    if let Some(c) = cpu {
        args.extend(["taskset", "-c", c]);
    }
    args.extend([
        "iperf3",
        "-c",
        &server_s,
        "-p",
        &port,
        "-t",
        &secs_s,
        "-J",
        "--connect-timeout",
        "3000",
    ]);
    args.extend_from_slice(extra);
    // iperf3 exits non-zero with its error inside the JSON; retry once (server busy after a
    // previous test's teardown).
    let mut last = None;
    for _ in 0..2 {
        match client.exec("timeout", &args) {
            Ok(out) => {
                let v: serde_json::Value =
                    serde_json::from_str(&out).context("iperf3 JSON output")?;
                if let Some(e) = v.get("error") {
                    last = Some(anyhow::anyhow!("iperf3: {e}"));
                } else {
                    return Ok(v);
                }
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    Err(last.unwrap()).with_context(|| format!("iperf3 {} -> {server}", client.netns))
}

fn tcp_gbps(v: &serde_json::Value) -> anyhow::Result<(f64, f64)> {
    let s = &v["end"]["sum_received"];
    let bps = s["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")?;
    let secs = s["seconds"].as_f64().unwrap_or(0.0);
    Ok((bps / 1e9, secs))
}

/// (packets sent, packets lost, seconds) of an iperf3 UDP run.
pub(super) fn udp_totals(v: &serde_json::Value) -> anyhow::Result<(f64, f64, f64)> {
    // iperf 3.12: end.sum holds the server's view (packets sent, lost_packets as the receiver
    // counted them); newer versions also have sum_received.
    let s = if v["end"]["sum_received"]["packets"].is_number() {
        &v["end"]["sum_received"]
    } else {
        &v["end"]["sum"]
    };
    let packets = s["packets"].as_f64().context("iperf3 UDP: no packets")?;
    let lost = s["lost_packets"].as_f64().unwrap_or(0.0);
    let secs = s["seconds"].as_f64().context("iperf3 UDP: no seconds")?;
    if secs <= 0.0 {
        bail!("iperf3 UDP: zero duration");
    }
    Ok((packets, lost, secs))
}

/// Received packets per second (thousands) of an iperf3 UDP run.
fn udp_kpps(v: &serde_json::Value) -> anyhow::Result<f64> {
    let (packets, lost, secs) = udp_totals(v)?;
    Ok((packets - lost).max(0.0) / secs / 1e3)
}

/// sockperf TCP ping-pong: (mean, p99) round-trip time in microseconds.
fn sockperf(client: &Node, server: IpAddr, secs: u32) -> anyhow::Result<(f64, f64)> {
    let limit = (secs + 20).to_string();
    let (server_s, port, secs_s) = (
        server.to_string(),
        SOCKPERF_PORT.to_string(),
        secs.to_string(),
    );
    let (prog, args) = pinned(
        pinning().map(|p| p.0),
        "sockperf",
        &[
            "pp",
            "--tcp",
            "--full-rtt",
            "-i",
            &server_s,
            "-p",
            &port,
            "-t",
            &secs_s,
        ],
    );
    let mut full = vec![limit.as_str(), prog.as_str()];
    full.extend(args);
    let out = client.exec("timeout", &full)?;
    let mut mean = None;
    let mut p99 = None;
    for line in out.lines() {
        if let Some(rest) = line
            .split("avg-rtt=")
            .nth(1)
            .or(line.split("avg-latency=").nth(1))
        {
            mean = rest.split_whitespace().next().and_then(|x| x.parse().ok());
        }
        if line.contains("percentile 99.000") {
            p99 = line.rsplit('=').next().and_then(|x| x.trim().parse().ok());
        }
    }
    match (mean, p99) {
        (Some(m), Some(p)) => Ok((m, p)),
        _ => bail!("sockperf output not understood:\n{out}"),
    }
}

/// Every figure of one path, once.
pub fn measure(
    client: &Node,
    server: IpAddr,
    secs: u32,
    lat_secs: u32,
    rtt: Rtt,
) -> anyhow::Result<PathSample> {
    let tck = clk_tck();
    let (b0, t0) = cpu_jiffies()?;
    let tcp1 = iperf(client, server, secs, &[])?;
    let (b1, t1) = cpu_jiffies()?;
    let (tcp1_gbps, tcp1_secs) = tcp_gbps(&tcp1)?;
    let busy_s = (b1 - b0) as f64 / tck;
    let _ = t1 - t0;
    let cpu_s_per_gbit = if tcp1_gbps > 0.0 && tcp1_secs > 0.0 {
        busy_s / (tcp1_gbps * tcp1_secs)
    } else {
        0.0
    };
    let (tcp4_gbps, _) = tcp_gbps(&iperf(client, server, secs, &["-P", "4"])?)?;
    let udp = iperf(client, server, secs, &["-u", "-l", "64", "-b", "0"])?;
    let udp64_kpps = udp_kpps(&udp)?;
    // Not measured: the caller reports RTT as not available.
    let (lat_mean_us, lat_p99_us) = match rtt {
        Rtt::Sockperf => sockperf(client, server, lat_secs)?,
        Rtt::PingPong => ping_pong(client, server, lat_secs)?,
        Rtt::Unavailable => (0.0, 0.0),
    };
    let tcp_cps = tcp_cps(client, server, lat_secs)?;
    Ok(PathSample {
        tcp_cps,
        tcp1_gbps,
        tcp4_gbps,
        udp64_kpps,
        lat_mean_us,
        lat_p99_us,
        cpu_s_per_gbit,
    })
}
