//! What the driver asks for and what the device turned out to offer.

use crate::error::NetError;
use virtio_core::features::Features;
use virtio_core::net::{ETH_HDR_LEN, MIN_MTU, MIN_RX_BUF, NetConfig, NetFeatures, VirtioNetHdr};

/// The header's size as a descriptor length.
pub(crate) const HDR_LEN: u32 = 12;
/// The Ethernet header's size as a descriptor length.
const ETH_LEN: u32 = 14;
const _: () = assert!(HDR_LEN as usize == VirtioNetHdr::SIZE && ETH_LEN as usize == ETH_HDR_LEN);

/// MTU assumed when the device does not report one.
pub const DEFAULT_MTU: u16 = 1500;

/// Receive buffer size with MRG_RXBUF unless [`NetOptions::rx_buf_len`] says
/// otherwise: a frame of the default MTU fits in one buffer.
pub const DEFAULT_MRG_BUF: u32 = 2048;

/// How the driver sets the device up.
#[derive(Debug, Clone)]
pub struct NetOptions {
    /// Largest queue size to use (rounded down to a power of two).
    pub queue_size: u16,
    /// Feature bits to accept if offered; the default is every feature this driver
    /// implements: MAC, STATUS, MTU, MRG_RXBUF, CSUM, GUEST_CSUM, EVENT_IDX,
    /// INDIRECT_DESC.
    pub wanted: u64,
    /// Bytes per receive buffer. Default: [`DEFAULT_MRG_BUF`] with MRG_RXBUF, else
    /// header plus the largest frame (at least [`MIN_RX_BUF`], §5.1.6.3.1). A smaller
    /// value breaks that rule on purpose (tests of a device's handling of small
    /// buffers); with MRG_RXBUF it is raised to the header size, the spec's minimum.
    pub rx_buf_len: Option<u32>,
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
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            queue_size: 256,
            wanted: NetOptions::SUPPORTED,
            rx_buf_len: None,
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
            (true, len) => len.unwrap_or(DEFAULT_MRG_BUF).max(hdr),
            (false, Some(len)) => len.max(1),
            (false, None) => (hdr + max_frame).max(MIN_RX_BUF),
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
        })
    }

    /// Largest frame (Ethernet header plus MTU) the driver sends or accepts.
    pub fn max_frame(&self) -> usize {
        ETH_HDR_LEN + usize::from(self.mtu)
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
