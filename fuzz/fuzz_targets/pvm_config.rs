//! Any bytes as a Parallels VM's config.pvs: the XML walk must answer with a config or an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = ferry_storage::parallels::pvm::parse(&text) {
        for d in cfg.disks.iter().chain(&cfg.cdroms) {
            let _ = d.interface.name();
        }
        if let Some(g) = &cfg.guest {
            let _ = g.describe();
        }
    }
});
