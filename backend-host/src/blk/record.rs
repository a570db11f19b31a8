//! Recording: an [`Engine`] wrapper that logs what really reaches the disk, for
//! crash-consistency checking.
//!
//! Placed directly above the engine that talks to the file, a [`RecordingEngine`]
//! logs into a shared [`Recorder`], under one global sequence:
//!
//! - a write's submission (range, a copy of the data, whether it is `RWF_DSYNC`) and
//!   its completion (bytes or errno);
//! - an `fdatasync`'s submission and completion;
//! - DISCARD and WRITE_ZEROES submissions and completions;
//! - marks the caller adds itself ([`Recorder::mark`]), such as "the guest
//!   acknowledged transaction 7", so guest-visible facts and file-level facts share
//!   one order.
//!
//! A completion is logged when the wrapper reaps it from the engine below, before
//! the device above can act on it; a submission is logged before the op is passed
//! down. So if the device acknowledges something to the guest because an op
//! completed, the op's completion precedes the acknowledgement in the log, and the
//! log never shows an op finishing before it was submitted.
//!
//! What is durable at any point follows from these file-level events (virtio 1.2
//! §5.2.6.3 and `fdatasync(2)`): a write is stable once it completed and a later
//! submitted `fdatasync` completed successfully, or at its completion if it was
//! `RWF_DSYNC`. The crash-image generator in the `vio` crate computes that; this
//! module only records.
//!
//! Reads are passed through unlogged. The wrapper renumbers `user` tags (a request
//! with several ranges submits several ops under one tag); callers see their own.

// Pure bookkeeping over another engine.
#![forbid(unsafe_code)]

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::engine::{Completion, Engine, IoKind, IoOp, Tags};
use super::wrap::{Down, Hooks, Wrapped};

/// An op as it was submitted to the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedOp {
    /// A write of `data` at `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// A copy of the bytes written.
        data: Arc<[u8]>,
        /// Durable at completion (`RWF_DSYNC`, writethrough mode).
        dsync: bool,
    },
    /// An `fdatasync` of the whole disk.
    Flush,
    /// A hole punched at `[offset, offset + len)`.
    Discard {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `[offset, offset + len)` made to read as zeros.
    WriteZeroes {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// Op `op` was passed to the engine.
    Submitted {
        /// The op's identity in this log (unique per [`Recorder`]).
        op: u64,
        /// What it does.
        io: RecordedOp,
    },
    /// Op `op` finished: bytes transferred, or the raw OS error.
    Completed {
        /// The op's identity.
        op: u64,
        /// Bytes, or the errno (`-1` for an error without one).
        result: Result<u64, i32>,
    },
    /// A caller's annotation (see [`Recorder::mark`]).
    Mark {
        /// What kind of mark (the caller's numbering).
        tag: u32,
        /// Its value.
        value: u64,
    },
}

/// One logged event; `seq` is its place in the global order, from 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the log.
    pub seq: u64,
    /// What happened.
    pub kind: EventKind,
}

#[derive(Debug, Default)]
struct Log {
    events: Vec<Event>,
    next_op: u64,
}

/// The shared log of one disk: every [`RecordingEngine`] over it (one per queue) and
/// the callers' marks append to it.
///
/// The sequence number is assigned while the log's lock is held, so log order and
/// sequence order are the same thing: an atomic counter taken outside the lock
/// could let two threads append out of order, and readers would have to sort and
/// could not trust a prefix.
#[derive(Debug, Default)]
pub struct Recorder {
    log: Mutex<Log>,
}

impl Recorder {
    /// An empty log, shared.
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // Appending never leaves the log half-updated, so a poisoned lock is usable.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(log: &mut Log, kind: EventKind) -> u64 {
        let seq = log.events.len() as u64;
        log.events.push(Event { seq, kind });
        seq
    }

    /// Appends a caller's mark and returns its sequence number.
    pub fn mark(&self, tag: u32, value: u64) -> u64 {
        Recorder::push(&mut self.lock(), EventKind::Mark { tag, value })
    }

    fn submitted(&self, io: RecordedOp) -> u64 {
        let mut log = self.lock();
        let op = log.next_op;
        log.next_op += 1;
        Recorder::push(&mut log, EventKind::Submitted { op, io });
        op
    }

    fn completed(&self, op: u64, result: &io::Result<u64>) {
        let result = match result {
            Ok(n) => Ok(*n),
            Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
        };
        Recorder::push(&mut self.lock(), EventKind::Completed { op, result });
    }

    /// Events logged so far.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// Whether nothing was logged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the log (write data is shared, not copied).
    pub fn snapshot(&self) -> Vec<Event> {
        self.lock().events.clone()
    }
}

/// An op between its submission and its completion.
#[derive(Debug)]
struct Tracked {
    user: u64,
    /// `None` for reads, which are not logged.
    op: Option<u64>,
}

/// An engine that logs the writes, flushes, discards and write-zeroes of another
/// engine into a [`Recorder`].
pub type RecordingEngine<E> = Wrapped<E, Recording>;

/// The [`Hooks`] of a [`RecordingEngine`]: the log, and the ops in flight.
#[derive(Debug)]
pub struct Recording {
    recorder: Arc<Recorder>,
    /// Indexed by the tag given to the inner engine.
    tracked: Tags<Tracked>,
}

impl From<Arc<Recorder>> for Recording {
    fn from(recorder: Arc<Recorder>) -> Recording {
        Recording {
            recorder,
            tracked: Tags::default(),
        }
    }
}

impl<E: Engine> RecordingEngine<E> {
    /// The log.
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.hooks().recorder
    }
}

impl Hooks for Recording {
    fn submit(&mut self, op: IoOp, down: &mut Down<'_>) {
        let recorded = match op.kind {
            IoKind::Read => None,
            IoKind::Write { dsync } => Some(RecordedOp::Write {
                offset: op.offset,
                data: Arc::from(op.buf.as_slice()),
                dsync,
            }),
            IoKind::Flush => Some(RecordedOp::Flush),
            IoKind::Discard => Some(RecordedOp::Discard {
                offset: op.offset,
                len: op.len,
            }),
            IoKind::WriteZeroes => Some(RecordedOp::WriteZeroes {
                offset: op.offset,
                len: op.len,
            }),
        };
        let id = recorded.map(|r| self.recorder.submitted(r));
        let user = self.tracked.insert(Tracked {
            user: op.user,
            op: id,
        });
        down.submit(IoOp { user, ..op });
    }

    fn complete(&mut self, c: Completion, _: &mut Down<'_>) -> Option<Completion> {
        let Some(t) = self.tracked.take(c.user) else {
            tracing::error!(user = c.user, "completion for an op the recorder never sent");
            return None;
        };
        if let Some(op) = t.op {
            self.recorder.completed(op, &c.result);
        }
        Some(Completion { user: t.user, ..c })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::disk::{Disk, DiskOptions};
    use crate::blk::engine::AlignedBuf;
    use crate::blk::engine_sync::SyncEngine;

    fn drain(e: &mut impl Engine, want: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        while out.len() < want {
            e.wait().unwrap();
            e.reap(&mut out);
        }
        out
    }

    #[test]
    fn logs_submissions_before_completions_with_callers_tags() {
        let dir = std::env::temp_dir().join(format!("vio-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rec.img");
        Disk::create_sparse(&path, 1 << 20).unwrap();
        let disk = Disk::open(
            &path,
            DiskOptions {
                direct: crate::blk::disk::DirectMode::Off,
                ..DiskOptions::default()
            },
        )
        .unwrap();
        let rec = Recorder::new();
        let mut e = RecordingEngine::new(SyncEngine::new(&disk, 1).unwrap(), rec.clone());
        let mut buf = AlignedBuf::new(4096, 4096);
        buf.as_mut_slice().fill(7);
        // Two ops under one tag, as a multi-range request does.
        e.submit(IoOp {
            kind: IoKind::Write { dsync: true },
            offset: 8192,
            len: 4096,
            buf,
            user: 5,
        });
        e.submit(IoOp {
            kind: IoKind::Discard,
            offset: 0,
            len: 4096,
            buf: AlignedBuf::default(),
            user: 5,
        });
        e.commit().unwrap();
        let got = drain(&mut e, 2);
        assert!(got.iter().all(|c| c.user == 5 && c.result.is_ok()));
        rec.mark(1, 42);
        e.submit(IoOp {
            kind: IoKind::Flush,
            offset: 0,
            len: 0,
            buf: AlignedBuf::default(),
            user: 9,
        });
        e.commit().unwrap();
        assert_eq!(drain(&mut e, 1)[0].user, 9);
        let log = rec.snapshot();
        assert_eq!(log.len(), 7);
        assert!(log.iter().enumerate().all(|(i, ev)| ev.seq == i as u64));
        let pos = |pred: &dyn Fn(&EventKind) -> bool| log.iter().position(|e| pred(&e.kind)).unwrap();
        let write_sub = pos(
            &|k| matches!(k, EventKind::Submitted { io: RecordedOp::Write { offset: 8192, dsync: true, data }, .. } if data.iter().all(|&b| b == 7)),
        );
        let write_done = pos(&|k| {
            matches!(
                k,
                EventKind::Completed {
                    op: 0,
                    result: Ok(4096)
                }
            )
        });
        assert!(write_sub < write_done);
        pos(&|k| {
            matches!(
                k,
                EventKind::Submitted {
                    op: 1,
                    io: RecordedOp::Discard { offset: 0, len: 4096 }
                }
            )
        });
        let mark = pos(&|k| matches!(k, EventKind::Mark { tag: 1, value: 42 }));
        let flush = pos(&|k| {
            matches!(
                k,
                EventKind::Submitted {
                    op: 2,
                    io: RecordedOp::Flush
                }
            )
        });
        assert!(mark < flush);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
