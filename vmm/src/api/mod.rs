//! The control socket: what may be asked ([`protocol`]), the server on the
//! VMM's event loop ([`server`]) with its worker thread ([`worker`]), and
//! the client `odpvm ctl` uses ([`client`]).

pub mod client;
pub mod protocol;
pub mod server;
mod worker;

pub use client::{request, request_raw, Answer, ClientError};
pub use protocol::{parse_u64, ApiError, Num, Reply, Request, Response};
pub use server::{ApiServer, BindError, Limits};
pub use worker::{TEARDOWN_DUTY, TEARDOWN_MIN_GAP};
