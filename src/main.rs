use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = sigil::cli::Cli::parse();
    match sigil::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sigil: {error:#}");
            ExitCode::FAILURE
        }
    }
}
