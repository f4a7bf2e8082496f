//! `pinkeeper-sim`: plays seeds of the deterministic simulation (`make simulate`).
//!
//! `--seeds N` plays seeds `--from` .. `--from + N`, prints the seeds per second and stops at
//! the first failure, printing its story and the one command that replays it;
//! `--seed S` plays one seed with its story printed.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use pinkeeper_sim::{run, Options, Outcome};

#[derive(Parser)]
#[command(about = "pinkeeper's deterministic simulation")]
struct Args {
    /// How many seeds to play.
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Play this one seed and print its story.
    #[arg(long)]
    seed: Option<u64>,
    /// Rounds of chaos per seed, each ended by a heal and the checks.
    #[arg(long, default_value_t = Options::default().rounds)]
    rounds: usize,
    /// Steps per round.
    #[arg(long, default_value_t = Options::default().steps)]
    steps: usize,
    /// Go on after a failure, and list every failing seed at the end.
    #[arg(long)]
    keep_going: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = Options {
        rounds: args.rounds,
        steps: args.steps,
        trace: args.seed.is_some(),
    };
    if let Some(seed) = args.seed {
        return match run(seed, &options) {
            Ok(outcome) => {
                println!("seed {seed}: every invariant held ({outcome:?})");
                ExitCode::SUCCESS
            }
            Err(failure) => {
                eprintln!("{failure}");
                ExitCode::FAILURE
            }
        };
    }
    let started = Instant::now();
    let mut total = Outcome::default();
    let mut last_report = Instant::now();
    let mut failed = Vec::new();
    for seed in args.from..args.from.saturating_add(args.seeds) {
        match run(seed, &options) {
            Ok(outcome) => total.add(outcome),
            Err(failure) if args.keep_going => {
                eprintln!("seed {seed}: {}", failure.message);
                failed.push(seed);
            }
            Err(_) => {
                // Played again with its story kept, to print it.
                let traced = Options {
                    trace: true,
                    ..options.clone()
                };
                match run(seed, &traced) {
                    Err(failure) => eprintln!("{failure}"),
                    Ok(_) => eprintln!("seed {seed} failed once and not when replayed: a bug in the simulation's determinism"),
                }
                return ExitCode::FAILURE;
            }
        }
        if last_report.elapsed().as_secs() >= 10 {
            last_report = Instant::now();
            let done = seed - args.from + 1;
            eprintln!(
                "{done} seeds, {:.0} seeds/s",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if !failed.is_empty() {
        eprintln!(
            "{} of {} seeds failed: {failed:?}",
            failed.len(),
            args.seeds
        );
        return ExitCode::FAILURE;
    }
    println!(
        "{} seeds in {secs:.1} s ({:.0} seeds/s): {} steps, {} K3s starts, {} pinkeeper kills, {} faults injected, {} pins restored; every invariant held",
        args.seeds,
        args.seeds as f64 / secs.max(1e-9),
        total.steps,
        total.k3s_starts,
        total.crashes,
        total.faults,
        total.restores
    );
    ExitCode::SUCCESS
}
