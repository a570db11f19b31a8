//! Shared set-up for the integration tests: a guest, the grant service, one queue
//! on each side.
#![allow(dead_code, clippy::cast_possible_truncation)]

use hypervisor::{Domain, Hypervisor};
use std::error::Error;
use std::sync::Arc;
use transport_grant::{GrantDevice, GrantDriver, GrantError, GrantMemory, GrantService, GrantShare, pair};
use virtio_core::features::Features;
use virtio_core::{DeviceModel, DriverModel, DriverShare, QueueAddrs, SplitDevice, SplitDriver};

pub struct Setup<S: DriverShare> {
    pub hv: Arc<Hypervisor>,
    pub guest: Arc<Domain>,
    pub grants: Arc<GrantService>,
    pub model: GrantDriver,
    pub device_model: GrantDevice,
    pub addrs: QueueAddrs,
    pub driver: SplitDriver<S, u32>,
    pub device: SplitDevice<GrantMemory>,
}

pub fn features(indirect: bool) -> Features {
    let f = Features::VERSION_1 | Features::EVENT_IDX;
    if indirect { f | Features::INDIRECT_DESC } else { f }
}

/// A guest of 8 MiB served by the host, queue of `size`, the driver's share wrapped
/// by `wrap`; `before_queue` runs before the queue is created (to make pools).
pub fn setup_with<S: DriverShare>(
    size: u16,
    features: Features,
    before_queue: impl FnOnce(&GrantDriver),
    wrap: impl FnOnce(GrantShare) -> S,
) -> Setup<S> {
    let hv = Hypervisor::new();
    let guest = hv.create_domain("guest", 8 << 20).unwrap();
    let grants = GrantService::new(hv.clone());
    let (model, device_model) = pair(&grants, &guest, Hypervisor::HOST).unwrap();
    before_queue(&model);
    let q = model.create_queue(0, size).unwrap();
    let driver = SplitDriver::new(size, q.ring, wrap(q.share), features).unwrap();
    let dq = device_model.open_queue(0, size, q.addrs).unwrap();
    let device = SplitDevice::new(size, &dq.ring, dq.memory, features).unwrap();
    Setup {
        hv,
        guest,
        grants,
        model,
        device_model,
        addrs: q.addrs,
        driver,
        device,
    }
}

pub fn setup(size: u16, features: Features) -> Setup<GrantShare> {
    setup_with(size, features, |_| {}, |s| s)
}

/// The grant error somewhere in `e`'s source chain.
pub fn grant_error<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a GrantError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(g) = err.downcast_ref::<GrantError>() {
            return Some(g);
        }
        cur = err.source();
    }
    None
}

/// Serves one chain: reads its readable bytes, writes them back reversed (as much
/// as fits), and returns the head and the bytes written.
pub fn echo_reversed(device: &mut SplitDevice<GrantMemory>) -> Option<(u16, u32)> {
    let chain = device.pop().unwrap()?;
    let mut data = vec![0u8; chain.readable_len() as usize];
    chain.reader(device.memory()).read_exact(&mut data).unwrap();
    data.reverse();
    let n = data.len().min(chain.writable_len() as usize);
    let mut w = chain.writer(device.memory());
    w.write_all(&data[..n]).unwrap();
    Some((chain.head(), w.written()))
}

/// A deterministic pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
