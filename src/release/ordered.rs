//! Walk order, and reading the files kept in it alongside a walk.
//!
//! Release manifests and the hash cache are written in the order the walk of
//! `deploy-cache/` visits paths (depth-first, names sorted byte-wise: [`cmp_paths`]). The
//! next build then reads them beside its own walk, one line at a time (a merge join,
//! [`Merge`]), instead of loading 200,000 entries into memory: memory stays flat however
//! big the tree. A file out of order (written by an older version, or edited by hand) only
//! costs missed lookups, never a wrong answer: lines out of order are passed over.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// Compares two relative paths (raw bytes, `/`-separated) in walk order: component by
/// component, a shorter path before the longer one it prefixes. Same as comparing the
/// bytes with `/` ranked below every other byte, since names never hold `/` or NUL.
pub fn cmp_paths(a: &[u8], b: &[u8]) -> Ordering {
    let same = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let rank = |c: u8| if c == b'/' { 0 } else { c };
    match (a.get(same), b.get(same)) {
        (Some(&x), Some(&y)) => rank(x).cmp(&rank(y)),
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
    }
}

/// Parses one line into its value, writing its path into the (cleared) buffer; `None`
/// skips the line. The buffer is reused line after line: no allocation per line.
pub type ParseLine<T> = fn(&[u8], &mut Vec<u8>) -> Option<T>;

/// A line file in walk order, read forward as a walk asks for its paths in the same order.
pub struct Merge<T> {
    reader: Option<BufReader<File>>,
    parse: ParseLine<T>,
    line: Vec<u8>,
    /// The next entry not yet passed over; its path is `cur_path`.
    cur: Option<T>,
    cur_path: Vec<u8>,
    /// The path of the last entry taken, to pass over lines out of order.
    last: Vec<u8>,
    /// Byte offset of the next line to read.
    offset: u64,
    /// Byte offset of `cur`'s line.
    cur_offset: u64,
}

impl<T> Merge<T> {
    /// Reads `path` (a missing or unreadable file reads as empty: these files only ever
    /// save work).
    pub fn open(path: &Path, parse: ParseLine<T>) -> Merge<T> {
        let reader = File::open(path)
            .ok()
            .map(|f| BufReader::with_capacity(64 * 1024, f));
        let mut m = Merge {
            reader,
            parse,
            line: Vec::with_capacity(256),
            cur: None,
            cur_path: Vec::with_capacity(256),
            last: Vec::with_capacity(256),
            offset: 0,
            cur_offset: 0,
        };
        m.advance();
        m
    }

    /// The value for `path`, if the file has one. Entries before `path` are passed over
    /// for good, so calls must come in walk order.
    pub fn find(&mut self, path: &[u8]) -> Option<&T> {
        self.find_with_offset(path).map(|(t, _)| t)
    }

    /// Like `find`, with the byte offset of the entry's line in the file.
    pub fn find_with_offset(&mut self, path: &[u8]) -> Option<(&T, u64)> {
        loop {
            self.cur.as_ref()?;
            match cmp_paths(&self.cur_path, path) {
                Ordering::Less => self.advance(),
                Ordering::Equal => break,
                Ordering::Greater => return None,
            }
        }
        let offset = self.cur_offset;
        self.cur.as_ref().map(|t| (t, offset))
    }

    /// The next entry in order and the byte offset of its line, whatever its path.
    pub fn next_with_offset(&mut self) -> Option<(T, u64)> {
        let value = self.cur.take()?;
        let offset = self.cur_offset;
        std::mem::swap(&mut self.last, &mut self.cur_path);
        self.advance();
        Some((value, offset))
    }

    /// Moves `cur` to the next entry in order.
    fn advance(&mut self) {
        if self.cur.take().is_some() {
            std::mem::swap(&mut self.last, &mut self.cur_path);
        }
        let Some(reader) = self.reader.as_mut() else {
            return;
        };
        loop {
            self.line.clear();
            let at = self.offset;
            match reader.read_until(b'\n', &mut self.line) {
                Ok(0) | Err(_) => {
                    self.reader = None;
                    return;
                }
                Ok(n) => self.offset += n as u64,
            }
            let text = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
            self.cur_path.clear();
            let Some(value) = (self.parse)(text, &mut self.cur_path) else {
                continue;
            };
            if !self.last.is_empty() && cmp_paths(&self.cur_path, &self.last) != Ordering::Greater {
                continue;
            }
            self.cur = Some(value);
            self.cur_offset = at;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn walk_order_is_component_order() {
        let mut v: Vec<&[u8]> = vec![b"a.txt", b"a/b", b"a", b"ab/c", b"a/b/c", b"a-b", b"b"];
        v.sort_by(|x, y| cmp_paths(x, y));
        let want: Vec<&[u8]> = vec![b"a", b"a/b", b"a/b/c", b"a-b", b"a.txt", b"ab/c", b"b"];
        assert_eq!(v, want);
        // The same order std's Path gives (component-wise).
        let mut p: Vec<&Path> = want
            .iter()
            .map(|b| Path::new(std::str::from_utf8(b).unwrap()))
            .collect();
        p.sort();
        let back: Vec<&[u8]> = p.iter().map(|p| p.to_str().unwrap().as_bytes()).collect();
        assert_eq!(back, want);
    }

    fn parse(line: &[u8], path: &mut Vec<u8>) -> Option<u32> {
        let s = std::str::from_utf8(line).ok()?;
        let (v, p) = s.split_once(' ')?;
        let v = v.parse().ok()?;
        path.extend_from_slice(p.as_bytes());
        Some(v)
    }

    #[test]
    fn merge_finds_in_order_and_skips_disorder() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("lines");
        let mut w = File::create(&f).unwrap();
        // "a/x" after "b" is out of order: passed over. "garbage" does not parse.
        write!(w, "1 a\n2 a/b\ngarbage\n3 b\n4 a/x\n5 c/d\n").unwrap();
        drop(w);
        let mut m = Merge::open(&f, parse);
        assert_eq!(m.find(b"a"), Some(&1));
        assert_eq!(m.find(b"a/a"), None);
        assert_eq!(m.find(b"a/b"), Some(&2));
        assert_eq!(m.find(b"a/x"), None);
        assert_eq!(m.find(b"b"), Some(&3));
        assert_eq!(
            m.find_with_offset(b"c/d").map(|(v, o)| (*v, o)),
            Some((5, 28))
        );
        assert_eq!(m.find(b"z"), None);
        let mut missing = Merge::open(&d.path().join("none"), parse);
        assert_eq!(missing.find(b"a"), None);
    }
}
