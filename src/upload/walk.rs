//! Symlink-safe traversal of `deploy-cache/`. Every directory is opened relative to its
//! parent's descriptor with `O_NOFOLLOW | O_DIRECTORY`, and every file with `O_NOFOLLOW`
//! (by [`open_file`], which also checks it is still the file that was stat'ed), so an
//! uploader who swaps a directory for a symlink between our check and our use gets an
//! error, never a read outside the site.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use rustix::fs::FileType;

use crate::error::{Error, IoContext, Result};
use crate::upload::lookahead::{self, ListError, Lookahead, Slot};

/// What an entry is.
#[derive(Debug)]
pub enum Node {
    /// A directory (visited after its parent).
    Dir,
    /// A regular file (not opened: see [`open_file`]).
    File,
    /// A symbolic link and its target.
    Symlink(OsString),
    /// A device, fifo or socket: never part of a release.
    Special(&'static str),
}

/// One entry found by the walk.
#[derive(Debug)]
pub struct Found {
    /// Path relative to the walk's root.
    pub rel: PathBuf,
    /// Nesting of its parent directory: 0 for the root's entries.
    pub depth: usize,
    /// Its parent directory, open.
    pub dir: Arc<OwnedFd>,
    /// Status of the entry itself (not followed); `None` for a regular file known as one
    /// from the directory listing: the consumer stats it (`fstatat` on `dir`), so the
    /// walk itself need not.
    pub stat: Option<FileStat>,
    /// What it is.
    pub node: Node,
}

impl Found {
    /// The entry's name in its directory.
    pub fn name(&self) -> &OsStr {
        self.rel.file_name().unwrap_or_default()
    }
}

/// Deepest directory nesting the walk descends into. The walk recurses, one stack frame
/// (several KiB in a debug build) and open descriptors per level, on a worker thread with
/// a 2 MiB stack: an uploader's tree a few hundred levels deep (cheap to make with mkdirat)
/// would otherwise overflow it and abort the whole service. Real builds are nowhere near
/// this deep.
pub const MAX_DEPTH: usize = 128;

/// Kind name for a raw `st_mode`.
pub fn kind_name(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symlink",
        SFlag::S_IFIFO => "fifo",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        _ => "unknown file type",
    }
}

/// True when `mode` is a regular file.
pub fn is_file(mode: u32) -> bool {
    mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits()
}

/// True when `mode` is a directory.
pub fn is_dir(mode: u32) -> bool {
    mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits()
}

/// True when `mode` is a symlink.
pub fn is_symlink(mode: u32) -> bool {
    mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits()
}

/// Opens `root` itself as a directory without following a symlink at its last component.
pub fn open_root(root: &Path) -> Result<OwnedFd> {
    crate::fsops::open_dir_nofollow(root)
}

/// Walks `root` depth-first, parents before children, names sorted byte-wise in each
/// directory, calling `visit` for every entry: the order of [`crate::release::ordered`],
/// where a directory's subtree comes right after it. Top-level names in `skip_top` are not
/// visited. `visit` returns whether to descend into a directory.
pub fn walk(
    root: &Path,
    skip_top: &[&OsStr],
    visit: &mut dyn FnMut(Found) -> Result<bool>,
) -> Result<()> {
    walk_helped(root, skip_top, visit, None)
}

/// [`walk`], with the helpers started from the beginning when `helpers` says so (tests:
/// their trees are always cached) instead of when the tree turns out to be cold.
fn walk_helped(
    root: &Path,
    skip_top: &[&OsStr],
    visit: &mut dyn FnMut(Found) -> Result<bool>,
    helpers: Option<Cold>,
) -> Result<()> {
    let fd = Arc::new(open_root(root)?);
    let names = list(&fd, root, 0, skip_top)?;
    let ahead = Lookahead::new(|fd, here| list(fd, here, 1, &[]));
    std::thread::scope(|s| {
        let start_helpers = || {
            for _ in 0..lookahead::HELPERS {
                s.spawn(|| ahead.help());
            }
        };
        let walked = Walk {
            root,
            ahead: &ahead,
            visit,
            cold: ColdCheck::new(&start_helpers, helpers),
        }
        .dir(fd, PathBuf::new(), 0, names);
        ahead.finish();
        walked
    })
}

/// Whether the walk reads from the disk, and so needs its listings made ahead. On a warm
/// cache a listing takes microseconds, and handing it to another thread would cost more
/// than it saves (measured: a tenth of a warm incremental release); so the helpers start
/// only once this thread has had to read a block (`ru_inblock`), which a cached tree never
/// makes it do.
struct ColdCheck<'a> {
    state: Cold,
    start_helpers: &'a dyn Fn(),
}

enum Cold {
    /// All cached so far: this thread had made this many block reads when the walk began.
    Watching(i64),
    /// The helpers run.
    Helping,
    /// The count cannot be had: the walk lists everything itself.
    Unknown,
}

impl<'a> ColdCheck<'a> {
    fn new(start_helpers: &'a dyn Fn(), state: Option<Cold>) -> Self {
        let state = state.unwrap_or_else(|| {
            lookahead::thread_block_reads().map_or(Cold::Unknown, Cold::Watching)
        });
        ColdCheck {
            state,
            start_helpers,
        }
    }

    /// True when listings are to be made ahead: the helpers were started, now or before.
    fn helping(&mut self) -> bool {
        match self.state {
            Cold::Helping => true,
            Cold::Unknown => false,
            Cold::Watching(at_start) => {
                if lookahead::thread_block_reads().is_some_and(|now| now > at_start) {
                    self.state = Cold::Helping;
                    (self.start_helpers)();
                    return true;
                }
                false
            }
        }
    }
}

/// A directory entry's name and the type `getdents` told (`Unknown` where the filesystem
/// does not say: the caller must `stat`).
type Listed = (OsString, FileType);

/// Sorted names of the directory open at `fd`, without `.`, `..` and (at depth 0) `skip_top`.
/// Read with `getdents64` straight from `fd`: a `DIR` stream would cost a `dup`, an
/// `fstat`, two `fcntl`s, an `lseek` and a `close` on top, for each of the thousands of
/// directories of a release. `fd` must be at the start of the directory (freshly opened);
/// each directory is listed once.
fn list(fd: &OwnedFd, here: &Path, depth: usize, skip_top: &[&OsStr]) -> Result<Vec<Listed>> {
    let mut buf = Vec::with_capacity(LIST_BUF);
    let mut dir = rustix::fs::RawDir::new(fd, buf.spare_capacity_mut());
    let mut names = Vec::new();
    while let Some(entry) = dir.next() {
        let entry = entry.map_err(std::io::Error::from).at(here)?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." || (depth == 0 && skip_top.contains(&name)) {
            continue;
        }
        names.push((name.to_os_string(), entry.file_type()));
    }
    // Sorted so that output, manifests and errors are deterministic.
    names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(names)
}

/// Bytes read per `getdents64`: room for hundreds of entries, and for any one name.
const LIST_BUF: usize = 32 * 1024;

/// One walk: its root, the helpers listing directories ahead of it, and the visitor.
struct Walk<'a, 'v> {
    root: &'a Path,
    ahead: &'a Lookahead<Vec<Listed>>,
    visit: &'a mut (dyn FnMut(Found) -> Result<bool> + 'v),
    cold: ColdCheck<'a>,
}

impl Walk<'_, '_> {
    /// Visits `names`, the entries of the directory open at `fd` (`rel` below the root),
    /// and the subtrees of its directories.
    fn dir(
        &mut self,
        fd: Arc<OwnedFd>,
        rel: PathBuf,
        depth: usize,
        names: Vec<Listed>,
    ) -> Result<()> {
        // The entries the listing says are directories are listed ahead, in order, at most
        // `WINDOW` at a time: each one the walk reaches makes room for the next.
        let mut dirs = names
            .iter()
            .enumerate()
            .filter(|(_, (_, kind))| *kind == FileType::Directory)
            .map(|(i, _)| i)
            .peekable();
        let mut window: VecDeque<(usize, Arc<Slot<Vec<Listed>>>)> = VecDeque::new();
        let helping = self.cold.helping();
        let result = (|| {
            for (i, (name, kind)) in names.iter().enumerate() {
                // Directories reached without a slot (all were out) are listed inline.
                while dirs.next_if(|&j| j <= i && window.is_empty()).is_some() {}
                while helping && window.len() < lookahead::WINDOW {
                    let Some(&j) = dirs.peek() else { break };
                    let name = &names[j].0;
                    let path = self.root.join(&rel).join(name);
                    let Some(slot) = self.ahead.ahead(&fd, name.clone(), path) else {
                        break;
                    };
                    dirs.next();
                    window.push_back((j, slot));
                }
                let slot = match window.front() {
                    Some((j, _)) if *j == i => window.pop_front().map(|(_, s)| s),
                    _ => None,
                };
                let entered = self.entry(&fd, &rel, depth, name, *kind, slot.as_deref());
                // Given up unless the entry was entered (then it was taken: a no-op).
                if let Some(s) = &slot {
                    self.ahead.cancel(s);
                }
                entered?;
            }
            Ok(())
        })();
        for (_, slot) in &window {
            self.ahead.cancel(slot);
        }
        result
    }

    /// Visits one entry, and its subtree when it is a directory to descend into; `slot`
    /// is its listing made ahead, if it has one.
    fn entry(
        &mut self,
        fd: &Arc<OwnedFd>,
        rel: &Path,
        depth: usize,
        name: &OsStr,
        kind: FileType,
        slot: Option<&Slot<Vec<Listed>>>,
    ) -> Result<()> {
        let child_rel = rel.join(name);
        if kind == FileType::RegularFile {
            return (self.visit)(Found {
                rel: child_rel,
                depth,
                dir: Arc::clone(fd),
                stat: None,
                node: Node::File,
            })
            .map(drop);
        }
        let stat = stat_at(fd, &child_rel)?;
        let mode = stat.st_mode;
        let node = if is_dir(mode) {
            Node::Dir
        } else if is_file(mode) {
            Node::File
        } else if is_symlink(mode) {
            let target = readlinkat(fd.as_ref(), name).at(&self.root.join(&child_rel))?;
            Node::Symlink(target)
        } else {
            Node::Special(kind_name(mode))
        };
        let sub_rel = matches!(node, Node::Dir).then(|| child_rel.clone());
        let found = Found {
            rel: child_rel,
            depth,
            dir: Arc::clone(fd),
            stat: Some(stat),
            node,
        };
        let descend = (self.visit)(found);
        let Some(sub_rel) = sub_rel.filter(|_| matches!(descend, Ok(true))) else {
            return descend.map(drop);
        };
        if depth >= MAX_DEPTH {
            let top: PathBuf = sub_rel.iter().take(3).collect();
            return Err(Error::Rejected(format!(
                "{}/... nests directories more than {MAX_DEPTH} levels deep",
                top.display()
            )));
        }
        let listing = match slot {
            Some(s) => self.ahead.take(s),
            None => self.ahead.list_now(fd, name, &self.root.join(&sub_rel)),
        };
        let (sub, names) = listing.map_err(|e| match e {
            ListError::Open(errno) => swapped(errno, &sub_rel),
            ListError::Read(e) => e,
        })?;
        self.dir(Arc::new(sub), sub_rel, depth + 1, names)
    }
}

/// Status of the entry `rel` of the open directory `dir`, not followed.
pub fn stat_at(dir: &OwnedFd, rel: &Path) -> Result<FileStat> {
    let name = rel.file_name().unwrap_or_default();
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(s),
        // Vanished between readdir and stat: the uploader is still working.
        Err(nix::errno::Errno::ENOENT) => Err(Error::Changed(format!(
            "{} disappeared while the upload was being read",
            crate::events::shown(rel)
        ))),
        Err(e) => Err(e).at(rel),
    }
}

/// Opens the directory `name` under `dir` without following a symlink there.
pub fn open_dir_at(dir: &OwnedFd, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens a regular file the walk found (`rel`, in the open directory `dir`) for reading,
/// without following a symlink, and checks it is still the very file that was stat'ed:
/// the name may have been swapped since.
pub fn open_file(dir: &OwnedFd, rel: &Path, stat: &FileStat) -> Result<File> {
    let name = rel.file_name().unwrap_or_default();
    let f = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| swapped(e, rel))?;
    let now = fstat(&f).at(rel)?;
    if !is_file(now.st_mode) || now.st_ino != stat.st_ino || now.st_dev != stat.st_dev {
        return Err(Error::Changed(format!(
            "{} changed type while the upload was being read",
            crate::events::shown(rel)
        )));
    }
    Ok(File::from(f))
}

/// Every path of `root`'s tree (depth-first, sorted) from the directory listings alone,
/// without a stat per file, so a pre-check of a 200,000-file tree stays cheap; `visit`
/// also gets whether the entry is a directory.
/// Directories are descended into without following symlinks; names that vanish or
/// change type meanwhile are skipped (the walk proper will see them).
pub fn names(
    root: &Path,
    skip_top: &[&OsStr],
    visit: &mut dyn FnMut(&Path, bool) -> Result<()>,
) -> Result<()> {
    let fd = open_root(root)?;
    names_dir(root, &fd, PathBuf::new(), 0, skip_top, visit)
}

fn names_dir(
    root: &Path,
    fd: &OwnedFd,
    rel: PathBuf,
    depth: usize,
    skip_top: &[&OsStr],
    visit: &mut dyn FnMut(&Path, bool) -> Result<()>,
) -> Result<()> {
    for (name, kind) in list(fd, &root.join(&rel), depth, skip_top)? {
        let child_rel = rel.join(&name);
        let is_a_dir = match kind {
            FileType::Unknown => fstatat(fd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .is_ok_and(|s| is_dir(s.st_mode)),
            t => t == FileType::Directory,
        };
        visit(&child_rel, is_a_dir)?;
        if is_a_dir && depth < MAX_DEPTH {
            if let Ok(sub) = open_dir_at(fd, name.as_os_str()) {
                names_dir(root, &sub, child_rel, depth + 1, skip_top, visit)?;
            }
        }
    }
    Ok(())
}

/// Maps an open error on an uploader-controlled name to `Error::Changed` when it means the
/// name was swapped (ELOOP: now a symlink; ENOTDIR: no longer a directory; ENOENT: gone).
fn swapped(e: nix::errno::Errno, rel: &Path) -> Error {
    match e {
        nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR | nix::errno::Errno::ENOENT => {
            Error::Changed(format!(
                "{} changed while the upload was being read",
                crate::events::shown(rel)
            ))
        }
        other => Error::Io {
            path: rel.to_path_buf(),
            source: std::io::Error::from(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A tree with more subdirectories per directory than the lookahead window, at three
    /// levels, with files, symlinks and empty directories among them.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for a in 0..(lookahead::WINDOW * 2 + 3) {
            for b in 0..3 {
                let d = t.path().join(format!("d{a:02}/e{b}"));
                fs::create_dir_all(d.join("empty")).unwrap();
                fs::write(d.join("f.txt"), format!("{a}/{b}")).unwrap();
                fs::write(t.path().join(format!("d{a:02}/top{b}.js")), "x").unwrap();
            }
            std::os::unix::fs::symlink("e0/f.txt", t.path().join(format!("d{a:02}/link"))).unwrap();
        }
        fs::write(t.path().join("SHA256SUMS"), "").unwrap();
        t
    }

    /// The same walk made the plain way: sorted names, depth-first, `/` for directories.
    fn reference(root: &Path, rel: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let meta = fs::symlink_metadata(root.join(&r)).unwrap();
            if meta.is_dir() {
                out.push(format!("{}/", r.display()));
                reference(root, &r, out);
            } else {
                out.push(r.display().to_string());
            }
        }
    }

    fn walked(root: &Path, descend: impl Fn(&Path) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        let helped = Some(Cold::Watching(i64::MIN));
        walk_helped(
            root,
            &[],
            &mut |f: Found| {
                let is_dir = matches!(f.node, Node::Dir);
                seen.push(if is_dir {
                    format!("{}/", f.rel.display())
                } else {
                    f.rel.display().to_string()
                });
                Ok(is_dir && descend(&f.rel))
            },
            helped,
        )
        .unwrap();
        seen
    }

    #[test]
    fn listings_made_ahead_keep_the_walk_order_and_miss_nothing() {
        let t = tree();
        let mut want = Vec::new();
        reference(t.path(), Path::new(""), &mut want);
        // Several times: which thread lists which directory varies from run to run.
        for _ in 0..20 {
            assert_eq!(walked(t.path(), |_| true), want);
        }
    }

    #[test]
    fn a_directory_bigger_than_one_read_is_listed_whole_with_each_entrys_kind() {
        // Long names: 3,000 entries are several `getdents64` reads of `LIST_BUF` bytes.
        let t = tempfile::tempdir().unwrap();
        let long = "n".repeat(60);
        for i in 0..3000 {
            fs::write(t.path().join(format!("{long}{i:05}")), "").unwrap();
        }
        fs::create_dir(t.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("sub", t.path().join("to-sub")).unwrap();
        nix::unistd::mkfifo(&t.path().join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let fd = open_root(t.path()).unwrap();
        let listed = list(&fd, t.path(), 0, &[]).unwrap();
        assert!(3000 * (long.len() + 24) > 2 * LIST_BUF);
        assert_eq!(listed.len(), 3003);
        assert!(listed.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
        let kind = |n: &str| listed.iter().find(|(name, _)| name == n).map(|(_, k)| *k);
        // Whatever the filesystem does not type (`DT_UNKNOWN`) is `Unknown`, and stat'ed.
        for (name, want) in [
            ("sub", FileType::Directory),
            ("to-sub", FileType::Symlink),
            ("fifo", FileType::Fifo),
            (&*format!("{long}02999"), FileType::RegularFile),
        ] {
            let got = kind(name);
            assert!(
                got == Some(FileType::Unknown) || got == Some(want),
                "{name}: {got:?}"
            );
        }
        // The walk sees each entry once, whatever the listing's reads.
        let seen = walked(t.path(), |_| false);
        assert_eq!(seen.len(), 3003);
    }

    #[test]
    fn a_deep_wide_tree_is_walked_whole_with_listings_ahead_capped() {
        // Twelve levels of nine subdirectories each: a full window at every level would
        // be more listings ahead than `MAX_AHEAD`.
        let t = tempfile::tempdir().unwrap();
        let mut d = t.path().to_path_buf();
        for level in 0..12 {
            for k in 0..=lookahead::WINDOW {
                fs::create_dir_all(d.join(format!("s{k}"))).unwrap();
                fs::write(d.join(format!("s{k}/f{level}")), "x").unwrap();
            }
            d = d.join("s0");
        }
        const { assert!(12 * lookahead::WINDOW > lookahead::MAX_AHEAD) };
        let mut want = Vec::new();
        reference(t.path(), Path::new(""), &mut want);
        for _ in 0..10 {
            assert_eq!(walked(t.path(), |_| true), want);
        }
    }

    #[test]
    fn listings_ahead_stop_at_the_cap_and_resume_as_they_are_taken() {
        let t = tree();
        let fd = Arc::new(open_root(t.path()).unwrap());
        let ahead = Lookahead::new(|fd, here| list(fd, here, 1, &[]));
        let slot = |n: usize| {
            let name = format!("d{:02}", n % 19);
            ahead.ahead(&fd, name.clone().into(), t.path().join(name))
        };
        let out: Vec<_> = (0..lookahead::MAX_AHEAD)
            .map(|n| slot(n).unwrap())
            .collect();
        assert!(slot(99).is_none());
        assert!(ahead.take(&out[0]).is_ok());
        let again = slot(1).unwrap();
        assert!(slot(2).is_none());
        ahead.cancel(&out[1]);
        ahead.cancel(&out[1]);
        assert!(slot(3).is_some());
        assert!(slot(4).is_none());
        assert!(ahead.take(&again).is_ok());
        ahead.finish();
    }

    #[test]
    fn directories_the_visitor_skips_are_not_entered() {
        let t = tree();
        let seen = walked(t.path(), |rel| {
            !rel.starts_with("d03") && rel != Path::new("d07/e1")
        });
        assert!(seen.contains(&"d03/".to_string()));
        let under = |dir: &str| seen.iter().any(|p| p.starts_with(dir) && p != dir);
        assert!(!under("d03/"), "{seen:?}");
        assert!(seen.contains(&"d07/e1/".to_string()));
        assert!(!under("d07/e1/"), "{seen:?}");
        assert!(seen.contains(&"d07/e2/f.txt".to_string()));
    }

    #[test]
    fn an_error_midway_stops_the_walk_and_its_helpers() {
        let t = tree();
        let mut n = 0;
        let r = walk_helped(
            t.path(),
            &[],
            &mut |f: Found| {
                n += 1;
                if f.rel == Path::new("d05/e1") {
                    return Err(Error::Rejected("stop here".into()));
                }
                Ok(matches!(f.node, Node::Dir))
            },
            Some(Cold::Helping),
        );
        assert!(matches!(r, Err(Error::Rejected(m)) if m == "stop here"));
        assert!(n > 5);
    }

    #[test]
    fn helpers_start_only_once_the_walk_has_read_from_the_disk() {
        let started = std::cell::Cell::new(0);
        let start = || started.set(started.get() + 1);
        // Cached all along: no block read since the walk began.
        let mut warm = ColdCheck::new(&start, Some(Cold::Watching(i64::MAX)));
        assert!(!warm.helping() && !warm.helping());
        assert_eq!(started.get(), 0);
        // Reads since: the helpers start once and stay on.
        let mut cold = ColdCheck::new(&start, Some(Cold::Watching(i64::MIN)));
        assert!(cold.helping() && cold.helping() && cold.helping());
        assert_eq!(started.get(), 1);
        let mut unknown = ColdCheck::new(&start, Some(Cold::Unknown));
        assert!(!unknown.helping());
        // A fresh walk starts from this thread's real count, which only grows.
        let mut real = ColdCheck::new(&start, None);
        assert!(matches!(real.state, Cold::Watching(_)));
        let _ = real.helping();
    }

    #[test]
    fn a_directory_gone_before_it_is_listed_is_a_change_of_the_upload() {
        let t = tree();
        let fd = Arc::new(open_root(t.path()).unwrap());
        let ahead = Lookahead::new(|fd, here| list(fd, here, 1, &[]));
        // No helpers: `take` lists it itself.
        let slot = ahead
            .ahead(&fd, "d01".into(), t.path().join("d01"))
            .unwrap();
        let (_, names) = ahead.take(&slot).unwrap();
        assert_eq!(names.len(), 7, "{names:?}");
        let gone = ahead
            .ahead(&fd, "nope".into(), t.path().join("nope"))
            .unwrap();
        match ahead.take(&gone) {
            Err(ListError::Open(e)) => {
                assert!(matches!(swapped(e, Path::new("nope")), Error::Changed(_)))
            }
            other => panic!("{:?}", other.map(|(_, n)| n)),
        }
        // Given up: never listed, by anyone.
        let skipped = ahead
            .ahead(&fd, "d02".into(), t.path().join("d02"))
            .unwrap();
        ahead.cancel(&skipped);
        assert!(matches!(ahead.take(&skipped), Err(ListError::Read(_))));
        ahead.finish();
    }
}
