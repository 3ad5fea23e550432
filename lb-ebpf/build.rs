use which::which;

/// Rebuild the eBPF object when bpf-linker changes (a new linker can change the generated code).
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask build`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
