//! Test-device state: per-vCPU argument buffers, results and the barrier.

use super::*;
use crate::devices::serial::Sink;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What a vCPU reported when it finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuReport {
    pub passed: bool,
    pub args: Vec<u32>,
    /// Latency samples (cycles) it recorded.
    pub samples: Vec<u32>,
    pub ending: Ending,
}

/// How a vCPU's program ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ending {
    /// A built-in payload's PASS or FAIL (its args are its results).
    #[default]
    Verdict,
    /// A user program's `EXIT` with this status.
    Exit(u32),
    /// A user program took an exception; its args are `CRASH_ARGS`.
    Crash,
}

/// What the vCPU loop should do after an I/O exit to the device.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Finished(VcpuReport),
}

#[derive(Default)]
struct BarrierState {
    /// vCPUs currently waiting.
    waiting: usize,
    /// Incremented by every release.
    epoch: u64,
    /// Phase announced by the last arrival.
    phase: u32,
    stopped: bool,
    /// `CMD_SYNC`: vCPUs still running (the meeting is complete when all
    /// of them are there), those there now, and its releases.
    live: usize,
    meeting: usize,
    meetings: u64,
}

/// Payload barriers: vCPUs wait until the host releases them.
#[derive(Default)]
pub struct Barrier {
    state: Mutex<BarrierState>,
    cv: Condvar,
}

impl Barrier {
    fn wait(&self, phase: u32) {
        let mut s = self.state.lock();
        if s.stopped {
            return;
        }
        s.waiting += 1;
        s.phase = phase;
        let epoch = s.epoch;
        self.cv.notify_all();
        while s.epoch == epoch && !s.stopped {
            self.cv.wait(&mut s);
        }
        s.waiting -= 1;
    }

    /// vCPUs waiting now (at either kind of barrier), and the phase
    /// they announced.
    pub fn waiting(&self) -> (usize, u32) {
        let s = self.state.lock();
        (s.waiting + s.meeting, s.phase)
    }

    /// `CMD_SYNC`: wait until every running vCPU is here; the last one in
    /// releases the others.
    fn meet(&self, phase: u32) {
        let mut s = self.state.lock();
        if s.stopped {
            return;
        }
        s.meeting += 1;
        s.phase = phase;
        self.cv.notify_all();
        if s.meeting >= s.live {
            return Self::complete(&mut s, &self.cv);
        }
        let meetings = s.meetings;
        while s.meetings == meetings && !s.stopped {
            self.cv.wait(&mut s);
        }
    }

    fn complete(s: &mut BarrierState, cv: &Condvar) {
        s.meeting = 0;
        s.meetings += 1;
        cv.notify_all();
    }

    /// A vCPU's program ended: the others no longer wait for it.
    fn leave(&self) {
        let mut s = self.state.lock();
        s.live = s.live.saturating_sub(1);
        if s.meeting > 0 && s.meeting >= s.live {
            Self::complete(&mut s, &self.cv);
        }
    }

    /// Wait until `n` vCPUs are at the barrier (or `timeout`).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let mut s = self.state.lock();
        let deadline = std::time::Instant::now() + timeout;
        while s.waiting + s.meeting < n && !s.stopped {
            if self.cv.wait_until(&mut s, deadline).timed_out() {
                break;
            }
        }
        s.waiting + s.meeting >= n
    }

    /// Let every waiting vCPU go on.
    pub fn release(&self) {
        let mut s = self.state.lock();
        s.epoch += 1;
        self.cv.notify_all();
    }

    fn stop(&self) {
        self.state.lock().stopped = true;
        self.cv.notify_all();
    }

    fn sleep(&self, d: Duration) {
        let mut s = self.state.lock();
        if !s.stopped {
            self.cv.wait_for(&mut s, d);
        }
    }
}

/// Host actions that make guest RAM fresh, counted for payloads that
/// tell a legitimately zeroed page from a lost write (`EPOCH_*`).
#[derive(Debug, Default)]
pub struct Epochs {
    pub started: AtomicU64,
    pub done: AtomicU64,
}

/// One `PROGRESS` or `PROGRESS_SPAN` write, timestamped when the VMM saw it.
#[derive(Clone, Copy, Debug)]
pub struct ProgressMark {
    pub at: std::time::Instant,
    pub vcpu: u32,
    /// The longest step since the vCPU's previous mark, in 1024 TSC cycles.
    pub gap: u32,
    /// A `PROGRESS` mark (the payload's fixed amount of work), not a span.
    pub work: bool,
    /// How long the vCPU thread had waited runnable for a CPU, in ns since
    /// it started (`crate::schedstat`; `None` where the kernel keeps no
    /// account): the difference between two marks tells the time another
    /// task held its CPU apart from time it was blocked or working.
    pub run_delay_ns: Option<u64>,
}

pub struct TestDevice {
    pub epochs: std::sync::Arc<Epochs>,
    marks: Mutex<Vec<ProgressMark>>,
    /// When the first command arrived (the guest is running its code).
    first_command: std::sync::OnceLock<std::time::Instant>,
    args: Vec<Mutex<Vec<u32>>>,
    samples: Vec<Mutex<Vec<u32>>>,
    stop_requested: std::sync::atomic::AtomicBool,
    pub barrier: Barrier,
    pub console: Console,
    protocol_errors: AtomicU64,
}

impl TestDevice {
    pub fn new(vcpus: usize) -> Self {
        Self::with_console(vcpus, Sink::Buffer(Default::default()), Default::default())
    }

    /// A device whose `CONSOLE` text goes to `sink` and whose `EPOCH_*`
    /// registers read `epochs`.
    pub fn with_console(vcpus: usize, sink: Sink, epochs: std::sync::Arc<Epochs>) -> Self {
        let barrier = Barrier::default();
        barrier.state.lock().live = vcpus;
        TestDevice {
            epochs,
            marks: Mutex::new(Vec::new()),
            first_command: std::sync::OnceLock::new(),
            args: (0..vcpus)
                .map(|_| Mutex::new(Vec::with_capacity(MAX_ARGS)))
                .collect(),
            samples: (0..vcpus).map(|_| Mutex::new(Vec::new())).collect(),
            stop_requested: std::sync::atomic::AtomicBool::new(false),
            barrier,
            console: Console::new(vcpus, sink),
            protocol_errors: AtomicU64::new(0),
        }
    }

    /// Record a progress mark, unless `MAX_MARKS` are waiting to be taken
    /// (the account is read only then, and outside the lock: this runs on
    /// the vCPU's own thread, whose account it is).
    fn mark(&self, vcpu: usize, gap: u32, work: bool) {
        if self.marks.lock().len() >= MAX_MARKS {
            return;
        }
        let at = std::time::Instant::now();
        let run_delay_ns = crate::schedstat::SchedAccount::of_this_thread().map(|a| a.run_delay_ns);
        let mut m = self.marks.lock();
        if m.len() < MAX_MARKS {
            m.push(ProgressMark {
                at,
                vcpu: vcpu as u32,
                gap,
                work,
                run_delay_ns,
            });
        }
    }

    /// A guest write at `offset` in the device's page. Guest input is not
    /// trusted: bad sizes and offsets, too many arguments and unknown
    /// commands are counted and ignored.
    pub fn write(&self, vcpu: usize, offset: u64, data: &[u8]) -> Outcome {
        if offset == CONSOLE {
            self.console.write(vcpu, data);
            return Outcome::Continue;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.protocol_error(vcpu, "access that is not 32 bits wide");
            return Outcome::Continue;
        };
        let value = u32::from_le_bytes(bytes);
        if offset == CMD {
            self.first_command.get_or_init(std::time::Instant::now);
        }
        if offset == PROGRESS || offset == PROGRESS_SPAN {
            self.mark(vcpu, value, offset == PROGRESS);
            return Outcome::Continue;
        }
        if offset == EXIT {
            return self.finish(VcpuReport {
                passed: value == 0,
                args: vec![value],
                samples: Vec::new(),
                ending: Ending::Exit(value),
            });
        }
        let mut args = self.args[vcpu].lock();
        match offset {
            ARG if args.len() < MAX_ARGS => args.push(value),
            ARG => {
                drop(args);
                self.protocol_error(vcpu, "more than 16 arguments");
            }
            CMD => match value {
                CMD_PASS | CMD_FAIL => {
                    let report = VcpuReport {
                        passed: value == CMD_PASS,
                        args: std::mem::take(&mut *args),
                        samples: std::mem::take(&mut *self.samples[vcpu].lock()),
                        ending: Ending::Verdict,
                    };
                    drop(args);
                    return self.finish(report);
                }
                CMD_CRASH if args.len() == CRASH_ARGS => {
                    let report = VcpuReport {
                        passed: false,
                        args: std::mem::take(&mut *args),
                        samples: Vec::new(),
                        ending: Ending::Crash,
                    };
                    drop(args);
                    return self.finish(report);
                }
                CMD_CLEAR => args.clear(),
                CMD_SYNC => {
                    let phase = args.first().copied().unwrap_or(0);
                    args.clear();
                    drop(args);
                    self.barrier.meet(phase);
                }
                CMD_SAMPLE => {
                    let v = args.first().copied().unwrap_or(0);
                    args.clear();
                    drop(args);
                    let mut s = self.samples[vcpu].lock();
                    if s.len() < MAX_SAMPLES {
                        s.push(v);
                    }
                }
                CMD_BARRIER => {
                    let phase = args.first().copied().unwrap_or(0);
                    args.clear();
                    drop(args);
                    self.barrier.wait(phase);
                }
                CMD_IDLE => {
                    args.clear();
                    drop(args);
                    self.barrier.sleep(Duration::from_millis(10));
                }
                other => {
                    args.clear();
                    drop(args);
                    self.protocol_error(vcpu, &format!("unknown command {other:#x}"));
                }
            },
            other => {
                drop(args);
                self.protocol_error(vcpu, &format!("write to unknown offset {other:#x}"));
            }
        }
        Outcome::Continue
    }

    /// The program on `vcpu` ended: it leaves the barrier's meetings.
    fn finish(&self, report: VcpuReport) -> Outcome {
        self.barrier.leave();
        Outcome::Finished(report)
    }

    fn protocol_error(&self, vcpu: usize, what: &str) {
        let n = self.protocol_errors.fetch_add(1, Ordering::Relaxed);
        if n < 10 {
            log::warn!("test device: vCPU {vcpu}: {what}");
        }
    }

    /// Progress marks since the last call, oldest first.
    pub fn take_marks(&self) -> Vec<ProgressMark> {
        std::mem::take(&mut *self.marks.lock())
    }

    /// A guest read: STOP and the epoch counters are readable.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let epoch = match offset {
            EPOCH_STARTED => Some(&self.epochs.started),
            EPOCH_DONE => Some(&self.epochs.done),
            _ => None,
        };
        if let Some(e) = epoch {
            let v = (e.load(Ordering::SeqCst) as u32).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&v[..n]);
            return;
        }
        if offset == STOP
            && self
                .stop_requested
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            if let Some(b) = data.first_mut() {
                *b = 1;
            }
        }
    }

    /// Ask looping payloads to finish (they poll STOP).
    pub fn request_stop(&self) {
        self.stop_requested
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// When the guest first reached the device, if it has.
    pub fn first_command(&self) -> Option<std::time::Instant> {
        self.first_command.get().copied()
    }

    pub fn protocol_errors(&self) -> u64 {
        self.protocol_errors.load(Ordering::Relaxed)
    }

    /// Wake every vCPU blocked in the device (VM stopping).
    pub fn stop(&self) {
        self.barrier.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A guest posting marks nobody takes makes the VMM hold `MAX_MARKS`
    /// of them, no more; span marks count no work.
    #[test]
    fn progress_marks_are_bounded_and_tell_work_from_spans() {
        let d = TestDevice::new(1);
        d.write(0, PROGRESS, &3u32.to_le_bytes());
        d.write(0, PROGRESS_SPAN, &5u32.to_le_bytes());
        let m = d.take_marks();
        assert_eq!(m.len(), 2);
        assert!(m[0].work && !m[1].work);
        assert_eq!((m[0].gap, m[1].gap), (3, 5));
        for _ in 0..MAX_MARKS + 100 {
            d.write(0, PROGRESS_SPAN, &1u32.to_le_bytes());
        }
        assert_eq!(d.take_marks().len(), MAX_MARKS);
        assert_eq!(d.protocol_errors(), 0);
    }

    /// The run delay a mark carries is the writing thread's own: a vCPU
    /// thread that shares its CPU with a spinning thread shows the time it
    /// waited, mark to mark (the bench's split of a stall rests on this).
    #[test]
    fn marks_carry_the_writing_threads_run_delay() {
        if crate::schedstat::SchedAccount::of_this_thread().is_none() {
            eprintln!("no schedstat on this kernel; nothing to check");
            return;
        }
        let d = Arc::new(TestDevice::new(1));
        let cpu = crate::affinity::allowed_cpus().unwrap()[0];
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                crate::affinity::pin(0, &[cpu]).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let vcpu = {
            let d = d.clone();
            std::thread::spawn(move || {
                crate::affinity::pin(0, &[cpu]).unwrap();
                let t = std::time::Instant::now();
                while t.elapsed() < Duration::from_millis(300) {
                    d.write(0, PROGRESS_SPAN, &0u32.to_le_bytes());
                    let s = std::time::Instant::now();
                    while s.elapsed() < Duration::from_millis(1) {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        vcpu.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        spinner.join().unwrap();
        let marks = d.take_marks();
        let first = marks.first().unwrap().run_delay_ns.unwrap();
        let last = marks.last().unwrap().run_delay_ns.unwrap();
        assert!(
            last - first > 20_000_000,
            "{} ns of run delay in {} marks",
            last - first,
            marks.len()
        );
    }

    #[test]
    fn args_then_command_make_a_report() {
        let d = TestDevice::new(2);
        assert_eq!(d.write(1, ARG, &7u32.to_le_bytes()), Outcome::Continue);
        assert_eq!(d.write(1, ARG, &9u32.to_le_bytes()), Outcome::Continue);
        assert_eq!(
            d.write(1, CMD, &CMD_PASS.to_le_bytes()),
            Outcome::Finished(VcpuReport {
                passed: true,
                args: vec![7, 9],
                samples: vec![],
                ending: Ending::Verdict,
            })
        );
        // vCPU 0's buffer is separate and empty.
        assert_eq!(
            d.write(0, CMD, &CMD_FAIL.to_le_bytes()),
            Outcome::Finished(VcpuReport {
                passed: false,
                args: vec![],
                samples: vec![],
                ending: Ending::Verdict,
            })
        );
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        let d = TestDevice::new(1);
        assert_eq!(d.write(0, CMD, &[1]), Outcome::Continue);
        assert_eq!(d.write(0, CMD, &0xdeadu32.to_le_bytes()), Outcome::Continue);
        assert_eq!(d.write(0, 0x800, &1u32.to_le_bytes()), Outcome::Continue);
        for _ in 0..20 {
            d.write(0, ARG, &1u32.to_le_bytes());
        }
        assert_eq!(d.protocol_errors(), 3 + 4);
    }

    #[test]
    fn barrier_holds_until_released() {
        let d = Arc::new(TestDevice::new(1));
        let t = {
            let d = d.clone();
            std::thread::spawn(move || {
                d.write(0, ARG, &5u32.to_le_bytes());
                d.write(0, CMD, &CMD_BARRIER.to_le_bytes())
            })
        };
        assert!(d.barrier.wait_for(1, Duration::from_secs(10)));
        assert_eq!(d.barrier.waiting(), (1, 5));
        d.barrier.release();
        assert_eq!(t.join().unwrap(), Outcome::Continue);
    }

    #[test]
    fn sync_releases_when_every_running_vcpu_is_there() {
        let d = Arc::new(TestDevice::new(3));
        let meet = |v: usize| {
            let d = d.clone();
            std::thread::spawn(move || d.write(v, CMD, &CMD_SYNC.to_le_bytes()))
        };
        let (a, b) = (meet(0), meet(1));
        assert!(d.barrier.wait_for(2, Duration::from_secs(10)));
        // vCPU 2 ends instead of meeting: the two others go on.
        assert!(matches!(
            d.write(2, EXIT, &3u32.to_le_bytes()),
            Outcome::Finished(VcpuReport {
                passed: false,
                ending: Ending::Exit(3),
                ..
            })
        ));
        assert_eq!(a.join().unwrap(), Outcome::Continue);
        assert_eq!(b.join().unwrap(), Outcome::Continue);
        // Now two are running: a meeting of both completes by itself.
        let (a, b) = (meet(0), meet(1));
        assert_eq!(a.join().unwrap(), Outcome::Continue);
        assert_eq!(b.join().unwrap(), Outcome::Continue);
    }

    #[test]
    fn a_crash_needs_its_full_report_and_console_bytes_of_any_width_are_text() {
        let d = TestDevice::new(1);
        d.write(0, CMD, &CMD_CLEAR.to_le_bytes());
        for v in 0..CRASH_ARGS as u32 - 1 {
            d.write(0, ARG, &v.to_le_bytes());
        }
        assert_eq!(d.write(0, CMD, &CMD_CRASH.to_le_bytes()), Outcome::Continue);
        d.write(0, CMD, &CMD_CLEAR.to_le_bytes());
        for v in 0..CRASH_ARGS as u32 {
            d.write(0, ARG, &v.to_le_bytes());
        }
        assert!(matches!(
            d.write(0, CMD, &CMD_CRASH.to_le_bytes()),
            Outcome::Finished(VcpuReport {
                ending: Ending::Crash,
                ..
            })
        ));
        d.write(0, CONSOLE, b"hi there");
        d.write(0, CONSOLE, b"!");
        d.write(0, CONSOLE, b"\n");
        assert_eq!(d.console.text().0, "hi there!\n");
    }
}
