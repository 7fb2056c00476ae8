use clap::Parser;

fn main() -> std::process::ExitCode {
    telemetry_agent::cli::main(telemetry_agent::cli::Cli::parse())
}
