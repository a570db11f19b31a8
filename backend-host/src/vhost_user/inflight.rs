//! The inflight buffer of `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`: one region per
//! queue, in which the device tracks the chains it holds, kept by the frontend
//! across the daemon's crashes and handed back to its next instance.
//!
//! GET_INFLIGHT_FD makes a fresh buffer (a memfd sealed against shrinking, zeroed,
//! so every region starts at version 0); SET_INFLIGHT_FD adopts the one the
//! frontend hands back, after sealing it too and checking its size, so the
//! frontend cannot turn a later access into SIGBUS (HOSTILE 35, 50). The layout of
//! each region and its recovery are in `virtio_core::ring::inflight`.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use vhost::vhost_user::message::VhostUserInflight;
use virtio_core::ring::areas::RingFormat;
use virtio_core::ring::inflight::{InflightRegion, region_size};
use virtio_core::shm::Mapping;

/// Why an inflight buffer was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightBufferError {
    /// The description names no queue, more queues than the device has, or a
    /// queue size the device cannot have.
    #[error(
        "inflight buffer for {num_queues} queues of {queue_size}: the device has {queues} queues of at most {capacity}"
    )]
    Shape {
        /// Queues asked for.
        num_queues: u16,
        /// Queue size asked for.
        queue_size: u16,
        /// The device's queues.
        queues: usize,
        /// The device's largest ring.
        capacity: u16,
    },
    /// The buffer's file is smaller than the description says, or the offset is
    /// not page aligned.
    #[error("inflight buffer of {have} bytes at offset {offset:#x}: {need} needed")]
    TooSmall {
        /// Bytes needed from the offset.
        need: u64,
        /// The file's size.
        have: u64,
        /// Where the buffer starts in the file.
        offset: u64,
    },
    /// The file could not be sealed against shrinking.
    #[error("inflight buffer's file cannot be sealed against shrinking")]
    Unsealed(#[source] std::io::Error),
    /// Creating, sizing or mapping the file failed.
    #[error("inflight buffer")]
    Io(#[from] std::io::Error),
}

/// One frontend's inflight buffer, mapped.
#[derive(Debug)]
pub(crate) struct InflightBuffer {
    mapping: Arc<Mapping>,
    num_queues: u16,
    /// Entries each queue's region can track: the device's largest ring.
    capacity: u16,
    format: RingFormat,
}

/// What the device is: its queues, its largest ring, and the ring format the
/// frontend acked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub queues: usize,
    pub capacity: u16,
    pub format: RingFormat,
}

/// Bytes of the buffer for `num_queues` queues of `shape`, rounded up to whole
/// pages. Each queue's region is sized for the device's largest ring, not for the
/// frontend's `queue_size`: a ring may be larger than that (QEMU's virtio-mmio
/// lets the guest pick up to 1024 entries whatever the device's `queue-size`).
fn buffer_size(shape: Shape, num_queues: u16) -> u64 {
    let page = rustix::param::page_size() as u64;
    (u64::from(num_queues) * region_size(shape.format, shape.capacity)).div_ceil(page) * page
}

fn check_shape(d: &VhostUserInflight, shape: Shape) -> Result<u16, InflightBufferError> {
    if d.num_queues == 0
        || usize::from(d.num_queues) > shape.queues
        || d.queue_size == 0
        || d.queue_size > shape.capacity
    {
        return Err(InflightBufferError::Shape {
            num_queues: d.num_queues,
            queue_size: d.queue_size,
            queues: shape.queues,
            capacity: shape.capacity,
        });
    }
    Ok(d.num_queues)
}

impl InflightBuffer {
    /// A fresh buffer for what GET_INFLIGHT_FD asks (`d`'s queue count and size),
    /// for a device of `queues` queues with rings of `format`; returns the
    /// description to reply with and the file to send.
    pub(crate) fn create(
        d: &VhostUserInflight,
        shape: Shape,
    ) -> Result<(InflightBuffer, VhostUserInflight, File), InflightBufferError> {
        use rustix::fs::{MemfdFlags, SealFlags};
        let num_queues = check_shape(d, shape)?;
        let size = buffer_size(shape, num_queues);
        let fd = rustix::fs::memfd_create("vio-inflight", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(std::io::Error::from)?;
        rustix::fs::ftruncate(&fd, size).map_err(std::io::Error::from)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK)
            .map_err(|e| InflightBufferError::Unsealed(e.into()))?;
        let file = File::from(fd);
        let buffer = InflightBuffer::map(&file, 0, num_queues, shape, size)?;
        let reply = VhostUserInflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues,
            queue_size: d.queue_size,
        };
        Ok((buffer, reply, file))
    }

    /// Adopts the buffer SET_INFLIGHT_FD hands back: sealed against shrinking
    /// first, then its size checked against `d`.
    pub(crate) fn adopt(
        d: &VhostUserInflight,
        file: &File,
        shape: Shape,
    ) -> Result<InflightBuffer, InflightBufferError> {
        use rustix::fs::SealFlags;
        let num_queues = check_shape(d, shape)?;
        // Seal first, then check the size: checked first, it could shrink in between.
        match rustix::fs::fcntl_get_seals(file.as_fd()) {
            Ok(seals) if seals.contains(SealFlags::SHRINK) => {}
            _ => rustix::fs::fcntl_add_seals(file.as_fd(), SealFlags::SHRINK)
                .map_err(|e| InflightBufferError::Unsealed(e.into()))?,
        }
        let size = buffer_size(shape, num_queues);
        let have = file.metadata()?.len();
        let page = rustix::param::page_size() as u64;
        let too_small = InflightBufferError::TooSmall {
            need: size,
            have,
            offset: d.mmap_offset,
        };
        if !d.mmap_offset.is_multiple_of(page)
            || d.mmap_size < size
            || d.mmap_offset.checked_add(size).is_none_or(|end| end > have)
        {
            return Err(too_small);
        }
        InflightBuffer::map(file, d.mmap_offset, num_queues, shape, size)
    }

    fn map(
        file: &File,
        offset: u64,
        num_queues: u16,
        shape: Shape,
        size: u64,
    ) -> Result<InflightBuffer, InflightBufferError> {
        let len =
            usize::try_from(size).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let mapping = Mapping::of_fd(file.as_fd(), offset, len, true)?;
        Ok(InflightBuffer {
            mapping,
            num_queues,
            capacity: shape.capacity,
            format: shape.format,
        })
    }

    /// Queue `index`'s region, for a ring of `size`; `None` for a queue the buffer
    /// does not cover.
    pub(crate) fn region(&self, index: usize, size: u16) -> Option<Result<InflightRegion, String>> {
        if index >= usize::from(self.num_queues) {
            return None;
        }
        if size > self.capacity {
            return Some(Err(format!(
                "ring of {size} entries, inflight buffer for {}",
                self.capacity
            )));
        }
        let each = region_size(self.format, self.capacity);
        Some(
            self.mapping
                .region()
                .sub(index as u64 * each, each)
                .map_err(|e| e.to_string())
                .and_then(|r| InflightRegion::new(r, size, self.format).map_err(|e| e.to_string())),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SPLIT: Shape = Shape {
        queues: 2,
        capacity: 256,
        format: RingFormat::Split,
    };
    const PACKED: Shape = Shape {
        queues: 1,
        capacity: 256,
        format: RingFormat::Packed,
    };

    /// What GET_INFLIGHT_FD asks: `num_queues` queues of `queue_size`.
    pub(crate) fn desc(num_queues: u16, queue_size: u16) -> VhostUserInflight {
        VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        }
    }

    #[test]
    fn a_created_buffer_is_sealed_covers_every_queue_and_is_adopted_back() {
        let (buf, reply, file) = InflightBuffer::create(&desc(2, 128), SPLIT).unwrap();
        assert_eq!(reply.mmap_size, buffer_size(SPLIT, 2));
        assert!(
            rustix::fs::fcntl_get_seals(&file)
                .unwrap()
                .contains(rustix::fs::SealFlags::SHRINK)
        );
        assert!(buf.region(0, 128).unwrap().is_ok());
        assert!(buf.region(1, 128).unwrap().is_ok());
        assert!(buf.region(2, 128).is_none());
        // A ring larger than the frontend's queue size (virtio-mmio) still fits.
        assert!(buf.region(1, 256).unwrap().is_ok());
        assert!(buf.region(1, 512).unwrap().is_err());
        let again = InflightBuffer::adopt(&reply, &file, SPLIT).unwrap();
        assert!(again.region(1, 128).unwrap().is_ok());
    }

    #[test]
    fn shapes_and_files_that_do_not_fit_are_refused() {
        assert!(matches!(
            InflightBuffer::create(&desc(3, 128), SPLIT),
            Err(InflightBufferError::Shape { .. })
        ));
        assert!(matches!(
            InflightBuffer::create(&desc(1, 0), SPLIT),
            Err(InflightBufferError::Shape { .. })
        ));
        let (_, reply, file) = InflightBuffer::create(&desc(1, 128), PACKED).unwrap();
        // Claims more than the file holds.
        let bigger = VhostUserInflight {
            mmap_size: reply.mmap_size / 2,
            ..reply
        };
        assert!(matches!(
            InflightBuffer::adopt(&bigger, &file, PACKED),
            Err(InflightBufferError::TooSmall { .. })
        ));
        let misaligned = VhostUserInflight {
            mmap_offset: 8,
            ..reply
        };
        assert!(matches!(
            InflightBuffer::adopt(&misaligned, &file, PACKED),
            Err(InflightBufferError::TooSmall { .. })
        ));
    }
}
