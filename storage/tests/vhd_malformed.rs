//! VHD: malformed images, one class per test, each refused with one clear error naming the
//! file (never a panic or an allocation sized by an unchecked field).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_storage::vhd::{checksum, VhdFormat, VhdLayer};
use ferry_storage::{
    CreateOptions, ImageFormat, Layer, LocalFile, NoLowerLayers, StorageError, Variant,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 6 * MIB;
/// Where ferry's dynamic images keep the header and the BAT.
const HDR: usize = 512;
const BAT: usize = 1536;

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("vhd-malformed")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A dynamic image with blocks 0 and 2 allocated, as bytes.
fn dynamic_image(dir: &Path) -> Vec<u8> {
    let p = dir.join("good.vhd");
    let _ = std::fs::remove_file(&p);
    let l = VhdFormat
        .create(
            &p,
            &CreateOptions {
                size: SIZE,
                variant: Variant::Dynamic,
                parent: None,
            },
        )
        .unwrap();
    l.write_at(&[0xAB; 4096], 0, &NoLowerLayers).unwrap();
    l.write_at(&[0xCD; 4096], 4 * MIB, &NoLowerLayers).unwrap();
    l.flush().unwrap();
    drop(l);
    std::fs::read(&p).unwrap()
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Rewrites both footers' checksums (the copy at 0 and the one at the end).
fn fix_footers(b: &mut [u8]) {
    let end = b.len() - 512;
    for at in [0, end] {
        let ck = checksum(&b[at..at + 512], 64);
        put32(b, at + 64, ck);
    }
}

/// Applies `patch` to both footers, then fixes their checksums.
fn patch_footers(b: &mut [u8], patch: impl Fn(&mut [u8])) {
    let end = b.len() - 512;
    patch(&mut b[..512]);
    patch(&mut b[end..]);
    fix_footers(b);
}

fn fix_header(b: &mut [u8]) {
    let ck = checksum(&b[HDR..HDR + 1024], 36);
    put32(b, HDR + 36, ck);
}

/// Writes `bytes` as a file and opens it; the error it gives.
fn open_err(dir: &Path, name: &str, bytes: &[u8]) -> (PathBuf, StorageError) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let f = LocalFile::open(&p, false).unwrap();
    match VhdLayer::open(Arc::new(f), false) {
        Ok(_) => panic!("{name}: opened"),
        Err(e) => (p, e),
    }
}

/// The error is `Corrupt`, names the file and says `words`.
fn corrupt(dir: &Path, name: &str, bytes: &[u8], words: &str) {
    let (p, e) = open_err(dir, name, bytes);
    match &e {
        StorageError::Corrupt { path, detail } => {
            assert_eq!(path, &p);
            assert!(detail.contains(words), "{name}: {detail}");
            assert!(e.to_string().contains(&*p.to_string_lossy()));
        }
        other => panic!("{name}: expected Corrupt, got {other:?}"),
    }
}

#[test]
fn vhd_the_good_image_opens() {
    let dir = scratch("good");
    let b = dynamic_image(&dir);
    let p = dir.join("again.vhd");
    std::fs::write(&p, &b).unwrap();
    let l = VhdLayer::open(Arc::new(LocalFile::open(&p, false).unwrap()), false).unwrap();
    let mut buf = [0u8; 2];
    l.read_at(&mut buf, 4 * MIB).unwrap();
    assert_eq!(buf, [0xCD; 2]);
}

#[test]
fn vhd_bad_cookie() {
    let dir = scratch("cookie");
    let mut b = dynamic_image(&dir);
    let end = b.len() - 512;
    b[0] = b'X';
    b[end] = b'X';
    corrupt(&dir, "cookie.vhd", &b, "conectix");
    // Not a VHD at all.
    corrupt(&dir, "zeros.vhd", &vec![0u8; 4096], "conectix");
}

#[test]
fn vhd_bad_footer_checksum() {
    let dir = scratch("footer-ck");
    let mut b = dynamic_image(&dir);
    let end = b.len() - 512;
    b[end + 40] ^= 1; // original size
    b[40] ^= 1;
    corrupt(&dir, "ck.vhd", &b, "footer checksum is wrong");
}

#[test]
fn vhd_damaged_end_footer_falls_back_to_the_copy_and_is_repaired() {
    let dir = scratch("footer-end");
    let mut b = dynamic_image(&dir);
    let end = b.len() - 512;
    b[end + 40] ^= 1;
    let p = dir.join("end.vhd");
    std::fs::write(&p, &b).unwrap();
    let l = VhdLayer::open(Arc::new(LocalFile::open(&p, true).unwrap()), true).unwrap();
    // A new block writes a good footer at the new end.
    l.write_at(&[1; 512], 2 * MIB, &NoLowerLayers).unwrap();
    drop(l);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(after[after.len() - 512..], after[..512]);
    let l = VhdLayer::open(Arc::new(LocalFile::open(&p, false).unwrap()), false).unwrap();
    let mut buf = [0u8; 1];
    l.read_at(&mut buf, 4 * MIB).unwrap();
    assert_eq!(buf, [0xCD]);
}

#[test]
fn vhd_bad_header_cookie_and_checksum() {
    let dir = scratch("header");
    let good = dynamic_image(&dir);
    let mut b = good.clone();
    b[HDR] = b'X';
    corrupt(&dir, "hcookie.vhd", &b, "cxsparse");
    let mut b = good.clone();
    b[HDR + 600] ^= 0x40; // a reserved byte: only the checksum is wrong
    corrupt(&dir, "hck.vhd", &b, "dynamic header checksum is wrong");
}

#[test]
fn vhd_truncated_files() {
    let dir = scratch("truncated");
    let good = dynamic_image(&dir);
    corrupt(&dir, "tiny.vhd", &good[..100], "too short");
    // Cut inside the second data block: its BAT entry points past the data.
    let cut = good.len() - 512 - 4096;
    let mut b = good[..cut].to_vec();
    b.extend_from_slice(&good[good.len() - 512..]);
    corrupt(&dir, "cut.vhd", &b, "past the end");
    // Cut inside the header.
    corrupt(&dir, "hcut.vhd", &good[..1024], "does not fit");
    // A fixed disk shorter than its size.
    let p = dir.join("fixed.vhd");
    VhdFormat
        .create(
            &p,
            &CreateOptions {
                size: 2 * MIB,
                variant: Variant::Fixed,
                parent: None,
            },
        )
        .unwrap();
    let f = std::fs::read(&p).unwrap();
    let mut b = f[..MIB as usize].to_vec();
    b.extend_from_slice(&f[f.len() - 512..]);
    corrupt(&dir, "fixed-cut.vhd", &b, "truncated");
}

#[test]
fn vhd_absurd_sizes() {
    let dir = scratch("sizes");
    let good = dynamic_image(&dir);
    let mut b = good.clone();
    patch_footers(&mut b, |f| put64(f, 48, 1 << 62));
    corrupt(&dir, "huge.vhd", &b, "larger than");
    // Within the limit, but the BAT has too few entries for it.
    let mut b = good.clone();
    patch_footers(&mut b, |f| put64(f, 48, 100 * MIB));
    corrupt(&dir, "few.vhd", &b, "too few");
}

#[test]
fn vhd_bad_block_sizes() {
    let dir = scratch("block-size");
    let good = dynamic_image(&dir);
    for bs in [0u32, 128, 0x1234_5678, 1 << 30] {
        let mut b = good.clone();
        put32(&mut b, HDR + 32, bs);
        fix_header(&mut b);
        corrupt(&dir, &format!("bs{bs}.vhd"), &b, "invalid block size");
        // Without fixing the checksum, the checksum is what is wrong.
        let mut b = good.clone();
        put32(&mut b, HDR + 32, bs);
        corrupt(&dir, &format!("bs{bs}-ck.vhd"), &b, "checksum");
    }
}

#[test]
fn vhd_max_table_entries_too_large() {
    let dir = scratch("mte");
    let good = dynamic_image(&dir);
    for mte in [0x4000_0001u32, 0xFFFF_FFFF, 2_000_000] {
        let mut b = good.clone();
        put32(&mut b, HDR + 28, mte);
        fix_header(&mut b);
        corrupt(
            &dir,
            &format!("mte{mte}.vhd"),
            &b,
            "Max Table Entries too large",
        );
    }
    // A BAT that fits in the file but runs into the data blocks.
    let mut b = good.clone();
    put32(&mut b, HDR + 28, 100_000);
    fix_header(&mut b);
    corrupt(&dir, "mte-overlap.vhd", &b, "into the BAT");
}

#[test]
fn vhd_bat_entries_past_eof_into_metadata_and_shared() {
    let dir = scratch("bat");
    let good = dynamic_image(&dir);
    let first = u32::from_be_bytes(good[BAT..BAT + 4].try_into().unwrap());
    let mut b = good.clone();
    put32(&mut b, BAT + 4, 0x00FF_FFFF);
    corrupt(&dir, "eof.vhd", &b, "past the end");
    for (sector, what) in [
        (0u32, "into"),
        (1, "into the dynamic header"),
        (3, "into the BAT"),
    ] {
        let mut b = good.clone();
        put32(&mut b, BAT + 4, sector);
        corrupt(&dir, &format!("meta{sector}.vhd"), &b, what);
    }
    let mut b = good.clone();
    put32(&mut b, BAT + 4, first);
    corrupt(&dir, "shared.vhd", &b, "overlapping");
    let mut b = good.clone();
    put32(&mut b, BAT + 4, first + 1);
    corrupt(&dir, "overlap.vhd", &b, "overlapping");
}

#[test]
fn vhd_misaligned_table_offset() {
    let dir = scratch("misaligned");
    let mut b = dynamic_image(&dir);
    put64(&mut b, HDR + 16, BAT as u64 + 4);
    fix_header(&mut b);
    corrupt(&dir, "tbl.vhd", &b, "not sector-aligned");
    let mut b = dynamic_image(&dir);
    patch_footers(&mut b, |f| put64(f, 16, 513));
    corrupt(&dir, "hdr.vhd", &b, "not sector-aligned");
}

#[test]
fn vhd_unsupported_type_and_version() {
    let dir = scratch("type");
    let good = dynamic_image(&dir);
    let mut b = good.clone();
    patch_footers(&mut b, |f| put32(f, 60, 5));
    let (_, e) = open_err(&dir, "type5.vhd", &b);
    assert!(
        matches!(e, StorageError::Unsupported { .. }) && e.to_string().contains("disk type 5"),
        "{e}"
    );
    let mut b = good.clone();
    patch_footers(&mut b, |f| put32(f, 12, 0x0002_0000));
    let (_, e) = open_err(&dir, "v2.vhd", &b);
    assert!(e.to_string().contains("version"), "{e}");
}

#[test]
fn vhd_out_of_range_and_read_only() {
    let dir = scratch("range");
    let b = dynamic_image(&dir);
    let p = dir.join("r.vhd");
    std::fs::write(&p, &b).unwrap();
    let l = VhdLayer::open(Arc::new(LocalFile::open(&p, false).unwrap()), false).unwrap();
    let mut buf = [0u8; 2];
    assert!(matches!(
        l.read_at(&mut buf, SIZE - 1),
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(matches!(
        l.block_status(u64::MAX, 2),
        Err(StorageError::OutOfRange { .. })
    ));
    assert!(matches!(
        l.write_at(&buf, 0, &NoLowerLayers),
        Err(StorageError::ReadOnly { .. })
    ));
}

#[test]
fn vhd_byte_flips_never_panic() {
    let dir = scratch("flips");
    let good = dynamic_image(&dir);
    let p = dir.join("flip.vhd");
    let end = good.len() - 512;
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut opened = 0;
    for i in 0..600 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut b = good.clone();
        // Flip bytes in the footers, the header and the BAT, then fix the checksums so the
        // flip reaches the parser (every other run leaves them wrong).
        for j in 0..4 {
            let r = (seed >> (j * 16)) as usize;
            let at = match r % 3 {
                0 => r % 512,
                1 => HDR + r % 1536,
                _ => end + r % 512,
            };
            b[at] ^= (seed >> 56) as u8 | 1;
        }
        if i % 2 == 0 {
            fix_footers(&mut b);
            fix_header(&mut b);
        }
        std::fs::write(&p, &b).unwrap();
        let Ok(l) = VhdLayer::open(Arc::new(LocalFile::open(&p, false).unwrap()), false) else {
            continue;
        };
        opened += 1;
        let size = l.virtual_size().min(64 * MIB);
        let mut off = 0;
        while off < size {
            let (_, run) = l.block_status(off, size - off).unwrap();
            let n = run.min(MIB);
            let mut buf = vec![0u8; n as usize];
            l.read_at(&mut buf, off).unwrap();
            off += run;
        }
    }
    assert!(opened > 0);
}
