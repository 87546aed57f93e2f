//! The hash cache: what each file of `deploy-cache/` hashed to last time, by path, guarded
//! by its full stat key (device, inode, size, mtime, ctime). ctime cannot be set by an
//! uploader, so an unchanged key means unchanged content and the file need not be read
//! again. It is written in walk order while a release is built and read the same way by
//! the next build ([`crate::release::ordered`]), so it is never held in memory, however
//! big the tree. The cache is advisory: a missing, torn or corrupt file just means files
//! are read.

use std::path::Path;

use nix::sys::stat::FileStat;

use crate::error::Result;
use crate::fsops::AtomicWriter;
use crate::release::ordered::Merge;
use crate::release::store;
use crate::upload::manifest::{from_hex, push_hex, Digest};

/// Identity of a file's content as far as stat can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl StatKey {
    /// The key of a stat result.
    pub fn of(st: &FileStat) -> StatKey {
        StatKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            // i64 nanoseconds reach the year 2262; saturating keeps a key even for clocks beyond.
            mtime_ns: st
                .st_mtime
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_mtime_nsec),
            ctime_ns: st
                .st_ctime
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_ctime_nsec),
        }
    }
}

/// The cache of the last build, read alongside this build's walk.
pub struct HashCache {
    merge: Merge<(StatKey, Digest)>,
}

impl HashCache {
    /// Opens the cache at `path`; a missing file or unreadable lines are just misses.
    pub fn open(path: &Path) -> HashCache {
        HashCache {
            merge: Merge::open(path, parse_line),
        }
    }

    /// What the cache recorded for the file at `rel`: its stat key then, and its digest.
    /// Calls must come in walk order ([`crate::release::ordered`]).
    pub fn entry(&mut self, rel: &[u8]) -> Option<(StatKey, Digest)> {
        self.merge.find(rel).copied()
    }
}

/// Starts a new cache that replaces `path` on `commit`. It is advisory, so it is not
/// fsynced: a torn file after a crash only means files are read again.
pub fn create(path: &Path) -> Result<AtomicWriter> {
    AtomicWriter::create(path, false)
}

/// Appends the line recording that the file at `rel` with `key` hashed to `digest`.
pub fn format_line(out: &mut Vec<u8>, rel: &[u8], key: &StatKey, digest: &Digest) {
    for n in [key.dev, key.ino, key.size] {
        store::push_u64(out, n);
        out.push(b' ');
    }
    for n in [key.mtime_ns, key.ctime_ns] {
        store::push_i64(out, n);
        out.push(b' ');
    }
    push_hex(out, digest);
    out.push(b' ');
    store::escape_path(rel, out);
    out.push(b'\n');
}

fn parse_line(line: &[u8], path: &mut Vec<u8>) -> Option<(StatKey, Digest)> {
    let mut f = line.splitn(7, |&b| b == b' ');
    let mut unsigned = || store::parse_u64(f.next()?);
    let (dev, ino, size) = (unsigned()?, unsigned()?, unsigned()?);
    let mut signed = || store::parse_i64(f.next()?);
    let (mtime_ns, ctime_ns) = (signed()?, signed()?);
    let key = StatKey {
        dev,
        ino,
        size,
        mtime_ns,
        ctime_ns,
    };
    let digest = from_hex(f.next()?)?;
    store::unescape_path_into(f.next()?, path)?;
    Some((key, digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn round_trip_and_corruption_tolerated() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a b\nc");
        fs::write(&f, b"x").unwrap();
        let key = StatKey::of(&nix::sys::stat::lstat(&f).unwrap());
        let cache = d.path().join("cache");
        let mut line = Vec::new();
        format_line(&mut line, b"a/a b\nc", &key, &[9u8; 32]);
        line.extend_from_slice(b"garbage line\n1 2 3\n");
        format_line(&mut line, b"b", &key, &[8u8; 32]);
        fs::write(&cache, &line).unwrap();
        let mut c = HashCache::open(&cache);
        assert_eq!(c.entry(b"a"), None);
        assert_eq!(c.entry(b"a/a b\nc"), Some((key, [9u8; 32])));
        assert_eq!(c.entry(b"b"), Some((key, [8u8; 32])));
        // Same inode, new content: the ctime moved, so the entry no longer applies.
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&f, b"y").unwrap();
        let changed = StatKey::of(&nix::sys::stat::lstat(&f).unwrap());
        let mut c = HashCache::open(&cache);
        let (then, _) = c.entry(b"a/a b\nc").unwrap();
        assert_ne!(
            then, changed,
            "a rewritten file must not match its cached key"
        );
        assert_eq!(HashCache::open(&d.path().join("missing")).entry(b"b"), None);
    }
}
