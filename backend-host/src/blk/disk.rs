//! An open disk image: the file (or block device) behind a virtio-blk device.
//!
//! Disks are opened with `O_DIRECT` by default, so a completed write has left the host's
//! page cache and a flush (`fdatasync`) is what makes it durable: the guest's own cache
//! is the only volatile cache, as `VIRTIO_BLK_F_FLUSH` promises (virtio 1.2 §5.2.6).
//! Direct I/O has alignment rules; [`Disk::mem_align`] and [`Disk::offset_align`] report
//! them so the device can bounce through [`AlignedBuf`]s that satisfy them.
//!
//! Sectors are 512 bytes, but direct I/O may need more (a 4Kn drive, a loop device
//! with 4096-byte sectors). The device advertises a block size at least the offset
//! alignment, so a well-behaved guest stays aligned; a transfer that does not is
//! still served, through a second, buffered descriptor ([`DiskFds`]), never failed
//! with `EINVAL`.

// Opening, statx and probing reads are all wrapped by rustix and std.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom, StatxFlags};
use rustix::io::Errno;

use super::engine::AlignedBuf;

/// The smallest block size virtio-blk speaks in (its sector, virtio 1.2 §5.2.6).
pub const SECTOR_SIZE: u64 = 512;

/// Candidate alignments tried when the kernel cannot report them (`STATX_DIOALIGN` is
/// Linux 6.1+): from the sector up to the largest logical block size in common use.
const PROBE_ALIGNS: [usize; 4] = [512, 1024, 2048, 4096];

/// `statfs` magic numbers of filesystems whose files live in the page cache: since
/// Linux 6.6 tmpfs accepts `O_DIRECT`, but nothing is bypassed, so it is not direct I/O.
const MEMORY_FS_MAGIC: [u64; 2] = [0x0102_1994 /* TMPFS_MAGIC */, 0x8584_58f6 /* RAMFS */];

/// Whether to bypass the host page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectMode {
    /// `O_DIRECT` or fail with [`DiskError::DirectIoUnsupported`] (the default: a
    /// buffered disk would acknowledge writes the host could still lose).
    #[default]
    Require,
    /// `O_DIRECT` when the filesystem supports it, otherwise buffered I/O with a
    /// warning in the log.
    Prefer,
    /// Buffered I/O through the page cache.
    Off,
}

/// How to open a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskOptions {
    /// Open read-only; writes then fail with `EBADF` from the kernel.
    pub read_only: bool,
    /// Direct or buffered I/O.
    pub direct: DirectMode,
}

/// What went wrong opening a disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// `open(2)` failed.
    #[error("Could not open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The filesystem refuses `O_DIRECT` (procfs, some FUSE filesystems, tmpfs before
    /// Linux 6.6) or only pretends to honour it (tmpfs and ramfs keep every byte in the
    /// page cache), and buffered I/O was not asked for.
    #[error("The filesystem of {path} does not support direct I/O")]
    DirectIoUnsupported {
        /// The image.
        path: PathBuf,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk {
        /// The path.
        path: PathBuf,
    },
    /// `statx`, `lseek` or an alignment-probing read failed.
    #[error("Could not inspect disk image {path}")]
    Inspect {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No alignment up to 4096 bytes made a direct read work.
    #[error("Could not find a direct I/O alignment for {path}")]
    NoAlignment {
        /// The image.
        path: PathBuf,
    },
    /// Creating a test image failed.
    #[error("Could not create image {path}")]
    Create {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// An open disk image with its size and direct-I/O alignment rules.
#[derive(Debug)]
pub struct Disk {
    fd: OwnedFd,
    /// The same file without `O_DIRECT`, for transfers direct I/O cannot align
    /// (only when the offset alignment is above a sector).
    fallback: Option<OwnedFd>,
    path: PathBuf,
    size: u64,
    read_only: bool,
    direct: bool,
    mem_align: usize,
    offset_align: usize,
}

impl Disk {
    /// Opens `path` as a disk.
    ///
    /// With direct I/O, the alignment comes from `statx(STATX_DIOALIGN)`; on kernels
    /// that do not report it, from trying direct reads at growing alignments.
    pub fn open(path: impl AsRef<Path>, options: DiskOptions) -> Result<Disk, DiskError> {
        let path = path.as_ref().to_path_buf();
        let mut flags = if options.read_only {
            OFlags::RDONLY
        } else {
            OFlags::RDWR
        };
        flags |= OFlags::CLOEXEC;
        let open = |flags: OFlags| rustix::fs::open(&path, flags, Mode::empty()).map_err(io::Error::from);
        let (fd, direct) = match options.direct {
            DirectMode::Off => (open(flags), false),
            DirectMode::Require | DirectMode::Prefer => match open(flags | OFlags::DIRECT) {
                // open(2): EINVAL "the filesystem does not support the O_DIRECT flag".
                Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                    refuse_or_buffer(&path, options.direct)?;
                    (open(flags), false)
                }
                Ok(fd) if in_memory_fs(&fd) => {
                    refuse_or_buffer(&path, options.direct)?;
                    (Ok(fd), false)
                }
                other => (other, true),
            },
        };
        let fd = fd.map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
        let inspect = |source: Errno| DiskError::Inspect {
            path: path.clone(),
            source: source.into(),
        };

        let stx = rustix::fs::statx(
            &fd,
            "",
            AtFlags::EMPTY_PATH,
            StatxFlags::TYPE | StatxFlags::SIZE | StatxFlags::DIOALIGN,
        )
        .map_err(inspect)?;
        match FileType::from_raw_mode(stx.stx_mode.into()) {
            FileType::RegularFile | FileType::BlockDevice => {}
            _ => return Err(DiskError::NotADisk { path }),
        }
        // `stx_size` is 0 for block devices; the end offset is right for both kinds.
        let size = rustix::fs::seek(&fd, SeekFrom::End(0)).map_err(inspect)?;

        let (mem_align, offset_align) = if !direct {
            (1, 1)
        } else if stx.stx_mask & StatxFlags::DIOALIGN.bits() != 0
            && stx.stx_dio_mem_align != 0
            && stx.stx_dio_offset_align != 0
        {
            (
                usize::try_from(stx.stx_dio_mem_align).unwrap_or(4096),
                usize::try_from(stx.stx_dio_offset_align).unwrap_or(4096),
            )
        } else {
            tracing::info!(
                path = %path.display(),
                "kernel reports no STATX_DIOALIGN; probing the direct I/O alignment"
            );
            let align = probe_alignment(fd.as_fd(), size, &path)?;
            (align, align)
        };
        // Sector-aligned transfers that direct I/O refuses need a buffered path.
        let fallback = if direct && u64::try_from(offset_align).map_or(true, |a| a > SECTOR_SIZE) {
            Some(open(flags).map_err(|source| DiskError::Open {
                path: path.clone(),
                source,
            })?)
        } else {
            None
        };
        tracing::debug!(
            path = %path.display(), size, direct, mem_align, offset_align,
            buffered_fallback = fallback.is_some(), "disk opened"
        );
        Ok(Disk {
            fd,
            fallback,
            path,
            size,
            read_only: options.read_only,
            direct,
            mem_align,
            offset_align,
        })
    }

    /// Creates (or truncates) a sparse image of `size` bytes at `path`: no blocks are
    /// allocated until written, and it reads as zeros.
    pub fn create_sparse(path: impl AsRef<Path>, size: u64) -> Result<(), DiskError> {
        let path = path.as_ref();
        let create = || {
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(path)?;
            file.set_len(size)
        };
        create().map_err(|source| DiskError::Create {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The image's path, for logs.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in bytes (the file size, or the block device size).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the disk was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether I/O bypasses the host page cache (`O_DIRECT`).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Required alignment of buffer addresses (1 for buffered I/O).
    pub fn mem_align(&self) -> usize {
        self.mem_align
    }

    /// Required alignment of file offsets and lengths (1 for buffered I/O).
    pub fn offset_align(&self) -> usize {
        self.offset_align
    }

    /// The block size to advertise to the guest (`blk_size`, virtio 1.2 §5.2.4): at
    /// least a sector and at least the offset alignment, so well-behaved guest I/O
    /// needs no read-modify-write.
    pub fn block_size(&self) -> u64 {
        u64::try_from(self.offset_align).map_or(4096, |a| a.max(SECTOR_SIZE))
    }

    /// The open descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A second descriptor for the same open file, for an engine to own.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Descriptors of their own for an engine: the disk's, and the buffered fallback
    /// if the disk has one.
    pub fn fds(&self) -> io::Result<DiskFds> {
        Ok(DiskFds {
            main: self.fd.try_clone()?,
            fallback: self.fallback.as_ref().map(OwnedFd::try_clone).transpose()?,
            align: u64::try_from(self.offset_align).unwrap_or(u64::MAX).max(1),
        })
    }
}

/// The descriptors an engine does I/O through, and the rule choosing between them.
///
/// A transfer whose offset or length is not a multiple of the direct-I/O offset
/// alignment goes through `fallback`, a buffered descriptor of the same file, when
/// there is one. Both reach the same inode, so the kernel keeps them coherent (a
/// direct transfer first writes back, and afterwards invalidates, the page-cache
/// range it covers) and one `fdatasync` on either makes both durable: flushes stay
/// honoured. Everything else (flush, discard, write-zeroes) uses `main`.
#[derive(Debug)]
pub struct DiskFds {
    /// The disk's own descriptor (direct I/O when the disk has it).
    pub main: OwnedFd,
    /// The buffered descriptor for misaligned transfers, if direct I/O needs one.
    pub fallback: Option<OwnedFd>,
    align: u64,
}

impl DiskFds {
    /// Whether a transfer of `len` bytes at `offset` must take the fallback.
    pub fn misaligned(&self, offset: u64, len: u64) -> bool {
        self.fallback.is_some() && (!offset.is_multiple_of(self.align) || !len.is_multiple_of(self.align))
    }

    /// The descriptor for a transfer of `len` bytes at `offset`.
    pub fn for_transfer(&self, offset: u64, len: u64) -> BorrowedFd<'_> {
        match &self.fallback {
            Some(fd) if self.misaligned(offset, len) => fd.as_fd(),
            _ => self.main.as_fd(),
        }
    }
}

impl AsFd for Disk {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether `fd` is a file on a filesystem that lives in the page cache (where
/// `O_DIRECT` is accepted but bypasses nothing). A block device node is not: its
/// node sits on devtmpfs, its data on the device.
fn in_memory_fs(fd: &OwnedFd) -> bool {
    let block_device =
        rustix::fs::fstat(fd).is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::BlockDevice);
    !block_device
        && rustix::fs::fstatfs(fd)
            .is_ok_and(|s| u64::try_from(s.f_type).is_ok_and(|t| MEMORY_FS_MAGIC.contains(&t)))
}

/// The decision when direct I/O is impossible: an error under [`DirectMode::Require`],
/// a warning and buffered I/O under [`DirectMode::Prefer`].
fn refuse_or_buffer(path: &Path, mode: DirectMode) -> Result<(), DiskError> {
    if mode == DirectMode::Require {
        return Err(DiskError::DirectIoUnsupported {
            path: path.to_path_buf(),
        });
    }
    tracing::warn!(
        path = %path.display(),
        "no direct I/O on this filesystem; using buffered I/O (flushes still reach \
         the disk, but the host page cache holds writes until then)"
    );
    Ok(())
}

/// Finds the smallest alignment at which a direct read succeeds.
///
/// Each candidate `a` reads `a` bytes at file offset `a` into memory aligned to exactly
/// `a` (not to a larger power of two by accident), so a success proves both the memory
/// and the offset rule. A read at or past the end of the file returns 0 before the
/// kernel checks alignment, so images shorter than two candidate blocks cannot be
/// probed and get the conservative 4096.
fn probe_alignment(fd: BorrowedFd<'_>, size: u64, path: &Path) -> Result<usize, DiskError> {
    const MAX: usize = PROBE_ALIGNS[PROBE_ALIGNS.len() - 1];
    let mut buf = AlignedBuf::new(4 * MAX, 2 * MAX);
    for align in PROBE_ALIGNS {
        let Ok(offset) = u64::try_from(align) else {
            continue;
        };
        if size < 2 * offset {
            tracing::warn!(
                path = %path.display(), size,
                "image too small to probe direct I/O alignment; assuming 4096"
            );
            return Ok(MAX);
        }
        // `buf` starts at a multiple of 2 * MAX, so `align..2 * align` starts at a
        // multiple of `align` and of no larger candidate.
        let slice = &mut buf.as_mut_slice()[align..2 * align];
        match rustix::io::pread(fd, slice, offset) {
            Ok(_) => {
                tracing::info!(path = %path.display(), align, "probed direct I/O alignment");
                return Ok(align);
            }
            Err(Errno::INVAL) => {}
            Err(e) => {
                return Err(DiskError::Inspect {
                    path: path.to_path_buf(),
                    source: e.into(),
                });
            }
        }
    }
    Err(DiskError::NoAlignment {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_is_at_least_a_sector() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("disk-unit-{}.img", std::process::id()));
        Disk::create_sparse(&path, 1 << 20).unwrap();
        let disk = Disk::open(
            &path,
            DiskOptions {
                direct: DirectMode::Off,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(disk.size(), 1 << 20);
        assert!(!disk.direct());
        assert_eq!(disk.block_size(), SECTOR_SIZE);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn probing_finds_the_alignment_statx_reports() {
        let dir = std::env::temp_dir();
        if in_memory_fs(&rustix::fs::open(&dir, OFlags::RDONLY, Mode::empty()).unwrap()) {
            virtio_core::test_utils::skip(
                "probing_finds_the_alignment_statx_reports",
                format_args!("{} is an in-memory filesystem", dir.display()),
            );
            return;
        }
        let path = dir.join(format!("disk-probe-{}.img", std::process::id()));
        // Allocated blocks: reads of holes skip the alignment check.
        std::fs::write(&path, vec![1u8; 64 * 1024]).unwrap();
        let disk = Disk::open(&path, DiskOptions::default()).unwrap();
        let probed = probe_alignment(disk.fd(), disk.size(), &path).unwrap();
        assert_eq!(probed, disk.offset_align().max(512));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn directories_are_not_disks() {
        let err = Disk::open(
            std::env::temp_dir(),
            DiskOptions {
                read_only: true,
                direct: DirectMode::Off,
            },
        )
        .unwrap_err();
        assert!(matches!(err, DiskError::NotADisk { .. }), "{err:?}");
    }
}
