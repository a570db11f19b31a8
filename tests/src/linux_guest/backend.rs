//! vhost-user backend processes for a guest: any command that listens on a Unix socket
//! (qemu-storage-daemon, our `vio-host`), started, awaited until it listens, its log
//! kept for failure reports, and stopped when the test is done or drops it.

use super::process::{self, TAIL_BYTES};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where qemu-storage-daemon is installed (with qemu-utils).
pub const QSD: &str = "/usr/bin/qemu-storage-daemon";

/// How long a backend may take to listen, and to exit once asked.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(20);

/// The `__SO_ACCEPTCON` flag of `/proc/net/unix`: the socket is listening.
const SO_ACCEPTCON: u32 = 1 << 16;

/// Why a backend did not come up or go down cleanly.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The program could not be started.
    #[error("Could not start the {name} backend")]
    Spawn {
        /// The backend's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited before listening on its socket.
    #[error("The {name} backend exited ({status}) before listening; its log ends with:\n{log}")]
    Exited {
        /// The backend's name.
        name: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// It did not listen on its socket in time.
    #[error("The {name} backend did not listen on {socket} within {timeout:?}; its log ends with:\n{log}")]
    NotListening {
        /// The backend's name.
        name: String,
        /// The socket it was to listen on.
        socket: PathBuf,
        /// The time it had.
        timeout: Duration,
        /// The end of its log.
        log: String,
    },
    /// Waiting for it failed.
    #[error("Could not wait for the {name} backend")]
    Wait {
        /// The backend's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running backend; killed when dropped.
#[derive(Debug)]
pub struct Backend {
    name: String,
    socket: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<Vec<u8>>>,
}

/// The command serving `image` as a vhost-user-blk export with `queues` queues on
/// `socket`, from qemu-storage-daemon, as one would run it for speed: O_DIRECT and
/// io_uring on the image, writable, the export in an iothread (which polls
/// adaptively, QEMU's default `poll-max-ns`).
pub fn qsd_blk(image: &Path, socket: &Path, queues: u16) -> Command {
    let mut cmd = Command::new(QSD);
    cmd.args(["--object", "iothread,id=io0", "--blockdev"])
        .arg(format!(
            "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring",
            image.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0", "--export"])
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,iothread=io0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            socket.display()
        ));
    cmd
}

/// The command serving `image` with our vhost-user-blk daemon (the code of
/// `vio-host blk`) on `socket`: `vio vhost-serve`, run by `vio`, the program at
/// `program`, with `queues` queues and adaptive polling for `poll`.
pub fn vio_blk(program: &Path, image: &Path, socket: &Path, queues: u16, poll: Duration) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("vhost-serve")
        .arg("--socket")
        .arg(socket)
        .arg("--image")
        .arg(image)
        .args(["--queues", &queues.to_string()])
        .args(["--poll-us", &poll.as_micros().to_string()]);
    cmd
}

/// Whether a socket bound to `path` is listening, from `/proc/net/unix` (a probe
/// connection would look like a frontend that came and went).
fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & SO_ACCEPTCON != 0)
    })
}

impl Backend {
    /// Starts `cmd` and waits until it listens on `socket` (which it must create).
    pub fn spawn(name: &str, mut cmd: Command, socket: &Path) -> Result<Self, BackendError> {
        let _ = std::fs::remove_file(socket);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| BackendError::Spawn {
                name: name.to_owned(),
                source,
            })?;
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            process::collect(out, log.clone());
        }
        if let Some(err) = child.stderr.take() {
            process::collect(err, log.clone());
        }
        let log_tail = || process::tail(&log.lock().unwrap_or_else(|e| e.into_inner()), TAIL_BYTES);
        let deadline = Instant::now() + BACKEND_TIMEOUT;
        while !listening(socket) {
            let exited = child.try_wait().map_err(|source| BackendError::Wait {
                name: name.to_owned(),
                source,
            })?;
            if let Some(status) = exited {
                std::thread::sleep(Duration::from_millis(50)); // let the log readers drain
                return Err(BackendError::Exited {
                    name: name.to_owned(),
                    status,
                    log: log_tail(),
                });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BackendError::NotListening {
                    name: name.to_owned(),
                    socket: socket.to_owned(),
                    timeout: BACKEND_TIMEOUT,
                    log: log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::debug!(name, socket = %socket.display(), "backend listening");
        Ok(Self {
            name: name.to_owned(),
            socket: socket.to_owned(),
            child: Some(child),
            log,
        })
    }

    /// CPU time the backend process has used so far (user and system, every
    /// thread), from `/proc/<pid>/stat`; `None` once it is gone.
    pub fn cpu_time(&self) -> Option<Duration> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name (which may hold spaces and parentheses): utime
        // and stime are the 12th and 13th fields, in clock ticks.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        let hz = rustix::param::clock_ticks_per_second().max(1);
        Some(Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz))
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The end of what it printed so far.
    pub fn log_tail(&self) -> String {
        process::tail(&self.log.lock().unwrap_or_else(|e| e.into_inner()), TAIL_BYTES)
    }

    /// Asks it to exit (SIGTERM), kills it if it has not within the timeout, and returns
    /// its log; its exit status is not judged (SIGTERM is how these daemons end).
    pub fn stop(mut self) -> Result<String, BackendError> {
        let Some(mut child) = self.child.take() else {
            return Ok(self.log_tail());
        };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id().cast_signed()) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        process::wait_until(&mut child, Instant::now() + BACKEND_TIMEOUT).map_err(|source| {
            BackendError::Wait {
                name: self.name.clone(),
                source,
            }
        })?;
        Ok(self.log_tail())
    }

    /// Kills it with SIGKILL, as a crash would (no handler runs, nothing is flushed
    /// or closed in order), waits until it is gone and returns its log. The socket
    /// file is removed afterwards like on any drop; a frontend reconnecting meanwhile
    /// finds nothing to connect to until the next backend listens there.
    pub fn kill(mut self) -> Result<String, BackendError> {
        if let Some(mut child) = self.child.take() {
            // An error means it is gone already; the wait reaps it either way.
            let _ = child.kill();
            let waited =
                process::wait_until(&mut child, Instant::now() + BACKEND_TIMEOUT).map_err(|source| {
                    BackendError::Wait {
                        name: self.name.clone(),
                        source,
                    }
                })?;
            tracing::debug!(name = self.name, status = ?waited, "backend killed");
        }
        Ok(self.log_tail())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
