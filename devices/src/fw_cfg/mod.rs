//! QEMU's firmware configuration device (fw_cfg) on the x86 ports 0x510..0x51c, as SeaBIOS and
//! OVMF read it: a 16-bit selector, a byte-wide data port, and a DMA interface that copies the
//! selected item into guest memory. The vmm adds every item (numbered items and named files)
//! before the guest runs; to the guest they are all read-only.
//!
//! Where the guest does something odd, this follows QEMU (hw/nvram/fw_cfg.c), because the
//! firmware was written against it: reads of an absent item give zeros (data port and DMA
//! alike), DMA flags other than the first of READ, WRITE, SKIP are ignored, and the DMA address
//! register is cleared after each request.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::BusDevice;

#[cfg(test)]
mod tests;

pub const FW_CFG_PORT: u64 = 0x510;
pub const FW_CFG_PORT_LEN: u64 = 0x0c;

/// Well-known item keys (QEMU's docs/specs/fw_cfg.rst and include/standard-headers).
pub mod keys {
    pub const SIGNATURE: u16 = 0x0000;
    pub const ID: u16 = 0x0001;
    pub const UUID: u16 = 0x0002;
    pub const RAM_SIZE: u16 = 0x0003;
    pub const NB_CPUS: u16 = 0x0005;
    pub const BOOT_MENU: u16 = 0x000e;
    pub const MAX_CPUS: u16 = 0x000f;
    pub const FILE_DIR: u16 = 0x0019;
    pub const FILE_FIRST: u16 = 0x0020;
    /// Keys with this bit are architecture-specific (x86: ACPI tables, SMBIOS, e820, HPET).
    pub const ARCH_LOCAL: u16 = 0x8000;
}

use keys::{ARCH_LOCAL, FILE_DIR, FILE_FIRST, ID, SIGNATURE};

/// Bit 14 of a selector once meant "write"; QEMU ignores it when it looks an item up.
const WRITE_CHANNEL: u16 = 0x4000;
const ENTRY_MASK: u16 = 0x3fff;

/// Register offsets from `FW_CFG_PORT`.
const SELECTOR: u64 = 0;
const DATA: u64 = 1;
const DMA_HIGH: u64 = 4;
const DMA_LOW: u64 = 8;

/// "QEMU CFG", read back big-endian from the DMA address register.
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;

/// Feature bitmap of item 0x0001: the port interface and DMA.
const FEATURE_TRADITIONAL: u32 = 1 << 0;
const FEATURE_DMA: u32 = 1 << 1;

/// DMA control bits.
const CTL_ERROR: u32 = 0x01;
const CTL_READ: u32 = 0x02;
const CTL_SKIP: u32 = 0x04;
const CTL_SELECT: u32 = 0x08;
const CTL_WRITE: u32 = 0x10;

/// A directory entry holds the name in 56 bytes, NUL-terminated.
const NAME_LEN: usize = 56;
const DIR_ENTRY_LEN: usize = 64;
/// File selectors run from 0x0020 up to the end of the entry space.
pub const MAX_FILES: usize = (ENTRY_MASK - FILE_FIRST) as usize + 1;

/// Zero-fill past an item's end goes out in chunks of this, so no buffer grows with a guest
/// length.
const ZEROS: [u8; 4096] = [0; 4096];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    #[error(
        "fw_cfg key {0:#06x} belongs to the device itself (signature, features, file directory)"
    )]
    ReservedKey(u16),
    #[error("fw_cfg key {0:#06x} is not a numbered item: 0x0020-0x3fff are files and bit 0x4000 is not part of a key")]
    NotNumbered(u16),
    #[error("fw_cfg key {0:#06x} already holds an item")]
    DuplicateKey(u16),
    #[error("fw_cfg file name {0:?} must be 1 to 55 bytes without NUL")]
    BadName(String),
    #[error("fw_cfg already has a file named {0:?}")]
    DuplicateFile(String),
    #[error("fw_cfg holds at most {MAX_FILES} files")]
    TooManyFiles,
    #[error("fw_cfg item of {0} bytes is too large: an item holds less than 4 GiB")]
    TooLarge(usize),
}

/// Why a DMA request ended with the ERROR bit (for the debug log).
#[derive(Debug, thiserror::Error)]
enum DmaFault {
    #[error("control structure at {0:#x} is outside guest memory")]
    Descriptor(u64),
    #[error("destination {address:#x}+{length:#x} is outside guest memory")]
    Destination { address: u64, length: u32 },
    #[error("write to item {0:#06x}: items are read-only")]
    ReadOnly(u16),
}

struct File {
    name: String,
    data: Vec<u8>,
}

pub struct FwCfg {
    memory: GuestMemoryMmap,
    /// Numbered items, keyed without the write-channel bit.
    items: BTreeMap<u16, Vec<u8>>,
    /// Sorted by name; file `i` has selector `FILE_FIRST + i`, as in QEMU.
    files: Vec<File>,
    selector: u16,
    /// Offset in the selected item; never beyond its end.
    offset: usize,
    /// The DMA address register; a 4-byte write of the high half waits here for the low half.
    dma_address: u64,
}

impl FwCfg {
    pub fn new(memory: GuestMemoryMmap) -> Self {
        let mut items = BTreeMap::new();
        items.insert(SIGNATURE, b"QEMU".to_vec());
        items.insert(
            ID,
            (FEATURE_TRADITIONAL | FEATURE_DMA).to_le_bytes().to_vec(),
        );
        let mut dev = Self {
            memory,
            items,
            files: Vec::new(),
            selector: SIGNATURE,
            offset: 0,
            dma_address: 0,
        };
        dev.rebuild_directory();
        dev
    }

    /// Adds a numbered item (e.g. 0x0005 CPU count, x86 0x8000+ tables).
    pub fn add_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        if matches!(key, SIGNATURE | ID | FILE_DIR) {
            return Err(FwCfgError::ReservedKey(key));
        }
        if key & WRITE_CHANNEL != 0 || (key & ARCH_LOCAL == 0 && key >= FILE_FIRST) {
            return Err(FwCfgError::NotNumbered(key));
        }
        check_size(&data)?;
        if self.items.contains_key(&key) {
            return Err(FwCfgError::DuplicateKey(key));
        }
        self.items.insert(key, data);
        Ok(())
    }

    /// Adds a named file (e.g. "etc/boot-order"); selectors follow the name order.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.is_empty() || name.len() >= NAME_LEN || name.contains('\0') {
            return Err(FwCfgError::BadName(name.to_owned()));
        }
        check_size(&data)?;
        let at = match self.files.binary_search_by(|f| f.name.as_str().cmp(name)) {
            Ok(_) => return Err(FwCfgError::DuplicateFile(name.to_owned())),
            Err(at) => at,
        };
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        self.files.insert(
            at,
            File {
                name: name.to_owned(),
                data,
            },
        );
        self.rebuild_directory();
        Ok(())
    }

    /// Item 0x0019: a big-endian count, then {size, select, reserved, name[56]} per file.
    fn rebuild_directory(&mut self) {
        let mut dir = Vec::with_capacity(4 + self.files.len() * DIR_ENTRY_LEN);
        // Both fit: add_file caps the count and each size below u32::MAX.
        let count = u32::try_from(self.files.len()).unwrap_or(u32::MAX);
        dir.extend_from_slice(&count.to_be_bytes());
        for (i, f) in self.files.iter().enumerate() {
            let size = u32::try_from(f.data.len()).unwrap_or(u32::MAX);
            let select = FILE_FIRST + u16::try_from(i).unwrap_or(ENTRY_MASK);
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&select.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut name = [0u8; NAME_LEN];
            name[..f.name.len()].copy_from_slice(f.name.as_bytes());
            dir.extend_from_slice(&name);
        }
        self.items.insert(FILE_DIR, dir);
    }

    /// The item a selector names, if there is one.
    fn item(&self, selector: u16) -> Option<&[u8]> {
        let key = selector & !WRITE_CHANNEL;
        if key & ARCH_LOCAL == 0 && key >= FILE_FIRST {
            let file = self.files.get(usize::from(key - FILE_FIRST))?;
            Some(&file.data)
        } else {
            self.items.get(&key).map(Vec::as_slice)
        }
    }

    fn select(&mut self, selector: u16) {
        self.selector = selector;
        self.offset = 0;
    }

    /// One byte from the data port: the next byte of the item, or 0 past its end.
    fn read_data(&mut self) -> u8 {
        let byte = self
            .item(self.selector)
            .and_then(|d| d.get(self.offset))
            .copied();
        match byte {
            Some(b) => {
                self.offset += 1;
                b
            }
            None => 0,
        }
    }

    /// Runs the request whose control structure is at `at`, then writes its status there.
    fn dma(&mut self, at: u64) {
        let status = match self.dma_request(at) {
            Ok(()) => 0,
            Err(why) => {
                tracing::debug!("fw_cfg: DMA request at {at:#x} failed: {why}");
                CTL_ERROR
            }
        };
        if self
            .memory
            .write_slice(&status.to_be_bytes(), GuestAddress(at))
            .is_err()
        {
            tracing::debug!("fw_cfg: cannot write the DMA status at {at:#x}");
        }
    }

    fn dma_request(&mut self, at: u64) -> Result<(), DmaFault> {
        let mut raw = [0u8; 16];
        self.memory
            .read_slice(&mut raw, GuestAddress(at))
            .map_err(|_| DmaFault::Descriptor(at))?;
        let [c0, c1, c2, c3, l0, l1, l2, l3, a @ ..] = raw;
        let control = u32::from_be_bytes([c0, c1, c2, c3]);
        let length = u32::from_be_bytes([l0, l1, l2, l3]);
        let address = u64::from_be_bytes(a);

        if control & CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        // QEMU takes the first of these and ignores the others.
        if control & CTL_READ != 0 {
            self.dma_read(address, length)
        } else if control & CTL_WRITE != 0 {
            if length == 0 {
                Ok(())
            } else {
                Err(DmaFault::ReadOnly(self.selector))
            }
        } else if control & CTL_SKIP != 0 {
            let end = self.item(self.selector).map_or(0, <[u8]>::len);
            let left = end.saturating_sub(self.offset);
            self.offset += left.min(length as usize);
            Ok(())
        } else {
            Ok(())
        }
    }

    /// Copies `length` bytes from the current offset to guest `address`, zeros past the end.
    fn dma_read(&mut self, address: u64, length: u32) -> Result<(), DmaFault> {
        let fault = DmaFault::Destination { address, length };
        let len = length as usize;
        // The whole destination first: no partial copy, and the work is bounded by guest RAM.
        if !self.memory.check_range(GuestAddress(address), len) {
            return Err(fault);
        }
        let src = self
            .item(self.selector)
            .and_then(|d| d.get(self.offset..))
            .unwrap_or(&[]);
        let n = src.len().min(len);
        self.memory
            .write_slice(&src[..n], GuestAddress(address))
            .map_err(|_| DmaFault::Destination { address, length })?;
        self.offset += n;
        let mut at = address + n as u64;
        let mut left = len - n;
        while left > 0 {
            let chunk = left.min(ZEROS.len());
            self.memory
                .write_slice(&ZEROS[..chunk], GuestAddress(at))
                .map_err(|_| DmaFault::Destination { address, length })?;
            at += chunk as u64;
            left -= chunk;
        }
        Ok(())
    }
}

fn check_size(data: &[u8]) -> Result<(), FwCfgError> {
    // QEMU keeps item lengths below u32::MAX; the directory has 32 bits for them.
    if data.len() >= u32::MAX as usize {
        return Err(FwCfgError::TooLarge(data.len()));
    }
    Ok(())
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            // QEMU's x86 port pair is one combined register: a byte read at either is a data read.
            (SELECTOR | DATA, 1) => data[0] = self.read_data(),
            (DMA_HIGH.., n) => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                let start = usize::try_from(offset - DMA_HIGH).unwrap_or(usize::MAX);
                match start.checked_add(n).and_then(|end| sig.get(start..end)) {
                    Some(bytes) => data.copy_from_slice(bytes),
                    None => data.fill(0),
                }
            }
            _ => {
                tracing::debug!("fw_cfg: {}-byte read at +{offset:#x}", data.len());
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (SELECTOR, &[lo, hi]) => self.select(u16::from_le_bytes([lo, hi])),
            (DMA_HIGH, &[a, b, c, d]) => {
                self.dma_address = u64::from(u32::from_be_bytes([a, b, c, d])) << 32;
            }
            (DMA_LOW, &[a, b, c, d]) => {
                // The low half starts the request; the register is clear for the next one, so a
                // guest below 4 GiB may write only the low half.
                let at = self.dma_address | u64::from(u32::from_be_bytes([a, b, c, d]));
                self.dma_address = 0;
                self.dma(at);
            }
            (DMA_HIGH, &[a, b, c, d, e, f, g, h]) => {
                self.dma_address = 0;
                self.dma(u64::from_be_bytes([a, b, c, d, e, f, g, h]));
            }
            _ => tracing::debug!("fw_cfg: ignored {}-byte write at +{offset:#x}", data.len()),
        }
    }
}
