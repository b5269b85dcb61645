//! Builds the eBPF object (`ebpf/overlay-ebpf`, target bpfel-unknown-none, nightly + build-std)
//! and leaves it in OUT_DIR for `include_bytes_aligned!`. aya-build passes the BTF link flags that
//! make the maps print as structs in bpftool.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

/// The eBPF crate sits at a fixed place in the workspace (and is this crate's build-dependency by
/// that path): found from the manifest directory cargo gives us, without asking `cargo metadata`.
const EBPF_CRATE: &str = "../../ebpf/overlay-ebpf";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?);
    let root_dir = manifest_dir.join(EBPF_CRATE);
    let root_dir = root_dir
        .canonicalize()
        .with_context(|| format!("eBPF crate {}", root_dir.display()))?;
    if !root_dir.join("Cargo.toml").is_file() {
        bail!(
            "no Cargo.toml in the eBPF crate's directory {}",
            root_dir.display()
        );
    }
    let root_dir = root_dir
        .to_str()
        .with_context(|| format!("eBPF crate path {} is not UTF-8", root_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "overlay-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask setup` installs what they need \
         (nightly rust-src and bpf-linker)",
    )
}
