//! The firmware debug port (QEMU's "debugcon", I/O port 0x402): SeaBIOS and OVMF write their
//! log here a byte at a time. ferry hands it on line by line, so the vmm can keep a log file
//! and notice what the firmware says about booting.

pub const DEBUG_PORT: u64 = 0x402;
/// What a read returns: SeaBIOS only uses the port if it reads back this value.
const READBACK: u8 = 0xe9;
/// A line longer than this is handed on in pieces (a guest may never send a newline).
const MAX_LINE: usize = 1024;

pub struct DebugPort {
    line: Vec<u8>,
    sink: Box<dyn FnMut(&str) + Send>,
}

impl DebugPort {
    /// `sink` gets each line, without its line ending, as (lossy) UTF-8.
    pub fn new(sink: Box<dyn FnMut(&str) + Send>) -> Self {
        Self {
            line: Vec::new(),
            sink,
        }
    }

    fn push(&mut self, b: u8) {
        match b {
            b'\n' => self.emit(),
            b'\r' => {}
            _ => {
                self.line.push(b);
                if self.line.len() >= MAX_LINE {
                    self.emit();
                }
            }
        }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        (self.sink)(&text);
    }
}

impl Drop for DebugPort {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
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
        if let Some(&b) = data.first() {
            self.push(b);
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
