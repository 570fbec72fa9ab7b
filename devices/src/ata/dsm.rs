//! DATA SET MANAGEMENT with the TRIM bit (ACS-3 DATA SET MANAGEMENT): the host sends `count` 512-byte
//! blocks of LBA range entries, each 8 bytes little endian: LBA in bits 0..48, sector
//! count in bits 48..64 (ACS-3, LBA Range Entry). Entries with a zero count are padding
//! and skipped.

use super::identify::MAX_DSM_BLOCKS;
use super::{AtaError, DataOut, SECTOR_SIZE};

const ENTRY: usize = 8;

/// Reads `blocks` blocks of range entries from `data_out` and returns the byte ranges
/// (offset, length) to discard on a disk of `capacity` sectors. ABRT when the count is 0
/// or above IDENTIFY word 105, the data is short, or a range leaves the disk.
pub(crate) fn trim_ranges(
    blocks: u16,
    capacity: u64,
    data_out: &mut dyn DataOut,
) -> Result<Vec<(u64, u64)>, AtaError> {
    // ACS-3 DATA SET MANAGEMENT: count 0 is reserved, and a device may abort more blocks than word
    // 105 allows; this one does, which also bounds what it reads.
    if blocks == 0 || blocks > MAX_DSM_BLOCKS {
        return Err(AtaError::Aborted);
    }
    let len = usize::from(blocks) * SECTOR_SIZE as usize;
    if data_out.len() < len {
        return Err(AtaError::Aborted);
    }
    let mut buf = vec![0u8; len];
    if data_out.read(&mut buf) != len {
        return Err(AtaError::Aborted);
    }
    let mut ranges = Vec::new();
    for entry in buf.chunks_exact(ENTRY) {
        let mut raw = [0u8; ENTRY];
        raw.copy_from_slice(entry);
        let v = u64::from_le_bytes(raw);
        let lba = v & ((1 << 48) - 1);
        let sectors = v >> 48;
        if sectors == 0 {
            continue;
        }
        // ACS-3 TRIM: a range past the last LBA aborts the whole command.
        match lba.checked_add(sectors) {
            Some(end) if end <= capacity => {}
            _ => return Err(AtaError::Aborted),
        }
        ranges.push((lba * SECTOR_SIZE, sectors * SECTOR_SIZE));
    }
    Ok(ranges)
}
