//! Seeded bugs: engine wrappers that break the barrier contract in the ways real
//! backends have, each of which the checker must catch.
//!
//! A mutant sits between the device and the [`RecordingEngine`], so the log shows
//! what really reached the file while the device (and the guest) see the lie:
//!
//! | mutant | lie |
//! |---|---|
//! | [`MutantKind::FlushIgnored`] | FLUSH completes at once and never reaches the file |
//! | [`MutantKind::EarlyFlush`] | FLUSH completes at once; the `fdatasync` is passed down with the next op, its completion swallowed |
//! | [`MutantKind::EarlyWriteAck`] | a write completes at once; a copy of its buffer is passed down with the next op |
//! | [`MutantKind::FsyncErrorSwallowed`] | a failed `fdatasync` is reported as success (with a [`FaultEngine`] below the recorder failing one) |
//! | [`MutantKind::WritethroughNoDsync`] | writethrough writes lose `RWF_DSYNC` |
//!
//! Buffer ownership still holds (the [`Engine`] seam's rule): a buffer handed back
//! early is the device's own; what stays in flight is the mutant's copy, freed only
//! when its completion is reaped.
//!
//! [`RecordingEngine`]: backend_host::blk::record::RecordingEngine
//! [`FaultEngine`]: backend_host::blk::fault::FaultEngine
//! [`Engine`]: backend_host::blk::engine::Engine

use backend_host::blk::engine::{AlignedBuf, Completion, IoKind, IoOp};
use backend_host::blk::wrap::{Down, Hooks, Wrapped};

/// Tag bit of ops whose completion the mutant swallows: above the device's tags
/// ([`backend_host::blk::engine::TAG_RESERVED`]).
const SWALLOW: u64 = 1 << 63;
/// Tag bit of flushes passed down, so their completions can be recognised.
const FLUSH: u64 = 1 << 62;

/// Which bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MutantKind {
    /// FLUSH acknowledged without `fdatasync`.
    FlushIgnored,
    /// FLUSH acknowledged before its `fdatasync` completes.
    EarlyFlush,
    /// Writes acknowledged before they complete.
    EarlyWriteAck,
    /// A failed `fdatasync` reported as success.
    FsyncErrorSwallowed,
    /// Writethrough mode without `RWF_DSYNC`.
    WritethroughNoDsync,
}

impl MutantKind {
    /// Every mutant.
    pub const ALL: [MutantKind; 5] = [
        MutantKind::FlushIgnored,
        MutantKind::EarlyFlush,
        MutantKind::EarlyWriteAck,
        MutantKind::FsyncErrorSwallowed,
        MutantKind::WritethroughNoDsync,
    ];

    /// A short name for tables.
    pub fn label(self) -> &'static str {
        match self {
            MutantKind::FlushIgnored => "flush ignored",
            MutantKind::EarlyFlush => "flush acked before fsync CQE",
            MutantKind::EarlyWriteAck => "write acked before CQE",
            MutantKind::FsyncErrorSwallowed => "fsync error swallowed",
            MutantKind::WritethroughNoDsync => "writethrough without RWF_DSYNC",
        }
    }
}

/// An engine with a seeded bug.
pub type MutantEngine<E> = Wrapped<E, Mutant>;

/// The [`Hooks`] of a [`MutantEngine`]: the bug, and what it needs to tell its lies.
#[derive(Debug)]
pub struct Mutant {
    kind: MutantKind,
    next_swallow: u64,
    /// Lies told so far.
    lies: u64,
    /// The real op behind an early acknowledgement, passed down with the next op
    /// the device submits: so the lie is always visible in the log (the guest has
    /// its ack, and acts on it, before the op even reaches the file), whatever the
    /// timing of the machine.
    held: Option<IoOp>,
}

impl From<MutantKind> for Mutant {
    fn from(kind: MutantKind) -> Mutant {
        Mutant {
            kind,
            next_swallow: 0,
            lies: 0,
            held: None,
        }
    }
}

impl Mutant {
    /// Lies told so far.
    pub fn lies(&self) -> u64 {
        self.lies
    }

    fn complete_now(
        &mut self,
        down: &mut Down<'_>,
        user: u64,
        result: std::io::Result<u64>,
        buf: AlignedBuf,
    ) {
        down.complete(Completion { user, result, buf });
        self.lies += 1;
    }

    fn swallow_tag(&mut self) -> u64 {
        self.next_swallow += 1;
        SWALLOW | self.next_swallow
    }
}

impl Hooks for Mutant {
    fn submit(&mut self, mut op: IoOp, down: &mut Down<'_>) {
        if let Some(held) = self.held.take() {
            down.submit(held);
        }
        match (self.kind, op.kind) {
            (MutantKind::FlushIgnored, IoKind::Flush) => self.complete_now(down, op.user, Ok(0), op.buf),
            (MutantKind::EarlyFlush, IoKind::Flush) => {
                self.complete_now(down, op.user, Ok(0), AlignedBuf::default());
                let user = self.swallow_tag();
                self.held = Some(IoOp { user, ..op });
            }
            (MutantKind::EarlyWriteAck, IoKind::Write { .. }) => {
                // The device gets its buffer back now; the copy stays in flight.
                let mut copy = AlignedBuf::new(op.buf.len(), 4096);
                copy.as_mut_slice().copy_from_slice(op.buf.as_slice());
                let IoOp { user, buf, .. } = op;
                let len = buf.len() as u64;
                self.complete_now(down, user, Ok(len), buf);
                let tag = self.swallow_tag();
                self.held = Some(IoOp {
                    buf: copy,
                    user: tag,
                    ..op
                });
            }
            (MutantKind::FsyncErrorSwallowed, IoKind::Flush) => {
                op.user |= FLUSH;
                down.submit(op);
            }
            (MutantKind::WritethroughNoDsync, IoKind::Write { dsync: true }) => {
                op.kind = IoKind::Write { dsync: false };
                self.lies += 1;
                down.submit(op);
            }
            _ => down.submit(op),
        }
    }

    fn complete(&mut self, mut c: Completion, _: &mut Down<'_>) -> Option<Completion> {
        if c.user & SWALLOW != 0 {
            return None; // The device was told long ago; the copy is freed here.
        }
        if c.user & FLUSH != 0 {
            c.user &= !FLUSH;
            if let Err(e) = &c.result {
                tracing::debug!(error = %e, "mutant swallows a failed fdatasync");
                c.result = Ok(0);
                self.lies += 1;
            }
        }
        Some(c)
    }
}
