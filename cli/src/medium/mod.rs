//! `ferry medium ...`: create, inspect, convert and maintain disk images without a VM.

mod check;
mod create;
mod info;
mod maintain;
mod progress;

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use ferry_storage::{FormatKind, StorageError, Variant};

#[derive(Args)]
pub struct MediumArgs {
    #[command(subcommand)]
    command: MediumCommand,
}

#[derive(Subcommand)]
enum MediumCommand {
    /// Create an empty image, or a differencing child of --parent.
    Create(create::CreateArgs),
    /// Show an image's format, sizes, UUIDs and its chain of parents.
    Info(info::InfoArgs),
    /// Copy a disk (its whole chain, flattened) into a new image of any format.
    Clone(maintain::CloneArgs),
    /// Grow an image, or shrink it with --allow-shrink where its tail holds no data.
    Resize(maintain::ResizeArgs),
    /// Drop all-zero blocks and unused space: the file gets smaller.
    Compact(maintain::CompactArgs),
    /// Fold a differencing child into its parent (as deleting a snapshot does).
    Merge(maintain::MergeArgs),
    /// Check an image's tables and read every block; --repair reclaims leaked space.
    Check(check::CheckArgs),
    /// Give an image a new UUID (random unless given).
    SetUuid(maintain::SetUuidArgs),
}

/// Image formats on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Vdi,
    Vmdk,
    Vhd,
    Parallels,
    Raw,
}

impl From<FormatArg> for FormatKind {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Vdi => FormatKind::Vdi,
            FormatArg::Vmdk => FormatKind::Vmdk,
            FormatArg::Vhd => FormatKind::Vhd,
            FormatArg::Parallels => FormatKind::Parallels,
            FormatArg::Raw => FormatKind::Raw,
        }
    }
}

/// Layouts on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum VariantArg {
    Fixed,
    Dynamic,
    /// VMDK: 2 GiB sparse extents.
    Split2g,
    /// VMDK: 2 GiB preallocated extents.
    Split2gFlat,
    /// VMDK streamOptimized (compressed, for export).
    Stream,
}

impl From<VariantArg> for Variant {
    fn from(v: VariantArg) -> Self {
        match v {
            VariantArg::Fixed => Variant::Fixed,
            VariantArg::Dynamic => Variant::Dynamic,
            VariantArg::Split2g => Variant::Split2GSparse,
            VariantArg::Split2gFlat => Variant::Split2GFlat,
            VariantArg::Stream => Variant::Stream,
        }
    }
}

pub fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::Fixed => "fixed",
        Variant::Dynamic => "dynamic",
        Variant::Split2GSparse => "split2g",
        Variant::Split2GFlat => "split2g-flat",
        Variant::Stream => "stream",
    }
}

pub fn run(args: MediumArgs) -> ExitCode {
    let result = match args.command {
        MediumCommand::Create(a) => create::run(a),
        MediumCommand::Info(a) => info::run(a),
        MediumCommand::Clone(a) => maintain::clone(a),
        MediumCommand::Resize(a) => maintain::resize(a),
        MediumCommand::Compact(a) => maintain::compact(a),
        MediumCommand::Merge(a) => maintain::merge(a),
        MediumCommand::Check(a) => return check::run(a),
        MediumCommand::SetUuid(a) => maintain::set_uuid(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Sizes on the command line, for clap.
pub fn size_arg(s: &str) -> Result<u64, String> {
    crate::size::parse_size(s)
}

pub type CliResult = Result<(), StorageError>;
