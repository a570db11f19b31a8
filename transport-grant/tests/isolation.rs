//! The device side reaches only what is granted to it, and every refusal is a typed
//! error that leaves the queue and the guest's data intact (HOSTILE rule 30).

// Test sizes and indices are small.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{echo_reversed, features, grant_error, setup, setup_with};
use hypervisor::{DomainId, Hypervisor};
use std::error::Error;
use transport_grant::addr::{decode, encode};
use transport_grant::{GrantCopy, GrantError, GrantRef, GrantService, GrantShare, GrantState, GrantToken};
use virtio_core::ring::split::DeviceQueueError;
use virtio_core::{Direction, DriverShare, Exposed, GuestBuf, ShareError};

const HOST: DomainId = Hypervisor::HOST;

fn copy_from(
    grants: &GrantService,
    grantee: DomainId,
    granter: DomainId,
    gref: GrantRef,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, GrantError> {
    let mut dst = vec![0u8; len];
    grants.copy(
        grantee,
        &mut [GrantCopy::FromGrant {
            granter,
            gref,
            offset,
            dst: &mut dst,
        }],
    )?;
    Ok(dst)
}

fn copy_to(
    grants: &GrantService,
    grantee: DomainId,
    granter: DomainId,
    gref: GrantRef,
    offset: u64,
    src: &[u8],
) -> Result<(), GrantError> {
    grants.copy(
        grantee,
        &mut [GrantCopy::ToGrant {
            granter,
            gref,
            offset,
            src,
        }],
    )
}

#[test]
fn unknown_and_out_of_range_references_are_refused() {
    let hv = Hypervisor::new();
    let a = hv.create_domain("a", 1 << 20).unwrap();
    let grants = GrantService::new(hv.clone());
    let page = a.memory().alloc_pages(1).unwrap();
    let r = grants.grant(a.id(), HOST, page, false).unwrap();
    for bad in [GrantRef(0), GrantRef(r.0 + 1), GrantRef(u32::MAX)] {
        assert!(
            matches!(
                copy_from(&grants, HOST, a.id(), bad, 0, 1),
                Err(GrantError::BadRef(_))
            ),
            "{bad}"
        );
        assert!(matches!(
            grants.map(HOST, a.id(), bad, false),
            Err(GrantError::BadRef(_))
        ));
    }
    // An entry that awaits a transfer grants nothing.
    let offer = grants.accept_transfer(a.id(), HOST, page).unwrap();
    assert!(matches!(
        copy_from(&grants, HOST, a.id(), offer, 0, 1),
        Err(GrantError::NotGranted(_))
    ));
    assert!(matches!(
        grants.map(HOST, a.id(), offer, false),
        Err(GrantError::NotGranted(_))
    ));
    // A domain without a table, or without memory, grants nothing.
    let b = hv.create_domain("b", 1 << 20).unwrap();
    assert!(matches!(
        copy_from(&grants, HOST, b.id(), r, 0, 1),
        Err(GrantError::BadRef(_))
    ));
    assert!(matches!(
        grants.grant(HOST, a.id(), page, false),
        Err(GrantError::NoSuchDomain(_))
    ));
    // Granting memory the granter does not have, or an unaligned page.
    assert!(matches!(
        grants.grant(a.id(), HOST, 0x1000, false),
        Err(GrantError::OutsideMemory { .. })
    ));
    assert!(matches!(
        grants.grant(a.id(), HOST, page + 1, false),
        Err(GrantError::Unaligned(_))
    ));
    assert!(matches!(
        grants.grant_range(a.id(), HOST, page, 0, false),
        Err(GrantError::Empty)
    ));
}

#[test]
fn wrong_domain_read_only_and_revoked_grants_are_refused_and_data_stays() {
    let hv = Hypervisor::new();
    let a = hv.create_domain("a", 1 << 20).unwrap();
    let b = hv.create_domain("b", 1 << 20).unwrap();
    let grants = GrantService::new(hv.clone());
    let mem = a.memory();
    let page = mem.alloc_pages(1).unwrap();
    mem.write(page, b"secret").unwrap();

    // Granted to b: the host may neither copy nor map it.
    let to_b = grants.grant(a.id(), b.id(), page, false).unwrap();
    assert!(matches!(
        copy_from(&grants, HOST, a.id(), to_b, 0, 6),
        Err(GrantError::WrongDomain { granted_to, caller: HOST, .. }) if granted_to == b.id()
    ));
    assert!(matches!(
        grants.map(HOST, a.id(), to_b, false),
        Err(GrantError::WrongDomain { .. })
    ));
    assert_eq!(copy_from(&grants, b.id(), a.id(), to_b, 0, 6).unwrap(), b"secret");

    // Read-only: a writable map and a copy into it are refused; a read-only map is
    // refused writes by the MMU-backed view, and reads work.
    let ro = grants.grant(a.id(), HOST, page, true).unwrap();
    assert!(matches!(
        grants.map(HOST, a.id(), ro, true),
        Err(GrantError::ReadOnly(_))
    ));
    assert!(matches!(
        copy_to(&grants, HOST, a.id(), ro, 0, b"XXXXXX"),
        Err(GrantError::ReadOnly(_))
    ));
    let m = grants.map(HOST, a.id(), ro, false).unwrap();
    assert!(!m.is_writable());
    assert!(matches!(m.write(0, b"X"), Err(GrantError::ReadOnly(_))));
    let mut seen = [0u8; 6];
    m.read(0, &mut seen).unwrap();
    assert_eq!(&seen, b"secret");
    // The mapping covers its page and nothing else.
    assert!(matches!(
        m.read(4095, &mut seen),
        Err(GrantError::OutOfRange { .. })
    ));
    drop(m);

    // Revoked: every use after end_access is refused as such.
    grants.end_access(a.id(), ro).unwrap();
    assert_eq!(grants.state(a.id(), ro).unwrap(), GrantState::Revoked);
    assert!(matches!(
        copy_from(&grants, HOST, a.id(), ro, 0, 1),
        Err(GrantError::Revoked(_))
    ));
    assert!(matches!(
        grants.map(HOST, a.id(), ro, false),
        Err(GrantError::Revoked(_))
    ));
    assert!(matches!(
        grants.end_access(a.id(), ro),
        Err(GrantError::Revoked(_))
    ));

    let mut check = [0u8; 6];
    mem.read(page, &mut check).unwrap();
    assert_eq!(&check, b"secret", "no refused write reached memory");
}

#[test]
fn accesses_past_the_granted_bytes_are_refused() {
    let hv = Hypervisor::new();
    let a = hv.create_domain("a", 1 << 20).unwrap();
    let grants = GrantService::new(hv.clone());
    let mem = a.memory();
    let page = mem.alloc_pages(3).unwrap();
    mem.write(page, &[0xee; 3 * 4096]).unwrap();
    // 5000 bytes starting 100 bytes before the first page boundary.
    let buf = page + 4096 - 100;
    let r = grants.grant_range(a.id(), HOST, buf, 5000, false).unwrap();
    assert_eq!((r.pages, r.offset), (3, 3996));
    let start = u64::from(r.offset);
    assert_eq!(
        copy_from(&grants, HOST, a.id(), r.first, start, 5000)
            .unwrap()
            .len(),
        5000
    );
    for (offset, len) in [
        (start - 1, 1),
        (start, 5001),
        (start + 4999, 2),
        (0, 1),
        (u64::MAX - 1, 4),
    ] {
        assert!(
            matches!(
                copy_from(&grants, HOST, a.id(), r.first, offset, len),
                Err(GrantError::OutOfRange { .. })
            ),
            "{offset}+{len}"
        );
        assert!(matches!(
            copy_to(&grants, HOST, a.id(), r.first, offset, &vec![1; len]),
            Err(GrantError::OutOfRange { .. })
        ));
    }
    // The unaligned ends are sub-page grants: copied, never mapped.
    assert!(matches!(
        grants.map(HOST, a.id(), r.first, false),
        Err(GrantError::SubPage(_))
    ));
    let mut all = vec![0u8; 3 * 4096];
    mem.read(page, &mut all).unwrap();
    assert!(all.iter().all(|&b| b == 0xee), "refused copies wrote nothing");
}

#[test]
fn end_access_fails_while_mapped_and_succeeds_after_unmap() {
    let hv = Hypervisor::new();
    let a = hv.create_domain("a", 1 << 20).unwrap();
    let grants = GrantService::new(hv.clone());
    let page = a.memory().alloc_pages(1).unwrap();
    let r = grants.grant(a.id(), HOST, page, false).unwrap();
    let m1 = grants.map(HOST, a.id(), r, true).unwrap();
    let m2 = grants.map(HOST, a.id(), r, false).unwrap();
    m1.write(10, b"mapped").unwrap();
    assert!(matches!(
        grants.end_access(a.id(), r),
        Err(GrantError::StillMapped { maps: 2, .. })
    ));
    grants.unmap(m1);
    assert!(matches!(
        grants.end_access(a.id(), r),
        Err(GrantError::StillMapped { maps: 1, .. })
    ));
    drop(m2);
    grants.end_access(a.id(), r).unwrap();
    let mut b = [0u8; 6];
    a.memory().read(page + 10, &mut b).unwrap();
    assert_eq!(&b, b"mapped");
}

#[test]
fn transfers_need_a_willing_recipient_and_move_the_content() {
    let hv = Hypervisor::new();
    let a = hv.create_domain("a", 1 << 20).unwrap();
    let b = hv.create_domain("b", 1 << 20).unwrap();
    let c = hv.create_domain("c", 1 << 20).unwrap();
    let grants = GrantService::new(hv.clone());
    let page = a.memory().alloc_pages(1).unwrap();
    a.memory().write(page, b"moving").unwrap();

    // b has not offered anything.
    assert!(matches!(
        grants.transfer(a.id(), page, b.id(), GrantRef(1)),
        Err(GrantError::NotAccepting(_))
    ));
    let into = b.memory().alloc_pages(1).unwrap();
    let offer = grants.accept_transfer(b.id(), a.id(), into).unwrap();
    // Only from the domain named in the offer, only whole pages.
    assert!(matches!(
        grants.transfer(c.id(), c.memory().base(), b.id(), offer),
        Err(GrantError::WrongDomain { .. })
    ));
    assert!(matches!(
        grants.transfer(a.id(), page + 8, b.id(), offer),
        Err(GrantError::Unaligned(_))
    ));
    // A page the sender still grants does not change hands.
    let g = grants.grant(a.id(), HOST, page, true).unwrap();
    assert!(matches!(
        grants.transfer(a.id(), page, b.id(), offer),
        Err(GrantError::PageInUse(_))
    ));
    grants.end_access(a.id(), g).unwrap();

    grants.transfer(a.id(), page, b.id(), offer).unwrap();
    assert_eq!(
        grants.state(b.id(), offer).unwrap(),
        GrantState::TransferCompleted
    );
    let mut got = [0u8; 6];
    b.memory().read(into, &mut got).unwrap();
    assert_eq!(&got, b"moving");
    a.memory().read(page, &mut got).unwrap();
    assert_eq!(got, [0; 6], "the sender lost the content");
    // The offer is used up.
    assert!(matches!(
        grants.transfer(a.id(), page, b.id(), offer),
        Err(GrantError::NotAccepting(_))
    ));
    grants.end_access(b.id(), offer).unwrap();
}

/// What a hostile driver does to the next exposed buffer's descriptor.
#[derive(Clone, Copy)]
enum Forgery {
    /// Replace the address and length.
    Addr(u64, u32),
    /// Keep the real grant, claim more bytes than it covers.
    Grow(u32),
    /// Name a grant of the victim page that was ended just before (the test
    /// resolves it into an `Addr`).
    Revoked,
}

/// A driver share that rewrites the next exposed buffer's descriptor, as a hostile
/// or buggy driver would; its real grant is still ended on retire.
struct Forge {
    inner: GrantShare,
    next: Option<Forgery>,
}

impl DriverShare for Forge {
    type Token = GrantToken;
    fn expose(&mut self, buf: GuestBuf, dir: Direction) -> Result<Exposed<GrantToken>, ShareError> {
        let mut e = self.inner.expose(buf, dir)?;
        match self.next.take() {
            Some(Forgery::Addr(addr, len)) => (e.addr, e.len) = (addr, len),
            Some(Forgery::Grow(n)) => e.len += n,
            Some(Forgery::Revoked) | None => {}
        }
        Ok(e)
    }
    fn expose_table(&mut self, table: &[u8]) -> Result<Exposed<GrantToken>, ShareError> {
        self.inner.expose_table(table)
    }
    fn retire(&mut self, token: GrantToken, written: u32) {
        self.inner.retire(token, written)
    }
}

#[test]
fn forged_descriptors_are_rejected_and_the_queue_keeps_working() {
    for indirect in [false, true] {
        let mut s = setup_with(8, features(indirect), |_| {}, |inner| Forge { inner, next: None });
        let g = s.guest.id();
        let mem = s.guest.memory().clone();
        let other = s.hv.create_domain("other", 1 << 20).unwrap();
        // A page that holds data the device must never see or change.
        let victim = mem.alloc_pages(1).unwrap();
        mem.write(victim, &[0x5a; 4096]).unwrap();
        let to_other = s.grants.grant(g, other.id(), victim, false).unwrap();
        let read_only = s.grants.grant(g, HOST, victim, true).unwrap();
        let req = mem.alloc(64, 8).unwrap();
        let resp = mem.alloc(64, 8).unwrap();
        mem.write(req, &[1; 64]).unwrap();
        // Warm up, so that the indirect-table slot exists before counting grants.
        s.driver
            .add(&[GuestBuf::new(req, 64)], &[GuestBuf::new(resp, 64)], 0)
            .unwrap();
        let (head, n) = echo_reversed(&mut s.device).unwrap();
        s.device.add_used(head, n).unwrap();
        s.driver.pop_used().unwrap().unwrap();
        let baseline = s.model.active_grants();
        type Check = fn(&GrantError) -> bool;
        let cases: [(Forgery, Check); 8] = [
            (Forgery::Addr(encode(GrantRef(0), 0, false), 64), |e| {
                matches!(e, GrantError::BadRef(_))
            }),
            (Forgery::Addr(encode(GrantRef(60_000), 0, false), 64), |e| {
                matches!(e, GrantError::BadRef(_))
            }),
            (Forgery::Addr(1 << 50, 64), |e| {
                matches!(e, GrantError::BadAddress(_))
            }),
            (Forgery::Addr(encode(to_other, 0, false), 64), |e| {
                matches!(e, GrantError::WrongDomain { .. })
            }),
            (Forgery::Addr(encode(read_only, 0, false), 64), |e| {
                matches!(e, GrantError::ReadOnly(_))
            }),
            (Forgery::Addr(encode(read_only, 0, true), 64), |e| {
                matches!(e, GrantError::ReadOnly(_))
            }),
            // Revoked just before use: see below.
            (Forgery::Revoked, |e| matches!(e, GrantError::Revoked(_))),
            (Forgery::Grow(1), |e| matches!(e, GrantError::OutOfRange { .. })),
        ];
        for (i, (forgery, is_expected)) in cases.into_iter().enumerate() {
            let i = i as u32;
            let forgery = match forgery {
                Forgery::Revoked => {
                    let revoked = s.grants.grant(g, HOST, victim, false).unwrap();
                    s.grants.end_access(g, revoked).unwrap();
                    Forgery::Addr(encode(revoked, 0, true), 64)
                }
                f => f,
            };
            // The response is the only buffer, so it gets the forged descriptor.
            s.driver.share().next = Some(forgery);
            s.driver.add(&[], &[GuestBuf::new(resp, 64)], i).unwrap();
            let err = s.device.pop().unwrap_err();
            assert!(matches!(err, DeviceQueueError::BadChain { .. }), "{err}");
            let ge = grant_error(&err).unwrap_or_else(|| panic!("no grant error in {err}"));
            assert!(is_expected(ge), "case {i}: {ge}");
            // The rejected chain came back with length 0 and its grants were ended.
            let used = s.driver.pop_used().unwrap().unwrap();
            assert_eq!((used.token, used.len), (i, 0));
            assert_eq!(s.driver.share().inner.live(), 0);
            assert_eq!(s.model.active_grants(), baseline);
            // A well-formed request still round-trips.
            s.driver
                .add(&[GuestBuf::new(req, 64)], &[GuestBuf::new(resp, 64)], 1000)
                .unwrap();
            let (head, n) = echo_reversed(&mut s.device).unwrap();
            s.device.add_used(head, n).unwrap();
            assert_eq!(s.driver.pop_used().unwrap().unwrap().len, 64);
        }
        let mut page = vec![0u8; 4096];
        mem.read(victim, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0x5a), "the victim page is untouched");
        assert!(s.device.fault().is_none());
    }
}

#[test]
fn a_device_write_to_a_readable_segment_is_denied() {
    let mut s = setup(8, features(false));
    let mem = s.guest.memory().clone();
    let req = mem.alloc(16, 8).unwrap();
    mem.write(req, &[7; 16]).unwrap();
    s.driver.add(&[GuestBuf::new(req, 16)], &[], 1).unwrap();
    let chain = s.device.pop().unwrap().unwrap();
    let seg = chain.readable()[0];
    let err = virtio_core::DeviceMemory::write(s.device.memory(), &seg, 0, &[0; 16]).unwrap_err();
    assert!(matches!(err, virtio_core::AccessError::Denied));
    let mut b = [0u8; 16];
    mem.read(req, &mut b).unwrap();
    assert_eq!(b, [7; 16]);
    // Reading past the segment is refused before the grant is consulted.
    let mut big = [0u8; 17];
    assert!(virtio_core::DeviceMemory::read(s.device.memory(), &seg, 0, &mut big).is_err());
}

/// One-shot buffer grants are for copying only: a backend that tries to map one
/// instead is refused, so the driver never has to defer ending it, and the
/// buffer's memory is the caller's again the moment it is retired (a mapped
/// one-shot grant left the device writing memory the caller had reused).
#[test]
fn a_one_shot_grant_cannot_be_mapped_and_ends_when_retired() {
    let mut s = setup(8, features(false));
    let g = s.guest.id();
    let mem = s.guest.memory().clone();
    let base_grants = s.model.active_grants();
    let buf = mem.alloc_pages(1).unwrap();
    s.driver.add(&[], &[GuestBuf::new(buf, 4096)], 1).unwrap();
    let chain = s.device.pop().unwrap().unwrap();
    let gref = decode(chain.writable()[0].addr()).unwrap().gref;
    assert!(matches!(
        s.grants.map(HOST, g, gref, true),
        Err(GrantError::CopyOnly(r)) if r == gref
    ));
    s.device.add_used(chain.head(), 0).unwrap();
    s.driver.pop_used().unwrap().unwrap();
    assert_eq!(s.driver.share().deferred(), 0, "nothing to defer");
    assert_eq!(s.grants.state(g, gref).unwrap(), GrantState::Revoked);
    assert_eq!(s.model.active_grants(), base_grants);
}

#[test]
fn rings_are_granted_read_only_except_the_used_ring() {
    let s = setup(8, features(false));
    let g = s.guest.id();
    for (addr, writable) in [
        (s.addrs.desc, false),
        (s.addrs.avail, false),
        (s.addrs.used, true),
    ] {
        let gref = decode(addr).unwrap().gref;
        assert_eq!(s.grants.map(HOST, g, gref, true).is_ok(), writable);
        // The rings are mapped by the open queue: ending their access fails.
        assert!(matches!(
            s.grants.end_access(g, gref),
            Err(GrantError::StillMapped { .. })
        ));
    }
    // Someone else cannot map them at all.
    let other = s.hv.create_domain("other", 1 << 20).unwrap();
    let gref = decode(s.addrs.desc).unwrap().gref;
    let e = s.grants.map(other.id(), g, gref, false).unwrap_err();
    assert!(matches!(e, GrantError::WrongDomain { .. }));
    assert!(e.source().is_none());
}

/// HOSTILE 37: a device keeps a clone of its ring regions and closes the queue; the
/// driver drops the queue, its ring grants end and the pages return to the guest, which
/// fills all of its memory with its own data. The clone reaches none of it.
#[test]
fn ring_regions_kept_past_the_queue_cannot_touch_the_reused_pages() {
    let hv = Hypervisor::new();
    let guest = hv.create_domain("guest", 1 << 20).unwrap();
    let grants = GrantService::new(hv.clone());
    let (model, device_model) = transport_grant::pair(&grants, &guest, HOST).unwrap();
    let q = virtio_core::DriverModel::create_queue(&model, 0, 8).unwrap();
    let dq = virtio_core::DeviceModel::open_queue(&device_model, 0, 8, q.addrs).unwrap();
    let kept = dq.ring.clone();
    // The device closes the queue (its memory, holding the ring mappings, goes)...
    drop(dq);
    // ...and the driver drops it: the ring grants end and the pages are freed.
    drop(q);
    assert_eq!(model.reap(), 0, "nothing left mapped");
    assert_eq!(model.active_grants(), 0);
    let mem = guest.memory();
    assert_eq!(mem.free_bytes(), mem.size(), "every ring page is back");
    // The guest takes all of its memory back for its own data.
    let all = mem.alloc(mem.size(), mem.page_size()).unwrap();
    let secret = vec![0xa5u8; mem.size() as usize];
    mem.write(all, &secret).unwrap();

    // The kept regions reach only the scratch pages that replaced the revoked
    // mappings: writes land there, reads see them, never the guest's data.
    let _ = kept.device.write(0, &[0xff; 64]);
    let _ = kept.device.zero(0, 64);
    let mut leak = [0u8; 16];
    if kept.driver.read(0, &mut leak).is_ok() {
        assert_ne!(leak, [0xa5; 16], "nor read them");
    }
    assert!(kept.device.sub(0, 8).is_err(), "and no new handle is given out");
    let mut now = vec![0u8; secret.len()];
    mem.read(all, &mut now).unwrap();
    assert!(now == secret, "the guest's data is intact");
}

/// The hypervisor's translation of a grant is refused exactly as the access itself
/// would be: only the grantee, only inside the window, writes only where granted.
#[test]
fn resolving_a_grant_is_checked_like_an_access() {
    let hv = Hypervisor::new();
    let a = hv.create_domain("a", 1 << 20).unwrap();
    let b = hv.create_domain("b", 1 << 20).unwrap();
    let grants = GrantService::new(hv.clone());
    let page = a.memory().alloc_pages(2).unwrap();
    let range = grants.grant_range(a.id(), HOST, page + 100, 5000, true).unwrap();
    assert_eq!(
        grants
            .resolve(a.id(), HOST, range.first, 100, 5000, false)
            .unwrap(),
        page + 100
    );
    assert_eq!(
        grants
            .resolve(a.id(), HOST, GrantRef(range.first.0 + 1), 0, 10, false)
            .unwrap(),
        page + 4096
    );
    assert!(matches!(
        grants.resolve(a.id(), b.id(), range.first, 100, 1, false),
        Err(GrantError::WrongDomain { .. })
    ));
    assert!(matches!(
        grants.resolve(a.id(), HOST, range.first, 100, 1, true),
        Err(GrantError::ReadOnly(_))
    ));
    assert!(matches!(
        grants.resolve(a.id(), HOST, range.first, 99, 2, false),
        Err(GrantError::OutOfRange { .. })
    ));
    assert!(grants.resolve(b.id(), HOST, range.first, 100, 1, false).is_err());
}
