//! TCP health checks as half-open handshakes: a SYN from one raw socket, and the target's SYN-ACK
//! (something listens) or reset (nothing does) back. The kernel answers the SYN-ACK with a reset
//! of its own, since no socket owns the probe's port, so the target is left with nothing open.
//!
//! A full `connect` costs the checker a socket, an epoll registration, a handshake and a close
//! per probe; at 10,000 targets probed every second that was half a core. This costs one
//! segment out and one in. One raw socket per family: an IPv4 one reads whole IP packets, an
//! IPv6 one TCP segments alone, their source in the address it receives them from.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{io::unix::AsyncFd, sync::oneshot};

use crate::net::set_socket_option;

/// Source ports of probes: above Linux's default ephemeral range (32768-60999), so that the
/// host's own connections do not share a probe's addresses.
const FIRST_PORT: u16 = 61000;
const PORTS: u32 = 65535 - FIRST_PORT as u32;
/// How long a looked-up source address for a target is trusted before the route is asked again.
const SOURCE_TTL: Duration = Duration::from_secs(60);

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Sends SYN probes and matches the answers to them. Cheap to clone.
#[derive(Clone)]
pub struct HalfOpen {
    inner: Arc<Inner>,
}

struct Inner {
    /// The IPv4 socket, and the IPv6 one where the host has IPv6.
    sockets: [Option<AsyncFd<OwnedFd>>; 2],
    /// Probes waiting for an answer, by target and source port.
    pending: Mutex<HashMap<(SocketAddr, u16), Pending>>,
    /// The local address the route to each target leaves from (the TCP checksum covers it).
    sources: Mutex<HashMap<IpAddr, (IpAddr, Instant)>>,
    next_port: AtomicU32,
}

struct Pending {
    /// The acknowledgement number a genuine answer carries: our sequence number plus one.
    ack: u32,
    answer: oneshot::Sender<Result<(), String>>,
}

impl HalfOpen {
    /// Opens the raw sockets (which need CAP_NET_RAW; IPv6's only where the host has IPv6)
    /// and starts the tasks that read answers, which run as long as the tokio runtime they
    /// were started in.
    pub fn open() -> io::Result<Self> {
        let inner = Arc::new(Inner {
            sockets: [Some(raw_socket(false)?), raw_socket(true).ok()],
            pending: Mutex::default(),
            sources: Mutex::default(),
            next_port: AtomicU32::new(fastrand::u32(..PORTS)),
        });
        for family in 0..2 {
            if inner.sockets[family].is_some() {
                tokio::spawn(receive(inner.clone(), family));
            }
        }
        Ok(HalfOpen { inner })
    }

    /// Whether it probes targets of `target`'s family (IPv6 needs the host to have it).
    pub fn serves(&self, target: SocketAddr) -> bool {
        self.inner.sockets[target.is_ipv6() as usize].is_some()
    }

    /// Probes `target` once: `Ok` when it answers the SYN with a SYN-ACK. The caller bounds the
    /// wait (a probe that is dropped stops waiting and forgets its SYN).
    pub async fn probe(&self, target: SocketAddr) -> Result<(), String> {
        let Some(socket) = &self.inner.sockets[target.is_ipv6() as usize] else {
            return Err("no raw IPv6 socket".into());
        };
        let source = self.source_for(target.ip())?;
        let port =
            FIRST_PORT + (self.inner.next_port.fetch_add(1, Ordering::Relaxed) % PORTS) as u16;
        let seq = fastrand::u32(..);
        let (tx, rx) = oneshot::channel();
        let key = (target, port);
        lock(&self.inner.pending).insert(
            key,
            Pending {
                ack: seq.wrapping_add(1),
                answer: tx,
            },
        );
        let _forget = Forget(&self.inner, key, seq.wrapping_add(1));
        let segment = syn(source, target, port, seq);
        // A raw socket's destination port is 0: the segment holds the port.
        let (dest, dest_len) = socket_address(SocketAddr::new(target.ip(), 0));
        // SAFETY: a valid buffer and address of the stated sizes.
        let sent = unsafe {
            libc::sendto(
                socket.get_ref().as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&raw const dest).cast(),
                dest_len,
            )
        };
        if sent < 0 {
            return Err(format!("send SYN: {}", io::Error::last_os_error()));
        }
        rx.await
            .unwrap_or_else(|_| Err("the probe socket closed".into()))
    }

    /// The address the kernel would send from towards `target`, looked up with an unbound UDP
    /// socket (connect sends nothing) and kept for `SOURCE_TTL`.
    fn source_for(&self, target: IpAddr) -> Result<IpAddr, String> {
        if let Some((source, at)) = lock(&self.inner.sources).get(&target)
            && at.elapsed() < SOURCE_TTL
        {
            return Ok(*source);
        }
        let route = || -> io::Result<IpAddr> {
            let any: IpAddr = if target.is_ipv6() {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            let socket = UdpSocket::bind((any, 0))?;
            socket.connect((target, 9))?;
            Ok(socket.local_addr()?.ip())
        };
        let source = route().map_err(|e| format!("no route: {e}"))?;
        lock(&self.inner.sources).insert(target, (source, Instant::now()));
        Ok(source)
    }
}

/// Removes a probe from the pending ones when it ends, answered or not; only its own entry,
/// identified by its acknowledgement number, should a later probe have taken the same key.
struct Forget<'a>(&'a Inner, (SocketAddr, u16), u32);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut pending = lock(&self.0.pending);
        if pending.get(&self.1).is_some_and(|p| p.ack == self.2) {
            pending.remove(&self.1);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // No code panics while holding these locks; a poisoned one still holds consistent data.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The raw TCP socket of one family (`ipv6`), non-blocking, with the filter that keeps only
/// answers to probes.
fn raw_socket(ipv6: bool) -> io::Result<AsyncFd<OwnedFd>> {
    let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    keep_only_probe_ports(&fd, ipv6)?;
    // Bursts of answers while the task waits for its turn: 2 MiB is a few thousand segments.
    set_socket_option(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &(2 << 20))?;
    // SAFETY: an OwnedFd keeps its descriptor open, and the same, until the AsyncFd drops it.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// `addr` as the kernel takes it, and its length.
fn socket_address(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage, which holds either kind of address.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for any sockaddr.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Reads answers on the socket of `family` (0 IPv4, 1 IPv6) until the runtime shuts down.
async fn receive(inner: Arc<Inner>, family: usize) {
    let Some(socket) = &inner.sockets[family] else {
        return;
    };
    let mut buf = [0u8; 256];
    loop {
        let Ok(mut ready) = socket.readable().await else {
            return;
        };
        loop {
            // SAFETY: all-zero is a valid sockaddr_storage.
            let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut from_len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: reading into a buffer and an address of the stated sizes.
            let n = unsafe {
                libc::recvfrom(
                    socket.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                ready.clear_ready();
                break;
            }
            let packet = &buf[..n as usize];
            if family == 0 {
                answer_ipv4(&inner, packet);
            } else if from.ss_family == libc::AF_INET6 as libc::sa_family_t {
                // SAFETY: the kernel wrote an IPv6 address, as its family says.
                let from = unsafe { (&raw const from).cast::<libc::sockaddr_in6>().read() };
                answer(
                    &inner,
                    Ipv6Addr::from(from.sin6_addr.s6_addr).into(),
                    packet,
                );
            }
        }
    }
}

/// Hands an IPv4 packet carrying TCP to the probe it answers, if any.
fn answer_ipv4(inner: &Inner, packet: &[u8]) {
    let Some(&first) = packet.first() else {
        return;
    };
    let ihl = (first & 0x0f) as usize * 4;
    let (Some(ip), Some(tcp)) = (packet.get(..20), packet.get(ihl..)) else {
        return;
    };
    answer(
        inner,
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]).into(),
        tcp,
    );
}

/// Hands a TCP segment from `from` to the probe it answers, if any.
fn answer(inner: &Inner, from: IpAddr, tcp: &[u8]) {
    let Some(tcp) = tcp.get(..20) else {
        return;
    };
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let flags = tcp[13];
    let outcome = if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        Ok(())
    } else if flags & TCP_RST != 0 {
        Err("connection refused".to_owned())
    } else {
        return;
    };
    let key = (SocketAddr::new(from, sport), dport);
    let mut pending = lock(&inner.pending);
    // Anything else on these ports (a stale answer, someone else's segment) is ignored.
    if pending.get(&key).is_some_and(|p| p.ack == ack)
        && let Some(probe) = pending.remove(&key)
    {
        let _ = probe.answer.send(outcome);
    }
}

/// A SYN from `source:port` to `target` with sequence number `seq` and an MSS option, its
/// checksum over the pseudo-header of the family.
fn syn(source: IpAddr, target: SocketAddr, port: u16, seq: u32) -> [u8; 24] {
    let mut s = [0u8; 24];
    s[0..2].copy_from_slice(&port.to_be_bytes());
    s[2..4].copy_from_slice(&target.port().to_be_bytes());
    s[4..8].copy_from_slice(&seq.to_be_bytes());
    s[12] = 6 << 4; // 6 words of header
    s[13] = TCP_SYN;
    s[14..16].copy_from_slice(&64240u16.to_be_bytes());
    s[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u32;
        }
    };
    let octets = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    add(&octets(source));
    add(&octets(target.ip()));
    // Protocol and length: as 16-bit words in IPv4's pseudo-header, 32-bit in IPv6's, which
    // sum the same.
    add(&[0, libc::IPPROTO_TCP as u8, 0, s.len() as u8]);
    add(&s);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    s[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    s
}

/// A classic BPF filter on the raw socket: only segments to the probes' ports are queued, not
/// every TCP segment the host receives. An IPv4 socket's filter sees the IP header first, an
/// IPv6 one's the TCP header.
fn keep_only_probe_ports(fd: &OwnedFd, ipv6: bool) -> io::Result<()> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let program = [
        // X = IP header length (IPv4), or 0.
        if ipv6 {
            op(libc::BPF_LDX | libc::BPF_IMM, 0, 0, 0)
        } else {
            op(libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH, 0, 0, 0)
        },
        // A = TCP destination port.
        op(libc::BPF_LD | libc::BPF_H | libc::BPF_IND, 0, 0, 2),
        op(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            0,
            1,
            FIRST_PORT as u32,
        ),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // The kernel copies the program during the call.
    set_socket_option(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both families, on loopback: an open port answers, a closed one refuses, and the
    /// listener never has a connection to accept.
    #[tokio::test]
    async fn a_listening_port_answers_and_a_closed_one_refuses() {
        let prober = HalfOpen::open().expect("raw socket (run as root)");
        for any in ["127.0.0.1:0", "[::1]:0"] {
            let listener = std::net::TcpListener::bind(any).unwrap();
            let open = listener.local_addr().unwrap();
            let closed = std::net::TcpListener::bind(any)
                .unwrap()
                .local_addr()
                .unwrap();
            assert!(prober.serves(open), "{any}");
            let wait = |p| tokio::time::timeout(Duration::from_secs(2), p);
            for _ in 0..3 {
                assert_eq!(wait(prober.probe(open)).await, Ok(Ok(())), "{any}");
                assert_eq!(
                    wait(prober.probe(closed)).await,
                    Ok(Err("connection refused".to_owned())),
                    "{any}"
                );
            }
            // Half-open: the listener never had a connection to accept.
            listener.set_nonblocking(true).unwrap();
            assert_eq!(
                listener.accept().unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            assert!(lock(&prober.inner.pending).is_empty());
        }
    }

    /// Summing the pseudo-header and the segment, checksum included, gives all ones, in both
    /// families.
    #[test]
    fn syn_checksum_verifies() {
        let cases: [(IpAddr, IpAddr); 2] = [
            (
                Ipv4Addr::new(198, 51, 100, 3).into(),
                Ipv4Addr::new(198, 51, 100, 11).into(),
            ),
            (
                "2001:db8:1::3".parse().unwrap(),
                "2001:db8:1::11".parse().unwrap(),
            ),
        ];
        for (source, target) in cases {
            let s = syn(source, SocketAddr::new(target, 80), 61234, 0x0102_0304);
            let mut bytes = Vec::new();
            for a in [source, target] {
                match a {
                    IpAddr::V4(a) => bytes.extend(a.octets()),
                    IpAddr::V6(a) => bytes.extend(a.octets()),
                }
            }
            bytes.extend([0, 0, 0, 6, 0, 0, 0, 24]);
            bytes.extend(s);
            let mut sum: u32 = bytes
                .chunks(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]) as u32)
                .sum();
            while sum >> 16 != 0 {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            assert_eq!(sum, 0xffff, "{target}");
            assert_eq!(s[13], TCP_SYN);
        }
    }
}
