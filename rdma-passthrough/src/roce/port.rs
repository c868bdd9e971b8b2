//! A RoCE port: one UDP socket (port 4791 on an address the user picks)
//! and one thread that receives, dispatches by destination QPN, and
//! transmits for every connected QP. The thread sleeps in `ppoll` on the
//! socket and a doorbell eventfd whenever it has nothing to do, with the
//! nearest retransmit or RNR timer as its timeout: no busy polling.
//!
//! Every datagram is parsed ([`super::wire::parse`]) and its ICRC checked
//! before anything reads it; bad ones are dropped and counted
//! ([`RoceStatsSnapshot`]; `tests/roce_crafted.rs::crafted_packets_are_dropped_or_naked_and_counted`).
//! The window is clamped to the receive buffer the kernel grants
//! (`tests/roce.rs::small_socket_buffers_do_not_livelock_reads`).

use super::icrc::{self, Ipv4Meta};
use super::memory::Faults;
use super::qp::{RcQp, RemoteEnd};
use super::stats::{RoceStats, RoceStatsSnapshot};
use super::wire::*;
use super::RoceConfig;
use crate::emulated::{EmulatedRnic, Qp};
use crate::verbs::{RecvWr, SendWr, VerbsError};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Datagrams taken from the socket per turn before transmitting.
const RX_BURST: usize = 64;
/// Packets one QP may send per turn (others get the port in between).
const TX_BURST: u32 = 32;
/// Longest sleep with nothing pending (a missed doorbell costs at most
/// this).
const IDLE_SLEEP: Duration = Duration::from_millis(20);

/// Sends sealed packets from the port's socket.
pub(crate) struct Wire {
    sock: UdpSocket,
    local: SocketAddrV4,
    pkt: Vec<u8>,
    pub(crate) stats: Arc<RoceStats>,
    /// A send found the socket buffer full: wait for POLLOUT.
    blocked: bool,
}

impl Wire {
    /// Build, seal and send one packet. False if it did not go out (socket
    /// buffer full, or an error, counted).
    pub(crate) fn send(
        &mut self,
        to: SocketAddrV4,
        bth: Bth,
        reth: Option<&Reth>,
        aeth: Option<&Aeth>,
        payload: &[u8],
    ) -> bool {
        build(&mut self.pkt, bth, reth, aeth, payload);
        let meta = Ipv4Meta::linux_df(*self.local.ip(), *to.ip());
        icrc::seal(&meta, self.local.port(), to.port(), &mut self.pkt);
        match self.sock.send_to(&self.pkt, to) {
            Ok(_) => {
                self.stats.tx_packets.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.stats.send_would_block.fetch_add(1, Ordering::Relaxed);
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.blocked = true;
                } else {
                    log::debug!("roce {}: send to {to}: {e}", self.local);
                }
                false
            }
        }
    }
}

struct PortInner {
    /// Held (not just its shared state) so the device thread outlives the
    /// port: memory regions dropped meanwhile still get their deregistration
    /// confirmed.
    rnic: Arc<EmulatedRnic>,
    local: SocketAddrV4,
    config: RoceConfig,
    stats: Arc<RoceStats>,
    adds: Mutex<Vec<RcQp>>,
    doorbell: OwnedFd,
    stop: AtomicBool,
}

impl PortInner {
    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to an eventfd this port
        // owns; a full counter (EAGAIN) already means "wake up".
        unsafe {
            libc::write(
                self.doorbell.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// A RoCEv2 port of an emulated RNIC.
pub struct RocePort {
    inner: Arc<PortInner>,
    thread: Option<JoinHandle<()>>,
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live i32 and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(fd: i32, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: passes a pointer to a live i32 and its size.
    let rc =
        unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut i32).cast(), &mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl RocePort {
    /// Bind `addr` (a specific IPv4 address: the ICRC covers it) and start
    /// the port thread.
    pub fn bind(
        rnic: &Arc<EmulatedRnic>,
        addr: SocketAddrV4,
        config: RoceConfig,
    ) -> io::Result<RocePort> {
        config.validate()?;
        if addr.ip().is_unspecified() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a RoCE port needs a specific IPv4 address (the ICRC covers it), not 0.0.0.0",
            ));
        }
        let sock = UdpSocket::bind(addr)?;
        let fd = sock.as_raw_fd();
        // DF set and, the socket being unconnected, IP ID 0: the IPv4
        // header the ICRC covers is known (see icrc.rs).
        setsockopt_int(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )?;
        let buf = config.socket_buffer as i32;
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt_int(fd, libc::SOL_SOCKET, force, buf).is_err() {
                setsockopt_int(fd, libc::SOL_SOCKET, plain, buf)?;
            }
        }
        sock.set_nonblocking(true)?;
        // The window must fit the receive buffer the kernel granted (an
        // unprivileged process gets at most net.core.rmem_max): a window
        // of READ responses larger than the peer's buffer overflows it on
        // every burst, and go-back-N then never catches up.
        let mut config = config;
        let granted = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)?.max(0) as usize;
        // The kernel reports twice what it accounts to payload, and each
        // datagram costs its buffer (truesize) on top of the payload.
        let fits = (granted / 2 / (config.mtu + 1024)).max(8) as u32;
        if fits < config.window {
            log::info!(
                "roce {addr}: receive buffer of {granted} bytes fits {fits} packets; window {} -> {fits}",
                config.window
            );
            config.window = fits;
        }
        let local = match sock.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
        };
        // SAFETY: eventfd with valid flags; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor nothing else owns.
        let doorbell = unsafe { OwnedFd::from_raw_fd(efd) };
        let stats = Arc::new(RoceStats::default());
        let inner = Arc::new(PortInner {
            rnic: rnic.clone(),
            local,
            config,
            stats: stats.clone(),
            adds: Mutex::new(Vec::new()),
            doorbell,
            stop: AtomicBool::new(false),
        });
        let wire = Wire {
            sock,
            local,
            pkt: Vec::with_capacity(inner.config.mtu + 64),
            stats,
            blocked: false,
        };
        let i = inner.clone();
        let thread = std::thread::Builder::new()
            .name(format!("roce-{local}"))
            .spawn(move || run(i, wire))?;
        Ok(RocePort {
            inner,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddrV4 {
        self.inner.local
    }

    pub fn config(&self) -> &RoceConfig {
        &self.inner.config
    }

    /// Connect `qp` to a QP of another RNIC. `local_psn` is our first send
    /// PSN (the peer's expected PSN). From now on this port, not the
    /// device thread, drives the QP's queues.
    pub fn connect(&self, qp: &Qp, local_psn: u32, remote: RemoteEnd) -> Result<(), VerbsError> {
        let state = qp.state.clone();
        if state.remote.load(Ordering::Acquire) != 0 {
            return Err(VerbsError::Invalid(
                "the QP is already connected to a local peer".into(),
            ));
        }
        if state.roce.swap(true, Ordering::AcqRel) {
            return Err(VerbsError::Invalid("the QP is already connected".into()));
        }
        if remote.qpn & !QPN_MASK != 0 || remote.addr.ip().is_unspecified() {
            state.roce.store(false, Ordering::Release);
            return Err(VerbsError::Invalid(format!(
                "bad remote end {}:{:#x}",
                remote.addr, remote.qpn
            )));
        }
        let rc = RcQp::new(
            state,
            local_psn,
            remote,
            self.inner.config.clone(),
            self.inner.stats.clone(),
        );
        self.inner.adds.lock().push(rc);
        self.inner.kick();
        Ok(())
    }

    /// Wake the port thread: work was posted on one of its QPs.
    pub fn kick(&self) {
        self.inner.kick();
    }

    /// `ibv_post_send` on a QP of this port (queues and rings).
    pub fn post_send(&self, qp: &Qp, wr: SendWr) -> Result<(), VerbsError> {
        qp.post_send(wr)?;
        self.inner.kick();
        Ok(())
    }

    /// `ibv_post_recv` on a QP of this port.
    pub fn post_recv(&self, qp: &Qp, wr: RecvWr) -> Result<(), VerbsError> {
        qp.post_recv(wr)?;
        self.inner.kick();
        Ok(())
    }

    pub fn stats(&self) -> RoceStatsSnapshot {
        self.inner.stats.snapshot()
    }
}

impl Drop for RocePort {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(inner: Arc<PortInner>, mut wire: Wire) {
    let mut qps: HashMap<u32, RcQp> = HashMap::new();
    let mut faults = Faults::new();
    let mut rx = vec![0u8; 1 << 16];
    while !inner.stop.load(Ordering::SeqCst) {
        for q in inner.adds.lock().drain(..) {
            qps.insert(q.qp.qpn, q);
        }
        qps.retain(|_, q| !q.qp.destroyed.load(Ordering::Acquire));
        let mut worked = false;
        for _ in 0..RX_BURST {
            match wire.sock.recv_from(&mut rx) {
                Ok((n, SocketAddr::V4(from))) => {
                    worked = true;
                    dispatch(&inner, &mut qps, &mut wire, &mut faults, from, &rx[..n]);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("roce {}: recv: {e}", inner.local);
                    break;
                }
            }
        }
        let now = Instant::now();
        wire.blocked = false;
        for q in qps.values_mut() {
            worked |= q.transmit(&inner.rnic.shared, &mut wire, &mut faults, now, TX_BURST);
        }
        if worked {
            continue;
        }
        let next = qps.values().filter_map(|q| q.next_event()).min();
        let timeout = next
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(IDLE_SLEEP)
            .min(IDLE_SLEEP);
        sleep(&inner, &wire, timeout);
    }
}

/// Wait for a datagram, the doorbell, socket room (if a send blocked) or
/// `timeout`.
fn sleep(inner: &PortInner, wire: &Wire, timeout: Duration) {
    let mut fds = [
        libc::pollfd {
            fd: wire.sock.as_raw_fd(),
            events: libc::POLLIN | if wire.blocked { libc::POLLOUT } else { 0 },
            revents: 0,
        },
        libc::pollfd {
            fd: inner.doorbell.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: two valid pollfds and a live timespec; no signal mask.
    unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if fds[1].revents & libc::POLLIN != 0 {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from the port's eventfd.
        unsafe {
            libc::read(
                inner.doorbell.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

fn dispatch(
    inner: &PortInner,
    qps: &mut HashMap<u32, RcQp>,
    wire: &mut Wire,
    faults: &mut Faults,
    from: SocketAddrV4,
    data: &[u8],
) {
    let stats = &inner.stats;
    stats.rx_packets.fetch_add(1, Ordering::Relaxed);
    let pkt = match parse(data) {
        Ok(p) => p,
        Err(e) => {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            log::trace!("roce {}: from {from}: {e}", inner.local);
            return;
        }
    };
    let meta = Ipv4Meta::linux_df(*from.ip(), *inner.local.ip());
    if !icrc::verify(&meta, from.port(), inner.local.port(), data) {
        stats.bad_icrc.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let Some(q) = qps.get_mut(&pkt.bth.dest_qp) else {
        stats.unknown_qpn.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if from != q.remote {
        stats.wrong_source.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if pkt.bth.op.is_request() {
        q.on_request(&inner.rnic.shared, wire, faults, &pkt);
    } else if let (Op::Acknowledge, Some(aeth)) = (pkt.bth.op, pkt.aeth) {
        q.on_ack(pkt.bth.psn, aeth);
    } else {
        q.on_read_response(&inner.rnic.shared, faults, &pkt);
    }
}
