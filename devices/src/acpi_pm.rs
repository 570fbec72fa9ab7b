//! The ACPI PM1 register block (fixed hardware, as the FADT describes it): PM1a event
//! status/enable, PM1a control, whose SLP_EN write with the \_S5 sleep type powers off, and
//! the PM timer (OVMF's timer library counts with it).

use std::sync::Arc;
use std::time::Instant;

use crate::{BusDevice, ExitHandle, ExitRequest};

/// I/O base of the block; the FADT points PM1a_EVT_BLK here and PM1a_CNT_BLK 4 bytes up.
pub const PM_BASE: u64 = 0x600;
pub const PM_LEN: u64 = 12;
/// The 24-bit PM timer, 4 bytes at PM_BASE + 8.
pub const PM_TMR_OFFSET: u64 = 8;
pub const PM_TMR_LEN: u8 = 4;
const PM_TMR_HZ: u128 = 3_579_545;
const PM_TMR_MASK: u32 = 0x00ff_ffff;
pub const PM1_EVT_LEN: u8 = 4;
pub const PM1_CNT_LEN: u8 = 2;
pub const PM1A_CNT_OFFSET: u64 = 4;
/// The sleep type the DSDT's \_S5 package gives; the only sleep state ferry offers.
pub const S5_SLP_TYP: u16 = 5;
/// ACPI's SCI is wired to ISA IRQ 9 on PC platforms.
pub const SCI_IRQ: u16 = 9;

const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;

pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    /// The PM timer counts from here.
    start: Instant,
    exit: Arc<dyn ExitHandle>,
}

impl AcpiPm {
    pub fn new(exit: Arc<dyn ExitHandle>) -> Self {
        // No SMI command port: the platform starts in ACPI mode, so SCI_EN reads as set.
        Self {
            status: 0,
            enable: 0,
            control: SCI_EN,
            start: Instant::now(),
            exit,
        }
    }

    fn reg(&self, offset: u64) -> u16 {
        match offset {
            0 => self.status,
            2 => self.enable,
            4 => self.control,
            _ => 0,
        }
    }

    /// The PM timer: 3.579545 MHz ticks since power-on, 24 bits wide (the FADT does not set
    /// TMR_VAL_EXT).
    fn timer(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * PM_TMR_HZ / 1_000_000_000;
        (ticks as u32) & PM_TMR_MASK
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= PM_TMR_OFFSET {
            let t = self.timer().to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                let at = (offset - PM_TMR_OFFSET) as usize + i;
                *b = t.get(at).copied().unwrap_or(0);
            }
            return;
        }
        // Byte and word accesses at any offset are composed from the 16-bit registers.
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            *b = (self.reg(off & !1) >> ((off & 1) * 8)) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let off = offset + i as u64;
            let shift = (off & 1) * 8;
            let mask = 0xffu16 << shift;
            let v = u16::from(b) << shift;
            match off & !1 {
                // Status bits are write-one-to-clear.
                0 => self.status &= !(v & mask),
                2 => self.enable = (self.enable & !mask) | v,
                4 => {
                    let ctl = (self.control & !mask) | v;
                    if ctl & SLP_EN != 0 && (ctl >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLP_TYP {
                        self.exit.request_exit(ExitRequest::PowerOff);
                    }
                    // SLP_EN is write-only; SCI_EN stays set.
                    self.control = (ctl & !SLP_EN) | SCI_EN;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::testing::RecordingExit;

    #[test]
    fn s5_powers_off_and_sci_en_reads_set() {
        let exit = Arc::new(RecordingExit::default());
        let mut pm = AcpiPm::new(exit.clone());
        let mut w = [0u8; 2];
        pm.read(4, &mut w);
        assert_eq!(u16::from_le_bytes(w) & SCI_EN, SCI_EN);
        // Setting the sleep type without SLP_EN does nothing.
        pm.write(4, &(S5_SLP_TYP << 10).to_le_bytes());
        assert!(exit.requests().is_empty());
        pm.write(4, &((S5_SLP_TYP << 10) | SLP_EN).to_le_bytes());
        assert_eq!(exit.requests(), vec![ExitRequest::PowerOff]);
    }

    #[test]
    fn pm_timer_counts_at_3_58_mhz() {
        let exit = Arc::new(RecordingExit::default());
        let mut pm = AcpiPm::new(exit);
        let read = |pm: &mut AcpiPm| {
            let mut t = [0u8; 4];
            pm.read(PM_TMR_OFFSET, &mut t);
            u32::from_le_bytes(t)
        };
        let a = read(&mut pm);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = read(&mut pm);
        assert!(a <= PM_TMR_MASK && b <= PM_TMR_MASK);
        // 20 ms is about 71591 ticks; a loaded host may sleep longer, never shorter.
        let d = b.wrapping_sub(a) & PM_TMR_MASK;
        assert!((71_000..3_579_545).contains(&d), "{d}");
        // Writes to the timer are ignored.
        pm.write(PM_TMR_OFFSET, &[0, 0, 0, 0]);
        assert!(read(&mut pm) >= b);
    }

    #[test]
    fn other_sleep_types_are_ignored() {
        let exit = Arc::new(RecordingExit::default());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(4, &((1u16 << 10) | SLP_EN).to_le_bytes());
        assert!(exit.requests().is_empty());
    }
}
