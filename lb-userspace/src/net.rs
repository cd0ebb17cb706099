//! What lb needs to know of the host's network: interfaces, routes and neighbours (ARP).

use std::{
    ffi::CString,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

/// A network interface as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// IPv4 addresses, primary first.
    pub ipv4: Vec<Ipv4Addr>,
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
        Ok(Interface {
            name: name.to_owned(),
            index,
            mac,
            mtu,
            ipv4: ipv4_addresses(name)?,
        })
    }

    pub fn primary_ipv4(&self) -> Result<Ipv4Addr> {
        self.ipv4
            .first()
            .copied()
            .ok_or_else(|| anyhow!("interface {} has no IPv4 address", self.name))
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

fn ipv4_addresses(name: &str) -> Result<Vec<Ipv4Addr>> {
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
                && (*ifa.ifa_addr).sa_family as i32 == libc::AF_INET
                && std::ffi::CStr::from_ptr(ifa.ifa_name).to_bytes() == name.as_bytes()
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// How the kernel would reach `dst`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    pub gateway: Option<Ipv4Addr>,
}

impl Route {
    /// The address whose MAC a frame towards the destination carries.
    pub fn next_hop(&self, dst: Ipv4Addr) -> Ipv4Addr {
        self.gateway.unwrap_or(dst)
    }
}

pub fn route_to(dst: Ipv4Addr) -> Result<Route> {
    let out = Command::new("ip")
        .args(["-j", "-4", "route", "get", &dst.to_string()])
        .output()
        .context("running `ip route get` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "no route to {dst}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let routes: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("reading `ip -j route get`")?;
    let route = routes.first().ok_or_else(|| anyhow!("no route to {dst}"))?;
    Ok(Route {
        dev: route["dev"].as_str().unwrap_or_default().to_owned(),
        gateway: route["gateway"].as_str().and_then(|g| g.parse().ok()),
    })
}

/// The MAC of `addr` on `dev`, from the neighbour table; asks the kernel to resolve it (by
/// sending one empty UDP datagram to the discard port) when it is not known yet.
pub fn resolve_mac(addr: Ipv4Addr, dev: &str, timeout: Duration) -> Result<[u8; 6]> {
    let deadline = Instant::now() + timeout;
    let mut next_probe = Instant::now();
    loop {
        if let Some(mac) = neighbour(addr, dev)? {
            return Ok(mac);
        }
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "no ARP reply from {addr} on {dev} within {}s: is it up and on this segment?",
                timeout.as_secs()
            );
        }
        if now >= next_probe {
            probe(addr, dev);
            next_probe = now + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn probe(addr: Ipv4Addr, dev: &str) {
    if let Ok(socket) = UdpSocket::bind("0.0.0.0:0") {
        let _ = set_socket_option(&socket, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, dev);
        let _ = socket.send_to(&[], SocketAddrV4::new(addr, 9));
    }
}

/// A complete entry of the neighbour table (`/proc/net/arp` is per network namespace).
fn neighbour(addr: Ipv4Addr, dev: &str) -> Result<Option<[u8; 6]>> {
    let table = std::fs::read_to_string("/proc/net/arp").context("reading /proc/net/arp")?;
    Ok(parse_arp_table(&table, addr, dev))
}

fn parse_arp_table(table: &str, addr: Ipv4Addr, dev: &str) -> Option<[u8; 6]> {
    const ATF_COM: u32 = 0x2;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [ip, _hw_type, flags, mac, _mask, device] = f[..] else {
            return None;
        };
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
        if ip.parse::<Ipv4Addr>().ok()? != addr || device != dev || flags & ATF_COM == 0 {
            return None;
        }
        parse_mac(mac)
    })
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_table_lookup_wants_a_complete_entry_on_the_right_device() {
        let table = "IP address       HW type     Flags       HW address            Mask     Device\n\
                     198.51.100.11    0x1         0x2         aa:bb:cc:dd:ee:01     *        eth0\n\
                     198.51.100.12    0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                     198.51.100.13    0x1         0x2         aa:bb:cc:dd:ee:03     *        eth1\n";
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(
            parse_arp_table(table, ip("198.51.100.11"), "eth0"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01])
        );
        assert_eq!(parse_arp_table(table, ip("198.51.100.12"), "eth0"), None);
        assert_eq!(parse_arp_table(table, ip("198.51.100.13"), "eth0"), None);
    }

    #[test]
    fn mac_round_trip() {
        let mac = [0x02, 0, 0xff, 0x10, 0xab, 0x01];
        assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
        assert_eq!(parse_mac("02:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:00:00"), None);
    }
}
