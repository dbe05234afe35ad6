//! The relay: frames both ways between an upgraded client and its backend, with the session
//! policy of DESIGN.md's Relay table enforced inline.
//!
//! - [`frame`]: the RFC 6455 frame codec (headers, masks, close payloads).
//! - [`utf8`]: incremental UTF-8 validation across fragments.
//! - [`policy`]: the limits a session is admitted under, and its token buckets.
//! - [`flow`]: one direction's checks, in place in the read buffer.
//! - [`io`]: the sockets the pump drives (TLS streams end their output with the last write).
//! - [`session`]: the single-task pump that drives both sockets and the timers.

pub mod flow;
pub mod frame;
pub mod io;
pub mod policy;
pub mod session;
pub mod utf8;

pub use io::RelayIo;
pub use policy::SessionPolicy;
pub use session::{run, Initiator, SessionEnd, TrafficSink};
