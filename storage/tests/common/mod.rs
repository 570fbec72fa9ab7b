//! Shared by the storage integration tests: where the conformance kit lives.

use std::path::{Path, PathBuf};

/// ../shared/conformance beside the repository (or FERRY_CONFORMANCE_DIR, or the project
/// machines' /work/shared/conformance when the repository was cloned elsewhere).
#[allow(dead_code)]
pub fn conformance_dir() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        std::env::var_os("FERRY_CONFORMANCE_DIR").map(PathBuf::from),
        Some(repo.join("../shared/conformance")),
        Some(PathBuf::from("/work/shared/conformance")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("make-corpus.sh").is_file())
        .unwrap_or_else(|| {
            panic!(
                "the conformance kit was not found beside the repository (../shared/conformance) \
                 nor in /work/shared/conformance; set FERRY_CONFORMANCE_DIR"
            )
        })
}

/// Writes `bytes` to `path` as a sparse file: runs of zeros become holes, so that a
/// multi-GiB model of a mostly empty disk costs the test machine only what was written
/// (CI machines can have little free disk).
#[allow(dead_code)]
pub fn write_sparse(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 64 * 1024;
    let file = std::fs::File::create(path).unwrap();
    file.set_len(bytes.len() as u64).unwrap();
    for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            file.write_all_at(chunk, (i * CHUNK) as u64).unwrap();
        }
    }
}
