//! The VM lab: QEMU VMs booting a Debian kernel and a systemd root with the project's package
//! installed, joined by virtio-net NICs on taps on a bridge inside a network namespace the lab
//! creates (QEMU runs in that namespace; nothing is added to the root namespace). The master
//! runs in that namespace, on the bridge. Each VM is driven through a shell on a virtio serial
//! port. Everything (QEMU processes, the master, the namespace, the disk overlays) goes on drop.

pub mod image;

pub use image::GuestKernel;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::run;

/// The bridge's (and the master's) address inside the lab namespace; VM n is `.10+n`.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
pub const MASTER_PORT: u16 = 5055;
/// Where running VM labs are recorded (for `cargo xtask vm down --id`).
pub const STATE_DIR: &str = "/run/ebpf-overlay-vmlab";

pub fn vm_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 251, 0, 10 + n as u8)
}

/// How QEMU executes the guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM only where the CPU has hardware virtualisation: on this machine kind /dev/kvm is
    /// PVM, which stock kernels cannot run on (they die with an emulation failure).
    /// `OVERLAY_VM_ACCEL=kvm|tcg` overrides.
    pub fn detect() -> (Accel, String) {
        match std::env::var("OVERLAY_VM_ACCEL").as_deref() {
            Ok("kvm") => return (Accel::Kvm, "KVM (forced by OVERLAY_VM_ACCEL)".into()),
            Ok("tcg") => return (Accel::Tcg, "TCG (forced by OVERLAY_VM_ACCEL)".into()),
            _ => {}
        }
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpu
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        match (dev, hw) {
            (true, true) => (
                Accel::Kvm,
                "KVM (/dev/kvm and hardware virtualisation)".into(),
            ),
            (true, false) => (
                Accel::Tcg,
                "TCG software emulation (/dev/kvm exists but the CPU has no vmx/svm: \
                 paravirtual KVM that stock kernels cannot run on)"
                    .into(),
            ),
            (false, _) => (
                Accel::Tcg,
                "TCG software emulation (no usable /dev/kvm)".into(),
            ),
        }
    }

    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmLabSpec {
    pub vms: usize,
    /// Packages installed into the image before boot (the project's `.deb`).
    pub debs: Vec<PathBuf>,
    /// Directory with `overlay-master` (the master runs in the lab namespace).
    pub bin_dir: PathBuf,
    /// The master's configuration (YAML).
    pub master_config: String,
    pub mem_mib: u32,
    /// Extra files made available read-only to every guest at /mnt/extra (a second disk),
    /// e.g. a newer package for the upgrade test.
    pub extra_files: Vec<PathBuf>,
    /// The guests' kernel (the tests boot the default).
    pub kernel: GuestKernel,
}

/// One running VM and its command channel.
pub struct Vm {
    pub name: String,
    pub ip: Ipv4Addr,
    qemu: Child,
    ctl: Mutex<UnixStream>,
    lines: Mutex<mpsc::Receiver<String>>,
    pub console_log: PathBuf,
    seq: Mutex<u64>,
}

/// Output of one guest command.
#[derive(Debug)]
pub struct Output {
    pub status: i32,
    pub text: String,
}

impl Vm {
    /// Runs `cmd` with `sh` in the guest (stdin /dev/null, stderr into the output) and returns
    /// its exit status and output.
    pub fn sh(&self, cmd: &str, timeout: Duration) -> anyhow::Result<Output> {
        let n = {
            let mut s = self.seq.lock().unwrap();
            *s += 1;
            *s
        };
        let marker = format!("__VMLAB_END_{n}__");
        let line = format!("{{ {cmd}\n}} </dev/null 2>&1; s=$?; echo; echo {marker} $s\n");
        self.ctl
            .lock()
            .unwrap()
            .write_all(line.as_bytes())
            .with_context(|| format!("{}: sending `{cmd}` (guest shell not reading)", self.name))?;
        let lines = self.lines.lock().unwrap();
        let deadline = Instant::now() + timeout;
        let mut text = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.trim_end().strip_prefix(&marker) {
                        let status = rest.trim().parse().unwrap_or(-1);
                        // The `echo` before the marker ends a last line without newline.
                        if text.ends_with("\n\n") || text == "\n" {
                            text.pop();
                        }
                        return Ok(Output { status, text });
                    }
                    text.push_str(&l);
                    text.push('\n');
                }
                Err(_) => bail!(
                    "{}: `{cmd}` did not finish within {timeout:?}; output so far:\n{text}",
                    self.name
                ),
            }
        }
    }

    /// Like [`Vm::sh`], failing unless the command exits 0; returns its output.
    pub fn ok(&self, cmd: &str) -> anyhow::Result<String> {
        let out = self.sh(cmd, Duration::from_secs(60))?;
        if out.status != 0 {
            bail!(
                "{}: `{cmd}` exited {}:\n{}",
                self.name,
                out.status,
                out.text
            );
        }
        Ok(out.text)
    }

    /// Waits until the guest's command shell answers (after boot or reboot).
    pub fn wait_shell(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        // Drain what an earlier boot left.
        while self.lines.lock().unwrap().try_recv().is_ok() {}
        let mut k = 0;
        loop {
            k += 1;
            let probe = format!("__VMLAB_READY_{k}__");
            let _ = self
                .ctl
                .lock()
                .unwrap()
                .write_all(format!("echo {probe}\n").as_bytes());
            let wait_until = Instant::now() + Duration::from_secs(2);
            let lines = self.lines.lock().unwrap();
            while let Ok(l) =
                lines.recv_timeout(wait_until.saturating_duration_since(Instant::now()))
            {
                if l.trim() == probe {
                    return Ok(start.elapsed());
                }
            }
            drop(lines);
            if start.elapsed() > timeout {
                bail!(
                    "{}: no shell on the command channel within {timeout:?}; console:\n{}",
                    self.name,
                    tail(&self.console_log, 40)
                );
            }
        }
    }

    /// Reboots the guest (`systemctl reboot`) and waits until the new boot's shell answers;
    /// returns the time from the request to that shell.
    pub fn reboot(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let boot_id = |vm: &Vm| -> Option<String> {
            vm.sh(
                "cat /proc/sys/kernel/random/boot_id",
                Duration::from_secs(5),
            )
            .ok()
            .filter(|o| o.status == 0)
            .map(|o| o.text.trim().to_owned())
        };
        let before = boot_id(self).context("reading the boot id")?;
        let start = Instant::now();
        // The shell dies with the system; its answer may never come.
        let line = "systemctl reboot </dev/null >/dev/null 2>&1\n";
        self.ctl.lock().unwrap().write_all(line.as_bytes())?;
        loop {
            // The old shell may still answer while the system shuts down.
            let left = timeout.saturating_sub(start.elapsed());
            self.wait_shell(left)?;
            if boot_id(self).is_some_and(|id| id != before) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{}: still the same boot {timeout:?} after the reboot request",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Waits until `cmd` succeeds in the guest.
    pub fn wait_for(&self, cmd: &str, timeout: Duration) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            let out = self.sh(cmd, timeout)?;
            if out.status == 0 {
                return Ok(out.text);
            }
            if start.elapsed() > timeout {
                bail!(
                    "{}: `{cmd}` still failing after {timeout:?}:\n{}",
                    self.name,
                    out.text
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Vm {
    /// Edits the agent's environment file with the shell command `edit` (as an operator would;
    /// empty: none) and restarts the agent, waiting until a new process is active. The error
    /// carries the agent's last journal lines.
    pub fn restart_agent(&self, edit: &str, timeout: Duration) -> anyhow::Result<()> {
        let pid = self.ok("systemctl show -P MainPID overlay-agent")?;
        let edit = if edit.is_empty() {
            String::new()
        } else {
            format!("{edit} && ")
        };
        // --no-block: a Type=notify start under emulation outlasts one shell command's timeout.
        self.ok(&format!("{edit}systemctl restart --no-block overlay-agent"))?;
        self.wait_for(
            &format!(
                "systemctl is-active overlay-agent && [ \"$(systemctl show -P MainPID overlay-agent)\" != \"{}\" ]",
                pid.trim()
            ),
            timeout,
        )
        .map(drop)
        .map_err(|e| {
            let log = self.agent_journal();
            e.context(format!("{}: agent restart; its journal:\n{log}", self.name))
        })
    }

    /// The agent unit's status and last 30 journal lines, for failure messages (empty if the
    /// guest does not answer).
    pub fn agent_journal(&self) -> String {
        self.sh(
            "systemctl status overlay-agent --no-pager; journalctl -b -u overlay-agent --no-pager | tail -30",
            Duration::from_secs(30),
        )
        .map(|o| o.text)
        .unwrap_or_default()
    }

    /// How many netkit devices the guest has.
    pub fn netkit_devices(&self) -> anyhow::Result<usize> {
        let links: serde_json::Value = serde_json::from_str(self.ok("ip -j -d link show")?.trim())
            .with_context(|| format!("{}: `ip -j -d link show` is not JSON", self.name))?;
        Ok(links.as_array().map_or(0, |l| {
            l.iter()
                .filter(|l| l["linkinfo"]["info_kind"] == "netkit")
                .count()
        }))
    }

    /// Adds a container (network namespace `name`) on `network` with the CNI plugin, as a
    /// runtime would: the agent's conflist for the network, turned into the plugin's config as
    /// libcni does (the list's cniVersion and name added to its one plugin). Returns its address.
    pub fn add_cni_container(&self, name: &str, network: &str) -> anyhow::Result<Ipv4Addr> {
        let text = self.ok(&format!("cat /etc/cni/net.d/*-{network}.conflist"))?;
        let list: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("{}: the agent's {network} conflist", self.name))?;
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        let conf = conf.to_string();
        if conf.contains('\'') {
            bail!("config must fit in single quotes: {conf}");
        }
        let out = self.ok(&format!(
            "ip netns add {name} && printf '%s' '{conf}' | CNI_COMMAND=ADD CNI_CONTAINERID={name} \
             CNI_NETNS=/run/netns/{name} CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin \
             /opt/cni/bin/ebpf-overlay"
        ))?;
        let result: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("{}: CNI ADD answer is not JSON: {out}", self.name))?;
        let addr = result["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("no address in {result}"))?;
        addr.split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("address {addr}"))
    }
}

/// The last `n` lines of a file (console logs in error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub struct VmLab {
    pub id: String,
    pub netns: String,
    pub work: PathBuf,
    pub accel: Accel,
    pub accel_reason: String,
    pub vms: Vec<Vm>,
    master: Option<Child>,
    /// Seconds: image (cached or built), per-run root image, boot to shell.
    pub image_secs: f64,
    pub root_image_secs: f64,
    pub boot_secs: f64,
    keep: bool,
}

fn random_id() -> String {
    let mut b = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("vm{:02x}{:02x}{:02x}", b[0], b[1], b[2])
}

/// Runs `overlay-master ARGS` (its offline CA commands) and returns what it printed.
fn master_command(bin_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let bin = bin_dir.join("overlay-master");
    let out = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "overlay-master {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl VmLab {
    pub fn up(spec: VmLabSpec) -> anyhow::Result<VmLab> {
        let (accel, accel_reason) = Accel::detect();
        let id = random_id();
        let work = std::env::temp_dir().join(format!("ebpf-overlay-{id}"));
        std::fs::create_dir_all(&work)?;
        let mut lab = VmLab {
            netns: format!("{id}-net"),
            id,
            work,
            accel,
            accel_reason,
            vms: vec![],
            master: None,
            image_secs: 0.0,
            root_image_secs: 0.0,
            boot_secs: 0.0,
            keep: false,
        };
        // On any failure below, dropping `lab` tears down what was made so far.
        lab.record()?;
        let t = Instant::now();
        let base = image::ensure_base(spec.kernel)?;
        lab.image_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let root = lab.work.join("root.img");
        // The cluster CA, made before the image: the agents verify the master by the CA's hash
        // and join with a single-use token of their own (given on their kernel command line).
        let ca_init = master_command(
            &spec.bin_dir,
            &["ca", "init", "--dir", lab.tls_dir().to_str().unwrap()],
        )?;
        let ca_hash = ca_init
            .lines()
            .find_map(|l| l.strip_prefix("ca-cert-hash: "))
            .context("`overlay-master ca init` printed no ca-cert-hash")?
            .trim()
            .to_owned();
        let agent_env = format!(
            "# written by the VM lab\nOVERLAY_MASTER=https://{BRIDGE_IP}:{MASTER_PORT}\n\
             OVERLAY_CA_CERT_HASH={ca_hash}\n\
             OVERLAY_UNDERLAY_IFACE=eth0\nOVERLAY_AGENT_ARGS=\n"
        );
        image::make_root_image(
            &base,
            &lab.work,
            &spec.debs,
            &[("/etc/ebpf-overlay/agent.env", agent_env)],
            &root,
        )?;
        let extra = if spec.extra_files.is_empty() {
            None
        } else {
            let dir = lab.work.join("extra");
            std::fs::create_dir_all(&dir)?;
            for f in &spec.extra_files {
                std::fs::copy(f, dir.join(f.file_name().unwrap()))?;
            }
            let img = lab.work.join("extra.img");
            run(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-d",
                    dir.to_str().unwrap(),
                    img.to_str().unwrap(),
                    "256M",
                ],
            )?;
            Some(img)
        };
        lab.root_image_secs = t.elapsed().as_secs_f64();
        lab.network(spec.vms)?;
        lab.start_master(&spec)?;
        let t = Instant::now();
        for n in 1..=spec.vms {
            let ip = vm_ip(n).to_string();
            let token = master_command(
                &spec.bin_dir,
                &[
                    "token",
                    "create",
                    "--dir",
                    lab.tls_dir().to_str().unwrap(),
                    "--ttl",
                    "1h",
                    "--ip",
                    &ip,
                ],
            )?
            .trim()
            .to_owned();
            let vm = lab.start_vm(n, &base, &root, extra.as_deref(), spec.mem_mib, &token)?;
            lab.vms.push(vm);
        }
        for vm in &lab.vms {
            vm.wait_shell(Duration::from_secs(240))?;
        }
        lab.boot_secs = t.elapsed().as_secs_f64();
        Ok(lab)
    }

    fn record(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(STATE_DIR)?;
        let rec = serde_json::json!({
            "id": self.id, "netns": self.netns, "work": self.work,
            "pids": self.pids(),
        });
        std::fs::write(
            Path::new(STATE_DIR).join(format!("{}.json", self.id)),
            rec.to_string(),
        )?;
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        self.vms
            .iter()
            .map(|v| v.qemu.id())
            .chain(self.master.as_ref().map(|m| m.id()))
            .collect()
    }

    fn ns(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.netns.as_str()];
        full.extend(args);
        run("ip", &full)
    }

    /// The namespace, its bridge (the master's address) and one tap per VM.
    fn network(&self, vms: usize) -> anyhow::Result<()> {
        run("ip", &["netns", "add", &self.netns])?;
        self.ns(&["link", "set", "lo", "up"])?;
        self.ns(&["link", "add", "br0", "type", "bridge"])?;
        self.ns(&["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", "br0"])?;
        self.ns(&["link", "set", "br0", "up"])?;
        for n in 1..=vms {
            let tap = format!("tap{n}");
            self.ns(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
            self.ns(&["link", "set", &tap, "master", "br0", "up"])?;
        }
        Ok(())
    }

    /// Starts the master in the lab namespace, listening on the bridge. (The one place that
    /// knows how the lab's master is started: TLS or other flags go here.)
    pub fn start_master(&mut self, spec: &VmLabSpec) -> anyhow::Result<()> {
        let config = self.work.join("master.yaml");
        std::fs::write(&config, &spec.master_config)?;
        let log = std::fs::File::create(self.work.join("master.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(spec.bin_dir.join("overlay-master"))
            .arg("--config")
            .arg(&config)
            .args([
                "--listen",
                &format!("{BRIDGE_IP}:{MASTER_PORT}"),
                "--data-dir",
            ])
            .arg(self.work.join("master-data"))
            // TLS with the CA made in `up`; reads open so `overlayctl state` in a guest needs
            // only the CA (changes still need the admin token).
            .arg("--tls-dir")
            .arg(self.tls_dir())
            .arg("--anonymous-read")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting overlay-master in the lab namespace")?;
        self.master = Some(child);
        self.record()?;
        Ok(())
    }

    /// The master's URL as the VMs reach it.
    pub fn master_url(&self) -> String {
        format!("https://{BRIDGE_IP}:{MASTER_PORT}")
    }

    /// The cluster CA's directory (on the host).
    pub fn tls_dir(&self) -> PathBuf {
        self.work.join("tls")
    }

    /// Where a guest's agent keeps the CA it verified the master with.
    pub const GUEST_CA: &str = "/var/lib/ebpf-overlay/default/ca.crt";

    fn start_vm(
        &mut self,
        n: usize,
        base: &image::BaseImage,
        root: &Path,
        extra: Option<&Path>,
        mem_mib: u32,
        join_token: &str,
    ) -> anyhow::Result<Vm> {
        let name = format!("vm{n}");
        let disk = self.work.join(format!("{name}.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                root.to_str().unwrap(),
                disk.to_str().unwrap(),
            ],
        )?;
        let ctl_path = self.work.join(format!("{name}.ctl"));
        let console_log = self.work.join(format!("{name}.console.log"));
        let machine_id = format!(
            "{:032x}",
            (0x5eed_0000u128 << 64) | n as u128 | ((std::process::id() as u128) << 32)
        );
        let cmdline = format!(
            "console=ttyS0 root=/dev/vda rw net.ifnames=0 systemd.machine_id={machine_id} \
             systemd.hostname={name} vmlab.ip={}/24 systemd.show_status=false loglevel=4 \
             systemd.setenv=OVERLAY_JOIN_TOKEN={join_token}",
            vm_ip(n)
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg("qemu-system-x86_64")
            .args(self.accel.qemu_args())
            .args(["-smp", "1", "-m", &mem_mib.to_string()])
            .args(["-nodefaults", "-display", "none", "-no-user-config"])
            .arg("-kernel")
            .arg(&base.kernel)
            .arg("-initrd")
            .arg(&base.initrd)
            .args(["-append", &cmdline])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2,cache=unsafe",
                disk.display()
            ))
            .args([
                "-netdev",
                &format!("tap,id=net0,ifname=tap{n},script=no,downscript=no"),
                "-device",
                &format!("virtio-net-pci,netdev=net0,mac=52:54:00:51:00:{n:02x}"),
            ])
            .args(["-serial", &format!("file:{}", console_log.display())])
            .args([
                "-chardev",
                &format!(
                    "socket,id=ctl,path={},server=on,wait=off",
                    ctl_path.display()
                ),
                "-device",
                "virtio-serial-pci",
                "-device",
                "virtserialport,chardev=ctl,name=vmlab.ctl",
            ])
            .args(["-device", "virtio-rng-pci"]);
        if let Some(extra) = extra {
            cmd.arg("-drive").arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                extra.display()
            ));
        }
        let qemu_log = std::fs::File::create(self.work.join(format!("{name}.qemu.log")))?;
        let mut qemu = cmd
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone()?)
            .stderr(qemu_log)
            .spawn()
            .context("starting qemu-system-x86_64 (cargo xtask setup installs it)")?;
        let start = Instant::now();
        let ctl = loop {
            match UnixStream::connect(&ctl_path) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(20) => {
                    if let Ok(Some(st)) = qemu.try_wait() {
                        bail!(
                            "qemu for {name} exited ({st}): {}",
                            tail(&self.work.join(format!("{name}.qemu.log")), 20)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => {
                    let _ = qemu.kill();
                    let _ = qemu.wait();
                    return Err(e).context("connecting to the VM's command channel");
                }
            }
        };
        // QEMU stops reading the socket while the guest has the port closed (booting,
        // rebooting): a write must not block forever then.
        ctl.set_write_timeout(Some(Duration::from_secs(2)))?;
        let (tx, rx) = mpsc::channel();
        let reader = ctl.try_clone()?;
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let vm = Vm {
            name,
            ip: vm_ip(n),
            qemu,
            ctl: Mutex::new(ctl),
            lines: Mutex::new(rx),
            console_log,
            seq: Mutex::new(0),
        };
        self.vms.push(vm);
        self.record()?;
        Ok(self.vms.pop().unwrap())
    }

    pub fn vm(&self, name: &str) -> &Vm {
        self.vms
            .iter()
            .find(|v| v.name == name)
            .expect("no such VM")
    }

    /// Leaves everything running (for `cargo xtask vm up`); `vm down --id` removes it.
    pub fn keep(mut self) -> String {
        self.keep = true;
        self.id.clone()
    }

    /// Removes a lab recorded by an earlier `keep` or a crashed run.
    pub fn down_recorded(id: &str) -> anyhow::Result<()> {
        let path = Path::new(STATE_DIR).join(format!("{id}.json"));
        let rec: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path).with_context(|| format!("no VM lab {id}"))?,
        )?;
        for pid in rec["pids"].as_array().into_iter().flatten() {
            if let Some(pid) = pid.as_u64() {
                crate::signal(pid as u32, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        if let Some(ns) = rec["netns"].as_str() {
            let _ = run("ip", &["netns", "del", ns]);
        }
        if let Some(work) = rec["work"].as_str() {
            let _ = std::fs::remove_dir_all(work);
        }
        std::fs::remove_file(&path)?;
        Ok(())
    }

    /// Ids of recorded VM labs.
    pub fn recorded() -> Vec<String> {
        std::fs::read_dir(STATE_DIR)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".json").map(str::to_owned)
            })
            .collect()
    }
}

impl Drop for VmLab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for vm in &mut self.vms {
            let _ = vm.qemu.kill();
            let _ = vm.qemu.wait();
        }
        if let Some(m) = &mut self.master {
            crate::signal(m.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = m.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = m.kill();
            let _ = m.wait();
        }
        let _ = run("ip", &["netns", "del", &self.netns]);
        // A failed root-image step may have left the overlay mounted.
        let merged = self.work.join("merged");
        if merged.exists() {
            let _ = run("umount", &["-l", merged.to_str().unwrap()]);
        }
        if std::env::var_os("OVERLAY_VM_KEEP_LOGS").is_some() {
            for entry in std::fs::read_dir(&self.work)
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = entry.path();
                if !p.to_string_lossy().ends_with(".log") {
                    let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
        let _ = std::fs::remove_file(Path::new(STATE_DIR).join(format!("{}.json", self.id)));
    }
}
