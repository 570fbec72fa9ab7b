//! The shared ATA/ATAPI device fed arbitrary taskfiles, ATAPI packets and data-out bytes:
//! every register, CDB byte and DSM range entry comes from the guest. Every medium I/O the
//! device asks for must lie within the medium, an ATA transfer is never more than 65536
//! sectors and no data-in more than that either.
//!
//! Input format: a 7-byte preamble (flags: bit 0 ATAPI instead of a disk, bit 1 discard, bit 2
//! read-only, bit 3 NCQ, bit 4 non-rotational; then the disk size in 512-byte sectors, little
//! endian, 6 bytes), then a sequence of operations, each starting with one control byte:
//!
//! ```text
//! ctrl bits 0..=1  0-2: a command, 3: a host action instead
//! ctrl bits 2..=3  host action: insert (4-byte size in 2 KiB units follows), eject,
//!                  polite eject, reset
//! ctrl bits 4..=5  outcome of the I/O if one is asked for: done, EIO, ENOSPC, other
//! next 12 bytes    command, features (2), count (2), lba (6), device; little endian
//! next byte        packet length (modulo 17), then the packet
//! next 2 bytes     data-out length, little endian (taken modulo 8193), then those bytes
//! ```
#![no_main]

use ferry_devices::ata::{
    AtaDevice, AtaDiskParams, AtaResult, AtapiParams, IoFailure, MediumIoKind, Taskfile,
};
use libfuzzer_sys::fuzz_target;

const MAX_TRANSFER: u64 = 65536 * 512;

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, tail) = data.split_at(n);
    *data = tail;
    Some(head)
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |acc, x| (acc << 8) | u64::from(*x))
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let Some(pre) = take(&mut data, 7) else {
        return;
    };
    let flags = pre[0];
    let disk_size = le(&pre[1..7]) * 512;
    let mut dev = if flags & 1 != 0 {
        AtaDevice::atapi(AtapiParams {
            model: "FERRY FUZZ-DVD".into(),
            serial: "FUZZ1".into(),
            firmware: "1.0".into(),
        })
    } else {
        AtaDevice::disk(AtaDiskParams {
            size_bytes: disk_size,
            nonrotational: flags & 0x10 != 0,
            discard: flags & 2 != 0,
            read_only: flags & 4 != 0,
            model: "FERRY FUZZDISK".into(),
            serial: "FUZZ0".into(),
            firmware: "1.0".into(),
            ncq: flags & 8 != 0,
        })
    };
    let mut medium = if dev.is_atapi() { 0 } else { disk_size };

    while let Some(&[ctrl]) = take(&mut data, 1) {
        if ctrl & 3 == 3 {
            match (ctrl >> 2) & 3 {
                0 => {
                    let Some(b) = take(&mut data, 4) else {
                        return;
                    };
                    if let Some(drive) = dev.as_atapi_mut() {
                        medium = le(b) * 2048;
                        drive.insert(medium);
                    }
                }
                1 => {
                    if let Some(drive) = dev.as_atapi_mut() {
                        drive.eject();
                    }
                }
                2 => {
                    if let Some(drive) = dev.as_atapi_mut() {
                        drive.request_eject();
                    }
                }
                _ => dev.reset(),
            }
            continue;
        }
        let Some(r) = take(&mut data, 12) else {
            return;
        };
        let tf = Taskfile {
            command: r[0],
            features: le(&r[1..3]) as u16,
            count: le(&r[3..5]) as u16,
            lba: le(&r[5..11]),
            device: r[11],
        };
        let Some(&[packet_len]) = take(&mut data, 1) else {
            return;
        };
        let Some(packet) = take(&mut data, usize::from(packet_len % 17)) else {
            return;
        };
        let Some(len) = take(&mut data, 2) else {
            return;
        };
        let out_len = ((le(len) % 8193) as usize).min(data.len());
        let Some(mut out) = take(&mut data, out_len) else {
            return;
        };
        let _ = dev.protocol(&tf);
        let _ = dev.parameter_len(&tf);
        match dev.execute(&tf, packet, &mut out) {
            AtaResult::Complete(c) => {
                assert!(c.data_in.len() as u64 <= MAX_TRANSFER);
                if c.is_error() {
                    assert!(c.data_in.is_empty() && c.error != 0, "{tf:x?}: {c:?}");
                }
            }
            AtaResult::Io(io) => {
                let end = io.offset.checked_add(io.len).expect("no overflow");
                assert!(end <= medium, "{io:?} beyond a {medium}-byte medium");
                match &io.kind {
                    // An ATA command moves at most 65536 sectors; a CDB's transfer length
                    // (READ(12): 2^32 blocks) is bounded by the medium alone.
                    MediumIoKind::Read | MediumIoKind::Write if !dev.is_atapi() => {
                        assert!(io.len <= MAX_TRANSFER, "{tf:x?}: {io:?}")
                    }
                    MediumIoKind::Discard(ranges) => {
                        for (o, l) in ranges {
                            assert!(*o >= io.offset && o + l <= end);
                        }
                    }
                    _ => {}
                }
                let result = match (ctrl >> 4) & 3 {
                    0 => Ok(()),
                    1 => Err(IoFailure::Medium),
                    2 => Err(IoFailure::NoSpace),
                    _ => Err(IoFailure::Other),
                };
                let c = dev.io_done(&io, result);
                assert_eq!(c.is_error(), result.is_err());
            }
        }
    }
});
