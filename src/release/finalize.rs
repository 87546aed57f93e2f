//! Building a release from `deploy-cache/` under `releases/.partial.<id>`.
//!
//! One pass per file: each byte is read once, hashed and written together. A file whose
//! stat key is unchanged since the hash cache saw it is not read at all: it becomes a hard
//! link to the identical (same digest, same mode) file of the previous release, which was
//! verified when that release was made and still has the size and mtime its manifest
//! records (so it was not edited since). Nothing is ever linked to `deploy-cache/` itself,
//! so an uploader rewriting a file in place cannot alter a release.
//!
//! How it stays fast and small on 200,000-file trees:
//! - The walk runs on the calling thread, in walk order ([`crate::release::ordered`]). It
//!   reads the hash cache and the previous release's manifest alongside (both are kept in
//!   that order), so neither is ever loaded whole, and it creates the directories.
//! - Files go to a small worker pool in batches of one directory's files (few wake-ups),
//!   with the directories open: links and copies are `linkat`/`openat` on descriptors, no
//!   path is resolved twice.
//! - Workers hand back finished manifest and cache lines; they are written in walk order as
//!   batches complete (a bounded reorder window), straight to the files: no list of entries
//!   is held.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fstat, FileStat, Mode};
use nix::unistd::linkat;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::fsops::{self, AtomicWriter};
use crate::release::changes::Changes;
use crate::release::hashcache::{self, HashCache, StatKey};
use crate::release::ordered::Merge;
use crate::release::store::{self, Entry, Kind, Mtime};
use crate::release::symlinks;
use crate::site::Site;
use crate::upload::inflight;
use crate::upload::manifest::{to_hex, Digest, Entries};
use crate::upload::walk::{self, Found, Node};

/// A file of the link source: what a new file must match to be hard-linked to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Linkable {
    digest: Digest,
    mode: u32,
    size: u64,
}

/// A file of the link source as its manifest recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Recorded {
    /// Its content and mode.
    what: Linkable,
    /// The modification time it was given (unknown in manifests of older versions).
    mtime: Option<Mtime>,
}

fn parse_linkable(line: &[u8], path: &mut Vec<u8>) -> Option<Recorded> {
    let f = store::parse_file_fields(line)?;
    store::unescape_path_into(f.path, path)?;
    Some(Recorded {
        what: Linkable {
            digest: f.digest,
            mode: f.mode,
            size: f.size,
        },
        mtime: f.mtime,
    })
}

/// Where unchanged files can be hard-linked from: an earlier release and its stored
/// manifest.
#[derive(Debug)]
pub struct LinkSource {
    /// `releases/<id>` of the earlier release.
    pub dir: PathBuf,
    /// Its stored manifest.
    manifest: PathBuf,
    /// (digest prefix, mode) -> offset of the manifest line, built on first need: only
    /// files that had to be read (new or moved content) look here.
    by_digest: OnceLock<HashMap<(u64, u32), u64>>,
    /// The manifest, open for reading lines at those offsets.
    file: OnceLock<Option<File>>,
}

impl LinkSource {
    /// The release at `dir`, whose stored manifest is `manifest`.
    pub fn new(dir: PathBuf, manifest: PathBuf) -> LinkSource {
        LinkSource {
            dir,
            manifest,
            by_digest: OnceLock::new(),
            file: OnceLock::new(),
        }
    }

    /// Its files, read alongside the walk.
    fn merge(&self) -> Merge<Recorded> {
        Merge::open(&self.manifest, parse_linkable)
    }

    /// A file of the release with this content and mode, wherever it is (absolute path),
    /// and the mtime it was given.
    fn find(&self, want: &Linkable) -> Option<(PathBuf, Option<Mtime>)> {
        let index = self.by_digest.get_or_init(|| self.index());
        let offset = *index.get(&(digest_prefix(&want.digest), want.mode))?;
        let f = self
            .file
            .get_or_init(|| File::open(&self.manifest).ok())
            .as_ref()?;
        // Lines are short; a long path (up to PATH_MAX, escaped) takes a second read.
        let mut buf = vec![0u8; 1024];
        let mut n = f.read_at(&mut buf, offset).ok()?;
        if !buf[..n].contains(&b'\n') && n == buf.len() {
            buf.resize(16 * 1024, 0);
            n = f.read_at(&mut buf, offset).ok()?;
        }
        let line = buf[..n].split(|&b| b == b'\n').next()?;
        let mut path = Vec::new();
        let found = parse_linkable(line, &mut path)?;
        (found.what == *want).then(|| (self.dir.join(OsStr::from_bytes(&path)), found.mtime))
    }

    fn index(&self) -> HashMap<(u64, u32), u64> {
        let mut index = HashMap::new();
        let Ok(f) = File::open(&self.manifest) else {
            return index;
        };
        use std::io::BufRead;
        let mut reader = std::io::BufReader::with_capacity(64 * 1024, f);
        let mut line = Vec::with_capacity(256);
        let mut offset = 0u64;
        // Only the digest and mode: `find` reads the path of the one line it picks.
        while let Ok(n @ 1..) = reader.read_until(b'\n', &mut line) {
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            if let Some(f) = store::parse_file_fields(text) {
                index
                    .entry((digest_prefix(&f.digest), f.mode))
                    .or_insert(offset);
            }
            offset += n as u64;
            line.clear();
        }
        index
    }
}

fn digest_prefix(d: &Digest) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// What `build` needs.
pub struct Input<'a> {
    /// The site.
    pub site: &'a Site,
    /// The release id being built.
    pub id: &'a str,
    /// An earlier release to hard-link unchanged files from.
    pub link_from: Option<&'a LinkSource>,
    /// The keeper's own changes to release inodes: a file of `link_from` changed since
    /// by anyone else is not shared.
    pub changes: &'a Changes,
    /// Set on shutdown: stop and undo.
    pub cancel: &'a AtomicBool,
    /// How the finished tree is made durable.
    pub durability: Durability,
}

/// How a built release is flushed before it is renamed into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Each copied file is fsynced by its worker and each directory fsynced at the end:
    /// for small uploads while the system has much else to write back, which a `syncfs`
    /// would wait for.
    PerFile,
    /// Writeback of each copied file past the first [`WRITEBACK_AT_SYNCFS`] bytes is
    /// started as soon as it is written (`sync_file_range`), then one `syncfs` waits for
    /// what is left: one disk flush instead of one per file.
    Syncfs,
}

/// Uploads of at most this many files may be flushed file by file.
const PER_FILE_MAX: usize = 2_000;
/// Unwritten data elsewhere in the system above which a small upload is flushed file by
/// file: below it, the one flush of `syncfs` wins. Measured on 2 cores and a virtio disk
/// with a quiet system: a 100-file upload's marker-to-swap latency fell from 31-38 ms with
/// per-file fsyncs to 18-21 ms with `syncfs`. 16 MiB is about what a disk writes in the
/// time those flushes take, so waiting for it costs no more than they would.
const SYNCFS_BACKLOG_MAX: u64 = 16 * 1024 * 1024;

/// Copied bytes whose writeback is left to the final `syncfs` instead of being started
/// file by file: each `sync_file_range` submits its own I/O (on a virtual disk, an exit to
/// the hypervisor), which for the few small files of an incremental release cost more CPU
/// than the flush it saves. Past this, a big release's writeback still starts as it is
/// written, so `syncfs` never waits for more than this much.
const WRITEBACK_AT_SYNCFS: u64 = 8 * 1024 * 1024;

/// How much of the release manifest and hash cache is written between two starts of their
/// writeback.
const WRITER_WRITEBACK_EVERY: u64 = 1024 * 1024;

impl Durability {
    /// Whether a file just copied, which brings the build's copied bytes to `copied`,
    /// should have its writeback started now.
    fn starts_writeback(self, copied: u64) -> bool {
        self == Durability::Syncfs && copied > WRITEBACK_AT_SYNCFS
    }

    /// The choice for an upload of `files` files (as its manifest lists them, if known)
    /// while `unwritten` bytes of the whole system await writeback (if known).
    pub fn for_upload(files: Option<usize>, unwritten: Option<u64>) -> Durability {
        // Not knowing the backlog, a small upload does not risk waiting for it.
        let busy = unwritten.is_none_or(|backlog| backlog > SYNCFS_BACKLOG_MAX);
        match files {
            Some(n) if n <= PER_FILE_MAX && busy => Durability::PerFile,
            _ => Durability::Syncfs,
        }
    }
}

/// A built (not yet renamed) release.
#[derive(Debug)]
pub struct Output {
    /// Its full manifest, written but not yet in place (`commit` it after the release).
    pub manifest: AtomicWriter,
    /// Regular files.
    pub files: u64,
    /// Bytes of regular files.
    pub bytes: u64,
    /// Files hard-linked from the earlier release.
    pub linked: u64,
    /// Files read and hashed (the others' digests came from the hash cache).
    pub hashed: u64,
    /// The new hash cache of `deploy-cache/`, written as files were hashed.
    pub cache: Option<AtomicWriter>,
    /// How many times the writeback of the manifest and cache was started as they grew.
    pub writeback_starts: u64,
    /// The shared entries it links to, for [`make_shared`] once it is accepted.
    pub shared: Vec<SharedEntry>,
}

impl Output {
    /// The entries written to the manifest so far (read back: for the rare comparison
    /// with an existing release of the same id).
    pub fn entries(&mut self) -> Result<Vec<Entry>> {
        self.manifest.flush()?;
        store::read_manifest_file(self.manifest.tmp_path())
    }
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

/// The mode of a release's own directory, whatever the mode of `deploy-cache/`.
pub const RELEASE_ROOT_MODE: u32 = 0o555;

/// The permission bits a release keeps: read and execute only.
pub fn release_mode(st_mode: u32) -> u32 {
    st_mode & 0o555
}

/// Worker threads of a build. More than cores: they spend much of their time waiting on
/// the disk (reads of a cold upload, inode reads of a cold previous release, per-file
/// flushes), and more requests in flight keep the device busy. Measured on 2 cores: a
/// cold full release took 3.2 s with 2 workers, 2.1 s with 8; warm builds were no slower.
const WORKERS: usize = 8;
/// Entries per batch handed to a worker. Batches span directories: one per directory
/// made a thousand-directory tree cost a thousand queue hand-offs (each a futex wake-up
/// or two), which on 2 cores was a tenth of a link-only build.
const BATCH: usize = 64;
/// Batches that may be finished ahead of the oldest unfinished one: bounds what waits in
/// memory to be written in order behind one big file.
const WINDOW: u64 = 256;
/// Most problems listed in one rejection reason.
const MAX_LISTED: usize = 10;

/// A directory of the new release and the same directory of the link source, each opened
/// (the former made) on first use by whichever thread needs it: the walk only names them,
/// so making a thousand directories is spread over the workers instead of holding up the
/// walk. Parents are made before children through `parent`.
struct DirCtx {
    /// The parent and this directory's name in it; `None` for the release's root.
    parent: Option<(Arc<DirCtx>, OsString)>,
    /// Its full path, for errors.
    path: PathBuf,
    dst: OnceLock<std::result::Result<OwnedFd, (PathBuf, nix::errno::Errno)>>,
    prev: OnceLock<Option<OwnedFd>>,
}

impl DirCtx {
    fn root(path: &Path, dst: OwnedFd, prev: Option<OwnedFd>) -> DirCtx {
        DirCtx {
            parent: None,
            path: path.to_path_buf(),
            dst: OnceLock::from(Ok(dst)),
            prev: OnceLock::from(prev),
        }
    }

    fn child(parent: &Arc<DirCtx>, name: &OsStr, path: PathBuf) -> DirCtx {
        DirCtx {
            parent: Some((Arc::clone(parent), name.to_os_string())),
            path,
            dst: OnceLock::new(),
            prev: OnceLock::new(),
        }
    }

    /// The directory in the new release, made on first use.
    fn dst(&self) -> Result<&OwnedFd> {
        let made = self.dst.get_or_init(|| {
            let Some((parent, name)) = &self.parent else {
                return Err((self.path.clone(), nix::errno::Errno::ENOENT));
            };
            let at = match parent.dst() {
                Ok(fd) => fd,
                // The parent's own failure, which names the directory that could not be made.
                Err(_) => {
                    let failed = parent.dst.get().and_then(|r| r.as_ref().err()).cloned();
                    return Err(failed.unwrap_or((parent.path.clone(), nix::errno::Errno::ENOENT)));
                }
            };
            let mkdir =
                nix::sys::stat::mkdirat(at, name.as_os_str(), Mode::from_bits_truncate(0o700));
            mkdir
                .and_then(|()| walk::open_dir_at(at, name))
                .map_err(|e| (self.path.clone(), e))
        });
        made.as_ref().map_err(|(path, e)| Error::Io {
            path: path.clone(),
            source: std::io::Error::from(*e),
        })
    }

    /// The same directory in the link source, if it has one.
    fn prev(&self) -> Option<&OwnedFd> {
        self.prev
            .get_or_init(|| {
                let (parent, name) = self.parent.as_ref()?;
                walk::open_dir_at(parent.prev()?, name).ok()
            })
            .as_ref()
    }
}

/// One file for a worker.
struct FileJob {
    /// Its path: a range of the batch's `paths`.
    rel: std::ops::Range<usize>,
    /// Its status if the walk had to take it; else the worker does.
    stat: Option<FileStat>,
    expected: Option<Digest>,
    /// The upload's manifest file itself (pinned to the bytes that were parsed).
    is_manifest: bool,
    /// What the hash cache says it held, with the stat key it had then.
    cached: Option<(StatKey, Digest)>,
    /// The link source's file at the same path.
    same_path: Option<Recorded>,
    /// Under a shared entry: built (it may seed `shared/`), but not part of the manifest.
    hidden: bool,
}

// Items live in their batch's Vec, inline: one allocation per batch, not per file (the
// walk allocates and a worker frees; per file, that contended glibc's arena lock).
#[allow(clippy::large_enum_variant)]
enum Item {
    /// The following items are in this directory: an index into the batch's `dirs`.
    Enter(usize),
    /// A finished manifest line (directories, symlinks): a range of the batch's `lines`.
    Line(std::ops::Range<usize>),
    /// A subdirectory to make (every one is named in its parent's batch, so even an empty
    /// one is made).
    MakeDir(Arc<DirCtx>),
    File(FileJob),
}

/// A run of entries in walk order, from one or more directories.
struct Batch {
    seq: u64,
    /// The directories its items are in (`Item::Enter` picks one): the new release's and
    /// the same directory in `deploy-cache/`.
    dirs: Vec<(Arc<DirCtx>, Arc<OwnedFd>)>,
    items: Vec<Item>,
    /// The paths of the files, back to back.
    paths: Vec<u8>,
    /// The ready lines, back to back.
    lines: Vec<u8>,
}

impl Batch {
    /// Makes `ctx` (with `src`, its directory in `deploy-cache/`) the directory of the
    /// items pushed next.
    fn enter(&mut self, ctx: &Arc<DirCtx>, src: &Arc<OwnedFd>) {
        if self.dirs.last().is_some_and(|(c, _)| Arc::ptr_eq(c, ctx)) {
            return;
        }
        self.dirs.push((Arc::clone(ctx), Arc::clone(src)));
        self.items.push(Item::Enter(self.dirs.len() - 1));
    }

    fn path(&self, r: &std::ops::Range<usize>) -> &Path {
        Path::new(OsStr::from_bytes(&self.paths[r.clone()]))
    }

    fn push_line(&mut self, kind: Kind, mode: u32, path: &Path, target: Option<&Path>) {
        let start = self.lines.len();
        store::format_line(&mut self.lines, kind, mode, 0, None, path, target, None);
        self.items.push(Item::Line(start..self.lines.len()));
    }
}

/// A worker's result for one batch.
#[derive(Default)]
struct BatchOut {
    manifest: Vec<u8>,
    cache: Vec<u8>,
    files: u64,
    bytes: u64,
    linked: u64,
    hashed: u64,
    rejected: Vec<String>,
}

/// Writes batch results in walk order.
struct Ordered {
    next: u64,
    pending: BTreeMap<u64, BatchOut>,
    manifest: AtomicWriter,
    cache: Option<AtomicWriter>,
    files: u64,
    bytes: u64,
    linked: u64,
    hashed: u64,
    rejected: Vec<String>,
    /// The walk is waiting on `Sink::progress` (only then do writers signal it).
    walk_waiting: bool,
    /// Whether the manifest's and cache's writeback is started as they grow (they are
    /// several MiB on big trees, which the final `syncfs` would otherwise write alone).
    early_writeback: bool,
    /// Bytes written to them since their writeback was last started.
    unstarted: u64,
    /// How many times it was started.
    writeback_starts: u64,
}

impl Ordered {
    fn put(&mut self, seq: u64, out: BatchOut) -> Result<()> {
        self.pending.insert(seq, out);
        while let Some(o) = self.pending.remove(&self.next) {
            self.next += 1;
            self.manifest.write(&o.manifest)?;
            if let Some(c) = self.cache.as_mut() {
                if c.write(&o.cache).is_err() {
                    // Advisory: a cache that cannot be written is just not kept.
                    self.cache = None;
                }
            }
            self.unstarted += (o.manifest.len() + o.cache.len()) as u64;
            if self.early_writeback && self.unstarted >= WRITER_WRITEBACK_EVERY {
                self.unstarted = 0;
                self.writeback_starts += 1;
                self.manifest.start_writeback();
                if let Some(c) = self.cache.as_mut() {
                    c.start_writeback();
                }
            }
            self.files += o.files;
            self.bytes += o.bytes;
            self.linked += o.linked;
            self.hashed += o.hashed;
            self.rejected.extend(o.rejected);
        }
        Ok(())
    }
}

/// The reorder stage, shared by the walk and the workers.
struct Sink {
    state: Mutex<Ordered>,
    /// `state.next`, readable without the lock.
    written: AtomicU64,
    /// Signalled as batches are written: the walk waits on it when too far ahead.
    progress: Condvar,
}

/// Tells every thread of the build to stop. Under the sink's lock, so a walk about to
/// wait for progress cannot miss the wake-up.
fn stop_all(abort: &AtomicBool, sink: &Sink) {
    let guard = sink.state.lock();
    abort.store(true, Ordering::Relaxed);
    drop(guard);
    sink.progress.notify_all();
}

fn poisoned() -> Error {
    Error::Failed("finalize results poisoned".into())
}

/// Builds `releases/.partial.<id>` from `deploy-cache/`, verifying every file against the
/// upload's `manifest` (consumed: what remains at the end is missing). On any error the
/// partial tree is removed; `Error::Rejected` means the upload itself is at fault,
/// `Error::NoSpace` that the filesystem cannot hold the release.
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
            tracing::warn!(event = crate::events::SITE_ERROR, site = input.site.name(), path = %partial.display(), reason = %e,
                "cannot remove partial release; healing will retry");
        }
    }
    result
}

use std::os::unix::fs::DirBuilderExt;

/// What the walk keeps for after it: small, per directory or per symlink.
#[derive(Default)]
struct Walked {
    /// Every entry uploaded, for `max_files` (directories and symlinks cost too; entries
    /// under shared paths too).
    seen_entries: u64,
    dirs: Vec<(PathBuf, u32)>,
    links: Vec<(PathBuf, PathBuf)>,
    problems: Vec<String>,
}

/// Running totals the workers check as they go, before writing anything for a file.
struct Budget {
    /// Free bytes in `releases/` when the build started.
    free: u64,
    /// Bytes uploaded so far, for `max_bytes`.
    seen_bytes: AtomicU64,
    /// Bytes copied (or about to be): what the release takes on disk.
    to_copy: AtomicU64,
}

fn build_into(input: &Input<'_>, manifest: Option<Expected>, partial: &Path) -> Result<Output> {
    let started = Instant::now();
    let site = input.site;
    let cfg = &site.cfg;
    let source = site.deploy_cache();
    let marker = OsStr::new(&cfg.marker);
    let manifest_name = Path::new(&cfg.manifest);
    let budget = Budget {
        free: fsops::free_bytes(&site.releases())?,
        seen_bytes: AtomicU64::new(0),
        to_copy: AtomicU64::new(0),
    };

    // Opened before anything is written, so the flush reports every writeback failure of
    // the build (see `FsFlush`).
    let flush = match input.durability {
        Durability::Syncfs => Some(fsops::FsFlush::open(partial)?),
        Durability::PerFile => None,
    };
    let manifest_digest = manifest.as_ref().map(|m| m.manifest_digest);
    let mut manifest = manifest.map(|m| m.entries);
    let mut cache = HashCache::open(&site.hash_cache());
    let mut same_path = input.link_from.map(LinkSource::merge);
    let sink = Sink {
        state: Mutex::new(Ordered {
            next: 0,
            pending: BTreeMap::new(),
            manifest: AtomicWriter::create(&site.manifest_of(input.id), true)?,
            cache: hashcache::create(&site.hash_cache()).ok(),
            files: 0,
            bytes: 0,
            linked: 0,
            hashed: 0,
            rejected: Vec::new(),
            walk_waiting: false,
            early_writeback: input.durability == Durability::Syncfs,
            unstarted: 0,
            writeback_starts: 0,
        }),
        progress: Condvar::new(),
        written: AtomicU64::new(0),
    };
    let root_ctx = Arc::new(DirCtx::root(
        partial,
        walk::open_root(partial)?,
        input.link_from.and_then(|l| walk::open_root(&l.dir).ok()),
    ));

    let (tx, rx) = sync_channel::<Batch>(WORKERS * 2);
    let rx = Mutex::new(rx);
    let abort = AtomicBool::new(false);
    let mut w = Walked::default();

    let worker_results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|_| s.spawn(|| worker(input, &rx, &abort, &sink, &budget)))
            .collect();

        let mut stack: Vec<Arc<DirCtx>> = vec![root_ctx];
        let mut batch: Option<Batch> = None;
        let mut seq: u64 = 0;
        let send = |b: Option<Batch>| -> Result<()> {
            let Some(b) = b else { return Ok(()) };
            // Not too far ahead of the oldest unwritten batch (the lock only when close).
            if b.seq >= sink.written.load(Ordering::Acquire) + WINDOW {
                let mut st = sink.state.lock().map_err(|_| poisoned())?;
                while b.seq >= st.next + WINDOW && !abort.load(Ordering::Relaxed) {
                    st.walk_waiting = true;
                    st = sink.progress.wait(st).map_err(|_| poisoned())?;
                    st.walk_waiting = false;
                }
            }
            // A closed channel means every worker stopped on an error.
            tx.send(b).map_err(|_| Error::Interrupted)
        };

        let walked = walk::walk(&source, &[marker], &mut |found: Found| {
            if input.cancel.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            w.seen_entries += 1;
            check_limits(cfg.max_files, None, w.seen_entries, 0)?;
            let rel_bytes = found.rel.as_os_str().as_bytes();
            let is_dir = matches!(found.node, Node::Dir);
            if inflight::looks_in_flight(found.name(), is_dir)
                && !manifest
                    .as_ref()
                    .is_some_and(|m| m.vouches_for(rel_bytes, is_dir))
            {
                return Err(Error::InFlight(crate::events::shown(&found.rel)));
            }
            stack.truncate(found.depth + 1);
            let Some(ctx) = stack.last().cloned() else {
                return Err(Error::Failed("finalize walk lost its directory".into()));
            };
            if batch.as_ref().is_some_and(|b| b.items.len() >= BATCH) {
                send(batch.take())?;
            }
            let b = batch.get_or_insert_with(|| {
                seq += 1;
                Batch {
                    seq: seq - 1,
                    dirs: Vec::new(),
                    items: Vec::with_capacity(BATCH + 1),
                    paths: Vec::with_capacity(BATCH * 64),
                    lines: Vec::new(),
                }
            });
            b.enter(&ctx, &found.dir);
            let name = found.name().to_os_string();
            let hidden = cfg.shared.iter().any(|e| found.rel.starts_with(e));
            let dest = || partial.join(&found.rel);
            match &found.node {
                Node::Dir => {
                    let mode = found.stat.map_or(0o555, |st| release_mode(st.st_mode));
                    let child = Arc::new(DirCtx::child(&ctx, &name, dest()));
                    b.items.push(Item::MakeDir(Arc::clone(&child)));
                    if !hidden {
                        b.push_line(Kind::Dir, mode, &found.rel, None);
                    }
                    w.dirs.push((found.rel, mode));
                    // Its children come after it in this batch or a later one, so its line
                    // precedes theirs and it is made before them (`DirCtx::dst`).
                    stack.push(child);
                    Ok(true)
                }
                Node::File => {
                    let is_manifest = found.rel == manifest_name;
                    let expected = match manifest.as_mut() {
                        Some(_) if is_manifest => manifest_digest,
                        Some(m) => match m.take(rel_bytes) {
                            Some(d) => Some(d),
                            None => {
                                w.problems.push(format!(
                                    "{} is not listed in {}",
                                    crate::events::shown(&found.rel),
                                    cfg.manifest
                                ));
                                return Ok(false);
                            }
                        },
                        None => None,
                    };
                    let cached = cache.entry(rel_bytes);
                    let same = same_path.as_mut().and_then(|m| m.find(rel_bytes).copied());
                    let start = b.paths.len();
                    b.paths.extend_from_slice(rel_bytes);
                    b.items.push(Item::File(FileJob {
                        rel: start..b.paths.len(),
                        stat: found.stat,
                        expected,
                        is_manifest,
                        cached,
                        same_path: same,
                        hidden,
                    }));
                    Ok(false)
                }
                Node::Symlink(target) => {
                    let target = PathBuf::from(target);
                    nix::unistd::symlinkat(&target, ctx.dst()?, name.as_os_str())
                        .map_err(std::io::Error::from)
                        .at(&dest())?;
                    if !hidden {
                        b.push_line(Kind::Symlink, 0o777, &found.rel, Some(&target));
                    }
                    w.links.push((found.rel, target));
                    Ok(false)
                }
                Node::Special(kind) => Err(Error::Rejected(format!(
                    "{} is a {kind}; only files, directories and in-tree symlinks are allowed",
                    crate::events::shown(&found.rel)
                ))),
            }
        });
        let walked = walked.and_then(|()| send(batch.take()));
        drop(tx);
        if walked.is_err() {
            stop_all(&abort, &sink);
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
    // The first real error: an `Interrupted` may only be the echo of another thread's
    // error (everyone stops once one fails), and must not hide it.
    let mut errors: Vec<Error> = worker_results.into_iter().filter_map(Result::err).collect();
    if let Some(i) = errors.iter().position(|e| !matches!(e, Error::Interrupted)) {
        return Err(errors.swap_remove(i));
    }
    if let Some(e) = errors.pop() {
        return Err(e);
    }
    let ordered = sink.state.into_inner().map_err(|_| poisoned())?;
    let mut problems = w.problems;
    problems.extend(ordered.rejected);
    // Whatever the walk did not consume is listed but not uploaded as a regular file.
    // Looked up in sets: a wrong manifest can leave 200,000 paths beside 20,000 dirs.
    let leftover = manifest.as_ref().map_or(0, Entries::len);
    let links: HashMap<&Path, &Path> = match leftover {
        0 => HashMap::new(),
        _ => w
            .links
            .iter()
            .map(|(r, t)| (r.as_path(), t.as_path()))
            .collect(),
    };
    let dirs: HashSet<&Path> = match leftover {
        0 => HashSet::new(),
        _ => w.dirs.iter().map(|(r, _)| r.as_path()).collect(),
    };
    for (p, _) in manifest.iter().flat_map(Entries::iter) {
        let path = Path::new(OsStr::from_bytes(p));
        // `sha256sum *` lists symlinks too, and `sha256sum $(find -L .)` paths through
        // them: "missing" would send the uploader looking for a file that is plainly there.
        let through = path
            .ancestors()
            .skip(1)
            .find_map(|a| links.get(a).map(|t| (a, t)));
        let is = if links.contains_key(path) {
            "is a symlink in the upload (list regular files only; in-tree symlinks are kept as they are)".to_string()
        } else if let Some((link, target)) = through {
            format!(
                "{} is a symlink in the upload (-> {}): list regular files only, not paths through symlinks",
                crate::events::shown(link),
                target.display()
            )
        } else if dirs.contains(path) {
            "is a directory in the upload".to_string()
        } else {
            "missing from the upload".to_string()
        };
        problems.push(format!(
            "{} is listed in {} but {is}",
            crate::events::shown(path),
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
    let mut out = Output {
        manifest: ordered.manifest,
        files: ordered.files,
        bytes: ordered.bytes,
        linked: ordered.linked,
        hashed: ordered.hashed,
        cache: ordered.cache,
        writeback_starts: ordered.writeback_starts,
        shared: Vec::new(),
    };
    let mut dirs = w.dirs;

    link_shared(input, partial, &mut out, &mut dirs)?;

    // Checked against the final tree, shared links included, so no symlink can reach
    // outside through one; links inside a shared entry's uploaded path were replaced.
    let shared = &site.cfg.shared;
    for (rel, target) in w
        .links
        .iter()
        .filter(|(rel, _)| !shared.iter().any(|e| rel.starts_with(e)))
    {
        symlinks::check_inside(partial, rel, target, shared).map_err(Error::Rejected)?;
    }

    // Deepest first, so a parent loses its write bit only after its children are done.
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
    for (rel, mode) in &dirs {
        let p = partial.join(rel);
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).at(&p)?;
    }
    // The release's own directory is the keeper's, not an entry of the upload: the mode of
    // `deploy-cache/` is whatever the uploading tool left (`rsync -a build/` from a
    // `mktemp -d` build gives 0700), and following it made the live site's root 0500, so a
    // web server running as another user answered 403 to everything. Inside it, every
    // entry keeps its uploaded read and execute bits.
    fs::set_permissions(partial, fs::Permissions::from_mode(RELEASE_ROOT_MODE)).at(partial)?;
    let built_ms = started.elapsed().as_millis() as u64;
    match &flush {
        Some(f) => f.flush()?,
        None => {
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
        writeback_starts = out.writeback_starts,
        duration_ms = started.elapsed().as_millis() as u64,
        // Before the flush: what the flush took is the rest of `duration_ms`.
        built_ms,
        "release built"
    );
    Ok(out)
}

/// Writes `data` at the file's offset, leaving each all-zero 4 KiB block a hole.
fn write_sparse(out: &mut File, data: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    const BLOCK: usize = 4096;
    let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    let mut start = 0;
    while start < data.len() {
        let mut end = (start + BLOCK).min(data.len());
        let skip = zero(&data[start..end]);
        while end < data.len() {
            let next = (end + BLOCK).min(data.len());
            if zero(&data[end..next]) != skip {
                break;
            }
            end = next;
        }
        if skip {
            out.seek(SeekFrom::Current((end - start) as i64))?;
        } else {
            out.write_all(&data[start..end])?;
        }
        start = end;
    }
    Ok(())
}

/// One manifest line.
fn line(
    kind: Kind,
    mode: u32,
    size: u64,
    hash: Option<&Digest>,
    path: &Path,
    target: Option<&Path>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    store::format_line(&mut out, kind, mode, size, hash, path, target, None);
    out
}

fn check_limits(
    max_files: Option<u64>,
    max_bytes: Option<u64>,
    files: u64,
    bytes: u64,
) -> Result<()> {
    if let Some(m) = max_files.filter(|&m| files > m) {
        // `files` counts every entry, not only regular files (a tree of empty directories
        // must not get around the limit): the reason says so, or an operator looks for
        // files the upload does not have.
        return Err(Error::Rejected(format!(
            "upload has more than max_files = {m} entries (files, directories and symlinks, \
             the manifest included)"
        )));
    }
    if let Some(m) = max_bytes.filter(|&m| bytes > m) {
        return Err(Error::Rejected(format!(
            "upload has more than max_bytes = {m} bytes"
        )));
    }
    Ok(())
}

/// Refuses to go on with a release the filesystem cannot hold, with a margin for metadata
/// and for the live site, which must not find its disk full because of a deploy. Checked
/// as the walk finds what it must copy, before any of it is written.
fn check_space(site: &Site, needed: u64, free: u64) -> Result<()> {
    let want = needed + needed / 100 + 16 * 1024 * 1024;
    if want > free {
        return Err(Error::NoSpace(format!(
            "the release needs about {want} bytes in {}, {free} are free",
            site.releases().display()
        )));
    }
    Ok(())
}

fn worker(
    input: &Input<'_>,
    rx: &Mutex<Receiver<Batch>>,
    abort: &AtomicBool,
    sink: &Sink,
    budget: &Budget,
) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let result = (|| loop {
        let batch = {
            let guard = rx
                .lock()
                .map_err(|_| Error::Failed("finalize queue poisoned".into()))?;
            guard.recv()
        };
        let Ok(mut batch) = batch else {
            return Ok(());
        };
        let mut out = BatchOut::default();
        let items = std::mem::take(&mut batch.items);
        let mut dir = 0;
        for item in &items {
            if input.cancel.load(Ordering::Relaxed) || abort.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            let job = match item {
                Item::Enter(i) => {
                    dir = *i;
                    continue;
                }
                Item::Line(r) => {
                    out.manifest.extend_from_slice(&batch.lines[r.clone()]);
                    continue;
                }
                Item::MakeDir(dir) => {
                    dir.dst()?;
                    continue;
                }
                Item::File(job) => job,
            };
            let rel = batch.path(&job.rel);
            let Some((ctx, src)) = batch.dirs.get(dir) else {
                return Err(Error::Failed("finalize batch lost its directory".into()));
            };
            let stat = file_stat(src, rel, job.stat)?;
            let size = stat.st_size as u64;
            let seen = budget.seen_bytes.fetch_add(size, Ordering::Relaxed) + size;
            check_limits(None, input.site.cfg.max_bytes, 0, seen)?;
            let at = Place { ctx, src, rel };
            match process_file(input, &at, job, &stat, budget, &mut buf) {
                Ok(done) => {
                    if !job.hidden {
                        store::format_line(
                            &mut out.manifest,
                            Kind::File,
                            done.mode,
                            size,
                            Some(&done.digest),
                            rel,
                            None,
                            Some(done.mtime),
                        );
                        out.files += 1;
                        out.bytes += size;
                    }
                    let key = StatKey::of(&stat);
                    hashcache::format_line(
                        &mut out.cache,
                        rel.as_os_str().as_bytes(),
                        &key,
                        &done.digest,
                    );
                    out.linked += u64::from(done.linked);
                    out.hashed += u64::from(done.hashed);
                }
                Err(Error::Rejected(r)) => out.rejected.push(r),
                Err(e) => return Err(e),
            }
        }
        let mut st = sink.state.lock().map_err(|_| poisoned())?;
        st.put(batch.seq, out)?;
        sink.written.store(st.next, Ordering::Release);
        let wake = st.walk_waiting;
        drop(st);
        // A wake-up is a syscall even with nobody waiting: only when the walk is.
        if wake {
            sink.progress.notify_all();
        }
    })();
    if result.is_err() {
        stop_all(abort, sink);
        // Keep taking batches (and dropping them) until the walk sees `abort`, so it never
        // blocks on a full queue that nobody reads.
        while let Ok(guard) = rx.lock() {
            if guard.recv().is_err() {
                break;
            }
        }
    }
    result
}

/// The status of a file the walk found, taken now if the walk did not, and checked to
/// still be a regular file.
fn file_stat(src: &OwnedFd, rel: &Path, known: Option<FileStat>) -> Result<FileStat> {
    let stat = match known {
        Some(s) => s,
        None => walk::stat_at(src, rel).map_err(|e| in_flight_or(e, rel))?,
    };
    if !walk::is_file(stat.st_mode) {
        return Err(Error::Changed(format!(
            "{} changed type while the upload was being read",
            crate::events::shown(rel)
        )));
    }
    Ok(stat)
}

/// A name that vanished is an upload still at work when it looks like a temporary name.
fn in_flight_or(e: Error, rel: &Path) -> Error {
    match e {
        Error::Changed(_)
            if inflight::looks_in_flight(rel.file_name().unwrap_or_default(), false) =>
        {
            Error::InFlight(crate::events::shown(rel))
        }
        e => e,
    }
}

/// A file placed in the release.
struct Done {
    digest: Digest,
    mode: u32,
    /// The mtime its inode in the release has, for the manifest.
    mtime: Mtime,
    linked: bool,
    /// Read and hashed (not known from the hash cache).
    hashed: bool,
}

/// Where a file goes and comes from.
struct Place<'a> {
    /// Its directory in the new release (and the link source).
    ctx: &'a DirCtx,
    /// Its directory in `deploy-cache/`.
    src: &'a OwnedFd,
    /// Its path in the upload.
    rel: &'a Path,
}

fn process_file(
    input: &Input<'_>,
    at: &Place<'_>,
    job: &FileJob,
    stat: &FileStat,
    budget: &Budget,
    buf: &mut [u8],
) -> Result<Done> {
    let Place { ctx, src, rel } = *at;
    let name = rel.file_name().unwrap_or_default();
    let mode = release_mode(stat.st_mode);
    let size = stat.st_size as u64;
    let key = StatKey::of(stat);
    let dest = || input.site.partial(input.id).join(rel);
    if let Some((_, cached)) = job.cached.filter(|(k, _)| *k == key) {
        // A cache/manifest disagreement falls through to reading the file: the read is
        // the truth, the cache only saves work.
        if job.expected.is_none_or(|e| e == cached) {
            let want = Linkable {
                digest: cached,
                mode,
                size,
            };
            if let Some(mtime) = link_into(input, ctx, name, &want, job.same_path, stat, false) {
                return Ok(Done {
                    digest: cached,
                    mode,
                    mtime,
                    linked: true,
                    hashed: false,
                });
            }
        }
    }
    // A sparse upload (a preallocated database, a disk image) keeps its holes, as
    // `cp --sparse=auto` would: written out whole, the release took many times the
    // upload's space. The space check still counts the apparent size: every byte is
    // read and hashed whatever it holds, and a hole costs an uploader nothing, so a
    // terabyte of it is refused at once rather than read for hours.
    let sparse = (stat.st_blocks as u64).saturating_mul(512) < size;
    // Checked before a byte is written: the live site must not find its disk full.
    let needed = budget.to_copy.fetch_add(size, Ordering::Relaxed) + size;
    check_space(input.site, needed, budget.free)?;
    let mut file = walk::open_file(src, rel, stat)?;
    let out = openat(
        ctx.dst()?,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(std::io::Error::from)
    .at(&dest())?;
    let mut out = File::from(out);
    let mut hasher = Sha256::new();
    let mut copied: u64 = 0;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).at(&input.site.deploy_cache().join(rel)),
        };
        hasher.update(&buf[..n]);
        if sparse {
            write_sparse(&mut out, &buf[..n]).at(&dest())?;
        } else {
            out.write_all(&buf[..n]).at(&dest())?;
        }
        copied += n as u64;
    }
    if sparse {
        // A hole at the end is a length, not a write.
        out.set_len(copied).at(&dest())?;
    }
    if input.durability.starts_writeback(needed) {
        fsops::start_writeback(&out);
    }
    let after = fstat(&file).at(&input.site.deploy_cache().join(rel))?;
    if copied != size || StatKey::of(&after) != key {
        return Err(Error::Rejected(format!(
            "{} changed while it was being copied",
            crate::events::shown(rel)
        )));
    }
    let digest: Digest = hasher.finalize().into();
    if let Some(expected) = job.expected {
        if expected != digest && job.is_manifest {
            return Err(Error::Rejected(format!(
                "{} was replaced while the upload was being processed",
                crate::events::shown(rel)
            )));
        }
        if expected != digest {
            return Err(Error::Rejected(format!(
                "checksum mismatch for {}: {} says {}, upload has {}",
                crate::events::shown(rel),
                input.site.cfg.manifest,
                to_hex(&expected),
                to_hex(&digest)
            )));
        }
    }
    out.set_permissions(fs::Permissions::from_mode(mode))
        .at(&dest())?;
    let times = fs::FileTimes::new().set_modified(system_time(after.st_mtime, after.st_mtime_nsec));
    out.set_times(times).at(&dest())?;
    // What the filesystem kept (it may round), for the next build's check of this file.
    let copied_mtime = Mtime::of(&fstat(&out).at(&dest())?);
    if input.durability == Durability::PerFile {
        // After chmod and utimes, so the file's metadata is durable too.
        out.sync_all().at(&dest())?;
    }
    drop(out);
    // New inodes (a fresh upload, so no cache hit) of unchanged content: the bytes were
    // read once for the hash anyway; share the earlier release's inode instead of keeping
    // a second copy. The link replaces the copy by rename, so the file never goes missing.
    let want = Linkable { digest, mode, size };
    let linked = link_into(input, ctx, name, &want, job.same_path, stat, true);
    Ok(Done {
        digest,
        mode,
        mtime: linked.unwrap_or(copied_mtime),
        linked: linked.is_some(),
        hashed: true,
    })
}

/// Hard-links `name` in the new release's directory to a file of the link source with
/// the content `want`: the one at the same path when it matches, else any. `replace`:
/// over an existing copy (by rename, so the name never goes missing). Returns the linked
/// inode's mtime; `None` when there is no such file or linking fails (the caller copies,
/// or keeps its copy). `upload` is the file's stat in `deploy-cache/`: an earlier
/// release's file that is that very inode (the uploader hard-linked it there, `cp -al`,
/// `rsync --link-dest`) is never linked, or the new release would share an inode with
/// `deploy-cache/`.
fn link_into(
    input: &Input<'_>,
    ctx: &DirCtx,
    name: &OsStr,
    want: &Linkable,
    same_path: Option<Recorded>,
    upload: &FileStat,
    replace: bool,
) -> Option<Mtime> {
    let source = input.link_from?;
    let tmp;
    let new_name: &OsStr = if replace {
        tmp = fsops::tmp_sibling(Path::new(name));
        tmp.as_os_str()
    } else {
        name
    };
    let dst = ctx.dst().ok()?;
    let no_follow = AtFlags::empty();
    // The earlier release's manifest says what its file was when it was made; what is on
    // disk now may have been edited since (drift). Only a file that still has the recorded
    // type, mode, size and mtime, and was last changed by the keeper itself (its ctime,
    // which an edit that sets the mtime back still moves), is shared: an edited file must
    // not spread into a new release. Nor is the upload's own inode.
    let intact = |st: nix::Result<FileStat>, recorded: Option<Mtime>| {
        let st = st.ok()?;
        let mtime = Mtime::of(&st);
        (st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_mode & 0o7777 == want.mode
            && st.st_size as u64 == want.size
            && recorded.is_none_or(|r| r == mtime)
            && (st.st_dev, st.st_ino) != (upload.st_dev, upload.st_ino)
            && input.changes.explains(&st))
        .then_some((mtime, st))
    };
    let linked = match (same_path, ctx.prev()) {
        (Some(p), Some(prev)) if p.what == *want => {
            let st = nix::sys::stat::fstatat(prev, name, AtFlags::AT_SYMLINK_NOFOLLOW);
            intact(st, p.mtime).filter(|_| linkat(prev, name, dst, new_name, no_follow).is_ok())
        }
        _ => source.find(want).and_then(|(from, recorded)| {
            intact(nix::sys::stat::lstat(&from), recorded)
                .filter(|_| linkat(nix::fcntl::AT_FDCWD, &from, dst, new_name, no_follow).is_ok())
        }),
    };
    let (mtime, st) = linked?;
    input.changes.linked(&st);
    if replace && renameat(dst, new_name, dst, name).is_err() {
        let _ = nix::unistd::unlinkat(dst, new_name, nix::unistd::UnlinkatFlags::NoRemoveDir);
        return None;
    }
    Some(mtime)
}

fn system_time(secs: i64, nsec: i64) -> std::time::SystemTime {
    let base = std::time::UNIX_EPOCH;
    if secs >= 0 {
        base + std::time::Duration::new(secs as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        base - std::time::Duration::from_secs(secs.unsigned_abs())
    }
}

/// The mode of a shared file seeded from the upload's file of mode `uploaded`. Shared data
/// is often a secret (`.env`): the uploader's read bits are kept, never widened (a 0600
/// file stays 0600); the owner may edit it (persistent data, not part of a release); no
/// group or other write bit, and no special bits.
fn shared_file_mode(uploaded: u32) -> u32 {
    (uploaded & 0o755) | 0o200
}

/// A configured `shared` entry of a release being built, made in `ROOT/shared/` only by
/// [`make_shared`], once the upload is accepted: a rejected upload must leave `shared/`
/// as it was (its `.env` seeding it, or a directory made where a later upload has a file,
/// would outlive the rejection and be what every later release links to).
#[derive(Debug)]
pub struct SharedEntry {
    entry: PathBuf,
    /// The upload's file of that name, copied aside to seed a missing entry.
    seed: Option<fsops::HeldFile>,
}

/// Replaces each configured `shared` entry in the release by a symlink to
/// `ROOT/shared/<entry>`; an uploaded file of that name is held aside to seed the entry.
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
        let uploaded = fs::symlink_metadata(&in_release).ok();
        // Only when the entry is missing is a copy of any use; the check is repeated
        // when it is made, as someone may make it meanwhile.
        let missing = fs::symlink_metadata(site.shared().join(entry)).is_err();
        let seed = match &uploaded {
            Some(m) if m.is_file() && missing => {
                fsops::ensure_dir(&site.shared(), 0o755)?;
                Some(fsops::HeldFile::copy(
                    &in_release,
                    &site.shared(),
                    entry,
                    shared_file_mode(m.permissions().mode()),
                )?)
            }
            _ => None,
        };
        out.shared.push(SharedEntry {
            entry: entry.clone(),
            seed,
        });
        if uploaded.is_some() {
            // Its files and directories were built but never entered the manifest or
            // the counts.
            fsops::remove_tree(&in_release)?;
            dirs.retain(|(d, _)| !d.starts_with(entry));
            tracing::info!(event = crate::events::SHARED_LINKED, site = site.name(), release = input.id, path = %entry.display(),
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
                out.manifest
                    .write(&line(Kind::Dir, 0o555, 0, None, &parent, None))?;
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
        out.manifest
            .write(&line(Kind::Symlink, 0o777, 0, None, entry, Some(&target)))?;
    }
    Ok(())
}

/// Makes the shared entries an accepted release links to that `ROOT/shared/` lacks:
/// seeded from the upload's file of that name, if any, else an empty directory.
pub fn make_shared(site: &Site, id: &str, entries: Vec<SharedEntry>) -> Result<()> {
    for SharedEntry { entry, seed } in entries {
        let in_shared = site.shared().join(&entry);
        let existing = fs::symlink_metadata(&in_shared).ok();
        // Followed: a link to a file kept elsewhere (`.env -> /etc/shop/env`) is a file too.
        if existing.is_some() && fs::metadata(&in_shared).is_ok_and(|m| m.is_file()) {
            // A file the operator put there (the usual `.env`) is remembered like a seeded
            // one, so healing never recreates it as a directory once it goes missing.
            site.record_shared_file(&entry)?;
        }
        if existing.is_some() {
            continue;
        }
        if seed.is_none() && site.is_shared_file(&entry) {
            // A shared file that went missing (a deleted `.env`) made again as an empty
            // directory would start the app with no settings and block its restore
            // (`cp` would land inside it). Healing leaves it to a person; so does a deploy:
            // the release's link dangles until the file is back.
            tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), release = id, path = %entry.display(),
                reason = %format!("shared file {} is missing and the upload holds no file to seed it; not recreated, restore it", in_shared.display()),
                "shared file missing");
            continue;
        }
        if let Some(parent) = in_shared.parent() {
            fsops::ensure_dir(parent, 0o755)?;
        }
        let kind = match seed {
            Some(held) => {
                if !held.place(&in_shared)? {
                    continue;
                }
                site.record_shared_file(&entry)?;
                "file, seeded from the upload"
            }
            None => {
                match fs::DirBuilder::new().mode(0o755).create(&in_shared) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    other => other.at(&in_shared)?,
                }
                // Said, since it is a guess: nothing told a file (`.env`) from a
                // directory (`storage`). A file put in its place is kept as one.
                "empty directory (the upload had no file to seed it; if it should be a file, replace it with one)"
            }
        };
        tracing::info!(event = crate::events::SHARED_LINKED, site = site.name(), release = id, path = %entry.display(),
            created = kind, "created missing shared entry");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn sparse_writes_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut data = vec![0u8; 3 * 4096 + 100];
        data[5000] = 1; // inside the second block
        data[3 * 4096 + 99] = 2; // the last, short block
        let mut expected = Vec::new();
        let mut out = File::create(&path).unwrap();
        // Two chunks, the second starting in a zero block and ending in a hole.
        for chunk in [&data[..], &data[..4096 + 10], &vec![0u8; 9000][..]] {
            write_sparse(&mut out, chunk).unwrap();
            expected.extend_from_slice(chunk);
        }
        out.set_len(expected.len() as u64).unwrap();
        drop(out);
        assert_eq!(fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn only_copies_past_the_first_mebibytes_start_their_own_writeback() {
        let mib = 1024 * 1024;
        assert!(!Durability::Syncfs.starts_writeback(3 * mib));
        assert!(!Durability::Syncfs.starts_writeback(8 * mib));
        assert!(Durability::Syncfs.starts_writeback(8 * mib + 1));
        assert!(Durability::Syncfs.starts_writeback(300 * mib));
        // Per-file durability fsyncs each file instead.
        assert!(!Durability::PerFile.starts_writeback(300 * mib));
    }

    #[test]
    fn small_uploads_flush_once_unless_much_else_awaits_writeback() {
        let mib = 1024 * 1024;
        let small = Some(100);
        assert_eq!(Durability::for_upload(small, Some(mib)), Durability::Syncfs);
        assert_eq!(
            Durability::for_upload(small, Some(16 * mib)),
            Durability::Syncfs
        );
        assert_eq!(
            Durability::for_upload(small, Some(16 * mib + 1)),
            Durability::PerFile
        );
        // Not knowing the backlog, a small upload does not risk waiting for it.
        assert_eq!(Durability::for_upload(small, None), Durability::PerFile);
        // Thousands of fsyncs cost more than any backlog: always one flush.
        assert_eq!(
            Durability::for_upload(Some(2_001), Some(900 * mib)),
            Durability::Syncfs
        );
        assert_eq!(Durability::for_upload(None, None), Durability::Syncfs);
        assert_eq!(
            Durability::for_upload(Some(2_000), None),
            Durability::PerFile
        );
    }

    /// Every entry of the tree at `root`: path, mode and content (files) or target (links).
    fn snapshot(root: &Path) -> Vec<(PathBuf, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            for e in fs::read_dir(root.join(&rel)).unwrap() {
                let e = e.unwrap();
                let r = rel.join(e.file_name());
                let m = fs::symlink_metadata(root.join(&r)).unwrap();
                let body = if m.is_dir() {
                    todo.push(r.clone());
                    Vec::new()
                } else if m.file_type().is_symlink() {
                    fs::read_link(root.join(&r))
                        .unwrap()
                        .into_os_string()
                        .into_vec()
                } else {
                    fs::read(root.join(&r)).unwrap()
                };
                out.push((r, m.permissions().mode() & 0o7777, body));
            }
        }
        out.sort();
        out
    }

    /// A site with the default config under `root`, its layout made.
    fn test_site(root: &Path) -> Site {
        let site = Site::new(crate::config::SiteConfig::with_defaults(
            "t",
            root.to_path_buf(),
        ));
        site.ensure_layout().unwrap();
        site
    }

    /// Builds release `id` (no link source) from the site's `deploy-cache/`, whose
    /// manifest is `sums`.
    fn build_from(site: &Site, id: &str, durability: Durability, sums: &str) -> Output {
        let cancel = AtomicBool::new(false);
        let input = Input {
            site,
            id,
            link_from: None,
            changes: &Changes::default(),
            cancel: &cancel,
            durability,
        };
        let expected = Expected {
            entries: crate::upload::manifest::parse(sums.as_bytes()).unwrap(),
            manifest_digest: Sha256::digest(sums.as_bytes()).into(),
        };
        build(&input, Some(expected)).unwrap()
    }

    #[test]
    fn both_ways_of_flushing_build_the_same_verified_release() {
        let t = tempfile::tempdir().unwrap();
        let site = test_site(t.path());
        let up = site.deploy_cache();
        let mut sums = String::new();
        for i in 0..40 {
            let rel = format!("d{}/f{i}.txt", i % 3);
            fs::create_dir_all(up.join(format!("d{}", i % 3))).unwrap();
            let body = format!("file {i}\n").repeat(i + 1);
            fs::write(up.join(&rel), &body).unwrap();
            sums.push_str(&format!(
                "{}  {rel}\n",
                to_hex(&Sha256::digest(&body).into())
            ));
        }
        std::os::unix::fs::symlink("d0/f0.txt", up.join("link")).unwrap();
        fs::write(up.join("SHA256SUMS"), &sums).unwrap();
        let mut trees = Vec::new();
        for (id, durability) in [("a", Durability::PerFile), ("b", Durability::Syncfs)] {
            let out = build_from(&site, id, durability, &sums);
            assert_eq!((out.files, out.hashed), (41, 41), "{durability:?}");
            trees.push(snapshot(&site.partial(id)));
        }
        assert_eq!(trees[0], trees[1]);
        // Read-only, the symlink aside (its mode means nothing).
        let link = Path::new("link");
        assert!(trees[0]
            .iter()
            .all(|(p, mode, _)| p == link || mode & 0o222 == 0));
        assert_eq!(trees[0].len(), 45);
    }

    #[test]
    fn a_big_manifest_and_cache_start_their_writeback_as_they_grow() {
        let t = tempfile::tempdir().unwrap();
        let site = test_site(t.path());
        let up = site.deploy_cache();
        // Long names, so that a few thousand files make MiBs of manifest and cache lines.
        let mut sums = String::new();
        let digest = to_hex(&Sha256::digest(b"x").into());
        for i in 0..3_000 {
            let dir = format!("d{}", i % 30);
            let rel = format!("{dir}/{i:0>200}.txt");
            fs::create_dir_all(up.join(&dir)).unwrap();
            fs::write(up.join(&rel), b"x").unwrap();
            sums.push_str(&format!("{digest}  {rel}\n"));
        }
        fs::write(up.join("SHA256SUMS"), &sums).unwrap();
        let mut starts = Vec::new();
        for (id, durability) in [("a", Durability::Syncfs), ("b", Durability::PerFile)] {
            let out = build_from(&site, id, durability, &sums);
            assert_eq!(out.files, 3_001);
            starts.push(out.writeback_starts);
        }
        // Almost 2 MiB of lines: one start past the first MiB, none when every file is
        // fsynced on its own anyway.
        assert_eq!(starts, [1, 0]);
    }

    #[test]
    fn shared_file_modes_keep_read_bits_never_widen() {
        assert_eq!(shared_file_mode(0o100600), 0o600);
        assert_eq!(shared_file_mode(0o100400), 0o600);
        assert_eq!(shared_file_mode(0o100440), 0o640);
        assert_eq!(shared_file_mode(0o100666), 0o644);
        assert_eq!(shared_file_mode(0o104755), 0o755);
    }

    #[test]
    fn modes_lose_write_and_special_bits() {
        assert_eq!(release_mode(0o100755), 0o555);
        assert_eq!(release_mode(0o100644), 0o444);
        assert_eq!(release_mode(0o104755), 0o555);
        assert_eq!(release_mode(0o042775), 0o555);
        assert_eq!(release_mode(0o100600), 0o400);
    }
}
