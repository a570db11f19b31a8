//! The owner's side: a device process, started confined, spoken to over its channel.

use crate::wire::{Attack, Channel, Finding, Reply, Request, WireError};
use std::os::fd::BorrowedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::Duration;

/// How long the owner waits for one reply before it gives up on the device (a
/// hostile device must not hang its owner; this is a guard, not a measurement).
pub const REPLY_LIMIT: Duration = Duration::from_secs(10);

/// Why talking to a device process failed.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// Starting or waiting for the process failed.
    #[error("device process could not be started or reaped")]
    Process(#[source] std::io::Error),
    /// The channel failed.
    #[error("channel to the device process failed")]
    Wire(#[from] WireError),
    /// The device refused or failed the request.
    #[error("device process failed a request: {0}")]
    Device(String),
    /// The device sent descriptors, which it has no business doing.
    #[error("device process sent {0} file descriptors")]
    UnexpectedFds(usize),
}

/// A device process and the owner's end of its channel. Dropping it kills and reaps
/// the process.
#[derive(Debug)]
pub struct DeviceProcess {
    child: Option<Child>,
    chan: Channel,
}

impl DeviceProcess {
    /// Starts `program` (the `vio-isolation-device` binary, or anything that speaks
    /// the [`wire`](crate::wire) protocol on its standard input) confined: no
    /// capabilities, `no_new_privs`, nothing inherited but its channel; the owner
    /// becomes non-dumpable.
    pub fn spawn(program: &Path) -> Result<DeviceProcess, OwnerError> {
        let (chan, theirs) = Channel::pair()?;
        chan.set_recv_limit(REPLY_LIMIT)?;
        let child = crate::spawn::confined(program, &[], theirs).map_err(OwnerError::Process)?;
        tracing::debug!(pid = child.id(), "device process started");
        Ok(DeviceProcess {
            child: Some(child),
            chan,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `req` with `fds` and waits for the reply. A [`Reply::Failed`] becomes
    /// [`OwnerError::Device`].
    pub fn call(&self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Reply, OwnerError> {
        self.chan.send(req, fds)?;
        let (reply, fds): (Reply, _) = self.chan.recv()?;
        if !fds.is_empty() {
            return Err(OwnerError::UnexpectedFds(fds.len()));
        }
        match reply {
            Reply::Failed(why) => Err(OwnerError::Device(why)),
            r => Ok(r),
        }
    }

    /// Runs `attack` and returns its findings.
    pub fn attack(&self, attack: Attack) -> Result<Vec<Finding>, OwnerError> {
        match self.call(&Request::Attack(attack), &[])? {
            Reply::Findings(f) => Ok(f),
            other => Err(OwnerError::Device(format!("unexpected reply {other:?}"))),
        }
    }

    /// Sends an attack after which the process is expected to die, and returns how it
    /// ended. A process that answers instead is reported as [`OwnerError::Device`].
    pub fn attack_fatal(mut self, attack: Attack) -> Result<ExitStatus, OwnerError> {
        self.chan.send(&Request::Attack(attack), &[])?;
        match self.chan.recv::<Reply>() {
            Err(WireError::Closed) => {}
            Ok((reply, _)) => return Err(OwnerError::Device(format!("survived with {reply:?}"))),
            Err(e) => return Err(e.into()),
        }
        let mut child = self.child.take().ok_or(OwnerError::Device("no process".into()))?;
        child.wait().map_err(OwnerError::Process)
    }

    /// Closes the channel and waits for the process to exit.
    pub fn finish(mut self) -> Result<ExitStatus, OwnerError> {
        let mut child = self.child.take().ok_or(OwnerError::Device("no process".into()))?;
        drop(self);
        child.wait().map_err(OwnerError::Process)
    }
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill() {
                tracing::warn!(error = %e, "killing the device process failed");
            }
            let _ = child.wait();
        }
    }
}

/// The signal that ended a process, if one did.
pub fn killed_by(status: &ExitStatus) -> Option<i32> {
    status.signal()
}
