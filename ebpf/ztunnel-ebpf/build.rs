//! Rebuild the eBPF object when the `bpf-linker` found in PATH changes.
fn main() {
    match which::which("bpf-linker") {
        Ok(p) => println!("cargo:rerun-if-changed={}", p.display()),
        Err(e) => {
            println!("cargo:warning=bpf-linker not found in PATH ({e}); run `cargo xtask setup`")
        }
    }
}
