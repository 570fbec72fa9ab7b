//! Guest RAM: anonymous memory whose host addresses sit on 2 MiB boundaries, as its guest
//! addresses do, and which asks for transparent huge pages.
//!
//! Why: the hypervisor maps guest memory with large pages only where the host address and
//! the guest address agree modulo the large-page size (KVM checks this per memory slot), and
//! the host backs memory with huge pages only where it asks for them (THP in `madvise`
//! mode, the default of many distributions). An `mmap` of its own lands on any page, so a
//! guest's every TLB miss would walk 4 KiB host mappings. QEMU aligns and advises the same way.

use std::io;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// The large-page size of x86-64 (and of arm64 with 4 KiB pages).
const LARGE_PAGE: usize = 2 << 20;
/// How guest RAM is mapped: by `map_aligned`, and as vm-memory is told it was.
const PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// The guest's memory and the host mappings behind it, unmapped when this is dropped and
/// nothing else still holds them.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    /// The mappings this owns (vm-memory's regions over them are not owners).
    maps: Vec<Arc<MmapRegion>>,
}

impl GuestRam {
    /// Maps `ranges` (guest address, bytes; each guest address on a large-page boundary).
    pub fn new(ranges: &[(GuestAddress, usize)]) -> io::Result<Self> {
        // Built up in place: on an error, dropping `ram` unmaps what was mapped so far.
        let mut ram = Self {
            mem: GuestMemoryMmap::new(),
            maps: Vec::with_capacity(ranges.len()),
        };
        let mut regions = Vec::with_capacity(ranges.len());
        for &(gpa, len) in ranges {
            let addr = map_aligned(len)?;
            // SAFETY: [addr, addr + len) is a private anonymous mapping made just above, which
            // `ram` keeps mapped until no region built on it is left (see Drop).
            let built = unsafe {
                MmapRegionBuilder::new(len)
                    .with_mmap_prot(PROT)
                    .with_mmap_flags(FLAGS)
                    .with_raw_mmap_pointer(addr as *mut u8)
            }
            .build();
            let region = match built {
                Ok(r) => Arc::new(r),
                Err(e) => {
                    unmap(addr, len);
                    return Err(io::Error::other(e.to_string()));
                }
            };
            ram.maps.push(region.clone());
            let guest_region = GuestRegionMmap::with_arc(region, gpa).ok_or_else(|| {
                io::Error::other(format!("guest range at {:#x} overflows", gpa.0))
            })?;
            regions.push(guest_region);
        }
        ram.mem =
            GuestMemoryMmap::from_regions(regions).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(ram)
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // Let go of this handle's regions first: what counts is who else holds them.
        self.mem = GuestMemoryMmap::new();
        for region in self.maps.drain(..) {
            let (addr, len) = (region.as_ptr() as usize, region.size());
            // Still held elsewhere (an I/O engine that could not stop its host requests keeps
            // guest memory on purpose): the kernel may yet write there, so it stays mapped.
            if Arc::strong_count(&region) > 1 {
                tracing::warn!("guest memory at {addr:#x} is still in use; left mapped");
                std::mem::forget(region);
                continue;
            }
            drop(region);
            unmap(addr, len);
        }
    }
}

/// An anonymous read-write mapping of `len` bytes starting on a large-page boundary, marked
/// for huge pages. Maps a large page more than asked, then gives back the ends.
fn map_aligned(len: usize) -> io::Result<usize> {
    if len == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let padded = len
        .checked_add(LARGE_PAGE)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new private anonymous mapping at an address the kernel picks; no existing
    // memory is touched.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), padded, PROT, FLAGS, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let start = base.next_multiple_of(LARGE_PAGE);
    let head = start - base;
    let tail = padded - head - len;
    if head > 0 {
        unmap(base, head);
    }
    if tail > 0 {
        unmap(start + len, tail);
    }
    advise_huge_pages(start, len);
    Ok(start)
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(addr: usize, len: usize) {
    // SAFETY: advice on a mapping this module owns; it changes no contents.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    if r != 0 {
        // A kernel without THP: the memory works the same with small pages.
        tracing::debug!(
            "guest memory: no transparent huge pages: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_addr: usize, _len: usize) {}

fn unmap(addr: usize, len: usize) {
    // SAFETY: [addr, addr + len) is (part of) a mapping this module made and nothing uses any
    // longer (checked by the callers).
    if unsafe { libc::munmap(addr as *mut libc::c_void, len) } != 0 {
        tracing::warn!(
            "guest memory: munmap failed: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn ram_is_large_page_aligned_and_usable() {
        let ranges = [(GuestAddress(0), 6 << 20), (GuestAddress(1 << 32), 4 << 20)];
        let ram = GuestRam::new(&ranges).unwrap();
        let mem = ram.memory();
        assert_eq!(mem.num_regions(), 2);
        for r in mem.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap();
            assert_eq!(
                host as usize % LARGE_PAGE,
                0,
                "region at {:#x}",
                r.start_addr().0
            );
        }
        mem.write_obj(0x1234_5678u32, GuestAddress((6 << 20) - 4))
            .unwrap();
        mem.write_obj(7u64, GuestAddress((1 << 32) + (4 << 20) - 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((6 << 20) - 4)).unwrap(),
            0x1234_5678
        );
        assert!(mem.read_obj::<u8>(GuestAddress(6 << 20)).is_err());
    }

    #[test]
    fn memory_still_held_elsewhere_stays_mapped() {
        let ram = GuestRam::new(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let kept = ram.memory().clone();
        drop(ram);
        // Unmapped, this would fault.
        kept.write_obj(0xabu8, GuestAddress(4096)).unwrap();
        assert_eq!(kept.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0xab);
    }
}
