//! `ferry medium check`. Exit status: 0 clean (or repaired), 2 damaged, 3 leaked space only,
//! 1 when the file could not be checked at all (missing, not an image).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ferry_storage::medium::{self, check::Severity};
use serde::Serialize;

#[derive(Args)]
pub struct CheckArgs {
    file: PathBuf,
    /// Reclaim leaked space (the image is rebuilt beside itself); damage is only reported.
    #[arg(long)]
    repair: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    search: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Finding {
    severity: &'static str,
    message: String,
}

#[derive(Serialize)]
struct Report {
    file: PathBuf,
    format: Option<&'static str>,
    status: &'static str,
    leaked_blocks: u64,
    blocks_read: u64,
    findings: Vec<Finding>,
    repaired: Vec<String>,
}

pub fn run(a: CheckArgs) -> ExitCode {
    let r = match medium::check(&a.file, a.repair, &a.search) {
        Ok(r) => r,
        Err(e) => {
            crate::report(&e);
            return ExitCode::FAILURE;
        }
    };
    let (status, code) = if r.corrupt() {
        ("corrupt", 2)
    } else if !r.clean() {
        ("leaks", 3)
    } else {
        ("clean", 0)
    };
    let out = Report {
        file: r.path.clone(),
        format: r.format,
        status,
        leaked_blocks: r.leaked_blocks,
        blocks_read: r.blocks_read,
        findings: r
            .findings
            .iter()
            .map(|f| Finding {
                severity: match f.severity {
                    Severity::Corrupt => "corrupt",
                    Severity::Leak => "leak",
                },
                message: f.message.clone(),
            })
            .collect(),
        repaired: r.repaired.clone(),
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).unwrap_or_else(|_| "{}".into())
        );
    } else {
        for f in &out.findings {
            println!("{}: {}", f.severity, f.message);
        }
        for r in &out.repaired {
            println!("repaired: {r}");
        }
        println!(
            "{}: {status} ({} image, {} blocks read)",
            out.file.display(),
            out.format.unwrap_or("unknown"),
            out.blocks_read
        );
    }
    ExitCode::from(code)
}
