//! TCP health checks as half-open handshakes: a SYN from one raw socket, and the target's SYN-ACK
//! (something listens) or reset (nothing does) back. The kernel answers the SYN-ACK with a reset
//! of its own, since no socket owns the probe's port, so the target is left with nothing open.
//!
//! A full `connect` costs the checker a socket, an epoll registration, a handshake and a close
//! per probe; at 10,000 targets probed every second that was half a core. This costs one
//! segment out and one in.

use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
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
    socket: AsyncFd<OwnedFd>,
    /// Probes waiting for an answer, by target and source port.
    pending: Mutex<HashMap<(SocketAddrV4, u16), Pending>>,
    /// The local address the route to each target leaves from (the TCP checksum covers it).
    sources: Mutex<HashMap<Ipv4Addr, (Ipv4Addr, Instant)>>,
    next_port: AtomicU32,
}

struct Pending {
    /// The acknowledgement number a genuine answer carries: our sequence number plus one.
    ack: u32,
    answer: oneshot::Sender<Result<(), String>>,
}

impl HalfOpen {
    /// Opens the raw socket (which needs CAP_NET_RAW) and starts the task that reads answers,
    /// which runs as long as the tokio runtime it was started in.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        keep_only_probe_ports(&fd)?;
        // Bursts of answers while the task waits for its turn: 2 MiB is a few thousand segments.
        set_socket_option(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &(2 << 20))?;
        // SAFETY: an OwnedFd keeps its descriptor open, and the same, until the AsyncFd drops it.
        let socket = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        let inner = Arc::new(Inner {
            socket,
            pending: Mutex::default(),
            sources: Mutex::default(),
            next_port: AtomicU32::new(fastrand::u32(..PORTS)),
        });
        tokio::spawn(receive(inner.clone()));
        Ok(HalfOpen { inner })
    }

    /// Probes `target` once: `Ok` when it answers the SYN with a SYN-ACK. The caller bounds the
    /// wait (a probe that is dropped stops waiting and forgets its SYN).
    pub async fn probe(&self, target: SocketAddrV4) -> Result<(), String> {
        let source = self.source_for(*target.ip())?;
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
        let dest = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(target.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid buffer and address of the stated sizes.
        let sent = unsafe {
            libc::sendto(
                self.inner.socket.get_ref().as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&dest as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
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
    fn source_for(&self, target: Ipv4Addr) -> Result<Ipv4Addr, String> {
        if let Some((source, at)) = lock(&self.inner.sources).get(&target)
            && at.elapsed() < SOURCE_TTL
        {
            return Ok(*source);
        }
        let route = || -> io::Result<Ipv4Addr> {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.connect((target, 9))?;
            match socket.local_addr()? {
                std::net::SocketAddr::V4(addr) => Ok(*addr.ip()),
                std::net::SocketAddr::V6(_) => Err(io::ErrorKind::Unsupported.into()),
            }
        };
        let source = route().map_err(|e| format!("no route: {e}"))?;
        lock(&self.inner.sources).insert(target, (source, Instant::now()));
        Ok(source)
    }
}

/// Removes a probe from the pending ones when it ends, answered or not; only its own entry,
/// identified by its acknowledgement number, should a later probe have taken the same key.
struct Forget<'a>(&'a Inner, (SocketAddrV4, u16), u32);

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

/// Reads answers until the runtime shuts down.
async fn receive(inner: Arc<Inner>) {
    let mut buf = [0u8; 256];
    loop {
        let Ok(mut ready) = inner.socket.readable().await else {
            return;
        };
        loop {
            // SAFETY: reading into a buffer of the stated size.
            let n = unsafe {
                libc::recv(
                    inner.socket.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                ready.clear_ready();
                break;
            }
            answer(&inner, &buf[..n as usize]);
        }
    }
}

/// Hands an IPv4 packet carrying TCP to the probe it answers, if any.
fn answer(inner: &Inner, packet: &[u8]) {
    let Some(&first) = packet.first() else {
        return;
    };
    let ihl = (first & 0x0f) as usize * 4;
    let (Some(ip), Some(tcp)) = (packet.get(..20), packet.get(ihl..ihl + 20)) else {
        return;
    };
    let from = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
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
    let key = (SocketAddrV4::new(from, sport), dport);
    let mut pending = lock(&inner.pending);
    // Anything else on these ports (a stale answer, someone else's segment) is ignored.
    if pending.get(&key).is_some_and(|p| p.ack == ack)
        && let Some(probe) = pending.remove(&key)
    {
        let _ = probe.answer.send(outcome);
    }
}

/// A SYN from `source:port` to `target` with sequence number `seq` and an MSS option.
fn syn(source: Ipv4Addr, target: SocketAddrV4, port: u16, seq: u32) -> [u8; 24] {
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
    add(&source.octets());
    add(&target.ip().octets());
    add(&[0, libc::IPPROTO_TCP as u8, 0, s.len() as u8]);
    add(&s);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    s[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    s
}

/// A classic BPF filter on the raw socket: only segments to the probes' ports are queued, not
/// every TCP segment the host receives.
fn keep_only_probe_ports(fd: &OwnedFd) -> io::Result<()> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let program = [
        // X = IP header length.
        op(libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH, 0, 0, 0),
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

    #[tokio::test]
    async fn a_listening_port_answers_and_a_closed_one_refuses() {
        let prober = HalfOpen::open().expect("raw socket (run as root)");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(open) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let std::net::SocketAddr::V4(a) = l.local_addr().unwrap() else {
                unreachable!()
            };
            a
        };
        let wait = |p| tokio::time::timeout(Duration::from_secs(2), p);
        for _ in 0..3 {
            assert_eq!(wait(prober.probe(open)).await, Ok(Ok(())));
            assert_eq!(
                wait(prober.probe(closed)).await,
                Ok(Err("connection refused".to_owned()))
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

    #[test]
    fn syn_checksum_verifies() {
        let s = syn(
            Ipv4Addr::new(198, 51, 100, 3),
            SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 11), 80),
            61234,
            0x0102_0304,
        );
        // Summing the pseudo-header and the segment, checksum included, gives all ones.
        let mut sum: u32 = [
            198u32 << 8 | 51,
            100 << 8 | 3,
            198 << 8 | 51,
            100 << 8 | 11,
            6,
            24,
        ]
        .iter()
        .sum();
        for pair in s.chunks(2) {
            sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        assert_eq!(s[13], TCP_SYN);
    }
}
