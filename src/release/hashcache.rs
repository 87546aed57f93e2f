//! The hash cache: what each file of `deploy-cache/` hashed to last time, keyed by path and
//! guarded by (device, inode, size, mtime, ctime). ctime cannot be set by an uploader, so
//! an unchanged key means unchanged content and the file need not be read again. The cache
//! is advisory: a missing or corrupt file just means everything is read.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use nix::sys::stat::FileStat;

use crate::error::Result;
use crate::fsops;
use crate::upload::manifest::{from_hex, to_hex, Digest};

/// Identity of a file's content as far as stat can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl StatKey {
    /// The key of a stat result.
    pub fn of(st: &FileStat) -> StatKey {
        StatKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
            ctime_ns: i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec),
        }
    }
}

/// The loaded cache.
#[derive(Debug, Default)]
pub struct HashCache {
    map: HashMap<PathBuf, (StatKey, Digest)>,
}

impl HashCache {
    /// Loads the cache; unreadable lines and a missing file are ignored.
    pub fn load(path: &Path) -> HashCache {
        let mut map = HashMap::new();
        let Ok(data) = fs::read(path) else {
            return HashCache { map };
        };
        for line in data.split(|&b| b == b'\n') {
            if let Some((rel, key, digest)) = parse_line(line) {
                map.insert(rel, (key, digest));
            }
        }
        HashCache { map }
    }

    /// The cached digest of `rel` if its stat key is unchanged.
    pub fn lookup(&self, rel: &Path, key: &StatKey) -> Option<Digest> {
        self.map
            .get(rel)
            .and_then(|(k, d)| (k == key).then_some(*d))
    }

    /// Writes a new cache atomically from `(path, key, digest)` entries, streaming.
    pub fn save<'a>(
        path: &Path,
        entries: impl Iterator<Item = (&'a Path, StatKey, Digest)>,
    ) -> Result<()> {
        fsops::write_atomic_with(path, |w| {
            for (rel, k, d) in entries {
                write!(
                    w,
                    "{} {} {} {} {} {} ",
                    k.dev,
                    k.ino,
                    k.size,
                    k.mtime_ns,
                    k.ctime_ns,
                    to_hex(&d)
                )?;
                // Paths are hex-encoded: any byte can occur in a name.
                for b in fsops::path_bytes(rel) {
                    write!(w, "{b:02x}")?;
                }
                w.write_all(b"\n")?;
            }
            Ok(())
        })
    }
}

fn parse_line(line: &[u8]) -> Option<(PathBuf, StatKey, Digest)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut f = text.split(' ');
    let key = StatKey {
        dev: f.next()?.parse().ok()?,
        ino: f.next()?.parse().ok()?,
        size: f.next()?.parse().ok()?,
        mtime_ns: f.next()?.parse().ok()?,
        ctime_ns: f.next()?.parse().ok()?,
    };
    let digest = from_hex(f.next()?.as_bytes())?;
    let hex = f.next()?;
    if hex.is_empty() || hex.len() % 2 != 0 || f.next().is_some() {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((fsops::path_from_bytes(bytes), key, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_tolerated() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a b\nc");
        fs::write(&f, b"x").unwrap();
        let st = nix::sys::stat::lstat(&f).unwrap();
        let key = StatKey::of(&st);
        let cache = d.path().join("cache");
        HashCache::save(&cache, [(Path::new("a b\nc"), key, [9u8; 32])].into_iter()).unwrap();
        let mut data = fs::read(&cache).unwrap();
        data.extend_from_slice(b"garbage line\n1 2 3\n");
        fs::write(&cache, data).unwrap();
        let c = HashCache::load(&cache);
        assert_eq!(c.lookup(Path::new("a b\nc"), &key), Some([9u8; 32]));
        fs::write(&f, b"y").unwrap();
        let changed = StatKey::of(&nix::sys::stat::lstat(&f).unwrap());
        assert_eq!(c.lookup(Path::new("a b\nc"), &changed), None);
        assert!(HashCache::load(&d.path().join("missing")).map.is_empty());
    }
}
