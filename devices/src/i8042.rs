//! The i8042 keyboard controller: enough of it for Linux's i8042/atkbd drivers and for firmware
//! to find a keyboard that answers, and its CPU reset line (command 0xFE), which guests use to
//! reboot. There is no mouse (the DSDT declares no PS/2 aux device) and no keys are typed yet.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::{BusDevice, EdgeInterrupt, ExitHandle, ExitRequest};

/// The device covers ports 0x60..=0x64; the hypervisor's PIT model owns 0x61 before us.
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
pub const KBD_IRQ: u32 = 1;
const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Status register bits.
const ST_OBF: u8 = 1 << 0;
const ST_SYS: u8 = 1 << 2;
const ST_CMD: u8 = 1 << 3;
const ST_UNLOCKED: u8 = 1 << 4;
const ST_AUX_OBF: u8 = 1 << 5;

// Controller configuration byte bits.
const CTR_KBD_INT: u8 = 1 << 0;
const CTR_SYS: u8 = 1 << 2;
const CTR_KBD_DISABLE: u8 = 1 << 4;
const CTR_AUX_DISABLE: u8 = 1 << 5;
const CTR_XLATE: u8 = 1 << 6;

// Keyboard replies.
const ACK: u8 = 0xfa;
const SELF_TEST_OK: u8 = 0xaa;

/// What the next byte written to the data port means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    WriteCtr,
    WriteOutputPort,
    KbdOutput,
    AuxOutput,
    AuxData,
    KbdArgument,
}

pub struct I8042 {
    ctr: u8,
    output_port: u8,
    last_was_command: bool,
    pending: Pending,
    /// Bytes waiting for the guest, with whether they come from the aux port.
    out: VecDeque<(u8, bool)>,
    kbd_irq: Arc<dyn EdgeInterrupt>,
    exit: Arc<dyn ExitHandle>,
}

impl I8042 {
    pub fn new(kbd_irq: Arc<dyn EdgeInterrupt>, exit: Arc<dyn ExitHandle>) -> Self {
        Self {
            ctr: CTR_KBD_INT | CTR_SYS | CTR_XLATE,
            output_port: 0x03, // reset line released, A20 enabled
            last_was_command: false,
            pending: Pending::None,
            out: VecDeque::new(),
            kbd_irq,
            exit,
        }
    }

    fn status(&self) -> u8 {
        let mut s = ST_UNLOCKED;
        if self.ctr & CTR_SYS != 0 {
            s |= ST_SYS;
        }
        if self.last_was_command {
            s |= ST_CMD;
        }
        if let Some(&(_, aux)) = self.out.front() {
            s |= ST_OBF;
            if aux {
                s |= ST_AUX_OBF;
            }
        }
        s
    }

    fn push(&mut self, byte: u8, aux: bool) {
        // A real controller holds one byte; a short queue stands in for the keyboard's buffer.
        if self.out.len() >= 16 {
            return;
        }
        self.out.push_back((byte, aux));
        if self.out.len() == 1 {
            self.raise();
        }
    }

    fn raise(&self) {
        if let Some(&(_, aux)) = self.out.front() {
            if !aux && self.ctr & CTR_KBD_INT != 0 {
                self.kbd_irq.trigger();
            }
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.push(self.ctr, false),
            0x60 => self.pending = Pending::WriteCtr,
            0xa7 => self.ctr |= CTR_AUX_DISABLE,
            0xa8 => self.ctr &= !CTR_AUX_DISABLE,
            0xa9 | 0xab => self.push(0x00, false), // interface tests pass
            0xaa => self.push(0x55, false),        // controller self-test passes
            0xad => self.ctr |= CTR_KBD_DISABLE,
            0xae => self.ctr &= !CTR_KBD_DISABLE,
            0xc0 => self.push(0x00, false),
            0xd0 => self.push(self.output_port, false),
            0xd1 => self.pending = Pending::WriteOutputPort,
            0xd2 => self.pending = Pending::KbdOutput,
            0xd3 => self.pending = Pending::AuxOutput,
            0xd4 => self.pending = Pending::AuxData,
            // Pulse output lines: a zero in bit 0 pulses the CPU reset line.
            0xf0..=0xff if cmd & 1 == 0 => self.exit.request_exit(ExitRequest::Reset),
            _ => tracing::trace!("i8042: ignored command {cmd:#x}"),
        }
    }

    fn data(&mut self, v: u8) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteCtr => self.ctr = v,
            Pending::WriteOutputPort => {
                self.output_port = v;
                if v & 1 == 0 {
                    self.exit.request_exit(ExitRequest::Reset);
                }
            }
            Pending::KbdOutput => self.push(v, false),
            Pending::AuxOutput => self.push(v, true),
            // No mouse: bytes for it go nowhere, as on a PC with an empty aux port.
            Pending::AuxData => {}
            Pending::KbdArgument => self.push(ACK, false),
            Pending::None => self.keyboard_command(v),
        }
    }

    /// Commands the guest sends to the keyboard itself.
    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            0xff => {
                self.out.clear();
                self.push(ACK, false);
                self.push(SELF_TEST_OK, false);
            }
            0xf2 => {
                // Identify: an MF2 keyboard, as seen through scancode translation.
                self.push(ACK, false);
                self.push(0xab, false);
                self.push(
                    if self.ctr & CTR_XLATE != 0 {
                        0x41
                    } else {
                        0x83
                    },
                    false,
                );
            }
            0xee => self.push(0xee, false),
            0xed | 0xf0 | 0xf3 => {
                self.push(ACK, false);
                self.pending = Pending::KbdArgument;
            }
            _ => self.push(ACK, false),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            DATA => match self.out.pop_front() {
                Some((b, _)) => {
                    self.raise();
                    b
                }
                None => 0,
            },
            COMMAND => self.status(),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            DATA => {
                self.last_was_command = false;
                self.data(v);
            }
            COMMAND => {
                self.last_was_command = true;
                self.command(v);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::testing::CountingIrq;
    use crate::lifecycle::testing::RecordingExit;

    fn dev() -> (I8042, Arc<CountingIrq>, Arc<RecordingExit>) {
        let irq = Arc::new(CountingIrq::default());
        let exit = Arc::new(RecordingExit::default());
        (I8042::new(irq.clone(), exit.clone()), irq, exit)
    }

    fn rd(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn self_test_and_ctr_round_trip() {
        let (mut d, irq, _) = dev();
        d.write(COMMAND, &[0xaa]);
        assert_eq!(rd(&mut d, COMMAND) & ST_OBF, ST_OBF);
        assert_eq!(rd(&mut d, DATA), 0x55);
        assert_eq!(rd(&mut d, COMMAND) & ST_OBF, 0);
        d.write(COMMAND, &[0x60]);
        d.write(DATA, &[0x65]);
        d.write(COMMAND, &[0x20]);
        assert_eq!(rd(&mut d, DATA), 0x65);
        assert!(irq.count() >= 2);
    }

    #[test]
    fn keyboard_identifies() {
        let (mut d, _, _) = dev();
        d.write(DATA, &[0xf2]);
        assert_eq!(
            [rd(&mut d, DATA), rd(&mut d, DATA), rd(&mut d, DATA)],
            [ACK, 0xab, 0x41]
        );
        d.write(DATA, &[0xed]);
        d.write(DATA, &[0x07]);
        assert_eq!([rd(&mut d, DATA), rd(&mut d, DATA)], [ACK, ACK]);
    }

    #[test]
    fn reset_line() {
        let (mut d, _, exit) = dev();
        d.write(COMMAND, &[0xff]);
        assert!(exit.requests().is_empty());
        d.write(COMMAND, &[0xfe]);
        assert_eq!(exit.requests(), vec![ExitRequest::Reset]);
        d.write(COMMAND, &[0xd1]);
        d.write(DATA, &[0x02]);
        assert_eq!(exit.requests().len(), 2);
    }

    #[test]
    fn queue_is_bounded() {
        let (mut d, _, _) = dev();
        for _ in 0..100 {
            d.write(DATA, &[0xee]);
        }
        assert_eq!(d.out.len(), 16);
    }
}
