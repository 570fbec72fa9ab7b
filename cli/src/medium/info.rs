//! `ferry medium info`.

use std::path::PathBuf;

use clap::Args;
use ferry_storage::{medium::host_bytes, Disk, Layer};
use serde::Serialize;

use super::{variant_name, CliResult};

#[derive(Args)]
pub struct InfoArgs {
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// More places to look for parent images.
    #[arg(long)]
    search: Vec<PathBuf>,
}

#[derive(Serialize)]
struct LayerInfo {
    file: PathBuf,
    format: &'static str,
    variant: &'static str,
    virtual_size: u64,
    /// Bytes allocated on the host by this layer's files.
    host_bytes: u64,
    uuid: Option<String>,
    parent_uuid: Option<String>,
    files: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Info {
    #[serde(flatten)]
    top: LayerInfo,
    /// The medium type, where the image records one (no format ferry writes does yet).
    medium_type: Option<String>,
    /// Top to base.
    chain: Vec<LayerInfo>,
}

fn layer_info(l: &dyn Layer) -> LayerInfo {
    let files = l.files();
    LayerInfo {
        file: l.path().to_path_buf(),
        format: l.format().name(),
        variant: variant_name(l.variant()),
        virtual_size: l.virtual_size(),
        host_bytes: host_bytes(&files),
        uuid: l.uuid().map(|u| u.to_string()),
        parent_uuid: l.parent().and_then(|p| p.uuid).map(|u| u.to_string()),
        files,
    }
}

pub fn run(a: InfoArgs) -> CliResult {
    let disk = Disk::open(&a.file, false, &a.search)?;
    let chain: Vec<LayerInfo> = disk.layers().iter().map(|l| layer_info(&**l)).collect();
    let info = Info {
        top: layer_info(&*disk.layers()[0]),
        medium_type: None,
        chain,
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).unwrap_or_else(|_| "{}".into())
        );
        return Ok(());
    }
    let t = &info.top;
    println!("file:          {}", t.file.display());
    println!("format:        {} ({})", t.format, t.variant);
    println!(
        "virtual size:  {} ({})",
        t.virtual_size,
        human(t.virtual_size)
    );
    println!("on the host:   {} ({})", t.host_bytes, human(t.host_bytes));
    if let Some(u) = &t.uuid {
        println!("uuid:          {u}");
    }
    if let Some(u) = &t.parent_uuid {
        println!("parent uuid:   {u}");
    }
    if let Some(m) = &info.medium_type {
        println!("medium type:   {m}");
    }
    if info.chain.len() > 1 {
        println!("chain (top to base):");
        for (i, l) in info.chain.iter().enumerate() {
            println!(
                "  {i}: {} ({} {}, {} on the host{})",
                l.file.display(),
                l.format,
                l.variant,
                human(l.host_bytes),
                l.uuid
                    .as_ref()
                    .map(|u| format!(", uuid {u}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
