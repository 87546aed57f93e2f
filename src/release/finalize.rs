//! Building a release from `deploy-cache/` under `releases/.partial.<id>`.
//!
//! One pass per file: each byte is read once, hashed and written together. A file whose
//! stat key is unchanged since the hash cache saw it is not read at all: it becomes a hard
//! link to the identical (same digest, same mode) file of the previous release, which was
//! verified when that release was made. Nothing is ever linked to `deploy-cache/` itself,
//! so an uploader rewriting a file in place cannot alter a release.
//!
//! The walk runs on the calling thread; reading, hashing and writing run on a small
//! bounded worker pool (a full queue blocks the walk: memory stays bounded).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::sys::stat::{fstat, FileStat};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::fsops;
use crate::release::hashcache::{CacheWriter, HashCache, StatKey};
use crate::release::store::{Entry, Kind};
use crate::release::symlinks;
use crate::site::Site;
use crate::upload::manifest::{to_hex, Digest, Entries};
use crate::upload::walk::{self, Node, Open};

/// Identical files of an earlier release, by (digest, mode, size).
pub type LinkIndex = HashMap<(Digest, u32, u64), PathBuf>;

/// Where unchanged files can be hard-linked from.
#[derive(Debug)]
pub struct LinkSource {
    /// `releases/<id>` of the earlier release.
    pub dir: PathBuf,
    /// Its files.
    pub index: LinkIndex,
}

impl LinkSource {
    /// Builds the index from a release's stored manifest.
    pub fn new(dir: PathBuf, entries: &[Entry]) -> LinkSource {
        let index = entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .filter_map(|e| Some(((e.hash?, e.mode, e.size), e.path.clone())))
            .collect();
        LinkSource { dir, index }
    }
}

/// What `build` needs.
pub struct Input<'a> {
    /// The site.
    pub site: &'a Site,
    /// The release id being built.
    pub id: &'a str,
    /// Digests of `deploy-cache/` files seen before.
    pub cache: &'a HashCache,
    /// An earlier release to hard-link unchanged files from.
    pub link_from: Option<&'a LinkSource>,
    /// Set on shutdown: stop and undo.
    pub cancel: &'a AtomicBool,
    /// How the finished tree is made durable.
    pub durability: Durability,
}

/// How a built release is flushed before it is renamed into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Each copied file is fdatasynced by its worker and each directory fsynced at the
    /// end: for small uploads, so the release does not wait for other programs' dirty
    /// data the way `syncfs` does.
    PerFile,
    /// Writeback of each copied file is started as soon as it is written
    /// (`sync_file_range`), then one `syncfs` waits for what is left: for big uploads,
    /// where one flush beats thousands of fsyncs.
    Syncfs,
}

impl Durability {
    /// The choice for an upload that must copy `bytes` bytes in `files` files.
    pub fn for_upload(files: usize, bytes: u64) -> Durability {
        if files <= 2_000 && bytes <= 64 * 1024 * 1024 {
            Durability::PerFile
        } else {
            Durability::Syncfs
        }
    }
}

/// A built (not yet renamed) release.
#[derive(Debug, Default)]
pub struct Output {
    /// Its full manifest.
    pub entries: Vec<Entry>,
    /// Regular files.
    pub files: u64,
    /// Bytes of regular files.
    pub bytes: u64,
    /// Files hard-linked from the earlier release.
    pub linked: u64,
    /// The new hash cache of `deploy-cache/`, written as files were hashed.
    pub cache: Option<CacheWriter>,
}

/// What the upload claims to contain: its parsed SHA256SUMS, and the digest of the exact
/// bytes that were parsed, so a manifest swapped after parsing cannot be published.
#[derive(Debug)]
pub struct Expected {
    /// Path -> digest, as listed.
    pub entries: Entries,
    /// SHA-256 of the manifest file as it was read.
    pub manifest_digest: Digest,
}

/// The permission bits a release keeps: read and execute only.
pub fn release_mode(st_mode: u32) -> u32 {
    st_mode & 0o555
}

struct Job {
    rel: PathBuf,
    file: File,
    stat: FileStat,
    expected: Option<Digest>,
    /// The upload's manifest file itself (pinned to the bytes that were parsed).
    is_manifest: bool,
}

struct Done {
    entry: Entry,
    key: StatKey,
    linked: bool,
}

/// Most problems listed in one rejection reason.
const MAX_LISTED: usize = 10;

/// Builds `releases/.partial.<id>` from `deploy-cache/`, verifying every file against the
/// upload's `manifest` (consumed: matched entries are dropped as the walk goes, so memory
/// shrinks on big trees and what remains at the end is missing). On any error the partial
/// tree is removed; `Error::Rejected` means the upload itself is at fault.
pub fn build(input: &Input<'_>, manifest: Option<Expected>) -> Result<Output> {
    let partial = input.site.partial(input.id);
    fsops::remove_tree(&partial)?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&partial)
        .at(&partial)?;
    let result = build_into(input, manifest, &partial);
    if result.is_err() {
        if let Err(e) = fsops::remove_tree(&partial) {
            tracing::warn!(site = input.site.name(), path = %partial.display(), error = %e,
                "cannot remove partial release; healing will retry");
        }
    }
    result
}

use std::os::unix::fs::DirBuilderExt;

fn build_into(input: &Input<'_>, manifest: Option<Expected>, partial: &Path) -> Result<Output> {
    let started = Instant::now();
    let site = input.site;
    let cfg = &site.cfg;
    let source = site.deploy_cache();
    let marker = OsStr::new(&cfg.marker);
    let manifest_name = Path::new(&cfg.manifest);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));

    let (tx, rx) = sync_channel::<Job>(threads * 32);
    let rx = Arc::new(Mutex::new(rx));
    let abort = AtomicBool::new(false);

    let mut out = Output::default();
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let manifest_digest = manifest.as_ref().map(|m| m.manifest_digest);
    let mut manifest = manifest.map(|m| m.entries);
    // Every entry counts toward max_files: directories and symlinks cost too.
    let mut entries_seen: u64 = 0;

    // Workers append each result here at once: no per-worker lists to merge later, which
    // on a 200,000-file tree would hold every entry twice at the peak.
    // Sized from the manifest up front: growing by doubling would hold the old and the
    // new buffer at once, the biggest single cost at the peak on huge trees.
    let expected_files = manifest.as_ref().map_or(0, std::collections::BTreeMap::len) + 1;
    let collected = Mutex::new(Collected {
        // Headroom for the directories and symlinks appended at the end (web trees have
        // a directory per 10-20 files).
        entries: Vec::with_capacity(expected_files + expected_files / 8 + 64),
        cache: Some(CacheWriter::create(&site.hash_cache())?),
        ..Collected::default()
    });
    let worker_results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let rx = Arc::clone(&rx);
                let abort = &abort;
                let collected = &collected;
                s.spawn(move || worker(input, partial, &rx, abort, collected))
            })
            .collect();

        let walked = walk::walk(&source, &[marker], Open::Files, &mut |found| {
            if input.cancel.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            let dest = partial.join(&found.rel);
            entries_seen += 1;
            check_limits(cfg.max_files, cfg.max_bytes, entries_seen, out.bytes)?;
            match found.node {
                Node::Dir => {
                    fs::DirBuilder::new().mode(0o700).create(&dest).at(&dest)?;
                    dirs.push((found.rel, release_mode(found.stat.st_mode)));
                    Ok(true)
                }
                Node::File(file) => {
                    out.files += 1;
                    out.bytes += found.stat.st_size as u64;
                    check_limits(cfg.max_files, cfg.max_bytes, entries_seen, out.bytes)?;
                    let is_manifest = found.rel == manifest_name;
                    let expected = match manifest.as_mut() {
                        Some(_) if is_manifest => manifest_digest,
                        Some(m) if found.rel != manifest_name => match m.remove(&found.rel) {
                            Some(d) => Some(d),
                            None => {
                                problems.push(format!(
                                    "{} is not listed in {}",
                                    found.rel.display(),
                                    cfg.manifest
                                ));
                                return Ok(false);
                            }
                        },
                        _ => None,
                    };
                    let job = Job {
                        rel: found.rel,
                        file,
                        stat: found.stat,
                        expected,
                        is_manifest,
                    };
                    // A closed channel means every worker stopped on an error.
                    tx.send(job).map_err(|_| Error::Interrupted).map(|()| false)
                }
                Node::Symlink(target) => {
                    let target = PathBuf::from(target);
                    std::os::unix::fs::symlink(&target, &dest).at(&dest)?;
                    links.push((found.rel, target));
                    Ok(false)
                }
                Node::Special(kind) => Err(Error::Rejected(format!(
                    "{} is a {kind}; only files, directories and in-tree symlinks are allowed",
                    found.rel.display()
                ))),
            }
        });
        drop(tx);
        if walked.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        let mut results: Vec<Result<()>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Failed("a finalize worker panicked".into())))
            })
            .collect();
        if let Err(e) = walked {
            results.insert(0, Err(e));
        }
        results
    });

    let collected = collected
        .into_inner()
        .map_err(|_| Error::Failed("finalize results poisoned".into()))?;
    if let Some(e) = worker_results.into_iter().find_map(Result::err) {
        return Err(e);
    }
    problems.extend(collected.rejected);
    out.entries = collected.entries;
    out.cache = collected.cache;
    out.linked = collected.linked;

    // Whatever the walk did not consume is listed but not uploaded as a regular file.
    for p in manifest.iter().flat_map(|m| m.keys()) {
        problems.push(format!(
            "{} is listed in {} but missing from the upload",
            p.display(),
            cfg.manifest
        ));
    }
    if !problems.is_empty() {
        problems.sort();
        let more = problems.len().saturating_sub(MAX_LISTED);
        let mut reason = problems[..problems.len().min(MAX_LISTED)].join("; ");
        if more > 0 {
            reason.push_str(&format!("; and {more} more"));
        }
        return Err(Error::Rejected(reason));
    }

    link_shared(input, partial, &mut out, &mut dirs)?;

    // Checked against the final tree, shared links included, so no symlink can reach
    // outside through one; links inside a shared entry's uploaded path were replaced.
    let shared = &site.cfg.shared;
    for (rel, target) in links
        .iter()
        .filter(|(rel, _)| !shared.iter().any(|e| rel.starts_with(e)))
    {
        symlinks::check_inside(partial, rel, target, shared).map_err(Error::Rejected)?;
        out.entries.push(Entry {
            path: rel.clone(),
            kind: Kind::Symlink,
            mode: 0o777,
            size: 0,
            hash: None,
            target: Some(target.clone()),
        });
    }

    // Deepest first, so a parent loses its write bit only after its children are done.
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
    for (rel, mode) in &dirs {
        let p = partial.join(rel);
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).at(&p)?;
        out.entries.push(Entry {
            path: rel.clone(),
            kind: Kind::Dir,
            mode: *mode,
            size: 0,
            hash: None,
            target: None,
        });
    }
    let root_mode = fs::symlink_metadata(&source)
        .map(|m| release_mode(m.permissions().mode()))
        .unwrap_or(0o555)
        | 0o500;
    fs::set_permissions(partial, fs::Permissions::from_mode(root_mode)).at(partial)?;
    match input.durability {
        Durability::Syncfs => fsops::syncfs(partial)?,
        Durability::PerFile => {
            for (rel, _) in &dirs {
                fsops::fsync_dir(&partial.join(rel))?;
            }
            fsops::fsync_dir(partial)?;
        }
    }
    tracing::debug!(
        site = site.name(),
        release = input.id,
        files = out.files,
        linked = out.linked,
        duration_ms = started.elapsed().as_millis() as u64,
        "release built"
    );
    Ok(out)
}

fn check_limits(
    max_files: Option<u64>,
    max_bytes: Option<u64>,
    files: u64,
    bytes: u64,
) -> Result<()> {
    if let Some(m) = max_files.filter(|&m| files > m) {
        return Err(Error::Rejected(format!(
            "upload has more than max_files = {m} files"
        )));
    }
    if let Some(m) = max_bytes.filter(|&m| bytes > m) {
        return Err(Error::Rejected(format!(
            "upload has more than max_bytes = {m} bytes"
        )));
    }
    Ok(())
}

/// What the workers produce, shared.
#[derive(Default)]
struct Collected {
    entries: Vec<Entry>,
    cache: Option<CacheWriter>,
    linked: u64,
    rejected: Vec<String>,
}

fn worker(
    input: &Input<'_>,
    partial: &Path,
    rx: &Mutex<Receiver<Job>>,
    abort: &AtomicBool,
    collected: &Mutex<Collected>,
) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let poisoned = || Error::Failed("finalize results poisoned".into());
    loop {
        let job = {
            let guard = rx
                .lock()
                .map_err(|_| Error::Failed("finalize queue poisoned".into()))?;
            guard.recv()
        };
        let Ok(mut job) = job else {
            return Ok(());
        };
        if input.cancel.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed) {
            abort.store(true, Ordering::Relaxed);
            return Err(Error::Interrupted);
        }
        match process_file(input, partial, &mut job, &mut buf) {
            Ok(d) => {
                let mut c = collected.lock().map_err(|_| poisoned())?;
                c.linked += u64::from(d.linked);
                if let (Some(h), Some(w)) = (d.entry.hash, c.cache.as_mut()) {
                    if w.add(&d.key, &h).is_err() {
                        // Advisory: a cache that cannot be written is just not kept.
                        c.cache = None;
                    }
                }
                c.entries.push(d.entry);
            }
            Err(Error::Rejected(r)) => collected.lock().map_err(|_| poisoned())?.rejected.push(r),
            Err(e) => {
                abort.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
}

fn process_file(input: &Input<'_>, partial: &Path, job: &mut Job, buf: &mut [u8]) -> Result<Done> {
    let dest = partial.join(&job.rel);
    let mode = release_mode(job.stat.st_mode);
    let size = job.stat.st_size as u64;
    let key = StatKey::of(&job.stat);
    if let (Some(cached), Some(src)) = (input.cache.lookup(&key), input.link_from) {
        // A cache/manifest disagreement falls through to reading the file: the read is
        // the truth, the cache only saves work.
        if job.expected.is_none_or(|e| e == cached) {
            if let Some(src_rel) = src.index.get(&(cached, mode, size)) {
                if fs::hard_link(src.dir.join(src_rel), &dest).is_ok() {
                    return Ok(Done {
                        entry: file_entry(&job.rel, mode, size, cached),
                        key,
                        linked: true,
                    });
                }
            }
        }
    }
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&dest)
        .at(&dest)?;
    let mut hasher = Sha256::new();
    let mut copied: u64 = 0;
    loop {
        let n = match job.file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).at(&input.site.deploy_cache().join(&job.rel)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).at(&dest)?;
        copied += n as u64;
    }
    if input.durability == Durability::Syncfs {
        start_writeback(&out);
    }
    let after = fstat(&job.file).at(&input.site.deploy_cache().join(&job.rel))?;
    if copied != size || StatKey::of(&after) != key {
        return Err(Error::Rejected(format!(
            "{} changed while it was being copied",
            job.rel.display()
        )));
    }
    let digest: Digest = hasher.finalize().into();
    if let Some(expected) = job.expected {
        if expected != digest && job.is_manifest {
            return Err(Error::Rejected(format!(
                "{} was replaced while the upload was being processed",
                job.rel.display()
            )));
        }
        if expected != digest {
            return Err(Error::Rejected(format!(
                "checksum mismatch for {}: {} says {}, upload has {}",
                job.rel.display(),
                input.site.cfg.manifest,
                to_hex(&expected),
                to_hex(&digest)
            )));
        }
    }
    out.set_permissions(fs::Permissions::from_mode(mode))
        .at(&dest)?;
    let times = fs::FileTimes::new().set_modified(system_time(after.st_mtime, after.st_mtime_nsec));
    out.set_times(times).at(&dest)?;
    if input.durability == Durability::PerFile {
        // After chmod and utimes, so the file's metadata is durable too.
        out.sync_all().at(&dest)?;
    }
    drop(out);
    // A fresh upload (new inodes, so no cache hit) of an unchanged file: the bytes were
    // read once for the hash anyway; share the earlier release's inode instead of keeping
    // a second copy. The link replaces the copy by rename, so the file never goes missing.
    let linked = input
        .link_from
        .and_then(|src| {
            src.index
                .get(&(digest, mode, size))
                .map(|r| src.dir.join(r))
        })
        .is_some_and(|src| replace_with_link(&src, &dest));
    Ok(Done {
        entry: file_entry(&job.rel, mode, size, digest),
        key,
        linked,
    })
}

/// Starts writing `f`'s dirty pages to disk without waiting, so the final `syncfs` finds
/// most of the release already written (best effort: errors surface at `syncfs`).
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on a descriptor we own; it only schedules writeback.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Replaces `dest` with a hard link to `src`; false (and `dest` untouched) on failure.
fn replace_with_link(src: &Path, dest: &Path) -> bool {
    let tmp = fsops::tmp_sibling(dest);
    if fs::hard_link(src, &tmp).is_err() {
        return false;
    }
    if fs::rename(&tmp, dest).is_err() {
        let _ = fs::remove_file(&tmp);
        return false;
    }
    true
}

fn system_time(secs: i64, nsec: i64) -> std::time::SystemTime {
    let base = std::time::UNIX_EPOCH;
    if secs >= 0 {
        base + std::time::Duration::new(secs as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        base - std::time::Duration::from_secs(secs.unsigned_abs())
    }
}

fn file_entry(rel: &Path, mode: u32, size: u64, hash: Digest) -> Entry {
    Entry {
        path: rel.to_path_buf(),
        kind: Kind::File,
        mode,
        size,
        hash: Some(hash),
        target: None,
    }
}

/// Replaces each configured `shared` entry in the release by a symlink to
/// `ROOT/shared/<entry>`, creating the shared entry when missing (seeded from the upload's
/// file of that name, if any, else an empty directory).
fn link_shared(
    input: &Input<'_>,
    partial: &Path,
    out: &mut Output,
    dirs: &mut Vec<(PathBuf, u32)>,
) -> Result<()> {
    let site = input.site;
    for entry in &site.cfg.shared {
        // The entry's parents must be real directories of the upload (or missing): an
        // uploaded symlink there (`app/var -> ..` for `app/var/data`) would carry the link
        // elsewhere, with a target climbing out of the site root.
        let mut ancestor = PathBuf::new();
        for c in entry.parent().into_iter().flat_map(Path::components) {
            ancestor.push(c);
            match fs::symlink_metadata(partial.join(&ancestor)) {
                Ok(m) if !m.is_dir() => {
                    return Err(Error::Rejected(format!(
                        "{} is a {} in the upload, but shared entry {} needs a directory there",
                        ancestor.display(),
                        walk::kind_name(std::os::unix::fs::MetadataExt::mode(&m)),
                        entry.display()
                    )));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let in_release = partial.join(entry);
        let in_shared = site.shared().join(entry);
        let uploaded = fs::symlink_metadata(&in_release).ok();
        if fs::symlink_metadata(&in_shared).is_err() {
            if let Some(parent) = in_shared.parent() {
                fsops::ensure_dir(parent, 0o755)?;
            }
            match &uploaded {
                Some(m) if m.is_file() => {
                    fs::copy(&in_release, &in_shared).at(&in_shared)?;
                    site.record_shared_file(entry)?;
                    fs::set_permissions(&in_shared, fs::Permissions::from_mode(0o644))
                        .at(&in_shared)?;
                }
                _ => fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&in_shared)
                    .at(&in_shared)?,
            }
            tracing::info!(site = site.name(), release = input.id, path = %entry.display(),
                "created missing shared entry");
        }
        if uploaded.is_some() {
            fsops::remove_tree(&in_release)?;
            let removed: Vec<&Entry> = out
                .entries
                .iter()
                .filter(|e| e.path.starts_with(entry) && e.kind == Kind::File)
                .collect();
            out.files -= removed.len() as u64;
            out.bytes -= removed.iter().map(|e| e.size).sum::<u64>();
            out.entries.retain(|e| !e.path.starts_with(entry));
            dirs.retain(|(d, _)| !d.starts_with(entry));
            tracing::info!(site = site.name(), release = input.id, path = %entry.display(),
                "uploaded path replaced by the shared link");
        }
        // Missing parents of a nested shared entry become directories of the release.
        let mut parent = PathBuf::new();
        let comps: Vec<_> = entry.components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            parent.push(c);
            let p = partial.join(&parent);
            if fs::symlink_metadata(&p).is_err() {
                fs::DirBuilder::new().mode(0o700).create(&p).at(&p)?;
                dirs.push((parent.clone(), 0o555));
            }
        }
        let mut target = PathBuf::new();
        for _ in 0..comps.len() + 1 {
            target.push("..");
        }
        target.push("shared");
        target.push(entry);
        std::os::unix::fs::symlink(&target, &in_release).at(&in_release)?;
        out.entries.push(Entry {
            path: entry.clone(),
            kind: Kind::Symlink,
            mode: 0o777,
            size: 0,
            hash: None,
            target: Some(target),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_lose_write_and_special_bits() {
        assert_eq!(release_mode(0o100755), 0o555);
        assert_eq!(release_mode(0o100644), 0o444);
        assert_eq!(release_mode(0o104755), 0o555);
        assert_eq!(release_mode(0o042775), 0o555);
        assert_eq!(release_mode(0o100600), 0o400);
    }
}
