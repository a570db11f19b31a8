//! Child processes under a deadline: every tool the kit runs (apt, dpkg-deb, busybox,
//! QEMU) is another process that may hang, so none is waited for without a bound, and
//! one that overstays is killed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a bounded wait looks at its child.
const POLL: Duration = Duration::from_millis(20);

/// How many bytes of a tool's output an error quotes.
pub(crate) const TAIL_BYTES: usize = 3000;

/// Why an external command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started.
    #[error("Could not start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program ran past its deadline and was killed.
    #[error("{program} did not finish within {timeout:?}; output ends with:\n{tail}")]
    Timeout {
        /// The program.
        program: String,
        /// The deadline it had.
        timeout: Duration,
        /// The end of what it printed.
        tail: String,
    },
    /// The program exited with a failure status.
    #[error("{program} failed ({status}); output ends with:\n{tail}")]
    Failed {
        /// The program.
        program: String,
        /// How it exited.
        status: ExitStatus,
        /// The end of what it printed.
        tail: String,
    },
    /// Waiting for the program failed.
    #[error("Could not wait for {program}")]
    Wait {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What a successful command printed.
#[derive(Debug)]
pub(crate) struct Output {
    /// Its standard output.
    pub stdout: Vec<u8>,
}

/// The name a command is reported by.
fn program_name(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// The last `max` bytes of `bytes` as text, starting at a line boundary when one is near.
pub(crate) fn tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    let cut = &bytes[start..];
    let cut = match cut.iter().position(|&b| b == b'\n') {
        Some(nl) if start > 0 && nl + 1 < cut.len() => &cut[nl + 1..],
        _ => cut,
    };
    String::from_utf8_lossy(cut).into_owned()
}

/// Collects a pipe into a shared buffer on a thread of its own, so a child never blocks
/// on a full pipe while its parent waits for it to exit.
pub(crate) fn collect<R: Read + Send + 'static>(mut pipe: R, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => into
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// Waits for `child` until `deadline`; kills and reaps it past that. `Ok(None)` means it
/// was killed.
pub(crate) fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            // An error here means it exited in the meantime; the wait reaps it either way.
            let _ = child.kill();
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// Runs `cmd` to completion within `timeout`, with standard input closed and its
/// output captured; a failure status is an error quoting the end of its output.
pub(crate) fn run(cmd: &mut Command, timeout: Duration) -> Result<Output, CommandError> {
    let program = program_name(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: program.clone(),
            source,
        })?;
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        child.stdout.take().map(|p| collect(p, stdout.clone())),
        child.stderr.take().map(|p| collect(p, stderr.clone())),
    ];
    let status = wait_until(&mut child, Instant::now() + timeout);
    // The child is gone, so its pipes reach end of file (unless it left a grandchild
    // holding them; the readers are then detached rather than joined).
    if status.as_ref().is_ok_and(Option::is_some) {
        for reader in readers.into_iter().flatten() {
            let _ = reader.join();
        }
    }
    let take =
        |buf: &Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()));
    let (out, err) = (take(&stdout), take(&stderr));
    let combined = || {
        let mut all = out.clone();
        all.extend_from_slice(&err);
        tail(&all, TAIL_BYTES)
    };
    match status {
        Err(source) => Err(CommandError::Wait { program, source }),
        Ok(None) => Err(CommandError::Timeout {
            program,
            timeout,
            tail: combined(),
        }),
        Ok(Some(status)) if !status.success() => Err(CommandError::Failed {
            program,
            status,
            tail: combined(),
        }),
        Ok(Some(_)) => Ok(Output { stdout: out }),
    }
}

/// A unique scratch directory name under `parent` for this process.
pub(crate) fn scratch_dir(parent: &Path, prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    parent.join(format!("{prefix}-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_starts_at_a_line_boundary() {
        assert_eq!(tail(b"first\nsecond\nthird\n", 9), "third\n");
        assert_eq!(tail(b"short\n", 100), "short\n");
    }

    #[test]
    fn a_hanging_command_is_killed_at_its_deadline() {
        let started = Instant::now();
        let err = run(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_failing_command_quotes_its_output() {
        let err = run(
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            Duration::from_secs(10),
        );
        match err.unwrap_err() {
            CommandError::Failed { tail, .. } => assert_eq!(tail, "boom\n"),
            other => panic!("unexpected {other}"),
        }
    }
}
