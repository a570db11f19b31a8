//! Tests of the device lifecycle: negotiation, status transitions, queue registers, config space.

use std::cell::Cell;

use super::*;

const V1: u64 = Features::VERSION_1.bits();
const EVENT_IDX: u64 = Features::EVENT_IDX.bits();
const GUEST_CSUM: u64 = 1 << 1;
const GUEST_TSO4: u64 = 1 << 7;
const DEPS: &[Dependency] = &[Dependency {
    feature: GUEST_TSO4,
    requires: GUEST_CSUM,
}];
const ACK: u8 = DeviceStatus::ACKNOWLEDGE.bits();
const DRIVER: u8 = DeviceStatus::DRIVER.bits();
const FEATURES_OK: u8 = DeviceStatus::FEATURES_OK.bits();
const DRIVER_OK: u8 = DeviceStatus::DRIVER_OK.bits();
const FAILED: u8 = DeviceStatus::FAILED.bits();
const NEEDS_RESET: u8 = DeviceStatus::DEVICE_NEEDS_RESET.bits();

/// The device id every device in these tests has.
const ID: u32 = 1;

fn device(offered: u64) -> DeviceLifecycle {
    DeviceLifecycle::new(ID, offered, DEPS, ConfigSpace::new(vec![1, 2, 3, 4]), &[256, 100])
}

/// A device with FEATURES_OK set, ready for queue setup.
fn configuring() -> DeviceLifecycle {
    let mut dev = device(EVENT_IDX);
    for status in [ACK, ACK | DRIVER] {
        assert!(dev.write_status(status).is_ok());
    }
    assert_eq!(dev.set_driver_features(V1 | EVENT_IDX), Ok(()));
    assert_eq!(
        dev.write_status(ACK | DRIVER | FEATURES_OK),
        Ok(StatusChange::Added(DeviceStatus::FEATURES_OK))
    );
    dev
}

/// Queue 0 at size 256 with areas at well-separated, aligned addresses.
fn set_layout(dev: &mut DeviceLifecycle, desc: u64, avail: u64, used: u64) {
    assert_eq!(dev.set_queue_desc(0, desc), Ok(()));
    assert_eq!(dev.set_queue_avail(0, avail), Ok(()));
    assert_eq!(dev.set_queue_used(0, used), Ok(()));
}

#[test]
fn happy_path_over_the_in_process_transport() {
    let ctrl = Mutex::new(device(GUEST_CSUM | GUEST_TSO4 | EVENT_IDX));
    let features = initialize(&ctrl, ID, GUEST_CSUM | GUEST_TSO4 | (1 << 20), DEPS);
    assert_eq!(features, Ok(V1 | GUEST_CSUM | GUEST_TSO4));
    assert_eq!(ctrl.status(), ACK | DRIVER | FEATURES_OK);
    {
        let mut dev = locked(&ctrl);
        assert_eq!(dev.negotiated_features(), Some(V1 | GUEST_CSUM | GUEST_TSO4));
        set_layout(&mut dev, 0x1000, 0x2000, 0x3000);
        let layout = QueueLayout {
            size: 256,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
        };
        assert_eq!(dev.enable_queue(0), Ok(layout));
    }
    assert_eq!(driver_ok(&ctrl), Ok(()));
    assert_eq!(ctrl.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let mut buf = [0; 4];
    assert_eq!(read_config(&ctrl, 0, &mut buf), Ok(()));
    assert_eq!(buf, [1, 2, 3, 4]);
}

#[test]
fn initialize_drops_features_with_missing_dependencies() {
    let ctrl = Mutex::new(device(GUEST_TSO4));
    assert_eq!(initialize(&ctrl, ID, GUEST_CSUM | GUEST_TSO4, DEPS), Ok(V1));
}

#[test]
fn initialize_resets_a_live_device() {
    let mut dev = configuring();
    set_layout(&mut dev, 0x1000, 0x2000, 0x3000);
    assert!(dev.enable_queue(0).is_ok());
    let ctrl = Mutex::new(dev);
    assert_eq!(driver_ok(&ctrl), Ok(()));
    assert_eq!(initialize(&ctrl, ID, EVENT_IDX, &[]), Ok(V1 | EVENT_IDX));
    assert_eq!(locked(&ctrl).queue(0).map(|q| q.enabled), Some(false));
}

#[test]
fn device_refuses_features_that_break_its_dependencies() {
    // The driver ignores the device's table, so it accepts TSO4 without CSUM.
    let ctrl = Mutex::new(device(GUEST_CSUM | GUEST_TSO4));
    let err = initialize(&ctrl, ID, GUEST_TSO4, &[]);
    assert_eq!(
        err,
        Err(InitError::FeaturesRefused {
            features: V1 | GUEST_TSO4
        })
    );
    assert_eq!(ctrl.status(), ACK | DRIVER | FAILED);
    assert_eq!(locked(&ctrl).negotiated_features(), None);
    assert_eq!(
        driver_ok(&ctrl),
        Err(InitError::NotReady {
            status: ACK | DRIVER | FAILED
        })
    );
}

#[test]
fn features_ok_withheld_for_invalid_sets() {
    for accepted in [V1 | GUEST_TSO4, GUEST_CSUM, V1 | (1 << 20)] {
        let mut dev = device(GUEST_CSUM | GUEST_TSO4);
        assert!(dev.write_status(ACK).is_ok());
        assert!(dev.write_status(ACK | DRIVER).is_ok());
        assert_eq!(dev.set_driver_features(accepted), Ok(()));
        assert_eq!(
            dev.write_status(ACK | DRIVER | FEATURES_OK),
            Ok(StatusChange::FeaturesRefused {
                added: DeviceStatus::empty()
            })
        );
        assert_eq!(dev.status().bits(), ACK | DRIVER, "accepted {accepted:#x}");
        // The driver may correct itself and try again.
        assert_eq!(dev.set_driver_features(V1 | GUEST_CSUM), Ok(()));
        assert!(dev.write_status(ACK | DRIVER | FEATURES_OK).is_ok());
        assert_eq!(dev.negotiated_features(), Some(V1 | GUEST_CSUM));
    }
}

#[test]
fn driver_features_writable_only_between_driver_and_features_ok() {
    let mut dev = device(0);
    assert_eq!(
        dev.set_driver_features(V1),
        Err(DriverFeaturesError { status: 0 })
    );
    assert!(dev.write_status(ACK).is_ok());
    assert_eq!(
        dev.set_driver_features(V1),
        Err(DriverFeaturesError { status: ACK })
    );
    let mut dev = configuring();
    let status = ACK | DRIVER | FEATURES_OK;
    assert_eq!(dev.set_driver_features(V1), Err(DriverFeaturesError { status }));
    assert_eq!(dev.driver_features(), V1 | EVENT_IDX);
}

#[test]
fn version_1_is_always_offered() {
    assert_eq!(device(0).device_features(), V1);
}

#[test]
fn queue_registers_closed_before_features_ok() {
    let mut dev = device(0);
    assert!(dev.write_status(ACK).is_ok());
    assert!(dev.write_status(ACK | DRIVER).is_ok());
    let closed = QueueError::NotConfigurable { status: ACK | DRIVER };
    assert_eq!(dev.set_queue_size(0, 128), Err(closed));
    assert_eq!(dev.set_queue_desc(0, 0x1000), Err(closed));
    assert_eq!(dev.enable_queue(0), Err(closed));
}

#[test]
fn queue_registers_closed_after_driver_ok() {
    let mut dev = configuring();
    assert_eq!(dev.set_queue_size(1, 64), Ok(()));
    assert!(dev.write_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK).is_ok());
    let closed = QueueError::NotConfigurable {
        status: ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    };
    assert_eq!(dev.set_queue_size(1, 32), Err(closed));
    assert_eq!(dev.set_queue_desc(1, 0), Err(closed));
    assert_eq!(dev.set_queue_avail(1, 0), Err(closed));
    assert_eq!(dev.set_queue_used(1, 0), Err(closed));
    assert_eq!(dev.enable_queue(1), Err(closed));
    assert_eq!(dev.queue(1).map(|q| q.size), Some(64));
}

#[test]
fn enabled_queue_is_fixed() {
    let mut dev = configuring();
    set_layout(&mut dev, 0x1000, 0x2000, 0x3000);
    assert!(dev.enable_queue(0).is_ok());
    let enabled = QueueError::Enabled { index: 0 };
    assert_eq!(dev.set_queue_desc(0, 0x8000), Err(enabled));
    assert_eq!(dev.set_queue_size(0, 64), Err(enabled));
    assert_eq!(dev.enable_queue(0), Err(enabled));
}

#[test]
fn queue_size_rules() {
    let mut dev = configuring();
    for (size, max) in [(0, 256), (3, 256), (512, 256), (100, 100)] {
        let index = if max == 256 { 0 } else { 1 };
        assert_eq!(
            dev.set_queue_size(index, size),
            Err(QueueError::InvalidSize { size, max })
        );
    }
    assert_eq!(dev.set_queue_size(0, 1), Ok(()));
    assert_eq!(dev.set_queue_size(1, 64), Ok(()));
    assert_eq!(
        dev.set_queue_size(2, 64),
        Err(QueueError::NoSuchQueue { index: 2 })
    );
    // Queue 1's default size (its maximum, 100) is not a power of two.
    let mut dev = configuring();
    assert_eq!(
        dev.enable_queue(1),
        Err(QueueError::InvalidSize { size: 100, max: 100 })
    );
}

#[test]
fn packed_ring_allows_any_size_and_small_event_areas() {
    let packed = Features::RING_PACKED.bits();
    let mut dev = device(packed);
    assert!(dev.write_status(ACK | DRIVER).is_ok());
    assert_eq!(dev.set_driver_features(V1 | packed), Ok(()));
    assert!(dev.write_status(ACK | DRIVER | FEATURES_OK).is_ok());
    assert_eq!(dev.set_queue_size(1, 100), Ok(()));
    assert_eq!(dev.set_queue_desc(1, 0x1000), Ok(()));
    // Split, the used ring would be 6 + 8 * 100 bytes and overlap.
    assert_eq!(dev.set_queue_avail(1, 0x1000 + 1600), Ok(()));
    assert_eq!(dev.set_queue_used(1, 0x1000 + 1604), Ok(()));
    assert!(dev.enable_queue(1).is_ok());
}

#[test]
fn misaligned_areas_are_refused() {
    let cases = [
        ((0x1008, 0x2000, 0x3000), RingArea::Descriptor, 0x1008, 16),
        ((0x1000, 0x2001, 0x3000), RingArea::Driver, 0x2001, 2),
        ((0x1000, 0x2000, 0x3002), RingArea::Device, 0x3002, 4),
    ];
    for ((desc, avail, used), area, addr, align) in cases {
        let mut dev = configuring();
        set_layout(&mut dev, desc, avail, used);
        let err = QueueError::Area(AreaError::Misaligned { area, addr, align });
        assert_eq!(dev.validate_queue(0), Err(err));
        assert_eq!(dev.enable_queue(0), Err(err));
        assert_eq!(dev.queue(0).map(|q| q.enabled), Some(false));
    }
}

#[test]
fn areas_wrapping_the_address_space_are_refused() {
    let mut dev = configuring();
    // 256 descriptors are 4096 bytes; the last one would wrap.
    let addr = 0xffff_ffff_ffff_f010;
    set_layout(&mut dev, addr, 0x2000, 0x3000);
    let err = QueueError::Area(AreaError::Overflow {
        area: RingArea::Descriptor,
        addr,
        len: 4096,
    });
    assert_eq!(dev.validate_queue(0), Err(err));
    // The used ring (2054 bytes) ending two bytes short of 2^64 is fine.
    let mut dev = configuring();
    set_layout(&mut dev, 0x1000, 0x2000, 0u64.wrapping_sub(2056));
    assert!(dev.validate_queue(0).is_ok());
}

#[test]
fn overlapping_areas_are_refused() {
    let cases = [
        // Descriptor table is 0x1000..0x2000; avail starts one entry early.
        ((0x1000, 0x1ffe, 0x3000), RingArea::Descriptor, RingArea::Driver),
        // Avail ring is 0x2000..0x2206; used begins inside it.
        ((0x1000, 0x2000, 0x2204), RingArea::Driver, RingArea::Device),
        // Used ring contains the whole descriptor table.
        ((0x1000, 0x4000, 0x0800), RingArea::Descriptor, RingArea::Device),
        // All three at one address.
        ((0x1000, 0x1000, 0x1000), RingArea::Descriptor, RingArea::Driver),
    ];
    for ((desc, avail, used), first, second) in cases {
        let mut dev = configuring();
        set_layout(&mut dev, desc, avail, used);
        assert_eq!(
            dev.validate_queue(0),
            Err(QueueError::Area(AreaError::Overlap { first, second }))
        );
    }
    // Back to back is not an overlap.
    let mut dev = configuring();
    set_layout(&mut dev, 0x1000, 0x2000, 0x2208);
    assert!(dev.validate_queue(0).is_ok());
}

#[test]
fn reset_clears_driver_state_but_keeps_the_generation() {
    let mut dev = configuring();
    set_layout(&mut dev, 0x1000, 0x2000, 0x3000);
    assert_eq!(dev.set_queue_size(0, 64), Ok(()));
    assert!(dev.enable_queue(0).is_ok());
    assert!(dev.write_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK).is_ok());
    assert_eq!(dev.update_config(0, &[9]), Ok(ConfigNotification::Required));
    assert_eq!(dev.write_status(0), Ok(StatusChange::Reset));
    assert_eq!(dev.status(), DeviceStatus::empty());
    assert_eq!(dev.driver_features(), 0);
    assert_eq!(dev.negotiated_features(), None);
    assert_eq!(dev.queue(0), Some(&QueueRegisters::new(256)));
    assert_eq!(dev.config().generation(), 1);
}

#[test]
fn needs_reset_bumps_generation_and_asks_for_a_notification() {
    let mut dev = configuring();
    assert_eq!(dev.set_needs_reset(), ConfigNotification::NotRequired);
    assert_eq!(dev.config().generation(), 1);
    assert_eq!(
        dev.set_queue_size(0, 64),
        Err(QueueError::NotConfigurable {
            status: ACK | DRIVER | FEATURES_OK | NEEDS_RESET
        })
    );

    let ctrl = Mutex::new(configuring());
    assert_eq!(driver_ok(&ctrl), Ok(()));
    assert_eq!(locked(&ctrl).set_needs_reset(), ConfigNotification::Required);
    assert_eq!(locked(&ctrl).set_needs_reset(), ConfigNotification::NotRequired);
    assert_eq!(ctrl.config_generation(), 1);
    assert_eq!(
        ctrl.status(),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    );
    // The driver cannot clear it; only a reset does.
    ctrl.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(ctrl.status() & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(initialize(&ctrl, ID, 0, &[]), Ok(V1));
}

#[test]
fn config_updates_notify_only_when_live_and_changed() {
    let ctrl = Mutex::new(configuring());
    assert_eq!(
        locked(&ctrl).update_config(1, &[7]),
        Ok(ConfigNotification::NotRequired)
    );
    assert_eq!(driver_ok(&ctrl), Ok(()));
    assert_eq!(
        locked(&ctrl).update_config(1, &[7]),
        Ok(ConfigNotification::NotRequired)
    );
    assert_eq!(
        locked(&ctrl).update_config(1, &[8]),
        Ok(ConfigNotification::Required)
    );
    assert!(locked(&ctrl).update_config(3, &[0, 0]).is_err());
    let mut buf = [0xff; 2];
    ctrl.read_config(3, &mut buf);
    assert_eq!(buf, [0, 0], "out-of-range transport reads return zeros");
}

#[test]
fn refused_transport_writes_show_in_the_status() {
    let ctrl = Mutex::new(device(0));
    ctrl.set_status(ACK | DRIVER_OK);
    assert_eq!(ctrl.status(), 0);
    ctrl.set_driver_features(V1);
    assert_eq!(locked(&ctrl).driver_features(), 0);
}

/// A scripted transport for device behaviour the lifecycle never shows.
struct Scripted {
    offered: u64,
    status: Cell<u8>,
    stuck_status: Option<u8>,
    writes: Cell<u32>,
}

impl ControlPlane for Scripted {
    fn device_id(&self) -> u32 {
        ID
    }
    fn config_len(&self) -> usize {
        0
    }
    fn device_features(&self) -> u64 {
        self.offered
    }
    fn set_driver_features(&self, _: u64) {}
    fn status(&self) -> u8 {
        self.stuck_status.unwrap_or(self.status.get())
    }
    fn set_status(&self, status: u8) {
        self.writes.set(self.writes.get() + 1);
        self.status.set(status);
    }
    fn config_generation(&self) -> u32 {
        0
    }
    fn read_config(&self, _: usize, buf: &mut [u8]) {
        buf.fill(0);
    }
    fn write_config(&self, _: usize, _: &[u8]) {}
}

#[test]
fn legacy_device_is_refused_and_failed() {
    let ctrl = Scripted {
        offered: GUEST_CSUM,
        status: Cell::new(0),
        stuck_status: None,
        writes: Cell::new(0),
    };
    assert_eq!(initialize(&ctrl, ID, GUEST_CSUM, &[]), Err(InitError::NotModern));
    assert_eq!(ctrl.status(), ACK | DRIVER | FAILED);
}

#[test]
fn reset_that_never_completes_times_out() {
    let ctrl = Scripted {
        offered: V1,
        status: Cell::new(0),
        stuck_status: Some(ACK),
        writes: Cell::new(0),
    };
    assert_eq!(
        initialize(&ctrl, ID, 0, &[]),
        Err(InitError::ResetTimeout { status: ACK })
    );
    assert_eq!(ctrl.writes.get(), 1, "nothing but the reset is written");
}

#[test]
fn another_kind_of_device_is_refused_before_anything_is_written() {
    let ctrl = Scripted {
        offered: V1,
        status: Cell::new(ACK | DRIVER | FEATURES_OK | DRIVER_OK),
        stuck_status: None,
        writes: Cell::new(0),
    };
    assert_eq!(
        initialize(&ctrl, ID + 1, 0, &[]),
        Err(InitError::WrongDevice {
            expected: ID + 1,
            found: ID
        })
    );
    assert_eq!(ctrl.writes.get(), 0, "another driver's device is not reset");
    assert_eq!(ctrl.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
}

#[test]
fn control_plane_reports_id_and_config_length() {
    let ctrl = Mutex::new(device(0));
    assert_eq!(ctrl.device_id(), ID);
    assert_eq!(ctrl.config_len(), 4);
}
