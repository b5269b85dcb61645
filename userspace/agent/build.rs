//! Builds the eBPF object (`ebpf/overlay-ebpf`, target bpfel-unknown-none, nightly + build-std)
//! and leaves it in OUT_DIR for `include_bytes_aligned!`. aya-build passes the BTF link flags that
//! make the maps print as structs in bpftool.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "overlay-ebpf")
        .ok_or_else(|| anyhow!("package overlay-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("overlay-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; `cargo xtask setup` installs what they need \
         (nightly rust-src and bpf-linker)",
    )
}
