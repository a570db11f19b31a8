//! Replays the seed corpora of the fuzz targets other than `chain_walk`
//! (`fuzz/corpus/<target>/`) through the same target bodies cargo-fuzz runs, so every
//! seed, and every crash input added after its fix, stays a regression test on
//! stable Rust.
//!
//! The bodies live in `fuzz/src/` and are compiled in here unchanged. For each
//! target: `<target>_corpus_runs_clean` replays every committed file,
//! `<target>_seeds_reach_their_rule` proves each generated seed gets where it was
//! written to go, and `<target>_corpus_holds_every_seed` that the committed files
//! match the generator. The ignored `write_seed_corpora` regenerates them after an
//! encoding change:
//! `cargo test -p vio --test fuzz_corpus_targets -- --ignored write_seed_corpora`.

// The bodies cast bounded fuzz values between integer widths freely; `run` is what
// cargo-fuzz calls, so some items are unused here.
#[allow(dead_code, clippy::cast_possible_truncation)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Every file of `target`'s corpus, sorted.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seed corpus in {}", dir.display());
    files
        .into_iter()
        .map(|f| {
            let data = std::fs::read(&f).unwrap();
            (f, data)
        })
        .collect()
}

fn replay(target: &str, run: fn(&[u8])) {
    for (f, data) in corpus(target) {
        eprintln!("{}", f.display());
        run(&data);
    }
}

fn holds_every_seed(target: &str, seeds: &[(&str, Vec<u8>, &str)]) {
    let dir = corpus_dir(target);
    for (name, input, _) in seeds {
        let on_disk = std::fs::read(dir.join(name)).unwrap_or_else(|e| {
            panic!("{target} seed {name} missing ({e}); run the ignored write_seed_corpora")
        });
        assert_eq!(
            &on_disk, input,
            "{target} seed {name} is stale; run the ignored write_seed_corpora"
        );
    }
}

fn write_seeds(target: &str, seeds: &[(&str, Vec<u8>, &str)]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, input, _) in seeds {
        std::fs::write(dir.join(name), input).unwrap();
    }
}

/// The three tests of one target whose report is one string.
macro_rules! target_tests {
    ($target:ident, $runs:ident, $reach:ident, $holds:ident, |$input:ident| $report:expr) => {
        #[test]
        fn $runs() {
            replay(stringify!($target), targets::$target::run);
        }

        #[test]
        fn $reach() {
            for (name, $input, want) in targets::$target::seeds() {
                let report = format!("{:?}", $report);
                eprintln!("{} {name}: {report}", stringify!($target));
                assert!(
                    report.contains(want),
                    "{} seed {name}: wanted {want:?}, got {report}",
                    stringify!($target)
                );
            }
        }

        #[test]
        fn $holds() {
            holds_every_seed(stringify!($target), &targets::$target::seeds());
        }
    };
}

target_tests!(
    blk_request,
    blk_request_corpus_runs_clean,
    blk_request_seeds_reach_their_rule,
    blk_request_corpus_holds_every_seed,
    |input| targets::blk_request::report(&input)
);

target_tests!(
    driver_used_ring,
    driver_used_ring_corpus_runs_clean,
    driver_used_ring_seeds_reach_their_rule,
    driver_used_ring_corpus_holds_every_seed,
    |input| targets::driver_used_ring::report(&input)
);

target_tests!(
    vhost_user_reply,
    vhost_user_reply_corpus_runs_clean,
    vhost_user_reply_seeds_reach_their_rule,
    vhost_user_reply_corpus_holds_every_seed,
    |input| targets::vhost_user_reply::report(&input)
);

target_tests!(
    vhost_user_session,
    vhost_user_session_corpus_runs_clean,
    vhost_user_session_seeds_reach_their_rule,
    vhost_user_session_corpus_holds_every_seed,
    |input| targets::vhost_user_session::report(&input)
);

target_tests!(
    device_memory,
    device_memory_corpus_runs_clean,
    device_memory_seeds_reach_their_rule,
    device_memory_corpus_holds_every_seed,
    |input| targets::device_memory::report(&input)
);

target_tests!(
    net_tx,
    net_tx_corpus_runs_clean,
    net_tx_seeds_reach_their_rule,
    net_tx_corpus_holds_every_seed,
    |input| targets::net_tx::report(&input)
);

target_tests!(
    net_ctrl,
    net_ctrl_corpus_runs_clean,
    net_ctrl_seeds_reach_their_rule,
    net_ctrl_corpus_holds_every_seed,
    |input| targets::net_ctrl::report(&input)
);

target_tests!(
    grant_ops,
    grant_ops_corpus_runs_clean,
    grant_ops_seeds_reach_their_rule,
    grant_ops_corpus_holds_every_seed,
    |input| targets::grant_ops::report(&input)
);

target_tests!(
    copy_helper,
    copy_helper_corpus_runs_clean,
    copy_helper_seeds_reach_their_rule,
    copy_helper_corpus_holds_every_seed,
    |input| targets::copy_helper::report(&input)
);

target_tests!(
    net_rx_mrg,
    net_rx_mrg_corpus_runs_clean,
    net_rx_mrg_seeds_reach_their_rule,
    net_rx_mrg_corpus_holds_every_seed,
    |input| targets::net_rx_mrg::report(&input)
);

target_tests!(
    packed_walk,
    packed_walk_corpus_runs_clean,
    packed_walk_seeds_reach_their_rule,
    packed_walk_corpus_holds_every_seed,
    |input| targets::packed_walk::report(&input)
);

#[test]
#[ignore = "generator: rewrites fuzz/corpus/<target>/ from each target's `seeds()`"]
fn write_seed_corpora() {
    write_seeds("blk_request", &targets::blk_request::seeds());
    write_seeds("driver_used_ring", &targets::driver_used_ring::seeds());
    write_seeds("vhost_user_reply", &targets::vhost_user_reply::seeds());
    write_seeds("vhost_user_session", &targets::vhost_user_session::seeds());
    write_seeds("device_memory", &targets::device_memory::seeds());
    write_seeds("net_ctrl", &targets::net_ctrl::seeds());
    write_seeds("net_tx", &targets::net_tx::seeds());
    write_seeds("grant_ops", &targets::grant_ops::seeds());
    write_seeds("copy_helper", &targets::copy_helper::seeds());
    write_seeds("net_rx_mrg", &targets::net_rx_mrg::seeds());
    write_seeds("packed_walk", &targets::packed_walk::seeds());
}
