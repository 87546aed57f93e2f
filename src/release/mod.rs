//! Releases: building one from an upload (`finalize`), the keeper's record of them
//! (`store`: journal and per-release manifests; `changes`: when it last touched their
//! inodes), and which ones to keep (`retention`).

pub mod changes;
pub mod finalize;
pub mod hashcache;
pub mod ordered;
pub mod retention;
pub mod store;
pub mod symlinks;
