//! The only place that knows about `notify` (inotify). Watches are non-recursive: the
//! marker appears at the top of `deploy-cache/`, and `current`/links live at the top of
//! the root, so a 100k-file tree costs two watches, not 100k.
//!
//! Events are hints, never the source of truth: each one only wakes a site's worker (a
//! `tokio::sync::Notify`, which stores at most one permit), and the worker rescans. A flood
//! of events therefore collapses into one wake-up instead of filling a queue, and an
//! inotify overflow (`need_rescan`) wakes every site for a full rescan.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::Notify;

use crate::error::{Error, Result};

/// Who to wake for events in one watched directory.
#[derive(Clone)]
struct Route {
    /// Only names equal to this wake (the marker); `None`: any name.
    name: Option<std::ffi::OsString>,
    wake: Arc<Notify>,
}

type Routes = Arc<Mutex<HashMap<PathBuf, Vec<Route>>>>;

/// A shared inotify watcher routing events to per-site wake-ups.
pub struct Watcher {
    inner: Mutex<RecommendedWatcher>,
    routes: Routes,
}

/// Names the keeper creates and removes itself while working.
fn is_own_transient(name: &std::ffi::OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    b.starts_with(crate::fsops::PARTIAL_PREFIX.as_bytes())
        || b.starts_with(crate::fsops::TMP_PREFIX.as_bytes())
}

fn wakes(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_)
            | EventKind::Create(_)
    )
}

impl Watcher {
    /// Starts the inotify backend.
    pub fn new() -> Result<Arc<Watcher>> {
        let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
        let r = Arc::clone(&routes);
        let inner = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(routes) = r.lock() else { return };
            match res {
                Ok(ev) if ev.need_rescan() => {
                    tracing::warn!("inotify queue overflowed; rescanning every site");
                    routes
                        .values()
                        .flatten()
                        .for_each(|rt| rt.wake.notify_one());
                }
                Ok(ev) if wakes(&ev.kind) => {
                    for p in &ev.paths {
                        let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                            continue;
                        };
                        let Some(list) = routes.get(dir) else {
                            continue;
                        };
                        for rt in list {
                            // Marker: only a finished write or a rename counts, never a
                            // bare create (its content may not be written yet).
                            let is_create = matches!(ev.kind, EventKind::Create(_));
                            match &rt.name {
                                Some(n) if n == name && !is_create => rt.wake.notify_one(),
                                Some(_) => {}
                                // The keeper's own transient names (a release being
                                // built, a link being swapped) need no healing: waking
                                // for them made every build trigger a heal, and a build
                                // deferred for space retry itself in a loop.
                                None if is_own_transient(name) => {}
                                None => rt.wake.notify_one(),
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "inotify error; rescanning every site");
                    routes
                        .values()
                        .flatten()
                        .for_each(|rt| rt.wake.notify_one());
                }
            }
        })
        .map_err(|e| Error::Failed(format!("cannot start inotify: {e}")))?;
        Ok(Arc::new(Watcher {
            inner: Mutex::new(inner),
            routes,
        }))
    }

    /// Watches `dir` (non-recursively) and wakes `wake` for events on `name` in it (or
    /// any name when `None`). Re-watching a directory that was deleted and recreated is
    /// how callers recover its watch.
    pub fn watch(&self, dir: &Path, name: Option<&str>, wake: Arc<Notify>) -> Result<()> {
        {
            let mut routes = self
                .routes
                .lock()
                .map_err(|_| Error::Failed("watcher routes poisoned".into()))?;
            let list = routes.entry(dir.to_path_buf()).or_default();
            if !list.iter().any(|r| Arc::ptr_eq(&r.wake, &wake)) {
                list.push(Route {
                    name: name.map(Into::into),
                    wake,
                });
            }
        }
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| Error::Failed("watcher poisoned".into()))?;
        // No unwatch first: adding again re-resolves the path (a recreated directory gets
        // a new watch) without a window in which events are lost.
        inner
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| match e.kind {
                notify::ErrorKind::MaxFilesWatch => Error::Failed(format!(
                    "cannot watch {}: the inotify watch limit is reached; raise \
                     fs.inotify.max_user_watches (sysctl) or fs.inotify.max_user_instances",
                    dir.display()
                )),
                _ => Error::Failed(format!("cannot watch {}: {e}", dir.display())),
            })
    }

    /// Stops routing events of every directory to `wake` (a site going away).
    pub fn forget(&self, wake: &Arc<Notify>) {
        let empty: Vec<PathBuf> = {
            let Ok(mut routes) = self.routes.lock() else {
                return;
            };
            let mut empty = Vec::new();
            for (dir, list) in routes.iter_mut() {
                list.retain(|r| !Arc::ptr_eq(&r.wake, wake));
                if list.is_empty() {
                    empty.push(dir.clone());
                }
            }
            for dir in &empty {
                routes.remove(dir);
            }
            empty
        };
        // `unwatch` waits for notify's event thread, whose callback takes the routes lock:
        // calling it with that lock held deadlocks (seen on SIGTERM and SIGHUP).
        if let Ok(mut inner) = self.inner.lock() {
            for dir in empty {
                let _ = inner.unwatch(&dir);
            }
        }
    }
}
