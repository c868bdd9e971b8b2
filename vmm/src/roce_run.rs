//! `odpvm run --roce-bind …`: the VM's RNIC gets a RoCEv2 port and its
//! guest queue pairs connect to another odpvm (see
//! `devices::rnic::roce`). The upper half of guest RAM is the window the
//! peer reaches. When the peer goes away (its end of the exchange
//! connection closes) this VM checks the stamps the peer wrote into its
//! window and stops.

use crate::devices::rnic::roce::{self, Exchange, RoceOptions};
use crate::devices::rnic::GuestMemory;
use crate::layout::PAYLOAD_RAM_GPA;
use crate::vm::VmHandle;
use rdma_passthrough::RocePort;
use serde_json::{json, Value};
use std::io::Read;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What `odpvm run` was asked for.
#[derive(Clone, Debug)]
pub struct RoceArgs {
    pub bind: SocketAddrV4,
    pub listen: Option<SocketAddr>,
    pub connect: Option<SocketAddr>,
    pub mtu: usize,
    /// A host-side diagnostic: the host answers every SEND from the peer
    /// with the same bytes, on the guest's queue pairs (for `--guest
    /// idle`). No test relies on it: guest-to-guest SEND/RECV is
    /// `send-ping` / `recv-pong`.
    pub echo: bool,
}

/// A running link: the port (for its counters) and the stamp check's
/// result once the peer is gone.
pub struct RoceRun {
    port: Arc<RocePort>,
    dev: Arc<crate::devices::rnic::RnicDevice>,
    /// SENDs echoed by the host (`--roce-echo`).
    echoes: Arc<AtomicU64>,
    peer: SocketAddrV4,
    pages_checked: Arc<AtomicU64>,
    stale: Arc<AtomicU64>,
}

/// `--roce-bind IP[:PORT]` (port 4791 by default).
pub fn parse_bind(s: &str) -> Result<SocketAddrV4, String> {
    if let Ok(a) = s.parse::<SocketAddrV4>() {
        return Ok(a);
    }
    s.parse::<std::net::Ipv4Addr>()
        .map(|ip| SocketAddrV4::new(ip, rdma_passthrough::roce::wire::ROCE_PORT))
        .map_err(|_| format!("{s:?} is not an IPv4 address (optionally with :port)"))
}

/// `odpvm run` with a RoCE link: build the VM, link its RNIC before the
/// vCPUs start, then serve it as any run.
pub fn run(
    config: crate::vm::VmConfig,
    api_sock: Option<&std::path::Path>,
    limits: crate::api::Limits,
    timeout: Option<std::time::Duration>,
    args: &RoceArgs,
) -> Result<(crate::cli::Outcome, RoceRun), String> {
    let memory = config.memory;
    // A guest that answers the peer until told to stop finishes (and
    // reports) on its own once the peer is gone.
    let answers = matches!(
        config.guest,
        crate::vm::GuestConfig::Builtin(crate::payload::Guest::RecvPong)
    );
    let vm = crate::vm::Vm::new(config).map_err(|e| e.to_string())?;
    let link = prepare(&vm.handle(), memory, args, answers, timeout)?;
    let server = match api_sock {
        Some(path) => Some(
            crate::api::ApiServer::bind(path, vm.handle(), limits)
                .map_err(|e| format!("control socket: {e}"))?,
        ),
        None => None,
    };
    Ok((crate::cli::serve(vm, server, timeout)?, link))
}

/// How long a guest answering the peer (`recv-pong`) gets to finish and
/// report once the peer is gone.
const ANSWERER_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Link the VM's RNIC before its vCPUs start. When the peer goes away,
/// `answers`: ask the guest to stop and let it report (up to
/// `ANSWERER_GRACE`) before the VM is stopped.
pub fn prepare(
    vm: &VmHandle,
    memory: u64,
    args: &RoceArgs,
    answers: bool,
    timeout: Option<std::time::Duration>,
) -> Result<RoceRun, String> {
    let dev = vm
        .rnic()
        .ok_or("--roce-bind needs the emulated RNIC (--rnic emulated)")?;
    let exchange = match (args.listen, args.connect) {
        (Some(l), None) => Exchange::Listen(l),
        (None, Some(c)) => Exchange::Connect(c),
        _ => return Err("--roce-bind needs one of --roce-listen or --roce-connect".into()),
    };
    let (base, len) = (PAYLOAD_RAM_GPA + memory / 2, memory / 2);
    if !vm.ram().contains(base, len) {
        return Err(format!(
            "the RoCE window [{base:#x}, +{len:#x}) (upper half of RAM) is not one RAM region"
        ));
    }
    let link = roce::link(
        &dev,
        &RoceOptions {
            bind: args.bind,
            exchange,
            mtu: args.mtu,
            window_base: base,
            window_len: len,
            patience: timeout,
        },
    )
    .map_err(|e| e.to_string())?;
    let ram = vm.ram().clone();
    link.stamp_read_span(|gpa, v| {
        use vm_memory::{Bytes, GuestAddress};
        ram.memory()
            .write_obj(v, GuestAddress(gpa))
            .map_err(|e| format!("stamping the RoCE read window: {e}"))
    })?;
    let port = dev
        .roce()
        .as_ref()
        .map(|r| r.port.clone())
        .ok_or("the RoCE link did not attach")?;
    let echo = if args.echo {
        let qps = dev.take_roce_qps();
        let (base, lkey) = (base + 3 * len / 4, dev.lkey());
        if (qps.len() as u64) * ECHO_DEPTH * ECHO_SLOT > len / 4 {
            return Err("the RoCE window is too small for the echo receive slots".into());
        }
        Some(spawn_echo(port.clone(), qps, base, lkey, vm.clone())?)
    } else {
        None
    };
    let run = RoceRun {
        echoes: echo.unwrap_or_default(),
        port,
        dev: dev.clone(),
        peer: link.peer.addr,
        pages_checked: Arc::new(AtomicU64::new(0)),
        stale: Arc::new(AtomicU64::new(0)),
    };
    let (checked, stale, handle) = (run.pages_checked.clone(), run.stale.clone(), vm.clone());
    std::thread::Builder::new()
        .name("roce-peer-watch".into())
        .spawn(move || {
            let mut stream = &link.stream;
            let mut buf = [0u8; 64];
            // The peer sends nothing more; a read returns when it is gone.
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            if handle.finished() {
                return;
            }
            let mmu = handle.mmu().clone();
            let (c, s) =
                link.stale_pages(&*ram as &dyn GuestMemory, |gpa| mmu.lookup(gpa).is_some());
            checked.store(c, Ordering::Relaxed);
            stale.store(s, Ordering::Relaxed);
            if answers {
                // Counters first: the run's report follows the guest's end.
                handle.request_stop();
                let deadline = std::time::Instant::now() + ANSWERER_GRACE;
                while !handle.finished() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                if handle.finished() {
                    return;
                }
            }
            handle.stop("the RoCE peer closed the exchange connection");
        })
        .map_err(|e| format!("spawning the RoCE watcher: {e}"))?;
    Ok(run)
}

impl RoceRun {
    /// The link's counters for the run report.
    pub fn report(&self) -> Value {
        let s = self.port.stats();
        let mut r = json!({
            "local": self.port.local_addr().to_string(),
            "peer": self.peer.to_string(),
            "pages_checked": self.pages_checked.load(Ordering::Relaxed),
            "stale_accesses": self.stale.load(Ordering::Relaxed),
            "echoes": self.echoes.load(Ordering::Relaxed),
            // Banks whose connection went into error (retries exhausted,
            // an error NAK): not re-connected; the guest's enable of such a
            // bank fails with ERR_ROCE_GONE.
            "queue_pairs_lost": self.dev.roce_qps_lost(),
        });
        // Every port counter, dropped packets included
        // (`spoofed_and_unsolicited_packets_show_in_the_run_report`).
        for (name, v) in s.named() {
            r[name] = v.into();
        }
        r
    }
}

/// Receives kept posted per queue pair by the echo service, and their size.
const ECHO_DEPTH: u64 = 16;
const ECHO_SLOT: u64 = 64 << 10;

/// Keep receives posted on every connected queue pair (slots in the last
/// quarter of our window) and send each message received straight back.
/// Sleeps (100 µs growing to 1 ms) when there is nothing to do.
fn spawn_echo(
    port: Arc<RocePort>,
    qps: Vec<(rdma_passthrough::Qp, rdma_passthrough::Cq)>,
    base: u64,
    lkey: u32,
    vm: VmHandle,
) -> Result<Arc<AtomicU64>, String> {
    use rdma_passthrough::{Opcode, RecvWr, SendWr, Sge, Wc, WcOpcode, WcStatus};
    let slot_addr = move |q: usize, slot: u64| base + (q as u64 * ECHO_DEPTH + slot) * ECHO_SLOT;
    let recv = move |q: usize, slot: u64| RecvWr {
        wr_id: slot,
        sges: vec![Sge {
            addr: slot_addr(q, slot),
            length: ECHO_SLOT as u32,
            lkey,
        }],
    };
    for (i, (qp, _)) in qps.iter().enumerate() {
        for slot in 0..ECHO_DEPTH {
            port.post_recv(qp, recv(i, slot))
                .map_err(|e| e.to_string())?;
        }
    }
    let echoes = Arc::new(AtomicU64::new(0));
    let count = echoes.clone();
    std::thread::Builder::new()
        .name("roce-echo".into())
        .spawn(move || {
            let mut wcs = [Wc {
                wr_id: 0,
                status: WcStatus::Success,
                opcode: WcOpcode::Recv,
                byte_len: 0,
                qp_num: 0,
            }; 16];
            let mut idle = 0u64;
            while !vm.finished() {
                let mut worked = false;
                for (i, (qp, cq)) in qps.iter().enumerate() {
                    let n = cq.poll(&mut wcs);
                    for wc in &wcs[..n] {
                        worked = true;
                        if (wc.opcode, wc.status) != (WcOpcode::Recv, WcStatus::Success) {
                            continue;
                        }
                        let echo = SendWr {
                            wr_id: wc.wr_id,
                            opcode: Opcode::Send,
                            sges: vec![Sge {
                                addr: slot_addr(i, wc.wr_id),
                                length: wc.byte_len,
                                lkey,
                            }],
                            signaled: false,
                        };
                        if port.post_send(qp, echo).is_ok() {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = port.post_recv(qp, recv(i, wc.wr_id));
                    }
                }
                // Sleep when idle, longer the longer it stays idle (100 µs
                // up to 1 ms): no busy loop while the peer is quiet.
                idle = if worked { 0 } else { (idle + 1).min(10) };
                if idle > 0 {
                    std::thread::sleep(std::time::Duration::from_micros(100 * idle));
                }
            }
        })
        .map_err(|e| format!("spawning the RoCE echo service: {e}"))?;
    Ok(echoes)
}
