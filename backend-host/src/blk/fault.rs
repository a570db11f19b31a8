//! Fault injection: an [`Engine`] wrapper that makes chosen ops fail, on a plan.
//!
//! Real disks fail rarely and never on cue; the device's error paths (IOERR status,
//! latched flush errors, short transfers) need faults that happen exactly when a test
//! says. A [`FaultPlan`] names ops by kind and ordinal ("the 3rd write") and what
//! happens to them:
//!
//! - [`Fault::Fail`]: the op is **not performed** and completes with the errno
//!   (`EIO`, `ENOSPC`, ...), as when the kernel refuses a write.
//! - [`Fault::FailAfter`]: the op **is performed**, then reported failed. This is how
//!   Linux reports writeback errors: an `fdatasync` returns `EIO` once, the dirty data
//!   is dropped, and the next `fdatasync` succeeds. The device must latch the first
//!   error (never report a later flush as success for the lost data).
//! - [`Fault::Short`]: the op is performed in full by the inner engine, and its
//!   completion reports `by` bytes fewer. A short final count means the engine gave up
//!   after its bounded retries, and bytes past the count are unspecified (POSIX says as
//!   much for a short write followed by an error); to make that visible, a short read's
//!   buffer past the count is overwritten with [`POISON`]. Shortening the inner op
//!   instead would need a shorter buffer, which would be a copy, and would exercise
//!   nothing more in the caller.
//! - [`Fault::Eagain`]: the op fails with `EAGAIN` `times` times, and the wrapper
//!   resubmits it through the inner engine each time, as a real engine does, at most
//!   [`MAX_RETRIES`] times; past the bound the completion is `EAGAIN`.
//!
//! The wrapper renumbers `user` tags so it can recognise its ops' completions; callers
//! see their own tags.

// Pure bookkeeping over another engine.
#![forbid(unsafe_code)]

use rustix::io::Errno;

use super::engine::{AlignedBuf, Completion, Engine, IoKind, IoOp, Tags};
use super::wrap::{Down, Hooks, Wrapped};

/// Resubmissions after an injected `EAGAIN` (the bound real engines use).
pub const MAX_RETRIES: u32 = 8;

/// Byte written past the reported count of a short read.
pub const POISON: u8 = 0xA5;

/// Which ops a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// [`IoKind::Read`].
    Read,
    /// [`IoKind::Write`], with or without `dsync`.
    Write,
    /// [`IoKind::Flush`].
    Flush,
    /// [`IoKind::Discard`].
    Discard,
    /// [`IoKind::WriteZeroes`].
    WriteZeroes,
}

impl OpClass {
    /// The class of `kind`.
    pub fn of(kind: IoKind) -> OpClass {
        match kind {
            IoKind::Read => OpClass::Read,
            IoKind::Write { .. } => OpClass::Write,
            IoKind::Flush => OpClass::Flush,
            IoKind::Discard => OpClass::Discard,
            IoKind::WriteZeroes => OpClass::WriteZeroes,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What happens to a chosen op (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Not performed; completes with this error.
    Fail(Errno),
    /// Performed; completes with this error anyway.
    FailAfter(Errno),
    /// Performed; the count reported is `by` bytes smaller (at least 0).
    Short {
        /// Bytes missing from the count.
        by: u64,
    },
    /// Fails with `EAGAIN` this many times before the inner engine's result counts.
    Eagain {
        /// Injected `EAGAIN`s.
        times: u32,
    },
}

/// One rule: the `nth` op of `class` (counting from 1 at submission) suffers `fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Ops counted.
    pub class: OpClass,
    /// Which one, from 1.
    pub nth: u64,
    /// What happens to it.
    pub fault: Fault,
}

/// A list of rules; the first that matches an op applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    rules: Vec<Rule>,
}

impl FaultPlan {
    /// A plan that injects nothing.
    pub fn new() -> FaultPlan {
        FaultPlan::default()
    }

    /// Adds a rule.
    #[must_use]
    pub fn rule(mut self, class: OpClass, nth: u64, fault: Fault) -> FaultPlan {
        self.rules.push(Rule { class, nth, fault });
        self
    }

    /// The `nth` write is not performed and fails with `errno` (`EIO`, `ENOSPC`).
    #[must_use]
    pub fn fail_write(self, nth: u64, errno: Errno) -> FaultPlan {
        self.rule(OpClass::Write, nth, Fault::Fail(errno))
    }

    /// The `nth` flush reaches the disk but reports `EIO`, once (Linux's one-shot
    /// writeback error report).
    #[must_use]
    pub fn fail_flush_once(self, nth: u64) -> FaultPlan {
        self.rule(OpClass::Flush, nth, Fault::FailAfter(Errno::IO))
    }

    /// The `nth` op of `class` reports `by` bytes fewer than it moved.
    #[must_use]
    pub fn short(self, class: OpClass, nth: u64, by: u64) -> FaultPlan {
        self.rule(class, nth, Fault::Short { by })
    }

    /// The `nth` op of `class` meets `times` transient `EAGAIN`s.
    #[must_use]
    pub fn eagain(self, class: OpClass, nth: u64, times: u32) -> FaultPlan {
        self.rule(class, nth, Fault::Eagain { times })
    }

    fn find(&self, class: OpClass, nth: u64) -> Option<Fault> {
        self.rules
            .iter()
            .find(|r| r.class == class && r.nth == nth)
            .map(|r| r.fault)
    }
}

/// What the wrapper did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Faults applied (each op counts once, however many retries it took).
    pub injected: u64,
    /// Resubmissions after injected `EAGAIN`s.
    pub retries: u64,
}

/// An op the wrapper tracks between submission and its final completion.
#[derive(Debug)]
struct Tracked {
    user: u64,
    kind: IoKind,
    offset: u64,
    len: u64,
    fault: Option<Fault>,
    /// `EAGAIN`s injected so far.
    eagains: u32,
}

/// An engine that injects the faults of a [`FaultPlan`] into another engine's work.
pub type FaultEngine<E> = Wrapped<E, Faults>;

/// The [`Hooks`] of a [`FaultEngine`]: the plan, and the ops it tracks.
#[derive(Debug)]
pub struct Faults {
    plan: FaultPlan,
    /// Ops of each [`OpClass`] submitted so far.
    counts: [u64; 5],
    /// Under the tag given to the inner engine.
    tracked: Tags<Tracked>,
    stats: FaultStats,
}

impl From<FaultPlan> for Faults {
    fn from(plan: FaultPlan) -> Faults {
        Faults {
            plan,
            counts: [0; 5],
            tracked: Tags::default(),
            stats: FaultStats::default(),
        }
    }
}

impl Faults {
    /// What was injected so far.
    pub fn stats(&self) -> FaultStats {
        self.stats
    }
}

impl<E: Engine> FaultEngine<E> {
    /// What was injected so far.
    pub fn stats(&self) -> FaultStats {
        self.hooks().stats()
    }
}

impl Hooks for Faults {
    fn submit(&mut self, op: IoOp, down: &mut Down<'_>) {
        let class = OpClass::of(op.kind);
        let count = &mut self.counts[class.index()];
        *count += 1;
        let fault = self.plan.find(class, *count);
        if fault.is_some() {
            self.stats.injected += 1;
        }
        if let Some(Fault::Fail(errno)) = fault {
            down.complete(Completion {
                user: op.user,
                result: Err(errno.into()),
                buf: op.buf,
            });
            return;
        }
        let user = self.tracked.insert(Tracked {
            user: op.user,
            kind: op.kind,
            offset: op.offset,
            len: op.len,
            fault,
            eagains: 0,
        });
        down.submit(IoOp { user, ..op });
    }

    /// Turns an inner completion into the caller's, or resubmits it.
    fn complete(&mut self, c: Completion, down: &mut Down<'_>) -> Option<Completion> {
        let Some(t) = self.tracked.get_mut(c.user) else {
            tracing::error!(
                user = c.user,
                "completion for no op the fault wrapper has in flight"
            );
            return Some(c);
        };
        if let Some(Fault::Eagain { times }) = t.fault
            && t.eagains < times
        {
            t.eagains += 1;
            if t.eagains <= MAX_RETRIES {
                self.stats.retries += 1;
                down.submit(IoOp {
                    kind: t.kind,
                    offset: t.offset,
                    len: t.len,
                    buf: c.buf,
                    user: c.user,
                });
                return None;
            }
        }
        let t = self.tracked.take(c.user)?;
        let Completion { result, mut buf, .. } = c;
        let result = match t.fault {
            None | Some(Fault::Fail(_)) => result,
            Some(Fault::FailAfter(errno)) => Err(errno.into()),
            Some(Fault::Eagain { .. }) if t.eagains > MAX_RETRIES => Err(Errno::AGAIN.into()),
            Some(Fault::Eagain { .. }) => result,
            Some(Fault::Short { by }) => result.map(|n| {
                let short = n.saturating_sub(by);
                if t.kind == IoKind::Read {
                    poison_after(&mut buf, short);
                }
                short
            }),
        };
        Some(Completion {
            user: t.user,
            result,
            buf,
        })
    }
}

fn poison_after(buf: &mut AlignedBuf, count: u64) {
    let from = usize::try_from(count).unwrap_or(usize::MAX).min(buf.len());
    buf.as_mut_slice()[from..].fill(POISON);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_matches_class_and_ordinal() {
        let plan = FaultPlan::new().fail_write(3, Errno::NOSPC).fail_flush_once(1);
        assert_eq!(plan.find(OpClass::Write, 3), Some(Fault::Fail(Errno::NOSPC)));
        assert_eq!(plan.find(OpClass::Write, 2), None);
        assert_eq!(plan.find(OpClass::Read, 3), None);
        assert_eq!(plan.find(OpClass::Flush, 1), Some(Fault::FailAfter(Errno::IO)));
    }

    #[test]
    fn poison_covers_only_the_tail() {
        let mut buf = AlignedBuf::new(8, 8);
        poison_after(&mut buf, 5);
        assert_eq!(buf.as_slice(), &[0, 0, 0, 0, 0, POISON, POISON, POISON]);
        poison_after(&mut buf, 100);
    }
}
