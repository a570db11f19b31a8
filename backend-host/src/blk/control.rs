//! The control socket of `vio-host blk`: a device's rate limits read and changed
//! while it serves, one text command per line on a unix socket.
//!
//! ```text
//! get                                   -> ok iops=3000 bytes=209715200
//! set iops=5000 read-mib=100            -> ok          (every limit not named is lifted)
//! set                                   -> ok          (no limits)
//! set iops=fast                         -> error: ...  (nothing changes)
//! ```
//!
//! Keys are rates per second: `iops`, `read-iops`, `write-iops` (operations),
//! `mib`, `read-mib`, `write-mib` (MiB) and `bytes`, `read-bytes`, `write-bytes`
//! (bytes), each at least 1; reads and writes together for the keys without a
//! direction. Bursts are a hundredth of a second's worth, as the command-line flags
//! give them. A malformed command gets an `error:` line and changes nothing; the
//! connection stays open for the next.

use crate::blk::limit::{Bucket, Limits, RateLimiter};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

/// Why a control command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Not `get` or `set`.
    #[error("unknown command {0:?} (get, set KEY=RATE ...)")]
    UnknownCommand(String),
    /// A `set` argument that is not `KEY=RATE`.
    #[error("{0:?} is not KEY=RATE")]
    NotAPair(String),
    /// A key that names no limit.
    #[error("unknown limit {0:?}")]
    UnknownKey(String),
    /// A rate that is not a whole number of at least 1.
    #[error("rate {0:?} for {1} is not a whole number of at least 1")]
    BadRate(String, String),
    /// The same limit twice.
    #[error("{0} given twice")]
    Twice(String),
}

/// The limits a `set` command's arguments name (the others lifted).
///
/// # Errors
/// A malformed argument ([`ControlError`]).
pub fn parse_limits(args: &str) -> Result<Limits, ControlError> {
    let mut l = Limits::default();
    for pair in args.split_whitespace() {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| ControlError::NotAPair(pair.to_string()))?;
        let rate: u64 = value
            .parse()
            .ok()
            .filter(|&r| r >= 1)
            .ok_or_else(|| ControlError::BadRate(value.to_string(), key.to_string()))?;
        let mib = |r: u64| r.saturating_mul(1 << 20);
        let (slot, rate) = match key {
            "iops" => (&mut l.ops, rate),
            "read-iops" => (&mut l.read_ops, rate),
            "write-iops" => (&mut l.write_ops, rate),
            "mib" => (&mut l.bytes, mib(rate)),
            "read-mib" => (&mut l.read_bytes, mib(rate)),
            "write-mib" => (&mut l.write_bytes, mib(rate)),
            "bytes" => (&mut l.bytes, rate),
            "read-bytes" => (&mut l.read_bytes, rate),
            "write-bytes" => (&mut l.write_bytes, rate),
            other => return Err(ControlError::UnknownKey(other.to_string())),
        };
        if slot.is_some() {
            return Err(ControlError::Twice(key.to_string()));
        }
        *slot = Some(Bucket::new(rate));
    }
    Ok(l)
}

/// The limits as `get` answers them: `KEY=RATE` pairs, operations and bytes.
pub fn format_limits(l: &Limits) -> String {
    let named = [
        ("iops", l.ops),
        ("read-iops", l.read_ops),
        ("write-iops", l.write_ops),
        ("bytes", l.bytes),
        ("read-bytes", l.read_bytes),
        ("write-bytes", l.write_bytes),
    ];
    named
        .iter()
        .filter_map(|(k, b)| b.map(|b| format!("{k}={}", b.rate)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Answers one command line.
pub fn answer(limiter: &RateLimiter, line: &str) -> String {
    let line = line.trim();
    let (cmd, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let result = match cmd {
        "get" if args.trim().is_empty() => Ok(format_limits(&limiter.limits())),
        "set" => parse_limits(args).map(|l| {
            limiter.set(l);
            tracing::info!(limits = %format_limits(&l), "rate limits changed");
            String::new()
        }),
        _ => Err(ControlError::UnknownCommand(line.to_string())),
    };
    match result {
        Ok(s) if s.is_empty() => "ok".to_string(),
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("error: {e}"),
    }
}

/// Listens on `path` (replacing a stale socket there, never another kind of file)
/// and answers commands for `limiter` on a thread of its own, one connection at a
/// time, until the process ends.
///
/// # Errors
/// The socket cannot be bound: `path` holds something that is not a socket, or
/// cannot be created.
pub fn serve(path: &Path, limiter: Arc<RateLimiter>) -> std::io::Result<std::thread::JoinHandle<()>> {
    crate::vhost_user::remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)?;
    tracing::info!(socket = %path.display(), "rate-limit control socket");
    std::thread::Builder::new()
        .name("vio-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(error) = session(stream, &limiter) {
                            tracing::debug!(%error, "control connection ended");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "control socket accept"),
                }
            }
        })
}

/// One connection: a reply line per command line. A line longer than 4 KiB ends
/// the connection (nothing valid is that long).
fn session(stream: UnixStream, limiter: &RateLimiter) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::Read::take(&mut lines, 4096).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n == 4096 {
            writeln!(out, "error: command longer than 4096 bytes")?;
            return Ok(());
        }
        writeln!(out, "{}", answer(limiter, &line))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_read_and_change_the_limits() {
        let l = RateLimiter::new(Limits::default());
        assert_eq!(answer(&l, "get\n"), "ok");
        assert_eq!(answer(&l, "set iops=3000 read-mib=2"), "ok");
        assert_eq!(answer(&l, "get"), "ok iops=3000 read-bytes=2097152");
        assert_eq!(l.limits().ops.map(|b| b.rate), Some(3000));
        assert_eq!(answer(&l, "set"), "ok");
        assert!(l.limits().is_unlimited());
    }

    /// The socket replaces a stale socket, never a file of another kind (a path
    /// given by mistake must not cost an image).
    #[test]
    fn serving_never_removes_a_file_that_is_not_a_socket() {
        let dir = std::env::temp_dir().join(format!("vio-ctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("disk.img");
        std::fs::write(&file, b"data").unwrap();
        let l = RateLimiter::new(Limits::default());
        assert!(serve(&file, l.clone()).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        let sock = dir.join("ctl.sock");
        drop(UnixListener::bind(&sock).unwrap());
        serve(&sock, l).expect("a stale socket is replaced");
        let mut s = UnixStream::connect(&sock).unwrap();
        writeln!(s, "get").unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        assert_eq!(reply, "ok\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_malformed_command_is_refused_and_changes_nothing() {
        let l = RateLimiter::new(Limits::default());
        assert_eq!(answer(&l, "set iops=500"), "ok");
        for bad in [
            "set iops=fast",
            "set iops=0",
            "set iops=-1",
            "set iops",
            "set speed=9",
            "set iops=1 iops=2",
            "get now",
            "reboot",
            "",
        ] {
            let reply = answer(&l, bad);
            assert!(reply.starts_with("error: "), "{bad:?}: {reply}");
            assert_eq!(
                l.limits().ops.map(|b| b.rate),
                Some(500),
                "{bad:?} changed the limits"
            );
        }
    }
}
