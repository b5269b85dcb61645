//! The micro-benchmark table: per-packet cost of each program path by `BPF_PROG_TEST_RUN`, run by
//! the `overlay-microbench` binary (tests crate: it embeds the eBPF object, which xtask must not
//! need to build). Each row names the verdict and the counter every run was checked against, so a
//! packet that took another path fails the run instead of passing as fast.
//!
//! With a baseline binary (`--micro-baseline`, an earlier build of `overlay-microbench`), both are
//! measured in the same run, round by round in turn, and the table shows before, after and the
//! ratio.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// One binary's figures: per case, the per-round medians (ns).
#[derive(Clone, Debug)]
pub struct Measured {
    pub object: String,
    pub calls: u64,
    pub rows: Vec<Row>,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub program: String,
    pub verdict_name: String,
    pub counter: String,
    /// Program runs per call (1, or the repeated drop row's count).
    pub repeat: u64,
    /// The program alone (run-time statistics around the run), per-round medians.
    pub rounds_ns: Vec<f64>,
    /// The test run's `duration` (adds the harness's clock reads), per-round medians.
    pub rounds_test_run_ns: Vec<f64>,
}

pub struct MicroResults {
    pub current: Measured,
    pub baseline: Option<(String, Measured)>,
    pub rounds: usize,
}

fn floats(v: &Value) -> anyhow::Result<Vec<f64>> {
    Ok(v.as_array()
        .context("microbench output lacks a figure")?
        .iter()
        .filter_map(Value::as_f64)
        .collect())
}

fn rows_of(doc: &Value) -> anyhow::Result<Measured> {
    let row = |c: &Value, repeat: u64| -> anyhow::Result<Row> {
        let s = |k: &str| {
            c[k].as_str()
                .map(str::to_owned)
                .with_context(|| format!("microbench output lacks {k}"))
        };
        Ok(Row {
            name: s("name")?,
            program: s("program")?,
            verdict_name: s("verdict_name")?,
            counter: s("counter")?,
            repeat,
            rounds_ns: floats(&c["rounds_ns"])?,
            rounds_test_run_ns: floats(&c["rounds_test_run_ns"])?,
        })
    };
    let mut rows = vec![];
    for c in doc["cases"]
        .as_array()
        .context("microbench output lacks cases")?
    {
        rows.push(row(c, 1)?);
    }
    let r = &doc["repeated"];
    let mut repeated = row(r, r["repeat"].as_u64().unwrap_or(1))?;
    repeated.name = format!("{}, {} runs per call", repeated.name, repeated.repeat);
    rows.push(repeated);
    Ok(Measured {
        object: doc["object"].as_str().unwrap_or("?").to_owned(),
        calls: doc["calls"].as_u64().unwrap_or(0),
        rows,
    })
}

fn run_binary(bin: &Path, calls: usize) -> anyhow::Result<Measured> {
    let out = std::process::Command::new(bin)
        .args(["--rounds", "1", "--calls", &calls.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", bin.display(), out.status);
    }
    let doc: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing the output of {}", bin.display()))?;
    rows_of(&doc)
}

/// Appends one round's figures to the accumulated ones (same cases in the same order).
fn merge(into: &mut Option<Measured>, round: Measured) -> anyhow::Result<()> {
    match into {
        None => *into = Some(round),
        Some(m) => {
            if m.rows.len() != round.rows.len() {
                bail!("microbench rounds disagree on their cases");
            }
            for (a, b) in m.rows.iter_mut().zip(round.rows) {
                a.rounds_ns.extend(b.rounds_ns);
                a.rounds_test_run_ns.extend(b.rounds_test_run_ns);
            }
        }
    }
    Ok(())
}

/// Runs `bin` (and `baseline`, alternately) for `rounds` rounds of `calls` runs per case.
pub fn run(
    bin: &Path,
    baseline: Option<&Path>,
    rounds: usize,
    calls: usize,
) -> anyhow::Result<MicroResults> {
    if !bin.exists() {
        bail!(
            "{} missing (built by `cargo build --bins`, package overlay-tests)",
            bin.display()
        );
    }
    let mut current = None;
    let mut base = None;
    for round in 1..=rounds {
        println!("bench: micro-benchmark round {round} of {rounds}");
        if let Some(b) = baseline {
            merge(
                &mut base,
                run_binary(b, calls).context("baseline micro-benchmark")?,
            )?;
        }
        merge(&mut current, run_binary(bin, calls)?)?;
    }
    Ok(MicroResults {
        current: current.context("no rounds")?,
        baseline: baseline.map(|b| (b.display().to_string(), base.unwrap())),
        rounds,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The fastest round: on a machine that switches between a fast and a slow state from round to
/// round, medians of two builds can fall in different states, while each build's fastest
/// round is in the fast one (a build against itself: minima within 3%, medians up to 1.4x
/// apart, 2026-12-04), so the ratio of minima is shown beside the ratio of medians.
fn minimum(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn spread(v: &[f64]) -> String {
    let min = minimum(v);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.0} ({min:.0}–{max:.0})", median(v))
}

pub fn markdown(m: &MicroResults) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nMicro-benchmark: one `BPF_PROG_TEST_RUN` per packet, {} call(s) per path and round; \
         ns/packet = the program's run time as the kernel's run-time statistics account it \
         (`run_time_ns`/`run_cnt`, as in the traffic table), median per round, then median \
         (min–max) of {} round(s); the test run's own `duration` (adds the harness's clock \
         reads) beside it. Every run's verdict, the first run's output and the counters were \
         checked (object {}).\n",
        m.current.calls, m.rounds, m.current.object
    );
    match &m.baseline {
        None => {
            let _ = writeln!(
                s,
                "| path | program | verdict | counter | ns/packet | test-run duration ns |\n\
                 |---|---|---|---|---|---|"
            );
            for r in &m.current.rows {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.name,
                    r.program,
                    r.verdict_name,
                    r.counter,
                    spread(&r.rounds_ns),
                    spread(&r.rounds_test_run_ns)
                );
            }
        }
        Some((path, b)) => {
            let _ = writeln!(
                s,
                "Baseline `{path}` (object {}), measured in the same run, rounds alternating.\n\n\
                 | path | program | verdict | counter | before ns/packet | after ns/packet | after/before | minimum after/before |\n\
                 |---|---|---|---|---|---|---|---|",
                b.object
            );
            for r in &m.current.rows {
                let before = b.rows.iter().find(|x| x.name == r.name);
                let (bs, ratio, min_ratio) = match before {
                    Some(x) => (
                        spread(&x.rounds_ns),
                        format!("{:.2}x", median(&r.rounds_ns) / median(&x.rounds_ns)),
                        format!("{:.2}x", minimum(&r.rounds_ns) / minimum(&x.rounds_ns)),
                    ),
                    None => ("–".into(), "–".into(), "–".into()),
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {bs} | {} | {ratio} | {min_ratio} |",
                    r.name,
                    r.program,
                    r.verdict_name,
                    r.counter,
                    spread(&r.rounds_ns)
                );
            }
        }
    }
    s
}

fn rows_json(m: &Measured) -> Value {
    json!({
        "object": m.object,
        "calls": m.calls,
        "rows": m.rows.iter().map(|r| json!({
            "path": r.name,
            "program": r.program,
            "verdict": r.verdict_name,
            "counter": r.counter,
            "runs_per_call": r.repeat,
            "rounds_ns": r.rounds_ns,
            "median_ns": median(&r.rounds_ns),
            "min_ns": minimum(&r.rounds_ns),
            "rounds_test_run_ns": r.rounds_test_run_ns,
            "median_test_run_ns": median(&r.rounds_test_run_ns),
        })).collect::<Vec<_>>(),
    })
}

pub fn to_json(m: &MicroResults) -> Value {
    json!({
        "rounds": m.rounds,
        "current": rows_json(&m.current),
        "baseline": m.baseline.as_ref().map(|(p, b)| json!({"binary": p, "figures": rows_json(b)})),
    })
}
