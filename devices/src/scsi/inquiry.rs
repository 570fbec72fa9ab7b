//! INQUIRY (SPC-4): standard data and the vital product data pages every unit has
//! (00 supported pages, 80 serial number, 83 device identification). Units add their own
//! pages (the disk's B0/B1/B2) through `extra`.

use super::cdb::Cdb;
use super::sense::Sense;
use super::{data_in, CmdResult};

/// Who a unit says it is, space-padded as INQUIRY wants (SPC-4, ASCII data).
#[derive(Debug, Clone)]
pub struct Identity {
    vendor: [u8; 8],
    product: [u8; 16],
    revision: [u8; 4],
    serial: Vec<u8>,
    /// NAA designator for VPD 83 (0: none). Given whole, NAA nibble included (e.g. 0x5...).
    wwn: u64,
}

/// Printable ASCII only (SPC-4, ASCII data); anything else becomes a space.
fn ascii(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.bytes()
        .map(|b| if (0x20..0x7f).contains(&b) { b } else { b' ' })
}

fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    for (d, b) in out.iter_mut().zip(ascii(s)) {
        *d = b;
    }
    out
}

/// What kind of device the standard data announces.
#[derive(Debug, Clone, Copy)]
pub struct DeviceType {
    pub peripheral_type: u8,
    pub removable: bool,
    /// SPC version: 6 = SPC-4 for disks (Linux then tries READ CAPACITY 16 and the VPD
    /// pages), 5 = SPC-3 for CD/DVD units as MMC drives claim.
    pub version: u8,
}

impl Identity {
    pub fn new(vendor: &str, product: &str, serial: &str, wwn: u64) -> Self {
        // VPD 83's T10 designator holds vendor + serial in a one-byte length.
        let serial: Vec<u8> = ascii(serial.trim()).take(240).collect();
        Self {
            vendor: padded(vendor),
            product: padded(product),
            revision: padded(concat!(
                env!("CARGO_PKG_VERSION_MAJOR"),
                ".",
                env!("CARGO_PKG_VERSION_MINOR")
            )),
            serial,
            wwn,
        }
    }
}

/// Answers INQUIRY. `extra_pages` lists the unit's own VPD pages and `extra` builds them
/// (page bodies after the 4-byte header).
pub fn execute(
    cdb: &Cdb,
    id: &Identity,
    dev: DeviceType,
    extra_pages: &[u8],
    extra: &dyn Fn(u8) -> Option<Vec<u8>>,
) -> CmdResult {
    let evpd = cdb.byte(1) & 1 != 0;
    // Bit 1 is CMDDT (obsolete since SPC-3): not supported.
    if cdb.byte(1) & 0x02 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let page = cdb.byte(2);
    let alloc = cdb.be16(3);
    let pdt = dev.peripheral_type & 0x1f;
    if !evpd {
        if page != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        return data_in(standard(id, dev), alloc);
    }
    let body = match page {
        0x00 => {
            let mut pages = vec![0x00, 0x80, 0x83];
            pages.extend_from_slice(extra_pages);
            pages
        }
        0x80 => id.serial.clone(),
        0x83 => identification(id),
        p if extra_pages.contains(&p) => extra(p).ok_or(Sense::INVALID_FIELD_IN_CDB)?,
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    let mut data = vec![pdt, page];
    data.extend_from_slice(&(body.len() as u16).to_be_bytes());
    data.extend_from_slice(&body);
    data_in(data, alloc)
}

/// Standard INQUIRY data, 36 bytes (SPC-4, INQUIRY).
fn standard(id: &Identity, dev: DeviceType) -> Vec<u8> {
    let mut d = vec![0u8; 36];
    d[0] = dev.peripheral_type & 0x1f;
    d[1] = if dev.removable { 0x80 } else { 0 };
    d[2] = dev.version;
    // HISUP (hierarchical LUNs, as REPORT LUNS answers) and response data format 2.
    d[3] = 0x12;
    d[4] = 36 - 5;
    // CMDQUE: tagged commands; virtio-scsi and UAS queue several at once.
    d[7] = 0x02;
    d[8..16].copy_from_slice(&id.vendor);
    d[16..32].copy_from_slice(&id.product);
    d[32..36].copy_from_slice(&id.revision);
    d
}

/// VPD 83 (SPC-4 Device Identification): an NAA designator when a WWN is set, and a T10
/// vendor ID one (vendor + serial) that Linux's /dev/disk/by-id uses when there is no NAA.
fn identification(id: &Identity) -> Vec<u8> {
    let mut d = Vec::new();
    if id.wwn != 0 {
        // Binary code set, association: logical unit, designator type 3 (NAA).
        d.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
        d.extend_from_slice(&id.wwn.to_be_bytes());
    }
    let t10_len = id.vendor.len() + id.serial.len();
    // ASCII code set, association: logical unit, designator type 1 (T10 vendor ID).
    d.extend_from_slice(&[0x02, 0x01, 0x00, t10_len as u8]);
    d.extend_from_slice(&id.vendor);
    d.extend_from_slice(&id.serial);
    d
}

/// INQUIRY to a LUN with no unit: peripheral qualifier 3, type 1Fh (SPC-4, INQUIRY).
pub fn missing_lun(cdb: &Cdb) -> CmdResult {
    const NO_DEVICE: u8 = 0x7f;
    let alloc = cdb.be16(3);
    if cdb.byte(1) & 0x02 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    if cdb.byte(1) & 1 != 0 {
        // Only the supported-pages page, listing itself.
        if cdb.byte(2) != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        return data_in(vec![NO_DEVICE, 0x00, 0x00, 0x01, 0x00], alloc);
    }
    if cdb.byte(2) != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let mut d = vec![0u8; 36];
    d[0] = NO_DEVICE;
    d[2] = 6;
    d[3] = 0x12;
    d[4] = 36 - 5;
    d[8..36].fill(b' ');
    data_in(d, alloc)
}
