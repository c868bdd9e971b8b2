//! Guest queue pairs to another odpvm over RoCEv2 (`rdma_passthrough::roce`).
//!
//! Set-up follows perftest's default: the two VMMs exchange, over a TCP
//! connection one of them listens for, one line each naming their RoCE
//! address (the GID), the rkey of an ODP MR covering exactly the window of
//! guest memory they expose (nothing else of the guest is reachable:
//! `adversary_roce::rdma_outside_the_advertised_window_is_naked`), the
//! window, and per queue-pair bank its QPN and first PSN. Each side then
//! connects its banks' QPs to the other's. A listener drops a peer that
//! does not complete the exchange within 10 s and accepts the next, until
//! the run's `--timeout` (`a_silent_exchange_peer_does_not_hang_the_vmm`).
//! The guest sees the peer's window in PEER_ADDR/LEN/RKEY, as with the
//! host peer:
//!
//! * `[0, len/2)` — where the other guest RDMA WRITEs (stamped pages,
//!   checked by [`RoceLink::stale_pages`]);
//! * `[len/2, 3len/4)` — pages stamped `READ_STAMP_MAGIC | page` that the
//!   other guest RDMA READs and checks.
//!
//! The exchange line is untrusted input: [`Info::parse`] bounds every
//! field and fails with a message, never a panic (unit tests below).

use super::device::RnicDevice;
use super::peer::READ_STAMP_MAGIC;
use super::GuestMemory;
use rdma_passthrough::{Pd, Qp, RemoteEnd, RoceConfig, RocePort};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The other side's window, as the guest's PEER registers report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteWindow {
    pub base: u64,
    pub len: u64,
    pub rkey: u32,
}

/// A device's RoCE connection: its port and the peer's window.
pub struct RoceRemote {
    pub port: Arc<RocePort>,
    pub window: RemoteWindow,
}

/// How the two VMMs meet.
#[derive(Clone, Debug)]
pub enum Exchange {
    /// Wait for the peer's TCP connection on this address.
    Listen(SocketAddr),
    /// Connect to a peer listening here (retrying until `CONNECT_PATIENCE`).
    Connect(SocketAddr),
}

#[derive(Clone, Debug)]
pub struct RoceOptions {
    /// The RNIC's RoCE port (UDP).
    pub bind: SocketAddrV4,
    pub exchange: Exchange,
    /// Path MTU, 1024 or 4096.
    pub mtu: usize,
    /// The window of our guest memory the peer may reach.
    pub window_base: u64,
    pub window_len: u64,
    /// How long to wait for a peer to complete the exchange (the run's
    /// `--timeout`; `EXCHANGE_PATIENCE` without one).
    pub patience: Option<Duration>,
}

/// Why a RoCE link could not be set up. The exchange line comes from the
/// network: every field error names the field and the offending text.
#[derive(Debug, thiserror::Error)]
pub enum RoceLinkError {
    #[error("the peer did not speak {MAGIC} (got {0:?})")]
    NotTheProtocol(String),
    #[error("bad {what} {value:?} in the peer's RoCE exchange")]
    BadField { what: &'static str, value: String },
    #[error("the peer's RoCE exchange has no {0}")]
    Missing(&'static str),
    #[error("the peer's RoCE exchange lists more than {MAX_QPS} queue pairs")]
    TooManyQps,
    #[error("the peer's window {base:#x}+{len:#x} overflows")]
    WindowOverflows { base: u64, len: u64 },
    #[error("the RoCE window of {0} bytes is too small (at least 16 MiB)")]
    WindowTooSmall(u64),
    #[error(
        "the peer has {peer} queue-pair banks, this VM {ours}: start both with the same --vcpus"
    )]
    BankMismatch { peer: usize, ours: usize },
    #[error("RoCE exchange: {what} {at}: {source}")]
    Io {
        what: &'static str,
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("RoCE port {bind}: {source}")]
    Port {
        bind: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
    #[error("the RoCE exchange did not complete")]
    Incomplete,
    #[error("no RoCE peer completed the exchange within {0:?}")]
    NoPeer(Duration),
    #[error("registering the RoCE window's memory region: {0}")]
    WindowMr(#[source] rdma_passthrough::VerbsError),
    #[error("RoCE queue pairs: {0}")]
    Verbs(#[from] rdma_passthrough::VerbsError),
}

fn bad(what: &'static str, value: &str) -> RoceLinkError {
    RoceLinkError::BadField {
        what,
        value: value.chars().take(40).collect(),
    }
}

/// Most queue-pair banks an exchange line may list.
const MAX_QPS: usize = 256;

/// How long a connecting side keeps trying while the listener starts.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// How long a listener waits for a peer to complete the exchange, without
/// a `--timeout`.
const EXCHANGE_PATIENCE: Duration = Duration::from_secs(600);
/// How long one connected peer may take to send its exchange line: a
/// silent or slow one is dropped (and, listening, the next one accepted).
const LINE_PATIENCE: Duration = Duration::from_secs(10);
/// Longest exchange line accepted.
const MAX_LINE: u64 = 4096;
const MAGIC: &str = "odpvm-roce-v1";

/// One side's exchange message (perftest's "QP info").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub addr: SocketAddrV4,
    pub rkey: u32,
    pub base: u64,
    pub len: u64,
    /// Per bank: QPN and first PSN.
    pub qps: Vec<(u32, u32)>,
}

impl Info {
    pub fn line(&self) -> String {
        let qps: Vec<String> = self
            .qps
            .iter()
            .map(|(q, p)| format!("{q:#x}:{p:#x}"))
            .collect();
        format!(
            "{MAGIC} addr={} rkey={:#x} window={:#x}+{:#x} qps={}\n",
            self.addr,
            self.rkey,
            self.base,
            self.len,
            qps.join(",")
        )
    }

    pub fn parse(line: &str) -> Result<Info, RoceLinkError> {
        let hex = |s: &str, what: &'static str| {
            u64::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|_| bad(what, s))
        };
        let mut words = line.split_whitespace();
        if words.next() != Some(MAGIC) {
            return Err(RoceLinkError::NotTheProtocol(
                line.chars().take(40).collect(),
            ));
        }
        let (mut addr, mut rkey, mut window, mut qps) = (None, None, None, None);
        for w in words {
            let (k, v) = w.split_once('=').ok_or_else(|| bad("field", w))?;
            match k {
                "addr" => addr = Some(v.parse::<SocketAddrV4>().map_err(|_| bad("address", v))?),
                "rkey" => rkey = Some(u32::try_from(hex(v, "rkey")?).map_err(|_| bad("rkey", v))?),
                "window" => {
                    let (b, l) = v.split_once('+').ok_or_else(|| bad("window", v))?;
                    window = Some((hex(b, "window base")?, hex(l, "window length")?));
                }
                "qps" => {
                    let mut list = Vec::new();
                    for item in v.split(',').filter(|s| !s.is_empty()) {
                        let (q, p) = item.split_once(':').ok_or_else(|| bad("qpn:psn", item))?;
                        let (q, p) = (hex(q, "QPN")?, hex(p, "PSN")?);
                        if q > 0xff_ffff || p > 0xff_ffff {
                            return Err(bad("24-bit QPN:PSN", item));
                        }
                        list.push((q as u32, p as u32));
                        if list.len() > MAX_QPS {
                            return Err(RoceLinkError::TooManyQps);
                        }
                    }
                    qps = Some(list);
                }
                _ => {} // newer fields are ignored
            }
        }
        let (base, len) = window.ok_or(RoceLinkError::Missing("window"))?;
        if base.checked_add(len).is_none() {
            return Err(RoceLinkError::WindowOverflows { base, len });
        }
        Ok(Info {
            addr: addr.ok_or(RoceLinkError::Missing("address"))?,
            rkey: rkey.ok_or(RoceLinkError::Missing("rkey"))?,
            base,
            len,
            qps: qps.ok_or(RoceLinkError::Missing("queue pairs"))?,
        })
    }
}

/// A first PSN for a queue pair (perftest draws one at random).
fn initial_psn(i: usize) -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let x =
        (t ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    ((x >> 40) as u32) & 0xff_ffff
}

fn io_error(what: &'static str, at: impl ToString) -> impl FnOnce(std::io::Error) -> RoceLinkError {
    let at = at.to_string();
    move |source| RoceLinkError::Io { what, at, source }
}

/// Connect to a listening peer, retrying until `CONNECT_PATIENCE`.
fn connect_to(to: &SocketAddr) -> Result<TcpStream, RoceLinkError> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match TcpStream::connect_timeout(to, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                log::debug!("roce: connecting to {to}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(io_error("connect to", to)(e)),
        }
    }
}

/// A device connected to another odpvm: the exchange connection stays open
/// while both run (its end tells the other side the peer is gone).
pub struct RoceLink {
    pub stream: TcpStream,
    pub peer: Info,
    pub local: Info,
    /// The MR the peer's rkey names: exactly our window.
    _window_mr: Option<rdma_passthrough::Mr>,
}

/// Bind the RoCE port, meet the peer, exchange, connect every bank's QP.
pub fn link(dev: &RnicDevice, opts: &RoceOptions) -> Result<RoceLink, RoceLinkError> {
    if opts.window_len < 16 << 20 {
        return Err(RoceLinkError::WindowTooSmall(opts.window_len));
    }
    let config = RoceConfig {
        mtu: opts.mtu,
        ..RoceConfig::default()
    };
    let port = Arc::new(
        RocePort::bind(dev.rnic(), opts.bind, config).map_err(|source| RoceLinkError::Port {
            bind: opts.bind,
            source,
        })?,
    );
    let mut result = None;
    let mut window_mr = None;
    dev.attach_roce(|pd: &Pd, qps: &[&Qp]| {
        // The peer's rkey names an MR of exactly the advertised window, not
        // the guest-RAM MR: anything outside it is a remote access error
        // (`rdma_outside_the_advertised_window_is_naked`).
        let mr = dev
            .rnic()
            .reg_mr(
                pd,
                opts.window_base,
                opts.window_len,
                rdma_passthrough::Access::ALL_REMOTE | rdma_passthrough::Access::ON_DEMAND,
            )
            .map_err(RoceLinkError::WindowMr)?;
        let local = Info {
            addr: port.local_addr(),
            rkey: mr.rkey(),
            base: opts.window_base,
            len: opts.window_len,
            qps: qps
                .iter()
                .enumerate()
                .map(|(i, q)| (q.qpn(), initial_psn(i)))
                .collect(),
        };
        let patience = opts.patience.unwrap_or(EXCHANGE_PATIENCE);
        let (stream, peer) = exchange(&opts.exchange, &local, patience)?;
        if peer.qps.len() != qps.len() {
            return Err(RoceLinkError::BankMismatch {
                peer: peer.qps.len(),
                ours: qps.len(),
            });
        }
        for ((qp, &(_, psn)), &(rqpn, rpsn)) in qps.iter().zip(&local.qps).zip(&peer.qps) {
            port.connect(
                qp,
                psn,
                RemoteEnd {
                    addr: peer.addr,
                    qpn: rqpn,
                    psn: rpsn,
                },
            )?;
        }
        let window = RemoteWindow {
            base: peer.base,
            len: peer.len,
            rkey: peer.rkey,
        };
        window_mr = Some(mr);
        result = Some(RoceLink {
            stream,
            peer,
            local,
            _window_mr: None,
        });
        Ok(super::roce::RoceRemote {
            port: port.clone(),
            window,
        })
    })?;
    let mut link = result.ok_or(RoceLinkError::Incomplete)?;
    link._window_mr = window_mr;
    Ok(link)
}

/// Meet the peer and swap exchange lines. Listening, a peer that fails the
/// exchange (silent past `LINE_PATIENCE`, or not speaking the protocol)
/// is dropped with a warning and the next one accepted, until `deadline`;
/// connecting, any failure is the error.
fn exchange(
    how: &Exchange,
    local: &Info,
    patience: Duration,
) -> Result<(TcpStream, Info), RoceLinkError> {
    let deadline = Instant::now() + patience;
    let swap = |stream: &TcpStream| -> Result<Info, RoceLinkError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let patience = LINE_PATIENCE.min(left).max(Duration::from_millis(1));
        stream
            .set_read_timeout(Some(patience))
            .and_then(|_| stream.set_write_timeout(Some(patience)))
            .map_err(io_error("configure", "the exchange connection"))?;
        let mut s = stream;
        s.write_all(local.line().as_bytes())
            .map_err(io_error("send to", "the peer"))?;
        let mut line = String::new();
        BufReader::new(s.take(MAX_LINE))
            .read_line(&mut line)
            .map_err(io_error("receive from", "the peer"))?;
        stream
            .set_read_timeout(None)
            .map_err(io_error("configure", "the exchange connection"))?;
        Info::parse(&line)
    };
    match how {
        Exchange::Connect(to) => {
            let stream = connect_to(to)?;
            let peer = swap(&stream)?;
            Ok((stream, peer))
        }
        Exchange::Listen(at) => {
            let l = TcpListener::bind(at).map_err(io_error("listen on", at))?;
            l.set_nonblocking(true).map_err(io_error("listen on", at))?;
            log::info!("roce: waiting for the peer on {at}");
            loop {
                match l.accept() {
                    Ok((stream, from)) => {
                        stream
                            .set_nonblocking(false)
                            .map_err(io_error("accept on", at))?;
                        match swap(&stream) {
                            Ok(peer) => {
                                log::info!("roce: peer {from} connected");
                                return Ok((stream, peer));
                            }
                            Err(e) => log::warn!("roce: dropping exchange peer {from}: {e}"),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(io_error("accept on", at)(e)),
                }
                if Instant::now() >= deadline {
                    return Err(RoceLinkError::NoPeer(patience));
                }
            }
        }
    }
}

impl RoceLink {
    /// Stamp the READ part of our window (`READ_STAMP_MAGIC | page`) for
    /// the peer's guest to read and check.
    pub fn stamp_read_span<E>(&self, write: impl Fn(u64, u64) -> Result<(), E>) -> Result<(), E> {
        let (base, len) = (self.local.base, self.local.len);
        for page in (len / 2 / mmu::PAGE_SIZE)..(3 * len / 4 / mmu::PAGE_SIZE) {
            write(base + page * mmu::PAGE_SIZE, READ_STAMP_MAGIC | page)?;
        }
        Ok(())
    }

    /// Pages of the WRITE part of our window whose stamp names another
    /// place: data the RNIC moved to the wrong page (stale). A page is
    /// zero (never written, or torn down since) or `(message << 32) | its
    /// own page index`.
    /// Only pages `present` says are mapped are read (the others are zero,
    /// and reading them would fault them in).
    pub fn stale_pages(&self, mem: &dyn GuestMemory, present: impl Fn(u64) -> bool) -> (u64, u64) {
        let (base, len) = (self.local.base, self.local.len);
        let (mut checked, mut stale) = (0, 0);
        for page in 0..len / 2 / mmu::PAGE_SIZE {
            if !present(base + page * mmu::PAGE_SIZE) {
                continue;
            }
            let mut b = [0u8; 8];
            if mem.read(base + page * mmu::PAGE_SIZE, &mut b).is_err() {
                continue;
            }
            let v = u64::from_le_bytes(b);
            if v == 0 {
                continue;
            }
            checked += 1;
            if v & 0xffff_ffff != page {
                stale += 1;
            }
        }
        (checked, stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_round_trips_and_bad_lines_are_errors() {
        let i = Info {
            addr: "10.0.0.2:4791".parse().unwrap(),
            rkey: 0x1234,
            base: 0x800_0000,
            len: 0x800_0000,
            qps: vec![(1, 0xabcdef), (2, 0)],
        };
        assert_eq!(Info::parse(&i.line()).unwrap(), i);
        for bad in [
            "",
            "hello",
            "odpvm-roce-v1",
            "odpvm-roce-v1 addr=1.2.3.4:1 rkey=1 window=0+1",
            "odpvm-roce-v1 addr=x rkey=1 window=0+1 qps=",
            "odpvm-roce-v1 addr=1.2.3.4:1 rkey=1ffffffff window=0+1 qps=",
            "odpvm-roce-v1 addr=1.2.3.4:1 rkey=1 window=ffffffffffffffff+2 qps=",
            "odpvm-roce-v1 addr=1.2.3.4:1 rkey=1 window=0+1 qps=1000000:0",
            "odpvm-roce-v1 addr=1.2.3.4:1 rkey=1 window=0+1 qps=1",
            "odpvm-roce-v1 addr=1.2.3.4:1 rkey=1 window=0 qps=1:1",
            "odpvm-roce-v1 garbage",
        ] {
            assert!(Info::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
