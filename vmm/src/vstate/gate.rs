//! Pausing vCPUs: a vCPU enters KVM_RUN only through the gate; `pause`
//! closes it, kicks every vCPU out of KVM_RUN (signal + immediate_exit) and
//! waits until none is inside. A vCPU blocked in the VMM (a device, a
//! barrier) is not inside, so it never delays a pause.

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
    /// pthread ids of vCPU threads, for kicking.
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
    pub fn register_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.state.lock().threads.push(me);
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

    fn kick_all(&self, threads: &[libc::pthread_t]) {
        for &t in threads {
            // SAFETY: t is a vCPU thread of this process that registered
            // itself; a thread that already exited makes this return ESRCH.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Hold every vCPU outside KVM_RUN until `resume`.
    pub fn pause(&self) {
        let mut s = self.state.lock();
        s.pauses += 1;
        while s.running > 0 {
            let threads = s.threads.clone();
            self.kick_all(&threads);
            // Kick again if a vCPU slipped into KVM_RUN between our kick
            // and its check (immediate_exit catches that, this is cheap
            // insurance against a lost signal).
            self.cv.wait_for(&mut s, Duration::from_millis(5));
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
        let threads = s.threads.clone();
        self.cv.notify_all();
        drop(s);
        self.kick_all(&threads);
    }

    pub fn stopped(&self) -> bool {
        self.state.lock().stopped
    }
}
