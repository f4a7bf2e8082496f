//! The simulation inside `make test`: 10,000 seeds, and every seed that once found a bug.

use pinkeeper_sim::{run, Options};

/// Seeds that found bugs, each kept as a regression test. A seed names a story of this
/// version of the simulation (a change to the simulation replays other stories). What each
/// found:
/// - 4: a release written in the background; a kill and a sweep undid an operator's unpin.
/// - 19, 29: `pinkeeper unpin` answered OK on a full disk; a kill forgot the release.
/// - 32: a restored (CRI-only) pin found gone after missed events read as an operator's unpin.
/// - 102: a failed pin waited for the next K3s restart.
/// - 280: a failed Get was dropped, leaving an unpin unconfirmed for good.
/// - 842: the simulation's own K3s was wrong (a re-import keeps labels).
/// - 883: an operator's pin recorded and never written (killed between) was never retried.
/// - 1548, 1737, 98762: a kill while the disk is full forgets that K3s pinned a name (the
///   simulation now models that limitation; README, "What it cannot protect against").
/// - 1766, 2753, 7607: an unpin event delivered after an operator re-pinned was confirmed.
/// - 5776: the late echo of a restore re-recorded an intent an operator had just released.
/// - 15446, 148119, 546224: an unpin event delivered late, then K3s's sweep: the Get (or the
///   listing) that found the pins gone released the intent instead of reading the sweep.
/// - 202280: an operator's pin of a name K3s then imported and swept, unseen, read as a `ctr`
///   unpin although another name of the image showed K3s's pin.
/// - 213520, 700118, 909386, 998246: a record deleted, imported again by K3s (its create
///   delivered late) and swept: released at the churn window's end without asking whether it
///   was gone, or by a listing as "created again without a pin".
/// - 27270: a swept image deleted before the verification stopped waiting, so when K3s
///   imported it again and swept it unseen nothing restored it.
/// - 510: a kept image whose pin failed, with pinkeeper restarted since, was never pinned.
/// - 16: `ctr`'s unpin of a kept image that carries K3s's label was confirmed and released.
/// - 2493: a kept image deleted and pulled again within the churn window was released as
///   "created again without a pin".
/// - 32249, 4499: a pattern removed before a restart released, after it, what the ledger said
///   the policy held, undoing a later `pinkeeper pin` the full disk had not recorded.
/// - 3272: a policy pin never carried out, its pattern removed since, left the intent held
///   and unpinned.
/// - 80208: an intent the policy recorded over a name K3s had pinned long before was kept
///   when its pattern went, held and unpinned.
const REGRESSIONS: &[u64] = &[
    4, 16, 19, 29, 32, 102, 280, 510, 842, 883, 1548, 1737, 1766, 2493, 2753, 3272, 4499, 5776,
    7607, 15446, 27270, 32249, 80208, 98762, 148119, 202280, 213520, 546224, 700118, 909386,
    998246,
];

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
    for seed in 0..seeds {
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
