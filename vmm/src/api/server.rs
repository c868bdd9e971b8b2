//! The control socket's server: a Unix stream socket driven by
//! event-manager on the VMM's main thread. The main thread only moves
//! bytes; requests that may wait on guest memory run on one worker thread
//! ([`super::worker`]), so a stalled fault thread or a slow client never
//! keeps the main loop from SIGTERM, `--timeout` or other clients.
//!
//! Guarantees (each with the test that proves it, in `vmm/tests/api.rs`):
//! - The socket is created 0600 whatever the umask (bound in a private
//!   directory, then moved into place), and a peer whose uid is neither the
//!   VMM's nor root is refused (SO_PEERCRED):
//!   `socket_is_private_whatever_the_umask_and_checks_the_peer_uid`.
//! - `--api-sock PATH` replaces only a stale socket; a live socket or any
//!   other file is an error: `api_sock_never_replaces_a_file_or_a_live_socket`.
//! - Replies are written without blocking; a client that stops reading is
//!   not served further (backpressure) and is dropped after
//!   [`Limits::stall`] or past [`Limits::out_cap`] pending bytes:
//!   `a_client_that_never_reads_does_not_stall_the_vmm`.
//! - Idle connections are closed after [`Limits::idle`]; a client over
//!   [`Limits::max_clients`] is told why before it is closed:
//!   `idle_clients_are_closed_and_a_client_over_the_limit_is_told_why`.
//! - A last request without a newline is answered:
//!   `a_last_request_without_newline_is_answered`.

use super::protocol::{encode, ApiError, Request, Response};
use super::worker::{Done, Worker};
use crate::vm::VmHandle;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmm_sys_util::timerfd::TimerFd;

/// What one connection may cost the VMM.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections served at once; more are told why and closed.
    pub max_clients: usize,
    /// A connection with nothing in flight and nothing sent for this long
    /// is closed.
    pub idle: Duration,
    /// A client that accepts none of its pending answer for this long is
    /// dropped.
    pub stall: Duration,
    /// Longest request line.
    pub max_line: usize,
    /// Most answer bytes waiting for one client.
    pub out_cap: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: 16,
            idle: Duration::from_secs(60),
            stall: Duration::from_secs(5),
            max_line: 64 * 1024,
            out_cap: 256 * 1024,
        }
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{0} is in use by a running odpvm")]
    InUse(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Client {
    id: u64,
    stream: UnixStream,
    input: Vec<u8>,
    out: Vec<u8>,
    /// Bytes of `out` already sent.
    sent: usize,
    in_flight: bool,
    /// The peer will send nothing more.
    eof: bool,
    /// Close once `out` is sent (after an error that ends the connection).
    closing: bool,
    /// Last byte received or sent.
    active: Instant,
    watching: EventSet,
}

impl Client {
    fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    fn queue(&mut self, answer: &Result<Response, ApiError>) {
        self.out.extend_from_slice(encode(answer).as_bytes());
    }
}

pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    owner: u32,
    limits: Limits,
    clients: HashMap<RawFd, Client>,
    by_id: HashMap<u64, RawFd>,
    next_id: u64,
    worker: Worker,
    timer: TimerFd,
    vm: VmHandle,
}

/// Make `path` free for a new socket: nothing there, or a socket nobody
/// listens on (left by a VMM that died), which is removed.
fn clear_stale(path: &Path) -> Result<(), BindError> {
    let io = |what, source| BindError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("inspecting", e)),
        Ok(m) if !m.file_type().is_socket() => Err(BindError::NotASocket(path.to_path_buf())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(BindError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|e| io("removing the stale socket", e))
            }
            Err(e) => Err(io("probing the existing socket", e)),
        },
    }
}

/// Bind a listener at `path` that is 0600 from the moment it is visible:
/// it is bound inside a fresh 0700 directory next to `path`, narrowed to
/// 0600 there, then renamed into place (never over an existing file).
fn bind_private(path: &Path) -> Result<UnixListener, BindError> {
    let io = |what, source| BindError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = parent.join(format!(
        ".odpvm-sock-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| io("creating a private directory next to", e))?;
    let tmp = dir.join("api.sock");
    let result = (|| {
        let listener = UnixListener::bind(&tmp).map_err(|e| io("binding", e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("restricting", e))?;
        rename_noreplace(&tmp, path).map_err(|e| io("moving the socket to", e))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    result
}

fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The uid of the process at the other end of `s`.
fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given;
    // the kernel fills at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Tell a connection why it is refused (best effort, never blocking).
fn refuse(mut s: UnixStream, why: ApiError) {
    log::info!("control socket: refusing a connection: {why}");
    let _ = s.set_nonblocking(true);
    let _ = s.write_all(encode(&Err(why)).as_bytes());
}

impl ApiServer {
    pub fn bind(path: &Path, vm: VmHandle, limits: Limits) -> Result<Self, BindError> {
        clear_stale(path)?;
        let listener = bind_private(path)?;
        let io = |what, source| BindError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| io("configuring", e))?;
        let mut timer = TimerFd::new().map_err(|e| io("creating a timer for", e.into()))?;
        let tick = (limits.idle.min(limits.stall) / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        timer
            .reset(tick, Some(tick))
            .map_err(|e| io("arming a timer for", e.into()))?;
        let worker = Worker::spawn(vm.clone()).map_err(|e| io("starting the worker of", e))?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            listener,
            // SAFETY: geteuid has no preconditions and cannot fail.
            owner: unsafe { libc::geteuid() },
            limits,
            clients: HashMap::new(),
            by_id: HashMap::new(),
            next_id: 1,
            worker,
            timer,
            vm,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            match peer_uid(&stream) {
                Ok(uid) if uid == self.owner || uid == 0 => {}
                Ok(peer) => {
                    refuse(
                        stream,
                        ApiError::PeerUid {
                            peer,
                            owner: self.owner,
                        },
                    );
                    continue;
                }
                Err(e) => {
                    refuse(stream, ApiError::PeerUnknown(e));
                    continue;
                }
            }
            if self.clients.len() >= self.limits.max_clients {
                refuse(stream, ApiError::TooManyClients(self.limits.max_clients));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if ops.add(Events::new(&stream, EventSet::IN)).is_err() {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.by_id.insert(id, fd);
            self.clients.insert(
                fd,
                Client {
                    id,
                    stream,
                    input: Vec::new(),
                    out: Vec::new(),
                    sent: 0,
                    in_flight: false,
                    eof: false,
                    closing: false,
                    active: Instant::now(),
                    watching: EventSet::IN,
                },
            );
        }
    }

    fn drop_client(&mut self, fd: RawFd, ops: &mut EventOps, why: &str) {
        if let Some(c) = self.clients.remove(&fd) {
            log::debug!("control socket: closing client {}: {why}", c.id);
            self.by_id.remove(&c.id);
            let _ = ops.remove(Events::empty(&c.stream));
        }
    }

    /// Read what the client sent (at most one line's worth ahead).
    fn receive(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(c) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        while !c.eof && c.input.len() <= self.limits.max_line {
            match c.stream.read(&mut chunk) {
                Ok(0) => c.eof = true,
                Ok(n) => {
                    c.input.extend_from_slice(&chunk[..n]);
                    c.active = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.drop_client(fd, ops, "read error"),
            }
        }
        self.pump(fd, ops);
    }

    /// Serve the client's next requests while nothing of it is in flight
    /// or unsent, send what is pending, and watch what it now needs.
    fn pump(&mut self, fd: RawFd, ops: &mut EventOps) {
        let max_line = self.limits.max_line;
        let Some(c) = self.clients.get_mut(&fd) else {
            return;
        };
        while !c.in_flight && !c.closing && c.pending() == 0 {
            let line: Vec<u8> = if let Some(pos) = c.input.iter().position(|b| *b == b'\n') {
                let mut l: Vec<u8> = c.input.drain(..=pos).collect();
                l.pop();
                l
            } else if c.input.len() > max_line {
                c.input.clear();
                c.queue(&Err(ApiError::LineTooLong(max_line)));
                c.closing = true;
                break;
            } else if c.eof && !c.input.is_empty() {
                std::mem::take(&mut c.input)
            } else {
                break;
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Request>(&line) {
                Err(e) => c.queue(&Err(e.into())),
                Ok(Request::Shutdown) => {
                    self.vm.shutdown();
                    c.queue(&Ok(Response::Done {}));
                }
                // Counters only: answered here, even while the worker is
                // busy with a teardown or a long invalidation
                // (`stats_is_answered_while_a_teardown_is_in_flight`).
                Ok(Request::Stats) => {
                    c.queue(&Ok(Response::Stats(Box::new(self.vm.stats()))));
                }
                Ok(req) => {
                    c.in_flight = true;
                    self.worker.submit(c.id, req);
                }
            }
        }
        self.flush(fd, ops);
    }

    /// Send pending answer bytes without blocking.
    fn flush(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(c) = self.clients.get_mut(&fd) else {
            return;
        };
        if c.pending() > self.limits.out_cap {
            return self.drop_client(fd, ops, "too much unread output");
        }
        while c.pending() > 0 {
            match c.stream.write(&c.out[c.sent..]) {
                Ok(0) => break,
                Ok(n) => {
                    c.sent += n;
                    c.active = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.drop_client(fd, ops, "write error"),
            }
        }
        if c.pending() == 0 {
            c.out.clear();
            c.sent = 0;
        }
        let done = c.pending() == 0 && !c.in_flight && (c.closing || (c.eof && c.input.is_empty()));
        if done {
            return self.drop_client(fd, ops, "finished");
        }
        let mut want = EventSet::empty();
        if !c.eof && !c.in_flight && !c.closing && c.pending() == 0 {
            want |= EventSet::IN;
        }
        if c.pending() > 0 {
            want |= EventSet::OUT;
        }
        if want != c.watching && ops.modify(Events::new(&c.stream, want)).is_ok() {
            c.watching = want;
        }
    }

    /// Answers from the worker.
    fn answers(&mut self, ops: &mut EventOps) {
        for Done { client, answer } in self.worker.take_done() {
            let Some(&fd) = self.by_id.get(&client) else {
                continue; // it left meanwhile
            };
            if let Some(c) = self.clients.get_mut(&fd) {
                c.in_flight = false;
                c.queue(&answer);
            }
            self.pump(fd, ops);
        }
    }

    /// Close idle connections and drop clients that stopped reading.
    fn sweep(&mut self, ops: &mut EventOps) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let mut idle = Vec::new();
        let mut stalled = Vec::new();
        for (fd, c) in &self.clients {
            let quiet = now.saturating_duration_since(c.active);
            if c.in_flight {
                continue;
            }
            if c.pending() > 0 && quiet >= self.limits.stall {
                stalled.push(*fd);
            } else if c.pending() == 0 && quiet >= self.limits.idle {
                idle.push(*fd);
            }
        }
        for fd in stalled {
            log::warn!("control socket: dropping a client that stopped reading its answers");
            self.drop_client(fd, ops, "stalled");
        }
        for fd in idle {
            if let Some(c) = self.clients.get_mut(&fd) {
                let line = encode(&Err(ApiError::Idle(self.limits.idle.as_secs())));
                let _ = c.stream.write(line.as_bytes());
            }
            self.drop_client(fd, ops, "idle");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, what) in [
            (self.listener.as_raw_fd(), "the listener"),
            (self.worker.wake_fd(), "the worker"),
            (self.timer.as_raw_fd(), "the timer"),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("control socket: cannot watch {what}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            return self.accept(ops);
        }
        if fd == self.worker.wake_fd() {
            return self.answers(ops);
        }
        if fd == self.timer.as_raw_fd() {
            return self.sweep(ops);
        }
        let set = events.event_set();
        if set.contains(EventSet::ERROR) {
            return self.drop_client(fd, ops, "socket error");
        }
        if set.contains(EventSet::IN) {
            self.receive(fd, ops);
        }
        if set.contains(EventSet::HANG_UP) {
            // Both directions are closed: nobody can read an answer, and
            // epoll would report the hang-up again on every wait.
            self.drop_client(fd, ops, "hung up");
        } else if set.contains(EventSet::OUT) {
            self.pump(fd, ops);
        }
    }
}
