//! The UEFI variable store's flash (`ferry_devices::pflash`), driven by guest reads and writes
//! anywhere in and just past its window. Beyond "never panic", it checks the seam the vmm
//! relies on: the mapping hears about read-array mode only on changes, alternating; changes
//! arrive only while read-array mode is off; a copy kept from the change calls, and one kept
//! from the persistence sink, both equal the store; and a read in read-array mode returns it.
//!
//! Flash: 4 blocks (16 KiB). Input: a sequence of operations, each starting with one control
//! byte:
//!
//! ```text
//! ctrl bits 0..=1  kind: 0 read, 1 write, 2 one-byte command from a table, 3 reset
//! ctrl bits 2..=4  kinds 0/1: size 1, 2, 4, 8, 3, 0, 16, 1
//! next 2 bytes     kinds 0..=2: offset, little endian, modulo the flash size + 8
//! next `size` bytes   data for writes
//! kind 2: one byte, indexing the command table
//! ```
#![no_main]

use std::sync::{Arc, Mutex};

use ferry_devices::pflash::{Pflash, PflashMapping, PFLASH_BLOCK_SIZE};
use ferry_devices::BusDevice;
use libfuzzer_sys::fuzz_target;

const LEN: usize = 4 * PFLASH_BLOCK_SIZE;
const SIZES: [usize; 8] = [1, 2, 4, 8, 3, 0, 16, 1];
const COMMANDS: [u8; 12] = [
    0x10, 0x20, 0x40, 0x50, 0x70, 0x90, 0xd0, 0xff, 0x00, 0xf0, 0x98, 0x60,
];

#[derive(Default)]
struct Shadow {
    mapped: Vec<u8>,
    /// What the last read_array call said; the device starts in read-array mode.
    read_array: bool,
}

struct Mapping(Arc<Mutex<Shadow>>);

impl PflashMapping for Mapping {
    fn read_array(&mut self, active: bool) {
        let mut s = self.0.lock().unwrap();
        assert_ne!(s.read_array, active, "read_array({active}) repeated");
        s.read_array = active;
    }
    fn changed(&mut self, offset: u64, bytes: &[u8]) {
        let mut s = self.0.lock().unwrap();
        assert!(!s.read_array, "a change while the store is mapped");
        let o = offset as usize;
        s.mapped[o..o + bytes.len()].copy_from_slice(bytes);
    }
}

fn initial() -> Vec<u8> {
    let mut v: Vec<u8> = (0..LEN).map(|i| (i * 7) as u8).collect();
    v[..16].fill(0);
    v
}

fuzz_target!(|data: &[u8]| {
    let mut input = data.iter().copied();
    let mut flash = Pflash::new(initial()).expect("valid size");
    let shadow = Arc::new(Mutex::new(Shadow {
        mapped: initial(),
        read_array: true,
    }));
    let file = Arc::new(Mutex::new(initial()));
    flash.set_mapping(Box::new(Mapping(shadow.clone())));
    let sink = file.clone();
    flash.set_persist(Box::new(move |offset, bytes| {
        let o = offset as usize;
        sink.lock().unwrap()[o..o + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }));

    while let Some(ctrl) = input.next() {
        let kind = ctrl & 3;
        if kind == 3 {
            flash.reset();
        } else {
            let off = u64::from(u16::from_le_bytes([
                input.next().unwrap_or(0),
                input.next().unwrap_or(0),
            ])) % (LEN as u64 + 8);
            let size = SIZES[usize::from((ctrl >> 2) & 7)];
            match kind {
                0 => {
                    let mut buf = vec![0u8; size];
                    let array = flash.in_read_array();
                    flash.read(off, &mut buf);
                    let o = off as usize;
                    if array && o + size <= LEN {
                        assert_eq!(&buf[..], &flash.bytes()[o..o + size]);
                    }
                }
                1 => {
                    let buf: Vec<u8> = (0..size).map(|_| input.next().unwrap_or(0)).collect();
                    flash.write(off, &buf);
                }
                _ => {
                    let cmd = COMMANDS[usize::from(input.next().unwrap_or(0)) % COMMANDS.len()];
                    flash.write(off, &[cmd]);
                }
            }
        }
        let s = shadow.lock().unwrap();
        assert_eq!(s.read_array, flash.in_read_array());
        assert!(s.mapped == flash.bytes(), "mapped copy diverged");
        assert!(
            *file.lock().unwrap() == flash.bytes(),
            "persisted copy diverged"
        );
    }
});
