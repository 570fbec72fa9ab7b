//! The guest buffers a PRDT describes, as a scatter-gather list, and data moved through it.
//! Every address comes from the guest: vm-memory checks each access.

use ferry_storage::Disk;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::fis::{PRDT_OFFSET, PRD_SIZE};
use crate::ata::{AtaIo, DataOut, IoFailure, MediumIoKind};

/// (guest address, length) pieces.
pub type Sg = Vec<(GuestAddress, usize)>;

/// Bytes one PRD entry can describe (AHCI 1.3.1, 4.2.3.3: DBC is 22 bits, byte count - 1).
const PRD_MAX: usize = 1 << 22;
/// Bounce buffer size for transfers done without an I/O engine.
const CHUNK: usize = 1 << 20;

/// Reads the `prdtl` entries of the command table at `ctba`; None if the table is not in
/// guest memory.
pub fn read_prdt(mem: &GuestMemoryMmap, ctba: u64, prdtl: u16) -> Option<Sg> {
    let mut sg = Vec::with_capacity(usize::from(prdtl));
    for i in 0..u64::from(prdtl) {
        let mut e = [0u8; PRD_SIZE as usize];
        let addr = ctba.checked_add(PRDT_OFFSET + i * PRD_SIZE)?;
        mem.read_slice(&mut e, GuestAddress(addr)).ok()?;
        let dw =
            |j: usize| u32::from_le_bytes([e[j * 4], e[j * 4 + 1], e[j * 4 + 2], e[j * 4 + 3]]);
        // Bit 0 of DBA is reserved: data buffers are word aligned.
        let dba = (u64::from(dw(0)) & !1) | (u64::from(dw(1)) << 32);
        let dbc = ((dw(3) as usize) & (PRD_MAX - 1)) + 1;
        sg.push((GuestAddress(dba), dbc));
    }
    Some(sg)
}

/// The first `n` bytes of `sg`, or None if it is shorter.
pub fn take(sg: &Sg, n: u64) -> Option<Sg> {
    let mut out = Vec::new();
    let mut left = n;
    for &(addr, l) in sg {
        if left == 0 {
            break;
        }
        let piece = (l as u64).min(left);
        out.push((addr, piece as usize));
        left -= piece;
    }
    (left == 0).then_some(out)
}

/// Copies `data` into `sg` as far as it reaches; returns the bytes written (stops at the
/// first piece outside guest memory).
pub fn write(mem: &GuestMemoryMmap, sg: &Sg, data: &[u8]) -> usize {
    let mut done = 0;
    for &(addr, l) in sg {
        if done == data.len() {
            break;
        }
        let n = l.min(data.len() - done);
        if mem.write_slice(&data[done..done + n], addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// The host's Data-Out buffer for commands that carry parameters, read from `sg` in order.
pub struct SgReader<'a> {
    mem: &'a GuestMemoryMmap,
    sg: &'a Sg,
    piece: usize,
    offset: usize,
    left: usize,
}

impl<'a> SgReader<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, sg: &'a Sg) -> Self {
        Self {
            mem,
            sg,
            piece: 0,
            offset: 0,
            left: sg.iter().map(|&(_, l)| l).sum(),
        }
    }
}

impl DataOut for SgReader<'_> {
    fn len(&self) -> usize {
        self.left
    }

    fn read(&mut self, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let Some(&(addr, l)) = self.sg.get(self.piece) else {
                break;
            };
            let n = (l - self.offset).min(buf.len() - done);
            let at = GuestAddress(addr.0.wrapping_add(self.offset as u64));
            if self.mem.read_slice(&mut buf[done..done + n], at).is_err() {
                // Outside guest memory: the rest reads as absent.
                self.left = 0;
                self.piece = self.sg.len();
                break;
            }
            done += n;
            self.left -= n;
            self.offset += n;
            if self.offset == l {
                self.piece += 1;
                self.offset = 0;
            }
        }
        done
    }
}

/// Performs `io` through the image layer on this thread: for units without an I/O engine
/// (a medium the host changed) and for the rare discard and zeroing requests. `sg` holds
/// exactly `io.len` bytes for reads and writes.
pub fn perform(disk: &Disk, io: &AtaIo, sg: &Sg, mem: &GuestMemoryMmap) -> Result<(), IoFailure> {
    match &io.kind {
        MediumIoKind::Read | MediumIoKind::Write => {
            let mut buf = vec![0u8; (io.len as usize).min(CHUNK)];
            let mut offset = io.offset;
            for &(addr, l) in sg {
                let mut done = 0usize;
                while done < l {
                    let n = (l - done).min(buf.len());
                    let at = GuestAddress(addr.0.wrapping_add(done as u64));
                    if matches!(io.kind, MediumIoKind::Read) {
                        disk.read_at(&mut buf[..n], offset)
                            .map_err(|e| IoFailure::from_storage(&e))?;
                        mem.write_slice(&buf[..n], at)
                            .map_err(|_| IoFailure::Other)?;
                    } else {
                        mem.read_slice(&mut buf[..n], at)
                            .map_err(|_| IoFailure::Other)?;
                        disk.write_at(&buf[..n], offset)
                            .map_err(|e| IoFailure::from_storage(&e))?;
                    }
                    done += n;
                    offset += n as u64;
                }
            }
            if io.fua && matches!(io.kind, MediumIoKind::Write) {
                disk.flush().map_err(|e| IoFailure::from_storage(&e))?;
            }
            Ok(())
        }
        MediumIoKind::WriteZeroes => {
            let buf = vec![0u8; (io.len as usize).min(CHUNK)];
            let mut done = 0u64;
            while done < io.len {
                let n = (io.len - done).min(buf.len() as u64) as usize;
                disk.write_at(&buf[..n], io.offset + done)
                    .map_err(|e| IoFailure::from_storage(&e))?;
                done += n as u64;
            }
            Ok(())
        }
        MediumIoKind::Flush => disk.flush().map_err(|e| IoFailure::from_storage(&e)),
        MediumIoKind::Discard(ranges) => ranges
            .iter()
            .try_for_each(|&(off, n)| disk.discard(off, n))
            .map_err(|e| IoFailure::from_storage(&e)),
    }
}
