//! `cargo xtask test`: builds every test binary once, then runs them concurrently.
//!
//! Most of the suite waits (on sleeps, timeouts, daemons starting), so several binaries run at
//! once (`--jobs`, longest first by the last recorded or the estimated duration). Binaries that
//! measure time or need the CPUs to themselves run alone, before the rest. Each binary's output
//! goes to its own log (`target/xtask-test/<binary>.log`), printed in full if it fails.
//! `--serial` runs plain `cargo test` instead, with live output.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Run the suite the old way: one `cargo test`, binaries one after another, live output.
    #[arg(long)]
    serial: bool,
    /// Test binaries run at once.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Arguments for `cargo test` (`-p overlay-tests --test cluster`, a test name filter);
    /// after `--`, arguments for every test binary (`--ignored`, `--test-threads 1`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Binaries that must have the machine to themselves: they assert on timings (a CNI ADD under
/// a second during a NAT sweep, the NAT quota's expiry, the networks page updating within
/// seconds in a real browser), or load both cores for minutes (the VM lab under emulation, the
/// benchmark).
const ALONE: &[&str] = &[
    "overlay-tests/tests/agent_owner",
    "overlay-tests/tests/security_datapath",
    "overlay-tests/tests/vm",
    "overlay-tests/tests/bench_smoke",
    "overlay-tests/tests/networks_page",
];

/// Seconds each binary took in a whole-suite run (2 shared cores at load 6-8, 4 jobs,
/// 2026-12-02), for the order of a first run; later runs use the durations recorded in
/// `target/xtask-test/durations.json`. Unlisted binaries count as 10 s.
const ESTIMATES: &[(&str, f64)] = &[
    ("overlay-tests/tests/vm", 459.0),
    ("overlay-tests/tests/bench_smoke", 206.0),
    ("doctests", 169.0),
    ("overlay-tests/tests/dcos_migration", 102.0),
    ("overlay-tests/tests/runtimes_matrix", 101.0),
    ("overlay-tests/tests/cluster", 80.0),
    ("overlay-tests/tests/docker_driver", 71.0),
    ("overlay-tests/tests/datapath_test_run", 62.0),
    ("overlay-tests/tests/cni_plugin", 61.0),
    ("overlay-tests/tests/masquerade", 56.0),
    ("overlay-tests/tests/cluster_ipv6_underlay", 47.0),
    ("overlay-tests/tests/security_datapath", 41.0),
    ("overlay-tests/tests/etcd_store", 34.0),
    ("overlay-tests/tests/master_footguns", 33.0),
    ("overlay-tests/tests/datapath_test_run_nat6", 28.0),
    ("overlay-tests/tests/datapath_ipv6_underlay", 27.0),
    ("overlay-tests/tests/cluster_safety", 26.0),
    ("overlay-tests/tests/control_plane_auth", 26.0),
    ("overlay-tests/tests/drop_monitor", 26.0),
    ("overlay-tests/tests/package", 24.0),
    ("overlay-tests/tests/cni_podman", 22.0),
    ("overlay-tests/tests/xdp_underlay", 21.0),
    ("overlay-tests/tests/cni_containerd", 19.0),
    ("overlay-tests/tests/etcd_cluster", 18.0),
    ("overlay-tests/tests/masquerade6", 17.0),
    ("overlay-tests/tests/cni_mesos", 17.0),
    ("overlay-tests/tests/agent_offline", 16.0),
    ("overlay-tests/tests/datapath_interop", 16.0),
    ("overlay-tests/tests/layout_upgrade", 16.0),
    ("overlay-tests/tests/host_reachability", 15.0),
    ("overlay-tests/tests/datapath_ipv6", 15.0),
    ("overlay-tests/tests/datapath_malformed", 14.0),
];

/// One test binary cargo built.
#[derive(Clone, Debug)]
struct Binary {
    /// `<package>/<kind>/<target>`, e.g. `overlay-tests/tests/cluster`.
    label: String,
    exe: PathBuf,
    /// The package's directory: cargo runs a test binary there.
    package_dir: PathBuf,
}

/// A job: a test binary, or the doctests (which only cargo can run).
#[derive(Clone, Debug)]
enum Job {
    Binary(Binary),
    Doctests(Vec<String>),
}

impl Job {
    fn label(&self) -> &str {
        match self {
            Job::Binary(b) => &b.label,
            Job::Doctests(_) => "doctests",
        }
    }
}

struct Outcome {
    label: String,
    passed: bool,
    elapsed: Duration,
    log: PathBuf,
    /// libtest's last `test result:` line.
    summary: String,
}

pub fn run(args: TestArgs) -> anyhow::Result<()> {
    let (cargo_args, binary_args) = split_args(&args.args);
    if args.serial {
        let mut test_args = vec!["test", "--no-fail-fast"];
        test_args.extend(args.args.iter().map(String::as_str));
        return crate::cargo(&test_args);
    }
    let (cargo_args, filters) = separate_filters(cargo_args);
    // A filtered run's durations say nothing about the binaries' whole runs.
    let record_durations = filters.is_empty() && binary_args.is_empty();
    let mut binary_args: Vec<String> = filters.into_iter().chain(binary_args).collect();
    // libtest's own output stays per test, readable in the log.
    binary_args.push("--color".into());
    binary_args.push("never".into());

    let root = crate::workspace_root();
    let out_dir = root.join("target").join("xtask-test");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let binaries = build_test_binaries(&cargo_args)?;
    let mut jobs: Vec<Job> = binaries.into_iter().map(Job::Binary).collect();
    if !selects_targets(&cargo_args) {
        let mut doc = vec!["test".to_owned(), "--doc".to_owned()];
        doc.extend(cargo_args.iter().cloned());
        if !binary_args.is_empty() {
            doc.push("--".into());
            doc.extend(binary_args.iter().cloned());
        }
        jobs.push(Job::Doctests(doc));
    }

    let durations_file = out_dir.join("durations.json");
    let mut durations = load_durations(&durations_file);
    let expected = |label: &str| -> f64 {
        durations
            .get(label)
            .copied()
            .or_else(|| ESTIMATES.iter().find(|(l, _)| *l == label).map(|(_, s)| *s))
            .unwrap_or(10.0)
    };
    // Alone ones first (each with the machine to itself), then the pool, longest first: the
    // long ones start early and the short ones fill the gaps at the end.
    let (mut alone, mut pooled): (Vec<Job>, Vec<Job>) =
        jobs.into_iter().partition(|j| ALONE.contains(&j.label()));
    let by_expected = |a: &Job, b: &Job| expected(b.label()).total_cmp(&expected(a.label()));
    alone.sort_by(by_expected);
    pooled.sort_by(by_expected);
    let total = alone.len() + pooled.len();
    let jobs_n = args.jobs.max(1);
    println!(
        "running {total} test binaries: {} alone, then {} with {jobs_n} at a time (logs in {})",
        alone.len(),
        pooled.len(),
        out_dir.display()
    );

    let started = Instant::now();
    let mut outcomes = Vec::new();
    let (tx, rx) = mpsc::channel::<Outcome>();
    let mut running = 0usize;
    let mut queue: std::collections::VecDeque<(Job, bool)> = alone
        .into_iter()
        .map(|j| (j, true))
        .chain(pooled.into_iter().map(|j| (j, false)))
        .collect();
    let mut running_alone = false;
    while !queue.is_empty() || running > 0 {
        // Start what may start: an alone job only on an idle machine, and nothing beside it.
        while let Some((_, is_alone)) = queue.front() {
            let may = if *is_alone {
                running == 0
            } else {
                !running_alone && running < jobs_n
            };
            if !may {
                break;
            }
            let (job, is_alone) = queue.pop_front().expect("front exists");
            running += 1;
            running_alone = is_alone;
            let tx = tx.clone();
            let log = out_dir.join(format!("{}.log", job.label().replace('/', "_")));
            let args = binary_args.clone();
            let root = root.clone();
            std::thread::spawn(move || {
                let outcome = run_job(&job, &args, &root, &log);
                let _ = tx.send(outcome);
            });
        }
        let outcome = rx.recv().context("a test job's thread vanished")?;
        running -= 1;
        if running == 0 {
            running_alone = false;
        }
        println!(
            "{} {} ({:.1} s) {}  [{} of {total} done, {:.0} s in]",
            if outcome.passed { "PASS" } else { "FAIL" },
            outcome.label,
            outcome.elapsed.as_secs_f64(),
            outcome.summary,
            outcomes.len() + 1,
            started.elapsed().as_secs_f64()
        );
        if !outcome.passed {
            print_log(&outcome);
        }
        if record_durations {
            durations.insert(outcome.label.clone(), outcome.elapsed.as_secs_f64());
        }
        outcomes.push(outcome);
    }
    if record_durations {
        save_durations(&durations_file, &durations);
    }

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed).collect();
    println!(
        "\n{} of {total} test binaries passed in {:.0} s ({jobs_n} jobs)",
        total - failed.len(),
        started.elapsed().as_secs_f64()
    );
    for o in &failed {
        println!("  FAILED {} ({})", o.label, o.log.display());
    }
    if !failed.is_empty() {
        // The summary above says it all; no error chain or backtrace after it.
        std::process::exit(1);
    }
    Ok(())
}

/// Splits at the first `--`: cargo's arguments, then the test binaries'.
fn split_args(args: &[String]) -> (Vec<String>, Vec<String>) {
    match args.iter().position(|a| a == "--") {
        Some(i) => (args[..i].to_vec(), args[i + 1..].to_vec()),
        None => (args.to_vec(), vec![]),
    }
}

/// `cargo test` options that take a value as the next argument.
const VALUE_OPTIONS: &[&str] = &[
    "-p",
    "--package",
    "--test",
    "--bench",
    "--bin",
    "--example",
    "--exclude",
    "-F",
    "--features",
    "--target",
    "--target-dir",
    "--profile",
    "-j",
    "--jobs",
    "--manifest-path",
    "--config",
    "-Z",
    "--color",
];

/// Positional arguments of `cargo test` are test name filters (handed to each binary); the
/// rest stays cargo's.
fn separate_filters(args: Vec<String>) -> (Vec<String>, Vec<String>) {
    let (mut cargo, mut filters) = (vec![], vec![]);
    let mut takes_value = false;
    for a in args {
        if takes_value {
            takes_value = false;
            cargo.push(a);
        } else if a.starts_with('-') {
            takes_value = VALUE_OPTIONS.contains(&a.as_str());
            cargo.push(a);
        } else {
            filters.push(a);
        }
    }
    (cargo, filters)
}

/// Whether cargo's arguments pick targets (`--test x`, `--lib`, ...): then no doctests.
fn selects_targets(cargo_args: &[String]) -> bool {
    cargo_args.iter().any(|a| {
        let a = a.split('=').next().unwrap_or(a);
        [
            "--test",
            "--tests",
            "--lib",
            "--bin",
            "--bins",
            "--bench",
            "--benches",
            "--example",
            "--examples",
        ]
        .contains(&a)
    })
}

/// `cargo test --no-run`, reading which test executables it built from its JSON messages.
fn build_test_binaries(cargo_args: &[String]) -> anyhow::Result<Vec<Binary>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(&cargo)
        .args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .args(cargo_args)
        .current_dir(crate::workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo} test --no-run"))?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut binaries = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's messages")?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let package = package_name(msg["package_id"].as_str().unwrap_or_default());
        let target = msg["target"]["name"].as_str().unwrap_or("?");
        let kind = match msg["target"]["kind"][0].as_str().unwrap_or("?") {
            "test" => "tests",
            k => k,
        };
        let package_dir = msg["manifest_path"]
            .as_str()
            .and_then(|m| Path::new(m).parent())
            .map(Path::to_owned)
            .unwrap_or_else(crate::workspace_root);
        binaries.push(Binary {
            label: format!("{package}/{kind}/{target}"),
            exe: PathBuf::from(exe),
            package_dir,
        });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`cargo test --no-run` failed ({status})");
    }
    // The same binary can be reported twice (a fresh build, then fresh); keep one.
    binaries.sort_by(|a, b| a.label.cmp(&b.label));
    binaries.dedup_by(|a, b| a.label == b.label);
    Ok(binaries)
}

/// The package name in a cargo package id: `path+file:///w/tests#overlay-tests@0.1.0`, or
/// `path+file:///w/xtask#0.1.0` when the name is the directory's, or the old `name 0.1.0 (...)`.
fn package_name(id: &str) -> String {
    if let Some((url, rest)) = id.rsplit_once('#') {
        return match rest.split_once('@') {
            Some((name, _)) => name.to_owned(),
            None => url.rsplit('/').next().unwrap_or(url).to_owned(),
        };
    }
    id.split(' ').next().unwrap_or(id).to_owned()
}

fn run_job(job: &Job, args: &[String], root: &Path, log: &Path) -> Outcome {
    let started = Instant::now();
    let result = (|| -> anyhow::Result<bool> {
        let file = std::fs::File::create(log)?;
        let mut cmd = match job {
            Job::Binary(b) => {
                // Cargo can call a unit fresh whose executable is gone (a target directory
                // copied without its test executables): say so, not "No such file".
                if !b.exe.exists() {
                    bail!(
                        "cargo reported {} as built but it does not exist: touch the crate's \
                         sources (or remove its fingerprint in target/debug/.fingerprint) to \
                         rebuild it",
                        b.exe.display()
                    );
                }
                let mut cmd = Command::new(&b.exe);
                cmd.args(args)
                    .current_dir(&b.package_dir)
                    .env("CARGO_MANIFEST_DIR", &b.package_dir);
                cmd
            }
            Job::Doctests(cargo_args) => {
                let mut cmd =
                    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
                cmd.args(cargo_args).current_dir(root);
                cmd
            }
        };
        let status = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .status()
            .with_context(|| format!("starting {}", job.label()))?;
        Ok(status.success())
    })();
    let elapsed = started.elapsed();
    let (passed, mut summary) = match result {
        Ok(passed) => (passed, String::new()),
        Err(e) => {
            let _ = std::fs::write(log, format!("{e:#}\n"));
            (false, format!("{e:#}"))
        }
    };
    if let Ok(text) = std::fs::read_to_string(log)
        && let Some(line) = text.lines().rev().find(|l| l.starts_with("test result:"))
    {
        summary = line.trim_start_matches("test result: ").to_owned();
    }
    Outcome {
        label: job.label().to_owned(),
        passed,
        elapsed,
        log: log.to_owned(),
        summary,
    }
}

fn print_log(outcome: &Outcome) {
    let text = std::fs::read_to_string(&outcome.log).unwrap_or_default();
    println!("---- output of {} ----", outcome.label);
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
    println!("---- end of {} ----", outcome.label);
}

fn load_durations(path: &Path) -> BTreeMap<String, f64> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_durations(path: &Path, durations: &BTreeMap<String, f64>) {
    if let Ok(text) = serde_json::to_string_pretty(durations) {
        let _ = std::fs::write(path, text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cargo_arguments_and_filters_are_told_apart() {
        let (cargo, bins) = split_args(&strings(&[
            "-p",
            "overlay-tests",
            "--test",
            "cluster",
            "restart",
            "--",
            "--ignored",
        ]));
        assert_eq!(bins, ["--ignored"]);
        let (cargo, filters) = separate_filters(cargo);
        assert_eq!(cargo, ["-p", "overlay-tests", "--test", "cluster"]);
        assert_eq!(filters, ["restart"]);
        assert!(selects_targets(&cargo));
        assert!(!selects_targets(&strings(&["-p", "x", "--features=y"])));
    }

    #[test]
    fn package_names_from_every_id_form() {
        assert_eq!(
            package_name("path+file:///w/tests#overlay-tests@0.1.0"),
            "overlay-tests"
        );
        assert_eq!(package_name("path+file:///w/xtask#0.1.0"), "xtask");
        assert_eq!(
            package_name("overlay-lab 0.1.0 (path+file:///w/userspace/lab)"),
            "overlay-lab"
        );
    }
}
