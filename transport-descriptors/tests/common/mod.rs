//! Helpers shared by the integration tests: a raw guest-side ring writer (so tests can
//! put exactly the descriptors they want in front of the device) and a device loop.

#![allow(dead_code)] // each test file uses a different subset

use virtio_core::RingMemory;
use virtio_core::{DeviceMemory, SplitDevice};

/// The guest writing its own rings byte by byte, as a hostile or buggy driver would.
pub struct RawQueue {
    pub ring: RingMemory,
    pub size: u16,
    avail: u16,
    used: u16,
}

impl RawQueue {
    pub fn new(ring: RingMemory, size: u16) -> RawQueue {
        RawQueue {
            ring,
            size,
            avail: 0,
            used: 0,
        }
    }

    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.ring.desc.write(16 * u64::from(i), &raw).unwrap();
    }

    /// Makes `head` available and publishes the index.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail % self.size);
        self.ring.driver.write(4 + 2 * slot, &head.to_le_bytes()).unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.ring.driver.write(2, &self.avail.to_le_bytes()).unwrap();
    }

    /// Used elements published since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let mut b = [0u8; 2];
        self.ring.device.read(2, &mut b).unwrap();
        let idx = u16::from_le_bytes(b);
        let mut out = Vec::new();
        while self.used != idx {
            let slot = u64::from(self.used % self.size);
            let mut e = [0u8; 8];
            self.ring.device.read(4 + 8 * slot, &mut e).unwrap();
            out.push((
                u32::from_le_bytes(e[..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..].try_into().unwrap()),
            ));
            self.used = self.used.wrapping_add(1);
        }
        out
    }
}

/// Serves every available chain: reads the readable part, writes `f(data)` into the
/// writable part (as much as fits) and returns `(head, written)` for each.
pub fn serve<M: DeviceMemory>(dev: &mut SplitDevice<M>, f: impl Fn(&[u8]) -> Vec<u8>) -> Vec<(u16, u32)> {
    let mut done = Vec::new();
    while let Some(chain) = dev.pop().unwrap() {
        let mut data = vec![0u8; chain.readable_len() as usize];
        chain.reader(dev.memory()).read_exact(&mut data).unwrap();
        let reply = f(&data);
        let n = reply.len().min(chain.writable_len() as usize);
        let mut w = chain.writer(dev.memory());
        w.write_all(&reply[..n]).unwrap();
        let written = w.written();
        dev.add_used(chain.head(), written).unwrap();
        done.push((chain.head(), written));
    }
    done
}

/// A recognisable pattern of `len` bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
