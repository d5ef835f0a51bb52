//! Where sockets live and how frames get onto them.
//!
//! With the `ipc` transport (the default) every socket is a Unix socket in a
//! private run directory (mode 0700), created by the orchestrator under
//! `/dev/shm` when it exists (so that the shared-memory segments of large
//! tensors, kept in its `shm/` subfolder, are in RAM) or the temp dir, and
//! removed when the pipeline shuts down. With `tcp`, sockets listen on
//! `runtime.host` (or a stage's `runtime.address`) so stages on other hosts
//! can reach them; the run directory still holds the launch files.
//!
//! Socket roles: the orchestrator binds a ROUTER that every worker's DEALER
//! connects to (control in, events out, identities `stage-<id>`); each
//! worker binds a ROUTER for its input that upstream stages' DEALERs
//! connect to, so that a malformed message can be answered to its sender.

use std::path::Path;

use bytes::Bytes;
use zeromq::{SocketOptions, SocketSend, ZmqMessage};

use crate::config::TransportKind;
use crate::error::{Error, Result};
use crate::wire::Limits;

/// Longest path a Unix socket address may have (`sun_path` is 108 bytes
/// with its terminating NUL).
const MAX_IPC_PATH: usize = 107;

/// An `ipc://` address for a socket file in `dir`.
pub(crate) fn ipc_address(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    let s = path.display().to_string();
    if s.len() > MAX_IPC_PATH {
        return Err(Error::socket(
            format!("ipc://{s}"),
            format!("socket path is {} bytes, longer than the {MAX_IPC_PATH} a Unix socket allows; use a shorter run directory parent", s.len()),
        ));
    }
    Ok(format!("ipc://{s}"))
}

/// A `tcp://host:port` address with a port bound and listening right now.
/// The listener is kept open until the stage that will serve on it inherits
/// it ([`inherit_listener`]), so no other process can take the port between
/// the orchestrator choosing it and the stage using it.
pub(crate) fn reserve_tcp_address(host: &str) -> Result<(String, std::net::TcpListener)> {
    let listener = std::net::TcpListener::bind((host, 0)).map_err(|e| {
        Error::socket(
            format!("tcp://{host}:0"),
            format!("cannot find a free port: {e}"),
        )
    })?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::socket(format!("tcp://{host}:0"), e))?
        .port();
    Ok((format!("tcp://{host}:{port}"), listener))
}

/// Hands `listener` to the process `command` starts: it stays open across
/// `exec` (Rust opens sockets close-on-exec) under the same descriptor
/// number, which the child's launch spec names. The command owns the
/// listener until it is dropped, so the descriptor is valid at the fork
/// whatever happens to the caller meanwhile.
pub(crate) fn inherit_listener(
    command: &mut std::process::Command,
    listener: std::net::TcpListener,
) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // SAFETY: fcntl is async-signal-safe; it only clears FD_CLOEXEC in the
    // child's own descriptor table, after fork.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Takes over the listening socket a stage inherited (see
/// [`inherit_listener`]) after checking that the descriptor is a listening
/// TCP socket bound to `address`'s port. On any mismatch the descriptor is
/// left open and untouched: it may belong to something else.
pub(crate) fn inherited_listener(fd: i32, address: &str) -> Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let refuse = |why: String| Error::socket(address, format!("inherited descriptor {fd} {why}"));
    // 0-2 are stdio, never a listener the orchestrator passes.
    if fd < 3 {
        return Err(refuse("is not one the orchestrator passes".into()));
    }
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `listening`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || listening == 0 {
        return Err(refuse("is not a listening socket".into()));
    }
    // SAFETY: a listening socket the orchestrator passed for this purpose;
    // nothing else in this process uses it. It is only owned (and so
    // closed on drop) once the port matches.
    let listener = std::mem::ManuallyDrop::new(unsafe { std::net::TcpListener::from_raw_fd(fd) });
    let bound = listener
        .local_addr()
        .map_err(|e| refuse(format!("has no address: {e}")))?;
    if !address.ends_with(&format!(":{}", bound.port())) {
        return Err(refuse(format!("is bound to {bound}, not to this address")));
    }
    // Ours now: keep it from whatever this stage may start later.
    // SAFETY: fcntl on a descriptor this process holds.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        return Err(refuse(format!(
            "cannot be made close-on-exec: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(std::mem::ManuallyDrop::into_inner(listener))
}

/// The address the orchestrator's ROUTER binds.
pub(crate) fn orchestrator_address(
    kind: TransportKind,
    run_dir: &Path,
    host: &str,
) -> Result<String> {
    match kind {
        TransportKind::Ipc => ipc_address(run_dir, "orchestrator.sock"),
        TransportKind::Tcp => Ok(format!("tcp://{host}:0")),
    }
}

/// Options every socket of a pipeline starts from: incoming messages are
/// capped at what the wire decoder would accept anyway. The cap is enforced
/// in the (vendored, patched) `zeromq` codec from the frame header, before
/// any memory is reserved; the peer that sends more is disconnected, and
/// the socket serves its other peers on. This matters for `tcp://`, where
/// anyone who can reach the port can send a frame header.
pub(crate) fn socket_options() -> SocketOptions {
    let mut o = SocketOptions::default();
    o.max_message_size(Limits::default().max_socket_message_bytes());
    o
}

/// Sends frames on any ZeroMQ socket; `prefix` (a ROUTER's peer identity)
/// goes first when given.
pub(crate) async fn send_frames<S: SocketSend + ?Sized>(
    socket: &mut S,
    prefix: Option<Bytes>,
    frames: Vec<Bytes>,
    endpoint: &str,
) -> Result<()> {
    let mut all = Vec::with_capacity(frames.len() + 1);
    if let Some(p) = prefix {
        all.push(p);
    }
    all.extend(frames);
    let msg = ZmqMessage::try_from(all).map_err(|e| Error::socket(endpoint, e))?;
    socket
        .send(msg)
        .await
        .map_err(|e| Error::socket(endpoint, e))
}

/// The identity a stage's DEALER presents to the orchestrator's ROUTER.
pub(crate) fn stage_identity(stage_id: usize) -> String {
    format!("stage-{stage_id}")
}
