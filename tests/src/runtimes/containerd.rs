//! A containerd of the test's own (Debian's 1.6, private root, state and socket) and `ctr run
//! --cni`: ctr reads the first file of `/etc/cni/net.d` and plugins from `/opt/cni/bin`, so it
//! runs in a private mount namespace (inside the lab agent's network namespace) where a config
//! directory and the plugin directory are mounted there; the host's `/etc/cni` is never
//! touched. The image is an OCI layout of busybox-static written by hand (no registry).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;

pub const IMAGE: &str = "localhost/eo-busybox:latest";

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Moves `file` into the layout's blobs, returning its descriptor fields.
fn blob(layout: &Path, file: &Path) -> (String, u64) {
    let digest = sha256(file);
    let size = std::fs::metadata(file).unwrap().len();
    std::fs::rename(file, layout.join("blobs/sha256").join(&digest)).unwrap();
    (format!("sha256:{digest}"), size)
}

/// An OCI image layout (as a tar) holding one layer: busybox-static and the applets used.
pub fn busybox_oci_tar(root: &Path) -> PathBuf {
    let rootfs = super::busybox_rootfs(root);
    let layout = root.join("oci");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let layer = root.join("layer.tar");
    let ok = Command::new("tar")
        .args([
            "-C",
            rootfs.to_str().unwrap(),
            "-cf",
            layer.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar failed");
    let (layer_digest, layer_size) = blob(&layout, &layer);
    let config = root.join("config.json");
    std::fs::write(
        &config,
        json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        })
        .to_string(),
    )
    .unwrap();
    let (config_digest, config_size) = blob(&layout, &config);
    let manifest = root.join("manifest.json");
    std::fs::write(
        &manifest,
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
        })
        .to_string(),
    )
    .unwrap();
    let (manifest_digest, manifest_size) = blob(&layout, &manifest);
    std::fs::write(
        layout.join("index.json"),
        json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "latest"},
            }],
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tar = root.join("image.tar");
    let ok = Command::new("tar")
        .args([
            "-C",
            layout.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar failed");
    tar
}

/// A containerd of the test's own; killed and its directories removed on drop.
pub struct Containerd {
    pub dir: PathBuf,
    pub child: std::process::Child,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\naddress = \"{d}/containerd.sock\"\n\
                 [ttrpc]\naddress = \"{d}/containerd.sock.ttrpc\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\npath = \"{d}/opt\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd {
            dir: dir.to_owned(),
            child,
        };
        let start = Instant::now();
        while !c.ctr_cmd(&["version"]).output().unwrap().status.success() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "containerd did not start: {}",
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.args([
            "--address",
            self.dir.join("containerd.sock").to_str().unwrap(),
        ])
        .args(["--namespace", "eo-test"])
        .args(args);
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> String {
        let out = self.ctr_cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "ctr {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr run --rm --cni` in `netns` (the lab agent's), with a private mount namespace in
    /// which `/etc/cni/net.d` is `conf_dir` and `/opt/cni/bin` holds the plugin, running
    /// `script` in container `id`.
    pub fn cni_command(
        &self,
        netns: &Path,
        conf_dir: &Path,
        plugin_dir: &Path,
        id: &str,
        script: &str,
    ) -> Command {
        let address = self.dir.join("containerd.sock");
        let cache = self.dir.join("cni-cache");
        std::fs::create_dir_all(&cache).unwrap();
        let setup = format!(
            "set -e; mount --bind {conf} /etc/cni/net.d; \
             mount -t tmpfs eo-test /opt; mkdir -p /opt/cni/bin; mount --bind {plugins} /opt/cni/bin; \
             mount -t tmpfs eo-test /var/lib; mkdir -p /var/lib/cni; mount --bind {cache} /var/lib/cni; \
             exec ctr --address {address} --namespace eo-test run --rm --cni --snapshotter native {IMAGE} {id} /bin/sh -c \"$0\"",
            conf = conf_dir.display(),
            plugins = plugin_dir.display(),
            cache = cache.display(),
            address = address.display(),
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.display()))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &setup,
                script,
            ])
            .stdin(Stdio::null());
        cmd
    }

    /// [`Self::cni_command`] to its end. Returns ctr's exit status and the container's output.
    pub fn run_cni(
        &self,
        netns: &Path,
        conf_dir: &Path,
        plugin_dir: &Path,
        id: &str,
        script: &str,
    ) -> (bool, String) {
        let out = self
            .cni_command(netns, conf_dir, plugin_dir, id, script)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Runs `script` in running container `id` (`ctr task exec`); its output, or the error.
    pub fn exec(&self, id: &str, script: &str) -> anyhow::Result<String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
        let exec_id = format!(
            "x{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let out = self
            .ctr_cmd(&[
                "task",
                "exec",
                "--exec-id",
                &exec_id,
                id,
                "/bin/sh",
                "-c",
                script,
            ])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "ctr task exec {id}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until container `id` runs and returns its eth0 address.
    pub fn wait_ip(&self, id: &str) -> Ipv4Addr {
        let start = Instant::now();
        loop {
            if let Ok(out) = self.exec(id, "ip -4 -o addr show dev eth0")
                && let Some(ip) = super::inet_of(&out)
            {
                return ip;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "container {id} did not come up"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(tasks) = self.ctr_cmd(&["task", "ls", "-q"]).output() {
            for t in String::from_utf8_lossy(&tasks.stdout).lines() {
                let _ = self.ctr_cmd(&["task", "kill", "-s", "KILL", t]).output();
                std::thread::sleep(Duration::from_millis(200));
                let _ = self.ctr_cmd(&["task", "rm", "-f", t]).output();
            }
        }
        if let Ok(cs) = self.ctr_cmd(&["container", "ls", "-q"]).output() {
            for c in String::from_utf8_lossy(&cs.stdout).lines() {
                let _ = self.ctr_cmd(&["container", "rm", c]).output();
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // containerd's shim mounts rootfs under its state dir; none is left once tasks are gone.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
