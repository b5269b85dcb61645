//! `cargo xtask setup`: installs what is missing, skips what is present, says what it did.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Debian packages the project uses: the lab (iproute2, util-linux's nsenter, ping), inspecting
/// the datapath (bpftool), crafting test packets (hping3, netcat), benchmarks (iperf3).
const DEBIAN_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "iputils-ping",
    "util-linux",
    "iperf3",
    "hping3",
    "netcat-openbsd",
    "tcpdump",
    // counting the processes a CNI ADD starts (tests/tests/cluster.rs)
    "strace",
    // CNI plugin tests with a real runtime (tests/tests/cni_podman.rs)
    "podman",
    "crun",
    "busybox-static",
    // benchmarks (`cargo xtask bench`): latency, DC/OS's kernel datapath (CNI bridge +
    // host-local, iptables masquerade), the chart
    "sockperf",
    "containernetworking-plugins",
    "iptables",
    "python3-matplotlib",
    // several masters on etcd (tests/tests/etcd_*.rs)
    "etcd-server",
    "etcd-client",
    // the other runtimes DC/OS users run (tests/tests/{cni_containerd,docker_driver}.rs)
    "containerd",
    "runc",
    "docker.io",
    // the master on a full disk (tests/tests/master_disk_full.rs): mkfs.ext4 for a loop image
    "e2fsprogs",
    // the master's Networks page in a real browser (tests/tests/networks_page.rs)
    "chromium",
    "chromium-driver",
    // the VM lab (`cargo xtask vm`, tests/tests/vm.rs): guest root, initramfs, kernel modules.
    // QEMU itself is in VM_QEMU_PACKAGES.
    "mmdebstrap",
    "kmod",
    "cpio",
    "xz-utils",
];

/// QEMU for the VM lab, installed in one apt command of their own: bookworm's
/// qemu-system-x86 7.2 conflicts with a newer qemu-utils (this machine kind ships 10.x from
/// backports, which `Breaks: qemu-system-common (<< 8)`), so qemu-utils is named with it, from
/// bookworm, allowing the downgrade.
const VM_QEMU_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-utils/bookworm"];

const NIGHTLY: &str = "nightly";

pub fn run() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    check_root()?;
    debian_packages()?;
    qemu_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    bpffs()?;
    println!(
        "setup: everything present ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn check_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("ebpf-overlay needs root (CAP_BPF, CAP_NET_ADMIN, network namespaces): run as root");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .stderr(Stdio::null())
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("setup: Debian packages present");
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn qemu_packages() -> anyhow::Result<()> {
    if quiet(Command::new("qemu-system-x86_64").arg("--version")) {
        println!("setup: QEMU present");
        return Ok(());
    }
    println!("setup: installing QEMU: {}", VM_QEMU_PACKAGES.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "--allow-downgrades",
            ])
            .args(VM_QEMU_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())),
        _ => bail!(
            "the Rust nightly toolchain is missing; the eBPF programs need it. Install it with \
             `rustup toolchain install nightly --component rust-src`, then run `cargo xtask setup` again"
        ),
    }
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        println!("setup: nightly rust-src present");
        return Ok(());
    }
    println!("setup: adding rust-src to the nightly toolchain");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// The nightly toolchain's own libLLVM: bpf-linker must link against the same LLVM that emits
/// the bitcode it links, and no Debian package has that version.
fn nightly_libllvm(sysroot: &Path) -> anyhow::Result<PathBuf> {
    let lib = sysroot.join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("libLLVM.so.")
            || (name.starts_with("libLLVM-") && name.ends_with(".so"))
        {
            return Ok(path);
        }
    }
    bail!(
        "no libLLVM shared library in the nightly toolchain at {}",
        lib.display()
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    if quiet(Command::new("bpf-linker").arg("--version")) {
        println!("setup: bpf-linker present");
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let libllvm = nightly_libllvm(&sysroot)?;
    let major = libllvm
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .map(str::to_owned)
        .context("cannot tell the LLVM major version of the nightly toolchain")?;
    // A stable prefix: bpf-linker finds libLLVM through an rpath into it.
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = Path::new(&home).join(format!(".local/share/ebpf-overlay/llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in [
        "libLLVM.so".to_owned(),
        libllvm.file_name().unwrap().to_string_lossy().into_owned(),
    ] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    println!(
        "setup: building bpf-linker against {} (a few minutes)",
        libllvm.display()
    );
    run_cmd(
        Command::new("cargo")
            .args([
                "+stable",
                "install",
                "--locked",
                "bpf-linker",
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !quiet(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was built but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn bpffs() -> anyhow::Result<()> {
    // The lab mounts it the same way when it needs it; one implementation.
    overlay_lab::ensure_bpffs()?;
    println!("setup: bpffs mounted");
    Ok(())
}
