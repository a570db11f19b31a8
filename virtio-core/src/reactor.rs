//! Registering notification descriptors with tokio: the one way this workspace does
//! it (feature `tokio`).
//!
//! tokio 1.54 made [`AsyncFd`]'s constructors `unsafe` (`AsyncFd::register`): the
//! caller promises that the descriptor stays open, and the same, for the whole
//! registration. [`watch`] keeps that promise once, for every caller: it registers
//! a duplicate that the [`AsyncFd`] owns, so nothing the caller does to its own
//! descriptor (closing it, replacing it on reset) can break the registration.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use virtio_core::notify::{EventFdNotifier, Notify};
//! let kick = EventFdNotifier::new().unwrap();
//! let watched = virtio_core::reactor::watch(&kick).unwrap();
//! kick.notify().unwrap();
//! let mut ready = watched.readable().await.unwrap();
//! ready.clear_ready();
//! # }
//! ```

// The module's only `unsafe` is the registration itself.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// Registers a duplicate of `fd` with the current tokio reactor, for readiness to
/// read.
///
/// # Errors
/// Duplicating the descriptor or registering it failed (for example, no reactor
/// is running on this thread).
pub fn watch(fd: &impl AsFd) -> io::Result<AsyncFd<OwnedFd>> {
    let owned = fd.as_fd().try_clone_to_owned()?;
    // SAFETY: `register` requires the descriptor to stay open and to be the one
    // `as_raw_fd` returns for the whole registration. The `AsyncFd` owns the
    // `OwnedFd`, a duplicate no one else holds: it is closed only when the `AsyncFd`
    // drops it, and `OwnedFd::as_raw_fd` always returns the same number.
    unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{EventFdNotifier, Notify, Wait};
    use std::thread;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn every_notification_arrives_through_the_reactor() {
        const N: u64 = 2_000;
        let tx = EventFdNotifier::new().unwrap();
        let rx = tx.try_clone().unwrap();
        let watched = watch(&rx).unwrap();
        let sender = thread::spawn(move || {
            for i in 0..N {
                tx.notify().unwrap();
                if i % 100 == 0 {
                    thread::sleep(Duration::from_micros(200));
                }
            }
        });
        let received = tokio::time::timeout(Duration::from_secs(30), async {
            let mut total = 0;
            while total < N {
                let mut guard = watched.readable().await.unwrap();
                match rx.take().unwrap() {
                    0 => guard.clear_ready(),
                    n => total += n,
                }
            }
            total
        })
        .await
        .expect("notifications lost: the registration never became readable");
        sender.join().unwrap();
        assert_eq!(received, N);
        assert_eq!(rx.take().unwrap(), 0);
    }
}
