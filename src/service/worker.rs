//! One worker per site: a thread of its own that owns the site's lifetime lock, waits for
//! wake-ups (marker events, root events, SIGHUP, its timers), and does the work while
//! holding the site's operation lock, so CLI commands interleave safely between jobs. An
//! upload whose files are still in flight is waited for without the lock, between two
//! rounds of the job (see `pipeline`), so commands also run while it waits.
//!
//! A thread, not an async task: the periodic healing pass then runs where its timer
//! fires, and an idle site costs one timed wait per `heal_interval` and the pass itself.
//! From a task, each pass took the runtime's timer wheel (which wakes up to three times
//! for a one-minute timer), a hand-off to the blocking pool and one back: together more
//! CPU than the pass.

use std::fs;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::fsops::{self, Listings, Lock};
use crate::heal::{self, Uploads};
use crate::pipeline;
use crate::release::store::Journal;
use crate::service::watcher::{Interest, Wake, Watcher};
use crate::site::Site;
use crate::upload::marker;
use crate::verify;

/// How a worker reports to the supervisor that it started (or waits for its root), and
/// that another service holds its site, also after it started.
pub type Ready = mpsc::UnboundedSender<(String, Result<()>)>;

/// The wake-ups waiting for a worker: each is a flag, so any number of them before the
/// worker looks is one.
#[derive(Debug, Default, Clone, Copy)]
struct Flags {
    /// Exit after the current job.
    stop: bool,
    /// A marker was closed or renamed into place.
    marker: bool,
    /// Something changed in the root or `releases/`, or SIGHUP: a healing pass.
    heal: bool,
}

/// Where a worker's wake-ups are posted, and what its thread sleeps on.
#[derive(Debug, Default)]
struct Mailbox {
    flags: Mutex<Flags>,
    posted: Condvar,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Flags> {
        // Only flags are set under this lock; a panic cannot leave them half-written.
        self.flags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn post(&self, set: impl FnOnce(&mut Flags)) {
        set(&mut self.lock());
        self.posted.notify_one();
    }

    fn stopping(&self) -> bool {
        self.lock().stop
    }

    /// Takes the wake-ups posted so far, first waiting for one until `deadline` (a
    /// single timed sleep: no wake-up before it unless something is posted).
    fn wait(&self, deadline: Instant) -> Flags {
        let mut flags = self.lock();
        loop {
            if flags.stop || flags.marker || flags.heal {
                break;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            if left.is_zero() {
                break;
            }
            flags = self
                .posted
                .wait_timeout(flags, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let taken = *flags;
        // `stop` stays set: it is also looked at between the jobs of one wake-up.
        *flags = Flags {
            stop: taken.stop,
            ..Flags::default()
        };
        taken
    }
}

/// One kind of wake-up, as the watcher posts it.
struct Poster {
    mailbox: Arc<Mailbox>,
    marker: bool,
}

impl Wake for Poster {
    fn wake(&self) {
        self.mailbox.post(|f| {
            if self.marker {
                f.marker = true;
            } else {
                f.heal = true;
            }
        });
    }
}

/// The handles the supervisor keeps for a running worker.
pub struct Handle {
    /// The site's config, to detect changes on reload.
    pub site: Site,
    mailbox: Arc<Mailbox>,
    /// This worker's own cancel flag: a reload restarts one site without touching the
    /// others, and a stop undoes every site's work.
    cancel: Arc<AtomicBool>,
    /// Completes (with an error: the sender is dropped) when the worker's thread ends.
    done: oneshot::Receiver<()>,
    /// Set while the worker runs a job.
    busy: Arc<AtomicBool>,
}

impl Handle {
    /// Wakes a healing pass (SIGHUP).
    pub fn heal(&self) {
        self.mailbox.post(|f| f.heal = true);
    }

    /// Sets the worker's cancel flag and asks it to exit, without waiting: its work in
    /// progress is undone (an interrupted upload keeps its claim and is redone by the next
    /// worker of the site), an activation under way finished.
    pub fn cancel(&self) {
        // SeqCst, like `busy`: see `Worker::work`.
        self.cancel.store(true, Ordering::SeqCst);
        self.mailbox.post(|f| f.stop = true);
    }

    /// True while the worker runs a job. Once [`Handle::cancel`] has been called, a worker
    /// that is not busy starts no job any more.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// Waits until the worker's thread has ended.
    pub async fn exited(self) {
        let _ = self.done.await;
    }

    /// True when the worker's thread ends within `limit` (false: it is still running).
    pub async fn exits_within(&mut self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, &mut self.done).await.is_ok()
    }

    /// Polls for the end of the worker's thread (for a supervisor watching several). Not
    /// to be polled again once ready.
    pub fn poll_exited(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.done).poll(cx).map(|_| ())
    }
}

/// What a wake-up asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    /// The healing pass at start, only if the operation lock is free at once; otherwise
    /// it sets `Kept::deferred` and does nothing.
    FirstHealNow,
    /// The healing pass at start, without processing uploads.
    FirstHeal,
    /// A marker was just closed or renamed into place.
    Uploads,
    /// Look for a marker (start-up, a young marker to re-check) and pending claims.
    Rescan,
    Heal,
    Verify,
}

/// Starts the worker of `site` on a thread of its own.
pub fn spawn(site: Site, watcher: Arc<Watcher>, ready: Ready) -> Handle {
    let mailbox = Arc::new(Mailbox::default());
    let cancel = Arc::new(AtomicBool::new(false));
    let busy = Arc::new(AtomicBool::new(false));
    let (done_tx, done) = oneshot::channel();
    let worker = Worker {
        site: site.clone(),
        watcher,
        cancel: Arc::clone(&cancel),
        mailbox: Arc::clone(&mailbox),
        busy: Arc::clone(&busy),
        failing: Mutex::new(None),
    };
    let name = site.name().to_string();
    let failed = ready.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("rk:{name}"))
        .spawn(move || {
            // Dropped when the thread ends, however it ends: that is what `stop` awaits.
            let _done = done_tx;
            worker.run(ready);
        });
    if let Err(e) = spawned {
        let _ = failed.send((
            name,
            Err(Error::Failed(format!(
                "cannot start the worker thread: {e}"
            ))),
        ));
    }
    Handle {
        site,
        mailbox,
        cancel,
        done,
        busy,
    }
}

/// A site's worker, on its thread.
struct Worker {
    site: Site,
    watcher: Arc<Watcher>,
    cancel: Arc<AtomicBool>,
    mailbox: Arc<Mailbox>,
    busy: Arc<AtomicBool>,
    /// The last failure logged and when: the same failure again (a marker the keeper may
    /// not consume is retried every second) is logged again only after `heal_interval`
    /// (or once a job succeeded in between); the retries in between log at debug level.
    failing: Mutex<Option<(String, Instant)>>,
}

impl Worker {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.mailbox.stopping()
    }

    fn run(&self, ready: Ready) {
        let site = &self.site;
        let marker_wake: Arc<dyn Wake> = Arc::new(Poster {
            mailbox: Arc::clone(&self.mailbox),
            marker: true,
        });
        let heal_wake: Arc<dyn Wake> = Arc::new(Poster {
            mailbox: Arc::clone(&self.mailbox),
            marker: false,
        });
        let mut started = false;
        let mut report = |r: Result<()>| {
            // Started is said once; a refusal is said even after it: a site that started
            // waiting for its root (or retrying its layout) is refused only once it can
            // take the lifetime lock, and the supervisor must learn of it then.
            if r.is_err() || !started {
                started = true;
                let _ = ready.send((site.name().to_string(), r));
            }
        };
        self.serve(&mut report, &marker_wake, &heal_wake);
        self.watcher.forget(&marker_wake);
        self.watcher.forget(&heal_wake);
    }

    fn serve(
        &self,
        report: &mut impl FnMut(Result<()>),
        marker_wake: &Arc<dyn Wake>,
        heal_wake: &Arc<dyn Wake>,
    ) {
        let site = &self.site;
        let heal_interval = site.cfg.heal_interval;
        if !site.root_exists() && !self.wait_for_root(report, heal_wake) {
            return;
        }

        // A second service for the site is refused (SPEC); a layout it cannot set up (a
        // file where `releases/` belongs) is this site's problem only: logged with the
        // path and retried at each healing pass, while the other sites are served. Ending
        // the whole service for it made systemd restart it in a loop, serving no site.
        let mut failing: Option<String> = None;
        let mut lifetime = loop {
            match try_lifetime_lock(site) {
                Ok(Some(l)) => break l,
                Ok(None) => {
                    // Logged by the supervisor, which decides what the refusal ends.
                    report(Err(already_running(site)));
                    return;
                }
                Err(e) => {
                    let text = e.to_string();
                    if failing.as_deref() != Some(text.as_str()) {
                        tracing::error!(event = crate::events::SITE_ERROR, site = site.name(), reason = %e,
                            "cannot set up the site; retrying at each healing pass");
                        crate::service::set_status(site, "cannot set up the site");
                        failing = Some(text);
                    }
                    report(Ok(()));
                    if let Err(e) = self.watcher.watch(
                        site.root(),
                        Interest::Any,
                        site.name(),
                        Arc::clone(heal_wake),
                    ) {
                        tracing::debug!(site = site.name(), reason = %e, "cannot watch the root");
                    }
                    let mail = self.mailbox.wait(after(heal_interval));
                    if mail.stop || self.cancel.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
        };
        let healed = site.heal_watches();
        // Watches the directories whose entries healing recreates (`shared/`, the way to a
        // nested shared entry or link), for those entries leaving. One missing yet (no
        // release made it, or it went with its directory) is watched once a job has made
        // it: this runs after every job. True when a directory got a new watch while an
        // entry it is watched for is missing: gone before the watch, so unseen. Failures
        // are logged at `debug` when `quiet` (the same ones are logged before each pass).
        let watch_healed = |quiet: bool| {
            let mut unseen = false;
            for (dir, names) in &healed {
                if !dir.is_dir() {
                    continue;
                }
                let interest = Interest::Gone(names.clone());
                match self
                    .watcher
                    .watch(dir, interest, site.name(), Arc::clone(heal_wake))
                {
                    Ok(fresh) => {
                        unseen |= fresh
                            && names
                                .iter()
                                .any(|n| fs::symlink_metadata(dir.join(n)).is_err());
                    }
                    // Removed since the check above: its directory's watch reports it.
                    Err(e) if quiet || vanished(&e) || !dir.is_dir() => {
                        tracing::debug!(site = site.name(), dir = %dir.display(), reason = %e,
                            "not watched");
                    }
                    Err(e) => {
                        tracing::error!(event = crate::events::SITE_ERROR, site = site.name(),
                            dir = %dir.display(), reason = %e, "cannot watch");
                    }
                }
            }
            unseen
        };
        let watch = || {
            // The root first: once it is watched, a deploy-cache/ made again at any later
            // moment announces itself, and the next pass watches it.
            for (dir, interest, wake) in [
                (site.root().to_path_buf(), Interest::Any, heal_wake),
                (
                    site.deploy_cache(),
                    Interest::marker(&site.cfg.marker),
                    marker_wake,
                ),
                (site.releases(), Interest::Any, heal_wake),
            ] {
                // A deploy-cache/ removed while the service runs is left to the uploader
                // to make again (`heal::Uploads::Leave`): the root's watch sees it come
                // back, and the next pass watches it then.
                // Nor is one replaced by a symlink watched through it: claiming the marker
                // says what is wrong (`marker::claim_marker`).
                let real_dir = || crate::fsops::is_real_dir(&dir);
                if dir == site.deploy_cache() && !real_dir() {
                    continue;
                }
                if let Err(e) = self
                    .watcher
                    .watch(&dir, interest, site.name(), Arc::clone(wake))
                {
                    // Removed between the check above and the watch (`rm -rf deploy-cache &&
                    // mkdir deploy-cache` while the pass ran): the same case, only raced.
                    // Told by the watch's own error, since by now it may be back.
                    if dir == site.deploy_cache() && (vanished(&e) || !real_dir()) {
                        tracing::debug!(site = site.name(), reason = %e, "deploy-cache/ went away before it was watched");
                        continue;
                    }
                    tracing::error!(event = crate::events::SITE_ERROR, site = site.name(), reason = %e, "cannot watch");
                }
            }
            // The pass that follows looks at every entry: nothing gone unseen meanwhile.
            watch_healed(false);
        };
        // First pass: heal, then whatever markers arrived while the service was stopped.
        // The first pass only heals, so READY=1 is not held back by redoing a big
        // interrupted upload (systemd would time the start out); pending claims follow.
        // Nor by a command holding the operation lock, for as long as it likes: the site
        // is watched and READY=1 sent first, and the pass runs once the lock is free.
        let mut kept = Kept::default();
        // A first pass that fails (a journal that cannot be read) is logged like any
        // failed pass and retried by the next one; the service still starts.
        self.work_logged(Job::FirstHealNow, &mut kept);
        watch();
        report(Ok(()));
        if std::mem::take(&mut kept.deferred) {
            tracing::debug!(
                site = site.name(),
                "first healing pass deferred until after start"
            );
            self.work_logged(Job::FirstHeal, &mut kept);
            watch();
        }
        self.work_logged(Job::Rescan, &mut kept);

        let mut rescan_at = young_marker(site);
        let mut next_heal = after(heal_interval);
        let mut next_verify = after(site.cfg.verify_interval);
        loop {
            let deadline = rescan_at.map_or(next_heal, |r| r.min(next_heal));
            let mut mail = self.mailbox.wait(deadline.min(next_verify));
            if mail.stop || self.cancel.load(Ordering::Relaxed) {
                break;
            }
            if !site.root_exists() {
                // Every job would fail at the first path inside it (`.release-keeper/lock:
                // Not a directory`, at each pass), which says nothing of the cause.
                if !self.wait_for_root(report, heal_wake) {
                    break;
                }
                // Possibly another directory now: nothing kept from the old one holds,
                // and a healing pass sets it up (the lifetime lock taken again, watches
                // renewed) before anything else runs.
                kept = Kept::default();
                mail.heal = true;
            }
            let now = Instant::now();
            let mut jobs = Vec::with_capacity(4);
            if mail.marker {
                jobs.push(Job::Uploads);
            }
            if rescan_at.is_some_and(|r| r <= now) {
                rescan_at = None;
                jobs.push(Job::Rescan);
            }
            if mail.heal || next_heal <= now {
                jobs.push(Job::Heal);
            }
            if next_verify <= now {
                next_verify = after(site.cfg.verify_interval);
                jobs.push(Job::Verify);
            }
            for job in jobs {
                if self.cancelled() {
                    break;
                }
                if job == Job::Heal {
                    if !lifetime.still_named() && site.root_exists() {
                        match retake_lifetime_lock(site) {
                            Retaken::Yes(l) => lifetime = l,
                            Retaken::NotYet => {}
                            Retaken::Taken => return,
                        }
                    }
                    // A recreated deploy-cache/ needs a new watch.
                    watch();
                }
                self.work_logged(job, &mut kept);
                // What the job made (a first release's shared directories, a link's
                // directory, what the pass recreated) is watched now, not from the next
                // pass on; an entry gone before that is healed at once.
                if watch_healed(true) {
                    self.mailbox.post(|f| f.heal = true);
                }
                if job == Job::Heal {
                    // The timer is the backstop for what inotify does not see: it is
                    // due one interval after the last pass, whatever woke that.
                    next_heal = after(heal_interval);
                }
                // Known from the job when it just looked; otherwise one `lstat`.
                let marker = kept.marker.take().unwrap_or_else(|| marker_present(site));
                if marker {
                    let at = after(marker::MARKER_SETTLE);
                    rescan_at = Some(rescan_at.map_or(at, |r| r.min(at)));
                }
            }
        }
        drop(lifetime);
    }

    /// Waits while the site's root is not a directory: at start, a root not made yet (a
    /// mount to come); while the service runs, one deleted, or replaced by a file. Each
    /// cause is said when it appears, so that a file in the root's place is not reported
    /// as a root that "does not exist yet". The nearest existing directory on the way to
    /// the root is watched so a directory there is picked up at once, with the heal timer
    /// as a backstop. False when the
    /// worker is asked to stop meanwhile.
    fn wait_for_root(
        &self,
        report: &mut impl FnMut(Result<()>),
        heal_wake: &Arc<dyn Wake>,
    ) -> bool {
        let site = &self.site;
        let root = site.root();
        let mut said = None;
        let mut watched: Option<std::path::PathBuf> = None;
        loop {
            if site.root_exists() {
                if said.is_some() {
                    tracing::info!(event = crate::events::SITE_RESUMED, site = site.name(), root = %root.display(),
                        "site root is a directory; serving it");
                }
                return true;
            }
            let why = crate::config::root_not_a_directory(root);
            if said != Some(why) {
                match why {
                    None => {
                        tracing::warn!(event = crate::events::SITE_WAITING, site = site.name(), root = %root.display(),
                        "site root does not exist yet; waiting for it")
                    }
                    Some(why) => {
                        tracing::error!(event = crate::events::SITE_ERROR, site = site.name(), root = %root.display(),
                        reason = %format!("the root {} {why}; a site's root must be a directory", root.display()),
                        "site root is not a directory; waiting for a directory in its place")
                    }
                }
                crate::service::set_status(site, "waiting for its root");
                said = Some(why);
            }
            report(Ok(()));
            // The nearest directory on the way to the root that exists: its parent may be
            // missing too (`mkdir -p /srv/new/site` to come), and each directory made on
            // the way moves the watch one step down.
            let nearest = root
                .ancestors()
                .skip(1)
                .find(|d| d.is_dir())
                .map(std::path::Path::to_path_buf);
            if let Some(dir) = nearest.filter(|d| watched.as_ref() != Some(d)) {
                let added =
                    self.watcher
                        .watch(&dir, Interest::Any, site.name(), Arc::clone(heal_wake));
                if let Err(e) = &added {
                    tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), dir = %dir.display(), reason = %e,
                        "cannot watch the way to the site's root");
                }
                watched = Some(dir);
                // Looked at again before waiting: what was made before the watch was
                // added sent it no event.
                if added.is_ok() {
                    continue;
                }
            }
            let mail = self.mailbox.wait(after(site.cfg.heal_interval));
            if mail.stop || self.cancel.load(Ordering::Relaxed) {
                return false;
            }
        }
    }

    fn work_logged(&self, job: Job, kept: &mut Kept) {
        let result = self.work(job, kept);
        let mut failing = self.failing.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Err(Error::Interrupted) => {}
            Err(e) => {
                let text = e.to_string();
                let repeat = failing.as_ref().is_some_and(|(last, at)| {
                    *last == text && at.elapsed() < self.site.cfg.heal_interval
                });
                if repeat {
                    tracing::debug!(site = self.site.name(), reason = %e, job = ?job, "work failed again");
                } else {
                    tracing::error!(event = crate::events::SITE_ERROR, site = self.site.name(), reason = %e, job = ?job, "work failed");
                    *failing = Some((text, Instant::now()));
                }
            }
            Ok(()) => *failing = None,
        }
    }

    /// Runs `job`. A panic fails the job, not the worker; what the worker kept is then
    /// dropped (read again by the next job), as it may be half-updated.
    fn work(&self, job: Job, kept: &mut Kept) -> Result<()> {
        // Busy is set before the cancel flag is read, and a stop reads busy after setting
        // that flag (both SeqCst): either this job sees the stop and does not start, or
        // the stop sees the job and asks systemd for the time it may still take.
        self.busy.store(true, Ordering::SeqCst);
        let result = if self.cancel.load(Ordering::SeqCst) {
            Err(Error::Interrupted)
        } else {
            match catch_unwind(AssertUnwindSafe(|| {
                work_blocking(&self.site, &self.cancel, job, kept)
            })) {
                Ok(result) => result,
                Err(_) => {
                    *kept = Kept::default();
                    Err(Error::Failed(format!("{job:?} job panicked")))
                }
            }
        };
        self.busy.store(false, Ordering::SeqCst);
        result
    }
}

/// Whether a failed watch failed because its directory was gone (or is no directory).
fn vanished(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. }
        if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)))
}

/// When to take a second look at a marker a scan left because it was still young: once
/// it has settled (its close-write event, if it is still being written, wakes the worker
/// anyway). `None` when there is no marker.
fn young_marker(site: &Site) -> Option<Instant> {
    marker_present(site).then(|| after(marker::MARKER_SETTLE))
}

/// True when there is something at the marker's path.
fn marker_present(site: &Site) -> bool {
    fs::symlink_metadata(site.marker()).is_ok()
}

/// The instant `d` from now (a year from now for a `d` too long to represent: the
/// durations are the operator's, up to `u64::MAX` ms, and a year is as good as forever).
pub(crate) fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// The lifetime lock, taken without waiting: `None` when another service holds it. The
/// layout and any foreign lock path are repaired first, at start as after the lock's file
/// went away.
fn try_lifetime_lock(site: &Site) -> Result<Option<Lock>> {
    site.ensure_layout()?;
    heal::repair_locks(site, false)?;
    fsops::lock(&site.service_lock(), Some(Duration::ZERO))
}

/// The error of a site whose lifetime lock another service holds.
fn already_running(site: &Site) -> Error {
    Error::AlreadyServed {
        site: site.name().to_string(),
        lock: site.service_lock(),
    }
}

/// The outcome of taking the lifetime lock again after its file went away.
enum Retaken {
    /// Held again, on the file now at the lock's path.
    Yes(Lock),
    /// Not possible yet (the layout is still missing); the next pass tries again.
    NotYet,
    /// Another service took the site meanwhile: this one stops serving it.
    Taken,
}

/// Takes the lifetime lock again after its file was deleted (the root removed and
/// recreated, or a hand edit), so that a second service still cannot start for the site.
fn retake_lifetime_lock(site: &Site) -> Retaken {
    let path = site.service_lock();
    match try_lifetime_lock(site) {
        Ok(Some(l)) => {
            tracing::info!(event = crate::events::HEAL_REPAIRED, site = site.name(),
                what = %path.display(), reason = "the lifetime lock's file was deleted; taken again",
                "repaired");
            Retaken::Yes(l)
        }
        Ok(None) => {
            tracing::error!(event = crate::events::SITE_ERROR, site = site.name(), path = %path.display(),
                reason = "another release-keeper service took this site while its lifetime lock's file was gone; this service stops serving it",
                "site taken over");
            crate::service::set_status(site, "taken over by another service");
            Retaken::Taken
        }
        Err(e) => {
            tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), path = %path.display(),
                reason = %e, "cannot take the lifetime lock again yet");
            Retaken::NotYet
        }
    }
}

/// What a worker keeps from one job to the next, so that an idle healing pass re-reads
/// nothing that did not change.
#[derive(Debug, Default)]
struct Kept {
    /// The site's journal, re-read only when the file changed (a CLI command or an
    /// upload appended to it).
    journal: Option<Journal>,
    /// The healing pass's directory listings, re-read only when a directory changed.
    listings: Listings,
    /// What the last healing pass left for an operator (logged once, not every pass).
    reported: heal::Reported,
    /// Whether the marker was there at the end of the last job, when the job knows.
    marker: Option<bool>,
    /// The operation lock, kept open (taking it checks that its paths still name it).
    op_lock: Option<fsops::LockFile>,
    /// The upload the last round stopped at, its files still in flight, for the next
    /// round (which always follows at once) to resume.
    waiting: Option<pipeline::Waiting>,
    /// Set by [`Job::FirstHealNow`] when the first pass would have had to wait for the
    /// lock: it runs as [`Job::FirstHeal`] once the service is ready.
    deferred: bool,
}

/// The site's journal from `kept`, current (loaded if there is none yet).
fn current_journal<'a>(kept: &'a mut Option<Journal>, site: &Site) -> Result<&'a mut Journal> {
    let journal = match kept.take() {
        Some(mut j) => {
            j.refresh()?;
            j
        }
        None => Journal::load(site)?,
    };
    Ok(kept.insert(journal))
}

fn work_blocking(site: &Site, cancel: &AtomicBool, job: Job, kept: &mut Kept) -> Result<()> {
    let mut job = job;
    loop {
        let Some(mut waiting) = locked_round(site, cancel, job, kept)? else {
            return Ok(());
        };
        // The lock is free while the upload's files are still in flight: a rollback must
        // not wait up to upload_timeout behind a stale temporary file. The next round runs
        // the claims again under the lock and so sees what commands did meanwhile.
        crate::service::set_status(site, "waiting for files in flight");
        pipeline::wait_unlocked(site, &mut waiting, cancel)?;
        kept.waiting = Some(waiting);
        job = Job::Rescan;
    }
}

/// One round of `job` under the operation lock, a foreign lock path moved aside first
/// (taking the lock checks that its paths still name it). Returns the upload the round
/// stopped at because its files are still in flight.
fn locked_round(
    site: &Site,
    cancel: &AtomicBool,
    job: Job,
    kept: &mut Kept,
) -> Result<Option<pipeline::Waiting>> {
    kept.marker = None;
    heal::repair_locks_with(site, &mut kept.listings)?;
    let mut lock_file = match kept.op_lock.take() {
        Some(file) => file,
        None => fsops::LockFile::open(&site.op_lock(), site.name())?,
    };
    let result = locked(site, cancel, job, kept, &mut lock_file);
    kept.op_lock = Some(lock_file);
    result
}

/// Runs `job` under the operation lock, taken through `lock_file`.
fn locked(
    site: &Site,
    cancel: &AtomicBool,
    job: Job,
    kept: &mut Kept,
    lock_file: &mut fsops::LockFile,
) -> Result<Option<pipeline::Waiting>> {
    let _lock = if job == Job::FirstHealNow {
        match lock_file.acquire(Duration::ZERO)? {
            Some(l) => l,
            None => {
                crate::service::set_status(site, "waiting for a command to finish");
                kept.deferred = true;
                return Ok(None);
            }
        }
    } else {
        // Wait for a CLI command holding the lock, but stay responsive to shutdown.
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            if let Some(l) = lock_file.acquire(Duration::from_millis(200))? {
                break l;
            }
        }
    };
    // A periodic pass is over in well under a millisecond and usually changes nothing:
    // announcing it would send systemd two status lines a minute for nothing. The line is
    // brought up to date after it, like after every job.
    let doing = match job {
        Job::FirstHealNow | Job::FirstHeal => Some("healing"),
        Job::Heal => None,
        Job::Uploads | Job::Rescan => Some("processing uploads"),
        Job::Verify => Some("verifying"),
    };
    if let Some(doing) = doing {
        crate::service::set_status(site, doing);
    }
    let result = run_job(site, cancel, job, kept);
    crate::service::set_status(site, "idle");
    // Still under the operation lock, so the journal is not changing underneath.
    if site.cfg.metrics_file.is_some() {
        crate::metrics::update(site, current_journal(&mut kept.journal, site).map(|j| &*j));
    }
    result
}

/// Runs `job`; returns the upload it stopped at because its files are still in flight.
fn run_job(
    site: &Site,
    cancel: &AtomicBool,
    job: Job,
    kept: &mut Kept,
) -> Result<Option<pipeline::Waiting>> {
    // A wait handed back by the previous round, resumed if its claim is still first.
    let resume = kept.waiting.take();
    let uploads =
        |fresh| pipeline::run_pending_yielding(site, cancel, fresh, resume).map(|run| run.waiting);
    match job {
        Job::FirstHealNow => {
            // An activation a crash interrupted is decided here, before READY=1 (SPEC:
            // ready once healed, so `current` is never left on a release whose checks
            // have not passed); the supervisor asks systemd for the time it may take.
            let journal = current_journal(&mut kept.journal, site)?;
            let (listings, reported) = (&mut kept.listings, &mut kept.reported);
            heal::heal_with(site, journal, false, listings, reported, Uploads::Recreate)?;
        }
        Job::FirstHeal => {
            let journal = current_journal(&mut kept.journal, site)?;
            let (listings, reported) = (&mut kept.listings, &mut kept.reported);
            heal::heal_with(site, journal, false, listings, reported, Uploads::Recreate)?;
        }
        Job::Heal => {
            let journal = current_journal(&mut kept.journal, site)?;
            let (listings, reported) = (&mut kept.listings, &mut kept.reported);
            let outcome =
                heal::heal_with(site, journal, false, listings, reported, Uploads::Leave)?;
            // The pass saw every claim (uploads run under the same lock): with none, and
            // no marker a missed event could have left, there is nothing to process.
            if outcome.claims > 0 || marker_present(site) {
                return uploads(false);
            }
            kept.marker = Some(false);
        }
        Job::Uploads => return uploads(true),
        Job::Rescan => return uploads(false),
        Job::Verify => {
            if let Some(id) = site.current_id() {
                let report = verify::verify_release(site, &id)?;
                verify::record(site, &report)?;
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nobody;
    impl Wake for Nobody {
        fn wake(&self) {}
    }

    /// The deploy-cache/ watch race is told from the watch's own error: a directory that
    /// is gone (or is a file now) reads as vanished, any other failure does not.
    #[test]
    fn a_watch_on_a_vanished_directory_says_so_by_its_error() {
        let t = tempfile::tempdir().unwrap();
        let watcher = Watcher::new().unwrap();
        let wake: Arc<dyn Wake> = Arc::new(Nobody);
        let missing = t.path().join("deploy-cache");
        let e = watcher
            .watch(&missing, Interest::Any, "s", Arc::clone(&wake))
            .unwrap_err();
        assert!(vanished(&e), "{e:?}");
        fs::write(&missing, b"").unwrap();
        let e = watcher
            .watch(&missing.join("sub"), Interest::Any, "s", Arc::clone(&wake))
            .unwrap_err();
        assert!(vanished(&e), "{e:?}");
        fs::remove_file(&missing).unwrap();
        fs::create_dir(&missing).unwrap();
        watcher.watch(&missing, Interest::Any, "s", wake).unwrap();
        let denied = Error::Io {
            path: missing,
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert!(!vanished(&denied));
        assert!(!vanished(&Error::Failed("cannot watch".into())));
    }
}
