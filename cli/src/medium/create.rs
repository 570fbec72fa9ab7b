//! `ferry medium create`.

use std::path::PathBuf;

use clap::Args;
use ferry_storage::{create_image, open_image, CreateOptions, CreateParent, StorageError};

use super::{size_arg, CliResult, FormatArg, VariantArg};

#[derive(Args)]
pub struct CreateArgs {
    /// The new image (an existing file is never overwritten). For a snapshot of a Parallels
    /// .hdd bundle, the bundle itself, also given as --parent.
    file: PathBuf,
    /// Image format (default: the parent's with --parent).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Layout on the host.
    #[arg(long, value_enum, default_value = "dynamic")]
    variant: VariantArg,
    /// Virtual size, e.g. 20G (default: the parent's with --parent).
    #[arg(long, value_parser = size_arg)]
    size: Option<u64>,
    /// Make a differencing child of this image. A Parallels .hdd bundle keeps its snapshots
    /// inside: `create disk.hdd --parent disk.hdd` adds one, which becomes the bundle's
    /// current state (the old state is kept, read-only, below it).
    #[arg(long)]
    parent: Option<PathBuf>,
}

/// `FILE` and `--parent` name one Parallels bundle (its folder or its descriptor).
fn bundle_snapshot(a: &CreateArgs) -> bool {
    let dir = ferry_storage::parallels::bundle_dir;
    a.parent
        .as_ref()
        .is_some_and(|p| dir(&a.file).is_some_and(|d| Some(d) == dir(p)))
}

pub fn run(a: CreateArgs) -> CliResult {
    if a.file.exists() && !bundle_snapshot(&a) {
        return Err(StorageError::Invalid(format!(
            "{} already exists; ferry does not overwrite images with create",
            a.file.display()
        )));
    }
    let parent = match &a.parent {
        None => None,
        Some(p) => {
            let layer = open_image(p, false)?;
            Some((
                CreateParent {
                    path: p.clone(),
                    uuid: layer.uuid(),
                    modification_uuid: layer.modification_uuid(),
                    format: layer.format(),
                },
                layer.virtual_size(),
            ))
        }
    };
    let format = match (a.format, &parent) {
        (Some(f), _) => f.into(),
        (None, Some((p, _))) => p.format,
        (None, None) => {
            return Err(StorageError::Invalid(
                "say which format to create with --format vdi|vmdk|vhd|parallels|raw".into(),
            ))
        }
    };
    let size = match (a.size, &parent) {
        (Some(s), _) => s,
        (None, Some((_, s))) => *s,
        (None, None) => {
            return Err(StorageError::Invalid(
                "say how large the disk is with --size, e.g. --size 20G".into(),
            ))
        }
    };
    if size == 0 {
        return Err(StorageError::Invalid("a disk needs a size above 0".into()));
    }
    let layer = create_image(
        &a.file,
        format,
        &CreateOptions {
            size,
            variant: a.variant.into(),
            parent: parent.map(|p| p.0),
        },
    )?;
    layer.flush()?;
    println!(
        "created {} ({} {}, {} bytes{})",
        a.file.display(),
        format.name(),
        super::variant_name(layer.variant()),
        layer.virtual_size(),
        layer
            .uuid()
            .map(|u| format!(", UUID {u}"))
            .unwrap_or_default()
    );
    Ok(())
}
