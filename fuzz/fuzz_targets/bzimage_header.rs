//! The kernel image is a file the user names, often downloaded: its boot header is parsed by
//! `check_bzimage` (ferry) and by linux-loader's `BzImage::load` inside `load_linux`. Either
//! must reject a bad image with an error, never panic or write outside guest memory.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ferry_firmware::layout::KERNEL_START;
use ferry_firmware::{linux::check_bzimage, load_linux, LinuxBootSpec, MemoryMap};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEMORY: u64 = 64 << 20;

struct Fixture {
    path: PathBuf,
    map: MemoryMap,
    mem: GuestMemoryMmap,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // The API takes a path: one scratch file per fuzzing process, in tmpfs when there is one.
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("ferry-fuzz-bzimage-{}", std::process::id()));
        let map = MemoryMap::new(MEMORY).unwrap();
        let ranges: Vec<(GuestAddress, usize)> = map
            .ram_ranges()
            .into_iter()
            .map(|(a, s)| (a, s as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        Fixture { path, map, mem }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    std::fs::write(&f.path, data).unwrap();
    if check_bzimage(&f.path).is_ok() {
        let spec = LinuxBootSpec {
            kernel: f.path.clone(),
            initrd: None,
            cmdline: String::new(),
        };
        if let Ok(state) = load_linux(&f.mem, &f.map, &spec, 0) {
            // Whatever the header says, the entry point lies in low RAM above 1 MiB (a header
            // with code32_start at the end of RAM and no code once gave rip 0x400_0200).
            assert!(
                (KERNEL_START..f.map.low_end).contains(&state.rip),
                "rip {:#x} outside the kernel's RAM",
                state.rip
            );
        }
    }
    let _ = std::fs::remove_file(&f.path);
});
