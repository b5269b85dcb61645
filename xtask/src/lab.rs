//! `cargo xtask lab up|down|status`.

use clap::Subcommand;
use overlay_lab::{Lab, LabSpec};

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build a lab and leave it running.
    Up {
        #[arg(long, default_value_t = 2)]
        agents: usize,
        /// Lab id (default: a fresh one). Namespaces are named `<id>-<role>`.
        #[arg(long)]
        id: Option<String>,
    },
    /// Remove a lab (or every lab, with no --id), including what crashed runs left behind.
    Down {
        #[arg(long)]
        id: Option<String>,
    },
    /// List the labs on this machine and their namespaces.
    Status,
}

pub fn run(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up { agents, id } => {
            let lab = Lab::up(LabSpec { agents, id })?;
            for n in &lab.record().nodes {
                let ip = n.ip.map(|i| i.to_string()).unwrap_or_default();
                println!("{:<8} {:<22} {ip}", n.role, n.netns);
            }
            let rec = lab.keep();
            println!(
                "lab {} is up; enter a node with `ip netns exec {}-a1 bash`",
                rec.id, rec.id
            );
            println!("remove it with `cargo xtask lab down --id {}`", rec.id);
            Ok(())
        }
        LabCmd::Down { id } => {
            let labs = Lab::recorded()?;
            let mut removed = 0;
            for rec in labs
                .iter()
                .filter(|r| id.as_ref().is_none_or(|i| *i == r.id))
            {
                Lab::down_record(rec)?;
                println!("removed lab {}", rec.id);
                removed += 1;
            }
            if let Some(id) = id.filter(|_| removed == 0) {
                // No record (or a record lost): remove namespaces by name all the same.
                let rec = overlay_lab::LabRecord {
                    id: id.clone(),
                    ..Default::default()
                };
                Lab::down_record(&rec)?;
                println!("removed lab {id} (no record found; namespaces removed by name)");
            } else if removed == 0 {
                println!("no labs on this machine");
            }
            Ok(())
        }
        LabCmd::Status => {
            let labs = overlay_lab::status()?;
            if labs.is_empty() {
                println!("no labs on this machine");
            }
            for (id, namespaces) in labs {
                println!("lab {id}: {}", namespaces.join(" "));
            }
            Ok(())
        }
    }
}
