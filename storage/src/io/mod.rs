//! The host I/O path: the engine devices submit requests to (io_uring where the host kernel
//! offers it, a thread pool otherwise), and the bandwidth groups that gate it.
//!
//! A device's use, from the event loop thread:
//!
//! ```ignore
//! let mut engine = IoEngine::new(disk, guest_memory, EngineOptions::default())?;
//! // register engine.eventfd() with the event loop, then per guest command:
//! engine.submit(Request::read(lba * 512, vec![(GuestAddress(buf), 4096)], tag))?; // Err: bad request
//! // when the eventfd fires:
//! for c in engine.completions() { /* c.user_data, c.result: bytes or IoError */ }
//! ```

mod engine;
#[allow(unsafe_code)]
mod iovec;
mod request;
mod thread_pool;
#[allow(unsafe_code)]
mod uring;
#[allow(unsafe_code)]
mod work;

pub mod bwgroup;

pub use bwgroup::{parse_rate, BandwidthGroup, BandwidthGroupSpec, BandwidthSpecError};
pub use engine::{
    EngineChoice, EngineError, EngineKind, EngineOptions, IoEngine, IoStats, MAX_TRANSFER,
};
pub use request::{Completion, IoError, IoOp, Request, SECTOR};
#[cfg(test)]
mod tests;
