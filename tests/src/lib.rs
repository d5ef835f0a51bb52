//! Workspace-level integration tests for Omni: real processes, real
//! sockets, real models and real trace files. The tests live in `tests/`;
//! this library holds what they share.
