//! The transfer mode SET FEATURES 03h selects (ACS-3 SET FEATURES, Set transfer mode), and how IDENTIFY
//! words 63, 64 and 88 report the supported and selected modes. The mode changes no timing
//! here; it is kept so IDENTIFY tells the host what it chose.

/// Highest modes supported: PIO 4, multiword DMA 2, Ultra DMA 6.
const MAX_PIO: u8 = 4;
const MAX_MWDMA: u8 = 2;
const MAX_UDMA: u8 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DmaMode {
    Multiword(u8),
    Ultra(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TransferMode {
    dma: DmaMode,
}

impl Default for TransferMode {
    /// The power-on default: the fastest Ultra DMA mode, as SATA devices report it.
    fn default() -> Self {
        Self {
            dma: DmaMode::Ultra(MAX_UDMA),
        }
    }
}

impl TransferMode {
    /// SET FEATURES 03h with `count`'s low byte; false (ABRT) for a mode not supported.
    /// A PIO mode leaves the DMA selection alone; a DMA mode replaces the other kind's.
    pub fn set(&mut self, count: u8) -> bool {
        let mode = count & 0x07;
        match count >> 3 {
            // 00h/01h: PIO default mode (with or without IORDY).
            0 => mode <= 1,
            // 00001nnn: PIO flow control mode n.
            0b00001 => mode <= MAX_PIO,
            // 00100nnn: multiword DMA mode n.
            0b00100 if mode <= MAX_MWDMA => {
                self.dma = DmaMode::Multiword(mode);
                true
            }
            // 01000nnn: Ultra DMA mode n.
            0b01000 if mode <= MAX_UDMA => {
                self.dma = DmaMode::Ultra(mode);
                true
            }
            _ => false,
        }
    }

    /// IDENTIFY word 63: multiword DMA modes 0-2 supported (bits 0..3) and the one selected
    /// (bits 8..11).
    pub fn word63(&self) -> u16 {
        let selected = match self.dma {
            DmaMode::Multiword(m) => 1 << (8 + m),
            DmaMode::Ultra(_) => 0,
        };
        0x0007 | selected
    }

    /// IDENTIFY word 64: PIO modes 3 and 4 supported.
    pub fn word64(&self) -> u16 {
        0x0003
    }

    /// IDENTIFY word 88: Ultra DMA modes 0-6 supported (bits 0..7) and the one selected
    /// (bits 8..15).
    pub fn word88(&self) -> u16 {
        let selected = match self.dma {
            DmaMode::Ultra(m) => 1 << (8 + m),
            DmaMode::Multiword(_) => 0,
        };
        0x007f | selected
    }
}
