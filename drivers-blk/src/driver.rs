//! The driver: device initialization, the raw submit / poll API and blocking calls.

use crate::error::{BlkError, Broken};
use crate::info::{BlkInfo, BlkOptions};
use crate::queue::{Owner, Polled, Queue, QueueState, RequestId};
use crate::request::{Completion, Request, SLOT_BYTES};
use crate::staging::Staging;
use hypervisor::GuestMemory;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use virtio_core::blk::{BLK_DEPENDENCIES, BlkConfig, BlkFeatures, SECTOR_SIZE, check_offer};
use virtio_core::driver::{DeviceGuard, SetupError};
use virtio_core::notify::Wait;
use virtio_core::transport::Transport;
use virtio_core::{DriverModel, GuestBuf};
use zerocopy::FromBytes;

/// Longest a blocked thread sleeps on the interrupt before it re-checks the ring. An
/// interrupt consumed elsewhere (another reader of the same eventfd) then costs
/// latency, never a hang.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Smallest queue the driver uses: a request takes up to three descriptors.
const MIN_QUEUE_SIZE: u16 = 4;

/// A virtio-blk driver over transport `T` and sharing model `D`. Each queue waits
/// on the used-buffer notification its transport gives ([`Transport::interrupt`]).
///
/// Methods take `&self`: each queue has its own lock, so threads (or tasks) may share
/// the driver and use different queues without contention.
pub struct BlkDriver<D: DriverModel, T: Transport> {
    /// Owns the transport; stops the device when the driver goes.
    device: DeviceGuard<T>,
    model: D,
    pub(crate) memory: Arc<GuestMemory>,
    info: BlkInfo,
    pub(crate) queues: Vec<Queue<D::Share, T::Interrupt>>,
    timeout: Option<Duration>,
    /// [`BlkOptions::spin`].
    spin: Duration,
}

impl<D: DriverModel, T: Transport> std::fmt::Debug for BlkDriver<D, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDriver")
            .field("model", &self.model.name())
            .field("info", &self.info)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl<D: DriverModel, T: Transport> BlkDriver<D, T> {
    /// Initializes the device behind `transport` (virtio 1.2 §3.1.1, §5.2.5):
    /// negotiates features as `opts` allow, reads the configuration consistently,
    /// creates `min(opts.queues, device queues)` queues through `model`, allocates the
    /// request slots in `memory` (the guest's own memory) and sets DRIVER_OK.
    /// Each queue's used-buffer notification comes from the transport.
    ///
    /// # Errors
    /// [`BlkError::Setup`] (initialization, configuration, queue setup) or
    /// allocation failures; the device is then marked FAILED and reset (see
    /// [`DeviceGuard`]) and everything allocated is freed.
    pub fn new(transport: T, model: D, memory: Arc<GuestMemory>, opts: BlkOptions) -> Result<Self, BlkError> {
        let offered = BlkFeatures::from_bits_retain(transport.device_features());
        if let Err(error) = check_offer(offered) {
            tracing::warn!(%error, "device makes an offer the spec forbids");
        }
        // From here on, an early return drops the guard: FAILED, then a reset.
        let device = DeviceGuard::initialize(
            transport,
            virtio_core::blk::DEVICE_ID,
            model.allowed(opts.wanted()),
            BLK_DEPENDENCIES,
        )?;
        let info = BlkInfo::new(device.features(), &read_config(&device)?);
        let mut driver = BlkDriver {
            device,
            model,
            memory,
            info,
            queues: Vec::new(),
            timeout: opts.timeout,
            spin: opts.spin,
        };
        // On failure the driver's drop resets the device and frees what was
        // allocated.
        driver.setup(&opts)?;
        driver.device.finish();
        Ok(driver)
    }

    fn setup(&mut self, opts: &BlkOptions) -> Result<(), BlkError> {
        let available = self.transport().num_queues().min(self.info.device_queues);
        let nq = opts.queues.clamp(1, available.max(1));
        for index in 0..nq {
            let q = self
                .device
                .queue(&self.model, index, opts.queue_size, MIN_QUEUE_SIZE)?;
            let base = self.memory.alloc(SLOT_BYTES * u64::from(q.size), SLOT_BYTES)?;
            // Pushed before the transport call so the drop frees the slots on failure.
            self.queues.push(Queue {
                index,
                state: Mutex::new(QueueState::new(q.ring, base)),
                cond: Condvar::new(),
                irq: q.interrupt,
            });
            self.device.setup_queue(index, q.size, q.addrs)?;
        }
        self.device.driver_ok()?;
        Ok(())
    }

    /// What the device offers, as negotiated and configured.
    pub fn info(&self) -> &BlkInfo {
        &self.info
    }

    /// Number of queues in use.
    pub fn num_queues(&self) -> u16 {
        // At most `u16::MAX` queues were created (indices are u16).
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }

    /// Size of queue `queue` (the most requests it holds in flight).
    pub fn queue_size(&self, queue: u16) -> Result<u16, BlkError> {
        Ok(self.queue(queue)?.lock().ring.size())
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        self.device.transport()
    }

    /// The sharing model.
    pub fn model(&self) -> &D {
        &self.model
    }

    /// The guest memory requests and staging buffers live in.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Why queue `queue` stopped working, if it did.
    pub fn broken(&self, queue: u16) -> Result<Option<Broken>, BlkError> {
        Ok(self.queue(queue)?.lock().broken())
    }

    pub(crate) fn queue(&self, queue: u16) -> Result<&Queue<D::Share, T::Interrupt>, BlkError> {
        self.queues
            .get(usize::from(queue))
            .ok_or(BlkError::NoSuchQueue(queue))
    }

    // ---- raw API: submit, kick, poll, wait ----

    /// Submits `req` on `queue` without notifying the device: call [`Self::kick`] once
    /// per batch. The result comes back through [`Self::poll`].
    ///
    /// # Errors
    /// Local checks ([`BlkError::ReadOnly`], [`BlkError::OutOfRange`],
    /// [`BlkError::BadLength`], [`BlkError::Unsupported`]), [`BlkError::QueueFull`],
    /// [`BlkError::DeviceBroken`], a refused buffer.
    pub fn submit(&self, queue: u16, req: Request) -> Result<RequestId, BlkError> {
        req.check(&self.info)?;
        let q = self.queue(queue)?;
        let mut st = q.lock();
        st.submit(&self.memory, queue, &req, Owner::Poller, &mut None)
    }

    /// Notifies the device of the requests submitted since the last kick, if it asked
    /// for notifications (virtio 1.2 §2.7.13). Each submission was already visible to
    /// the device (a polling device may serve it before any kick).
    pub fn kick(&self, queue: u16) -> Result<(), BlkError> {
        let q = self.queue(queue)?;
        let notify = q.lock().ring.kick_due();
        if let Some(next) = notify {
            self.device.notify(q.index, next)?;
        }
        Ok(())
    }

    /// Takes up to `budget` completed requests of [`Self::submit`], in completion
    /// order (not submission order). NAPI-style: used-buffer notifications are off
    /// while the ring is drained and turned back on, with a re-check, once it is
    /// empty; if the budget runs out first they stay off and the caller polls again.
    pub fn poll(&self, queue: u16, budget: usize) -> Result<Vec<Polled>, BlkError> {
        let mut out = Vec::new();
        self.poll_into(queue, budget, &mut out)?;
        Ok(out)
    }

    /// [`Self::poll`] into a caller's vector (no allocation once it has capacity);
    /// returns how many results were appended.
    pub fn poll_into(&self, queue: u16, budget: usize, out: &mut Vec<Polled>) -> Result<usize, BlkError> {
        self.poll_impl(queue, budget, out, true)
    }

    /// [`Self::poll_into`] for a caller that busy-polls: used-buffer notifications
    /// stay off after the ring is drained, so the device signals no completion
    /// nobody sleeps for (an eventfd write per batch, a system call on the device's
    /// side). [`Self::wait`] and the blocking and async calls turn them back on
    /// before they sleep; a caller that sleeps on the interrupt eventfd itself must
    /// call [`Self::poll_into`] first.
    pub fn poll_busy(&self, queue: u16, budget: usize, out: &mut Vec<Polled>) -> Result<usize, BlkError> {
        self.poll_impl(queue, budget, out, false)
    }

    fn poll_impl(
        &self,
        queue: u16,
        budget: usize,
        out: &mut Vec<Polled>,
        rearm: bool,
    ) -> Result<usize, BlkError> {
        let q = self.queue(queue)?;
        let mut st = q.lock();
        let mut woke = false;
        st.ring.disable_notifications();
        loop {
            woke |= st.reap(&self.memory);
            if st.ready_len() >= budget || st.broken().is_some() || !rearm {
                break;
            }
            // Empty: ask for notifications again; if used buffers slipped in
            // meanwhile, keep draining (§2.7.10 race-free re-check).
            if !st.ring.enable_notifications() {
                break;
            }
            st.ring.disable_notifications();
        }
        // Someone sleeping on the interrupt relies on notifications being on.
        if st.leader || st.runner {
            let _ = st.ring.enable_notifications();
        }
        let n = st.take_ready(&self.memory, queue, budget, out);
        drop(st);
        if woke {
            q.cond.notify_all();
        }
        Ok(n)
    }

    /// Blocks until [`Self::poll`] has results for `queue` or `timeout` passes
    /// (`None`: forever). Returns whether results are ready.
    ///
    /// # Errors
    /// [`BlkError::DeviceBroken`] once the queue is broken and nothing is left to
    /// poll; a failing interrupt source.
    pub fn wait(&self, queue: u16, timeout: Option<Duration>) -> Result<bool, BlkError> {
        let q = self.queue(queue)?;
        let deadline = deadline(timeout);
        let (st, ok) = self.block_until(q, deadline, |st| st.ready_len() > 0 || st.broken().is_some())?;
        match st.broken() {
            Some(b) if st.ready_len() == 0 => Err(BlkError::DeviceBroken(b)),
            _ => Ok(ok),
        }
    }

    /// Sleeps until `done(state)` holds or `deadline` passes, reaping on the way.
    /// One thread at a time waits on the interrupt (the leader); the others, and all
    /// threads while an async runner owns the interrupt, wait on the condition
    /// variable, which every reap that completes a waiter's request signals.
    pub(crate) fn block_until<'q>(
        &self,
        q: &'q Queue<D::Share, T::Interrupt>,
        deadline: Option<Instant>,
        done: impl Fn(&QueueState<D::Share>) -> bool,
    ) -> Result<(Held<'q, D::Share>, bool), BlkError> {
        let mut st = q.lock();
        // Spin first, once, for up to `self.spin`: a completion that comes within
        // it is taken without a sleep and a wake-up.
        let mut spin_until = (!self.spin.is_zero()).then(|| Instant::now() + self.spin);
        if spin_until.is_some() && !(st.leader || st.runner) {
            // Nobody sleeps on the interrupt meanwhile; the sleep path below
            // turns notifications back on (with a re-check) before it waits.
            st.ring.disable_notifications();
        }
        loop {
            if done(&st) {
                return Ok((st, true));
            }
            if let Some(until) = spin_until {
                if st.reap(&self.memory) {
                    q.cond.notify_all();
                }
                if done(&st) {
                    continue;
                }
                if Instant::now() < until && deadline.is_none_or(|d| Instant::now() < d) {
                    // Let other threads at the queue between polls.
                    drop(st);
                    std::hint::spin_loop();
                    st = q.lock();
                    continue;
                }
                spin_until = None;
            }
            let remaining = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(r) if !r.is_zero() => Some(r),
                    _ => return Ok((st, false)),
                },
                None => None,
            };
            if st.leader || st.runner {
                let slice = remaining.map_or(WAIT_SLICE, |r| r.min(WAIT_SLICE));
                st = q
                    .cond
                    .wait_timeout(st, slice)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            if st.reap(&self.memory) {
                q.cond.notify_all();
            }
            if done(&st) {
                continue;
            }
            if st.ring.enable_notifications() {
                continue; // Used buffers arrived: reap them instead of sleeping.
            }
            st.leader = true;
            drop(st);
            let slice = remaining.map_or(WAIT_SLICE, |r| r.min(WAIT_SLICE));
            let waited = q.irq.wait(Some(slice));
            st = q.lock();
            st.leader = false;
            st.reap(&self.memory);
            // Always: a follower may now have its result, or must take the lead.
            q.cond.notify_all();
            waited?;
        }
    }

    // ---- blocking calls ----

    /// Submits `req` as a waited-for request, kicks, and blocks until it completes.
    /// Returns the staging buffer the request carried, if any.
    pub(crate) fn call_blocking(
        &self,
        queue: u16,
        req: Request,
        mut staging: Option<Staging>,
    ) -> (Result<Completion, BlkError>, Option<Staging>) {
        let r = (|| {
            req.check(&self.info)?;
            let q = self.queue(queue)?;
            let deadline = deadline(self.timeout);
            // Submit, waiting for room if the queue is full.
            let id = loop {
                let mut st = q.lock();
                match st.submit(&self.memory, queue, &req, Owner::Waiter, &mut staging) {
                    Err(BlkError::QueueFull) => {
                        drop(st);
                        let (st, ok) =
                            self.block_until(q, deadline, |st| st.has_space() || st.broken().is_some())?;
                        drop(st);
                        if !ok {
                            return Err(BlkError::TimedOut);
                        }
                    }
                    other => break other?,
                }
            };
            self.kick(queue)?;
            let (mut st, ok) = self.block_until(q, deadline, |st| st.is_done(id))?;
            if !ok {
                st.abandon(&self.memory, id);
                return Err(BlkError::TimedOut);
            }
            match st.take_done(id) {
                Some((r, b)) => {
                    staging = b;
                    r
                }
                None => Err(BlkError::DeviceBroken(Broken::Earlier)),
            }
        })();
        (r, staging)
    }

    fn blocking(&self, queue: u16, req: Request) -> Result<Completion, BlkError> {
        self.call_blocking(queue, req, None).0
    }

    /// Reads `buf.len` bytes at `sector` into the guest buffer `buf` (zero copy).
    pub fn read_blocking(&self, queue: u16, sector: u64, buf: GuestBuf) -> Result<(), BlkError> {
        self.blocking(queue, Request::Read { sector, buf }).map(drop)
    }

    /// Writes the guest buffer `buf` at `sector` (zero copy).
    pub fn write_blocking(&self, queue: u16, sector: u64, buf: GuestBuf) -> Result<(), BlkError> {
        self.blocking(queue, Request::Write { sector, buf }).map(drop)
    }

    /// Makes every completed write durable. Without FLUSH the device is writethrough
    /// and this returns at once (virtio 1.2 §5.2.5.2, HOSTILE rule 24).
    pub fn flush_blocking(&self, queue: u16) -> Result<(), BlkError> {
        if !self.info.flush {
            self.queue(queue)?;
            return Ok(());
        }
        self.blocking(queue, Request::Flush).map(drop)
    }

    /// Discards `sectors` sectors at `sector`.
    pub fn discard_blocking(&self, queue: u16, sector: u64, sectors: u32) -> Result<(), BlkError> {
        self.blocking(queue, Request::Discard { sector, sectors })
            .map(drop)
    }

    /// Makes `sectors` sectors at `sector` read as zeroes; `unmap` lets the device
    /// deallocate them.
    pub fn write_zeroes_blocking(
        &self,
        queue: u16,
        sector: u64,
        sectors: u32,
        unmap: bool,
    ) -> Result<(), BlkError> {
        self.blocking(
            queue,
            Request::WriteZeroes {
                sector,
                sectors,
                unmap,
            },
        )
        .map(drop)
    }

    /// The device ID string, up to its first NUL.
    pub fn get_id_blocking(&self, queue: u16) -> Result<String, BlkError> {
        match self.blocking(queue, Request::GetId)? {
            Completion::Id(id) => Ok(id.to_string_lossy()),
            _ => Err(BlkError::DeviceBroken(Broken::Earlier)),
        }
    }

    /// Reads `dst.len()` bytes at `sector` into `dst`, through a driver-owned guest
    /// staging buffer (one copy).
    pub fn read_bytes_blocking(&self, queue: u16, sector: u64, dst: &mut [u8]) -> Result<(), BlkError> {
        let (len, b) = self.staging_for(queue, dst.len())?;
        let buf = GuestBuf::new(b.gpa, len);
        let (r, b) = self.call_blocking(queue, Request::Read { sector, buf }, Some(b));
        let r = r.and_then(|_| Ok(self.memory.read(buf.addr, dst)?));
        self.give_staging(queue, b);
        r
    }

    /// Writes `src` at `sector` through a driver-owned guest staging buffer (one copy).
    pub fn write_bytes_blocking(&self, queue: u16, sector: u64, src: &[u8]) -> Result<(), BlkError> {
        let (len, b) = self.staging_for(queue, src.len())?;
        let buf = GuestBuf::new(b.gpa, len);
        if let Err(e) = self.memory.write(buf.addr, src) {
            self.give_staging(queue, Some(b));
            return Err(e.into());
        }
        let (r, b) = self.call_blocking(queue, Request::Write { sector, buf }, Some(b));
        self.give_staging(queue, b);
        r.map(drop)
    }

    /// A staging buffer for `len` bytes, after the checks that need no device.
    pub(crate) fn staging_for(&self, queue: u16, len: usize) -> Result<(u32, Staging), BlkError> {
        let len32 = u32::try_from(len).map_err(|_| BlkError::BadLength(len as u64))?;
        if len32 == 0 || u64::from(len32) % SECTOR_SIZE != 0 {
            return Err(BlkError::BadLength(len as u64));
        }
        let q = self.queue(queue)?;
        let b = q.lock().staging.take(&self.memory, len32)?;
        Ok((len32, b))
    }

    pub(crate) fn give_staging(&self, queue: u16, b: Option<Staging>) {
        if let (Some(b), Ok(q)) = (b, self.queue(queue)) {
            q.lock().staging.give(&self.memory, b);
        }
    }
}

impl<D: DriverModel, T: Transport> Drop for BlkDriver<D, T> {
    /// Resets the device and, once it reports status 0 (it no longer touches guest
    /// memory, §2.4), takes every request back and frees the slots and staging
    /// buffers. If the device never acknowledges the reset, the memory is leaked
    /// rather than handed back while the device may still write it.
    fn drop(&mut self) {
        let (queues, memory) = (&self.queues, &self.memory);
        self.device.shutdown(|| {
            for q in queues {
                q.lock().teardown(memory);
            }
        });
    }
}

/// A queue's state, locked.
type Held<'q, S> = MutexGuard<'q, QueueState<S>>;

fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| Instant::now().checked_add(t))
}

/// Reads the whole configuration space under one generation (§2.5.1), in naturally
/// aligned pieces so that a shorter config space (an older device without the
/// secure-erase fields) reads as zeroes past its end instead of failing whole.
fn read_config(device: &DeviceGuard<impl Transport>) -> Result<BlkConfig, SetupError> {
    let mut raw = [0u8; BlkConfig::SIZE];
    device.read_config(&mut raw, |t, buf| {
        t.read_config(0, &mut buf[..8]);
        for off in (8..BlkConfig::SIZE).step_by(4) {
            t.read_config(off, &mut buf[off..off + 4]);
        }
    })?;
    Ok(BlkConfig::read_from_bytes(&raw).unwrap_or_default())
}
