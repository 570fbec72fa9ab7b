//! The host I/O path: the engine devices submit requests to (io_uring where the host kernel
//! offers it, a thread pool otherwise), and the bandwidth groups that gate it.
//!
//! A device's use, from the event loop thread (the controller decodes a guest command into
//! a request; bad ones are refused at `submit` and never performed):
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use ferry_storage::io::{EngineOptions, IoEngine, Request};
//! use ferry_storage::Disk;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! # let path = std::env::temp_dir().join(format!("ferry-io-doc-{}.raw", std::process::id()));
//! # std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
//! let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let disk = Arc::new(Disk::open(&path, true, &[]).unwrap());
//! let opts = EngineOptions { host_cache: false, discard: true, ..Default::default() };
//! let mut engine = IoEngine::new(disk, mem, opts).unwrap();
//! // The event loop registers engine.eventfd(); per guest command:
//! engine.submit(Request::write(4096, vec![(GuestAddress(0x1000), 4096)], 7)).unwrap();
//! engine.submit(Request::flush(8)).unwrap();
//! assert!(engine.submit(Request::read(1 << 20, vec![(GuestAddress(0), 512)], 9)).is_err());
//! // When the eventfd fires (here: wait for it), finish each request and raise the interrupt.
//! let mut finished = 0;
//! while finished < 2 {
//!     engine.wait(Duration::from_millis(100));
//!     for c in engine.completions() {
//!         assert!(c.result.is_ok(), "request {}: {:?}", c.user_data, c.result);
//!         finished += 1;
//!     }
//! }
//! # std::fs::remove_file(&path).unwrap();
//! ```

mod engine;
#[allow(unsafe_code)]
mod iovec;
mod raw_file;
mod request;
mod thread_pool;
mod throttle_timer;
#[allow(unsafe_code)]
mod uring;
#[allow(unsafe_code)]
mod work;

pub mod bwgroup;

pub use bwgroup::{
    parse_rate, BandwidthGroup, BandwidthGroupSpec, BandwidthGroups, BandwidthGroupsError,
    BandwidthSpecError,
};
pub use engine::{
    EngineChoice, EngineError, EngineKind, EngineOptions, IoEngine, IoStats, MAX_TRANSFER,
};
pub use request::{Completion, IoError, IoOp, Request, SECTOR};
pub use uring::DeferredSubmit;

pub(crate) use iovec::AlignedBuf;
pub(crate) use work::start_writeback;
#[cfg(test)]
mod tests;
