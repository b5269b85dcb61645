//! The master's state last applied by this agent, kept in its state directory
//! (`master-state.json`) so that an agent restarted while no master answers still knows its
//! allocation (VTEP, subnets, halves) and the networks, and can attach containers from it.
//!
//! Written like the IPAM's file: temporary, fsync, rename, fsync of the directory, so a crash
//! leaves the old or the new copy, never half of one. Only a state that was applied to the
//! datapath is saved (the pinned maps hold the same), and the master's answer always wins over it.

use std::{
    fs::File,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use overlay_api::{AgentInfo, State};
use serde::{Deserialize, Serialize};

/// Name of the file inside the state directory.
pub const SAVED_STATE_FILE: &str = "master-state.json";
const VERSION: u32 = 1;

/// What the agent last applied: its own allocation and the whole state it came with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    /// Master revision of `state`.
    pub revision: u64,
    pub me: AgentInfo,
    pub state: State,
}

pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(SAVED_STATE_FILE)
}

/// Writes `saved` atomically into `dir`.
pub fn save(dir: &Path, saved: &SavedState) -> anyhow::Result<()> {
    let path = path_in(dir);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(saved)?;
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The saved state of `dir`, if any. A state saved for another underlay address (the host was
/// renumbered, the state dir copied) is refused: its allocation is not this agent's.
pub fn load(dir: &Path, my_ip: IpAddr) -> anyhow::Result<Option<SavedState>> {
    let path = path_in(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let saved: SavedState = serde_json::from_slice(&bytes)
        .with_context(|| format!("parsing the saved master state {}", path.display()))?;
    if saved.version != VERSION {
        bail!(
            "{}: version {} (this agent reads {VERSION})",
            path.display(),
            saved.version
        );
    }
    if saved.me.ip != my_ip {
        bail!(
            "{}: saved for agent {}, this agent is {my_ip}",
            path.display(),
            saved.me.ip
        );
    }
    if !saved.state.agents.iter().any(|a| a.ip == my_ip) {
        bail!(
            "{}: its state (revision {}) does not hold this agent",
            path.display(),
            saved.revision
        );
    }
    Ok(Some(saved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        serde_json::from_value(serde_json::json!({
            "network": {
                "vtep_subnet": "44.128.0.0/20", "vtep_mac_oui": "70:B3:D5:00:00:00",
                "overlays": [{"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24, "vni": 1024}]
            },
            "agents": [
                {"ip": "10.250.0.11", "overlays": [
                    {"info": {"name": "dcos", "subnet": "9.0.0.0/8", "prefix": 24}, "subnet": "9.0.0.0/24",
                     "backend": {"vxlan": {"vni": 1024, "vtep_name": "vtep1024", "vtep_ip": "44.128.0.1/20", "vtep_mac": "70:b3:d5:80:00:01"}}}
                ]}
            ]
        }))
        .unwrap()
    }

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("saved-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn saved_state_round_trips_and_is_refused_for_another_agent_or_when_corrupt() {
        let dir = tmp_dir("roundtrip");
        let me_ip: IpAddr = "10.250.0.11".parse().unwrap();
        assert_eq!(load(&dir, me_ip).unwrap(), None);
        let state = state();
        let saved = SavedState {
            version: VERSION,
            revision: 7,
            me: state.agents[0].clone(),
            state,
        };
        save(&dir, &saved).unwrap();
        assert!(!path_in(&dir).with_extension("json.tmp").exists());
        assert_eq!(load(&dir, me_ip).unwrap(), Some(saved.clone()));
        let other = load(&dir, "10.250.0.12".parse().unwrap()).unwrap_err();
        assert!(
            format!("{other:#}").contains("saved for agent 10.250.0.11"),
            "{other:#}"
        );
        std::fs::write(path_in(&dir), b"{\"version\": 1, \"revis").unwrap();
        let corrupt = load(&dir, me_ip).unwrap_err();
        assert!(
            format!("{corrupt:#}").contains("parsing the saved master state"),
            "{corrupt:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
