//! SIGKILL during a registration storm, again and again: every acknowledged allocation must
//! survive unchanged and no VTEP, MAC or subnet may ever be handed to two agents.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use overlay_api::{AgentInfo, State};
use overlay_tests::fixtures::agent_ip;
use overlay_tests::fixtures::config::DUAL_STACK;
use overlay_tests::master::Master;

const ROUNDS: usize = 10;
const CONCURRENT_CLIENTS: usize = 16;

/// Small deterministic generator (seed printed so a failure can be replayed).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// Asserts that no two agents share a VTEP address, VTEP MAC or block of any network.
fn assert_no_duplicates(state: &State) {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for agent in &state.agents {
        let mut own: BTreeSet<String> = BTreeSet::new();
        for overlay in &agent.overlays {
            let vxlan = &overlay.backend.vxlan;
            // The VTEP repeats in each of the agent's networks: count it once per agent.
            own.extend(vxlan.vtep_ip.map(|ip| format!("vtep {}", ip.ip())));
            own.extend(vxlan.vtep_ip6.map(|ip| format!("vtep6 {}", ip.ip())));
            own.extend(vxlan.vtep_mac.map(|mac| format!("mac {mac}")));
            own.extend(overlay.subnet.map(|s| format!("{} {s}", overlay.info.name)));
            own.extend(
                overlay
                    .subnet6
                    .map(|s| format!("{} {s}", overlay.info.name)),
            );
        }
        for item in own {
            assert!(
                seen.insert(item.clone()),
                "{item} handed to two agents (one is {})",
                agent.ip
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_registration_storm_loses_no_acknowledged_allocation() {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut rng = XorShift(seed);
    let dir = tempfile::tempdir().unwrap();
    // A /16 of VTEPs so thousands of agents never hit exhaustion here.
    let mut master = Master::start(dir.path(), Some(DUAL_STACK)).await;
    let mut acknowledged: BTreeMap<IpAddr, AgentInfo> = BTreeMap::new();
    let next_agent = Arc::new(AtomicU32::new(1));

    for round in 0..ROUNDS {
        let client = master.client();
        let stop = Arc::new(AtomicBool::new(false));
        let known: Arc<Vec<IpAddr>> = Arc::new(acknowledged.keys().copied().collect());
        let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for worker in 0..CONCURRENT_CLIENTS {
            let client = client.clone();
            let stop = Arc::clone(&stop);
            let next_agent = Arc::clone(&next_agent);
            let known = Arc::clone(&known);
            let acks_tx = acks_tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut iteration = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    iteration += 1;
                    // Mostly new agents, sometimes a heartbeat of an older one.
                    let ip = if iteration.is_multiple_of(4) && !known.is_empty() {
                        known[(worker * 7919 + iteration) % known.len()]
                    } else {
                        agent_ip(next_agent.fetch_add(1, Ordering::Relaxed))
                    };
                    match client.register(ip).await {
                        Ok(info) => {
                            let _ = acks_tx.send((ip, info));
                        }
                        // The master died under us: unacknowledged, nothing to check.
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            }));
        }
        drop(acks_tx);
        tokio::time::sleep(Duration::from_millis(20 + rng.below(300))).await;
        master.kill();
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.unwrap();
        }
        let mut round_acks = 0;
        while let Some((ip, info)) = acks_rx.recv().await {
            round_acks += 1;
            if let Some(previous) = acknowledged.get(&ip) {
                assert_eq!(
                    previous, &info,
                    "round {round}: agent {ip} got a different allocation"
                );
            }
            acknowledged.insert(ip, info);
        }
        println!(
            "round {round}: {round_acks} acknowledged, {} agents in total",
            acknowledged.len()
        );

        master.restart().await;
        let state = master.client().state().await.unwrap();
        let stored: BTreeMap<IpAddr, &AgentInfo> = state.agents.iter().map(|a| (a.ip, a)).collect();
        for (ip, info) in &acknowledged {
            let stored = stored.get(ip).unwrap_or_else(|| {
                panic!("round {round} (seed {seed}): acknowledged agent {ip} lost")
            });
            assert_eq!(
                *stored, info,
                "round {round} (seed {seed}): agent {ip} changed"
            );
        }
        assert_no_duplicates(&state);
    }
    assert!(
        acknowledged.len() >= 50,
        "only {} registrations acknowledged: the storm did not exercise anything",
        acknowledged.len()
    );
}
