//! Host I/O vectors: guest scatter-gather lists turned into host addresses (bounds-checked
//! against guest memory), aligned bounce buffers for O_DIRECT, and the vectored system calls
//! the thread pool makes on them.

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::RawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::request::IoError;

/// Host memory an I/O reads into or writes from: either guest memory (the engine holds a
/// clone of the guest memory map, so the mapping outlives the request) or a bounce buffer
/// owned by the same in-flight request.
pub(crate) struct Iovecs(Vec<libc::iovec>);

// SAFETY: the pointers refer to guest memory kept mapped by the engine's GuestMemoryMmap
// clone, or to a bounce buffer owned by the same in-flight request; neither is tied to a
// thread, and the engine hands a request to one thread at a time.
unsafe impl Send for Iovecs {}

impl Iovecs {
    /// Host addresses of every byte of `sg`, split where guest memory regions end.
    pub(crate) fn from_guest(
        mem: &GuestMemoryMmap,
        sg: &[(GuestAddress, usize)],
    ) -> Result<Self, IoError> {
        let mut v = Vec::with_capacity(sg.len());
        for &(addr, len) in sg {
            let bad = IoError::BadGuestMemory { addr: addr.0, len };
            if len == 0 {
                continue;
            }
            // checked_add first: get_slices would otherwise walk off a wrapped address.
            if addr.0.checked_add(len as u64).is_none() || !mem.check_range(addr, len) {
                return Err(bad);
            }
            for slice in mem.get_slices(addr, len) {
                let slice = slice.map_err(|_| IoError::BadGuestMemory { addr: addr.0, len })?;
                v.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        Ok(Self(v))
    }

    pub(crate) fn from_buf(buf: &mut AlignedBuf) -> Self {
        Self(vec![libc::iovec {
            iov_base: buf.ptr.cast(),
            iov_len: buf.len,
        }])
    }

    /// Whether O_DIRECT takes these as they are: every base aligned to `mem_align`, every
    /// length a multiple of `len_align`.
    pub(crate) fn aligned(&self, mem_align: usize, len_align: usize) -> bool {
        self.0.iter().all(|v| {
            (v.iov_base as usize).is_multiple_of(mem_align) && v.iov_len.is_multiple_of(len_align)
        })
    }

    pub(crate) fn as_ptr(&self) -> *const libc::iovec {
        self.0.as_ptr()
    }

    pub(crate) fn count(&self) -> usize {
        self.0.len()
    }
}

/// Reads `len` bytes at `offset` into `iov`, going on after short reads; bytes past the end
/// of the file read as zeros.
pub(crate) fn preadv_all(fd: RawFd, iov: &Iovecs, offset: u64) -> io::Result<usize> {
    vectored(fd, iov, offset, false)
}

/// Writes every byte of `iov` at `offset`, going on after short writes.
pub(crate) fn pwritev_all(fd: RawFd, iov: &Iovecs, offset: u64) -> io::Result<usize> {
    vectored(fd, iov, offset, true)
}

fn vectored(fd: RawFd, iov: &Iovecs, offset: u64, write: bool) -> io::Result<usize> {
    let mut vecs = iov.0.clone();
    let total: usize = vecs.iter().map(|v| v.iov_len).sum();
    let mut first = 0usize;
    let mut done = 0usize;
    while first < vecs.len() {
        let off = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let cnt = (vecs.len() - first).min(1024) as libc::c_int;
        let n = if write {
            // SAFETY: every iovec points to live memory of its length (see `Iovecs`), and
            // `cnt` entries from `first` are within `vecs`.
            unsafe { libc::pwritev(fd, vecs[first..].as_ptr(), cnt, off) }
        } else {
            // SAFETY: as above; the memory is writable (guest RAM or our own buffer).
            unsafe { libc::preadv(fd, vecs[first..].as_ptr(), cnt, off) }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = n as usize;
        if n == 0 {
            if write {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            // End of file: the rest reads as zeros.
            for v in &vecs[first..] {
                // SAFETY: as above; the range is the iovec's own.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return Ok(total);
        }
        done += n;
        while first < vecs.len() && n >= vecs[first].iov_len {
            n -= vecs[first].iov_len;
            first += 1;
        }
        if n > 0 {
            let v = &mut vecs[first];
            // SAFETY: n < iov_len, so the new base is inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
        }
    }
    Ok(done)
}

/// A zeroed buffer aligned for O_DIRECT, used where a guest buffer is not.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer is plain owned heap memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub(crate) fn new(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1).next_power_of_two())
            .unwrap_or_else(|_| Layout::new::<u8>());
        // SAFETY: the layout's size is non-zero.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        Self { ptr, len, layout }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of at least len initialized (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) };
    }
}
