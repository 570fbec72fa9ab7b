//! Any bytes opened as vmdk, without probing first: the header and metadata parser itself.
//! The same bytes are also opened as the data file of an ESX snapshot (SESPARSE and
//! VMFSSPARSE extent lines in a fixed descriptor), so those parsers are reached too.
#![no_main]

#[path = "image_common.rs"]
mod common;

use ferry_storage::ImageFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::with_scratch_file(data, "vmdk", |p| {
        common::exercise(ferry_storage::vmdk::VmdkFormat.open(p, false));
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(name) = name else { return };
        for (create_type, kind) in [("seSparse", "SESPARSE"), ("vmfsSparse", "VMFSSPARSE")] {
            let desc = format!(
                "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                 createType=\"{create_type}\"\nRW 2048 {kind} \"{name}\"\n"
            );
            common::with_scratch_file(desc.as_bytes(), "vmdk-desc", |d| {
                common::exercise(ferry_storage::vmdk::VmdkFormat.open(d, false))
            });
        }
    });
});
