//! A Linux guest and one of our own guests on one network: the guest kernel's
//! virtio-net driver reaches our switch through our vhost-user-net backend, and a
//! smoltcp guest (our virtio-net driver over sharing model 2, in this process) is
//! plugged into the same switch.
//!
//! The Linux guest (QEMU TCG, `-netdev vhost-user`, over virtio-pci on q35 and
//! virtio-mmio on microvm; on q35 also with `packed=on`, virtio 1.2 §2.8)
//! configures `eth0` as 10.0.0.1/24, pings 10.0.0.2 (the smoltcp guest, whose
//! interface answers echo requests itself) and then sends a token over TCP with
//! busybox `nc`, which the smoltcp guest answers and closes.
//! Checked: every echo request answered, the token received by smoltcp and the
//! answer received by Linux, the Linux guest's MAC learnt on the vhost-user port,
//! frames counted both ways on both ports, nothing the Linux guest sent refused by
//! our device, nothing dropped on the smoltcp port, and the ring format the guest's
//! driver negotiated (VIRTIO_F_RING_PACKED, bit 34, from its sysfs `features`).
//!
//! Skipped, saying so, only where the kit's prerequisites cannot be installed (not
//! root, no network) and `CI` is unset. The backend's log (tracing, through the
//! test harness) shows with a failure.

use backend_host::net::{NetDevice, NetSettings, PortStats, Switch, SwitchConfig};
use backend_host::vhost_user::{Daemon, VhostMemory};
use smoltcp::socket::tcp;
use smoltcp::wire::Ipv4Address;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use vio::linux_guest::{GuestRun, GuestSpec, Machine, NetPort, report};
use vio::models;
use vio::smol::{self, SmolGuest};

/// The smoltcp guest's address; the Linux guest is 10.0.0.1.
const SMOL_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);
/// The smoltcp guest's TCP port.
const TCP_PORT: u16 = 5000;
/// Echo requests the Linux guest sends.
const PINGS: u32 = 3;
/// The Linux guest's MAC address (QEMU's `mac=`).
const LINUX_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x69, 0x6f];
/// Ring sizes the device accepts: QEMU's largest (`VIRTQUEUE_MAX_SIZE`), which
/// virtio-mmio reports to the guest as QueueNumMax and Linux then uses.
const QUEUE_SIZE: u16 = 1024;
/// How long the whole boot may take.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The Linux guest's side: bring `eth0` up at 10.0.0.1/24, report what it is, ping
/// the smoltcp guest, then send `token` over TCP and print the answer.
fn guest_script(token: &str) -> String {
    format!(
        r#"set -e
ip link set eth0 up
ip addr add 10.0.0.1/24 dev eth0
dev=$(readlink -f /sys/class/net/eth0/device)
echo "VIO-RESULT mac=$(cat /sys/class/net/eth0/address)"
echo "VIO-RESULT driver=$(basename "$(readlink -f "$dev/driver")")"
echo "VIO-RESULT transport=$(basename "$(readlink -f "$dev/../driver")")"
echo "VIO-RESULT features=$(cat "$dev/features")"
ping -c {PINGS} -W 10 {SMOL_IP} > /ping.txt 2>&1 || echo "VIO-RESULT ping_status=$?"
cat /ping.txt
echo "VIO-RESULT ping_received=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /ping.txt)"
reply=$(echo "{token}" | timeout 30 nc -w 10 {SMOL_IP} {TCP_PORT}) || echo "VIO-RESULT nc_status=$?"
echo "VIO-RESULT tcp_reply=$reply"
"#
    )
}

/// What the smoltcp guest answers to `request`.
fn answer(request: &[u8]) -> Vec<u8> {
    let mut a = b"smol heard ".to_vec();
    a.extend(request.iter().rev().filter(|&&b| b != b'\n'));
    a.push(b'\n');
    a
}

/// What the smoltcp guest saw.
#[derive(Debug, Default)]
struct Served {
    /// The bytes of the one TCP connection, up to its newline or FIN.
    request: Vec<u8>,
    answered: bool,
}

/// Runs the smoltcp guest until `stop`: its interface answers ARP and echo requests;
/// its TCP socket takes one request and answers it.
fn serve<D: smol::Drv, V: smol::Dev>(guest: &mut SmolGuest<D, V>, stop: &AtomicBool) -> Served {
    let server = guest.listen(TCP_PORT, 4096).expect("listen");
    let mut served = Served::default();
    let ran = guest.run("serving the Linux guest", BOOT_TIMEOUT * 2, |sockets| {
        let s = sockets.get_mut::<tcp::Socket>(server);
        while s.can_recv() {
            let req = &mut served.request;
            s.recv(|d| {
                req.extend_from_slice(d);
                (d.len(), ())
            })
            .expect("receive");
        }
        let complete = served.request.ends_with(b"\n") || s.state() == tcp::State::CloseWait;
        if !served.answered && complete && s.can_send() {
            let a = answer(&served.request);
            assert_eq!(s.send_slice(&a), Ok(a.len()), "the answer fits the send buffer");
            s.close();
            served.answered = true;
        }
        stop.load(Ordering::Acquire)
    });
    ran.expect("the smoltcp guest");
    served
}

/// A socket path unique to this test, short enough for `sun_path`.
fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vio-net-{name}-{}.sock", std::process::id()))
}

/// The backend's log through the test harness: shown with a failure.
fn log_to_harness() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,backend_host::vhost_user=debug".into()),
        )
        .try_init();
}

/// Boots `machine` on a vhost-user port of a switch that also holds a smoltcp guest,
/// and checks the ping and the TCP exchange between them.
fn ping_and_talk(machine: Machine, name: &str) {
    ping_and_talk_with(machine, name, false);
}

/// [`ping_and_talk`], with QEMU allowed to negotiate the packed ring on the guest's
/// virtio-net device when `packed`.
fn ping_and_talk_with(machine: Machine, name: &str, packed: bool) {
    let Some(linux) = vio::linux_guest::for_test(name) else {
        return;
    };
    log_to_harness();
    let switch = Switch::new(SwitchConfig::default());
    let mut smol =
        smol::plug(models::direct(), &switch, SMOL_IP, NetSettings::default()).expect("smoltcp guest");
    let smol_port = smol.port;

    let socket = socket_path(name);
    let memory = VhostMemory::new();
    let settings = NetSettings {
        queue_size: QUEUE_SIZE,
        ..NetSettings::default()
    };
    let device = NetDevice::new(memory.clone(), &switch, settings).expect("vhost-user-net device");
    let vhost_port = device.port();
    let daemon = Daemon::bind(&socket, device, memory).expect("bind the vhost-user socket");
    let daemon_stop = daemon.stop_handle();

    let token = format!("vio-{name}-{:x}", std::process::id());
    let mut spec = GuestSpec::new(machine, guest_script(&token));
    spec.net = Some(NetPort {
        socket: socket.clone(),
        mac: LINUX_MAC,
        packed,
        // The packed run also lets QEMU offer IN_ORDER: the guest takes it if its
        // kernel's virtio_ring does (the 6.1 kernel of the kit does not).
        in_order: packed,
    });
    spec.timeout = BOOT_TIMEOUT;

    let stop = AtomicBool::new(false);
    let (run, served): (GuestRun, Served) = std::thread::scope(|s| {
        let backend = s.spawn(|| daemon.run());
        let smol_thread = s.spawn(|| serve(&mut smol, &stop));
        let run = linux.boot(&spec);
        stop.store(true, Ordering::Release);
        daemon_stop.stop();
        let served = smol_thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        backend.join().expect("daemon thread").expect("daemon");
        (run.unwrap_or_else(|e| panic!("{}", report(&e))), served)
    });
    eprintln!("{name}: guest booted and ran in {:.1?}", run.elapsed);
    let vhost = switch
        .stats(vhost_port)
        .expect("the vhost-user port stays attached");
    let smol_stats: PortStats = switch.stats(smol_port).expect("smoltcp port");

    assert_eq!(run.required("mac"), "52:54:00:76:69:6f", "the guest's MAC");
    assert_eq!(run.required("driver"), "virtio_net");
    assert_eq!(
        run.required("transport"),
        machine.transport_driver(),
        "the driver of the interface's transport"
    );
    // VIRTIO_F_RING_PACKED is bit 34 of the guest's sysfs `features` string.
    assert_eq!(
        run.required("features").as_bytes().get(34),
        Some(if packed { &b'1' } else { &b'0' }),
        "the ring format the guest's driver negotiated: {}",
        run.required("features")
    );
    eprintln!(
        "{name}: the guest negotiated VIRTIO_F_IN_ORDER: {}",
        run.required("features").as_bytes().get(35) == Some(&b'1')
    );
    assert_eq!(
        run.result("ping_status"),
        None,
        "ping failed; console:\n{}",
        run.console
    );
    assert_eq!(
        run.required("ping_received"),
        PINGS.to_string(),
        "echo replies; console:\n{}",
        run.console
    );
    for seq in 0..PINGS {
        let line = format!("bytes from {SMOL_IP}: seq={seq} ");
        assert!(
            run.console.contains(&line),
            "no reply {seq} in the console:\n{}",
            run.console
        );
    }

    let request = format!("{token}\n");
    assert_eq!(
        String::from_utf8_lossy(&served.request),
        request,
        "what smoltcp received"
    );
    assert!(served.answered);
    let wanted = String::from_utf8(answer(request.as_bytes())).expect("ASCII");
    assert_eq!(
        run.result("nc_status"),
        None,
        "nc failed; console:\n{}",
        run.console
    );
    assert_eq!(
        run.required("tcp_reply"),
        wanted.trim_end(),
        "what Linux received"
    );

    assert_eq!(
        switch.lookup(LINUX_MAC),
        Some(vhost_port),
        "the Linux guest's MAC learnt on its port"
    );
    // Each way at least: ARP, the echo requests or replies, and a TCP segment.
    let least = u64::from(PINGS) + 2;
    assert!(
        vhost.tx_frames >= least && vhost.rx_frames >= least,
        "vhost-user port: {vhost:?}"
    );
    assert!(
        smol_stats.tx_frames >= least && smol_stats.rx_frames >= least,
        "smoltcp port: {smol_stats:?}"
    );
    let d = vhost.drops;
    assert_eq!(
        d.short + d.bad_header + d.over_mtu,
        0,
        "frames of the Linux guest refused: {vhost:?}"
    );
    assert_eq!(smol_stats.drops.total(), 0, "smoltcp port: {smol_stats:?}");
    assert!(smol.phy.last_error().is_none(), "{:?}", smol.phy.last_error());
    drop(daemon);
    assert!(!socket.exists(), "the daemon removes its socket");
}

#[test]
fn q35_virtio_pci_linux_guest_pings_and_talks_to_a_smoltcp_guest() {
    ping_and_talk(Machine::Q35, "q35");
}

#[test]
fn microvm_virtio_mmio_linux_guest_pings_and_talks_to_a_smoltcp_guest() {
    ping_and_talk(Machine::Microvm, "microvm");
}

/// A Linux guest's own packed-ring virtio-net driver (`packed=on` in QEMU) against
/// our vhost-user-net device's packed side: the same ping and TCP exchange.
#[test]
fn q35_linux_guest_over_packed_rings_pings_and_talks_to_a_smoltcp_guest() {
    ping_and_talk_with(Machine::Q35, "q35-packed", true);
}
