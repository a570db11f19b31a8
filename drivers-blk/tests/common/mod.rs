//! A small, honest virtio-blk device for the driver's tests: it serves requests from
//! an in-memory disk over any sharing model's device side, validating requests the
//! way a real device must (virtio 1.2 §5.2.6, HOSTILE rules 13-19), and can be told
//! to misbehave.

#![allow(dead_code)]

use drivers_blk::{BlkDriver, BlkError, BlkOptions};
use hypervisor::{Domain, Hypervisor};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use virtio_core::blk::{
    BLK_DEPENDENCIES, BlkConfig, BlkDiscardWriteZeroes, BlkFeatures, BlkReqHeader, DEVICE_ID, GET_ID_LEN,
    SECTOR_SIZE, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    encode_device_id,
};
use virtio_core::config::ConfigSpace;
use virtio_core::features::Features;
use virtio_core::lifecycle::DeviceLifecycle;
use virtio_core::notify::{EventFdNotifier, Notify, Wait};
use virtio_core::ring::chain::Chain;
use virtio_core::transport::{ActiveQueue, DeviceHandler, InProcessTransport};
use virtio_core::{DeviceMemory, DeviceModel, DriverModel, SplitDevice};
use zerocopy::{FromBytes, IntoBytes};

/// How the fake misbehaves; changed by tests while it runs.
#[derive(Debug, Default, Clone)]
pub struct Behaviour {
    /// Hold used chains until this many are collected, then return them newest
    /// first (out of order). 0 or 1: return each at once.
    pub reverse: usize,
    /// Reads and writes touching this sector fail with IOERR.
    pub ioerr_sector: Option<u64>,
    /// GET_ID answers UNSUPP.
    pub unsupp_get_id: bool,
    /// Status byte written instead of the real one.
    pub bogus_status: Option<u8>,
    /// Used length reported instead of the real one.
    pub bogus_len: Option<u32>,
}

/// What the fake counted.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub flushes: AtomicU64,
    /// Used-buffer notifications sent.
    pub interrupts: AtomicU64,
}

pub struct Shared {
    pub disk: Mutex<Vec<u8>>,
    pub behaviour: Mutex<Behaviour>,
    pub stats: Stats,
    pub read_only: bool,
    pub id: [u8; GET_ID_LEN],
}

/// The fake device: one worker thread per active queue.
pub struct FakeBlk<M: DeviceModel> {
    model: Arc<M>,
    pub shared: Arc<Shared>,
    workers: Vec<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl<M> DeviceHandler for FakeBlk<M>
where
    M: DeviceModel + Send + Sync + 'static,
    M::Memory: Send + 'static,
{
    fn activate(
        &mut self,
        features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        for q in queues {
            let dq = self.model.open_queue(q.index, q.layout.size, q.addrs())?;
            let dev = SplitDevice::new(
                q.layout.size,
                &dq.ring,
                dq.memory,
                Features::from_bits_retain(features),
            )?;
            let stop = Arc::new(AtomicBool::new(false));
            let (s, shared) = (stop.clone(), self.shared.clone());
            let handle = std::thread::spawn(move || serve(dev, q.kick, q.interrupt, &shared, &s));
            self.workers.push((stop, handle));
        }
        Ok(())
    }

    fn reset(&mut self) {
        for (stop, handle) in self.workers.drain(..) {
            stop.store(true, Ordering::SeqCst);
            let _ = handle.join();
        }
    }
}

impl<M: DeviceModel> Drop for FakeBlk<M> {
    fn drop(&mut self) {
        for (stop, handle) in self.workers.drain(..) {
            stop.store(true, Ordering::SeqCst);
            let _ = handle.join();
        }
    }
}

fn serve<M: DeviceMemory>(
    mut dev: SplitDevice<M>,
    kick: EventFdNotifier,
    irq: EventFdNotifier,
    shared: &Shared,
    stop: &AtomicBool,
) {
    let mut held: Vec<(u16, u32)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let _ = kick.wait(Some(Duration::from_millis(2)));
        loop {
            match dev.pop() {
                Ok(Some(chain)) => {
                    let len = serve_one(&chain, dev.memory(), shared);
                    held.push((chain.head(), len));
                }
                Ok(None) => break,
                Err(virtio_core::ring::split::DeviceQueueError::NeedsReset(_)) => return,
                Err(_) => continue,
            }
        }
        let batch = shared.behaviour.lock().unwrap().reverse.max(1);
        if held.len() >= batch {
            held.reverse();
            dev.add_used_batch(held.drain(..))
                .expect("fake returns only chains it holds");
            if dev.needs_notification() {
                shared.stats.interrupts.fetch_add(1, Ordering::SeqCst);
                irq.notify().unwrap();
            }
        }
    }
}

/// Serves one chain; returns the used length.
fn serve_one<M: DeviceMemory>(chain: &Chain, mem: &M, shared: &Shared) -> u32 {
    shared.stats.requests.fetch_add(1, Ordering::SeqCst);
    let behaviour = shared.behaviour.lock().unwrap().clone();
    let mut reader = chain.reader(mem);
    let mut raw = [0u8; BlkReqHeader::SIZE];
    // §5.2.6: a request without a header or a status byte cannot be answered.
    if reader.read_exact(&mut raw).is_err() || chain.writable_len() == 0 {
        return 0;
    }
    let hdr = BlkReqHeader::read_from_bytes(&raw).unwrap();
    let data_in = chain.writable_len() - 1;
    let mut reply = vec![0u8; data_in as usize];
    let status = execute(&hdr, &mut reader, data_in, &mut reply, shared, &behaviour);
    let status = behaviour.bogus_status.unwrap_or(status);
    let mut w = chain.writer(mem);
    // On failure the data part is zero-filled: nothing stale reaches the driver.
    if status != VIRTIO_BLK_S_OK {
        reply.fill(0);
    }
    w.write_all(&reply).unwrap();
    w.write_all(&[status]).unwrap();
    behaviour.bogus_len.unwrap_or(w.written())
}

fn execute<M: DeviceMemory>(
    hdr: &BlkReqHeader,
    reader: &mut virtio_core::ring::chain::ChainReader<'_, M>,
    data_in: u32,
    reply: &mut [u8],
    shared: &Shared,
    behaviour: &Behaviour,
) -> u8 {
    let sector = hdr.sector.get();
    let mut disk = shared.disk.lock().unwrap();
    let capacity = disk.len() as u64 / SECTOR_SIZE;
    // Checked multiplication: a sector near 2^64 must not wrap (HOSTILE rule 15).
    let range = |sector: u64, bytes: u64| -> Option<std::ops::Range<usize>> {
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(bytes)?;
        let ok = bytes.is_multiple_of(SECTOR_SIZE) && end <= capacity * SECTOR_SIZE;
        ok.then_some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    };
    let hits_bad = |r: &std::ops::Range<usize>| {
        behaviour
            .ioerr_sector
            .is_some_and(|s| r.contains(&us(s * SECTOR_SIZE)))
    };
    match hdr.type_.get() {
        VIRTIO_BLK_T_IN => match range(sector, u64::from(data_in)) {
            Some(r) if !hits_bad(&r) => {
                reply.copy_from_slice(&disk[r]);
                VIRTIO_BLK_S_OK
            }
            _ => VIRTIO_BLK_S_IOERR,
        },
        VIRTIO_BLK_T_OUT => {
            let mut data = vec![0u8; us(reader.remaining())];
            if data_in != 0 || reader.read_exact(&mut data).is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            match range(sector, data.len() as u64) {
                Some(r) if !hits_bad(&r) && !shared.read_only => {
                    disk[r].copy_from_slice(&data);
                    VIRTIO_BLK_S_OK
                }
                _ => VIRTIO_BLK_S_IOERR,
            }
        }
        // §5.2.6.1: FLUSH has no data; sector must be 0.
        VIRTIO_BLK_T_FLUSH if data_in == 0 && reader.remaining() == 0 && sector == 0 => {
            shared.stats.flushes.fetch_add(1, Ordering::SeqCst);
            VIRTIO_BLK_S_OK
        }
        VIRTIO_BLK_T_FLUSH => VIRTIO_BLK_S_IOERR,
        VIRTIO_BLK_T_GET_ID if behaviour.unsupp_get_id => VIRTIO_BLK_S_UNSUPP,
        VIRTIO_BLK_T_GET_ID if data_in as usize == GET_ID_LEN => {
            reply.copy_from_slice(&shared.id);
            VIRTIO_BLK_S_OK
        }
        VIRTIO_BLK_T_GET_ID => VIRTIO_BLK_S_IOERR,
        ty @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
            if shared.read_only {
                return VIRTIO_BLK_S_IOERR;
            }
            let n = reader.remaining();
            if n == 0 || !n.is_multiple_of(16) || data_in != 0 {
                return VIRTIO_BLK_S_UNSUPP;
            }
            for _ in 0..n / 16 {
                let mut raw = [0u8; BlkDiscardWriteZeroes::SIZE];
                reader.read_exact(&mut raw).unwrap();
                let seg = BlkDiscardWriteZeroes::read_from_bytes(&raw).unwrap();
                let flags = seg.flags.get();
                // §5.2.6.2: unmap on DISCARD, or unknown flags: UNSUPP.
                let allowed = if ty == VIRTIO_BLK_T_WRITE_ZEROES {
                    BlkDiscardWriteZeroes::UNMAP
                } else {
                    0
                };
                if flags & !allowed != 0 {
                    return VIRTIO_BLK_S_UNSUPP;
                }
                let bytes = u64::from(seg.num_sectors.get()) * SECTOR_SIZE;
                match range(seg.sector.get(), bytes) {
                    Some(r) => disk[r].fill(0),
                    None => return VIRTIO_BLK_S_IOERR,
                }
            }
            VIRTIO_BLK_S_OK
        }
        _ => VIRTIO_BLK_S_UNSUPP,
    }
}

/// A device with `sectors` sectors, offering everything the driver negotiates.
pub struct Setup {
    pub sectors: u64,
    pub queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    pub offered: BlkFeatures,
    pub opts: BlkOptions,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            sectors: 64,
            queues: 1,
            queue_size: 16,
            read_only: false,
            offered: BlkFeatures::FLUSH
                | BlkFeatures::CONFIG_WCE
                | BlkFeatures::BLK_SIZE
                | BlkFeatures::SEG_MAX
                | BlkFeatures::MQ
                | BlkFeatures::DISCARD
                | BlkFeatures::WRITE_ZEROES,
            opts: BlkOptions::default(),
        }
    }
}

pub type Disk<D, M> = BlkDriver<D, InProcessTransport<FakeBlk<M>>>;

/// Device models the fake can serve from its worker threads.
pub trait Served: DeviceModel<Memory: Send + 'static> + Send + Sync + 'static {}
impl<M: DeviceModel<Memory: Send + 'static> + Send + Sync + 'static> Served for M {}

pub struct Rig<D: DriverModel, M: Served> {
    pub driver: Disk<D, M>,
    pub shared: Arc<Shared>,
    pub guest: Arc<Domain>,
}

/// Builds guest, model pair, fake device, transport and driver.
pub fn rig<D, M>(setup: Setup, pair: impl FnOnce(&Arc<Domain>) -> (D, M)) -> Result<Rig<D, M>, BlkError>
where
    D: DriverModel,
    M: Served,
{
    let hv = Hypervisor::new();
    let guest = hv.create_domain("blk-guest", 8 << 20).unwrap();
    let (dm, devm) = pair(&guest);
    let cfg = BlkConfig {
        capacity: setup.sectors.into(),
        blk_size: 4096.into(),
        seg_max: 1.into(),
        writeback: 1,
        num_queues: setup.queues.into(),
        max_discard_sectors: 32.into(),
        max_discard_seg: 1.into(),
        max_write_zeroes_sectors: 32.into(),
        max_write_zeroes_seg: 1.into(),
        write_zeroes_may_unmap: 1,
        ..BlkConfig::default()
    };
    let mut offered = setup.offered.bits() | (Features::INDIRECT_DESC | Features::EVENT_IDX).bits();
    if setup.read_only {
        offered |= BlkFeatures::RO.bits();
    }
    let shared = Arc::new(Shared {
        disk: Mutex::new(vec![0; us(setup.sectors * SECTOR_SIZE)]),
        behaviour: Mutex::new(Behaviour::default()),
        stats: Stats::default(),
        read_only: setup.read_only,
        id: encode_device_id(b"fake-disk-01"),
    });
    let lifecycle = DeviceLifecycle::new(
        DEVICE_ID,
        offered,
        BLK_DEPENDENCIES,
        ConfigSpace::new(cfg.as_bytes().to_vec()),
        &vec![setup.queue_size; usize::from(setup.queues)],
    );
    let fake = FakeBlk {
        model: Arc::new(devm),
        shared: shared.clone(),
        workers: Vec::new(),
    };
    let transport = InProcessTransport::new(lifecycle, fake).unwrap();
    let driver = BlkDriver::new(transport, dm, guest.memory().clone(), setup.opts)?;
    Ok(Rig {
        driver,
        shared,
        guest,
    })
}

pub fn direct(
    g: &Arc<Domain>,
) -> (
    transport_descriptors::DirectDriver,
    transport_descriptors::DirectDevice,
) {
    transport_descriptors::direct::pair(g).unwrap()
}

pub fn copy(
    g: &Arc<Domain>,
) -> (
    transport_descriptors::CopyDriver,
    transport_descriptors::CopyDevice,
) {
    transport_descriptors::copy::pair(g).unwrap()
}

pub fn behave(shared: &Shared, f: impl FnOnce(&mut Behaviour)) {
    f(&mut shared.behaviour.lock().unwrap());
}

/// A pattern that differs per sector.
pub fn pattern(sector: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let v = sector.wrapping_mul(31).wrapping_add((i / 512 * 7 + i) as u64);
            v.to_le_bytes()[0]
        })
        .collect()
}

/// A test-sized `u64` as a `usize`.
pub fn us(x: u64) -> usize {
    usize::try_from(x).unwrap()
}
