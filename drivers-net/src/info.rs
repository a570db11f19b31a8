//! What the driver asks for and what the device turned out to offer.

use crate::error::NetError;
use std::time::Duration;
use virtio_core::features::Features;
use virtio_core::net::{
    ETH_HDR_LEN, MIN_MTU, MIN_RX_BUF, MQ_VQ_PAIRS_MAX, NetConfig, NetFeatures, VirtioNetHdr,
};

/// The header's size as a descriptor length.
pub(crate) const HDR_LEN: u32 = 12;
/// The Ethernet header's size as a descriptor length.
const ETH_LEN: u32 = 14;
const _: () = assert!(HDR_LEN as usize == VirtioNetHdr::SIZE && ETH_LEN as usize == ETH_HDR_LEN);

/// MTU assumed when the device does not report one.
pub const DEFAULT_MTU: u16 = 1500;

/// Receive buffer size with MRG_RXBUF unless [`NetOptions::rx_buf_len`] says
/// otherwise: a frame of the default MTU fits in one buffer. With a larger MTU the
/// buffers grow with it (header plus largest frame, in whole KiB), up to
/// [`MAX_MRG_BUF`]: a 64 KiB frame then takes 5 buffers, not 33, and a queue of
/// 256 holds 51 such frames rather than 7.
pub const DEFAULT_MRG_BUF: u32 = 2048;

/// Largest receive buffer chosen by default with MRG_RXBUF (see
/// [`DEFAULT_MRG_BUF`]): 256 of them are 4 MiB of guest memory per queue.
pub const MAX_MRG_BUF: u32 = 16 << 10;

/// How the driver sets the device up.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Largest queue size to use (rounded down to a power of two).
    pub queue_size: u16,
    /// Feature bits to accept if offered; the default is every data-path feature
    /// this driver implements ([`Self::SUPPORTED`]: MAC, STATUS, MTU, MRG_RXBUF,
    /// CSUM, GUEST_CSUM, EVENT_IDX, INDIRECT_DESC). Add [`Self::CONTROL`] for the
    /// control queue and multiqueue ([`Self::multiqueue`] does), and
    /// `Features::RING_PACKED` for the packed ring (virtio 1.2 §2.8).
    pub wanted: u64,
    /// Bytes per receive buffer. Default: [`DEFAULT_MRG_BUF`] with MRG_RXBUF, else
    /// header plus the largest frame (at least [`MIN_RX_BUF`], §5.1.6.3.1). A smaller
    /// value breaks that rule on purpose (tests of a device's handling of small
    /// buffers); with MRG_RXBUF it is raised to the header size, the spec's minimum.
    pub rx_buf_len: Option<u32>,
    /// Queue pairs wanted (at least 1). With MQ negotiated the driver sets up
    /// `min(queue_pairs, max_virtqueue_pairs)` pairs and makes them all active
    /// with VQ_PAIRS_SET; without MQ it uses one.
    pub queue_pairs: u16,
    /// Pairs to make active once the device runs; `None`: every pair set up.
    /// `Some(1)` sends no VQ_PAIRS_SET, so the device uses pair 0 only (§5.1.5)
    /// until [`NetDriver::set_queue_pairs`](crate::NetDriver::set_queue_pairs).
    pub active_pairs: Option<u16>,
    /// How long a control command may take before [`NetError::ControlTimeout`].
    pub control_timeout: Duration,
}

impl NetOptions {
    /// Every feature bit the driver can use.
    pub const SUPPORTED: u64 = NetFeatures::MAC.bits()
        | NetFeatures::STATUS.bits()
        | NetFeatures::MTU.bits()
        | NetFeatures::MRG_RXBUF.bits()
        | NetFeatures::CSUM.bits()
        | NetFeatures::GUEST_CSUM.bits()
        | Features::EVENT_IDX.bits()
        | Features::INDIRECT_DESC.bits();

    /// The control-queue features the driver implements: CTRL_VQ, CTRL_RX
    /// (promiscuous and all-multicast modes), CTRL_MAC_ADDR and MQ. Not in the
    /// default [`Self::wanted`]: a control queue needs one more interrupt source
    /// (see [`NetDriver::new`](crate::NetDriver::new)).
    pub const CONTROL: u64 = NetFeatures::CTRL_VQ.bits()
        | NetFeatures::CTRL_RX.bits()
        | NetFeatures::CTRL_MAC_ADDR.bits()
        | NetFeatures::MQ.bits();

    /// The defaults plus the control queue, wanting `pairs` queue pairs.
    pub fn multiqueue(pairs: u16) -> Self {
        NetOptions {
            wanted: Self::SUPPORTED | Self::CONTROL,
            queue_pairs: pairs,
            ..NetOptions::default()
        }
    }
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            queue_size: 256,
            wanted: NetOptions::SUPPORTED,
            rx_buf_len: None,
            queue_pairs: 1,
            active_pairs: None,
            control_timeout: Duration::from_secs(1),
        }
    }
}

/// The device as negotiated and configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetInfo {
    /// Negotiated feature word.
    pub features: u64,
    /// The device's MAC address (MAC negotiated).
    pub mac: Option<[u8; 6]>,
    /// The MTU in use: the device's (MTU negotiated) or [`DEFAULT_MTU`].
    pub mtu: u16,
    /// Receive buffers are merged (MRG_RXBUF).
    pub mrg_rxbuf: bool,
    /// The device completes partial checksums we send (CSUM).
    pub csum: bool,
    /// The device may hand us partial checksums (GUEST_CSUM); the driver completes
    /// them before a frame reaches the caller.
    pub guest_csum: bool,
    /// The configuration has a link status (STATUS).
    pub status: bool,
    /// Bytes per receive buffer.
    pub rx_buf_len: u32,
    /// A control queue exists (CTRL_VQ).
    pub ctrl_vq: bool,
    /// Promiscuous and all-multicast modes can be set (CTRL_RX).
    pub ctrl_rx: bool,
    /// The MAC address can be set (CTRL_MAC_ADDR).
    pub ctrl_mac_addr: bool,
    /// The device's `max_virtqueue_pairs` with MQ negotiated, else 1.
    pub max_queue_pairs: u16,
}

impl NetInfo {
    pub(crate) fn new(features: u64, cfg: &NetConfig, opts: &NetOptions) -> Result<NetInfo, NetError> {
        let f = NetFeatures::from_bits_retain(features);
        let mtu = if f.contains(NetFeatures::MTU) {
            let mtu = cfg.mtu.get();
            if mtu < MIN_MTU {
                return Err(NetError::BadMtu(mtu));
            }
            mtu
        } else {
            DEFAULT_MTU
        };
        let mrg_rxbuf = f.contains(NetFeatures::MRG_RXBUF);
        let hdr = HDR_LEN;
        let max_frame = ETH_LEN + u32::from(mtu);
        let rx_buf_len = match (mrg_rxbuf, opts.rx_buf_len) {
            (true, Some(len)) => len.max(hdr),
            (true, None) => (hdr + max_frame)
                .next_multiple_of(1024)
                .clamp(DEFAULT_MRG_BUF, MAX_MRG_BUF),
            (false, Some(len)) => len.max(1),
            (false, None) => (hdr + max_frame).max(MIN_RX_BUF),
        };
        let max_queue_pairs = if f.contains(NetFeatures::MQ) {
            // §5.1.4.1: 1..=0x8000. 0x8000 pairs put the control queue at index
            // 0x10000, which no transport can name: refused as well.
            let n = cfg.max_virtqueue_pairs.get();
            if n == 0 || n >= MQ_VQ_PAIRS_MAX {
                return Err(NetError::BadQueuePairs(n));
            }
            n
        } else {
            1
        };
        Ok(NetInfo {
            features,
            mac: f.contains(NetFeatures::MAC).then_some(cfg.mac),
            mtu,
            mrg_rxbuf,
            csum: f.contains(NetFeatures::CSUM),
            guest_csum: f.contains(NetFeatures::GUEST_CSUM),
            status: f.contains(NetFeatures::STATUS),
            rx_buf_len,
            ctrl_vq: f.contains(NetFeatures::CTRL_VQ),
            ctrl_rx: f.contains(NetFeatures::CTRL_RX),
            ctrl_mac_addr: f.contains(NetFeatures::CTRL_MAC_ADDR),
            max_queue_pairs,
        })
    }

    /// Largest frame (Ethernet header plus MTU) the driver sends or accepts.
    pub fn max_frame(&self) -> usize {
        ETH_HDR_LEN + usize::from(self.mtu)
    }

    /// Queue index of the control queue (§5.1.2): after `max_virtqueue_pairs`
    /// pairs with MQ, after one pair without.
    pub fn ctrl_queue(&self) -> Option<u16> {
        self.ctrl_vq
            .then(|| u16::try_from(virtio_core::net::ctrl_queue(self.max_queue_pairs)).ok())
            .flatten()
    }

    /// Bytes of a transmit slot: header plus the largest frame.
    pub(crate) fn tx_slot_len(&self) -> u32 {
        HDR_LEN + ETH_LEN + u32::from(self.mtu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_sizes_follow_the_spec() {
        let cfg = NetConfig {
            mtu: 9000.into(),
            ..NetConfig::default()
        };
        let opts = NetOptions::default();
        let plain = NetInfo::new(NetFeatures::MTU.bits(), &cfg, &opts).unwrap();
        assert_eq!(plain.rx_buf_len, 12 + 14 + 9000);
        let no_mtu = NetInfo::new(0, &cfg, &opts).unwrap();
        assert_eq!((no_mtu.mtu, no_mtu.rx_buf_len), (1500, 1526));
        let mrg = NetInfo::new(NetFeatures::MRG_RXBUF.bits(), &cfg, &opts).unwrap();
        assert_eq!(mrg.rx_buf_len, DEFAULT_MRG_BUF);
        // Mergeable buffers grow with the MTU, in whole KiB, up to MAX_MRG_BUF.
        let mrg_mtu = (NetFeatures::MRG_RXBUF | NetFeatures::MTU).bits();
        assert_eq!(NetInfo::new(mrg_mtu, &cfg, &opts).unwrap().rx_buf_len, 9 << 10);
        let jumbo = NetConfig {
            mtu: 65535.into(),
            ..NetConfig::default()
        };
        assert_eq!(
            NetInfo::new(mrg_mtu, &jumbo, &opts).unwrap().rx_buf_len,
            MAX_MRG_BUF
        );
        let tiny = NetOptions {
            rx_buf_len: Some(4),
            ..NetOptions::default()
        };
        assert_eq!(
            NetInfo::new(NetFeatures::MRG_RXBUF.bits(), &cfg, &tiny)
                .unwrap()
                .rx_buf_len,
            12
        );
    }

    #[test]
    fn an_mtu_below_68_is_refused() {
        let cfg = NetConfig {
            mtu: 67.into(),
            ..NetConfig::default()
        };
        assert!(matches!(
            NetInfo::new(NetFeatures::MTU.bits(), &cfg, &NetOptions::default()),
            Err(NetError::BadMtu(67))
        ));
    }
}
