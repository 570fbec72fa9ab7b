//! The shared SCSI target fed arbitrary CDBs and Data-Out bytes: every byte of a CDB and of
//! a parameter list comes from the guest. A target holds a disk (LUN 0) and a CD/DVD unit
//! (LUN 1); LUN 5 is empty. Every medium I/O the target asks for must lie within the medium.
//!
//! Input format: a 5-byte preamble (disk flags: bit 0 4K blocks, bit 1 discard, bit 2
//! read-only, bit 3 write cache; then the disk size in 4 KiB units, little endian u32), then
//! a sequence of operations, each starting with one control byte:
//!
//! ```text
//! ctrl bits 0..=1  LUN: 0 disk, 1 CD/DVD, 2 the empty LUN 5, 3 a host action instead
//! ctrl bits 2..=3  host action: insert (4-byte size in 2 KiB units follows), eject,
//!                  polite eject, reset
//! ctrl bits 4..=5  outcome of the I/O if one is asked for: done, EIO, ENOSPC, other
//! next byte        CDB length (modulo 33), then the CDB
//! next 2 bytes     Data-Out length, little endian (taken modulo 8193), then those bytes
//! ```
#![no_main]

use ferry_devices::scsi::{
    CdParams, CdUnit, DiskParams, DiskUnit, IoFailure, LogicalUnit, MediumIoKind, ScsiResult,
    ScsiTarget,
};
use libfuzzer_sys::fuzz_target;

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, tail) = data.split_at(n);
    *data = tail;
    Some(head)
}

fn u32_le(b: &[u8]) -> u32 {
    b.iter().rev().fold(0, |acc, x| (acc << 8) | u32::from(*x))
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let Some(pre) = take(&mut data, 5) else {
        return;
    };
    let flags = pre[0];
    let disk_size = u64::from(u32_le(&pre[1..5])) * 4096;
    let disk = DiskUnit::new(DiskParams {
        size_bytes: disk_size,
        block_size: if flags & 1 != 0 { 4096 } else { 512 },
        nonrotational: true,
        discard: flags & 2 != 0,
        read_only: flags & 4 != 0,
        write_cache: flags & 8 != 0,
        vendor: "FERRY",
        product: "FUZZDISK",
        serial: "FUZZ0".into(),
        wwn: 0x5000_0000_0000_0001,
    })
    .expect("valid block size");
    let cd = CdUnit::new(CdParams {
        vendor: "FERRY",
        product: "FUZZCD",
        serial: "FUZZ1".into(),
        atapi: flags & 0x10 != 0,
    });
    let mut target = ScsiTarget::new();
    target.attach(0, LogicalUnit::Disk(disk)).expect("free LUN");
    target.attach(1, LogicalUnit::Cd(cd)).expect("free LUN");
    let mut cd_size = 0u64;

    while let Some(&[ctrl]) = take(&mut data, 1) {
        let lun = match ctrl & 3 {
            0 => 0,
            1 => 1,
            2 => 5,
            _ => {
                let cd = target
                    .unit_mut(1)
                    .and_then(LogicalUnit::as_cd_mut)
                    .expect("CD at LUN 1");
                match (ctrl >> 2) & 3 {
                    0 => {
                        let Some(b) = take(&mut data, 4) else {
                            return;
                        };
                        cd_size = u64::from(u32_le(b)) * 2048;
                        cd.insert(cd_size);
                    }
                    1 => cd.eject(),
                    2 => {
                        cd.request_eject();
                    }
                    _ => target.reset(),
                }
                continue;
            }
        };
        let Some(&[cdb_len]) = take(&mut data, 1) else {
            return;
        };
        let Some(cdb) = take(&mut data, usize::from(cdb_len % 33)) else {
            return;
        };
        let Some(len) = take(&mut data, 2) else {
            return;
        };
        let out_len = (u32_le(len) % 8193) as usize;
        let out_len = out_len.min(data.len());
        let Some(mut out) = take(&mut data, out_len) else {
            return;
        };
        match target.execute(lun, cdb, &mut out) {
            ScsiResult::Complete(c) => {
                assert_eq!(c.sense.is_some(), c.status.code() != 0);
            }
            ScsiResult::Io(io) => {
                let size = if lun == 0 { disk_size } else { cd_size };
                let end = io.offset.checked_add(io.len).expect("no overflow");
                assert!(end <= size, "{io:?} beyond a {size}-byte medium");
                if let MediumIoKind::Discard(ranges) = &io.kind {
                    for (o, l) in ranges {
                        assert!(o + l <= size && *o >= io.offset && o + l <= end);
                    }
                }
                let result = match (ctrl >> 4) & 3 {
                    0 => Ok(()),
                    1 => Err(IoFailure::Medium),
                    2 => Err(IoFailure::NoSpace),
                    _ => Err(IoFailure::Other),
                };
                target.io_done(lun, &io, result);
            }
        }
    }
});
