//! The control queue's side of the worker (CTRL_VQ, virtio 1.2 §5.1.6.5): reading
//! and answering commands, and the receive filter they change.

use super::{CtrlQueue, MAC_TABLE_ENTRIES, Worker};
use std::sync::PoisonError;
use virtio_core::DeviceMemory;
use virtio_core::net::{self, CTRL_DATA_MAX, CtrlAck, CtrlCommand, VirtioNetCtrlHdr};
use virtio_core::notify::Notify;
use virtio_core::ring::Chain;
use virtio_core::ring::queue::DeviceQueueError;

/// The receive filter (CTRL_RX, §5.1.6.5.1-2).
#[derive(Debug)]
pub(super) struct RxFilter {
    /// CTRL_RX negotiated; without it every frame passes.
    enabled: bool,
    promisc: bool,
    allmulti: bool,
    mac: [u8; 6],
    unicast: Vec<[u8; 6]>,
    multicast: Vec<[u8; 6]>,
    /// The last table held more unicast (multicast) addresses than kept.
    all_unicast: bool,
    all_multicast: bool,
}

impl RxFilter {
    pub(super) fn new(mac: [u8; 6], enabled: bool) -> Self {
        RxFilter {
            enabled,
            promisc: true,
            allmulti: false,
            mac,
            unicast: Vec::new(),
            multicast: Vec::new(),
            all_unicast: false,
            all_multicast: false,
        }
    }

    /// Turns filtering on (CTRL_RX negotiated with a control queue) or off (every
    /// frame passes), keeping the modes and tables for when it is on.
    pub(super) fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// Whether a frame to `dst` reaches the guest.
    pub(super) fn accepts(&self, dst: &[u8]) -> bool {
        if !self.enabled || self.promisc {
            return true;
        }
        let Ok(dst) = <[u8; 6]>::try_from(dst) else {
            return false;
        };
        if dst == [0xff; 6] {
            true
        } else if dst[0] & 1 != 0 {
            self.allmulti || self.all_multicast || self.multicast.contains(&dst)
        } else {
            dst == self.mac || self.all_unicast || self.unicast.contains(&dst)
        }
    }

    /// Replaces the tables; a list longer than [`MAC_TABLE_ENTRIES`] accepts its
    /// whole kind instead.
    fn set_tables(&mut self, unicast: net::MacList<'_>, multicast: net::MacList<'_>) {
        let set = |table: &mut Vec<[u8; 6]>, all: &mut bool, list: net::MacList<'_>| {
            table.clear();
            *all = list.len() > MAC_TABLE_ENTRIES;
            if !*all {
                table.extend(list.iter());
            }
        };
        set(&mut self.unicast, &mut self.all_unicast, unicast);
        set(&mut self.multicast, &mut self.all_multicast, multicast);
    }
}

impl<M: DeviceMemory> Worker<M> {
    /// Serves up to a budget of control commands; returns whether more may wait.
    pub(super) fn ctrl_round(&mut self) -> bool {
        let Some(mut ctrl) = self.ctrl.take() else {
            return false;
        };
        let more = !ctrl.broken && self.serve_ctrl(&mut ctrl);
        self.ctrl = Some(ctrl);
        more
    }

    fn serve_ctrl(&mut self, ctrl: &mut CtrlQueue<M>) -> bool {
        ctrl.ring.disable_notifications();
        let mut n = 0;
        while n < self.budget {
            match ctrl.ring.pop() {
                Ok(Some(chain)) => {
                    let len = self.command(&chain, ctrl.ring.memory());
                    // Each command is returned before the next is looked at, so a
                    // driver's commands take effect in order.
                    if let Err(error) = ctrl.ring.add_used(chain.head(), len) {
                        tracing::error!(%error, "returning a control command failed");
                    }
                    n += 1;
                }
                Ok(None) => break,
                Err(DeviceQueueError::NeedsReset(fault)) => {
                    tracing::warn!(port = %self.ctx.port.id, %fault, "control queue needs reset");
                    ctrl.broken = true;
                    break;
                }
                // The ring already returned the bad chain.
                Err(error) => {
                    tracing::debug!(port = %self.ctx.port.id, %error, "control chain rejected");
                    n += 1;
                }
            }
        }
        if n > 0 && ctrl.ring.needs_notification() {
            let _ = ctrl.irq.notify();
        }
        n >= self.budget || ctrl.ring.enable_notifications()
    }

    /// Executes one control command; returns the used length (1 with the ack
    /// written, 0 if the chain has no room for it).
    fn command(&mut self, chain: &Chain, mem: &M) -> u32 {
        let ack = self.ack(chain, mem);
        if ack != CtrlAck::Ok {
            tracing::debug!(port = %self.ctx.port.id, "control command refused");
        }
        if chain.writable_len() == 0 {
            return 0;
        }
        match chain.writer(mem).write_all(&[ack.raw()]) {
            Ok(()) => 1,
            Err(error) => {
                tracing::debug!(port = %self.ctx.port.id, %error, "control ack not writable");
                0
            }
        }
    }

    /// Reads, checks and applies a command; returns its `ack`.
    fn ack(&mut self, chain: &Chain, mem: &M) -> CtrlAck {
        // Only a 1-byte ack: no command this device implements has a result.
        if chain.writable_len() != 1 {
            return CtrlAck::Err;
        }
        let len = chain.readable_len() as usize;
        let hdr_len = size_of::<VirtioNetCtrlHdr>();
        // Checked on the descriptor lengths, before anything is read or allocated.
        if !(hdr_len..=hdr_len + CTRL_DATA_MAX).contains(&len) {
            return CtrlAck::Err;
        }
        self.cmd.clear();
        self.cmd.resize(len, 0);
        if chain.reader(mem).read_exact(&mut self.cmd).is_err() {
            return CtrlAck::Err;
        }
        let cmd = std::mem::take(&mut self.cmd);
        // The byte format is the wire module's (virtio_core::net::wire); what the
        // command does here is this device's policy.
        let ack = match CtrlCommand::parse_bytes(&cmd, self.ctx.features) {
            Ok(c) => self.apply(c),
            Err(error) => {
                tracing::debug!(port = %self.ctx.port.id, %error, "control command invalid");
                CtrlAck::Err
            }
        };
        self.cmd = cmd;
        ack
    }

    fn apply(&mut self, cmd: CtrlCommand<'_>) -> CtrlAck {
        match cmd {
            CtrlCommand::Promisc(on) => self.filter.promisc = on,
            CtrlCommand::AllMulti(on) => self.filter.allmulti = on,
            CtrlCommand::MacTable { unicast, multicast } => self.filter.set_tables(unicast, multicast),
            CtrlCommand::MacAddr(mac) => {
                if mac[0] & 1 != 0 {
                    return CtrlAck::Err;
                }
                // A bound port keeps its address (HOSTILE 33): frames from another
                // would be dropped, so the driver is told now.
                if self.ctx.port.bound().is_some_and(|b| b != mac) {
                    return CtrlAck::Err;
                }
                self.filter.mac = mac;
                *self.shared.mac.lock().unwrap_or_else(PoisonError::into_inner) = mac;
            }
            CtrlCommand::VqPairs(n) => {
                // Only pairs the driver configured (§5.1.6.5.5: it "MUST configure
                // the virtqueues before enabling them").
                let n = usize::from(n);
                if n > self.pairs.len() {
                    return CtrlAck::Err;
                }
                self.set_active(n);
            }
        }
        CtrlAck::Ok
    }
}
