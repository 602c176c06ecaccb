//! `hearth-bench`: joins a Matrix-HQ-shaped room served by a resident Hearth, with Hearth (lazy and full) and
//! Synapse (partial and full) as joiners, side by side in one run; prints a table and writes JSON and an SVG chart.
//!
//! cargo run --release --bin hearth-bench -- join --members 10000
//! cargo run --release --bin hearth-bench -- join --quick          (N = 1000, what CI runs)
//! cargo run --bin hearth-bench -- sliding-sync --rooms 100          (first sliding sync, long-poll wake)
//! cargo run --release --bin hearth-bench -- appservice               (transaction sender, cost of ten services)

mod appservice;
mod limits;
mod run;
mod sliding;
mod world;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "hearth-bench", about = "Join benchmark: Hearth vs Synapse on HQ-shaped rooms")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the world(s) if needed, then measure each joiner.
    Join {
        /// Member counts, comma separated (e.g. 1000,10000,100000).
        #[arg(long, value_delimiter = ',', default_value = "10000")]
        members: Vec<usize>,
        /// Timeline messages in the world.
        #[arg(long, default_value_t = 200)]
        messages: usize,
        /// Joiners: hearth-lazy, hearth-full, hearth-peek (a peek instead of a join: MSC2444), synapse, synapse-full.
        #[arg(long, value_delimiter = ',', default_value = "hearth-lazy,hearth-full,synapse,synapse-full")]
        joiners: Vec<String>,
        /// N = 1000 with Hearth lazy/full and Synapse partial only (CI).
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Where worlds, runs and results go.
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Runs of each joiner (in rounds); with more than one, a table of the median and worst of each figure.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// "Pi-like": each Hearth joiner on one core with 512 MB (`--cpus 1 --memory-mb 512`; either wins).
        #[arg(long)]
        pi: bool,
        /// Pin each Hearth joiner to the first N cores.
        #[arg(long)]
        cpus: Option<usize>,
        /// Cap each Hearth joiner's memory (cgroup v2 `memory.max`, else v1 `memory.limit_in_bytes`).
        #[arg(long)]
        memory_mb: Option<u64>,
    },
    /// Simplified sliding sync (MSC4186): the first sync of an account in N rooms, and long-poll wake latency.
    SlidingSync {
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        /// Messages per room.
        #[arg(long, default_value_t = 5)]
        messages: usize,
        /// Measurements of each figure.
        #[arg(long, default_value_t = 20)]
        samples: usize,
        #[arg(long, default_value = "target/bench/sliding-sync")]
        dir: PathBuf,
    },
    /// Application services: events per second to one service, and the extra time of a send with ten registered.
    Appservice {
        /// Backlog delivered to one service.
        #[arg(long, default_value_t = 5000)]
        events: usize,
        /// Timed sends per configuration (none, ten services).
        #[arg(long, default_value_t = 200)]
        sends: usize,
        #[arg(long, default_value = "target/bench/appservice")]
        dir: PathBuf,
    },
    /// Redraw the chart (and table) from result files of several runs.
    Chart {
        files: Vec<PathBuf>,
        #[arg(long, default_value = "bench/results/join.svg")]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Join { mut members, messages, mut joiners, quick, seed, dir, runs, pi, cpus, memory_mb } => {
            if quick {
                members = vec![1000];
                joiners.retain(|j| j != "synapse-full");
            }
            let limits = limits::Limits { cpus: cpus.or(pi.then_some(1)), memory_mb: memory_mb.or(pi.then_some(512)) };
            rt.block_on(run::join_bench(run::Options { members, messages, joiners, seed, dir, runs, limits }))
        }
        Command::SlidingSync { rooms, messages, samples, dir } => {
            rt.block_on(sliding::run(sliding::Options { rooms, messages, samples, dir }))
        }
        Command::Appservice { events, sends, dir } => {
            rt.block_on(appservice::run(appservice::Options { events, sends, dir }))
        }
        Command::Chart { files, out } => run::chart_files(&files, &out),
    }
}
