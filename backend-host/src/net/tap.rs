//! A TAP port: the host's own network stack as one more port of a [`Switch`].
//!
//! [`TapPort`] creates a TAP interface (`/dev/net/tun`, `TUNSETIFF` with
//! `IFF_TAP | IFF_NO_PI`: plain Ethernet frames, no packet-information prefix) and
//! plugs it into the switch like a guest. To the host the interface is an Ethernet
//! link whose far end is the switch; to the guests the host is one more station,
//! learnt, forwarded to and flooded to like any other.
//!
//! One worker thread moves frames both ways: frames the host sends out of the
//! interface are read from the tap fd and handed to the switch; frames the switch
//! queues for the port are written to the tap fd, which hands them to the host's
//! stack as if received. The fd is non-blocking and the worker sleeps in `poll(2)`
//! on the tap fd, the port's inbox eventfd and a stop eventfd. Nothing it does
//! blocks the switch or grows without bound:
//!
//! - a frame from the host longer than the Ethernet header plus
//!   [`TapConfig::mtu`] is dropped and counted ([`DropReason::OverMtu`]), one
//!   shorter than an Ethernet header as [`DropReason::Short`];
//! - a frame for the host that the tap does not take at once (`EAGAIN`) or at all
//!   is dropped and counted ([`DropReason::NoRxBuffer`] on the port, and
//!   [`TapStats::queue_full`] or [`TapStats::write_errors`]);
//! - frames wait only in the switch's bounded inbox (and, once taken from it, in
//!   the worker's hands until its next writes).
//!
//! No offloads: without `IFF_VNET_HDR` the host's stack segments and checksums
//! every frame before the tap sees it, and a frame a guest sent with a partial
//! checksum (virtio-net `NEEDS_CSUM`) has its checksum completed here before the
//! host sees it.
//!
//! # Interfaces and network namespaces
//! [`TapPort::open`] creates the interface in the calling thread's network
//! namespace; [`TapPort::open_in_netns`] creates it in another one (a namespace
//! file such as `/var/run/netns/NAME`), from a short-lived helper thread that
//! `setns(2)`s into it: a tun fd stays bound to the namespace it was opened in, so
//! nothing else changes namespace, and no name is ever taken in the caller's
//! namespace. The interface is not persistent: it disappears when the port is
//! dropped (the last fd closes). Addresses, MTU and link state are left to the
//! host's tools (`ip addr`, `ip link set up`), like for any interface.

// The TUNSETIFF ioctl (see `IfReq`).
#![allow(unsafe_code)]

use super::switch::{Batch, DropReason, Frame, Inbox, LocalPool, Port, PortId, PortStats, Switch};
use rustix::fd::{AsFd, OwnedFd};
use rustix::io::Errno;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use virtio_core::net::{self, ETH_HDR_LEN, complete_checksum};
use virtio_core::notify::{EventFdNotifier, Notify, NotifyError, Wait};

/// TAP port settings.
#[derive(Debug, Clone, Copy)]
pub struct TapConfig {
    /// Largest payload after the Ethernet header taken from the host; match the
    /// guests' MTU ([`NetSettings::mtu`](super::NetSettings::mtu)) and the
    /// interface's.
    pub mtu: u16,
}

impl Default for TapConfig {
    fn default() -> Self {
        TapConfig { mtu: 1500 }
    }
}

/// Why a TAP port could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, longer than 15 bytes or holds a NUL, `/` or whitespace.
    #[error("invalid interface name {0:?}")]
    BadName(String),
    /// The MTU setting is below the minimum of 68.
    #[error("MTU {0} below 68")]
    BadMtu(u16),
    /// `/dev/net/tun` could not be opened (missing, or no permission).
    #[error("cannot open /dev/net/tun")]
    Open(#[source] std::io::Error),
    /// The kernel refused to create or attach the interface (`TUNSETIFF`).
    #[error("cannot create TAP interface {name:?}")]
    Create {
        /// The name asked for.
        name: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The network namespace could not be opened or entered.
    #[error("cannot enter network namespace {}", path.display())]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be made.
    #[error("eventfd")]
    Notify(#[from] NotifyError),
    /// A thread could not start or did not finish.
    #[error("worker thread")]
    Thread(#[source] std::io::Error),
}

/// Counters of a TAP port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapStats {
    /// The switch port's counters: `tx_frames` came from the host, `rx_frames`
    /// went to it; drops by reason.
    pub port: PortStats,
    /// Frames for the host dropped because the tap would have blocked (`EAGAIN`);
    /// also counted in `port.drops.no_rx_buffer`.
    pub queue_full: u64,
    /// Frames for the host the tap refused otherwise; also counted in
    /// `port.drops.no_rx_buffer`.
    pub write_errors: u64,
}

#[derive(Debug, Default)]
struct TapCounters {
    queue_full: AtomicU64,
    write_errors: AtomicU64,
}

/// The kernel's `struct ifreq` and the `TUNSETIFF` call: the only unsafe code of
/// the TAP port.
mod sys {
    use rustix::fd::AsFd;
    use rustix::ioctl::{Opcode, Updater, ioctl, opcode};

    /// `IFNAMSIZ`: interface name bytes including the terminating NUL.
    pub(super) const IFNAMSIZ: usize = 16;
    /// `IFF_TAP`: an Ethernet (layer 2) device.
    pub(super) const IFF_TAP: i16 = 0x0002;
    /// `IFF_NO_PI`: frames without the 4-byte packet-information prefix.
    pub(super) const IFF_NO_PI: i16 = 0x1000;

    /// `TUNSETIFF = _IOW('T', 202, int)` (`linux/if_tun.h`). The argument is a
    /// `struct ifreq` although the number encodes an `int`: a historical quirk
    /// the kernel keeps.
    const TUNSETIFF: Opcode = opcode::write::<rustix::ffi::c_int>(b'T', 202);
    const _: () = assert!(TUNSETIFF == 0x4004_54ca);

    /// `struct ifreq` (`linux/if.h`) with the `ifr_flags` member of its union;
    /// the rest of the 24-byte union is padding.
    #[repr(C)]
    pub(super) struct IfReq {
        pub(super) name: [u8; IFNAMSIZ],
        pub(super) flags: i16,
        _union_rest: [u8; 22],
    }
    const _: () = assert!(size_of::<IfReq>() == 40);

    impl IfReq {
        pub(super) fn new(name: [u8; IFNAMSIZ], flags: i16) -> IfReq {
            IfReq {
                name,
                flags,
                _union_rest: [0; 22],
            }
        }
    }

    /// `ioctl(fd, TUNSETIFF, req)`: creates (or attaches to) the interface named
    /// in `req` and writes the name the kernel chose back into it.
    pub(super) fn tun_set_iff(fd: impl AsFd, req: &mut IfReq) -> rustix::io::Result<()> {
        // SAFETY: TUNSETIFF reads and writes back exactly one `struct ifreq`
        // (40 bytes on Linux, checked above), which `IfReq` lays out with
        // `repr(C)`; `req` is a live exclusive reference for the whole call.
        unsafe { ioctl(fd, Updater::<TUNSETIFF, IfReq>::new(req)) }
    }
}

/// Checks `name` and lays it out as `ifr_name`.
fn if_name(name: &str) -> Result<[u8; sys::IFNAMSIZ], TapError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() < sys::IFNAMSIZ
        && !b.iter().any(|&c| c == 0 || c == b'/' || c.is_ascii_whitespace());
    if !ok {
        return Err(TapError::BadName(name.to_owned()));
    }
    let mut raw = [0; sys::IFNAMSIZ];
    raw[..b.len()].copy_from_slice(b);
    Ok(raw)
}

/// Opens `/dev/net/tun` and creates the interface in the calling thread's network
/// namespace; returns the fd and the interface's name.
fn create_tap(name: &str) -> Result<(OwnedFd, String), TapError> {
    use rustix::fs::{Mode, OFlags, open};
    let raw = if_name(name)?;
    let fd = open(
        "/dev/net/tun",
        OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| TapError::Open(e.into()))?;
    let mut req = sys::IfReq::new(raw, sys::IFF_TAP | sys::IFF_NO_PI);
    sys::tun_set_iff(&fd, &mut req).map_err(|e| TapError::Create {
        name: name.to_owned(),
        source: e.into(),
    })?;
    let len = req.name.iter().position(|&c| c == 0).unwrap_or(sys::IFNAMSIZ);
    let actual = String::from_utf8_lossy(&req.name[..len]).into_owned();
    Ok((fd, actual))
}

struct Running {
    stop: Arc<AtomicBool>,
    stop_fd: Arc<EventFdNotifier>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A TAP interface plugged into a port of a [`Switch`], served by its own worker
/// thread until dropped.
pub struct TapPort {
    name: String,
    switch: Arc<Switch>,
    port: Arc<Port>,
    counters: Arc<TapCounters>,
    running: Running,
}

impl std::fmt::Debug for TapPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapPort")
            .field("name", &self.name)
            .field("port", &self.port.id)
            .finish_non_exhaustive()
    }
}

impl TapPort {
    /// Creates TAP interface `name` in the calling thread's network namespace and
    /// plugs it into a new port of `switch`. A name with `%d` lets the kernel
    /// number it ([`Self::name`] says which).
    ///
    /// # Errors
    /// A bad name or MTU, no `/dev/net/tun` or no permission (CAP_NET_ADMIN), an
    /// interface of that name that is not a free TAP, or no eventfd or thread.
    pub fn open(name: &str, switch: &Arc<Switch>, cfg: TapConfig) -> Result<TapPort, TapError> {
        check_mtu(cfg)?;
        let (fd, name) = create_tap(name)?;
        TapPort::start(fd, name, switch, cfg)
    }

    /// As [`Self::open`], but creates the interface in the network namespace of
    /// `netns` (a namespace file: `/var/run/netns/NAME`, `/proc/PID/ns/net`). Only
    /// a short-lived helper thread enters the namespace; the caller's does not.
    ///
    /// # Errors
    /// As [`Self::open`], and [`TapError::Netns`] if the namespace cannot be
    /// opened or entered (CAP_SYS_ADMIN).
    pub fn open_in_netns(
        name: &str,
        netns: &Path,
        switch: &Arc<Switch>,
        cfg: TapConfig,
    ) -> Result<TapPort, TapError> {
        use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
        check_mtu(cfg)?;
        let ns_err = |source| TapError::Netns {
            path: netns.to_owned(),
            source,
        };
        let ns = std::fs::File::open(netns).map_err(ns_err)?;
        let (fd, name) = std::thread::scope(|s| {
            let helper = std::thread::Builder::new()
                .name("vio-tap-netns".into())
                .spawn_scoped(s, || {
                    move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
                        .map_err(|e| ns_err(e.into()))?;
                    create_tap(name)
                })
                .map_err(TapError::Thread)?;
            helper.join().unwrap_or_else(|_| {
                Err(TapError::Thread(std::io::Error::other(
                    "namespace helper panicked",
                )))
            })
        })?;
        TapPort::start(fd, name, switch, cfg)
    }

    fn start(fd: OwnedFd, name: String, switch: &Arc<Switch>, cfg: TapConfig) -> Result<TapPort, TapError> {
        let port = switch.attach(None)?;
        let counters = Arc::new(TapCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let stop_fd = match EventFdNotifier::new() {
            Ok(e) => Arc::new(e),
            Err(e) => {
                switch.detach(&port);
                return Err(e.into());
            }
        };
        let worker = Worker {
            tap: fd,
            port: port.clone(),
            switch: switch.clone(),
            counters: counters.clone(),
            stop: stop.clone(),
            stop_fd: stop_fd.clone(),
            max_frame: ETH_HDR_LEN + usize::from(cfg.mtu),
            budget: switch.config().budget.max(1),
            dead: false,
            batch: Batch::default(),
            pool: LocalPool::default(),
            inbox: Inbox::default(),
        };
        port.set_active(true);
        let thread = std::thread::Builder::new()
            .name(format!("vio-tap-{}", port.id.index()))
            .spawn(move || worker.run());
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                port.set_active(false);
                switch.detach(&port);
                return Err(TapError::Thread(e));
            }
        };
        tracing::debug!(interface = %name, port = %port.id, "TAP port up");
        Ok(TapPort {
            name,
            switch: switch.clone(),
            port,
            counters,
            running: Running {
                stop,
                stop_fd,
                thread: Some(thread),
            },
        })
    }

    /// The interface's name, as the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The switch port.
    pub fn port(&self) -> PortId {
        self.port.id
    }

    /// The port's counters.
    pub fn stats(&self) -> TapStats {
        TapStats {
            port: self.switch.stats(self.port.id).unwrap_or_default(),
            queue_full: self.counters.queue_full.load(Ordering::Relaxed),
            write_errors: self.counters.write_errors.load(Ordering::Relaxed),
        }
    }
}

fn check_mtu(cfg: TapConfig) -> Result<(), TapError> {
    if cfg.mtu < net::MIN_MTU {
        return Err(TapError::BadMtu(cfg.mtu));
    }
    Ok(())
}

impl Drop for TapPort {
    fn drop(&mut self) {
        // Frames for this port are dropped from now on.
        self.port.set_active(false);
        self.running.stop.store(true, Ordering::Release);
        if let Err(error) = self.running.stop_fd.notify() {
            tracing::error!(%error, "cannot signal a TAP worker to stop");
        }
        if let Some(t) = self.running.thread.take() {
            let _ = t.join();
        }
        // The worker owned the fd: the interface is gone now.
        self.switch.detach(&self.port);
    }
}

/// Longest the worker sleeps without looking at its stop flag.
const SLEEP: rustix::event::Timespec = rustix::event::Timespec {
    tv_sec: 0,
    tv_nsec: 100_000_000,
};

/// The state of a TAP port's worker thread.
struct Worker {
    tap: OwnedFd,
    port: Arc<Port>,
    switch: Arc<Switch>,
    counters: Arc<TapCounters>,
    stop: Arc<AtomicBool>,
    stop_fd: Arc<EventFdNotifier>,
    max_frame: usize,
    budget: usize,
    /// The tap failed for good (the interface was deleted): only wait for stop.
    dead: bool,
    /// Frames of the current read round, forwarded together.
    batch: Batch,
    /// Frame buffers, taken from and given back to the switch in batches.
    pool: LocalPool,
    /// Frames taken from the port's inbox and not yet written.
    inbox: Inbox,
}

impl Worker {
    fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            let more_in = self.read_round();
            let more_out = self.write_round();
            if !more_in && !more_out {
                self.sleep();
            }
        }
        self.drop_inbox();
        self.pool.flush(&self.switch);
    }

    /// Sleeps until the host sends a frame, a frame waits in the inbox, or stop.
    fn sleep(&mut self) {
        if !self.port.arm_wake() {
            return;
        }
        use rustix::event::{PollFd, PollFlags, poll};
        let mut fds = [
            PollFd::new(&*self.stop_fd, PollFlags::IN),
            PollFd::new(&self.port.wake, PollFlags::IN),
            PollFd::new(&self.tap, PollFlags::IN),
        ];
        // A dead tap would report an error forever: leave it out.
        let n = if self.dead { 1 } else { fds.len() };
        let slept = poll(&mut fds[..n], Some(&SLEEP));
        self.port.disarm_wake();
        if let Err(error) = slept {
            if error != Errno::INTR {
                tracing::error!(%error, "TAP worker poll failed");
            }
            return;
        }
        if !fds[1].revents().is_empty() {
            let _ = self.port.wake.take();
        }
    }

    /// The tap failed with `error`: stop serving it, and let the switch drop
    /// frames for this port.
    fn fail(&mut self, error: Errno, op: &'static str) {
        tracing::warn!(%error, op, port = %self.port.id, "TAP interface failed, port stopped");
        self.dead = true;
        self.port.set_active(false);
        self.port.clear(&self.switch);
        self.drop_inbox();
    }

    /// Returns the buffers of the frames taken from the inbox and not written.
    fn drop_inbox(&mut self) {
        while let Some(f) = self.inbox.pop() {
            self.pool.give(&self.switch, f.data);
        }
    }

    /// Hands up to a budget of the host's frames to the switch, as one batch (like
    /// a device's transmit round); returns whether more may wait.
    fn read_round(&mut self) -> bool {
        if self.dead {
            return false;
        }
        let more = self.read_batch();
        let forwarded = self.switch.forward_batch(&self.port, &mut self.batch);
        // Counted once forwarded: a peer's counters are final when this one is.
        self.port.count_tx_by(forwarded as u64);
        more
    }

    /// Reads up to a budget of frames into the batch; returns whether more may
    /// wait.
    fn read_batch(&mut self) -> bool {
        for _ in 0..self.budget {
            // One byte more than the largest frame: a read that fills it was
            // longer (a tap read returns the frame's full length even when the
            // buffer truncates it; this catches either behaviour).
            let mut data = self.pool.take(&self.switch, self.max_frame + 1);
            match rustix::io::read(&self.tap, &mut data) {
                Ok(n) if n > self.max_frame => {
                    self.pool.give(&self.switch, data);
                    self.port.count_drop(DropReason::OverMtu);
                }
                Ok(n) if n < ETH_HDR_LEN => {
                    self.pool.give(&self.switch, data);
                    self.port.count_drop(DropReason::Short);
                }
                Ok(n) => {
                    data.truncate(n);
                    let src = self.port.id.index();
                    self.batch.push(Frame {
                        data,
                        csum: None,
                        src,
                    });
                }
                Err(e) => {
                    self.pool.give(&self.switch, data);
                    match e {
                        Errno::AGAIN => return false,
                        Errno::INTR => {}
                        _ => {
                            self.fail(e, "read");
                            return false;
                        }
                    }
                }
            }
        }
        true
    }

    /// Writes up to a budget of inbox frames to the host; returns whether more
    /// may wait. Never waits for the tap: a frame it does not take now is dropped.
    fn write_round(&mut self) -> bool {
        let mut n = 0;
        while n < self.budget && !self.dead {
            if self.inbox.is_empty() {
                self.port.take_inbox(&mut self.inbox);
            }
            let Some(mut frame) = self.inbox.pop() else {
                return false;
            };
            n += 1;
            if let Some(at) = frame.csum {
                // No virtio-net header goes to the host: finish the checksum the
                // guest left partial (virtio 1.2 §5.1.6.2).
                complete_checksum(&mut frame.data, at);
            }
            let result = loop {
                match rustix::io::write(&self.tap, &frame.data) {
                    Err(Errno::INTR) => continue,
                    r => break r,
                }
            };
            self.pool.give(&self.switch, frame.data);
            match result {
                Ok(_) => self.port.count_rx(),
                Err(e) => {
                    self.port.count_drop(DropReason::NoRxBuffer);
                    if e == Errno::AGAIN {
                        self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, port = %self.port.id, "TAP write failed");
                        // The interface is gone (EBADFD, EIO after deletion).
                        if e == Errno::BADFD {
                            self.fail(e, "write");
                        }
                    }
                }
            }
        }
        n >= self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for bad in ["", "0123456789abcdef", "a/b", "a b", "a\0b"] {
            assert!(matches!(if_name(bad), Err(TapError::BadName(_))), "{bad:?}");
        }
        let raw = if_name("vio-tap%d").unwrap();
        assert_eq!(&raw[..10], b"vio-tap%d\0");
        assert_eq!(if_name("0123456789abcde").unwrap()[15], 0);
    }

    #[test]
    fn a_tiny_mtu_is_refused() {
        let sw = Switch::new(super::super::SwitchConfig::default());
        let err = TapPort::open("vio-t", &sw, TapConfig { mtu: 67 }).unwrap_err();
        assert!(matches!(err, TapError::BadMtu(67)));
        assert!(sw.stats(PortId(0)).is_none(), "no port left behind");
    }
}
