use clap::Parser;

// jemalloc rather than glibc's malloc: under a steady load glibc's per-thread arenas kept growing (the
// soak: live heap flat under heaptrack, RSS +23 MiB/h after an hour); jemalloc returns what it frees.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    telemetry_agent::cli::main(telemetry_agent::cli::Cli::parse())
}
