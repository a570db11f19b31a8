//! The device process of `vio-isolation`: speaks the wire protocol on its standard
//! input, which its owner made the device's end of a `SOCK_SEQPACKET` channel.

use std::os::fd::AsFd;
use vio_isolation::wire::Channel;

fn main() -> std::process::ExitCode {
    let chan = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => Channel::from_fd(fd),
        Err(e) => {
            eprintln!("vio-isolation-device: no channel on standard input: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match vio_isolation::device::run(&chan) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vio-isolation-device: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
