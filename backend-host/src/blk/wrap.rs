//! One way to wrap an engine: [`Wrapped`] runs another [`Engine`] and hands every op
//! on its way down and every completion on its way up to a [`Hooks`] value, which
//! may pass it on, change it, answer it itself, hold it back or swallow it.
//!
//! Fault injection ([`Faults`](super::fault::Faults)), recording
//! ([`Recording`](super::record::Recording)) and the barrier checker's seeded bugs
//! are hooks; what every wrapper must get right is here, once:
//!
//! - completions a hook makes itself are held until the next [`Engine::reap`],
//!   counted in [`Engine::in_flight`], and announced on the inner engine's readiness
//!   eventfd, so an event loop waiting on [`Engine::ready_fd`] notices them;
//! - [`Engine::wait`] returns at once while such completions are held;
//! - ops a hook resubmits while completions are reaped are committed before `reap`
//!   returns.
//!
//! A hook that passes ops down under tags of its own (to recognise their
//! completions) keeps them in [`Tags`](super::engine::Tags), or marks them with bits
//! at or above [`TAG_RESERVED`](super::engine::TAG_RESERVED), which the device never
//! uses.
//!
//! ```
//! use backend_host::blk::engine::{Completion, IoOp};
//! use backend_host::blk::wrap::{Down, Hooks, Wrapped};
//!
//! /// Counts the bytes of ops passing through.
//! #[derive(Default)]
//! struct Count(u64);
//!
//! impl Hooks for Count {
//!     fn submit(&mut self, op: IoOp, down: &mut Down<'_>) {
//!         self.0 += op.buf.len() as u64;
//!         down.submit(op);
//!     }
//!     fn complete(&mut self, c: Completion, _: &mut Down<'_>) -> Option<Completion> {
//!         Some(c)
//!     }
//! }
//! # fn wrap(inner: Box<dyn backend_host::blk::engine::Engine>) {
//! let counting = Wrapped::<_, Count>::new(inner, Count::default());
//! assert_eq!(counting.hooks().0, 0);
//! # }
//! ```

// Pure bookkeeping over another engine.
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::BorrowedFd;

use super::engine::{Completion, Engine, IoOp};

/// What a wrapper does with the ops and completions passing through it.
pub trait Hooks: Send {
    /// An op from above. Pass it down with [`Down::submit`] (changed or not, under
    /// the caller's tag or one of the hook's own), answer it with
    /// [`Down::complete`], or keep it to pass down later.
    fn submit(&mut self, op: IoOp, down: &mut Down<'_>);

    /// A completion from the inner engine. Return what the caller above gets
    /// (under the caller's tag), or `None` to swallow it (an op the hook made
    /// itself, or one it resubmits with [`Down::submit`]).
    fn complete(&mut self, c: Completion, down: &mut Down<'_>) -> Option<Completion>;
}

/// The wrapper's side of a hook call: the inner engine, and the completions made
/// without it.
pub struct Down<'a> {
    inner: &'a mut dyn Engine,
    ready: &'a mut MadeHere,
    submitted: bool,
}

impl Down<'_> {
    /// Passes `op` to the inner engine.
    pub fn submit(&mut self, op: IoOp) {
        self.inner.submit(op);
        self.submitted = true;
    }

    /// Completes an op without the inner engine: held for the next reap, counted in
    /// flight until then, announced on the readiness eventfd.
    pub fn complete(&mut self, c: Completion) {
        self.ready.complete(self.inner.ready_fd(), c);
    }
}

/// An engine that runs `E` under the hooks `H`. See the module docs.
#[derive(Debug)]
pub struct Wrapped<E: Engine, H: Hooks> {
    inner: E,
    hooks: H,
    ready: MadeHere,
    scratch: Vec<Completion>,
}

impl<E: Engine, H: Hooks> Wrapped<E, H> {
    /// Wraps `inner`; its `ready_fd` must be an eventfd (true of this crate's
    /// engines), because the wrapper raises it for completions made without it.
    pub fn new(inner: E, hooks: impl Into<H>) -> Wrapped<E, H> {
        Wrapped {
            inner,
            hooks: hooks.into(),
            ready: MadeHere::default(),
            scratch: Vec::new(),
        }
    }

    /// The hooks.
    pub fn hooks(&self) -> &H {
        &self.hooks
    }

    /// The wrapped engine.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// Unwraps the engine.
    pub fn into_inner(self) -> E {
        self.inner
    }
}

impl<E: Engine, H: Hooks> Engine for Wrapped<E, H> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn submit(&mut self, op: IoOp) {
        let mut down = Down {
            inner: &mut self.inner,
            ready: &mut self.ready,
            submitted: false,
        };
        self.hooks.submit(op, &mut down);
    }

    fn commit(&mut self) -> io::Result<()> {
        self.inner.commit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.inner.reap(&mut scratch);
        let mut down = Down {
            inner: &mut self.inner,
            ready: &mut self.ready,
            submitted: false,
        };
        for c in scratch.drain(..) {
            if let Some(c) = self.hooks.complete(c, &mut down) {
                down.ready.pass(c);
            }
        }
        let resubmitted = down.submitted;
        self.scratch = scratch;
        if resubmitted && let Err(e) = self.inner.commit() {
            tracing::warn!(error = %e, "engine wrapper could not resubmit; retrying later");
        }
        self.ready.reap(out)
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.ready.is_empty() {
            self.inner.wait()
        } else {
            Ok(())
        }
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.inner.ready_fd()
    }

    fn ack_ready(&mut self) {
        self.inner.ack_ready();
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.ready.len()
    }
}

/// Completions held by a wrapper for the next reap.
#[derive(Debug, Default)]
struct MadeHere {
    ready: Vec<Completion>,
}

impl MadeHere {
    /// Holds `c` for the next reap and raises `ready_fd` (the inner engine's).
    fn complete(&mut self, ready_fd: BorrowedFd<'_>, c: Completion) {
        self.ready.push(c);
        match rustix::io::write(ready_fd, &1u64.to_ne_bytes()) {
            // EAGAIN: the counter is saturated, a wake-up is pending anyway.
            Ok(_) | Err(rustix::io::Errno::AGAIN) => {}
            Err(e) => tracing::warn!(error = %e, "could not raise the engine's eventfd"),
        }
    }

    /// Holds `c`, reaped from the inner engine, for the caller.
    fn pass(&mut self, c: Completion) {
        self.ready.push(c);
    }

    /// Moves every held completion into `out`; returns how many.
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.ready.len();
        out.append(&mut self.ready);
        n
    }

    fn len(&self) -> usize {
        self.ready.len()
    }

    fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }
}
