//! The `candor` binary: parses the command line and hands each subcommand to `cli`.

use clap::Parser;

fn main() {
    let cli = candor::cli::Cli::parse();
    if let Err(e) = candor::cli::run(cli) {
        // One line, no backtrace: every error names the file or field at fault.
        eprintln!("error: {}", candor::error::one_line(&format!("{e:#}")));
        std::process::exit(1);
    }
}
