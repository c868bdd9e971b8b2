//! The control socket's worker thread: serves every request that may wait
//! on guest memory (an invalidation's `madvise` waits for the fault thread;
//! a teardown pauses vCPUs), one at a time, in arrival order — except that
//! teardowns are paced and coalesced:
//!
//! - after a teardown that took `t`, the next one starts no sooner than
//!   `max(TEARDOWN_MIN_GAP, TEARDOWN_DUTY × t)` later, so a client issuing
//!   teardowns back to back cannot keep the guest from running (proved by
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
pub const TEARDOWN_MIN_GAP: Duration = Duration::from_millis(20);
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
