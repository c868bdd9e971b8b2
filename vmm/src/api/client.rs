//! The client side of the control socket (`odpvm ctl`): one request, one
//! answer, bounded by a timeout. A server that refuses the connection (too
//! many clients, wrong uid) says why before closing; that answer is what the
//! caller gets, not the broken pipe of the write that raced the close.

use super::protocol::{Reply, Request};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the request is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("encoding the request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("sending the request: {0}")]
    Send(#[source] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("reading the answer: {0}")]
    Receive(#[source] std::io::Error),
    #[error("the VMM closed the connection without answering")]
    Closed,
    #[error("the answer is not JSON ({source}): {line:?}")]
    BadAnswer {
        line: String,
        source: serde_json::Error,
    },
}

/// An answer: the line as received and its decoded form.
#[derive(Debug, Clone)]
pub struct Answer {
    pub line: String,
    pub reply: Reply,
}

/// Send `req`, wait at most `timeout` for the answer.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Answer, ClientError> {
    let line = serde_json::to_string(req).map_err(ClientError::Encode)?;
    exchange(path, &line, timeout)
}

/// Send a raw JSON request (checked to be JSON, not to be a valid request:
/// this is how a client probes the server's own validation).
pub fn request_raw(path: &Path, json: &str, timeout: Duration) -> Result<Answer, ClientError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(ClientError::NotJson)?;
    exchange(path, &v.to_string(), timeout)
}

fn exchange(path: &Path, line: &str, timeout: Duration) -> Result<Answer, ClientError> {
    let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let timeout = timeout.max(Duration::from_millis(1));
    let timed_out =
        |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
    s.set_read_timeout(Some(timeout))
        .map_err(ClientError::Send)?;
    s.set_write_timeout(Some(timeout))
        .map_err(ClientError::Send)?;
    let mut w = &s;
    let sent = w.write_all(format!("{line}\n").as_bytes());
    // A refusal is already queued for us when the write fails: read it.
    let mut answer = String::new();
    let read = BufReader::new(&s).read_line(&mut answer);
    match (read, sent) {
        (Ok(_), _) if !answer.is_empty() => {}
        (Err(e), _) if timed_out(&e) => return Err(ClientError::Timeout(timeout)),
        (_, Err(e)) if timed_out(&e) => return Err(ClientError::Timeout(timeout)),
        (_, Err(e)) => return Err(ClientError::Send(e)),
        (Err(e), Ok(())) => return Err(ClientError::Receive(e)),
        (Ok(_), Ok(())) => return Err(ClientError::Closed),
    }
    let answer = answer.trim_end().to_string();
    let reply = serde_json::from_str(&answer).map_err(|source| ClientError::BadAnswer {
        line: answer.clone(),
        source,
    })?;
    Ok(Answer {
        line: answer,
        reply,
    })
}
