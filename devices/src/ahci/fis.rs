//! Frame Information Structures (SATA 3.x, section 10.5) and the AHCI command list structures
//! (AHCI 1.3.1, section 4.2): what the HBA reads from the guest's command tables and what it
//! posts into the guest's received-FIS area.

use crate::ata::{AtaCompletion, Taskfile};

pub const TYPE_REG_H2D: u8 = 0x27;
const TYPE_REG_D2H: u8 = 0x34;
const TYPE_SET_DEVICE_BITS: u8 = 0xa1;
const TYPE_PIO_SETUP: u8 = 0x5f;
/// The FIS's Interrupt bit (byte 1, bit 6).
const FLAG_I: u8 = 1 << 6;
/// PIO Setup: data moves from device to host.
const FLAG_D: u8 = 1 << 5;
/// Register H2D: the FIS carries a command (else a Device Control register update).
const FLAG_C: u8 = 1 << 7;
/// Device Control: software reset.
pub const CONTROL_SRST: u8 = 1 << 2;

/// Where each FIS lands in the received-FIS area (AHCI 1.3.1, 4.2.1).
pub const RX_PIO_SETUP: u64 = 0x20;
pub const RX_D2H: u64 = 0x40;
pub const RX_SDB: u64 = 0x58;

/// Bytes of a command header in the command list, and of a PRDT entry.
pub const HEADER_SIZE: u64 = 32;
pub const PRD_SIZE: u64 = 16;
/// The command table: CFIS at 0, ATAPI command at 0x40, PRDT at 0x80.
pub const CFIS_LEN: usize = 64;
pub const ACMD_OFFSET: usize = 0x40;
pub const ACMD_LEN: usize = 16;
pub const PRDT_OFFSET: u64 = 0x80;

/// A command header (AHCI 1.3.1, 4.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandHeader {
    /// Command FIS length in dwords (2..=16).
    pub cfl: u8,
    pub atapi: bool,
    pub write: bool,
    /// Clear Busy upon R_OK: the HBA clears the slot once the FIS is sent (software reset).
    pub clear_busy: bool,
    pub prdtl: u16,
    /// Command table base address (128-byte aligned).
    pub ctba: u64,
}

impl CommandHeader {
    pub fn parse(raw: &[u8; 16]) -> Self {
        let dw = |i: usize| {
            u32::from_le_bytes([raw[i * 4], raw[i * 4 + 1], raw[i * 4 + 2], raw[i * 4 + 3]])
        };
        let dw0 = dw(0);
        Self {
            cfl: (dw0 & 0x1f) as u8,
            atapi: dw0 & (1 << 5) != 0,
            write: dw0 & (1 << 6) != 0,
            clear_busy: dw0 & (1 << 10) != 0,
            prdtl: (dw0 >> 16) as u16,
            ctba: (u64::from(dw(2)) & !0x7f) | (u64::from(dw(3)) << 32),
        }
    }
}

/// A Register Host-to-Device FIS as the command table holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFis {
    Command(Taskfile),
    /// A Device Control register update (C bit clear): the control byte.
    Control(u8),
}

impl HostFis {
    /// None for a FIS that is not a Register H2D FIS.
    pub fn parse(cfis: &[u8; CFIS_LEN]) -> Option<Self> {
        if cfis[0] != TYPE_REG_H2D {
            return None;
        }
        if cfis[1] & FLAG_C == 0 {
            return Some(Self::Control(cfis[15]));
        }
        let lba = u64::from(cfis[4])
            | u64::from(cfis[5]) << 8
            | u64::from(cfis[6]) << 16
            | u64::from(cfis[8]) << 24
            | u64::from(cfis[9]) << 32
            | u64::from(cfis[10]) << 40;
        Some(Self::Command(Taskfile {
            command: cfis[2],
            features: u16::from(cfis[3]) | u16::from(cfis[11]) << 8,
            count: u16::from(cfis[12]) | u16::from(cfis[13]) << 8,
            lba,
            device: cfis[7],
        }))
    }
}

fn put_registers(fis: &mut [u8], c: &AtaCompletion) {
    fis[2] = c.status;
    fis[3] = c.error;
    fis[4] = c.lba as u8;
    fis[5] = (c.lba >> 8) as u8;
    fis[6] = (c.lba >> 16) as u8;
    fis[7] = c.device;
    fis[8] = (c.lba >> 24) as u8;
    fis[9] = (c.lba >> 32) as u8;
    fis[10] = (c.lba >> 40) as u8;
    fis[12] = c.count as u8;
    fis[13] = (c.count >> 8) as u8;
}

/// Register Device-to-Host FIS (SATA 3.x, 10.5.6).
pub fn d2h(c: &AtaCompletion, interrupt: bool) -> [u8; 20] {
    let mut fis = [0u8; 20];
    fis[0] = TYPE_REG_D2H;
    fis[1] = if interrupt { FLAG_I } else { 0 };
    put_registers(&mut fis, c);
    fis
}

/// PIO Setup FIS (SATA 3.x, 10.5.11): `status` before the data, E_Status after it (what
/// Linux's ahci reads as the result of a PIO data-in command), the transfer count.
pub fn pio_setup(c: &AtaCompletion, to_host: bool, count: u16) -> [u8; 20] {
    let mut fis = [0u8; 20];
    fis[0] = TYPE_PIO_SETUP;
    fis[1] = FLAG_I | if to_host { FLAG_D } else { 0 };
    put_registers(&mut fis, c);
    // During the transfer the device is ready and has data (DRQ).
    fis[2] = (c.status & !crate::ata::status::BSY) | crate::ata::status::DRQ;
    fis[15] = c.status;
    fis[16..18].copy_from_slice(&count.to_le_bytes());
    fis
}

/// Set Device Bits FIS (SATA 3.x, 10.5.7): NCQ completions for the tags in `sactive`.
pub fn set_device_bits(status: u8, error: u8, sactive: u32) -> [u8; 8] {
    let mut fis = [0u8; 8];
    fis[0] = TYPE_SET_DEVICE_BITS;
    fis[1] = FLAG_I;
    // Status-Hi (bits 6..4) and Status-Lo (bits 2..0); BSY and DRQ are not carried.
    fis[2] = status & 0x77;
    fis[3] = error;
    fis[4..8].copy_from_slice(&sactive.to_le_bytes());
    fis
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_h2d_fields() {
        let mut cfis = [0u8; CFIS_LEN];
        cfis[..16].copy_from_slice(&[
            0x27, 0x80, 0x60, 0x08, 0x11, 0x22, 0x33, 0x40, 0x44, 0x55, 0x66, 0x00, 0x18, 0x00, 0,
            0,
        ]);
        let HostFis::Command(tf) = HostFis::parse(&cfis).unwrap() else {
            panic!("a command FIS");
        };
        assert_eq!(tf.command, 0x60);
        assert_eq!(tf.features, 0x08);
        assert_eq!(tf.count, 0x18);
        assert_eq!(tf.lba, 0x6655_4433_2211);
        assert_eq!(tf.device, 0x40);
        cfis[1] = 0;
        cfis[15] = CONTROL_SRST;
        assert_eq!(HostFis::parse(&cfis), Some(HostFis::Control(CONTROL_SRST)));
        cfis[0] = 0x34;
        assert_eq!(HostFis::parse(&cfis), None);
    }

    #[test]
    fn header_fields() {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&(5u32 | 1 << 5 | 1 << 6 | 1 << 10 | 3 << 16).to_le_bytes());
        raw[8..12].copy_from_slice(&0x1234_5680u32.to_le_bytes());
        raw[12..16].copy_from_slice(&1u32.to_le_bytes());
        let h = CommandHeader::parse(&raw);
        assert_eq!(
            h,
            CommandHeader {
                cfl: 5,
                atapi: true,
                write: true,
                clear_busy: true,
                prdtl: 3,
                ctba: 0x1_1234_5680
            }
        );
    }

    #[test]
    fn completion_fises() {
        let c = AtaCompletion {
            status: 0x51,
            error: 0x04,
            count: 0x0102,
            lba: 0x0a0b_0c0d_0e0f,
            device: 0x40,
            data_in: Vec::new(),
        };
        let f = d2h(&c, true);
        assert_eq!(
            &f[..14],
            &[0x34, 0x40, 0x51, 0x04, 0x0f, 0x0e, 0x0d, 0x40, 0x0c, 0x0b, 0x0a, 0, 0x02, 0x01]
        );
        let p = pio_setup(&c, true, 512);
        assert_eq!(
            (p[0], p[1], p[2], p[15], p[16], p[17]),
            (0x5f, 0x60, 0x59, 0x51, 0, 2)
        );
        assert_eq!(
            set_device_bits(0x41, 0x04, 0x8000_0001),
            [0xa1, 0x40, 0x41, 0x04, 1, 0, 0, 0x80]
        );
    }
}
