//! The disk logical unit (SBC-3): a medium of fixed-size blocks, optionally thin
//! provisioned (UNMAP, WRITE SAME with UNMAP), optionally read-only, with a write cache the
//! guest may turn off through the caching mode page.

use super::cdb::{check_range, op, Cdb};
use super::inquiry::{self, DeviceType, Identity};
use super::mode::{self, PageControl, SenseRequest, ALL_PAGES};
use super::sense::{Sense, SenseState};
use super::{
    data_in, good, read_params, CmdResult, DataOut, MediumIo, MediumIoKind, ScsiError, ScsiResult,
};

/// How a disk unit looks to the guest.
#[derive(Debug, Clone)]
pub struct DiskParams<'a> {
    pub size_bytes: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// Reported as rotation rate 1 (SBC-3), so Linux marks the queue non-rotational.
    pub nonrotational: bool,
    /// Thin provisioning: UNMAP and WRITE SAME with UNMAP become discards.
    pub discard: bool,
    pub read_only: bool,
    /// The volatile write cache starts enabled (caching page WCE); the guest may change it.
    pub write_cache: bool,
    pub vendor: &'a str,
    pub product: &'a str,
    pub serial: String,
    /// NAA identifier for VPD 83 (0: none), e.g. 0x5... for IEEE registered.
    pub wwn: u64,
}

/// Largest UNMAP or WRITE SAME in bytes, like QEMU's default max_unmap_size: big enough
/// that guests rarely split a discard, small enough to bound one request's work.
const MAX_UNMAP_BYTES: u64 = 1 << 30;
/// UNMAP block descriptors per command (VPD B0).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 255;

const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0a;
const CACHING_WCE: u8 = 0x04;

#[derive(Debug)]
pub struct DiskUnit {
    id: Identity,
    blocks: u64,
    block_size: u32,
    nonrotational: bool,
    discard: bool,
    read_only: bool,
    write_cache: bool,
    default_write_cache: bool,
    pub(super) sense: SenseState,
}

impl DiskUnit {
    pub fn new(p: DiskParams<'_>) -> Result<Self, ScsiError> {
        if p.block_size != 512 && p.block_size != 4096 {
            return Err(ScsiError::BlockSize(p.block_size));
        }
        Ok(Self {
            id: Identity::new(p.vendor, p.product, &p.serial, p.wwn),
            blocks: p.size_bytes / u64::from(p.block_size),
            block_size: p.block_size,
            nonrotational: p.nonrotational,
            discard: p.discard,
            read_only: p.read_only,
            write_cache: p.write_cache,
            default_write_cache: p.write_cache,
            sense: SenseState::power_on(),
        })
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether the guest has the volatile write cache on (caching page WCE).
    pub fn write_cache_enabled(&self) -> bool {
        self.write_cache
    }

    fn max_unmap_blocks(&self) -> u64 {
        MAX_UNMAP_BYTES / u64::from(self.block_size)
    }

    fn bytes(&self, blocks: u64) -> u64 {
        blocks.saturating_mul(u64::from(self.block_size))
    }

    pub(super) fn execute(&mut self, cdb: &Cdb, data_out: &mut dyn DataOut) -> CmdResult {
        match cdb.opcode() {
            op::TEST_UNIT_READY => good(),
            op::INQUIRY => self.inquiry(cdb),
            op::READ_CAPACITY_10 => self.read_capacity_10(cdb),
            op::SERVICE_ACTION_IN_16 if cdb.byte(1) & 0x1f == op::SAI_READ_CAPACITY_16 => {
                self.read_capacity_16(cdb)
            }
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => self.read_write(cdb, None),
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
                self.read_write(cdb, Some(data_out))
            }
            op::VERIFY_10 => self.verify(cdb, cdb.be32(2), cdb.be16(7)),
            op::VERIFY_12 => self.verify(cdb, cdb.be32(2), cdb.be32(6)),
            op::VERIFY_16 => self.verify(cdb, cdb.be64(2), cdb.be32(10)),
            op::SYNCHRONIZE_CACHE_10 => self.synchronize_cache(cdb.be32(2), cdb.be16(7)),
            op::SYNCHRONIZE_CACHE_16 => self.synchronize_cache(cdb.be64(2), cdb.be32(10)),
            op::WRITE_SAME_10 => self.write_same(cdb, cdb.be32(2), cdb.be16(7), data_out),
            op::WRITE_SAME_16 => self.write_same(cdb, cdb.be64(2), cdb.be32(10), data_out),
            op::UNMAP => self.unmap(cdb, data_out),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cdb),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => self.mode_select(cdb, data_out),
            // Nothing spins, and a fixed disk has no medium to lock or eject (SBC-3).
            op::START_STOP_UNIT | op::PREVENT_ALLOW_MEDIUM_REMOVAL => good(),
            other => {
                tracing::debug!(opcode = other, "SCSI disk: unsupported command");
                Err(Sense::INVALID_OPCODE)
            }
        }
    }

    fn inquiry(&self, cdb: &Cdb) -> CmdResult {
        let dev = DeviceType {
            peripheral_type: 0x00,
            removable: false,
            version: 6,
        };
        inquiry::execute(cdb, &self.id, dev, &[0xb0, 0xb1, 0xb2], &|page| {
            Some(match page {
                0xb0 => self.block_limits(),
                0xb1 => self.characteristics(),
                0xb2 => self.provisioning(),
                _ => return None,
            })
        })
    }

    /// VPD B0, Block Limits (SBC-3), the body after the 4-byte header.
    fn block_limits(&self) -> Vec<u8> {
        let mut b = vec![0u8; 0x3c];
        // WSNZ: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 ("to the end") is refused.
        b[0] = 0x01;
        // Optimal transfer length granularity: one block.
        b[2..4].copy_from_slice(&1u16.to_be_bytes());
        if self.discard {
            let max = u32::try_from(self.max_unmap_blocks()).unwrap_or(u32::MAX);
            b[16..20].copy_from_slice(&max.to_be_bytes());
            b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            // Optimal unmap granularity: one block (the image layer rounds as it can).
            b[24..28].copy_from_slice(&1u32.to_be_bytes());
        }
        // Maximum WRITE SAME length, which Linux also uses for write-zeroes.
        b[32..40].copy_from_slice(&self.max_unmap_blocks().to_be_bytes());
        b
    }

    /// VPD B1, Block Device Characteristics (SBC-3): rotation rate 1 means
    /// non-rotating medium, 0 "not reported".
    fn characteristics(&self) -> Vec<u8> {
        let mut b = vec![0u8; 0x3c];
        b[0..2].copy_from_slice(&u16::from(self.nonrotational).to_be_bytes());
        b
    }

    /// VPD B2, Logical Block Provisioning (SBC-3): LBPU (UNMAP), LBPWS and LBPWS10
    /// (WRITE SAME 16/10 with UNMAP), provisioning type 2 (thin) when discard is on. LBPRZ
    /// stays 0: a discarded range of a differencing image may read the parent's data.
    fn provisioning(&self) -> Vec<u8> {
        if self.discard {
            vec![0x00, 0xe0, 0x02, 0x00]
        } else {
            vec![0; 4]
        }
    }

    fn read_capacity_10(&self, cdb: &Cdb) -> CmdResult {
        // SBC-3, READ CAPACITY (10): with PMI 0 the LOGICAL BLOCK ADDRESS field must be 0.
        if cdb.byte(8) & 1 == 0 && cdb.be32(2) != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        // A last LBA beyond 32 bits reads as FFFFFFFFh, telling the guest to use RC16.
        let last = u32::try_from(self.blocks.saturating_sub(1)).unwrap_or(u32::MAX);
        let mut d = last.to_be_bytes().to_vec();
        d.extend_from_slice(&self.block_size.to_be_bytes());
        data_in(d, 8)
    }

    /// SBC-3, READ CAPACITY (16): 32 bytes; LBPME tells Linux the unit is thin provisioned.
    fn read_capacity_16(&self, cdb: &Cdb) -> CmdResult {
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.blocks.saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.block_size.to_be_bytes());
        if self.discard {
            d[14] = 0x80;
        }
        data_in(d, cdb.be32(10))
    }

    fn read_write(&self, cdb: &Cdb, data_out: Option<&mut dyn DataOut>) -> CmdResult {
        let (lba, count) = cdb.lba_and_length().ok_or(Sense::INVALID_OPCODE)?;
        let six = matches!(cdb.opcode(), op::READ_6 | op::WRITE_6);
        // RDPROTECT/WRPROTECT: this unit has no protection information (SBC-3, READ (10)).
        if !six && cdb.byte(1) & 0xe0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let write = data_out.is_some();
        if write && self.read_only {
            return Err(Sense::WRITE_PROTECTED);
        }
        check_range(lba, count, self.blocks)?;
        if count == 0 {
            return good();
        }
        let len = self.bytes(count);
        if let Some(d) = data_out {
            if (d.len() as u64) < len {
                return Err(Sense::DATA_PHASE_ERROR);
            }
        }
        let fua_bit = !six && cdb.byte(1) & 0x08 != 0;
        Ok(ScsiResult::Io(MediumIo {
            kind: if write {
                MediumIoKind::Write
            } else {
                MediumIoKind::Read
            },
            offset: self.bytes(lba),
            len,
            fua: write && (fua_bit || !self.write_cache),
        }))
    }

    /// VERIFY without BYTCHK (SBC-3) asks whether the blocks are readable; an image has no
    /// media defects to find, so only the range is checked (Windows' IOCTL_DISK_VERIFY).
    fn verify(&self, cdb: &Cdb, lba: u64, count: u64) -> CmdResult {
        // VRPROTECT (no protection information) and BYTCHK (compare with Data-Out).
        if cdb.byte(1) & 0xe6 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        check_range(lba, count, self.blocks)?;
        good()
    }

    /// SBC-3, SYNCHRONIZE CACHE: count 0 means from `lba` to the end of the medium.
    fn synchronize_cache(&self, lba: u64, count: u64) -> CmdResult {
        check_range(lba, count, self.blocks)?;
        if self.read_only {
            return good();
        }
        let count = if count == 0 { self.blocks - lba } else { count };
        Ok(ScsiResult::Io(MediumIo {
            kind: MediumIoKind::Flush,
            offset: self.bytes(lba),
            len: self.bytes(count),
            fua: false,
        }))
    }

    /// WRITE SAME 10/16 (SBC-3) for zero blocks only: with UNMAP on a thin unit a
    /// discard (Linux sends it for discards when LBPWS is set), otherwise writing zeroes.
    fn write_same(&self, cdb: &Cdb, lba: u64, count: u64, data_out: &mut dyn DataOut) -> CmdResult {
        let flags = cdb.byte(1);
        // WRPROTECT and ANCHOR are not supported.
        if flags & 0xf0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let unmap = flags & 0x08 != 0;
        // NDOB (SBC-4): no Data-Out block, zeroes meant; WRITE SAME 16 only.
        let ndob = cdb.opcode() == op::WRITE_SAME_16 && flags & 0x01 != 0;
        if self.read_only {
            return Err(Sense::WRITE_PROTECTED);
        }
        if count == 0 || count > self.max_unmap_blocks() {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        check_range(lba, count, self.blocks)?;
        if !ndob {
            let block =
                read_params(data_out, self.block_size as usize).ok_or(Sense::DATA_PHASE_ERROR)?;
            if block.iter().any(|b| *b != 0) {
                // The I/O engine has no pattern write; no guest we know sends one.
                tracing::debug!("SCSI disk: WRITE SAME with a non-zero block is not supported");
                return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            }
        }
        let (offset, len) = (self.bytes(lba), self.bytes(count));
        let kind = if unmap && self.discard {
            MediumIoKind::Discard(vec![(offset, len)])
        } else {
            MediumIoKind::WriteZeroes
        };
        let fua = !self.write_cache && kind == MediumIoKind::WriteZeroes;
        Ok(ScsiResult::Io(MediumIo {
            kind,
            offset,
            len,
            fua,
        }))
    }

    /// UNMAP (SBC-3): an 8-byte header and 16-byte block descriptors in Data-Out.
    fn unmap(&self, cdb: &Cdb, data_out: &mut dyn DataOut) -> CmdResult {
        if !self.discard {
            tracing::debug!("SCSI disk: UNMAP without discard=on");
            return Err(Sense::INVALID_OPCODE);
        }
        if self.read_only {
            return Err(Sense::WRITE_PROTECTED);
        }
        if cdb.byte(1) & 0x01 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // ANCHOR
        }
        let plen = cdb.be16(7) as usize;
        if plen == 0 {
            return good();
        }
        if plen < 8 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let params = read_params(data_out, plen).ok_or(Sense::DATA_PHASE_ERROR)?;
        let bd_len = params
            .get(2..4)
            .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
        let end = (8 + bd_len).min(params.len());
        let descriptors = params.get(8..end).unwrap_or(&[]).chunks_exact(16);
        if descriptors.len() > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        let be = |b: &[u8]| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
        let mut ranges = Vec::new();
        let mut total = 0u64;
        for d in descriptors {
            let lba = be(d.get(0..8).unwrap_or(&[]));
            let count = be(d.get(8..12).unwrap_or(&[]));
            check_range(lba, count, self.blocks)?;
            total += count;
            if total > self.max_unmap_blocks() {
                return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            }
            if count != 0 {
                ranges.push((self.bytes(lba), self.bytes(count)));
            }
        }
        let Some(start) = ranges.iter().map(|r| r.0).min() else {
            return good();
        };
        let end = ranges.iter().map(|r| r.0 + r.1).max().unwrap_or(start);
        Ok(ScsiResult::Io(MediumIo {
            kind: MediumIoKind::Discard(ranges),
            offset: start,
            len: end - start,
            fua: false,
        }))
    }

    fn caching_page(&self, pc: PageControl) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = PAGE_CACHING;
        p[1] = 0x12;
        p[2] = match pc {
            PageControl::Current => u8::from(self.write_cache) * CACHING_WCE,
            PageControl::Default => u8::from(self.default_write_cache) * CACHING_WCE,
            PageControl::Changeable => CACHING_WCE,
        };
        p
    }

    /// Control page (SPC-4): queue algorithm modifier 1 (unrestricted reordering),
    /// fixed-format sense (D_SENSE 0). Nothing in it is changeable.
    fn control_page(&self, pc: PageControl) -> Vec<u8> {
        let mut p = vec![0u8; 12];
        p[0] = PAGE_CONTROL;
        p[1] = 0x0a;
        if pc != PageControl::Changeable {
            p[3] = 0x10;
        }
        p
    }

    fn mode_sense(&self, cdb: &Cdb) -> CmdResult {
        let req = SenseRequest::parse(cdb)?;
        let pages = match req.page {
            PAGE_CACHING => self.caching_page(req.pc),
            PAGE_CONTROL => self.control_page(req.pc),
            ALL_PAGES => [self.caching_page(req.pc), self.control_page(req.pc)].concat(),
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        // Device-specific parameter (SBC-3 mode parameter header): WP, and DPOFUA since
        // FUA is honoured.
        let specific = (u8::from(self.read_only) << 7) | 0x10;
        let data = req.build(specific, Some((self.blocks, self.block_size)), &pages);
        data_in(data, req.alloc)
    }

    fn mode_select(&mut self, cdb: &Cdb, data_out: &mut dyn DataOut) -> CmdResult {
        let list = mode::parse_select(cdb, data_out)?;
        // The block length cannot change (0 means "unchanged").
        if list
            .block_lengths
            .iter()
            .any(|l| *l != 0 && *l != self.block_size)
        {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        // Check every page before applying any (SPC-4, MODE SELECT: none or all).
        let mut write_cache = self.write_cache;
        for (code, page) in &list.pages {
            match *code {
                PAGE_CACHING => {
                    let new = mode::apply_page(
                        &self.caching_page(PageControl::Current),
                        &self.caching_page(PageControl::Changeable),
                        page,
                    )?;
                    write_cache = new.get(2).is_some_and(|b| b & CACHING_WCE != 0);
                }
                PAGE_CONTROL => {
                    mode::apply_page(
                        &self.control_page(PageControl::Current),
                        &self.control_page(PageControl::Changeable),
                        page,
                    )?;
                }
                _ => return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST),
            }
        }
        self.write_cache = write_cache;
        good()
    }
}
