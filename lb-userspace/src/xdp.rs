//! Attaching XDP programs, and turning the kernel's errors into sentences an operator can act on.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    path::Path,
};

use anyhow::{Context as _, Error, Result, anyhow};
use aya::{
    EbpfError,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use tracing::warn;

use crate::net::Interface;

/// How to attach: `auto` tries native (driver) mode and falls back to generic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    Auto,
    Native,
    Generic,
}

/// The mode the program ended up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// Where the program ended up, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Attached afresh in this mode.
    New(Attached),
    /// Replaced the program of the link an earlier lb left pinned: no packet saw the switch.
    Replaced,
}

/// Attaches `program` to `iface` and pins the link at `pin`, so the program stays attached
/// after lb exits (a successor replaces it, [`detach_pinned`] removes it). If a link is pinned
/// there already, its program is replaced in one step instead.
pub fn attach_pinned(
    program: &mut Xdp,
    iface: &Interface,
    choice: ModeChoice,
    pin: &Path,
) -> Result<Attachment> {
    if pin.exists() {
        let replaced = PinnedLink::from_pin(pin)
            .map_err(|e| anyhow!("{e}"))
            .and_then(|link| XdpLink::try_from(FdLink::from(link)).map_err(|e| anyhow!("{e}")))
            .and_then(|link| program.attach_to_link(link).map_err(|e| anyhow!("{e}")));
        match replaced {
            Ok(_) => return Ok(Attachment::Replaced),
            Err(e) => {
                warn!(
                    "the XDP link pinned at {} is stale ({e:#}): attaching afresh",
                    pin.display()
                );
                std::fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
            }
        }
    }
    let (id, attached) = attach(program, iface, choice)?;
    let link = FdLink::try_from(program.take_link(id)?).map_err(|e| {
        anyhow!(
            "XDP on {} is not a bpf_link ({e}), so it cannot be pinned",
            iface.name
        )
    })?;
    link.pin(pin)
        .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
    Ok(Attachment::New(attached))
}

/// An XDP link as the kernel describes it.
pub struct LinkInfo {
    /// The interface it is attached to, in its network namespace; 0 once the interface is gone.
    pub ifindex: u32,
    /// The program it runs.
    pub program: u32,
}

/// The XDP link pinned at `pin`. aya does not expose a link's XDP fields, so this asks the
/// kernel itself: `BPF_OBJ_GET` for a descriptor of the pin, `BPF_OBJ_GET_INFO_BY_FD` for its
/// `bpf_link_info`.
pub fn pinned_link(pin: &Path) -> Result<LinkInfo> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    /// `union bpf_attr` for `BPF_OBJ_GET`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    /// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    /// `struct bpf_link_info` up to its XDP member (the union starts 8-byte aligned), and room
    /// for the largest member.
    #[repr(C)]
    struct BpfLinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        pad: u32,
        ifindex: u32,
        rest: [u32; 31],
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: bpf(2) reads `get` (whose path outlives the call) and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &get, size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("opening {}", pin.display()));
    }
    // SAFETY: a descriptor the kernel just gave this process, owned here alone.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: all-zero is a valid `BpfLinkInfo`.
    let mut info: BpfLinkInfo = unsafe { std::mem::zeroed() };
    let query = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<BpfLinkInfo>() as u32,
        info: &raw mut info as u64,
    };
    // SAFETY: bpf(2) writes at most `info_len` bytes into `info`.
    if unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &query,
            size_of::<InfoByFd>(),
        )
    } < 0
    {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("reading {}", pin.display()));
    }
    if info.link_type != BPF_LINK_TYPE_XDP {
        return Err(anyhow!("{} is not an XDP link", pin.display()));
    }
    Ok(LinkInfo {
        ifindex: info.ifindex,
        program: info.prog_id,
    })
}

/// Detaches the program whose link is pinned at `pin`, and removes the pin.
pub fn detach_pinned(pin: &Path) -> Result<()> {
    let link = PinnedLink::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    // Dropping the last reference to the link detaches the program.
    drop(
        link.unpin()
            .with_context(|| format!("unpinning {}", pin.display()))?,
    );
    Ok(())
}

/// Creates `dir` on a BPF filesystem, mounting one on /sys/fs/bpf if none is there.
pub fn prepare_pin_dir(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let bpffs = Path::new("/sys/fs/bpf");
    if dir.starts_with(bpffs) && fs_magic(bpffs) != Some(BPF_FS_MAGIC) {
        // SAFETY: static, NUL-terminated arguments.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .context("mounting the BPF filesystem on /sys/fs/bpf");
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if fs_magic(dir) != Some(BPF_FS_MAGIC) {
        return Err(anyhow!(
            "{} is not on a BPF filesystem (mount -t bpf bpf DIR)",
            dir.display()
        ));
    }
    Ok(())
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: a zeroed statfs is valid output space; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c_path.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

/// Attaches `program` to `iface` through a bpf_link, which detaches when lb drops it.
pub fn attach(
    program: &mut Xdp,
    iface: &Interface,
    choice: ModeChoice,
) -> Result<(XdpLinkId, Attached)> {
    let native = |p: &mut Xdp| p.attach_to_if_index(iface.index, XdpMode::Driver);
    let generic = |p: &mut Xdp| p.attach_to_if_index(iface.index, XdpMode::Skb);
    match choice {
        ModeChoice::Native => native(program)
            .map(|id| (id, Attached::Native))
            .map_err(|e| native_refused(iface, e)),
        ModeChoice::Generic => generic(program)
            .map(|id| (id, Attached::Generic))
            .map_err(|e| attach_failed(iface, e)),
        ModeChoice::Auto => match native(program) {
            Ok(id) => Ok((id, Attached::Native)),
            Err(e) => {
                warn!(
                    "{:#}; falling back to generic XDP, which works everywhere but is slower",
                    native_refused(iface, e)
                );
                generic(program)
                    .map(|id| (id, Attached::Generic))
                    .map_err(|e| attach_failed(iface, e))
            }
        },
    }
}

fn native_refused(iface: &Interface, e: ProgramError) -> Error {
    let driver = std::fs::read_link(format!("/sys/class/net/{}/device/driver", iface.name))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let hint = match driver.as_deref() {
        Some("virtio_net") => format!(
            " (virtio_net refuses native XDP while the host offloads LRO/GRO to the guest: run `ethtool -K {} rx-gro-hw off`, or start the VM with guest_tso4, guest_tso6, guest_ecn and guest_ufo off, and give the NIC at least as many queue pairs as CPUs)",
            iface.name
        ),
        Some(d) => format!(" (driver {d} may not support native XDP)"),
        None => String::new(),
    };
    anyhow!(
        "native XDP refused on {}: {}{hint}",
        iface.name,
        describe(&e)
    )
}

fn attach_failed(iface: &Interface, e: ProgramError) -> Error {
    anyhow!("cannot attach XDP to {}: {}", iface.name, describe(&e))
}

fn describe(e: &ProgramError) -> String {
    match os_error(e) {
        Some(libc::EBUSY) | Some(libc::EEXIST) => {
            "another XDP program is attached already (see `ip link show`; detach it or stop the other lb)".into()
        }
        Some(libc::EPERM) => "permission denied: run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON".into(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => "the driver does not support this XDP mode".into(),
        _ => format!("{e:#}"),
    }
}

/// The OS error code somewhere in `e`'s chain of causes, if any.
fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        source = err.source();
    }
    None
}

/// One sentence for a failure to load the embedded object.
pub fn explain_load_error(e: EbpfError) -> Error {
    if let EbpfError::ProgramError(p) = e {
        return explain_program_error(p);
    }
    match os_error(&e) {
        Some(libc::EPERM) => anyhow!(
            "the kernel refused to create the BPF maps (permission denied): on a kernel before 5.11 that is RLIMIT_MEMLOCK, which lb could not lift; raise it (ulimit -l unlimited, LimitMEMLOCK=infinity)"
        ),
        Some(libc::ENOMEM) => anyhow!(
            "not enough memory for the BPF maps: lower settings.connection_table_size or settings.max_target_groups"
        ),
        _ => anyhow!("cannot load the XDP program: {e:#}"),
    }
}

/// One sentence for a failure to load the balancer program into the kernel.
pub fn explain_program_error(e: ProgramError) -> Error {
    match os_error(&e) {
        Some(libc::EPERM) => anyhow!(
            "permission denied loading the XDP program: run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        ),
        _ => anyhow!("the kernel refused the XDP program: {e:#}"),
    }
}

/// Checks that this process may load and attach XDP programs (root, or CAP_NET_ADMIN with
/// CAP_BPF and CAP_PERFMON), before anything fails less clearly; `what` is the command.
pub fn check_privileges(what: &str) -> Result<()> {
    const NET_ADMIN: u32 = 12;
    const SYS_ADMIN: u32 = 21;
    const PERFMON: u32 = 38;
    const BPF: u32 = 39;
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff in /proc/self/status")?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    let missing: Vec<&str> = [
        ("CAP_NET_ADMIN", has(NET_ADMIN)),
        ("CAP_BPF", has(BPF) || has(SYS_ADMIN)),
        ("CAP_PERFMON", has(PERFMON) || has(SYS_ADMIN)),
    ]
    .into_iter()
    .filter(|&(_, held)| !held)
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty() {
        return Err(anyhow!(
            "{what} needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; this process lacks {}",
            missing.join(", ")
        ));
    }
    Ok(())
}

/// Lifts RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps to it (64 KiB by default, far
/// too little), later ones to the memory cgroup. A limit lb may not raise is left as it is;
/// on such a kernel its maps are then refused with a sentence that says so.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("cannot lift RLIMIT_MEMLOCK: {}", io::Error::last_os_error());
    }
}

/// Checks the kernel features lb relies on, before anything else fails less clearly.
pub fn check_kernel() -> Result<()> {
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(anyhow!(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): lb needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (5.10 or newer)"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Netlink (legacy) attachment: it keeps the program on the interface after the process exits,
// which is what `lb target` wants for the decap program; a bpf_link would die with the process.

const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_FLAGS: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// Attaches `prog` (or detaches with `None`) on interface `ifindex` through RTM_SETLINK.
pub fn netlink_set_xdp(ifindex: u32, prog: Option<BorrowedFd<'_>>, flags: u32) -> io::Result<()> {
    let fd = prog.map_or(-1, |p| p.as_raw_fd());
    let mut msg = Vec::with_capacity(64);
    // nlmsghdr, length patched below.
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_SETLINK.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    // ifinfomsg
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // IFLA_XDP { IFLA_XDP_FD, IFLA_XDP_FLAGS }
    msg.extend_from_slice(&20u16.to_ne_bytes());
    msg.extend_from_slice(&(IFLA_XDP | NLA_F_NESTED).to_ne_bytes());
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&IFLA_XDP_FD.to_ne_bytes());
    msg.extend_from_slice(&fd.to_ne_bytes());
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&IFLA_XDP_FLAGS.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());

    // SAFETY: plain socket calls on buffers we own; the socket is closed on every path.
    unsafe {
        let sock = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = (|| {
            if libc::send(sock, msg.as_ptr().cast(), msg.len(), 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut buf = [0u8; 4096];
            let n = libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            // nlmsghdr (16 bytes) of type NLMSG_ERROR, then the error code.
            if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == libc::NLMSG_ERROR as u16 {
                let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            Ok(())
        })();
        libc::close(sock);
        result
    }
}
