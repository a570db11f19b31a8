//! Tests of the driver bring-up: the failure paths of `DeviceGuard` and what each leaves the device in.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use super::*;
use crate::config::ConfigSpace;
use crate::lifecycle::{ControlPlane, DeviceLifecycle};
use crate::model::DriverQueue;
use crate::notify::EventFdNotifier;
use crate::ring::areas::RingFormat;
use crate::test_utils::{Arena, IdentityShare};
use crate::transport::{ActiveQueue, DeviceHandler, InProcessTransport};

const ID: u32 = 5;
const ACK: u8 = DeviceStatus::ACKNOWLEDGE.bits();
const DRIVER: u8 = DeviceStatus::DRIVER.bits();
const FEATURES_OK: u8 = DeviceStatus::FEATURES_OK.bits();
const DRIVER_OK: u8 = DeviceStatus::DRIVER_OK.bits();
const FAILED: u8 = DeviceStatus::FAILED.bits();

/// A device that serves nothing.
struct Idle;

impl DeviceHandler for Idle {
    fn activate(
        &mut self,
        _: u64,
        _: Vec<ActiveQueue>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
    fn reset(&mut self) {}
}

/// An in-process transport that records every status write and can misbehave:
/// drop FEATURES_OK, or never read back 0 after a reset.
struct Recorder {
    inner: InProcessTransport<Idle>,
    writes: RefCell<Vec<u8>>,
    refuse_features_ok: bool,
    stuck: Cell<bool>,
}

fn recorder(queue_max_sizes: &[u16]) -> Recorder {
    let lc = DeviceLifecycle::new(ID, 0, &[], ConfigSpace::new(vec![9; 4]), queue_max_sizes);
    Recorder {
        inner: InProcessTransport::new(lc, Idle).unwrap(),
        writes: RefCell::new(Vec::new()),
        refuse_features_ok: false,
        stuck: Cell::new(false),
    }
}

impl ControlPlane for &Recorder {
    fn device_id(&self) -> u32 {
        self.inner.device_id()
    }
    fn config_len(&self) -> usize {
        self.inner.config_len()
    }
    fn device_features(&self) -> u64 {
        self.inner.device_features()
    }
    fn set_driver_features(&self, features: u64) {
        self.inner.set_driver_features(features);
    }
    fn status(&self) -> u8 {
        let status = self.inner.status();
        if self.stuck.get() {
            return status | DRIVER_OK;
        }
        status
    }
    fn set_status(&self, status: u8) {
        self.writes.borrow_mut().push(status);
        if self.refuse_features_ok {
            self.inner.set_status(status & !FEATURES_OK);
        } else {
            self.inner.set_status(status);
        }
    }
    fn config_generation(&self) -> u32 {
        self.inner.config_generation()
    }
    fn read_config(&self, offset: usize, buf: &mut [u8]) {
        self.inner.read_config(offset, buf);
    }
    fn write_config(&self, offset: usize, data: &[u8]) {
        self.inner.write_config(offset, data);
    }
}

impl Transport for &Recorder {
    type Interrupt = EventFdNotifier;
    fn num_queues(&self) -> u16 {
        self.inner.num_queues()
    }
    fn queue_max_size(&self, index: u16) -> u16 {
        self.inner.queue_max_size(index)
    }
    fn setup_queue(&self, index: u16, size: u16, addrs: QueueAddrs) -> Result<(), TransportError> {
        self.inner.setup_queue(index, size, addrs)
    }
    fn notify_queue(&self, index: u16) -> Result<(), TransportError> {
        self.inner.notify_queue(index)
    }
    fn interrupt(&self, index: u16) -> Result<EventFdNotifier, TransportError> {
        self.inner.interrupt(index)
    }
}

/// The identity sharing model over an arena.
struct Identity(Arc<Arena>);

impl DriverModel for Identity {
    type Share = IdentityShare;
    fn name(&self) -> &'static str {
        "identity"
    }
    fn create_queue_in(
        &self,
        _: u16,
        _: RingFormat,
        size: u16,
    ) -> Result<DriverQueue<IdentityShare>, ModelError> {
        let ((desc, avail, used), ring) = self
            .0
            .alloc_split_ring(size)
            .map_err(|_| ModelError::NoMemory(size))?;
        Ok(DriverQueue {
            addrs: QueueAddrs { desc, avail, used },
            ring,
            share: IdentityShare::new(self.0.clone(), 4),
        })
    }
}

fn model() -> Identity {
    Identity(Arena::new(0x10_0000, 1 << 20).unwrap())
}

#[test]
fn a_refused_features_ok_is_a_typed_error_and_leaves_failed() {
    let rec = Recorder {
        refuse_features_ok: true,
        ..recorder(&[8])
    };
    let err = DeviceGuard::initialize(&rec, ID, 0, &[]).unwrap_err();
    assert!(
        matches!(err, SetupError::Init(InitError::FeaturesRefused { .. })),
        "{err:?}"
    );
    assert_eq!(rec.inner.status(), ACK | DRIVER | FAILED);
}

#[test]
fn a_queue_of_size_zero_is_a_typed_error_and_the_guard_fails_then_resets_the_device() {
    let rec = recorder(&[0]);
    let guard = DeviceGuard::initialize(&rec, ID, 0, &[]).unwrap();
    let err = guard.queue::<_, u16>(&model(), 0, 256, 1).unwrap_err();
    assert!(matches!(err, SetupError::NoQueue(0)), "{err:?}");
    rec.writes.borrow_mut().clear();
    drop(guard);
    assert_eq!(
        *rec.writes.borrow(),
        [ACK | DRIVER | FEATURES_OK | FAILED, 0],
        "FAILED (§3.1.1 step 8), then a reset"
    );
    assert_eq!(rec.inner.status(), 0);
}

#[test]
fn a_queue_below_the_drivers_minimum_is_refused() {
    let rec = recorder(&[2]);
    let guard = DeviceGuard::initialize(&rec, ID, 0, &[]).unwrap();
    let err = guard.queue::<_, u16>(&model(), 0, 256, 4).unwrap_err();
    assert!(matches!(err, SetupError::NoQueue(0)), "{err:?}");
    let err = guard.queue::<_, u16>(&model(), 1, 256, 1).unwrap_err();
    assert!(matches!(err, SetupError::NoQueue(1)), "no queue 1: {err:?}");
}

#[test]
fn a_finished_bring_up_is_reset_without_failed_and_torn_down_after_the_reset() {
    let rec = recorder(&[100]);
    let mut guard = DeviceGuard::initialize(&rec, ID, 0, &[]).unwrap();
    let mut cfg = [0u8; 4];
    guard.read_config(&mut cfg, |t, b| t.read_config(0, b)).unwrap();
    assert_eq!(cfg, [9; 4]);
    let q = guard.queue::<_, u16>(&model(), 0, 256, 1).unwrap();
    assert_eq!((q.index, q.size), (0, 64), "largest power of two within 100");
    guard.setup_queue(q.index, q.size, q.addrs).unwrap();
    guard.driver_ok().unwrap();
    guard.finish();
    rec.writes.borrow_mut().clear();
    let mut seen = None;
    guard.shutdown(|| seen = Some(rec.inner.status()));
    assert_eq!(seen, Some(0), "teardown runs once the device reads back 0");
    assert_eq!(*rec.writes.borrow(), [0], "no FAILED after a finished bring-up");
    drop(guard);
    assert_eq!(*rec.writes.borrow(), [0], "the guard resets only once");
}

#[test]
fn a_device_that_never_resets_keeps_its_memory() {
    let rec = recorder(&[8]);
    let mut guard = DeviceGuard::initialize(&rec, ID, 0, &[]).unwrap();
    guard.driver_ok().unwrap();
    guard.finish();
    rec.stuck.set(true);
    let mut torn_down = false;
    guard.shutdown(|| torn_down = true);
    assert!(!torn_down, "memory the device may still write is not freed");
    assert!(matches!(guard.stop(), Err(InitError::ResetTimeout { .. })));
}

/// A device that keeps the queues it is given, to look at what reached them.
struct Keeper(Arc<std::sync::Mutex<Vec<ActiveQueue>>>);

impl DeviceHandler for Keeper {
    fn activate(
        &mut self,
        _: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        *self.0.lock().unwrap() = queues;
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().clear();
    }
}

/// VIRTIO_F_NOTIFICATION_DATA (virtio 1.2 §2.9): the guard accepts it when the
/// device offers it and the transport carries it, without the driver asking, and
/// each kick through [`DeviceGuard::notify`] leaves the ring's next position where
/// the device reads it: the available index of a split ring, the slot with the
/// wrap counter in bit 15 of a packed one. A transport that cannot carry it never
/// negotiates it.
#[test]
fn notification_data_says_where_the_next_request_goes() {
    use crate::notify::{NotificationData, Wait};
    for packed in [false, true] {
        let mut offered = Features::VERSION_1 | Features::NOTIFICATION_DATA;
        offered.set(Features::RING_PACKED, packed);
        let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
        let lc = DeviceLifecycle::new(ID, offered.bits(), &[], ConfigSpace::new(vec![0; 4]), &[8]);
        let t = InProcessTransport::new(lc, Keeper(kept.clone())).unwrap();
        let wanted = Features::VERSION_1 | Features::RING_PACKED;
        let mut g = DeviceGuard::initialize(t, ID, wanted.bits(), &[]).unwrap();
        assert_eq!(g.features(), offered.bits(), "accepted without being asked");
        let m = model();
        let mut q = g.queue::<_, u32>(&m, 0, 8, 1).unwrap();
        g.setup_queue(0, q.size, q.addrs).unwrap();
        g.driver_ok().unwrap();
        g.finish();
        let (register, kick) = {
            let queues = kept.lock().unwrap();
            let a = &queues[0];
            (
                a.notification.clone().expect("a register"),
                a.kick.try_clone().unwrap(),
            )
        };
        // The device side, to take each request back so the ring never fills.
        let l = crate::ring::layout::SplitLayout { size: 8 };
        let area = |addr, len| m.0.guest_region(addr, len).unwrap();
        let ring = crate::RingMemory {
            desc: area(q.addrs.desc, l.desc_bytes()),
            driver: area(q.addrs.avail, l.avail_bytes()),
            device: area(q.addrs.used, l.used_bytes()),
        };
        let mut device = crate::DeviceRing::new(8, &ring, m.0.clone(), offered).unwrap();
        assert_eq!(register.read(), None, "nothing before the first kick");
        let buf = crate::GuestBuf::new(m.0.alloc(16, 8).unwrap(), 16);
        for k in 1..=10u16 {
            q.ring.add(&[], &[buf], u32::from(k)).unwrap();
            let next = q.ring.kick_due().expect("no suppression: every add is kicked");
            g.notify(0, next).unwrap();
            // Ten single-slot requests in a ring of 8 wrap once (packed: the wrap
            // counter, 1 at first, flips with the slot back at 0).
            let expect = if packed {
                let slot = k % 8;
                let wrap = u16::from(k < 8) << 15;
                slot | wrap
            } else {
                k
            };
            assert_eq!(register.read(), Some(NotificationData { vqn: 0, next: expect }));
            assert_eq!(kick.take().unwrap(), 1, "and the kick itself");
            let chain = device.pop().unwrap().expect("the request");
            device.add_used(chain.head(), 0).unwrap();
            assert_eq!(q.ring.pop_used().unwrap().map(|u| u.token), Some(u32::from(k)));
        }
    }
    // The recorder transport does not carry data: the offer is declined.
    let r = recorder(&[8]);
    let offered = Features::VERSION_1 | Features::NOTIFICATION_DATA;
    r.inner.with_lifecycle(|lc| {
        *lc = DeviceLifecycle::new(ID, offered.bits(), &[], ConfigSpace::new(vec![0; 4]), &[8])
    });
    let g = DeviceGuard::initialize(&r, ID, offered.bits(), &[]).unwrap();
    assert_eq!(g.features(), Features::VERSION_1.bits());
}
