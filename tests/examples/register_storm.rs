//! Benchmark (not a test): 10,000 agents registering against a real `overlay-master` process,
//! then a watch fan-out to 1,000 long-poll watchers.
//!
//! `cargo run --release -p overlay-tests --example register_storm [-- AGENTS WATCHERS CONCURRENCY]`
//!
//! Reports registrations/s, heartbeats/s, the master's RSS (from /proc/<pid>/status), the
//! state JSON size, and how long until every watcher woke (headers) and had its answer, with
//! whole-state answers and with deltas.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use overlay_api::MasterClient;
use overlay_tests::fixtures::config::DUAL_STACK;
use overlay_tests::master::MasterSpec;

fn master_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/register_storm -> target/<profile>/overlay-master
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .context("example lives in target/<profile>/examples")?;
    let binary = profile_dir.join("overlay-master");
    // `cargo run --example` does not build the package's binaries: build it the same way.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = profile_dir.ends_with("release");
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "overlay-master", "--bin", "overlay-master"]);
    if release {
        build.arg("--release");
    }
    let status = build
        .status()
        .context("running cargo build for overlay-master")?;
    if !status.success() || !binary.exists() {
        bail!("could not build {}", binary.display());
    }
    Ok(binary)
}

fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

fn agent_ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

async fn register_all(
    client: &MasterClient,
    first: u32,
    count: u32,
    concurrency: u32,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = worker;
            while n < count {
                client.register(agent_ip(first + n)).await?;
                n += concurrency;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().context("arguments are numbers"))
        .collect::<anyhow::Result<_>>()?;
    let agents = args.first().copied().unwrap_or(10_000);
    let watchers = args.get(1).copied().unwrap_or(1_000);
    let concurrency = args.get(2).copied().unwrap_or(64);

    master_binary()?;
    let dir = tempfile::tempdir()?;
    // Measures allocation and fan-out, not TLS; loopback only.
    let master = MasterSpec::new(dir.path())
        .config(Some(DUAL_STACK))
        .insecure_http()
        .start();
    let pid = master.pid() as u32;
    let base = master.base_url();
    let http = reqwest::Client::new();
    let client = MasterClient::new([base.clone()])?;
    let (rss_idle, _) = rss_kib(pid)?;

    let elapsed = register_all(&client, 1, agents, concurrency).await?;
    let commits = metric(&http, &base, "overlay_master_store_commits_total").await?;
    println!(
        "registered {agents} agents with {concurrency} concurrent clients in {:.2} s: {:.0} \
         registrations/s ({commits} fsynced store transactions: group commit)",
        elapsed.as_secs_f64(),
        f64::from(agents) / elapsed.as_secs_f64()
    );
    let elapsed = register_all(&client, 1, agents, concurrency).await?;
    println!(
        "heartbeats of {agents} registered agents in {:.2} s: {:.0} heartbeats/s",
        elapsed.as_secs_f64(),
        f64::from(agents) / elapsed.as_secs_f64()
    );

    let started = Instant::now();
    let state = http
        .get(format!("{base}/overlay-master/state"))
        .send()
        .await?
        .bytes()
        .await?;
    let first_state = started.elapsed();
    let started = Instant::now();
    http.get(format!("{base}/overlay-master/state"))
        .send()
        .await?
        .bytes()
        .await?;
    let cached_state = started.elapsed();
    println!(
        "state JSON: {} bytes ({:.1} MiB); first GET {:.0} ms, cached GET {:.0} ms",
        state.len(),
        state.len() as f64 / 1_048_576.0,
        first_state.as_secs_f64() * 1000.0,
        cached_state.as_secs_f64() * 1000.0
    );
    let (rss, hwm) = rss_kib(pid)?;
    println!(
        "master RSS: {:.1} MiB idle before registrations, {:.1} MiB after (peak {:.1} MiB)",
        rss_idle as f64 / 1024.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    // Watch fan-out: park `watchers` long-polls, change one thing, time the wake-ups; first
    // with whole states in the answers, then with deltas.
    for delta in [false, true] {
        let revision = client
            .watch(0, Duration::from_secs(5))
            .await?
            .context("state at revision 0?")?
            .revision;
        let fan_out = FanOut {
            http: &http,
            base: &base,
            pid,
            watchers,
        };
        let result = fan_out
            .run(revision, delta, || {
                client.register(agent_ip(agents + 2 + u32::from(delta)))
            })
            .await?;
        println!(
            "watch fan-out ({}) to {watchers} watchers: all woke (headers) within {:.0} ms, all \
             had the answer within {:.0} ms ({:.1} MiB sent); master RSS with watchers parked \
             {:.1} MiB, peak {:.1} MiB",
            if delta { "delta=true" } else { "whole state" },
            result.last_wake.as_secs_f64() * 1000.0,
            result.last_done.as_secs_f64() * 1000.0,
            result.bytes as f64 / 1_048_576.0,
            result.rss_parked_kib as f64 / 1024.0,
            result.hwm_kib as f64 / 1024.0
        );
    }
    Ok(())
}

/// An unlabelled metric's value.
async fn metric(http: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<u64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("metric {name} missing"))
}

struct FanOut<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    pid: u32,
    watchers: u32,
}

struct FanOutResult {
    last_wake: Duration,
    last_done: Duration,
    bytes: usize,
    rss_parked_kib: u64,
    hwm_kib: u64,
}

impl FanOut<'_> {
    /// Parks the watchers after `revision`, waits until the master counts them all, runs
    /// `change`, and times every watcher's wake-up from just before the change.
    async fn run<F, Fut, T>(
        &self,
        revision: u64,
        delta: bool,
        change: F,
    ) -> anyhow::Result<FanOutResult>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, overlay_api::ClientError>>,
    {
        // One connection per watcher, as separate agents would have.
        let watch_http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?;
        let mut tasks = Vec::new();
        for _ in 0..self.watchers {
            let http = watch_http.clone();
            let url = format!(
                "{}/overlay-master/watch?after={revision}&timeout_ms=120000&delta={delta}",
                self.base
            );
            tasks.push(tokio::spawn(async move {
                let mut response = http
                    .get(url)
                    .timeout(Duration::from_secs(180))
                    .send()
                    .await?;
                let woke = Instant::now();
                let mut bytes = 0usize;
                while let Some(chunk) = response.chunk().await? {
                    bytes += chunk.len();
                }
                anyhow::Ok((woke, Instant::now(), bytes))
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let parked = metric(self.http, self.base, "overlay_master_watchers").await?;
            if parked >= u64::from(self.watchers) {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {parked} of {} watchers parked", self.watchers);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (rss_parked_kib, _) = rss_kib(self.pid)?;
        let changed_at = Instant::now();
        change().await?;
        let mut result = FanOutResult {
            last_wake: Duration::ZERO,
            last_done: Duration::ZERO,
            bytes: 0,
            rss_parked_kib,
            hwm_kib: 0,
        };
        for task in tasks {
            let (woke, done, bytes) = task.await??;
            result.last_wake = result
                .last_wake
                .max(woke.saturating_duration_since(changed_at));
            result.last_done = result
                .last_done
                .max(done.saturating_duration_since(changed_at));
            result.bytes += bytes;
        }
        result.hwm_kib = rss_kib(self.pid)?.1;
        Ok(result)
    }
}
