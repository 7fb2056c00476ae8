use clap::Parser;

// jemalloc, not glibc's malloc: under a steady load glibc's per-thread arenas kept memory the agent had
// freed, and RSS crept up for hours while the live heap stayed flat (docs/performance.md, "What the soak found").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    telemetry_agent::cli::main(telemetry_agent::cli::Cli::parse())
}
