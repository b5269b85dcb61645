//! The external host's side of the masquerade tests: `tests/support/nat_peers.py`.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use overlay_lab::cluster::Cluster;

/// Path of the peer script (server, flow generators, ICMP helpers).
pub fn nat_peers_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("support/nat_peers.py")
}

/// Starts the external host's UDP/TCP peer server on `port` (killed with the lab) and waits
/// until it listens.
pub fn start_peer_server(c: &mut Cluster, port: u16) {
    start_peer("peer-server", c, port);
}

/// Starts the external host's peer server over IPv6 on `port` (`peer-server6`: it answers
/// `[address]:port`), killed with the lab, and waits until it listens.
pub fn start_peer_server6(c: &mut Cluster, port: u16) {
    start_peer("peer-server6", c, port);
}

/// Runs the peer script's server `mode` on the external host and waits for its "ready".
fn start_peer(mode: &str, c: &mut Cluster, port: u16) {
    let out = std::env::temp_dir().join(format!("{}-{mode}-{port}.out", c.lab.id()));
    let mut cmd = c.lab.external().command("python3");
    cmd.arg(nat_peers_script())
        .args([mode, &port.to_string()])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null());
    c.lab.spawn_command(cmd).unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("ready")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{mode} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(out);
}
