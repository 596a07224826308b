//! Builds the `ztunnel-ebpf` crate for bpfel-unknown-none with aya-build (nightly,
//! `-Z build-std=core`, linked by the `bpf-linker` on PATH) and leaves the object
//! at `$OUT_DIR/ztunnel-ebpf` for `include_bytes_aligned!`. `cargo xtask setup`
//! installs what this needs.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "ztunnel-ebpf")
        .ok_or_else(|| anyhow!("package ztunnel-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    let package =
        aya_build::Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() };
    aya_build::build_ebpf([package], Toolchain::default())
}
