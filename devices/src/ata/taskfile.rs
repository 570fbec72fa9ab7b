//! The shadow registers a command arrives with, the opcodes this device knows, and the
//! address and count decoding of 28-bit, 48-bit and CHS commands (ACS-3 clauses 6 and 7).

/// The shadow registers a command arrives with (a Register H2D FIS, or IDE's taskfile).
/// `lba` is the raw 48-bit value: bits 0..24 = LBA low/mid/high, bits 24..48 = their "exp"
/// registers. For 28-bit commands the core takes LBA bits 24..28 from `device & 0x0f`
/// (and supports CHS when device bit 6 (LBA) is clear: cylinders in lba mid/high, head in
/// device & 0xf, sector in lba low, using the geometry IDENTIFY reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Taskfile {
    pub command: u8,
    pub features: u16,
    pub count: u16,
    pub lba: u64,
    pub device: u8,
}

pub(crate) const LBA48_MASK: u64 = (1 << 48) - 1;
const LBA28_MASK: u64 = (1 << 28) - 1;

/// Device register bit 6: the address is an LBA, not CHS (ACS-3, Device field).
pub(crate) const DEVICE_LBA: u8 = 0x40;
/// Device register bit 7 of READ/WRITE FPDMA QUEUED: force unit access (ACS-3, READ/WRITE FPDMA QUEUED).
pub(crate) const DEVICE_FUA: u8 = 0x80;

/// Command opcodes (ACS-3 Annex B, command codes; ATA8-APT for PACKET and IDENTIFY PACKET DEVICE).
pub mod cmd {
    pub const NOP: u8 = 0x00;
    pub const DATA_SET_MANAGEMENT: u8 = 0x06;
    pub const DEVICE_RESET: u8 = 0x08;
    /// RECALIBRATE is 1xh, any low nibble (obsolete, ATA-3).
    pub const RECALIBRATE: u8 = 0x10;
    pub const READ_SECTORS: u8 = 0x20;
    /// READ SECTORS without retry (obsolete, ATA-4): the same command to us.
    pub const READ_SECTORS_NORETRY: u8 = 0x21;
    pub const READ_SECTORS_EXT: u8 = 0x24;
    pub const READ_DMA_EXT: u8 = 0x25;
    pub const READ_NATIVE_MAX_ADDRESS_EXT: u8 = 0x27;
    pub const READ_MULTIPLE_EXT: u8 = 0x29;
    pub const READ_LOG_EXT: u8 = 0x2f;
    pub const WRITE_SECTORS: u8 = 0x30;
    pub const WRITE_SECTORS_NORETRY: u8 = 0x31;
    pub const WRITE_SECTORS_EXT: u8 = 0x34;
    pub const WRITE_DMA_EXT: u8 = 0x35;
    pub const WRITE_MULTIPLE_EXT: u8 = 0x39;
    pub const WRITE_DMA_FUA_EXT: u8 = 0x3d;
    pub const WRITE_LOG_EXT: u8 = 0x3f;
    pub const READ_VERIFY_SECTORS: u8 = 0x40;
    pub const READ_VERIFY_SECTORS_NORETRY: u8 = 0x41;
    pub const READ_VERIFY_SECTORS_EXT: u8 = 0x42;
    pub const READ_LOG_DMA_EXT: u8 = 0x47;
    pub const READ_FPDMA_QUEUED: u8 = 0x60;
    pub const WRITE_FPDMA_QUEUED: u8 = 0x61;
    pub const EXECUTE_DEVICE_DIAGNOSTIC: u8 = 0x90;
    pub const INITIALIZE_DEVICE_PARAMETERS: u8 = 0x91;
    pub const PACKET: u8 = 0xa0;
    pub const IDENTIFY_PACKET_DEVICE: u8 = 0xa1;
    pub const SMART: u8 = 0xb0;
    pub const READ_MULTIPLE: u8 = 0xc4;
    pub const WRITE_MULTIPLE: u8 = 0xc5;
    pub const SET_MULTIPLE_MODE: u8 = 0xc6;
    pub const READ_DMA: u8 = 0xc8;
    pub const READ_DMA_NORETRY: u8 = 0xc9;
    pub const WRITE_DMA: u8 = 0xca;
    pub const WRITE_DMA_NORETRY: u8 = 0xcb;
    pub const WRITE_MULTIPLE_FUA_EXT: u8 = 0xce;
    pub const STANDBY_IMMEDIATE: u8 = 0xe0;
    pub const IDLE_IMMEDIATE: u8 = 0xe1;
    pub const STANDBY: u8 = 0xe2;
    pub const IDLE: u8 = 0xe3;
    pub const CHECK_POWER_MODE: u8 = 0xe5;
    pub const SLEEP: u8 = 0xe6;
    pub const FLUSH_CACHE: u8 = 0xe7;
    pub const FLUSH_CACHE_EXT: u8 = 0xea;
    pub const IDENTIFY_DEVICE: u8 = 0xec;
    pub const SET_FEATURES: u8 = 0xef;
    pub const READ_NATIVE_MAX_ADDRESS: u8 = 0xf8;
}

impl Taskfile {
    /// The low 8 bits of features, where every non-NCQ command keeps its subcommand.
    pub fn feature(&self) -> u8 {
        self.features as u8
    }

    /// LBA low (bits 0..8).
    pub fn lba_low(&self) -> u8 {
        self.lba as u8
    }

    /// LBA mid (bits 8..16).
    pub fn lba_mid(&self) -> u8 {
        (self.lba >> 8) as u8
    }

    /// LBA high (bits 16..24).
    pub fn lba_high(&self) -> u8 {
        (self.lba >> 16) as u8
    }

    /// The 48-bit LBA of an EXT command.
    pub fn lba48(&self) -> u64 {
        self.lba & LBA48_MASK
    }

    /// The sector count of a 28-bit command: 0 means 256 (ACS-3, Count field).
    pub fn count28(&self) -> u64 {
        match self.count & 0xff {
            0 => 256,
            n => u64::from(n),
        }
    }

    /// The sector count of a 48-bit command: 0 means 65536.
    pub fn count48(&self) -> u64 {
        match self.count {
            0 => 65536,
            n => u64::from(n),
        }
    }

    /// Whether device bit 6 selects LBA addressing (else CHS for 28-bit commands).
    pub fn is_lba_mode(&self) -> bool {
        self.device & DEVICE_LBA != 0
    }

    /// The 28-bit LBA: LBA low/mid/high plus device bits 0..4 as bits 24..28.
    pub fn lba28(&self) -> u64 {
        ((self.lba & 0xff_ffff) | (u64::from(self.device & 0x0f) << 24)) & LBA28_MASK
    }

    /// The CHS address of a 28-bit command in CHS mode: (cylinder, head, sector).
    pub fn chs(&self) -> (u64, u64, u64) {
        let cylinder = (self.lba >> 8) & 0xffff;
        let head = u64::from(self.device & 0x0f);
        let sector = self.lba & 0xff;
        (cylinder, head, sector)
    }
}
