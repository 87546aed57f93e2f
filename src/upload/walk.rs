//! Symlink-safe traversal of `deploy-cache/`. Every directory is opened relative to its
//! parent's descriptor with `O_NOFOLLOW | O_DIRECTORY`, and every file with `O_NOFOLLOW`,
//! so an uploader who swaps a directory for a symlink between our check and our use gets
//! an error, never a read outside the site.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

use crate::error::{Error, IoContext, Result};

/// What an entry is.
#[derive(Debug)]
pub enum Node {
    /// A directory (visited after its parent).
    Dir,
    /// A regular file, opened without following symlinks, with its `fstat`.
    File(File),
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
    /// Status of the entry itself (not followed).
    pub stat: FileStat,
    /// What it is.
    pub node: Node,
}

/// Whether the walk opens regular files for the visitor (false: names and stats only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Open files (`Node::File`).
    Files,
    /// Do not open files (cheap scans); they are reported as `Node::Special("unopened file")`.
    NamesOnly,
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

/// Walks `root` depth-first, parents before children, calling `visit` for every entry.
/// Top-level names in `skip_top` are not visited. `visit` returns whether to descend
/// into a directory.
pub fn walk(
    root: &Path,
    skip_top: &[&OsStr],
    open: Open,
    visit: &mut dyn FnMut(Found) -> Result<bool>,
) -> Result<()> {
    let fd = open_root(root)?;
    walk_dir(root, fd, PathBuf::new(), skip_top, open, visit)
}

fn walk_dir(
    root: &Path,
    fd: OwnedFd,
    rel: PathBuf,
    skip_top: &[&OsStr],
    open: Open,
    visit: &mut dyn FnMut(Found) -> Result<bool>,
) -> Result<()> {
    let here = root.join(&rel);
    let dup = fd.try_clone().at(&here)?;
    let mut dir = Dir::from_fd(dup).at(&here)?;
    let mut names: Vec<OsString> = Vec::new();
    for entry in dir.iter() {
        let entry = entry.at(&here)?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        if rel.as_os_str().is_empty() && skip_top.contains(&name) {
            continue;
        }
        names.push(name.to_os_string());
    }
    // Sorted so that output, manifests and errors are deterministic.
    names.sort();
    for name in names {
        let child_rel = rel.join(&name);
        let child_path = root.join(&child_rel);
        let stat = match fstatat(&fd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(s) => s,
            // Vanished between readdir and stat: the uploader is still working.
            Err(nix::errno::Errno::ENOENT) => {
                return Err(Error::Changed(format!(
                    "{} disappeared while the upload was being read",
                    child_rel.display()
                )))
            }
            Err(e) => return Err(e).at(&child_path),
        };
        let mode = stat.st_mode;
        if is_dir(mode) {
            let found = Found {
                rel: child_rel.clone(),
                stat,
                node: Node::Dir,
            };
            if visit(found)? {
                if child_rel.components().count() > MAX_DEPTH {
                    let top: PathBuf = child_rel.iter().take(3).collect();
                    return Err(Error::Rejected(format!(
                        "{}/... nests directories more than {MAX_DEPTH} levels deep",
                        top.display()
                    )));
                }
                let sub = openat(
                    &fd,
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| swapped(e, &child_rel))?;
                walk_dir(root, sub, child_rel, skip_top, open, visit)?;
            }
        } else if is_file(mode) {
            let node = if open == Open::Files {
                let f = openat(
                    &fd,
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| swapped(e, &child_rel))?;
                // The name may have been swapped for something else after fstatat.
                let st2 = fstat(&f).at(&child_path)?;
                if !is_file(st2.st_mode) {
                    return Err(Error::Changed(format!(
                        "{} changed type while the upload was being read",
                        child_rel.display()
                    )));
                }
                Node::File(File::from(f))
            } else {
                Node::Special("unopened file")
            };
            visit(Found {
                rel: child_rel,
                stat,
                node,
            })?;
        } else if is_symlink(mode) {
            let target = readlinkat(&fd, name.as_os_str()).at(&child_path)?;
            visit(Found {
                rel: child_rel,
                stat,
                node: Node::Symlink(target),
            })?;
        } else {
            visit(Found {
                rel: child_rel,
                stat,
                node: Node::Special(kind_name(mode)),
            })?;
        }
    }
    let _ = fd.as_fd();
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
