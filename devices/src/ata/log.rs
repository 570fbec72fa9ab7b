//! The general purpose logs READ LOG EXT and READ LOG DMA EXT return (ACS-3 Annex A):
//! the log directory (00h), the NCQ command error log (10h, SATA 3.x NCQ Command Error log)
//! and the list of IDENTIFY DEVICE data pages (30h page 00h, ACS-3 IDENTIFY DEVICE data log).

use super::taskfile::Taskfile;
use super::{AtaCompletion, AtaError};

pub(crate) const LOG_DIRECTORY: u8 = 0x00;
pub(crate) const LOG_NCQ_ERROR: u8 = 0x10;
pub(crate) const LOG_IDENTIFY_DEVICE_DATA: u8 = 0x30;

const PAGE: usize = 512;

/// The logs this device has and their sizes in 512-byte pages (the directory lists them).
const LOGS: [(u8, u16); 2] = [(LOG_NCQ_ERROR, 1), (LOG_IDENTIFY_DEVICE_DATA, 1)];

/// What log 10h reports: the last command that failed, until the host reads the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NcqErrorLog {
    entry: Option<NcqError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NcqError {
    /// None for a non-queued command (the NQ bit).
    tag: Option<u8>,
    status: u8,
    error: u8,
    lba: u64,
    count: u16,
}

impl NcqErrorLog {
    /// An NCQ command with `tag` failed with `c` (whose `lba` names the failing sector);
    /// `count` is the command's sector count as the host wrote it (0 for 65536).
    pub fn record_queued(&mut self, tag: u8, c: &AtaCompletion, count: u16) {
        self.entry = Some(NcqError {
            tag: Some(tag & 0x1f),
            status: c.status,
            error: c.error,
            lba: c.lba,
            count,
        });
    }

    /// A non-queued command failed: the log says so with NQ and no tag (SATA 3.x NCQ Command Error log:
    /// the host must not read a queued command's registers from it).
    pub fn record_unqueued(&mut self, c: &AtaCompletion) {
        self.entry = Some(NcqError {
            tag: None,
            status: c.status,
            error: c.error,
            lba: c.lba,
            count: c.count,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.entry.is_none()
    }

    /// Page 0 of log 10h; reading it clears the error (SATA 3.x).
    fn take_page(&mut self) -> [u8; PAGE] {
        let mut b = [0u8; PAGE];
        if let Some(e) = self.entry.take() {
            // Bit 7 (NQ): a non-queued command failed and the tag means nothing.
            b[0] = e.tag.unwrap_or(0x80);
            b[2] = e.status;
            b[3] = e.error;
            b[4..7].copy_from_slice(&e.lba.to_le_bytes()[0..3]);
            b[7] = 0x40 | ((e.lba >> 24) & 0x0f) as u8;
            b[8..11].copy_from_slice(&e.lba.to_le_bytes()[3..6]);
            b[12..14].copy_from_slice(&e.count.to_le_bytes());
        }
        // Byte 511: the checksum making the page sum to zero.
        checksum(&mut b);
        b
    }
}

/// Sets the last byte so that all bytes sum to zero modulo 256 (SATA 3.x log 10h, ACS-3 SMART data).
pub(crate) fn checksum(page: &mut [u8]) {
    if let Some((last, rest)) = page.split_last_mut() {
        let sum = rest.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        *last = sum.wrapping_neg();
    }
}

/// READ LOG EXT / READ LOG DMA EXT (ACS-3 READ LOG EXT inputs): log address in LBA 0..8, first page
/// in LBA 8..16 and 32..40, page count in count (0 is invalid). Pages past the log's end
/// abort.
pub(crate) fn read_log(tf: &Taskfile, ncq: &mut NcqErrorLog) -> Result<Vec<u8>, AtaError> {
    let log = tf.lba_low();
    let first = u16::from(tf.lba_mid()) | (((tf.lba >> 32) as u16 & 0xff) << 8);
    let pages = tf.count;
    let size = match log {
        LOG_DIRECTORY => 1,
        _ => LOGS
            .iter()
            .find(|(l, _)| *l == log)
            .map(|(_, n)| *n)
            .ok_or(AtaError::Aborted)?,
    };
    if pages == 0 || u32::from(first) + u32::from(pages) > u32::from(size) {
        return Err(AtaError::Aborted);
    }
    // Every log here has one page, so `first` is 0 and `pages` 1.
    let page = match log {
        LOG_DIRECTORY => directory(),
        LOG_NCQ_ERROR => ncq.take_page(),
        _ => identify_pages(),
    };
    Ok(page.to_vec())
}

/// Log 00h (ACS-3, General Purpose Log Directory): word 0 the version (0001h), word n the page count of log n.
fn directory() -> [u8; PAGE] {
    let mut b = [0u8; PAGE];
    b[0] = 0x01;
    for (log, pages) in LOGS {
        let at = usize::from(log) * 2;
        b[at..at + 2].copy_from_slice(&pages.to_le_bytes());
    }
    b
}

/// Log 30h page 00h (ACS-3, List of supported IDENTIFY DEVICE data pages): the header (revision 0001h, page number 00h), the
/// number of entries at byte 8 and the supported page numbers from byte 9: only this one.
fn identify_pages() -> [u8; PAGE] {
    let mut b = [0u8; PAGE];
    b[0] = 0x01;
    b[8] = 1;
    b[9] = 0x00;
    b
}
