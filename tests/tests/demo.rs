//! The demo (README's first command) cleans up after itself when interrupted. Needs root.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

#[test]
fn interrupted_demo_leaves_nothing_behind() -> Result<()> {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_lb-demo"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let (tx, rx) = mpsc::channel();
    let stdout = demo.stdout.take().context("stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Interrupt it while traffic flows, as Ctrl-C would.
    let mut said = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("the demo did not get to its traffic")?;
        let traffic = line.starts_with("1. Traffic");
        said.push(line);
        if traffic {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    let status = demo.wait()?;
    // Its last lines may still be in the pipe when it has exited: read them up to the end of
    // the output (the reader then drops its sender), each within a bound.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        said.push(line);
    }
    ensure!(status.success(), "the demo exited with {status}: {said:#?}");
    ensure!(
        said.iter().any(|l| l.starts_with("interrupted")),
        "{said:#?}"
    );
    let namespaces =
        String::from_utf8(Command::new("ip").args(["netns", "list"]).output()?.stdout)?;
    ensure!(
        !namespaces.contains("lbdemo-"),
        "namespaces left: {namespaces}"
    );
    ensure!(
        !std::path::Path::new("/sys/fs/bpf/lbdemo").exists(),
        "pins left in /sys/fs/bpf/lbdemo"
    );
    Ok(())
}
