//! Reconnecting to a back-end that went away ([`VhostUserOptions::reconnect`]), the
//! way QEMU does with a chardev's `reconnect-ms`.
//!
//! A thread watches the socket: between requests the back-end has nothing to say,
//! so a socket that polls hung up (or readable) means it is gone. The thread then
//! connects again to the same path every `reconnect` interval, outside the lock, and
//! once a new back-end answers it replays the session under the lock: features
//! (the new back-end must offer every one the lost one had agreed to), protocol
//! features, queue count, owner, then, as far as the device had come, SET_FEATURES
//! and the memory table, the inflight buffer the lost back-end made (SET_INFLIGHT_FD:
//! not a new one, whose empty regions would forget what the lost back-end held),
//! each ring's registers and eventfds, and the enables. A split ring restarts at
//! the used index in guest memory, as QEMU's does after a lost back-end; the
//! back-end's inflight recovery then puts it after the chains the lost one held
//! and resubmits those. The driver's eventfds stay the same, so it notices nothing
//! but the pause. A replay that fails is retried on the next connection.
//!
//! [`VhostUserOptions::reconnect`]: crate::VhostUserOptions::reconnect

use crate::channel::Channel;
use crate::error::VhostUserError;
use crate::protocol::FrontendReq;
use crate::transport::{F_PROTOCOL_FEATURES, Inner, Shared, handshake};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use vhost::vhost_user::message::VhostUserVringState;
use virtio_core::ring::areas::RingFormat;
use virtio_core::ring::queue::fresh_position;
use virtio_core::status::DeviceStatus;
use vm_memory::ByteValued;

/// How often the socket is looked at.
const WATCH: Duration = Duration::from_millis(50);

/// The monitor thread's body: watches, reconnects and replays until `stop`.
pub(crate) fn monitor(inner: &Mutex<Inner>, s: &Shared, stop: &AtomicBool, every: Duration) {
    let lock = || inner.lock().unwrap_or_else(PoisonError::into_inner);
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(WATCH);
        let lost = {
            let st = lock();
            st.broken.is_none() && st.channel.probe().is_err()
        };
        if !lost {
            continue;
        }
        tracing::warn!(path = %s.path.display(), "vhost-user back-end went away; reconnecting");
        let channel = loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            match Channel::connect(&s.path, s.opts.timeout) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(every),
            }
        };
        let mut st = lock();
        match restore(&mut st, s, channel) {
            Ok(()) => tracing::info!("vhost-user session restored on a new back-end"),
            Err(error) => tracing::warn!(%error, "restoring the session failed; trying again"),
        }
    }
}

/// Replays the session on `ch`; on success it becomes the transport's channel.
fn restore(st: &mut Inner, s: &Shared, mut ch: Channel) -> Result<(), VhostUserError> {
    let acked = s.backend.acked_protocol_features;
    let (features, _, _, queues) = handshake(&mut ch, |offered| {
        if offered.contains(acked) {
            Ok(acked)
        } else {
            Err(VhostUserError::Missing(
                "every protocol feature the lost back-end had agreed to",
            ))
        }
    })?;
    let want = st.driver_features | F_PROTOCOL_FEATURES;
    if features & want != want {
        return Err(VhostUserError::Missing(
            "every feature the lost back-end had agreed to",
        ));
    }
    if queues != s.backend.queues {
        return Err(VhostUserError::BadQueueCount(u64::from(queues)));
    }
    let status = st.machine.status();
    if status.contains(DeviceStatus::FEATURES_OK) {
        s.features_and_memory(&mut ch, st.driver_features)?;
        s.inflight_buffer(&mut ch, &mut st.inflight)?;
    }
    for (index, slot) in (0u16..).zip(st.queues.iter_mut()) {
        let Some((format, size, addrs)) = slot.ring else {
            continue;
        };
        let at = match format {
            // The used index the driver sees, as QEMU restarts a ring whose
            // back-end was lost; the back-end's inflight recovery does the rest.
            RingFormat::Split => {
                let mut idx = [0u8; 2];
                s.memory
                    .read(addrs.used + 2, &mut idx)
                    .map_err(|_| VhostUserError::Missing("the used ring in guest memory"))?;
                u16::from_le_bytes(idx)
            }
            // Packed positions live in the inflight region only.
            RingFormat::Packed => fresh_position(format),
        };
        s.start_queue(&mut ch, slot, (index, at), (format, size), addrs)?;
    }
    if status.contains(DeviceStatus::DRIVER_OK) {
        for (index, slot) in (0u32..).zip(&st.queues) {
            if slot.set_up {
                let on = VhostUserVringState::new(index, 1);
                ch.send(FrontendReq::SET_VRING_ENABLE, on.as_slice(), &[])?;
            }
        }
    }
    st.channel = ch;
    Ok(())
}
