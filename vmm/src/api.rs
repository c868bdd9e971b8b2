//! The control socket: a Unix stream socket driven by event-manager. Each
//! line a client sends is one JSON request; each gets one JSON line back.
//!
//! ```text
//!   {"op":"stats"}
//!   {"op":"invalidate","gpa":"0x200000","len":4096}
//!   {"op":"teardown"} {"op":"pause"} {"op":"resume"} {"op":"shutdown"}
//! ```
//!
//! Answers are `{"ok":true,...}` or `{"ok":false,"error":"..."}`; nothing a
//! client sends can stop the VMM except `shutdown`.

use crate::vm::VmHandle;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest request line accepted; longer ones are answered with an error
/// and the connection is closed.
const MAX_LINE: usize = 64 * 1024;
const MAX_CLIENTS: usize = 16;

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    clients: HashMap<RawFd, Client>,
    vm: VmHandle,
}

impl ApiServer {
    pub fn bind(path: &Path, vm: VmHandle) -> std::io::Result<Self> {
        if path.exists() {
            // A stale socket from an earlier run; a live one refuses.
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    ErrorKind::AddrInUse,
                    format!("{} is in use by a running odpvm", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            listener,
            clients: HashMap::new(),
            vm,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.clients.len() >= MAX_CLIENTS {
                let mut s = stream;
                let _ = writeln!(s, "{}", json!({"ok": false, "error": "too many clients"}));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.clients.insert(
                    fd,
                    Client {
                        stream,
                        buf: Vec::new(),
                    },
                );
            }
        }
    }

    fn serve(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let mut close = false;
        loop {
            match client.stream.read(&mut chunk) {
                Ok(0) => {
                    close = true;
                    break;
                }
                Ok(n) => client.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    close = true;
                    break;
                }
            }
        }
        while let Some(pos) = client.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = client.buf.drain(..=pos).collect();
            let reply = handle_line(&self.vm, &line[..line.len() - 1]);
            // A client that does not read its answers loses them.
            let _ = client.stream.set_nonblocking(false);
            let _ = writeln!(client.stream, "{reply}");
            let _ = client.stream.set_nonblocking(true);
        }
        if client.buf.len() > MAX_LINE {
            let _ = writeln!(
                client.stream,
                "{}",
                json!({"ok": false, "error": "request line too long"})
            );
            close = true;
        }
        if close {
            if let Some(c) = self.clients.remove(&fd) {
                let _ = ops.remove(Events::empty(&c.stream));
            }
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
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("control socket: cannot watch the listener: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve(events.fd(), ops);
        }
    }
}

/// A number as JSON: an integer, or a string in decimal or 0x-hex.
fn number(v: Option<&Value>, name: &str) -> Result<u64, String> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("{name} must be a non-negative integer")),
        Some(Value::String(s)) => parse_u64(s).map_err(|e| format!("{name}: {e}")),
        Some(_) => Err(format!("{name} must be a number or a string")),
        None => Err(format!("missing {name}")),
    }
}

/// Decimal or 0x-prefixed hexadecimal.
pub fn parse_u64(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number"))
}

/// Answer one request line.
pub fn handle_line(vm: &VmHandle, line: &[u8]) -> Value {
    match handle(vm, line) {
        Ok(Value::Object(mut o)) => {
            o.insert("ok".into(), true.into());
            Value::Object(o)
        }
        Ok(other) => json!({"ok": true, "result": other}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

fn handle(vm: &VmHandle, line: &[u8]) -> Result<Value, String> {
    let req: Value =
        serde_json::from_slice(line).map_err(|e| format!("request is not JSON: {e}"))?;
    let op = req
        .get("op")
        .and_then(Value::as_str)
        .ok_or("request needs a string field \"op\"")?;
    match op {
        "stats" => serde_json::to_value(vm.stats()).map_err(|e| e.to_string()),
        "invalidate" => {
            let gpa = number(req.get("gpa"), "gpa")?;
            let len = number(req.get("len"), "len")?;
            let zapped = vm.invalidate(gpa, len).map_err(|e| e.to_string())?;
            Ok(json!({"translations_zapped": zapped}))
        }
        "teardown" => {
            let ns = vm.teardown().map_err(|e| e.to_string())?;
            Ok(json!({"teardown_ns": ns}))
        }
        "pause" => {
            vm.pause();
            Ok(json!({}))
        }
        "resume" => {
            vm.resume();
            Ok(json!({}))
        }
        "shutdown" => {
            vm.shutdown();
            Ok(json!({}))
        }
        other => Err(format!(
            "unknown op {other:?} (stats, invalidate, teardown, pause, resume, shutdown)"
        )),
    }
}

/// The client side (`odpvm ctl`): send one request, return the answer.
pub fn request(path: &Path, req: &Value) -> Result<Value, String> {
    let mut s =
        UnixStream::connect(path).map_err(|e| format!("connecting to {}: {e}", path.display()))?;
    writeln!(s, "{req}").map_err(|e| format!("sending: {e}"))?;
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(s);
    std::io::BufRead::read_line(&mut reader, &mut line).map_err(|e| format!("reading: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("answer is not JSON ({e}): {line:?}"))
}
