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
//! connects to (control in, events out); each worker binds a ROUTER for its
//! input that upstream stages' DEALERs connect to, so that a malformed
//! message can be answered to its sender.
//!
//! Who may talk: every process of one pipeline run shares a secret
//! [`RunToken`], handed to the workers in their launch files (mode 0600 in
//! the private run directory), and presents it as the first part of its
//! ZMTP peer identity (`<token>.<role>`, sent in the handshake's READY
//! command). Both kinds of ROUTER drop every message whose sender's
//! identity does not carry the token, unanswered: with `tcp://` anyone who
//! reaches a port can connect, but nobody without the token can feed a
//! stage, answer for one, or learn anything from its replies. The token
//! travels in the clear (ZMTP's NULL mechanism): it keeps out whoever can
//! reach a port, not whoever can watch the traffic, so stages on several
//! hosts belong on a private network.

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

/// The secret of one pipeline run (see the module docs): 128 random bits,
/// as 32 lowercase hex digits.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct RunToken(String);

impl std::fmt::Debug for RunToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunToken(..)")
    }
}

/// Hex digits in a token.
const TOKEN_HEX: usize = 32;

impl RunToken {
    /// A fresh token from the kernel's random source.
    pub(crate) fn generate() -> Result<Self> {
        use std::io::Read;
        let mut raw = [0u8; TOKEN_HEX / 2];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(|e| Error::io("cannot draw the run token", "/dev/urandom", e))?;
        Ok(Self(raw.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// A token read from a launch file.
    pub(crate) fn parse(text: &str) -> Result<Self> {
        if text.len() == TOKEN_HEX && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(text.to_owned()))
        } else {
            Err(Error::Wire(format!(
                "the launch file's run token is not {TOKEN_HEX} lowercase hex digits"
            )))
        }
    }

    /// The token's text, for a launch file.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The peer identity of a socket playing `role` in this run.
    pub(crate) fn identity(&self, role: &str) -> String {
        format!("{}.{role}", self.0)
    }

    /// The role `identity` names when it carries this run's token; None
    /// for any other peer. The token is compared in constant time.
    pub(crate) fn role_of<'a>(&self, identity: &'a [u8]) -> Option<&'a [u8]> {
        let (token, rest) = identity.split_at_checked(TOKEN_HEX)?;
        let diff = token
            .iter()
            .zip(self.0.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (diff == 0).then_some(rest.strip_prefix(b".")?)
    }
}

/// The role a stage's DEALER plays towards the orchestrator's ROUTER.
pub(crate) fn stage_role(stage_id: usize) -> String {
    format!("stage-{stage_id}")
}

/// Counts the messages dropped for lacking the run token and says so in
/// the log at the 1st, 2nd, 4th, 8th... (a flood must not flood the log).
#[derive(Debug, Default)]
pub(crate) struct Refusals(std::sync::atomic::AtomicU64);

impl Refusals {
    pub(crate) fn refuse(&self, endpoint: &str, identity: &[u8]) {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                target: "omni::runtime",
                %endpoint,
                refused = n,
                identity_bytes = identity.len(),
                "dropped a message from a peer without this run's token"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_identities_with_the_token_are_admitted() {
        let token = RunToken::generate().expect("urandom");
        let other = RunToken::generate().expect("urandom");
        assert_ne!(token, other);
        let id = token.identity("stage-1");
        assert_eq!(token.role_of(id.as_bytes()), Some(&b"stage-1"[..]));
        assert_eq!(other.role_of(id.as_bytes()), None);
        assert_eq!(token.role_of(b"stage-1"), None);
        assert_eq!(token.role_of(token.as_str().as_bytes()), None);
        assert_eq!(token.role_of(&[]), None);
        let mut flipped = id.into_bytes();
        flipped[31] ^= 1;
        assert_eq!(token.role_of(&flipped), None);
        assert!(RunToken::parse(token.as_str()).is_ok());
        for bad in ["", "xyz", &"A".repeat(32), &"0".repeat(31)] {
            assert!(RunToken::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format!("{token:?}"), "RunToken(..)");
    }
}
