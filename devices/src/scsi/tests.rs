//! Every command checked byte by byte against SPC-4, SBC-3 and MMC-6.

use super::*;

const GIB: u64 = 1 << 30;

fn params(size_bytes: u64, block_size: u32) -> DiskParams<'static> {
    DiskParams {
        size_bytes,
        block_size,
        nonrotational: true,
        discard: true,
        read_only: false,
        write_cache: true,
        vendor: "FERRY",
        product: "HARDDISK",
        serial: "SN0001".into(),
        wwn: 0x5000_0000_0000_0001,
    }
}

fn cd_params() -> CdParams<'static> {
    CdParams {
        vendor: "FERRY",
        product: "CD-ROM",
        serial: "CD0001".into(),
        atapi: false,
    }
}

/// A target with `unit` at LUN 0 and its power-on unit attention already consumed.
fn target(unit: LogicalUnit) -> ScsiTarget {
    let mut t = ScsiTarget::new();
    t.attach(0, unit).unwrap();
    assert_eq!(check(&mut t, 0, &[0; 6]), Sense::POWER_ON_RESET);
    t
}

fn disk_target(p: DiskParams<'_>) -> ScsiTarget {
    target(LogicalUnit::Disk(DiskUnit::new(p).unwrap()))
}

fn cd_target() -> ScsiTarget {
    target(LogicalUnit::Cd(CdUnit::new(cd_params())))
}

fn run(t: &mut ScsiTarget, lun: u16, cdb: &[u8], out: &[u8]) -> ScsiResult {
    let mut out = out;
    t.execute(lun, cdb, &mut out)
}

fn complete(r: ScsiResult) -> Completion {
    match r {
        ScsiResult::Complete(c) => c,
        ScsiResult::Io(io) => panic!("unexpected I/O {io:?}"),
    }
}

fn data(t: &mut ScsiTarget, lun: u16, cdb: &[u8]) -> Vec<u8> {
    let c = complete(run(t, lun, cdb, &[]));
    assert_eq!(c.status, ScsiStatus::Good, "{cdb:02x?}: {:?}", c.sense);
    c.data_in
}

fn check(t: &mut ScsiTarget, lun: u16, cdb: &[u8]) -> Sense {
    check_out(t, lun, cdb, &[])
}

fn check_out(t: &mut ScsiTarget, lun: u16, cdb: &[u8], out: &[u8]) -> Sense {
    let c = complete(run(t, lun, cdb, out));
    assert_eq!(c.status, ScsiStatus::CheckCondition, "{cdb:02x?}");
    assert!(c.data_in.is_empty());
    c.sense.unwrap()
}

fn io(t: &mut ScsiTarget, cdb: &[u8], out: &[u8]) -> MediumIo {
    match run(t, 0, cdb, out) {
        ScsiResult::Io(io) => io,
        ScsiResult::Complete(c) => panic!("expected I/O for {cdb:02x?}, got {c:?}"),
    }
}

fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let a = alloc.to_be_bytes();
    [0x12, u8::from(evpd), page, a[0], a[1], 0]
}

fn pad<const N: usize>(s: &str) -> [u8; N] {
    let mut b = [b' '; N];
    for (d, c) in b.iter_mut().zip(s.bytes()) {
        *d = c;
    }
    b
}

// ---- sense data and unit attention ----

#[test]
fn sense_formats() {
    let s = Sense::UNRECOVERED_READ_ERROR.with_info(0x1234);
    assert_eq!(
        s.fixed_format(),
        [0xf0, 0, 0x03, 0, 0, 0x12, 0x34, 10, 0, 0, 0, 0, 0x11, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        s.descriptor_format(),
        [0x72, 0x03, 0x11, 0, 0, 0, 0, 12, 0, 0x0a, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34]
    );
    // An INFORMATION value beyond 32 bits is not valid in fixed format.
    assert_eq!(
        Sense::WRITE_ERROR.with_info(1 << 40).fixed_format()[0],
        0x70
    );
    assert_eq!(ScsiStatus::CheckCondition.code(), 2);
}

#[test]
fn power_on_attention_once_then_cleared() {
    let mut t = ScsiTarget::new();
    t.attach(
        0,
        LogicalUnit::Disk(DiskUnit::new(params(GIB, 512)).unwrap()),
    )
    .unwrap();
    // INQUIRY and REPORT LUNS do not consume the unit attention (SPC-4 5.14).
    data(&mut t, 0, &inquiry(false, 0, 36));
    data(&mut t, 0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]);
    let s = check(&mut t, 0, &[0x00, 0, 0, 0, 0, 0]);
    assert_eq!((s.key, s.asc, s.ascq), (0x06, 0x29, 0x00));
    assert!(data(&mut t, 0, &[0; 6]).is_empty());
    // A reset raises it again.
    t.reset();
    assert_eq!(check(&mut t, 0, &[0; 6]), Sense::POWER_ON_RESET);
    data(&mut t, 0, &[0; 6]);
}

#[test]
fn request_sense_returns_and_clears() {
    let mut t = ScsiTarget::new();
    t.attach(
        0,
        LogicalUnit::Disk(DiskUnit::new(params(GIB, 512)).unwrap()),
    )
    .unwrap();
    let rs = [0x03, 0, 0, 0, 252, 0];
    assert_eq!(
        data(&mut t, 0, &rs),
        [0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0, 0, 0, 0, 0]
    );
    assert_eq!(data(&mut t, 0, &rs), Sense::NO_SENSE.fixed_format());
    // The last failed command's sense, once (initiators without autosense).
    assert_eq!(check(&mut t, 0, &[0xff]), Sense::INVALID_OPCODE);
    assert_eq!(
        data(&mut t, 0, &[0x03, 1, 0, 0, 252, 0]),
        [0x72, 0x05, 0x20, 0, 0, 0, 0, 0]
    );
    assert_eq!(data(&mut t, 0, &rs), Sense::NO_SENSE.fixed_format());
    // A successful command in between clears it; allocation length cuts the data.
    check(&mut t, 0, &[0xff]);
    data(&mut t, 0, &[0; 6]);
    assert_eq!(
        data(&mut t, 0, &[0x03, 0, 0, 0, 8, 0]),
        [0x70, 0, 0, 0, 0, 0, 0, 10]
    );
}

// ---- INQUIRY ----

#[test]
fn disk_standard_inquiry() {
    let mut t = disk_target(params(GIB, 512));
    let d = data(&mut t, 0, &inquiry(false, 0, 96));
    assert_eq!(d.len(), 36);
    assert_eq!(d[..8], [0x00, 0x00, 0x06, 0x12, 31, 0, 0, 0x02]);
    assert_eq!(d[8..16], pad::<8>("FERRY"));
    assert_eq!(d[16..32], pad::<16>("HARDDISK"));
    assert_eq!(
        d[32..36],
        pad::<4>(concat!(
            env!("CARGO_PKG_VERSION_MAJOR"),
            ".",
            env!("CARGO_PKG_VERSION_MINOR")
        ))
    );
    // Allocation length truncation.
    assert_eq!(data(&mut t, 0, &inquiry(false, 0, 5)), d[..5]);
    assert!(data(&mut t, 0, &inquiry(false, 0, 0)).is_empty());
    // A page code without EVPD, and CMDDT, are invalid.
    assert_eq!(
        check(&mut t, 0, &inquiry(false, 0x80, 36)),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check(&mut t, 0, &[0x12, 2, 0, 0, 36, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check(&mut t, 0, &inquiry(true, 0xc0, 36)),
        Sense::INVALID_FIELD_IN_CDB
    );
}

#[test]
fn disk_vpd_pages() {
    let mut t = disk_target(params(GIB, 512));
    assert_eq!(
        data(&mut t, 0, &inquiry(true, 0x00, 255)),
        [0, 0, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]
    );
    assert_eq!(
        data(&mut t, 0, &inquiry(true, 0x80, 255)),
        [0, 0x80, 0, 6, b'S', b'N', b'0', b'0', b'0', b'1']
    );
    let mut want = vec![0, 0x83, 0, 30, 0x01, 0x03, 0x00, 0x08];
    want.extend_from_slice(&0x5000_0000_0000_0001u64.to_be_bytes());
    want.extend_from_slice(&[0x02, 0x01, 0x00, 14]);
    want.extend_from_slice(b"FERRY   SN0001");
    assert_eq!(data(&mut t, 0, &inquiry(true, 0x83, 255)), want);

    let b0 = data(&mut t, 0, &inquiry(true, 0xb0, 255));
    assert_eq!(b0.len(), 64);
    assert_eq!(b0[..8], [0, 0xb0, 0x00, 0x3c, 0x01, 0, 0, 1]);
    let max = (GIB / 512) as u32;
    assert_eq!(b0[20..24], max.to_be_bytes()); // maximum unmap LBA count
    assert_eq!(b0[24..28], 255u32.to_be_bytes()); // maximum unmap descriptors
    assert_eq!(b0[28..32], 1u32.to_be_bytes()); // optimal unmap granularity
    assert_eq!(b0[32..36], [0; 4]);
    assert_eq!(b0[36..44], u64::from(max).to_be_bytes()); // maximum write same length
    assert!(b0[44..].iter().all(|b| *b == 0));

    let b1 = data(&mut t, 0, &inquiry(true, 0xb1, 255));
    assert_eq!(b1.len(), 64);
    assert_eq!(b1[..8], [0, 0xb1, 0x00, 0x3c, 0x00, 0x01, 0, 0]);

    assert_eq!(
        data(&mut t, 0, &inquiry(true, 0xb2, 255)),
        [0, 0xb2, 0, 4, 0, 0xe0, 0x02, 0]
    );
}

#[test]
fn disk_vpd_without_discard_or_ssd() {
    let mut p = params(GIB, 4096);
    p.discard = false;
    p.nonrotational = false;
    p.wwn = 0;
    let mut t = disk_target(p);
    let b0 = data(&mut t, 0, &inquiry(true, 0xb0, 255));
    assert_eq!(b0[20..32], [0; 12]);
    assert_eq!(b0[36..44], (GIB / 4096).to_be_bytes());
    assert_eq!(data(&mut t, 0, &inquiry(true, 0xb1, 255))[4..6], [0, 0]);
    assert_eq!(
        data(&mut t, 0, &inquiry(true, 0xb2, 255)),
        [0, 0xb2, 0, 4, 0, 0, 0, 0]
    );
    // No NAA designator without a WWN.
    assert_eq!(
        data(&mut t, 0, &inquiry(true, 0x83, 255))[4..8],
        [0x02, 0x01, 0, 14]
    );
}

// ---- READ CAPACITY ----

#[test]
fn read_capacity_1gib_512() {
    let mut t = disk_target(params(GIB, 512));
    assert_eq!(
        data(&mut t, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        [0x00, 0x1f, 0xff, 0xff, 0x00, 0x00, 0x02, 0x00]
    );
    let rc16 = [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    let mut want = vec![
        0, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0, 0, 0x02, 0, 0, 0, 0x80, 0,
    ];
    want.extend_from_slice(&[0; 16]);
    assert_eq!(data(&mut t, 0, &rc16), want);
    // Allocation length 12: cut.
    let mut short = rc16;
    short[13] = 12;
    assert_eq!(data(&mut t, 0, &short), want[..12]);
    // PMI 0 with an LBA is invalid; other service actions too.
    assert_eq!(
        check(&mut t, 0, &[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    let mut sa = rc16;
    sa[1] = 0x11;
    assert_eq!(check(&mut t, 0, &sa), Sense::INVALID_OPCODE);
}

#[test]
fn read_capacity_large_and_4k() {
    let mut p = params(4 << 40, 4096);
    p.discard = false;
    let mut t = disk_target(p);
    // 4 TiB / 4 KiB = 2^30 blocks fits RC10.
    assert_eq!(
        data(&mut t, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        [0x3f, 0xff, 0xff, 0xff, 0, 0, 0x10, 0]
    );
    let mut t = disk_target(params(4 << 40, 512));
    assert_eq!(
        data(&mut t, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0])[..4],
        [0xff; 4]
    );
    let d = data(
        &mut t,
        0,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
    );
    assert_eq!(d[..8], ((4u64 << 40) / 512 - 1).to_be_bytes());
}

#[test]
fn bad_block_size_refused() {
    assert_eq!(
        DiskUnit::new(params(GIB, 1024)).unwrap_err(),
        ScsiError::BlockSize(1024)
    );
}

// ---- READ / WRITE ----

#[test]
fn read_write_all_sizes() {
    let mut t = disk_target(params(GIB, 512));
    let rw = |kind, offset, len, fua| MediumIo {
        kind,
        offset,
        len,
        fua,
    };
    // READ 6: 21-bit LBA, transfer length 0 means 256 blocks.
    assert_eq!(
        io(&mut t, &[0x08, 0x01, 0x02, 0x03, 0, 0], &[]),
        rw(MediumIoKind::Read, 0x10203 * 512, 256 * 512, false)
    );
    assert_eq!(
        io(&mut t, &[0x28, 0, 0, 0, 0, 10, 0, 0, 4, 0], &[]),
        rw(MediumIoKind::Read, 5120, 2048, false)
    );
    assert_eq!(
        io(&mut t, &[0xa8, 0, 0, 0, 0, 10, 0, 0, 0, 4, 0, 0], &[]),
        rw(MediumIoKind::Read, 5120, 2048, false)
    );
    let mut r16 = [0u8; 16];
    r16[0] = 0x88;
    r16[9] = 1;
    r16[13] = 1;
    assert_eq!(
        io(&mut t, &r16, &[]),
        rw(MediumIoKind::Read, 512, 512, false)
    );
    let payload = [0u8; 2048];
    assert_eq!(
        io(&mut t, &[0x0a, 0, 0, 1, 1, 0], &payload),
        rw(MediumIoKind::Write, 512, 512, false)
    );
    // FUA on WRITE 10.
    assert_eq!(
        io(&mut t, &[0x2a, 0x08, 0, 0, 0, 2, 0, 0, 4, 0], &payload),
        rw(MediumIoKind::Write, 1024, 2048, true)
    );
    assert_eq!(
        io(&mut t, &[0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], &payload),
        rw(MediumIoKind::Write, 0, 512, false)
    );
    let mut w16 = r16;
    w16[0] = 0x8a;
    assert_eq!(
        io(&mut t, &w16, &payload),
        rw(MediumIoKind::Write, 512, 512, false)
    );
    // The last block is in range, one past is not.
    let last = (GIB / 512 - 1) as u32;
    let l = last.to_be_bytes();
    io(&mut t, &[0x28, 0, l[0], l[1], l[2], l[3], 0, 0, 1, 0], &[]);
    let sense = check(&mut t, 0, &[0x28, 0, l[0], l[1], l[2], l[3], 0, 0, 2, 0]);
    assert_eq!((sense.key, sense.asc, sense.ascq), (0x05, 0x21, 0x00));
    r16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(check(&mut t, 0, &r16), Sense::LBA_OUT_OF_RANGE);
    // Transfer length 0: GOOD without I/O.
    assert!(data(&mut t, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_empty());
    // Protection information is not supported.
    assert_eq!(
        check(&mut t, 0, &[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    // A Data-Out buffer shorter than the transfer.
    assert_eq!(
        check_out(&mut t, 0, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 5, 0], &payload),
        Sense::DATA_PHASE_ERROR
    );
}

#[test]
fn read_only_disk() {
    let mut p = params(GIB, 512);
    p.read_only = true;
    let mut t = disk_target(p);
    let s = check_out(&mut t, 0, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512]);
    assert_eq!((s.key, s.asc, s.ascq), (0x07, 0x27, 0x00));
    io(&mut t, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]);
    let ws = [0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    assert_eq!(check_out(&mut t, 0, &ws, &[0; 512]), Sense::WRITE_PROTECTED);
    let unmap = [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    assert_eq!(
        check_out(&mut t, 0, &unmap, &[0; 24]),
        Sense::WRITE_PROTECTED
    );
    // Nothing to flush.
    assert!(data(&mut t, 0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_empty());
    // MODE SENSE's WP bit.
    assert_eq!(data(&mut t, 0, &[0x1a, 0x08, 0x08, 0, 255, 0])[2], 0x90);
}

#[test]
fn synchronize_cache() {
    let mut t = disk_target(params(GIB, 512));
    let flush = |offset, len| MediumIo {
        kind: MediumIoKind::Flush,
        offset,
        len,
        fua: false,
    };
    assert_eq!(
        io(&mut t, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]),
        flush(0, GIB)
    );
    assert_eq!(
        io(&mut t, &[0x35, 0, 0, 0, 0, 8, 0, 0, 8, 0], &[]),
        flush(4096, 4096)
    );
    let mut s16 = [0u8; 16];
    s16[0] = 0x91;
    s16[9] = 1;
    assert_eq!(io(&mut t, &s16, &[]), flush(512, GIB - 512));
    s16[9] = 0;
    s16[2] = 1;
    assert_eq!(check(&mut t, 0, &s16), Sense::LBA_OUT_OF_RANGE);
}

// ---- WRITE SAME / UNMAP ----

#[test]
fn write_same() {
    let mut t = disk_target(params(GIB, 512));
    let mut ws = [0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 8, 0, 0];
    let zero = [0u8; 512];
    assert_eq!(
        io(&mut t, &ws, &zero),
        MediumIo {
            kind: MediumIoKind::Discard(vec![(16 * 512, 4096)]),
            offset: 8192,
            len: 4096,
            fua: false
        }
    );
    ws[1] = 0x00;
    assert_eq!(io(&mut t, &ws, &zero).kind, MediumIoKind::WriteZeroes);
    // NDOB: no Data-Out block at all.
    ws[1] = 0x09;
    assert!(matches!(
        io(&mut t, &ws, &[]).kind,
        MediumIoKind::Discard(_)
    ));
    // WRITE SAME 10 with UNMAP.
    let ws10 = [0x41, 0x08, 0, 0, 0, 1, 0, 0, 2, 0];
    assert_eq!(
        io(&mut t, &ws10, &zero).kind,
        MediumIoKind::Discard(vec![(512, 1024)])
    );
    ws[1] = 0x08;
    // A non-zero block cannot be expressed.
    let mut pattern = zero;
    pattern[7] = 1;
    assert_eq!(
        check_out(&mut t, 0, &ws, &pattern),
        Sense::INVALID_FIELD_IN_PARAMETER_LIST
    );
    assert_eq!(
        check_out(&mut t, 0, &ws, &zero[..100]),
        Sense::DATA_PHASE_ERROR
    );
    // Zero blocks (WSNZ) and more than the maximum write same length.
    ws[13] = 0;
    assert_eq!(
        check_out(&mut t, 0, &ws, &zero),
        Sense::INVALID_FIELD_IN_CDB
    );
    ws[10..14].copy_from_slice(&((GIB / 512) as u32 + 1).to_be_bytes());
    assert_eq!(
        check_out(&mut t, 0, &ws, &zero),
        Sense::INVALID_FIELD_IN_CDB
    );
    ws[10..14].copy_from_slice(&2u32.to_be_bytes());
    ws[2..10].copy_from_slice(&(GIB / 512 - 1).to_be_bytes());
    assert_eq!(check_out(&mut t, 0, &ws, &zero), Sense::LBA_OUT_OF_RANGE);

    // Without discard=on, UNMAP still writes zeroes.
    let mut p = params(GIB, 512);
    p.discard = false;
    let mut t = disk_target(p);
    assert_eq!(io(&mut t, &ws10, &zero).kind, MediumIoKind::WriteZeroes);
}

fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let bd = (descs.len() * 16) as u16;
    let mut v = (bd + 6).to_be_bytes().to_vec();
    v.extend_from_slice(&bd.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for (lba, n) in descs {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

fn unmap_cdb(len: usize) -> [u8; 10] {
    let l = (len as u16).to_be_bytes();
    [0x42, 0, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

#[test]
fn unmap() {
    let mut t = disk_target(params(GIB, 512));
    let list = unmap_list(&[(8, 8), (100, 0), (0, 1)]);
    assert_eq!(
        io(&mut t, &unmap_cdb(list.len()), &list),
        MediumIo {
            kind: MediumIoKind::Discard(vec![(4096, 4096), (0, 512)]),
            offset: 0,
            len: 8192,
            fua: false
        }
    );
    // Empty parameter list, or only empty descriptors: nothing to do.
    assert!(data(&mut t, 0, &unmap_cdb(0)).is_empty());
    let list = unmap_list(&[(5, 0)]);
    assert!(complete(run(&mut t, 0, &unmap_cdb(list.len()), &list))
        .data_in
        .is_empty());
    // Errors.
    assert_eq!(
        check_out(&mut t, 0, &unmap_cdb(4), &[0; 4]),
        Sense::PARAMETER_LIST_LENGTH_ERROR
    );
    let list = unmap_list(&[(GIB / 512 - 1, 2)]);
    assert_eq!(
        check_out(&mut t, 0, &unmap_cdb(list.len()), &list),
        Sense::LBA_OUT_OF_RANGE
    );
    let list = unmap_list(&vec![(0, 1); 256]);
    assert_eq!(
        check_out(&mut t, 0, &unmap_cdb(list.len()), &list),
        Sense::INVALID_FIELD_IN_PARAMETER_LIST
    );
    let list = unmap_list(&[(0, 1)]);
    assert_eq!(
        check_out(&mut t, 0, &unmap_cdb(list.len()), &list[..20]),
        Sense::DATA_PHASE_ERROR
    );
    let mut anchor = unmap_cdb(list.len());
    anchor[1] = 1;
    assert_eq!(
        check_out(&mut t, 0, &anchor, &list),
        Sense::INVALID_FIELD_IN_CDB
    );

    let mut p = params(GIB, 512);
    p.discard = false;
    let mut t = disk_target(p);
    assert_eq!(
        check_out(&mut t, 0, &unmap_cdb(list.len()), &list),
        Sense::INVALID_OPCODE
    );
}

// ---- MODE SENSE / SELECT ----

fn caching_page(wce: bool) -> Vec<u8> {
    let mut p = vec![0x08, 0x12, if wce { 0x04 } else { 0 }];
    p.resize(20, 0);
    p
}

#[test]
fn mode_sense_caching_page() {
    let mut t = disk_target(params(GIB, 512));
    // DBD 0: header, 8-byte block descriptor, page.
    let mut want = vec![31, 0, 0x10, 8, 0x00, 0x20, 0x00, 0x00, 0, 0x00, 0x02, 0x00];
    want.extend_from_slice(&caching_page(true));
    assert_eq!(data(&mut t, 0, &[0x1a, 0x00, 0x08, 0, 255, 0]), want);
    // DBD 1.
    let mut want = vec![23, 0, 0x10, 0];
    want.extend_from_slice(&caching_page(true));
    assert_eq!(data(&mut t, 0, &[0x1a, 0x08, 0x08, 0, 255, 0]), want);
    // Truncated to the allocation length.
    assert_eq!(data(&mut t, 0, &[0x1a, 0x08, 0x08, 0, 4, 0]), want[..4]);
    // Changeable values: only WCE.
    assert_eq!(
        data(&mut t, 0, &[0x1a, 0x08, 0x48, 0, 255, 0])[4..],
        caching_page(true)
    );
    // Saved values are not supported; unknown page.
    let s = check(&mut t, 0, &[0x1a, 0x08, 0xc8, 0, 255, 0]);
    assert_eq!((s.key, s.asc), (0x05, 0x39));
    assert_eq!(
        check(&mut t, 0, &[0x1a, 0x08, 0x1c, 0, 255, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check(&mut t, 0, &[0x1a, 0x08, 0x08, 1, 255, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
}

#[test]
fn mode_sense_10_all_pages() {
    let mut t = disk_target(params(GIB, 512));
    let d = data(&mut t, 0, &[0x5a, 0x00, 0x3f, 0, 0, 0, 0, 0x01, 0x00, 0]);
    let mut want = vec![
        0, 46, 0, 0x10, 0, 0, 0, 8, 0x00, 0x20, 0x00, 0x00, 0, 0x00, 0x02, 0x00,
    ];
    want.extend_from_slice(&caching_page(true));
    want.extend_from_slice(&[0x0a, 0x0a, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(d, want);
    // 0x3f/0xff (all subpages) is the same here.
    assert_eq!(
        data(&mut t, 0, &[0x5a, 0x00, 0x3f, 0xff, 0, 0, 0, 0x01, 0x00, 0]),
        want
    );
    // LLBAA: long LBA block descriptor.
    let d = data(&mut t, 0, &[0x5a, 0x10, 0x0a, 0, 0, 0, 0, 0x01, 0x00, 0]);
    let mut want = vec![0, 34, 0, 0x10, 1, 0, 0, 16];
    want.extend_from_slice(&(GIB / 512).to_be_bytes());
    want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x02, 0x00]);
    want.extend_from_slice(&[0x0a, 0x0a, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(d, want);
}

#[test]
fn mode_select_write_cache() {
    let mut t = disk_target(params(GIB, 512));
    // MODE SELECT 6 with a block descriptor and the caching page, WCE off.
    let mut list = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x02, 0x00];
    list.extend_from_slice(&caching_page(false));
    let cdb = [0x15, 0x10, 0, 0, list.len() as u8, 0];
    assert!(complete(run(&mut t, 0, &cdb, &list)).data_in.is_empty());
    assert_eq!(data(&mut t, 0, &[0x1a, 0x08, 0x08, 0, 255, 0])[6], 0);
    let d = t.unit_mut(0).and_then(LogicalUnit::as_disk_mut).unwrap();
    assert!(!d.write_cache_enabled());
    assert_eq!((d.blocks(), d.block_size()), (GIB / 512, 512));
    // With the cache off, writes are FUA.
    assert!(io(&mut t, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512]).fua);
    // MODE SELECT 10 turns it back on; the PS bit is ignored.
    let mut list = vec![0, 0, 0, 0, 0, 0, 0, 0];
    let mut page = caching_page(true);
    page[0] |= 0x80;
    list.extend_from_slice(&page);
    let cdb = [0x55, 0x10, 0, 0, 0, 0, 0, 0, list.len() as u8, 0];
    assert!(complete(run(&mut t, 0, &cdb, &list)).data_in.is_empty());
    assert_eq!(data(&mut t, 0, &[0x1a, 0x08, 0x08, 0, 255, 0])[6], 0x04);
    // Changing a bit that is not changeable, another block size, an unknown page.
    let mut bad = list.clone();
    bad[8 + 2] |= 0x01; // RCD
    let s = check_out(&mut t, 0, &cdb, &bad);
    assert_eq!(s, Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    let mut list6 = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0x00];
    list6.extend_from_slice(&caching_page(true));
    let cdb6 = [0x15, 0x10, 0, 0, list6.len() as u8, 0];
    assert_eq!(
        check_out(&mut t, 0, &cdb6, &list6),
        Sense::INVALID_FIELD_IN_PARAMETER_LIST
    );
    let unknown = [0, 0, 0, 0, 0x1c, 2, 0, 0];
    assert_eq!(
        check_out(&mut t, 0, &[0x15, 0x10, 0, 0, 8, 0], &unknown),
        Sense::INVALID_FIELD_IN_PARAMETER_LIST
    );
    // Truncated page; save pages; short Data-Out.
    assert_eq!(
        check_out(
            &mut t,
            0,
            &[0x15, 0x10, 0, 0, 8, 0],
            &[0, 0, 0, 0, 0x08, 0x12, 0, 0]
        ),
        Sense::PARAMETER_LIST_LENGTH_ERROR
    );
    assert_eq!(
        check_out(&mut t, 0, &[0x15, 0x11, 0, 0, 0, 0], &[]),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check_out(&mut t, 0, &[0x15, 0x10, 0, 0, 20, 0], &[0; 4]),
        Sense::DATA_PHASE_ERROR
    );
}

// ---- REPORT LUNS and missing LUNs ----

fn report_luns(alloc: u32) -> [u8; 12] {
    let a = alloc.to_be_bytes();
    [0xa0, 0, 0, 0, 0, 0, a[0], a[1], a[2], a[3], 0, 0]
}

#[test]
fn report_luns_lists_units() {
    let mut t = ScsiTarget::new();
    for lun in [0, 1, 300] {
        let unit = DiskUnit::new(params(GIB, 512)).unwrap();
        t.attach(lun, LogicalUnit::Disk(unit)).unwrap();
    }
    let want = [
        0, 0, 0, 24, 0, 0, 0, 0, // header
        0, 0, 0, 0, 0, 0, 0, 0, // LUN 0
        0, 1, 0, 0, 0, 0, 0, 0, // LUN 1
        0x41, 0x2c, 0, 0, 0, 0, 0, 0, // LUN 300, flat space addressing
    ];
    assert_eq!(data(&mut t, 0, &report_luns(4096)), want);
    // Any LUN may be asked, even one without a unit.
    assert_eq!(data(&mut t, 7, &report_luns(4096)), want);
    // Small allocation lengths still start with the full list length.
    assert_eq!(data(&mut t, 0, &report_luns(16)), want[..16]);
    assert_eq!(data(&mut t, 0, &report_luns(4)), want[..4]);
    assert_eq!(
        check(&mut t, 0, &report_luns(3)),
        Sense::INVALID_FIELD_IN_CDB
    );
    // Well-known LUNs only: none.
    let mut wk = report_luns(64);
    wk[2] = 1;
    assert_eq!(data(&mut t, 0, &wk), [0; 8]);
    wk[2] = 0x42;
    assert_eq!(check(&mut t, 0, &wk), Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(
        check(&mut t, 0, &report_luns(64)[..6]),
        Sense::INVALID_FIELD_IN_CDB
    );
    // An empty target.
    assert_eq!(data(&mut ScsiTarget::new(), 0, &report_luns(64)), [0; 8]);
}

#[test]
fn missing_lun() {
    let mut t = disk_target(params(GIB, 512));
    let d = data(&mut t, 5, &inquiry(false, 0, 36));
    assert_eq!(d.len(), 36);
    assert_eq!(d[..5], [0x7f, 0, 6, 0x12, 31]);
    assert_eq!(data(&mut t, 5, &inquiry(true, 0, 36)), [0x7f, 0, 0, 1, 0]);
    assert_eq!(
        check(&mut t, 5, &inquiry(true, 0x80, 36)),
        Sense::INVALID_FIELD_IN_CDB
    );
    let s = check(&mut t, 5, &[0; 6]);
    assert_eq!((s.key, s.asc, s.ascq), (0x05, 0x25, 0x00));
    assert_eq!(
        data(&mut t, 5, &[0x03, 0, 0, 0, 18, 0]),
        Sense::LUN_NOT_SUPPORTED.fixed_format()
    );
    assert_eq!(
        t.io_done(5, &io_read(0, 512), Ok(())),
        Completion::check(Sense::LUN_NOT_SUPPORTED)
    );
}

#[test]
fn attach_detach() {
    let mut t = ScsiTarget::new();
    let unit = || LogicalUnit::Disk(DiskUnit::new(params(GIB, 512)).unwrap());
    t.attach(2, unit()).unwrap();
    assert_eq!(t.attach(2, unit()), Err(ScsiError::LunInUse(2)));
    assert_eq!(
        t.attach(0x4000, unit()),
        Err(ScsiError::LunOutOfRange(0x4000))
    );
    t.attach(MAX_LUN, unit()).unwrap();
    assert_eq!(t.luns(), [2, MAX_LUN]);
    assert!(matches!(t.detach(2), Some(LogicalUnit::Disk(_))));
    assert!(t.detach(2).is_none());
    assert_eq!(t.luns(), [MAX_LUN]);
}

// ---- malformed CDBs ----

#[test]
fn malformed_cdbs() {
    let mut t = disk_target(params(GIB, 512));
    assert_eq!(check(&mut t, 0, &[]), Sense::INVALID_OPCODE);
    // A 16-byte opcode in a 6-byte buffer.
    assert_eq!(
        check(&mut t, 0, &[0x88, 0, 0, 0, 0, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(check(&mut t, 0, &[0x12]), Sense::INVALID_FIELD_IN_CDB);
    // Unknown, variable-length and vendor-specific opcodes.
    for opcode in [0x04, 0x7f, 0xc0, 0xff, 0x43, 0x46] {
        let mut cdb = [0u8; 16];
        cdb[0] = opcode;
        assert_eq!(check(&mut t, 0, &cdb), Sense::INVALID_OPCODE, "{opcode:#x}");
    }
    // Longer buffers than the opcode needs are fine (virtio-scsi sends 32 bytes).
    let mut long = [0u8; 32];
    long[0] = 0x25;
    assert_eq!(data(&mut t, 0, &long).len(), 8);
}

// ---- io_done ----

fn io_read(offset: u64, len: u64) -> MediumIo {
    MediumIo {
        kind: MediumIoKind::Read,
        offset,
        len,
        fua: false,
    }
}

#[test]
fn io_completion() {
    let mut t = disk_target(params(GIB, 512));
    let read = io(&mut t, &[0x28, 0, 0, 0, 0, 9, 0, 0, 1, 0], &[]);
    assert_eq!(t.io_done(0, &read, Ok(())), Completion::good());
    let c = t.io_done(0, &read, Err(IoFailure::Medium));
    assert_eq!(c.status, ScsiStatus::CheckCondition);
    assert_eq!(c.sense, Some(Sense::UNRECOVERED_READ_ERROR.with_info(9)));
    // REQUEST SENSE reports it afterwards.
    let d = data(&mut t, 0, &[0x03, 0, 0, 0, 18, 0]);
    assert_eq!(
        d[..14],
        [0xf0, 0, 0x03, 0, 0, 0, 9, 10, 0, 0, 0, 0, 0x11, 0]
    );
    let write = io(&mut t, &[0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0], &[0; 512]);
    assert_eq!(
        t.io_done(0, &write, Err(IoFailure::Medium)).sense,
        Some(Sense::WRITE_ERROR.with_info(1))
    );
    let s = t.io_done(0, &write, Err(IoFailure::NoSpace)).sense.unwrap();
    assert_eq!((s.key, s.asc, s.ascq), (0x07, 0x27, 0x07));
    let s = t.io_done(0, &write, Err(IoFailure::Other)).sense.unwrap();
    assert_eq!((s.key, s.asc, s.ascq), (0x04, 0x44, 0x00));
}

#[test]
fn disk_misc_commands() {
    let mut t = disk_target(params(GIB, 512));
    assert!(data(&mut t, 0, &[0x1b, 0, 0, 0, 1, 0]).is_empty());
    assert!(data(&mut t, 0, &[0x1e, 0, 0, 0, 1, 0]).is_empty());
    // VERIFY checks the range only; BYTCHK is not supported.
    assert!(data(&mut t, 0, &[0x2f, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0]).is_empty());
    assert!(data(&mut t, 0, &[0xaf, 0, 0, 0x1f, 0xff, 0xff, 0, 0, 0, 1, 0, 0]).is_empty());
    let mut v16 = [0u8; 16];
    v16[0] = 0x8f;
    v16[9] = 0x20;
    v16[2..10].copy_from_slice(&(GIB / 512).to_be_bytes());
    v16[13] = 1;
    assert_eq!(check(&mut t, 0, &v16), Sense::LBA_OUT_OF_RANGE);
    assert_eq!(
        check(&mut t, 0, &[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 1, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
}

// ---- CD/DVD ----

const MIB: u64 = 1 << 20;

fn cd(t: &mut ScsiTarget) -> &mut CdUnit {
    t.unit_mut(0).and_then(LogicalUnit::as_cd_mut).unwrap()
}

/// A CD unit with a `size`-byte medium and the attentions consumed.
fn loaded_cd(size: u64) -> ScsiTarget {
    let mut t = cd_target();
    cd(&mut t).insert(size);
    assert_eq!(check(&mut t, 0, &[0; 6]), Sense::MEDIUM_CHANGED);
    data(&mut t, 0, &[0; 6]);
    t
}

fn gesn() -> [u8; 10] {
    [0x4a, 0x01, 0, 0, 0x10, 0, 0, 0, 8, 0]
}

#[test]
fn cd_inquiry() {
    let mut t = cd_target();
    let d = data(&mut t, 0, &inquiry(false, 0, 36));
    assert_eq!(d[..8], [0x05, 0x80, 0x05, 0x12, 31, 0, 0, 0x02]);
    assert_eq!(d[16..32], pad::<16>("CD-ROM"));
    assert_eq!(
        data(&mut t, 0, &inquiry(true, 0, 36)),
        [5, 0, 0, 3, 0x00, 0x80, 0x83]
    );
    assert_eq!(
        data(&mut t, 0, &inquiry(true, 0x83, 36)),
        [
            5, 0x83, 0, 18, 0x02, 0x01, 0, 14, b'F', b'E', b'R', b'R', b'Y', b' ', b' ', b' ',
            b'C', b'D', b'0', b'0', b'0', b'1'
        ]
    );
    assert_eq!(
        check(&mut t, 0, &inquiry(true, 0xb0, 36)),
        Sense::INVALID_FIELD_IN_CDB
    );
}

#[test]
fn cd_empty_drive_not_ready() {
    let mut t = cd_target();
    let s = check(&mut t, 0, &[0; 6]);
    assert_eq!((s.key, s.asc, s.ascq), (0x02, 0x3a, 0x00));
    for cdb in [
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
        &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        &[0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0],
        &[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0],
    ] {
        assert_eq!(check(&mut t, 0, cdb), Sense::MEDIUM_NOT_PRESENT);
    }
    // REQUEST SENSE reports the condition even with nothing stored.
    data(&mut t, 0, &[0x1b, 0, 0, 0, 0, 0]);
    assert_eq!(
        data(&mut t, 0, &[0x03, 0, 0, 0, 18, 0])[12..14],
        [0x3a, 0x00]
    );
    // These work without a medium.
    assert_eq!(
        data(&mut t, 0, &[0x46, 0, 0, 0, 0, 0, 0, 0, 8, 0]),
        [0, 0, 0, 76, 0, 0, 0, 0]
    );
    assert_eq!(data(&mut t, 0, &gesn()), [0, 6, 4, 0x10, 0, 0, 0, 0]);
    assert_eq!(
        data(&mut t, 0, &[0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]),
        [0; 8]
    );
}

#[test]
fn cd_insert_attention_and_events() {
    let mut t = ScsiTarget::new();
    t.attach(0, LogicalUnit::Cd(CdUnit::new(cd_params())))
        .unwrap();
    assert!(!cd(&mut t).is_loaded());
    cd(&mut t).insert(600 * MIB);
    assert!(cd(&mut t).is_loaded());
    // GET EVENT STATUS NOTIFICATION is not blocked by unit attentions.
    assert_eq!(data(&mut t, 0, &gesn()), [0, 6, 4, 0x10, 2, 0x02, 0, 0]);
    assert_eq!(data(&mut t, 0, &gesn()), [0, 6, 4, 0x10, 0, 0x02, 0, 0]);
    // Power on covers the medium inserted before the guest looked.
    assert_eq!(check(&mut t, 0, &[0; 6]), Sense::POWER_ON_RESET);
    data(&mut t, 0, &[0; 6]);
    // A later insert: MEDIUM CHANGED once.
    cd(&mut t).eject();
    cd(&mut t).insert(600 * MIB);
    let s = check(&mut t, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!((s.key, s.asc, s.ascq), (0x06, 0x28, 0x00));
    data(&mut t, 0, &[0; 6]);
    assert_eq!(data(&mut t, 0, &gesn())[4..6], [2, 0x02]);
    // Not polled: invalid; no media class asked: No Event Available.
    assert_eq!(
        check(&mut t, 0, &[0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        data(&mut t, 0, &[0x4a, 1, 0, 0, 0x02, 0, 0, 0, 8, 0]),
        [0, 2, 0x80, 0x10]
    );
    // Host eject: removal event, then empty.
    cd(&mut t).eject();
    assert_eq!(data(&mut t, 0, &gesn()), [0, 6, 4, 0x10, 3, 0, 0, 0]);
    assert_eq!(check(&mut t, 0, &[0; 6]), Sense::MEDIUM_NOT_PRESENT);
}

#[test]
fn cd_eject_with_prevent() {
    let mut t = loaded_cd(600 * MIB);
    let eject = [0x1b, 0, 0, 0, 0x02, 0];
    data(&mut t, 0, &[0x1e, 0, 0, 0, 1, 0]);
    assert!(cd(&mut t).removal_prevented());
    let s = check(&mut t, 0, &eject);
    assert_eq!((s.key, s.asc, s.ascq), (0x05, 0x53, 0x02));
    assert!(cd(&mut t).is_loaded());
    // The host's polite request becomes an eject-request event.
    assert!(!cd(&mut t).request_eject());
    assert_eq!(data(&mut t, 0, &gesn())[4..6], [1, 0x02]);
    // Capabilities page shows the lock state.
    assert_eq!(
        data(&mut t, 0, &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 64, 0])[8 + 6],
        0x2b
    );
    data(&mut t, 0, &[0x1e, 0, 0, 0, 0, 0]);
    data(&mut t, 0, &eject);
    assert!(cd(&mut t).tray_open());
    assert_eq!(data(&mut t, 0, &gesn())[4..6], [3, 0x01]);
    let s = check(&mut t, 0, &[0; 6]);
    assert_eq!((s.key, s.asc, s.ascq), (0x02, 0x3a, 0x02));
    data(&mut t, 0, &[0x1e, 0, 0, 0, 0, 0]);
    assert_eq!(
        data(&mut t, 0, &[0x03, 0, 0, 0, 18, 0])[12..14],
        [0x3a, 0x02]
    );
    assert_eq!(
        data(&mut t, 0, &[0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0])[1],
        0x10
    );
    // Closing the tray brings the medium back with a unit attention.
    data(&mut t, 0, &[0x1b, 0, 0, 0, 0x03, 0]);
    assert_eq!(check(&mut t, 0, &[0; 6]), Sense::MEDIUM_CHANGED);
    data(&mut t, 0, &[0; 6]);
    // A reset allows removal again.
    data(&mut t, 0, &[0x1e, 0, 0, 0, 1, 0]);
    t.reset();
    assert!(!cd(&mut t).removal_prevented());
    assert!(cd(&mut t).request_eject());
    assert!(!cd(&mut t).has_medium());
}

#[test]
fn cd_capacity_and_reads() {
    let mut t = loaded_cd(600 * MIB);
    assert_eq!(
        data(&mut t, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        [0x00, 0x04, 0xaf, 0xff, 0x00, 0x00, 0x08, 0x00]
    );
    let read = |offset, len| MediumIo {
        kind: MediumIoKind::Read,
        offset,
        len,
        fua: false,
    };
    assert_eq!(
        io(&mut t, &[0x28, 0, 0, 0, 0, 16, 0, 0, 2, 0], &[]),
        read(32768, 4096)
    );
    assert_eq!(
        io(&mut t, &[0xa8, 0, 0, 0, 0, 16, 0, 0, 0, 1, 0, 0], &[]),
        read(32768, 2048)
    );
    assert_eq!(
        check(&mut t, 0, &[0x28, 0, 0, 0x04, 0xaf, 0xff, 0, 0, 2, 0]),
        Sense::LBA_OUT_OF_RANGE
    );
    // READ CD, user data only.
    assert_eq!(
        io(&mut t, &[0xbe, 0, 0, 0, 0, 16, 0, 0, 1, 0x10, 0, 0], &[]),
        read(32768, 2048)
    );
    assert!(data(&mut t, 0, &[0xbe, 0, 0, 0, 0, 16, 0, 0, 1, 0, 0, 0]).is_empty());
    assert_eq!(
        check(&mut t, 0, &[0xbe, 0, 0, 0, 0, 16, 0, 0, 1, 0xf8, 0, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check(&mut t, 0, &[0xbe, 0x04, 0, 0, 0, 16, 0, 0, 1, 0x10, 0, 0]).asc,
        0x64
    );
    // Writes are not a CD-ROM command.
    assert_eq!(
        check_out(&mut t, 0, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 2048]),
        Sense::INVALID_OPCODE
    );
    assert!(data(
        &mut t,
        0,
        &[0xbb, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0]
    )
    .is_empty());
}

#[test]
fn cd_read_toc_600mb() {
    // 600 MiB: 307200 blocks.
    let mut t = loaded_cd(600 * MIB);
    // Format 0, MSF: track 1 at 00:02:00, lead-out at 307200 + 150 frames = 68:18:00.
    assert_eq!(
        data(&mut t, 0, &[0x43, 0x02, 0, 0, 0, 0, 0, 0x03, 0x24, 0]),
        [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 2, 0, 0, 0x14, 0xaa, 0, 0, 68, 18, 0]
    );
    // LBA addressing.
    assert_eq!(
        data(&mut t, 0, &[0x43, 0, 0, 0, 0, 0, 0, 0x03, 0x24, 0]),
        [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x14, 0xaa, 0, 0x00, 0x04, 0xb0, 0x00]
    );
    // Starting at the lead-out; allocation length 4.
    assert_eq!(
        data(&mut t, 0, &[0x43, 0x02, 0, 0, 0, 0, 0xaa, 0, 0xff, 0]),
        [0, 10, 1, 1, 0, 0x14, 0xaa, 0, 0, 68, 18, 0]
    );
    assert_eq!(
        data(&mut t, 0, &[0x43, 0x02, 0, 0, 0, 0, 0, 0, 4, 0]),
        [0, 18, 1, 1]
    );
    assert_eq!(
        check(&mut t, 0, &[0x43, 0, 0, 0, 0, 0, 2, 0, 0xff, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    // Format 1: session info, in byte 2 or (SFF-8020i) in the control byte.
    let session = [0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 2, 0];
    assert_eq!(
        data(&mut t, 0, &[0x43, 0x02, 1, 0, 0, 0, 0, 0, 12, 0]),
        session
    );
    assert_eq!(
        data(&mut t, 0, &[0x43, 0x02, 0, 0, 0, 0, 0, 0, 12, 0x40]),
        session
    );
    assert_eq!(
        check(&mut t, 0, &[0x43, 0, 2, 0, 0, 0, 0, 0, 12, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    // A DVD longer than MSF can say saturates.
    let mut t = loaded_cd(8 << 30);
    let d = data(&mut t, 0, &[0x43, 0x02, 0, 0, 0, 0, 0xaa, 0, 0xff, 0]);
    assert_eq!(d[8..12], [0, 255, 59, 74]);
}

#[test]
fn cd_get_configuration() {
    let mut t = loaded_cd(600 * MIB);
    let want: Vec<u8> = [
        &[0, 0, 0, 76, 0, 0, 0, 0x08][..],
        &[0, 0, 0x03, 8, 0, 0x10, 0, 0, 0, 0x08, 1, 0], // profile list, CD-ROM current
        &[0, 1, 0x0b, 8, 0, 0, 0, 1, 1, 0, 0, 0],       // core, SCSI, DBE
        &[0, 2, 0x07, 4, 2, 0, 0, 0],                   // morphing, OCEvent
        &[0, 3, 0x03, 4, 0x39, 0, 0, 0],                // removable medium
        &[0, 0x10, 0x01, 8, 0, 0, 8, 0, 0, 1, 0, 0],    // random readable
        &[0, 0x1d, 0x01, 0],                            // multi-read
        &[0, 0x1e, 0x09, 4, 0, 0, 0, 0],                // CD read
        &[0, 0x1f, 0x00, 0],                            // DVD read, not current
        &[1, 0, 0x03, 0],                               // power management
    ]
    .concat();
    assert_eq!(data(&mut t, 0, &[0x46, 0, 0, 0, 0, 0, 0, 0x01, 0, 0]), want);
    // RT 1 from 0x10: current features only.
    let d = data(&mut t, 0, &[0x46, 1, 0, 0x10, 0, 0, 0, 0x01, 0, 0]);
    assert_eq!(
        d[8..],
        [&want[48..60], &want[60..64], &want[64..72], &want[76..80]].concat()
    );
    // RT 2: one feature.
    let d = data(&mut t, 0, &[0x46, 2, 0, 0x03, 0, 0, 0, 0x01, 0, 0]);
    assert_eq!(
        d,
        [&[0, 0, 0, 12, 0, 0, 0, 0x08][..], &want[40..48]].concat()
    );
    assert_eq!(
        check(&mut t, 0, &[0x46, 3, 0, 0, 0, 0, 0, 0x01, 0, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    // Allocation length 8: header only.
    assert_eq!(
        data(&mut t, 0, &[0x46, 0, 0, 0, 0, 0, 0, 0, 8, 0]),
        want[..8]
    );

    // A medium over 80 minutes of CD is a DVD-ROM.
    let mut t = loaded_cd(4 << 30);
    let d = data(&mut t, 0, &[0x46, 0, 0, 0, 0, 0, 0, 0x01, 0, 0]);
    assert_eq!(d[6..8], [0, 0x10]);
    assert_eq!(d[12..20], [0, 0x10, 1, 0, 0, 0x08, 0, 0]);
    assert_eq!(d[48..60], [0, 0x10, 0x01, 8, 0, 0, 8, 0, 0, 16, 0, 0]);
    assert_eq!(d[60..64], [0, 0x1d, 0x00, 0]);
    assert_eq!(d[72..76], [0, 0x1f, 0x01, 0]);
}

#[test]
fn cd_disc_information_and_mode_sense() {
    let mut t = loaded_cd(600 * MIB);
    let mut want = vec![0, 32, 0x0e, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    want.extend_from_slice(&[0xff; 8]);
    want.extend_from_slice(&[0; 10]);
    assert_eq!(data(&mut t, 0, &[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0]), want);
    assert_eq!(
        check(&mut t, 0, &[0x51, 1, 0, 0, 0, 0, 0, 0, 34, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    let page = [
        0x2a, 0x14, 0x3b, 0, 0x70, 0, 0x29, 0, 0x1b, 0x80, 0, 0, 0x02, 0x00, 0x1b, 0x80, 0, 0, 0,
        0, 0, 0,
    ];
    let mut want = vec![0, 28, 0, 0, 0, 0, 0, 0];
    want.extend_from_slice(&page);
    assert_eq!(
        data(&mut t, 0, &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 255, 0]),
        want
    );
    assert_eq!(
        data(&mut t, 0, &[0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 255, 0]),
        want
    );
    let mut want6 = vec![25, 0, 0, 0];
    want6.extend_from_slice(&page);
    assert_eq!(data(&mut t, 0, &[0x1a, 0, 0x2a, 0, 255, 0]), want6);
    assert_eq!(
        check(&mut t, 0, &[0x5a, 0, 0x08, 0, 0, 0, 0, 0, 255, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
}

#[test]
fn long_and_odd_identity_strings() {
    let mut p = params(GIB, 512);
    p.serial = "A".repeat(300);
    p.vendor = "VENDOR-NAME-TOO-LONG";
    p.product = "caf\u{e9}\n";
    p.wwn = 0;
    let mut t = disk_target(p);
    let d = data(&mut t, 0, &inquiry(false, 0, 36));
    assert_eq!(d[8..16], *b"VENDOR-N");
    assert_eq!(d[16..32], pad::<16>("caf   "));
    let d = data(&mut t, 0, &inquiry(true, 0x80, 1024));
    assert_eq!(d[2..4], [0, 240]);
    let d = data(&mut t, 0, &inquiry(true, 0x83, 1024));
    assert_eq!(d[2..8], [0, 252, 0x02, 0x01, 0, 248]);
    assert_eq!(d.len(), 256);
}

#[test]
fn cd_track_information_and_dvd_structures() {
    let mut t = loaded_cd(600 * MIB);
    let mut want = vec![0, 34, 1, 1, 0, 0x04, 0x01, 0];
    want.extend_from_slice(&[0; 16]);
    want.extend_from_slice(&307200u32.to_be_bytes());
    want.extend_from_slice(&307199u32.to_be_bytes());
    want.extend_from_slice(&[0; 4]);
    assert_eq!(data(&mut t, 0, &[0x52, 1, 0, 0, 0, 1, 0, 0, 36, 0]), want);
    assert_eq!(
        data(&mut t, 0, &[0x52, 0, 0, 0, 0x10, 0, 0, 0, 36, 0]),
        want
    );
    assert_eq!(
        data(&mut t, 0, &[0x52, 2, 0, 0, 0, 1, 0, 0, 8, 0]),
        want[..8]
    );
    assert_eq!(
        check(&mut t, 0, &[0x52, 1, 0, 0, 0, 2, 0, 0, 36, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check(&mut t, 0, &[0x52, 0, 0, 0x04, 0xb0, 0, 0, 0, 36, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    // DVD structures of a CD: incompatible format.
    let s = check(&mut t, 0, &[0xad, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x04, 0, 0]);
    assert_eq!((s.key, s.asc, s.ascq), (0x02, 0x30, 0x02));

    let mut t = loaded_cd(4 << 30); // 2097152 blocks
    let d = data(&mut t, 0, &[0xad, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x04, 0, 0]);
    assert_eq!(d.len(), 2052);
    assert_eq!(d[..8], [0x08, 0x02, 0, 0, 0x01, 0x0f, 0x01, 0]);
    assert_eq!(
        d[8..20],
        [0, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0, 0x1f, 0xff, 0xff]
    );
    assert!(d[20..].iter().all(|b| *b == 0));
    assert_eq!(
        data(&mut t, 0, &[0xad, 0, 0, 0, 0, 0, 0, 1, 0, 8, 0, 0]),
        [0, 6, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        data(&mut t, 0, &[0xad, 0, 0, 0, 0, 0, 0, 0xff, 0, 64, 0, 0]),
        [0, 14, 0, 0, 0x00, 0x40, 0x08, 0x04, 0x01, 0x40, 0, 8, 0xff, 0x40, 0, 16]
    );
    assert_eq!(
        check(&mut t, 0, &[0xad, 0, 0, 0, 0, 0, 1, 0, 0, 64, 0, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check(&mut t, 0, &[0xad, 1, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]),
        Sense::INVALID_FIELD_IN_CDB
    );
    cd(&mut t).eject();
    assert_eq!(
        check(&mut t, 0, &[0xad, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]),
        Sense::MEDIUM_NOT_PRESENT
    );
}
