//! The simulation inside `make test`: 10,000 seeds, and every seed that once found a bug.

use pinkeeper_sim::{run, Options};

/// Seeds that found bugs in pinkeeper, each kept as a regression test (the README lists
/// what each found). A seed names a story of this version of the simulation.
const REGRESSIONS: &[u64] = &[4, 19, 29, 32, 102, 280, 842, 883, 1766, 2753, 5776, 7607];

/// Seeds that still break an invariant: found, analysed in part, and not fixed yet (issue 10's
/// note says what each shows). They are played by `make simulate`, which reports them, and
/// left out here so that a new failure stands out.
pub const OPEN: &[u64] = &[1548, 1737];

#[test]
fn regression_seeds_hold() {
    for &seed in REGRESSIONS {
        let options = Options {
            trace: true,
            ..Options::default()
        };
        if let Err(failure) = run(seed, &options) {
            panic!("{failure}");
        }
    }
}

#[test]
fn ten_thousand_seeds_hold() {
    let seeds: u64 = std::env::var("PINKEEPER_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    for seed in (0..seeds).filter(|s| !OPEN.contains(s)) {
        if run(seed, &Options::default()).is_err() {
            let options = Options {
                trace: true,
                ..Options::default()
            };
            let failure = run(seed, &options).expect_err("a seed replays the same story");
            panic!("{failure}");
        }
    }
}
