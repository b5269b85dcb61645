//! The datapath micro-benchmark (`cargo xtask bench --micro` runs it and prints the table):
//! per-packet program cost of each path by `BPF_PROG_TEST_RUN`, on the fixture of
//! `overlay_tests::micro_bench`. Prints one JSON document on stdout; needs root (loads programs,
//! turns the kernel's BPF run-time statistics on while it runs).
//!
//! `overlay-microbench [--rounds N] [--calls N] [--repeat N]`: N rounds over every case, each
//! case run `--calls` times per round (one program run per call, the round's figure is the
//! median), then the drop case with `--repeat` runs per call.

use anyhow::{Context as _, bail};
use overlay_tests::micro_bench::{MicroBench, Timing, median, verdict_name};
use serde_json::json;

fn arg(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a number")),
    }
}

/// A short fingerprint of the embedded eBPF object (FNV-1a), to tell builds apart in reports.
fn object_id() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in overlay_agent::datapath::OBJECT {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Per-round medians of one case: (program alone, test-run duration).
#[derive(Default)]
struct Rounds {
    program: Vec<u64>,
    test_run: Vec<u64>,
}

impl Rounds {
    fn push(&mut self, t: &[Timing]) -> anyhow::Result<()> {
        let mut p = t
            .iter()
            .map(|t| t.program.context("BPF run-time statistics are off"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut d: Vec<u64> = t.iter().map(|t| t.test_run).collect();
        self.program.push(median(&mut p));
        self.test_run.push(median(&mut d));
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = ["--rounds", "--calls", "--repeat"];
    if let Some(a) = args
        .iter()
        .find(|a| a.starts_with("--") && !options.contains(&a.as_str()))
    {
        bail!("unknown option {a} (options: --rounds N --calls N --repeat N)");
    }
    let rounds = arg(&args, "--rounds", 5)?.max(1) as usize;
    let calls = arg(&args, "--calls", 2000)?.max(1) as usize;
    let repeat = u32::try_from(arg(&args, "--repeat", 100)?.max(1)).context("--repeat")?;
    let _stats = overlay_datapath::stats::RunTimeStats::enable()?;
    let bench = MicroBench::new()?;
    let cases = bench.cases()?;
    let mut per_case: Vec<Rounds> = cases.iter().map(|_| Rounds::default()).collect();
    let mut repeated = Rounds::default();
    let drop_case = cases
        .iter()
        .find(|c| c.verdict == overlay_tests::support_packets::TC_ACT_SHOT)
        .context("no drop case")?;
    for round in 0..rounds {
        for (case, figures) in cases.iter().zip(per_case.iter_mut()) {
            figures.push(&bench.run(case, calls)?)?;
        }
        let t = (0..calls.div_ceil(repeat as usize).max(5))
            .map(|_| bench.run_repeated(drop_case, repeat))
            .collect::<anyhow::Result<Vec<_>>>()?;
        repeated.push(&t)?;
        eprintln!("microbench: round {} of {rounds} done", round + 1);
    }
    let row = |c: &overlay_tests::micro_bench::Case, r: &Rounds| {
        json!({
            "name": c.name,
            "program": c.program,
            "verdict": c.verdict,
            "verdict_name": verdict_name(c.verdict),
            "counter": c.counter.1.name(),
            "rounds_ns": r.program,
            "rounds_test_run_ns": r.test_run,
        })
    };
    let mut repeated_row = row(drop_case, &repeated);
    repeated_row["repeat"] = json!(repeat);
    let doc = json!({
        "object": object_id(),
        "calls": calls,
        "rounds": rounds,
        "cases": cases.iter().zip(&per_case).map(|(c, r)| row(c, r)).collect::<Vec<_>>(),
        "repeated": repeated_row,
    });
    println!("{doc}");
    Ok(())
}
