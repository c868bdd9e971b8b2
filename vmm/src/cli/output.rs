//! Standard output for reports and progress lines. `println!` panics when
//! the reader has gone (`odpvm demo | head -1`: EPIPE, since Rust ignores
//! SIGPIPE); here that is an error the command turns into a clean stop and
//! one line on stderr. Proved by `a_closed_stdout_stops_the_demo_cleanly`
//! in `vmm/tests/kvm.rs`.

use std::io::Write;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("standard output is closed (the reader went away); stopping")]
    Closed,
    #[error("writing to standard output: {0}")]
    Io(std::io::Error),
}

/// Write `text` and a newline to stdout, flushed.
pub fn line(text: impl std::fmt::Display) -> Result<(), OutputError> {
    text_to_stdout(&format!("{text}\n"))
}

/// Write `text` as is to stdout, flushed.
pub fn text_to_stdout(text: &str) -> Result<(), OutputError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => OutputError::Closed,
            _ => OutputError::Io(e),
        })
}
