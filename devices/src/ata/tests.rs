//! Every command checked against ACS-3 / ATA8-APT, register by register.

use super::*;
use crate::scsi::sense_key;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

fn params(size_bytes: u64) -> AtaDiskParams {
    AtaDiskParams {
        size_bytes,
        nonrotational: false,
        discard: true,
        read_only: false,
        model: "FERRY HARDDISK".into(),
        serial: "SN0001".into(),
        firmware: "1.0".into(),
        ncq: true,
    }
}

fn disk(size_bytes: u64) -> AtaDevice {
    AtaDevice::disk(params(size_bytes))
}

fn atapi_params() -> AtapiParams {
    AtapiParams {
        model: "FERRY DVD-ROM".into(),
        serial: "CD0001".into(),
        firmware: "2.5".into(),
    }
}

fn atapi() -> AtaDevice {
    AtaDevice::atapi(atapi_params())
}

/// A command in LBA mode (device bit 6 set, as every modern host sends).
fn tf(command: u8, count: u16, lba: u64) -> Taskfile {
    Taskfile {
        command,
        features: 0,
        count,
        lba,
        device: 0x40,
    }
}

fn with_features(mut t: Taskfile, features: u16) -> Taskfile {
    t.features = features;
    t
}

fn run_out(d: &mut AtaDevice, t: &Taskfile, out: &[u8]) -> AtaResult {
    let mut out = out;
    d.execute(t, &[], &mut out)
}

fn run(d: &mut AtaDevice, t: &Taskfile) -> AtaResult {
    run_out(d, t, &[])
}

fn complete(r: AtaResult) -> AtaCompletion {
    match r {
        AtaResult::Complete(c) => c,
        AtaResult::Io(io) => panic!("unexpected I/O {io:?}"),
    }
}

fn io(r: AtaResult) -> AtaIo {
    match r {
        AtaResult::Io(io) => io,
        AtaResult::Complete(c) => panic!("expected I/O, got {c:?}"),
    }
}

/// Runs `t` and asserts success.
fn ok(d: &mut AtaDevice, t: &Taskfile) -> AtaCompletion {
    let c = complete(run(d, t));
    assert_eq!((c.status, c.error), (0x50, 0), "{t:x?}");
    c
}

/// Runs `t` and asserts it failed with `error`, returning the completion.
fn fails(d: &mut AtaDevice, t: &Taskfile, out: &[u8], error: u8) -> AtaCompletion {
    let c = complete(run_out(d, t, out));
    assert_eq!((c.status, c.error), (0x51, error), "{t:x?}");
    assert!(c.data_in.is_empty());
    c
}

fn abrt(d: &mut AtaDevice, t: &Taskfile) {
    fails(d, t, &[], error::ABRT);
}

fn words(data: &[u8]) -> Vec<u16> {
    assert_eq!(data.len(), 512);
    data.chunks(2)
        .map(|w| u16::from_le_bytes([w[0], w[1]]))
        .collect()
}

fn identify(d: &mut AtaDevice) -> Vec<u16> {
    words(&ok(d, &tf(cmd::IDENTIFY_DEVICE, 0, 0)).data_in)
}

/// An ATA string back to text: each word holds two characters, the first in the high byte.
fn ata_string(w: &[u16]) -> String {
    w.iter()
        .flat_map(|x| x.to_be_bytes())
        .map(char::from)
        .collect()
}

fn sum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn dword(w: &[u16], at: usize) -> u64 {
    u64::from(w[at]) | (u64::from(w[at + 1]) << 16)
}

fn qword(w: &[u16], at: usize) -> u64 {
    (0..4).fold(0, |a, i| a | (u64::from(w[at + i]) << (16 * i)))
}

// ---- IDENTIFY DEVICE ----

#[test]
fn identify_strings_are_byte_swapped_and_space_padded() {
    let mut d = disk(GIB);
    let data = ok(&mut d, &tf(cmd::IDENTIFY_DEVICE, 0, 0)).data_in;
    // Word 27 holds "FE" with 'F' in the high byte: little endian bytes "EF".
    assert_eq!(&data[54..58], b"EFRR");
    let w = words(&data);
    assert_eq!(ata_string(&w[27..47]), format!("{:<40}", "FERRY HARDDISK"));
    assert_eq!(ata_string(&w[10..20]), format!("{:<20}", "SN0001"));
    assert_eq!(ata_string(&w[23..27]), format!("{:<8}", "1.0"));
}

#[test]
fn identify_strings_are_cut_and_cleaned() {
    let mut p = params(GIB);
    p.model = "M".repeat(50);
    p.serial = "é\u{1}x".into();
    let mut d = AtaDevice::disk(p);
    let w = identify(&mut d);
    assert_eq!(ata_string(&w[27..47]), "M".repeat(40));
    // Non-ASCII bytes (2 for é) and control characters become spaces.
    assert_eq!(ata_string(&w[10..20]), format!("{:<20}", "   x"));
}

#[test]
fn identify_caps_28_bit_capacity_of_a_large_disk() {
    let size = 200 * GIB;
    let sectors = size / 512;
    let mut d = disk(size);
    let w = identify(&mut d);
    assert_eq!(dword(&w, 60), 0x0fff_ffff);
    assert_eq!(qword(&w, 100), sectors);
    // Default geometry capped at 16383/16/63; current the same.
    assert_eq!((w[1], w[3], w[6]), (16383, 16, 63));
    assert_eq!((w[54], w[55], w[56]), (16383, 16, 63));
    assert_eq!(dword(&w, 57), 16383 * 16 * 63);
}

#[test]
fn identify_small_disk_capacity_and_geometry() {
    let size = 64 * MIB + 300; // a partial sector is not addressable
    let sectors = 64 * MIB / 512;
    let mut d = disk(size);
    let w = identify(&mut d);
    assert_eq!(dword(&w, 60), sectors);
    assert_eq!(qword(&w, 100), sectors);
    assert_eq!(u64::from(w[1]), sectors / (16 * 63));
}

#[test]
fn identify_checksum_and_fixed_words() {
    let mut d = disk(GIB);
    let data = ok(&mut d, &tf(cmd::IDENTIFY_DEVICE, 0, 0)).data_in;
    assert_eq!(data[510], 0xa5);
    assert_eq!(sum(&data), 0);
    let w = words(&data);
    assert_eq!(w[0], 0x0040);
    assert_eq!(w[47], 0x8010);
    assert_eq!(w[49], 0x0b00);
    assert_eq!(w[53], 0x0007);
    assert_eq!(w[59], 0x0110);
    assert_eq!(w[63] & 0x07, 0x07);
    assert_eq!(w[64], 0x0003);
    assert_eq!(w[80] & 0x0700, 0x0700, "ATA8-ACS, ACS-2, ACS-3");
    // 48-bit (83 bit 10), FLUSH CACHE (EXT) (bits 12, 13), GPL (84/87 bit 5), FUA (bit 6).
    assert_eq!(w[83] & 0x3400, 0x3400);
    assert_eq!(w[86] & 0x3400, 0x3400);
    assert_eq!(w[84] & 0x0060, 0x0060);
    assert_eq!(w[87] & 0x0060, 0x0060);
    assert_eq!(
        w[82] & 0x0029,
        0x0029,
        "SMART, power management, write cache"
    );
    assert_eq!(w[85] & 0x0029, 0x0029);
    assert_eq!(w[88] & 0x7f, 0x7f);
    assert_eq!(w[106], 0x4000);
    assert_eq!(w[222] >> 12, 1, "serial transport");
    // What Linux's ata_id_is_sata() asks: major version 5 or later and word 93 zero. Else a
    // SATA port's device is taken for a bridged parallel drive, limited to 128 KiB transfers.
    assert_eq!(w[93], 0, "hardware reset results, none on a serial device");
    assert!(
        w[80] & 0xffe0 != 0 && w[80] != 0xffff,
        "major version 5 or later"
    );
    assert_eq!(w[76] & 0x0006, 0x0006, "Gen1 and Gen2");
    // READ LOG DMA EXT (119/120 bit 3), valid because 86 bit 15 is set.
    assert_eq!(w[86] & 0x8000, 0x8000);
    assert_eq!((w[119] & 0xc008, w[120] & 0xc008), (0x4008, 0x4008));
}

#[test]
fn identify_follows_trim_rotation_and_ncq_params() {
    let mut d = disk(GIB);
    let w = identify(&mut d);
    assert_eq!(w[169] & 1, 1);
    assert_eq!(w[105], 8);
    assert_eq!(w[217], 7200);
    assert_eq!(w[75], 31);
    assert_eq!(w[76] & 0x0100, 0x0100);

    let mut p = params(GIB);
    p.discard = false;
    p.nonrotational = true;
    p.ncq = false;
    let mut d = AtaDevice::disk(p);
    let w = identify(&mut d);
    assert_eq!(w[169] & 1, 0);
    assert_eq!(w[105], 0);
    assert_eq!(w[217], 1);
    assert_eq!(w[75], 0);
    assert_eq!(w[76] & 0x0100, 0);
}

#[test]
fn write_cache_bit_follows_set_features_and_makes_writes_fua() {
    let mut d = disk(GIB);
    assert!(d.write_cache_enabled());
    assert_eq!(identify(&mut d)[85] & 0x20, 0x20);
    let write = tf(cmd::WRITE_DMA_EXT, 8, 100);
    assert!(!io(run(&mut d, &write)).fua);

    ok(&mut d, &with_features(tf(cmd::SET_FEATURES, 0, 0), 0x82));
    assert!(!d.write_cache_enabled());
    assert_eq!(identify(&mut d)[85] & 0x20, 0);
    for op in [
        cmd::WRITE_DMA,
        cmd::WRITE_DMA_EXT,
        cmd::WRITE_SECTORS,
        cmd::WRITE_SECTORS_EXT,
        cmd::WRITE_MULTIPLE,
        cmd::WRITE_MULTIPLE_EXT,
    ] {
        assert!(io(run(&mut d, &tf(op, 8, 100))).fua, "{op:#x}");
    }
    // Reads are never write-through.
    assert!(!io(run(&mut d, &tf(cmd::READ_DMA_EXT, 8, 100))).fua);

    ok(&mut d, &with_features(tf(cmd::SET_FEATURES, 0, 0), 0x02));
    assert!(d.write_cache_enabled());
    assert_eq!(identify(&mut d)[85] & 0x20, 0x20);
    assert!(!io(run(&mut d, &write)).fua);
}

// ---- reads and writes ----

/// (opcode, 48-bit, write, fua)
const RW: [(u8, bool, bool, bool); 18] = [
    (cmd::READ_SECTORS, false, false, false),
    (cmd::READ_SECTORS_NORETRY, false, false, false),
    (cmd::READ_SECTORS_EXT, true, false, false),
    (cmd::READ_MULTIPLE, false, false, false),
    (cmd::READ_MULTIPLE_EXT, true, false, false),
    (cmd::READ_DMA, false, false, false),
    (cmd::READ_DMA_NORETRY, false, false, false),
    (cmd::READ_DMA_EXT, true, false, false),
    (cmd::WRITE_SECTORS, false, true, false),
    (cmd::WRITE_SECTORS_NORETRY, false, true, false),
    (cmd::WRITE_SECTORS_EXT, true, true, false),
    (cmd::WRITE_MULTIPLE, false, true, false),
    (cmd::WRITE_MULTIPLE_EXT, true, true, false),
    (cmd::WRITE_MULTIPLE_FUA_EXT, true, true, true),
    (cmd::WRITE_DMA, false, true, false),
    (cmd::WRITE_DMA_NORETRY, false, true, false),
    (cmd::WRITE_DMA_EXT, true, true, false),
    (cmd::WRITE_DMA_FUA_EXT, true, true, true),
];

#[test]
fn every_read_write_variant_gives_offset_len_and_fua() {
    let size = 64 * TIB; // 48-bit LBAs up to 2^37
    for (op, ext, write, fua) in RW {
        let mut d = disk(size);
        // 28-bit: LBA bits 24..28 come from the device register, not lba bits 24..
        let mut t = tf(op, 5, 0x12_3456_789a);
        t.device = 0x40 | 0x0b;
        let io = io(run(&mut d, &t));
        let lba = if ext { 0x12_3456_789a } else { 0x0b56_789a };
        assert_eq!(io.offset, lba * 512, "{op:#x}");
        assert_eq!(io.len, 5 * 512, "{op:#x}");
        assert_eq!(io.fua, fua, "{op:#x}");
        assert_eq!(io.ncq_tag, None);
        let kind = if write {
            MediumIoKind::Write
        } else {
            MediumIoKind::Read
        };
        assert_eq!(io.kind, kind, "{op:#x}");
    }
}

#[test]
fn count_zero_means_256_or_65536() {
    let mut d = disk(GIB);
    let io28 = io(run(&mut d, &tf(cmd::READ_DMA, 0, 10)));
    assert_eq!(io28.len, 256 * 512);
    // A 28-bit command ignores the count's high byte: 0x0100 is 0 is 256.
    let io28 = io(run(&mut d, &tf(cmd::WRITE_SECTORS, 0x0100, 10)));
    assert_eq!(io28.len, 256 * 512);
    let io48 = io(run(&mut d, &tf(cmd::READ_DMA_EXT, 0, 10)));
    assert_eq!(io48.len, 65536 * 512);
    let io48 = io(run(&mut d, &tf(cmd::WRITE_DMA_EXT, 0x0100, 10)));
    assert_eq!(io48.len, 256 * 512);
}

#[test]
fn chs_addressing_uses_the_current_geometry() {
    let mut d = disk(GIB);
    // Device bit 6 clear: cylinder 2 (lba mid/high), head 3, sector 4.
    let t = Taskfile {
        command: cmd::READ_SECTORS,
        features: 0,
        count: 1,
        lba: (2 << 8) | 4,
        device: 0xa0 | 3,
    };
    assert_eq!(io(run(&mut d, &t)).offset, ((2 * 16 + 3) * 63 + 3) * 512);

    // Sector 0 does not exist; neither does sector 64 or a cylinder past the last.
    for lba in [2 << 8, (2 << 8) | 64, (16383 << 8) | 1] {
        let t = Taskfile { lba, ..t };
        fails(&mut d, &t, &[], error::IDNF);
    }

    // INITIALIZE DEVICE PARAMETERS: 4 heads (device 3), 32 sectors per track.
    let init = Taskfile {
        device: 0xa0 | 3,
        ..tf(cmd::INITIALIZE_DEVICE_PARAMETERS, 32, 0)
    };
    ok(&mut d, &init);
    let w = identify(&mut d);
    let cylinders = (GIB / 512 / (4 * 32)).min(0xffff);
    assert_eq!((u64::from(w[54]), w[55], w[56]), (cylinders, 4, 32));
    assert_eq!(dword(&w, 57), cylinders * 4 * 32);
    // Default geometry is unchanged.
    assert_eq!((w[3], w[6]), (16, 63));
    assert_eq!(io(run(&mut d, &t)).offset, ((2 * 4 + 3) * 32 + 3) * 512);
    // Zero sectors per track is not a geometry.
    abrt(&mut d, &tf(cmd::INITIALIZE_DEVICE_PARAMETERS, 0, 0));
    // Reset restores the default.
    d.reset();
    assert_eq!(identify(&mut d)[55], 16);
}

#[test]
fn idnf_past_the_end_names_the_first_bad_sector() {
    let sectors = MIB / 512;
    let mut d = disk(MIB);
    // Starts inside, ends outside: the first sector past the end.
    let c = fails(
        &mut d,
        &tf(cmd::READ_DMA_EXT, 8, sectors - 4),
        &[],
        error::IDNF,
    );
    assert_eq!(c.lba, sectors);
    // Starts outside: that sector.
    let c = fails(
        &mut d,
        &tf(cmd::WRITE_DMA, 1, sectors + 7),
        &[],
        error::IDNF,
    );
    assert_eq!(c.lba, sectors + 7);
    // The last sector itself is fine.
    let last = io(run(&mut d, &tf(cmd::READ_SECTORS, 1, sectors - 1)));
    assert_eq!(last.offset, (sectors - 1) * 512);
    // 48-bit at the top of the address space does not overflow.
    let c = fails(
        &mut d,
        &tf(cmd::READ_DMA_EXT, 0, (1 << 48) - 1),
        &[],
        error::IDNF,
    );
    assert_eq!(c.lba, (1 << 48) - 1);
    // The LBA is reported in both layouts: device bits 0..4 hold bits 24..28.
    let mut big = disk(GIB);
    let c = fails(
        &mut big,
        &tf(cmd::READ_DMA_EXT, 1, 0x0a00_0000),
        &[],
        error::IDNF,
    );
    assert_eq!((c.lba, c.device), (0x0a00_0000, 0x4a));
}

#[test]
fn read_verify_checks_the_range_without_io() {
    let mut d = disk(MIB);
    let sectors = MIB / 512;
    for op in [
        cmd::READ_VERIFY_SECTORS,
        cmd::READ_VERIFY_SECTORS_NORETRY,
        cmd::READ_VERIFY_SECTORS_EXT,
    ] {
        assert_eq!(d.protocol(&tf(op, 1, 0)), Protocol::NonData);
        ok(&mut d, &tf(op, 16, 0));
        let c = fails(&mut d, &tf(op, 16, sectors - 1), &[], error::IDNF);
        assert_eq!(c.lba, sectors);
    }
}

#[test]
fn read_only_disk_aborts_writes_and_trims() {
    let mut p = params(GIB);
    p.read_only = true;
    let mut d = AtaDevice::disk(p);
    for (op, _, write, _) in RW {
        let r = run(&mut d, &tf(op, 1, 0));
        if write {
            assert_eq!(complete(r).error, error::ABRT, "{op:#x}");
        } else {
            io(r);
        }
    }
    let t = with_features(tf(cmd::WRITE_FPDMA_QUEUED, 0, 0), 8);
    abrt(&mut d, &t);
    io(run(
        &mut d,
        &with_features(tf(cmd::READ_FPDMA_QUEUED, 0, 0), 8),
    ));
    let dsm = with_features(tf(cmd::DATA_SET_MANAGEMENT, 1, 0), 1);
    fails(&mut d, &dsm, &dsm_block(&[(0, 8)]), error::ABRT);
    // Flushing a read-only disk harms nothing.
    assert_eq!(
        io(run(&mut d, &tf(cmd::FLUSH_CACHE_EXT, 0, 0))).kind,
        MediumIoKind::Flush
    );
}

#[test]
fn multiple_mode() {
    let mut d = disk(GIB);
    assert_eq!(d.multiple_count(), 16);
    for n in [1, 2, 4, 8, 16] {
        ok(&mut d, &tf(cmd::SET_MULTIPLE_MODE, n, 0));
        assert_eq!(d.multiple_count(), n);
        assert_eq!(identify(&mut d)[59], 0x0100 | n);
    }
    for bad in [3, 32, 17, 255] {
        abrt(&mut d, &tf(cmd::SET_MULTIPLE_MODE, bad, 0));
        assert_eq!(d.multiple_count(), 16);
    }
    ok(&mut d, &tf(cmd::SET_MULTIPLE_MODE, 0, 0));
    assert_eq!(d.multiple_count(), 0);
    assert_eq!(identify(&mut d)[59], 0);
    for op in [
        cmd::READ_MULTIPLE,
        cmd::READ_MULTIPLE_EXT,
        cmd::WRITE_MULTIPLE,
        cmd::WRITE_MULTIPLE_EXT,
        cmd::WRITE_MULTIPLE_FUA_EXT,
    ] {
        abrt(&mut d, &tf(op, 1, 0));
    }
    io(run(&mut d, &tf(cmd::READ_SECTORS, 1, 0)));
    d.reset();
    assert_eq!(d.multiple_count(), 16);
}

#[test]
fn flush_cache_both_opcodes() {
    let mut d = disk(GIB);
    for op in [cmd::FLUSH_CACHE, cmd::FLUSH_CACHE_EXT] {
        let io = io(run(&mut d, &tf(op, 0, 0)));
        assert_eq!((io.kind, io.offset, io.len), (MediumIoKind::Flush, 0, 0));
        assert_eq!(d.protocol(&tf(op, 0, 0)), Protocol::NonData);
    }
}

// ---- DATA SET MANAGEMENT ----

fn dsm_block(entries: &[(u64, u16)]) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    for (i, (lba, n)) in entries.iter().enumerate() {
        let v = lba | (u64::from(*n) << 48);
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

fn trim(count: u16) -> Taskfile {
    with_features(tf(cmd::DATA_SET_MANAGEMENT, count, 0), 1)
}

#[test]
fn dsm_trim_ranges_skip_zero_entries() {
    let mut d = disk(GIB);
    assert_eq!(d.protocol(&trim(1)), Protocol::Dma);
    assert_eq!(d.parameter_len(&trim(2)), 1024);
    let data = dsm_block(&[(100, 8), (5000, 0), (20, 4)]);
    let io = io(run_out(&mut d, &trim(1), &data));
    assert_eq!(
        io.kind,
        MediumIoKind::Discard(vec![(100 * 512, 8 * 512), (20 * 512, 4 * 512)])
    );
    assert_eq!((io.offset, io.len), (20 * 512, (108 - 20) * 512));
    assert!(!io.fua);

    // Entries in the second block count too.
    let mut two = dsm_block(&[(1, 1)]);
    two.extend(dsm_block(&[(0, 0), (7, 65535)]));
    let io2 = io_of(&mut d, &trim(2), &two);
    assert_eq!(
        io2.kind,
        MediumIoKind::Discard(vec![(512, 512), (7 * 512, 65535 * 512)])
    );

    // Only zero-length entries: nothing to do.
    ok_out(&mut d, &trim(1), &dsm_block(&[(100, 0)]));
}

fn io_of(d: &mut AtaDevice, t: &Taskfile, out: &[u8]) -> AtaIo {
    io(run_out(d, t, out))
}

fn ok_out(d: &mut AtaDevice, t: &Taskfile, out: &[u8]) {
    let c = complete(run_out(d, t, out));
    assert_eq!((c.status, c.error), (0x50, 0));
}

#[test]
fn dsm_rejects_bad_ranges_short_data_and_disabled_discard() {
    let sectors = GIB / 512;
    let mut d = disk(GIB);
    // Range ending past the last sector, or an LBA beyond it.
    for e in [(sectors - 1, 2), (sectors, 1), ((1 << 48) - 1, 65535)] {
        fails(&mut d, &trim(1), &dsm_block(&[(0, 1), e]), error::ABRT);
    }
    // Ending exactly at the last sector is fine.
    io_of(&mut d, &trim(1), &dsm_block(&[(sectors - 2, 2)]));
    // Short data: 511 bytes, or one block of two.
    fails(&mut d, &trim(1), &[0u8; 511], error::ABRT);
    fails(&mut d, &trim(2), &dsm_block(&[(0, 1)]), error::ABRT);
    // Count 0 (reserved) and more blocks than word 105 allows.
    fails(&mut d, &trim(0), &dsm_block(&[(0, 1)]), error::ABRT);
    fails(&mut d, &trim(9), &vec![0u8; 9 * 512], error::ABRT);
    // The TRIM bit clear.
    let not_trim = tf(cmd::DATA_SET_MANAGEMENT, 1, 0);
    fails(&mut d, &not_trim, &dsm_block(&[(0, 1)]), error::ABRT);

    let mut p = params(GIB);
    p.discard = false;
    let mut d = AtaDevice::disk(p);
    fails(&mut d, &trim(1), &dsm_block(&[(0, 1)]), error::ABRT);
}

// ---- NCQ ----

fn fpdma(op: u8, tag: u8, sectors: u16, lba: u64, fua: bool) -> Taskfile {
    Taskfile {
        command: op,
        features: sectors,
        count: u16::from(tag) << 3,
        lba,
        device: 0x40 | if fua { 0x80 } else { 0 },
    }
}

#[test]
fn ncq_decode() {
    let mut d = disk(64 * TIB);
    let t = fpdma(cmd::READ_FPDMA_QUEUED, 17, 24, 0x12_3456_789a, false);
    assert_eq!(d.protocol(&t), Protocol::DmaQueued);
    let r = io(run(&mut d, &t));
    assert_eq!(
        r,
        AtaIo {
            kind: MediumIoKind::Read,
            offset: 0x12_3456_789a * 512,
            len: 24 * 512,
            fua: false,
            ncq_tag: Some(17),
        }
    );
    let w = io(run(&mut d, &fpdma(cmd::WRITE_FPDMA_QUEUED, 31, 0, 0, true)));
    assert_eq!(
        (w.kind, w.len, w.fua, w.ncq_tag),
        (MediumIoKind::Write, 65536 * 512, true, Some(31))
    );
    // Count bits 0..3 and the priority bits above the tag do not change the tag.
    let mut t = fpdma(cmd::WRITE_FPDMA_QUEUED, 5, 1, 0, false);
    t.count |= 0xc007;
    assert_eq!(io(run(&mut d, &t)).ncq_tag, Some(5));
    // Write cache off: queued writes become write-through too.
    ok(&mut d, &with_features(tf(cmd::SET_FEATURES, 0, 0), 0x82));
    assert!(io(run(&mut d, &fpdma(cmd::WRITE_FPDMA_QUEUED, 0, 1, 0, false))).fua);

    let mut p = params(GIB);
    p.ncq = false;
    let mut d = AtaDevice::disk(p);
    abrt(&mut d, &fpdma(cmd::READ_FPDMA_QUEUED, 1, 1, 0, false));
}

fn read_log(d: &mut AtaDevice, log: u8, dma: bool) -> Vec<u8> {
    let op = if dma {
        cmd::READ_LOG_DMA_EXT
    } else {
        cmd::READ_LOG_EXT
    };
    let t = tf(op, 1, u64::from(log));
    let data = ok(d, &t).data_in;
    assert_eq!(data.len(), 512);
    data
}

#[test]
fn ncq_failure_fills_log_10h_until_read() {
    let mut d = disk(16 * GIB);
    let t = fpdma(cmd::READ_FPDMA_QUEUED, 9, 0x0203, 0x0102_0304, false);
    let r = io(run(&mut d, &t));
    let c = d.io_done(&r, Err(IoFailure::Medium));
    assert_eq!((c.status, c.error), (0x51, error::UNC));
    assert_eq!(c.lba, 0x0102_0304);

    let log = read_log(&mut d, 0x10, false);
    assert_eq!(sum(&log), 0, "checksum");
    assert_eq!(log[0], 9, "tag, NQ clear");
    assert_eq!((log[2], log[3]), (0x51, error::UNC));
    assert_eq!(&log[4..7], &[0x04, 0x03, 0x02]);
    assert_eq!(log[7], 0x41);
    assert_eq!(&log[8..11], &[0x01, 0x00, 0x00]);
    assert_eq!(&log[12..14], &[0x03, 0x02]);

    // Read clears it.
    let log = read_log(&mut d, 0x10, true);
    assert_eq!(sum(&log), 0);
    assert!(log[..511].iter().all(|b| *b == 0));
}

#[test]
fn ncq_write_failure_and_immediate_errors_fill_log_10h() {
    let sectors = GIB / 512;
    let mut d = disk(GIB);
    let w = io(run(
        &mut d,
        &fpdma(cmd::WRITE_FPDMA_QUEUED, 3, 0, 16, false),
    ));
    let c = d.io_done(&w, Err(IoFailure::NoSpace));
    assert_eq!((c.status, c.error, c.lba), (0x51, error::ABRT, 16));
    let log = read_log(&mut d, 0x10, false);
    assert_eq!((log[0], log[3], log[4]), (3, error::ABRT, 16));
    assert_eq!(&log[12..14], &[0, 0], "65536 sectors written as 0");

    // A queued command past the end fails at once and is logged the same way.
    let t = fpdma(cmd::READ_FPDMA_QUEUED, 30, 8, sectors - 1, false);
    let c = fails(&mut d, &t, &[], error::IDNF);
    assert_eq!(c.lba, sectors);
    let log = read_log(&mut d, 0x10, false);
    assert_eq!((log[0], log[2], log[3]), (30, 0x51, error::IDNF));
    assert_eq!(&log[12..14], &[8, 0]);
}

#[test]
fn non_queued_failure_sets_nq_in_log_10h() {
    let mut d = disk(GIB);
    abrt(&mut d, &tf(0xff, 0, 0));
    let log = read_log(&mut d, 0x10, false);
    assert_eq!(log[0] & 0x80, 0x80);
    assert_eq!(log[3], error::ABRT);
    assert_eq!(sum(&log), 0);

    let r = io(run(&mut d, &tf(cmd::READ_DMA_EXT, 1, 77)));
    d.io_done(&r, Err(IoFailure::Medium));
    let log = read_log(&mut d, 0x10, false);
    assert_eq!((log[0], log[3], log[4]), (0x80, error::UNC, 77));
}

#[test]
fn io_done_results() {
    let mut d = disk(GIB);
    let read = io(run(&mut d, &tf(cmd::READ_DMA_EXT, 8, 0x1234)));
    let write = io(run(&mut d, &tf(cmd::WRITE_DMA_EXT, 8, 0x1234)));
    let flush = io(run(&mut d, &tf(cmd::FLUSH_CACHE, 0, 0)));
    assert_eq!(d.io_done(&read, Ok(())), AtaCompletion::good());
    assert_eq!(d.io_done(&flush, Ok(())), AtaCompletion::good());
    let c = d.io_done(&read, Err(IoFailure::Medium));
    assert_eq!((c.status, c.error, c.lba), (0x51, error::UNC, 0x1234));
    let c = d.io_done(&write, Err(IoFailure::Medium));
    assert_eq!((c.status, c.error, c.lba), (0x51, error::ABRT, 0x1234));
    for f in [IoFailure::NoSpace, IoFailure::Other] {
        assert_eq!(d.io_done(&read, Err(f)).error, error::ABRT);
        assert_eq!(d.io_done(&flush, Err(f)).error, error::ABRT);
    }
}

// ---- logs ----

#[test]
fn log_directory_and_identify_page_list() {
    let mut d = disk(GIB);
    let dir = read_log(&mut d, 0x00, false);
    assert_eq!(&dir[0..2], &[1, 0], "version 1");
    assert_eq!(&dir[0x20..0x22], &[1, 0], "log 10h: one page");
    assert_eq!(&dir[0x60..0x62], &[1, 0], "log 30h: one page");
    let listed: Vec<usize> = (1..256)
        .filter(|i| dir[i * 2] != 0 || dir[i * 2 + 1] != 0)
        .collect();
    assert_eq!(listed, vec![0x10, 0x30]);

    let p0 = read_log(&mut d, 0x30, true);
    assert_eq!(&p0[0..3], &[1, 0, 0], "revision 1, page 00h");
    assert_eq!((p0[8], p0[9]), (1, 0x00));
}

#[test]
fn bad_log_requests_abort() {
    let mut d = disk(GIB);
    assert_eq!(d.protocol(&tf(cmd::READ_LOG_EXT, 1, 0)), Protocol::PioIn);
    assert_eq!(d.protocol(&tf(cmd::READ_LOG_DMA_EXT, 1, 0)), Protocol::Dma);
    for op in [cmd::READ_LOG_EXT, cmd::READ_LOG_DMA_EXT] {
        // Unknown log, no pages, too many pages, page 1 (LBA mid) and page 256 (LBA 32..40).
        for (count, lba) in [
            (1, 0x11),
            (1, 0xe0),
            (0, 0x10),
            (2, 0x10),
            (1, 0x0110),
            (1, 0x01_0000_0010),
        ] {
            abrt(&mut d, &tf(op, count, lba));
        }
    }
    // LBA high is reserved and ignored.
    ok(&mut d, &tf(cmd::READ_LOG_EXT, 1, 0xff_0000));
}

// ---- SMART ----

fn smart(sub: u8) -> Taskfile {
    with_features(tf(cmd::SMART, 0, 0xc2_4f00), u16::from(sub))
}

#[test]
fn smart_status_data_and_enable() {
    let mut d = disk(GIB);
    let c = ok(&mut d, &smart(0xda));
    assert_eq!((c.lba >> 8) & 0xffff, 0xc24f, "threshold not exceeded");

    assert_eq!(d.protocol(&smart(0xd0)), Protocol::PioIn);
    assert_eq!(d.protocol(&smart(0xda)), Protocol::NonData);
    let data = ok(&mut d, &smart(0xd0)).data_in;
    assert_eq!(data.len(), 512);
    assert_eq!(sum(&data), 0);
    assert_eq!(&data[0..2], &[0x10, 0x00]);
    assert_eq!(data[2], 0x01, "first attribute");

    // Without the key in LBA mid/high.
    abrt(&mut d, &with_features(tf(cmd::SMART, 0, 0), 0xda));
    abrt(&mut d, &with_features(tf(cmd::SMART, 0, 0xc2_4e00), 0xda));
    // Unsupported subcommands.
    abrt(&mut d, &smart(0xd4));
    abrt(&mut d, &smart(0xd5));

    ok(&mut d, &smart(0xd9));
    assert_eq!(identify(&mut d)[85] & 1, 0);
    abrt(&mut d, &smart(0xda));
    abrt(&mut d, &smart(0xd0));
    ok(&mut d, &smart(0xd8));
    assert_eq!(identify(&mut d)[85] & 1, 1);
    ok(&mut d, &smart(0xda));
}

// ---- the other disk commands ----

#[test]
fn set_features_transfer_mode_lookahead_and_unknown() {
    let mut d = disk(GIB);
    let set = |sub: u8, count: u16| with_features(tf(cmd::SET_FEATURES, count, 0), u16::from(sub));
    assert_eq!(identify(&mut d)[88], 0x407f, "UDMA 6 selected at power-on");
    ok(&mut d, &set(0x03, 0x45));
    let w = identify(&mut d);
    assert_eq!((w[88], w[63]), (0x207f, 0x0007), "UDMA 5");
    ok(&mut d, &set(0x03, 0x22));
    let w = identify(&mut d);
    assert_eq!((w[88], w[63]), (0x007f, 0x0407), "MWDMA 2 replaces UDMA");
    // PIO modes keep the DMA selection.
    for count in [0x00, 0x01, 0x0c] {
        ok(&mut d, &set(0x03, count));
    }
    assert_eq!(identify(&mut d)[63], 0x0407);
    for bad in [0x47, 0x23, 0x0d, 0x02, 0x10, 0x80] {
        abrt(&mut d, &set(0x03, bad));
    }
    ok(&mut d, &set(0x55, 0));
    assert_eq!(identify(&mut d)[85] & 0x40, 0);
    ok(&mut d, &set(0xaa, 0));
    assert_eq!(identify(&mut d)[85] & 0x40, 0x40);
    ok(&mut d, &set(0x10, 0x06));
    ok(&mut d, &set(0x90, 0x03));
    for unknown in [0x00, 0x05, 0x66, 0xcc, 0xff] {
        abrt(&mut d, &set(unknown, 0));
    }
    d.reset();
    assert_eq!(identify(&mut d)[88], 0x407f);
}

#[test]
fn power_commands() {
    let mut d = disk(GIB);
    assert_eq!(ok(&mut d, &tf(cmd::CHECK_POWER_MODE, 0, 0)).count, 0xff);
    for op in [
        cmd::IDLE,
        cmd::IDLE_IMMEDIATE,
        cmd::STANDBY,
        cmd::STANDBY_IMMEDIATE,
        cmd::SLEEP,
        cmd::RECALIBRATE,
        0x1f,
    ] {
        ok(&mut d, &tf(op, 0, 0));
    }
}

#[test]
fn read_native_max_address() {
    let mut big = disk(200 * GIB);
    let c = ok(&mut big, &tf(cmd::READ_NATIVE_MAX_ADDRESS, 0, 0));
    assert_eq!((c.lba, c.device), (0x0fff_ffff, 0x4f));
    let c = ok(&mut big, &tf(cmd::READ_NATIVE_MAX_ADDRESS_EXT, 0, 0));
    assert_eq!(c.lba, 200 * GIB / 512 - 1);
    let mut small = disk(MIB);
    let c = ok(&mut small, &tf(cmd::READ_NATIVE_MAX_ADDRESS, 0, 0));
    assert_eq!((c.lba, c.device), (MIB / 512 - 1, 0x40));
}

#[test]
fn signature_and_diagnostics() {
    let mut d = disk(GIB);
    assert_eq!(d.signature(), 0x0000_0101);
    assert_eq!(
        (d.signature_taskfile().count, d.signature_taskfile().lba),
        (1, 1)
    );
    let c = complete(run(&mut d, &tf(cmd::EXECUTE_DEVICE_DIAGNOSTIC, 0, 0)));
    assert_eq!((c.status, c.error, c.count, c.lba), (0x50, 0x01, 1, 1));
    assert_eq!(d.reset_registers(), c);

    let mut a = atapi();
    assert_eq!(a.signature(), 0xeb14_0101);
    let t = a.signature_taskfile();
    assert_eq!((t.count, t.lba), (1, 0xeb_1401));
    let c = complete(run(&mut a, &tf(cmd::EXECUTE_DEVICE_DIAGNOSTIC, 0, 0)));
    assert_eq!(
        (c.status, c.error, c.count, c.lba),
        (0x00, 0x01, 1, 0xeb_1401)
    );
}

#[test]
fn unknown_and_packet_only_commands_abort_on_a_disk() {
    let mut d = disk(GIB);
    for op in [
        cmd::NOP,
        cmd::DEVICE_RESET,
        cmd::IDENTIFY_PACKET_DEVICE,
        cmd::PACKET,
        cmd::WRITE_LOG_EXT,
        0x01,
        0xf5,
        0xff,
    ] {
        abrt(&mut d, &tf(op, 0, 0));
    }
}

#[test]
fn disk_protocols() {
    let d = disk(GIB);
    let p = |op| d.protocol(&tf(op, 1, 0));
    assert_eq!(p(cmd::IDENTIFY_DEVICE), Protocol::PioIn);
    assert_eq!(p(cmd::READ_SECTORS), Protocol::PioIn);
    assert_eq!(p(cmd::READ_MULTIPLE_EXT), Protocol::PioIn);
    assert_eq!(p(cmd::WRITE_SECTORS_EXT), Protocol::PioOut);
    assert_eq!(p(cmd::WRITE_MULTIPLE_FUA_EXT), Protocol::PioOut);
    assert_eq!(p(cmd::READ_DMA), Protocol::Dma);
    assert_eq!(p(cmd::WRITE_DMA_FUA_EXT), Protocol::Dma);
    assert_eq!(p(cmd::WRITE_FPDMA_QUEUED), Protocol::DmaQueued);
    assert_eq!(p(cmd::SET_FEATURES), Protocol::NonData);
    assert_eq!(p(cmd::PACKET), Protocol::NonData);
    assert_eq!(d.parameter_len(&tf(cmd::READ_DMA, 1, 0)), 0);
}

// ---- ATAPI ----

fn packet(d: &mut AtaDevice, cdb: &[u8]) -> AtaResult {
    let mut out: &[u8] = &[];
    d.execute(&tf(cmd::PACKET, 0, 0), cdb, &mut out)
}

fn packet_done(d: &mut AtaDevice, cdb: &[u8]) -> AtaCompletion {
    complete(packet(d, cdb))
}

const TEST_UNIT_READY: [u8; 12] = [0; 12];
const REQUEST_SENSE: [u8; 12] = [0x03, 0, 0, 0, 18, 0, 0, 0, 0, 0, 0, 0];

/// An ATAPI drive whose power-on unit attention has been reported.
fn atapi_ready() -> AtaDevice {
    let mut a = atapi();
    let c = packet_done(&mut a, &TEST_UNIT_READY);
    assert_eq!((c.status, c.error), (0x51, sense_key::UNIT_ATTENTION << 4));
    a
}

#[test]
fn atapi_aborts_identify_device_with_its_signature() {
    let mut a = atapi();
    for op in [
        cmd::IDENTIFY_DEVICE,
        cmd::READ_SECTORS,
        cmd::READ_SECTORS_EXT,
    ] {
        let c = complete(run(&mut a, &tf(op, 0, 0)));
        assert_eq!((c.status, c.error), (0x51, error::ABRT));
        assert_eq!((c.count, c.lba), (1, 0xeb_1401));
        assert!(c.data_in.is_empty());
    }
    assert_eq!(
        a.protocol(&tf(cmd::IDENTIFY_DEVICE, 0, 0)),
        Protocol::NonData
    );
}

#[test]
fn atapi_identify_packet_device() {
    let mut a = atapi();
    assert_eq!(
        a.protocol(&tf(cmd::IDENTIFY_PACKET_DEVICE, 0, 0)),
        Protocol::PioIn
    );
    let data = ok(&mut a, &tf(cmd::IDENTIFY_PACKET_DEVICE, 0, 0)).data_in;
    assert_eq!(sum(&data), 0);
    assert_eq!(data[510], 0xa5);
    let w = words(&data);
    assert_eq!(w[0], 0x85c0);
    assert_eq!(ata_string(&w[27..47]), format!("{:<40}", "FERRY DVD-ROM"));
    assert_eq!(ata_string(&w[10..20]), format!("{:<20}", "CD0001"));
    assert_eq!(ata_string(&w[23..27]), format!("{:<8}", "2.5"));
    assert_eq!(w[49] & 0x0300, 0x0300, "LBA and DMA");
    assert_eq!(w[82] & 0x0210, 0x0210, "PACKET and DEVICE RESET");
    assert_eq!(w[88] & 0x7f, 0x7f);
}

#[test]
fn atapi_empty_drive_test_unit_ready_then_request_sense() {
    let mut a = atapi_ready();
    let c = packet_done(&mut a, &TEST_UNIT_READY);
    assert_eq!((c.status, c.error, c.count), (0x51, 0x20, 3));
    assert_eq!(c.error >> 4, sense_key::NOT_READY);

    let c = packet_done(&mut a, &REQUEST_SENSE);
    assert_eq!((c.status, c.error, c.count), (0x50, 0, 3));
    assert_eq!(c.data_in.len(), 18);
    assert_eq!(c.data_in[2] & 0x0f, sense_key::NOT_READY);
    assert_eq!(c.data_in[12], 0x3a, "MEDIUM NOT PRESENT");
}

#[test]
fn atapi_read_10_of_a_loaded_medium() {
    let mut a = atapi_ready();
    let drive = a.as_atapi_mut().unwrap();
    assert!(!drive.is_loaded());
    drive.insert(100 * 2048);
    assert!(drive.is_loaded());
    // The insertion is reported once.
    let c = packet_done(&mut a, &TEST_UNIT_READY);
    assert_eq!(c.error >> 4, sense_key::UNIT_ATTENTION);
    packet_done(&mut a, &TEST_UNIT_READY);

    let read10 = [0x28, 0, 0, 0, 0, 10, 0, 0, 4, 0, 0, 0];
    let r = io(packet(&mut a, &read10));
    assert_eq!(
        r,
        AtaIo {
            kind: MediumIoKind::Read,
            offset: 10 * 2048,
            len: 4 * 2048,
            fua: false,
            ncq_tag: None,
        }
    );
    let c = a.io_done(&r, Ok(()));
    assert_eq!((c.status, c.error, c.count), (0x50, 0, 3));
    let c = a.io_done(&r, Err(IoFailure::Medium));
    assert_eq!(
        (c.status, c.error, c.count),
        (0x51, sense_key::MEDIUM_ERROR << 4, 3)
    );
    let sense = packet_done(&mut a, &REQUEST_SENSE).data_in;
    assert_eq!(
        (sense[2] & 0x0f, sense[12]),
        (sense_key::MEDIUM_ERROR, 0x11)
    );

    // Past the end of the medium.
    let beyond = [0x28, 0, 0, 0, 0, 99, 0, 0, 2, 0, 0, 0];
    let c = packet_done(&mut a, &beyond);
    assert_eq!(c.error >> 4, sense_key::ILLEGAL_REQUEST);

    a.as_atapi_mut().unwrap().eject();
    assert!(!a.as_atapi_mut().unwrap().is_loaded());
}

#[test]
fn atapi_data_in_is_cut_to_the_allocation_length() {
    let mut a = atapi();
    // INQUIRY is exempt from the unit attention.
    let inquiry = [0x12, 0, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0];
    let c = packet_done(&mut a, &inquiry);
    assert_eq!((c.status, c.count), (0x50, 3));
    assert_eq!(c.data_in.len(), 36);
    assert_eq!(c.data_in[0] & 0x1f, 0x05);
    assert_eq!(&c.data_in[8..13], b"FERRY");
    assert_eq!(&c.data_in[16..23], b"DVD-ROM");
    let short = [0x12, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(packet_done(&mut a, &short).data_in.len(), 5);
}

#[test]
fn atapi_reset_and_device_reset_raise_unit_attention() {
    let mut a = atapi_ready();
    packet_done(&mut a, &REQUEST_SENSE);
    assert_eq!(
        packet_done(&mut a, &TEST_UNIT_READY).error >> 4,
        sense_key::NOT_READY
    );
    a.reset();
    let c = packet_done(&mut a, &TEST_UNIT_READY);
    assert_eq!(c.error >> 4, sense_key::UNIT_ATTENTION);

    let c = complete(run(&mut a, &tf(cmd::DEVICE_RESET, 0, 0)));
    assert_eq!(
        (c.status, c.error, c.count, c.lba),
        (0x00, 0x01, 1, 0xeb_1401)
    );
    let sense = packet_done(&mut a, &REQUEST_SENSE).data_in;
    assert_eq!(
        (sense[2] & 0x0f, sense[12]),
        (sense_key::UNIT_ATTENTION, 0x29)
    );
}

#[test]
fn atapi_ata_commands() {
    let mut a = atapi();
    assert_eq!(
        a.protocol(&with_features(tf(cmd::PACKET, 0, 0), 1)),
        Protocol::Packet { dma: true }
    );
    assert_eq!(
        a.protocol(&tf(cmd::PACKET, 0, 0)),
        Protocol::Packet { dma: false }
    );
    assert_eq!(ok(&mut a, &tf(cmd::CHECK_POWER_MODE, 0, 0)).count, 0xff);
    ok(&mut a, &tf(cmd::IDLE_IMMEDIATE, 0, 0));
    ok(&mut a, &with_features(tf(cmd::SET_FEATURES, 0x44, 0), 0x03));
    let w = words(&ok(&mut a, &tf(cmd::IDENTIFY_PACKET_DEVICE, 0, 0)).data_in);
    assert_eq!(w[88], 0x107f, "UDMA 4 selected");
    abrt(&mut a, &with_features(tf(cmd::SET_FEATURES, 0x47, 0), 0x03));
    abrt(&mut a, &with_features(tf(cmd::SET_FEATURES, 0, 0), 0x82));
    for op in [
        cmd::NOP,
        cmd::READ_DMA_EXT,
        cmd::WRITE_DMA,
        cmd::SMART,
        0xff,
    ] {
        abrt(&mut a, &tf(op, 0, 0));
    }
    assert_eq!(a.multiple_count(), 0);
    assert!(!a.write_cache_enabled());
    assert!(a.as_disk_mut().is_none());
}

#[test]
fn atapi_bad_packets_are_check_conditions() {
    let mut a = atapi_ready();
    // No CDB at all, an unknown opcode, a READ(16) cut short.
    for cdb in [&[][..], &[0xff; 12][..], &[0x88, 0, 0, 0][..]] {
        let c = packet_done(&mut a, cdb);
        assert_eq!((c.status, c.count), (0x51, 3), "{cdb:02x?}");
        assert_eq!(c.error >> 4, sense_key::ILLEGAL_REQUEST);
    }
}

// ---- robustness ----

/// xorshift64*: deterministic, good enough to spread taskfiles around.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

const OPCODES: [u8; 52] = [
    cmd::NOP,
    cmd::DATA_SET_MANAGEMENT,
    cmd::DEVICE_RESET,
    cmd::RECALIBRATE,
    cmd::READ_SECTORS,
    cmd::READ_SECTORS_NORETRY,
    cmd::READ_SECTORS_EXT,
    cmd::READ_DMA_EXT,
    cmd::READ_NATIVE_MAX_ADDRESS_EXT,
    cmd::READ_MULTIPLE_EXT,
    cmd::READ_LOG_EXT,
    cmd::WRITE_SECTORS,
    cmd::WRITE_SECTORS_NORETRY,
    cmd::WRITE_SECTORS_EXT,
    cmd::WRITE_DMA_EXT,
    cmd::WRITE_MULTIPLE_EXT,
    cmd::WRITE_DMA_FUA_EXT,
    cmd::WRITE_LOG_EXT,
    cmd::READ_VERIFY_SECTORS,
    cmd::READ_VERIFY_SECTORS_NORETRY,
    cmd::READ_VERIFY_SECTORS_EXT,
    cmd::READ_LOG_DMA_EXT,
    cmd::READ_FPDMA_QUEUED,
    cmd::WRITE_FPDMA_QUEUED,
    cmd::EXECUTE_DEVICE_DIAGNOSTIC,
    cmd::INITIALIZE_DEVICE_PARAMETERS,
    cmd::PACKET,
    cmd::PACKET,
    cmd::PACKET,
    cmd::IDENTIFY_PACKET_DEVICE,
    cmd::SMART,
    cmd::READ_MULTIPLE,
    cmd::WRITE_MULTIPLE,
    cmd::SET_MULTIPLE_MODE,
    cmd::READ_DMA,
    cmd::READ_DMA_NORETRY,
    cmd::WRITE_DMA,
    cmd::WRITE_DMA_NORETRY,
    cmd::WRITE_MULTIPLE_FUA_EXT,
    cmd::STANDBY_IMMEDIATE,
    cmd::IDLE_IMMEDIATE,
    cmd::STANDBY,
    cmd::IDLE,
    cmd::CHECK_POWER_MODE,
    cmd::SLEEP,
    cmd::FLUSH_CACHE,
    cmd::FLUSH_CACHE_EXT,
    cmd::IDENTIFY_DEVICE,
    cmd::SET_FEATURES,
    cmd::READ_NATIVE_MAX_ADDRESS,
    0x5a,
    0xff,
];

/// MMC opcodes worth aiming at, the rest is random.
const CDB_OPCODES: [u8; 16] = [
    0x00, 0x03, 0x12, 0x1a, 0x1b, 0x1e, 0x25, 0x28, 0x43, 0x46, 0x4a, 0x51, 0x5a, 0xa8, 0xad, 0xbe,
];

fn random_device(rng: &mut Rng) -> (AtaDevice, u64) {
    if rng.below(3) == 0 {
        return (atapi(), 0);
    }
    let size = match rng.below(4) {
        0 => rng.below(1 << 20),
        1 => rng.below(1 << 40),
        2 => 1 << 48,
        _ => u64::MAX,
    };
    let f = rng.next();
    let p = AtaDiskParams {
        size_bytes: size,
        nonrotational: f & 1 != 0,
        discard: f & 2 != 0,
        read_only: f & 4 != 0,
        model: "FUZZ".into(),
        serial: "S".into(),
        firmware: "F".into(),
        ncq: f & 8 != 0,
    };
    (AtaDevice::disk(p), size)
}

#[test]
fn random_commands_never_panic_and_stay_in_bounds() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let max_data = 65536 * 512;
    // (I/Os, completions with data, failed completions): each kind must occur.
    let mut seen = (0, 0, 0);
    for _ in 0..60 {
        let (mut d, disk_size) = random_device(&mut rng);
        let mut medium = disk_size;
        for _ in 0..200 {
            if d.is_atapi() && rng.below(20) == 0 {
                let drive = d.as_atapi_mut().unwrap();
                match rng.below(3) {
                    0 => {
                        medium = rng.below(1 << 34);
                        drive.insert(medium);
                    }
                    1 => drive.eject(),
                    _ => {
                        drive.request_eject();
                    }
                }
            }
            if rng.below(50) == 0 {
                d.reset();
            }
            let t = Taskfile {
                command: if rng.below(8) == 0 {
                    rng.next() as u8
                } else {
                    rng.pick(&OPCODES)
                },
                features: match rng.below(3) {
                    0 => rng.pick(&[0x02, 0x03, 0x82, 0xd0, 0xda, 0x01, 0x10]),
                    _ => rng.next() as u16,
                },
                count: if rng.below(2) == 0 {
                    rng.below(20) as u16
                } else {
                    rng.next() as u16
                },
                lba: if rng.below(2) == 0 {
                    0xc2_4f00 | rng.below(0x40)
                } else {
                    rng.next()
                },
                device: rng.next() as u8,
            };
            let mut cdb = vec![0u8; rng.below(17) as usize];
            cdb.iter_mut().for_each(|b| *b = rng.next() as u8);
            if let Some(first) = cdb.first_mut() {
                *first = rng.pick(&CDB_OPCODES);
            }
            let mut out = vec![0u8; rng.below(4097) as usize];
            out.iter_mut().for_each(|b| *b = rng.next() as u8);
            let mut data_out: &[u8] = &out;
            let _ = d.protocol(&t);
            let _ = d.parameter_len(&t);
            match d.execute(&t, &cdb, &mut data_out) {
                AtaResult::Complete(c) => {
                    seen.1 += usize::from(!c.data_in.is_empty());
                    seen.2 += usize::from(c.is_error());
                    assert!(c.data_in.len() <= max_data, "{t:x?}");
                    assert!(matches!(c.status, 0x00 | 0x50 | 0x51), "{t:x?}: {c:?}");
                    if c.is_error() {
                        assert!(c.data_in.is_empty(), "{t:x?}");
                        assert_ne!(c.error, 0, "{t:x?}");
                    }
                }
                AtaResult::Io(io) => {
                    seen.0 += 1;
                    // An ATA transfer moves at most 65536 sectors; a discard spans what it
                    // names, an ATAPI READ(12) what its CDB names.
                    if matches!(io.kind, MediumIoKind::Read | MediumIoKind::Write) && !d.is_atapi()
                    {
                        assert!(io.len <= max_data as u64, "{t:x?}: {io:?}");
                    }
                    let end = io.offset.checked_add(io.len).expect("no overflow");
                    assert!(end <= medium, "{t:x?}: {io:?} beyond {medium}");
                    if let MediumIoKind::Discard(r) = &io.kind {
                        assert!(r.iter().all(|(o, l)| *o >= io.offset && o + l <= end));
                    }
                    let result = match rng.below(4) {
                        0 => Err(IoFailure::Medium),
                        1 => Err(IoFailure::NoSpace),
                        2 => Err(IoFailure::Other),
                        _ => Ok(()),
                    };
                    let c = d.io_done(&io, result);
                    assert!(c.data_in.is_empty());
                    assert_eq!(c.is_error(), result.is_err());
                }
            }
        }
    }
    assert!(seen.0 > 500 && seen.1 > 100 && seen.2 > 500, "{seen:?}");
}
