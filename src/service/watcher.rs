//! The only place that knows about inotify. Watches are non-recursive: the marker appears
//! at the top of `deploy-cache/`, and `current`/links live at the top of the root, so a
//! 100k-file tree costs two watches, not 100k. The few directories below the root whose
//! entries healing recreates (`shared/`, the way to a nested shared entry or link) are
//! watched for those names leaving only ([`Interest::Gone`]): an app writing its uploads
//! and caches there never wakes the reader thread.
//!
//! Events are hints, never the source of truth: each one only wakes a site's worker (which
//! sets a flag: many wake-ups before the worker looks are one), and the worker rescans. A
//! flood of events therefore collapses into one wake-up instead of filling a queue, and an
//! inotify overflow wakes every site for a full rescan.
//!
//! Only the events that can wake a worker are asked for (names created, deleted, renamed,
//! closed after writing; the watched directory itself deleted or moved). Opens, reads,
//! attribute changes and partial writes are never delivered, so the service's own
//! directory scans (every healing pass lists `releases/` and the root) and a busy upload
//! do not wake the reader thread at all.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};

use crate::error::{Error, Result};

/// What an event wakes: a site's worker. Called on the watcher's thread, so it must only
/// record the wake-up, never do the work.
pub trait Wake: Send + Sync {
    /// Records one wake-up.
    fn wake(&self);
}

/// True when `a` and `b` are the same wake-up target.
fn same(a: &Arc<dyn Wake>, b: &Arc<dyn Wake>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

/// Which events in a watched directory wake a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    /// Only this name (the marker), once it has arrived complete.
    Marker(OsString),
    /// Any name created, deleted or renamed, but the keeper's own transient names.
    Any,
    /// Only these names leaving (deleted or renamed away, or their directory itself going):
    /// the entries healing recreates, in a directory others write into.
    Gone(BTreeSet<OsString>),
}

impl Interest {
    /// The marker `name`.
    pub fn marker(name: &str) -> Interest {
        Interest::Marker(name.into())
    }

    /// The inotify events this interest needs delivered.
    fn mask(&self) -> AddWatchFlags {
        match self {
            Interest::Marker(_) | Interest::Any => wake_mask(),
            // No creations or writes: `shared/` is where the app writes (uploads, caches,
            // sessions), and those must not wake the reader thread at all.
            Interest::Gone(_) => gone_mask(),
        }
    }
}

/// Who to wake for events in one watched directory.
#[derive(Clone)]
struct Route {
    /// The events and names that wake.
    interest: Interest,
    /// The site woken, named in what the watcher logs about it.
    site: Arc<str>,
    wake: Arc<dyn Wake>,
}

/// The live watch of one directory.
#[derive(Clone, Copy)]
struct Live {
    wd: WatchDescriptor,
    /// The (device, inode) the path named just before the watch was added.
    id: (u64, u64),
    /// The events asked for so far (masks are only ever added to, see [`Watcher::watch`]).
    mask: AddWatchFlags,
}

/// Watched directories and their routes, shared with the reader thread.
#[derive(Default)]
struct Table {
    /// Who to wake, by watched directory.
    routes: HashMap<PathBuf, Vec<Route>>,
    /// The directory each live watch was added for.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// The live watch of each directory.
    wds: HashMap<PathBuf, Live>,
}

impl Table {
    /// Wakes every route (overflow or a read error: anything may have been missed).
    fn wake_all(&self) {
        self.routes.values().flatten().for_each(|rt| rt.wake.wake());
    }

    /// The sites routed to, each once however many directories it watches: what lost
    /// events concern, one log line each (every event names its site).
    fn sites(&self) -> BTreeSet<&str> {
        self.routes.values().flatten().map(|rt| &*rt.site).collect()
    }

    /// Wakes the routes of `dir` that want an event of `kind` on `name`.
    fn wake(&self, dir: &Path, name: &OsStr, kind: Change) {
        let Some(list) = self.routes.get(dir) else {
            return;
        };
        for rt in list {
            match &rt.interest {
                // Marker: only a finished write or a rename into place announces one. A bare
                // create may have no content yet, and the marker leaving (claimed by the
                // keeper, or deleted) is no work: waking for the keeper's own claim
                // retried a deferred upload at once, racing its cleanup.
                Interest::Marker(n) if n == name && kind == Change::Arrived => rt.wake.wake(),
                Interest::Marker(n)
                    if n == name && kind == Change::Created && whole_at_birth(dir, name) =>
                {
                    rt.wake.wake()
                }
                Interest::Marker(_) => {}
                // The keeper's own transient names (a release being built, a link being
                // swapped) need no healing: waking for them made every build trigger a
                // heal, and a build deferred for space retry itself in a loop.
                Interest::Any if is_own_transient(name) => {}
                Interest::Any => rt.wake.wake(),
                // Other names leaving (an app's temporary files renamed into place, old
                // cache files deleted) are no healing's business.
                Interest::Gone(names) if kind == Change::Left && names.contains(name) => {
                    rt.wake.wake()
                }
                Interest::Gone(_) => {}
            }
        }
    }

    fn dispatch(&mut self, ev: &InotifyEvent) {
        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            for site in self.sites() {
                tracing::warn!(
                    event = crate::events::WATCH_OVERFLOW,
                    site,
                    "inotify queue overflowed; rescanning the site"
                );
            }
            self.wake_all();
            return;
        }
        if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
            // The watch is gone (its directory was deleted, or it was removed).
            if let Some(dir) = self.dirs.remove(&ev.wd) {
                if self.wds.get(&dir).is_some_and(|live| live.wd == ev.wd) {
                    self.wds.remove(&dir);
                }
            }
            return;
        }
        if !ev.mask.intersects(wake_mask()) {
            return;
        }
        let Some(dir) = self.dirs.get(&ev.wd) else {
            return;
        };
        let kind = Change::of(ev.mask);
        match &ev.name {
            Some(name) => self.wake(dir, name, kind),
            // The watched directory itself was deleted or moved: an event on its name in
            // its parent, for whoever watches that (the root, for `deploy-cache/`; the
            // directory above, for one on the way to a nested shared entry or link).
            None => {
                if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
                    self.wake(parent, name, kind);
                }
            }
        }
    }
}

/// What happened to a name, as far as waking is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Written and closed, or renamed into the directory: its content is complete.
    Arrived,
    /// Created, content possibly still to come.
    Created,
    /// Deleted or renamed away (or the watched directory itself went).
    Left,
}

impl Change {
    fn of(mask: AddWatchFlags) -> Change {
        if mask.intersects(AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO) {
            Change::Arrived
        } else if mask.contains(AddWatchFlags::IN_CREATE) {
            Change::Created
        } else {
            Change::Left
        }
    }
}

/// True when `dir/name`, just created, will get no close-write to announce it: a
/// directory or symlink (`mkdir`, `ln -s`: the claim rejects it, which the uploader must
/// hear of now, not at the next periodic pass) or a second hard link to an existing file
/// (`ln`). A new regular file with one link is being written by whoever created it.
fn whole_at_birth(dir: &Path, name: &OsStr) -> bool {
    fs::symlink_metadata(dir.join(name)).is_ok_and(|m| !m.file_type().is_file() || m.nlink() > 1)
}

/// Names the keeper creates and removes itself while working.
fn is_own_transient(name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    b.starts_with(crate::fsops::PARTIAL_PREFIX.as_bytes())
        || b.starts_with(crate::fsops::TMP_PREFIX.as_bytes())
}

/// The events that wake a worker, and the only ones asked for (besides overflow and
/// `IN_IGNORED`, which the kernel always reports).
fn wake_mask() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
}

/// `IN_MASK_ADD`, which nix does not name: the events given are added to those the
/// directory's watch already asks for, instead of replacing them.
fn mask_add() -> AddWatchFlags {
    AddWatchFlags::from_bits_retain(libc::IN_MASK_ADD)
}

/// The events of [`Interest::Gone`]: names leaving, and the directory itself going.
fn gone_mask() -> AddWatchFlags {
    AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
}

/// A shared inotify watcher routing events to per-site wake-ups.
pub struct Watcher {
    inotify: Arc<Inotify>,
    table: Arc<Mutex<Table>>,
}

/// Reads events until the descriptor fails (it never does while the process lives).
fn read_loop(inotify: &Inotify, table: &Mutex<Table>) {
    loop {
        match inotify.read_events() {
            Ok(events) => {
                let Ok(mut table) = table.lock() else { return };
                for ev in &events {
                    table.dispatch(ev);
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                // No more events: wake everyone once; the heal timer is the backstop.
                if let Ok(table) = table.lock() {
                    for site in table.sites() {
                        tracing::error!(event = crate::events::WATCH_OVERFLOW, site, reason = %e,
                            "cannot read inotify events; rescanning the site, relying on \
                             the heal timer from now on");
                    }
                    table.wake_all();
                }
                return;
            }
        }
    }
}

impl Watcher {
    /// Starts the inotify instance and the thread that reads it (blocked in `read(2)`
    /// while nothing happens).
    pub fn new() -> Result<Arc<Watcher>> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| match e {
            Errno::EMFILE => Error::Failed(
                "cannot start inotify: too many inotify instances; raise \
                 fs.inotify.max_user_instances (sysctl)"
                    .into(),
            ),
            _ => Error::Failed(format!("cannot start inotify: {e}")),
        })?;
        let inotify = Arc::new(inotify);
        let table = Arc::new(Mutex::new(Table::default()));
        let (i, t) = (Arc::clone(&inotify), Arc::clone(&table));
        std::thread::Builder::new()
            .name("inotify".into())
            .spawn(move || read_loop(&i, &t))
            .map_err(|e| Error::Failed(format!("cannot start the inotify thread: {e}")))?;
        Ok(Arc::new(Watcher { inotify, table }))
    }

    /// Watches `dir` (non-recursively) and wakes `wake`, the worker of site `site`, for
    /// the events of `interest` in it. Re-watching a directory that was deleted, replaced
    /// or mounted over is how callers recover its watch; re-watching one whose watch is
    /// alive and whose path still names the same directory costs one `stat`. True when a
    /// new watch was added (the path was not watched, or named another directory): what
    /// happened in the directory before then was not seen.
    pub fn watch(
        &self,
        dir: &Path,
        interest: Interest,
        site: &str,
        wake: Arc<dyn Wake>,
    ) -> Result<bool> {
        let mut table = self
            .table
            .lock()
            .map_err(|_| Error::Failed("watcher table poisoned".into()))?;
        let mask = {
            let list = table.routes.entry(dir.to_path_buf()).or_default();
            match list.iter_mut().find(|r| same(&r.wake, &wake)) {
                Some(r) => r.interest = interest,
                None => list.push(Route {
                    interest,
                    site: site.into(),
                    wake,
                }),
            }
            list.iter()
                .fold(AddWatchFlags::empty(), |m, r| m | r.interest.mask())
        };
        // An uploader's directory (`deploy-cache/`) is watched only as itself: replaced by
        // a symlink, it must not bring this site the events of wherever the link points
        // (another site's uploads). Adding the watch then fails (ENOTDIR).
        let own_only = table
            .routes
            .get(dir)
            .is_some_and(|l| l.iter().any(|r| matches!(r.interest, Interest::Marker(_))));
        let (meta, flags) = if own_only {
            (
                fs::symlink_metadata(dir),
                AddWatchFlags::IN_DONT_FOLLOW | AddWatchFlags::IN_ONLYDIR,
            )
        } else {
            (fs::metadata(dir), AddWatchFlags::empty())
        };
        // The identity is taken before the watch is added: if the path changes in between,
        // the next call sees another identity and adds the watch again.
        let id = meta.map(|m| (m.dev(), m.ino())).ok();
        if let (Some(id), Some(live)) = (id, table.wds.get(dir)) {
            // Alive (its IN_IGNORED not seen), on the directory the path names, and asking
            // for every event its routes need.
            if live.id == id && live.mask.contains(mask) {
                return Ok(false);
            }
        }
        // No unwatch first: adding again re-resolves the path (a recreated directory gets
        // a new watch) without a window in which events are lost. The table stays locked
        // so the reader cannot see the new watch's events before it is known. The mask is
        // added to, never replaced: a path that reaches a directory watched under another
        // name (a link's directory symlinked to the root) must not narrow that one's events.
        let wd = self
            .inotify
            .add_watch(dir, mask | mask_add() | flags)
            .map_err(|e| match e {
                Errno::ENOSPC => Error::Failed(format!(
                    "cannot watch {}: the inotify watch limit is reached; raise \
                     fs.inotify.max_user_watches (sysctl) or fs.inotify.max_user_instances",
                    dir.display()
                )),
                // Typed, so a caller can tell a directory that vanished (ENOENT,
                // ENOTDIR) from a real failure.
                _ => Error::Io {
                    path: dir.to_path_buf(),
                    source: std::io::Error::from(e),
                },
            })?;
        // Without an identity (the stat failed, yet the watch was added) the next call
        // adds it again.
        let id = id.unwrap_or((u64::MAX, u64::MAX));
        let old = table.wds.get(dir).copied();
        let mask = match old {
            Some(old) if old.wd == wd => mask | old.mask,
            _ => mask,
        };
        table.wds.insert(dir.to_path_buf(), Live { wd, id, mask });
        let fresh = match old {
            Some(old) if old.wd == wd => false,
            Some(old) => {
                // The path now names another directory; the old one (moved away, or
                // deleted and not yet reported) must not be taken for it any more.
                table.dirs.remove(&old.wd);
                let _ = self.inotify.rm_watch(old.wd);
                true
            }
            None => true,
        };
        // Another path already reaching the same directory keeps its events: they are
        // routed by watch, so one of the two names must win, and the first one has them.
        let aliased = table
            .dirs
            .get(&wd)
            .is_some_and(|d| d != dir && table.wds.get(d).is_some_and(|l| l.wd == wd));
        if !aliased {
            table.dirs.insert(wd, dir.to_path_buf());
        }
        Ok(fresh)
    }

    /// Stops routing events of every directory to `wake` (a site going away).
    pub fn forget(&self, wake: &Arc<dyn Wake>) {
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        let mut empty = Vec::new();
        for (dir, list) in table.routes.iter_mut() {
            list.retain(|r| !same(&r.wake, wake));
            if list.is_empty() {
                empty.push(dir.clone());
            }
        }
        for dir in empty {
            table.routes.remove(&dir);
            if let Some(live) = table.wds.remove(&dir) {
                table.dirs.remove(&live.wd);
                let _ = self.inotify.rm_watch(live.wd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn table(dir: &Path, marker: &Arc<Count>, any: &Arc<Count>) -> Table {
        let mut t = Table::default();
        let marker_wake: Arc<dyn Wake> = marker.clone();
        let any_wake: Arc<dyn Wake> = any.clone();
        t.routes.insert(
            dir.to_path_buf(),
            vec![
                Route {
                    interest: Interest::marker(".release-ready"),
                    site: "shop".into(),
                    wake: marker_wake,
                },
                Route {
                    interest: Interest::Any,
                    site: "shop".into(),
                    wake: any_wake,
                },
            ],
        );
        t
    }

    #[test]
    fn marker_wakes_only_when_it_arrives_complete() {
        let dir = Path::new("/site/deploy-cache");
        let (marker, any) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let t = table(dir, &marker, &any);
        let name = OsStr::new(".release-ready");
        for mask in [
            AddWatchFlags::IN_CLOSE_WRITE,
            AddWatchFlags::IN_MOVED_TO,
            AddWatchFlags::IN_CREATE,
            AddWatchFlags::IN_MOVED_FROM,
            AddWatchFlags::IN_DELETE,
        ] {
            t.wake(dir, name, Change::of(mask));
        }
        assert_eq!(
            marker.0.load(Ordering::Relaxed),
            2,
            "the marker route must wake for close-write and moved-to only, \
             not for its creation or for the keeper claiming it"
        );
    }

    #[test]
    fn any_name_route_ignores_the_keepers_transient_names() {
        let dir = Path::new("/site/releases");
        let (marker, any) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let t = table(dir, &marker, &any);
        let partial = format!("{}big", crate::fsops::PARTIAL_PREFIX);
        t.wake(dir, OsStr::new(&partial), Change::Created);
        t.wake(dir, OsStr::new(&partial), Change::Left);
        assert_eq!(
            any.0.load(Ordering::Relaxed),
            0,
            "a partial release woke a heal"
        );
        t.wake(dir, OsStr::new("20261203T000000Z"), Change::Left);
        t.wake(dir, OsStr::new("current"), Change::Created);
        assert_eq!(
            any.0.load(Ordering::Relaxed),
            2,
            "a release or link change must wake a heal"
        );
        assert_eq!(marker.0.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn gone_route_wakes_only_for_its_names_leaving() {
        let dir = Path::new("/site/shared");
        let count = Arc::new(Count::default());
        let wake: Arc<dyn Wake> = count.clone();
        let mut t = Table::default();
        t.routes.insert(
            dir.to_path_buf(),
            vec![Route {
                interest: Interest::Gone(["storage".into(), ".env".into()].into()),
                site: "shop".into(),
                wake,
            }],
        );
        for mask in [
            AddWatchFlags::IN_CREATE,
            AddWatchFlags::IN_CLOSE_WRITE,
            AddWatchFlags::IN_MOVED_TO,
        ] {
            t.wake(dir, OsStr::new("storage"), Change::of(mask));
        }
        t.wake(dir, OsStr::new("upload.tmp"), Change::Left);
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            0,
            "only a configured entry leaving wakes a heal"
        );
        t.wake(dir, OsStr::new("storage"), Change::Left);
        t.wake(dir, OsStr::new(".env"), Change::Left);
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        assert!(
            !Interest::Gone(BTreeSet::new())
                .mask()
                .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_CLOSE_WRITE),
            "creations and writes are not even asked for"
        );
    }

    #[test]
    fn overflow_concerns_each_site_once_however_many_directories_it_watches() {
        let (marker, any) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let mut t = table(Path::new("/shop/deploy-cache"), &marker, &any);
        let any_wake: Arc<dyn Wake> = any.clone();
        for (dir, site) in [
            ("/shop", "shop"),
            ("/blog", "blog"),
            ("/blog/releases", "blog"),
        ] {
            t.routes.entry(dir.into()).or_default().push(Route {
                interest: Interest::Any,
                site: site.into(),
                wake: Arc::clone(&any_wake),
            });
        }
        assert_eq!(
            t.sites().into_iter().collect::<Vec<_>>(),
            ["blog", "shop"],
            "watch.overflow is logged once per site, named"
        );
    }
}
