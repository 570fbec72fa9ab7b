//! `ferry import`: turn another hypervisor's VM into a VM.toml. Today: Parallels `.pvm`
//! bundles.

mod convert;
mod pvm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

/// Make a VM definition (VM.toml) from a Parallels virtual machine.
///
/// Reads NAME.pvm/config.pvs and writes NAME.toml beside the bundle: name, memory, vCPUs,
/// firmware, each hard disk on the same kind of controller at the same position (so a Windows
/// XP installed on IDE stays on IDE), CD/DVD images and the boot order. The disks are used in
/// place (.hdd bundles or old single-file images) unless --convert copies them. What has no
/// counterpart in ferry (network, shared folders, Parallels Tools, ...) is listed.
///
/// Example:
///   ferry import "~/Parallels/Windows XP.pvm"  &&  ferry run "~/Parallels/Windows XP.toml"
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct ImportArgs {
    /// The Parallels VM bundle (a NAME.pvm folder, or its config.pvs).
    #[arg(value_name = "NAME.pvm")]
    path: PathBuf,
    /// Where to write the VM definition (default: NAME.toml beside the bundle).
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Copy each hard disk into a new image of this format (in a folder beside the VM
    /// definition) instead of using the Parallels disks in place.
    #[arg(long, value_name = "FORMAT")]
    convert: Option<ConvertTo>,
    /// Replace an existing VM definition.
    #[arg(long)]
    force: bool,
    /// Print the import report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ConvertTo {
    Vdi,
    Vmdk,
    Vhd,
    Raw,
}

impl ConvertTo {
    fn format(self) -> ferry_storage::FormatKind {
        use ferry_storage::FormatKind as F;
        match self {
            Self::Vdi => F::Vdi,
            Self::Vmdk => F::Vmdk,
            Self::Vhd => F::Vhd,
            Self::Raw => F::Raw,
        }
    }
}

pub fn import(args: ImportArgs) -> ExitCode {
    match pvm::import(&args) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("ferry: error: cannot write the report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry: error: {e}");
            ExitCode::FAILURE
        }
    }
}
