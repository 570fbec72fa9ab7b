//! Any bytes opened as parallels, without probing first: the header and metadata parser itself.
//! The same bytes are also a bundle's DiskDescriptor.xml: parsed, opened as a bundle (padding,
//! storages, snapshot chain), and given a snapshot by the descriptor rewriter.
#![no_main]

#[path = "image_common.rs"]
mod common;

use std::path::{Path, PathBuf};

use ferry_storage::parallels::{bundle, Descriptor, ParallelsFormat};
use ferry_storage::{ImageFormat, Uuid};
use libfuzzer_sys::fuzz_target;

fn descriptor(xml: &str) {
    let p = Path::new(bundle::DESCRIPTOR);
    let Ok(d) = Descriptor::parse(xml, p) else {
        return;
    };
    let Ok(chain) = d.chain(p) else { return };
    let new = Uuid::from_u128(0xfe77_0000_0000_4000_8000_0000_0000_0001);
    let files: Vec<String> = (0..d.storages.len()).map(|i| format!("n.{i}.hds")).collect();
    let used = d.shots.iter().any(|s| s.0 == new || s.1 == new)
        || d.top == Some(new)
        || d.storages.iter().any(|s| s.images.iter().any(|i| i.guid == new));
    if used {
        return;
    }
    if let Ok(text) = bundle::with_snapshot(xml, p, new, chain[0], d.shots.is_empty(), &files) {
        // What the rewriter makes must read back with the new snapshot on top.
        let d2 = Descriptor::parse(&text, p).expect("rewritten descriptor parses");
        assert_eq!(d2.chain(p).expect("rewritten chain").first(), Some(&new));
    }
}

fuzz_target!(|data: &[u8]| {
    common::with_scratch_file(data, "parallels", |p| {
        common::exercise(ParallelsFormat.open(p, false))
    });
    if let Ok(xml) = std::str::from_utf8(data) {
        descriptor(xml);
        let dir = PathBuf::from(format!("/dev/shm/ferry-fuzz-parallels-hdd-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok()
            && std::fs::write(dir.join(bundle::DESCRIPTOR), data).is_ok()
        {
            common::exercise(ParallelsFormat.open(&dir, false));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
});
