//! Our virtio-blk driver against our virtio-blk device, over every sharing model: the
//! driver written once (`drivers-blk`), the device written once (`backend-host`), a
//! real O_DIRECT image on ext4 behind io_uring.

// Test patterns come from small counters by deliberate truncation.
#![allow(clippy::cast_possible_truncation)]

use backend_host::blk::device::{BlkDevice, BlkSettings, Runtime};
use backend_host::blk::disk::{Disk, DiskOptions};
use drivers_blk::{BlkDriver, BlkError, BlkOptions};
use std::sync::Arc;
use vio::conformance::Fixture;
use vio::models;
use virtio_core::features::Features;
use virtio_core::transport::InProcessTransport;
use virtio_core::{DeviceModel, DriverModel};

const DISK_BYTES: u64 = 16 << 20;

type Driver<D, V> = BlkDriver<D, InProcessTransport<BlkDevice<V>>>;

fn setup<D, V>(f: Fixture<D, V>, name: &str, queues: u16) -> Driver<D, V>
where
    D: DriverModel,
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    setup_with(f, name, queues, Features::empty())
}

/// [`setup`], with the driver asking for the ring features in `ring`
/// (`RING_PACKED`, `IN_ORDER`).
fn setup_with<D, V>(f: Fixture<D, V>, name: &str, queues: u16, ring: Features) -> Driver<D, V>
where
    D: DriverModel,
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("blk-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    Disk::create_sparse(&path, DISK_BYTES).unwrap();
    let disk = Disk::open(&path, DiskOptions::default()).unwrap();
    let Fixture {
        guest,
        driver,
        device,
    } = f;
    let settings = BlkSettings {
        queues,
        serial: format!("e2e-{name}"),
        ..BlkSettings::default()
    };
    let dev = BlkDevice::new(disk, device, settings, Runtime::OwnThreads);
    let transport = InProcessTransport::new(dev.lifecycle(), dev).unwrap();
    let opts = BlkOptions {
        queues,
        timeout: Some(std::time::Duration::from_secs(20)),
        ring_packed: ring.contains(Features::RING_PACKED),
        in_order: ring.contains(Features::IN_ORDER),
        ..BlkOptions::default()
    };
    BlkDriver::new(transport, driver, guest.memory().clone(), opts).unwrap()
}

fn exercise<D, V>(f: Fixture<D, V>, name: &str)
where
    D: DriverModel,
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    exercise_with(f, name, Features::empty(), Features::empty());
}

/// [`exercise`], the driver asking for the ring features in `ring`; `negotiated`
/// are those the model lets it have.
fn exercise_with<D, V>(f: Fixture<D, V>, name: &str, ring: Features, negotiated: Features)
where
    D: DriverModel,
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    let d = setup_with(f, name, 1, ring);
    let got = Features::from_bits_retain(d.info().features) & (Features::RING_PACKED | Features::IN_ORDER);
    assert_eq!(got, negotiated, "{name}: the ring features negotiated");
    assert_eq!(d.info().capacity, DISK_BYTES / 512);
    assert!(d.info().flush && d.info().writeback);
    for (i, len) in [512usize, 4096, 65536, 3 * 4096].into_iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|k| (k * 7 + i) as u8).collect();
        let sector = 64 * i as u64 + 1;
        d.write_bytes_blocking(0, sector, &data).unwrap();
        let mut back = vec![0u8; len];
        d.read_bytes_blocking(0, sector, &mut back).unwrap();
        assert!(back == data, "{name}: round trip of {len} bytes");
    }
    d.flush_blocking(0).unwrap();
    assert_eq!(d.get_id_blocking(0).unwrap(), format!("e2e-{name}"));
    d.discard_blocking(0, 1, 1).unwrap();
    let mut back = vec![1u8; 512];
    d.read_bytes_blocking(0, 1, &mut back).unwrap();
    assert_eq!(back, vec![0u8; 512], "discarded sector reads zeros");
    // Refused locally, before the device sees it.
    let mut past = vec![0u8; 512];
    assert!(matches!(
        d.read_bytes_blocking(0, DISK_BYTES / 512, &mut past),
        Err(BlkError::OutOfRange { .. })
    ));
}

/// drivers-blk asks for the packed ring (`BlkOptions::ring_packed`), our device
/// offers it: the same exercise over every model that serves packed rings.
#[test]
fn driver_and_device_over_packed_rings() {
    let p = Features::RING_PACKED;
    exercise_with(models::direct(), "p-direct.img", p, p);
    exercise_with(models::shared_page(), "p-shared.img", p, p);
    exercise_with(models::grant(), "p-grant.img", p, p);
}

/// drivers-blk asks for IN_ORDER (`BlkOptions::in_order`), our device offers it and
/// keeps it although io_uring finishes requests in any order: the same exercise
/// over every model and both formats. Model 3 serves neither packed rings nor
/// IN_ORDER, so its driver negotiates neither.
#[test]
fn driver_and_device_in_order_over_every_model_and_format() {
    for format in [Features::empty(), Features::RING_PACKED] {
        let r = format | Features::IN_ORDER;
        // Image names are the device's serial: at most 20 bytes with "e2e-".
        let tag = if format.is_empty() { "s" } else { "p" };
        exercise_with(models::direct(), &format!("io{tag}-direct.img"), r, r);
        exercise_with(models::shared_page(), &format!("io{tag}-shared.img"), r, r);
        exercise_with(models::grant(), &format!("io{tag}-grant.img"), r, r);
        let copy = format!("io{tag}-copy.img");
        exercise_with(models::hypervisor_copy(), &copy, r, Features::empty());
    }
}

#[test]
fn driver_and_device_over_direct() {
    exercise(models::direct(), "direct.img");
}

#[test]
fn driver_and_device_over_shared_page() {
    exercise(models::shared_page(), "shared-page.img");
}

#[test]
fn driver_and_device_over_hypervisor_copy() {
    exercise(models::hypervisor_copy(), "copy.img");
}

#[test]
fn driver_and_device_over_grant() {
    exercise(models::grant(), "grant.img");
}

#[test]
fn async_requests_on_two_queues() {
    async_requests(setup(models::direct(), "async.img", 2));
}

/// Many requests of different sizes in flight on each queue, so the disk finishes
/// them out of order, over in-order rings of both formats: the device returns them
/// in order and each caller gets its own data.
#[test]
fn async_requests_in_order_on_two_queues() {
    for (name, format) in [
        ("async-io-split.img", Features::empty()),
        ("async-io-packed.img", Features::RING_PACKED),
    ] {
        let d = setup_with(models::direct(), name, 2, format | Features::IN_ORDER);
        assert!(Features::from_bits_retain(d.info().features).contains(Features::IN_ORDER));
        async_requests(d);
    }
}

fn async_requests<D, V>(d: Driver<D, V>)
where
    D: DriverModel + Send + Sync + 'static,
    D::Share: Send,
    <D::Share as virtio_core::DriverShare>::Token: Send,
    V: DeviceModel + Send + Sync + 'static,
    V::Memory: Send + 'static,
{
    let d = Arc::new(d);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let runners: Vec<_> = (0..2u16)
            .map(|q| {
                let d = d.clone();
                tokio::spawn(async move { d.run_completions(q).await })
            })
            .collect();
        let mut tasks = Vec::new();
        for i in 0..16u64 {
            let d = d.clone();
            tasks.push(tokio::spawn(async move {
                let q = u16::try_from(i % 2).unwrap();
                // Sizes from 4 KiB to 32 KiB: the disk finishes them in any order.
                let len = 4096 * (1 + (i % 8) as usize);
                let data = vec![i as u8; len];
                d.write_bytes(q, 128 * i, &data).await.unwrap();
                let mut back = vec![0u8; len];
                d.read_bytes(q, 128 * i, &mut back).await.unwrap();
                back == data
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
        for r in runners {
            r.abort();
        }
    });
}

#[test]
fn block_driver_refuses_a_network_device() {
    use backend_host::net::{NetDevice, NetSettings, Switch, SwitchConfig};
    use virtio_core::driver::SetupError;
    use virtio_core::lifecycle::InitError;
    let Fixture {
        guest,
        driver,
        device,
    } = models::direct();
    let switch = Switch::new(SwitchConfig::default());
    let dev = NetDevice::new(device, &switch, NetSettings::default()).unwrap();
    let transport = InProcessTransport::new(dev.lifecycle(), dev).unwrap();
    let err = BlkDriver::new(transport, driver, guest.memory().clone(), BlkOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            BlkError::Setup(SetupError::Init(InitError::WrongDevice {
                expected: 2,
                found: 1
            }))
        ),
        "{err:?}"
    );
}
