//! The control socket's worker thread: serves every request that may wait
//! on guest memory (an invalidation's `madvise` waits for the fault thread;
//! a teardown pauses vCPUs), one at a time, in arrival order — except that
//! teardowns are paced and coalesced:
//!
//! - after a teardown that took `t`, the next one starts no sooner than
//!   `max(TEARDOWN_MIN_GAP, TEARDOWN_DUTY × t)` later, and not before the
//!   guest has settled — no guest fault for `TEARDOWN_QUIET` (at most
//!   `TEARDOWN_SETTLE_MAX` more). A teardown returns in O(1), but the guest
//!   then refaults its whole working set (O(n): ~13 µs a page on a
//!   shadow-paging host), so the call's duration alone says nothing of
//!   what it cost the guest. A client issuing teardowns back to back cannot
//!   keep the guest from running (proved by
//!   `back_to_back_teardowns_do_not_starve_the_guest` in `vmm/tests/api.rs`);
//! - teardown requests waiting for that moment are answered by one
//!   teardown (`coalesced` counts the extra ones); other requests are
//!   served meanwhile.

use super::protocol::{ApiError, Request, Response};
use crate::vm::VmHandle;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Shortest gap between two teardowns.
pub const TEARDOWN_MIN_GAP: Duration = Duration::from_millis(50);
/// The guest counts as settled after a teardown once it has taken no fault
/// for this long ...
pub const TEARDOWN_QUIET: Duration = Duration::from_millis(5);
/// ... or after this much longer than the gap, whichever comes first.
pub const TEARDOWN_SETTLE_MAX: Duration = Duration::from_secs(2);
/// The guest gets at least this many times a teardown's duration between
/// two of them.
pub const TEARDOWN_DUTY: u32 = 10;

pub(super) struct Job {
    client: u64,
    req: Request,
}

pub(super) struct Done {
    pub client: u64,
    pub answer: Result<Response, ApiError>,
}

pub(super) struct Worker {
    tx: mpsc::Sender<Job>,
    done: Arc<Mutex<Vec<Done>>>,
    wake: Arc<EventFd>,
}

impl Worker {
    /// Start the thread. It ends when the worker is dropped and its current
    /// request returns; it is never joined (that request may be stuck on a
    /// stalled fault thread, which must not hold up the VMM's exit).
    pub fn spawn(vm: VmHandle) -> std::io::Result<Worker> {
        let (tx, rx) = mpsc::channel();
        let done = Arc::new(Mutex::new(Vec::new()));
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        let out = Output {
            done: done.clone(),
            wake: wake.clone(),
        };
        std::thread::Builder::new()
            .name("odpvm-api".into())
            .spawn(move || run(vm, rx, out))?;
        Ok(Worker { tx, done, wake })
    }

    pub fn submit(&self, client: u64, req: Request) {
        // The thread only ends when `tx` is dropped, i.e. with `self`.
        let _ = self.tx.send(Job { client, req });
    }

    /// Answers ready since the last call.
    pub fn take_done(&self) -> Vec<Done> {
        let _ = self.wake.read();
        std::mem::take(&mut *self.done.lock())
    }

    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

struct Output {
    done: Arc<Mutex<Vec<Done>>>,
    wake: Arc<EventFd>,
}

impl Output {
    fn send(&self, client: u64, answer: Result<Response, ApiError>) {
        self.done.lock().push(Done { client, answer });
        let _ = self.wake.write(1);
    }
}

fn serve(vm: &VmHandle, req: Request) -> Result<Response, ApiError> {
    Ok(match req {
        Request::Stats => Response::Stats(Box::new(vm.stats())),
        Request::Invalidate { gpa, len } => Response::Invalidated {
            translations_zapped: vm.invalidate(gpa.0, len.0)?,
        },
        Request::Teardown => Response::TornDown {
            teardown_ns: vm.teardown()?,
            coalesced: 0,
        },
        Request::Pause => {
            vm.pause();
            Response::Done {}
        }
        Request::Resume => {
            vm.resume();
            Response::Done {}
        }
        Request::Shutdown => {
            vm.shutdown();
            Response::Done {}
        }
    })
}

fn run(vm: VmHandle, rx: mpsc::Receiver<Job>, out: Output) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut next_teardown = Instant::now();
    let (mut last_faults, mut last_fault_seen) = (0, Instant::now());
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(j) => queue.push_back(j),
                Err(_) => return,
            }
        }
        queue.extend(rx.try_iter());
        if let Some(i) = queue.iter().position(|j| j.req != Request::Teardown) {
            let job = queue.remove(i).expect("index from position");
            out.send(job.client, serve(&vm, job.req));
            continue;
        }
        // Only teardowns wait: wait for their turn (serving anything that
        // arrives meanwhile), then answer them all with one.
        let now = Instant::now();
        let faults = crate::fault::FaultStats::get(&vm.faults().faults);
        if faults != last_faults {
            (last_faults, last_fault_seen) = (faults, now);
        }
        if now >= next_teardown
            && now.duration_since(last_fault_seen) < TEARDOWN_QUIET
            && now < next_teardown + TEARDOWN_SETTLE_MAX
        {
            // The guest is still refaulting what the last teardown took.
            match rx.recv_timeout(Duration::from_millis(1)) {
                Ok(j) => queue.push_back(j),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            continue;
        }
        if now < next_teardown {
            match rx.recv_timeout(next_teardown - now) {
                Ok(j) => queue.push_back(j),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            continue;
        }
        let clients: Vec<u64> = queue.drain(..).map(|j| j.client).collect();
        let t0 = Instant::now();
        let result = vm.teardown();
        let took = t0.elapsed();
        next_teardown = Instant::now() + TEARDOWN_MIN_GAP.max(took * TEARDOWN_DUTY);
        let coalesced = clients.len() as u64 - 1;
        for client in clients {
            let answer = match &result {
                Ok(ns) => Ok(Response::TornDown {
                    teardown_ns: *ns,
                    coalesced,
                }),
                Err(e) => Err(ApiError::Mmu(e.clone())),
            };
            out.send(client, answer);
        }
    }
}
