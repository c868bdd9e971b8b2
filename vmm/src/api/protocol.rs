//! The control protocol on the wire: one JSON request per line, one JSON
//! answer per line. [`Request`] is the one definition of what may be asked;
//! the server decodes it and `odpvm ctl` encodes it, so they cannot drift.
//!
//! ```text
//!   {"op":"stats"}
//!   {"op":"invalidate","gpa":"0x200000","len":4096}
//!   {"op":"teardown"} {"op":"pause"} {"op":"resume"} {"op":"shutdown"}
//! ```
//!
//! Answers are `{"ok":true,...}` or `{"ok":false,"error":"...","kind":"..."}`
//! where `kind` is [`ApiError::kind`], stable for scripts.

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;

/// A guest-physical address or length. On the wire: a JSON integer, or a
/// string in decimal or `0x` hexadecimal (JSON numbers lose precision past
/// 2^53 in many clients; strings do not). Sent as a hex string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Num(pub u64);

/// Why a number given as text is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a number (decimal or 0x-hex)")]
pub struct NotANumber(pub String);

/// Decimal or 0x-prefixed hexadecimal.
pub fn parse_u64(s: &str) -> Result<u64, NotANumber> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    r.map_err(|_| NotANumber(t.to_string()))
}

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

struct NumVisitor;

impl Visitor<'_> for NumVisitor {
    type Value = Num;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a non-negative integer, or a string in decimal or 0x-hex")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
        Ok(Num(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
        u64::try_from(v)
            .map(Num)
            .map_err(|_| E::custom(format!("{v} is negative")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Num, E> {
        Err(E::custom(format!("{v} is not an integer")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Num, E> {
        parse_u64(v).map(Num).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Num, D::Error> {
        d.deserialize_any(NumVisitor)
    }
}

/// Everything a control client may ask. Every request is allowed from the
/// moment the socket exists until the VM has stopped; each says what else
/// it needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The VM's counters (`LiveStats`). Always allowed, paused or not.
    Stats,
    /// Invalidate guest-physical `[gpa, gpa + len)` in the mmu and every
    /// mirror (KVM, RNIC). Both page aligned and inside guest RAM, else an
    /// `mmu` error. Allowed paused or running; vCPUs that touch the range
    /// afterwards fault it in again.
    Invalidate { gpa: Num, len: Num },
    /// O(1) teardown of every translation. Allowed paused or running;
    /// requests arriving while one waits its turn are coalesced into it,
    /// and teardowns are spaced so the guest keeps making progress.
    Teardown,
    /// Hold every vCPU outside the guest. Allowed while running; pausing a
    /// paused VM does nothing.
    Pause,
    /// Undo `pause` and release vCPUs waiting at a payload barrier.
    /// Always allowed.
    Resume,
    /// Stop the VM (the process then reports and exits). Always allowed;
    /// answered before the VM is gone.
    Shutdown,
}

/// What a successful request answers (besides `"ok":true`).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Response {
    Stats(Box<crate::vm::LiveStats>),
    Invalidated {
        translations_zapped: u64,
    },
    TornDown {
        teardown_ns: u64,
        /// Other teardown requests this one answered too.
        coalesced: u64,
    },
    Done {},
}

/// Why a request (or a connection) was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(#[from] serde_json::Error),
    #[error("{0}")]
    Mmu(#[from] mmu::Error),
    #[error("request line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("too many connections (the limit is {0}); try again later")]
    TooManyClients(usize),
    #[error("permission denied: uid {peer} is not the VMM's owner (uid {owner})")]
    PeerUid { peer: u32, owner: u32 },
    #[error("cannot tell who is connecting (SO_PEERCRED): {0}")]
    PeerUnknown(std::io::Error),
    #[error("idle for {0} s; closing the connection")]
    Idle(u64),
    #[error("the VM stopped before the request was served")]
    Stopped,
}

impl ApiError {
    /// A stable name for scripts (the answer's `kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Mmu(_) => "mmu",
            ApiError::LineTooLong(_) => "line_too_long",
            ApiError::TooManyClients(_) => "too_many_clients",
            ApiError::PeerUid { .. } | ApiError::PeerUnknown(_) => "permission_denied",
            ApiError::Idle(_) => "idle_timeout",
            ApiError::Stopped => "stopped",
        }
    }
}

/// One answer line as sent: `{"ok":true,...}` or the error form.
pub fn encode(answer: &Result<Response, ApiError>) -> String {
    let v = match answer {
        Ok(r) => {
            let mut o = match serde_json::to_value(r) {
                Ok(Value::Object(o)) => o,
                Ok(other) => Map::from_iter([("result".to_string(), other)]),
                Err(e) => return encode(&Err(ApiError::BadRequest(e))),
            };
            o.insert("ok".into(), true.into());
            Value::Object(o)
        }
        Err(e) => serde_json::json!({"ok": false, "error": e.to_string(), "kind": e.kind()}),
    };
    let mut line = v.to_string();
    line.push('\n');
    line
}

/// An answer as a client reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    /// The response's fields (stats counters, `translations_zapped`, …).
    #[serde(flatten)]
    pub body: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_the_documented_wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"op":"invalidate","gpa":"0x200000","len":4096}"#).unwrap();
        assert_eq!(
            r,
            Request::Invalidate {
                gpa: Num(0x200000),
                len: Num(4096)
            }
        );
        let back = serde_json::to_string(&r).unwrap();
        assert_eq!(
            back,
            r#"{"op":"invalidate","gpa":"0x200000","len":"0x1000"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Stats).unwrap(),
            r#"{"op":"stats"}"#
        );
        for op in ["stats", "teardown", "pause", "resume", "shutdown"] {
            let r: Request = serde_json::from_str(&format!(r#"{{"op":"{op}"}}"#)).unwrap();
            assert_eq!(serde_json::to_value(&r).unwrap()["op"], op);
        }
    }

    #[test]
    fn bad_numbers_and_ops_are_errors_with_reasons() {
        for (line, why) in [
            (r#"{"op":"invalidate","gpa":-5,"len":1}"#, "negative"),
            (r#"{"op":"invalidate","gpa":1.5,"len":1}"#, "not an integer"),
            (r#"{"op":"invalidate","gpa":"zz","len":1}"#, "not a number"),
            (r#"{"op":"invalidate","gpa":1}"#, "len"),
            (r#"{"op":"bogus"}"#, "unknown variant"),
            (r#"[1,2,3]"#, "invalid type"),
        ] {
            let e = serde_json::from_str::<Request>(line)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{line}: {e}");
        }
    }

    #[test]
    fn answers_carry_ok_and_a_stable_kind() {
        let ok = encode(&Ok(Response::Invalidated {
            translations_zapped: 3,
        }));
        assert_eq!(ok, "{\"ok\":true,\"translations_zapped\":3}\n");
        let done = encode(&Ok(Response::Done {}));
        assert_eq!(done, "{\"ok\":true}\n");
        let err = encode(&Err(ApiError::TooManyClients(16)));
        let r: Reply = serde_json::from_str(&err).unwrap();
        assert!(!r.ok);
        assert_eq!(r.kind.as_deref(), Some("too_many_clients"));
        assert!(r.error.unwrap().contains("16"));
    }
}
