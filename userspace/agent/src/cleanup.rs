//! Removing everything an agent left on a host: the pinned datapath (all layout versions and
//! instances, or one instance), the host link, and the CNI configs the agent generated.
//! `overlayctl cleanup` and the package's removal run this; the agent must be stopped first
//! (a running agent would recreate what is removed).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::{
    cni_conf::CNI_CONF_MARKER,
    datapath::{PIN_ROOT, PinLayout},
    host_link::HostLink,
};

/// What to remove.
#[derive(Debug, Clone)]
pub struct Cleanup {
    pub bpffs: PathBuf,
    /// One instance's pins (current layout version); `None`: every instance and version.
    pub instance: Option<String>,
    pub cni_conf_dir: PathBuf,
    pub host_link: bool,
}

/// What was removed (for the report).
#[derive(Debug, Default)]
pub struct Removed {
    pub pin_dirs: Vec<PathBuf>,
    pub cni_confs: Vec<PathBuf>,
    pub host_link: bool,
    /// Managed neighbour entries the agent made for its next-hop cache.
    pub neighbours: usize,
}

impl Cleanup {
    pub fn run(&self) -> anyhow::Result<Removed> {
        let mut removed = Removed::default();
        // Links first: unpinning a TCX link detaches its program, so traffic stops being
        // handled before the maps go. remove_dir_all of the instance does links, then maps.
        match &self.instance {
            Some(instance) => {
                let pins = PinLayout::new(&self.bpffs, instance)?;
                if pins.dir().exists() {
                    pins.remove_all()?;
                    removed.pin_dirs.push(pins.dir().to_owned());
                }
            }
            None => {
                let root = self.bpffs.join(PIN_ROOT);
                if root.exists() {
                    remove_links_then_all(&root)?;
                    removed.pin_dirs.push(root);
                }
            }
        }
        if self.host_link && crate::netdev::link(overlay_common::maps::HOST_LINK).is_ok() {
            HostLink::remove()?;
            removed.host_link = true;
        }
        // The host's own: the kernel would go on probing the other agents' addresses.
        if self.host_link {
            removed.neighbours = crate::next_hops::remove_managed_neighbours()
                .context("removing the next-hop cache's managed neighbours")?;
        }
        removed.cni_confs = remove_generated_cni_confs(&self.cni_conf_dir)?;
        Ok(removed)
    }
}

/// Unpins every `links/` entry below `root` before removing the whole tree.
fn remove_links_then_all(root: &Path) -> anyhow::Result<()> {
    for version in read_dir(root)? {
        for instance in read_dir(&version)? {
            let links = instance.join("links");
            if links.is_dir() {
                std::fs::remove_dir_all(&links)
                    .with_context(|| format!("removing {}", links.display()))?;
            }
        }
    }
    std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))
}

fn read_dir(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.push(path);
        }
    }
    Ok(out)
}

/// Removes the `*.conf` and `*.conflist` files in `dir` that an agent generated (marked
/// `generated_by`, plugin `ebpf-overlay`), leaving every other CNI config alone. A missing
/// directory is nothing to do.
pub fn remove_generated_cni_confs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("conf" | "conflist")
        ) {
            continue;
        }
        // A single-plugin file names the plugin at the top, a list in its first plugin.
        let ours = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| {
                v["generated_by"] == CNI_CONF_MARKER
                    && (v["type"] == "ebpf-overlay" || v["plugins"][0]["type"] == "ebpf-overlay")
            });
        if ours {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_generated_cni_confs_are_removed() {
        let dir = std::env::temp_dir().join(format!("cleanup-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let confs = crate::cni_conf::CniConfs {
            dir: dir.clone(),
            // Mesos' files in the same directory here, so one sweep must take both kinds.
            mesos_dir: None,
            agent_socket: "/run/ebpf-overlay/agent.sock".into(),
            mtu: 1420,
            container_device: Default::default(),
        };
        let dcos = crate::cni_conf::ConfNetwork {
            order: 0,
            name: "dcos".into(),
        };
        confs.sync(std::slice::from_ref(&dcos)).unwrap();
        std::fs::write(dir.join("dcos.conf"), confs.render_mesos("dcos")).unwrap();
        // Someone else's config, and a file that is not JSON.
        std::fs::write(
            dir.join("10-bridge.conf"),
            r#"{"type":"bridge","name":"b"}"#,
        )
        .unwrap();
        std::fs::write(dir.join("broken.conf"), "not json").unwrap();
        let mut removed = remove_generated_cni_confs(&dir).unwrap();
        removed.sort();
        let list = dir.join(crate::cni_conf::CniConfs::list_file_name(&dcos));
        let mut expected = vec![dir.join("dcos.conf"), list];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(dir.join("10-bridge.conf").exists());
        assert!(dir.join("broken.conf").exists());
        assert!(
            remove_generated_cni_confs(&dir.join("missing"))
                .unwrap()
                .is_empty()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
