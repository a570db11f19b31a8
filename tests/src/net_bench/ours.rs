//! Our side: guest A streams frames to guest B through drivers, devices and the
//! switch.

use super::{
    Counted, JUMBO_FRAME, MTU_FRAME, Model, NetBenchConfig, NetBenchError, SMALL_FRAME, STOP_CHECK, Stream,
    Tid, tasks, window, worker_tid,
};
use crate::conformance::Fixture;
use crate::models;
use crate::net_rig::{self, Dev, NetGuest};
use backend_host::net::{NetDevice, NetSettings, Switch, SwitchConfig};
use drivers_net::{NetDriver, NetError, NetOptions};
use hypervisor::Hypervisor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use transport_shared_page::SharedPageConfig;
use virtio_core::transport::InProcessTransport;
use virtio_core::{DriverModel, DriverShare};

/// One guest plugged into the switch, and its device's worker thread if it could
/// be told apart.
struct Guest<D: DriverModel, V: Dev> {
    g: NetGuest<D, V>,
    worker: Option<i32>,
}

impl<D: DriverModel, V: Dev> std::ops::Deref for Guest<D, V> {
    type Target = NetGuest<D, V>;
    fn deref(&self) -> &NetGuest<D, V> {
        &self.g
    }
}

fn plug<D: DriverModel, V: Dev>(
    f: Fixture<D, V>,
    switch: &Arc<Switch>,
    settings: NetSettings,
    opts: NetOptions,
) -> Result<Guest<D, V>, NetBenchError> {
    let before = tasks();
    // The worker starts at DRIVER_OK, inside the driver's set-up.
    let g = net_rig::plug(f, switch, settings, opts).map_err(|e| NetBenchError::Guest(Box::new(e)))?;
    let worker = worker_tid(g.port, &before);
    Ok(Guest { g, worker })
}

/// An Ethernet frame of `len` bytes from `src` to `dst` (local experimental
/// ethertype).
fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = [&dst[..], &src[..], &[0x88, 0xb5]].concat();
    f.resize(len.max(f.len()), 0x5a);
    f
}

/// MTU the devices get for frames of `len` bytes: the standard one unless the
/// frame needs more.
fn mtu_for(len: usize) -> u16 {
    u16::try_from(len.saturating_sub(14))
        .unwrap_or(u16::MAX)
        .max(1500)
}

/// Guest memory of the shared-page fixture: its region holds a bounce area per
/// queue large enough for a full queue of the largest frames.
const SHARED_PAGE_GUEST: u64 = 256 << 20;

/// Model 1 with a bounce area that holds a full queue of `frame`-byte frames: the
/// bounce allocator rounds each buffer up to a power of two, and a transmit buffer
/// stays allocated until the driver reclaims its slot.
fn shared_page(
    frame: usize,
    cfg: &NetBenchConfig,
) -> Result<
    Fixture<transport_shared_page::SharedPageDriver, transport_shared_page::SharedPageDevice>,
    NetBenchError,
> {
    let hv = Hypervisor::new();
    let guest = hv
        .create_domain("net-bench", SHARED_PAGE_GUEST)
        .map_err(|e| NetBenchError::Guest(Box::new(e)))?;
    let rx_buf = cfg.rx_buf_len.map_or(0, |l| l as usize);
    let per_buffer = (12 + frame).max(rx_buf).next_power_of_two().max(4096) as u64;
    let cfg = SharedPageConfig {
        max_queue_size: cfg.queue_size,
        bounce_bytes_per_queue: per_buffer * u64::from(cfg.queue_size),
        ..SharedPageConfig::default()
    };
    let (driver, device) =
        transport_shared_page::pair(&guest, cfg).map_err(|e| NetBenchError::Guest(Box::new(e)))?;
    Ok(Fixture {
        guest,
        driver,
        device,
    })
}

/// One run of our path: A streams `frame`-byte frames to B over `model`.
pub fn stream_ours(model: Model, len: usize, cfg: &NetBenchConfig) -> Result<Stream, NetBenchError> {
    if !(SMALL_FRAME..=JUMBO_FRAME).contains(&len) {
        return Err(NetBenchError::FrameLength(len));
    }
    match model {
        Model::SharedPage => stream_over(shared_page(len, cfg)?, shared_page(len, cfg)?, len, cfg),
        Model::Direct => stream_over(models::direct(), models::direct(), len, cfg),
        Model::HypervisorCopy => stream_over(models::hypervisor_copy(), models::hypervisor_copy(), len, cfg),
        Model::Grant => stream_over(models::grant(), models::grant(), len, cfg),
    }
}

/// One run of the TCP row over `model`: a bulk TCP stream between two smoltcp
/// guests.
pub fn stream_tcp(model: Model, cfg: &NetBenchConfig) -> Result<Stream, NetBenchError> {
    match model {
        Model::SharedPage => {
            super::tcp::stream_tcp(shared_page(MTU_FRAME, cfg)?, shared_page(MTU_FRAME, cfg)?, cfg)
        }
        Model::Direct => super::tcp::stream_tcp(models::direct(), models::direct(), cfg),
        Model::HypervisorCopy => {
            super::tcp::stream_tcp(models::hypervisor_copy(), models::hypervisor_copy(), cfg)
        }
        Model::Grant => super::tcp::stream_tcp(models::grant(), models::grant(), cfg),
    }
}

fn stream_over<D, V>(
    fa: Fixture<D, V>,
    fb: Fixture<D, V>,
    len: usize,
    cfg: &NetBenchConfig,
) -> Result<Stream, NetBenchError>
where
    // Sender and receiver share one driver each with the threads that use it.
    D: DriverModel + Sync,
    D::Share: Send,
    <D::Share as DriverShare>::Token: Send,
    V: Dev,
{
    let switch = Switch::new(SwitchConfig::default());
    let settings = NetSettings {
        mtu: mtu_for(len),
        queue_size: cfg.queue_size,
        poll: cfg.device_poll,
        ..NetSettings::default()
    };
    let opts = cfg.driver_options();
    let a = plug(fa, &switch, settings.clone(), opts.clone())?;
    let b = plug(fb, &switch, settings, opts)?;
    // B announces itself so the stream is switched as unicast, not flooded.
    b.nic.send_blocking(
        &frame([0xff; 6], b.mac, SMALL_FRAME),
        Some(Duration::from_secs(5)),
    )?;
    let features = a.nic.info().features;
    let data = frame(b.mac, a.mac, len);
    let stop = AtomicBool::new(false);
    let counted = Counted::default();
    let (send_tid, recv_tid) = (Tid::default(), Tid::default());
    let drops = || {
        [a.port, b.port]
            .iter()
            .filter_map(|&p| switch.stats(p))
            .map(|s| s.drops.total())
            .sum::<u64>()
    };
    let result = std::thread::scope(|s| {
        let receiver = std::thread::Builder::new()
            .name("vio-nb-recv".into())
            .spawn_scoped(s, || {
                recv_tid.set();
                receive(&b.nic, len, cfg.poll_budget, &counted, &stop)
            });
        let sender = std::thread::Builder::new()
            .name("vio-nb-send".into())
            .spawn_scoped(s, || {
                send_tid.set();
                send(&a.nic, &data, &stop)
            });
        let stream = (receiver.is_ok() && sender.is_ok()).then(|| {
            // Both publish their ids first thing.
            while send_tid.get().is_none() || recv_tid.get().is_none() {
                std::thread::yield_now();
            }
            let threads = [
                ("send", send_tid.get()),
                ("dev A", a.worker),
                ("dev B", b.worker),
                ("recv", recv_tid.get()),
            ];
            window(cfg, &threads, || {
                let (f, b) = counted.get();
                (f, b, drops())
            })
        });
        stop.store(true, Ordering::Relaxed);
        let mut outcome = Ok(());
        for h in [receiver, sender] {
            let r = match h {
                Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                Err(e) => Err(NetBenchError::Thread(e)),
            };
            outcome = outcome.and(r);
        }
        outcome.map(|()| Stream {
            features: Some(features),
            ..stream.unwrap_or_default()
        })
    });
    for p in [a.port, b.port] {
        if let Some(stats) = switch.stats(p) {
            tracing::debug!(port = %p, ?stats.drops, tx = stats.tx_frames, rx = stats.rx_frames, "port counters");
        }
    }
    // B first: its driver resets its device, so A's last frames meet a stopped port.
    drop(b);
    drop(a);
    result
}

/// Sends `data` until `stop`, sleeping on the transmit interrupt while the queue is
/// full.
fn send<D: DriverModel, V: Dev>(
    nic: &NetDriver<D, InProcessTransport<NetDevice<V>>>,
    data: &[u8],
    stop: &AtomicBool,
) -> Result<(), NetBenchError> {
    while !stop.load(Ordering::Relaxed) {
        match nic.send_blocking(data, Some(STOP_CHECK)) {
            Ok(()) | Err(NetError::QueueFull) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives until `stop`, `budget` frames per poll, sleeping on the receive
/// interrupt when nothing is there.
fn receive<D: DriverModel, V: Dev>(
    nic: &NetDriver<D, InProcessTransport<NetDevice<V>>>,
    len: usize,
    budget: usize,
    counted: &Counted,
    stop: &AtomicBool,
) -> Result<(), NetBenchError> {
    while !stop.load(Ordering::Relaxed) {
        let (mut frames, mut bytes, mut wrong) = (0u64, 0u64, None);
        nic.poll_recv(budget, |f| {
            if f.len() == len {
                frames += 1;
                bytes += f.len() as u64;
            } else {
                wrong = Some(f.len());
            }
        })?;
        if let Some(got) = wrong {
            return Err(NetBenchError::WrongFrame { got, sent: len });
        }
        counted.add(frames, bytes);
        if frames == 0 {
            nic.wait_rx(Some(STOP_CHECK))?;
        }
    }
    Ok(())
}
