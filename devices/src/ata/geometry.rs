//! CHS geometry: the default one IDENTIFY words 1, 3 and 6 report, the current one INITIALIZE
//! DEVICE PARAMETERS sets (words 54-58), and CHS to LBA translation (ATA-5, CHS addressing; CHS is
//! obsolete since ATA-6 but BIOSes and DOS-era drivers still address with it).

/// The largest default geometry (ATA-5 Annex B: 16383 cylinders, 16 heads, 63 sectors),
/// which every tool reports for disks of 8 GiB and more.
const MAX_CYLINDERS: u64 = 16383;
const DEFAULT_HEADS: u64 = 16;
const DEFAULT_SECTORS: u64 = 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub cylinders: u64,
    pub heads: u64,
    pub sectors: u64,
}

impl Geometry {
    /// The default geometry of a disk of `total` sectors: 16 heads, 63 sectors per track,
    /// as many cylinders as fit, at most 16383.
    pub fn default_for(total: u64) -> Self {
        Self {
            cylinders: (total / (DEFAULT_HEADS * DEFAULT_SECTORS)).min(MAX_CYLINDERS),
            heads: DEFAULT_HEADS,
            sectors: DEFAULT_SECTORS,
        }
    }

    /// The geometry INITIALIZE DEVICE PARAMETERS asks for (`heads` 1..=16, `sectors`
    /// 1..=255); cylinders as many as fit in 16 bits (IDENTIFY word 54).
    pub fn with(total: u64, heads: u64, sectors: u64) -> Option<Self> {
        if heads == 0 || sectors == 0 {
            return None;
        }
        Some(Self {
            cylinders: (total / (heads * sectors)).min(0xffff),
            heads,
            sectors,
        })
    }

    /// Sectors addressable through this geometry (IDENTIFY words 57-58).
    pub fn capacity(&self) -> u64 {
        self.cylinders * self.heads * self.sectors
    }

    /// The LBA of (cylinder, head, sector), or None when the address lies outside the
    /// geometry (sector numbers start at 1).
    pub fn lba_of(self, (c, h, s): (u64, u64, u64)) -> Option<u64> {
        if s == 0 || s > self.sectors || h >= self.heads || c >= self.cylinders {
            return None;
        }
        Some((c * self.heads + h) * self.sectors + s - 1)
    }
}
