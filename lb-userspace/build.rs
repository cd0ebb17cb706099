//! Builds the XDP programs (lb-ebpf) with the nightly toolchain and bpf-linker, so that the
//! `lb` binary can embed them and stay one self-contained file.
fn main() -> anyhow::Result<()> {
    // aya-build watches lb-ebpf only; the programs also compile lb-common's types and constants,
    // and an object built against stale ones fails at load time (or worse, reads maps wrongly).
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-common")
    );
    // The test build without the flood guard (lb-ebpf's flows.rs) is made with this set.
    println!("cargo:rerun-if-env-changed=LB_TEST_NO_FLOOD_GUARD");
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
