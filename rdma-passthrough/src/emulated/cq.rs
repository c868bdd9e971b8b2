//! Completion queues.

use crate::verbs::Wc;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) struct CqState {
    q: Mutex<VecDeque<Wc>>,
    depth: usize,
    /// Completions dropped because the CQ was full.
    pub(crate) overruns: AtomicU64,
    /// The CQ overran (as `IBV_EVENT_CQ_ERR`): it stays in error, and the
    /// device moves every queue pair completing into it to the error state
    /// (`engine.rs`). Sticky: a verbs CQ in error is destroyed, not reused.
    pub(crate) overrun: AtomicBool,
    waiters: AtomicUsize,
    cv: Condvar,
}

impl CqState {
    /// Queue a completion; false (and the CQ is in error from now on) if
    /// it was full.
    pub(crate) fn push(&self, wc: Wc) -> bool {
        {
            let mut q = self.q.lock();
            if q.len() >= self.depth {
                self.overruns.fetch_add(1, Ordering::Relaxed);
                self.overrun.store(true, Ordering::Release);
                return false;
            }
            q.push_back(wc);
        }
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.q.lock();
            self.cv.notify_all();
        }
        true
    }

    pub(crate) fn is_overrun(&self) -> bool {
        self.overrun.load(Ordering::Acquire)
    }
}

/// A completion queue handle.
#[derive(Clone)]
pub struct Cq(Arc<CqState>);

impl Cq {
    pub(crate) fn new(depth: usize) -> Cq {
        Cq(Arc::new(CqState {
            q: Mutex::new(VecDeque::with_capacity(depth.min(1 << 16))),
            depth: depth.max(1),
            overruns: AtomicU64::new(0),
            overrun: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            cv: Condvar::new(),
        }))
    }

    pub(crate) fn state(&self) -> Arc<CqState> {
        self.0.clone()
    }

    /// `ibv_poll_cq`: move up to `out.len()` completions into `out`.
    pub fn poll(&self, out: &mut [Wc]) -> usize {
        let mut q = self.0.q.lock();
        let n = out.len().min(q.len());
        for slot in out.iter_mut().take(n) {
            *slot = q.pop_front().expect("length checked");
        }
        n
    }

    /// Wait for `n` completions (poll for `spin`, then sleep), at most
    /// until `timeout`. Returns what arrived.
    pub fn wait(&self, n: usize, spin: Duration, timeout: Duration) -> Vec<Wc> {
        let start = Instant::now();
        let mut out = Vec::with_capacity(n);
        loop {
            {
                let mut q = self.0.q.lock();
                while out.len() < n {
                    match q.pop_front() {
                        Some(wc) => out.push(wc),
                        None => break,
                    }
                }
            }
            if out.len() >= n {
                return out;
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                return out;
            }
            if elapsed < spin {
                std::hint::spin_loop();
                continue;
            }
            self.0.waiters.fetch_add(1, Ordering::SeqCst);
            {
                let mut q = self.0.q.lock();
                if q.is_empty() {
                    let left = timeout.saturating_sub(start.elapsed());
                    self.0
                        .cv
                        .wait_for(&mut q, left.min(Duration::from_millis(10)));
                }
            }
            self.0.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Completions dropped because the CQ was full.
    pub fn overruns(&self) -> u64 {
        self.0.overruns.load(Ordering::Relaxed)
    }

    /// Whether the CQ overran (`IBV_EVENT_CQ_ERR`); its queue pairs are
    /// then in the error state.
    pub fn is_overrun(&self) -> bool {
        self.0.is_overrun()
    }
}
