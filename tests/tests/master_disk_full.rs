//! A full disk must not kill the master, and writes resume by themselves (issue 19, finding 3).
//!
//! The embedded store on a small ext4 file system (a loop-mounted image in a temporary
//! directory, unmounted on drop even when the test fails): filling it refuses writes with a 503
//! naming the store and the cause while reads, heartbeats and watches keep being served, and
//! once space returns writes resume with no restart and nothing acknowledged lost. The same
//! for etcd's NOSPACE alarm (a small `--quota-backend-bytes`), resumed after compaction,
//! defragmentation and disarming the alarm.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use overlay_api::{AgentInfo, State};
use overlay_tests::fixtures::agent_ip;
use overlay_tests::master::{Master, MasterSpec};
use overlay_tests::support_etcd::{EtcdCluster, EtcdSpec, Security, http};

/// An ext4 file system of `size_mib` on a loop device, mounted in a temporary directory.
struct SmallDisk {
    mount: PathBuf,
    /// Holds the image and the mount point; removed after the unmount.
    _dir: tempfile::TempDir,
    fillers: usize,
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

impl SmallDisk {
    fn new(size_mib: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        // No blocks reserved for root: the test runs as root and must be able to fill it.
        run(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", image.to_str().unwrap()],
        )
        .expect("mkfs.ext4 (e2fsprogs)");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        run(
            "mount",
            &[
                "-o",
                "loop",
                image.to_str().unwrap(),
                mount.to_str().unwrap(),
            ],
        )
        .expect("loop mount");
        SmallDisk {
            mount,
            _dir: dir,
            fillers: 0,
        }
    }

    /// Writes files until the file system refuses more (ENOSPC), down to single blocks.
    fn fill(&mut self) {
        for chunk in [1 << 20, 64 << 10, 4 << 10, 1 << 10] {
            self.fillers += 1;
            let path = self.mount.join(format!("filler-{}", self.fillers));
            let mut file = std::fs::File::create(&path).unwrap();
            let block = vec![0x5a_u8; chunk];
            loop {
                match file.write_all(&block).and_then(|_| file.sync_all()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => panic!("filling {}: {e}", path.display()),
                }
            }
        }
    }

    /// Removes the fillers.
    fn free(&mut self) {
        for n in 1..=self.fillers {
            let _ = std::fs::remove_file(self.mount.join(format!("filler-{n}")));
        }
        run("sync", &[]).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let mount = self.mount.to_str().unwrap().to_owned();
        // The master may still be exiting: retry, then detach lazily. The loop device is
        // released with the last unmount (mount -o loop sets autoclear).
        for _ in 0..50 {
            if run("umount", &[&mount]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = run("umount", &["-l", &mount]);
    }
}

fn register(addr: &str, n: u32) -> (u16, String) {
    http(
        addr,
        "POST",
        "/overlay-master/agents",
        Some(&format!(r#"{{"ip":"{}"}}"#, agent_ip(n))),
    )
    .unwrap()
}

fn add_network(addr: &str, name: &str, subnet: &str) -> (u16, String) {
    let body = format!(r#"{{"name":"{name}","subnet":"{subnet}","prefix":24}}"#);
    http(addr, "POST", "/overlay-master/networks", Some(&body)).unwrap()
}

fn state(addr: &str) -> State {
    let (status, body) = http(addr, "GET", "/overlay-master/state", None).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `now` still holds every allocation `then` was given (networks added since add shares).
fn assert_allocation_kept(then: &AgentInfo, now: &AgentInfo) {
    for overlay in &then.overlays {
        let current = now
            .overlays
            .iter()
            .find(|o| o.info.name == overlay.info.name)
            .unwrap_or_else(|| panic!("{} lost network {}", then.ip, overlay.info.name));
        assert_eq!(
            (current.subnet, current.subnet6, &current.backend),
            (overlay.subnet, overlay.subnet6, &overlay.backend),
            "allocation of {} on {} changed",
            then.ip,
            overlay.info.name
        );
    }
}

/// Every acknowledged allocation is in the state, unchanged.
fn assert_kept(addr: &str, acknowledged: &BTreeMap<IpAddr, AgentInfo>) {
    let state = state(addr);
    for (ip, info) in acknowledged {
        let stored = state.agents.iter().find(|a| a.ip == *ip);
        let stored = stored.unwrap_or_else(|| panic!("acknowledged agent {ip} lost"));
        assert_allocation_kept(info, stored);
    }
}

/// Reads, heartbeats of registered agents and watches are served while writes are refused.
fn assert_reads_served(addr: &str, acknowledged: &BTreeMap<IpAddr, AgentInfo>, first: u32) {
    let (status, body) = register(addr, first);
    assert_eq!(status, 200, "heartbeat of a registered agent: {body}");
    let info: AgentInfo = serde_json::from_str(&body).unwrap();
    assert_allocation_kept(&acknowledged[&agent_ip(first)], &info);
    assert_kept(addr, acknowledged);
    let (status, body) = http(
        addr,
        "GET",
        "/overlay-master/watch?after=0&timeout_ms=10",
        None,
    )
    .unwrap();
    assert_eq!(status, 200, "watch: {body}");
    let (status, _) = http(addr, "GET", "/health", None).unwrap();
    assert_eq!(status, 200);
}

/// Registers new agents from `next` until one is refused; the acknowledged ones are recorded.
/// Returns the refusal's body.
fn register_until_refused(
    addr: &str,
    next: &mut u32,
    acknowledged: &mut BTreeMap<IpAddr, AgentInfo>,
    limit: u32,
) -> String {
    for _ in 0..limit {
        let n = *next;
        *next += 1;
        let (status, body) = register(addr, n);
        match status {
            200 => {
                acknowledged.insert(agent_ip(n), serde_json::from_str(&body).unwrap());
            }
            503 => return body,
            other => panic!("registration of {}: {other} {body}", agent_ip(n)),
        }
    }
    panic!("{limit} registrations on a full disk all succeeded");
}

#[test]
fn a_full_disk_refuses_writes_serves_reads_and_resumes_without_restart() {
    let mut disk = SmallDisk::new(16);
    let logs = tempfile::tempdir().unwrap();
    let data = disk.mount.join("data");
    let mut master = MasterSpec::new(logs.path())
        .data_dir(&data)
        .insecure_http()
        .start();
    let addr = master.addr();

    let mut acknowledged = BTreeMap::new();
    for n in 1..=3 {
        let (status, body) = register(&addr, n);
        assert_eq!(status, 200, "{body}");
        acknowledged.insert(agent_ip(n), serde_json::from_str(&body).unwrap());
    }
    let (status, body) = add_network(&addr, "blue", "10.1.0.0/16");
    assert!(status < 300, "{status} {body}");

    disk.fill();
    let mut next = 100;
    let refusal = register_until_refused(&addr, &mut next, &mut acknowledged, 5000);
    eprintln!(
        "full disk: {} registrations acknowledged, then refused: {refusal}",
        next - 101
    );
    master.assert_running();
    assert!(
        refusal.contains("redb store") && refusal.contains(data.to_str().unwrap()),
        "the 503 names the store: {refusal}"
    );
    assert!(
        refusal.contains("No space left on device") && refusal.contains("disk is full"),
        "the 503 names the cause: {refusal}"
    );

    // Still full: every write is refused, nothing else is.
    disk.fill();
    for _ in 0..5 {
        let (status, body) = register(&addr, next);
        next += 1;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("redb store"), "{body}");
    }
    let (status, body) = add_network(&addr, "green", "10.2.0.0/16");
    assert_eq!(status, 503, "a network change on a full disk: {body}");
    assert!(body.contains("redb store"), "{body}");
    assert_reads_served(&addr, &acknowledged, 1);
    master.assert_running();

    // Space returns: writes resume by themselves.
    disk.free();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = register(&addr, next);
        if status == 200 {
            acknowledged.insert(agent_ip(next), serde_json::from_str(&body).unwrap());
            next += 1;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not resume: {status} {body}\n{}",
            master.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = add_network(&addr, "green", "10.2.0.0/16");
    assert!(
        status < 300,
        "network change after recovery: {status} {body}"
    );
    for _ in 0..20 {
        let (status, body) = register(&addr, next);
        assert_eq!(status, 200, "{body}");
        acknowledged.insert(agent_ip(next), serde_json::from_str(&body).unwrap());
        next += 1;
    }
    master.assert_running();
    assert_kept(&addr, &acknowledged);
    assert!(
        master.log().contains("store reopened after an I/O error"),
        "{}",
        master.log()
    );

    // Durable: a restarted master (after SIGKILL) has every acknowledged allocation, and the
    // networks. Agents registered before the fault got `blue` later, through the network
    // change; compare the fresh answers.
    master.kill();
    let restarted = MasterSpec::new(logs.path())
        .data_dir(&data)
        .insecure_http()
        .start();
    assert_kept(&restarted.addr(), &acknowledged);
    let names: Vec<String> = state(&restarted.addr())
        .network
        .overlays
        .iter()
        .map(|o| o.name.clone())
        .collect();
    assert!(
        names.contains(&"blue".to_owned()) && names.contains(&"green".to_owned()),
        "{names:?}"
    );
    drop(restarted);
}

/// etcd's backend quota: filled, it raises the NOSPACE alarm and refuses writes.
#[test]
fn etcd_nospace_alarm_refuses_writes_and_they_resume_after_compact_defrag_disarm() {
    let etcd = EtcdCluster::start_with(EtcdSpec {
        quota_backend_bytes: Some(4 << 20),
        ..EtcdSpec::new(1, Security::Plain)
    });
    let dir = tempfile::tempdir().unwrap();
    let mut master = Master::start_etcd(dir.path(), &etcd.store(), "/ebpf-overlay/", None);
    let addr = format!("127.0.0.1:{}", master.port);
    let mut acknowledged = BTreeMap::new();
    for n in 1..=3 {
        let (status, body) = register(&addr, n);
        assert_eq!(status, 200, "{body}");
        acknowledged.insert(agent_ip(n), serde_json::from_str(&body).unwrap());
    }

    // Fill the backend with one key's history (every put keeps the old value until
    // compaction) until etcd refuses.
    // (100 KiB: one command-line argument is limited to 128 KiB.)
    let value = "x".repeat(100 << 10);
    let mut filled = false;
    for _ in 0..400 {
        if let Err(error) = etcd.etcdctl(&["put", "/filler", &value]) {
            assert!(error.contains("database space exceeded"), "{error}");
            filled = true;
            break;
        }
    }
    assert!(filled, "etcd never reached its quota");
    let alarms = etcd.etcdctl(&["alarm", "list"]).unwrap();
    assert!(alarms.contains("NOSPACE"), "{alarms}");

    let (status, body) = register(&addr, 100);
    assert_eq!(status, 503, "{body}\n{}", master.log());
    assert!(
        body.contains("etcd") && body.contains("NOSPACE") && body.contains("space exceeded"),
        "the 503 names etcd and the alarm: {body}"
    );
    let (status, body) = add_network(&addr, "green", "10.2.0.0/16");
    assert_eq!(status, 503, "{body}");
    assert_reads_served(&addr, &acknowledged, 2);

    // The operator's recovery: drop the filler, compact, defragment, disarm.
    etcd.etcdctl(&["del", "/filler"]).unwrap();
    let status = etcd
        .etcdctl(&["endpoint", "status", "--write-out=json"])
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let revision = status[0]["Status"]["header"]["revision"]
        .as_u64()
        .expect("revision in endpoint status");
    etcd.etcdctl(&["compact", &revision.to_string(), "--physical"])
        .unwrap();
    etcd.etcdctl(&["defrag"]).unwrap();
    etcd.etcdctl(&["alarm", "disarm"]).unwrap();

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = register(&addr, 100);
        if status == 200 {
            acknowledged.insert(agent_ip(100), serde_json::from_str(&body).unwrap());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not resume: {status} {body}\n{}",
            master.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = add_network(&addr, "green", "10.2.0.0/16");
    assert!(status < 300, "{status} {body}");
    assert_kept(&addr, &acknowledged);
    // The master was never restarted.
    master.wait_ready();
    master.kill();
}
