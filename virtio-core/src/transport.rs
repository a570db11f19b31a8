//! The driver's whole view of a device, and an in-process transport that connects a
//! driver to a device implementation in the same process.
//!
//! [`Transport`] adds queue setup and notifications to the [`ControlPlane`]
//! (features, status, config). [`InProcessTransport`] implements it over a
//! [`DeviceLifecycle`] and a [`DeviceHandler`]: when the driver sets DRIVER_OK the
//! handler is activated with the enabled queues, and when the driver resets the device
//! the handler is reset first, so status reads 0 only after the device has stopped
//! touching guest memory (virtio 1.2 §2.4).

use crate::features::Features;
use crate::lifecycle::{ControlPlane, DeviceLifecycle, QueueLayout};
use crate::model::QueueAddrs;
use crate::notify::{EventFdNotifier, NotificationData, Notify, NotifyError, NotifyRegister, Wait};
use crate::ring::inflight::{InflightError, InflightRegion};
use crate::status::{DeviceStatus, StatusChange};
use crate::{DeviceMemory, DeviceRing};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Why a queue could not be set up through the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No such queue.
    #[error("device has no queue {0}")]
    NoSuchQueue(u16),
    /// The device refused the queue registers.
    #[error("device refused queue {index}")]
    QueueRefused {
        /// Queue index.
        index: u16,
        /// Why.
        #[source]
        source: crate::lifecycle::QueueError,
    },
    /// A notification could not be sent, or its handle not duplicated.
    #[error("notification failed")]
    Notify(#[from] NotifyError),
}

/// The driver's view of a device: control plane, queue setup, notifications.
///
/// The transport owns every queue's notifications both ways: a driver kicks through
/// [`Transport::notify_queue`] and takes what it waits on from
/// [`Transport::interrupt`], so nobody has to carry eventfds between the two.
pub trait Transport: ControlPlane {
    /// What a driver waits on for a queue's used-buffer notifications.
    type Interrupt: Wait;

    /// Number of queues the device has.
    fn num_queues(&self) -> u16;

    /// Largest size queue `index` accepts (0 if there is no such queue).
    fn queue_max_size(&self, index: u16) -> u16;

    /// Writes queue `index`'s size and addresses and enables it (§4.1.5.1.3).
    fn setup_queue(&self, index: u16, size: u16, addrs: QueueAddrs) -> Result<(), TransportError>;

    /// Sends an available-buffer notification for queue `index`.
    fn notify_queue(&self, index: u16) -> Result<(), TransportError>;

    /// Whether notifications through this transport carry data
    /// ([`Self::notify_queue_data`]); a driver negotiates
    /// `VIRTIO_F_NOTIFICATION_DATA` only if they do. The default: they do not.
    fn carries_notification_data(&self) -> bool {
        false
    }

    /// Sends an available-buffer notification for queue `data.vqn` with its
    /// notification data (virtio 1.2 §2.9). The default, for a transport that
    /// cannot carry it, sends the notification alone.
    fn notify_queue_data(&self, data: NotificationData) -> Result<(), TransportError> {
        self.notify_queue(data.vqn)
    }

    /// Queue `index`'s used-buffer notification (virtio 1.2 §2.7.10), for the
    /// driver to wait on. Each call gives a new handle on the same notification.
    ///
    /// # Errors
    /// [`TransportError::NoSuchQueue`]; [`TransportError::Notify`] if no handle
    /// could be made.
    fn interrupt(&self, index: u16) -> Result<Self::Interrupt, TransportError>;
}

/// One enabled queue handed to a device on activation.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index.
    pub index: u16,
    /// Size and addresses, validated by the lifecycle.
    pub layout: QueueLayout,
    /// Becomes readable when the driver notifies this queue.
    pub kick: EventFdNotifier,
    /// Notify it to send the driver a used-buffer notification.
    pub interrupt: EventFdNotifier,
    /// Where an earlier device instance stopped, for a queue that changes hands
    /// (vhost-user's SET_VRING_BASE), in the ring format's encoding (see
    /// [`crate::DeviceRing::starting_at`]); `None` for a freshly set-up queue, which
    /// starts where its format starts (slot 0, and wrap counter 1 for a packed ring).
    pub next_avail: Option<u16>,
    /// With `VIRTIO_F_NOTIFICATION_DATA`, where the transport leaves the data of
    /// the latest kick; `None` if it carries none.
    pub notification: Option<NotifyRegister>,
    /// Where the device tracks the chains it holds so that a restarted instance
    /// finishes them (vhost-user's inflight I/O tracking); `None` without.
    pub inflight: Option<InflightRegion>,
}

impl ActiveQueue {
    /// Puts a device ring just opened for this queue where the queue stands: at
    /// [`Self::next_avail`] if it changes hands, and with its inflight region
    /// recovered if it has one. Every device opens its rings through this.
    ///
    /// # Errors
    /// The inflight region does not add up, or the ring format cannot be tracked.
    pub fn resume<M: DeviceMemory>(&mut self, ring: DeviceRing<M>) -> Result<DeviceRing<M>, InflightError> {
        let ring = match self.next_avail {
            Some(at) => ring.starting_at(at),
            None => ring,
        };
        match self.inflight.take() {
            Some(region) => ring.with_inflight(region),
            None => Ok(ring),
        }
    }

    /// The queue's addresses, for [`crate::DeviceModel::open_queue`].
    pub fn addrs(&self) -> QueueAddrs {
        QueueAddrs {
            desc: self.layout.desc,
            avail: self.layout.avail,
            used: self.layout.used,
        }
    }
}

/// What a device implementation does when the driver starts or resets it.
pub trait DeviceHandler: Send {
    /// DRIVER_OK was set: start serving `queues` with the negotiated `features`. An
    /// error puts the device into DEVICE_NEEDS_RESET.
    fn activate(
        &mut self,
        features: u64,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// The driver reset the device: stop serving and return only when no guest memory
    /// will be read or written any more.
    fn reset(&mut self);

    /// The driver set FEATURES_OK: `features` hold until the next reset. A device
    /// whose behaviour or configuration space depends on them settles it here,
    /// before the driver reads the configuration space for its set-up (report
    /// the changed bytes through [`DeviceHandler::config_changes`]). The default
    /// does nothing.
    fn features_ok(&mut self, features: u64) {
        let _ = features;
    }

    /// The driver wrote `data` at `offset` of the configuration space. Return `true`
    /// to accept it (the bytes are then stored and readable), `false` to ignore it.
    /// The default accepts nothing: configuration space is read-only unless a device
    /// type says otherwise.
    fn write_config(&mut self, features: u64, offset: usize, data: &[u8]) -> bool {
        let _ = (features, offset, data);
        false
    }

    /// Reports the configuration-space changes the device made on its own since it
    /// was last asked (virtio-net's MAC after MAC_ADDR_SET, for example), one
    /// `update(offset, bytes)` call each. The transport asks before every driver
    /// read of the configuration space, so a change the device recorded before it
    /// acknowledged a command is visible to a driver that saw the acknowledgement
    /// (§5.1.6.5.2). The default reports nothing.
    fn config_changes(&mut self, update: &mut dyn FnMut(usize, &[u8])) {
        let _ = update;
    }
}

/// A transport that connects a driver to a [`DeviceHandler`] in the same process.
pub struct InProcessTransport<H> {
    state: Mutex<State<H>>,
    kicks: Vec<EventFdNotifier>,
    interrupts: Vec<EventFdNotifier>,
    /// Each queue's notification data (`VIRTIO_F_NOTIFICATION_DATA`).
    registers: Vec<NotifyRegister>,
}

struct State<H> {
    lifecycle: DeviceLifecycle,
    handler: H,
    active: bool,
}

impl<H> std::fmt::Debug for InProcessTransport<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessTransport")
            .field("queues", &self.kicks.len())
            .finish_non_exhaustive()
    }
}

impl<H: DeviceHandler> InProcessTransport<H> {
    /// Connects `handler` behind `lifecycle` (which holds the offered features, the
    /// config space and the queue maximum sizes).
    pub fn new(lifecycle: DeviceLifecycle, handler: H) -> Result<Self, NotifyError> {
        let n = lifecycle.num_queues();
        let kicks = (0..n)
            .map(|_| EventFdNotifier::new())
            .collect::<Result<Vec<_>, _>>()?;
        let interrupts = (0..n)
            .map(|_| EventFdNotifier::new())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(InProcessTransport {
            state: Mutex::new(State {
                lifecycle,
                handler,
                active: false,
            }),
            registers: (0..n).map(|_| NotifyRegister::new()).collect(),
            kicks,
            interrupts,
        })
    }

    /// Runs `f` on the device handler (for inspection in tests and tools).
    pub fn with_handler<R>(&self, f: impl FnOnce(&mut H) -> R) -> R {
        f(&mut self.lock().handler)
    }

    /// Runs `f` on the lifecycle (device-side config updates).
    pub fn with_lifecycle<R>(&self, f: impl FnOnce(&mut DeviceLifecycle) -> R) -> R {
        f(&mut self.lock().lifecycle)
    }

    fn lock(&self) -> MutexGuard<'_, State<H>> {
        // Every path leaves the state consistent before anything could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, with the configuration changes the device made on its own
    /// applied (each bumps the generation).
    fn config_synced(&self) -> MutexGuard<'_, State<H>>
    where
        H: DeviceHandler,
    {
        let mut guard = self.lock();
        let st = &mut *guard;
        let lifecycle = &mut st.lifecycle;
        st.handler.config_changes(&mut |offset, bytes| {
            if let Err(error) = lifecycle.update_config(offset, bytes) {
                tracing::warn!(%error, offset, "device config change does not fit the config space");
            }
        });
        guard
    }

    fn activate(&self, st: &mut State<H>) {
        let mut queues = Vec::new();
        let notification =
            Features::from_bits_retain(st.lifecycle.driver_features()).contains(Features::NOTIFICATION_DATA);
        for i in 0..st.lifecycle.num_queues() {
            let Ok(index) = u16::try_from(i) else { break };
            let enabled = st.lifecycle.queue(index).is_some_and(|q| q.enabled);
            if !enabled {
                continue;
            }
            let layout = match st.lifecycle.validate_queue(index) {
                Ok(l) => l,
                Err(error) => {
                    tracing::warn!(%error, index, "enabled queue no longer valid");
                    continue;
                }
            };
            let fds = self.kicks[i]
                .try_clone()
                .and_then(|k| Ok((k, self.interrupts[i].try_clone()?)));
            match fds {
                Ok((kick, interrupt)) => queues.push(ActiveQueue {
                    index,
                    layout,
                    kick,
                    interrupt,
                    next_avail: None,
                    notification: notification.then(|| {
                        self.registers[i].clear();
                        self.registers[i].clone()
                    }),
                    inflight: None,
                }),
                Err(error) => {
                    tracing::error!(%error, index, "cannot duplicate queue eventfds");
                    let _ = st.lifecycle.set_needs_reset();
                    return;
                }
            }
        }
        let features = st.lifecycle.driver_features();
        match st.handler.activate(features, queues) {
            Ok(()) => st.active = true,
            Err(error) => {
                tracing::warn!(%error, "device failed to activate");
                let _ = st.lifecycle.set_needs_reset();
            }
        }
    }
}

impl<H: DeviceHandler> ControlPlane for InProcessTransport<H> {
    fn device_id(&self) -> u32 {
        self.lock().lifecycle.device_id()
    }

    fn config_len(&self) -> usize {
        self.lock().lifecycle.config().len()
    }

    fn device_features(&self) -> u64 {
        self.lock().lifecycle.device_features()
    }

    fn set_driver_features(&self, features: u64) {
        if let Err(error) = self.lock().lifecycle.set_driver_features(features) {
            tracing::warn!(%error, features, "driver features write refused");
        }
    }

    fn status(&self) -> u8 {
        self.lock().lifecycle.status().bits()
    }

    fn set_status(&self, status: u8) {
        let mut st = self.lock();
        if status == 0 && st.active {
            // Stop the device before the reset becomes visible (§2.4).
            st.handler.reset();
            st.active = false;
            // Drain stale notifications so a new session starts clean.
            for fd in self.kicks.iter().chain(&self.interrupts) {
                let _ = fd.take();
            }
        }
        match st.lifecycle.write_status(status) {
            Ok(StatusChange::Added(added)) => {
                if added.contains(DeviceStatus::FEATURES_OK) {
                    let features = st.lifecycle.driver_features();
                    st.handler.features_ok(features);
                }
                if added.contains(DeviceStatus::DRIVER_OK) {
                    self.activate(&mut st);
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, status, "status write refused"),
        }
    }

    fn config_generation(&self) -> u32 {
        self.config_synced().lifecycle.config().generation()
    }

    fn read_config(&self, offset: usize, buf: &mut [u8]) {
        if self.config_synced().lifecycle.config().read(offset, buf).is_err() {
            buf.fill(0);
        }
    }

    fn write_config(&self, offset: usize, data: &[u8]) {
        let mut st = self.lock();
        let features = st.lifecycle.driver_features();
        if !st.handler.write_config(features, offset, data) {
            tracing::debug!(offset, len = data.len(), "config write ignored");
            return;
        }
        // The device accepted it; the bytes become what the driver reads back.
        if let Err(error) = st.lifecycle.update_config(offset, data) {
            tracing::warn!(%error, "accepted config write does not fit the config space");
        }
    }
}

impl<H: DeviceHandler> Transport for InProcessTransport<H> {
    type Interrupt = EventFdNotifier;

    fn num_queues(&self) -> u16 {
        u16::try_from(self.kicks.len()).unwrap_or(u16::MAX)
    }

    fn queue_max_size(&self, index: u16) -> u16 {
        self.lock().lifecycle.queue(index).map_or(0, |q| q.max_size)
    }

    fn setup_queue(&self, index: u16, size: u16, addrs: QueueAddrs) -> Result<(), TransportError> {
        let mut st = self.lock();
        let lc = &mut st.lifecycle;
        if lc.queue(index).is_none() {
            return Err(TransportError::NoSuchQueue(index));
        }
        let refused = |source| TransportError::QueueRefused { index, source };
        lc.set_queue_size(index, size).map_err(refused)?;
        lc.set_queue_desc(index, addrs.desc).map_err(refused)?;
        lc.set_queue_avail(index, addrs.avail).map_err(refused)?;
        lc.set_queue_used(index, addrs.used).map_err(refused)?;
        lc.enable_queue(index).map_err(refused)?;
        Ok(())
    }

    fn notify_queue(&self, index: u16) -> Result<(), TransportError> {
        let fd = self
            .kicks
            .get(usize::from(index))
            .ok_or(TransportError::NoSuchQueue(index))?;
        Ok(fd.notify()?)
    }

    /// Yes: each queue has a register the device side reads
    /// ([`ActiveQueue::notification`]).
    fn carries_notification_data(&self) -> bool {
        true
    }

    fn notify_queue_data(&self, data: NotificationData) -> Result<(), TransportError> {
        let register = self
            .registers
            .get(usize::from(data.vqn))
            .ok_or(TransportError::NoSuchQueue(data.vqn))?;
        register.write(data);
        self.notify_queue(data.vqn)
    }

    fn interrupt(&self, index: u16) -> Result<EventFdNotifier, TransportError> {
        let fd = self
            .interrupts
            .get(usize::from(index))
            .ok_or(TransportError::NoSuchQueue(index))?;
        Ok(fd.try_clone()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSpace;
    use crate::features::Features;
    use crate::lifecycle::{driver_ok, initialize};
    use std::sync::Arc;

    #[derive(Default)]
    struct Recorder {
        events: Arc<Mutex<Vec<String>>>,
        kicks: Vec<EventFdNotifier>,
        irqs: Vec<EventFdNotifier>,
        fail: bool,
    }

    impl DeviceHandler for Recorder {
        fn activate(
            &mut self,
            features: u64,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let idx: Vec<u16> = queues.iter().map(|q| q.index).collect();
            self.events
                .lock()
                .unwrap()
                .push(format!("activate {features:#x} {idx:?}"));
            (self.kicks, self.irqs) = queues.into_iter().map(|q| (q.kick, q.interrupt)).unzip();
            if self.fail { Err("refused".into()) } else { Ok(()) }
        }
        fn reset(&mut self) {
            self.events.lock().unwrap().push("reset".into());
        }
    }

    fn transport(fail: bool) -> (InProcessTransport<Recorder>, Arc<Mutex<Vec<String>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let lc = DeviceLifecycle::new(
            2,
            Features::EVENT_IDX.bits(),
            &[],
            ConfigSpace::new(vec![7; 8]),
            &[16, 16],
        );
        let rec = Recorder {
            events: events.clone(),
            fail,
            ..Recorder::default()
        };
        (InProcessTransport::new(lc, rec).unwrap(), events)
    }

    const ADDRS: QueueAddrs = QueueAddrs {
        desc: 0x1000,
        avail: 0x2000,
        used: 0x3000,
    };

    #[test]
    fn driver_ok_activates_enabled_queues_and_reset_stops_first() {
        let (t, events) = transport(false);
        let f = initialize(&t, 2, Features::EVENT_IDX.bits(), &[]).unwrap();
        assert_eq!(t.num_queues(), 2);
        assert_eq!(t.queue_max_size(1), 16);
        assert_eq!(t.queue_max_size(9), 0);
        t.setup_queue(1, 8, ADDRS).unwrap();
        assert!(matches!(
            t.setup_queue(5, 8, ADDRS),
            Err(TransportError::NoSuchQueue(5))
        ));
        driver_ok(&t).unwrap();
        assert_eq!(*events.lock().unwrap(), vec![format!("activate {f:#x} [1]")]);
        t.notify_queue(1).unwrap();
        assert_eq!(t.with_handler(|h| h.kicks[0].take().unwrap()), 1);
        t.set_status(0);
        assert_eq!(t.status(), 0);
        assert_eq!(events.lock().unwrap().last().unwrap(), "reset");
        let mut cfg = [0u8; 4];
        t.read_config(4, &mut cfg);
        assert_eq!(cfg, [7; 4]);
        t.read_config(6, &mut cfg);
        assert_eq!(cfg, [0; 4], "out-of-range config reads give zeros");
    }

    #[test]
    fn the_driver_takes_each_queues_interrupt_from_the_transport() {
        let (t, _) = transport(false);
        assert!(matches!(t.interrupt(2), Err(TransportError::NoSuchQueue(2))));
        let irq = t.interrupt(1).unwrap();
        initialize(&t, 2, 0, &[]).unwrap();
        t.setup_queue(1, 8, ADDRS).unwrap();
        driver_ok(&t).unwrap();
        t.with_handler(|h| h.irqs[0].notify()).unwrap();
        assert_eq!(
            irq.take().unwrap(),
            1,
            "the device's notification reaches the driver"
        );
        assert_eq!(t.interrupt(0).unwrap().take().unwrap(), 0, "and only queue 1's");
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (t, _) = transport(true);
        initialize(&t, 2, 0, &[]).unwrap();
        t.setup_queue(0, 8, ADDRS).unwrap();
        let _ = driver_ok(&t);
        assert_ne!(t.status() & DeviceStatus::DEVICE_NEEDS_RESET.bits(), 0);
    }

    #[test]
    fn bad_queue_registers_are_refused() {
        let (t, _) = transport(false);
        initialize(&t, 2, 0, &[]).unwrap();
        assert!(matches!(
            t.setup_queue(0, 3, ADDRS),
            Err(TransportError::QueueRefused { .. })
        ));
        let misaligned = QueueAddrs {
            desc: 0x1001,
            ..ADDRS
        };
        assert!(matches!(
            t.setup_queue(0, 8, misaligned),
            Err(TransportError::QueueRefused { .. })
        ));
    }
}
