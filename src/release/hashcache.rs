//! The hash cache: what each file of `deploy-cache/` hashed to last time, keyed by its
//! identity (device, inode) and guarded by (size, mtime, ctime). ctime cannot be set by an
//! uploader, so an unchanged key means unchanged content and the file need not be read
//! again, whatever its name; no paths are stored, which keeps the cache small for
//! 200,000-file trees. The cache is advisory: a missing or corrupt file just means
//! everything is read.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::sys::stat::FileStat;

use crate::error::{IoContext, Result};
use crate::fsops;
use crate::upload::manifest::{from_hex, to_hex, Digest};

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

/// The loaded cache.
#[derive(Debug, Default)]
pub struct HashCache {
    map: HashMap<(u64, u64), (StatKey, Digest)>,
}

impl HashCache {
    /// Loads the cache; unreadable lines and a missing file are ignored.
    pub fn load(path: &Path) -> HashCache {
        let mut map = HashMap::new();
        let Ok(data) = fs::read(path) else {
            return HashCache { map };
        };
        for line in data.split(|&b| b == b'\n') {
            if let Some((key, digest)) = parse_line(line) {
                map.insert((key.dev, key.ino), (key, digest));
            }
        }
        HashCache { map }
    }

    /// The cached digest of the file with this stat key, if it is unchanged.
    pub fn lookup(&self, key: &StatKey) -> Option<Digest> {
        self.map
            .get(&(key.dev, key.ino))
            .and_then(|(k, d)| (k == key).then_some(*d))
    }

    /// Writes a new cache atomically from `(key, digest)` entries, streaming.
    pub fn save<'a>(
        path: &Path,
        entries: impl Iterator<Item = &'a (StatKey, Digest)>,
    ) -> Result<()> {
        fsops::write_atomic_with(path, |w| {
            for (k, d) in entries {
                write_line(w, k, d)?;
            }
            Ok(())
        })
    }
}

/// A cache being written while a release is built, one line per file as it is hashed,
/// so no list of 200,000 entries is held in memory; `commit` puts it in place, and a
/// writer dropped without `commit` removes its file.
#[derive(Debug)]
pub struct CacheWriter {
    tmp: PathBuf,
    out: Option<std::io::BufWriter<fs::File>>,
}

impl CacheWriter {
    /// Starts a new cache beside `path`.
    pub fn create(path: &Path) -> Result<CacheWriter> {
        let tmp = fsops::tmp_sibling(path);
        let f = fs::File::create(&tmp).at(&tmp)?;
        Ok(CacheWriter {
            tmp,
            out: Some(std::io::BufWriter::with_capacity(64 * 1024, f)),
        })
    }

    /// Records one file.
    pub fn add(&mut self, key: &StatKey, digest: &Digest) -> Result<()> {
        match self.out.as_mut() {
            Some(w) => write_line(w, key, digest).at(&self.tmp),
            None => Ok(()),
        }
    }

    /// Replaces the cache at `path` with what was written (the cache is advisory: no
    /// fsync; a torn file after a crash only means files are read again).
    pub fn commit(mut self, path: &Path) -> Result<()> {
        if let Some(w) = self.out.take() {
            w.into_inner().map_err(|e| e.into_error()).at(&self.tmp)?;
            fs::rename(&self.tmp, path).at(path)?;
        }
        Ok(())
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn write_line(w: &mut dyn Write, k: &StatKey, d: &Digest) -> std::io::Result<()> {
    writeln!(
        w,
        "{} {} {} {} {} {}",
        k.dev,
        k.ino,
        k.size,
        k.mtime_ns,
        k.ctime_ns,
        to_hex(d)
    )
}

fn parse_line(line: &[u8]) -> Option<(StatKey, Digest)> {
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
    f.next().is_none().then_some((key, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_tolerated() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a b\nc");
        fs::write(&f, b"x").unwrap();
        let key = StatKey::of(&nix::sys::stat::lstat(&f).unwrap());
        let cache = d.path().join("cache");
        HashCache::save(&cache, [(key, [9u8; 32])].iter()).unwrap();
        let mut data = fs::read(&cache).unwrap();
        data.extend_from_slice(b"garbage line\n1 2 3\n");
        fs::write(&cache, data).unwrap();
        let c = HashCache::load(&cache);
        assert_eq!(c.lookup(&key), Some([9u8; 32]));
        // Same inode, new content: the ctime moved, so the entry no longer applies.
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&f, b"y").unwrap();
        let changed = StatKey::of(&nix::sys::stat::lstat(&f).unwrap());
        assert_eq!(c.lookup(&changed), None);
        assert!(HashCache::load(&d.path().join("missing")).map.is_empty());
    }
}
