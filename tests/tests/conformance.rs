//! The conformance suite over all four sharing models, both ring formats, with and
//! without IN_ORDER: identical exchanges must give identical results, and a driver
//! can use different models for different queues in one process.

use vio::conformance::{self, Digest};
use vio::models;
use virtio_core::ring::areas::RingFormat::{Packed, Split};

fn digests_agree(name: &str, got: &[(String, Digest)], reference: &[(String, Digest)]) {
    assert_eq!(got.len(), reference.len());
    for ((exchange, d), (_, r)) in got.iter().zip(reference) {
        assert_eq!(d, r, "{name} differs from model 2 in: {exchange}");
    }
}

#[test]
fn all_four_models_behave_identically() {
    let reference = conformance::run_all(models::direct, Split, false);
    // The digests carry information: each kind of exchange has its own digest, and the
    // feature set (indirect, event index) does not change what either side observes.
    let distinct: std::collections::HashSet<_> = reference.iter().map(|(_, d)| *d).collect();
    assert_eq!(distinct.len(), 6, "{reference:?}");
    digests_agree(
        "shared-page",
        &conformance::run_all(models::shared_page, Split, false),
        &reference,
    );
    digests_agree(
        "hypervisor-copy",
        &conformance::run_all(models::hypervisor_copy, Split, false),
        &reference,
    );
    digests_agree(
        "grant",
        &conformance::run_all(models::grant, Split, false),
        &reference,
    );
}

/// The packed ring (virtio 1.2 §2.8) gives both sides what the split ring gives
/// them, over every model that serves it. Model 3 does not: its copy helper checks
/// each copy against the split ring it tracks, and refuses a packed queue.
#[test]
fn the_packed_ring_behaves_as_the_split_ring_over_every_model() {
    let reference = conformance::run_all(models::direct, Split, false);
    digests_agree(
        "direct, packed",
        &conformance::run_all(models::direct, Packed, false),
        &reference,
    );
    digests_agree(
        "shared-page, packed",
        &conformance::run_all(models::shared_page, Packed, false),
        &reference,
    );
    digests_agree(
        "grant, packed",
        &conformance::run_all(models::grant, Packed, false),
        &reference,
    );
    let f = models::hypervisor_copy();
    let dq = virtio_core::DriverModel::create_queue(&f.driver, 0, 8).unwrap();
    assert!(matches!(
        virtio_core::DeviceModel::open_queue_in(&f.device, 0, Packed, 8, dq.addrs),
        Err(virtio_core::ModelError::Format(Packed))
    ));
}

/// IN_ORDER (virtio 1.2 §2.7.9, §2.8): every model that serves it gives, in both
/// formats, what model 2 gives over split rings in order. Requests come back in
/// the order they were made available, so the exchange whose device finishes them
/// out of order differs from its run without IN_ORDER, and no other does. Model 3
/// serves neither packed rings nor IN_ORDER: a driver over it does not negotiate them.
#[test]
fn in_order_behaves_the_same_over_every_model_and_both_formats() {
    use virtio_core::features::Features;
    let plain = conformance::run_all(models::direct, Split, false);
    let reference = conformance::run_all(models::direct, Split, true);
    for ((exchange, p), (_, r)) in plain.iter().zip(&reference) {
        assert_eq!(p == r, !exchange.starts_with("out-of-order"), "{exchange}");
    }
    digests_agree(
        "direct, packed, in order",
        &conformance::run_all(models::direct, Packed, true),
        &reference,
    );
    for format in [Split, Packed] {
        digests_agree(
            &format!("shared-page, {format:?}, in order"),
            &conformance::run_all(models::shared_page, format, true),
            &reference,
        );
        digests_agree(
            &format!("grant, {format:?}, in order"),
            &conformance::run_all(models::grant, format, true),
            &reference,
        );
    }
    let f = models::hypervisor_copy();
    let wanted = Features::VERSION_1 | Features::RING_PACKED | Features::IN_ORDER;
    assert_eq!(
        virtio_core::DriverModel::allowed(&f.driver, wanted.bits()),
        Features::VERSION_1.bits()
    );
}

#[test]
fn one_guest_different_models_per_queue_in_one_process() {
    use hypervisor::Hypervisor;
    use std::sync::Arc;
    use vio::conformance::Fixture;
    use virtio_core::features::Features;
    // One guest whose queues use different models at the same time: the same exchange
    // over each gives what model 2 alone gives.
    let features = Features::VERSION_1 | Features::EVENT_IDX | Features::INDIRECT_DESC;
    let reference = conformance::out_of_order(&models::direct(), features);
    let hv = Hypervisor::new();
    let guest = hv.create_domain("mixed", models::GUEST_BYTES).unwrap();
    let service = transport_grant::GrantService::new(hv.clone());
    let (d1, v1) = transport_shared_page::pair(&guest, Default::default()).unwrap();
    let (d3, v3) = transport_descriptors::copy::pair(&guest).unwrap();
    let (d4, v4) = transport_grant::pair(&service, &guest, Hypervisor::HOST).unwrap();
    let g = || Arc::clone(&guest);
    let shared = Fixture {
        guest: g(),
        driver: d1,
        device: v1,
    };
    let copy = Fixture {
        guest: g(),
        driver: d3,
        device: v3,
    };
    let grant = Fixture {
        guest: g(),
        driver: d4,
        device: v4,
    };
    std::thread::scope(|s| {
        let runs = [
            s.spawn(|| conformance::out_of_order(&shared, features)),
            s.spawn(|| conformance::out_of_order(&copy, features)),
            s.spawn(|| conformance::out_of_order(&grant, features)),
        ];
        for r in runs {
            assert_eq!(r.join().expect("exchange thread"), reference);
        }
    });
}
