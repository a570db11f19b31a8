//! Starting a device process with nothing but its channel, and without the powers
//! that would let it reach around the channel.
//!
//! The child's only inherited descriptor besides stderr is its end of the channel,
//! as its standard input; `/dev/null` is its standard output. Between `fork` and
//! `exec` it loses every capability and gains `no_new_privs`, so neither it nor
//! anything it executes (a setuid program, root's implicit capabilities on exec) can
//! get `CAP_SYS_PTRACE` back: without it, the kernel refuses it the owner's
//! `/proc/<pid>/mem`, `/proc/<pid>/fd/*` and `/proc/<pid>/map_files/*`, since the
//! owner makes itself non-dumpable (`ptrace_may_access`, `PTRACE_MODE_READ`).

#![allow(unsafe_code)]

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `program` with `channel` as its standard input, confined as the module
/// docs say, and makes the calling process non-dumpable first.
pub(crate) fn confined(program: &Path, args: &[&str], channel: OwnedFd) -> std::io::Result<Child> {
    // Otherwise any process of our user could read our memory through /proc, the
    // device process included.
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::from(channel))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .env_clear();
    // SAFETY: the closure runs in the child between `fork` and `exec`, where only
    // async-signal-safe work is allowed: it makes two system calls (`prctl`,
    // `capset`) through rustix's raw syscall layer, which neither allocates nor
    // takes locks, and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            rustix::thread::set_no_new_privs(true)?;
            rustix::thread::set_capabilities(
                None,
                rustix::thread::CapabilitySets {
                    effective: rustix::thread::CapabilitySet::empty(),
                    permitted: rustix::thread::CapabilitySet::empty(),
                    inheritable: rustix::thread::CapabilitySet::empty(),
                },
            )?;
            Ok(())
        });
    }
    cmd.spawn()
}
