//! The guest workload: a commit-record journal over `drivers-blk`.
//!
//! A transaction writes `blocks` data blocks (4 KiB each: a header with magic,
//! transaction id, block index and a checksum of the payload), flushes, writes a
//! commit record (transaction id and a checksum over the data blocks' checksums),
//! flushes again, and only then counts as acknowledged: the guest logs "transaction
//! T acknowledged" into the shared [`Recorder`], which the checker holds against
//! every crash image. This is the ordering a journaling filesystem relies on (ext4's
//! jbd2 without asynchronous commit): the commit must never be durable without
//! its data, and an acknowledged transaction must survive any crash.
//!
//! In writethrough mode (the driver writes 0 to `writeback`, virtio 1.2 §5.2.5.1)
//! the flushes are left out, as Linux leaves them out when the write cache is off:
//! every write is then durable when it completes.
//!
//! Layout: a fixed area of `slots` commit blocks followed by `slots * blocks` data
//! blocks; transaction `t` uses commit slot `t % slots` and its own run of data
//! slots, so a slot is reused only `slots` transactions later.
//!
//! Modes: sequential (one transaction at a time, data writes at queue depth 1, like
//! `fio --iodepth=1`), and concurrent (several transactions in flight on the raw
//! API, acknowledged in whatever order their flushes complete).

use backend_host::blk::record::Recorder;
use drivers_blk::{BlkDriver, BlkError, Polled, Request, RequestId};
use std::time::{Duration, Instant};
use virtio_core::transport::Transport;
use virtio_core::{DriverModel, GuestBuf};

/// Bytes per journal block.
pub const BLOCK: u64 = 4096;
/// Bytes per journal block, as a length.
pub const BLOCK_LEN: usize = 4096;
const BLOCK_U32: u32 = 4096;
/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Mark tag: the guest began transaction `value`.
pub const TAG_BEGIN: u32 = 1;
/// Mark tag: the guest acknowledged transaction `value` (its commit is durable).
pub const TAG_ACK: u32 = 2;

const DATA_MAGIC: u64 = 0x7674_7844_4154_4131; // "vtxDATA1"
const COMMIT_MAGIC: u64 = 0x7674_7843_4f4d_4d31; // "vtxCOMM1"
/// Bytes of a data block's header; the payload follows.
const HEADER: usize = 64;

/// Where the journal lives on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Byte offset of the journal area (block aligned).
    pub base: u64,
    /// Transactions before a slot is reused.
    pub slots: u64,
    /// Data blocks per transaction.
    pub blocks: u32,
}

impl Layout {
    /// Byte offset of transaction `txn`'s commit record.
    pub fn commit_offset(&self, txn: u64) -> u64 {
        self.base + (txn % self.slots) * BLOCK
    }

    /// Byte offset of data block `idx` of transaction `txn`.
    pub fn data_offset(&self, txn: u64, idx: u32) -> u64 {
        let slot = (txn % self.slots) * u64::from(self.blocks) + u64::from(idx);
        self.base + self.slots * BLOCK + slot * BLOCK
    }

    /// First byte past the journal area.
    pub fn end(&self) -> u64 {
        self.base + self.slots * BLOCK * (1 + u64::from(self.blocks))
    }

    /// Whether `[offset, offset + len)` lies inside the journal area.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset >= self.base && offset.checked_add(len).is_some_and(|e| e <= self.end())
    }
}

/// A 64-bit checksum of `bytes` (a multiply-rotate hash over 8-byte words; not
/// cryptographic, only unlikely to match by accident).
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0x243F_6A88_85A3_08D3 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(a))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
    h ^ (h >> 32)
}

/// The checksum a commit record carries over its data blocks' checksums.
pub fn combine(csums: impl IntoIterator<Item = u64>) -> u64 {
    let mut h = 0x1319_8A2E_0370_7344u64;
    for c in csums {
        h = (h ^ c).wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(31);
    }
    h
}

fn put(block: &mut [u8], at: usize, v: u64) {
    block[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get(block: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&block[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Fills `block` (4 KiB) as data block `idx` of `txn`; returns its payload checksum.
pub fn data_block(txn: u64, idx: u32, block: &mut [u8]) -> u64 {
    let mut x = (txn.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(idx)) | 1;
    for w in block[HEADER..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let csum = checksum(&block[HEADER..]);
    block[..HEADER].fill(0);
    put(block, 0, DATA_MAGIC);
    put(block, 8, txn);
    put(block, 16, u64::from(idx));
    put(block, 24, csum);
    put(block, 32, checksum(&block[..32]));
    csum
}

/// Fills `block` (4 KiB) as the commit record of `txn`; the record is in the first
/// sector, so a torn write either has it whole or not at all.
pub fn commit_block(txn: u64, blocks: u32, combined: u64, block: &mut [u8]) {
    block.fill(0);
    put(block, 0, COMMIT_MAGIC);
    put(block, 8, txn);
    put(block, 16, u64::from(blocks));
    put(block, 24, combined);
    put(block, 32, checksum(&block[..32]));
}

/// A valid data block's identity: transaction, index, payload checksum.
pub fn parse_data(block: &[u8]) -> Option<(u64, u32, u64)> {
    if block.len() != BLOCK_LEN
        || get(block, 0) != DATA_MAGIC
        || get(block, 32) != checksum(&block[..32])
        || get(block, 24) != checksum(&block[HEADER..])
    {
        return None;
    }
    Some((get(block, 8), u32::try_from(get(block, 16)).ok()?, get(block, 24)))
}

/// A valid commit record (from the first sector of a commit block): transaction,
/// data blocks, combined checksum.
pub fn parse_commit(sector: &[u8]) -> Option<(u64, u32, u64)> {
    if sector.len() < 40 || get(sector, 0) != COMMIT_MAGIC || get(sector, 32) != checksum(&sector[..32]) {
        return None;
    }
    Some((
        get(sector, 8),
        u32::try_from(get(sector, 16)).ok()?,
        get(sector, 24),
    ))
}

/// How the guest treats the device's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestCache {
    /// Writeback: flush after the data and after the commit record.
    Writeback,
    /// Writethrough (the driver sets `writeback` to 0): no flushes.
    Writethrough,
}

/// Sequential or concurrent transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One transaction at a time; data writes at queue depth 1.
    Sequential,
    /// Up to `depth` transactions in flight, each with its data writes in flight
    /// together; acknowledged out of order.
    Concurrent {
        /// Transactions in flight.
        depth: u32,
    },
}

/// When the workload stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this many transactions were begun.
    Txns(u64),
    /// After this long of measured time (after a warm-up of a tenth of it, at most
    /// 200 ms).
    Time(Duration),
}

/// The workload's settings.
#[derive(Debug, Clone, Copy)]
pub struct JournalConfig {
    /// Where the journal is.
    pub layout: Layout,
    /// Sequential or concurrent.
    pub mode: Mode,
    /// Writeback (with flushes) or writethrough (without).
    pub cache: GuestCache,
    /// When to stop.
    pub stop: Stop,
}

/// What a workload run did.
#[derive(Debug, Clone, Default)]
pub struct JournalStats {
    /// Transactions acknowledged (in the measured period, for [`Stop::Time`]).
    pub acked: u64,
    /// Transactions begun.
    pub begun: u64,
    /// Measured time.
    pub elapsed: Duration,
    /// Latency of each flush request in the measured period, microseconds.
    pub flush_us: Vec<f64>,
    /// The first request error, after which the journal stopped (as a filesystem
    /// goes read-only): the transaction it hit was not acknowledged.
    pub error: Option<String>,
}

impl JournalStats {
    /// Acknowledged transactions per second of measured time.
    pub fn txn_per_s(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What stopped the workload before it could run.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Guest memory for the buffers could not be had.
    #[error("Could not allocate guest buffers")]
    Memory(#[source] hypervisor::MemoryError),
    /// The journal does not fit the disk.
    #[error("The journal ends at byte {end}, past the disk's {capacity}")]
    TooSmall {
        /// End of the journal area.
        end: u64,
        /// Disk size in bytes.
        capacity: u64,
    },
    /// The device did not take `writeback = 0`.
    #[error("The device refused writethrough mode (no CONFIG_WCE?)")]
    NoWritethrough,
    /// Setting up the journal (zeroing the commit area) failed.
    #[error("Formatting the journal failed")]
    Format(#[source] BlkError),
}

/// Longest wait for one request before the workload gives up on the device.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// Polling access to queue 0.
struct Io<'a, D: DriverModel, T: Transport> {
    d: &'a BlkDriver<D, T>,
    polled: Vec<Polled>,
}

impl<D: DriverModel, T: Transport> Io<'_, D, T> {
    fn submit(&self, req: Request) -> Result<RequestId, BlkError> {
        self.d.submit(0, req)
    }

    /// Polls until something completes (or the deadline passes).
    fn poll(&mut self, out: &mut Vec<Polled>) -> Result<(), BlkError> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        loop {
            self.d.poll_into(0, 64, out)?;
            if !out.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BlkError::TimedOut);
            }
            // A polite poller: the device worker may share this core.
            std::thread::yield_now();
        }
    }

    /// Submits, kicks and waits for one request.
    fn one(&mut self, req: Request) -> Result<(), BlkError> {
        let id = self.submit(req)?;
        self.d.kick(0)?;
        let mut got = std::mem::take(&mut self.polled);
        got.clear();
        let r = loop {
            if let Err(e) = self.poll(&mut got) {
                break Err(e);
            }
            if let Some(pos) = got.iter().position(|(i, _)| *i == id) {
                break got.swap_remove(pos).1.map(drop);
            }
            got.clear();
        };
        self.polled = got;
        r
    }
}

/// Buffers for one transaction: data blocks and the commit block, in guest memory.
struct TxnBufs {
    data: Vec<GuestBuf>,
    commit: GuestBuf,
}

fn alloc_bufs<D: DriverModel, T: Transport>(
    d: &BlkDriver<D, T>,
    blocks: u32,
) -> Result<TxnBufs, JournalError> {
    let mem = d.memory();
    let one = || {
        mem.alloc(BLOCK, BLOCK)
            .map(|a| GuestBuf::new(a, BLOCK_U32))
            .map_err(JournalError::Memory)
    };
    Ok(TxnBufs {
        data: (0..blocks).map(|_| one()).collect::<Result<_, _>>()?,
        commit: one()?,
    })
}

/// Fills the transaction's buffers; returns the combined checksum.
fn fill<D: DriverModel, T: Transport>(
    d: &BlkDriver<D, T>,
    bufs: &TxnBufs,
    txn: u64,
    scratch: &mut [u8],
) -> Result<(), BlkError> {
    let mut csums = Vec::with_capacity(bufs.data.len());
    for (i, b) in (0u32..).zip(&bufs.data) {
        csums.push(data_block(txn, i, scratch));
        d.memory().write(b.addr, scratch)?;
    }
    commit_block(
        txn,
        u32::try_from(bufs.data.len()).unwrap_or(u32::MAX),
        combine(csums),
        scratch,
    );
    d.memory().write(bufs.commit.addr, scratch)?;
    Ok(())
}

/// Switches the device to writethrough through CONFIG_WCE and checks it took.
fn set_writethrough<D: DriverModel, T: Transport>(d: &BlkDriver<D, T>) -> Result<(), JournalError> {
    let at = std::mem::offset_of!(virtio_core::blk::BlkConfig, writeback);
    d.transport().write_config(at, &[0]);
    let mut wb = [1u8];
    d.transport().read_config(at, &mut wb);
    if wb != [0] {
        return Err(JournalError::NoWritethrough);
    }
    Ok(())
}

/// Runs the journal on queue 0 of `d`, logging begin and acknowledgement marks into
/// `marks`. Request errors end the run (recorded in [`JournalStats::error`]); only
/// set-up failures are errors.
pub fn run<D: DriverModel, T: Transport>(
    d: &BlkDriver<D, T>,
    cfg: &JournalConfig,
    marks: Option<&Recorder>,
) -> Result<JournalStats, JournalError> {
    let capacity = d.info().capacity_bytes();
    if cfg.layout.end() > capacity {
        return Err(JournalError::TooSmall {
            end: cfg.layout.end(),
            capacity,
        });
    }
    if cfg.cache == GuestCache::Writethrough {
        set_writethrough(d)?;
    }
    let mut io = Io {
        d,
        polled: Vec::new(),
    };
    // Format: no commit record of an earlier run may survive in the commit area.
    let commit_sectors = u32::try_from(cfg.layout.slots * BLOCK / SECTOR).unwrap_or(u32::MAX);
    io.one(Request::WriteZeroes {
        sector: cfg.layout.base / SECTOR,
        sectors: commit_sectors,
        unmap: false,
    })
    .and_then(|()| match cfg.cache {
        GuestCache::Writeback => io.one(Request::Flush),
        GuestCache::Writethrough => Ok(()),
    })
    .map_err(JournalError::Format)?;
    match cfg.mode {
        Mode::Sequential => sequential(&mut io, cfg, marks),
        Mode::Concurrent { depth } => concurrent(&mut io, cfg, marks, depth.max(1)),
    }
}

/// Tracks the stop condition and the measured period.
struct Clock {
    stop: Stop,
    start: Instant,
    measuring: Option<(Instant, u64)>,
}

impl Clock {
    fn new(stop: Stop) -> Clock {
        Clock {
            stop,
            start: Instant::now(),
            measuring: match stop {
                Stop::Txns(_) => Some((Instant::now(), 0)),
                Stop::Time(_) => None,
            },
        }
    }

    fn warmup(&self) -> Duration {
        match self.stop {
            Stop::Time(t) => (t / 10).min(Duration::from_millis(200)),
            Stop::Txns(_) => Duration::ZERO,
        }
    }

    fn measuring(&self) -> bool {
        self.measuring.is_some()
    }

    /// Whether to begin another transaction, given `begun` so far and `acked`.
    fn more(&mut self, begun: u64, acked: u64) -> bool {
        match self.stop {
            Stop::Txns(n) => begun < n,
            Stop::Time(t) => match self.measuring {
                None => {
                    if self.start.elapsed() >= self.warmup() {
                        self.measuring = Some((Instant::now(), acked));
                    }
                    true
                }
                Some((t0, _)) => t0.elapsed() < t,
            },
        }
    }

    fn finish(&self, stats: &mut JournalStats, acked: u64) {
        let (t0, a0) = self.measuring.unwrap_or((Instant::now(), acked));
        stats.elapsed = t0.elapsed();
        stats.acked = acked - a0;
    }
}

fn sequential<D: DriverModel, T: Transport>(
    io: &mut Io<'_, D, T>,
    cfg: &JournalConfig,
    marks: Option<&Recorder>,
) -> Result<JournalStats, JournalError> {
    let bufs = alloc_bufs(io.d, cfg.layout.blocks)?;
    let mut scratch = vec![0u8; BLOCK_LEN];
    let mut stats = JournalStats::default();
    let mut clock = Clock::new(cfg.stop);
    let (mut txn, mut acked) = (0u64, 0u64);
    let flush = |io: &mut Io<'_, D, T>, stats: &mut JournalStats, measuring: bool| {
        if cfg.cache == GuestCache::Writethrough {
            return Ok(());
        }
        let t = Instant::now();
        io.one(Request::Flush)?;
        if measuring {
            stats.flush_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok::<(), BlkError>(())
    };
    while clock.more(txn, acked) {
        let measuring = clock.measuring();
        if let Some(m) = marks {
            m.mark(TAG_BEGIN, txn);
        }
        let r = (|| {
            fill(io.d, &bufs, txn, &mut scratch)?;
            for (i, b) in (0u32..).zip(&bufs.data) {
                let sector = cfg.layout.data_offset(txn, i) / SECTOR;
                io.one(Request::Write { sector, buf: *b })?;
            }
            flush(io, &mut stats, measuring)?;
            let sector = cfg.layout.commit_offset(txn) / SECTOR;
            io.one(Request::Write {
                sector,
                buf: bufs.commit,
            })?;
            flush(io, &mut stats, measuring)
        })();
        txn += 1;
        if let Err(e) = r {
            stats.error = Some(format!("transaction {}: {e}", txn - 1));
            break;
        }
        if let Some(m) = marks {
            m.mark(TAG_ACK, txn - 1);
        }
        acked += 1;
    }
    stats.begun = txn;
    clock.finish(&mut stats, acked);
    Ok(stats)
}

/// Where a transaction in flight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Data { left: u32 },
    DataFlush,
    Commit,
    CommitFlush,
}

struct Slot {
    bufs: TxnBufs,
    txn: u64,
    step: Option<Step>,
    ids: Vec<RequestId>,
    since: Instant,
}

fn concurrent<D: DriverModel, T: Transport>(
    io: &mut Io<'_, D, T>,
    cfg: &JournalConfig,
    marks: Option<&Recorder>,
    depth: u32,
) -> Result<JournalStats, JournalError> {
    let blocks = cfg.layout.blocks;
    let wb = cfg.cache == GuestCache::Writeback;
    let mut slots = (0..depth)
        .map(|_| {
            Ok(Slot {
                bufs: alloc_bufs(io.d, blocks)?,
                txn: 0,
                step: None,
                ids: Vec::new(),
                since: Instant::now(),
            })
        })
        .collect::<Result<Vec<_>, JournalError>>()?;
    let mut scratch = vec![0u8; BLOCK_LEN];
    let mut stats = JournalStats::default();
    let mut clock = Clock::new(cfg.stop);
    let (mut next, mut acked) = (0u64, 0u64);
    let mut got = Vec::new();
    let mut failed = false;
    // Starts transaction `next` in slot `s`: all its data writes at once.
    let begin = |io: &mut Io<'_, D, T>, s: &mut Slot, txn: u64, scratch: &mut [u8]| -> Result<(), BlkError> {
        if let Some(m) = marks {
            m.mark(TAG_BEGIN, txn);
        }
        s.txn = txn;
        s.ids.clear();
        fill(io.d, &s.bufs, txn, scratch)?;
        for (i, b) in (0u32..).zip(&s.bufs.data) {
            let sector = cfg.layout.data_offset(txn, i) / SECTOR;
            s.ids.push(io.submit(Request::Write { sector, buf: *b })?);
        }
        s.step = Some(Step::Data { left: blocks });
        Ok(())
    };
    loop {
        // Fill idle slots, but never reuse the journal slots of a transaction still in
        // flight (`slots` transactions back).
        let oldest = slots.iter().filter(|s| s.step.is_some()).map(|s| s.txn).min();
        let room = |next: u64| oldest.is_none_or(|o| next < o + cfg.layout.slots);
        for s in &mut slots {
            if s.step.is_none() && !failed && room(next) && clock.more(next, acked) {
                if let Err(e) = begin(io, s, next, &mut scratch) {
                    stats
                        .error
                        .get_or_insert_with(|| format!("transaction {next}: {e}"));
                    failed = true;
                }
                next += 1;
            }
        }
        if slots.iter().all(|s| s.step.is_none()) {
            break;
        }
        if let Err(e) = io.d.kick(0) {
            stats.error.get_or_insert_with(|| format!("kick: {e}"));
            break;
        }
        got.clear();
        if let Err(e) = io.poll(&mut got) {
            stats.error.get_or_insert_with(|| format!("poll: {e}"));
            break;
        }
        let measuring = clock.measuring();
        for (id, result) in got.drain(..) {
            let Some(s) = slots.iter_mut().find(|s| s.step.is_some() && s.ids.contains(&id)) else {
                stats
                    .error
                    .get_or_insert_with(|| "a completion for no transaction".into());
                failed = true;
                continue;
            };
            s.ids.retain(|i| *i != id);
            if let Err(e) = result {
                // The transaction is not acknowledged; those in flight finish, no
                // new ones start.
                stats
                    .error
                    .get_or_insert_with(|| format!("transaction {}: {e}", s.txn));
                failed = true;
                if s.ids.is_empty() {
                    s.step = None;
                }
                continue;
            }
            if failed && s.ids.is_empty() {
                s.step = None;
                continue;
            }
            let step = match s.step {
                Some(Step::Data { left }) if left > 1 => Some(Step::Data { left: left - 1 }),
                Some(Step::Data { .. }) if wb => Some(Step::DataFlush),
                Some(Step::Data { .. }) | Some(Step::DataFlush) => Some(Step::Commit),
                Some(Step::Commit) if wb => Some(Step::CommitFlush),
                Some(Step::Commit) | Some(Step::CommitFlush) => None,
                None => None,
            };
            if measuring && matches!(s.step, Some(Step::DataFlush | Step::CommitFlush)) {
                stats.flush_us.push(s.since.elapsed().as_secs_f64() * 1e6);
            }
            s.since = Instant::now();
            let req = match step {
                Some(Step::Data { .. }) => {
                    s.step = step;
                    continue;
                }
                Some(Step::DataFlush) | Some(Step::CommitFlush) => Request::Flush,
                Some(Step::Commit) => Request::Write {
                    sector: cfg.layout.commit_offset(s.txn) / SECTOR,
                    buf: s.bufs.commit,
                },
                None => {
                    if let Some(m) = marks {
                        m.mark(TAG_ACK, s.txn);
                    }
                    acked += 1;
                    s.step = None;
                    continue;
                }
            };
            match io.submit(req) {
                Ok(id) => {
                    s.ids.push(id);
                    s.step = step;
                }
                Err(e) => {
                    stats
                        .error
                        .get_or_insert_with(|| format!("transaction {}: {e}", s.txn));
                    failed = true;
                    s.step = None;
                }
            }
        }
    }
    stats.begun = next;
    clock.finish(&mut stats, acked);
    Ok(stats)
}
