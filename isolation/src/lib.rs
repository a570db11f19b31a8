//! Isolation enforced by the MMU, across processes (HOSTILE 39: the device process of
//! each model receives only what its model allows; an access outside faults or is
//! refused).
//!
//! In one process the four sharing models give the device half page views with their
//! own protection, but nothing stops device code from reaching around them. Here the
//! device half runs in a process of its own ([`DeviceProcess`], started from the
//! `vio-isolation-device` binary), and the only memory it can ever reach is what the
//! owner of guest memory sends it over a unix socket ([`wire`]: one JSON message per
//! `SOCK_SEQPACKET` record, files passed with `SCM_RIGHTS`).
//!
//! A file descriptor always reaches its whole file, and Linux cannot hand out a
//! sub-range of a file. So where a model allows less than all of guest memory, the
//! hypervisor first gives those pages a file of their own, mapped in place in the
//! guest ([`hypervisor::GuestMemory::isolate_pages`]), and sends that file.
//!
//! # What each model's device process receives
//!
//! | model | receives | done |
//! |-------|----------|------|
//! | 1, shared page | the shared region's own memfd (writable, size sealed), from [`transport_shared_page::pair_for_process`] | yes |
//! | 2, direct | the guest's memory memfd, whole (the model: the device reads driver memory itself) | yes |
//! | 3, copy helper | one file per ring (each ring is alone on its pages): the descriptor table and the available ring reopened read-only ([`hypervisor::GuestMemory::isolated_file`] with `writable = false`, so a writable mapping fails with `EACCES`), the used ring writable; buffer bytes only through copy requests on the channel ([`wire::Reply::Copy`]), which the owner performs with its [`transport_descriptors::CopyHelper`] ([`DeviceProcess::call_brokered`]) | yes |
//! | 4, grants | one file per ring grant's pages (the owner, as the hypervisor, resolves each ring grant for the device's domain, [`transport_grant::GrantService::resolve`], and gives those pages a file: descriptor table and available ring read-only, used ring writable); buffer bytes only as grant copies the owner performs for the device's domain ([`wire::Reply::GrantCopy`], [`owner::GrantBroker`]), which the grant table alone allows or refuses | yes |
//!
//! Before `exec` the device process drops every capability and sets `no_new_privs`;
//! the owner makes itself non-dumpable. Without that a process of the same user (root
//! included) opens `/proc/<owner>/mem` or `/proc/<owner>/fd/<n>` and has everything.
//! Its standard input is its channel and nothing else is inherited.
//!
//! # What the tests prove (`tests/models.rs`)
//!
//! - Per model, a real virtqueue round trip: the driver in the owner, the device in
//!   the child, a request in, the upper-cased reply out, checked by the driver.
//! - Per model, a hostile child: it holds exactly the files its model allows (its
//!   `/proc/self/fd`), no capabilities; every attempt at the owner's `/proc` entries
//!   (`mem`, `environ`, `maps`, `fd/*`, `map_files`) is refused; growing its files is
//!   refused (sealed); reading past the end of its file kills it with `SIGBUS`.
//!   Model 1: it scribbles over all of its file, and the guest sees the scribbles in
//!   the region and nowhere else (a secret next to the region, and the guest's
//!   buffers, are intact). Model 2: another guest's memory and the owner's heap hold
//!   their bytes; the device cannot name them. Model 3: its ring files refuse a
//!   writable mapping except the used ring's; copies of a head it does not own, a
//!   descriptor outside the chain, a write into a device-readable descriptor, a
//!   range past the descriptor, another queue or an oversized copy are refused by
//!   the owner's helper and the request stays intact; once the owner rejoins the
//!   used ring's pages ([`hypervisor::GuestMemory::rejoin_pages`]) the device's
//!   writes through its old file reach nothing of the guest. Model 4: the same ring
//!   files; grant copies that write a read-only grant, read past a grant's bytes,
//!   name a reference never granted or one granted to another domain, or move more
//!   than one copy's worth are refused by the grant table; once the driver has
//!   ended a request's grants, the device's old reference is refused as revoked.
//!
//! The owner must rejoin a queue's isolated ring pages before the guest reuses them
//! (a queue reset): a file once sent cannot be taken back, only disconnected.
//!
//! What is not covered: the device can still kill its owner or exhaust shared
//! resources (same user id); denial of service is out of scope here.

#![deny(unsafe_code)]

pub mod device;
pub mod owner;
mod spawn;
pub mod wire;

pub use owner::{DeviceProcess, OwnerError};
