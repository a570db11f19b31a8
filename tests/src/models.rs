//! Fixtures for the four sharing models, so tests and benchmarks name them once.

use crate::conformance::Fixture;
use hypervisor::{Domain, Hypervisor};
use std::sync::Arc;
use transport_descriptors::{copy, direct};
use transport_grant::GrantService;
use transport_shared_page::SharedPageConfig;

/// Guest memory for each fixture: sparse, so only what a test touches is real.
pub const GUEST_BYTES: u64 = 64 << 20;

fn guest(hv: &Arc<Hypervisor>, name: &str) -> Arc<Domain> {
    hv.create_domain(name, GUEST_BYTES).expect("guest memory")
}

/// Model 1: rings and a bounce area in one shared region.
pub fn shared_page()
-> Fixture<transport_shared_page::SharedPageDriver, transport_shared_page::SharedPageDevice> {
    shared_page_with(SharedPageConfig::default())
}

/// Model 1 with a region laid out by `cfg` (queue count, bounce space).
pub fn shared_page_with(
    cfg: SharedPageConfig,
) -> Fixture<transport_shared_page::SharedPageDriver, transport_shared_page::SharedPageDevice> {
    let hv = Hypervisor::new();
    let guest = guest(&hv, "shared-page");
    let (driver, device) = transport_shared_page::pair(&guest, cfg).expect("model 1");
    Fixture {
        guest,
        driver,
        device,
    }
}

/// Model 2: the device reads and writes driver memory directly.
pub fn direct() -> Fixture<direct::DirectDriver, direct::DirectDevice> {
    let hv = Hypervisor::new();
    let guest = guest(&hv, "direct");
    let (driver, device) = direct::pair(&guest).expect("model 2");
    Fixture {
        guest,
        driver,
        device,
    }
}

/// Model 3: the device reaches buffers only through the hypervisor's copy helper.
pub fn hypervisor_copy() -> Fixture<copy::CopyDriver, copy::CopyDevice> {
    let hv = Hypervisor::new();
    let guest = guest(&hv, "hypervisor-copy");
    let (driver, device) = copy::pair(&guest).expect("model 3");
    Fixture {
        guest,
        driver,
        device,
    }
}

/// Model 4: grant table, the device running as the host domain.
pub fn grant() -> Fixture<transport_grant::GrantDriver, transport_grant::GrantDevice> {
    let hv = Hypervisor::new();
    let guest = guest(&hv, "grant");
    let service = GrantService::new(hv);
    let (driver, device) = transport_grant::pair(&service, &guest, Hypervisor::HOST).expect("model 4");
    Fixture {
        guest,
        driver,
        device,
    }
}
