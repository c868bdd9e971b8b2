//! Console text from user programs: bytes arrive per vCPU through the
//! test device's `CONSOLE` register, are cut into lines per vCPU (so two
//! vCPUs printing at once never mix inside a line), echoed to the VMM's
//! console sink and kept, up to a bound, for the run report.
//!
//! The guest is untrusted: a line longer than `MAX_LINE` is cut, and past
//! `MAX_TRANSCRIPT` bytes text is counted but no longer kept or echoed
//! (tests `lines_of_two_vcpus_never_mix_and_long_ones_are_cut`,
//! `text_past_the_bound_is_counted_not_kept`).

use crate::devices::serial::Sink;
use parking_lot::Mutex;
use std::io::Write;

/// Longest line kept whole; longer ones are cut there.
pub const MAX_LINE: usize = 4096;
/// Most console bytes one run keeps (and echoes).
pub const MAX_TRANSCRIPT: usize = 1 << 20;

struct Transcript {
    text: Vec<u8>,
    dropped: u64,
}

pub struct Console {
    sink: Mutex<Sink>,
    lines: Vec<Mutex<Vec<u8>>>,
    transcript: Mutex<Transcript>,
}

impl Console {
    pub fn new(vcpus: usize, sink: Sink) -> Self {
        Console {
            sink: Mutex::new(sink),
            lines: (0..vcpus).map(|_| Mutex::new(Vec::new())).collect(),
            transcript: Mutex::new(Transcript {
                text: Vec::new(),
                dropped: 0,
            }),
        }
    }

    /// Bytes vCPU `vcpu` wrote.
    pub fn write(&self, vcpu: usize, bytes: &[u8]) {
        let Some(line) = self.lines.get(vcpu) else {
            return;
        };
        let mut line = line.lock();
        for &b in bytes {
            line.push(b);
            if b == b'\n' || line.len() >= MAX_LINE {
                if b != b'\n' {
                    line.push(b'\n');
                }
                self.emit(&line);
                line.clear();
            }
        }
    }

    /// End every unfinished line (the program stopped mid-line).
    pub fn flush(&self) {
        for line in &self.lines {
            let mut line = line.lock();
            if !line.is_empty() {
                line.push(b'\n');
                self.emit(&line);
                line.clear();
            }
        }
    }

    fn emit(&self, line: &[u8]) {
        let mut t = self.transcript.lock();
        if t.text.len() + line.len() > MAX_TRANSCRIPT {
            t.dropped += line.len() as u64;
            return;
        }
        t.text.extend_from_slice(line);
        // Echo under the transcript lock: lines reach the sink in the
        // order they are kept.
        let mut sink = self.sink.lock();
        let _ = sink.write_all(line);
        let _ = sink.flush();
    }

    /// Everything kept so far (lossy UTF-8) and the bytes dropped.
    pub fn text(&self) -> (String, u64) {
        let t = self.transcript.lock();
        (String::from_utf8_lossy(&t.text).into_owned(), t.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn lines_of_two_vcpus_never_mix_and_long_ones_are_cut() {
        let out = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let c = Console::new(2, Sink::Buffer(out.clone()));
        c.write(0, b"hel");
        c.write(1, b"other\n");
        c.write(0, b"lo\nrest");
        c.write(7, b"no such vCPU\n");
        c.flush();
        assert_eq!(c.text().0, "other\nhello\nrest\n");
        assert_eq!(&*out.lock(), b"other\nhello\nrest\n");
        c.write(1, &vec![b'x'; MAX_LINE + 1]);
        c.flush();
        let (text, dropped) = c.text();
        assert_eq!(text.lines().last().unwrap(), "x");
        assert_eq!(dropped, 0);
    }

    #[test]
    fn text_past_the_bound_is_counted_not_kept() {
        let c = Console::new(1, Sink::Buffer(Default::default()));
        let line = vec![b'y'; 1000];
        for _ in 0..(MAX_TRANSCRIPT / 1001 + 10) {
            c.write(0, &line);
            c.write(0, b"\n");
        }
        let (text, dropped) = c.text();
        assert!(text.len() <= MAX_TRANSCRIPT);
        assert!(dropped >= 1001 * 9, "{dropped}");
    }
}
