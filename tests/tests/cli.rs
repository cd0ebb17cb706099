//! The `lb` binary's own behaviour on good and bad input: exit codes and messages.

use std::{path::Path, process::Command};

use anyhow::{Result, ensure};
use lb_tests::lb_binary;

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn lb(args: &[&str]) -> Result<Output> {
    let out = Command::new(lb_binary())
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()?;
    Ok(Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
        .display()
        .to_string()
}

const BAD: &str = "\
listeners:
  - name: web
    address: 203.0.113.300
    port: 80
    protocol: tcp
    target_group: nowhere
target_groups:
  - name: web
    targets:
      - {address: 198.51.100.11, port: 8080}
";

#[test]
fn check_accepts_the_example_with_a_summary() -> Result<()> {
    let out = lb(&["check", "-c", &example("lb.yaml")])?;
    ensure!(out.code == Some(0), "{}", out.stderr);
    ensure!(
        out.stdout
            .trim_end()
            .ends_with("ok: 2 listeners, 2 target groups, 5 targets"),
        "{}",
        out.stdout
    );
    Ok(())
}

#[test]
fn run_refuses_a_bad_config_with_the_messages_of_check() -> Result<()> {
    let path = std::env::temp_dir().join(format!("lb-cli-bad-{}.yaml", std::process::id()));
    std::fs::write(&path, BAD)?;
    let path_arg = path.display().to_string();
    let check = lb(&["check", "-c", &path_arg])?;
    let run = lb(&["run", "-c", &path_arg, "-i", "lo"])?;
    std::fs::remove_file(&path)?;
    ensure!(check.code == Some(1) && run.code == Some(1));
    let lines: Vec<&str> = check.stderr.lines().collect();
    ensure!(lines.len() == 2, "one line per problem: {lines:?}");
    ensure!(
        lines[0].ends_with(":3:14: `203.0.113.300` is not an IP address"),
        "{lines:?}"
    );
    ensure!(
        lines[1].ends_with(":6:19: unknown target group `nowhere` (defined: web)"),
        "{lines:?}"
    );
    ensure!(
        run.stderr == check.stderr,
        "run said:\n{}\ncheck said:\n{}",
        run.stderr,
        check.stderr
    );
    Ok(())
}

#[test]
fn unreadable_config_is_one_sentence() -> Result<()> {
    let out = lb(&["check", "-c", "/nonexistent/lb.yaml"])?;
    ensure!(out.code == Some(1));
    ensure!(
        out.stderr.trim()
            == "/nonexistent/lb.yaml: cannot read the config file: No such file or directory (os error 2)",
        "{}",
        out.stderr
    );
    Ok(())
}

#[test]
fn unknown_interface_is_one_sentence() -> Result<()> {
    let out = lb(&["run", "-c", &example("lb.yaml"), "-i", "nosuchif0"])?;
    ensure!(out.code == Some(1));
    ensure!(
        out.stderr.trim() == "lb: no network interface named `nosuchif0` (see `ip link`)",
        "{}",
        out.stderr
    );
    let out = lb(&[
        "target",
        "-i",
        "nosuchif0",
        "--mode",
        "dsr",
        "--vip",
        "203.0.113.10",
        "--check",
    ])?;
    ensure!(
        out.code == Some(1)
            && out.stderr.trim() == "lb: no network interface named `nosuchif0` (see `ip link`)",
        "{}",
        out.stderr
    );
    Ok(())
}

#[test]
fn bad_flags_are_usage_errors() -> Result<()> {
    let out = lb(&[
        "run",
        "-c",
        &example("lb.yaml"),
        "-i",
        "lo",
        "--xdp-mode",
        "turbo",
    ])?;
    ensure!(out.code == Some(2), "{:?}", out.code);
    ensure!(
        out.stderr.contains("invalid value 'turbo'")
            && out.stderr.contains("auto, native, generic"),
        "{}",
        out.stderr
    );
    let out = lb(&["target", "-i", "lo", "--mode", "dsr", "--vip", "not-an-ip"])?;
    ensure!(
        out.code == Some(2) && out.stderr.contains("invalid value 'not-an-ip'"),
        "{}",
        out.stderr
    );
    let mapped = [
        "target",
        "-i",
        "lo",
        "--mode",
        "dsr",
        "--vip",
        "::ffff:203.0.113.10",
        "--check",
    ];
    let out = lb(&mapped)?;
    ensure!(
        out.code == Some(1)
            && out
                .stderr
                .contains("is an IPv4-mapped address: give the IPv4 VIP as it is (203.0.113.10)"),
        "{:?} {}",
        out.code,
        out.stderr
    );
    let out = lb(&["target", "-i", "lo", "--mode", "dsr"])?;
    ensure!(
        out.code == Some(2) && out.stderr.contains("--vip"),
        "{}",
        out.stderr
    );
    let config = example("lb.yaml");
    for (args, what) in [
        (
            vec![
                "run",
                "-c",
                &config,
                "-i",
                "lo",
                "--metrics-listen",
                "nonsense",
            ],
            "invalid value 'nonsense' for '--metrics-listen <ADDR>'",
        ),
        (vec!["run", "-i", "lo"], "--config <FILE>"),
        (vec!["run", "-c", &config], "--interface <IFACE>"),
        (vec!["status", "--bogus"], "unexpected argument '--bogus'"),
        (
            vec![
                "target",
                "-i",
                "lo",
                "--mode",
                "dsr",
                "--vip",
                "203.0.113.10",
                "--port",
                "80",
            ],
            "is not LISTENER:TARGET",
        ),
    ] {
        let out = lb(&args)?;
        ensure!(
            out.code == Some(2) && out.stderr.contains(what) && !out.stderr.contains("panicked"),
            "lb {args:?}: {}",
            out.stderr
        );
    }
    // Nothing running: one sentence.
    for command in ["status", "reload"] {
        let out = lb(&[command, "-i", "nosuchif0"])?;
        ensure!(
            out.code == Some(1) && out.stderr.trim() == "lb: no lb is running on nosuchif0",
            "lb {command}: {}",
            out.stderr
        );
    }
    Ok(())
}

#[test]
fn systemd_unit_verifies() -> Result<()> {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/lb@.service"),
    )?;
    ensure!(unit.contains("ExecReload=/usr/local/bin/lb reload -i %i"));
    let dir = std::env::temp_dir().join(format!("lb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("lb@eth0.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/lb", &lb_binary().display().to_string()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()?;
    std::fs::remove_dir_all(&dir)?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    Ok(())
}

/// What the host lacks is one sentence too: a kernel without BTF (here, a private mount
/// namespace where /sys/kernel/btf is empty), a pin directory that is not on a BPF filesystem.
#[test]
fn a_host_that_cannot_run_lb_is_one_sentence() -> Result<()> {
    let config = example("lb.yaml");
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg("mount -t tmpfs none /sys/kernel/btf && exec \"$0\" run -c \"$1\" -i lo")
        .arg(lb_binary())
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1)
            && stderr.trim()
                == "lb: this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): lb needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (5.10 or newer)",
        "{out:?}"
    );
    let dir = std::env::temp_dir().join("lb-not-bpffs");
    std::fs::create_dir_all(&dir)?;
    let out = lb(&[
        "run",
        "-c",
        &config,
        "-i",
        "lo",
        "--pin-dir",
        &dir.display().to_string(),
    ])?;
    let _ = std::fs::remove_dir(&dir);
    ensure!(
        out.code == Some(1)
            && out.stderr.trim()
                == format!(
                    "lb: {} is not on a BPF filesystem (mount -t bpf bpf DIR)",
                    dir.display()
                ),
        "{}",
        out.stderr
    );
    Ok(())
}
