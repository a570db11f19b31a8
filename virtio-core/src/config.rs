//! Device configuration space and its generation counter (virtio 1.2 §2.5, §4.1.4.3).
//!
//! Config fields wider than 32 bits, or read as a group, can tear when the device
//! changes them between the driver's accesses. The device therefore bumps a
//! generation counter on every change, and the driver reads the generation before
//! and after its field reads, retrying until both agree (§2.5.1).

use thiserror::Error;

/// How many times [`read_consistent`] tries before giving up.
pub const MAX_CONSISTENT_READ_TRIES: u32 = 64;

/// A config space access that cannot be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// The range `offset..offset + len` is not inside the config space.
    #[error("Config range {offset}+{len} outside {size} bytes")]
    OutOfBounds {
        /// Start of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the config space.
        size: usize,
    },
    /// The generation kept changing while the driver read.
    #[error("Config generation unstable after {tries} tries")]
    Unstable {
        /// How many reads were attempted.
        tries: u32,
    },
}

/// Device-side configuration space: device-specific bytes plus their generation.
///
/// The driver's accesses arrive through the transport (the control plane) and are
/// bounds-checked here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    generation: u32,
}

impl ConfigSpace {
    /// A config space holding `bytes` (the device-specific layout, little-endian
    /// fields), at generation 0.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self { bytes, generation: 0 }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the device has no config space.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The current generation (`config_generation`, §4.1.4.3).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Device side: writes `bytes` at `offset`. Returns whether the contents
    /// changed; only a change bumps the generation, since the spec asks for a new
    /// generation when the configuration "noticeably changes" (§4.1.4.3).
    ///
    /// # Errors
    /// [`ConfigError::OutOfBounds`] if the range is outside the space; nothing is
    /// written then.
    pub fn update(&mut self, offset: usize, bytes: &[u8]) -> Result<bool, ConfigError> {
        let size = self.bytes.len();
        let target = offset
            .checked_add(bytes.len())
            .and_then(|end| self.bytes.get_mut(offset..end))
            .ok_or(ConfigError::OutOfBounds {
                offset,
                len: bytes.len(),
                size,
            })?;
        if target == bytes {
            return Ok(false);
        }
        target.copy_from_slice(bytes);
        self.generation = self.generation.wrapping_add(1);
        Ok(true)
    }

    /// Forces a new generation without changing the bytes, so that a driver in the
    /// middle of a multi-field read starts over.
    pub fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// [`ConfigError::OutOfBounds`] if the range is outside the space; `buf` is
    /// left untouched then.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), ConfigError> {
        let source = offset
            .checked_add(buf.len())
            .and_then(|end| self.bytes.get(offset..end))
            .ok_or(ConfigError::OutOfBounds {
                offset,
                len: buf.len(),
                size: self.bytes.len(),
            })?;
        buf.copy_from_slice(source);
        Ok(())
    }
}

/// Driver side: fills `buf` with `read` between two reads of the generation,
/// retrying until the generation is the same before and after (§2.5.1: "Drivers
/// MUST NOT assume reads from fields greater than 32 bits wide are atomic, nor are
/// reads from multiple fields").
///
/// # Errors
/// [`ConfigError::Unstable`] after [`MAX_CONSISTENT_READ_TRIES`] attempts; `buf`
/// then holds the last (possibly torn) attempt and must not be trusted.
pub fn read_consistent(
    mut read_gen: impl FnMut() -> u32,
    mut read: impl FnMut(&mut [u8]),
    buf: &mut [u8],
) -> Result<(), ConfigError> {
    for _ in 0..MAX_CONSISTENT_READ_TRIES {
        let before = read_gen();
        read(buf);
        if read_gen() == before {
            return Ok(());
        }
    }
    Err(ConfigError::Unstable {
        tries: MAX_CONSISTENT_READ_TRIES,
    })
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;

    #[test]
    fn read_and_update_within_bounds() {
        let mut space = ConfigSpace::new(vec![0; 8]);
        assert_eq!(space.generation(), 0);
        assert_eq!(space.update(2, &[1, 2, 3]), Ok(true));
        assert_eq!(space.generation(), 1);
        let mut buf = [0xff; 8];
        assert_eq!(space.read(0, &mut buf), Ok(()));
        assert_eq!(buf, [0, 0, 1, 2, 3, 0, 0, 0]);
        let mut tail = [0; 2];
        assert_eq!(space.read(6, &mut tail), Ok(()));
        assert_eq!(space.read(8, &mut []), Ok(()));
    }

    #[test]
    fn unchanged_update_keeps_the_generation() {
        let mut space = ConfigSpace::new(vec![5; 4]);
        assert_eq!(space.update(0, &[5, 5]), Ok(false));
        assert_eq!(space.generation(), 0);
        space.bump_generation();
        assert_eq!(space.generation(), 1);
    }

    #[test]
    fn generation_wraps() {
        let mut space = ConfigSpace {
            bytes: vec![0],
            generation: u32::MAX,
        };
        assert_eq!(space.update(0, &[1]), Ok(true));
        assert_eq!(space.generation(), 0);
    }

    #[test]
    fn out_of_bounds_is_refused_without_side_effects() {
        let mut space = ConfigSpace::new(vec![7; 4]);
        let err = ConfigError::OutOfBounds {
            offset: 3,
            len: 2,
            size: 4,
        };
        assert_eq!(space.update(3, &[1, 1]), Err(err));
        assert_eq!(space.generation(), 0);
        let mut buf = [0; 2];
        assert_eq!(space.read(3, &mut buf), Err(err));
        assert_eq!(buf, [0, 0]);
        assert!(matches!(
            space.read(usize::MAX, &mut buf),
            Err(ConfigError::OutOfBounds { .. })
        ));
        assert!(matches!(
            space.update(usize::MAX, &[1]),
            Err(ConfigError::OutOfBounds { .. })
        ));
        assert!(matches!(
            space.read(5, &mut []),
            Err(ConfigError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn consistent_read_of_a_stable_space() {
        let space = ConfigSpace::new((0..8).collect());
        let mut buf = [0; 8];
        let result = read_consistent(
            || space.generation(),
            |b| space.read(0, b).unwrap_or(()),
            &mut buf,
        );
        assert_eq!(result, Ok(()));
        assert_eq!(buf, [0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn consistent_read_retries_while_the_device_updates() {
        // The device rewrites an 8-byte field in two halves; each of the driver's
        // first three reads lands between the halves and sees a torn value.
        let space = RefCell::new(ConfigSpace::new(vec![0; 8]));
        let updates_left = Cell::new(3u8);
        let attempts = Cell::new(0);
        let read_gen = || space.borrow().generation();
        let read = |buf: &mut [u8]| {
            attempts.set(attempts.get() + 1);
            let mut s = space.borrow_mut();
            let n = updates_left.get();
            if n > 0 {
                updates_left.set(n - 1);
                assert_eq!(s.update(0, &[n; 4]), Ok(true));
                assert_eq!(s.read(0, buf), Ok(()));
                assert_eq!(s.update(4, &[n; 4]), Ok(true));
            } else {
                assert_eq!(s.read(0, buf), Ok(()));
            }
        };
        let mut buf = [0xaa; 8];
        assert_eq!(read_consistent(read_gen, read, &mut buf), Ok(()));
        assert_eq!(attempts.get(), 4);
        assert_eq!(buf, [1; 8], "the accepted read is not torn");
    }

    #[test]
    fn consistent_read_gives_up() {
        let generation = Cell::new(0u32);
        let read_gen = || {
            generation.set(generation.get().wrapping_add(1));
            generation.get()
        };
        let mut buf = [0; 4];
        assert_eq!(
            read_consistent(read_gen, |_| {}, &mut buf),
            Err(ConfigError::Unstable {
                tries: MAX_CONSISTENT_READ_TRIES
            })
        );
        assert_eq!(generation.get(), 2 * MAX_CONSISTENT_READ_TRIES);
    }
}
