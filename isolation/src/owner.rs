//! The owner's side: a device process, started confined, spoken to over its channel.

use crate::wire::{
    Attack, Channel, CopyKind, CopyOp, Finding, GrantOp, MAX_COPY, Reply, Request, Slot, WireError,
};
use hypervisor::DomainId;
use std::os::fd::BorrowedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::time::Duration;
use transport_descriptors::CopyHelper;
use transport_grant::{GrantCopy, GrantService, addr};
use virtio_core::{DescSlot, ReadOp, Segment, WriteOp};

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

/// Who answers a device process's requests for buffer bytes.
#[derive(Debug, Clone, Copy)]
pub enum Broker<'a> {
    /// Model 3: the copy helper, which checks each copy against the chains the
    /// device owns.
    Copy(&'a CopyHelper),
    /// Model 4: grant copies for the device's domain, checked by the grant table.
    Grant(&'a GrantBroker),
}

/// Model 4's broker: performs a device process's grant copies as the hypervisor
/// would for the device's domain. The device names a grant reference and an
/// offset (the descriptor's address); the grant table alone decides (state,
/// domain, permission, window), exactly as for an in-process backend.
#[derive(Debug, Clone)]
pub struct GrantBroker {
    service: Arc<GrantService>,
    granter: DomainId,
    grantee: DomainId,
}

impl GrantBroker {
    /// Copies for `grantee` (the device's domain) from and to `granter`'s grants.
    pub fn new(service: Arc<GrantService>, granter: DomainId, grantee: DomainId) -> GrantBroker {
        GrantBroker {
            service,
            granter,
            grantee,
        }
    }

    /// Performs `op`, or says why not.
    fn perform(&self, op: GrantOp) -> Result<Vec<u8>, String> {
        let a = addr::decode(op.addr).map_err(|e| e.to_string())?;
        let at = u64::from(a.offset) + u64::from(op.offset);
        let too_large = |n: usize| format!("a copy of {n} bytes exceeds {MAX_COPY}");
        let (granter, gref) = (self.granter, a.gref);
        match op.kind {
            CopyKind::Check => self
                .service
                .resolve(
                    granter,
                    self.grantee,
                    gref,
                    u64::from(a.offset),
                    u64::from(op.len),
                    op.writable,
                )
                .map(|_| Vec::new()),
            CopyKind::Read(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > MAX_COPY {
                    return Err(too_large(n));
                }
                let mut dst = vec![0u8; n];
                self.service
                    .copy(
                        self.grantee,
                        &mut [GrantCopy::FromGrant {
                            granter,
                            gref,
                            offset: at,
                            dst: &mut dst,
                        }],
                    )
                    .map(|()| dst)
            }
            CopyKind::Write(src) => {
                if src.len() > MAX_COPY {
                    return Err(too_large(src.len()));
                }
                self.service
                    .copy(
                        self.grantee,
                        &mut [GrantCopy::ToGrant {
                            granter,
                            gref,
                            offset: at,
                            src: &src,
                        }],
                    )
                    .map(|()| Vec::new())
            }
        }
        .map_err(|e| e.to_string())
    }
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
        self.call_inner(req, fds, None)
    }

    /// As [`Self::call`], for a model-3 device: while it serves the request, its
    /// [`Reply::Copy`] requests are answered by `helper`, which checks each against
    /// the chains the device owns (the guest's descriptor table says where the bytes
    /// are, the device only names the descriptor).
    pub fn call_brokered(&self, req: &Request, helper: &CopyHelper) -> Result<Reply, OwnerError> {
        self.call_inner(req, &[], Some(Broker::Copy(helper)))
    }

    /// As [`Self::call`], for a model-4 device: its [`Reply::GrantCopy`] requests are
    /// performed by `broker` for the device's domain.
    pub fn call_granted(&self, req: &Request, broker: &GrantBroker) -> Result<Reply, OwnerError> {
        self.call_inner(req, &[], Some(Broker::Grant(broker)))
    }

    fn call_inner(
        &self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
        broker: Option<Broker<'_>>,
    ) -> Result<Reply, OwnerError> {
        self.chan.send(req, fds)?;
        loop {
            let (reply, fds): (Reply, _) = self.chan.recv()?;
            if !fds.is_empty() {
                return Err(OwnerError::UnexpectedFds(fds.len()));
            }
            match reply {
                Reply::Copy(op) => {
                    let answer = match broker {
                        Some(Broker::Copy(h)) => copy_for(h, op),
                        _ => Err("this device has no copy helper".to_string()),
                    };
                    if let Err(why) = &answer {
                        tracing::debug!(%why, "device copy refused");
                    }
                    self.chan.send(&Request::Copied(answer), &[])?;
                }
                Reply::GrantCopy(op) => {
                    let answer = match broker {
                        Some(Broker::Grant(g)) => g.perform(op),
                        _ => Err("this device has no grants".to_string()),
                    };
                    if let Err(why) = &answer {
                        tracing::debug!(%why, "device grant copy refused");
                    }
                    self.chan.send(&Request::Copied(answer), &[])?;
                }
                Reply::Failed(why) => return Err(OwnerError::Device(why)),
                r => return Ok(r),
            }
        }
    }

    /// Runs `attack` and returns its findings.
    pub fn attack(&self, attack: Attack) -> Result<Vec<Finding>, OwnerError> {
        self.attack_inner(attack, None)
    }

    /// Runs `attack` against a model-3 owner whose copies `helper` checks.
    pub fn attack_brokered(&self, attack: Attack, helper: &CopyHelper) -> Result<Vec<Finding>, OwnerError> {
        self.attack_inner(attack, Some(Broker::Copy(helper)))
    }

    /// Runs `attack` against a model-4 owner whose grant copies `broker` performs.
    pub fn attack_granted(&self, attack: Attack, broker: &GrantBroker) -> Result<Vec<Finding>, OwnerError> {
        self.attack_inner(attack, Some(Broker::Grant(broker)))
    }

    fn attack_inner(&self, attack: Attack, broker: Option<Broker<'_>>) -> Result<Vec<Finding>, OwnerError> {
        match self.call_inner(&Request::Attack(attack), &[], broker)? {
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

/// Performs a model-3 device's copy request with the copy helper, or says why not.
/// The segment given to the helper carries no address or length: the helper takes
/// both from the guest's descriptor table (HOSTILE 39: the device names a descriptor,
/// it never names memory).
fn copy_for(helper: &CopyHelper, op: CopyOp) -> Result<Vec<u8>, String> {
    let slot = match op.slot {
        Slot::Table(i) => DescSlot::Table(i),
        Slot::Indirect(i) => DescSlot::Indirect(i),
    };
    let seg = Segment::new(0, 0, op.writable, op.head, slot);
    let too_large = |n: usize| format!("a copy of {n} bytes exceeds {MAX_COPY}");
    match op.kind {
        CopyKind::Check => helper.check(op.queue, &seg).map(|()| Vec::new()),
        CopyKind::Read(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > MAX_COPY {
                return Err(too_large(n));
            }
            let mut buf = vec![0u8; n];
            let mut ops = [ReadOp {
                seg,
                offset: op.offset,
                dst: &mut buf,
            }];
            helper.read(op.queue, &mut ops).map(|()| buf)
        }
        CopyKind::Write(data) => {
            if data.len() > MAX_COPY {
                return Err(too_large(data.len()));
            }
            let ops = [WriteOp {
                seg,
                offset: op.offset,
                src: &data,
            }];
            helper.write(op.queue, &ops).map(|()| Vec::new())
        }
    }
    .map_err(|e| e.to_string())
}

/// The signal that ended a process, if one did.
pub fn killed_by(status: &ExitStatus) -> Option<i32> {
    status.signal()
}
