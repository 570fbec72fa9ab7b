//! `check`: an image's consistency. Opening it runs each format's own validation (header
//! fields, checksums, block tables against the file); then the block table is checked for
//! blocks outside the data area, overlapping blocks and leaked (unreferenced) space, every
//! allocated block is read, and the parents are resolved. `repair` fixes leaks by compacting,
//! which rebuilds the image beside itself; anything else it reports and leaves alone.

use std::path::{Path, PathBuf};

use crate::disk::Disk;
use crate::error::{Result, StorageError};
use crate::layer::{Allocation, BlockTable, Layer};
use crate::probe::probe;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Severity {
    /// The image is damaged: data may be wrong or unreadable.
    Corrupt,
    /// Space in the file that nothing uses (harmless; compact or --repair reclaims it).
    Leak,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
}

#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub path: PathBuf,
    pub format: Option<&'static str>,
    pub findings: Vec<Finding>,
    pub leaked_blocks: u64,
    /// Blocks (or runs) read back.
    pub blocks_read: u64,
    /// What --repair did.
    pub repaired: Vec<String>,
}

impl CheckReport {
    pub fn corrupt(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.severity == Severity::Corrupt)
    }
    pub fn clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Checks `path`; with `repair`, reclaims leaked space. Errors only for what is not an image
/// problem (a missing file, an unknown format); damage is reported in the findings.
pub fn check(path: &Path, repair: bool, search: &[PathBuf]) -> Result<CheckReport> {
    super::must_exist(path)?;
    let fmt = probe(path)?;
    let mut report = CheckReport {
        path: path.to_path_buf(),
        format: Some(fmt.kind().name()),
        ..Default::default()
    };
    let layer = match fmt.open(path, false) {
        Ok(l) => l,
        Err(e @ (StorageError::Corrupt { .. } | StorageError::Unsupported { .. })) => {
            report.findings.push(Finding {
                severity: Severity::Corrupt,
                message: e.to_string(),
            });
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    for problem in layer.metadata_problems()? {
        report.findings.push(Finding {
            severity: Severity::Corrupt,
            message: format!("{}: {problem}", path.display()),
        });
    }
    if let Some(table) = layer.block_table()? {
        let (findings, leaked) = judge_table(&table);
        report.findings.extend(findings);
        report.leaked_blocks = leaked;
    }
    read_all(&*layer, &mut report);
    if layer.parent().is_some() {
        if let Err(e) = Disk::open(path, false, search) {
            report.findings.push(Finding {
                severity: Severity::Corrupt,
                message: format!("its chain does not open: {e}"),
            });
        }
    }
    drop(layer);
    if repair && report.leaked_blocks > 0 && !report.corrupt() {
        let r =
            super::rebuild::compact(path, super::copy::default_threads(), search, &super::Silent)?;
        report.repaired.push(format!(
            "reclaimed {} leaked blocks by rebuilding the image ({} -> {} bytes on the host)",
            report.leaked_blocks, r.bytes_before, r.bytes_after
        ));
        // The rebuilt image must itself be clean.
        let again = check(path, false, search)?;
        report.findings = again.findings;
        report.leaked_blocks = again.leaked_blocks;
    } else if repair && report.corrupt() {
        report.repaired.push(
            "nothing repaired: ferry repairs only leaked space; clone what still reads into a new image"
                .into(),
        );
    }
    Ok(report)
}

/// Blocks outside the data area, overlapping blocks, and leaked space.
pub fn judge_table(t: &BlockTable) -> (Vec<Finding>, u64) {
    let mut out = Vec::new();
    let name = t.file.display();
    let mut used: Vec<(u64, u64)> = Vec::new();
    for &(index, host) in &t.blocks {
        let end = host.saturating_add(t.block_bytes);
        if host < t.data_start || end > t.data_end {
            out.push(Finding {
                severity: Severity::Corrupt,
                message: format!(
                    "{name}: block {index} at {host:#x} lies outside the data area ({:#x}..{:#x})",
                    t.data_start, t.data_end
                ),
            });
            continue;
        }
        used.push((host, index));
    }
    used.sort_unstable();
    for w in used.windows(2) {
        if w[1].0 < w[0].0 + t.block_bytes {
            out.push(Finding {
                severity: Severity::Corrupt,
                message: format!(
                    "{name}: blocks {} and {} overlap (at {:#x} and {:#x})",
                    w[0].1, w[1].1, w[0].0, w[1].0
                ),
            });
        }
    }
    // Gaps of a whole block or more between used blocks (and after the last) are leaked.
    let mut leaked = 0u64;
    let mut pos = t.data_start;
    for &(host, _) in &used {
        leaked += host.saturating_sub(pos + t.slack) / t.block_bytes.max(1);
        pos = pos.max(host + t.block_bytes);
    }
    leaked += t.data_end.saturating_sub(pos + t.slack) / t.block_bytes.max(1);
    if leaked > 0 {
        out.push(Finding {
            severity: Severity::Leak,
            message: format!(
                "{name}: {leaked} leaked blocks of {} bytes (space no table entry uses; --repair reclaims it)",
                t.block_bytes
            ),
        });
    }
    (out, leaked)
}

/// Reads every block the layer holds: a block that cannot be read (a bad compressed grain, an
/// I/O error) is a finding.
fn read_all(layer: &dyn Layer, report: &mut CheckReport) {
    const RUN: u64 = 1 << 20;
    let size = layer.virtual_size();
    let mut buf = vec![0u8; RUN as usize];
    let mut off = 0u64;
    let mut errors = 0;
    while off < size {
        let (state, run) = match layer.block_status(off, size - off) {
            Ok(s) => s,
            Err(e) => {
                report.findings.push(Finding {
                    severity: Severity::Corrupt,
                    message: e.to_string(),
                });
                return;
            }
        };
        let run = run.clamp(1, size - off);
        if state == Allocation::Data {
            let mut at = off;
            while at < off + run {
                let n = (off + run - at).min(RUN);
                report.blocks_read += 1;
                if let Err(e) = layer.read_at(&mut buf[..n as usize], at) {
                    errors += 1;
                    if errors <= 10 {
                        report.findings.push(Finding {
                            severity: Severity::Corrupt,
                            message: format!("reading at {at:#x}: {e}"),
                        });
                    }
                }
                at += n;
            }
        }
        off += run;
    }
}
