//! MODE SENSE and MODE SELECT 6/10 (SPC-4): headers, block descriptors,
//! and the walk over pages. Which pages exist and what may change is the unit's business.

use super::cdb::{op, Cdb};
use super::sense::Sense;
use super::{read_params, DataOut};

/// Page code asking for every page (SPC-4).
pub const ALL_PAGES: u8 = 0x3f;

/// Page control field of MODE SENSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageControl {
    Current,
    /// A mask of the bits MODE SELECT may change.
    Changeable,
    Default,
}

#[derive(Debug, Clone, Copy)]
pub struct SenseRequest {
    ten: bool,
    pub dbd: bool,
    llbaa: bool,
    pub pc: PageControl,
    pub page: u8,
    pub alloc: u64,
}

impl SenseRequest {
    pub fn parse(cdb: &Cdb) -> Result<Self, Sense> {
        let ten = cdb.opcode() == op::MODE_SENSE_10;
        let pc = match cdb.byte(2) >> 6 {
            0 => PageControl::Current,
            1 => PageControl::Changeable,
            2 => PageControl::Default,
            _ => return Err(Sense::SAVING_PARAMETERS_NOT_SUPPORTED),
        };
        let page = cdb.byte(2) & 0x3f;
        // Subpages: only "all subpages" of "all pages" (0x3f/0xff), which is all pages here.
        match cdb.byte(3) {
            0 => {}
            0xff if page == ALL_PAGES => {}
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        }
        Ok(Self {
            ten,
            dbd: cdb.byte(1) & 0x08 != 0,
            llbaa: ten && cdb.byte(1) & 0x10 != 0,
            pc,
            page,
            alloc: if ten {
                cdb.be16(7)
            } else {
                u64::from(cdb.byte(4))
            },
        })
    }

    /// Header, optional block descriptor (`blocks`, `block_len`; SBC-3 short and long LBA
    /// forms) and pages.
    pub fn build(
        &self,
        device_specific: u8,
        descriptor: Option<(u64, u32)>,
        pages: &[u8],
    ) -> Vec<u8> {
        let mut bd = Vec::new();
        let mut long_lba = false;
        if let (false, Some((blocks, block_len))) = (self.dbd, descriptor) {
            if self.llbaa {
                long_lba = true;
                bd.extend_from_slice(&blocks.to_be_bytes());
                bd.extend_from_slice(&[0; 4]);
                bd.extend_from_slice(&block_len.to_be_bytes());
            } else {
                // Short LBA descriptor: a count above 32 bits reads as FFFFFFFFh.
                let short = u32::try_from(blocks).unwrap_or(u32::MAX);
                bd.extend_from_slice(&short.to_be_bytes());
                bd.push(0);
                bd.extend_from_slice(&block_len.to_be_bytes()[1..]);
            }
        }
        let mut d = Vec::new();
        if self.ten {
            d.extend_from_slice(&[0, 0, 0, device_specific, u8::from(long_lba), 0]);
            d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
        } else {
            d.extend_from_slice(&[0, 0, device_specific, bd.len() as u8]);
        }
        d.extend_from_slice(&bd);
        d.extend_from_slice(pages);
        // MODE DATA LENGTH excludes itself; MODE SENSE 6's single byte caps it.
        if self.ten {
            let n = (d.len() - 2) as u16;
            d[..2].copy_from_slice(&n.to_be_bytes());
        } else {
            d.truncate(256);
            d[0] = (d.len() - 1) as u8;
        }
        d
    }
}

/// A MODE SELECT parameter list, split up.
#[derive(Debug, Default)]
pub struct SelectList {
    /// Logical block length from each block descriptor.
    pub block_lengths: Vec<u32>,
    /// (page code, whole page including its 2-byte header).
    pub pages: Vec<(u8, Vec<u8>)>,
}

/// Reads and splits MODE SELECT 6/10's parameter list from the Data-Out buffer.
pub fn parse_select(cdb: &Cdb, data_out: &mut dyn DataOut) -> Result<SelectList, Sense> {
    let ten = cdb.opcode() == op::MODE_SELECT_10;
    // SP (save pages): nothing here is saved across power cycles.
    if cdb.byte(1) & 0x01 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let len = if ten {
        cdb.be16(7)
    } else {
        u64::from(cdb.byte(4))
    } as usize;
    if len == 0 {
        return Ok(SelectList::default());
    }
    let params = read_params(data_out, len).ok_or(Sense::DATA_PHASE_ERROR)?;
    let header = if ten { 8 } else { 4 };
    let (bd_len, long_lba) = if ten {
        let b = params.get(6..8).ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
        let long = params.get(4).is_some_and(|b| b & 1 != 0);
        (usize::from(u16::from_be_bytes([b[0], b[1]])), long)
    } else {
        let b = params.get(3).ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
        (usize::from(*b), false)
    };
    let descriptors = params
        .get(header..header + bd_len)
        .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
    let mut out = SelectList::default();
    let (size, len_at) = if long_lba { (16, 12) } else { (8, 4) };
    for d in descriptors.chunks(size) {
        let b = d
            .get(len_at..size)
            .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
        let block_len = b.iter().fold(0u32, |acc, x| (acc << 8) | u32::from(*x)) & {
            if long_lba {
                u32::MAX
            } else {
                0x00ff_ffff
            }
        };
        out.block_lengths.push(block_len);
    }
    let mut rest = params.get(header + bd_len..).unwrap_or(&[]);
    while !rest.is_empty() {
        let code = rest.first().copied().unwrap_or(0);
        // SPF: subpage format; no unit here has subpages.
        if code & 0x40 != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        let page_len = 2 + usize::from(rest.get(1).copied().unwrap_or(0));
        let page = rest
            .get(..page_len)
            .ok_or(Sense::PARAMETER_LIST_LENGTH_ERROR)?;
        out.pages.push((code & 0x3f, page.to_vec()));
        rest = rest.get(page_len..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Applies a page the guest sent: only bits in `changeable` may differ from `current`
/// (SPC-4, MODE SELECT; otherwise INVALID FIELD IN PARAMETER LIST); the PS bit is ignored.
pub fn apply_page(current: &[u8], changeable: &[u8], sent: &[u8]) -> Result<Vec<u8>, Sense> {
    if sent.len() != current.len() || changeable.len() != current.len() {
        return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    }
    let mut new = current.to_vec();
    for (i, ((n, c), s)) in new.iter_mut().zip(changeable).zip(sent).enumerate() {
        let s = if i == 0 { s & 0x7f } else { *s };
        let cur = if i == 0 { *n & 0x7f } else { *n };
        if (s ^ cur) & !c != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        *n = (*n & !c) | (s & c);
    }
    Ok(new)
}
