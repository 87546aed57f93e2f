//! release-keeper: turns uploads dropped into a site's `deploy-cache/` into verified,
//! immutable releases and switches `current` to them atomically.
//!
//! The data flow, one module per step:
//! `service` (inotify, signals, timers) -> `upload` (claim the marker, parse it, read the
//! manifest, wait for in-flight files) -> `release::finalize` (walk, hash, link or copy,
//! verify, rename into place) -> `activate` (hooks, atomic swap, health check, rollback)
//! -> `release::retention` (prune). `heal` and `verify` keep the tree honest, `fsops` owns
//! every filesystem step that must be atomic or durable, and `release::store` owns the
//! journal that records what the keeper did.

pub mod activate;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod error;
pub mod events;
pub mod fsops;
pub mod heal;
pub mod hooks;
pub mod metrics;
pub mod pipeline;
pub mod release;
pub mod service;
pub mod site;
pub mod upload;
pub mod verify;

pub use error::{Error, Result};
