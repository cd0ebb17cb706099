//! The running `lb run` of an interface, as other `lb` commands find it.
//!
//! `lb run` records its pid and config file in /run/lb, one file per network namespace and
//! interface, and removes it when it stops. `lb reload` reads it to signal the right process.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub pid: u32,
    pub config: PathBuf,
    /// Where it serves `/metrics` and `/status`.
    pub admin: std::net::SocketAddr,
    /// Every interface it runs on; the file is named after the first.
    #[serde(default)]
    pub interfaces: Vec<String>,
}

/// The instance file of the running process; removed on drop.
pub struct Instance {
    path: PathBuf,
}

fn path_for(iface: &str) -> PathBuf {
    state_file(iface, "instance")
}

/// This process's network namespace: the inode number of /proc/self/ns/net. Interfaces of the
/// same name in two namespaces are two interfaces, each with its own lb.
pub fn netns_id() -> u64 {
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// A file of lb's about `iface` under /run/lb, one per network namespace and interface.
pub fn state_file(iface: &str, kind: &str) -> PathBuf {
    PathBuf::from(format!("/run/lb/{kind}-{}-{iface}.json", netns_id()))
}

/// Sends `signal` to `pid` and waits up to `timeout` for it to exit.
pub fn signal_and_wait(pid: u32, signal: i32, timeout: std::time::Duration) -> Result<()> {
    // SAFETY: plain kill(2).
    if unsafe { libc::kill(pid as i32, signal) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("signalling lb (pid {pid})"));
    }
    let deadline = std::time::Instant::now() + timeout;
    while alive(pid) {
        if std::time::Instant::now() > deadline {
            bail!("lb (pid {pid}) did not exit within {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}

/// Whether `pid` still runs. A zombie (exited, not yet reaped by its parent) does not.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

impl Instance {
    /// Records this process as the one running on `interfaces`; fails if another live one
    /// runs on any of them.
    pub fn claim(
        interfaces: &[String],
        config: &Path,
        admin: std::net::SocketAddr,
    ) -> Result<Self> {
        for iface in interfaces {
            if let Some(other) = find(iface)? {
                bail!(
                    "lb is already running on {iface} (pid {}): stop it first",
                    other.pid
                );
            }
        }
        let path = path_for(&interfaces[0]);
        let info = InstanceInfo {
            pid: std::process::id(),
            config: std::fs::canonicalize(config).unwrap_or_else(|_| config.to_owned()),
            admin,
            interfaces: interfaces.to_vec(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, serde_json::to_vec(&info)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Instance { path })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Every live instance in this network namespace, with the first of its interfaces.
pub fn all() -> Vec<(String, InstanceInfo)> {
    let prefix = format!("instance-{}-", netns_id());
    let Ok(dir) = std::fs::read_dir("/run/lb") else {
        return Vec::new();
    };
    let mut found: Vec<(String, InstanceInfo)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let iface = name
                .strip_prefix(&prefix)?
                .strip_suffix(".json")?
                .to_owned();
            Some((iface.clone(), read(&iface)?))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// The live instance running on `iface` in this network namespace, if any: the one named
/// after it, or one that runs on it among other interfaces.
pub fn find(iface: &str) -> Result<Option<InstanceInfo>> {
    if let Some(info) = read(iface) {
        return Ok(Some(info));
    }
    Ok(all()
        .into_iter()
        .map(|(_, info)| info)
        .find(|info| info.interfaces.iter().any(|i| i == iface)))
}

/// The live instance whose file is named after `iface`.
fn read(iface: &str) -> Option<InstanceInfo> {
    let bytes = std::fs::read(path_for(iface)).ok()?;
    let info: InstanceInfo = serde_json::from_slice(&bytes).ok()?;
    alive(info.pid).then_some(info)
}
