//! `odpvm`: run microVMs, control them, benchmark them.

use clap::Parser;
use vmm::cli::{self, Cli, Command};

fn main() {
    // Before any thread allocates (see `contention::tune_allocator`).
    vmm::contention::tune_allocator();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => cli::run(*args),
        Command::Ctl(args) => cli::ctl(args),
        Command::Bench(args) => cli::bench(args),
        Command::Demo(args) => cli::demo(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("odpvm: {e}");
            std::process::exit(2);
        }
    }
}
