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
    /// Told of every completion queued here (`ibv_comp_channel`).
    channel: Option<Arc<CompChannel>>,
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
        if let Some(ch) = &self.channel {
            ch.notify();
        }
        true
    }

    pub(crate) fn is_overrun(&self) -> bool {
        self.overrun.load(Ordering::Acquire)
    }
}

/// A completion channel (`ibv_create_comp_channel`): one thread sleeps on
/// it for completions on any of the CQs created with it, instead of polling
/// each. Always armed (no `ibv_req_notify_cq` step): every completion
/// counts. Wait with [`CompChannel::wait_past`] on the count read *before*
/// polling, so a completion that lands between the poll and the wait is not
/// slept through.
#[derive(Debug, Default)]
pub struct CompChannel {
    events: AtomicU64,
    /// Threads inside `wait_past`: a completion with none takes no lock.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl CompChannel {
    pub fn new() -> Arc<CompChannel> {
        Arc::new(CompChannel::default())
    }

    /// Completions queued so far on this channel's CQs, plus kicks.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    fn notify(&self) {
        // Count, then look for sleepers; a waiter registers, then looks at
        // the count (both SeqCst): at least one of the two sees the other.
        self.events.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock();
            self.cv.notify_all();
        }
    }

    /// Wake every waiter as a completion would (to make a serving thread
    /// look at a stop flag now rather than at its next timeout).
    pub fn kick(&self) {
        self.notify();
    }

    /// Sleep until the count is past `seen` or `timeout` passes; returns
    /// whether it moved.
    pub fn wait_past(&self, seen: u64, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let mut g = self.lock.lock();
        // Checked under the lock a notifier takes once it sees a sleeper:
        // a count that moves after this check wakes the wait below.
        while self.events() == seen {
            match deadline {
                Some(d) => {
                    if self.cv.wait_until(&mut g, d).timed_out() {
                        break;
                    }
                }
                None => self.cv.wait(&mut g),
            }
        }
        drop(g);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        self.events() != seen
    }
}

/// A completion queue handle.
#[derive(Clone)]
pub struct Cq(Arc<CqState>);

impl Cq {
    pub(crate) fn new(depth: usize, channel: Option<Arc<CompChannel>>) -> Cq {
        Cq(Arc::new(CqState {
            q: Mutex::new(VecDeque::with_capacity(depth.min(1 << 16))),
            depth: depth.max(1),
            overruns: AtomicU64::new(0),
            overrun: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            cv: Condvar::new(),
            channel,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verbs::{WcOpcode, WcStatus};

    fn wc() -> Wc {
        Wc {
            wr_id: 1,
            status: WcStatus::Success,
            opcode: WcOpcode::Recv,
            byte_len: 0,
            qp_num: 0,
        }
    }

    #[test]
    fn a_channel_wakes_on_a_completion_of_any_of_its_cqs() {
        let ch = CompChannel::new();
        let (a, b) = (Cq::new(4, Some(ch.clone())), Cq::new(4, Some(ch.clone())));
        let plain = Cq::new(4, None);
        let seen = ch.events();
        assert!(
            !ch.wait_past(seen, Duration::from_millis(5)),
            "nothing came"
        );
        plain.state().push(wc());
        assert!(!ch.wait_past(seen, Duration::from_millis(5)), "not its CQ");
        // A completion between reading the count and waiting is not slept
        // through.
        a.state().push(wc());
        assert!(ch.wait_past(seen, Duration::from_secs(60)));
        // One from another thread wakes a sleeping waiter.
        let seen = ch.events();
        let pusher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.state().push(wc());
            b
        });
        let t0 = Instant::now();
        assert!(ch.wait_past(seen, Duration::from_secs(60)));
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "woken, not timed out"
        );
        let b = pusher.join().unwrap();
        let mut out = [wc(); 4];
        assert_eq!(a.poll(&mut out) + b.poll(&mut out), 2);
        // `kick` wakes without a completion.
        let seen = ch.events();
        ch.kick();
        assert!(ch.wait_past(seen, Duration::from_secs(60)));
        // A timeout too large for an Instant waits without one.
        ch.kick();
        assert!(ch.wait_past(seen, Duration::MAX));
    }

    /// A completion racing the waiter's check is never slept through. The
    /// two threads play ping-pong (the pusher posts one completion, after
    /// a random short spin, only once the previous one was taken), so the
    /// waiter sleeps on nearly every round and no later completion can
    /// rescue a lost wake-up: it would leave the waiter asleep until its
    /// 60 s timeout.
    #[test]
    fn a_racing_completion_is_never_slept_through() {
        const N: usize = 20_000;
        let ch = CompChannel::new();
        let cq = Cq::new(4, Some(ch.clone()));
        let taken = Arc::new(AtomicUsize::new(0));
        let pusher = {
            let (cq, taken) = (cq.clone(), taken.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                for i in 0..N {
                    while taken.load(Ordering::Acquire) < i {
                        std::thread::yield_now();
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    for _ in 0..(x % 4000) {
                        std::hint::spin_loop();
                    }
                    assert!(cq.state().push(wc()));
                }
            })
        };
        let (mut got, mut out) = (0, [wc(); 4]);
        while got < N {
            let seen = ch.events();
            let n = cq.poll(&mut out);
            got += n;
            taken.store(got, Ordering::Release);
            if n == 0 {
                let t0 = Instant::now();
                ch.wait_past(seen, Duration::from_secs(60));
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "slept through a completion ({got} of {N} taken)"
                );
            }
        }
        pusher.join().unwrap();
        assert_eq!(ch.sleepers.load(Ordering::SeqCst), 0);
    }
}
