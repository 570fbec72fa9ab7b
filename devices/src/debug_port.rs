//! The firmware debug port (QEMU's "debugcon", I/O port 0x402): SeaBIOS and OVMF write their
//! log here a byte at a time. ferry hands it on line by line, so the vmm can keep a log file
//! and notice what the firmware says about booting.

pub const DEBUG_PORT: u64 = 0x402;
/// What a read returns: SeaBIOS only uses the port if it reads back this value.
const READBACK: u8 = 0xe9;
/// A line longer than this is handed on in pieces (a guest may never send a newline).
const MAX_LINE: usize = 1024;

/// Bytes of text, a line at a time: CR is dropped, LF ends a line, and a line that reaches
/// `MAX_LINE` bytes is handed on in pieces (a guest may never send a newline).
#[derive(Default)]
pub struct LineAssembler {
    line: Vec<u8>,
}

impl LineAssembler {
    /// Takes one byte; returns the line it completes, without its ending, as (lossy) UTF-8.
    pub fn push(&mut self, b: u8) -> Option<String> {
        match b {
            b'\n' => return Some(self.take_line()),
            b'\r' => {}
            _ => {
                self.line.push(b);
                if self.line.len() >= MAX_LINE {
                    return Some(self.take_line());
                }
            }
        }
        None
    }

    /// What is left of an unfinished line, if anything.
    pub fn rest(&mut self) -> Option<String> {
        (!self.line.is_empty()).then(|| self.take_line())
    }

    fn take_line(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        text
    }
}

pub struct DebugPort {
    lines: LineAssembler,
    sink: Box<dyn FnMut(&str) + Send>,
}

impl DebugPort {
    /// `sink` gets each line, without its line ending, as (lossy) UTF-8.
    pub fn new(sink: Box<dyn FnMut(&str) + Send>) -> Self {
        Self {
            lines: LineAssembler::default(),
            sink,
        }
    }
}

impl Drop for DebugPort {
    fn drop(&mut self) {
        if let Some(line) = self.lines.rest() {
            (self.sink)(&line);
        }
    }
}

impl crate::BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = READBACK;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Only the low byte of a wider write is a character, as on QEMU.
        if let Some(line) = data.first().and_then(|&b| self.lines.push(b)) {
            (self.sink)(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;
    use std::sync::{Arc, Mutex};

    fn port() -> (DebugPort, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let p = DebugPort::new(Box::new(move |s| l.lock().unwrap().push(s.to_string())));
        (p, lines)
    }

    #[test]
    fn reads_back_the_debugcon_value() {
        let (mut p, _) = port();
        let mut b = [0u8; 1];
        p.read(0, &mut b);
        assert_eq!(b, [0xe9]);
    }

    #[test]
    fn hands_on_whole_lines() {
        let (mut p, lines) = port();
        for b in b"SeaBIOS (version 1.16)\r\nBooting from Hard" {
            p.write(0, &[*b]);
        }
        assert_eq!(*lines.lock().unwrap(), vec!["SeaBIOS (version 1.16)"]);
        p.write(0, &[b' ', 0]);
        p.write(0, b"D\0");
        p.write(0, b"\n");
        assert_eq!(lines.lock().unwrap()[1], "Booting from Hard D");
        drop(p);
    }

    #[test]
    fn splits_endless_lines_and_flushes_at_drop() {
        let (mut p, lines) = port();
        for _ in 0..MAX_LINE + 5 {
            p.write(0, b"x");
        }
        assert_eq!(lines.lock().unwrap().len(), 1);
        assert_eq!(lines.lock().unwrap()[0].len(), MAX_LINE);
        p.write(0, &[0xff]);
        drop(p);
        let l = lines.lock().unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1], "xxxxx\u{fffd}");
    }
}
