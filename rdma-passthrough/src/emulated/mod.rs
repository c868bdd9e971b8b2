//! The emulated RNIC (the default everywhere).
//!
//! Device work runs on the device's own thread (`engine.rs`), never on the
//! caller's: posting a work request only queues it and rings a doorbell.
//! ODP memory regions have a device page table filled on demand: a WQE
//! touching a missing page raises a device page fault on the page-fault
//! queue; the page-fault thread (`fault.rs`) resolves it through the mmu
//! (`read_begin` → translate or resolve → device update lock →
//! `read_retry` → program) and the device resumes the WQE.
//!
//! An ODP MR is an mmu mirror (`mr.rs`): `invalidate_start` posts an
//! invalidate command, the device finishes the chunk of DMA in progress,
//! zaps the pages and signals completion; `invalidate_wait` waits (spin for
//! a bounded budget, then sleep) and fences the MR if the device does not
//! confirm in time. A generation notice swaps the MR's table for an empty
//! one: O(1).
//!
//! Guarantees, each with the test that proves it (`tests/hardening.rs`
//! unless named otherwise):
//! * a fence waits for the page copy in progress, and no copy through a
//!   fenced MR starts after it (`no_copy_lands_after_the_fence`); a fenced
//!   MR is re-registered (empty table, same key) once the device answers a
//!   command queued behind the missed invalidation, counted in
//!   `mr_recoveries` (`a_fenced_mr_recovers_once_the_device_answers`);
//! * receiver-not-ready waits sleep on the responder's IBTA RNR timer; the
//!   device thread sleeps when nothing is runnable
//!   (`rnr_waits_sleep_on_the_timer`), and `rnr_retry` 0..=6 are retries,
//!   7 is forever (`rnr_retry_counts_retries`);
//! * a CQ that overruns is in error and so is every queue pair completing
//!   into it (`cq_overrun_puts_the_queue_pair_in_error`);
//! * every address computation on a work request is checked: buffers at
//!   the top of the address space complete with an error
//!   (`addresses_at_the_top_of_the_space_complete_with_an_error`);
//! * per queue pair, the device keeps O(1) state beyond its bounded queues
//!   and counts retired send WQEs (`send_wqes_retire_in_order`).
//!
//! Everything a work request names is checked on every access: keys,
//! protection domains, access rights and bounds. A violation is an error
//! completion, never an access outside the MR.

mod cq;
mod engine;
mod fault;
mod handles;
pub(crate) mod mr;
mod page_table;

pub use cq::{CompChannel, Cq};
use handles::libc_mlock;
pub(crate) use handles::page_end;
pub use handles::{Mr, Pd, Qp};

use crate::space::AddressSpace;
use crate::stats::{RnicStats, RnicStatsSnapshot};
use crate::verbs::*;
use cq::CqState;
use mr::{MrMirror, MrState, PageTable, DEAD, LIVE};
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// Tunables.
#[derive(Clone, Debug)]
pub struct RnicConfig {
    pub name: String,
    /// How long the device thread (and invalidation waiters) poll before
    /// sleeping. Waking a sleeping thread costs ~45 µs on the development
    /// host; polling answers in well under 1 µs but burns a core.
    pub poll: Duration,
    /// An MR whose device does not confirm an invalidation within this is
    /// fenced.
    pub fence_timeout: Duration,
    /// Pages one device fault resolves at most (fault-around).
    pub max_fault_pages: u64,
    /// Bytes a WQE moves per scheduling turn (other QPs and commands get
    /// the device in between).
    pub chunk_bytes: u64,
}

impl Default for RnicConfig {
    fn default() -> Self {
        RnicConfig {
            name: "ernic0".into(),
            poll: Duration::from_micros(200),
            fence_timeout: Duration::from_millis(100),
            max_fault_pages: 256,
            chunk_bytes: 64 << 10,
        }
    }
}

/// A one-shot completion: the device's "interrupt" for one command.
pub(crate) struct Completion {
    done: AtomicBool,
    waiter: Mutex<Option<Thread>>,
    pub(crate) posted: Instant,
}

impl Completion {
    pub(crate) fn new() -> Self {
        Completion {
            done: AtomicBool::new(false),
            waiter: Mutex::new(None),
            posted: Instant::now(),
        }
    }

    pub(crate) fn signal(&self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.waiter.lock().take() {
            t.unpark();
        }
    }

    /// Poll for `poll`, then sleep; false if `deadline` passes first.
    pub(crate) fn wait(&self, poll: Duration, deadline: Instant) -> bool {
        let spin_until = Instant::now() + poll;
        while Instant::now() < spin_until {
            if self.done.load(Ordering::Acquire) {
                return true;
            }
            std::hint::spin_loop();
        }
        *self.waiter.lock() = Some(std::thread::current());
        loop {
            if self.done.load(Ordering::Acquire) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::park_timeout(deadline - now);
        }
    }
}

/// Commands to the device (the command queue), processed between chunks of
/// DMA, before any WQE work.
pub(crate) enum Command {
    Invalidate {
        mr: Arc<MrState>,
        start: u64,
        end: u64,
        done: Arc<Completion>,
    },
    Generation {
        mr: Arc<MrState>,
        done: Arc<Completion>,
    },
    /// The page-fault thread resolved (or failed) `[start, end)` of `mr`.
    FaultDone {
        mr: u32,
        start: u64,
        end: u64,
        ok: bool,
    },
    /// Stop using `mr`.
    Dereg { mr: u32, done: Arc<Completion> },
    /// `mr` was fenced; the device reaching this command answers again, so
    /// it is re-registered.
    Recover { mr: Arc<MrState> },
}

impl Command {
    fn completion(&self) -> Option<&Arc<Completion>> {
        match self {
            Command::Invalidate { done, .. }
            | Command::Generation { done, .. }
            | Command::Dereg { done, .. } => Some(done),
            Command::FaultDone { .. } | Command::Recover { .. } => None,
        }
    }
}

/// A device fault for the page-fault thread.
pub(crate) struct FaultRequest {
    pub(crate) mr: Arc<MrState>,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) write: bool,
}

pub(crate) struct QpState {
    pub(crate) qpn: u32,
    pub(crate) pd: u32,
    pub(crate) caps: QpCaps,
    pub(crate) send_cq: Arc<CqState>,
    pub(crate) recv_cq: Arc<CqState>,
    pub(crate) sq: Mutex<VecDeque<SendWr>>,
    pub(crate) rq: Mutex<VecDeque<RecvWr>>,
    /// Connected peer (0: none).
    pub(crate) remote: AtomicU32,
    pub(crate) error: AtomicBool,
    pub(crate) destroyed: AtomicBool,
    /// Send WQEs finished (completed, failed or flushed), in posting order:
    /// RC executes a send queue in order, so WQE `n` (0-based) has
    /// finished once this exceeds `n`, signaled or not.
    pub(crate) send_retired: AtomicU64,
    /// Driven by a RoCE port (`crate::roce`), not by the device thread.
    pub(crate) roce: AtomicBool,
}

pub(crate) struct Shared {
    pub(crate) config: RnicConfig,
    pub(crate) stats: RnicStats,
    pub(crate) mrs: RwLock<HashMap<u32, Arc<MrState>>>,
    pub(crate) qps: RwLock<HashMap<u32, Arc<QpState>>>,
    /// Bumped whenever the QP set changes, so the engine re-reads it.
    pub(crate) qp_epoch: AtomicU64,
    pub(crate) commands: Mutex<VecDeque<Command>>,
    pub(crate) faults: Mutex<VecDeque<FaultRequest>>,
    pub(crate) fault_cv: parking_lot::Condvar,
    doorbell: AtomicU64,
    sleeping: AtomicBool,
    device_thread: Mutex<Option<Thread>>,
    pub(crate) stop: AtomicBool,
    next_key: AtomicU32,
    next_qpn: AtomicU32,
    next_pd: AtomicU32,
    /// Test hook: hold invalidation and recovery commands (a device that
    /// stopped answering them) until it is cleared.
    pub(crate) ignore_invalidations: AtomicBool,
    /// Test hook: microseconds the device pauses inside each page copy
    /// (widens the window a fence must close).
    pub(crate) copy_delay_us: AtomicU64,
}

impl Shared {
    /// Ring the doorbell: wake the device if it sleeps.
    pub(crate) fn ring(&self) {
        self.doorbell.fetch_add(1, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            if let Some(t) = self.device_thread.lock().as_ref() {
                t.unpark();
            }
        }
    }

    pub(crate) fn post(&self, cmd: Command) {
        self.commands.lock().push_back(cmd);
        self.ring();
    }

    pub(crate) fn doorbell(&self) -> u64 {
        self.doorbell.load(Ordering::SeqCst)
    }

    /// The device is about to sleep: returns false if the doorbell rang
    /// since `seen` (then it must not sleep).
    pub(crate) fn may_sleep(&self, seen: u64) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        if self.doorbell.load(Ordering::SeqCst) != seen || self.stop.load(Ordering::SeqCst) {
            self.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub(crate) fn woke(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    pub(crate) fn queue_fault(&self, req: FaultRequest) {
        self.faults.lock().push_back(req);
        self.fault_cv.notify_one();
    }
}

/// The emulated RNIC.
pub struct EmulatedRnic {
    pub(crate) shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl EmulatedRnic {
    /// Start the device and page-fault threads.
    pub fn new(config: RnicConfig) -> Arc<EmulatedRnic> {
        let shared = Arc::new(Shared {
            config,
            stats: RnicStats::default(),
            mrs: RwLock::new(HashMap::new()),
            qps: RwLock::new(HashMap::new()),
            qp_epoch: AtomicU64::new(0),
            commands: Mutex::new(VecDeque::new()),
            faults: Mutex::new(VecDeque::new()),
            fault_cv: parking_lot::Condvar::new(),
            doorbell: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            device_thread: Mutex::new(None),
            stop: AtomicBool::new(false),
            next_key: AtomicU32::new(1),
            next_qpn: AtomicU32::new(1),
            next_pd: AtomicU32::new(1),
            ignore_invalidations: AtomicBool::new(false),
            copy_delay_us: AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        let name = shared.config.name.clone();
        let dev = std::thread::Builder::new()
            .name(format!("{name}-dev"))
            .spawn(move || engine::run(s))
            .expect("spawning the RNIC device thread");
        *shared.device_thread.lock() = Some(dev.thread().clone());
        threads.push(dev);
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("{name}-pf"))
                .spawn(move || fault::run(s))
                .expect("spawning the RNIC page-fault thread"),
        );
        Arc::new(EmulatedRnic {
            shared,
            threads: Mutex::new(threads),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    pub fn config(&self) -> &RnicConfig {
        &self.shared.config
    }

    pub fn stats(&self) -> RnicStatsSnapshot {
        self.shared.stats.snapshot()
    }

    pub fn reset_histograms(&self) {
        self.shared.stats.reset_histograms();
    }

    pub fn alloc_pd(&self, space: Arc<AddressSpace>) -> Pd {
        Pd {
            id: self.shared.next_pd.fetch_add(1, Ordering::Relaxed),
            space,
        }
    }

    pub fn create_cq(&self, depth: usize) -> Cq {
        Cq::new(depth, None)
    }

    /// A CQ whose completions also wake `channel` (`ibv_create_cq` with a
    /// completion channel).
    pub fn create_cq_on(&self, depth: usize, channel: &Arc<CompChannel>) -> Cq {
        Cq::new(depth, Some(channel.clone()))
    }

    pub fn create_qp(
        &self,
        pd: &Pd,
        send_cq: &Cq,
        recv_cq: &Cq,
        caps: QpCaps,
    ) -> Result<Qp, VerbsError> {
        if caps.max_send_wr == 0 || caps.max_recv_wr == 0 || caps.max_sge == 0 {
            return Err(VerbsError::Invalid("QP capacities must be positive".into()));
        }
        if caps.max_send_wr > 1 << 16 || caps.max_recv_wr > 1 << 16 || caps.max_sge > 64 {
            return Err(VerbsError::Limit("QP capacities too large".into()));
        }
        let qpn = self.shared.next_qpn.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(QpState {
            qpn,
            pd: pd.id,
            caps,
            send_cq: send_cq.state(),
            recv_cq: recv_cq.state(),
            sq: Mutex::new(VecDeque::new()),
            rq: Mutex::new(VecDeque::new()),
            remote: AtomicU32::new(0),
            error: AtomicBool::new(false),
            destroyed: AtomicBool::new(false),
            send_retired: AtomicU64::new(0),
            roce: AtomicBool::new(false),
        });
        self.shared.qps.write().insert(qpn, state.clone());
        self.shared.qp_epoch.fetch_add(1, Ordering::SeqCst);
        Ok(Qp {
            state,
            shared: Arc::downgrade(&self.shared),
        })
    }

    /// Connect two RC QPs to each other (loopback on this device).
    pub fn connect(&self, a: &Qp, b: &Qp) {
        a.state.remote.store(b.state.qpn, Ordering::Release);
        b.state.remote.store(a.state.qpn, Ordering::Release);
    }

    /// `ibv_reg_mr`. `Access::ON_DEMAND` makes an ODP MR (an mmu mirror);
    /// `iova == 0 && len == u64::MAX` with ON_DEMAND is implicit ODP over
    /// the whole address space. Without ON_DEMAND every page is resolved
    /// and `mlock`ed now (pinned).
    pub fn reg_mr(&self, pd: &Pd, iova: u64, len: u64, access: Access) -> Result<Mr, VerbsError> {
        let odp = access.contains(Access::ON_DEMAND);
        let implicit = odp && iova == 0 && len == u64::MAX;
        if len == 0 {
            return Err(VerbsError::Invalid("empty MR".into()));
        }
        if !implicit && iova.checked_add(len).is_none() {
            return Err(VerbsError::Invalid("MR range overflows".into()));
        }
        if len == u64::MAX && !implicit {
            return Err(VerbsError::Invalid(
                "only an implicit ODP MR may cover everything".into(),
            ));
        }
        let key_index = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        if key_index >= 1 << 24 {
            return Err(VerbsError::Limit("out of MR keys".into()));
        }
        // The low byte varies so a stale key is unlikely to match.
        let key = (key_index << 8) | (key_index.wrapping_mul(0x9d) & 0xff);
        let state = Arc::new(MrState {
            key,
            pd: pd.id,
            iova,
            len: if implicit { u64::MAX } else { len },
            access,
            odp,
            implicit,
            space: pd.space.clone(),
            table: Mutex::new(PageTable::default()),
            state: std::sync::atomic::AtomicU8::new(LIVE),
            mirror: Mutex::new(None),
            pinned: Mutex::new(Vec::new()),
        });
        if odp {
            let mirror = Arc::new(MrMirror::new(state.clone(), Arc::downgrade(&self.shared)));
            *state.mirror.lock() = Some(pd.space.mmu.register_mirror(mirror));
        } else {
            let start = iova & !(mmu::PAGE_SIZE - 1);
            let end = page_end(iova, len)
                .ok_or_else(|| VerbsError::Invalid("MR range overflows".into()))?;
            fault::map_range(&self.shared, &state, start, end, true, true)
                .map_err(|e| VerbsError::Memory(e.to_string()))?;
            let extents = fault::host_extents(&state);
            for &(hva, n) in &extents {
                if !libc_mlock(hva, n) {
                    log::warn!(
                        "mlock of a pinned MR failed (RLIMIT_MEMLOCK?); continuing unpinned"
                    );
                }
            }
            *state.pinned.lock() = extents;
        }
        self.shared.mrs.write().insert(key, state.clone());
        Ok(Mr {
            state,
            shared: Arc::downgrade(&self.shared),
        })
    }

    /// Test hook: make the device hold back invalidation (and recovery)
    /// commands, like a device that stopped answering (its MRs get fenced);
    /// clearing it lets the device answer what it held, in order.
    pub fn set_ignore_invalidations(&self, on: bool) {
        self.shared.ignore_invalidations.store(on, Ordering::SeqCst);
        self.shared.ring();
    }

    /// Test hook: make the device pause `delay` inside every page copy.
    pub fn set_copy_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.copy_delay_us.store(us, Ordering::SeqCst);
    }
}

impl Drop for EmulatedRnic {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.ring();
        self.shared.fault_cv.notify_all();
        if let Some(t) = self.shared.device_thread.lock().as_ref() {
            t.unpark();
        }
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}
