//! The driver half of the sharing-model seam.
//!
//! A driver owns buffers in its own memory ([`GuestBuf`]). Before a buffer goes into a
//! descriptor, the sharing model *exposes* it and says what address the device will see
//! (a guest-physical address, an offset in a bounce area, a grant reference and
//! offset). After the device has used the chain, the ring *retires* each exposed buffer
//! exactly once, telling the model how many bytes the device wrote into it (so a bounce
//! model copies back only those, and a grant model ends access).
//!
//! The ring core calls these methods; drivers never see which model is in use.

/// Which way the bytes of a buffer flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The device reads the buffer (a device-readable descriptor).
    ToDevice,
    /// The device writes the buffer (a device-writable descriptor).
    FromDevice,
}

/// A buffer in the driver's own memory, named by its guest address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuf {
    /// Guest address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

impl GuestBuf {
    /// A buffer of `len` bytes at guest address `addr`.
    pub const fn new(addr: u64, len: u32) -> GuestBuf {
        GuestBuf { addr, len }
    }
}

/// What the device will see for an exposed buffer, plus the model's handle for it.
#[derive(Debug)]
pub struct Exposed<T> {
    /// The descriptor `addr` the device will use.
    pub addr: u64,
    /// The descriptor `len`.
    pub len: u32,
    /// The model's handle, handed back to [`DriverShare::retire`].
    pub token: T,
}

/// Why a sharing model refused to expose a buffer.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The buffer does not lie in the driver's memory.
    #[error("buffer {addr:#x}+{len:#x} is outside the driver's memory")]
    OutOfBounds {
        /// Guest address of the refused buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The model has no room left (bounce area, grant entries, table pool).
    #[error("sharing model has no room for another {0}-byte buffer")]
    Exhausted(u32),
    /// A model-specific failure.
    #[error("sharing model refused the buffer")]
    Model(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The driver side of one sharing model, per queue or per device instance.
///
/// Implementations hold whatever state their model needs (a bounce allocator, a grant
/// table handle); two guests with different models therefore coexist in one process.
///
/// # Contract
/// - Every successful [`expose`](Self::expose) or [`expose_table`](Self::expose_table)
///   is followed by exactly one [`retire`](Self::retire) of its token, including when
///   the queue is reset with the buffer outstanding (then `written` is 0).
/// - `retire` is told the bytes the device wrote into that buffer, already checked by
///   the ring against the buffer's length.
pub trait DriverShare {
    /// The model's per-buffer handle.
    type Token;

    /// Makes `buf` reachable by the device for `dir`. For [`Direction::ToDevice`], the
    /// buffer's current contents are what the device must see.
    fn expose(&mut self, buf: GuestBuf, dir: Direction) -> Result<Exposed<Self::Token>, ShareError>;

    /// Places a device-readable copy of `table` (an indirect descriptor table, already
    /// holding device-visible addresses) where the device can read it.
    fn expose_table(&mut self, table: &[u8]) -> Result<Exposed<Self::Token>, ShareError>;

    /// Ends the device's access to an exposed buffer; `written` bytes at its start were
    /// written by the device (always 0 for device-readable buffers).
    fn retire(&mut self, token: Self::Token, written: u32);
}

impl<S: DriverShare + ?Sized> DriverShare for &mut S {
    type Token = S::Token;
    fn expose(&mut self, buf: GuestBuf, dir: Direction) -> Result<Exposed<Self::Token>, ShareError> {
        (**self).expose(buf, dir)
    }
    fn expose_table(&mut self, table: &[u8]) -> Result<Exposed<Self::Token>, ShareError> {
        (**self).expose_table(table)
    }
    fn retire(&mut self, token: Self::Token, written: u32) {
        (**self).retire(token, written)
    }
}
