//! Starting and stopping the block device's queue workers: one per queue, each with
//! its own engine, on threads of their own or on the caller's tokio runtime
//! ([`Runtime`]); stopped after reaping every op in flight (a reset) or after
//! returning the requests in flight to the driver (vhost-user's GET_VRING_BASE).

use super::worker::{StopSignal, Worker, WorkerParts};
use super::{BlkDevice, EngineChoice};
use crate::blk::engine::Engine;
use crate::blk::engine_sync::SyncEngine;
use crate::blk::engine_uring::{UringConfig, UringEngine, best_engine};
use crate::blk::request::Parser;
use crate::poll::Poller;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use virtio_core::blk::{self, BlkFeatures, Status};
use virtio_core::features::Features;
use virtio_core::notify::{EventFdNotifier, Notify};
use virtio_core::ring::areas::RingFormat;
use virtio_core::transport::ActiveQueue;
use virtio_core::{DeviceModel, DeviceRing};

/// Where the queue workers run.
#[derive(Debug, Clone)]
pub enum Runtime {
    /// Each queue gets a thread with its own single-threaded tokio runtime.
    OwnThreads,
    /// Queue workers are spawned on the caller's runtime.
    Handle(tokio::runtime::Handle),
}

/// A queue worker that runs: how to stop it and hear where it stopped.
pub(super) struct Running {
    index: u16,
    stop: Arc<EventFdNotifier>,
    /// Set before `stop` is signalled; the worker checks it between chains.
    stopping: Arc<AtomicBool>,
    /// Set before `stop` is signalled: finish the requests in flight and return
    /// them to the driver, rather than dropping them as a reset does.
    drain: Arc<AtomicBool>,
    /// The worker's last word: where its ring stopped.
    done: std::sync::mpsc::Receiver<u16>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<V> BlkDevice<V>
where
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    /// The engine a new queue runs its I/O on ([`BlkSettings::engine`](super::BlkSettings::engine)).
    fn engine(&self) -> std::io::Result<Box<dyn Engine>> {
        let depth = u32::from(self.settings.queue_size).max(8);
        match &self.settings.engine {
            EngineChoice::Auto => best_engine(&self.disk, depth),
            EngineChoice::Uring => UringEngine::new(&self.disk, UringConfig { entries: depth })
                .map(|e| Box::new(e) as Box<dyn Engine>)
                .map_err(std::io::Error::other),
            EngineChoice::Sync => Ok(Box::new(SyncEngine::new(&self.disk, 2)?)),
            EngineChoice::Custom(make) => make(&self.disk),
        }
    }

    /// Opens queue `q` through the sharing model and starts its worker.
    pub(super) fn start_queue(
        &mut self,
        features: u64,
        mut q: ActiveQueue,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let format = RingFormat::of(Features::from_bits_retain(features));
        let vq = self
            .model
            .open_queue_in(q.index, format, q.layout.size, q.addrs())?;
        let f = Features::from_bits_retain(features);
        // A request naming memory the model refuses still gets IOERR in its
        // status byte, where that byte is reachable (issue 13, finding 7).
        let ring = q.resume(
            DeviceRing::new(q.layout.size, &vq.ring, vq.memory, f)?.with_reject_status(Status::IoErr.raw()),
        )?;
        let blk_features = BlkFeatures::from_bits_truncate(features);
        let stopping = Arc::new(AtomicBool::new(false));
        let worker = Worker::new(
            WorkerParts {
                index: q.index,
                ring,
                parser: Parser::new(blk_features, self.facts),
                engine: self.engine()?,
                cache: self.cache.clone(),
                mem_align: self.disk.mem_align(),
                serial: blk::encode_device_id(self.settings.serial.as_bytes()),
                gate: self.gate.clone(),
                poller: Poller::new(self.settings.poll),
                max_bytes_in_flight: self.settings.max_bytes_in_flight,
                limiter: self.settings.limiter.clone(),
            },
            stopping.clone(),
        );
        let stop = Arc::new(EventFdNotifier::new()?);
        let drain = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = std::sync::mpsc::channel();
        let signal = StopSignal {
            fd: stop.clone(),
            drain: drain.clone(),
        };
        let fut = worker.run(q.kick, q.interrupt, signal, done_tx);
        let thread = match &self.runtime {
            Runtime::Handle(h) => {
                h.spawn(fut);
                None
            }
            Runtime::OwnThreads => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()?;
                Some(
                    std::thread::Builder::new()
                        .name(format!("vio-blk-q{}", q.index))
                        .spawn(move || rt.block_on(fut))?,
                )
            }
        };
        self.running.push(Running {
            index: q.index,
            stop,
            stopping,
            drain,
            done,
            thread,
        });
        Ok(())
    }
}

impl<V: DeviceModel> BlkDevice<V> {
    /// Stops every queue worker once it has finished the requests in flight and
    /// returned them to the driver, keeping the device's state (the cache mode, a
    /// latched flush failure): how vhost-user stops rings and starts them again
    /// (GET_VRING_BASE), unlike a reset. Returns where each queue stopped, as
    /// `(queue index, next available-ring position)`, for
    /// [`ActiveQueue::next_avail`] when the queue starts again.
    pub fn stop_queues(&mut self) -> Vec<(u16, u16)> {
        self.stop_all(true)
    }

    /// Stops every queue worker and returns once each has reaped its ops; with
    /// `drain`, the requests in flight are completed and returned first.
    pub(super) fn stop_all(&mut self, drain: bool) -> Vec<(u16, u16)> {
        for r in &self.running {
            r.drain.store(drain, Ordering::Release);
            r.stopping.store(true, Ordering::Release);
            if let Err(e) = r.stop.notify() {
                tracing::error!(error = %e, "cannot signal a queue worker to stop");
            }
        }
        let mut stopped = Vec::with_capacity(self.running.len());
        for mut r in self.running.drain(..) {
            // The worker reports once it has reaped every op; only then may the reset
            // become visible. A worker that died also closes the channel.
            match r.done.recv() {
                Ok(next_avail) => stopped.push((r.index, next_avail)),
                Err(_) => tracing::error!(queue = r.index, "block queue worker died"),
            }
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
        }
        stopped
    }
}

impl<V: DeviceModel> Drop for BlkDevice<V> {
    fn drop(&mut self) {
        self.stop_all(false);
    }
}
