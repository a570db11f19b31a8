//! The worker thread of a [`NetDevice`](super::NetDevice): its queue pairs, control
//! queue and the rounds that move frames between the rings and the switch.

use super::*;

/// What became of a frame offered to a receive queue.
pub(super) enum Delivery {
    /// Written, or dropped and counted; either way it is gone.
    Done,
    /// No receive buffer now: the frame goes back to the inbox.
    Wait(Frame),
    /// The round's budget of receive chains is spent (HOSTILE 34): the frame goes
    /// back to the inbox and the worker comes back to it next round, without
    /// waiting for a kick.
    Later(Frame),
}

/// What [`Pair::next_rx`] found.
enum NextRx {
    Chain(Chain),
    /// The ring is empty or unusable.
    Empty,
    /// The round's budget of chains is spent.
    Spent,
}

/// Longest a worker sleeps without looking at its stop flag.
pub(super) const SLEEP: rustix::event::Timespec = rustix::event::Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

/// What the queues of a worker share.
pub(super) struct Ctx {
    pub(super) port: Arc<Port>,
    pub(super) switch: Arc<Switch>,
    pub(super) features: NetFeatures,
    pub(super) max_frame: usize,
}

/// One receive/transmit queue pair.
pub(super) struct Pair<M> {
    pub(super) rx: DeviceRing<M>,
    pub(super) tx: DeviceRing<M>,
    pub(super) rx_kick: EventFdNotifier,
    pub(super) tx_kick: EventFdNotifier,
    pub(super) rx_irq: EventFdNotifier,
    pub(super) tx_irq: EventFdNotifier,
    /// Receive chains gathered for a mergeable frame (MRG_RXBUF).
    pub(super) held: Vec<Chain>,
    pub(super) held_writable: u64,
    /// Receive chains filled this round, published together at its end (one
    /// used-index store the guest sees per round, not per frame).
    pub(super) rx_used: Vec<(u16, u32)>,
    pub(super) rx_broken: bool,
    pub(super) tx_broken: bool,
}

/// The control queue.
pub(super) struct CtrlQueue<M> {
    pub(super) ring: DeviceRing<M>,
    /// Its queue index (§5.1.2: after the data queues).
    pub(super) index: u16,
    pub(super) kick: EventFdNotifier,
    pub(super) irq: EventFdNotifier,
    pub(super) broken: bool,
}

/// The state of one port's worker thread.
pub(super) struct Worker<M> {
    /// The pairs the driver enabled, in order.
    pub(super) pairs: Vec<Pair<M>>,
    /// Pairs in use (VQ_PAIRS_SET), 1..=pairs.len().
    pub(super) active: usize,
    pub(super) ctrl: Option<CtrlQueue<M>>,
    pub(super) filter: RxFilter,
    pub(super) shared: Arc<Shared>,
    pub(super) ctx: Ctx,
    pub(super) budget: usize,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) stop_fd: Arc<EventFdNotifier>,
    /// Used elements to publish at once.
    pub(super) used: Vec<(u16, u32)>,
    /// The pair whose receive queue ran out of buffers (its kicks enabled).
    pub(super) starved: Option<usize>,
    /// A control command's readable bytes, copied once.
    pub(super) cmd: Vec<u8>,
    /// Frames of the current transmit round, forwarded together.
    pub(super) batch: Batch,
    /// Frame buffers, taken from and given back to the switch in batches.
    pub(super) pool: LocalPool,
    /// Frames taken from the port's inbox (every frame waiting there, in one short
    /// lock) and not yet delivered.
    pub(super) inbox: Inbox,
    /// Adaptive polling ([`NetSettings::poll`]).
    pub(super) poller: Poller,
}

impl<M: DeviceMemory> Worker<M> {
    pub(super) fn run(mut self) -> Stopped {
        // Receive kicks are wanted only while waiting for buffers.
        for p in &mut self.pairs {
            p.rx.disable_notifications();
        }
        // Whether the last poll session found nothing: then sleep.
        let mut polled = false;
        while !self.stop.load(Ordering::Acquire) {
            let (_, more) = self.round(true);
            if more {
                polled = false;
            } else if !polled {
                polled = !self.poll();
            } else {
                polled = false;
                self.sleep();
            }
        }
        // Chains held for a mergeable frame go back unused, so nothing is in
        // flight; buffers go back to the switch; frames taken from the inbox wait
        // for the next start (or the reset).
        for p in &mut self.pairs {
            p.return_held();
        }
        self.pool.flush(&self.ctx.switch);
        let mut positions = Vec::with_capacity(2 * self.pairs.len() + 1);
        for (i, p) in self.pairs.iter().enumerate() {
            // Pair i is queues 2i and 2i + 1 (§5.1.2); at most 0x8000 pairs.
            let (rx, tx) = (u16::try_from(2 * i), u16::try_from(2 * i + 1));
            if let (Ok(rx), Ok(tx)) = (rx, tx) {
                positions.push((rx, p.rx.next_avail()));
                positions.push((tx, p.tx.next_avail()));
            }
            let held = p.rx.in_flight() + p.tx.in_flight();
            if held != 0 {
                tracing::error!(port = %self.ctx.port.id, pair = i, held, "chains in flight at stop");
            }
        }
        if let Some(c) = &self.ctrl {
            positions.push((c.index, c.ring.next_avail()));
        }
        Stopped {
            positions,
            parked: Parked {
                filter: self.filter,
                active: self.active,
                inbox: self.inbox,
            },
        }
    }

    /// One scheduling round over every queue: returns whether it did anything, and
    /// whether more may wait. With `rearm`, transmit queues that ran dry ask for
    /// kicks again (with a re-check); without, kicks stay off, for polling.
    fn round(&mut self, rearm: bool) -> (bool, bool) {
        let mut more = self.ctrl_round();
        let mut did = more;
        for p in &mut self.pairs[..self.active] {
            let (d, m) = p.tx_round(
                &self.ctx,
                self.budget,
                &mut self.used,
                &mut self.batch,
                &mut self.pool,
                rearm,
            );
            did |= d;
            more |= m;
        }
        let (d, m) = self.rx_round();
        (did || d, more || m)
    }

    /// Adaptive polling: runs rounds without kicks until one finds work (returns
    /// true) or the poll budget passes without any (false; kicks are re-armed by
    /// the next `round(true)` before the worker sleeps). Backs off while the core
    /// is shared ([`Poller`]).
    fn poll(&mut self) -> bool {
        let Some(mut session) = self.poller.start() else {
            return false;
        };
        let mut found = false;
        loop {
            let (did, _) = self.round(false);
            found |= did;
            if did || !self.poller.keep_polling(&mut session, false) {
                break;
            }
        }
        self.poller.end(session);
        found
    }

    /// Sleeps until a kick of an active queue, a frame for this port, or stop.
    fn sleep(&mut self) {
        if let Some(s) = self.starved {
            let p = &mut self.pairs[s];
            if !p.rx_broken && p.rx.enable_notifications() {
                // Buffers arrived while we were deciding to wait.
                p.rx.disable_notifications();
                self.starved = None;
                return;
            }
        }
        // Starved, the worker waits for buffers (the receive kick), not frames.
        if self.starved.is_none() && !self.ctx.port.arm_wake() {
            return;
        }
        use rustix::event::{PollFd, PollFlags, poll};
        let active = &self.pairs[..self.active];
        let mut fds = Vec::with_capacity(3 + 2 * active.len());
        fds.push(PollFd::new(&*self.stop_fd, PollFlags::IN));
        fds.push(PollFd::new(&self.ctx.port.wake, PollFlags::IN));
        if let Some(c) = &self.ctrl {
            fds.push(PollFd::new(&c.kick, PollFlags::IN));
        }
        for p in active {
            fds.push(PollFd::new(&p.tx_kick, PollFlags::IN));
            fds.push(PollFd::new(&p.rx_kick, PollFlags::IN));
        }
        let slept = poll(&mut fds, Some(&SLEEP));
        self.ctx.port.disarm_wake();
        if let Err(error) = slept {
            if error != rustix::io::Errno::INTR {
                tracing::error!(%error, "net worker poll failed");
            }
            return;
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        let mut ready = ready.into_iter().skip(1);
        if ready.next() == Some(true) {
            let _ = self.ctx.port.wake.take();
        }
        if let Some(c) = &self.ctrl
            && ready.next() == Some(true)
        {
            let _ = c.kick.take();
        }
        for (i, p) in self.pairs[..self.active].iter_mut().enumerate() {
            if ready.next() == Some(true) {
                let _ = p.tx_kick.take();
            }
            if ready.next() == Some(true) {
                let _ = p.rx_kick.take();
                if self.starved == Some(i) {
                    p.rx.disable_notifications();
                    self.starved = None;
                }
            }
        }
    }

    /// Makes pairs `0..n` the active ones. Nothing is queued on a receive queue
    /// past `n` from now on (§5.1.6.5.5): chains gathered there go back unused and
    /// a frame waiting for one is steered again.
    pub(super) fn set_active(&mut self, n: usize) {
        for p in &mut self.pairs[n..] {
            p.return_held();
        }
        if self.starved.is_some_and(|s| s >= n) {
            self.starved = None;
        }
        self.active = n;
        self.shared
            .active_pairs
            .store(u16::try_from(n).unwrap_or(u16::MAX), Ordering::Relaxed);
    }

    /// The pair whose receive queue takes `frame`.
    fn steer(&self, frame: &[u8]) -> usize {
        if self.active == 1 {
            return 0;
        }
        flow_hash(frame).map_or(0, |h| h as usize % self.active)
    }

    /// Delivers up to a budget of inbox frames, taking up to a budget of chains from
    /// the receive queues (rejected ones too: HOSTILE 34); returns whether it did
    /// anything and whether more may wait.
    fn rx_round(&mut self) -> (bool, bool) {
        if self.starved.is_some() {
            return (false, false);
        }
        let mut n = 0;
        let mut chains = self.budget;
        let mut spent = false;
        while n < self.budget {
            if self.inbox.is_empty() {
                // Only once the port's inbox is empty too is there nothing left.
                self.ctx.port.take_inbox(&mut self.inbox);
            }
            let Some(frame) = self.inbox.pop() else {
                break;
            };
            n += 1;
            if !self.filter.accepts(&frame.data[..6]) {
                self.shared.filtered.fetch_add(1, Ordering::Relaxed);
                self.pool.give(&self.ctx.switch, frame.data);
                continue;
            }
            let s = self.steer(&frame.data);
            match self.pairs[s].deliver(frame, &self.ctx, &mut self.pool, &mut chains) {
                Delivery::Done => {}
                Delivery::Wait(frame) => {
                    // First in line once the guest posts buffers.
                    self.inbox.push_front(frame);
                    self.starved = Some(s);
                    n -= 1;
                    break;
                }
                Delivery::Later(frame) => {
                    // First in line next round; the queues' chains taken so far
                    // (held for it with MRG_RXBUF) wait with it.
                    self.inbox.push_front(frame);
                    n -= 1;
                    spent = true;
                    break;
                }
            }
        }
        if n > 0 || spent {
            for p in &mut self.pairs[..self.active] {
                p.publish_rx();
                if p.rx.needs_notification() {
                    let _ = p.rx_irq.notify();
                }
            }
        }
        (n > 0 || spent, n >= self.budget || spent)
    }
}

impl<M: DeviceMemory> Pair<M> {
    /// Serves up to `budget` transmitted chains; returns whether more may wait.
    fn tx_round(
        &mut self,
        ctx: &Ctx,
        budget: usize,
        used: &mut Vec<(u16, u32)>,
        batch: &mut Batch,
        pool: &mut LocalPool,
        rearm: bool,
    ) -> (bool, bool) {
        if self.tx_broken {
            return (false, false);
        }
        self.tx.disable_notifications();
        let mut n = 0;
        while n < budget {
            match self.tx.pop() {
                Ok(Some(chain)) => {
                    if let Some(frame) = self.transmit(ctx, &chain, pool) {
                        batch.push(frame);
                    }
                    used.push((chain.head(), 0));
                    n += 1;
                }
                Ok(None) => break,
                Err(DeviceQueueError::NeedsReset(fault)) => {
                    tracing::warn!(port = %ctx.port.id, %fault, "transmit queue needs reset");
                    self.tx_broken = true;
                    break;
                }
                // The ring already returned the bad chain.
                Err(error) => {
                    tracing::debug!(port = %ctx.port.id, %error, "transmit chain rejected");
                    n += 1;
                }
            }
        }
        let forwarded = ctx.switch.forward_batch(&ctx.port, batch);
        // Counted once forwarded: a peer's counters are final when this one is.
        ctx.port.count_tx_by(forwarded as u64);
        if !used.is_empty() {
            if let Err(error) = self.tx.add_used_batch(used.drain(..)) {
                tracing::error!(%error, "returning transmit chains failed");
            }
            if self.tx.needs_notification() {
                let _ = self.tx_irq.notify();
            }
        }
        // Budget spent: keep kicks off and come back next round. Otherwise turn
        // them on (unless polling); chains that raced in are served without sleeping.
        (n > 0, n >= budget || (rearm && self.tx.enable_notifications()))
    }

    /// Checks one transmitted chain and returns its frame for the switch, or drops
    /// and counts it.
    fn transmit(&mut self, ctx: &Ctx, chain: &Chain, pool: &mut LocalPool) -> Option<Frame> {
        let len = chain.readable_len() as usize;
        let Some(frame_len) = len.checked_sub(VirtioNetHdr::SIZE).filter(|&l| l >= ETH_HDR_LEN) else {
            ctx.port.count_drop(DropReason::Short);
            return None;
        };
        // Checked on the descriptor lengths, before anything is read or allocated.
        if frame_len > ctx.max_frame {
            ctx.port.count_drop(DropReason::OverMtu);
            return None;
        }
        let mut r = chain.reader(self.tx.memory());
        let mut raw = [0u8; VirtioNetHdr::SIZE];
        if r.read_exact(&mut raw).is_err() {
            ctx.port.count_drop(DropReason::BadHeader);
            return None;
        }
        let hdr = VirtioNetHdr::read_from_bytes(&raw).unwrap_or_default();
        let csum = match check_tx_header(&hdr, frame_len, ctx.features) {
            Ok(c) => c,
            Err(error) => {
                tracing::debug!(port = %ctx.port.id, %error, "transmit header refused");
                ctx.port.count_drop(DropReason::BadHeader);
                return None;
            }
        };
        // Every byte of `data` is overwritten by the read, or it goes back unread.
        let mut data = pool.take(&ctx.switch, frame_len);
        if r.read_exact(&mut data).is_err() {
            pool.give(&ctx.switch, data);
            ctx.port.count_drop(DropReason::BadHeader);
            return None;
        }
        let src = ctx.port.id.index();
        Some(Frame { data, csum, src })
    }

    /// The next receive chain, counting every chain taken (and every one the ring
    /// rejected) against `left`: a driver that re-publishes chains that fail at
    /// once as fast as they are returned must not keep the worker here (HOSTILE
    /// 34).
    fn next_rx(&mut self, ctx: &Ctx, left: &mut usize) -> NextRx {
        if self.rx_broken {
            return NextRx::Empty;
        }
        loop {
            if *left == 0 {
                return NextRx::Spent;
            }
            match self.rx.pop() {
                Ok(Some(c)) => {
                    *left -= 1;
                    return NextRx::Chain(c);
                }
                Ok(None) => return NextRx::Empty,
                Err(DeviceQueueError::NeedsReset(fault)) => {
                    tracing::warn!(port = %ctx.port.id, %fault, "receive queue needs reset");
                    self.rx_broken = true;
                    return NextRx::Empty;
                }
                Err(error) => {
                    *left -= 1;
                    tracing::debug!(port = %ctx.port.id, %error, "receive chain rejected");
                }
            }
        }
    }

    /// Writes `frame` into receive chains, taking at most `left` more chains from
    /// the ring (see [`Pair::next_rx`]).
    fn deliver(&mut self, mut frame: Frame, ctx: &Ctx, pool: &mut LocalPool, left: &mut usize) -> Delivery {
        if self.rx_broken {
            ctx.port.count_drop(DropReason::NoRxBuffer);
            pool.give(&ctx.switch, frame.data);
            return Delivery::Done;
        }
        let need = (VirtioNetHdr::SIZE + frame.data.len()) as u64;
        let mrg = ctx.features.contains(NetFeatures::MRG_RXBUF);
        // Gather chains until the frame fits: one without MRG_RXBUF, as many as it
        // takes with it (§5.1.6.4).
        while self.held.is_empty() || (mrg && self.held_writable < need) {
            let chain = match self.next_rx(ctx, left) {
                NextRx::Chain(chain) => chain,
                NextRx::Spent => return Delivery::Later(frame),
                NextRx::Empty if self.rx_broken => return self.drop_held(frame, ctx, pool),
                NextRx::Empty => return Delivery::Wait(frame),
            };
            self.held_writable += u64::from(chain.writable_len());
            self.held.push(chain);
            if mrg && self.held_writable < need && self.held.len() >= usize::from(self.rx.size()) {
                // Every buffer of the queue would not hold it.
                return self.drop_held(frame, ctx, pool);
            }
        }
        if self.held_writable < need {
            return self.drop_held(frame, ctx, pool);
        }
        let mut hdr = VirtioNetHdr::rx(u16::try_from(self.held.len()).unwrap_or(u16::MAX));
        if let Some(at) = frame.csum {
            if ctx.features.contains(NetFeatures::GUEST_CSUM) {
                // Both came from u16 header fields.
                let start = u16::try_from(at.start).unwrap_or(u16::MAX);
                let offset = u16::try_from(at.offset).unwrap_or(u16::MAX);
                hdr = VirtioNetHdr {
                    num_buffers: hdr.num_buffers,
                    ..VirtioNetHdr::partial_csum(start, offset)
                };
            } else {
                complete_checksum(&mut frame.data, at);
            }
        }
        let parts: [&[u8]; 2] = [hdr.as_bytes(), &frame.data];
        let first = self.rx_used.len();
        let (mut part, mut off) = (0, 0);
        let mut failed = false;
        for chain in &self.held {
            let mut w = chain.writer(self.rx.memory());
            while part < parts.len() && w.remaining() > 0 && !failed {
                match w.write(&parts[part][off..]) {
                    // No progress although space is left: never spin.
                    Ok(0) => failed = true,
                    Ok(k) => {
                        off += k;
                        if off == parts[part].len() {
                            part += 1;
                            off = 0;
                        }
                    }
                    Err(_) => failed = true,
                }
            }
            self.rx_used.push((chain.head(), w.written()));
        }
        self.held.clear();
        self.held_writable = 0;
        if failed {
            // A half-written frame is no frame: every buffer goes back unused, so
            // the driver never assembles a truncated one.
            for u in &mut self.rx_used[first..] {
                u.1 = 0;
            }
        }
        if failed {
            ctx.port.count_drop(DropReason::NoRxBuffer);
        } else {
            ctx.port.count_rx();
        }
        pool.give(&ctx.switch, frame.data);
        Delivery::Done
    }

    /// Drops `frame` (the guest's buffers cannot take it) and returns the gathered
    /// chains unused (length 0).
    fn drop_held(&mut self, frame: Frame, ctx: &Ctx, pool: &mut LocalPool) -> Delivery {
        ctx.port.count_drop(DropReason::NoRxBuffer);
        pool.give(&ctx.switch, frame.data);
        self.return_held();
        Delivery::Done
    }

    /// Returns the chains gathered for a mergeable frame unused (length 0), and
    /// publishes every chain of the round so far.
    fn return_held(&mut self) {
        self.rx_used.extend(self.held.drain(..).map(|c| (c.head(), 0)));
        self.held_writable = 0;
        self.publish_rx();
    }

    /// Puts the receive chains of the round in the used ring.
    fn publish_rx(&mut self) {
        if !self.rx_used.is_empty()
            && let Err(error) = self.rx.add_used_batch(self.rx_used.drain(..))
        {
            tracing::error!(%error, "returning receive chains failed");
        }
    }
}

/// What became of one frame offered by [`fuzz_deliver_rx`].
#[cfg(feature = "test-utils")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuzzRxFate {
    /// Written into receive chains and counted as received.
    Delivered,
    /// Dropped and counted (no buffer could take it).
    Dropped,
    /// The ring ran out of chains: the worker would wait for a kick.
    Wait,
    /// The budget of chains ran out: the worker would come back next round.
    Later,
}

/// Fuzz entry (`test-utils`): offers `frames` in turn to a receive queue pair
/// exactly as a worker round does (`Pair::deliver`), with `features` negotiated
/// and at most `chains` receive chains taken, stopping at the first frame that
/// must wait; then returns the chains still held unused (as a stopping worker
/// does) and publishes the used ring. Returns each offered frame's fate.
///
/// # Errors
/// An eventfd could not be created.
#[cfg(feature = "test-utils")]
pub fn fuzz_deliver_rx<M: DeviceMemory>(
    rx: DeviceRing<M>,
    tx: DeviceRing<M>,
    features: NetFeatures,
    frames: Vec<Vec<u8>>,
    chains: usize,
) -> Result<Vec<FuzzRxFate>, NotifyError> {
    use crate::net::switch::SwitchConfig;
    let switch = Switch::new(SwitchConfig::default());
    let port = switch.attach(None)?;
    let ctx = Ctx {
        port: port.clone(),
        switch: switch.clone(),
        features,
        max_frame: usize::MAX,
    };
    let mut pair = Pair {
        rx,
        tx,
        rx_kick: EventFdNotifier::new()?,
        tx_kick: EventFdNotifier::new()?,
        rx_irq: EventFdNotifier::new()?,
        tx_irq: EventFdNotifier::new()?,
        held: Vec::new(),
        held_writable: 0,
        rx_used: Vec::new(),
        rx_broken: false,
        tx_broken: false,
    };
    let mut pool = LocalPool::default();
    let mut left = chains;
    let mut fates = Vec::with_capacity(frames.len());
    let received = |s: &Switch| s.stats(port.id).map_or(0, |s| s.rx_frames);
    for data in frames {
        let before = received(&switch);
        let frame = Frame {
            data,
            csum: None,
            src: 0,
        };
        match pair.deliver(frame, &ctx, &mut pool, &mut left) {
            Delivery::Done if received(&switch) > before => fates.push(FuzzRxFate::Delivered),
            Delivery::Done => fates.push(FuzzRxFate::Dropped),
            Delivery::Wait(_) => {
                fates.push(FuzzRxFate::Wait);
                break;
            }
            Delivery::Later(_) => {
                fates.push(FuzzRxFate::Later);
                break;
            }
        }
    }
    pair.return_held();
    pool.flush(&switch);
    switch.detach(&port);
    Ok(fates)
}
