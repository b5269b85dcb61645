//! `cargo xtask package`: the Debian package, laid out here and built with `dpkg-deb --build`.
//!
//! Not cargo-deb: it would have to be built from crates.io first (minutes on this machine) to
//! do what fifty lines do here, and the tree is easier to read as code than as Cargo metadata.
//! Man pages are generated from the binaries' own clap `--help` (so they cannot drift from the
//! flags); the CNI plugin, which has no flags, has a written one.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cargo, workspace_root};

pub const PACKAGE: &str = "ebpf-overlay";

#[derive(clap::Args, Debug, Clone)]
pub struct PackageArgs {
    /// Package the debug build (what `cargo xtask test` already built) instead of a release
    /// build; binaries are stripped either way.
    #[arg(long)]
    pub debug: bool,
    /// Package version (default: the workspace's); the VM lab's upgrade test builds a newer one.
    #[arg(long)]
    pub version: Option<String>,
    /// Output directory (default: target/package).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Package the binaries already in this directory instead of building (tests use the
    /// binaries `cargo xtask test` built).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

/// (cargo package, binary, install directory, man section)
const BINARIES: &[(&str, &str, &str, &str)] = &[
    ("overlay-agent", "overlay-agent", "usr/bin", "8"),
    ("overlay-master", "overlay-master", "usr/bin", "8"),
    ("overlayctl", "overlayctl", "usr/bin", "1"),
    ("overlay-cni", "ebpf-overlay", "opt/cni/bin", ""),
];

const CONFFILES: &[(&str, &str)] = &[
    ("packaging/config/agent.env", "etc/ebpf-overlay/agent.env"),
    ("packaging/config/master.env", "etc/ebpf-overlay/master.env"),
    (
        "packaging/config/master.yaml",
        "etc/ebpf-overlay/master.yaml",
    ),
];

const UNITS: &[&str] = &["overlay-agent.service", "overlay-master.service"];

/// Builds the package; returns the path of the `.deb`.
pub fn run(args: &PackageArgs) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => {
            let mut build = vec!["build", "--bins"];
            for (pkg, ..) in BINARIES {
                build.extend(["-p", pkg]);
            }
            if !args.debug {
                build.push("--release");
            }
            cargo(&build)?;
            root.join("target")
                .join(if args.debug { "debug" } else { "release" })
        }
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/package"));
    let tree = out.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree)?;
    let version = args
        .version
        .clone()
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());

    for (_, bin, dir, _) in BINARIES {
        let dest = tree.join(dir).join(bin);
        std::fs::create_dir_all(dest.parent().unwrap())?;
        run_tool(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&dest)
                .arg(bin_dir.join(bin)),
        )?;
    }
    for unit in UNITS {
        install(
            &root.join("packaging/systemd").join(unit),
            &tree.join("lib/systemd/system").join(unit),
            0o644,
        )?;
    }
    for (src, dest) in CONFFILES {
        install(&root.join(src), &tree.join(dest), 0o644)?;
    }
    // The agent writes its CNI configs here (the unit makes it writable).
    std::fs::create_dir_all(tree.join("etc/cni/net.d"))?;
    for (_, bin, _, section) in BINARIES {
        let page = if section.is_empty() {
            std::fs::read_to_string(root.join("packaging/debian").join(format!("{bin}.8")))?
        } else if *bin == "overlayctl" {
            ctl_output(&bin_dir, &["man"])?
        } else {
            man_page_from_help(&bin_dir.join(bin), bin, section)?
        };
        let section = if section.is_empty() { "8" } else { section };
        let dest = tree.join(format!("usr/share/man/man{section}/{bin}.{section}.gz"));
        std::fs::create_dir_all(dest.parent().unwrap())?;
        gzip(page.as_bytes(), &dest)?;
    }
    // overlayctl's completions, generated from its clap definition like its man page.
    for (shell, dest) in [
        ("bash", "usr/share/bash-completion/completions/overlayctl"),
        ("zsh", "usr/share/zsh/vendor-completions/_overlayctl"),
        (
            "fish",
            "usr/share/fish/vendor_completions.d/overlayctl.fish",
        ),
    ] {
        let dest = tree.join(dest);
        std::fs::create_dir_all(dest.parent().unwrap())?;
        std::fs::write(&dest, ctl_output(&bin_dir, &["completions", shell])?)?;
    }
    install(
        &root.join("packaging/debian/copyright"),
        &tree.join("usr/share/doc").join(PACKAGE).join("copyright"),
        0o644,
    )?;

    let debian = tree.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &root.join("packaging/debian").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    let conffiles: String = CONFFILES.iter().map(|(_, d)| format!("/{d}\n")).collect();
    std::fs::write(debian.join("conffiles"), conffiles)?;
    std::fs::write(
        debian.join("control"),
        control(&version, installed_size_kib(&tree)?),
    )?;

    let deb = out.join(format!("{PACKAGE}_{version}_amd64.deb"));
    run_tool(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "-z1", "--build"])
            .arg(&tree)
            .arg(&deb),
    )?;
    println!("package: {}", deb.display());
    Ok(deb)
}

fn control(version: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: ebpf-overlay developers <ebpf-overlay@localhost>\n\
         Section: net\n\
         Priority: optional\n\
         Installed-Size: {installed_kib}\n\
         Depends: libc6 (>= 2.36), iproute2, util-linux\n\
         Recommends: bpftool\n\
         Description: container overlay network with an eBPF datapath (DC/OS compatible)\n \
         DC/OS's container overlay network (a VTEP and subnet per agent, VXLAN between agents,\n \
         masquerade) rebuilt on TC/TCX eBPF programs: no bridge, no VXLAN device, no\n \
         iptables. Contains the agent, the master, overlayctl and the CNI plugin.\n"
    )
}

/// Standard output of `overlayctl ARGS` (its generated man page, completions).
fn ctl_output(bin_dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin_dir.join("overlayctl"))
        .args(args)
        .output()
        .with_context(|| format!("running overlayctl {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("overlayctl {} failed", args.join(" "));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A man page whose body is the binary's clap help (and every subcommand's).
fn man_page_from_help(bin_path: &Path, name: &str, section: &str) -> anyhow::Result<String> {
    let help = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(bin_path)
            .args(args)
            .arg("--help")
            .output()
            .with_context(|| format!("running {} --help", bin_path.display()))?;
        if !out.status.success() {
            bail!("{} {} --help failed", name, args.join(" "));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let main = help(&[])?;
    let about = main.lines().next().unwrap_or(name).trim().to_owned();
    let mut page = format!(
        ".TH {} {section} \"\" \"ebpf-overlay {}\"\n.SH NAME\n{name} \\- {}\n.SH DESCRIPTION\n",
        name.to_uppercase(),
        env!("CARGO_PKG_VERSION"),
        roff_escape(&about)
    );
    page.push_str(&preformatted(&main));
    // Subcommands: the lines under "Commands:" (clap's layout), except help.
    let subcommands: Vec<String> = main
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    for sub in subcommands {
        page.push_str(&format!(
            ".SH {} {}\n",
            name.to_uppercase(),
            sub.to_uppercase()
        ));
        page.push_str(&preformatted(&help(&[&sub])?));
    }
    page.push_str(
        ".SH FILES\n/etc/ebpf-overlay/agent.env, /etc/ebpf-overlay/master.env, \
         /etc/ebpf-overlay/master.yaml, /sys/fs/bpf/ebpf-overlay/, /var/lib/ebpf-overlay/, \
         /run/ebpf-overlay/agent.sock, /etc/cni/net.d/NN-<network>.conflist\n\
         .SH SEE ALSO\noverlay-agent(8), overlay-master(8), overlayctl(1), ebpf-overlay(8)\n",
    );
    Ok(page)
}

fn preformatted(text: &str) -> String {
    let mut s = String::from(".nf\n");
    for line in text.lines() {
        s.push_str(&roff_escape(line));
        s.push('\n');
    }
    s.push_str(".fi\n");
    s
}

fn roff_escape(line: &str) -> String {
    let line = line.replace('\\', "\\\\");
    // A leading '.' or '\'' would be read as a request.
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line
    }
}

fn install(src: &Path, dest: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dest.parent().unwrap())?;
    std::fs::copy(src, dest)
        .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn gzip(data: &[u8], dest: &Path) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-9n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(dest)?)
        .spawn()
        .context("running gzip")?;
    child.stdin.take().unwrap().write_all(data)?;
    if !child.wait()?.success() {
        bail!("gzip of {} failed", dest.display());
    }
    Ok(())
}

fn installed_size_kib(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("du").args(["-sk"]).arg(dir).output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du -sk")
}

fn run_tool(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
