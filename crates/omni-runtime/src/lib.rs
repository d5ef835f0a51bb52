//! # omni-runtime
//!
//! One OS process per stage: the `omni-stage` worker binary, ZeroMQ sockets
//! and the versioned wire protocol, the readiness handshake, supervision
//! (crash detection, shutdown, no orphans), the stage graph and the input
//! processors between stages, and the control messages (generate, abort,
//! start/stop profile, shutdown, health).
//!
//! It must not know about HTTP or the public facade (`omni-core`).
#![warn(missing_docs)]
