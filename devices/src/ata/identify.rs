//! IDENTIFY DEVICE (ACS-3 IDENTIFY DEVICE data) and IDENTIFY PACKET DEVICE (ACS-3 IDENTIFY PACKET DEVICE data)
//! data: 256 little-endian words ending in the integrity word.

use super::disk::AtaDisk;
use super::xfer::TransferMode;

/// 512 bytes of IDENTIFY data under construction.
pub(crate) struct IdentifyPage {
    words: [u16; 256],
}

impl IdentifyPage {
    fn new() -> Self {
        Self { words: [0; 256] }
    }

    fn set(&mut self, word: usize, value: u16) {
        if let Some(w) = self.words.get_mut(word) {
            *w = value;
        }
    }

    /// An ATA string (ACS-3, ATA string convention): ASCII, space padded, the first character of each pair
    /// in the word's high byte. Characters outside printable ASCII become spaces.
    fn string(&mut self, first_word: usize, words: usize, s: &str) {
        let mut bytes = s
            .bytes()
            .map(|b| if (0x20..0x7f).contains(&b) { b } else { b' ' })
            .chain(std::iter::repeat(b' '));
        for i in 0..words {
            let hi = bytes.next().unwrap_or(b' ');
            let lo = bytes.next().unwrap_or(b' ');
            self.set(first_word + i, u16::from_be_bytes([hi, lo]));
        }
    }

    /// Sectors in a pair (or four) of words, low word first.
    fn u32_at(&mut self, word: usize, value: u32) {
        self.set(word, value as u16);
        self.set(word + 1, (value >> 16) as u16);
    }

    fn u64_at(&mut self, word: usize, value: u64) {
        for i in 0..4 {
            self.set(word + i, (value >> (16 * i)) as u16);
        }
    }

    fn identity(&mut self, serial: &str, firmware: &str, model: &str) {
        self.string(10, 10, serial);
        self.string(23, 4, firmware);
        self.string(27, 20, model);
    }

    fn transfer_modes(&mut self, xfer: &TransferMode) {
        // Word 53: words 64-70 (bit 1) and 88 (bit 2) are valid.
        self.set(63, xfer.word63());
        self.set(64, xfer.word64());
        // Words 65-68: minimum cycle times in ns for MWDMA 2 and PIO 4 (ATA-5), the fastest
        // those modes allow.
        for w in 65..=68 {
            self.set(w, 120);
        }
        self.set(88, xfer.word88());
        // Word 93 (hardware reset results) stays 0, as ACS-3 has it for a serial device (word
        // 222 says serial). Linux's libata takes a device on a SATA port that reports
        // anything else for a parallel drive behind a bridge and caps every transfer at 128
        // KiB and UDMA/100 (QEMU's 6001h does exactly that to its AHCI disks). A parallel IDE
        // controller will need 6001h here: bit 13, an 80-conductor cable, lets the guest use
        // Ultra DMA above mode 2.
    }

    /// Word 255 (ACS-3, Integrity word): signature A5h in bits 0..8, and in bits 8..16 the value
    /// that makes all 512 bytes sum to zero modulo 256.
    fn finish(mut self) -> Vec<u8> {
        self.set(255, 0x00a5);
        let mut bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let sum = bytes[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
        bytes[511] = sum.wrapping_neg();
        bytes
    }
}

/// SATA capabilities, word 76 (ACS-3, Serial ATA Capabilities): Gen1 (bit 1) and Gen2 (bit 2) speeds.
const SATA_GEN1_GEN2: u16 = 0x0006;
/// Word 76 bit 8: native command queuing.
const SATA_NCQ: u16 = 0x0100;
/// Word 80: major versions ATA/ATAPI-4..7 (bits 4..8), ATA8-ACS (8), ACS-2 (9), ACS-3 (10).
const MAJOR_VERSION: u16 = 0x07f0;
/// Word 222: transport major version: Serial (bits 12..16 = 1), SATA 1.0a through 3.0
/// (bits 0..6) (ACS-3, Transport major version number).
const TRANSPORT_SATA: u16 = 0x103f;
/// Words 82-87: bit 14 shall be one in 83/84/87 and bit 15 shall be zero (ACS-3, Commands and feature sets supported).
const VALID: u16 = 0x4000;
/// The most 512-byte blocks of range entries one DATA SET MANAGEMENT takes (word 105).
pub(crate) const MAX_DSM_BLOCKS: u16 = 8;
/// NCQ queue depth (word 75 holds depth - 1).
const NCQ_DEPTH: u16 = 32;
/// Sectors the largest READ/WRITE MULTIPLE block may hold (word 47).
pub(crate) const MAX_MULTIPLE: u16 = 16;
/// Word 217 for a spinning disk: a nominal 7200 rpm (0 would mean "not reported").
const ROTATION_RATE_RPM: u16 = 7200;

pub(crate) fn disk(d: &AtaDisk) -> Vec<u8> {
    let mut p = IdentifyPage::new();
    let sectors = d.sectors();
    let dflt = d.default_geometry();
    let cur = d.geometry();
    // Word 0: an ATA device, not removable (bit 7), response complete (bit 2 clear).
    p.set(0, 0x0040);
    p.set(1, dflt.cylinders as u16);
    p.set(3, dflt.heads as u16);
    p.set(6, dflt.sectors as u16);
    p.identity(d.serial(), d.firmware(), d.model());
    // Word 47: bits 8..16 shall be 80h, bits 0..8 the most sectors per DRQ block.
    p.set(47, 0x8000 | MAX_MULTIPLE);
    // Word 49: IORDY supported (11), LBA (9), DMA (8).
    p.set(49, 0x0b00);
    // Word 50: bit 14 shall be one.
    p.set(50, 0x4000);
    // Word 53: words 88 (bit 2), 64-70 (bit 1) and 54-58 (bit 0) are valid.
    p.set(53, 0x0007);
    p.set(54, cur.cylinders as u16);
    p.set(55, cur.heads as u16);
    p.set(56, cur.sectors as u16);
    p.u32_at(57, u32::try_from(cur.capacity()).unwrap_or(u32::MAX));
    // Word 59: bit 8 = the multiple setting in bits 0..8 is valid; left clear while multiple
    // mode is off, as QEMU does (a valid setting of 0 would confuse older hosts).
    if d.multiple_count() != 0 {
        p.set(59, 0x0100 | (d.multiple_count() & 0xff));
    }
    // Words 60-61: sectors addressable by 28-bit commands, at most 0FFFFFFFh (ACS-3, 28-bit addressing).
    p.u32_at(60, sectors.min(0x0fff_ffff) as u32);
    p.transfer_modes(d.transfer_mode());
    if d.ncq() {
        p.set(75, NCQ_DEPTH - 1);
        p.set(76, SATA_GEN1_GEN2 | SATA_NCQ);
    } else {
        p.set(76, SATA_GEN1_GEN2);
    }
    p.set(80, MAJOR_VERSION);
    // Word 82: NOP (14), look-ahead (6), volatile write cache (5), power management (3),
    // SMART (0). Word 85: which of them are enabled.
    p.set(82, 0x4069);
    let mut enabled = 0x4008;
    if d.lookahead_enabled() {
        enabled |= 1 << 6;
    }
    if d.write_cache_enabled() {
        enabled |= 1 << 5;
    }
    if d.smart_enabled() {
        enabled |= 1 << 0;
    }
    p.set(85, enabled);
    // Word 83: FLUSH CACHE EXT (13), FLUSH CACHE (12), 48-bit addressing (10). Word 86
    // repeats them as enabled, with bit 15 = words 119-120 are valid.
    p.set(83, VALID | 0x3400);
    p.set(86, 0x8000 | 0x3400);
    // Word 84/87: WRITE DMA FUA EXT and WRITE MULTIPLE FUA EXT (6), general purpose
    // logging (5).
    p.set(84, VALID | 0x0060);
    p.set(87, VALID | 0x0060);
    p.u64_at(100, sectors.min(super::taskfile::LBA48_MASK));
    if d.discard() {
        p.set(105, MAX_DSM_BLOCKS);
        // Word 169 bit 0: DATA SET MANAGEMENT with the TRIM bit is supported.
        p.set(169, 0x0001);
    }
    // Word 106: bit 14 shall be one; bits 12 and 13 clear: 512-byte logical sectors, one
    // per physical sector.
    p.set(106, 0x4000);
    // Words 119/120: READ LOG DMA EXT supported/enabled (bit 3); bit 14 shall be one.
    p.set(119, VALID | 0x0008);
    p.set(120, VALID | 0x0008);
    // Word 217: 0001h = non-rotating medium (ACS-3, Nominal media rotation rate).
    p.set(
        217,
        if d.nonrotational() {
            1
        } else {
            ROTATION_RATE_RPM
        },
    );
    p.set(222, TRANSPORT_SATA);
    p.finish()
}

/// IDENTIFY PACKET DEVICE of a CD/DVD drive.
pub(crate) fn packet(serial: &str, firmware: &str, model: &str, xfer: &TransferMode) -> Vec<u8> {
    let mut p = IdentifyPage::new();
    // Word 0 (ACS-3 IDENTIFY PACKET DEVICE, General configuration): ATAPI (bits 14..16 = 10b), CD-ROM device type 05h (bits
    // 8..13), removable (7), DRQ within 50 µs of PACKET (bits 5..7 = 10b), 12-byte
    // packets (bits 0..2 = 00b).
    p.set(0, 0x85c0);
    p.identity(serial, firmware, model);
    // Word 49: IORDY (11), LBA (9, shall be one), DMA (8).
    p.set(49, 0x0b00);
    p.set(50, 0x4000);
    // Word 53: words 88 and 64-70 are valid.
    p.set(53, 0x0006);
    p.transfer_modes(xfer);
    p.set(76, SATA_GEN1_GEN2);
    p.set(80, MAJOR_VERSION);
    // Word 82/85: NOP (14), DEVICE RESET (9), PACKET (4), power management (3).
    p.set(82, 0x4218);
    p.set(83, VALID);
    p.set(84, VALID);
    p.set(85, 0x4218);
    p.set(87, VALID);
    p.set(222, TRANSPORT_SATA);
    p.finish()
}
