//! The block benchmark behind `vio blk-bench`: our virtio-blk path against `fio` on
//! the same file in the same run.
//!
//! Ours: a polling split-ring driver over sharing model 2 sends 4 KiB requests to
//! [`BlkDevice`] (io_uring engine, O_DIRECT) through the in-process transport. fio:
//! `ioengine=io_uring`, `direct=1`, the same file, block size, queue depth and
//! pattern. Workloads: random reads at QD1 and QD32, random writes at QD32, and a
//! write followed by a flush at QD1 (each flush an `fdatasync` on both sides).

use crate::conformance::Fixture;
use crate::models;
use crate::report::{Cell, Table, median};
use backend_host::blk::device::{BlkDevice, BlkSettings, EngineChoice, Runtime};
use backend_host::blk::disk::{Disk, DiskOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use transport_descriptors::direct::{DirectDevice, DirectDriver};
use virtio_core::blk::{self, BlkFeatures, BlkReqHeader};
use virtio_core::features::Features;
use virtio_core::lifecycle::{driver_ok, initialize};
use virtio_core::transport::{InProcessTransport, Transport};
use virtio_core::{DriverModel, GuestBuf, SplitDriver};
use zerocopy::IntoBytes;

/// One workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// 4 KiB random reads.
    RandRead,
    /// 4 KiB random writes.
    RandWrite,
    /// A 4 KiB write, then a flush, one at a time.
    WriteFlush,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::RandRead => "4k randread",
            Workload::RandWrite => "4k randwrite",
            Workload::WriteFlush => "4k write + flush",
        }
    }

    fn fio_rw(self) -> &'static str {
        match self {
            Workload::RandRead => "randread",
            Workload::RandWrite | Workload::WriteFlush => "randwrite",
        }
    }
}

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct BlkBenchConfig {
    /// The image file (created and filled if missing or too small). Must be on a
    /// filesystem that does O_DIRECT for real (not tmpfs).
    pub image: PathBuf,
    /// Image size in bytes.
    pub size: u64,
    /// Seconds per run.
    pub run_time: Duration,
    /// Repetitions (medians are reported).
    pub reps: usize,
    /// The device's adaptive-polling budget.
    pub poll: Duration,
}

impl BlkBenchConfig {
    /// Defaults: a 256 MiB image under `target/`, 3 s per run, 3 repetitions.
    pub fn full() -> Self {
        BlkBenchConfig {
            image: PathBuf::from("target/vio-blk-bench.img"),
            size: 256 << 20,
            run_time: Duration::from_secs(3),
            reps: 3,
            poll: Duration::from_micros(100),
        }
    }
}

/// Creates the image with every block written, so reads hit the disk rather than
/// holes.
pub fn prepare_image(path: &Path, size: u64) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= size) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(path)?;
    let mut done = 0;
    while done < size {
        std::io::Write::write_all(&mut f, &chunk)?;
        done += chunk.len() as u64;
    }
    f.sync_all()
}

/// IOPS of one fio run on the image, or an error if fio is missing or fails.
pub fn fio_iops(cfg: &BlkBenchConfig, w: Workload, depth: u32) -> std::io::Result<f64> {
    {
        let mut cmd = Command::new("fio");
        cmd.args([
            "--name=vio",
            "--ioengine=io_uring",
            "--direct=1",
            "--bs=4k",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", cfg.image.display()))
        .arg(format!("--size={}", cfg.size))
        .arg(format!("--rw={}", w.fio_rw()))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={}ms", cfg.run_time.as_millis()));
        if w == Workload::WriteFlush {
            cmd.arg("--fdatasync=1");
        }
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)?;
        let job = &v["jobs"][0];
        let iops = match w {
            Workload::RandRead => job["read"]["iops"].as_f64(),
            _ => job["write"]["iops"].as_f64(),
        };
        iops.ok_or_else(|| std::io::Error::other("fio output has no iops"))
    }
}

type Dev = BlkDevice<DirectDevice>;

/// Our stack: a polling driver and the device behind the in-process transport.
struct Ours {
    transport: InProcessTransport<Dev>,
    guest: std::sync::Arc<hypervisor::Domain>,
    ring: SplitDriver<<DirectDriver as DriverModel>::Share, u32>,
}

fn ours(cfg: &BlkBenchConfig, depth: u16) -> Ours {
    let Fixture {
        guest,
        driver,
        device,
    } = models::direct();
    let disk = Disk::open(&cfg.image, DiskOptions::default()).expect("O_DIRECT image");
    let settings = BlkSettings {
        engine: EngineChoice::Uring,
        queue_size: 256,
        poll: cfg.poll,
        ..BlkSettings::default()
    };
    let dev = BlkDevice::new(disk, device, settings, Runtime::OwnThreads);
    let transport = InProcessTransport::new(dev.lifecycle(), dev).expect("transport");
    let wanted = BlkFeatures::all().bits() | Features::EVENT_IDX.bits();
    let features =
        initialize(&transport, blk::DEVICE_ID, wanted, blk::BLK_DEPENDENCIES).expect("negotiation");
    let size = depth.max(2).next_power_of_two().max(64) * 2;
    let q = driver.create_queue(0, size).expect("queue");
    transport.setup_queue(0, size, q.addrs).expect("queue registers");
    driver_ok(&transport).expect("DRIVER_OK");
    let ring = SplitDriver::new(size, q.ring, q.share, Features::from_bits_retain(features)).expect("ring");
    Ours {
        transport,
        guest,
        ring,
    }
}

/// A request slot: header, data and status buffers in guest memory.
struct Slot {
    hdr: GuestBuf,
    data: GuestBuf,
    status: GuestBuf,
}

/// IOPS of our stack for one run, and (for write + flush) each flush's latency in
/// microseconds, from submission to the driver seeing it used.
fn ours_iops(cfg: &BlkBenchConfig, w: Workload, depth: u32) -> (f64, Vec<f64>) {
    let mut o = ours(cfg, u16::try_from(depth).unwrap_or(256));
    let mem = o.guest.memory().clone();
    let slots: Vec<Slot> = (0..depth)
        .map(|_| Slot {
            hdr: GuestBuf::new(mem.alloc(16, 16).expect("mem"), 16),
            data: GuestBuf::new(mem.alloc(4096, 4096).expect("mem"), 4096),
            status: GuestBuf::new(mem.alloc(1, 1).expect("mem"), 1),
        })
        .collect();
    let blocks = cfg.size / 4096;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_block = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % blocks
    };
    o.ring.disable_notifications();
    let submit = |o: &mut Ours, slot: u32, ty: u32, sector: u64| {
        let s = &slots[slot as usize];
        mem.write(s.hdr.addr, BlkReqHeader::new(ty, sector).as_bytes())
            .expect("header");
        let r = match ty {
            blk::VIRTIO_BLK_T_IN => o.ring.add(&[s.hdr], &[s.data, s.status], slot),
            blk::VIRTIO_BLK_T_FLUSH => o.ring.add(&[s.hdr], &[s.status], slot),
            _ => o.ring.add(&[s.hdr, s.data], &[s.status], slot),
        };
        r.expect("queue sized for the depth");
    };
    let kick = |o: &mut Ours| {
        if o.ring.kick_prepare() {
            o.transport.notify_queue(0).expect("kick");
        }
    };
    let ty = match w {
        Workload::RandRead => blk::VIRTIO_BLK_T_IN,
        _ => blk::VIRTIO_BLK_T_OUT,
    };
    // Warm up, then measure.
    let mut done = 0u64;
    let mut flushing: Vec<Option<Instant>> = vec![None; depth as usize];
    let mut flush_us = Vec::new();
    for slot in 0..depth {
        submit(&mut o, slot, ty, next_block() * 8);
    }
    kick(&mut o);
    let start = Instant::now();
    let mut measured_from = None;
    loop {
        let Some(u) = o.ring.pop_used().expect("sane device") else {
            // A polite poller: the device worker may share this core.
            std::thread::yield_now();
            continue;
        };
        let slot = u.token;
        let mut st = [0u8];
        mem.read(slots[slot as usize].status.addr, &mut st)
            .expect("status");
        assert_eq!(st[0], blk::VIRTIO_BLK_S_OK, "request failed");
        let elapsed = start.elapsed();
        if w == Workload::WriteFlush {
            match flushing[slot as usize].take() {
                // The write is done; its flush follows before the slot counts.
                None => {
                    flushing[slot as usize] = Some(Instant::now());
                    submit(&mut o, slot, blk::VIRTIO_BLK_T_FLUSH, 0);
                    kick(&mut o);
                    continue;
                }
                Some(t) if measured_from.is_some() => flush_us.push(t.elapsed().as_secs_f64() * 1e6),
                Some(_) => {}
            }
        }
        match measured_from {
            None if elapsed >= Duration::from_millis(200) => measured_from = Some((Instant::now(), done)),
            Some((t0, d0)) if t0.elapsed() >= cfg.run_time => {
                return ((done - d0) as f64 / t0.elapsed().as_secs_f64(), flush_us);
            }
            _ => {}
        }
        done += 1;
        submit(&mut o, slot, ty, next_block() * 8);
        kick(&mut o);
    }
}

/// Latencies in microseconds of raw `fdatasync` calls, each after a 4 KiB O_DIRECT
/// write at a random block of the image: the floor our FLUSH is measured against.
pub fn raw_fdatasync_us(cfg: &BlkBenchConfig) -> std::io::Result<Vec<f64>> {
    use backend_host::blk::engine::AlignedBuf;
    use std::os::unix::fs::OpenOptionsExt;
    let direct = i32::try_from(rustix::fs::OFlags::DIRECT.bits()).map_err(std::io::Error::other)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(direct)
        .open(&cfg.image)?;
    let mut buf = AlignedBuf::new(4096, 4096);
    buf.as_mut_slice().fill(0x77);
    let blocks = cfg.size / 4096;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut out = Vec::new();
    let start = Instant::now();
    while start.elapsed() < cfg.run_time * u32::try_from(cfg.reps).unwrap_or(1) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rustix::io::pwrite(&file, buf.as_slice(), (rng % blocks) * 4096)?;
        let t = Instant::now();
        rustix::fs::fdatasync(&file)?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

/// Runs every workload on both stacks and returns the table.
pub fn run(cfg: &BlkBenchConfig) -> std::io::Result<Table> {
    prepare_image(&cfg.image, cfg.size)?;
    let mut rows = Vec::new();
    let mut flush_us = Vec::new();
    for (w, depth) in [
        (Workload::RandRead, 1),
        (Workload::RandRead, 32),
        (Workload::RandWrite, 32),
        (Workload::WriteFlush, 1),
    ] {
        // Alternate the two, so drift in the shared disk's speed hits both alike.
        let (mut fio, mut ours) = (Vec::new(), Vec::new());
        for rep in 1..=cfg.reps {
            tracing::info!("{} QD{depth}: repetition {rep}/{}", w.label(), cfg.reps);
            fio.push(fio_iops(cfg, w, depth)?);
            let (iops, flushes) = ours_iops(cfg, w, depth);
            ours.push(iops);
            flush_us.extend(flushes);
        }
        let (fio, ours) = (median(&mut fio), median(&mut ours));
        rows.push(vec![
            Cell::Text(format!("{}, IOPS (peer: fio)", w.label())),
            Cell::Int(u64::from(depth)),
            Cell::Num(ours),
            Cell::Num(fio),
            Cell::Text(format!("{:.2}x", ours / fio)),
        ]);
    }
    tracing::info!("flush latency: raw fdatasync on the image");
    let mut raw_us = raw_fdatasync_us(cfg)?;
    let (ours_p50, raw_p50) = (median(&mut flush_us), median(&mut raw_us));
    rows.push(vec![
        Cell::Text("flush after a 4k write, p50 us (peer: raw fdatasync)".into()),
        Cell::Int(1),
        Cell::Num(ours_p50),
        Cell::Num(raw_p50),
        Cell::Text(format!("{:+.1} us", ours_p50 - raw_p50)),
    ]);
    Ok(Table {
        title: format!(
            "virtio-blk over model 2 vs fio (io_uring, O_DIRECT), {} image, {} s runs, medians of {}",
            crate::report::fmt_int(cfg.size >> 20) + " MiB",
            cfg.run_time.as_secs_f64(),
            cfg.reps
        ),
        columns: ["workload", "QD", "ours", "peer", "ours vs peer"]
            .map(String::from)
            .to_vec(),
        rows,
        notes: vec![
            format!(
                "image {}; write + flush: IOPS count write+flush pairs (fio --fdatasync=1)",
                cfg.image.display()
            ),
            format!(
                "ours: polling driver, device adaptive polling {} us",
                cfg.poll.as_micros()
            ),
        ],
    })
}
