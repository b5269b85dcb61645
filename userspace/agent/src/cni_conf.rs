//! The CNI config files that point container runtimes at this agent, kept in step with the
//! networks this agent has a subnet on.
//!
//! Two kinds, in two directories, because the runtimes read them differently:
//! - `NN-<network>.conflist` in `--cni-conf-dir` for list-based runtimes (podman, containerd,
//!   CRI; CNI 1.0 dropped single-plugin files for them). `NN` is 10 plus the network's place in
//!   the master's list, so the order is the master's (DC/OS's `dcos` first: `ctr run --cni` takes
//!   the first file) and does not change when another network is disabled.
//! - `<network>.conf` in `--mesos-cni-conf-dir` for Mesos' `network/cni` isolator, which reads
//!   every regular file there as one single-plugin config (a `.conflist` is refused), without a
//!   `cniVersion` (as DC/OS generated them: the plugin then answers in the 0.2 shape Mesos
//!   parses).
//!
//! Only files carrying the agent's marker and socket are ever rewritten or removed; files are
//! written to a temporary in the parent directory and renamed into place, so a runtime never
//! reads a half-written (or a duplicate) config.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::{Value, json};

/// Marker in every CNI config file the agent writes.
pub const CNI_CONF_MARKER: &str = "overlay-agent";

/// The `cniVersion` of the lists.
pub const LIST_VERSION: &str = "1.0.0";

/// One network to write configs for: its place in the master's list and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfNetwork {
    pub order: usize,
    pub name: String,
}

pub struct CniConfs {
    /// `NN-<network>.conflist` files.
    pub dir: PathBuf,
    /// Mesos-style `<network>.conf` files, if wanted.
    pub mesos_dir: Option<PathBuf>,
    pub agent_socket: PathBuf,
    pub mtu: u32,
    /// The pair the plugin creates; written only for netkit (the plugin's default is veth).
    pub container_device: crate::container_device::ContainerDevice,
}

impl CniConfs {
    /// The plugin's own fields (documented in the `overlay-cni` crate).
    fn plugin(&self, network: &str) -> serde_json::Map<String, Value> {
        let v = json!({
            "type": "ebpf-overlay",
            "network": network,
            "agent_socket": self.agent_socket,
            "mtu": self.mtu,
            "half": "cni",
        });
        match v {
            Value::Object(mut m) => {
                if self.container_device != crate::container_device::ContainerDevice::Veth {
                    m.insert(
                        "container_device".into(),
                        json!(self.container_device.as_str()),
                    );
                }
                m
            }
            _ => unreachable!("an object literal"),
        }
    }

    /// The list for one network.
    pub fn render_list(&self, network: &str) -> String {
        let mut plugin = self.plugin(network);
        // podman's --ip and CRI's static addresses arrive as runtimeConfig.ips.
        plugin.insert("capabilities".into(), json!({"ips": true}));
        pretty(&json!({
            "cniVersion": LIST_VERSION,
            "name": network,
            "plugins": [plugin],
            "generated_by": CNI_CONF_MARKER,
        }))
    }

    /// Mesos' single-plugin config for one network: no `cniVersion`.
    pub fn render_mesos(&self, network: &str) -> String {
        let mut v = serde_json::Map::new();
        v.insert("name".into(), json!(network));
        v.extend(self.plugin(network));
        v.insert("generated_by".into(), json!(CNI_CONF_MARKER));
        pretty(&Value::Object(v))
    }

    pub fn list_file_name(n: &ConfNetwork) -> String {
        format!("{:02}-{}.conflist", (10 + n.order).min(99), n.name)
    }

    /// Writes the files of `networks` whose content changed and removes the agent's files of
    /// networks no longer there (and of earlier layouts). Returns the files changed.
    pub fn sync(&self, networks: &[ConfNetwork]) -> anyhow::Result<usize> {
        let lists: Vec<(String, String)> = networks
            .iter()
            .map(|n| (Self::list_file_name(n), self.render_list(&n.name)))
            .collect();
        let mut changed = self.sync_dir(&self.dir, &lists)?;
        if let Some(dir) = &self.mesos_dir {
            let confs: Vec<(String, String)> = networks
                .iter()
                .map(|n| (format!("{}.conf", n.name), self.render_mesos(&n.name)))
                .collect();
            changed += self.sync_dir(dir, &confs)?;
        }
        Ok(changed)
    }

    fn sync_dir(&self, dir: &Path, files: &[(String, String)]) -> anyhow::Result<usize> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut changed = 0;
        for (name, content) in files {
            let path = dir.join(name);
            if std::fs::read_to_string(&path).ok().as_deref() == Some(content.as_str()) {
                continue;
            }
            write_atomically(&path, content)?;
            tracing::info!(path = %path.display(), "CNI config written");
            changed += 1;
        }
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if files.iter().any(|(f, _)| f == name) || !self.is_ours(&path) {
                continue;
            }
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            tracing::info!(path = %path.display(), "stale CNI config removed");
            changed += 1;
        }
        Ok(changed)
    }

    /// A file this agent wrote (any layout): the marker and this agent's socket.
    fn is_ours(&self, path: &Path) -> bool {
        let Some(v) = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        else {
            return false;
        };
        let socket = json!(self.agent_socket);
        v["generated_by"] == CNI_CONF_MARKER
            && (v["agent_socket"] == socket || v["plugins"][0]["agent_socket"] == socket)
    }
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("plain JSON");
    s.push('\n');
    s
}

/// Temporary in the parent directory (runtimes read every file of theirs), then rename.
fn write_atomically(path: &Path, content: &str) -> anyhow::Result<()> {
    let dir = path.parent().context("a config file has a directory")?;
    let tmp_dir = dir.parent().unwrap_or(dir);
    let tmp = tmp_dir.join(format!(
        ".{}.{}.tmp",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("cni"),
        path.file_name().and_then(|n| n.to_str()).unwrap_or("conf"),
    ));
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming into {}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cniconf-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn nets(names: &[(usize, &str)]) -> Vec<ConfNetwork> {
        names
            .iter()
            .map(|(order, name)| ConfNetwork {
                order: *order,
                name: (*name).into(),
            })
            .collect()
    }

    fn read(path: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn lists_and_mesos_files_follow_the_networks() {
        let root = tmp_dir("sync");
        let (dir, mesos) = (root.join("net.d"), root.join("mesos"));
        let confs = CniConfs {
            dir: dir.clone(),
            mesos_dir: Some(mesos.clone()),
            agent_socket: "/run/x.sock".into(),
            mtu: 1400,
            container_device: Default::default(),
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("other.conf"), "{\"type\":\"bridge\"}").unwrap();
        // An earlier agent's single-plugin file in the list directory.
        std::fs::write(
            dir.join("dcos.conf"),
            r#"{"cniVersion":"1.0.0","name":"dcos","type":"ebpf-overlay","agent_socket":"/run/x.sock","generated_by":"overlay-agent"}"#,
        )
        .unwrap();
        // Another agent's file (another socket) is not ours either.
        std::fs::write(
            dir.join("10-red.conflist"),
            r#"{"name":"red","plugins":[{"agent_socket":"/run/y.sock"}],"generated_by":"overlay-agent"}"#,
        )
        .unwrap();
        let two = nets(&[(0, "dcos"), (1, "blue")]);
        assert_eq!(
            confs.sync(&two).unwrap(),
            5,
            "2 lists, 2 Mesos files, 1 stale"
        );
        assert_eq!(confs.sync(&two).unwrap(), 0);
        assert_eq!(
            names(&dir),
            [
                "10-dcos.conflist",
                "10-red.conflist",
                "11-blue.conflist",
                "other.conf"
            ]
        );
        assert_eq!(names(&mesos), ["blue.conf", "dcos.conf"]);
        assert_eq!(names(&root), ["mesos", "net.d"], "no temporaries left");
        let list = read(&dir.join("10-dcos.conflist"));
        assert_eq!(list["cniVersion"], "1.0.0");
        assert_eq!(list["name"], "dcos");
        let p = &list["plugins"][0];
        assert_eq!(
            (&p["type"], &p["network"], &p["mtu"], &p["half"]),
            (
                &json!("ebpf-overlay"),
                &json!("dcos"),
                &json!(1400),
                &json!("cni")
            )
        );
        assert_eq!(p["capabilities"]["ips"], true);
        let m = read(&mesos.join("blue.conf"));
        assert!(
            m.get("cniVersion").is_none(),
            "Mesos files carry no version: {m}"
        );
        assert_eq!(
            (&m["name"], &m["type"]),
            (&json!("blue"), &json!("ebpf-overlay"))
        );
        assert_eq!(m["agent_socket"], "/run/x.sock");
        // blue goes (its place stays taken: dcos keeps its name).
        assert_eq!(confs.sync(&nets(&[(0, "dcos")])).unwrap(), 2);
        assert_eq!(
            names(&dir),
            ["10-dcos.conflist", "10-red.conflist", "other.conf"]
        );
        assert_eq!(names(&mesos), ["dcos.conf"]);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_prefix_orders_files_as_the_master_lists_networks() {
        let n = |order, name: &str| ConfNetwork {
            order,
            name: name.into(),
        };
        assert_eq!(CniConfs::list_file_name(&n(0, "dcos")), "10-dcos.conflist");
        assert_eq!(CniConfs::list_file_name(&n(1, "blue")), "11-blue.conflist");
        assert!(CniConfs::list_file_name(&n(0, "zz")) < CniConfs::list_file_name(&n(1, "aa")));
        assert_eq!(CniConfs::list_file_name(&n(200, "x")), "99-x.conflist");
    }
}
