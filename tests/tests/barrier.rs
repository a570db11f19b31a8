//! The barrier consistency benchmark, quick version: the real backend leaves no
//! crash image that breaks the journal's promises, and every seeded bug does.
//!
//! Each run drives the commit-record journal through our driver and device onto a
//! real O_DIRECT image, records what reached the file, and checks every crash
//! image the durability rule allows (`vio::barrier`).

use vio::barrier::journal::Mode;
use vio::barrier::mutants::MutantKind;
use vio::barrier::{Backend, BarrierConfig, Barriers, Scenario, ScenarioResult, run_scenario};

fn config(name: &str) -> BarrierConfig {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("barrier");
    BarrierConfig {
        image: dir.join(format!("{name}.img")),
        size: 2 << 20,
        poll: std::time::Duration::from_micros(50),
        throughput: None,
        ..BarrierConfig::quick()
    }
}

fn run(name: &str, backend: Backend, barriers: Barriers, mode: Mode, txns: u64) -> ScenarioResult {
    let sc = Scenario {
        backend,
        barriers,
        mode,
        txns,
    };
    let r = run_scenario(&config(name), &sc).unwrap();
    eprintln!(
        "{}: acked {}, {} crash points, {} images, {} violating, first {:?}, fidelity {:?}",
        sc.label(),
        r.acked,
        r.images.crash_points,
        r.images.total(),
        r.violating,
        r.examples.first(),
        r.fidelity
    );
    assert_eq!(r.fidelity.written_differ, 0, "the log does not match the file");
    assert_eq!(r.fidelity.unwritten_changed, 0, "a sector never written changed");
    assert!(
        r.fidelity.unwritten > 0,
        "the fidelity check saw no untouched sector"
    );
    r
}

fn assert_clean(r: &ScenarioResult, min_images: u64) {
    assert_eq!(r.violating, 0, "violations: {:?}", r.examples);
    assert!(r.images.total() >= min_images, "only {} images", r.images.total());
    assert!(r.workload_error.is_none(), "{:?}", r.workload_error);
}

#[test]
fn real_backend_writeback_sequential_has_no_violation() {
    let r = run("wb-seq", Backend::Real, Barriers::Writeback, Mode::Sequential, 40);
    assert_eq!(r.acked, 40);
    assert!(r.images.exhaustive > 0 && r.images.torn > 0 && r.images.adversarial > 0);
    assert_clean(&r, 5_000);
}

#[test]
fn real_backend_writeback_concurrent_has_no_violation() {
    let r = run(
        "wb-conc",
        Backend::Real,
        Barriers::Writeback,
        Mode::Concurrent { depth: 4 },
        40,
    );
    assert_eq!(r.acked, 40);
    assert_clean(&r, 5_000);
}

#[test]
fn real_backend_writethrough_has_no_violation() {
    let r = run(
        "wt-seq",
        Backend::Real,
        Barriers::Writethrough,
        Mode::Sequential,
        30,
    );
    assert_eq!(r.acked, 30);
    assert_clean(&r, 1_000);
}

#[test]
fn real_backend_latches_a_failed_fsync_and_does_not_acknowledge() {
    let r = run(
        "fsync-eio",
        Backend::RealFsyncError,
        Barriers::Writeback,
        Mode::Sequential,
        10,
    );
    // Flush 7 is transaction 2's commit flush: 0 and 1 are acknowledged, 2 is not,
    // and the journal stops there.
    assert_eq!(r.acked, 2);
    assert!(r.workload_error.is_some());
    assert_eq!(r.violating, 0, "violations: {:?}", r.examples);
}

#[test]
fn every_mutant_is_caught() {
    for m in MutantKind::ALL {
        let barriers = if m == MutantKind::WritethroughNoDsync {
            Barriers::Writethrough
        } else {
            Barriers::Writeback
        };
        let r = run(
            &format!("mutant-{m:?}"),
            Backend::Mutant(m),
            barriers,
            Mode::Sequential,
            16,
        );
        assert!(r.violating > 0, "{} not caught", m.label());
    }
}

#[test]
fn unsafe_cache_mode_loses_acknowledged_transactions() {
    let r = run("unsafe", Backend::Real, Barriers::Unsafe, Mode::Sequential, 16);
    assert!(r.violating > 0);
}
