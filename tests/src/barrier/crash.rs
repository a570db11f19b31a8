//! Crash images: every disk content a crash could leave, from a recorded log.
//!
//! The durability rule (virtio 1.2 §5.2.6.3, with `fdatasync(2)` as the host's
//! barrier): at crash point `c` (the first `c` events of the log happened), a write
//! is **stable** if it completed successfully and then an `fdatasync` submitted
//! after that completion completed successfully before `c`, or if it was an
//! `RWF_DSYNC` write that completed successfully before `c`. Every other write
//! submitted before `c` is **volatile**: in flight, completed but not yet flushed,
//! failed (its bytes may or may not have landed), or caught by a failed
//! `fdatasync` (after Linux reports a writeback error the dirty data may be gone,
//! so a failed sync poisons what it covered: no later sync makes it stable).
//! DISCARD and WRITE_ZEROES count as writes of zeros.
//!
//! A legal image is the stable content plus any subset of the volatile writes,
//! each possibly torn at sector granularity. Where writes overlap, the newer
//! (completed later; in-flight ones last) wins, so a stable write is never undone
//! by an older volatile one.
//!
//! Images are overlays, never materialized: the base content (the file's initial
//! pattern, [`base_sector`]), the stable writes indexed by sector (kept up to date
//! incrementally as the crash point advances) and a [`Selection`] of volatile
//! writes. [`ImageView::source`] answers "where does sector `s` come from" with two
//! hash look-ups, so millions of images cost little.
//!
//! [`for_each_image`] enumerates a crash point's images: all subsets when at most
//! [`ImagePlan::exhaustive_max`] writes are volatile, plus every prefix tear of each
//! volatile write; seeded random subsets with random tears otherwise; and three
//! adversarial images (all volatile writes dropped, only the newest kept, all kept
//! in reverse order).

use backend_host::blk::record::{Event, EventKind, RecordedOp};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Bytes per sector, as a length.
pub const SECTOR_LEN: usize = 512;

/// Keys of in-flight writes start here (after every completed write's).
const IN_FLIGHT: u64 = 1 << 62;

/// A hasher for sector numbers and small ids (SipHash would dominate the look-ups).
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

/// A map keyed by sector or id, with [`IdHasher`].
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// The initial content of `sector` (what the image file is filled with before a
/// run): distinct per sector, never a valid journal block.
pub fn base_sector(sector: u64, out: &mut [u8]) {
    for (i, w) in (0u64..).zip(out.chunks_exact_mut(8)) {
        let mut x = sector.wrapping_mul(64).wrapping_add(i) ^ 0xBA5E_BA5E_0000_0000;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        w.copy_from_slice(&(x ^ (x >> 31)).to_le_bytes());
    }
}

/// One recorded write (or discard / write-zeroes, as zeros).
#[derive(Debug, Clone)]
pub struct WriteRec {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The bytes; `None` for zeros.
    pub data: Option<Arc<[u8]>>,
    /// `RWF_DSYNC`.
    pub dsync: bool,
    /// Sequence number of the submission.
    pub submitted: u64,
    /// Sequence number of the completion, and whether it succeeded in full.
    pub completed: Option<(u64, bool)>,
}

impl WriteRec {
    /// First sector written.
    pub fn first_sector(&self) -> u64 {
        self.offset / SECTOR
    }

    /// Sectors written.
    pub fn sectors(&self) -> u64 {
        self.len.div_ceil(SECTOR)
    }
}

/// What one event does to durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    WriteSubmitted(u32),
    WriteCompleted(u32, bool),
    FlushSubmitted(u64),
    FlushCompleted(u64, bool),
    Other,
}

/// A recorded log, decoded for the crash walk.
#[derive(Debug, Clone)]
pub struct History {
    /// The log.
    pub events: Vec<Event>,
    /// Every write, discard and write-zeroes, in submission order.
    pub writes: Vec<WriteRec>,
    steps: Vec<Step>,
}

impl History {
    /// Decodes `events` (in sequence order).
    pub fn new(events: Vec<Event>) -> History {
        let mut writes: Vec<WriteRec> = Vec::new();
        let mut by_op: IdMap<u64, u32> = IdMap::default();
        let mut steps = Vec::with_capacity(events.len());
        for ev in &events {
            let step = match &ev.kind {
                EventKind::Submitted { op, io } => {
                    let (offset, len, data, dsync) = match io {
                        RecordedOp::Flush => {
                            steps.push(Step::FlushSubmitted(*op));
                            continue;
                        }
                        RecordedOp::Write { offset, data, dsync } => {
                            (*offset, data.len() as u64, Some(data.clone()), *dsync)
                        }
                        RecordedOp::Discard { offset, len } | RecordedOp::WriteZeroes { offset, len } => {
                            (*offset, *len, None, false)
                        }
                    };
                    let w = u32::try_from(writes.len()).unwrap_or(u32::MAX);
                    writes.push(WriteRec {
                        offset,
                        len,
                        data,
                        dsync,
                        submitted: ev.seq,
                        completed: None,
                    });
                    by_op.insert(*op, w);
                    Step::WriteSubmitted(w)
                }
                EventKind::Completed { op, result } => match by_op.get(op) {
                    Some(&w) => {
                        let rec = &mut writes[w as usize];
                        let ok = *result == Ok(rec.len);
                        rec.completed = Some((ev.seq, ok));
                        Step::WriteCompleted(w, ok)
                    }
                    None => Step::FlushCompleted(*op, result.is_ok()),
                },
                EventKind::Mark { .. } => Step::Other,
            };
            steps.push(step);
        }
        History {
            events,
            writes,
            steps,
        }
    }

    /// The order key of write `w`: completed writes by completion, in-flight ones
    /// after all of them by submission. The larger key wins an overlap.
    pub fn key(&self, w: u32) -> u64 {
        let rec = &self.writes[w as usize];
        match rec.completed {
            Some((seq, _)) => seq,
            None => IN_FLIGHT + rec.submitted,
        }
    }
}

/// Durability at one crash point, advanced one event at a time.
#[derive(Debug)]
pub struct CrashState<'h> {
    h: &'h History,
    point: usize,
    /// Sector -> the newest stable write covering it.
    stable: IdMap<u64, u32>,
    /// Volatile writes.
    volatile: Vec<u32>,
    /// Sector -> volatile writes covering it.
    vol_by_sector: IdMap<u64, Vec<u32>>,
    is_stable: Vec<bool>,
    poisoned: Vec<bool>,
    /// Completed, not dsync, not yet stable nor poisoned: what a sync submitted now covers.
    unflushed: Vec<u32>,
    /// Flush op -> the writes it covers.
    pending: IdMap<u64, Vec<u32>>,
}

impl<'h> CrashState<'h> {
    /// The state before the first event (crash point 0: nothing happened).
    pub fn new(h: &'h History) -> CrashState<'h> {
        CrashState {
            h,
            point: 0,
            stable: IdMap::default(),
            volatile: Vec::new(),
            vol_by_sector: IdMap::default(),
            is_stable: vec![false; h.writes.len()],
            poisoned: vec![false; h.writes.len()],
            unflushed: Vec::new(),
            pending: IdMap::default(),
        }
    }

    /// The history walked.
    pub fn history(&self) -> &'h History {
        self.h
    }

    /// The crash point: how many events have happened.
    pub fn point(&self) -> usize {
        self.point
    }

    /// Whether write `w` is stable here.
    pub fn is_stable(&self, w: u32) -> bool {
        self.is_stable[w as usize]
    }

    /// The volatile writes, oldest first (by [`History::key`]).
    pub fn volatile(&self) -> Vec<u32> {
        let mut v = self.volatile.clone();
        v.sort_unstable_by_key(|&w| self.h.key(w));
        v
    }

    /// Applies the next event; returns it, or `None` at the end of the log.
    pub fn step(&mut self) -> Option<&'h Event> {
        let h = self.h;
        let ev = h.events.get(self.point)?;
        match h.steps[self.point] {
            Step::WriteSubmitted(w) => {
                self.volatile.push(w);
                let rec = &h.writes[w as usize];
                for s in rec.first_sector()..rec.first_sector() + rec.sectors() {
                    self.vol_by_sector.entry(s).or_default().push(w);
                }
            }
            Step::WriteCompleted(w, true) => {
                if h.writes[w as usize].dsync {
                    self.make_stable(w);
                } else {
                    self.unflushed.push(w);
                }
            }
            // A failed write stays volatile for good: its bytes may or may not be there.
            Step::WriteCompleted(_, false) => {}
            Step::FlushSubmitted(op) => {
                self.pending.insert(op, self.unflushed.clone());
            }
            Step::FlushCompleted(op, ok) => {
                let covered = self.pending.remove(&op).unwrap_or_default();
                if ok {
                    for w in covered {
                        if !self.poisoned[w as usize] && !self.is_stable[w as usize] {
                            self.make_stable(w);
                        }
                    }
                    let st = &self.is_stable;
                    self.unflushed.retain(|&w| !st[w as usize]);
                } else {
                    for w in covered.into_iter().chain(self.unflushed.drain(..)) {
                        self.poisoned[w as usize] = true;
                    }
                }
            }
            Step::Other => {}
        }
        self.point += 1;
        Some(ev)
    }

    fn make_stable(&mut self, w: u32) {
        self.is_stable[w as usize] = true;
        self.volatile.retain(|&x| x != w);
        let rec = &self.h.writes[w as usize];
        let key = self.h.key(w);
        for s in rec.first_sector()..rec.first_sector() + rec.sectors() {
            if let Some(list) = self.vol_by_sector.get_mut(&s) {
                list.retain(|&x| x != w);
                if list.is_empty() {
                    self.vol_by_sector.remove(&s);
                }
            }
            let e = self.stable.entry(s).or_insert(w);
            if self.h.key(*e) < key {
                *e = w;
            }
        }
    }
}

/// Which volatile writes an image applies, torn how, in what order.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    stamp: Vec<u32>,
    mask: Vec<u64>,
    rank: Vec<u64>,
    generation: u32,
    chosen: Vec<u32>,
}

/// A mask applying every sector of a write.
pub const WHOLE: u64 = u64::MAX;

impl Selection {
    /// A selection over `writes` writes.
    pub fn new(writes: usize) -> Selection {
        Selection {
            stamp: vec![0; writes],
            mask: vec![0; writes],
            rank: vec![0; writes],
            generation: 0,
            chosen: Vec::new(),
        }
    }

    /// Empties the selection.
    pub fn clear(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.stamp.fill(0);
            self.generation = 1;
        }
        self.chosen.clear();
    }

    /// Applies write `w`'s sectors in `mask` (bit `i` for its `i`-th sector; sectors
    /// past 63 follow bit 63), ordered among the selected by `rank`.
    pub fn add(&mut self, w: u32, mask: u64, rank: u64) {
        let i = w as usize;
        self.stamp[i] = self.generation;
        self.mask[i] = mask;
        self.rank[i] = rank;
        self.chosen.push(w);
    }

    /// Whether write `w` is selected.
    pub fn has(&self, w: u32) -> bool {
        self.stamp[w as usize] == self.generation
    }

    /// The selected writes.
    pub fn chosen(&self) -> &[u32] {
        &self.chosen
    }

    fn covers(&self, w: u32, index: u64) -> bool {
        self.mask[w as usize] & (1 << index.min(63)) != 0
    }
}

/// Where a sector of an image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The initial content.
    Base,
    /// Sector `index` of write `w`.
    Write {
        /// The write.
        w: u32,
        /// Which of its sectors.
        index: u64,
    },
}

/// One crash image: the state's stable content plus the selection.
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    /// The crash point.
    pub state: &'a CrashState<'a>,
    /// The volatile writes applied.
    pub sel: &'a Selection,
}

impl ImageView<'_> {
    /// Where sector `s` comes from.
    pub fn source(&self, s: u64) -> Source {
        let st = self.state;
        let h = st.h;
        let mut best: Option<(u64, u32)> = None;
        if let Some(list) = st.vol_by_sector.get(&s) {
            for &w in list {
                if self.sel.has(w) && self.sel.covers(w, s - h.writes[w as usize].first_sector()) {
                    let r = self.sel.rank[w as usize];
                    if best.is_none_or(|b| r > b.0) {
                        best = Some((r, w));
                    }
                }
            }
        }
        let w = match (best, st.stable.get(&s).copied()) {
            (Some((_, v)), Some(t)) if h.key(t) > h.key(v) => t,
            (Some((_, v)), _) => v,
            (None, Some(t)) => t,
            (None, None) => return Source::Base,
        };
        Source::Write {
            w,
            index: s - h.writes[w as usize].first_sector(),
        }
    }

    /// Copies sector `s` of the image into `out` (512 bytes).
    pub fn read_sector(&self, s: u64, out: &mut [u8]) {
        let out = &mut out[..SECTOR_LEN];
        match self.source(s) {
            Source::Base => base_sector(s, out),
            Source::Write { w, index } => match &self.state.h.writes[w as usize].data {
                Some(d) => {
                    let at = usize::try_from(index * SECTOR).unwrap_or(usize::MAX);
                    match d.get(at..at + SECTOR_LEN) {
                        Some(src) => out.copy_from_slice(src),
                        None => out.fill(0),
                    }
                }
                None => out.fill(0),
            },
        }
    }
}

/// How many images of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageCounts {
    /// Crash points walked.
    pub crash_points: u64,
    /// Subsets of the volatile writes, all of them (few volatile writes).
    pub exhaustive: u64,
    /// Prefix tears of one volatile write, with the others all dropped or all kept.
    pub torn: u64,
    /// Random subsets with random tears (many volatile writes).
    pub sampled: u64,
    /// All dropped, only the newest, reverse order.
    pub adversarial: u64,
}

impl ImageCounts {
    /// Every image.
    pub fn total(&self) -> u64 {
        self.exhaustive + self.torn + self.sampled + self.adversarial
    }

    /// Adds `other`.
    pub fn add(&mut self, other: &ImageCounts) {
        self.crash_points += other.crash_points;
        self.exhaustive += other.exhaustive;
        self.torn += other.torn;
        self.sampled += other.sampled;
        self.adversarial += other.adversarial;
    }
}

/// What kind an image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// One subset of all.
    Exhaustive,
    /// A prefix tear.
    Torn,
    /// A random subset.
    Sampled,
    /// An adversarial image.
    Adversarial,
}

/// How many images per crash point.
#[derive(Debug, Clone, Copy)]
pub struct ImagePlan {
    /// Enumerate all subsets up to this many volatile writes (at most 20).
    pub exhaustive_max: usize,
    /// Random images when there are more.
    pub samples: usize,
    /// Prefix tears of each volatile write (exhaustive case).
    pub tears: bool,
}

impl Default for ImagePlan {
    fn default() -> ImagePlan {
        ImagePlan {
            exhaustive_max: 10,
            samples: 64,
            tears: true,
        }
    }
}

/// A seeded xorshift generator (reproducible samples).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded; any seed works.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`; slightly biased, fine for sampling).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A tear of an `n`-sector write keeping its first `k` sectors.
fn prefix(k: u64) -> u64 {
    if k >= 64 { WHOLE } else { (1u64 << k) - 1 }
}

/// Calls `f` with every image of the crash point `state` under `plan`; returns the
/// counts.
pub fn for_each_image(
    state: &CrashState<'_>,
    plan: &ImagePlan,
    rng: &mut Rng,
    sel: &mut Selection,
    mut f: impl FnMut(&ImageView<'_>, Category),
) -> ImageCounts {
    let h = state.h;
    let vol = state.volatile();
    let v = vol.len();
    let mut counts = ImageCounts {
        crash_points: 1,
        ..ImageCounts::default()
    };
    let mut emit = |sel: &Selection, cat: Category, counts: &mut ImageCounts| {
        f(&ImageView { state, sel }, cat);
        match cat {
            Category::Exhaustive => counts.exhaustive += 1,
            Category::Torn => counts.torn += 1,
            Category::Sampled => counts.sampled += 1,
            Category::Adversarial => counts.adversarial += 1,
        }
    };
    if v <= plan.exhaustive_max.min(20) {
        for bits in 0u32..(1 << v) {
            sel.clear();
            for (i, &w) in vol.iter().enumerate() {
                if bits & (1 << i) != 0 {
                    sel.add(w, WHOLE, h.key(w));
                }
            }
            emit(sel, Category::Exhaustive, &mut counts);
        }
        if plan.tears {
            for (i, &w) in vol.iter().enumerate() {
                let n = h.writes[w as usize].sectors();
                if !(2..=64).contains(&n) {
                    continue;
                }
                for k in 1..n {
                    for others in [false, true] {
                        sel.clear();
                        if others {
                            for (j, &o) in vol.iter().enumerate() {
                                if j != i {
                                    sel.add(o, WHOLE, h.key(o));
                                }
                            }
                        }
                        sel.add(w, prefix(k), h.key(w));
                        emit(sel, Category::Torn, &mut counts);
                    }
                }
            }
        }
    } else {
        for _ in 0..plan.samples {
            sel.clear();
            for &w in &vol {
                if rng.next_u64() & 1 == 0 {
                    continue;
                }
                let n = h.writes[w as usize].sectors();
                let mask = if (2..=64).contains(&n) && rng.below(4) == 0 {
                    // A random non-empty, non-full subset of its sectors.
                    let full = prefix(n);
                    match rng.next_u64() & full {
                        0 => 1,
                        m if m == full => full >> 1,
                        m => m,
                    }
                } else {
                    WHOLE
                };
                sel.add(w, mask, h.key(w));
            }
            emit(sel, Category::Sampled, &mut counts);
        }
    }
    if v > 0 {
        sel.clear();
        emit(sel, Category::Adversarial, &mut counts);
        sel.clear();
        sel.add(vol[v - 1], WHOLE, h.key(vol[v - 1]));
        emit(sel, Category::Adversarial, &mut counts);
        sel.clear();
        for (i, &w) in vol.iter().enumerate() {
            sel.add(w, WHOLE, h.key(vol[v - 1 - i]));
        }
        emit(sel, Category::Adversarial, &mut counts);
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, kind: EventKind) -> Event {
        Event { seq, kind }
    }

    fn write(op: u64, offset: u64, byte: u8, dsync: bool) -> EventKind {
        EventKind::Submitted {
            op,
            io: RecordedOp::Write {
                offset,
                data: Arc::from(vec![byte; 512]),
                dsync,
            },
        }
    }

    fn done(op: u64, result: Result<u64, i32>) -> EventKind {
        EventKind::Completed { op, result }
    }

    fn flush(op: u64) -> EventKind {
        EventKind::Submitted {
            op,
            io: RecordedOp::Flush,
        }
    }

    fn history(kinds: Vec<EventKind>) -> History {
        History::new((0u64..).zip(kinds).map(|(s, k)| ev(s, k)).collect())
    }

    fn walk(h: &History, to: usize) -> CrashState<'_> {
        let mut st = CrashState::new(h);
        while st.point() < to {
            st.step();
        }
        st
    }

    #[test]
    fn a_write_is_stable_only_after_a_later_submitted_sync_completes() {
        // 0 write A, 1 flush submitted (before A completes), 2 A done, 3 flush done,
        // 4 flush 2 submitted, 5 flush 2 done.
        let h = history(vec![
            write(0, 0, 1, false),
            flush(1),
            done(0, Ok(512)),
            done(1, Ok(0)),
            flush(2),
            done(2, Ok(0)),
        ]);
        assert!(
            !walk(&h, 4).is_stable(0),
            "the sync was submitted before A completed"
        );
        assert!(!walk(&h, 5).is_stable(0));
        assert!(walk(&h, 6).is_stable(0));
    }

    #[test]
    fn dsync_is_stable_at_completion_and_failed_sync_poisons() {
        let h = history(vec![
            write(0, 0, 1, true),
            done(0, Ok(512)),
            write(1, 512, 2, false),
            done(1, Ok(512)),
            flush(2),
            done(2, Err(5)),
            flush(3),
            done(3, Ok(0)),
        ]);
        let st = walk(&h, 2);
        assert!(st.is_stable(0));
        let st = walk(&h, 8);
        assert!(!st.is_stable(1), "a failed sync makes nothing durable, for good");
        assert_eq!(st.volatile(), vec![1]);
    }

    #[test]
    fn images_cover_subsets_tears_and_adversarial_orders() {
        // Two overlapping volatile writes of 2 sectors each over a stable one.
        let mut kinds = vec![write(0, 0, 9, true), done(0, Ok(512))];
        for (op, byte) in [(1u64, 1u8), (2, 2)] {
            kinds.push(EventKind::Submitted {
                op,
                io: RecordedOp::Write {
                    offset: 0,
                    data: Arc::from(vec![byte; 1024]),
                    dsync: false,
                },
            });
            kinds.push(done(op, Ok(1024)));
        }
        let h = history(kinds);
        let st = walk(&h, h.events.len());
        let mut sel = Selection::new(h.writes.len());
        let mut seen = std::collections::BTreeSet::new();
        let counts = for_each_image(
            &st,
            &ImagePlan::default(),
            &mut Rng::new(1),
            &mut sel,
            |img, _| {
                let mut a = [0u8; 512];
                let mut b = [0u8; 512];
                img.read_sector(0, &mut a);
                img.read_sector(1, &mut b);
                seen.insert((a[0], b[0]));
            },
        );
        assert_eq!(counts.exhaustive, 4);
        assert_eq!(counts.torn, 4);
        assert_eq!(counts.adversarial, 3);
        // Sector 1 was never written by the stable write: base when unselected.
        let mut base = [0u8; 512];
        base_sector(1, &mut base);
        // Newest wins normally (2,2); reverse order gives (1,1); tears mix.
        for want in [(9, base[0]), (1, 1), (2, 2), (2, base[0]), (1, base[0])] {
            assert!(seen.contains(&want), "missing image {want:?} in {seen:?}");
        }
    }
}
