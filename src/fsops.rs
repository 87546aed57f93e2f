//! THE filesystem protocol. Every step whose atomicity or durability the keeper relies on
//! is here; everything else calls these functions.
//!
//! Names encode the lifecycle (as OSTree and systemd-sysupdate do):
//! - `releases/.partial.<id>`: a release being built. Never looked at as a release; removed
//!   by healing. It becomes `releases/<id>` by one `rename(2)` with `RENAME_NOREPLACE`,
//!   only after its content is verified and flushed (`syncfs`), so a crash leaves either no
//!   release or a complete one.
//! - `.rk-tmp.<name>.<pid>.<n>`: a temporary file or symlink beside its final name; it
//!   replaces the final name by `rename(2)` (atomic: there is never a moment without
//!   `current`), then the parent directory is fsynced so the rename survives a power loss.
//! - `shared/.rk-tmp.<name>.<pid>.<n>`: a shared file seeded from an upload (`HeldFile`),
//!   held there until the upload is accepted and then renamed to its entry without
//!   replacing anything; a rejected upload's copy is removed, so `shared/` only ever
//!   gets what a release that went on links to. Healing removes leftovers.
//! - `.release-keeper/trash/<id>.<n>`: a release being deleted. It leaves `releases/` by
//!   one rename first, so a half-deleted tree never looks like a release.
//! - `.release-keeper/changes`: the time spans in which the keeper linked or unlinked
//!   release files (`release::changes`), appended without a sync: a span lost in a crash
//!   only makes files look edited by hand, so the next build copies them instead of
//!   sharing them.
//! - `.release-keeper/hook`: the process group of the hook running now, written when it
//!   starts and removed when it ends (`write_atomic_unsynced`: it describes processes,
//!   which a power loss ends anyway). Found by the next holder of the site's lock, it is
//!   what a keeper killed during a hook left running (`hooks::reap_leftovers`).
//!
//! Order of durability for anything the next step depends on: file data (fsync, or one
//! `syncfs` for a whole tree), then the rename, then an fsync of the parent directory.
//! The journal is appended with `O_APPEND` and fdatasync per record; a torn last line from
//! a crash is cut off before the next append, so the journal always parses.
//!
//! The order of one upload's steps, each durable before the next (a crash between any two
//! leaves a state the next start resolves, noted in brackets):
//! 1. claim: the marker is renamed into `.release-keeper/claims/`, both directories
//!    fsynced [claim present: the upload is redone];
//! 2. the claim is resolved to an id (`write_atomic`) [same];
//! 3. `releases/.partial.<id>` is built, made read-only, flushed (`syncfs`, or, for a
//!    small upload while much else awaits writeback, an fsync per copied file and per
//!    directory); its full manifest is written meanwhile to a temporary name beside its
//!    final one (`AtomicWriter`)
//!    [leftover partial or temporary manifest: removed by healing, claim redone];
//! 4. the release's full manifest is put in place (fsync, rename, fsync of the directory);
//! 5. `rename_noreplace` into `releases/<id>`, fsync of `releases/` [release on disk with a
//!    stored manifest but no journal record: ours, rebuilt by the redo];
//! 6. the claim is marked finalized, then the journal gets `finalized` (in that order: a
//!    journaled release whose claim is not marked is rebuilt, never silently dropped);
//! 7. journal `trial`, swap of `current` (`swap_symlink`), verdict `activated` or
//!    `failed` + `rolled_back` [open trial: resumed, the checks run again];
//! 8. pruning, per release: rename into the trash + fsync, journal `pruned`, then removal
//!    of its stored manifest and tree [trash entry: emptied by healing];
//! 9. the claim is removed.
//!
//! Locks are `flock(2)` on files under `.release-keeper/` (via std's `File::lock`): the
//! kernel drops them when the holder dies, so there are no stale lock files to clean. The
//! operation lock is also taken on `.release-keeper/` itself, first (see [`op_lock`]): a
//! lock file deleted by hand while held would let a second holder in on a new file.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// Prefix of a release under construction in `releases/`.
pub const PARTIAL_PREFIX: &str = ".partial.";
/// Prefix of temporary files and symlinks that are renamed over their final name.
pub const TMP_PREFIX: &str = ".rk-tmp.";

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary name beside `path` (same directory, so rename is atomic).
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let mut tmp = OsString::from(TMP_PREFIX);
    tmp.push(name);
    tmp.push(format!(
        ".{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(tmp)
}

/// The parent directory of `path`, or `.`.
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes a directory's entries (makes a rename or create in it durable).
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).at(dir)?;
    f.sync_all().at(dir)
}

/// A handle on the filesystem holding a path, opened before the writes it is to make
/// durable: `syncfs(2)` reports a writeback error only if it happened after the handle was
/// opened, so one opened just before the flush would miss the failure of a page whose
/// writeback the build started early (`sync_file_range`).
#[derive(Debug)]
pub struct FsFlush {
    file: File,
    path: PathBuf,
}

impl FsFlush {
    /// Opens the handle on `path` (a directory or file of the filesystem).
    pub fn open(path: &Path) -> Result<FsFlush> {
        Ok(FsFlush {
            file: File::open(path).at(path)?,
            path: path.to_path_buf(),
        })
    }

    /// Writes back every dirty page and inode of the filesystem and waits for it; fails
    /// if any writeback on it failed since the handle was opened (or since the last call).
    pub fn flush(&self) -> Result<()> {
        nix::unistd::syncfs(&self.file).at(&self.path)
    }
}

/// Starts writing `f`'s dirty pages to disk without waiting (best effort: a failure shows
/// at the next `syncfs` or fsync).
pub fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on a descriptor borrowed for the call; it only schedules
    // writeback.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Bytes the whole system has yet to write back (`Dirty` and `Writeback` in
/// `/proc/meminfo`): what a [`syncfs`] may wait for besides the caller's own writes (an
/// over-estimate: other filesystems count too).
pub fn unwritten_bytes() -> Option<u64> {
    parse_unwritten(&fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_unwritten(meminfo: &str) -> Option<u64> {
    let kib = |key: &str| {
        meminfo.lines().find_map(|l| {
            let value = l.strip_prefix(key)?.strip_prefix(':')?;
            value.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some((kib("Dirty")? + kib("Writeback")?) * 1024)
}

/// Replaces `path` with `bytes` atomically and durably (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Replaces `path` with `bytes` atomically (temporary file, rename) but without syncing:
/// for notes that only matter while the machine stays up.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut w = AtomicWriter::create(path, false)?;
    w.write(bytes)?;
    w.commit()
}

/// Like `write_atomic`, streaming: `fill` writes the content through a buffer, so large
/// files (a 200,000-line manifest) never exist whole in memory.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = tmp_sibling(path);
    // Errors name `path`, the file the caller asked for: the temporary name beside it is
    // ours, and a user reading "cannot write .rk-tmp.x.123.0" would not know what failed.
    let result = (|| {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .at(path)?;
        let mut w = std::io::BufWriter::with_capacity(256 * 1024, f);
        fill(&mut w).at(path)?;
        let f = w.into_inner().map_err(|e| e.into_error()).at(path)?;
        f.sync_all().at(path)?;
        fs::rename(&tmp, path).at(path)?;
        fsync_dir(parent_of(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The name a write to `path` lands on, reached as the shell's `>` reaches it: symlinks
/// followed (a relative target from the link's directory) down to a name that is no
/// symlink. A dangling link leads to the name the write would create.
pub fn follow_links(path: &Path) -> Result<PathBuf> {
    let mut name = path.to_path_buf();
    // The kernel's own limit on links followed in one lookup (MAXSYMLINKS).
    for _ in 0..40 {
        match fs::symlink_metadata(&name) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&name).at(&name)?;
                // `join` with an absolute target is that target.
                name = parent_of(&name).join(target);
            }
            _ => return Ok(name),
        }
    }
    Err(Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::from_raw_os_error(libc::ELOOP),
    })
}

/// Writes `bytes` to a file a user named for output (`manifest -o FILE`). A regular file,
/// or a name not taken yet, is replaced atomically (`write_atomic`); a device, fifo or
/// socket is written through and stays what it is; a symlink is followed to what it names,
/// which is then written the same way, and stays a link.
pub fn write_output(path: &Path, bytes: &[u8]) -> Result<()> {
    let real = follow_links(path)?;
    match fs::metadata(&real) {
        // Renamed over, `/dev/null` (as root) or a fifo a CI step reads from would be
        // replaced by a regular file: the shell's `>` writes into them instead.
        Ok(m) if !m.is_file() && !m.is_dir() => {
            let mut f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
                .open(&real)
                .at(path)?;
            f.write_all(bytes).at(path)?;
            f.flush().at(path)
        }
        _ => write_atomic(&real, bytes),
    }
}

/// A file written under a temporary name beside `path` and put in place by `commit`
/// (rename, after an fsync when `durable`); dropped without `commit`, it removes itself.
/// For big files produced piecewise (a 200,000-line release manifest written while the
/// release is built), so they never exist whole in memory.
#[derive(Debug)]
pub struct AtomicWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<std::io::BufWriter<File>>,
    durable: bool,
}

impl AtomicWriter {
    /// Starts a new file that will replace `path`. Errors name `path`, as
    /// `write_atomic_with`'s do.
    pub fn create(path: &Path, durable: bool) -> Result<AtomicWriter> {
        let tmp = tmp_sibling(path);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)
            .at(path)?;
        Ok(AtomicWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(std::io::BufWriter::with_capacity(128 * 1024, f)),
            durable,
        })
    }

    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match self.out.as_mut() {
            Some(w) => w.write_all(bytes).at(&self.path),
            None => Ok(()),
        }
    }

    /// The temporary file, readable once `flush`ed.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Writes out what is buffered (the temporary file is then complete so far).
    pub fn flush(&mut self) -> Result<()> {
        match self.out.as_mut() {
            Some(w) => w.flush().at(&self.path),
            None => Ok(()),
        }
    }

    /// Starts the writeback of what was written so far, so a later flush has less to wait
    /// for.
    pub fn start_writeback(&mut self) {
        if let Some(w) = self.out.as_mut() {
            if w.flush().is_ok() {
                start_writeback(w.get_ref());
            }
        }
    }

    /// Puts the file in place: fsync (when durable), rename, fsync of the directory.
    pub fn commit(mut self) -> Result<()> {
        let Some(w) = self.out.take() else {
            return Ok(());
        };
        let result = (|| {
            let f = w.into_inner().map_err(|e| e.into_error()).at(&self.path)?;
            if self.durable {
                f.sync_all().at(&self.path)?;
            }
            fs::rename(&self.tmp, &self.path).at(&self.path)?;
            if self.durable {
                fsync_dir(parent_of(&self.path))?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        result
    }
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A copy of a file held under a temporary name in a directory until `place` gives it
/// its final name; dropped unplaced, it removes itself.
#[derive(Debug)]
pub struct HeldFile {
    tmp: PathBuf,
    placed: bool,
}

impl HeldFile {
    /// Copies `src` to a temporary name in `dir` (named after `like`) with mode `mode`.
    pub fn copy(src: &Path, dir: &Path, like: &Path, mode: u32) -> Result<HeldFile> {
        let tmp = tmp_sibling(&dir.join(like.file_name().unwrap_or_default()));
        // Dropped on an error below, it removes what the copy made.
        let held = HeldFile { tmp, placed: false };
        copy_new(src, &held.tmp, mode)?;
        Ok(held)
    }

    /// Gives the file the name `to`, never replacing what is there: `Ok(false)` when `to`
    /// exists (the copy is dropped). Across filesystems (a mount inside `shared/`) it is
    /// copied there instead.
    pub fn place(mut self, to: &Path) -> Result<bool> {
        let renamed = nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &self.tmp,
            nix::fcntl::AT_FDCWD,
            to,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        );
        match renamed {
            Ok(()) => {
                self.placed = true;
                Ok(true)
            }
            Err(nix::errno::Errno::EEXIST) => Ok(false),
            Err(nix::errno::Errno::EXDEV) => {
                let mode = fs::metadata(&self.tmp).at(&self.tmp)?.permissions().mode();
                match copy_new(&self.tmp, to, mode) {
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        Ok(false)
                    }
                    other => other.map(|()| true),
                }
            }
            Err(e) => Err(e).at(to),
        }
    }
}

/// Copies `src` to the new file `to` (never replacing one: `AlreadyExists`), giving it
/// `mode` once written: set on the open file after the copy, as the mode may be read-only,
/// and a file only ever visible with its final bits is never briefly wider than them.
fn copy_new(src: &Path, to: &Path, mode: u32) -> Result<()> {
    let mut from = File::open(src).at(src)?;
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(to)
        .at(to)?;
    std::io::copy(&mut from, &mut out).at(to)?;
    out.set_permissions(fs::Permissions::from_mode(mode)).at(to)
}

impl Drop for HeldFile {
    fn drop(&mut self) {
        if !self.placed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Points the symlink `link` at `target` atomically: a new symlink under a temporary name
/// is renamed over `link`, then the directory is fsynced. `link` never disappears.
pub fn swap_symlink(link: &Path, target: &Path) -> Result<()> {
    let tmp = tmp_sibling(link);
    let result = (|| {
        std::os::unix::fs::symlink(target, &tmp).at(link)?;
        fs::rename(&tmp, link).at(link)?;
        fsync_dir(parent_of(link))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Puts a new symlink to `target` at `path` and moves what was there to `aside` (a free
/// name on the same filesystem), in one `rename(2)` with `RENAME_EXCHANGE`: `path` is
/// never missing, not even for the moment between moving the old entry away and linking
/// the new one. A crash before the exchange leaves only a stray link at `aside`.
pub fn exchange_with_symlink(path: &Path, aside: &Path, target: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, aside).at(aside)?;
    let exchanged = nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        aside,
        nix::fcntl::AT_FDCWD,
        path,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .at(path);
    if let Err(e) = exchanged {
        let _ = fs::remove_file(aside);
        return Err(e);
    }
    fsync_dir(parent_of(aside))?;
    fsync_dir(parent_of(path))
}

/// Renames `from` to `to`, failing with EEXIST instead of replacing `to`.
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .at(to)
}

/// Opens the directory `dir` without following a symlink at its last component. For
/// `deploy-cache/` above all: an uploader may replace it with a link to anywhere (another
/// site's `deploy-cache/`), and nothing may then be read, claimed or removed through it.
/// A symlink there is an error that says so.
pub fn open_dir_nofollow(dir: &Path) -> Result<std::os::fd::OwnedFd> {
    use nix::fcntl::OFlag;
    nix::fcntl::openat(
        nix::fcntl::AT_FDCWD,
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        let link = matches!(e, nix::errno::Errno::ENOTDIR | nix::errno::Errno::ELOOP)
            && fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
        if link {
            Error::Failed(format!(
                "{} is a symlink, not a directory: nothing is read through it (make it a \
                 directory again)",
                dir.display()
            ))
        } else {
            Error::Io {
                path: dir.to_path_buf(),
                source: e.into(),
            }
        }
    })
}

/// True when `path` is a directory itself, not a symlink to one.
pub fn is_real_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Creates `dir` (and parents) if missing, with `mode` for the ones created.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<()> {
    make_dir(dir, mode, None)
}

/// `ensure_dir`, giving the parents it creates `parents_mode` whatever the umask; parents
/// that already exist are left as they are.
pub fn ensure_dir_and_parents(dir: &Path, mode: u32, parents_mode: u32) -> Result<()> {
    make_dir(dir, mode, Some(parents_mode))
}

fn make_dir(dir: &Path, mode: u32, parents_mode: Option<u32>) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Failed(format!(
            "{} exists but is not a directory",
            dir.display()
        ))),
        Err(_) => {
            if let Some(parents_mode) = parents_mode {
                make_parents(dir, parents_mode)?;
            }
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)
                .at(dir)?;
            // `mkdir` applies the umask: without this a 0775 `deploy-cache/` would come
            // out 0755 under the unit's `UMask=0022`, closed to the uploaders' group.
            set_mode(dir, mode)?;
            fsync_dir(parent_of(dir))
        }
    }
}

/// Creates the missing ancestors of `dir`, top down, each with `mode` (not masked by the
/// umask: under `umask 077` a root-owned parent would keep `init --owner`'s user from
/// even reaching the root).
fn make_parents(dir: &Path, mode: u32) -> Result<()> {
    let mut missing = Vec::new();
    let mut next = dir.parent();
    while let Some(p) = next.filter(|p| !p.as_os_str().is_empty()) {
        if fs::symlink_metadata(p).is_ok() {
            break;
        }
        missing.push(p);
        next = p.parent();
    }
    for p in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(mode).create(p) {
            Ok(()) => {
                set_mode(p, mode)?;
                fsync_dir(parent_of(p))?;
            }
            // Made meanwhile by someone else: theirs, left as it is.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).at(p),
        }
    }
    Ok(())
}

/// Sets the permission bits of `path` (followed if a symlink: only used on directories the
/// keeper made or owns).
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).at(path)
}

/// Gives `path` itself (never a symlink's target) to `uid`:`gid`.
pub fn chown(path: &Path, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid.as_raw()), Some(gid.as_raw())).at(path)
}

/// Gives `dir` and everything under it to `uid`:`gid`, without following symlinks.
pub fn chown_tree(dir: &Path, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> Result<()> {
    chown(dir, uid, gid)?;
    if !fs::symlink_metadata(dir).at(dir)?.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        chown_tree(&path, uid, gid)?;
    }
    Ok(())
}

use std::os::unix::fs::DirBuilderExt;

/// How long a directory must have been left unchanged before its listing is reused: far
/// more than any timestamp granularity (ext4: a clock tick; FAT: 2 s), so any later
/// change is bound to give it another mtime.
const SETTLED: Duration = Duration::from_secs(3);

/// What identifies one version of a file or directory: appending to a file changes its
/// size and mtime, replacing it changes the inode, and adding, removing or renaming a
/// directory's entry sets its mtime and ctime to the current time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of this metadata.
    pub fn of(m: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// True when both times are at least `SETTLED` in the past: a change after `now`
    /// cannot leave them as they are.
    fn settled(&self, now: std::time::SystemTime) -> bool {
        let Ok(now) = now.duration_since(std::time::UNIX_EPOCH) else {
            return false;
        };
        let limit = now.saturating_sub(SETTLED);
        let before = |(s, ns): (i64, i64)| {
            u64::try_from(s).is_ok_and(|s| {
                Duration::new(s, u32::try_from(ns).unwrap_or(u32::MAX).min(999_999_999)) < limit
            })
        };
        before(self.mtime) && before(self.ctime)
    }
}

/// Directory listings kept between calls and re-read only when the directory changed: a
/// `stat` instead of an open, two `getdents` and a close (and the file system's directory
/// walk) for a directory that did not change, which is every directory of an idle site.
/// A listing is reused only if the directory had been left alone for a while when it was
/// read (`SETTLED`), so a change in the same timestamp tick as the read is never missed.
#[derive(Debug, Default)]
pub struct Listings {
    dirs: std::collections::HashMap<PathBuf, (Stamp, Listing)>,
}

/// The entries of a directory, unsorted: name and type (the type as `readdir` gives it
/// where the file system records it, so most listings cost no `stat` per entry). An
/// entry's type cannot change without its name being replaced, which changes the
/// directory.
pub type Listing = std::sync::Arc<Vec<(OsString, fs::FileType)>>;

impl Listings {
    /// The stamp of `dir` as of its last listing, if that listing is kept (the directory
    /// had settled): equal stamps at two listings mean the same entries all along.
    pub fn stamp(&self, dir: &Path) -> Option<Stamp> {
        self.dirs.get(dir).map(|(stamp, _)| *stamp)
    }

    /// The entries of `dir` (following a symlink, as `read_dir` does).
    pub fn names(&mut self, dir: &Path) -> std::io::Result<Listing> {
        // The stamp is taken before the listing: a change during the read changes the
        // stamp again, so the next call reads again instead of keeping a stale listing.
        let stamp = Stamp::of(&fs::metadata(dir)?);
        if let Some((seen, names)) = self.dirs.get(dir) {
            if *seen == stamp {
                return Ok(std::sync::Arc::clone(names));
            }
        }
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            match entry.file_type() {
                Ok(kind) => names.push((entry.file_name(), kind)),
                // Gone since the directory was read (a type the file system does not
                // record costs an lstat): it is not there any more.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let names = std::sync::Arc::new(names);
        if stamp.settled(std::time::SystemTime::now()) {
            self.dirs
                .insert(dir.to_path_buf(), (stamp, std::sync::Arc::clone(&names)));
        } else {
            self.dirs.remove(dir);
        }
        Ok(names)
    }
}

/// An exclusive `flock` held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
    path: PathBuf,
    /// The lock file's directory, locked first, for the operation lock (see [`op_lock`]);
    /// released after the file (fields drop in order).
    _dir: Option<File>,
}

impl Lock {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True while the path still names the locked file. A lock file deleted by hand, or
    /// with its whole directory, still holds its flock, but nobody else can see it: a
    /// second holder could take a new file at the same path.
    pub fn still_named(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self._file.metadata(), fs::symlink_metadata(&self.path)) {
            (Ok(held), Ok(named)) => held.dev() == named.dev() && held.ino() == named.ino(),
            _ => false,
        }
    }
}

/// A shared `flock` on an existing file, held until dropped: the service holds one on the
/// claim of an upload it waits for without the operation lock, so that a healing pass run
/// meanwhile by a command tells that upload from one a crash interrupted.
#[derive(Debug)]
pub struct Hold {
    _file: File,
}

/// Takes a shared lock on the existing file `path`, without waiting; `None` when it cannot
/// (the file is gone, or someone holds it exclusively).
pub fn hold(path: &Path) -> Option<Hold> {
    let file = open_nofollow(path).ok()?;
    file.try_lock_shared().ok()?;
    Some(Hold { _file: file })
}

/// True when another open file holds a lock on `path` (see [`hold`]). False when the file
/// cannot be opened: there is nothing to wait for then.
pub fn held(path: &Path) -> bool {
    let Ok(file) = open_nofollow(path) else {
        return false;
    };
    matches!(file.try_lock(), Err(fs::TryLockError::WouldBlock))
}

/// Takes the exclusive lock on `path` (creating the file). `None` waits forever,
/// `Some(d)` waits up to `d` (zero: do not wait). Returns `Ok(None)` when still busy.
pub fn lock(path: &Path, wait: Option<Duration>) -> Result<Option<Lock>> {
    let file = open_lock_file(path)?;
    Ok(flock_within(&file, path, wait)?.then(|| Lock {
        _file: file,
        path: path.to_path_buf(),
        _dir: None,
    }))
}

/// Takes a site's operation lock, the lock file at `path` (created if missing): an
/// exclusive `flock` on its directory (`.release-keeper/`), then on the file. `None` waits
/// forever, `Some(d)` waits up to `d` in all (zero: do not wait); `Ok(None)` when still busy.
///
/// The directory's lock is what keeps two operations apart: a lock file deleted while held
/// (by hand, by a cleanup script) keeps its `flock` on an inode nobody else can open, and
/// the next operation would lock a new file at the path and run alongside. A directory
/// holding the journal is not deleted in passing. The file's lock is kept for whoever
/// locks `.release-keeper/lock` from outside (a script holding the site still, an older
/// release-keeper). Each is taken on what its path names once locked (see [`lock_named`]).
pub fn op_lock(path: &Path, wait: Option<Duration>) -> Result<Option<Lock>> {
    let deadline = wait.map(|w| Instant::now() + w);
    let mut dir_lock = Lockable::open(parent_of(path), true)?;
    let mut file_lock = Lockable::open(path, false)?;
    if !lock_pair(&mut dir_lock, &mut file_lock, path, deadline)? {
        return Ok(None);
    }
    Ok(Some(Lock {
        _file: file_lock.file,
        path: path.to_path_buf(),
        _dir: Some(dir_lock.file),
    }))
}

/// A lock file, or a lock file's directory, open to be locked, with the device and inode
/// it had when opened (an open file keeps them).
#[derive(Debug)]
struct Lockable {
    file: File,
    id: (u64, u64),
}

impl Lockable {
    /// Opens the directory (`dir`) or the lock file (created if missing) at `path`.
    fn open(path: &Path, dir: bool) -> Result<Lockable> {
        use std::os::unix::fs::MetadataExt;
        let file = if dir {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(path)
                .at(path)?
        } else {
            open_lock_file(path)?
        };
        let meta = file.metadata().at(path)?;
        Ok(Lockable {
            file,
            id: (meta.dev(), meta.ino()),
        })
    }

    /// True when `path` names this file (a deleted or replaced one does not).
    fn named_by(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }
}

/// The operation lock's two steps (see [`op_lock`]): the directory of the lock file
/// `path`, then the file, each as [`lock_named`] takes it. False when still busy at the
/// deadline, with neither held.
fn lock_pair(
    dir: &mut Lockable,
    file: &mut Lockable,
    path: &Path,
    deadline: Option<Instant>,
) -> Result<bool> {
    if !lock_named(dir, parent_of(path), true, deadline)? {
        return Ok(false);
    }
    match lock_named(file, path, false, deadline) {
        Ok(true) => Ok(true),
        other => {
            // Unlocked, not closed: a kept `LockFile` locks it again at its next use. On
            // an open descriptor `flock(LOCK_UN)` cannot fail, and a lock left would be
            // this process's own, taken again by that next use.
            let _ = dir.file.unlock();
            other
        }
    }
}

/// Takes the exclusive `flock` on `held` until `deadline` (`None`: no limit), and keeps
/// it only if `path` still names it once locked: otherwise (deleted or replaced meanwhile)
/// `held` is reopened at `path` and locked in turn. A lock on a file the path no longer
/// names locks nobody out. False when still busy at the deadline.
fn lock_named(
    held: &mut Lockable,
    path: &Path,
    dir: bool,
    deadline: Option<Instant>,
) -> Result<bool> {
    loop {
        let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if !flock_within(&held.file, path, wait)? {
            return Ok(false);
        }
        if held.named_by(path) {
            return Ok(true);
        }
        held.file.unlock().at(path)?;
        *held = Lockable::open(path, dir)?;
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .at(path)
}

/// Takes the exclusive `flock` on `file`, waiting forever (`None`) or up to `wait`;
/// false when it is still busy.
fn flock_within(file: &File, path: &Path, wait: Option<Duration>) -> Result<bool> {
    let Some(limit) = wait else {
        file.lock().at(path)?;
        return Ok(true);
    };
    let deadline = Instant::now() + limit;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(true),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(e).at(path),
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        // flock has no timed wait; a short poll only while a caller asked to wait.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An operation lock (see [`op_lock`]) kept open between uses, so that taking the lock
/// is two `flock`s and two `stat`s (that the paths still name what is locked) instead of
/// opens, `flock`s and closes (the service takes its operation lock for every job).
#[derive(Debug)]
pub struct LockFile {
    dir: Lockable,
    file: Lockable,
    path: PathBuf,
    /// The site whose lock this is: a failure to unlock is logged from `Drop`, where no
    /// caller can add it.
    site: String,
}

/// The lock of a `LockFile`, held until dropped (the file stays open).
#[derive(Debug)]
pub struct Held<'a>(&'a LockFile);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // Closing would release them too; unlocking keeps them open for the next use. The
        // file first: the directory's lock is the one that keeps operations apart.
        self.0.unlock_file();
        self.0.unlock_dir();
    }
}

impl LockFile {
    /// Opens (creating) the operation lock file at `path` of site `site`, and its
    /// directory, without locking them.
    pub fn open(path: &Path, site: &str) -> Result<LockFile> {
        Ok(LockFile {
            dir: Lockable::open(parent_of(path), true)?,
            file: Lockable::open(path, false)?,
            path: path.to_path_buf(),
            site: site.to_string(),
        })
    }

    /// Takes the lock, waiting up to `wait`; `Ok(None)` when it is still busy. A directory
    /// or file the path no longer names is opened again first (see [`lock_named`]).
    pub fn acquire(&mut self, wait: Duration) -> Result<Option<Held<'_>>> {
        let deadline = Some(Instant::now() + wait);
        let locked = lock_pair(&mut self.dir, &mut self.file, &self.path, deadline)?;
        Ok(locked.then_some(Held(self)))
    }

    fn unlock_file(&self) {
        self.unlock(&self.file.file, &self.path);
    }

    fn unlock_dir(&self) {
        self.unlock(&self.dir.file, parent_of(&self.path));
    }

    fn unlock(&self, file: &File, path: &Path) {
        if let Err(e) = file.unlock() {
            tracing::warn!(event = crate::events::SITE_ERROR, site = %self.site,
                path = %path.display(), reason = %e, "cannot unlock");
        }
    }
}

/// Appends one line (a `\n` is added) to the journal at `path` durably. A torn tail left
/// by a crash mid-append is cut off first so every complete line stays parseable; a last
/// line that is complete but lacks its newline gets one.
pub fn append_line(path: &Path, line: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
        .at(path)?;
    let len = f.metadata().at(path)?.len();
    let mut prefix_newline = false;
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1)).at(path)?;
        f.read_exact(&mut last).at(path)?;
        if last[0] != b'\n' {
            let keep = last_newline_end(path)?;
            // A torn write never forms a complete JSON value (its closing brace comes
            // last): a complete one lost only its newline (a hand edit, an editor that
            // strips it) and is a record to keep, not to cut off.
            let mut tail = Vec::new();
            f.seek(SeekFrom::Start(keep)).at(path)?;
            f.read_to_end(&mut tail).at(path)?;
            if serde_json::from_slice::<serde_json::Value>(&tail).is_ok() {
                prefix_newline = true;
            } else {
                f.set_len(keep).at(path)?;
            }
        }
    }
    let mut buf = Vec::with_capacity(line.len() + 2);
    if prefix_newline {
        buf.push(b'\n');
    }
    buf.extend_from_slice(line);
    buf.push(b'\n');
    f.write_all(&buf).at(path)?;
    f.sync_data().at(path)
}

/// Length of `path` up to and including its last newline.
fn last_newline_end(path: &Path) -> Result<u64> {
    let data = fs::read(path).at(path)?;
    Ok(data
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i as u64 + 1))
}

/// Removes a tree the keeper made read-only: directories get their write bit back first
/// (a non-root service user could not unlink inside a 0555 directory otherwise).
pub fn remove_tree(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).at(path),
    };
    if meta.is_dir() {
        make_dirs_writable(path)?;
        fs::remove_dir_all(path).at(path)
    } else {
        fs::remove_file(path).at(path)
    }
}

/// Gives every directory under `dir` (not following symlinks) owner rwx.
fn make_dirs_writable(dir: &Path) -> Result<()> {
    let fd = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(std::io::Error::from)
    .at(dir)?;
    writable_at(fd, dir)
}

/// Gives the directory open at `fd` and every directory under it owner rwx, through
/// descriptors: a tree deeper than PATH_MAX (which `mkdirat` can make) stays removable.
fn writable_at(fd: std::os::fd::OwnedFd, top: &Path) -> Result<()> {
    use nix::sys::stat::{fchmod, fstat, Mode};
    let io = |e: nix::errno::Errno| std::io::Error::from(e);
    let st = fstat(&fd).map_err(io).at(top)?;
    if st.st_mode & 0o700 != 0o700 {
        fchmod(&fd, Mode::from_bits_truncate((st.st_mode | 0o700) & 0o7777))
            .map_err(io)
            .at(top)?;
    }
    let mut subdirs = Vec::new();
    let mut listing = nix::dir::Dir::from_fd(fd.try_clone().at(top)?)
        .map_err(io)
        .at(top)?;
    for entry in listing.iter() {
        let entry = entry.map_err(io).at(top)?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        if entry.file_type() == Some(nix::dir::Type::Directory) || entry.file_type().is_none() {
            subdirs.push(name.to_owned());
        }
    }
    drop(listing);
    for name in subdirs {
        let sub = nix::fcntl::openat(
            &fd,
            name.as_c_str(),
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        );
        match sub {
            Ok(sub) => writable_at(sub, top)?,
            // Not a directory after all (unknown type from getdents), or a symlink.
            Err(nix::errno::Errno::ENOTDIR | nix::errno::Errno::ELOOP) => {}
            // Unreadable and not ours to fix here: remove_dir_all reports it.
            Err(_) => {}
        }
    }
    Ok(())
}

/// Deletes `path` the safe way: one rename into `trash_dir` (so it stops being visible
/// where it was at once), fsync of both directories, then the slow removal.
pub fn trash_and_remove(path: &Path, trash_dir: &Path) -> Result<()> {
    let dest = move_to_trash(path, trash_dir)?;
    remove_tree(&dest)
}

/// The first half of a deletion: one rename of `path` into `trash_dir`, made durable (or,
/// across filesystems, to a temporary name beside it). What is left after a failure is
/// removed by the next healing pass.
pub fn move_to_trash(path: &Path, trash_dir: &Path) -> Result<PathBuf> {
    ensure_dir(trash_dir, 0o700)?;
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let mut dest;
    let mut n = 0u32;
    loop {
        let mut candidate = name.clone();
        candidate.push(format!(".{}.{n}", std::process::id()));
        dest = trash_dir.join(candidate);
        if fs::symlink_metadata(&dest).is_err() {
            break;
        }
        n += 1;
    }
    match fs::rename(path, &dest) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            // `releases/` on a filesystem of its own (a volume mounted there): no rename
            // reaches the trash, and every pruning failed while the disk filled. A hidden
            // temporary name beside it takes the release out of `releases/<id>` just as
            // atomically; healing removes such a leftover if the removal is cut short.
            let beside = tmp_sibling(path);
            fs::rename(path, &beside).at(path)?;
            fsync_dir(parent_of(path))?;
            return Ok(beside);
        }
        Err(e) => return Err(e).at(path),
    }
    fsync_dir(parent_of(path))?;
    fsync_dir(trash_dir)?;
    Ok(dest)
}

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).at(path)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Opens `path` for reading without following a symlink there, and without blocking on a
/// fifo.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Opens a file an uploader controls for reading, refusing symlinks (O_NOFOLLOW), anything
/// but a regular file (a fifo would block: O_NONBLOCK) and files over `limit` bytes. The
/// rejection reasons do not name the path: callers name the file as users know it.
pub fn open_small_nofollow(path: &Path, limit: u64) -> Result<File> {
    checked_small(path, open_nofollow(path), limit)
}

/// `open_small_nofollow` of the file `name` in the open directory `dir` (whose path is
/// `path`'s parent): neither the directory nor the file is reached through a symlink.
pub fn open_small_nofollow_at(
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
    path: &Path,
    limit: u64,
) -> Result<File> {
    checked_small(path, open_nofollow_at(dir, name), limit)
}

/// `open_nofollow` of the file `name` in the open directory `dir`.
pub fn open_nofollow_at(
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
) -> std::io::Result<File> {
    use nix::fcntl::OFlag;
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map(File::from)
    .map_err(std::io::Error::from)
}

fn checked_small(path: &Path, opened: std::io::Result<File>, limit: u64) -> Result<File> {
    let f = opened.map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => Error::Rejected("is a symlink".into()),
        _ => Error::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let meta = f.metadata().at(path)?;
    if !meta.is_file() {
        return Err(Error::Rejected(format!(
            "is a {}, not a regular file",
            crate::upload::walk::kind_name(std::os::unix::fs::MetadataExt::mode(&meta))
        )));
    }
    if meta.len() > limit {
        return Err(Error::Rejected(format!("is larger than {limit} bytes")));
    }
    Ok(f)
}

/// Reads a small file with the checks of `open_small_nofollow`.
pub fn read_small_nofollow(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let f = open_small_nofollow(path, limit)?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).at(path)?;
    Ok(buf)
}

/// Runs `f` with the calling thread's I/O in the idle class (best effort: schedulers that
/// ignore classes, or a refusal, just leave the priority as it was): for work nobody waits
/// on, like deleting a pruned release, so it never slows the live site or a deploy.
pub fn at_idle_io<T>(f: impl FnOnce() -> T) -> T {
    const WHO_PROCESS: libc::c_long = 1; // IOPRIO_WHO_PROCESS; id 0 = this thread
    const CLASS_IDLE: libc::c_long = 3 << 13; // IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT
                                              // SAFETY: ioprio_get/ioprio_set take plain integers and touch only this thread.
    let before = unsafe { libc::syscall(libc::SYS_ioprio_get, WHO_PROCESS, 0) };
    let lowered = before >= 0
        && unsafe { libc::syscall(libc::SYS_ioprio_set, WHO_PROCESS, 0, CLASS_IDLE) } == 0;
    let out = f();
    if lowered {
        // SAFETY: as above; restores the value read before.
        unsafe { libc::syscall(libc::SYS_ioprio_set, WHO_PROCESS, 0, before) };
    }
    out
}

/// Bytes of a path, for names that must round-trip exactly.
pub fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// A path from raw bytes.
pub fn path_from_bytes(b: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn unwritten_bytes_are_dirty_plus_writeback() {
        let meminfo = "MemTotal:       24000000 kB\nDirty:              1200 kB\n\
                       Writeback:            34 kB\nWritebackTmp:          9 kB\n";
        assert_eq!(parse_unwritten(meminfo), Some((1200 + 34) * 1024));
        assert_eq!(parse_unwritten("Dirty: 5 kB\n"), None);
        assert_eq!(parse_unwritten("Dirty: x kB\nWriteback: 0 kB\n"), None);
        // This machine's own file reads the same way.
        assert!(unwritten_bytes().is_some());
    }

    #[test]
    fn swap_symlink_replaces_without_gap() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("current");
        swap_symlink(&link, Path::new("releases/a")).unwrap();
        swap_symlink(&link, Path::new("releases/b")).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("releases/b"));
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary symlink left behind");
    }

    #[test]
    fn append_line_cuts_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("journal");
        append_line(&j, b"{\"a\":1}").unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&j)
            .unwrap()
            .write_all(b"{\"tor")
            .unwrap();
        append_line(&j, b"{\"b\":2}").unwrap();
        assert_eq!(fs::read_to_string(&j).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
    }

    #[test]
    fn rename_noreplace_refuses_existing() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        assert!(rename_noreplace(&a, &b).is_err());
        assert!(a.exists());
    }

    #[test]
    fn lock_is_exclusive_and_reports_busy() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let held = lock(&p, Some(Duration::ZERO)).unwrap();
        assert!(held.is_some());
        assert!(lock(&p, Some(Duration::from_millis(100)))
            .unwrap()
            .is_none());
        drop(held);
        assert!(lock(&p, Some(Duration::ZERO)).unwrap().is_some());
    }

    #[test]
    fn remove_tree_handles_read_only_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t/a/b");
        fs::create_dir_all(&t).unwrap();
        fs::write(t.join("f"), b"x").unwrap();
        for d in [
            dir.path().join("t/a/b"),
            dir.path().join("t/a"),
            dir.path().join("t"),
        ] {
            fs::set_permissions(&d, fs::Permissions::from_mode(0o555)).unwrap();
        }
        remove_tree(&dir.path().join("t")).unwrap();
        assert!(!dir.path().join("t").exists());
    }

    #[test]
    fn idle_io_is_set_for_the_call_and_restored() {
        let get = || unsafe { libc::syscall(libc::SYS_ioprio_get, 1 as libc::c_long, 0) };
        let before = get();
        let inside = at_idle_io(get);
        assert_eq!(inside >> 13, 3, "idle class inside: {inside:#x}");
        assert_eq!(get(), before);
    }

    #[test]
    fn remove_tree_handles_read_only_trees_deeper_than_path_max() {
        use nix::fcntl::{open, openat, OFlag};
        use nix::sys::stat::{fchmod, mkdirat, Mode};
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("t");
        fs::create_dir(&top).unwrap();
        let name = "d".repeat(200);
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        let mut fd = open(&top, flags, Mode::empty()).unwrap();
        // 30 levels of 200-byte names: 6,000 bytes, beyond PATH_MAX (4,096).
        for _ in 0..30 {
            mkdirat(&fd, name.as_str(), Mode::from_bits_truncate(0o755)).unwrap();
            let sub = openat(&fd, name.as_str(), flags, Mode::empty()).unwrap();
            fchmod(&fd, Mode::from_bits_truncate(0o555)).unwrap();
            fd = sub;
        }
        remove_tree(&top).unwrap();
        assert!(!top.exists());
    }

    #[test]
    fn kept_lock_file_locks_out_others_only_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let mut file = LockFile::open(&p, "test").unwrap();
        let held = file.acquire(Duration::ZERO).unwrap();
        assert!(held.is_some());
        assert!(op_lock(&p, Some(Duration::ZERO)).unwrap().is_none());
        drop(held);
        let other = op_lock(&p, Some(Duration::ZERO)).unwrap();
        assert!(other.is_some());
        assert!(file.acquire(Duration::ZERO).unwrap().is_none());
        drop(other);
        assert!(file.acquire(Duration::ZERO).unwrap().is_some());
    }

    /// A lock file deleted, or replaced, while held lets nobody else in: the directory's
    /// lock is still held. Once free, the lock is taken on the file now at the path.
    #[test]
    fn op_lock_holds_when_its_file_is_deleted_or_replaced() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let held = op_lock(&p, Some(Duration::ZERO)).unwrap().unwrap();
        fs::remove_file(&p).unwrap();
        assert!(op_lock(&p, Some(Duration::ZERO)).unwrap().is_none());
        let mut kept = LockFile::open(&p, "test").unwrap();
        assert!(kept.acquire(Duration::ZERO).unwrap().is_none());
        fs::write(dir.path().join("new"), b"").unwrap();
        fs::rename(dir.path().join("new"), &p).unwrap();
        assert!(op_lock(&p, Some(Duration::ZERO)).unwrap().is_none());
        drop(held);
        let again = op_lock(&p, Some(Duration::ZERO)).unwrap().unwrap();
        assert!(again.path() == p);
        drop(again);
        // The kept lock opened a file since replaced: it moves to the one at the path,
        // which an outside `flock` on the path then finds held.
        let held = kept.acquire(Duration::ZERO).unwrap().unwrap();
        let outside = File::open(&p).unwrap();
        assert!(matches!(
            outside.try_lock(),
            Err(fs::TryLockError::WouldBlock)
        ));
        drop(held);
        assert_eq!(kept.file.id.1, fs::metadata(&p).unwrap().ino());
    }

    fn sorted_names(l: &mut Listings, dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = l
            .names(dir)
            .unwrap()
            .iter()
            .map(|(n, _)| n.to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn listings_are_kept_only_for_settled_directories_and_see_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("a"), b"").unwrap();
        fs::create_dir(d.join("sub")).unwrap();
        let mut l = Listings::default();
        // Just changed: read, not kept (a change in the same tick could go unseen).
        assert_eq!(sorted_names(&mut l, d), ["a", "sub"]);
        assert!(l.stamp(d).is_none());
        std::thread::sleep(SETTLED + Duration::from_millis(200));
        assert_eq!(sorted_names(&mut l, d), ["a", "sub"]);
        let kept = l.stamp(d);
        assert!(kept.is_some());
        let first = l.names(d).unwrap();
        let again = l.names(d).unwrap();
        assert!(
            std::sync::Arc::ptr_eq(&first, &again),
            "reused while unchanged"
        );
        assert!(first
            .iter()
            .any(|(n, kind)| n.as_os_str() == "sub" && kind.is_dir()));
        // Any change to the entries is seen at the next call.
        fs::write(d.join("b"), b"").unwrap();
        assert_eq!(sorted_names(&mut l, d), ["a", "b", "sub"]);
        assert!(l.stamp(d).is_none());
        fs::remove_file(d.join("a")).unwrap();
        assert_eq!(sorted_names(&mut l, d), ["b", "sub"]);
        // A change inside an entry is not a change of the directory's entries.
        fs::write(d.join("b"), b"content").unwrap();
        assert_eq!(sorted_names(&mut l, d), ["b", "sub"]);
    }
}
