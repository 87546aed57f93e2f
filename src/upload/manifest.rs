//! `SHA256SUMS` manifests: parsing what uploaders send and writing what `manifest DIR` emits.
//!
//! Why the format rules are what they are:
//! - Uploaders make manifests with whatever they have, almost always GNU `sha256sum`
//!   (`<64 hex><space><space or *><path>`), sometimes `sha256sum --tag` or a BSD tool
//!   (`SHA256 (<path>) = <hex>`). We accept both, byte for byte as coreutils writes them,
//!   including its escaped form: a name holding `\`, LF or CR makes the line start with `\`
//!   and the name is written with `\\`, `\n`, `\r`. [`format_line`] writes exactly what
//!   `sha256sum` writes, so our manifests check with `sha256sum -c` and vice versa.
//! - What `sha256sum -c` tolerates we tolerate: blank lines, `#` comments, leading blanks,
//!   a last line without LF, upper-case hex, a path listed twice with the same digest
//!   (two manifests concatenated). Beyond it: a UTF-8 byte-order mark before the first line
//!   (Windows editors write one; it can never start a checksum line), and `sha256sum -z`
//!   output (NUL-terminated lines, names unescaped), told apart by a NUL ending its first
//!   line: a NUL anywhere else is an error, as before. The one exception is its guess at a single-space
//!   separator: we require the two characters `sha256sum` writes, so a name starting with a
//!   space or `*` can never be misread. CRLF files (edited on Windows) are accepted by
//!   dropping one raw trailing CR: `sha256sum` escapes a CR in a name, so a raw one at the
//!   end of a line is a line-ending artifact in both the plain and the escaped form. (A name
//!   ending in CR written raw by an older `sha256sum` would lose it; verification then finds
//!   the file unlisted and rejects the upload: a loud failure, never a silent one.)
//! - Manifest paths are later joined onto a release directory, so they must stay inside it:
//!   absolute paths, `..`, `.` and empty components, trailing slashes and NUL bytes are
//!   rejected rather than normalized. Only one leading `./` is stripped, because
//!   `find . -type f -exec sha256sum {} +` produces it. Two lines for one path with different
//!   digests are rejected: whichever digest won would be a guess.
//! - The whole manifest is read into memory, so its size is capped ([`MAX_MANIFEST_BYTES`]).
//! - [`write_for_dir`] sorts by raw path bytes (what `LC_ALL=C sort` does), so the same tree
//!   always gives the same manifest, whatever the thread count.

use hashbrown::HashTable;
use sha2::{Digest as _, Sha256};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// A SHA-256 digest.
pub type Digest = [u8; 32];
/// Largest manifest [`parse`] accepts, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

const BUF_SIZE: usize = 256 * 1024;
const BSD_PREFIX: &[u8] = b"SHA256 (";
const BOM: &[u8] = b"\xef\xbb\xbf";
const BSD_SEP: &[u8] = b") = ";

// `Entries` offsets are u32: a manifest within the cap can never overflow them, so `insert`
// refusing an entry during a parse always means a duplicate.
const _: () = assert!(MAX_MANIFEST_BYTES < u32::MAX as u64);

/// Why a manifest could not be parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A line is neither a GNU nor a BSD checksum line.
    #[error(
        "line {line}: malformed line (expected '<64 hex>  <path>' or 'SHA256 (<path>) = <hex>')"
    )]
    Malformed { line: usize },
    /// An escaped-form name holds a backslash not followed by `\`, `n` or `r`.
    #[error("line {line}: bad escape in name")]
    BadEscape { line: usize },
    /// A path that could leave the release directory or is otherwise not a plain relative path.
    #[error("line {line}: unsafe path {path:?}: {reason}")]
    UnsafePath {
        line: usize,
        path: String,
        reason: &'static str,
    },
    /// The same path is listed twice with different digests.
    #[error("line {line}: duplicate entry {path:?} with another hash (first on line {first})")]
    Duplicate {
        line: usize,
        path: String,
        first: usize,
    },
    /// The manifest exceeds [`MAX_MANIFEST_BYTES`].
    #[error("manifest is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// Reading the directory or a file under it failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// A fifo, socket or device was found in the directory.
    #[error("{}: not a regular file, directory or symlink", path.display())]
    SpecialFile { path: PathBuf },
    /// Writing the manifest to its destination failed.
    #[error("writing manifest: {0}")]
    Write(#[source] io::Error),
}

/// A parsed manifest: relative path (raw bytes) -> digest, in insertion order.
///
/// Laid out for 200,000-line manifests: every path lives in one byte arena and every digest
/// in one vector, so an entry costs its path length plus about 45 bytes, with no allocation
/// of its own. The index is keyed with a per-instance [`RandomState`] because uploaders
/// choose the paths: a fixed hash would let them make every lookup collide.
pub struct Entries {
    /// All paths, back to back.
    arena: Vec<u8>,
    /// Where each path starts in `arena`; it ends where the next one starts.
    starts: Vec<u32>,
    /// The digest of each entry.
    digests: Vec<Digest>,
    /// One bit per entry: set once taken or removed.
    taken: Vec<u64>,
    /// Indexes of the live entries, by path. Taken entries leave it, so a lookup never has
    /// to consult `taken`.
    index: HashTable<u32>,
    /// Hashes the paths for `index`.
    state: RandomState,
    /// Entries not taken or removed.
    live: usize,
}

impl Entries {
    /// An empty manifest; allocates nothing until the first insert.
    pub fn new() -> Entries {
        Entries {
            arena: Vec::new(),
            starts: Vec::new(),
            digests: Vec::new(),
            taken: Vec::new(),
            index: HashTable::new(),
            state: RandomState::new(),
            live: 0,
        }
    }

    /// The number of entries not yet taken or removed.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether every entry has been taken or removed (or none was inserted).
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Adds `path` -> `digest`; `false` (and no change) if `path` is already listed, or if the
    /// entries would pass 4 GiB of path bytes or `u32::MAX` entries, which a parsed manifest
    /// cannot (see [`MAX_MANIFEST_BYTES`]). A taken or removed path is no longer listed, so
    /// inserting it again adds a new entry at the end.
    pub fn insert(&mut self, path: &[u8], digest: Digest) -> bool {
        let hash = self.state.hash_one(path);
        let (arena, starts) = (&self.arena, &self.starts);
        if self
            .index
            .find(hash, |&i| path_at(arena, starts, i) == path)
            .is_some()
        {
            return false;
        }
        let (Ok(start), Ok(_end), Ok(idx)) = (
            u32::try_from(self.arena.len()),
            u32::try_from(self.arena.len() + path.len()),
            u32::try_from(self.starts.len()),
        ) else {
            return false;
        };
        self.arena.extend_from_slice(path);
        self.starts.push(start);
        self.digests.push(digest);
        if self.taken.len() * 64 <= idx as usize {
            self.taken.push(0);
        }
        let (arena, starts, state) = (&self.arena, &self.starts, &self.state);
        self.index
            .insert_unique(hash, idx, |&i| state.hash_one(path_at(arena, starts, i)));
        self.live += 1;
        true
    }

    /// The digest listed for `path`; `None` if absent, taken or removed.
    pub fn get(&self, path: &[u8]) -> Option<Digest> {
        self.find(path)
            .and_then(|i| self.digests.get(i as usize).copied())
    }

    /// Whether `path` is listed and not yet taken or removed.
    pub fn contains(&self, path: &[u8]) -> bool {
        self.find(path).is_some()
    }

    /// Whether the manifest vouches for the entry `path` of the upload: lists it (a file),
    /// or, for a directory (`is_dir`), lists a live path under it. How a name that looks
    /// like an upload's temporary one (rsync's `.~tmp~/`) is told to be part of the build.
    /// A directory costs a scan of the entries; only such names are asked about.
    pub fn vouches_for(&self, path: &[u8], is_dir: bool) -> bool {
        self.contains(path)
            || (is_dir
                && self.iter().any(|(p, _)| {
                    p.len() > path.len() && p.starts_with(path) && p[path.len()] == b'/'
                }))
    }

    /// Marks `path` as taken and returns its digest; its bytes stay allocated until drop.
    pub fn take(&mut self, path: &[u8]) -> Option<Digest> {
        let hash = self.state.hash_one(path);
        let (arena, starts) = (&self.arena, &self.starts);
        let found = self
            .index
            .find_entry(hash, |&i| path_at(arena, starts, i) == path)
            .ok()?;
        let (i, _) = found.remove();
        let i = i as usize;
        if let Some(word) = self.taken.get_mut(i / 64) {
            *word |= 1 << (i % 64);
        }
        self.live -= 1;
        self.digests.get(i).copied()
    }

    /// Same as [`Entries::take`].
    pub fn remove(&mut self, path: &[u8]) -> Option<Digest> {
        self.take(path)
    }

    /// The live entries, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Digest)> + '_ {
        self.digests
            .iter()
            .enumerate()
            .filter(|&(i, _)| !self.is_taken(i))
            .map(|(i, &d)| (path_at(&self.arena, &self.starts, i as u32), d))
    }

    /// Gives back the slack left by growth; the parse functions call it when done.
    pub fn shrink(&mut self) {
        self.arena.shrink_to_fit();
        self.starts.shrink_to_fit();
        self.digests.shrink_to_fit();
        self.taken.shrink_to_fit();
        let (arena, starts, state) = (&self.arena, &self.starts, &self.state);
        self.index
            .shrink_to_fit(|&i| state.hash_one(path_at(arena, starts, i)));
    }

    /// Bytes allocated on the heap, slack included.
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity()
            + self.starts.capacity() * std::mem::size_of::<u32>()
            + self.digests.capacity() * std::mem::size_of::<Digest>()
            + self.taken.capacity() * std::mem::size_of::<u64>()
            + self.index.allocation_size()
    }

    /// The live entries as an ordered map, for tests and debugging.
    pub fn to_map(&self) -> BTreeMap<PathBuf, Digest> {
        self.iter()
            .map(|(p, d)| (PathBuf::from(OsStr::from_bytes(p)), d))
            .collect()
    }

    fn find(&self, path: &[u8]) -> Option<u32> {
        let hash = self.state.hash_one(path);
        self.index
            .find(hash, |&i| path_at(&self.arena, &self.starts, i) == path)
            .copied()
    }

    fn is_taken(&self, i: usize) -> bool {
        self.taken
            .get(i / 64)
            .is_some_and(|word| word & (1 << (i % 64)) != 0)
    }
}

/// The path of entry `i`. Out-of-range indexes cannot occur (the index only holds pushed
/// ones); they give an empty path rather than a panic.
fn path_at<'a>(arena: &'a [u8], starts: &[u32], i: u32) -> &'a [u8] {
    let i = i as usize;
    let start = starts.get(i).map_or(arena.len(), |&s| s as usize);
    let end = starts.get(i + 1).map_or(arena.len(), |&s| s as usize);
    arena.get(start..end).unwrap_or_default()
}

impl Default for Entries {
    fn default() -> Entries {
        Entries::new()
    }
}

impl fmt::Debug for Entries {
    // 200,000 entries in a log line would help nobody.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entries")
            .field("len", &self.live)
            .finish_non_exhaustive()
    }
}

/// Keeps the first digest of a path listed twice, like [`Entries::insert`].
impl<P: AsRef<OsStr>> FromIterator<(P, Digest)> for Entries {
    fn from_iter<I: IntoIterator<Item = (P, Digest)>>(iter: I) -> Entries {
        let mut entries = Entries::new();
        for (path, digest) in iter {
            entries.insert(path.as_ref().as_bytes(), digest);
        }
        entries.shrink();
        entries
    }
}

/// Parses a GNU or BSD-tag SHA-256 manifest into path -> digest entries.
pub fn parse(bytes: &[u8]) -> Result<Entries, ManifestError> {
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            limit: MAX_MANIFEST_BYTES,
        });
    }
    let mut entries = Entries::new();
    let zero = zero_terminated(bytes);
    for (idx, raw) in bytes.split(|&b| b == delimiter(zero)).enumerate() {
        let line = idx + 1;
        let Some((name, digest)) = parse_line(raw, line, zero)? else {
            continue;
        };
        if !entries.insert(&name, digest) && entries.get(&name) != Some(digest) {
            // Only on this error path is the first line looked up again, so a 200,000-line
            // manifest is held once, not twice.
            let first = first_line_of(bytes, zero, &name, line);
            let path = lossy(&name);
            return Err(ManifestError::Duplicate { line, path, first });
        }
    }
    entries.shrink();
    Ok(entries)
}

/// Like `parse`, reading line by line from `r` (named `path` in errors), so a 200,000-line
/// manifest is never held whole beside its parsed form; also returns the SHA-256 of the
/// bytes read. A duplicate reports line 0 as its first line: callers that want it exact
/// re-run `parse` on that error path.
pub fn parse_reader(
    mut r: impl io::BufRead,
    path: &Path,
) -> Result<(Entries, Digest), ManifestError> {
    let mut entries = Entries::new();
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut buf = Vec::with_capacity(256);
    let mut line = 0;
    let io_err = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    // The first buffer holds at least the first line, whose end tells the format.
    let zero = zero_terminated(r.fill_buf().map_err(io_err)?);
    let delim = delimiter(zero);
    loop {
        buf.clear();
        let n = r
            .read_until(delim, &mut buf)
            .map_err(|source| ManifestError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                limit: MAX_MANIFEST_BYTES,
            });
        }
        hasher.update(&buf);
        line += 1;
        let raw = buf.strip_suffix(&[delim]).unwrap_or(&buf);
        let Some((name, digest)) = parse_line(raw, line, zero)? else {
            continue;
        };
        if !entries.insert(&name, digest) && entries.get(&name) != Some(digest) {
            return Err(ManifestError::Duplicate {
                line,
                path: lossy(&name),
                first: 0,
            });
        }
    }
    entries.shrink();
    Ok((entries, hasher.finalize().into()))
}

/// Whether `head`, the start of a manifest, is `sha256sum -z` output: its first line ends
/// with NUL rather than LF.
fn zero_terminated(head: &[u8]) -> bool {
    head.iter()
        .find(|&&b| b == 0 || b == b'\n')
        .is_some_and(|&b| b == 0)
}

/// What ends a line: NUL in `sha256sum -z` output (`zero`), else LF.
fn delimiter(zero: bool) -> u8 {
    if zero {
        0
    } else {
        b'\n'
    }
}

/// The first line before `before` that lists `path`.
fn first_line_of(bytes: &[u8], zero: bool, path: &[u8], before: usize) -> usize {
    bytes
        .split(|&b| b == delimiter(zero))
        .enumerate()
        .take(before - 1)
        .find_map(|(idx, raw)| match parse_line(raw, idx + 1, zero) {
            Ok(Some((name, _))) if *name == *path => Some(idx + 1),
            _ => None,
        })
        .unwrap_or(before)
}

/// One parsed manifest line: the clean path (borrowed from the line unless it was escaped)
/// and its digest.
type Line<'a> = (Cow<'a, [u8]>, Digest);

/// Parses one line (without its LF, or its NUL when `zero`): `None` for blank and comment
/// lines.
fn parse_line(raw: &[u8], line: usize, zero: bool) -> Result<Option<Line<'_>>, ManifestError> {
    let raw = match line {
        1 => raw.strip_prefix(BOM).unwrap_or(raw),
        _ => raw,
    };
    // `-z` output holds names raw: a CR there ends a name, not a line.
    let raw = match zero {
        true => raw,
        false => raw.strip_suffix(b"\r").unwrap_or(raw),
    };
    let start = raw.iter().position(|&b| b != b' ' && b != b'\t');
    let Some(s) = start.and_then(|i| raw.get(i..)) else {
        return Ok(None);
    };
    if s.starts_with(b"#") {
        return Ok(None);
    }
    let (escaped, s) = match s.strip_prefix(b"\\") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let malformed = || ManifestError::Malformed { line };
    let (hex, name) = if let Some(rest) = s.strip_prefix(BSD_PREFIX) {
        let cut = rest.len().checked_sub(64).ok_or_else(malformed)?;
        let (name_sep, hex) = rest.split_at(cut);
        (hex, name_sep.strip_suffix(BSD_SEP).ok_or_else(malformed)?)
    } else {
        let (hex, rest) = s.split_at_checked(64).ok_or_else(malformed)?;
        // A second space or a `*` is the mode; anything else after one space starts the
        // name, as `sha256sum -c` reads such a line.
        let name = rest
            .strip_prefix(b"  ")
            .or_else(|| rest.strip_prefix(b" *"))
            .or_else(|| rest.strip_prefix(b" "));
        (hex, name.ok_or_else(malformed)?)
    };
    let digest = from_hex(hex).ok_or_else(malformed)?;
    // Borrowed unless escaped: no allocation for the usual line.
    let name: Cow<'_, [u8]> = if escaped {
        Cow::Owned(unescape(name).ok_or(ManifestError::BadEscape { line })?)
    } else {
        Cow::Borrowed(name)
    };
    match check_path(&name) {
        Ok(clean) => {
            // `clean` is a suffix of `name` (a leading `./` dropped).
            let skip = name.len() - clean.len();
            let clean = match name {
                Cow::Borrowed(all) => Cow::Borrowed(&all[skip..]),
                Cow::Owned(mut v) => {
                    v.drain(..skip);
                    Cow::Owned(v)
                }
            };
            Ok(Some((clean, digest)))
        }
        Err(reason) => Err(ManifestError::UnsafePath {
            line,
            path: lossy(&name),
            reason,
        }),
    }
}

/// Undoes `sha256sum`'s name escaping (`\\`, `\n`, `\r`); `None` on any other escape.
fn unescape(name: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len());
    let mut it = name.iter();
    while let Some(&b) = it.next() {
        out.push(match b {
            b'\\' => match it.next()? {
                b'\\' => b'\\',
                b'n' => b'\n',
                b'r' => b'\r',
                _ => return None,
            },
            other => other,
        });
    }
    Some(out)
}

/// Strips one leading `./` and checks that what remains is a plain relative path.
fn check_path(name: &[u8]) -> Result<&[u8], &'static str> {
    let p = name.strip_prefix(b"./").unwrap_or(name);
    if p.is_empty() {
        return Err("empty path");
    }
    if p.contains(&0) {
        return Err("NUL byte");
    }
    if p.starts_with(b"/") {
        // `.//a` is relative: only its `./` made it look absolute.
        return Err(if name.starts_with(b"/") {
            "absolute path"
        } else {
            "empty component"
        });
    }
    if p.ends_with(b"/") {
        return Err("trailing slash");
    }
    for comp in p.split(|&b| b == b'/') {
        match comp {
            b"" => return Err("empty component"),
            b".." => return Err("'..' component"),
            b"." => return Err("'.' component"),
            _ => {}
        }
    }
    Ok(p)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Formats one manifest line exactly as GNU `sha256sum` prints it, trailing LF included.
pub fn format_line(path: &Path, digest: &Digest) -> Vec<u8> {
    let name = path.as_os_str().as_bytes();
    let escape = name.iter().any(|&b| matches!(b, b'\\' | b'\n' | b'\r'));
    let mut out = Vec::with_capacity(name.len() + 68);
    if escape {
        out.push(b'\\');
    }
    out.extend_from_slice(to_hex(digest).as_bytes());
    out.extend_from_slice(b"  ");
    for &b in name {
        match b {
            b'\\' if escape => out.extend_from_slice(b"\\\\"),
            b'\n' if escape => out.extend_from_slice(b"\\n"),
            b'\r' if escape => out.extend_from_slice(b"\\r"),
            other => out.push(other),
        }
    }
    out.push(b'\n');
    out
}

/// Lower-case hex of a digest.
pub fn to_hex(d: &Digest) -> String {
    let mut s = Vec::with_capacity(64);
    push_hex(&mut s, d);
    String::from_utf8(s).unwrap_or_default()
}

/// Appends the lower-case hex of `d` to `out` (no allocation: for lines written per file).
pub fn push_hex(out: &mut Vec<u8>, d: &Digest) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in d {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

/// Decodes exactly 64 hex digits (either case) into a digest.
pub fn from_hex(s: &[u8]) -> Option<Digest> {
    // Value of each byte as a hex digit, 0xff for none: a table lookup per digit, as
    // every line of every manifest goes through here.
    const NIBBLE: [u8; 256] = {
        let mut t = [0xffu8; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            t[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    if s.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    let mut bad = 0u8;
    for (out, pair) in d.iter_mut().zip(s.chunks_exact(2)) {
        let (hi, lo) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
        bad |= hi | lo;
        *out = hi << 4 | (lo & 0x0f);
    }
    // Digits are below 16; 0xff from any non-digit sets the high bits.
    (bad < 16).then_some(d)
}

/// Hashes everything `r` yields; returns the digest and the byte count.
pub fn hash_reader(r: &mut impl Read) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = buf
            .get(..n)
            .ok_or_else(|| io::Error::other("reader overran its buffer"))?;
        hasher.update(chunk);
        total += n as u64;
    }
    Ok((hasher.finalize().into(), total))
}

/// Writes a manifest of every regular file under `dir` (recursively, not following symlinks), sorted by path bytes,
/// excluding the paths (relative to `dir`) in `exclude`: the caller passes the manifest name and the marker
/// name, and the output file's own path when it lies inside `dir` (its stale hash would be listed otherwise).
/// Hashes with `threads` worker threads (std::thread::scope; bounded work queue; deterministic output order).
/// Symlinks and directories are skipped (not listed); fifos/sockets/devices are an error naming the path.
/// Returns the number of files listed and the symlinks skipped.
pub fn write_for_dir(
    dir: &Path,
    exclude: &[&Path],
    out: &mut dyn Write,
    threads: usize,
) -> Result<Written, ManifestError> {
    let (files, links) = collect_files(dir, exclude)?;
    let digests = hash_all(dir, &files, threads)?;
    let mut w = io::BufWriter::new(out);
    for (path, digest) in files.iter().zip(&digests) {
        w.write_all(&format_line(path, digest))
            .map_err(ManifestError::Write)?;
    }
    w.flush().map_err(ManifestError::Write)?;
    Ok(Written {
        files: files.len(),
        links,
    })
}

/// What [`write_for_dir`] did.
#[derive(Debug)]
pub struct Written {
    /// Regular files listed.
    pub files: usize,
    /// Symlinks found (relative path, target), sorted by path: not listed, but the caller
    /// can tell whether the keeper would keep them.
    pub links: Vec<(PathBuf, PathBuf)>,
}

/// Relative paths of the regular files under `dir`, and its symlinks with their targets,
/// each sorted by bytes.
type Collected = (Vec<PathBuf>, Vec<(PathBuf, PathBuf)>);

fn collect_files(dir: &Path, exclude: &[&Path]) -> Result<Collected, ManifestError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ManifestError::Io { path, source }
    };
    let mut files = Vec::new();
    let mut links = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let abs = if rel.as_os_str().is_empty() {
            dir.to_path_buf()
        } else {
            dir.join(&rel)
        };
        for entry in fs::read_dir(&abs).map_err(io_err(&abs))? {
            let entry = entry.map_err(io_err(&abs))?;
            let name = entry.file_name();
            if exclude.iter().any(|x| {
                x.parent() == Some(rel.as_path()) && x.file_name() == Some(name.as_os_str())
            }) {
                continue;
            }
            let kind = entry.file_type().map_err(io_err(&entry.path()))?;
            if kind.is_file() {
                files.push(rel.join(name));
            } else if kind.is_dir() {
                pending.push(rel.join(name));
            } else if kind.is_symlink() {
                let target = fs::read_link(entry.path()).map_err(io_err(&entry.path()))?;
                links.push((rel.join(name), target));
            } else {
                return Err(ManifestError::SpecialFile { path: entry.path() });
            }
        }
    }
    files.sort_unstable_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    links.sort_unstable_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    Ok((files, links))
}

/// Hashes `files` (relative to `dir`) on `threads` workers fed through a bounded queue.
/// On failure, reports the failing file with the lowest index, so errors are deterministic too.
fn hash_all(dir: &Path, files: &[PathBuf], threads: usize) -> Result<Vec<Digest>, ManifestError> {
    let threads = threads.clamp(1, files.len().max(1));
    let (job_tx, job_rx) = mpsc::sync_channel::<usize>(threads * 2);
    // Shared by the workers only: when the last one exits, the queue closes and the feeder stops.
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (res_tx, res_rx) = mpsc::channel::<(usize, io::Result<Digest>)>();
    let cancel = AtomicBool::new(false);
    let mut slots: Vec<Option<Digest>> = vec![None; files.len()];
    let mut failure: Option<(usize, io::Error)> = None;
    std::thread::scope(|s| {
        let cancel = &cancel;
        s.spawn(move || {
            for i in 0..files.len() {
                if cancel.load(Ordering::Relaxed) || job_tx.send(i).is_err() {
                    break;
                }
            }
        });
        for _ in 0..threads {
            let (rx, tx) = (Arc::clone(&job_rx), res_tx.clone());
            s.spawn(move || {
                // A job once received is always finished, so every index below a failing one
                // gets its result delivered before the workers stop.
                while !cancel.load(Ordering::Relaxed) {
                    let job = match rx.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => break,
                    };
                    let Ok(i) = job else { break };
                    if tx.send((i, hash_file(&dir.join(&files[i])))).is_err() {
                        break;
                    }
                }
            });
        }
        drop((job_rx, res_tx));
        for (i, result) in res_rx {
            match result {
                Ok(digest) => slots[i] = Some(digest),
                Err(e) => {
                    cancel.store(true, Ordering::Relaxed);
                    if failure.as_ref().is_none_or(|(j, _)| i < *j) {
                        failure = Some((i, e));
                    }
                }
            }
        }
    });
    if let Some((i, source)) = failure {
        return Err(ManifestError::Io {
            path: dir.join(&files[i]),
            source,
        });
    }
    let digests: Option<Vec<Digest>> = slots.into_iter().collect();
    digests.ok_or_else(|| ManifestError::Io {
        path: dir.to_path_buf(),
        source: io::Error::other("a file was left unhashed"),
    })
}

fn hash_file(path: &Path) -> io::Result<Digest> {
    Ok(hash_reader(&mut fs::File::open(path)?)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reader_agrees_with_parse_and_hashes_the_bytes() {
        let text = b"\\0000000000000000000000000000000000000000000000000000000000000000  a\\\\b\n\
SHA256 (c d) = 1111111111111111111111111111111111111111111111111111111111111111\n\
\n2222222222222222222222222222222222222222222222222222222222222222 *./e/f";
        let (entries, digest) = parse_reader(&text[..], Path::new("SHA256SUMS")).unwrap();
        assert_eq!(entries.to_map(), parse(text).unwrap().to_map());
        let want: Digest = Sha256::digest(text).into();
        assert_eq!(digest, want);
        let dup = b"0000000000000000000000000000000000000000000000000000000000000000  x\n\
1111111111111111111111111111111111111111111111111111111111111111  x\n";
        assert!(matches!(
            parse_reader(&dup[..], Path::new("S")),
            Err(ManifestError::Duplicate { line: 2, .. })
        ));
    }

    fn digest_of(i: usize) -> Digest {
        Sha256::digest(i.to_le_bytes()).into()
    }

    #[test]
    fn entries_insert_get_take_len_iter() {
        let mut m = Entries::default();
        assert!(m.is_empty() && m.iter().next().is_none());
        for (i, name) in [&b"z/late"[..], b"a", b"m/mid"].into_iter().enumerate() {
            assert!(m.insert(name, digest_of(i)));
        }
        assert_eq!(
            (m.len(), m.get(b"a"), m.get(b"nope")),
            (3, Some(digest_of(1)), None)
        );
        assert!(m.contains(b"m/mid") && !m.contains(b"m") && !m.contains(b"m/mid/"));
        assert_eq!(m.take(b"a"), Some(digest_of(1)));
        assert_eq!(
            (m.take(b"a"), m.get(b"a"), m.contains(b"a")),
            (None, None, false)
        );
        assert_eq!(m.remove(b"z/late"), Some(digest_of(0)));
        assert_eq!(m.len(), 1);
        // Insertion order, not sorted; a taken path comes back as a new, last entry.
        assert!(m.insert(b"a", digest_of(7)));
        let got: Vec<_> = m.iter().collect();
        assert_eq!(got, [(&b"m/mid"[..], digest_of(2)), (b"a", digest_of(7))]);
        assert_eq!(format!("{m:?}"), "Entries { len: 2, .. }");
        assert_eq!(
            (m.take(b"m/mid"), m.take(b"a"), m.is_empty()),
            (Some(digest_of(2)), Some(digest_of(7)), true)
        );
        assert!(m.iter().next().is_none());
    }

    #[test]
    fn entries_duplicate_insert_changes_nothing() {
        let mut m = Entries::new();
        assert!(m.insert(b"x/y", digest_of(1)));
        let before = m.heap_bytes();
        assert!(!m.insert(b"x/y", digest_of(2)));
        assert_eq!(
            (m.len(), m.get(b"x/y"), m.heap_bytes()),
            (1, Some(digest_of(1)), before)
        );
        let m: Entries = [
            ("p", digest_of(1)),
            ("q", digest_of(2)),
            ("p", digest_of(3)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            [(&b"p"[..], digest_of(1)), (b"q", digest_of(2))]
        );
    }

    #[test]
    fn entries_hold_non_utf8_paths() {
        let names: [&[u8]; 5] = [
            b"bad\xff\xfe",
            b"caf\xc3\xa9",
            b"cafe\xcc\x81",
            b"a\nb\\c",
            b"bad\xff",
        ];
        let mut m = Entries::new();
        for (i, name) in names.iter().enumerate() {
            assert!(m.insert(name, digest_of(i)));
        }
        for (i, name) in names.iter().enumerate() {
            assert_eq!(m.get(name), Some(digest_of(i)), "{}", lossy(name));
        }
        let map = m.to_map();
        assert_eq!(map.len(), 5);
        assert_eq!(map.get(&p(b"bad\xff\xfe")), Some(&digest_of(0)));
        let text: Vec<u8> = names
            .iter()
            .enumerate()
            .flat_map(|(i, n)| format_line(&p(n), &digest_of(i)))
            .collect();
        assert_eq!(parse(&text).unwrap().to_map(), map);
    }

    #[test]
    fn entries_keys_are_random_per_instance() {
        let (a, b) = (Entries::new(), Entries::new());
        assert_ne!(
            a.state.hash_one(b"same/path"),
            b.state.hash_one(b"same/path")
        );
    }

    #[test]
    fn entries_take_across_bitset_words() {
        let name = |i: usize| format!("f{i}").into_bytes();
        let mut m: Entries = (0..300).map(|i| (format!("f{i}"), digest_of(i))).collect();
        for i in (0..300).step_by(3) {
            assert_eq!(m.take(&name(i)), Some(digest_of(i)));
        }
        let want: Vec<_> = (0..300)
            .filter(|i| i % 3 != 0)
            .map(|i| (name(i), digest_of(i)))
            .collect();
        let got: Vec<_> = m.iter().map(|(p, d)| (p.to_vec(), d)).collect();
        assert_eq!((m.len(), got), (200, want));
    }

    /// A release of 200,000 files must finalize in little memory: the manifest may cost its
    /// path bytes plus a small fixed amount per entry, slack included.
    #[test]
    fn entries_memory_for_200k_paths() {
        const N: usize = 200_000;
        let name = |i: usize| {
            format!(
                "app/d{:05}/d{:05}/d{:05}/f{i:06}.png",
                i % 97,
                i % 1009,
                i / 7
            )
        };
        let mut m = Entries::new();
        let mut path_bytes = 0;
        let mut text = Vec::new();
        for i in 0..N {
            let n = name(i);
            path_bytes += n.len();
            assert!(m.insert(n.as_bytes(), digest_of(i)));
            text.extend(format_line(&p(n.as_bytes()), &digest_of(i)));
        }
        m.shrink();
        let shrunk = m.heap_bytes();
        let parsed = parse(&text).unwrap();
        let (read, _) = parse_reader(&text[..], Path::new("S")).unwrap();
        eprintln!(
            "200k entries: {path_bytes} path bytes; heap_bytes {shrunk} (insert+shrink), {} (parse), \
             {} (parse_reader): {:.1} bytes per entry beyond the path",
            parsed.heap_bytes(),
            read.heap_bytes(),
            (shrunk - path_bytes) as f64 / N as f64
        );
        for (entries, heap) in [
            (&m, shrunk),
            (&parsed, parsed.heap_bytes()),
            (&read, read.heap_bytes()),
        ] {
            assert_eq!(entries.len(), N);
            assert!(heap < path_bytes + N * 64, "{heap}");
            assert!(heap < path_bytes + N * 48, "{heap}");
        }
        for i in (0..N).step_by(997) {
            assert_eq!(parsed.get(name(i).as_bytes()), Some(digest_of(i)));
        }
    }
    use proptest::prelude::*;
    use std::process::Command;

    const A: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"; // sha256("abc")
    const E: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"; // sha256("")

    fn p(bytes: &[u8]) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(bytes))
    }

    fn d(hex: &str) -> Digest {
        from_hex(hex.as_bytes()).unwrap()
    }

    fn err(input: &str) -> String {
        err_bytes(input.as_bytes())
    }

    fn err_bytes(input: &[u8]) -> String {
        parse(input).unwrap_err().to_string()
    }

    /// Byte equality, with a readable diff on failure.
    fn assert_same(ours: &[u8], theirs: &[u8]) {
        let lossy = String::from_utf8_lossy;
        assert_eq!(lossy(ours), lossy(theirs));
        assert_eq!(ours, theirs);
    }

    #[test]
    fn accepted_forms() {
        let text = format!(
            "{A}  a.txt\n{E} *dir/b c.bin\n\\{A}  a\\\\b\\nc\\rd\n{A}  lit\\n\n\
             SHA256 (x) = y) = {A}\n\\SHA256 (e\\nf\\\\g) = {E}\n"
        );
        let want = [
            (&b"a.txt"[..], A),
            (b"dir/b c.bin", E),
            (b"a\\b\nc\rd", A), // escaped GNU
            (b"lit\\n", A),     // no leading backslash: the name is literal
            (b"x) = y", A),     // BSD: the name ends at the last ") = "
            (b"e\nf\\g", E),    // escaped BSD
        ];
        let want: BTreeMap<_, _> = want.iter().map(|(n, h)| (p(n), d(h))).collect();
        assert_eq!(parse(text.as_bytes()).unwrap().to_map(), want);
    }

    #[test]
    fn tolerated_layout() {
        let upper = A.to_uppercase();
        let text = format!(
            "\n# made by hand\r\n  {upper}  ./a\r\n\t\r\n{E}  b\\\\x\r\n\\{E}  c\\r\r\n{E}  last"
        );
        let m = parse(text.as_bytes()).unwrap();
        assert_eq!(m.get(b"a"), Some(d(A)));
        assert_eq!(m.get(b"b\\\\x"), Some(d(E)));
        assert_eq!(m.get(b"c\r"), Some(d(E)));
        assert_eq!(m.get(b"last"), Some(d(E)));
        assert_eq!(m.len(), 4);
        assert!(parse(b"").unwrap().is_empty());
    }

    #[test]
    fn a_line_with_one_space_is_read_as_sha256sum_reads_it() {
        let text = format!("{A} one\n{E}   spaced\n{A} *bin\n");
        let m = parse(text.as_bytes()).unwrap();
        assert_eq!(m.get(b"one"), Some(d(A)));
        // The second space is the mode, the third starts the name (` spaced`).
        assert_eq!(m.get(b" spaced"), Some(d(E)));
        assert_eq!(m.get(b"bin"), Some(d(A)));
        assert_eq!(m.len(), 3);
        assert!(err(&format!("{A} \n")).starts_with("line 1:"));
    }

    #[test]
    fn malformed_lines_name_their_line() {
        for bad in [
            format!("{A}\ta"),                   // tab
            format!("{}  a", &A[..63]),          // short hex
            format!("{A}{A}  a"),                // sha512 length
            format!("{}g  a", &A[..63]),         // non-hex digit
            format!("SHA256 (a) {A}"),           // missing '='
            format!("SHA256 (a) = {}", &A[1..]), // short hex
            format!("SHA512 (a) = {A}"),
            "garbage".to_string(),
            format!("\\{A}"),
        ] {
            let msg = err(&format!("{A}  ok\n\n{bad}\n"));
            assert!(
                msg.starts_with("line 3: malformed line (expected"),
                "{bad:?}: {msg}"
            );
        }
    }

    #[test]
    fn unsafe_paths_are_rejected() {
        for (name, reason) in [
            ("../etc/passwd", "'..' component"),
            ("a/../../b", "'..' component"),
            ("/etc/passwd", "absolute path"),
            ("a//b", "empty component"),
            (".//a", "empty component"),
            ("./", "empty path"),
            ("a/./b", "'.' component"),
            ("././a", "'.' component"),
            (".", "'.' component"),
            ("a/", "trailing slash"),
            ("a\0b", "NUL byte"),
        ] {
            let msg = err(&format!("{E}  fine\n{A}  {name}\n"));
            assert_eq!(msg, format!("line 2: unsafe path {name:?}: {reason}"));
        }
        assert_eq!(
            err(&format!("{A}  ")),
            "line 1: unsafe path \"\": empty path"
        );
        let msg = err(&format!("\\SHA256 (/x\\\\) = {A}"));
        assert_eq!(msg, "line 1: unsafe path \"/x\\\\\": absolute path");
    }

    #[test]
    fn duplicates_name_both_lines() {
        let msg = err(&format!("{A}  a/b.txt\n{E}  c\n{E}  ./a/b.txt\n"));
        assert_eq!(
            msg,
            "line 3: duplicate entry \"a/b.txt\" with another hash (first on line 1)"
        );
        let msg = err(&format!("{A}  x\nSHA256 (x) = {E}\n"));
        assert_eq!(
            msg,
            "line 2: duplicate entry \"x\" with another hash (first on line 1)"
        );
    }

    /// `sha256sum -c` passes a path listed twice with one digest (two manifests
    /// concatenated, or `sha256sum a b a`): nothing is ambiguous, so it is not refused.
    #[test]
    fn a_path_listed_twice_with_the_same_hash_is_one_entry() {
        let text = format!("{A}  x\n{E}  y\nSHA256 (./x) = {}\n", A.to_uppercase());
        let parsed = parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed.get(b"x"), Some(d(A)));
        let (streamed, _) = parse_reader(text.as_bytes(), Path::new("S")).unwrap();
        assert_eq!(streamed.to_map(), parsed.to_map());
    }

    /// A manifest saved by a Windows editor starts with a UTF-8 byte-order mark.
    #[test]
    fn a_byte_order_mark_before_the_first_line_is_ignored() {
        for text in [
            format!("\u{feff}{A}  x\r\n{E}  y\r\n"),
            format!("\u{feff}SHA256 (x) = {A}\n{E}  y\n"),
            format!("\u{feff}\\{A}  x\n{E}  y\n"),
        ] {
            let parsed = parse(text.as_bytes()).unwrap();
            assert_eq!(parsed.get(b"x"), Some(d(A)), "{text:?}");
            let (streamed, _) = parse_reader(text.as_bytes(), Path::new("S")).unwrap();
            assert_eq!(streamed.to_map(), parsed.to_map());
        }
        // Only before the first line: elsewhere it is as malformed as any other byte.
        let msg = err(&format!("{A}  x\n\u{feff}{E}  y\n"));
        assert!(msg.starts_with("line 2: malformed line"), "{msg}");
    }

    /// `sha256sum -z` ends each line with NUL and never escapes names: a newline, CR or
    /// backslash in a name is the name's own byte.
    #[test]
    fn sha256sum_z_output_is_read_with_raw_names() {
        let names: [&[u8]; 5] = [b"plain", b"new\nline", b"cr\r", b"back\\slash", b"./dot"];
        let mut text = Vec::new();
        for (i, n) in names.iter().enumerate() {
            if i == 2 {
                text.extend_from_slice(
                    format!("SHA256 ({}) = {A}", String::from_utf8_lossy(n)).as_bytes(),
                );
            } else {
                text.extend_from_slice(format!("{A}  ").as_bytes());
                text.extend_from_slice(n);
            }
            text.push(0);
        }
        let parsed = parse(&text).unwrap();
        let want: Vec<&[u8]> = vec![b"plain", b"new\nline", b"cr\r", b"back\\slash", b"dot"];
        assert_eq!(parsed.len(), want.len());
        for n in want {
            assert_eq!(parsed.get(n), Some(d(A)), "{}", lossy(n));
        }
        let (streamed, _) = parse_reader(&text[..], Path::new("S")).unwrap();
        assert_eq!(streamed.to_map(), parsed.to_map());
        let mut dup = text.clone();
        dup.extend_from_slice(format!("{E}  plain\0").as_bytes());
        assert_eq!(
            err_bytes(&dup),
            "line 6: duplicate entry \"plain\" with another hash (first on line 1)"
        );
    }

    #[test]
    fn bad_escapes() {
        for name in ["a\\tb", "a\\", "\\x"] {
            assert_eq!(
                err(&format!("{E}  ok\n\\{A}  {name}\n")),
                "line 2: bad escape in name"
            );
        }
    }

    #[test]
    fn oversized_manifest() {
        let big = vec![b'x'; MAX_MANIFEST_BYTES as usize + 1];
        let msg = parse(&big).unwrap_err().to_string();
        assert_eq!(msg, "manifest is larger than 67108864 bytes");
        // At the limit the content is looked at (and here found malformed).
        assert!(err_bytes(&big[1..]).starts_with("line 1: malformed line"));
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        assert_eq!(to_hex(&d(A)), A);
        assert_eq!(from_hex(A.to_uppercase().as_bytes()), Some(d(A)));
        assert_eq!(from_hex(&A.as_bytes()[1..]), None);
        assert_eq!(from_hex(format!("{A}0").as_bytes()), None);
        assert_eq!(from_hex(format!("{}é", &A[..62]).as_bytes()), None);
        assert_eq!(from_hex(format!("{} ", &A[..63]).as_bytes()), None);
        assert_eq!(from_hex(format!("+{}", &A[..63]).as_bytes()), None);
    }

    #[test]
    fn hash_reader_digests_and_counts() {
        assert_eq!(hash_reader(&mut &b""[..]).unwrap(), (d(E), 0));
        assert_eq!(hash_reader(&mut &b"abc"[..]).unwrap(), (d(A), 3));
        let big = vec![7u8; 3 * BUF_SIZE + 5];
        let (digest, n) = hash_reader(&mut &big[..]).unwrap();
        assert_eq!((digest, n), (Sha256::digest(&big).into(), big.len() as u64));
    }

    #[test]
    fn format_line_escapes_like_sha256sum() {
        assert_eq!(
            format_line(&p(b"a b"), &d(A)),
            format!("{A}  a b\n").into_bytes()
        );
        assert_eq!(
            format_line(&p(b"a\\b\n\r"), &d(A)),
            format!("\\{A}  a\\\\b\\n\\r\n").into_bytes()
        );
    }

    fn component() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            any::<u8>().prop_filter("no / or NUL", |b| *b != b'/' && *b != 0),
            1..40,
        )
        .prop_filter("not . or ..", |c| c != b"." && c != b"..")
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(comps in proptest::collection::vec(component(), 1..4), digest in any::<[u8; 32]>()) {
            let path = p(&comps.join(&b'/'));
            let line = format_line(&path, &digest);
            let m = parse(&line).unwrap();
            prop_assert_eq!(m.len(), 1);
            prop_assert_eq!(m.get(path.as_os_str().as_bytes()), Some(digest));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_near_misses(
            parts in proptest::collection::vec(
                prop_oneof![Just(A.as_bytes().to_vec()), Just(b"\\".to_vec()), Just(b"SHA256 (".to_vec()),
                            Just(b") = ".to_vec()), Just(b"  ".to_vec()), Just(b" *".to_vec()), Just(b"\r\n".to_vec()),
                            Just(b"\n".to_vec()), Just(b"./".to_vec()), Just(b"/".to_vec()), Just(b"..".to_vec()),
                            proptest::collection::vec(any::<u8>(), 0..4)],
                0..12)
        ) {
            let _ = parse(&parts.concat());
        }
    }

    /// Names `sha256sum` escapes or might mangle, some nested, plus two very long ones.
    fn awkward_names() -> Vec<Vec<u8>> {
        let short = b"back\\slash|new\nline|cr\rname|\\\n\r mixed\\|sp ace  double | leading|-dash|*star\
                      |#hash|(paren) = x|bad\xffutf8\xfe|caf\xc3\xa9|sub/inner file|sub/deeper/x\\y";
        let mut names: Vec<Vec<u8>> = short.split(|&b| b == b'|').map(<[u8]>::to_vec).collect();
        names.push(vec![b'L'; 255]);
        names.push([&[b'd'; 200][..], b"/", &[b'e'; 200], b"/f\\"].concat());
        names
    }

    /// Creates `names` (relative, possibly nested) under `dir`, each holding its own name.
    fn populate(dir: &Path, names: &[Vec<u8>]) {
        for name in names {
            let path = dir.join(OsStr::from_bytes(name));
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, name).unwrap();
        }
    }

    #[test]
    fn matches_real_sha256sum() {
        let tmp = tempfile::tempdir().unwrap();
        let names = awkward_names();
        populate(tmp.path(), &names);
        let run = |tag: bool| {
            let mut cmd = Command::new("/usr/bin/sha256sum");
            cmd.current_dir(tmp.path()).env("LC_ALL", "C");
            if tag {
                cmd.arg("--tag");
            }
            let out = cmd
                .arg("--")
                .args(names.iter().map(|n| OsStr::from_bytes(n)))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        let gnu = run(false);
        let mut ours = Vec::new();
        let mut expected = BTreeMap::new();
        for name in &names {
            let digest = Sha256::digest(name).into();
            ours.extend(format_line(&p(name), &digest));
            expected.insert(p(name), digest);
        }
        assert_same(&ours, &gnu);
        assert_eq!(parse(&gnu).unwrap().to_map(), expected);
        assert_eq!(parse(&run(true)).unwrap().to_map(), expected);
    }

    fn write_to_vec(dir: &Path, threads: usize) -> Result<(usize, Vec<u8>), ManifestError> {
        let mut out = Vec::new();
        let excludes = [Path::new("SHA256SUMS"), Path::new(".release-ready")];
        let n = write_for_dir(dir, &excludes, &mut out, threads)?.files;
        Ok((n, out))
    }

    #[test]
    fn write_for_dir_matches_find_sort_sha256sum() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut names = awkward_names();
        let more = b"SHA256SUMS|.release-ready|sub/SHA256SUMS|a-b|a/b|a.b|empty";
        names.extend(more.split(|&b| b == b'|').map(<[u8]>::to_vec));
        populate(dir, &names);
        fs::write(dir.join("empty"), b"").unwrap();
        fs::create_dir_all(dir.join("only/dirs/here")).unwrap();
        std::os::unix::fs::symlink("a-b", dir.join("link-to-file")).unwrap();
        std::os::unix::fs::symlink("sub", dir.join("sub/link-to-dir")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.join("dangling")).unwrap();
        let script =
            "find . -type f ! -path ./SHA256SUMS ! -path ./.release-ready -printf '%P\\0' \
                      | sort -z | xargs -0 -r sha256sum --";
        let out = Command::new("sh")
            .args(["-c", script])
            .current_dir(dir)
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for threads in [0, 1, 3, 64] {
            let (n, ours) = write_to_vec(dir, threads).unwrap();
            assert_same(&ours, &out.stdout);
            assert_eq!(n, names.len() - 2);
        }
        let parsed = parse(&out.stdout).unwrap();
        assert!(parsed.contains(b"sub/SHA256SUMS") && !parsed.contains(b"SHA256SUMS"));
        assert_eq!(write_to_vec(&dir.join("only"), 2).unwrap(), (0, Vec::new()));
    }

    #[test]
    fn write_for_dir_rejects_fifos_and_reports_io_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        populate(dir, &[b"a".to_vec(), b"sub/b".to_vec()]);
        let mkfifo =
            |path: &Path| assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
        mkfifo(&dir.join(".release-ready")); // excluded at the top level: never looked at
        assert_eq!(write_to_vec(dir, 2).unwrap().0, 2);
        let fifo = dir.join("sub/pipe");
        mkfifo(&fifo);
        let e = write_to_vec(dir, 2).unwrap_err();
        assert!(
            matches!(&e, ManifestError::SpecialFile { path } if *path == fifo),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "{}: not a regular file, directory or symlink",
                fifo.display()
            )
        );
        let missing = dir.join("missing");
        let e = write_to_vec(&missing, 2).unwrap_err();
        assert!(
            matches!(&e, ManifestError::Io { path, .. } if *path == missing),
            "{e:?}"
        );
        assert!(e
            .to_string()
            .starts_with(&format!("{}: ", missing.display())));
    }

    #[test]
    fn hash_errors_report_the_first_failing_file() {
        let tmp = tempfile::tempdir().unwrap();
        let names = ["ok1", "gone1", "ok2", "gone2", "ok3", "gone3"].map(PathBuf::from);
        let present = |n: &&PathBuf| n.as_os_str().as_bytes().starts_with(b"ok");
        for name in names.iter().filter(present) {
            fs::write(tmp.path().join(name), name.as_os_str().as_bytes()).unwrap();
        }
        for threads in [1, 2, 6] {
            let e = hash_all(tmp.path(), &names, threads).unwrap_err();
            let gone1 = tmp.path().join("gone1");
            assert!(
                matches!(&e, ManifestError::Io { path, .. } if *path == gone1),
                "{e:?}"
            );
        }
        let want: Digest = Sha256::digest(b"ok1").into();
        assert_eq!(hash_all(tmp.path(), &names[..1], 4).unwrap(), [want]);
    }
}
