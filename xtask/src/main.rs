//! `cargo xtask <task>`: everything beyond a plain `cargo build`, from a fresh machine on.
//!
//! - `setup`: installs what building the XDP programs and running the lab need (nightly's
//!   rust-src, bpf-linker against Debian's LLVM 22, iproute2, ethtool). Idempotent and quick
//!   once done; `build`, `test` and `demo` run it first.
//! - `build`: the self-contained `target/release/lb`.
//! - `test`: formatting, clippy, unit tests, XDP tests on crafted frames and the end-to-end lab.
//! - `demo`: builds and runs the namespace lab with its embedded config.
//! - `bench`: measures lb and writes BENCHMARKS.md.
//! - `fuzz`: the data plane against its reference model, 1,000,000 frames (the test suite
//!   sends 100,000); prints the seed, which `--seed` replays.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and system tools the project needs.
    Setup,
    /// Build target/release/lb (with the XDP programs embedded).
    Build,
    /// Run every check and test (needs root for the XDP and lab tests).
    Test,
    /// Build, then run the demo lab.
    Demo,
    /// Run the benchmarks and write BENCHMARKS.md (needs root).
    Bench {
        /// Few, short rounds: keeps the suite working (CI), not figures to quote.
        #[arg(long)]
        quick: bool,
        /// Where to write the report [default: BENCHMARKS.md at the top of the repository].
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Run only these sections (1-5, comma-separated), e.g. while working on one of them.
        #[arg(long, value_name = "SECTIONS")]
        only: Option<String>,
    },
    /// Send random and mutated frames through the data plane and compare each outcome with
    /// the reference model in tests/tests/fuzz.rs (needs root).
    Fuzz {
        /// How many frames.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// Replay the run that printed this seed [default: a new one].
        #[arg(long)]
        seed: Option<u64>,
    },
}

const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Commands the lab and `lb` itself call, and the Debian packages that bring them.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("nsenter", "util-linux"),
    ("systemd-analyze", "systemd"),
    ("openssl", "openssl"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("bird", "bird2"),
    ("nft", "nftables"),
    ("haproxy", "haproxy"),
    ("hping3", "hping3"),
    ("ping", "iputils-ping"),
];

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?
        .to_owned();
    std::env::set_current_dir(&root)?;
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build()
        }
        Task::Test => {
            setup()?;
            test(&root)
        }
        Task::Bench {
            quick,
            output,
            only,
        } => {
            setup()?;
            build()?;
            cargo(&["build", "--release", "-p", "lb-tests", "--bin", "lb-bench"])?;
            require_root("the benchmarks")?;
            let mut bench = Command::new(root.join("target/release/lb-bench"));
            if quick {
                bench.arg("--quick");
            }
            if let Some(output) = output {
                bench.arg("--output").arg(output);
            }
            if let Some(only) = only {
                bench.arg("--only").arg(only);
            }
            run(&mut bench)
        }
        Task::Fuzz { frames, seed } => {
            setup()?;
            build()?;
            require_root("the fuzzer")?;
            let mut fuzz = Command::new("cargo");
            fuzz.args(["test", "--release", "-p", "lb-tests", "--test", "fuzz"])
                .args(["--", "--nocapture"])
                .env("LB_FUZZ_FRAMES", frames.to_string());
            if let Some(seed) = seed {
                fuzz.env("LB_FUZZ_SEED", seed.to_string());
            }
            run(&mut fuzz)
        }
        Task::Demo => {
            setup()?;
            build()?;
            cargo(&["build", "--release", "-p", "lb-tests", "--bin", "lb-demo"])?;
            require_root("the demo")?;
            run(&mut Command::new(root.join("target/release/lb-demo")))
        }
    }
}

fn setup() -> Result<()> {
    let mut apt = Vec::new();
    for (command, package) in TOOLS {
        if !on_path(command) {
            apt.push(*package);
        }
    }
    let linker = bpf_linker();
    if linker.is_none() {
        apt.extend(LLVM_PACKAGES);
    }
    if !apt.is_empty() {
        eprintln!("xtask: installing {}", apt.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&apt)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !nightly_has_rust_src()? {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if linker.is_none() {
        eprintln!("xtask: building bpf-linker against LLVM 22 (a few minutes, once)");
        run(Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

fn build() -> Result<()> {
    cargo(&["build", "--release", "-p", "lb-userspace"])
}

fn test(root: &Path) -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    build()?;
    require_root("the XDP and end-to-end tests")?;
    // Labs run one at a time: they are timing-sensitive and this machine has two cores.
    let mut child = Command::new("cargo")
        .args(["test", "--release", "--", "--test-threads=1"])
        .env("LB_BIN", root.join("target/release/lb"))
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().context("piped")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count(result, "passed");
            failed += count(result, "failed");
        }
    }
    let status = child.wait()?;
    // One closing line for the whole run, over every test binary.
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 || passed == 0 {
        bail!("tests failed ({status})");
    }
    Ok(())
}

/// The number before `label` in a line like "ok. 10 passed; 0 failed; ...".
fn count(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            let mut words = part.split_whitespace().rev();
            if words.next()? != label {
                return None;
            }
            words.next()?.parse().ok()
        })
        .unwrap_or(0)
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} need root: they load XDP programs and create network namespaces (try sudo -E cargo xtask ...)"
        );
    }
    Ok(())
}

fn nightly_has_rust_src() -> Result<bool> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running rustc +nightly (is rustup's nightly toolchain installed?)")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain: install it with `rustup toolchain install nightly` ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Ok(sysroot.join("lib/rustlib/src/rust/library/core").exists())
}

fn bpf_linker() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let path = cargo_home.join("bin/bpf-linker");
    path.exists().then_some(path)
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new("cargo").args(args))
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
