//! The MC146818 RTC and its CMOS RAM: the host's time (UTC) in BCD, 24-hour mode, and the
//! memory-size, CPU-count and boot-order bytes that PC firmware reads.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::BusDevice;

pub const CMOS_PORT: u64 = 0x70;
pub const CMOS_LEN: u64 = 2;
pub const RTC_IRQ: u32 = 8;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;
/// Boot flags as QEMU sets them for SeaBIOS: the third boot device in the high nibble of
/// 0x38 (bit 0: skip the floppy signature check), the first and second in 0x3d.
const BOOT_FLAG1: usize = 0x38;
const BOOT_FLAG2: usize = 0x3d;
const SKIP_FLOPPY_CHECK: u8 = 1;

/// A device class in the CMOS boot order (SeaBIOS's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootClass {
    Floppy = 1,
    Disk = 2,
    Cdrom = 3,
    Network = 4,
}

const B_SET: u8 = 1 << 7;
const B_BINARY: u8 = 1 << 2;
const B_24H: u8 = 1 << 1;
const D_VALID: u8 = 1 << 7;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// Guest time minus host time, in seconds (the guest may set its clock).
    offset: i64,
}

/// Where RAM lies, so firmware can size it from CMOS.
#[derive(Debug, Clone, Copy)]
pub struct MemoryLayout {
    /// End of RAM below 4 GiB (exclusive).
    pub low_end: u64,
    /// Bytes of RAM at and above 4 GiB.
    pub high_size: u64,
}

impl Cmos {
    pub fn new(mem: MemoryLayout, cpus: u8) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        ram[REG_B] = B_24H;
        ram[REG_D] = D_VALID;
        // Base memory: 640 KiB.
        ram[0x15] = 0x80;
        ram[0x16] = 0x02;
        // Extended memory between 1 MiB and 64 MiB, in KiB.
        let ext_kib = (mem.low_end.saturating_sub(1 << 20) / 1024).min(0xfc00) as u16;
        ram[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        ram[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        // Memory above 16 MiB (below 4 GiB) and above 4 GiB, in 64 KiB units.
        let above_16m = (mem.low_end.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        ram[0x34..0x36].copy_from_slice(&above_16m.to_le_bytes());
        let above_4g = (mem.high_size >> 16).min(0xff_ffff) as u32;
        ram[0x5b..0x5e].copy_from_slice(&above_4g.to_le_bytes()[..3]);
        ram[0x5f] = cpus.saturating_sub(1);
        Self {
            index: 0,
            ram,
            offset: 0,
        }
    }

    /// The firmware's default order of device classes (at most three count), for devices the
    /// `bootorder` fw_cfg file does not name.
    pub fn set_boot_order(&mut self, order: &[BootClass]) {
        let code = |i: usize| order.get(i).map_or(0, |&c| c as u8);
        self.ram[BOOT_FLAG2] = code(0) | (code(1) << 4);
        self.ram[BOOT_FLAG1] = (code(2) << 4) | SKIP_FLOPPY_CHECK;
    }

    fn now(&self) -> i64 {
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        host + self.offset
    }

    fn encode(&self, v: u32) -> u8 {
        if self.ram[REG_B] & B_BINARY != 0 {
            v as u8
        } else {
            (((v / 10) << 4) | (v % 10)) as u8
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.ram[REG_B] & B_BINARY != 0 {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    fn time_register(&self, reg: usize) -> u8 {
        let t = self.now();
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        match reg {
            SECONDS => self.encode(secs % 60),
            MINUTES => self.encode(secs / 60 % 60),
            HOURS => {
                let h = secs / 3600;
                if self.ram[REG_B] & B_24H != 0 {
                    self.encode(h)
                } else {
                    // 12-hour mode: 12, 1..11 with bit 7 for PM.
                    let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
                    self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
                }
            }
            WEEKDAY => self.encode(((days + 4).rem_euclid(7) + 1) as u32), // 1970-01-01: Thursday
            DAY => self.encode(d),
            MONTH => self.encode(m),
            YEAR => self.encode(y.rem_euclid(100) as u32),
            CENTURY => self.encode(y.div_euclid(100) as u32),
            _ => self.ram[reg],
        }
    }

    /// After the guest sets the clock, keep its time as an offset from the host's.
    fn latch_guest_time(&mut self) {
        let hour_byte = self.ram[HOURS];
        let mut h = self.decode(hour_byte & 0x7f);
        if self.ram[REG_B] & B_24H == 0 {
            h %= 12;
            if hour_byte & 0x80 != 0 {
                h += 12;
            }
        }
        let year = i64::from(self.decode(self.ram[CENTURY])) * 100
            + i64::from(self.decode(self.ram[YEAR]));
        let days = days_from_civil(
            year,
            self.decode(self.ram[MONTH]).clamp(1, 12),
            self.decode(self.ram[DAY]).clamp(1, 31),
        );
        let guest = days * 86_400
            + i64::from(h) * 3600
            + i64::from(self.decode(self.ram[MINUTES])) * 60
            + i64::from(self.decode(self.ram[SECONDS]));
        self.offset = 0;
        self.offset = guest - self.now();
    }

    fn read_reg(&mut self, reg: usize) -> u8 {
        match reg {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY
                if self.ram[REG_B] & B_SET == 0 =>
            {
                self.time_register(reg)
            }
            // Update-in-progress never shows: reads are atomic here.
            REG_A => self.ram[REG_A] & 0x7f,
            REG_C => std::mem::take(&mut self.ram[REG_C]),
            _ => self.ram[reg],
        }
    }

    fn write_reg(&mut self, reg: usize, v: u8) {
        match reg {
            REG_C | REG_D => {} // read-only
            REG_B => {
                let was_set = self.ram[REG_B] & B_SET != 0;
                if v & B_SET != 0 && !was_set {
                    // Freeze the current time into RAM so a partial update keeps the rest.
                    for r in [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY] {
                        self.ram[r] = self.time_register(r);
                    }
                }
                self.ram[REG_B] = v;
                if was_set && v & B_SET == 0 {
                    self.latch_guest_time();
                }
            }
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                self.ram[reg] = v;
                if self.ram[REG_B] & B_SET == 0 {
                    self.latch_guest_time();
                }
            }
            _ => self.ram[reg] = v,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v = match offset {
            0 => 0xff, // the index port is write-only
            _ => self.read_reg(usize::from(self.index)),
        };
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 is the NMI mask, not part of the index.
            0 => self.index = v & 0x7f,
            _ => self.write_reg(usize::from(self.index), v),
        }
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    fn wr(c: &mut Cmos, reg: u8, v: u8) {
        c.write(0, &[reg]);
        c.write(1, &[v]);
    }

    fn cmos() -> Cmos {
        Cmos::new(
            MemoryLayout {
                low_end: 3 << 30,
                high_size: 2 << 30,
            },
            2,
        )
    }

    #[test]
    fn boot_order_nibbles() {
        let mut c = cmos();
        c.set_boot_order(&[BootClass::Cdrom, BootClass::Disk, BootClass::Network]);
        assert_eq!(rd(&mut c, 0x3d), 0x23);
        assert_eq!(rd(&mut c, 0x38), 0x41);
        c.set_boot_order(&[BootClass::Disk]);
        assert_eq!(rd(&mut c, 0x3d), 0x02);
        assert_eq!(rd(&mut c, 0x38), 0x01);
    }

    #[test]
    fn calendar_round_trips() {
        for days in [-1000, 0, 59, 10_957, 20_000, 20_784] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn reports_host_time_in_bcd() {
        let mut c = cmos();
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let (y, _, _) = civil_from_days(host / 86_400);
        let year = rd(&mut c, 0x09);
        let century = rd(&mut c, 0x32);
        let bcd = |v: u8| i64::from(v >> 4) * 10 + i64::from(v & 0xf);
        assert_eq!(bcd(century) * 100 + bcd(year), y);
        assert_eq!(rd(&mut c, 0x0d), D_VALID);
        assert_eq!(rd(&mut c, 0x0a) & 0x80, 0);
    }

    #[test]
    fn guest_can_set_clock() {
        let mut c = cmos();
        wr(&mut c, 0x0b, B_SET | B_24H);
        wr(&mut c, 0x32, 0x20);
        wr(&mut c, 0x09, 0x01);
        wr(&mut c, 0x08, 0x02);
        wr(&mut c, 0x07, 0x03);
        wr(&mut c, 0x04, 0x04);
        wr(&mut c, 0x02, 0x05);
        wr(&mut c, 0x00, 0x06);
        wr(&mut c, 0x0b, B_24H);
        assert_eq!(rd(&mut c, 0x09), 0x01);
        assert_eq!(rd(&mut c, 0x08), 0x02);
        assert_eq!(rd(&mut c, 0x04), 0x04);
    }

    #[test]
    fn memory_size_bytes() {
        let mut c = cmos();
        let lo = u16::from_le_bytes([rd(&mut c, 0x34), rd(&mut c, 0x35)]);
        assert_eq!(u64::from(lo), ((3u64 << 30) - (16 << 20)) >> 16);
        let hi = u32::from_le_bytes([rd(&mut c, 0x5b), rd(&mut c, 0x5c), rd(&mut c, 0x5d), 0]);
        assert_eq!(u64::from(hi), (2u64 << 30) >> 16);
        assert_eq!(rd(&mut c, 0x5f), 1);
        // Out-of-range index bits are masked, never an out-of-bounds access.
        assert_eq!(rd(&mut c, 0xff), rd(&mut c, 0x7f));
    }
}
