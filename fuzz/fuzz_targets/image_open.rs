//! Any bytes as a disk image, through probing: every format's recognizer and opener.
#![no_main]

#[path = "image_common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::with_scratch_file(data, "probe", |p| {
        common::exercise(ferry_storage::open_image(p, false))
    });
});
