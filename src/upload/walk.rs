//! Symlink-safe traversal of `deploy-cache/`. Every directory is opened relative to its
//! parent's descriptor with `O_NOFOLLOW | O_DIRECTORY`, and every file with `O_NOFOLLOW`
//! (by [`open_file`], which also checks it is still the file that was stat'ed), so an
//! uploader who swaps a directory for a symlink between our check and our use gets an
//! error, never a read outside the site.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::dir::Dir;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

use crate::error::{Error, IoContext, Result};

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
    openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .at(root)
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
    let fd = Arc::new(open_root(root)?);
    walk_dir(root, fd, PathBuf::new(), 0, skip_top, visit)
}

/// A directory entry's name and, when `getdents` tells it, its type.
type Listed = (OsString, Option<nix::dir::Type>);

/// Sorted names of the directory open at `fd`, without `.`, `..` and (at depth 0) `skip_top`.
fn list(fd: &OwnedFd, here: &Path, depth: usize, skip_top: &[&OsStr]) -> Result<Vec<Listed>> {
    let dup = fd.try_clone().at(here)?;
    let mut dir = Dir::from_fd(dup).at(here)?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry.at(here)?;
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

fn walk_dir(
    root: &Path,
    fd: Arc<OwnedFd>,
    rel: PathBuf,
    depth: usize,
    skip_top: &[&OsStr],
    visit: &mut dyn FnMut(Found) -> Result<bool>,
) -> Result<()> {
    for (name, kind) in list(&fd, &root.join(&rel), depth, skip_top)? {
        let child_rel = rel.join(&name);
        if kind == Some(nix::dir::Type::File) {
            visit(Found {
                rel: child_rel,
                depth,
                dir: Arc::clone(&fd),
                stat: None,
                node: Node::File,
            })?;
            continue;
        }
        let stat = stat_at(&fd, &child_rel)?;
        let mode = stat.st_mode;
        let node = if is_dir(mode) {
            Node::Dir
        } else if is_file(mode) {
            Node::File
        } else if is_symlink(mode) {
            let target = readlinkat(fd.as_ref(), name.as_os_str()).at(&root.join(&child_rel))?;
            Node::Symlink(target)
        } else {
            Node::Special(kind_name(mode))
        };
        let sub_rel = matches!(node, Node::Dir).then(|| child_rel.clone());
        let found = Found {
            rel: child_rel,
            depth,
            dir: Arc::clone(&fd),
            stat: Some(stat),
            node,
        };
        if !visit(found)? {
            continue;
        }
        if let Some(sub_rel) = sub_rel {
            if depth >= MAX_DEPTH {
                let top: PathBuf = sub_rel.iter().take(3).collect();
                return Err(Error::Rejected(format!(
                    "{}/... nests directories more than {MAX_DEPTH} levels deep",
                    top.display()
                )));
            }
            let sub = open_dir_at(&fd, name.as_os_str()).map_err(|e| swapped(e, &sub_rel))?;
            walk_dir(root, Arc::new(sub), sub_rel, depth + 1, skip_top, visit)?;
        }
    }
    Ok(())
}

/// Status of the entry `rel` of the open directory `dir`, not followed.
pub fn stat_at(dir: &OwnedFd, rel: &Path) -> Result<FileStat> {
    let name = rel.file_name().unwrap_or_default();
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(s),
        // Vanished between readdir and stat: the uploader is still working.
        Err(nix::errno::Errno::ENOENT) => Err(Error::Changed(format!(
            "{} disappeared while the upload was being read",
            rel.display()
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
            rel.display()
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
            Some(t) => t == nix::dir::Type::Directory,
            None => fstatat(fd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .is_ok_and(|s| is_dir(s.st_mode)),
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
                rel.display()
            ))
        }
        other => Error::Io {
            path: rel.to_path_buf(),
            source: std::io::Error::from(other),
        },
    }
}
