//! The TCP row: a bulk TCP stream between two smoltcp guests ([`crate::smol`]),
//! guest A sending and guest B receiving as fast as their stacks, drivers, devices
//! and the switch allow. Bytes are TCP payload B received in the window (goodput),
//! frames what B's port received meanwhile (segments and acknowledgements both
//! ways are switched, but only B's receive side is counted).

use super::{NetBenchConfig, NetBenchError, Stream};
use crate::conformance::Fixture;
use crate::smol::{self, Dev, Drv, both};
use backend_host::net::{NetSettings, Switch, SwitchConfig};
use smoltcp::socket::tcp;
use smoltcp::wire::Ipv4Address;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const IP_A: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const IP_B: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);
const PORT: u16 = 5001;
/// Socket buffers each way: the largest window without window scaling, about 45
/// full-size segments (see `tests/net_tcp.rs` for why not more).
const TCP_BUF: usize = 65535;
/// How long setting up the connection may take.
const SETUP: Duration = Duration::from_secs(10);

/// One run: A streams to B for the configured time after a warm-up.
pub(super) fn stream_tcp<D1: Drv, V1: Dev, D2: Drv, V2: Dev>(
    fa: Fixture<D1, V1>,
    fb: Fixture<D2, V2>,
    cfg: &NetBenchConfig,
) -> Result<Stream, NetBenchError> {
    let guest = |e: smol::SmolError| NetBenchError::Guest(Box::new(e));
    let switch = Switch::new(SwitchConfig::default());
    let settings = NetSettings {
        queue_size: cfg.queue_size,
        poll: cfg.device_poll,
        ..NetSettings::default()
    };
    // The default driver, as ever, in the ring format asked for.
    let opts = drivers_net::NetOptions {
        wanted: cfg.driver_options().wanted,
        ..drivers_net::NetOptions::default()
    };
    let mut a = smol::plug_with(fa, &switch, IP_A, settings.clone(), opts.clone()).map_err(guest)?;
    let mut b = smol::plug_with(fb, &switch, IP_B, settings, opts).map_err(guest)?;
    let features = a.phy.driver().info().features;
    let server = b.listen(PORT, TCP_BUF).map_err(guest)?;
    let client = a.connect(IP_B, PORT, TCP_BUF).map_err(guest)?;
    let (b_port, received) = (b.port, AtomicU64::new(0));
    let b_frames = || switch.stats(b_port).map_or(0, |s| s.rx_frames);
    let stop = AtomicBool::new(false);
    let warmup = (cfg.run_time / 5).min(Duration::from_millis(200));
    let total = SETUP + warmup + cfg.run_time;
    let (sent, window) = both(
        || {
            let zeros = vec![0u8; TCP_BUF];
            let r = a.run("TCP send", total, |sockets| {
                let s = sockets.get_mut::<tcp::Socket>(client);
                while s.can_send() {
                    match s.send_slice(&zeros) {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                }
                stop.load(Ordering::Acquire)
            });
            stop.store(true, Ordering::Release);
            r
        },
        || {
            // The window opens once data flows and the warm-up passed: its start
            // time, bytes and frames received by then.
            let mut window: Option<(Instant, u64, u64)> = None;
            let mut result = None;
            let r = b.run("TCP receive", total, |sockets| {
                let s = sockets.get_mut::<tcp::Socket>(server);
                while s.can_recv() {
                    match s.recv(|buf| (buf.len(), buf.len())) {
                        Ok(n) if n > 0 => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        _ => break,
                    }
                }
                let now = Instant::now();
                let got = received.load(Ordering::Relaxed);
                match window {
                    // Data flows: the warm-up runs until `t0`.
                    None if got > 0 => window = Some((now + warmup, 0, 0)),
                    Some((t0, 0, _)) if now >= t0 => window = Some((now, got, b_frames())),
                    Some((t0, at0, f0)) if at0 > 0 && now.duration_since(t0) >= cfg.run_time => {
                        result = Some((got - at0, b_frames() - f0, now.duration_since(t0)));
                        stop.store(true, Ordering::Release);
                    }
                    _ => {}
                }
                stop.load(Ordering::Acquire)
            });
            r.map(|()| result)
        },
    );
    sent.map_err(guest)?;
    let (bytes, frames, secs) = window
        .map_err(guest)?
        .ok_or_else(|| guest(smol::SmolError::TimedOut("TCP stream window".into())))?;
    let drops = [a.port, b.port]
        .iter()
        .filter_map(|p| switch.stats(*p))
        .map(|s| s.drops.total())
        .sum();
    Ok(Stream {
        frames,
        bytes,
        drops,
        secs: secs.as_secs_f64(),
        cpu: Vec::new(),
        features: Some(features),
    })
}
