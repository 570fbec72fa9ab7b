//! Any bytes opened as vmdk, without probing first: the header and metadata parser itself.
#![no_main]

#[path = "image_common.rs"]
mod common;

use ferry_storage::ImageFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::with_scratch_file(data, "vmdk", |p| {
        common::exercise(ferry_storage::vmdk::VmdkFormat.open(p, false))
    });
});
