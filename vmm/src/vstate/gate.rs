//! Pausing vCPUs: a vCPU enters KVM_RUN only through the gate; `pause`
//! closes it, kicks every vCPU out of KVM_RUN (signal + immediate_exit) and
//! waits until none is inside. A vCPU blocked in the VMM (a device, a
//! barrier) is not inside, so it never delays a pause.
//!
//! Kicks are sound: a vCPU thread is in the kick list only between
//! `register_thread` and `unregister_thread` (which it calls before it
//! returns), and every `pthread_kill` is sent with the state lock held, so
//! the target cannot have exited, let alone been joined and had its id
//! reused (test `kvm::stopped_vm_never_signals_other_threads`).

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

#[derive(Default)]
struct State {
    /// Outstanding pause requests (pauses nest).
    pauses: u32,
    /// vCPUs inside KVM_RUN.
    running: usize,
    stopped: bool,
    /// pthread ids of live vCPU threads (registered, not yet
    /// unregistered), for kicking.
    threads: Vec<libc::pthread_t>,
}

#[derive(Default)]
pub struct RunGate {
    state: Mutex<State>,
    cv: Condvar,
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick handler.
    static IMMEDIATE_EXIT: std::cell::Cell<*const AtomicU8> = const { std::cell::Cell::new(std::ptr::null()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: set by `bind_immediate_exit` to this thread's live
            // kvm_run mapping, cleared before it goes away.
            unsafe { (*p).store(1, Ordering::SeqCst) };
        }
    });
}

/// Install the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
    });
    result
}

/// Point this thread's kick handler at its vCPU's `immediate_exit` byte
/// (null to unbind).
///
/// # Safety
/// `p` must stay valid until this thread unbinds it or exits.
pub unsafe fn bind_immediate_exit(p: *const AtomicU8) {
    IMMEDIATE_EXIT.with(|c| c.set(p));
}

impl RunGate {
    /// Called by a vCPU thread before it first enters KVM_RUN.
    pub fn register_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.state.lock().threads.push(me);
    }

    /// Called by a vCPU thread before it returns: no kick is sent to it
    /// afterwards (it may be joined and its id reused by another thread).
    pub fn unregister_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut s = self.state.lock();
        // SAFETY: pthread_equal has no preconditions.
        s.threads
            .retain(|&t| unsafe { libc::pthread_equal(t, me) } == 0);
    }

    /// vCPU threads that can still be kicked.
    pub fn registered(&self) -> usize {
        self.state.lock().threads.len()
    }

    /// Called by a vCPU before KVM_RUN: waits while paused. False once the
    /// VM is stopping.
    pub fn enter(&self) -> bool {
        let mut s = self.state.lock();
        while s.pauses > 0 && !s.stopped {
            self.cv.wait(&mut s);
        }
        if s.stopped {
            return false;
        }
        s.running += 1;
        true
    }

    /// Called by a vCPU after KVM_RUN returns.
    pub fn leave(&self) {
        let mut s = self.state.lock();
        s.running -= 1;
        if s.running == 0 {
            self.cv.notify_all();
        }
    }

    /// Kick every registered vCPU; the caller holds the state lock (`s`),
    /// which keeps each of them from unregistering and exiting meanwhile.
    fn kick_all(s: &State) {
        for &t in &s.threads {
            // SAFETY: t is a live vCPU thread of this process: it
            // registered itself and cannot unregister (and so cannot
            // return) while the caller holds the state lock.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Hold every vCPU outside KVM_RUN until `resume`.
    pub fn pause(&self) {
        let mut s = self.state.lock();
        s.pauses += 1;
        if s.running == 0 {
            return;
        }
        Self::kick_all(&s);
        // The kicked vCPUs leave KVM_RUN within microseconds; a vCPU that
        // slipped in between our kick and its `enter` check already saw
        // `pauses`. Wait briefly, then re-kick in case a signal raced with
        // the thread's own `immediate_exit` reset.
        while s.running > 0 {
            if self
                .cv
                .wait_for(&mut s, Duration::from_millis(1))
                .timed_out()
                && s.running > 0
            {
                Self::kick_all(&s);
            }
        }
    }

    pub fn resume(&self) {
        let mut s = self.state.lock();
        s.pauses = s.pauses.saturating_sub(1);
        self.cv.notify_all();
    }

    pub fn paused(&self) -> bool {
        self.state.lock().pauses > 0
    }

    /// Stop for good: no vCPU enters KVM_RUN again; those inside are kicked.
    pub fn stop(&self) {
        let mut s = self.state.lock();
        s.stopped = true;
        self.cv.notify_all();
        Self::kick_all(&s);
    }

    pub fn stopped(&self) -> bool {
        self.state.lock().stopped
    }
}
