//! Tests that cannot run on this machine say so where it shows, and fail under CI.
//!
//! libtest captures what a passing test prints with `print!` and `eprint!`, so a test
//! that returns early because a prerequisite is missing (a program, root, a kernel
//! feature) would pass in silence and look like a check that ran. [`skip`] writes
//! past the capture instead, a line `SKIPPED <test>: <why>` on standard error that
//! `.ci/run` counts; and under CI (`CI` set), where every prerequisite must be
//! present, it fails the test.

use std::io::Write;

/// Reports that the test `test` cannot run here because of `why`; the caller then
/// returns without checking anything.
///
/// Outside CI: writes `SKIPPED <test>: <why>` straight to standard error, past the
/// test harness's capture, and returns.
///
/// # Panics
/// When the environment variable `CI` is set: a check that CI cannot run is a
/// failure, not a pass.
#[track_caller]
pub fn skip(test: &str, why: impl std::fmt::Display) {
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run under CI: {why}");
    }
    // Straight to the stream, not `eprintln!`: the harness captures that.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}
