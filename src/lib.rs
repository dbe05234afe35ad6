//! wsgate: a TLS-terminating WebSocket security reverse proxy for legacy chat backends.
//!
//! The modules follow DESIGN.md's layout: [`config`] (schema and validation), [`tls`]
//! (rustls server config), [`server`] (accept loop, handshake timeout, HTTP upgrade),
//! [`admission`] (origin, auth, client IP, limits), [`upstream`] (backend connect),
//! [`relay`] (frame pump and its policies), [`admin`] (metrics, health) and [`demo`].

pub mod admin;
pub mod admission;
pub mod config;
pub mod demo;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod relay;
pub mod server;
pub mod state;
pub mod tls;
pub mod token_cmd;
pub mod upstream;
