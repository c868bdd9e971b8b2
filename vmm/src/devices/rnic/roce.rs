//! Guest queue pairs to another odpvm over RoCEv2 (`rdma_passthrough::roce`).
//!
//! Set-up follows perftest's default: the two VMMs exchange, over a TCP
//! connection one of them listens for, one line each naming their RoCE
//! address (the GID), the rkey of their guest-RAM MR, the window of guest
//! memory they expose, and per queue-pair bank its QPN and first PSN. Each
//! side then connects its banks' QPs to the other's. The guest sees the
//! peer's window in PEER_ADDR/LEN/RKEY, as with the host peer:
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
}

/// How long a connecting side keeps trying while the listener starts.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
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

    pub fn parse(line: &str) -> Result<Info, String> {
        let hex = |s: &str, what: &str| {
            u64::from_str_radix(s.trim_start_matches("0x"), 16)
                .map_err(|_| format!("bad {what} {s:?} in the peer's RoCE exchange"))
        };
        let mut words = line.split_whitespace();
        if words.next() != Some(MAGIC) {
            return Err(format!(
                "the peer did not speak {MAGIC} (got {:?})",
                line.chars().take(40).collect::<String>()
            ));
        }
        let (mut addr, mut rkey, mut window, mut qps) = (None, None, None, None);
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("bad field {w:?} in the peer's RoCE exchange"))?;
            match k {
                "addr" => {
                    addr = Some(
                        v.parse::<SocketAddrV4>()
                            .map_err(|_| format!("bad address {v:?}"))?,
                    )
                }
                "rkey" => {
                    rkey = Some(u32::try_from(hex(v, "rkey")?).map_err(|_| "rkey too large")?)
                }
                "window" => {
                    let (b, l) = v.split_once('+').ok_or("window is base+len")?;
                    window = Some((hex(b, "window base")?, hex(l, "window length")?));
                }
                "qps" => {
                    let mut list = Vec::new();
                    for item in v.split(',').filter(|s| !s.is_empty()) {
                        let (q, p) = item.split_once(':').ok_or("a QP is qpn:psn")?;
                        let (q, p) = (hex(q, "QPN")?, hex(p, "PSN")?);
                        if q > 0xff_ffff || p > 0xff_ffff {
                            return Err(format!("QPN/PSN {item:?} is not 24 bits"));
                        }
                        list.push((q as u32, p as u32));
                        if list.len() > 256 {
                            return Err("too many queue pairs".into());
                        }
                    }
                    qps = Some(list);
                }
                _ => {} // newer fields are ignored
            }
        }
        let (base, len) = window.ok_or("no window")?;
        if base.checked_add(len).is_none() {
            return Err("window overflows".into());
        }
        Ok(Info {
            addr: addr.ok_or("no address")?,
            rkey: rkey.ok_or("no rkey")?,
            base,
            len,
            qps: qps.ok_or("no queue pairs")?,
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

fn meet(exchange: &Exchange) -> Result<TcpStream, String> {
    match exchange {
        Exchange::Listen(at) => {
            let l =
                TcpListener::bind(at).map_err(|e| format!("RoCE exchange: listen on {at}: {e}"))?;
            log::info!("roce: waiting for the peer on {at}");
            let (s, from) = l
                .accept()
                .map_err(|e| format!("RoCE exchange: accept on {at}: {e}"))?;
            log::info!("roce: peer {from} connected");
            Ok(s)
        }
        Exchange::Connect(to) => {
            let deadline = Instant::now() + CONNECT_PATIENCE;
            loop {
                match TcpStream::connect_timeout(to, Duration::from_secs(2)) {
                    Ok(s) => return Ok(s),
                    Err(e) if Instant::now() < deadline => {
                        log::debug!("roce: connecting to {to}: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return Err(format!("RoCE exchange: connect to {to}: {e}")),
                }
            }
        }
    }
}

/// A device connected to another odpvm: the exchange connection stays open
/// while both run (its end tells the other side the peer is gone).
pub struct RoceLink {
    pub stream: TcpStream,
    pub peer: Info,
    pub local: Info,
}

/// Bind the RoCE port, meet the peer, exchange, connect every bank's QP.
pub fn link(dev: &RnicDevice, opts: &RoceOptions) -> Result<RoceLink, String> {
    if opts.window_len < 16 << 20 {
        return Err(format!(
            "the RoCE window of {} bytes is too small (at least 16 MiB)",
            opts.window_len
        ));
    }
    let config = RoceConfig {
        mtu: opts.mtu,
        ..RoceConfig::default()
    };
    let port = Arc::new(
        RocePort::bind(dev.rnic(), opts.bind, config)
            .map_err(|e| format!("RoCE port {}: {e}", opts.bind))?,
    );
    let mut result = None;
    dev.attach_roce(|_pd: &Pd, qps: &[&Qp]| {
        let local = Info {
            addr: port.local_addr(),
            rkey: dev.lkey(),
            base: opts.window_base,
            len: opts.window_len,
            qps: qps
                .iter()
                .enumerate()
                .map(|(i, q)| (q.qpn(), initial_psn(i)))
                .collect(),
        };
        let mut stream = meet(&opts.exchange)?;
        stream
            .write_all(local.line().as_bytes())
            .map_err(|e| format!("RoCE exchange: send: {e}"))?;
        let mut line = String::new();
        BufReader::new((&stream).take(MAX_LINE))
            .read_line(&mut line)
            .map_err(|e| format!("RoCE exchange: receive: {e}"))?;
        let peer = Info::parse(&line)?;
        if peer.qps.len() != qps.len() {
            return Err(format!(
                "the peer has {} queue-pair banks, this VM {}: start both with the same --vcpus",
                peer.qps.len(),
                qps.len()
            ));
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
            )
            .map_err(|e| e.to_string())?;
        }
        let window = RemoteWindow {
            base: peer.base,
            len: peer.len,
            rkey: peer.rkey,
        };
        result = Some(RoceLink {
            stream,
            peer,
            local,
        });
        Ok(super::roce::RoceRemote {
            port: port.clone(),
            window,
        })
    })?;
    result.ok_or_else(|| "RoCE exchange did not complete".into())
}

impl RoceLink {
    /// Stamp the READ part of our window (`READ_STAMP_MAGIC | page`) for
    /// the peer's guest to read and check.
    pub fn stamp_read_span(
        &self,
        write: impl Fn(u64, u64) -> Result<(), String>,
    ) -> Result<(), String> {
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
