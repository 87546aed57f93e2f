//! The flow for one site: claim the marker, resolve the claim, read the manifest, wait for
//! in-flight files, build the release, rename it into place, activate, prune. The caller
//! holds the site's operation lock; claims are processed one at a time in arrival order.
//!
//! Waiting for files in flight can take up to `upload_timeout`. A command waits in place,
//! under the lock (the operator asked for that upload). The service must not: it would keep
//! `rollback` and every other command out for as long as a stale temporary file stays. So
//! [`run_pending_yielding`] hands the wait back as a [`Waiting`]; the service waits
//! without the lock ([`wait_unlocked`]) and then runs the claims again under it. Everything
//! is read again then (the claims, the journal, `current`, the manifest): a command may
//! have processed the claim or switched `current` meanwhile. Only the claim's first look is
//! carried over, so `upload_timeout` still counts from it, also across a reload that
//! restarts the site's worker ([`WAIT_STARTS`]).

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::activate;
use crate::clock;
use crate::error::{Error, Result};
use crate::events;
use crate::fsops;
use crate::release::changes::{self, Changes};
use crate::release::finalize::{self, Expected, LinkSource};
use crate::release::retention;
use crate::release::store::{self, Journal, Op};
use crate::site::Site;
use crate::upload::inflight;
use crate::upload::manifest::{self, Entries};
use crate::upload::marker::{self, Claim, Pending};
use crate::upload::walk;

/// How one claim ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Finalized (and activated, when asked and healthy).
    Released(String),
    /// Identical to an existing release with the same id: nothing to do.
    Unchanged(String),
    /// Identical to an existing staged release, which this marker asked to activate:
    /// activated (hooks and health check passed).
    Activated(String),
    /// Rejected, with the reason.
    Rejected(String),
    /// Finalized but activation failed (hook or health check) or was refused (drift); the
    /// reason.
    ActivationFailed(String, String),
    /// Not enough space: the claim stays and is retried on the next heal pass or marker.
    Deferred(String),
}

/// Claims the marker if present and processes every pending claim, waiting in place (and
/// so under the caller's lock) for files still in flight. Stops early (leaving the claim
/// for the next start) when `cancel` is set. `fresh` says the marker was just announced by
/// its close-write or rename event, so it is complete and claimed at once; a marker found
/// by a scan is claimed only once settled (`marker::MARKER_SETTLE`).
pub fn run_pending(site: &Site, cancel: &AtomicBool, fresh: bool) -> Result<Vec<Outcome>> {
    Ok(run(site, cancel, fresh, Patience::Hold, None)?.outcomes)
}

/// Like [`run_pending`], but an upload whose files are still in flight is not waited for:
/// the run stops there (later claims wait their turn) and hands back a [`Waiting`], for the
/// caller to wait without the operation lock ([`wait_unlocked`]) and pass to the next run as
/// `resume`.
pub fn run_pending_yielding(
    site: &Site,
    cancel: &AtomicBool,
    fresh: bool,
    resume: Option<Waiting>,
) -> Result<Run> {
    run(site, cancel, fresh, Patience::Yield, resume)
}

/// What a run of the pending claims did.
pub struct Run {
    /// How each claim processed ended, in order.
    pub outcomes: Vec<Outcome>,
    /// The claim the run stopped at because its files are still in flight.
    pub waiting: Option<Waiting>,
}

/// An upload whose files still looked in flight when a yielding run stopped at it.
pub struct Waiting {
    /// Its resolved claim: a later run resumes the wait only for this very claim.
    claim: PathBuf,
    /// Its release id.
    pub id: String,
    /// When the upload was first looked at: its `upload_timeout` counts from then.
    since: Instant,
    /// The manifest's entries, read again whenever the file changes: files it lists are
    /// never in flight.
    manifest: Listed,
    /// Up to 10 of the names still in flight.
    pub paths: Vec<String>,
    /// A shared lock on the claim while the upload waits: a healing pass a command runs
    /// meanwhile must not report it as interrupted work.
    _hold: Option<fsops::Hold>,
    /// Sequence number of the journal's last record when the claim was read: a command
    /// that takes the claim over during the wait records its outcome after it.
    seen: u64,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The manifest's entries are left out: there may be hundreds of thousands.
        f.debug_struct("Waiting")
            .field("claim", &self.claim)
            .field("id", &self.id)
            .field("since", &self.since)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// How files still in flight are waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Patience {
    /// In place, under the caller's lock.
    Hold,
    /// Not at all: the run stops and hands the wait back.
    Yield,
}

/// The next step of one claim.
enum Step {
    /// Done with, one way or another.
    Done(Outcome),
    /// Its files are still in flight (yielding runs only); the claim stays.
    Wait(Box<Waiting>),
}

fn run(
    site: &Site,
    cancel: &AtomicBool,
    fresh: bool,
    patience: Patience,
    mut resume: Option<Waiting>,
) -> Result<Run> {
    let mut outcomes = Vec::new();
    if let Some(gone) = resume.take_if(|w| std::fs::symlink_metadata(&w.claim).is_err()) {
        outcomes.extend(claim_gone(site, gone)?);
    }
    let mut min_age = if fresh {
        Duration::ZERO
    } else {
        marker::MARKER_SETTLE
    };
    loop {
        marker::claim_marker(site, min_age)?;
        // A marker dropped while this one was processed announces itself again by its
        // own event; found here by the loop, it must settle like any scanned marker.
        min_age = marker::MARKER_SETTLE;
        let pending = marker::pending(site)?;
        if pending.is_empty() {
            return Ok(Run {
                outcomes,
                waiting: None,
            });
        }
        let newest = pending.len() - 1;
        for (i, p) in pending.into_iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Interrupted);
            }
            if i < newest {
                if let Some(o) = supersede(site, &p)? {
                    resume = None;
                    outcomes.push(o);
                    continue;
                }
            }
            // Only the first claim can be the one waited for: claims go in arrival order,
            // and a command that ran meanwhile may have processed it.
            let step = process(site, p, cancel, patience, resume.take())?;
            let outcome = match step {
                Step::Done(o) => o,
                Step::Wait(w) => {
                    return Ok(Run {
                        outcomes,
                        waiting: Some(*w),
                    })
                }
            };
            let deferred = matches!(outcome, Outcome::Deferred(_));
            outcomes.push(outcome);
            if deferred {
                // Retrying at once would spin on a full disk.
                return Ok(Run {
                    outcomes,
                    waiting: None,
                });
            }
        }
    }
}

/// Rejects an upload still to be built from `deploy-cache/` when a newer claim follows it:
/// `deploy-cache/` holds the newer upload by then. An upload kept for a retry (disk full),
/// cut short by a crash, or still waited for, was otherwise built from whatever was
/// uploaded next, under its own id and `activate`: a staged build went live as the
/// release the earlier marker named. Finalized claims are built already and go on.
fn supersede(site: &Site, pending: &Pending) -> Result<Option<Outcome>> {
    let (path, id) = match pending {
        Pending::Raw(path) => (path, None),
        Pending::Resolved(_, claim) if claim.finalized => return Ok(None),
        Pending::Resolved(path, claim) => (path, Some(claim.id.as_str())),
    };
    let mut journal = Journal::load(site)?;
    wait_starts().remove(path);
    if let Some(id) = id {
        remove_partial(site, id)?;
    }
    let reason = "superseded: a newer upload was marked ready before this one was released, \
        and deploy-cache/ now holds the newer one; that one is released instead";
    reject_then_drop(site, &mut journal, path, id, reason).map(Some)
}

/// Waits, without any lock, until the files of `waiting` no longer look in flight, its
/// deadline passes, or its claim is gone (a command processed it). What comes of it is
/// decided by the next run, under the lock.
pub fn wait_unlocked(site: &Site, waiting: &mut Waiting, cancel: &AtomicBool) -> Result<()> {
    loop {
        if Instant::now() >= waiting.since + site.cfg.upload_timeout
            || std::fs::symlink_metadata(&waiting.claim).is_err()
            || in_flight(site, waiting.manifest.refresh(site))?.is_empty()
        {
            return Ok(());
        }
        sleep_unless_cancelled(POLL_IN_FLIGHT, cancel)?;
    }
}

/// The claim of the upload `waiting` is gone after the wait. A command (`finalize`) that
/// took the lock meanwhile processed it and recorded how that ended; with no such record,
/// the claim was removed by hand, and the upload, its marker consumed, vanished without a
/// word: the uploader saw no rejection to act on, monitoring nothing to count. It is
/// rejected then, logged and journaled like any other rejection, and the files stay in
/// `deploy-cache/` for a new marker. Waiting on was no option: the claim was the upload's
/// only trace, and making it again would undo what the operator just did.
fn claim_gone(site: &Site, waiting: Waiting) -> Result<Option<Outcome>> {
    wait_starts().remove(&waiting.claim);
    let mut journal = Journal::load(site)?;
    let recorded = journal.records().iter().any(|r| {
        r.seq > waiting.seen && matches!(r.op, Op::Finalized { .. } | Op::Rejected { .. })
    });
    // An identical upload of an existing release leaves no record when a command
    // processes it ("unchanged"): the release being there is all that shows.
    if recorded || journal.state().get(&waiting.id).is_some() {
        // Whoever watches the service's log saw `upload.detected` and `upload.waiting` for
        // this id; the outcome was logged by the command, elsewhere (its own stderr).
        tracing::info!(
            event = events::UPLOAD_TAKEN_OVER,
            site = site.name(),
            release = %waiting.id,
            "the upload waited for was processed by a command meanwhile (see its output)"
        );
        return Ok(None);
    }
    let reason = format!(
        "the claimed marker {} was removed while the upload waited for files in flight ({}); \
         nothing was released: drop the marker again to release the upload",
        waiting.claim.display(),
        waiting.paths.join(", ")
    );
    reject(site, &mut journal, Some(&waiting.id), &reason).map(Some)
}

/// When this process first looked at each upload it waited for, by claim path. A reload
/// that changes a site's config restarts the site's worker and undoes its work in
/// progress, the wait included: the claim stays, and the new worker took it up as a new
/// upload, counting `upload_timeout` afresh (and logging `upload.detected` again), so each
/// reload put the rejection of a stale upload off. The new worker resumes from the first
/// look kept here instead. A new process starts afresh: it cannot tell how long the upload
/// sat while no service ran.
static WAIT_STARTS: Mutex<BTreeMap<PathBuf, Instant>> = Mutex::new(BTreeMap::new());

fn wait_starts() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, Instant>> {
    // The map is never left half-updated: a panic elsewhere must not end the bookkeeping.
    WAIT_STARTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// True while an upload of this process waits for files in flight under `claim` (its
/// worker may have been restarted by a reload since): it is not interrupted work.
pub fn waits_in_this_process(claim: &Path) -> bool {
    wait_starts().contains_key(claim)
}

/// The manifest's entries as an upload waits, read again whenever the file changes: an
/// uploader may send a file under a name that looks in flight (`.env.abcdef`) and list it
/// in a manifest that arrives later. Entries read once at the start of the wait kept such
/// a file in flight until `upload_timeout`: the service waited that long for nothing, and
/// a `finalize` rejected the upload.
#[derive(Default)]
struct Listed {
    entries: Option<Entries>,
    /// The stamp of the manifest file the entries were read from (`None`: no file).
    stamp: Option<fsops::Stamp>,
}

impl Listed {
    /// The entries read from the manifest file at `stamp`.
    fn new(entries: Option<Entries>, stamp: Option<fsops::Stamp>) -> Listed {
        Listed { entries, stamp }
    }

    /// The entries, read again first if the manifest file changed since. A manifest that
    /// cannot be read (being rewritten in place, or bad) leaves the entries as they were:
    /// the build reads it again and rejects a bad one with the reason.
    fn refresh(&mut self, site: &Site) -> Option<&Entries> {
        let now = manifest_stamp(site);
        if now != self.stamp {
            self.stamp = now;
            if now.is_some() {
                if let Ok(Some(m)) = read_manifest(site, "", false) {
                    self.entries = Some(m.entries);
                }
            }
        }
        self.entries.as_ref()
    }
}

/// The stamp of `deploy-cache/<manifest>`, `None` when there is none.
fn manifest_stamp(site: &Site) -> Option<fsops::Stamp> {
    std::fs::symlink_metadata(site.deploy_cache().join(&site.cfg.manifest))
        .ok()
        .map(|m| fsops::Stamp::of(&m))
}

/// How often files in flight are looked for again while an upload waits.
const POLL_IN_FLIGHT: Duration = Duration::from_millis(250);

/// Longest reason logged and journaled; the rest is cut (a reason can quote uploader
/// names, and a 4 KiB path must not flood the log).
const MAX_REASON: usize = 1024;

fn reject(site: &Site, journal: &mut Journal, id: Option<&str>, reason: &str) -> Result<Outcome> {
    // Reasons quote uploaded names, which may hold newlines or terminal escapes.
    let reason = events::printable(reason);
    let reason = if reason.len() > MAX_REASON {
        // Head and tail: an I/O error names the path first and the OS error last.
        let mut head = MAX_REASON / 2;
        while !reason.is_char_boundary(head) {
            head -= 1;
        }
        let mut tail = reason.len() - MAX_REASON / 2;
        while !reason.is_char_boundary(tail) {
            tail += 1;
        }
        format!(
            "{} [... {} bytes ...] {}",
            &reason[..head],
            tail - head,
            &reason[tail..]
        )
    } else {
        reason.to_string()
    };
    let reason = reason.as_str();
    tracing::warn!(
        event = events::RELEASE_REJECTED,
        site = site.name(),
        // Absent, not empty, when the marker named no readable id: an event never
        // carries an empty `release`.
        release = id,
        reason = %reason,
        "upload rejected"
    );
    journal.append(Op::Rejected {
        release: id.map(str::to_string),
        reason: reason.to_string(),
    })?;
    Ok(Outcome::Rejected(reason.to_string()))
}

/// Rejects the upload claimed at `claim`, then removes the claim. Only in this order: the
/// claim is the upload's only trace until `reject` has logged and journaled it, so a crash
/// or a journal that cannot be written in between leaves the claim, and the upload is
/// rejected again at the next pass (a duplicate rejection) instead of silently dropped.
fn reject_then_drop(
    site: &Site,
    journal: &mut Journal,
    claim: &Path,
    id: Option<&str>,
    reason: &str,
) -> Result<Outcome> {
    let outcome = reject(site, journal, id, reason)?;
    marker::remove(site, claim)?;
    Ok(outcome)
}

/// Removes the partial tree of release `id`: its files may be links to earlier releases'
/// files, whose ctime the removal moves, so it is one of the keeper's recorded changes.
fn remove_partial(site: &Site, id: &str) -> Result<()> {
    changes::recorded(site, || fsops::remove_tree(&site.partial(id)))
}

/// A fresh timestamp id, suffixed `-2`, `-3` when taken.
fn generated_id(site: &Site, journal: &Journal) -> String {
    let base = clock::Utc::now().release_id();
    let state = journal.state();
    let taken = |id: &str| {
        state.releases.iter().any(|r| r.id == id)
            || std::fs::symlink_metadata(site.release(id)).is_ok()
            || std::fs::symlink_metadata(site.partial(id)).is_ok()
    };
    if !taken(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|id| !taken(id))
        .unwrap_or(base)
}

fn process(
    site: &Site,
    pending: Pending,
    cancel: &AtomicBool,
    patience: Patience,
    resume: Option<Waiting>,
) -> Result<Step> {
    let mut journal = Journal::load(site)?;
    let (path, claim) = match pending {
        Pending::Resolved(path, claim) => (path, claim),
        Pending::Raw(raw) => match marker::read_raw(&raw, &site.marker_shown()) {
            Ok(spec) => {
                let (id, explicit) = match spec.id {
                    Some(id) => (id, true),
                    None => (generated_id(site, &journal), false),
                };
                let claim = Claim {
                    id,
                    explicit,
                    activate: spec.activate,
                    message: spec.message,
                    finalized: false,
                };
                (marker::resolve(&raw, &claim)?, claim)
            }
            Err(Error::Rejected(reason)) => {
                tracing::info!(
                    event = events::UPLOAD_DETECTED,
                    site = site.name(),
                    "upload detected"
                );
                return reject_then_drop(site, &mut journal, &raw, None, &reason).map(Step::Done);
            }
            Err(e) => return Err(e),
        },
    };
    let resumed = resume
        .filter(|w| w.claim == path)
        .map(|w| w.since)
        .or_else(|| wait_starts().get(&path).copied());
    let wait = Wait {
        patience,
        resumed,
        claim: &path,
        cancel,
        seen: journal.state().last.as_ref().map_or(0, |r| r.seq),
    };
    let outcome = match process_claim(site, &mut journal, &path, &claim, wait) {
        // Nothing was built (a build that meets a file in flight removes its partial
        // tree), and the claim stays for the next run.
        Ok(Step::Wait(w)) => return Ok(Step::Wait(w)),
        Ok(Step::Done(o)) => Ok(o),
        Err(e) => Err(e),
    };
    // Interrupted, the claim stays, and so does its wait for the worker that takes it up.
    if !matches!(outcome, Err(Error::Interrupted)) {
        wait_starts().remove(&path);
    }
    let outcome = match outcome {
        Err(Error::Interrupted) => {
            // The claim stays: the upload is redone at the next start.
            let _ = remove_partial(site, &claim.id);
            Err(Error::Interrupted)
        }
        Err(Error::Rejected(reason)) => {
            reject_then_drop(site, &mut journal, &path, Some(&claim.id), &reason)
        }
        Err(e @ Error::Changed(_)) => {
            reject_then_drop(site, &mut journal, &path, Some(&claim.id), &e.to_string())
        }
        Err(e) if e.is_no_space() || keeper_denied(site, &e) => {
            let _ = remove_partial(site, &claim.id);
            // The message names the cause: an operator told "not enough space" about a
            // read-only mount or a wrong owner looks at the wrong thing.
            let (reason, message) = if e.is_no_space() {
                (
                    format!("{e}; the upload is kept and retried when space is available"),
                    "not enough space for the release; the upload is kept for a retry",
                )
            } else {
                (
                    format!(
                        "{e}; the keeper cannot write its own directories (check their owner \
                         and mode); the upload is kept and retried at the next healing pass"
                    ),
                    "the keeper cannot write its own directories; the upload is kept for a retry",
                )
            };
            tracing::error!(
                event = events::RELEASE_REJECTED,
                site = site.name(),
                release = %claim.id,
                reason = %reason,
                retrying = true,
                "{message}"
            );
            Ok(Outcome::Deferred(reason))
        }
        Err(e) => {
            // Not the upload's fault (I/O, disk full): reported as a rejection so the
            // uploader sees it; the claim is dropped (once the rejection is recorded) so a
            // broken disk does not loop.
            let _ = remove_partial(site, &claim.id);
            reject_then_drop(site, &mut journal, &path, Some(&claim.id), &e.to_string())
        }
        Ok(o) => {
            marker::remove(site, &path)?;
            Ok(o)
        }
    };
    outcome.map(Step::Done)
}

/// True when `e` is the keeper's own directories refusing a write (permissions, a
/// read-only mount): the server's fault, not the upload's. Such an upload is kept and
/// retried like one that found the disk full; rejecting it consumed a good upload, which
/// was then not deployed once an operator fixed the permissions. Only entries made
/// directly in the site's own directories count, whose names no uploader chooses, so an
/// upload that cannot be built can never be retried forever in front of later ones.
fn keeper_denied(site: &Site, e: &Error) -> bool {
    let Error::Io { path, source } = e else {
        return false;
    };
    let denied = matches!(
        source.raw_os_error(),
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS)
    );
    let own = [
        site.root().to_path_buf(),
        site.releases(),
        site.state(),
        site.manifests(),
        site.claims(),
        site.trash(),
    ];
    denied && path.parent().is_some_and(|p| own.iter().any(|d| d == p))
}

/// How one claim waits for its files in flight.
struct Wait<'a> {
    patience: Patience,
    /// The first look of an earlier run that stopped at this claim: the upload was
    /// announced, settled and its wait logged then.
    resumed: Option<Instant>,
    /// The resolved claim.
    claim: &'a Path,
    cancel: &'a AtomicBool,
    /// See [`Waiting::seen`].
    seen: u64,
}

impl Wait<'_> {
    /// Waits for the files of release `id` still in flight (none listed in `manifest`) as
    /// the patience says: in place until none is left (`None`), or, when some are, hands
    /// the wait back. Past the deadline, the upload is rejected naming them.
    fn wait(
        &self,
        site: &Site,
        id: &str,
        mut manifest: Listed,
        since: Instant,
    ) -> Result<Option<Waiting>> {
        let deadline = since + site.cfg.upload_timeout;
        // Logged by the run that first stopped at this claim.
        let logged = self.resumed.is_some();
        match self.patience {
            Patience::Hold => {
                wait_for_uploads(site, id, &mut manifest, deadline, logged, self.cancel)?;
                Ok(None)
            }
            Patience::Yield => {
                let paths = still_in_flight(site, id, manifest.refresh(site), deadline, logged)?;
                if paths.is_empty() {
                    return Ok(None);
                }
                wait_starts().insert(self.claim.to_path_buf(), since);
                Ok(Some(Waiting {
                    claim: self.claim.to_path_buf(),
                    id: id.to_string(),
                    since,
                    manifest,
                    paths,
                    _hold: fsops::hold(self.claim),
                    seen: self.seen,
                }))
            }
        }
    }
}

fn process_claim(
    site: &Site,
    journal: &mut Journal,
    claim_path: &Path,
    claim: &Claim,
    wait: Wait<'_>,
) -> Result<Step> {
    let id = claim.id.as_str();
    let cancel = wait.cancel;
    let started = Instant::now();
    if claim.finalized && journal.state().get(id).is_some() {
        return activate_and_prune(site, journal, claim).map(Step::Done);
    }
    let first_look = wait.resumed.is_none();
    // The deadline for files still in flight covers the manifest too.
    let since = match wait.resumed {
        Some(since) => since,
        None => {
            tracing::info!(
                event = events::UPLOAD_DETECTED,
                site = site.name(),
                release = id,
                note = claim.message.as_deref(),
                activate = claim.activate,
                "upload detected"
            );
            if !site.cfg.settle_time.is_zero() {
                sleep_unless_cancelled(site.cfg.settle_time, cancel)?;
            }
            Instant::now()
        }
    };
    let deadline = since + site.cfg.upload_timeout;
    if site.cfg.require_manifest && manifest_in_flight(site)? {
        // The manifest is a file of the upload: still arriving under a temporary name
        // (rsync's `.SHA256SUMS.XXXXXX`, parallel sftp/WinSCP transfers), it is waited for
        // like any other file, not taken for a missing one.
        match wait.wait(site, id, Listed::default(), since) {
            Ok(Some(w)) => return Ok(Step::Wait(Box::new(w))),
            Ok(None) => {}
            // Still absent at `upload_timeout`: that is the news, whatever else looked in
            // flight (a build's own `.env.sample` looks like rsync's temporary name forever).
            Err(Error::Rejected(r)) if manifest_missing(site) => {
                return Err(Error::Rejected(format!(
                    "{} is missing from the upload (require_manifest = true); {r}",
                    site.cfg.manifest
                )));
            }
            Err(e) => return Err(e),
        }
    }
    let mut manifest = read_manifest(site, id, first_look)?;
    let link_from = link_source(site, journal);

    let existing = journal.state().get(id).cloned();
    let on_disk = std::fs::symlink_metadata(site.release(id)).is_ok();
    if on_disk && existing.is_none() {
        if store::has_manifest(site, id) {
            // Renamed into place but not journaled before a crash: ours, redo it.
            changes::recorded(site, || {
                fsops::trash_and_remove(&site.release(id), &site.trash())
            })?;
        } else {
            return Err(Error::Rejected(format!(
                "releases/{id} already exists and was not made by release-keeper"
            )));
        }
    }

    let known_changes = Changes::load(site);

    // The build stops at the first file that still looks in flight; then the upload is
    // waited for (by cheap listings, up to upload_timeout) and the build starts over.
    let mut lists_none;
    let mut built = loop {
        // Checked once the build has seen the upload: files it holds that the manifest
        // does not list are the reason then, not an "empty" upload.
        lists_none = manifest.as_ref().is_some_and(|m| m.entries.is_empty());
        let files = manifest.as_ref().map(|m| m.entries.len());
        // Each attempt is its own span: the waits between them change no release.
        let window = changes::Window::open(site);
        let own_changes = known_changes.clone().with_open(window.start());
        let input = finalize::Input {
            site,
            id,
            link_from: link_from.as_ref(),
            changes: &own_changes,
            cancel,
            durability: finalize::Durability::for_upload(files, fsops::unwritten_bytes()),
        };
        let attempt = finalize::build(&input, manifest);
        drop(window);
        match attempt {
            Err(Error::InFlight(name)) => {
                if Instant::now() >= deadline {
                    // Every such file, as `upload.waiting` named them: the build stopped
                    // at the first.
                    let listed = read_manifest(site, id, false)?.map(|m| m.entries);
                    let mut busy = in_flight(site, listed.as_ref())?;
                    if busy.is_empty() {
                        busy.push(name);
                    }
                    return Err(Error::Rejected(format!(
                        "files still in flight after upload_timeout = {}: {}",
                        clock::format_duration(site.cfg.upload_timeout),
                        busy.join(", ")
                    )));
                }
                // Stamped before it is read: a change in between is read again.
                let stamp = manifest_stamp(site);
                let listed = Listed::new(read_manifest(site, id, false)?.map(|m| m.entries), stamp);
                if let Some(w) = wait.wait(site, id, listed, since)? {
                    return Ok(Step::Wait(Box::new(w)));
                }
                manifest = read_manifest(site, id, false)?;
            }
            other => break other?,
        }
    };
    // An emptied deploy-cache/ with a marker (a build step that produced nothing) must
    // not replace the live site by an empty release (or one of its manifest alone).
    if built.files == 0 || lists_none {
        remove_partial(site, id)?;
        return Err(Error::Rejected(if lists_none {
            format!("the upload is empty: {} lists no files", site.cfg.manifest)
        } else {
            "the upload is empty: deploy-cache/ holds no files".into()
        }));
    }

    if existing.is_some() && on_disk {
        let stored = store::read_release_manifest(site, id)?;
        let entries = built.entries()?;
        remove_partial(site, id)?;
        // The manifest differs whenever anything else does: it is named only when nothing
        // else differs.
        let manifest = Path::new(&site.cfg.manifest);
        let (stored_sums, stored): (Vec<_>, Vec<_>) =
            stored.into_iter().partition(|e| e.path == manifest);
        let (uploaded_sums, uploaded): (Vec<_>, Vec<_>) =
            entries.iter().cloned().partition(|e| e.path == manifest);
        let difference = store::first_difference(&stored, &uploaded)
            .or_else(|| store::first_difference(&stored_sums, &uploaded_sums));
        if difference.is_none() {
            finalize::make_shared(site, id, std::mem::take(&mut built.shared))?;
            // Staged by an earlier marker and never tried since: this marker's
            // `activate = true` is the uploader asking for it live, which a no-op would
            // silently ignore (exit 0, `current` unchanged). A release activated or failed
            // before stays a no-op: its verdict stands.
            let to_activate = claim.activate
                && existing
                    .as_ref()
                    .is_some_and(|r| !r.activated && r.failed.is_none());
            tracing::info!(
                event = events::RELEASE_FINALIZED,
                site = site.name(),
                release = id,
                unchanged = true,
                activating = to_activate,
                files = built.files,
                bytes = built.bytes,
                "upload identical to the existing release; {}",
                if to_activate {
                    "activating the staged release"
                } else {
                    "nothing to do"
                }
            );
            if to_activate {
                let outcome = activate_and_prune(site, journal, claim)?;
                return Ok(Step::Done(match outcome {
                    Outcome::Released(id) => Outcome::Activated(id),
                    other => other,
                }));
            }
            return Ok(Step::Done(Outcome::Unchanged(id.to_string())));
        }
        return Err(Error::Rejected(format!(
            "release id {id} already exists with different content (first difference: {})",
            difference.unwrap_or_default()
        )));
    }

    // Accepted: only now may the upload seed `shared/`, before any `current` can link
    // through the release to what it seeds.
    finalize::make_shared(site, id, std::mem::take(&mut built.shared))?;
    built.manifest.commit()?;
    fsops::rename_noreplace(&site.partial(id), &site.release(id))?;
    fsops::fsync_dir(&site.releases())?;
    // The claim is marked finalized BEFORE the journal record: a crash between the two
    // then leaves a finalized claim without a record, which is redone from scratch (the
    // unjournaled release has a stored manifest, so it is trashed and rebuilt). The other
    // order left a record with an unfinalized claim, which the redo took for a duplicate
    // upload of an existing release ("unchanged") and never activated.
    let mut done = claim.clone();
    done.finalized = true;
    marker::save(claim_path, &done)?;
    journal.append(Op::Finalized {
        release: id.to_string(),
        files: built.files,
        bytes: built.bytes,
        activate: claim.activate,
        message: claim.message.clone(),
        created: None,
    })?;
    tracing::info!(
        event = events::RELEASE_FINALIZED,
        site = site.name(),
        release = id,
        files = built.files,
        bytes = built.bytes,
        linked = built.linked,
        hashed = built.hashed,
        duration_ms = started.elapsed().as_millis() as u64,
        "release finalized"
    );
    // The cache only speeds up the next release, so it is not flushed (a torn one costs
    // reads, never a wrong release) and putting it in place is a rename: done before the
    // activation, so that whoever sees `release.activated` finds the state complete.
    if let Some(w) = built.cache {
        if let Err(e) = w.commit() {
            tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), reason = %e, "cannot save the hash cache");
        }
    }
    activate_and_prune(site, journal, &done).map(Step::Done)
}

fn activate_and_prune(site: &Site, journal: &mut Journal, claim: &Claim) -> Result<Outcome> {
    let id = claim.id.as_str();
    let mut outcome = Outcome::Released(id.to_string());
    if claim.activate {
        let state = journal.state();
        let decided = state
            .get(id)
            .is_some_and(|r| r.activated || r.failed.is_some());
        if !decided {
            let opts = activate::Options {
                just_built: true,
                ..activate::Options::default()
            };
            match activate::activate(site, journal, id, opts) {
                Ok(_) => {}
                Err(Error::Failed(reason)) => {
                    outcome = Outcome::ActivationFailed(id.to_string(), reason);
                }
                // A staged release re-uploaded to activate it whose files on disk were
                // found drifted since: the upload matches, what would go live does not.
                Err(e @ Error::Drifted { .. }) => {
                    outcome = Outcome::ActivationFailed(id.to_string(), e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
    }
    // SPEC prunes after an activation: a staged release switched nothing, so it must not
    // cost a good release a rollback could still go to.
    if !claim.activate {
        return Ok(outcome);
    }
    // Pruning never decides the outcome of a deploy.
    if let Err(e) = retention::prune(site, journal) {
        tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), reason = %e, "pruning failed; will retry after the next release");
    }
    Ok(outcome)
}

/// The newest live release with a stored manifest, as a source of hard links. A release
/// whose last drift check found drift is skipped: its files no longer match its manifest,
/// and a hard link would carry the edit into the new release.
fn link_source(site: &Site, journal: &Journal) -> Option<LinkSource> {
    let state = journal.state();
    let current = site.current_id();
    let candidates = current
        .into_iter()
        .chain(state.live_newest_first().map(|r| r.id.clone()));
    for id in candidates {
        if crate::verify::drifted(site, &id).is_some() {
            tracing::debug!(site = site.name(), release = %id, "not a source of hard links: it has drifted");
            continue;
        }
        if store::has_manifest(site, &id) && site.release_exists(&id) {
            return Some(LinkSource::new(site.release(&id), site.manifest_of(&id)));
        }
    }
    None
}

/// Reads and parses `deploy-cache/<manifest>` line by line (never whole in memory beside
/// its parsed form). `None` when absent and not required, with a warning naming release
/// `id` when `warn` (the first read of an upload: re-reads while in-flight files are
/// waited for would repeat it).
fn read_manifest(site: &Site, id: &str, warn: bool) -> Result<Option<Expected>> {
    let path = site.deploy_cache().join(&site.cfg.manifest);
    let name = &site.cfg.manifest;
    // Through the directory opened without following a link: an uploader may have made
    // `deploy-cache/` one since the marker was claimed.
    let dir = fsops::open_dir_nofollow(&site.deploy_cache())?;
    let opened = fsops::open_small_nofollow_at(
        &dir,
        std::ffi::OsStr::new(name),
        &path,
        manifest::MAX_MANIFEST_BYTES,
    );
    let file = match opened {
        Ok(f) => f,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            if site.cfg.require_manifest {
                return Err(Error::Rejected(format!(
                    "{name} is missing from the upload (require_manifest = true)"
                )));
            }
            if warn {
                tracing::warn!(event = crate::events::UPLOAD_UNVERIFIED, site = site.name(), release = id, manifest = %name,
                    "no manifest in the upload; recording the hashes as uploaded (require_manifest = false)");
            }
            return Ok(None);
        }
        Err(Error::Rejected(r)) => return Err(Error::Rejected(format!("{name} {r}"))),
        Err(e) => return Err(e),
    };
    let parsed = manifest::parse_reader(std::io::BufReader::new(file), Path::new(name));
    let (mut entries, manifest_digest) = match parsed {
        Ok(p) => p,
        Err(manifest::ManifestError::Duplicate { .. }) => {
            // Error path only: the whole file again, for the exact first line.
            let bytes = fsops::read_small_nofollow(&path, manifest::MAX_MANIFEST_BYTES)?;
            let e = manifest::parse(&bytes).err().map_or_else(
                || "changed while it was being read".to_string(),
                |e| e.to_string(),
            );
            return Err(Error::Rejected(format!("{name}: {e}")));
        }
        Err(e) => return Err(Error::Rejected(format!("{name}: {e}"))),
    };
    // A manifest made with `find . -type f | xargs sha256sum > SHA256SUMS` lists itself
    // (as it was while being written); the marker never belongs to the upload either.
    entries.remove(site.cfg.manifest.as_bytes());
    entries.remove(site.cfg.marker.as_bytes());
    Ok(Some(Expected {
        entries,
        manifest_digest,
    }))
}

/// Waits while files of the upload still look in flight (temporary names of rsync, WinSCP
/// and the like, not listed in the manifest), up to `deadline`. `id` is the release the
/// wait holds up; `logged` says `upload.waiting` was logged for it already.
fn wait_for_uploads(
    site: &Site,
    id: &str,
    manifest: &mut Listed,
    deadline: Instant,
    mut logged: bool,
    cancel: &AtomicBool,
) -> Result<()> {
    loop {
        if still_in_flight(site, id, manifest.refresh(site), deadline, logged)?.is_empty() {
            return Ok(());
        }
        logged = true;
        sleep_unless_cancelled(POLL_IN_FLIGHT, cancel)?;
    }
}

/// The files of release `id`'s upload that still look in flight (see [`in_flight`]); when
/// there are any, `upload.waiting` is logged unless `logged` says it was, and past
/// `deadline` the upload is rejected naming them.
fn still_in_flight(
    site: &Site,
    id: &str,
    manifest: Option<&Entries>,
    deadline: Instant,
    logged: bool,
) -> Result<Vec<String>> {
    let busy = in_flight(site, manifest)?;
    if busy.is_empty() {
        return Ok(busy);
    }
    if Instant::now() >= deadline {
        return Err(Error::Rejected(format!(
            "files still in flight after upload_timeout = {}: {}",
            clock::format_duration(site.cfg.upload_timeout),
            busy.join(", ")
        )));
    }
    if !logged {
        tracing::info!(
            event = events::UPLOAD_WAITING,
            site = site.name(),
            release = id,
            files = busy.len(),
            paths = %busy.join(", "),
            timeout_ms = site.cfg.upload_timeout.as_millis() as u64,
            "waiting for files still being uploaded"
        );
    }
    Ok(busy)
}

/// True when `deploy-cache/` holds nothing under the manifest's name.
fn manifest_missing(site: &Site) -> bool {
    // A `deploy-cache/` that cannot be opened is not waited on: the build says why.
    fsops::open_dir_nofollow(&site.deploy_cache()).is_ok_and(|dir| {
        nix::sys::stat::fstatat(
            &dir,
            site.cfg.manifest.as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) == Err(nix::errno::Errno::ENOENT)
    })
}

/// True when the manifest is absent from `deploy-cache/` while something there still looks
/// in flight (it may be the manifest itself, under a temporary name).
fn manifest_in_flight(site: &Site) -> Result<bool> {
    Ok(manifest_missing(site) && !in_flight(site, None)?.is_empty())
}

/// Up to 10 names in `deploy-cache/` that look like temporary upload files and are not
/// listed in the manifest (a listed `.env.backup` is a real file, not rsync's temp name).
/// From directory listings only: cheap even on huge trees.
fn in_flight(site: &Site, manifest: Option<&Entries>) -> Result<Vec<String>> {
    let mut busy = Vec::new();
    let marker = std::ffi::OsString::from(&site.cfg.marker);
    walk::names(
        &site.deploy_cache(),
        &[marker.as_os_str()],
        &mut |rel, is_dir| {
            let name = rel.file_name().unwrap_or_default();
            if busy.len() < 10
                && inflight::looks_in_flight(name, is_dir)
                && !manifest.is_some_and(|m| m.vouches_for(rel.as_os_str().as_bytes(), is_dir))
            {
                busy.push(events::printable(&events::shown(rel)).into_owned());
            }
            Ok(())
        },
    )?;
    Ok(busy)
}

fn sleep_unless_cancelled(d: Duration, cancel: &AtomicBool) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}
