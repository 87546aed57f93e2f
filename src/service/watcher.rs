//! The only place that knows about inotify. Watches are non-recursive: the marker appears
//! at the top of `deploy-cache/`, and `current`/links live at the top of the root, so a
//! 100k-file tree costs two watches, not 100k.
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

/// Who to wake for events in one watched directory.
#[derive(Clone)]
struct Route {
    /// Only names equal to this wake (the marker); `None`: any name.
    name: Option<OsString>,
    /// The site woken, named in what the watcher logs about it.
    site: Arc<str>,
    wake: Arc<dyn Wake>,
}

/// Watched directories and their routes, shared with the reader thread.
#[derive(Default)]
struct Table {
    /// Who to wake, by watched directory.
    routes: HashMap<PathBuf, Vec<Route>>,
    /// The directory each live watch was added for.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// The live watch of each directory, and the (device, inode) the path named just
    /// before the watch was added.
    wds: HashMap<PathBuf, (WatchDescriptor, (u64, u64))>,
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
            match &rt.name {
                // Marker: only a finished write or a rename into place announces one. A bare
                // create may have no content yet, and the marker leaving (claimed by the
                // keeper, or deleted) is no work: waking for the keeper's own claim
                // retried a deferred upload at once, racing its cleanup.
                Some(n) if n == name && kind == Change::Arrived => rt.wake.wake(),
                Some(n) if n == name && kind == Change::Created && whole_at_birth(dir, name) => {
                    rt.wake.wake()
                }
                Some(_) => {}
                // The keeper's own transient names (a release being built, a link being
                // swapped) need no healing: waking for them made every build trigger a
                // heal, and a build deferred for space retry itself in a loop.
                None if is_own_transient(name) => {}
                None => rt.wake.wake(),
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
                if self.wds.get(&dir).is_some_and(|(wd, _)| *wd == ev.wd) {
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
            // its parent, for whoever watches that (the root, for `deploy-cache/`).
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
    /// events on `name` in it (or any name when `None`). Re-watching a directory that was deleted, replaced or
    /// mounted over is how callers recover its watch; re-watching one whose watch is
    /// alive and whose path still names the same directory costs one `stat`.
    pub fn watch(
        &self,
        dir: &Path,
        name: Option<&str>,
        site: &str,
        wake: Arc<dyn Wake>,
    ) -> Result<()> {
        let mut table = self
            .table
            .lock()
            .map_err(|_| Error::Failed("watcher table poisoned".into()))?;
        let list = table.routes.entry(dir.to_path_buf()).or_default();
        if !list.iter().any(|r| same(&r.wake, &wake)) {
            list.push(Route {
                name: name.map(Into::into),
                site: site.into(),
                wake,
            });
        }
        // The identity is taken before the watch is added: if the path changes in between,
        // the next call sees another identity and adds the watch again.
        let id = fs::metadata(dir).map(|m| (m.dev(), m.ino())).ok();
        if let (Some(id), Some((_, watched))) = (id, table.wds.get(dir)) {
            // Alive (its IN_IGNORED not seen) and on the directory the path names.
            if *watched == id {
                return Ok(());
            }
        }
        // No unwatch first: adding again re-resolves the path (a recreated directory gets
        // a new watch) without a window in which events are lost. The table stays locked
        // so the reader cannot see the new watch's events before it is known.
        let wd = self
            .inotify
            .add_watch(dir, wake_mask())
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
        if let Some((old, _)) = table.wds.insert(dir.to_path_buf(), (wd, id)) {
            if old != wd {
                // The path now names another directory; the old one (moved away, or
                // deleted and not yet reported) must not be taken for it any more.
                table.dirs.remove(&old);
                let _ = self.inotify.rm_watch(old);
            }
        }
        table.dirs.insert(wd, dir.to_path_buf());
        Ok(())
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
            if let Some((wd, _)) = table.wds.remove(&dir) {
                table.dirs.remove(&wd);
                let _ = self.inotify.rm_watch(wd);
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
                    name: Some(".release-ready".into()),
                    site: "shop".into(),
                    wake: marker_wake,
                },
                Route {
                    name: None,
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
                name: None,
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
