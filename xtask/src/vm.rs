//! `cargo xtask vm up|down|test|status`: the QEMU VM lab (`overlay_lab::vm`).

use std::{path::PathBuf, time::Duration};

use clap::Subcommand;
use overlay_lab::vm::{VmLab, VmLabSpec};

use crate::{cargo, package, workspace_root};

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Build the package (debug build), the guest image if not cached, boot the VMs with the
    /// master in the lab namespace, and leave them running.
    Up {
        #[arg(long, default_value_t = 2)]
        vms: usize,
        #[arg(long, default_value_t = 512)]
        mem_mib: u32,
    },
    /// Remove a VM lab left running by `vm up` (or a crashed run); without --id, list them.
    Down {
        #[arg(long)]
        id: Option<String>,
    },
    /// The VM tests (tests/tests/vm.rs).
    Test,
}

/// Builds the debug binaries and the package from them; returns (bin dir, .deb).
pub fn build_package() -> anyhow::Result<(PathBuf, PathBuf)> {
    cargo(&["build", "--bins"])?;
    let bin_dir = workspace_root().join("target/debug");
    let deb = package::run(&package::PackageArgs {
        debug: true,
        version: None,
        out: None,
        bin_dir: Some(bin_dir.clone()),
    })?;
    Ok((bin_dir, deb))
}

pub fn run(cmd: VmCmd) -> anyhow::Result<()> {
    match cmd {
        VmCmd::Up { vms, mem_mib } => {
            let (bin_dir, deb) = build_package()?;
            let lab = VmLab::up(VmLabSpec {
                vms,
                debs: vec![deb],
                bin_dir,
                master_config: overlay_lab::cluster::TWO_NETWORKS.into(),
                mem_mib,
                extra_files: vec![],
                kernel: Default::default(),
            })?;
            println!("vm lab {}: accelerator {}", lab.id, lab.accel_reason);
            println!(
                "image {:.0}s, root image {:.0}s, boot to shell {:.0}s",
                lab.image_secs, lab.root_image_secs, lab.boot_secs
            );
            for vm in &lab.vms {
                // The agent starts after network-online and loads its programs under
                // emulation: give it time.
                let state = vm
                    .wait_for(
                        "systemctl is-active overlay-agent",
                        Duration::from_secs(180),
                    )
                    .map(|o| o.trim().to_owned())
                    .unwrap_or_else(|e| format!("{e:#}"));
                println!("  {} {} overlay-agent: {state}", vm.name, vm.ip);
            }
            println!("logs and disks in {}", lab.work.display());
            let id = lab.keep();
            println!("remove with: cargo xtask vm down --id {id}");
            Ok(())
        }
        VmCmd::Down { id: Some(id) } => VmLab::down_recorded(&id),
        VmCmd::Down { id: None } => {
            for id in VmLab::recorded() {
                println!("{id}");
            }
            Ok(())
        }
        VmCmd::Test => {
            crate::setup::run()?;
            cargo(&["build", "--bins"])?;
            cargo(&[
                "test",
                "-p",
                "overlay-tests",
                "--test",
                "vm",
                "--",
                "--nocapture",
            ])
        }
    }
}
