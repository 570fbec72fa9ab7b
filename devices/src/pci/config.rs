//! A type-0 configuration header with per-byte write masks, shared by every PCI function.

pub const CONFIG_SPACE_SIZE: usize = 256;

pub struct PciConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
}

impl PciConfigSpace {
    /// A header with the given identity; `class` is (base class, subclass, prog-if).
    pub fn new(vendor: u16, device: u16, revision: u8, class: (u8, u8, u8)) -> Self {
        let mut s = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
        };
        s.bytes[0..2].copy_from_slice(&vendor.to_le_bytes());
        s.bytes[2..4].copy_from_slice(&device.to_le_bytes());
        s.bytes[8] = revision;
        s.bytes[9] = class.2;
        s.bytes[10] = class.1;
        s.bytes[11] = class.0;
        // Command register: I/O, memory, bus master, parity, SERR, INTx disable.
        s.set_writable(4, &[0x47, 0x05]);
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
}
