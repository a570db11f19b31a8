//! The device process: receives its setup and the files its model allows, then serves
//! queues, or, when asked, behaves as a hostile device and reports what it could
//! reach.
//!
//! It never trusts the owner's messages either: every failure is a
//! [`Reply::Failed`], never a panic.

use crate::wire::{
    Attack, Channel, CopyKind, CopyOp, Finding, GrantOp, MAX_COPY, Reply, Request, Setup, Slot, WireError,
};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use transport_descriptors::DirectDevice;
use transport_shared_page::{Layout, SharedPageConfig, SharedPageDevice};
use virtio_core::features::Features;
use virtio_core::ring::SplitLayout;
use virtio_core::ring::areas::RingFormat;
use virtio_core::ring::queue::RingMemory;
use virtio_core::shm::{Mapping, Region};
use virtio_core::{AccessError, DescSlot, DeviceMemory, DeviceModel, DeviceRing, QueueAddrs, Segment};

/// Largest request the echo service reads from one chain.
const MAX_ECHO: u32 = 64 << 10;

/// Serves the owner on `chan` until it closes the channel.
pub fn run(chan: &Channel) -> Result<(), WireError> {
    let mut files: Vec<OwnedFd> = Vec::new();
    let mut model: Option<Model<'_>> = None;
    loop {
        let (req, fds): (Request, _) = match chan.recv() {
            Ok(m) => m,
            Err(WireError::Closed) => return Ok(()),
            Err(WireError::Decode(e)) => {
                chan.send(&Reply::Failed(format!("malformed request: {e}")), &[])?;
                continue;
            }
            Err(e) => return Err(e),
        };
        files.extend(fds);
        let reply = match req {
            Request::Setup(setup) => match Model::new(setup, &files, chan) {
                Ok(m) => {
                    model = Some(m);
                    Reply::Ready { files: files.len() }
                }
                Err(e) => Reply::Failed(e),
            },
            Request::Open {
                index,
                size,
                desc,
                avail,
                used,
                features,
            } => match model.as_mut() {
                Some(m) => m.open(index, size, QueueAddrs { desc, avail, used }, features),
                None => Reply::Failed("not set up".into()),
            },
            Request::Kick { index } => match model.as_mut() {
                Some(m) => m.kick(index),
                None => Reply::Failed("not set up".into()),
            },
            Request::Attack(a) => attack(a, &files, chan),
            Request::Copied(_) => Reply::Failed("no copy was asked for".into()),
        };
        chan.send(&reply, &[])?;
    }
}

/// A writable or read-only mapping of a whole received file.
fn map_whole(fd: &OwnedFd, writable: bool) -> Result<Region, String> {
    let size = rustix::fs::fstat(fd).map_err(|e| format!("fstat: {e}"))?.st_size;
    let size = usize::try_from(size).map_err(|_| "negative file size".to_string())?;
    Ok(Mapping::of_fd(fd.as_fd(), 0, size, writable)
        .map_err(|e| format!("mmap: {e}"))?
        .region())
}

/// The device side of whichever model the owner set up.
enum Model<'c> {
    SharedPage(Queues<SharedPageDevice>),
    Direct(Queues<DirectDevice>),
    /// Model 3: one queue, its buffers reached only through the owner.
    Copy(u16, Box<DeviceRing<Remote<'c, ByDescriptor>>>),
    /// Model 4: one queue, its buffers reached only by grant copies the owner makes.
    Grant(u16, Box<DeviceRing<Remote<'c, ByGrant>>>),
}

struct Queues<M: DeviceModel> {
    model: M,
    open: BTreeMap<u16, DeviceRing<M::Memory>>,
}

impl<'c> Model<'c> {
    fn new(setup: Setup, files: &[OwnedFd], chan: &'c Channel) -> Result<Model<'c>, String> {
        let page = rustix::param::page_size() as u64;
        let file = files.first().ok_or("no file received")?;
        Ok(match setup {
            Setup::SharedPage {
                max_queues,
                max_queue_size,
                bounce_bytes_per_queue,
            } => {
                let cfg = SharedPageConfig {
                    max_queues,
                    max_queue_size,
                    bounce_bytes_per_queue,
                };
                let layout = Layout::new(&cfg, page).map_err(|e| e.to_string())?;
                let dev = SharedPageDevice::from_region(map_whole(file, true)?, layout)
                    .map_err(|e| e.to_string())?;
                Model::SharedPage(Queues::new(dev))
            }
            Setup::Direct { base } => {
                let dev = DirectDevice::from_region(map_whole(file, true)?, base, page)
                    .map_err(|e| e.to_string())?;
                Model::Direct(Queues::new(dev))
            }
            Setup::Copy {
                index,
                size,
                features,
            } => {
                let ring = ring_files(files, size)?;
                let mem = Remote {
                    chan,
                    naming: ByDescriptor { queue: index },
                };
                let features = Features::from_bits_truncate(features);
                let q = DeviceRing::new(size, &ring, mem, features).map_err(errno)?;
                Model::Copy(index, Box::new(q))
            }
            Setup::Grant {
                index,
                size,
                features,
            } => {
                let ring = ring_files(files, size)?;
                let features = Features::from_bits_truncate(features);
                let mem = Remote {
                    chan,
                    naming: ByGrant,
                };
                let q = DeviceRing::new(size, &ring, mem, features).map_err(errno)?;
                Model::Grant(index, Box::new(q))
            }
        })
    }

    fn open(&mut self, index: u16, size: u16, addrs: QueueAddrs, features: u64) -> Reply {
        match self {
            Model::SharedPage(q) => q.open(index, size, addrs, features),
            Model::Direct(q) => q.open(index, size, addrs, features),
            Model::Copy(..) | Model::Grant(..) => {
                Reply::Failed("this model's queue is opened at setup".into())
            }
        }
    }

    fn kick(&mut self, index: u16) -> Reply {
        let served = match self {
            Model::SharedPage(q) => q.open.get_mut(&index).map(echo),
            Model::Direct(q) => q.open.get_mut(&index).map(echo),
            Model::Copy(i, q) => (*i == index).then(|| echo(q)),
            Model::Grant(i, q) => (*i == index).then(|| echo(q)),
        };
        served.unwrap_or_else(|| Reply::Failed(format!("queue {index} is not open")))
    }
}

/// One ring per file, each at the start of its file: the descriptor table and the
/// available ring mapped read-only (their files allow nothing else), the used ring
/// writable (models 3 and 4).
fn ring_files(files: &[OwnedFd], size: u16) -> Result<RingMemory, String> {
    let [desc, avail, used] = files else {
        return Err(format!("a queue needs 3 ring files, got {}", files.len()));
    };
    let l = SplitLayout::new(size).ok_or("bad queue size")?;
    let ring = |f, writable, bytes| map_whole(f, writable)?.sub(0, bytes).map_err(errno);
    Ok(RingMemory {
        desc: ring(desc, false, l.desc_bytes())?,
        driver: ring(avail, false, l.avail_bytes())?,
        device: ring(used, true, l.used_bytes())?,
    })
}

impl<M: DeviceModel> Queues<M> {
    fn new(model: M) -> Queues<M> {
        Queues {
            model,
            open: BTreeMap::new(),
        }
    }

    fn open(&mut self, index: u16, size: u16, addrs: QueueAddrs, features: u64) -> Reply {
        let features = Features::from_bits_truncate(features);
        let opened = self
            .model
            .open_queue_in(index, RingFormat::of(features), size, addrs)
            .map_err(|e| e.to_string())
            .and_then(|dq| DeviceRing::new(size, &dq.ring, dq.memory, features).map_err(|e| e.to_string()));
        match opened {
            Ok(dev) => {
                self.open.insert(index, dev);
                Reply::Opened
            }
            Err(e) => Reply::Failed(e),
        }
    }
}

/// The echo service: every available chain's readable bytes, upper-cased, into its
/// writable part.
fn echo<M: DeviceMemory>(q: &mut DeviceRing<M>) -> Reply {
    let mut chains = 0;
    loop {
        let chain = match q.pop() {
            Ok(Some(c)) => c,
            Ok(None) => return Reply::Served { chains },
            Err(e) => return Reply::Failed(e.to_string()),
        };
        let len = chain.readable_len().min(MAX_ECHO);
        let mut data = vec![0u8; len as usize];
        if let Err(e) = chain.reader(q.memory()).read_exact(&mut data) {
            return Reply::Failed(e.to_string());
        }
        data.make_ascii_uppercase();
        let mut w = chain.writer(q.memory());
        let n = usize::try_from(w.remaining())
            .unwrap_or(usize::MAX)
            .min(data.len());
        if let Err(e) = w.write_all(&data[..n]) {
            return Reply::Failed(e.to_string());
        }
        let written = w.written();
        if let Err(e) = q.add_used(chain.head(), written) {
            return Reply::Failed(e.to_string());
        }
        chains += 1;
    }
}

/// Why the owner refused a model-3 copy (or the channel failed under it).
#[derive(Debug, thiserror::Error)]
#[error("the owner refused the copy: {0}")]
pub struct CopyRefused(pub String);

/// How a device process names a segment when it asks the owner for its bytes: a
/// descriptor of a chain it owns (model 3) or the descriptor's grant address
/// (model 4). Never a guest address.
trait Naming {
    /// The request for `kind` at `offset` of `seg`.
    fn ask(&self, seg: &Segment, offset: u32, kind: CopyKind) -> Reply;
}

/// Model 3: the owner's copy helper finds the bytes from the guest's own
/// descriptor table, given the queue, the head and the descriptor's slot.
struct ByDescriptor {
    queue: u16,
}

impl Naming for ByDescriptor {
    fn ask(&self, seg: &Segment, offset: u32, kind: CopyKind) -> Reply {
        Reply::Copy(CopyOp {
            queue: self.queue,
            head: seg.head(),
            slot: match seg.slot() {
                DescSlot::Table(i) => Slot::Table(i),
                DescSlot::Indirect(i) => Slot::Indirect(i),
            },
            writable: seg.writable(),
            offset,
            kind,
        })
    }
}

/// Model 4: the owner copies for the device's domain through the grant table.
struct ByGrant;

impl Naming for ByGrant {
    fn ask(&self, seg: &Segment, offset: u32, kind: CopyKind) -> Reply {
        Reply::GrantCopy(GrantOp {
            addr: seg.addr(),
            len: seg.len(),
            writable: seg.writable(),
            offset,
            kind,
        })
    }
}

/// A device memory with no buffer memory at all (models 3 and 4 in a device
/// process): every access is a request to the owner over the channel, which
/// checks it and moves the bytes, at most [`MAX_COPY`] at a time.
struct Remote<'c, N> {
    chan: &'c Channel,
    naming: N,
}

/// Sends `request` to the owner and waits for its answer.
fn ask_owner(chan: &Channel, request: &Reply) -> Result<Vec<u8>, String> {
    chan.send(request, &[]).map_err(errno)?;
    match chan.recv::<Request>().map_err(errno)? {
        (Request::Copied(r), _) => r,
        (other, _) => Err(format!("expected a copy answer, got {other:?}")),
    }
}

fn refused(why: String) -> AccessError {
    AccessError::Model(Box::new(CopyRefused(why)))
}

impl<N: Naming> Remote<'_, N> {
    fn ask(&self, seg: &Segment, offset: u32, kind: CopyKind) -> Result<Vec<u8>, AccessError> {
        ask_owner(self.chan, &self.naming.ask(seg, offset, kind)).map_err(refused)
    }
}

/// The offsets of `MAX_COPY`-sized chunks of `len` bytes from `offset`.
fn chunks(
    offset: u32,
    len: usize,
) -> impl Iterator<Item = Result<(u32, std::ops::Range<usize>), AccessError>> {
    (0..len).step_by(MAX_COPY).map(move |from| {
        let to = (from + MAX_COPY).min(len);
        let at = u32::try_from(from)
            .ok()
            .and_then(|f| offset.checked_add(f))
            .ok_or_else(|| refused("offset overflow".into()))?;
        Ok((at, from..to))
    })
}

impl<N: Naming> DeviceMemory for Remote<'_, N> {
    fn check(&self, seg: &Segment) -> Result<(), AccessError> {
        self.ask(seg, 0, CopyKind::Check).map(|_| ())
    }

    fn read(&self, seg: &Segment, offset: u32, dst: &mut [u8]) -> Result<(), AccessError> {
        virtio_core::access::check_within(seg, offset, dst.len())?;
        for chunk in chunks(offset, dst.len()) {
            let (at, range) = chunk?;
            let n = u32::try_from(range.len()).map_err(|_| refused("chunk too large".into()))?;
            let got = self.ask(seg, at, CopyKind::Read(n))?;
            if got.len() != range.len() {
                return Err(refused(format!("{} bytes for {n}", got.len())));
            }
            dst[range].copy_from_slice(&got);
        }
        Ok(())
    }

    fn write(&self, seg: &Segment, offset: u32, src: &[u8]) -> Result<(), AccessError> {
        if !seg.writable() {
            return Err(AccessError::Denied);
        }
        virtio_core::access::check_within(seg, offset, src.len())?;
        for chunk in chunks(offset, src.len()) {
            let (at, range) = chunk?;
            self.ask(seg, at, CopyKind::Write(src[range].to_vec()))?;
        }
        Ok(())
    }
}

fn errno(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Runs a hostile probe.
fn attack(a: Attack, files: &[OwnedFd], chan: &Channel) -> Reply {
    let file = |i: usize| files.get(i).ok_or_else(|| format!("no file {i}"));
    match a {
        Attack::Escape => Reply::Findings(escape(files)),
        Attack::Scribble { file: i } => {
            let r = file(i).and_then(|f| map_whole(f, true)).and_then(|r| {
                let junk = vec![0xa5u8; r.len()];
                r.write(0, &junk).map_err(errno)?;
                Ok(format!("wrote {} bytes", r.len()))
            });
            Reply::Findings(vec![Finding {
                attempt: format!("scribble over file {i}"),
                result: r,
            }])
        }
        Attack::MapWritable { file: i } => {
            let r = file(i)
                .and_then(|f| map_whole(f, true))
                .map(|r| format!("mapped {} bytes writable", r.len()));
            Reply::Findings(vec![Finding {
                attempt: format!("map file {i} writable"),
                result: r,
            }])
        }
        Attack::Copy(op) => {
            let attempt = format!("copy {op:?}");
            Reply::Findings(vec![Finding {
                attempt,
                result: ask_owner(chan, &Reply::Copy(op)).map(|b| format!("{} bytes", b.len())),
            }])
        }
        Attack::GrantCopy(op) => {
            let attempt = format!("grant copy {op:?}");
            Reply::Findings(vec![Finding {
                attempt,
                result: ask_owner(chan, &Reply::GrantCopy(op)).map(|b| format!("{} bytes", b.len())),
            }])
        }
        Attack::TouchPastEnd { file: i } => {
            let r = file(i).and_then(|f| {
                let size = rustix::fs::fstat(f).map_err(errno)?.st_size;
                let size = u64::try_from(size).map_err(errno)?;
                let page = rustix::param::page_size();
                let past = Mapping::of_fd(f.as_fd(), size, page, false)
                    .map_err(errno)?
                    .region();
                let mut b = [0u8; 8];
                // The kernel maps past the end of a file, but a touch there is SIGBUS.
                past.read(0, &mut b).map_err(errno)?;
                Ok(format!("read {b:?} past the end"))
            });
            Reply::Findings(vec![Finding {
                attempt: format!("read past the end of file {i}"),
                result: r,
            }])
        }
    }
}

/// Looks for a way out of the process.
fn escape(files: &[OwnedFd]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut note = |attempt: String, result: Result<String, String>| out.push(Finding { attempt, result });
    // What it holds: its descriptors and their targets.
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| {
        let mut v: Vec<String> = d
            .filter_map(|e| {
                let e = e.ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                Some(target.to_string_lossy().into_owned())
            })
            .collect();
        v.sort();
        v.join("\n")
    });
    note("own descriptors".into(), fds.map_err(errno));
    let status = std::fs::read_to_string("/proc/self/status").map(|s| {
        s.lines()
            .filter(|l| l.starts_with("Cap") || l.starts_with("NoNewPrivs"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    note("own capabilities".into(), status.map_err(errno));
    // The owner's memory and descriptors, through /proc.
    let owner = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
    for path in ["mem", "environ", "maps"] {
        let p = format!("/proc/{owner}/{path}");
        note(
            format!("read {p}"),
            std::fs::read(&p)
                .map(|b| format!("{} bytes", b.len()))
                .map_err(errno),
        );
    }
    // Listing these directories shows names only; opening an entry is what would
    // hand over the owner's file (its guest memory, another guest's).
    for dir in ["fd", "map_files"] {
        let p = format!("/proc/{owner}/{dir}");
        let entries = match std::fs::read_dir(&p) {
            Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect::<Vec<_>>(),
            Err(e) => {
                note(format!("list {p}"), Err(errno(e)));
                Vec::new()
            }
        };
        // Guessed names too, in case the listing hides some.
        let guessed = (0..64).map(|n| std::path::PathBuf::from(format!("{p}/{n}")));
        let mut tried = std::collections::BTreeSet::new();
        for path in entries.into_iter().chain(
            if dir == "fd" { Some(guessed) } else { None }
                .into_iter()
                .flatten(),
        ) {
            if !tried.insert(path.clone()) {
                continue;
            }
            match std::fs::File::open(&path) {
                Ok(_) => note(format!("open {}", path.display()), Ok("opened".into())),
                // No such descriptor: nothing to report.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => note(format!("open {}", path.display()), Err(errno(e))),
            }
        }
    }
    // Make its files reach further.
    let page = rustix::param::page_size() as u64;
    for (i, f) in files.iter().enumerate() {
        let size = rustix::fs::fstat(f).map(|s| s.st_size).unwrap_or(0);
        let size = u64::try_from(size).unwrap_or(0);
        note(format!("size of file {i}"), Ok(size.to_string()));
        note(
            format!("grow file {i}"),
            rustix::fs::ftruncate(f, size + page)
                .map(|()| "grown".into())
                .map_err(errno),
        );
    }
    out
}
