use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM_SIZE: u64 = 0x10000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A device with three files, added out of name order.
fn device() -> (FwCfg, GuestMemoryMmap) {
    let mem = memory();
    let mut dev = FwCfg::new(mem.clone());
    dev.add_file("etc/b", b"bravo".to_vec()).unwrap();
    dev.add_file("bootorder", b"xyz".to_vec()).unwrap();
    dev.add_file("etc/a", vec![0x42]).unwrap();
    (dev, mem)
}

fn select(dev: &mut FwCfg, key: u16) {
    dev.write(SELECTOR, &key.to_le_bytes());
}

fn read_data(dev: &mut FwCfg, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let mut b = [0xffu8];
            dev.read(DATA, &mut b);
            b[0]
        })
        .collect()
}

fn fill(mem: &GuestMemoryMmap, at: u64, len: usize, byte: u8) {
    mem.write_slice(&vec![byte; len], GuestAddress(at)).unwrap();
}

fn bytes(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

/// Writes the control structure at `at` and starts it the way SeaBIOS does: the low half only.
fn dma(dev: &mut FwCfg, mem: &GuestMemoryMmap, at: u64, control: u32, len: u32, dst: u64) -> u32 {
    let mut s = Vec::new();
    s.extend_from_slice(&control.to_be_bytes());
    s.extend_from_slice(&len.to_be_bytes());
    s.extend_from_slice(&dst.to_be_bytes());
    mem.write_slice(&s, GuestAddress(at)).unwrap();
    dev.write(DMA_LOW, &(at as u32).to_be_bytes());
    u32::from_be_bytes(bytes(mem, at, 4).try_into().unwrap())
}

fn select_read(key: u16) -> u32 {
    (u32::from(key) << 16) | CTL_SELECT | CTL_READ
}

#[test]
fn signature_and_features_through_the_data_port() {
    let (mut dev, _) = device();
    // The signature is selected at power-on.
    assert_eq!(read_data(&mut dev, 5), b"QEMU\0");
    select(&mut dev, ID);
    assert_eq!(read_data(&mut dev, 5), [3, 0, 0, 0, 0]);
    // A byte read at the selector port is a data read too (QEMU's combined x86 register).
    select(&mut dev, SIGNATURE);
    let mut b = [0u8];
    dev.read(SELECTOR, &mut b);
    assert_eq!(b, *b"Q");
    assert_eq!(read_data(&mut dev, 1), b"E");
}

#[test]
fn file_directory_layout_and_order() {
    let (mut dev, _) = device();
    select(&mut dev, FILE_DIR);
    let dir = read_data(&mut dev, 4 + 3 * 64 + 1);
    assert_eq!(dir[..4], [0, 0, 0, 3]);
    let entry = |i: usize| &dir[4 + i * 64..4 + (i + 1) * 64];
    let mut expect = vec![0, 0, 0, 3, 0x00, 0x20, 0, 0];
    expect.extend_from_slice(b"bootorder");
    expect.resize(64, 0);
    assert_eq!(entry(0), &expect[..]);
    assert_eq!(entry(1)[..13], *b"\0\0\0\x01\0\x21\0\0etc/a");
    assert_eq!(entry(2)[..13], *b"\0\0\0\x05\0\x22\0\0etc/b");
    assert!(entry(2)[13..].iter().all(|&b| b == 0));
    // Past the end of the directory.
    assert_eq!(dir[4 + 3 * 64], 0);
}

#[test]
fn a_selected_file_reads_bytewise_then_zeros() {
    let (mut dev, _) = device();
    select(&mut dev, 0x22);
    assert_eq!(read_data(&mut dev, 7), b"bravo\0\0");
    select(&mut dev, 0x21);
    assert_eq!(read_data(&mut dev, 2), [0x42, 0]);
    // Selecting again starts over; the old write-channel bit does not change the item.
    select(&mut dev, 0x4022);
    assert_eq!(read_data(&mut dev, 2), b"br");
    // No such item: zeros.
    select(&mut dev, 0x23);
    assert_eq!(read_data(&mut dev, 2), [0, 0]);
    select(&mut dev, 0x0004);
    assert_eq!(read_data(&mut dev, 2), [0, 0]);
}

#[test]
fn numbered_items_from_the_caller() {
    let (mut dev, _) = device();
    dev.add_item(keys::NB_CPUS, 4u16.to_le_bytes().to_vec())
        .unwrap();
    dev.add_item(ARCH_LOCAL | 3, vec![9, 8, 7]).unwrap();
    select(&mut dev, keys::NB_CPUS);
    assert_eq!(read_data(&mut dev, 3), [4, 0, 0]);
    select(&mut dev, 0x8003);
    assert_eq!(read_data(&mut dev, 4), [9, 8, 7, 0]);
    // The generic item 0x0003 is not the x86 one.
    select(&mut dev, 0x0003);
    assert_eq!(read_data(&mut dev, 1), [0]);
}

#[test]
fn dma_select_and_read() {
    let (mut dev, mem) = device();
    fill(&mem, 0x2000, 8, 0xaa);
    assert_eq!(dma(&mut dev, &mem, 0x1000, select_read(0x22), 3, 0x2000), 0);
    assert_eq!(bytes(&mem, 0x2000, 4), b"bra\xaa");
    // The offset moved: the data port and a DMA read without SELECT go on from there.
    assert_eq!(read_data(&mut dev, 1), b"v");
    assert_eq!(dma(&mut dev, &mem, 0x1000, CTL_READ, 1, 0x2003), 0);
    assert_eq!(bytes(&mem, 0x2000, 5), b"brao\xaa");
    // The 16-byte structure is left as it was, apart from the control word.
    assert_eq!(bytes(&mem, 0x1004, 4), [0, 0, 0, 1]);
    assert_eq!(bytes(&mem, 0x1008, 8), 0x2003u64.to_be_bytes());
}

#[test]
fn dma_read_past_the_end_zero_fills() {
    let (mut dev, mem) = device();
    fill(&mem, 0x3000, 0x2010, 0xaa);
    assert_eq!(dma(&mut dev, &mem, 0x1000, select_read(0x22), 8, 0x3000), 0);
    assert_eq!(bytes(&mem, 0x3000, 9), b"bravo\0\0\0\xaa");
    // Wholly past the end, longer than one zero chunk.
    assert_eq!(dma(&mut dev, &mem, 0x1000, CTL_READ, 0x2001, 0x3000), 0);
    assert!(bytes(&mem, 0x3000, 0x2001).iter().all(|&b| b == 0));
    assert_eq!(bytes(&mem, 0x5001, 1), [0xaa]);
    // An item that does not exist reads as zeros, without ERROR (OVMF stops on ERROR).
    fill(&mem, 0x3000, 4, 0xaa);
    assert_eq!(dma(&mut dev, &mem, 0x1000, select_read(0x0f), 4, 0x3000), 0);
    assert_eq!(bytes(&mem, 0x3000, 4), [0; 4]);
}

#[test]
fn dma_skip() {
    let (mut dev, mem) = device();
    let skip = (0x22 << 16) | CTL_SELECT | CTL_SKIP;
    assert_eq!(dma(&mut dev, &mem, 0x1000, skip, 2, 0xdead_0000_0000), 0);
    assert_eq!(dma(&mut dev, &mem, 0x1000, CTL_READ, 3, 0x2000), 0);
    assert_eq!(bytes(&mem, 0x2000, 3), b"avo");
    // Skipping past the end stops at the end.
    select(&mut dev, 0x22);
    assert_eq!(dma(&mut dev, &mem, 0x1000, CTL_SKIP, u32::MAX, 0), 0);
    assert_eq!(read_data(&mut dev, 1), [0]);
}

#[test]
fn dma_with_a_bad_structure_address_sets_error() {
    let (mut dev, mem) = device();
    // The structure straddles the end of RAM: only the control word can be written back.
    fill(&mem, MEM_SIZE - 4, 4, 0xaa);
    dev.write(DMA_LOW, &((MEM_SIZE - 4) as u32).to_be_bytes());
    assert_eq!(bytes(&mem, MEM_SIZE - 4, 4), [0, 0, 0, CTL_ERROR as u8]);
    // Wholly outside RAM, and at the top of the address space.
    dev.write(DMA_HIGH, &0x10_0000u64.to_be_bytes());
    dev.write(DMA_HIGH, &u64::MAX.to_be_bytes());
    dev.write(DMA_HIGH, &u32::MAX.to_be_bytes());
    dev.write(DMA_LOW, &u32::MAX.to_be_bytes());
    // The device still works.
    assert_eq!(dma(&mut dev, &mem, 0x1000, select_read(0x21), 1, 0x2000), 0);
    assert_eq!(bytes(&mem, 0x2000, 1), [0x42]);
}

#[test]
fn dma_with_a_bad_destination_sets_error_and_writes_nothing() {
    let (mut dev, mem) = device();
    fill(&mem, MEM_SIZE - 0x10, 0x10, 0xaa);
    let status = dma(
        &mut dev,
        &mem,
        0x1000,
        select_read(0x22),
        0x20,
        MEM_SIZE - 0x10,
    );
    assert_eq!(status, CTL_ERROR);
    assert_eq!(bytes(&mem, MEM_SIZE - 0x10, 0x10), [0xaa; 0x10]);
    // Nothing was consumed.
    assert_eq!(read_data(&mut dev, 1), b"b");
    for dst in [u64::MAX - 2, MEM_SIZE, 1 << 40] {
        let status = dma(&mut dev, &mem, 0x1000, CTL_READ, 4, dst);
        assert_eq!(status, CTL_ERROR, "destination {dst:#x}");
    }
    let status = dma(&mut dev, &mem, 0x1000, CTL_READ, u32::MAX, 0);
    assert_eq!(status, CTL_ERROR);
}

#[test]
fn dma_write_is_refused() {
    let (mut dev, mem) = device();
    fill(&mem, 0x2000, 5, b'X');
    let write = (0x22 << 16) | CTL_SELECT | CTL_WRITE;
    assert_eq!(dma(&mut dev, &mem, 0x1000, write, 5, 0x2000), CTL_ERROR);
    select(&mut dev, 0x22);
    assert_eq!(read_data(&mut dev, 5), b"bravo");
    // READ wins over WRITE, as in QEMU.
    let both = select_read(0x22) | CTL_WRITE;
    assert_eq!(dma(&mut dev, &mem, 0x1000, both, 5, 0x2000), 0);
    assert_eq!(bytes(&mem, 0x2000, 5), b"bravo");
}

#[test]
fn dma_address_register_forms() {
    let (mut dev, mem) = device();
    let mut s = Vec::new();
    s.extend_from_slice(&select_read(0x20).to_be_bytes());
    s.extend_from_slice(&3u32.to_be_bytes());
    s.extend_from_slice(&0x2000u64.to_be_bytes());

    // One 64-bit write at 0x514.
    mem.write_slice(&s, GuestAddress(0x1000)).unwrap();
    dev.write(DMA_HIGH, &0x1000u64.to_be_bytes());
    assert_eq!(bytes(&mem, 0x1000, 4), [0; 4]);
    assert_eq!(bytes(&mem, 0x2000, 3), b"xyz");

    // High then low half; the high half alone starts nothing.
    fill(&mem, 0x2000, 3, 0);
    mem.write_slice(&s, GuestAddress(0x1000)).unwrap();
    dev.write(DMA_HIGH, &0u32.to_be_bytes());
    assert_eq!(bytes(&mem, 0x2000, 3), [0; 3]);
    dev.write(DMA_LOW, &0x1000u32.to_be_bytes());
    assert_eq!(bytes(&mem, 0x1000, 4), [0; 4]);
    assert_eq!(bytes(&mem, 0x2000, 3), b"xyz");

    // A high half is used once: the next request with the low half alone is below 4 GiB.
    fill(&mem, 0x2000, 3, 0);
    mem.write_slice(&s, GuestAddress(0x1000)).unwrap();
    dev.write(DMA_HIGH, &1u32.to_be_bytes());
    dev.write(DMA_LOW, &0x1000u32.to_be_bytes());
    assert_eq!(bytes(&mem, 0x2000, 3), [0; 3]);
    dev.write(DMA_LOW, &0x1000u32.to_be_bytes());
    assert_eq!(bytes(&mem, 0x2000, 3), b"xyz");

    // Other sizes start nothing.
    fill(&mem, 0x2000, 3, 0);
    mem.write_slice(&s, GuestAddress(0x1000)).unwrap();
    dev.write(DMA_LOW, &[0x10, 0x00]);
    dev.write(DMA_LOW + 3, &[0x00]);
    dev.write(DMA_LOW, &0x1000u64.to_be_bytes()[..2]);
    assert_eq!(bytes(&mem, 0x2000, 3), [0; 3]);
}

#[test]
fn the_dma_register_reads_as_its_signature() {
    let (mut dev, _) = device();
    let mut q = [0u8; 8];
    dev.read(DMA_HIGH, &mut q);
    assert_eq!(q, *b"QEMU CFG");
    assert_eq!(u64::from_be_bytes(q), 0x5145_4d55_2043_4647);
    let mut d = [0u8; 4];
    dev.read(DMA_LOW, &mut d);
    assert_eq!(d, *b" CFG");
    let mut b = [0u8; 1];
    dev.read(DMA_HIGH + 1, &mut b);
    assert_eq!(b, *b"E");
    // An access running past the register (the bus refuses these) reads zeros.
    dev.read(DMA_LOW + 2, &mut d);
    assert_eq!(d, [0; 4]);
}

#[test]
fn odd_port_accesses_are_harmless() {
    let (mut dev, _) = device();
    select(&mut dev, 0x22);
    // Data writes are ignored (QEMU removed them in 2.4); so is a 1-byte selector write.
    dev.write(DATA, &[0x20]);
    dev.write(SELECTOR, &[0x20]);
    dev.write(SELECTOR, &[0x20, 0, 0, 0]);
    dev.write(2, &[1, 2]);
    dev.write(u64::MAX, &[1]);
    let mut w = [0xffu8; 4];
    dev.read(SELECTOR, &mut w);
    assert_eq!(w, [0; 4]);
    let mut b = [0xffu8; 1];
    dev.read(3, &mut b);
    assert_eq!(b, [0]);
    dev.read(u64::MAX, &mut b);
    dev.read(DATA, &mut []);
    dev.write(DMA_HIGH, &[]);
    // The selection and offset are untouched.
    assert_eq!(read_data(&mut dev, 5), b"bravo");
}

#[test]
fn add_file_name_rules() {
    let mut dev = FwCfg::new(memory());
    let longest = "n".repeat(55);
    dev.add_file(&longest, vec![1]).unwrap();
    let too_long = "n".repeat(56);
    assert_eq!(
        dev.add_file(&too_long, vec![]),
        Err(FwCfgError::BadName(too_long.clone()))
    );
    assert!(matches!(
        dev.add_file("", vec![]),
        Err(FwCfgError::BadName(_))
    ));
    assert!(matches!(
        dev.add_file("etc/a\0b", vec![]),
        Err(FwCfgError::BadName(_))
    ));
    assert_eq!(
        dev.add_file(&longest, vec![2]),
        Err(FwCfgError::DuplicateFile(longest.clone()))
    );
    // The 55-byte name fills the entry with one NUL left.
    select(&mut dev, FILE_DIR);
    let dir = read_data(&mut dev, 4 + 64);
    assert_eq!(dir[..12], [0, 0, 0, 1, 0, 0, 0, 1, 0, 0x20, 0, 0]);
    assert_eq!(&dir[12..67], longest.as_bytes());
    assert_eq!(dir[67], 0);
}

#[test]
fn add_item_key_rules() {
    let mut dev = FwCfg::new(memory());
    for key in [SIGNATURE, ID, FILE_DIR] {
        assert_eq!(dev.add_item(key, vec![]), Err(FwCfgError::ReservedKey(key)));
    }
    for key in [FILE_FIRST, 0x3fff, 0x4005, 0xc000] {
        assert_eq!(dev.add_item(key, vec![]), Err(FwCfgError::NotNumbered(key)));
    }
    dev.add_item(keys::BOOT_MENU, vec![1, 0]).unwrap();
    assert_eq!(
        dev.add_item(keys::BOOT_MENU, vec![]),
        Err(FwCfgError::DuplicateKey(keys::BOOT_MENU))
    );
    dev.add_item(0x8000, vec![]).unwrap();
    dev.add_item(0x801f, vec![]).unwrap();
}
