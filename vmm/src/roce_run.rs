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
}

/// A running link: the port (for its counters) and the stamp check's
/// result once the peer is gone.
pub struct RoceRun {
    port: Arc<RocePort>,
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
    let vm = crate::vm::Vm::new(config).map_err(|e| e.to_string())?;
    let link = prepare(&vm.handle(), memory, args)?;
    let server = match api_sock {
        Some(path) => Some(
            crate::api::ApiServer::bind(path, vm.handle(), limits)
                .map_err(|e| format!("control socket: {e}"))?,
        ),
        None => None,
    };
    Ok((crate::cli::serve(vm, server, timeout)?, link))
}

/// Link the VM's RNIC before its vCPUs start.
pub fn prepare(vm: &VmHandle, memory: u64, args: &RoceArgs) -> Result<RoceRun, String> {
    let dev =
        vm.0.devices
            .rnic
            .clone()
            .ok_or("--roce-bind needs the emulated RNIC (--rnic emulated)")?;
    let exchange = match (args.listen, args.connect) {
        (Some(l), None) => Exchange::Listen(l),
        (None, Some(c)) => Exchange::Connect(c),
        _ => return Err("--roce-bind needs one of --roce-listen or --roce-connect".into()),
    };
    let (base, len) = (PAYLOAD_RAM_GPA + memory / 2, memory / 2);
    if !vm.0.ram.contains(base, len) {
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
        },
    )?;
    let ram = vm.0.ram.clone();
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
    let run = RoceRun {
        port,
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
            let mmu = handle.0.mmu.clone();
            let (c, s) =
                link.stale_pages(&*ram as &dyn GuestMemory, |gpa| mmu.lookup(gpa).is_some());
            checked.store(c, Ordering::Relaxed);
            stale.store(s, Ordering::Relaxed);
            handle.stop("the RoCE peer closed the exchange connection");
        })
        .map_err(|e| format!("spawning the RoCE watcher: {e}"))?;
    Ok(run)
}

impl RoceRun {
    /// The link's counters for the run report.
    pub fn report(&self) -> Value {
        let s = self.port.stats();
        json!({
            "local": self.port.local_addr().to_string(),
            "peer": self.peer.to_string(),
            "tx_packets": s.tx_packets,
            "rx_packets": s.rx_packets,
            "retransmits": s.retransmits,
            "timeouts": s.timeouts,
            "rnr_naks_sent": s.rnr_naks_sent,
            "rnr_naks_received": s.rnr_naks_received,
            "seq_naks_sent": s.seq_naks_sent,
            "seq_naks_received": s.seq_naks_received,
            "access_naks_sent": s.access_naks_sent,
            "duplicates": s.duplicates,
            "read_replays": s.read_replays,
            "bad_icrc": s.bad_icrc,
            "malformed": s.malformed,
            "unknown_qpn": s.unknown_qpn,
            "out_of_window": s.out_of_window,
            "pages_checked": self.pages_checked.load(Ordering::Relaxed),
            "stale_accesses": self.stale.load(Ordering::Relaxed),
        })
    }
}
