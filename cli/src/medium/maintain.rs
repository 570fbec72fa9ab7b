//! `ferry medium clone|resize|compact|merge|set-uuid`: thin wrappers over
//! `ferry_storage::medium`, which does the work.

use std::path::PathBuf;

use clap::Args;
use ferry_storage::{medium, StorageError, Uuid};

use super::info::human;
use super::progress::Bar;
use super::{size_arg, CliResult, FormatArg, VariantArg};

#[derive(Args)]
pub struct CloneArgs {
    src: PathBuf,
    dst: PathBuf,
    #[arg(long, value_enum)]
    format: FormatArg,
    #[arg(long, value_enum, default_value = "dynamic")]
    variant: VariantArg,
    /// Replace DST if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Reader threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Do not flush DST to the disk (as qemu-img convert by default): faster, but a host
    /// crash soon after may lose or damage the new image (never the source). Not with
    /// --overwrite.
    #[arg(long, conflicts_with = "overwrite")]
    no_sync: bool,
    /// More places to look for parent images.
    #[arg(long)]
    search: Vec<PathBuf>,
}

pub fn clone(a: CloneArgs) -> CliResult {
    let opts = medium::CloneOptions {
        format: a.format.into(),
        variant: a.variant.into(),
        overwrite: a.overwrite,
        threads: threads(a.threads)?,
        search: a.search,
    };
    if a.no_sync {
        ferry_storage::host_file::set_durable(false);
    }
    let r = medium::clone(&a.src, &a.dst, &opts, &Bar::new("clone"))?;
    println!(
        "cloned {} into {} ({} bytes, {} written, {} on the host)",
        a.src.display(),
        a.dst.display(),
        r.size,
        human(r.stats.written),
        human(medium::host_bytes(&r.files))
    );
    Ok(())
}

fn threads(n: Option<usize>) -> Result<usize, StorageError> {
    match n {
        None => Ok(medium::copy::default_threads()),
        Some(0) => Err(StorageError::Invalid("--threads needs at least 1".into())),
        Some(n) => Ok(n.min(64)),
    }
}

#[derive(Args)]
pub struct ResizeArgs {
    file: PathBuf,
    /// The new virtual size, e.g. 40G.
    #[arg(long, value_parser = size_arg)]
    size: u64,
    /// Allow a smaller size (only where nothing is stored past it).
    #[arg(long)]
    allow_shrink: bool,
    #[arg(long)]
    search: Vec<PathBuf>,
}

pub fn resize(a: ResizeArgs) -> CliResult {
    let r = medium::resize(
        &a.file,
        a.size,
        a.allow_shrink,
        medium::copy::default_threads(),
        &a.search,
        &Bar::new("resize"),
    )?;
    println!(
        "resized {} to {} bytes ({} on the host)",
        a.file.display(),
        a.size,
        human(r.bytes_after)
    );
    Ok(())
}

#[derive(Args)]
pub struct CompactArgs {
    file: PathBuf,
    #[arg(long)]
    search: Vec<PathBuf>,
}

pub fn compact(a: CompactArgs) -> CliResult {
    let r = medium::compact(
        &a.file,
        medium::copy::default_threads(),
        &a.search,
        &Bar::new("compact"),
    )?;
    println!(
        "compacted {}: {} -> {} on the host",
        a.file.display(),
        human(r.bytes_before),
        human(r.bytes_after)
    );
    Ok(())
}

#[derive(Args)]
pub struct MergeArgs {
    /// The differencing child to fold into its parent (removed afterwards).
    child: PathBuf,
    #[arg(long)]
    search: Vec<PathBuf>,
}

pub fn merge(a: MergeArgs) -> CliResult {
    let r = medium::merge::merge(
        &a.child,
        medium::copy::default_threads(),
        &a.search,
        &Bar::new("merge"),
    )?;
    println!(
        "merged {} into {} ({} written) and removed it",
        a.child.display(),
        r.into.display(),
        human(r.stats.written)
    );
    Ok(())
}

#[derive(Args)]
pub struct SetUuidArgs {
    file: PathBuf,
    /// The UUID to set (default: a new random one).
    uuid: Option<String>,
}

pub fn set_uuid(a: SetUuidArgs) -> CliResult {
    let uuid = match &a.uuid {
        None => None,
        Some(s) => Some(Uuid::parse_str(s).map_err(|_| {
            StorageError::Invalid(format!(
                "'{s}' is not a UUID; write it like 01234567-89ab-cdef-0123-456789abcdef"
            ))
        })?),
    };
    let u = medium::set_uuid(&a.file, uuid)?;
    println!("{}: UUID is now {u}", a.file.display());
    Ok(())
}
