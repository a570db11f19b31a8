//! The async API: futures that complete when [`BlkDriver::run_completions`] (or any
//! other caller that reaps the ring) delivers their result.
//!
//! A future registers its waker in its request slot; whoever reaps the ring wakes
//! it. Dropping a future does not cancel the request (virtio-blk has no abort): the
//! slot, and the staging buffer of a copying call, stay owned by the driver until the
//! device returns the request.

use crate::driver::BlkDriver;
use crate::error::{BlkError, Broken};
use crate::queue::{Owner, Queue, RequestId};
use crate::request::{Completion, Request};
use crate::staging::Staging;
use std::future::{Future, poll_fn};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use virtio_core::notify::Wait;
use virtio_core::transport::Transport;
use virtio_core::{DriverModel, GuestBuf};

/// Waits for one waited-for request; abandons it if dropped first.
struct RequestFuture<'a, D: DriverModel, T: Transport> {
    driver: &'a BlkDriver<D, T>,
    queue: &'a Queue<D::Share, T::Interrupt>,
    id: RequestId,
    finished: bool,
}

impl<D: DriverModel, T: Transport> Future for RequestFuture<'_, D, T> {
    type Output = (Result<Completion, BlkError>, Option<Staging>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut st = this.queue.lock();
        if !st.is_done(this.id) {
            // Reaping here is cheap and makes progress without a runner's turn.
            if st.reap(&this.driver.memory) {
                this.queue.cond.notify_all();
            }
        }
        if let Some(out) = st.take_done(this.id) {
            this.finished = true;
            return Poll::Ready(out);
        }
        st.set_waker(this.id, cx.waker());
        Poll::Pending
    }
}

impl<D: DriverModel, T: Transport> Drop for RequestFuture<'_, D, T> {
    fn drop(&mut self) {
        if !self.finished {
            self.queue.lock().abandon(&self.driver.memory, self.id);
        }
    }
}

/// Gives a staging buffer back to its queue's pool unless a request took it.
struct StagingGuard<'a, D: DriverModel, T: Transport> {
    driver: &'a BlkDriver<D, T>,
    queue: u16,
    staging: Option<Staging>,
}

impl<D: DriverModel, T: Transport> Drop for StagingGuard<'_, D, T> {
    fn drop(&mut self) {
        self.driver.give_staging(self.queue, self.staging.take());
    }
}

impl<D: DriverModel, T: Transport> BlkDriver<D, T> {
    /// Submits `req` as a waited-for request (waiting for room if the queue is full),
    /// kicks and awaits the result. The staging buffer in `guard` moves into the
    /// request and comes back with the result.
    async fn call(
        &self,
        queue: u16,
        req: Request,
        guard: &mut StagingGuard<'_, D, T>,
    ) -> Result<Completion, BlkError> {
        req.check(self.info())?;
        let q = self.queue(queue)?;
        let id = poll_fn(|cx| {
            let mut st = q.lock();
            match st.submit(&self.memory, queue, &req, Owner::Waiter, &mut guard.staging) {
                Err(BlkError::QueueFull) if st.broken().is_none() => {
                    st.wait_space(cx.waker());
                    Poll::Pending
                }
                other => Poll::Ready(other),
            }
        })
        .await?;
        let fut = RequestFuture {
            driver: self,
            queue: q,
            id,
            finished: false,
        };
        // Kick after the future exists, so an error here still abandons the slot.
        self.kick(queue)?;
        let (r, b) = fut.await;
        guard.staging = b;
        r
    }

    async fn call_plain(&self, queue: u16, req: Request) -> Result<Completion, BlkError> {
        let mut guard = StagingGuard {
            driver: self,
            queue,
            staging: None,
        };
        self.call(queue, req, &mut guard).await
    }

    /// Reads `buf.len` bytes at `sector` into the guest buffer `buf` (zero copy).
    pub async fn read(&self, queue: u16, sector: u64, buf: GuestBuf) -> Result<(), BlkError> {
        self.call_plain(queue, Request::Read { sector, buf })
            .await
            .map(drop)
    }

    /// Writes the guest buffer `buf` at `sector` (zero copy).
    pub async fn write(&self, queue: u16, sector: u64, buf: GuestBuf) -> Result<(), BlkError> {
        self.call_plain(queue, Request::Write { sector, buf })
            .await
            .map(drop)
    }

    /// Makes every completed write durable (immediately `Ok` without FLUSH: the
    /// device is writethrough then).
    pub async fn flush(&self, queue: u16) -> Result<(), BlkError> {
        if !self.info().flush {
            self.queue(queue)?;
            return Ok(());
        }
        self.call_plain(queue, Request::Flush).await.map(drop)
    }

    /// Discards `sectors` sectors at `sector`.
    pub async fn discard(&self, queue: u16, sector: u64, sectors: u32) -> Result<(), BlkError> {
        self.call_plain(queue, Request::Discard { sector, sectors })
            .await
            .map(drop)
    }

    /// Makes `sectors` sectors at `sector` read as zeroes.
    pub async fn write_zeroes(
        &self,
        queue: u16,
        sector: u64,
        sectors: u32,
        unmap: bool,
    ) -> Result<(), BlkError> {
        self.call_plain(
            queue,
            Request::WriteZeroes {
                sector,
                sectors,
                unmap,
            },
        )
        .await
        .map(drop)
    }

    /// The device ID string, up to its first NUL.
    pub async fn get_id(&self, queue: u16) -> Result<String, BlkError> {
        match self.call_plain(queue, Request::GetId).await? {
            Completion::Id(id) => Ok(id.to_string_lossy()),
            _ => Err(BlkError::DeviceBroken(Broken::Earlier)),
        }
    }

    /// Reads into `dst` through a driver-owned guest staging buffer.
    pub async fn read_bytes(&self, queue: u16, sector: u64, dst: &mut [u8]) -> Result<(), BlkError> {
        let (len, b) = self.staging_for(queue, dst.len())?;
        let buf = GuestBuf::new(b.gpa, len);
        let mut guard = StagingGuard {
            driver: self,
            queue,
            staging: Some(b),
        };
        self.call(queue, Request::Read { sector, buf }, &mut guard)
            .await?;
        Ok(self.memory.read(buf.addr, dst)?)
    }

    /// Writes `src` through a driver-owned guest staging buffer.
    pub async fn write_bytes(&self, queue: u16, sector: u64, src: &[u8]) -> Result<(), BlkError> {
        let (len, b) = self.staging_for(queue, src.len())?;
        let buf = GuestBuf::new(b.gpa, len);
        let mut guard = StagingGuard {
            driver: self,
            queue,
            staging: Some(b),
        };
        self.memory.write(buf.addr, src)?;
        self.call(queue, Request::Write { sector, buf }, &mut guard)
            .await
            .map(drop)
    }
}

impl<D: DriverModel, T: Transport<Interrupt: AsFd>> BlkDriver<D, T> {
    /// Serves `queue`'s interrupt inside a tokio runtime (with I/O enabled): awaits
    /// it through [`AsyncFd`](tokio::io::unix::AsyncFd), reaps the ring and wakes
    /// the futures (and blocked threads) whose requests completed. Spawn one per
    /// queue for the async API; it returns only on an error (a broken queue
    /// included), and dropping it hands the interrupt back to blocking callers.
    ///
    /// # Errors
    /// [`BlkError::RunnerActive`] if another runner serves the queue,
    /// [`BlkError::Runtime`] if the runtime refuses the descriptor,
    /// [`BlkError::DeviceBroken`] once the queue breaks.
    pub async fn run_completions(&self, queue: u16) -> Result<(), BlkError> {
        let q = self.queue(queue)?;
        {
            let mut st = q.lock();
            if st.runner {
                return Err(BlkError::RunnerActive(queue));
            }
            st.runner = true;
        }
        let _running = RunnerGuard(q);
        let afd = virtio_core::reactor::watch(&q.irq).map_err(BlkError::Runtime)?;
        loop {
            {
                let mut st = q.lock();
                loop {
                    st.reap(&self.memory);
                    if let Some(b) = st.broken() {
                        drop(st);
                        q.cond.notify_all();
                        return Err(BlkError::DeviceBroken(b));
                    }
                    // Notifications on, then re-check (§2.7.10).
                    if !st.ring.enable_notifications() {
                        break;
                    }
                }
            }
            q.cond.notify_all();
            let mut ready = afd.readable().await.map_err(BlkError::Runtime)?;
            q.irq.take()?;
            ready.clear_ready();
        }
    }
}

/// Marks the runner gone, so a blocked thread takes over the interrupt.
struct RunnerGuard<'a, S: virtio_core::DriverShare, W>(&'a Queue<S, W>);

impl<S: virtio_core::DriverShare, W> Drop for RunnerGuard<'_, S, W> {
    fn drop(&mut self) {
        self.0.lock().runner = false;
        self.0.cond.notify_all();
    }
}
