//! Uploads: the marker that says an upload is complete and its claim (`marker`), the
//! checksum manifest (`manifest`), files still being written (`inflight`), and the
//! symlink-safe traversal of `deploy-cache/` (`walk`) with its directory listings made
//! ahead by helper threads (`lookahead`).

pub mod inflight;
pub mod lookahead;
pub mod manifest;
pub mod marker;
pub mod walk;
