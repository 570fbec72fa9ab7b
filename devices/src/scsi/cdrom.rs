//! The CD/DVD logical unit (MMC-6) over ISO media: 2048-byte blocks, one data track, a tray
//! the guest may open and close, removal the guest may prevent, and the media events
//! Linux's sr and Windows' cdrom.sys poll for.

use super::cdb::{check_range, op, Cdb};
use super::inquiry::{self, DeviceType, Identity};
use super::mode::{PageControl, SenseRequest, ALL_PAGES};
use super::sense::{key, Sense, SenseState};
use super::{data_in, good, CmdResult, MediumIo, MediumIoKind, ScsiResult};

pub const BLOCK_SIZE: u64 = 2048;

/// The largest medium called a CD (80 minutes of 2048-byte sectors, QEMU's CD_MAX_BYTES);
/// larger ones are DVD-ROMs for GET CONFIGURATION.
const CD_MAX_BYTES: u64 = 80 * 60 * 75 * 2048;

const PROFILE_DVD_ROM: u16 = 0x0010;
const PROFILE_CD_ROM: u16 = 0x0008;

const PAGE_CAPABILITIES: u8 = 0x2a;

/// Media event codes of GET EVENT STATUS NOTIFICATION (MMC-6, media event descriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MediaEvent {
    NoChange = 0,
    EjectRequest = 1,
    NewMedia = 2,
    MediaRemoval = 3,
}

const ILLEGAL_MODE_FOR_TRACK: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x64, 0x00);
const MEDIUM_NOT_PRESENT_TRAY_OPEN: Sense = Sense::new(key::NOT_READY, 0x3a, 0x02);
/// A DVD structure asked of a CD (MMC-6, READ DISC STRUCTURE).
const INCOMPATIBLE_FORMAT: Sense = Sense::new(key::NOT_READY, 0x30, 0x02);

#[derive(Debug, Clone)]
pub struct CdParams<'a> {
    pub vendor: &'a str,
    pub product: &'a str,
    pub serial: String,
    /// Behind ATAPI (IDE/AHCI): the Core feature names ATAPI rather than SCSI as the
    /// physical interface.
    pub atapi: bool,
}

#[derive(Debug)]
pub struct CdUnit {
    id: Identity,
    atapi: bool,
    /// Blocks of the medium in the drive, if any.
    medium: Option<u64>,
    medium_bytes: u64,
    /// Opened by the guest (START STOP UNIT with LoEj); the medium stays in the tray.
    tray_open: bool,
    prevent: bool,
    event: MediaEvent,
    pub(super) sense: SenseState,
}

impl CdUnit {
    /// An empty drive; `insert` loads a medium.
    pub fn new(p: CdParams<'_>) -> Self {
        Self {
            id: Identity::new(p.vendor, p.product, &p.serial, 0),
            atapi: p.atapi,
            medium: None,
            medium_bytes: 0,
            tray_open: false,
            prevent: false,
            event: MediaEvent::NoChange,
            sense: SenseState::power_on(),
        }
    }

    /// Loads a medium of `size_bytes` (closing the tray): the guest sees NEW MEDIA and a
    /// MEDIUM CHANGED unit attention.
    pub fn insert(&mut self, size_bytes: u64) {
        self.medium = Some(size_bytes / BLOCK_SIZE);
        self.medium_bytes = size_bytes;
        self.tray_open = false;
        self.event = MediaEvent::NewMedia;
        self.sense.raise(Sense::MEDIUM_CHANGED);
    }

    /// Removes the medium, whatever the guest prevents (the host decides).
    pub fn eject(&mut self) {
        if self.medium.take().is_some() {
            self.event = MediaEvent::MediaRemoval;
        }
        self.medium_bytes = 0;
    }

    /// A polite eject (e.g. from the control API): ejects unless the guest prevents removal,
    /// in which case the guest is told an eject was requested and false is returned.
    pub fn request_eject(&mut self) -> bool {
        if self.prevent {
            self.event = MediaEvent::EjectRequest;
            return false;
        }
        self.eject();
        true
    }

    /// A medium is in the drive and the tray closed.
    pub fn is_loaded(&self) -> bool {
        self.medium.is_some() && !self.tray_open
    }

    pub fn has_medium(&self) -> bool {
        self.medium.is_some()
    }

    pub fn tray_open(&self) -> bool {
        self.tray_open
    }

    pub fn removal_prevented(&self) -> bool {
        self.prevent
    }

    pub(super) fn allow_removal(&mut self) {
        self.prevent = false;
    }

    pub(super) fn not_ready(&self) -> Sense {
        if self.tray_open {
            MEDIUM_NOT_PRESENT_TRAY_OPEN
        } else {
            Sense::MEDIUM_NOT_PRESENT
        }
    }

    /// The loaded medium's block count, or NOT READY.
    fn blocks(&self) -> Result<u64, Sense> {
        match self.medium {
            Some(b) if !self.tray_open => Ok(b),
            _ => Err(self.not_ready()),
        }
    }

    fn is_dvd(&self) -> bool {
        self.medium_bytes > CD_MAX_BYTES
    }

    fn current_profile(&self) -> u16 {
        match (self.is_loaded(), self.is_dvd()) {
            (false, _) => 0,
            (true, true) => PROFILE_DVD_ROM,
            (true, false) => PROFILE_CD_ROM,
        }
    }

    pub(super) fn execute(&mut self, cdb: &Cdb) -> CmdResult {
        match cdb.opcode() {
            op::TEST_UNIT_READY => self.blocks().and_then(|_| good()),
            op::INQUIRY => inquiry::execute(
                cdb,
                &self.id,
                DeviceType {
                    peripheral_type: 0x05,
                    removable: true,
                    version: 5,
                },
                &[],
                &|_| None,
            ),
            op::READ_CAPACITY_10 => {
                let blocks = self.blocks()?;
                let last = u32::try_from(blocks.saturating_sub(1)).unwrap_or(u32::MAX);
                let mut d = last.to_be_bytes().to_vec();
                d.extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
                data_in(d, 8)
            }
            op::READ_10 => self.read(cdb.be32(2), cdb.be16(7)),
            op::READ_12 => self.read(cdb.be32(2), cdb.be32(6)),
            op::READ_CD => self.read_cd(cdb),
            op::READ_TOC_PMA_ATIP => self.read_toc(cdb),
            op::GET_CONFIGURATION => self.get_configuration(cdb),
            op::GET_EVENT_STATUS_NOTIFICATION => self.event_status(cdb),
            op::READ_DISC_INFORMATION => self.disc_information(cdb),
            op::READ_TRACK_INFORMATION => self.track_information(cdb),
            op::READ_DISC_STRUCTURE => self.disc_structure(cdb),
            op::MECHANISM_STATUS => self.mechanism_status(cdb),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cdb),
            op::PREVENT_ALLOW_MEDIUM_REMOVAL => {
                // Bit 0 prevents; bit 1 (persistent) changes nothing with one initiator.
                self.prevent = cdb.byte(4) & 0x01 != 0;
                good()
            }
            op::START_STOP_UNIT => self.start_stop(cdb),
            // Reading from an ISO has no speed to set.
            op::SET_CD_SPEED => good(),
            other => {
                tracing::debug!(opcode = other, "SCSI CD/DVD: unsupported command");
                Err(Sense::INVALID_OPCODE)
            }
        }
    }

    fn read(&self, lba: u64, count: u64) -> CmdResult {
        let blocks = self.blocks()?;
        check_range(lba, count, blocks)?;
        if count == 0 {
            return good();
        }
        Ok(ScsiResult::Io(MediumIo {
            kind: MediumIoKind::Read,
            offset: lba * BLOCK_SIZE,
            len: count * BLOCK_SIZE,
            fua: false,
        }))
    }

    /// READ CD (MMC-6) for user data only: an ISO has no sync, headers or EDC to give.
    fn read_cd(&self, cdb: &Cdb) -> CmdResult {
        let blocks = self.blocks()?;
        // Expected sector type: any (0) or Mode 1 (2) is what a data track holds.
        if !matches!((cdb.byte(1) >> 2) & 0x07, 0 | 2) {
            return Err(ILLEGAL_MODE_FOR_TRACK);
        }
        if cdb.byte(10) & 0x07 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let (lba, count) = (cdb.be32(2), cdb.be24(6));
        match cdb.byte(9) & 0xf8 {
            0x00 => {
                check_range(lba, count, blocks)?;
                good()
            }
            0x10 => self.read(lba, count),
            _ => Err(Sense::INVALID_FIELD_IN_CDB),
        }
    }

    /// READ TOC/PMA/ATIP (MMC-6) formats 0 (TOC) and 1 (session info): one data
    /// track at LBA 0 and the lead-out AAh after the last block.
    fn read_toc(&self, cdb: &Cdb) -> CmdResult {
        let msf = cdb.byte(1) & 0x02 != 0;
        let mut format = cdb.byte(2) & 0x0f;
        // SFF-8020i drivers put the format in the control byte's vendor bits.
        if format == 0 {
            format = cdb.byte(9) >> 6;
        }
        let start = cdb.byte(6);
        let alloc = cdb.be16(7);
        let blocks = self.blocks()?;
        let addr = |lba: u64| -> [u8; 4] {
            if msf {
                lba_to_msf(lba)
            } else {
                u32::try_from(lba).unwrap_or(u32::MAX).to_be_bytes()
            }
        };
        // Data track, copy permitted: ADR 1 (Q mode 1), CONTROL 4.
        const ADR_CONTROL: u8 = 0x14;
        let mut d = match format {
            0 => {
                if start > 1 && start != 0xaa {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                let mut d = vec![0, 0, 1, 1];
                if start <= 1 {
                    d.extend_from_slice(&[0, ADR_CONTROL, 1, 0]);
                    d.extend_from_slice(&addr(0));
                }
                d.extend_from_slice(&[0, ADR_CONTROL, 0xaa, 0]);
                d.extend_from_slice(&addr(blocks));
                d
            }
            1 => {
                let mut d = vec![0, 0, 1, 1, 0, ADR_CONTROL, 1, 0];
                d.extend_from_slice(&addr(0));
                d
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        let len = (d.len() - 2) as u16;
        d[..2].copy_from_slice(&len.to_be_bytes());
        data_in(d, alloc)
    }

    /// GET CONFIGURATION (MMC-6): header with the current profile, then features.
    fn get_configuration(&self, cdb: &Cdb) -> CmdResult {
        let rt = cdb.byte(1) & 0x03;
        let first = cdb.be16(2) as u16;
        let alloc = cdb.be16(7);
        let mut d = vec![0u8; 8];
        d[6..8].copy_from_slice(&self.current_profile().to_be_bytes());
        for (code, current, desc) in self.features() {
            let wanted = match rt {
                0 => code >= first,
                1 => code >= first && current,
                2 => code == first,
                _ => return Err(Sense::INVALID_FIELD_IN_CDB),
            };
            if wanted {
                d.extend_from_slice(&desc);
            }
        }
        let len = (d.len() - 4) as u32;
        d[..4].copy_from_slice(&len.to_be_bytes());
        data_in(d, alloc)
    }

    /// (code, current, descriptor) in ascending code order, as MMC-6 wants.
    fn features(&self) -> Vec<(u16, bool, Vec<u8>)> {
        let loaded = self.is_loaded();
        let profile = self.current_profile();
        let dvd = profile == PROFILE_DVD_ROM;
        let cd = profile == PROFILE_CD_ROM;
        let feature = |code: u16, version: u8, persistent: bool, current: bool, body: &[u8]| {
            let mut f = code.to_be_bytes().to_vec();
            f.push(version << 2 | u8::from(persistent) << 1 | u8::from(current));
            f.push(body.len() as u8);
            f.extend_from_slice(body);
            (code, current, f)
        };
        let mut profiles = Vec::new();
        for p in [PROFILE_DVD_ROM, PROFILE_CD_ROM] {
            profiles.extend_from_slice(&p.to_be_bytes());
            profiles.extend_from_slice(&[u8::from(p == profile), 0]);
        }
        // Physical interface standard (MMC-6, Core feature): 1 SCSI, 2 ATAPI. DBE set.
        let interface: u32 = if self.atapi { 2 } else { 1 };
        let mut core = interface.to_be_bytes().to_vec();
        core.extend_from_slice(&[0x01, 0, 0, 0]);
        // Random Readable: 2048-byte blocks, blocking 16 on DVD (an ECC block), 1 on CD.
        let mut random = (BLOCK_SIZE as u32).to_be_bytes().to_vec();
        random.extend_from_slice(&(if dvd { 16u16 } else { 1 }).to_be_bytes());
        random.extend_from_slice(&[0, 0]);
        vec![
            feature(0x0000, 0, true, true, &profiles),
            feature(0x0001, 2, true, true, &core),
            // Morphing: polled events only, OCEvent set.
            feature(0x0002, 1, true, true, &[0x02, 0, 0, 0]),
            // Removable Medium: tray loader, LOAD, EJECT, LOCK.
            feature(0x0003, 0, true, true, &[0x39, 0, 0, 0]),
            feature(0x0010, 0, false, loaded, &random),
            feature(0x001d, 0, false, cd, &[]),
            feature(0x001e, 2, false, cd, &[0, 0, 0, 0]),
            feature(0x001f, 0, false, dvd, &[]),
            feature(0x0100, 0, true, true, &[]),
        ]
    }

    /// GET EVENT STATUS NOTIFICATION (MMC-6), polled only, media class only; an event
    /// is reported once.
    fn event_status(&mut self, cdb: &Cdb) -> CmdResult {
        if cdb.byte(1) & 0x01 == 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB); // asynchronous operation
        }
        const MEDIA_CLASS: u8 = 1 << 4;
        let alloc = cdb.be16(7);
        if cdb.byte(4) & MEDIA_CLASS == 0 {
            // No Event Available; we support the media class.
            return data_in(vec![0, 2, 0x80, MEDIA_CLASS], alloc);
        }
        let status = u8::from(self.is_loaded()) << 1 | u8::from(self.tray_open);
        let event = std::mem::replace(&mut self.event, MediaEvent::NoChange);
        data_in(
            vec![0, 6, 0x04, MEDIA_CLASS, event as u8, status, 0, 0],
            alloc,
        )
    }

    /// READ DISC INFORMATION (MMC-6): a finalized one-session, one-track disc.
    fn disc_information(&self, cdb: &Cdb) -> CmdResult {
        if cdb.byte(1) & 0x07 != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        self.blocks()?;
        let mut d = vec![0u8; 34];
        d[1] = 32;
        // Last session complete, disc finalized, not erasable.
        d[2] = 0x0e;
        d[3] = 1; // first track
        d[4] = 1; // sessions
        d[5] = 1; // first track in last session
        d[6] = 1; // last track in last session
                  // Last session lead-in and last possible lead-out: FFFFFFFFh on a finalized disc.
        d[16..24].fill(0xff);
        data_in(d, cdb.be16(7))
    }

    /// READ TRACK INFORMATION (MMC-6) for the one track of session 1 (Linux's
    /// CDROM_LAST_WRITTEN and UDF readers ask for it; blank-disc fields stay 0).
    fn track_information(&self, cdb: &Cdb) -> CmdResult {
        let blocks = self.blocks()?;
        let number = cdb.be32(2);
        let valid = match cdb.byte(1) & 0x03 {
            0 => number < blocks, // an LBA within the track
            1 | 2 => number == 1, // track 1, or session 1
            _ => false,
        };
        if !valid {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let mut d = vec![0u8; 36];
        d[1] = 34;
        d[2] = 1; // track number
        d[3] = 1; // session number
        d[5] = 0x04; // track mode: data, uninterrupted
        d[6] = 0x01; // data mode 1
        let size = u32::try_from(blocks).unwrap_or(u32::MAX);
        d[24..28].copy_from_slice(&size.to_be_bytes());
        d[28..32].copy_from_slice(&size.saturating_sub(1).to_be_bytes());
        data_in(d, cdb.be16(7))
    }

    /// READ DISC STRUCTURE (MMC-6) for DVD media: physical format (00h), copyright (01h,
    /// no protection) and the structure list (FFh). Windows reads them from DVD-ROM drives.
    fn disc_structure(&self, cdb: &Cdb) -> CmdResult {
        // Media type 0 (DVD); BD structures are not supported.
        if cdb.byte(1) & 0x0f != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let format = cdb.byte(7);
        let alloc = cdb.be16(8);
        let body = match format {
            0x00 | 0x01 => {
                let blocks = self.blocks()?;
                if !self.is_dvd() {
                    return Err(INCOMPATIBLE_FORMAT);
                }
                // One layer only.
                if cdb.byte(6) != 0 {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                if format == 0x01 {
                    vec![0; 4] // no copy protection system, no region restriction
                } else {
                    let mut b = vec![0u8; 2048];
                    b[0] = 0x01; // book type DVD-ROM, part version 1
                    b[1] = 0x0f; // 120 mm, maximum rate not specified
                    b[2] = 0x01; // one layer, embossed (read-only) data
                    let last = u32::try_from(blocks.saturating_sub(1)).unwrap_or(u32::MAX);
                    // Starting sector 0 (data area from LBA 0); end sector and layer 0 end.
                    b[8..12].copy_from_slice(&last.to_be_bytes());
                    b[12..16].copy_from_slice(&last.to_be_bytes());
                    b
                }
            }
            0xff => {
                // Structure list: format, readable (RDS), length of each.
                let mut b = Vec::new();
                for (f, len) in [(0x00u8, 2048u16 + 4), (0x01, 8), (0xff, 16)] {
                    b.extend_from_slice(&[f, 0x40]);
                    b.extend_from_slice(&len.to_be_bytes());
                }
                b
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        let mut d = ((body.len() + 2) as u16).to_be_bytes().to_vec();
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(&body);
        data_in(d, alloc)
    }

    /// MECHANISM STATUS (MMC-6): no changer, idle, the door bit.
    fn mechanism_status(&self, cdb: &Cdb) -> CmdResult {
        let mut d = vec![0u8; 8];
        d[1] = u8::from(self.tray_open) << 4;
        data_in(d, cdb.be16(8))
    }

    /// Capabilities and Mechanical Status page (MMC-3 page 2Ah, the 20-byte form Linux's sr reads).
    fn capabilities_page(&self, pc: PageControl) -> Vec<u8> {
        let mut p = vec![0u8; 22];
        p[0] = PAGE_CAPABILITIES;
        p[1] = 0x14;
        if pc == PageControl::Changeable {
            return p;
        }
        // Reads CD-R, CD-RW, DVD-ROM, DVD-R and DVD-RAM media (QEMU's set).
        p[2] = 0x3b;
        // Multi-session, Mode 2 Form 1 and 2.
        p[4] = 0x70;
        // Tray loader, EJECT, LOCK, and LOCK STATE when prevented.
        p[6] = 0x20 | 0x08 | 0x01 | u8::from(self.prevent) << 1;
        // Maximum and current read speed in kB/s: 40x (176 kB/s each).
        const SPEED: u16 = 40 * 176;
        p[8..10].copy_from_slice(&SPEED.to_be_bytes());
        p[12..14].copy_from_slice(&512u16.to_be_bytes()); // buffer size, KiB
        p[14..16].copy_from_slice(&SPEED.to_be_bytes());
        p
    }

    fn mode_sense(&self, cdb: &Cdb) -> CmdResult {
        let req = SenseRequest::parse(cdb)?;
        let pages = match req.page {
            PAGE_CAPABILITIES | ALL_PAGES => self.capabilities_page(req.pc),
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        // MMC drives have no block descriptors.
        data_in(req.build(0, None, &pages), req.alloc)
    }

    /// START STOP UNIT (MMC-6): LoEj with Start closes the tray, without it ejects
    /// unless removal is prevented (then 05/53/02).
    fn start_stop(&mut self, cdb: &Cdb) -> CmdResult {
        let b = cdb.byte(4);
        // A power condition makes START and LOEJ ignored (SBC-3, START STOP UNIT).
        if b >> 4 != 0 || b & 0x02 == 0 {
            return good();
        }
        if b & 0x01 != 0 {
            if self.tray_open {
                self.tray_open = false;
                if self.medium.is_some() {
                    self.event = MediaEvent::NewMedia;
                    self.sense.raise(Sense::MEDIUM_CHANGED);
                }
            }
        } else {
            if self.prevent {
                return Err(Sense::MEDIUM_REMOVAL_PREVENTED);
            }
            if !self.tray_open {
                self.tray_open = true;
                if self.medium.is_some() {
                    self.event = MediaEvent::MediaRemoval;
                }
            }
        }
        good()
    }
}

/// LBA to MSF (MMC-6, MSF addressing): 150 frames of pregap before LBA 0; minutes saturate
/// at 255 for media longer than MSF can express.
fn lba_to_msf(lba: u64) -> [u8; 4] {
    let f = lba + 150;
    let m = f / (75 * 60);
    if m > 255 {
        return [0, 255, 59, 74];
    }
    [0, m as u8, (f / 75 % 60) as u8, (f % 75) as u8]
}
