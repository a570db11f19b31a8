//! vhost-user backends: our devices served to a VMM in another process.
//!
//! A VMM (QEMU, Cloud Hypervisor, crosvm, or our own `transport-vhost-user`)
//! connects to a Unix socket, shares its guest memory as file descriptors, and
//! hands over each virtqueue with a kick and a call eventfd; the device then serves
//! the guest's rings directly, the way it serves a guest of sharing model 2 in
//! process. The pieces:
//!
//! - [`memory`]: the frontend's memory table, mapped and checked, and
//!   [`VhostMemory`], the sharing model our devices open their queues through;
//! - [`server`]: the [`Session`] that turns vhost-user messages into device
//!   activation, ring positions and configuration accesses, over the rust-vmm
//!   `vhost` crate's message layer; [`VhostUserDevice`] is what a device provides;
//! - [`Daemon`]: the accept loop, one frontend at a time; when a frontend goes
//!   away the device finishes what is in flight, is reset, and waits for the next.
//!
//! The `vio-host` binary serves a block image this way ([`serve_blk`]); by hand:
//!
//! ```no_run
//! use backend_host::blk::device::{BlkDevice, BlkSettings, Runtime};
//! use backend_host::blk::disk::{Disk, DiskOptions};
//! use backend_host::vhost_user::{Daemon, VhostMemory};
//!
//! let disk = Disk::open("disk.img", DiskOptions::default())?;
//! let memory = VhostMemory::new();
//! let device = BlkDevice::new(disk, memory.clone(), BlkSettings::default(), Runtime::OwnThreads);
//! let daemon = Daemon::bind("/tmp/vio-blk.sock", device, memory)?;
//! daemon.run()?; // serves frontends until the process ends
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod early_enable;
mod inflight;
pub mod memory;
mod net;
pub mod server;
mod sigbus;

pub use memory::{MemoryPolicy, MemoryTable, VhostMemory};
pub use server::{Session, SessionError, VhostUserDevice};

use crate::blk::device::{BlkDevice, BlkSettings, Runtime};
use crate::blk::disk::{Disk, DiskOptions};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

/// Serves one device to vhost-user frontends on a Unix socket, one at a time.
pub struct Daemon<D: VhostUserDevice> {
    listener: UnixListener,
    path: PathBuf,
    session: Arc<Mutex<Session<D>>>,
    /// The session's memory, whose contained SIGBUS ends the session.
    memory: VhostMemory,
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<UnixStream>>>,
}

impl<D: VhostUserDevice> std::fmt::Debug for Daemon<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Stops a [`Daemon`] running on another thread.
#[derive(Debug, Clone)]
pub struct StopHandle {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<UnixStream>>>,
}

impl StopHandle {
    /// Makes [`Daemon::run`] return: the current frontend is disconnected (its
    /// session ends as on any disconnect) and the accept loop is woken.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(s) = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Wakes a blocked accept(2); the loop sees the flag and returns.
        let _ = UnixStream::connect(&self.path);
    }
}

/// Removes a socket left at `path` by an earlier process, so a new one can be
/// bound there; never a file of another kind (a socket path given by mistake must
/// not cost an image): binding then fails with "address in use".
///
/// # Errors
/// The socket could not be removed.
pub(crate) fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

impl<D: VhostUserDevice> Daemon<D> {
    /// Listens on `path` (a stale socket there is replaced; any other kind of file
    /// is left alone and refused) for frontends of `device`, which opens its queues
    /// through `memory`.
    ///
    /// # Errors
    /// The socket could not be bound: `path` holds something that is not a socket,
    /// or cannot be created.
    pub fn bind(path: impl AsRef<Path>, device: D, memory: VhostMemory) -> std::io::Result<Daemon<D>> {
        let path = path.as_ref().to_path_buf();
        remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path)?;
        Ok(Daemon {
            listener,
            path,
            session: Arc::new(Mutex::new(Session::new(device, memory.clone()))),
            memory,
            stop: Arc::new(AtomicBool::new(false)),
            current: Arc::new(Mutex::new(None)),
        })
    }

    /// A handle that stops [`Self::run`] from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            path: self.path.clone(),
            stop: self.stop.clone(),
            current: self.current.clone(),
        }
    }

    /// Runs `f` on the device (for counters and tests).
    pub fn with_device<R>(&self, f: impl FnOnce(&D) -> R) -> R {
        f(self
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .device())
    }

    /// Serves frontends until [`StopHandle::stop`]: each connection until it ends,
    /// then the next.
    ///
    /// # Errors
    /// accept(2) failed for a reason other than a signal.
    pub fn run(&self) -> std::io::Result<()> {
        tracing::info!(socket = %self.path.display(), "waiting for a vhost-user frontend");
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            self.serve(stream);
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
        }
    }

    /// Serves one frontend until it disconnects or breaks the protocol, then ends
    /// its session: the device finishes what is in flight and is reset.
    fn serve(&self, stream: UnixStream) {
        tracing::info!("vhost-user frontend connected");
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = stream.try_clone().ok();
        let mut peer = match stream.try_clone() {
            Ok(p) => p,
            Err(error) => {
                tracing::error!(%error, "cannot duplicate the frontend's socket");
                return;
            }
        };
        let mut handler = BackendReqHandler::from_stream(stream, self.session.clone());
        // A fault of the previous session's memory is no reason to end this one.
        if let Some(faults) = self.memory.faults() {
            faults.take();
        }
        loop {
            match self.wait_for_request(&peer) {
                Ok(true) => {}
                Ok(false) => {
                    // HOSTILE 35: the frontend shrank a memory file it was allowed
                    // not to seal; the mapping now reads as zeros. End this session
                    // only: the daemon's other sessions never saw it.
                    tracing::error!(
                        "guest memory of this frontend vanished under the device (its file was \
                         shrunk); ending the session"
                    );
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "vhost-user frontend connection failed");
                    break;
                }
            }
            match early_enable::serve(&mut peer, &self.session) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "vhost-user frontend connection failed");
                    break;
                }
            }
            match handler.handle_request() {
                Ok(()) => {}
                Err(VuError::Disconnected | VuError::PartialMessage) => {
                    tracing::info!("vhost-user frontend disconnected");
                    break;
                }
                // HOSTILE 38: the session refused a request the `vhost` crate read
                // whole and answered (a failure ack under REPLY_ACK, an empty
                // GET_CONFIG) or that wants no answer: the stream is in step and
                // the frontend is not waiting, so the session goes on.
                Err(VuError::ReqHandlerError(error))
                    if !self
                        .session
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take_unanswered() =>
                {
                    tracing::debug!(%error, "vhost-user request refused; the session goes on");
                }
                Err(error) => {
                    // A message the crate could not parse, or a refusal whose reply
                    // could not say so: the stream may be out of step with the
                    // message boundaries, or the frontend waits for ever. The only
                    // safe way on is a new connection.
                    tracing::warn!(%error, "vhost-user request failed; closing the connection");
                    break;
                }
            }
        }
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.session.lock().unwrap_or_else(PoisonError::into_inner).end();
    }
}

impl<D: VhostUserDevice> Daemon<D> {
    /// Waits until the frontend has sent something (`true`) or a contained SIGBUS
    /// hit this session's memory (`false`). Without unsealed memory allowed, there
    /// is nothing to wait for but the frontend: the request read blocks instead.
    fn wait_for_request(&self, peer: &UnixStream) -> std::io::Result<bool> {
        use rustix::event::{PollFd, PollFlags, poll};
        let Some(faults) = self.memory.faults() else {
            return Ok(true);
        };
        let signal = faults.fd();
        loop {
            let mut fds = [
                PollFd::new(peer, PollFlags::IN),
                PollFd::new(&signal, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            if faults.take() {
                return Ok(false);
            }
            if !fds[0].revents().is_empty() {
                return Ok(true);
            }
        }
    }
}

/// What [`serve_blk`] serves: an image as a vhost-user-blk device.
#[derive(Debug, Clone)]
pub struct BlkServe {
    /// The socket to listen on.
    pub socket: PathBuf,
    /// The image file or block device.
    pub image: PathBuf,
    /// How to open it.
    pub disk: DiskOptions,
    /// The device's settings.
    pub settings: BlkSettings,
}

/// Serves `opts.image` to vhost-user frontends on `opts.socket` until the process
/// ends, accepting only sealed memory files: see [`serve_blk_with`].
///
/// # Errors
/// The image cannot be opened or the socket cannot be bound or accepted on.
pub fn serve_blk(opts: BlkServe) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    serve_blk_with(opts, MemoryPolicy::default())
}

/// Serves `opts.image` to vhost-user frontends on `opts.socket` until the process
/// ends, with memory files checked under `memory`: the `vio-host blk` daemon.
///
/// # Errors
/// The image cannot be opened or the socket cannot be bound or accepted on.
pub fn serve_blk_with(
    opts: BlkServe,
    memory: MemoryPolicy,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let disk = Disk::open(&opts.image, opts.disk)?;
    tracing::info!(
        image = %opts.image.display(),
        bytes = disk.size(),
        direct = disk.direct(),
        block_size = disk.block_size(),
        "image opened"
    );
    let memory = VhostMemory::with_policy(memory)?;
    let device = BlkDevice::new(disk, memory.clone(), opts.settings, Runtime::OwnThreads);
    let daemon = Daemon::bind(&opts.socket, device, memory)?;
    daemon.run()?;
    Ok(())
}

impl<D: VhostUserDevice> Drop for Daemon<D> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
#[path = "daemon_tests.rs"]
mod daemon_tests;
