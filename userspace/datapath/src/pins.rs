//! Where the datapath's maps and links are pinned.
//!
//! `<bpffs>/ebpf-overlay/v<MAP_LAYOUT_VERSION>/<instance>/{maps,links}/...`: the layout version in
//! the path means an agent never reuses maps whose layout it does not know; the instance lets
//! several agents share one bpffs (the lab runs many agents on one machine).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use overlay_common::maps::MAP_LAYOUT_VERSION;

/// Root of all ebpf-overlay pins below a bpffs mount.
pub const PIN_ROOT: &str = "ebpf-overlay";

#[derive(Clone, Debug)]
pub struct PinLayout {
    dir: PathBuf,
}

impl PinLayout {
    /// The pin directory of `instance` below the bpffs mounted at `bpffs`.
    pub fn new(bpffs: &Path, instance: &str) -> anyhow::Result<PinLayout> {
        if instance.is_empty()
            || !instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("instance name {instance:?} must be non-empty and only [A-Za-z0-9_-]");
        }
        let dir = bpffs
            .join(PIN_ROOT)
            .join(format!("v{MAP_LAYOUT_VERSION}"))
            .join(instance);
        Ok(PinLayout { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the TCX links of this instance are pinned (one per attached program).
    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    /// Pin of the TCX link attaching `program` to an interface, named by `key`: the interface
    /// name for the underlay NIC, `if<ifindex>` for container veths (so that a link can be
    /// unpinned after its veth is gone). bpffs refuses names containing '.', which interface
    /// names may have (VLANs: `eth0.100`).
    pub fn link(&self, program: &str, key: &str) -> PathBuf {
        self.links_dir()
            .join(format!("{program}@{}", key.replace('.', "%2e")))
    }

    pub fn create_dirs(&self) -> anyhow::Result<()> {
        for sub in ["maps", "links"] {
            let d = self.dir.join(sub);
            std::fs::create_dir_all(&d).with_context(|| {
                format!("creating pin directory {} (is bpffs mounted?)", d.display())
            })?;
        }
        Ok(())
    }

    /// Removes every pin of this instance: links first (detaching the programs), then maps.
    /// Also removes now-empty parent directories up to the bpffs root.
    pub fn remove_all(&self) -> anyhow::Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing pins under {}", self.dir.display()))?;
        // Tidy the version and root directories if this was the last instance.
        let mut parent = self.dir.parent();
        for _ in 0..2 {
            match parent {
                Some(p) if std::fs::remove_dir(p).is_ok() => parent = p.parent(),
                _ => break,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_paths_carry_layout_version_instance_program_and_key() {
        let p = PinLayout::new(Path::new("/sys/fs/bpf"), "lab-a1").unwrap();
        let v = MAP_LAYOUT_VERSION;
        assert_eq!(
            p.dir(),
            Path::new(&format!("/sys/fs/bpf/ebpf-overlay/v{v}/lab-a1"))
        );
        assert_eq!(p.map("OVL_ROUTES"), p.dir().join("maps/OVL_ROUTES"));
        assert_eq!(
            p.link("from_underlay", "eth0"),
            p.dir().join("links/from_underlay@eth0")
        );
        // bpffs rejects '.' in names.
        assert_eq!(
            p.link("from_underlay", "eth0.100"),
            p.dir().join("links/from_underlay@eth0%2e100")
        );
        assert!(PinLayout::new(Path::new("/sys/fs/bpf"), "../x").is_err());
        assert!(PinLayout::new(Path::new("/sys/fs/bpf"), "").is_err());
    }
}
