//! The queue interface: the driver's and the device's side of one virtqueue,
//! whatever its ring format, chosen once from the negotiated features.
//!
//! Drivers, devices, transports and daemons hold a [`DriverRing`] or a
//! [`DeviceRing`] and never name a ring format: the format is the ring module's
//! business (virtio 1.2 §2.7 split, §2.8 packed, selected by `VIRTIO_F_RING_PACKED`).
//! Each is an enum over the formats rather than a trait object or a type parameter:
//! one predictable branch per call, no allocation, and callers keep one concrete
//! type whatever was negotiated.
//!
//! Both formats are served here, each with and without `VIRTIO_F_IN_ORDER` (the
//! device side holds back completions until every chain taken before them is
//! done, so no device needs to finish work in order); which devices, drivers and
//! models negotiate them is theirs to say ([`RING_FEATURES`] is all of them).
//! The ring memory comes as a [`RingMemory`] whatever the format: the three
//! areas of §2.6 (descriptor area, driver area, device area).
//!
//! ```
//! # #[cfg(feature = "test-utils")] {
//! use virtio_core::features::Features;
//! use virtio_core::ring::queue::{DeviceRing, DriverRing};
//! use virtio_core::test_utils::{Arena, IdentityShare};
//! use virtio_core::GuestBuf;
//!
//! let arena = Arena::new(0x10_0000, 1 << 20).unwrap();
//! let (_, ring) = arena.alloc_split_ring(8).unwrap();
//! let f = Features::VERSION_1;
//! let share = IdentityShare::new(arena.clone(), 8);
//! let mut driver = DriverRing::new(8, ring.clone(), share, f).unwrap();
//! let mut device = DeviceRing::new(8, &ring, arena.clone(), f).unwrap();
//! let buf = arena.alloc(16, 16).unwrap();
//! driver.add(&[GuestBuf::new(buf, 16)], &[], 7u32).unwrap();
//! let chain = device.pop().unwrap().unwrap();
//! device.add_used(chain.head(), 0).unwrap();
//! assert_eq!(driver.pop_used().unwrap().unwrap().token, 7);
//! # }
//! ```

use crate::access::DeviceMemory;
use crate::features::Features;
use crate::ring::areas::RingFormat;
use crate::ring::chain::Chain;
use crate::ring::inflight::{InflightError, InflightRegion};
use crate::ring::packed::{PackedDevice, PackedDriver};
use crate::ring::split::{SplitDevice, SplitDriver};
use crate::share::{DriverShare, GuestBuf};

// What both formats share: errors, what a used request carries, the ring memory.
pub use crate::ring::areas::RingMemory;
pub use crate::ring::split::{
    AddError, DeviceQueueError, DriverQueueError, Rejected, RingFault, RingSetupError, Used, UsedError,
};

/// Every device-independent feature the rings implement on both sides: what a
/// device built on [`DeviceRing`] can offer whatever its type, and a driver built
/// on [`DriverRing`] can accept (virtio 1.2 §6). `VIRTIO_F_NOTIFICATION_DATA`
/// also needs a transport that carries it
/// ([`Transport::carries_notification_data`](crate::transport::Transport::carries_notification_data)).
pub const RING_FEATURES: Features = Features::VERSION_1
    .union(Features::INDIRECT_DESC)
    .union(Features::EVENT_IDX)
    .union(Features::RING_PACKED)
    .union(Features::IN_ORDER)
    .union(Features::NOTIFICATION_DATA);

/// The driver's side of one virtqueue. See the module docs.
pub enum DriverRing<S: DriverShare, T> {
    /// A split ring (§2.7).
    Split(SplitDriver<S, T>),
    /// A packed ring (§2.8).
    Packed(PackedDriver<S, T>),
}

/// The device's side of one virtqueue. See the module docs.
pub enum DeviceRing<M> {
    /// A split ring (§2.7).
    Split(SplitDevice<M>),
    /// A packed ring (§2.8).
    Packed(PackedDevice<M>),
}

/// The same method on whichever format `$ring` holds.
macro_rules! each {
    ($ring:expr, $r:ident => $e:expr) => {
        match $ring {
            Self::Split($r) => $e,
            Self::Packed($r) => $e,
        }
    };
}

impl<S: DriverShare, T> std::fmt::Debug for DriverRing<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self {
            DriverRing::Split(_) => "DriverRing::Split",
            DriverRing::Packed(_) => "DriverRing::Packed",
        };
        f.debug_struct(format)
            .field("size", &self.size())
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

impl<M: DeviceMemory> std::fmt::Debug for DeviceRing<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self {
            DeviceRing::Split(_) => "DeviceRing::Split",
            DeviceRing::Packed(_) => "DeviceRing::Packed",
        };
        f.debug_struct(format)
            .field("size", &self.size())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// Where a fresh queue of `format` starts, in the encoding of
/// [`DeviceRing::starting_at`] and [`DeviceRing::next_avail`]: slot 0, with wrap
/// counter 1 for a packed ring (§2.8.1).
pub fn fresh_position(format: RingFormat) -> u16 {
    match format {
        RingFormat::Split => 0,
        RingFormat::Packed => 1 << 15,
    }
}

/// A queue's position as vhost-user's SET_VRING_BASE and GET_VRING_BASE carry it
/// (vhost-user spec, "Starting and stopping rings"): for a split ring the available
/// index; for a packed ring the available position with its wrap counter in bits
/// 0-15 and the used one in bits 16-31, the same for a queue with nothing in flight,
/// the only kind that changes hands here.
pub fn vring_base(format: RingFormat, position: u16) -> u32 {
    let p = u32::from(position);
    match format {
        RingFormat::Split => p,
        RingFormat::Packed => p | (p << 16),
    }
}

/// The position in a vring base ([`vring_base`]), if a device can resume there: a
/// split index fits 16 bits; a packed ring's used position equals its available
/// one (nothing in flight).
pub fn position_in_vring_base(format: RingFormat, base: u32) -> Option<u16> {
    let avail = u16::try_from(base & 0xffff).ok()?;
    let fits = match format {
        RingFormat::Split => base >> 16 == 0,
        RingFormat::Packed => base >> 16 == base & 0xffff,
    };
    fits.then_some(avail)
}

impl<S: DriverShare, T> DriverRing<S, T> {
    /// Sets up the driver side of a queue of `size` entries over `ring` (the
    /// driver's own memory: it initialises every area) in the format `features`
    /// negotiated.
    pub fn new(size: u16, ring: RingMemory, share: S, features: Features) -> Result<Self, RingSetupError> {
        Ok(match RingFormat::of(features) {
            RingFormat::Split => DriverRing::Split(SplitDriver::new(size, ring, share, features)?),
            RingFormat::Packed => DriverRing::Packed(PackedDriver::new(size, ring, share, features)?),
        })
    }

    /// Queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        each!(self, r => r.size())
    }

    /// Descriptors free for new requests.
    #[inline]
    pub fn num_free(&self) -> u16 {
        each!(self, r => r.num_free())
    }

    /// Requests made available and not yet returned.
    #[inline]
    pub fn outstanding(&self) -> u16 {
        each!(self, r => r.outstanding())
    }

    /// Whether the device broke the ring's rules; the queue then needs a reset.
    #[inline]
    pub fn is_broken(&self) -> bool {
        each!(self, r => r.is_broken())
    }

    /// The sharing model's state for this queue.
    #[inline]
    pub fn share(&mut self) -> &mut S {
        each!(self, r => r.share())
    }

    /// Makes a request of device-readable `out` and device-writable `ins` buffers
    /// available, under `token`; returns its head. The device may take it at once:
    /// [`kick_prepare`](Self::kick_prepare) only decides whether to notify.
    #[inline]
    pub fn add(&mut self, out: &[GuestBuf], ins: &[GuestBuf], token: T) -> Result<u16, Rejected<T>> {
        each!(self, r => r.add(out, ins, token))
    }

    /// Whether the device wants an available-buffer notification for what was
    /// added since the last call.
    #[inline]
    pub fn kick_prepare(&mut self) -> bool {
        each!(self, r => r.kick_prepare())
    }

    /// [`Self::kick_prepare`], giving [`Self::next_avail`] if a notification is
    /// due: what a driver sends with it when `VIRTIO_F_NOTIFICATION_DATA` was
    /// negotiated.
    #[inline]
    pub fn kick_due(&mut self) -> Option<u16> {
        self.kick_prepare().then(|| self.next_avail())
    }

    /// Where the next request will be made available, as notification data
    /// carries it (virtio 1.2 §2.9): the available index of a split ring, the slot
    /// with the driver's wrap counter in bit 15 of a packed one.
    #[inline]
    pub fn next_avail(&self) -> u16 {
        each!(self, r => r.next_avail())
    }

    /// Takes the next used request, if any, after checking it.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<Used<T>>, DriverQueueError> {
        each!(self, r => r.pop_used())
    }

    /// Asks the device not to send used-buffer notifications.
    #[inline]
    pub fn disable_notifications(&mut self) {
        each!(self, r => r.disable_notifications())
    }

    /// Asks for a notification at the next used buffer; `false` if one is already
    /// there (pop it instead of waiting).
    #[inline]
    pub fn enable_notifications(&mut self) -> bool {
        each!(self, r => r.enable_notifications())
    }

    /// Asks for a notification once most outstanding requests are used; `false` if
    /// used buffers are already there.
    #[inline]
    pub fn enable_notifications_delayed(&mut self) -> bool {
        each!(self, r => r.enable_notifications_delayed())
    }

    /// After the device was reset: takes back every outstanding request and
    /// returns their tokens.
    #[inline]
    pub fn reset(&mut self) -> Vec<T> {
        each!(self, r => r.reset())
    }
}

impl<M: DeviceMemory> DeviceRing<M> {
    /// Activates the device side of a queue of `size` entries over `ring`,
    /// reaching descriptor memory through `mem`, in the format `features`
    /// negotiated.
    pub fn new(size: u16, ring: &RingMemory, mem: M, features: Features) -> Result<Self, RingSetupError> {
        Ok(match RingFormat::of(features) {
            RingFormat::Split => DeviceRing::Split(SplitDevice::new(size, ring, mem, features)?),
            RingFormat::Packed => DeviceRing::Packed(PackedDevice::new(size, ring, mem, features)?),
        })
    }

    /// See [`SplitDevice::with_reject_status`].
    #[inline]
    #[must_use]
    pub fn with_reject_status(self, status: u8) -> Self {
        match self {
            DeviceRing::Split(r) => DeviceRing::Split(r.with_reject_status(status)),
            DeviceRing::Packed(r) => DeviceRing::Packed(r.with_reject_status(status)),
        }
    }

    /// Starts where an earlier device instance stopped (vhost-user's
    /// SET_VRING_BASE); see [`SplitDevice::starting_at`].
    #[inline]
    #[must_use]
    pub fn starting_at(self, next_avail: u16) -> Self {
        match self {
            DeviceRing::Split(r) => DeviceRing::Split(r.starting_at(next_avail)),
            DeviceRing::Packed(r) => DeviceRing::Packed(r.starting_at(next_avail)),
        }
    }

    /// Tracks the chains in flight in `region`, which outlives this instance, and
    /// recovers what an earlier instance left there; see
    /// [`SplitDevice::with_inflight`].
    ///
    /// # Errors
    /// A region that does not add up, or one laid out for the other format.
    pub fn with_inflight(self, region: InflightRegion) -> Result<Self, InflightError> {
        match self {
            DeviceRing::Split(r) => Ok(DeviceRing::Split(r.with_inflight(region)?)),
            DeviceRing::Packed(r) => Ok(DeviceRing::Packed(r.with_inflight(region)?)),
        }
    }

    /// Where the device goes on (vhost-user's GET_VRING_BASE).
    #[inline]
    pub fn next_avail(&self) -> u16 {
        each!(self, r => r.next_avail())
    }

    /// Queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        each!(self, r => r.size())
    }

    /// How the device reaches descriptor memory.
    #[inline]
    pub fn memory(&self) -> &M {
        each!(self, r => r.memory())
    }

    /// The fault that put the queue in needs-reset, if any.
    #[inline]
    pub fn fault(&self) -> Option<RingFault> {
        each!(self, r => r.fault())
    }

    /// Chains popped and not yet returned.
    #[inline]
    pub fn in_flight(&self) -> usize {
        each!(self, r => r.in_flight())
    }

    /// The next available chain, validated (HOSTILE 1-12), if any.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<Chain>, DeviceQueueError> {
        each!(self, r => r.pop())
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    #[inline]
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), UsedError> {
        each!(self, r => r.add_used(head, len))
    }

    /// Returns several chains, published together.
    #[inline]
    pub fn add_used_batch(&mut self, used: impl IntoIterator<Item = (u16, u32)>) -> Result<(), UsedError> {
        each!(self, r => r.add_used_batch(used))
    }

    /// Whether the driver wants a used-buffer notification for what was returned
    /// since the last call.
    #[inline]
    pub fn needs_notification(&mut self) -> bool {
        each!(self, r => r.needs_notification())
    }

    /// Asks the driver not to send available-buffer notifications.
    #[inline]
    pub fn disable_notifications(&mut self) {
        each!(self, r => r.disable_notifications())
    }

    /// Asks for a notification at the next available buffer; `false` if one is
    /// already there (pop it instead of sleeping).
    #[inline]
    pub fn enable_notifications(&mut self) -> bool {
        each!(self, r => r.enable_notifications())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{Arena, IdentityShare};

    /// The same request over either format, chosen by the features alone.
    #[test]
    fn each_format_is_picked_by_the_features_and_serves_the_same_request() {
        for extra in [Features::empty(), Features::RING_PACKED] {
            let arena = Arena::new(0x10_0000, 1 << 20).unwrap();
            let (_, ring) = arena.alloc_split_ring(8).unwrap();
            let f = Features::VERSION_1 | Features::EVENT_IDX | Features::INDIRECT_DESC | extra;
            let mut driver =
                DriverRing::<_, u32>::new(8, ring.clone(), IdentityShare::new(arena.clone(), 8), f).unwrap();
            let mut device = DeviceRing::new(8, &ring, arena.clone(), f).unwrap();
            let packed = matches!(device, DeviceRing::Packed(_));
            assert_eq!(packed, extra == Features::RING_PACKED);
            assert_eq!(matches!(driver, DriverRing::Packed(_)), packed);
            for round in 0..40u32 {
                let out = arena.alloc(16, 16).unwrap();
                Arena::write(&arena, out, &round.to_le_bytes()).unwrap();
                let back = arena.alloc(16, 16).unwrap();
                driver
                    .add(&[GuestBuf::new(out, 16)], &[GuestBuf::new(back, 16)], round)
                    .unwrap();
                driver.kick_prepare();
                let chain = device.pop().unwrap().expect("a chain");
                let mut got = [0u8; 4];
                chain.reader(device.memory()).read_exact(&mut got).unwrap();
                let mut w = chain.writer(device.memory());
                w.write_all(&got).unwrap();
                let written = w.written();
                device.add_used(chain.head(), written).unwrap();
                let used = driver.pop_used().unwrap().expect("used");
                assert_eq!((used.token, used.len), (round, 4));
                let mut echo = [0u8; 4];
                Arena::read(&arena, back, &mut echo).unwrap();
                assert_eq!(u32::from_le_bytes(echo), round);
            }
            assert_eq!(device.in_flight(), 0);
            assert_eq!(driver.outstanding(), 0);
        }
    }
}
