//! The device status field and its device-side state machine (virtio 1.2 §2.1, §3.1).
//!
//! The driver builds the status up one bit at a time: ACKNOWLEDGE, DRIVER,
//! FEATURES_OK, DRIVER_OK. Bits are never cleared except by writing 0 (reset).
//! [`StatusMachine`] enforces that order on the device side and refuses anything
//! else with a [`StatusError`], leaving its state unchanged.
//!
//! Whether FEATURES_OK may be set is not the status machine's decision: the write
//! takes a verdict callback, so the owner of the negotiated features (the device
//! lifecycle) decides. A refused verdict is not an error; FEATURES_OK simply stays
//! clear and the driver sees that when it re-reads the status (§3.1.1 step 6).

use bitflags::bitflags;
use thiserror::Error;

bitflags! {
    /// Bits of the device status field (virtio 1.2 §2.1).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
    pub struct DeviceStatus: u8 {
        /// The guest OS has found the device and recognized it as a valid virtio device.
        const ACKNOWLEDGE = 1;
        /// The guest OS knows how to drive the device.
        const DRIVER = 2;
        /// The driver is set up and ready to drive the device.
        const DRIVER_OK = 4;
        /// The driver has acknowledged all the features it understands; negotiation is complete.
        const FEATURES_OK = 8;
        /// The device has experienced an error from which it can't recover.
        const DEVICE_NEEDS_RESET = 64;
        /// Something went wrong in the guest and it has given up on the device.
        const FAILED = 128;
    }
}

/// The device's answer to a driver that sets FEATURES_OK (§2.2.2: the device either
/// accepts the features or fails to set FEATURES_OK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeaturesVerdict {
    /// The accepted features are a valid set; FEATURES_OK is set.
    Accept,
    /// The accepted features are refused; FEATURES_OK stays clear.
    Refuse,
}

/// What a legal status write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// The driver wrote 0: the device must reset (§2.4).
    Reset,
    /// These bits were newly set (empty if the driver rewrote the current value).
    Added(DeviceStatus),
    /// FEATURES_OK was requested and refused by the verdict; `added` holds the
    /// other bits of the same write, which were set.
    FeaturesRefused {
        /// Bits newly set by the write other than FEATURES_OK.
        added: DeviceStatus,
    },
}

/// A status write the device refuses. The status is left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum StatusError {
    /// The value has bits the spec does not define.
    #[error("Unknown status bits {bits:#04x}")]
    UnknownBits {
        /// The undefined bits.
        bits: u8,
    },
    /// The write would clear bits; only a reset clears them (§2.1.1).
    #[error("Status bits {:?} cleared without a reset", .bits)]
    Cleared {
        /// The bits the write would have cleared.
        bits: DeviceStatus,
    },
    /// The driver tried to set DEVICE_NEEDS_RESET, which only the device sets (§2.1.2).
    #[error("DEVICE_NEEDS_RESET is set only by the device")]
    NeedsResetWritten,
    /// A bit was set before the bits that must precede it (§3.1.1).
    #[error("{:?} set before {:?}", .bit, .missing)]
    OutOfOrder {
        /// The bit being set.
        bit: DeviceStatus,
        /// Bits that must already be set first.
        missing: DeviceStatus,
    },
    /// FAILED is set; only a reset is accepted (§2.1.1).
    #[error("Driver failed; reset required")]
    AfterFailed,
}

/// Each initialization bit and the bits that must be set with or before it.
const ORDER: [(DeviceStatus, DeviceStatus); 3] = [
    (DeviceStatus::DRIVER, DeviceStatus::ACKNOWLEDGE),
    (
        DeviceStatus::FEATURES_OK,
        DeviceStatus::ACKNOWLEDGE.union(DeviceStatus::DRIVER),
    ),
    (
        DeviceStatus::DRIVER_OK,
        DeviceStatus::ACKNOWLEDGE
            .union(DeviceStatus::DRIVER)
            .union(DeviceStatus::FEATURES_OK),
    ),
];

/// Device-side device status (virtio 1.2 §2.1, §3.1.1).
///
/// Rules enforced by [`write`](Self::write):
/// - 0 resets; otherwise bits may only be added.
/// - ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK, each needing the previous ones.
///   Several may be set in one write, except DRIVER_OK, which needs FEATURES_OK to
///   have been set (and so accepted) by an earlier write: the driver must see the
///   device's verdict before going live (§3.1.1 step 6).
/// - FAILED may be set at any time; after it only a reset is accepted.
/// - DEVICE_NEEDS_RESET belongs to the device. The driver may echo it back (a
///   read-modify-write of the status) or omit it, but cannot set or clear it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusMachine {
    status: DeviceStatus,
}

impl StatusMachine {
    /// A device that has just been reset: status 0.
    pub const fn new() -> Self {
        Self {
            status: DeviceStatus::empty(),
        }
    }

    /// The status as the driver reads it.
    pub fn read(&self) -> u8 {
        self.status.bits()
    }

    /// The status as flags.
    pub fn status(&self) -> DeviceStatus {
        self.status
    }

    /// Applies a driver write of `value`.
    ///
    /// `features_verdict` is called only when the write newly sets FEATURES_OK and
    /// is otherwise legal; on [`FeaturesVerdict::Refuse`] FEATURES_OK is withheld
    /// and the rest of the write applied.
    ///
    /// # Errors
    /// [`StatusError`] for an illegal write; the status is then unchanged.
    pub fn write(
        &mut self,
        value: u8,
        features_verdict: impl FnOnce() -> FeaturesVerdict,
    ) -> Result<StatusChange, StatusError> {
        if value == 0 {
            self.status = DeviceStatus::empty();
            return Ok(StatusChange::Reset);
        }
        let new = DeviceStatus::from_bits(value).ok_or(StatusError::UnknownBits {
            bits: value & !DeviceStatus::all().bits(),
        })?;
        let current = self.status;
        let device_owned = DeviceStatus::DEVICE_NEEDS_RESET;
        if new.contains(device_owned) && !current.contains(device_owned) {
            return Err(StatusError::NeedsResetWritten);
        }
        let cleared = current.difference(new).difference(device_owned);
        if !cleared.is_empty() {
            return Err(StatusError::Cleared { bits: cleared });
        }
        let added = new.difference(current);
        if added.is_empty() {
            return Ok(StatusChange::Added(added));
        }
        if current.contains(DeviceStatus::FAILED) {
            return Err(StatusError::AfterFailed);
        }
        for (bit, requires) in ORDER {
            if !added.contains(bit) {
                continue;
            }
            let have = if bit == DeviceStatus::DRIVER_OK {
                current
            } else {
                new
            };
            let missing = requires.difference(have);
            if !missing.is_empty() {
                return Err(StatusError::OutOfOrder { bit, missing });
            }
        }
        if added.contains(DeviceStatus::FEATURES_OK) && features_verdict() == FeaturesVerdict::Refuse {
            let added = added.difference(DeviceStatus::FEATURES_OK);
            self.status |= added;
            return Ok(StatusChange::FeaturesRefused { added });
        }
        self.status |= added;
        Ok(StatusChange::Added(added))
    }

    /// Sets DEVICE_NEEDS_RESET: the device hit an error it cannot recover from
    /// without a reset (§2.1.2). Returns whether the bit was newly set.
    pub fn set_needs_reset(&mut self) -> bool {
        let newly = !self.status.contains(DeviceStatus::DEVICE_NEEDS_RESET);
        self.status |= DeviceStatus::DEVICE_NEEDS_RESET;
        newly
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    const ACK: u8 = DeviceStatus::ACKNOWLEDGE.bits();
    const DRIVER: u8 = DeviceStatus::DRIVER.bits();
    const FEATURES_OK: u8 = DeviceStatus::FEATURES_OK.bits();
    const DRIVER_OK: u8 = DeviceStatus::DRIVER_OK.bits();
    const NEEDS_RESET: u8 = DeviceStatus::DEVICE_NEEDS_RESET.bits();
    const FAILED: u8 = DeviceStatus::FAILED.bits();

    fn accept() -> FeaturesVerdict {
        FeaturesVerdict::Accept
    }

    fn at(value: u8) -> StatusMachine {
        let mut m = StatusMachine::new();
        let mut bits = 0;
        for bit in [ACK, DRIVER, FEATURES_OK, DRIVER_OK] {
            if value & bit != 0 {
                bits |= bit;
                assert!(m.write(bits, accept).is_ok());
            }
        }
        assert_eq!(m.read(), value);
        m
    }

    fn refused(m: &mut StatusMachine, value: u8) -> StatusError {
        let before = m.read();
        let err = m.write(value, accept).expect_err("write should be refused");
        assert_eq!(m.read(), before, "a refusal must leave the status unchanged");
        err
    }

    #[test]
    fn full_sequence_one_bit_at_a_time() {
        let mut m = StatusMachine::new();
        assert_eq!(m.read(), 0);
        let mut value = 0;
        for bit in [ACK, DRIVER, FEATURES_OK, DRIVER_OK] {
            value |= bit;
            let change = m.write(value, accept);
            assert_eq!(
                change,
                Ok(StatusChange::Added(DeviceStatus::from_bits_retain(bit)))
            );
            assert_eq!(m.read(), value);
        }
    }

    #[test]
    fn several_bits_in_one_write_up_to_features_ok() {
        let mut m = StatusMachine::new();
        let value = ACK | DRIVER | FEATURES_OK;
        assert_eq!(
            m.write(value, accept),
            Ok(StatusChange::Added(DeviceStatus::from_bits_retain(value)))
        );
    }

    #[test]
    fn zero_resets_from_any_state() {
        for value in [
            ACK,
            ACK | DRIVER,
            ACK | DRIVER | FEATURES_OK,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        ] {
            let mut m = at(value);
            assert_eq!(m.write(0, accept), Ok(StatusChange::Reset));
            assert_eq!(m.read(), 0);
        }
        let mut m = at(ACK);
        assert!(m.write(ACK | FAILED, accept).is_ok());
        m.set_needs_reset();
        assert_eq!(m.write(0, accept), Ok(StatusChange::Reset));
        assert_eq!(m.read(), 0);
    }

    #[test]
    fn rewriting_the_same_value_changes_nothing() {
        let mut m = at(ACK | DRIVER);
        assert_eq!(
            m.write(ACK | DRIVER, accept),
            Ok(StatusChange::Added(DeviceStatus::empty()))
        );
        assert_eq!(m.read(), ACK | DRIVER);
    }

    #[test]
    fn clearing_bits_is_refused() {
        let mut m = at(ACK | DRIVER | FEATURES_OK);
        assert_eq!(
            refused(&mut m, ACK | FEATURES_OK),
            StatusError::Cleared {
                bits: DeviceStatus::DRIVER
            }
        );
        assert_eq!(
            refused(&mut m, ACK | DRIVER),
            StatusError::Cleared {
                bits: DeviceStatus::FEATURES_OK
            }
        );
    }

    #[test]
    fn out_of_order_bits_are_refused() {
        let mut m = StatusMachine::new();
        assert_eq!(
            refused(&mut m, DRIVER),
            StatusError::OutOfOrder {
                bit: DeviceStatus::DRIVER,
                missing: DeviceStatus::ACKNOWLEDGE
            }
        );
        let mut m = at(ACK);
        assert_eq!(
            refused(&mut m, ACK | FEATURES_OK),
            StatusError::OutOfOrder {
                bit: DeviceStatus::FEATURES_OK,
                missing: DeviceStatus::DRIVER
            }
        );
        let mut m = at(ACK | DRIVER);
        assert_eq!(
            refused(&mut m, ACK | DRIVER | DRIVER_OK),
            StatusError::OutOfOrder {
                bit: DeviceStatus::DRIVER_OK,
                missing: DeviceStatus::FEATURES_OK
            }
        );
    }

    #[test]
    fn driver_ok_needs_features_ok_from_an_earlier_write() {
        let mut m = at(ACK | DRIVER);
        let verdict_calls = Cell::new(0);
        let err = m.write(ACK | DRIVER | FEATURES_OK | DRIVER_OK, || {
            verdict_calls.set(verdict_calls.get() + 1);
            FeaturesVerdict::Accept
        });
        assert!(matches!(
            err,
            Err(StatusError::OutOfOrder {
                bit: DeviceStatus::DRIVER_OK,
                ..
            })
        ));
        assert_eq!(verdict_calls.get(), 0, "no verdict for an illegal write");
        assert_eq!(m.read(), ACK | DRIVER);
    }

    #[test]
    fn unknown_bits_are_refused() {
        for bit in [0x10, 0x20] {
            let mut m = at(ACK);
            assert_eq!(refused(&mut m, ACK | bit), StatusError::UnknownBits { bits: bit });
        }
    }

    #[test]
    fn driver_cannot_set_needs_reset() {
        let mut m = at(ACK | DRIVER);
        assert_eq!(
            refused(&mut m, ACK | DRIVER | NEEDS_RESET),
            StatusError::NeedsResetWritten
        );
    }

    #[test]
    fn needs_reset_survives_driver_writes() {
        let mut m = at(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(m.set_needs_reset());
        assert!(!m.set_needs_reset());
        let current = m.read();
        assert_eq!(current, ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET);
        // Echoing it back is fine; omitting it does not clear it.
        assert!(m.write(current, accept).is_ok());
        assert!(
            m.write(ACK | DRIVER | FEATURES_OK | DRIVER_OK | FAILED, accept)
                .is_ok()
        );
        assert_eq!(m.read(), current | FAILED);
    }

    #[test]
    fn failed_may_be_set_at_any_time() {
        for value in [
            0,
            ACK,
            ACK | DRIVER,
            ACK | DRIVER | FEATURES_OK,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        ] {
            let mut m = at(value);
            assert_eq!(
                m.write(value | FAILED, accept),
                Ok(StatusChange::Added(DeviceStatus::FAILED))
            );
            assert_eq!(m.read(), value | FAILED);
        }
    }

    #[test]
    fn only_reset_after_failed() {
        let mut m = at(ACK);
        assert!(m.write(ACK | FAILED, accept).is_ok());
        assert_eq!(refused(&mut m, ACK | DRIVER | FAILED), StatusError::AfterFailed);
        assert!(m.write(ACK | FAILED, accept).is_ok());
        assert_eq!(m.write(0, accept), Ok(StatusChange::Reset));
    }

    #[test]
    fn refused_verdict_withholds_features_ok() {
        let mut m = at(ACK | DRIVER);
        let change = m.write(ACK | DRIVER | FEATURES_OK, || FeaturesVerdict::Refuse);
        assert_eq!(
            change,
            Ok(StatusChange::FeaturesRefused {
                added: DeviceStatus::empty()
            })
        );
        assert_eq!(m.read(), ACK | DRIVER);
        // DRIVER_OK cannot follow a refused FEATURES_OK.
        assert!(matches!(
            refused(&mut m, ACK | DRIVER | FEATURES_OK | DRIVER_OK),
            StatusError::OutOfOrder {
                bit: DeviceStatus::DRIVER_OK,
                ..
            }
        ));
        // The driver may try again (e.g. after changing its features).
        assert!(m.write(ACK | DRIVER | FEATURES_OK, accept).is_ok());
        assert_eq!(m.read(), ACK | DRIVER | FEATURES_OK);
    }

    #[test]
    fn refused_verdict_keeps_the_other_bits_of_the_write() {
        let mut m = StatusMachine::new();
        let change = m.write(ACK | DRIVER | FEATURES_OK, || FeaturesVerdict::Refuse);
        let expected = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER;
        assert_eq!(change, Ok(StatusChange::FeaturesRefused { added: expected }));
        assert_eq!(m.read(), ACK | DRIVER);
    }

    #[test]
    fn verdict_asked_only_when_features_ok_is_new() {
        let calls = Cell::new(0);
        let verdict = || {
            calls.set(calls.get() + 1);
            FeaturesVerdict::Accept
        };
        let mut m = at(ACK | DRIVER);
        assert!(m.write(ACK | DRIVER | FEATURES_OK, verdict).is_ok());
        assert!(m.write(ACK | DRIVER | FEATURES_OK, verdict).is_ok());
        assert!(m.write(ACK | DRIVER | FEATURES_OK | DRIVER_OK, verdict).is_ok());
        assert_eq!(calls.get(), 1);
    }
}
