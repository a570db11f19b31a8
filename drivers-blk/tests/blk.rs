//! The driver against a fake device over real sharing models (model 2 "direct" and
//! model 3 "copy helper" from transport-descriptors).

mod common;

use common::{Setup, behave, copy, direct, pattern, rig};
use drivers_blk::{BlkError, BlkOptions, Broken, Completion, Request};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use virtio_core::GuestBuf;
use virtio_core::blk::BlkFeatures;
use virtio_core::driver::SetupError;

const LONG: Option<Duration> = Some(Duration::from_secs(10));

fn guest_buf(mem: &hypervisor::GuestMemory, len: u32) -> GuestBuf {
    GuestBuf::new(mem.alloc(u64::from(len), 512).unwrap(), len)
}

#[test]
fn negotiates_and_reads_the_config() {
    let r = rig(Setup::default(), direct).unwrap();
    let info = r.driver.info();
    assert_eq!(info.capacity, 64);
    assert_eq!(info.blk_size, 4096);
    assert_eq!(info.seg_max, Some(1));
    assert!(info.flush && info.writeback && !info.read_only);
    assert_eq!(info.discard.unwrap().max_sectors, 32);
    assert!(info.write_zeroes_may_unmap);
    assert!(info.has(BlkFeatures::MQ));
    assert_eq!(r.driver.num_queues(), 1);
    assert_eq!(r.driver.queue_size(0).unwrap(), 16);
}

fn round_trip<D: virtio_core::DriverModel, M: common::Served>(r: &common::Rig<D, M>) {
    let mem = r.guest.memory();
    let src = guest_buf(mem, 4096);
    let dst = guest_buf(mem, 4096);
    let data = pattern(8, 4096);
    mem.write(src.addr, &data).unwrap();
    r.driver.write_blocking(0, 8, src).unwrap();
    r.driver.read_blocking(0, 8, dst).unwrap();
    let mut back = vec![0u8; 4096];
    mem.read(dst.addr, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        &r.shared.disk.lock().unwrap()[8 * 512..12 * 512 + 2048],
        &data[..]
    );

    // The copying calls go through a staging buffer.
    let bytes = pattern(40, 1024);
    r.driver.write_bytes_blocking(0, 40, &bytes).unwrap();
    let mut got = vec![0u8; 1024];
    r.driver.read_bytes_blocking(0, 40, &mut got).unwrap();
    assert_eq!(got, bytes);
}

#[test]
fn read_write_round_trip_direct_model() {
    round_trip(&rig(Setup::default(), direct).unwrap());
}

#[test]
fn read_write_round_trip_copy_model() {
    round_trip(&rig(Setup::default(), copy).unwrap());
}

#[test]
fn round_trip_without_indirect_or_event_idx() {
    let setup = Setup {
        opts: BlkOptions {
            indirect_desc: false,
            event_idx: false,
            ..BlkOptions::default()
        },
        ..Setup::default()
    };
    round_trip(&rig(setup, direct).unwrap());
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let r = rig(Setup::default(), direct).unwrap();
    r.driver.flush_blocking(0).unwrap();
    assert_eq!(r.shared.stats.flushes.load(Ordering::SeqCst), 1);
    assert_eq!(r.driver.get_id_blocking(0).unwrap(), "fake-disk-01");

    r.driver.write_bytes_blocking(0, 0, &[0xaa; 8 * 512]).unwrap();
    r.driver.discard_blocking(0, 1, 2).unwrap();
    r.driver.write_zeroes_blocking(0, 5, 1, true).unwrap();
    r.driver.write_zeroes_blocking(0, 6, 1, false).unwrap();
    let mut got = vec![0u8; 8 * 512];
    r.driver.read_bytes_blocking(0, 0, &mut got).unwrap();
    for (sector, chunk) in got.chunks(512).enumerate() {
        let zero = matches!(sector, 1 | 2 | 5 | 6);
        assert!(
            chunk.iter().all(|&b| b == if zero { 0 } else { 0xaa }),
            "sector {sector}"
        );
    }
}

#[test]
fn without_flush_the_device_is_writethrough_and_flush_is_local() {
    let setup = Setup {
        offered: BlkFeatures::BLK_SIZE,
        ..Setup::default()
    };
    let r = rig(setup, direct).unwrap();
    assert!(!r.driver.info().flush && !r.driver.info().writeback);
    r.driver.flush_blocking(0).unwrap();
    assert_eq!(r.shared.stats.requests.load(Ordering::SeqCst), 0);
    assert!(matches!(
        r.driver.submit(0, Request::Flush),
        Err(BlkError::Unsupported)
    ));
    assert!(matches!(
        r.driver.discard_blocking(0, 0, 1),
        Err(BlkError::Unsupported)
    ));
}

#[test]
fn many_requests_complete_out_of_order() {
    let r = rig(Setup::default(), direct).unwrap();
    let mem = r.guest.memory();
    for s in 0..4u64 {
        r.shared.disk.lock().unwrap()[common::us(s * 512)..common::us((s + 1) * 512)]
            .copy_from_slice(&pattern(s, 512));
    }
    behave(&r.shared, |b| b.reverse = 4);
    let mut submitted = Vec::new();
    let mut bufs = HashMap::new();
    for s in 0..4u64 {
        let buf = guest_buf(mem, 512);
        let id = r.driver.submit(0, Request::Read { sector: s, buf }).unwrap();
        submitted.push(id);
        bufs.insert(id, (s, buf));
    }
    r.driver.kick(0).unwrap();
    let mut order = Vec::new();
    while order.len() < 4 {
        assert!(r.driver.wait(0, LONG).unwrap(), "no completion in time");
        for (id, result) in r.driver.poll(0, 16).unwrap() {
            assert_eq!(result.unwrap(), Completion::Read);
            let (s, buf) = bufs[&id];
            let mut got = vec![0u8; 512];
            mem.read(buf.addr, &mut got).unwrap();
            assert_eq!(got, pattern(s, 512), "sector {s}");
            order.push(id);
        }
    }
    submitted.reverse();
    assert_eq!(order, submitted, "the device returned them newest first");
}

#[test]
fn poll_respects_its_budget() {
    let r = rig(Setup::default(), direct).unwrap();
    behave(&r.shared, |b| b.reverse = 3);
    for _ in 0..3 {
        r.driver.submit(0, Request::GetId).unwrap();
    }
    r.driver.kick(0).unwrap();
    assert!(r.driver.wait(0, LONG).unwrap());
    let mut total = 0;
    while total < 3 {
        let got = r.driver.poll(0, 1).unwrap();
        assert!(got.len() <= 1);
        for (_, res) in &got {
            let Ok(Completion::Id(id)) = res else {
                panic!("{res:?}")
            };
            assert_eq!(id.to_string_lossy(), "fake-disk-01");
        }
        total += got.len();
        if got.is_empty() {
            r.driver.wait(0, LONG).unwrap();
        }
    }
}

/// Sends `n` GET_IDs one at a time, spinning on `poll` for each; returns the
/// interrupts the device sent meanwhile.
fn interrupts_while_spinning<D: virtio_core::DriverModel, M: common::Served>(
    r: &common::Rig<D, M>,
    n: usize,
    busy: bool,
) -> u64 {
    let before = r
        .shared
        .stats
        .interrupts
        .load(std::sync::atomic::Ordering::SeqCst);
    let mut out = Vec::new();
    for _ in 0..n {
        r.driver.submit(0, Request::GetId).unwrap();
        r.driver.kick(0).unwrap();
        let deadline = std::time::Instant::now() + LONG.unwrap();
        out.clear();
        while out.is_empty() {
            assert!(std::time::Instant::now() < deadline, "no completion");
            if busy {
                r.driver.poll_busy(0, 1, &mut out).unwrap();
            } else {
                r.driver.poll_into(0, 1, &mut out).unwrap();
            }
            std::thread::yield_now();
        }
        assert!(matches!(out[0].1, Ok(Completion::Id(_))));
    }
    r.shared
        .stats
        .interrupts
        .load(std::sync::atomic::Ordering::SeqCst)
        - before
}

#[test]
fn busy_polling_leaves_interrupts_off_and_plain_polling_rearms_them() {
    let r = rig(Setup::default(), direct).unwrap();
    let plain = interrupts_while_spinning(&r, 20, false);
    let busy = interrupts_while_spinning(&r, 20, true);
    assert!(plain >= 10, "poll_into re-arms notifications: {plain} interrupts");
    assert!(busy <= 1, "poll_busy leaves them off: {busy} interrupts");
    // A waiter turns them back on before it sleeps.
    r.driver.submit(0, Request::GetId).unwrap();
    r.driver.kick(0).unwrap();
    assert!(r.driver.wait(0, LONG).unwrap(), "wait re-arms and wakes");
}

/// Blocking calls that spin first take completions without interrupts; without
/// spinning every call sleeps on one.
#[test]
fn blocking_calls_that_spin_take_completions_without_interrupts() {
    let interrupts = |spin: Duration| {
        let setup = Setup {
            opts: BlkOptions {
                spin,
                timeout: LONG,
                ..BlkOptions::default()
            },
            ..Setup::default()
        };
        let r = rig(setup, direct).unwrap();
        let before = r
            .shared
            .stats
            .interrupts
            .load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..20 {
            assert_eq!(r.driver.get_id_blocking(0).unwrap(), "fake-disk-01");
        }
        r.shared
            .stats
            .interrupts
            .load(std::sync::atomic::Ordering::SeqCst)
            - before
    };
    let sleeping = interrupts(Duration::ZERO);
    let spinning = interrupts(Duration::from_secs(1));
    assert!(
        sleeping >= 10,
        "a sleeping caller is woken by interrupts: {sleeping}"
    );
    assert!(spinning <= 1, "a spinning caller needs none: {spinning}");
}

#[test]
fn the_queue_reports_full_and_recovers() {
    let setup = Setup {
        queue_size: 4,
        ..Setup::default()
    };
    let r = rig(setup, direct).unwrap();
    behave(&r.shared, |b| b.reverse = 100);
    let mut n = 0;
    loop {
        match r.driver.submit(0, Request::GetId) {
            Ok(_) => n += 1,
            Err(BlkError::QueueFull) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(n, 4, "one slot per ring entry with indirect descriptors");
    r.driver.kick(0).unwrap();
    behave(&r.shared, |b| b.reverse = 1);
    let mut done = 0;
    while done < 4 {
        r.driver.wait(0, LONG).unwrap();
        done += r.driver.poll(0, 8).unwrap().len();
    }
    assert!(r.driver.submit(0, Request::GetId).is_ok());
}

#[test]
fn device_errors_come_back_typed_and_the_queue_keeps_working() {
    let r = rig(Setup::default(), direct).unwrap();
    behave(&r.shared, |b| {
        b.ioerr_sector = Some(3);
        b.unsupp_get_id = true;
    });
    let mut buf = [0u8; 1024];
    assert!(matches!(
        r.driver.read_bytes_blocking(0, 2, &mut buf),
        Err(BlkError::IoError)
    ));
    assert!(matches!(
        r.driver.write_bytes_blocking(0, 3, &buf),
        Err(BlkError::IoError)
    ));
    assert!(matches!(r.driver.get_id_blocking(0), Err(BlkError::Unsupported)));
    r.driver.read_bytes_blocking(0, 4, &mut buf).unwrap();
    assert_eq!(r.driver.broken(0).unwrap(), None);
}

#[test]
fn local_checks_refuse_before_the_device_sees_anything() {
    let r = rig(
        Setup {
            read_only: true,
            ..Setup::default()
        },
        direct,
    )
    .unwrap();
    assert!(r.driver.info().read_only);
    let mem = r.guest.memory();
    let buf = guest_buf(mem, 1024);
    assert!(matches!(
        r.driver.write_blocking(0, 0, buf),
        Err(BlkError::ReadOnly)
    ));
    assert!(matches!(
        r.driver.discard_blocking(0, 0, 1),
        Err(BlkError::ReadOnly)
    ));
    assert!(matches!(
        r.driver.write_zeroes_blocking(0, 0, 1, false),
        Err(BlkError::ReadOnly)
    ));
    assert!(matches!(
        r.driver.read_blocking(0, 63, buf),
        Err(BlkError::OutOfRange { .. })
    ));
    assert!(matches!(
        r.driver.read_blocking(0, u64::MAX - 1, buf),
        Err(BlkError::OutOfRange { .. })
    ));
    assert!(matches!(
        r.driver.read_blocking(0, 0, GuestBuf::new(buf.addr, 100)),
        Err(BlkError::BadLength(100))
    ));
    assert!(matches!(
        r.driver.read_blocking(1, 0, buf),
        Err(BlkError::NoSuchQueue(1))
    ));
    assert_eq!(r.shared.stats.requests.load(Ordering::SeqCst), 0);
    // Reads and flushes still work on a read-only disk.
    r.driver.read_blocking(0, 62, buf).unwrap();
    r.driver.flush_blocking(0).unwrap();
}

#[test]
fn a_bogus_status_breaks_the_queue() {
    let r = rig(Setup::default(), direct).unwrap();
    behave(&r.shared, |b| b.bogus_status = Some(7));
    let err = r.driver.flush_blocking(0).unwrap_err();
    assert!(
        matches!(err, BlkError::DeviceBroken(Broken::Status(7))),
        "{err:?}"
    );
    assert_eq!(r.driver.broken(0).unwrap(), Some(Broken::Status(7)));
    behave(&r.shared, |b| b.bogus_status = None);
    assert!(matches!(
        r.driver.flush_blocking(0),
        Err(BlkError::DeviceBroken(_))
    ));
    assert!(matches!(
        r.driver.submit(0, Request::GetId),
        Err(BlkError::DeviceBroken(_))
    ));
}

#[test]
fn a_bogus_used_length_breaks_the_queue() {
    let r = rig(Setup::default(), direct).unwrap();
    // A successful read must report data + status.
    behave(&r.shared, |b| b.bogus_len = Some(1));
    let mut buf = [0u8; 512];
    let err = r.driver.read_bytes_blocking(0, 0, &mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            BlkError::DeviceBroken(Broken::UsedLength {
                len: 1,
                writable: 513
            })
        ),
        "{err:?}"
    );
}

#[test]
fn a_zero_used_length_breaks_the_queue_and_fails_everything_in_flight() {
    let r = rig(Setup::default(), direct).unwrap();
    behave(&r.shared, |b| {
        b.bogus_len = Some(0);
        b.reverse = 3;
    });
    for _ in 0..3 {
        r.driver.submit(0, Request::GetId).unwrap();
    }
    r.driver.kick(0).unwrap();
    let mut results = Vec::new();
    while results.len() < 3 {
        match r.driver.wait(0, LONG) {
            Ok(true) | Err(BlkError::DeviceBroken(_)) => {}
            other => panic!("{other:?}"),
        }
        results.extend(r.driver.poll(0, 8).unwrap());
    }
    let broken = results
        .iter()
        .filter(|(_, r)| matches!(r, Err(BlkError::DeviceBroken(Broken::UsedLength { len: 0, .. }))))
        .count();
    let earlier = results
        .iter()
        .filter(|(_, r)| matches!(r, Err(BlkError::DeviceBroken(Broken::Earlier))))
        .count();
    assert_eq!((broken, earlier), (1, 2));
    assert!(matches!(r.driver.wait(0, LONG), Err(BlkError::DeviceBroken(_))));
}

#[test]
fn blocking_calls_time_out_and_the_slot_is_reclaimed_later() {
    let setup = Setup {
        opts: BlkOptions {
            timeout: Some(Duration::from_millis(50)),
            ..BlkOptions::default()
        },
        ..Setup::default()
    };
    let r = rig(setup, direct).unwrap();
    behave(&r.shared, |b| b.reverse = 2);
    let mut buf = [0u8; 512];
    assert!(matches!(
        r.driver.read_bytes_blocking(0, 0, &mut buf),
        Err(BlkError::TimedOut)
    ));
    // The second request releases both; the abandoned one frees its slot quietly.
    r.driver.flush_blocking(0).unwrap();
    behave(&r.shared, |b| b.reverse = 1);
    r.driver.read_bytes_blocking(0, 0, &mut buf).unwrap();
    // Reclaimed: with the device holding everything, the queue takes a request per
    // ring entry again, the timed-out one's slot included.
    behave(&r.shared, |b| b.reverse = 100);
    let depth = r.driver.queue_size(0).unwrap();
    let mut n = 0;
    loop {
        match r.driver.submit(0, Request::GetId) {
            Ok(_) => n += 1,
            Err(BlkError::QueueFull) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        n, depth,
        "every slot free again after the timed-out request came back"
    );
}

#[test]
fn many_threads_share_a_small_queue() {
    let setup = Setup {
        queue_size: 4,
        ..Setup::default()
    };
    let r = rig(setup, direct).unwrap();
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let d = &r.driver;
            s.spawn(move || {
                for i in 0..40u64 {
                    let sector = t * 8 + i % 8;
                    let data = pattern(sector + i, 512);
                    d.write_bytes_blocking(0, sector, &data).unwrap();
                    let mut got = [0u8; 512];
                    d.read_bytes_blocking(0, sector, &mut got).unwrap();
                    assert_eq!(&got[..], &data[..]);
                }
            });
        }
    });
}

#[test]
fn multiqueue_uses_each_queue() {
    let setup = Setup {
        queues: 2,
        opts: BlkOptions {
            queues: 4,
            ..BlkOptions::default()
        },
        ..Setup::default()
    };
    let r = rig(setup, copy).unwrap();
    assert_eq!(r.driver.num_queues(), 2);
    r.driver.write_bytes_blocking(1, 9, &pattern(9, 512)).unwrap();
    let mut got = [0u8; 512];
    r.driver.read_bytes_blocking(0, 9, &mut got).unwrap();
    assert_eq!(&got[..], &pattern(9, 512)[..]);
}

#[test]
fn a_device_queue_too_small_for_a_request_fails_setup() {
    // A request needs up to three descriptors; a 2-entry queue cannot carry one.
    let tiny = Setup {
        queue_size: 2,
        ..Setup::default()
    };
    assert!(matches!(
        rig(tiny, direct),
        Err(BlkError::Setup(SetupError::NoQueue(0)))
    ));
}

#[test]
fn dropping_the_driver_resets_the_device_and_frees_request_memory() {
    let r = rig(Setup::default(), direct).unwrap();
    let mem = r.guest.memory().clone();
    let mut buf = [0u8; 8192];
    r.driver.read_bytes_blocking(0, 0, &mut buf).unwrap();
    let before = mem.free_bytes();
    let shared = r.shared.clone();
    drop(r.driver);
    // Slots (16 x 64 bytes) and the 8 KiB staging buffer came back (and whatever the
    // model's share frees on its own drop).
    assert!(mem.free_bytes() >= before + 16 * 64 + 8192);
    drop(shared);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_calls_complete_through_the_runner() {
    let r = rig(Setup::default(), direct).unwrap();
    let driver = std::sync::Arc::new(r.driver);
    let d = &*driver;
    // Its own task: a blocking call below must not block the runner too.
    let runner = tokio::spawn({
        let driver = driver.clone();
        async move { driver.run_completions(0).await }
    });
    {
        d.write_bytes(0, 1, &pattern(1, 1024)).await.unwrap();
        behave(&r.shared, |b| b.reverse = 3);
        let mut a = [0u8; 512];
        let mut b = [0u8; 512];
        let (x, y, id) = tokio::join!(
            d.read_bytes(0, 1, &mut a),
            d.read_bytes(0, 2, &mut b),
            d.get_id(0)
        );
        x.unwrap();
        y.unwrap();
        assert_eq!(id.unwrap(), "fake-disk-01");
        assert_eq!(&a[..], &pattern(1, 1024)[..512]);
        assert_eq!(&b[..], &pattern(1, 1024)[512..]);
        behave(&r.shared, |b| b.reverse = 1);
        d.flush(0).await.unwrap();
        d.discard(0, 1, 1).await.unwrap();
        d.write_zeroes(0, 2, 1, false).await.unwrap();
        let g = guest_buf(r.guest.memory(), 1024);
        d.read(0, 1, g).await.unwrap();
        d.write(0, 1, g).await.unwrap();
        let mut got = [1u8; 1024];
        r.guest.memory().read(g.addr, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0));
        // Blocking callers on other threads are served by the runner too.
        tokio::task::block_in_place(|| d.get_id_blocking(0)).unwrap();
    }
    runner.abort();
    assert!(runner.await.unwrap_err().is_cancelled());
    // With the runner gone, blocking callers take the interrupt back.
    d.flush_blocking(0).unwrap();
}

#[tokio::test]
async fn a_dropped_future_leaves_its_request_to_the_driver() {
    let r = rig(Setup::default(), direct).unwrap();
    let d = &r.driver;
    behave(&r.shared, |b| b.reverse = 2);
    let runner = d.run_completions(0);
    tokio::pin!(runner);
    // Poll the runner once: it claims the queue before its first await.
    tokio::select! {
        biased;
        r = &mut runner => panic!("{r:?}"),
        _ = async {} => {}
    }
    assert!(matches!(
        d.run_completions(0).await,
        Err(BlkError::RunnerActive(0))
    ));
    let mut buf = [0u8; 4096];
    // Never completes alone (the device holds one request): give up on it.
    let read = d.read_bytes(0, 0, &mut buf);
    let timed_out = tokio::time::timeout(Duration::from_millis(30), async {
        tokio::select! {
            r = &mut runner => panic!("{r:?}"),
            r = read => r,
        }
    })
    .await;
    assert!(timed_out.is_err());
    // The next request releases both; the abandoned slot and staging are reclaimed.
    tokio::select! {
        r = &mut runner => panic!("{r:?}"),
        r = d.flush(0) => r.unwrap(),
    }
}
