//! Progress of a long-running command: a bar with what runs and the time left when
//! stderr is a terminal, one plain log line per step when it is not (a CI log, a
//! pipe), so nothing draws control sequences into a file.
//!
//! ```
//! let mut p = vio::progress::Progress::new("ring benchmark", 3);
//! for rep in 1..=3 {
//!     p.step(format_args!("repetition {rep}/3"));
//! }
//! p.finish();
//! ```

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fmt::Display;
use std::io::IsTerminal;

/// Steps of one command, shown as they start.
#[derive(Debug)]
pub struct Progress {
    title: String,
    total: usize,
    started: usize,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A command of `total` steps; on a terminal, draws its bar at once.
    pub fn new(title: impl Into<String>, total: usize) -> Progress {
        let title = title.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {elapsed} elapsed, ~{eta} left: {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(title.clone());
            bar
        });
        Progress {
            title,
            total,
            started: 0,
            bar,
        }
    }

    /// Steps started so far.
    pub fn started(&self) -> usize {
        self.started
    }

    /// A step starts: `what` runs now. The previous step, if any, is done.
    pub fn step(&mut self, what: impl Display) {
        self.started += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_position((self.started - 1) as u64);
                bar.set_message(what.to_string());
            }
            None => tracing::info!("{} [{}/{}] {what}", self.title, self.started, self.total),
        }
    }

    /// Every step is done: the bar is cleared.
    pub fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs `ours` and `peer` one after the other, in the order `rep` picks: ours
/// first in odd repetitions, the peer first in even ones. Whatever the first run
/// of a pair leaves behind (a warm page cache, a clock that ramped up, a disk's
/// write-back still running) then favours each side equally often.
pub fn in_turn<A, B>(rep: usize, ours: impl FnOnce() -> A, peer: impl FnOnce() -> B) -> (A, B) {
    if rep % 2 == 1 {
        let a = ours();
        (a, peer())
    } else {
        let b = peer();
        (ours(), b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_counted_whether_or_not_a_bar_is_drawn() {
        let mut p = Progress::new("test", 2);
        p.step("one");
        p.step(format_args!("two of {}", 2));
        assert_eq!(p.started(), 2);
        p.finish();
    }

    #[test]
    fn each_side_goes_first_in_every_other_repetition() {
        let order = |rep| {
            let log = std::cell::RefCell::new(Vec::new());
            in_turn(
                rep,
                || log.borrow_mut().push("ours"),
                || log.borrow_mut().push("peer"),
            );
            log.into_inner()
        };
        assert_eq!(order(1), ["ours", "peer"]);
        assert_eq!(order(2), ["peer", "ours"]);
    }
}
