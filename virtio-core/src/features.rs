//! Feature bits and their negotiation (virtio 1.2 §2.2, §6).
//!
//! Negotiation works on raw `u64` words because every device crate adds its own
//! device-specific bits (0..=23 and 50..=127 in the spec; we carry 64 bits).
//! [`Features`] is the typed view of the device-independent bits, obtained with
//! [`Features::from_bits_retain`] so device-specific bits survive the round trip.
//!
//! [`negotiate`] is the device's check of what a driver accepted; [`select`] is the
//! driver's choice of what to accept. `select`'s output always passes `negotiate`
//! for the same dependency table.

use std::fmt;

use bitflags::bitflags;
use thiserror::Error;

bitflags! {
    /// Device-independent (reserved) feature bits, virtio 1.2 §6.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        /// The driver can use descriptors with the VIRTQ_DESC_F_INDIRECT flag set (§2.7.5.3).
        const INDIRECT_DESC = 1 << 28;
        /// Enables the used_event and avail_event fields (§2.7.7, §2.7.8).
        const EVENT_IDX = 1 << 29;
        /// Compliance with this specification, giving a simple way to detect legacy devices or drivers.
        const VERSION_1 = 1 << 32;
        /// The device can be used on a platform where its access to memory is limited or translated (e.g. an IOMMU).
        const ACCESS_PLATFORM = 1 << 33;
        /// Support for the packed virtqueue layout (§2.8).
        const RING_PACKED = 1 << 34;
        /// All buffers are used by the device in the same order in which they have been made available.
        const IN_ORDER = 1 << 35;
        /// Memory accesses by the driver and the device are ordered in a way described by the platform.
        const ORDER_PLATFORM = 1 << 36;
        /// The device supports Single Root I/O Virtualization (PCI only).
        const SR_IOV = 1 << 37;
        /// The driver passes extra data, besides identifying the virtqueue, in its device notifications (§2.9).
        const NOTIFICATION_DATA = 1 << 38;
        /// The driver uses the data provided by the device as a virtqueue identifier in available buffer notifications.
        const NOTIF_CONFIG_DATA = 1 << 39;
        /// The driver can reset a queue individually (§2.6.1).
        const RING_RESET = 1 << 40;
    }
}

/// One feature that may be accepted only together with others (virtio 1.2 §2.2.1:
/// "The driver MUST NOT accept a feature which requires another feature which was
/// not accepted").
///
/// If any bit of `feature` is accepted, every bit of `requires` must be accepted
/// too. Tables are device specific, e.g. virtio-net's GUEST_TSO4 requires GUEST_CSUM
/// (§5.1.3.1). A table must not make VERSION_1 depend on anything: [`select`] never
/// drops VERSION_1, so such an entry could not be satisfied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dependency {
    /// The feature bit (or bits) that carry the requirement.
    pub feature: u64,
    /// Bits that must be accepted whenever `feature` is.
    pub requires: u64,
}

/// Dependencies among the device-independent bits.
///
/// The spec states none among the bits in [`Features`] (virtio 1.2 §6). The one
/// transport rule we enforce, that VERSION_1 is offered and accepted because this
/// crate is modern-only (§6.1, §6.2), is not a dependency and lives in
/// [`negotiate`] and [`select`] themselves. Both always check this list in addition
/// to the device's own table.
pub const TRANSPORT_DEPENDENCIES: &[Dependency] = &[];

/// Why a set of accepted features is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FeatureError {
    /// The driver accepted bits the device did not offer (§2.2.1).
    #[error("Features not offered by the device: {}", BitList(*.bits))]
    NotOffered {
        /// The offending bits.
        bits: u64,
    },
    /// VERSION_1 was not accepted (or not offered); legacy interfaces are not supported.
    #[error("VERSION_1 not negotiated")]
    MissingVersion1,
    /// A feature was accepted without the features it requires (§2.2.1).
    #[error("Feature {} requires missing {}", BitList(*.feature), BitList(*.missing))]
    MissingDependency {
        /// The accepted feature bit(s) of the broken dependency.
        feature: u64,
        /// Required bits that were not accepted.
        missing: u64,
    },
}

/// Formats a mask as its bit numbers ("bits 28, 40").
struct BitList(u64);

impl fmt::Display for BitList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        f.write_str(if rest.is_power_of_two() { "bit " } else { "bits " })?;
        let mut first = true;
        while rest != 0 {
            let bit = rest.trailing_zeros();
            rest &= rest - 1;
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{bit}")?;
        }
        Ok(())
    }
}

fn all_dependencies(deps: &[Dependency]) -> impl Iterator<Item = &Dependency> {
    deps.iter().chain(TRANSPORT_DEPENDENCIES)
}

/// Checks the features a driver accepted against what the device offered; the
/// device calls this when the driver sets FEATURES_OK (§2.2.2, §3.1.1 step 5).
///
/// Returns the negotiated feature word.
///
/// # Errors
/// Accepted bits that were not offered, VERSION_1 not accepted, or an accepted
/// feature whose dependencies were not accepted.
pub fn negotiate(offered: u64, accepted: u64, deps: &[Dependency]) -> Result<u64, FeatureError> {
    let not_offered = accepted & !offered;
    if not_offered != 0 {
        return Err(FeatureError::NotOffered { bits: not_offered });
    }
    if accepted & Features::VERSION_1.bits() == 0 {
        return Err(FeatureError::MissingVersion1);
    }
    for dep in all_dependencies(deps) {
        let missing = dep.requires & !accepted;
        if accepted & dep.feature != 0 && missing != 0 {
            return Err(FeatureError::MissingDependency {
                feature: dep.feature & accepted,
                missing,
            });
        }
    }
    Ok(accepted)
}

/// Chooses the features a driver accepts: `offered ∩ wanted`, minus every feature
/// whose dependencies are not all present, plus VERSION_1 whenever it is offered
/// (§6.1: "A driver MUST accept VIRTIO_F_VERSION_1 if it is offered").
///
/// Dropping a feature can break another feature's dependency, so this repeats until
/// nothing changes. If VERSION_1 is offered the result passes [`negotiate`] with the
/// same `deps`.
pub fn select(offered: u64, wanted: u64, deps: &[Dependency]) -> u64 {
    let version_1 = offered & Features::VERSION_1.bits();
    let mut selected = (offered & wanted) | version_1;
    loop {
        let before = selected;
        for dep in all_dependencies(deps) {
            if selected & dep.feature != 0 && selected & dep.requires != dep.requires {
                selected &= !dep.feature | version_1;
            }
        }
        // Bits are only ever removed, so this terminates within 64 rounds.
        if selected == before {
            return selected;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V1: u64 = Features::VERSION_1.bits();
    const CSUM: u64 = 1 << 0;
    const GUEST_CSUM: u64 = 1 << 1;
    const GUEST_TSO4: u64 = 1 << 7;
    const GUEST_ECN: u64 = 1 << 9;
    // Shaped like virtio-net's table: TSO4 needs GUEST_CSUM, ECN needs TSO4.
    const NET_DEPS: &[Dependency] = &[
        Dependency {
            feature: GUEST_TSO4,
            requires: GUEST_CSUM,
        },
        Dependency {
            feature: GUEST_ECN,
            requires: GUEST_TSO4,
        },
    ];

    #[test]
    fn bit_numbers_match_the_spec() {
        let expected = [
            (Features::INDIRECT_DESC, 28),
            (Features::EVENT_IDX, 29),
            (Features::VERSION_1, 32),
            (Features::ACCESS_PLATFORM, 33),
            (Features::RING_PACKED, 34),
            (Features::IN_ORDER, 35),
            (Features::ORDER_PLATFORM, 36),
            (Features::SR_IOV, 37),
            (Features::NOTIFICATION_DATA, 38),
            (Features::NOTIF_CONFIG_DATA, 39),
            (Features::RING_RESET, 40),
        ];
        for (flag, bit) in expected {
            assert_eq!(flag.bits(), 1 << bit, "{flag:?}");
        }
    }

    #[test]
    fn view_keeps_device_specific_bits() {
        let raw = V1 | GUEST_TSO4 | (1 << 55);
        let view = Features::from_bits_retain(raw);
        assert!(view.contains(Features::VERSION_1));
        assert_eq!(view.bits(), raw);
    }

    #[test]
    fn negotiate_accepts_a_valid_subset() {
        let offered = V1 | CSUM | GUEST_CSUM | GUEST_TSO4;
        let accepted = V1 | GUEST_CSUM | GUEST_TSO4;
        assert_eq!(negotiate(offered, accepted, NET_DEPS), Ok(accepted));
    }

    #[test]
    fn negotiate_refuses_bits_not_offered() {
        let err = negotiate(V1 | CSUM, V1 | CSUM | GUEST_TSO4 | (1 << 40), &[]);
        assert_eq!(
            err,
            Err(FeatureError::NotOffered {
                bits: GUEST_TSO4 | (1 << 40)
            })
        );
        let msg = err.map(|_| ()).unwrap_err().to_string();
        assert_eq!(msg, "Features not offered by the device: bits 7, 40");
    }

    #[test]
    fn negotiate_refuses_missing_version_1() {
        assert_eq!(
            negotiate(V1 | CSUM, CSUM, &[]),
            Err(FeatureError::MissingVersion1)
        );
        assert_eq!(negotiate(CSUM, CSUM, &[]), Err(FeatureError::MissingVersion1));
    }

    #[test]
    fn negotiate_refuses_broken_dependency() {
        let offered = V1 | GUEST_CSUM | GUEST_TSO4;
        let err = negotiate(offered, V1 | GUEST_TSO4, NET_DEPS);
        assert_eq!(
            err,
            Err(FeatureError::MissingDependency {
                feature: GUEST_TSO4,
                missing: GUEST_CSUM
            })
        );
        let msg = err.map(|_| ()).unwrap_err().to_string();
        assert_eq!(msg, "Feature bit 7 requires missing bit 1");
    }

    #[test]
    fn select_intersects_and_keeps_version_1() {
        let offered = V1 | CSUM | GUEST_CSUM;
        assert_eq!(select(offered, CSUM | GUEST_TSO4, NET_DEPS), V1 | CSUM);
        assert_eq!(select(CSUM, CSUM | V1, NET_DEPS), CSUM);
    }

    #[test]
    fn select_drops_dependents_transitively() {
        // GUEST_CSUM is not offered: TSO4 goes, and then ECN, which needed TSO4.
        let offered = V1 | GUEST_TSO4 | GUEST_ECN | CSUM;
        assert_eq!(select(offered, u64::MAX, NET_DEPS), V1 | CSUM);
        // Table order must not matter.
        let reversed = [NET_DEPS[1], NET_DEPS[0]];
        assert_eq!(select(offered, u64::MAX, &reversed), V1 | CSUM);
    }

    fn dependency() -> impl Strategy<Value = Dependency> {
        // VERSION_1 never carries a dependency (see `Dependency`).
        (
            (0u32..64).prop_filter("not VERSION_1", |b| *b != 32),
            any::<u64>(),
            0u32..3,
        )
            .prop_map(|(bit, mask, density)| Dependency {
                feature: 1 << bit,
                // Sparse masks make satisfiable dependencies likely.
                requires: mask & (mask >> density) & (mask >> (2 * density)),
            })
    }

    proptest! {
        #[test]
        fn select_output_always_negotiates(
            offered in any::<u64>(),
            wanted in any::<u64>(),
            deps in proptest::collection::vec(dependency(), 0..12),
        ) {
            let offered = offered | V1;
            let chosen = select(offered, wanted, &deps);
            prop_assert_eq!(negotiate(offered, chosen, &deps), Ok(chosen));
            prop_assert_eq!(chosen & !(wanted | V1), 0);
        }
    }
}
