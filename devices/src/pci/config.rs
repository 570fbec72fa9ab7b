//! A type-0 configuration header with per-byte write masks, shared by every PCI function:
//! BARs (sized by the guest writing all ones, as the PCI spec has it) and a capability list.

pub const CONFIG_SPACE_SIZE: usize = 256;

const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
const STATUS_CAPABILITIES: u8 = 1 << 4;
const COMMAND_IO: u16 = 1 << 0;
const COMMAND_MEMORY: u16 = 1 << 1;
/// Capabilities live after the standard header.
const FIRST_CAPABILITY: usize = 0x40;

pub const BAR_COUNT: usize = 6;

/// What a base address register decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32,
    /// Takes this BAR and the next one.
    Memory64,
}

/// A BAR as the guest has programmed it, while its decoding is enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRange {
    pub index: usize,
    pub kind: BarKind,
    pub base: u64,
    pub size: u64,
}

impl BarRange {
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.size
    }
}

pub struct PciConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<(BarKind, u64)>; BAR_COUNT],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfigSpace {
    /// A header with the given identity; `class` is (base class, subclass, prog-if).
    pub fn new(vendor: u16, device: u16, revision: u8, class: (u8, u8, u8)) -> Self {
        let mut s = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        s.bytes[0..2].copy_from_slice(&vendor.to_le_bytes());
        s.bytes[2..4].copy_from_slice(&device.to_le_bytes());
        s.bytes[8] = revision;
        s.bytes[9] = class.2;
        s.bytes[10] = class.1;
        s.bytes[11] = class.0;
        // Command register: I/O, memory, bus master, parity, SERR, INTx disable.
        s.set_writable(COMMAND, &[0x47, 0x05]);
        s
    }

    /// Sets an initial value the guest cannot change.
    pub fn set(&mut self, offset: usize, value: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + value.len()) {
            dst.copy_from_slice(value);
        }
    }

    /// Marks bits the guest may change.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = self.writable.get_mut(offset..offset + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Subsystem vendor and device IDs.
    pub fn set_subsystem(&mut self, vendor: u16, device: u16) {
        self.set(0x2c, &vendor.to_le_bytes());
        self.set(0x2e, &device.to_le_bytes());
    }

    /// INTx pin (1 = INTA) and a writable interrupt line register for the guest's notes.
    pub fn set_interrupt_pin(&mut self, pin: u8, line: u8) {
        self.set(INTERRUPT_PIN, &[pin]);
        self.set(INTERRUPT_LINE, &[line]);
        self.set_writable(INTERRUPT_LINE, &[0xff]);
    }

    /// Declares BAR `index` of `size` bytes (a power of two; at least 16 for memory, 4 for I/O).
    /// The guest sizes it by writing all ones and reading back the mask.
    pub fn add_bar(&mut self, index: usize, kind: BarKind, size: u64) {
        let last = if kind == BarKind::Memory64 {
            index + 1
        } else {
            index
        };
        if last >= BAR_COUNT || !size.is_power_of_two() {
            return;
        }
        let size = size.max(if kind == BarKind::Io { 4 } else { 16 });
        let mask = !(size - 1);
        let (flags, low_mask) = match kind {
            BarKind::Io => (0x1u32, (mask as u32) & !0x3),
            BarKind::Memory32 => (0x0, (mask as u32) & !0xf),
            BarKind::Memory64 => (0x4, (mask as u32) & !0xf),
        };
        let reg = BAR0 + index * 4;
        self.set(reg, &flags.to_le_bytes());
        self.set_writable(reg, &low_mask.to_le_bytes());
        if kind == BarKind::Memory64 {
            self.set_writable(reg + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some((kind, size));
    }

    /// The BARs this function declares: (index, kind, size).
    pub fn declared_bars(&self) -> Vec<(usize, BarKind, u64)> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|(k, s)| (i, k, s)))
            .collect()
    }

    /// The BARs that currently decode: programmed, non-zero and enabled in the command register.
    pub fn bar_ranges(&self) -> Vec<BarRange> {
        let command = u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]]);
        let mut out = Vec::new();
        for (index, kind, size) in self.declared_bars() {
            let reg = BAR0 + index * 4;
            let low = u64::from(self.read_dword(reg / 4));
            let base = match kind {
                BarKind::Io if command & COMMAND_IO != 0 => low & !0x3,
                BarKind::Memory32 if command & COMMAND_MEMORY != 0 => low & !0xf,
                BarKind::Memory64 if command & COMMAND_MEMORY != 0 => {
                    (u64::from(self.read_dword(reg / 4 + 1)) << 32) | (low & !0xf)
                }
                _ => continue,
            };
            if base != 0 {
                out.push(BarRange {
                    index,
                    kind,
                    base,
                    size,
                });
            }
        }
        out
    }

    /// Appends a capability with `id` and `body` (the bytes after ID and next pointer) to the
    /// list; `writable` masks the body bytes the guest may change. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> Option<usize> {
        let offset = self.next_capability;
        // Capabilities are dword aligned and must fit in the space.
        let len = 2 + body.len();
        if offset + len > CONFIG_SPACE_SIZE {
            return None;
        }
        self.set(offset, &[id, 0]);
        self.set(offset + 2, body);
        self.set_writable(offset + 2, &writable[..writable.len().min(body.len())]);
        match self.last_capability {
            Some(prev) => self.bytes[prev + 1] = offset as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = offset as u8;
                self.bytes[STATUS] |= STATUS_CAPABILITIES;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (offset + len + 3) & !3;
        Some(offset)
    }

    /// The raw bytes at `offset` (for a device to read its own capability registers).
    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        self.bytes.get(offset..offset + len).unwrap_or(&[])
    }

    pub fn read_dword(&self, reg: usize) -> u32 {
        let off = reg * 4;
        match self.bytes.get(off..off + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0xffff_ffff,
        }
    }

    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let base = reg * 4 + offset;
        for (i, &v) in data.iter().enumerate() {
            let Some(mask) = self.writable.get(base + i).copied() else {
                return;
            };
            let b = &mut self.bytes[base + i];
            *b = (*b & !mask) | (v & mask);
        }
    }
}

/// Whether a configuration write to dword `reg` can change which BARs decode where.
pub fn affects_bars(reg: usize) -> bool {
    reg == COMMAND / 4 || (BAR0 / 4..BAR0 / 4 + BAR_COUNT).contains(&reg)
}

/// A chipset function that is nothing but its configuration space (host bridge, ISA bridge,
/// PIIX4 PM): the registers firmware programs, kept for it to read back.
impl super::PciDevice for PciConfigSpace {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.read_dword(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.write(reg, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_read_only_bits() {
        let mut c = PciConfigSpace::new(0x8086, 0x1237, 2, (6, 0, 0));
        assert_eq!(c.read_dword(0), 0x1237_8086);
        assert_eq!(c.read_dword(2), 0x0600_0002);
        c.write(0, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read_dword(0), 0x1237_8086);
        c.write(1, 0, &[0xff, 0xff]);
        assert_eq!(c.read_dword(1) & 0xffff, 0x0547);
        assert_eq!(c.read_dword(64), 0xffff_ffff);
        c.write(63, 3, &[1, 2, 3]); // runs off the end: ignored, no panic
    }

    #[test]
    fn bars_size_and_decode() {
        let mut c = PciConfigSpace::new(0x1af4, 0x1048, 1, (1, 0, 0));
        c.add_bar(0, BarKind::Memory32, 0x4000);
        c.add_bar(2, BarKind::Memory64, 0x1_0000);
        c.add_bar(4, BarKind::Io, 0x40);
        // Sizing: all ones reads back the size mask with the type bits.
        c.write(4, 0, &[0xff; 4]);
        assert_eq!(c.read_dword(4), 0xffff_c000);
        c.write(6, 0, &[0xff; 4]);
        c.write(7, 0, &[0xff; 4]);
        assert_eq!(c.read_dword(6), 0xffff_0004);
        assert_eq!(c.read_dword(7), 0xffff_ffff);
        c.write(8, 0, &[0xff; 4]);
        assert_eq!(c.read_dword(8), 0xffff_ffc1);
        // Programmed but not enabled: nothing decodes.
        c.write(4, 0, &0xc000_0000u32.to_le_bytes());
        c.write(6, 0, &0x0000_0000u32.to_le_bytes());
        c.write(7, 0, &0x1u32.to_le_bytes());
        c.write(8, 0, &0xc040u32.to_le_bytes());
        assert!(c.bar_ranges().is_empty());
        c.write(1, 0, &[0x2, 0]);
        let r = c.bar_ranges();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].base, r[0].size), (0xc000_0000, 0x4000));
        assert_eq!((r[1].base, r[1].kind), (0x1_0000_0000, BarKind::Memory64));
        c.write(1, 0, &[0x3, 0]);
        assert_eq!(c.bar_ranges()[2].base, 0xc040);
        assert!(r[0].contains(0xc000_3fff) && !r[0].contains(0xc000_4000));
    }

    #[test]
    fn capability_list_links() {
        let mut c = PciConfigSpace::new(0x1af4, 0x1048, 1, (1, 0, 0));
        let a = c.add_capability(0x11, &[0; 10], &[0, 0xc0]).unwrap();
        let b = c.add_capability(0x09, &[14, 1, 0, 0], &[]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4c);
        assert_eq!(c.read_dword(1) >> 16 & 0x10, 0x10);
        assert_eq!(c.read_dword(0x34 / 4) & 0xff, 0x40);
        assert_eq!(c.bytes(0x40, 2), &[0x11, 0x4c]);
        assert_eq!(c.bytes(0x4c, 3), &[0x09, 0, 14]);
        // Only the masked bits of the body are writable.
        c.write(0x40 / 4, 2, &[0xff, 0xff]);
        assert_eq!(c.bytes(0x42, 2), &[0, 0xc0]);
        assert!(c.add_capability(0x09, &[0; 250], &[]).is_none());
    }
}
