//! `cargo xtask`: the project's one entry point for setup, tests, the lab and the demo.
//!
//! xtask depends on nothing that needs the eBPF toolchain, so it builds on a fresh machine and
//! then installs that toolchain itself (`setup`).

mod bench;
mod demo;
mod lab;
mod package;
mod setup;
mod test;
mod vm;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ebpf-overlay development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, nightly rust-src, bpf-linker, bpffs); skip what is present.
    Setup,
    /// Setup, build everything, run the whole test suite (test binaries concurrently; see
    /// `xtask/src/test.rs`).
    Test(test::TestArgs),
    /// Setup, build, and bring up a local cluster on the embedded defaults: shows the datapath
    /// attached, its maps, and traffic flowing.
    Demo {
        /// Leave the lab running afterwards (remove it with `cargo xtask lab down`).
        #[arg(long)]
        keep: bool,
    },
    /// Benchmarks: raw underlay vs DC/OS kernel datapath vs ebpf-overlay, and the control plane.
    Bench(bench::BenchArgs),
    /// (internal) The benchmark's connection-rate server, run inside a lab namespace.
    #[command(hide = true)]
    BenchCpsServer { addr: String },
    /// (internal) The benchmark's TCP ping-pong server (RTT over IPv6), run inside a lab
    /// namespace.
    #[command(hide = true)]
    BenchRttServer { addr: String },
    /// The Debian package (binaries, CNI plugin, systemd units, default config, man pages).
    Package(package::PackageArgs),
    /// The QEMU VM lab: real boots, systemd, the package installed, virtio-net NICs.
    Vm {
        #[command(subcommand)]
        action: vm::VmCmd,
    },
    /// The network-namespace lab.
    Lab {
        #[command(subcommand)]
        action: lab::LabCmd,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Test(args) => {
            setup::run()?;
            cargo(&["build", "--bins"])?;
            test::run(args)
        }
        Cmd::Demo { keep } => {
            setup::run()?;
            cargo(&["build", "--bins"])?;
            demo::run(keep)
        }
        Cmd::Lab { action } => lab::run(action),
        Cmd::Package(args) => package::run(&args).map(|_| ()),
        Cmd::Vm { action } => vm::run(action),
        Cmd::Bench(args) => bench::run(args),
        Cmd::BenchCpsServer { addr } => bench::traffic::cps_server(&addr),
        Cmd::BenchRttServer { addr } => bench::traffic::rtt_server(&addr),
    }
}

/// Runs cargo from the workspace root with inherited output.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}
