//! What lb needs to know of its own interfaces, the netlink conversations with the kernel that
//! are not `next_hop`'s (an interface's XDP program, addresses), and socket helpers.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle,
    packet_route::link::{LinkAttribute, LinkXdp},
};

/// A network interface as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// IPv4 addresses, primary first.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses, link-local ones too.
    pub ipv6: Vec<Ipv6Addr>,
}

impl Interface {
    pub fn lookup(name: &str) -> Result<Self> {
        let c_name =
            CString::new(name).map_err(|_| anyhow!("`{name}` is not an interface name"))?;
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            bail!("`{name}` is not an interface name");
        }
        // SAFETY: c_name is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if index == 0 {
            bail!("no network interface named `{name}` (see `ip link`)");
        }
        let mac = ifreq_ioctl(name, libc::SIOCGIFHWADDR, |r| {
            // SAFETY: SIOCGIFHWADDR fills ifru_hwaddr.
            let data = unsafe { r.ifr_ifru.ifru_hwaddr.sa_data };
            let mut mac = [0u8; 6];
            for (m, d) in mac.iter_mut().zip(data) {
                *m = d as u8;
            }
            mac
        })?;
        // SAFETY: SIOCGIFMTU fills ifru_mtu.
        let mtu = ifreq_ioctl(name, libc::SIOCGIFMTU, |r| unsafe { r.ifr_ifru.ifru_mtu })? as u32;
        let (mut ipv4, mut ipv6) = (Vec::new(), Vec::new());
        for addr in addresses(name)? {
            match addr {
                IpAddr::V4(a) => ipv4.push(a),
                IpAddr::V6(a) => ipv6.push(a),
            }
        }
        Ok(Interface {
            name: name.to_owned(),
            index,
            mac,
            mtu,
            ipv4,
            ipv6,
        })
    }

    pub fn primary_ipv4(&self) -> Result<Ipv4Addr> {
        self.ipv4
            .first()
            .copied()
            .ok_or_else(|| anyhow!("interface {} has no IPv4 address", self.name))
    }

    /// Its first global IPv6 address (not link-local), if it has one: the source of what lb
    /// sends over IPv6 from it.
    pub fn global_ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6
            .iter()
            .copied()
            .find(|a| !a.is_unicast_link_local())
    }

    /// Whether it holds `addr`.
    pub fn holds(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.ipv4.contains(&a),
            IpAddr::V6(a) => self.ipv6.contains(&a),
        }
    }
}

fn ifreq_ioctl<T>(
    name: &str,
    request: libc::Ioctl,
    read: impl FnOnce(&libc::ifreq) -> T,
) -> Result<T> {
    // SAFETY: a zeroed ifreq is valid; the name fits (checked by the caller) and stays
    // NUL-terminated; the socket is closed below.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket");
        }
        let rc = libc::ioctl(fd, request, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err).with_context(|| format!("reading interface {name}"));
        }
        Ok(read(&req))
    }
}

/// The addresses of interface `name`, both families, in the kernel's order.
fn addresses(name: &str) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs allocates a list that we walk read-only and free once.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error()).context("getifaddrs");
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null()
                && std::ffi::CStr::from_ptr(ifa.ifa_name).to_bytes() == name.as_bytes()
            {
                match (*ifa.ifa_addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into());
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        out.push(Ipv6Addr::from(sin6.sin6_addr.s6_addr).into());
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// The position in `ifaces` of the interface with index `ifindex`.
pub fn position_of(ifaces: &[Interface], ifindex: u32) -> Option<usize> {
    ifaces.iter().position(|i| i.index == ifindex)
}

/// A netlink handle to the kernel, whose connection runs as a task of the current runtime.
pub fn netlink() -> Result<Handle> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Runs `talk` with a netlink handle, from code that is not async (`lb target`).
pub fn with_netlink<T>(talk: impl AsyncFnOnce(&Handle) -> Result<T>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for netlink")?
        .block_on(async { talk(&netlink()?).await })
}

/// The id of the XDP program attached to interface `index`, if any.
pub async fn xdp_program(handle: &Handle, index: u32) -> Result<Option<u32>> {
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .with_context(|| format!("reading interface {index}"))?
        .with_context(|| format!("no interface {index}"))?;
    Ok(link
        .attributes
        .into_iter()
        .find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp.into_iter().find_map(|x| match x {
                LinkXdp::ProgId(id) => Some(id),
                _ => None,
            }),
            _ => None,
        })
        .filter(|&id| id != 0))
}

/// Adds `addr`/32 to interface `index`, or removes it.
pub async fn set_host_address(
    handle: &Handle,
    index: u32,
    addr: IpAddr,
    present: bool,
) -> Result<()> {
    if present {
        let len = if addr.is_ipv6() { 128 } else { 32 };
        return handle
            .address()
            .add(index, addr, len)
            .execute()
            .await
            .with_context(|| format!("adding {addr}/{len} to interface {index}"));
    }
    let mut found = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(addr)
        .execute();
    while let Some(entry) = found.try_next().await? {
        handle
            .address()
            .del(entry)
            .execute()
            .await
            .with_context(|| format!("removing {addr} from interface {index}"))?;
    }
    Ok(())
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// SO_LINGER with a zero timeout: close sends a reset at once (it never blocks, unlike a
/// non-zero linger, which is why tokio's own setter is deprecated).
pub fn reset_on_close(socket: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_socket_option(socket, libc::SOL_SOCKET, libc::SO_LINGER, &linger)
}

/// setsockopt(2) with `value` passed as the option's bytes (a C struct, an int, a string).
pub fn set_socket_option<T: ?Sized>(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: a live socket, and a pointer to `size_of_val(value)` readable bytes.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of_val(value) as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
