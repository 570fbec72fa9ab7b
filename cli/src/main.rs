//! `ferry`: the command line.

mod import;
mod medium;
mod run;
mod size;
mod vmdef;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// ferry: a type-2 hypervisor for the machines you brought from VirtualBox and Parallels.
#[derive(Parser)]
#[command(name = "ferry", version, about, long_about = None)]
struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace). FERRY_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    Run(run::RunArgs),
    Import(import::ImportArgs),
    /// Create, inspect, convert and maintain disk images.
    Medium(medium::MediumArgs),
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Import(args) => import::import(args),
        Command::Medium(args) => medium::run(args),
    }
}

/// Prints a user-facing error with its causes, one sentence each, no backtrace.
pub fn report(err: &dyn std::error::Error) {
    let mut msg = err.to_string();
    let mut src = err.source();
    while let Some(s) = src {
        let s = s.to_string();
        if !msg.contains(&s) {
            msg.push_str(": ");
            msg.push_str(&s);
        }
        src = src.and_then(|e| e.source());
    }
    eprintln!("ferry: error: {msg}");
}
