//! The checker: what must hold in every crash image of the journal.
//!
//! Per image, for the transactions whose slots are live (begun, and not yet reused
//! by a transaction `slots` later):
//!
//! - every transaction acknowledged before the crash point has a valid commit
//!   record and intact data blocks ([`Violation::LostAck`]);
//! - no valid commit record lacks its data ([`Violation::CommitWithoutData`]);
//! - in sequential mode, the committed transactions form a prefix
//!   ([`Violation::NotPrefix`]);
//! - no write that lands outside the journal area is in the image
//!   ([`Violation::Outside`]); [`fidelity`] checks the other half of "sectors never
//!   written are unchanged" on the real file at the end of a run.
//!
//! Blocks written whole by one write are parsed once per write; only torn or mixed
//! blocks are assembled and parsed per image.

use super::crash::{
    CrashState, History, ImageView, SECTOR, SECTOR_LEN, Selection, Source, WHOLE, base_sector,
};
use super::journal::{BLOCK, BLOCK_LEN, Layout, TAG_ACK, TAG_BEGIN, combine, parse_commit, parse_data};
use backend_host::blk::record::{Event, EventKind};
use std::path::Path;

/// A broken promise found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// An acknowledged transaction is missing or damaged.
    LostAck {
        /// The transaction.
        txn: u64,
    },
    /// A commit record is there, its data is not.
    CommitWithoutData {
        /// The transaction.
        txn: u64,
    },
    /// Sequential mode: `txn` is committed but the earlier `missing` is not.
    NotPrefix {
        /// The committed transaction.
        txn: u64,
        /// The earlier one that is not.
        missing: u64,
    },
    /// A write outside the journal area reached the image.
    Outside {
        /// Its offset.
        offset: u64,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::LostAck { txn } => write!(f, "acknowledged transaction {txn} lost"),
            Violation::CommitWithoutData { txn } => write!(f, "commit record of {txn} without its data"),
            Violation::NotPrefix { txn, missing } => {
                write!(f, "transaction {txn} committed but {missing} not")
            }
            Violation::Outside { offset } => write!(f, "write at {offset} outside the journal"),
        }
    }
}

/// What the guest had said by a crash point: transactions begun and acknowledged.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    begun_max: Option<u64>,
    acked: Vec<bool>,
}

impl Facts {
    /// Takes in one event (only marks matter).
    pub fn observe(&mut self, ev: &Event) {
        if let EventKind::Mark { tag, value } = ev.kind {
            match tag {
                TAG_BEGIN => self.begun_max = Some(self.begun_max.map_or(value, |m| m.max(value))),
                TAG_ACK => {
                    let i = usize::try_from(value).unwrap_or(usize::MAX);
                    if i < (1 << 32) {
                        if self.acked.len() <= i {
                            self.acked.resize(i + 1, false);
                        }
                        self.acked[i] = true;
                    }
                }
                _ => {}
            }
        }
    }

    /// Whether `txn` was acknowledged.
    pub fn acked(&self, txn: u64) -> bool {
        usize::try_from(txn)
            .ok()
            .and_then(|i| self.acked.get(i))
            .is_some_and(|&a| a)
    }

    /// Transactions acknowledged.
    pub fn acked_count(&self) -> usize {
        self.acked.iter().filter(|&&a| a).count()
    }
}

/// A transaction's state in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnState {
    Absent,
    Committed,
    CommitWithoutData,
}

type DataId = (u64, u32, u64);
type CommitId = (u64, u32, u64);

/// Checks images of one history against one journal layout.
#[derive(Debug)]
pub struct Checker {
    layout: Layout,
    sequential: bool,
    /// Per write of exactly one block: its parse as data block and as commit record.
    parsed: Vec<(Option<DataId>, Option<CommitId>)>,
    /// Writes that touch anything outside the journal area.
    outside: Vec<u32>,
}

impl Checker {
    /// A checker for `h`'s writes; `sequential` turns on the prefix rule.
    pub fn new(h: &History, layout: Layout, sequential: bool) -> Checker {
        let parsed = h
            .writes
            .iter()
            .map(|w| match &w.data {
                Some(d) if d.len() as u64 == BLOCK => (parse_data(d), parse_commit(&d[..SECTOR_LEN])),
                _ => (None, None),
            })
            .collect();
        let outside = (0u32..)
            .zip(&h.writes)
            .filter(|(_, w)| !layout.contains(w.offset, w.len))
            .map(|(i, _)| i)
            .collect();
        Checker {
            layout,
            sequential,
            parsed,
            outside,
        }
    }

    fn data_at(&self, img: &ImageView<'_>, offset: u64) -> Option<DataId> {
        let s0 = offset / SECTOR;
        let per = BLOCK / SECTOR;
        if let Source::Write { w, index: 0 } = img.source(s0) {
            let whole = img.state.history().writes[w as usize].len == BLOCK
                && (1..per).all(|i| img.source(s0 + i) == Source::Write { w, index: i });
            if whole {
                return self.parsed[w as usize].0;
            }
        }
        let mut block = vec![0u8; BLOCK_LEN];
        for (i, chunk) in (0u64..).zip(block.chunks_exact_mut(SECTOR_LEN)) {
            img.read_sector(s0 + i, chunk);
        }
        parse_data(&block)
    }

    fn commit_at(&self, img: &ImageView<'_>, offset: u64) -> Option<CommitId> {
        let s0 = offset / SECTOR;
        match img.source(s0) {
            Source::Write { w, index: 0 } if img.state.history().writes[w as usize].len == BLOCK => {
                self.parsed[w as usize].1
            }
            Source::Write { w, .. } if img.state.history().writes[w as usize].data.is_none() => None,
            _ => {
                let mut sector = [0u8; SECTOR_LEN];
                img.read_sector(s0, &mut sector);
                parse_commit(&sector)
            }
        }
    }

    fn txn_state(&self, img: &ImageView<'_>, txn: u64) -> TxnState {
        let Some((t, n, combined)) = self.commit_at(img, self.layout.commit_offset(txn)) else {
            return TxnState::Absent;
        };
        if t != txn {
            return TxnState::Absent;
        }
        if n != self.layout.blocks {
            return TxnState::CommitWithoutData;
        }
        let mut csums = Vec::with_capacity(n as usize);
        for i in 0..n {
            match self.data_at(img, self.layout.data_offset(txn, i)) {
                Some((dt, di, c)) if dt == txn && di == i => csums.push(c),
                _ => return TxnState::CommitWithoutData,
            }
        }
        if combine(csums) == combined {
            TxnState::Committed
        } else {
            TxnState::CommitWithoutData
        }
    }

    /// The first violation in `img`, given what the guest had said by then.
    pub fn check(&self, img: &ImageView<'_>, facts: &Facts) -> Option<Violation> {
        for &w in &self.outside {
            if img.state.is_stable(w) || img.sel.has(w) {
                let offset = img.state.history().writes[w as usize].offset;
                return Some(Violation::Outside { offset });
            }
        }
        let top = facts.begun_max?;
        let from = (top + 1).saturating_sub(self.layout.slots);
        let mut first_missing = None;
        for txn in from..=top {
            match self.txn_state(img, txn) {
                TxnState::CommitWithoutData => return Some(Violation::CommitWithoutData { txn }),
                TxnState::Committed => {
                    if let (true, Some(missing)) = (self.sequential, first_missing) {
                        return Some(Violation::NotPrefix { txn, missing });
                    }
                }
                TxnState::Absent => {
                    if facts.acked(txn) {
                        return Some(Violation::LostAck { txn });
                    }
                    first_missing.get_or_insert(txn);
                }
            }
        }
        None
    }
}

/// The real file against the log: sectors never written must hold the base
/// pattern, written ones the newest write's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fidelity {
    /// Sectors compared.
    pub sectors: u64,
    /// Of those, never written.
    pub unwritten: u64,
    /// Never-written sectors that changed.
    pub unwritten_changed: u64,
    /// Written sectors whose content is not the newest write's.
    pub written_differ: u64,
}

/// Compares the first `len` bytes of `file` with the log's final image (every write
/// applied, newest last). Call it once every op has completed. Sectors of failed
/// writes are skipped: their content is unknown.
pub fn fidelity(h: &History, file: &Path, len: u64) -> std::io::Result<Fidelity> {
    let bytes = std::fs::read(file)?;
    let mut st = CrashState::new(h);
    while st.step().is_some() {}
    let mut sel = Selection::new(h.writes.len());
    sel.clear();
    for w in st.volatile() {
        sel.add(w, WHOLE, h.key(w));
    }
    let img = ImageView {
        state: &st,
        sel: &sel,
    };
    let mut out = Fidelity::default();
    let mut want = [0u8; SECTOR_LEN];
    let sectors = len.min(bytes.len() as u64) / SECTOR;
    for s in 0..sectors {
        let src = img.source(s);
        if let Source::Write { w, .. } = src
            && h.writes[w as usize].completed.is_none_or(|(_, ok)| !ok)
        {
            continue;
        }
        img.read_sector(s, &mut want);
        let at = usize::try_from(s * SECTOR).unwrap_or(usize::MAX);
        let got = &bytes[at..at + SECTOR_LEN];
        out.sectors += 1;
        match src {
            Source::Base => {
                out.unwritten += 1;
                if got != want {
                    out.unwritten_changed += 1;
                }
            }
            Source::Write { .. } => {
                if got != want {
                    out.written_differ += 1;
                }
            }
        }
    }
    Ok(out)
}

/// Fills `len` bytes of `file` with the base pattern ([`base_sector`]) and syncs it.
pub fn write_base(file: &Path, len: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::File::create(file)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut s = 0u64;
    let mut left = len.div_ceil(SECTOR);
    while left > 0 {
        let n = left.min(chunk.len() as u64 / SECTOR);
        for (i, sec) in (0..n).zip(chunk.chunks_exact_mut(SECTOR_LEN)) {
            base_sector(s + i, sec);
        }
        let bytes = usize::try_from(n * SECTOR).unwrap_or(chunk.len());
        f.write_all(&chunk[..bytes])?;
        s += n;
        left -= n;
    }
    f.sync_all()
}
