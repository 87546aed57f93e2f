//! The healing pass: repairs what crashes, hand edits and deleted links leave behind, and
//! reports what it must not touch. Run at start, on SIGHUP, every `heal_interval`, on
//! inotify events in the root, and by `heal`. With `dry_run` it only says what it would do.
//!
//! What each leftover means (the order of the steps that leave them is in `fsops`):
//! - `releases/.partial.<id>`, `.rk-tmp.*`: a build or a rename that never finished; the
//!   upload's claim is still pending, so removing them loses nothing (the upload is redone).
//!   A temporary name whose pid is a live process other than this one is left alone (a
//!   read-only command such as `verify` may be writing it right now).
//! - `.release-keeper/trash/<id>.<pid>.<n>`: a deletion that was interrupted. When the
//!   journal still has `<id>` live and `releases/<id>` is gone, the pruning is recorded
//!   and logged (`release.pruned`, `resumed`): the interrupted run logs it only with the
//!   journal record it never made.
//! - `.release-keeper/claims/*`: a consumed marker whose release never completed (crash or
//!   SIGTERM). Healing runs under the operation lock, when no upload is in progress, so every
//!   claim it sees is interrupted work, unless the service holds one (`fsops::hold`) while
//!   it waits for the upload's files in flight: then they are all left to it. The caller
//!   redoes them right after the pass.
//! - `deploy-cache/.rk-tmp.<time>-<pid>`: a marker hidden by a claim across filesystems
//!   (`marker::claim_marker`) that stopped before its claim was written: the claim is
//!   finished, so the upload is processed, not lost.
//! - `releases/<id>` unknown to the journal: redone when a pending claim names it (crash
//!   between the rename into place and the journal record), otherwise a release the keeper
//!   did not make: reported, never touched, never counted.
//! - A lock path that is not a regular file (a directory, a symlink, ...): moved aside by
//!   `repair_locks`, which runs before the lock is taken. A lock *file* is never stale: the
//!   locks are `flock(2)`, which the kernel drops when the holder dies.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::activate;
use crate::error::{IoContext, Result};
use crate::events;
use crate::fsops::{self, Listing, Listings};
use crate::release::changes;
use crate::release::store::{self, Journal, Op};
use crate::site::{self, Site};
use crate::upload::marker;

/// One repair (done, or to be done in a dry run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// What was (or would be) done.
    pub what: String,
    /// Why.
    pub why: String,
}

/// The outcome of a pass.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Repairs made (or planned).
    pub repairs: Vec<Repair>,
    /// Problems reported but not touched.
    pub reports: Vec<Report>,
    /// Claims found pending: interrupted uploads the caller redoes after the pass.
    pub claims: usize,
    /// Uploads claimed by a running service (`heal` run beside it): its work in progress,
    /// left to it rather than redone.
    pub in_service: Vec<String>,
}

/// A problem healing found and left for a person.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Report {
    /// What is wrong and what to do.
    pub note: String,
    /// The release it concerns, if one.
    pub release: Option<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.note)
    }
}

impl Outcome {
    fn report(&mut self, note: String, release: Option<&str>) {
        self.reports.push(Report {
            note,
            release: release.map(str::to_string),
        });
    }
}

/// The problems the last pass reported, so the next pass logs only what is new: each
/// pass (every inotify event in the root starts one) would otherwise repeat the same
/// `heal.reported` for as long as nobody acts, which log-based alerts count.
#[derive(Debug, Default)]
pub struct Reported(BTreeSet<Report>);

/// The stem and pid of a name of the form `<stem>.<pid>.<n>`, which the keeper's
/// temporary names (after `.rk-tmp.`) and trash entries (`<id>.<pid>.<n>`) have.
fn stem_pid(name: &str) -> Option<(&str, u32)> {
    let mut parts = name.rsplitn(3, '.');
    parts.next()?.parse::<u64>().ok()?;
    let pid = parts.next()?.parse::<u32>().ok()?;
    let stem = parts.next().filter(|s| !s.is_empty())?;
    Some((stem, pid))
}

/// The stem and pid of the keeper's temporary name `.rk-tmp.<stem>.<pid>.<n>`: anything
/// else starting `.rk-tmp.` (a person's `.rk-tmp.notes`) is not the keeper's to remove.
fn tmp_name(name: &str) -> Option<(&str, u32)> {
    name.strip_prefix(fsops::TMP_PREFIX).and_then(stem_pid)
}

/// True when a temporary name `.rk-tmp.<name>.<pid>.<n>` belongs to a live process other
/// than this one (it may be in use right now). Only the temporary form carries a pid:
/// `.partial.v1.2.0` read as one took "2" (kthreadd, always alive) for its builder and was
/// never cleaned up.
fn tmp_in_use(p: &Path) -> bool {
    let Some((_, pid)) = p.file_name().and_then(|n| n.to_str()).and_then(tmp_name) else {
        return false;
    };
    pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()
}

/// A free name for `name` under `dir` (`name`, `name.2`, `name.3`, ...).
fn free_name(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if fs::symlink_metadata(&first).is_err() {
        return first;
    }
    (2u32..)
        .map(|n| dir.join(format!("{name}.{n}")))
        .find(|p| fs::symlink_metadata(p).is_err())
        .unwrap_or(first)
}

/// Moves `path` aside into `.release-keeper/displaced/` and puts a symlink to `target` in
/// its place in the same step (see `fsops::exchange_with_symlink`), so a real directory
/// named `current` is replaced without a moment when `current` is missing.
fn displace_by_link(site: &Site, path: &Path, label: &str, target: &Path) -> Result<PathBuf> {
    fsops::ensure_dir(&site.displaced(), 0o750)?;
    let mut dest = free_name(
        &site.displaced(),
        &format!("{label}.{}", crate::clock::Utc::now().release_id()),
    );
    loop {
        match fsops::exchange_with_symlink(path, &dest, target) {
            Ok(()) => return Ok(dest),
            Err(crate::Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                dest = free_name(&site.displaced(), &format!("{label}.x"));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Moves `path` aside into `.release-keeper/displaced/` (never deletes it), durably.
pub(crate) fn displace(site: &Site, path: &Path, label: &str) -> Result<PathBuf> {
    fsops::ensure_dir(&site.displaced(), 0o750)?;
    let mut dest = free_name(
        &site.displaced(),
        &format!("{label}.{}", crate::clock::Utc::now().release_id()),
    );
    loop {
        match fsops::rename_noreplace(path, &dest) {
            Ok(()) => break,
            Err(crate::Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                dest = free_name(&site.displaced(), &format!("{label}.x"));
            }
            Err(e) => return Err(e),
        }
    }
    fsops::fsync_dir(&site.displaced())?;
    if let Some(parent) = path.parent() {
        fsops::fsync_dir(parent)?;
    }
    Ok(dest)
}

/// Moves aside a lock path that is not a regular file (a directory, a symlink, a fifo):
/// nothing could take the lock otherwise. Runs before the lock is taken (the service at
/// start and before each job, and the commands); with `dry_run` it only says so.
pub fn repair_locks(site: &Site, dry_run: bool) -> Result<Vec<Repair>> {
    let mut out = Vec::new();
    if !site.state().is_dir() {
        return Ok(out);
    }
    for (path, label) in [
        (site.op_lock(), "lock"),
        (site.service_lock(), "service.lock"),
    ] {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_file() {
            continue;
        }
        let why = "foreign lock: the lock path is not a regular file";
        let what = if dry_run {
            format!("move {} aside", path.display())
        } else {
            let dest = displace(site, &path, label)?;
            let what = format!("moved {} aside to {}", path.display(), dest.display());
            tracing::info!(event = events::HEAL_REPAIRED, site = site.name(), what = %what,
                reason = why, "repaired");
            what
        };
        out.push(Repair {
            what,
            why: why.into(),
        });
    }
    Ok(out)
}

/// Release id of a trash entry `<id>.<pid>.<n>`.
fn trashed_id(name: &str) -> Option<&str> {
    stem_pid(name)
        .map(|(id, _)| id)
        .filter(|id| marker::valid_id(id))
}

/// The entries of `dir` (listed as `listing`) whose names start with one of `prefixes`,
/// sorted (none when `dir` could not be read).
fn leftovers(dir: &Path, listing: &std::io::Result<Listing>, prefixes: &[&str]) -> Vec<PathBuf> {
    let Ok(names) = listing else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = names
        .iter()
        .filter(|(n, _)| {
            n.to_str()
                .is_some_and(|n| prefixes.iter().any(|p| n.starts_with(p)))
        })
        .map(|(n, _)| dir.join(n))
        .collect();
    out.sort();
    out
}

/// Release id of a leftover `releases/.partial.<id>` (none for other leftovers).
fn partial_id(path: &Path) -> Option<&str> {
    path.file_name()?
        .to_str()?
        .strip_prefix(fsops::PARTIAL_PREFIX)
        .filter(|id| marker::valid_id(id))
}

/// True when `listing` holds a directory (not a symlink to one) for each of `names`.
fn has_dirs(listing: &std::io::Result<Listing>, names: &[&Path]) -> bool {
    let Ok(entries) = listing else {
        return false;
    };
    names.iter().all(|want| {
        entries
            .iter()
            .any(|(n, kind)| n.as_os_str() == want.as_os_str() && kind.is_dir())
    })
}

/// The last component of `path` (the name of a site path in its directory).
fn name_of(path: &Path) -> &Path {
    path.file_name().map_or(path, Path::new)
}

/// `repair_locks` for the service, before each job: the listing of the state directory
/// (kept between jobs) shows the usual case, both lock paths absent or regular files,
/// without a `stat` of each.
pub fn repair_locks_with(site: &Site, listings: &mut Listings) -> Result<Vec<Repair>> {
    let (op, service) = (site.op_lock(), site.service_lock());
    let locks = [name_of(&op), name_of(&service)];
    if let Ok(entries) = listings.names(&site.state()) {
        let fine = entries
            .iter()
            .filter(|(n, _)| locks.contains(&Path::new(n)))
            .all(|(_, kind)| kind.is_file());
        if fine {
            return Ok(Vec::new());
        }
    }
    repair_locks(site, false)
}

/// The directories of the site's layout that are missing (`deploy-cache/` only with
/// `Uploads::Recreate`). None for a site without its state directory: making a new site's
/// layout is setting it up, not a repair.
pub fn missing_layout(site: &Site, uploads: Uploads) -> Vec<PathBuf> {
    if !fsops::is_real_dir(&site.state()) {
        return Vec::new();
    }
    let uploads_dir = (uploads == Uploads::Recreate).then(|| site.deploy_cache());
    uploads_dir
        .into_iter()
        .chain(site.keeper_dirs().into_iter().map(|(dir, _)| dir))
        .filter(|d| !fsops::is_real_dir(d))
        .collect()
}

/// The repairs of making the `missing` directories again, logged like every other repair:
/// `heal` answering "nothing to heal" after making `releases/` again hid that someone had
/// removed it.
pub fn layout_repairs(site: &Site, missing: &[PathBuf], dry_run: bool) -> Vec<Repair> {
    let why = "missing directory of the site's layout";
    missing
        .iter()
        .map(|dir| {
            let what = format!(
                "{} {}/",
                if dry_run { "create" } else { "created" },
                dir.display()
            );
            if !dry_run {
                tracing::info!(event = events::HEAL_REPAIRED, site = site.name(), what = %what,
                    reason = why, "repaired");
            }
            Repair {
                what,
                why: why.to_string(),
            }
        })
        .collect()
}

/// Runs one healing pass over `site`. The caller holds the site's operation lock, and
/// processes the pending claims (`pipeline::run_pending`) right after a real pass.
pub fn heal(site: &Site, journal: &mut Journal, dry_run: bool) -> Result<Outcome> {
    let live = service_running(site);
    let out = heal_pass(
        site,
        journal,
        dry_run,
        &mut Listings::default(),
        live,
        Uploads::Recreate,
    )?;
    log_reports(site, &out, dry_run, &mut Reported::default());
    Ok(out)
}

/// Whether the running service is waiting, without the operation lock, for the files in
/// flight of an upload it claimed: it holds a shared lock on that claim (`fsops::hold`).
/// Every claim is then its work in progress, not an upload a crash interrupted: a command
/// holding the operation lock sees claims only while the service waits.
fn service_running(site: &Site) -> bool {
    std::fs::read_dir(site.claims()).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| !e.file_name().as_encoded_bytes().starts_with(b".") && fsops::held(&e.path()))
    })
}

/// What a healing pass does about a missing `deploy-cache/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uploads {
    /// Makes it again (at start, and for the `heal` command).
    Recreate,
    /// Leaves it to the uploader: the passes inotify events start while the service runs.
    /// Made again the moment it went, it was in the way of the uploader's own
    /// `rm -rf deploy-cache && mkdir deploy-cache` ("File exists") or
    /// `mv build deploy-cache` (which then landed in `deploy-cache/build/`). Whatever
    /// makes it again is seen (the root is watched), and its watch renewed.
    Leave,
}

/// `heal`, reusing the directory listings of earlier passes over the same site where the
/// directories did not change (the service keeps `listings` from one pass to the next, so
/// an idle pass stats the site's directories instead of reading them).
pub fn heal_with(
    site: &Site,
    journal: &mut Journal,
    dry_run: bool,
    listings: &mut Listings,
    reported: &mut Reported,
    uploads: Uploads,
) -> Result<Outcome> {
    let out = heal_pass(site, journal, dry_run, listings, false, uploads)?;
    log_reports(site, &out, dry_run, reported);
    Ok(out)
}

fn log_reports(site: &Site, out: &Outcome, dry_run: bool, reported: &mut Reported) {
    if !dry_run {
        for r in out.reports.iter().filter(|r| !reported.0.contains(r)) {
            tracing::warn!(event = events::HEAL_REPORTED, site = site.name(),
                release = r.release.as_deref(), reason = %r.note, "left for an operator");
        }
        reported.0 = out.reports.iter().cloned().collect();
    }
}

fn heal_pass(
    site: &Site,
    journal: &mut Journal,
    dry_run: bool,
    listings: &mut Listings,
    service_live: bool,
    uploads: Uploads,
) -> Result<Outcome> {
    let mut out = Outcome::default();
    // `release` names the release a repair concerns (for `current`: the one it now
    // points at), so a monitor need not parse `what`.
    let mut repair = |what: String, why: &str, release: Option<&str>, out: &mut Outcome| {
        if !dry_run {
            tracing::info!(event = events::HEAL_REPAIRED, site = site.name(), release,
                what = %what, reason = why, "repaired");
        }
        out.repairs.push(Repair {
            what,
            why: why.to_string(),
        });
    };
    let verb = |done: &str, todo: &str| if dry_run { todo } else { done }.to_string();

    // Each directory is listed once per pass: what the pass itself removes from one
    // (leftovers, all hidden names) is never looked at again by a later step.
    let root_listing = listings.names(site.root());
    let state_listing = listings.names(&site.state());
    let (deploy_cache, releases, shared, state) = (
        site.deploy_cache(),
        site.releases(),
        site.shared(),
        site.state(),
    );
    let (manifests, claims) = (site.manifests(), site.claims());
    let keeper_dirs = [name_of(&releases), name_of(&shared), name_of(&state)];
    let layout_ok = has_dirs(&root_listing, &keeper_dirs)
        && has_dirs(&state_listing, &[name_of(&manifests), name_of(&claims)])
        && (uploads == Uploads::Leave || has_dirs(&root_listing, &[name_of(&deploy_cache)]));
    if !layout_ok {
        let missing = missing_layout(site, uploads);
        if !dry_run {
            match uploads {
                Uploads::Recreate => site.ensure_layout()?,
                Uploads::Leave => site.ensure_keeper_dirs()?,
            }
        }
        out.repairs.extend(layout_repairs(site, &missing, dry_run));
    }

    // Before anything here or after this pass (a redone activation) runs a hook again.
    // Looked up in the listing first: a pass runs on every event in the root.
    let record = site.hook_record();
    let noted = state_listing.as_ref().map_or(true, |names| {
        names
            .iter()
            .any(|(n, _)| n.as_os_str() == name_of(&record).as_os_str())
    });
    let reaped = noted
        .then(|| crate::hooks::reap_leftovers(&record, dry_run))
        .flatten();
    if let Some(what) = reaped {
        repair(
            format!("{} what was left of {what}", verb("killed", "kill")),
            crate::hooks::LEFTOVER_REASON,
            None,
            &mut out,
        );
    }

    let releases_listing = listings.names(&releases);
    for p in leftovers(
        &releases,
        &releases_listing,
        &[fsops::PARTIAL_PREFIX, fsops::TMP_PREFIX],
    ) {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let tmp = tmp_name(name);
        let foreign = name.starts_with(fsops::TMP_PREFIX) && tmp.is_none();
        if foreign || tmp_in_use(&p) {
            continue;
        }
        // A release moved aside for its pruning where `releases/` is a filesystem of its
        // own (no rename reaches the trash): `.rk-tmp.<id>.<pid>.<n>`.
        let pruned = tmp.map(|(id, _)| id).filter(|id| marker::valid_id(id));
        if let Some(id) = pruned {
            record_cut_short_prune(site, journal, id, dry_run, &mut out, &mut repair)?;
        }
        if !dry_run {
            changes::recorded(site, || fsops::trash_and_remove(&p, &site.trash()))?;
        }
        repair(
            format!("{} {}", verb("removed", "remove"), p.display()),
            if pruned.is_some() {
                "leftover of an interrupted pruning"
            } else {
                "leftover of an interrupted build"
            },
            partial_id(&p).or(pruned),
            &mut out,
        );
    }
    let claims_listing = listings.names(&claims);
    let manifests_listing = listings.names(&manifests);
    // `shared/` holds the keeper's temporary names too: a seed copy (`HeldFile`) a crash
    // left before its upload was accepted.
    let shared_dir = site.shared();
    let shared_listing = listings.names(&shared_dir);
    for (dir, listing) in [
        (site.root(), &root_listing),
        (state.as_path(), &state_listing),
        (manifests.as_path(), &manifests_listing),
        (claims.as_path(), &claims_listing),
        (shared_dir.as_path(), &shared_listing),
    ] {
        for p in leftovers(dir, listing, &[fsops::TMP_PREFIX]) {
            // Outside `releases/` the keeper's temporary names are files and symlinks: a
            // directory there is someone's, whatever its name.
            let ours = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(tmp_name)
                .is_some()
                && !fsops::is_real_dir(&p);
            if !ours || tmp_in_use(&p) {
                continue;
            }
            if !dry_run {
                fsops::remove_tree(&p)?;
            }
            repair(
                format!("{} {}", verb("removed", "remove"), p.display()),
                "leftover temporary file or link",
                None,
                &mut out,
            );
        }
    }

    // Everything the pass changes is a repair: with none from here on, the listing of
    // `manifests/` taken above is still the one to look at (dry runs change nothing).
    let repairs_so_far = out.repairs.len();
    heal_trash(site, journal, dry_run, listings, &mut out, &mut repair)?;

    if !dry_run {
        if let Some(t) = activate::resume_trial(site, journal)? {
            out.repairs.push(Repair {
                what: format!("resolved the {}", t.what()),
                why: "crash between the switch and the health verdict".into(),
            });
        }
        if let Some(id) = activate::finish_rollback(site, journal)? {
            repair(
                format!("finished the rollback from the failed release {id}"),
                "crash between the failed verdict and the switch back",
                Some(&id),
                &mut out,
            );
        }
    } else if let Some(t) = &journal.state().open_trial {
        out.repairs.push(Repair {
            what: format!("resolve the {}", t.what()),
            why: "crash between the switch and the health verdict".into(),
        });
    } else if let Some((id, _)) = &journal.state().unfinished_rollback {
        if site.current_id().as_deref() == Some(id.as_str()) && site.cfg.auto_rollback {
            out.repairs.push(Repair {
                what: format!("finish the rollback from the failed release {id}"),
                why: "crash between the failed verdict and the switch back".into(),
            });
        }
    }

    for (link, target) in &site.cfg.links {
        let path = site.root().join(link);
        let ok = fs::read_link(&path).ok().as_deref() == Some(target.as_path());
        if ok {
            continue;
        }
        match fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_symlink() => out.report(
                format!(
                    "{} is not a symlink; expected a link to {} (left alone)",
                    path.display(),
                    target.display()
                ),
                None,
            ),
            _ => {
                if !dry_run {
                    activate::ensure_link(site, link, target)?;
                }
                repair(
                    format!(
                        "{} {} -> {}",
                        verb("linked", "link"),
                        link.display(),
                        target.display()
                    ),
                    "configured link missing or wrong",
                    None,
                    &mut out,
                );
            }
        }
    }

    // A marker hidden by a claim across filesystems that a crash cut short: made its claim
    // now, or the upload would be lost and the hidden file break the next release.
    // Never through a `deploy-cache/` an uploader replaced with a symlink: what it points
    // at is not the site's.
    let hidden = if fsops::is_real_dir(&deploy_cache) {
        leftovers(
            &deploy_cache,
            &listings.names(&deploy_cache),
            &[fsops::TMP_PREFIX],
        )
    } else {
        Vec::new()
    };
    let finished = marker::finish_hidden_claims(site, &hidden, dry_run)?;
    for p in &finished {
        repair(
            format!(
                "{} the claim of the marker hidden as {}",
                verb("finished", "finish"),
                p.display()
            ),
            "claim across filesystems interrupted",
            None,
            &mut out,
        );
    }

    // A resolved claim that is not a file (a directory made by hand) made every pass fail
    // reading it, which blocked the site's uploads for good.
    if let Ok(names) = &claims_listing {
        let mut odd: Vec<&OsStr> = names
            .iter()
            .filter(|(n, kind)| marker::is_bogus_claim(n, Some(*kind)))
            .map(|(n, _)| n.as_os_str())
            .collect();
        odd.sort_unstable();
        for name in odd {
            let path = claims.join(name);
            let what = if dry_run {
                format!("move {} aside", path.display())
            } else {
                let dest = displace(site, &path, "claim")?;
                format!("moved {} aside to {}", path.display(), dest.display())
            };
            repair(what, "a resolved claim that is not a file", None, &mut out);
        }
    }

    // Every claim seen here is interrupted work (uploads run under the same lock). Claims
    // are read only when there are any (every name `pending` considers is visible).
    let mut redone = BTreeSet::new();
    let claims = match &claims_listing {
        Ok(names)
            if finished.is_empty()
                && !names.iter().any(|(n, _)| !n.as_bytes().starts_with(b".")) =>
        {
            Vec::new()
        }
        _ => marker::pending(site)?,
    };
    out.claims = claims.len();
    for p in claims {
        let path = match &p {
            marker::Pending::Raw(path) | marker::Pending::Resolved(path, _) => path,
        };
        // A wait this process keeps across a reload's restart of the site's worker is no
        // crash: "redoing" it was a false alarm at every reload during a wait.
        if service_live || crate::pipeline::waits_in_this_process(path) {
            out.in_service.push(match &p {
                marker::Pending::Raw(path) => path.display().to_string(),
                marker::Pending::Resolved(_, claim) => {
                    redone.insert(claim.id.clone());
                    claim.id.clone()
                }
            });
            continue;
        }
        let (what, release) = match &p {
            marker::Pending::Raw(path) => (
                format!(
                    "{} the upload claimed as {}",
                    verb("redoing", "redo"),
                    path.display()
                ),
                None,
            ),
            marker::Pending::Resolved(_, claim) => {
                redone.insert(claim.id.clone());
                (
                    finalized_claim_work(journal, claim, &verb).unwrap_or_else(|| {
                        format!(
                            "{} the upload of release {}",
                            verb("redoing", "redo"),
                            claim.id
                        )
                    }),
                    Some(claim.id.as_str()),
                )
            }
        };
        repair(
            what,
            "consumed marker whose release never completed",
            release,
            &mut out,
        );
    }

    let on_disk = match releases_listing {
        Ok(names) => store::release_ids(names.iter().map(|(n, _)| n)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => return Err(e).at(&releases),
    };
    let unknown: Vec<&String> = on_disk
        .iter()
        .filter(|id| journal.state().get(id).is_none() && !redone.contains(*id))
        .collect();
    let (ours, foreign): (Vec<&String>, Vec<&String>) = unknown
        .into_iter()
        .partition(|id| store::has_manifest(site, id));
    for id in foreign {
        let note =
            format!("releases/{id} was not made by release-keeper (not counted, never deleted)");
        out.report(note, Some(id));
    }
    // A recovered release links to the shared entries as much as a journaled one does.
    let recovering = !ours.is_empty();
    if recovering {
        for (id, pinned) in recover_releases(site, journal, ours, dry_run)? {
            let pin = if pinned {
                ", pinned as .release-keeper/pins says"
            } else {
                ""
            };
            repair(
                format!(
                    "{} release {id} in the journal{pin}",
                    verb("recorded", "record")
                ),
                "the journal lost its record; its stored manifest shows it is the keeper's",
                Some(&id),
                &mut out,
            );
        }
    }
    // After the recovery, so a lost journal does not leave `current` without a target.
    heal_current(site, journal, dry_run, &mut out, &mut repair)?;
    let state = journal.state();
    // After the recovery too: with the journal lost, a missing shared entry was seen as
    // "no release yet" and only recreated by the next pass.
    let linked = recovering || state.live_newest_first().next().is_some();
    heal_shared(site, linked, dry_run, &mut out, &mut repair)?;

    // Stored manifests of releases that no longer exist (a crash between the journal's
    // `pruned` record and the manifest's removal). Listed again if a repair above may
    // have removed one (finishing a deletion does).
    let manifests_listing = if out.repairs.len() == repairs_so_far || dry_run {
        manifests_listing
    } else {
        listings.names(&manifests)
    };
    if let Ok(names) = manifests_listing {
        let mut stale: Vec<&str> = names
            .iter()
            .filter_map(|(n, _)| n.to_str())
            .filter(|id| marker::valid_id(id))
            .filter(|&id| state.get(id).is_none() && !on_disk.contains(id) && !redone.contains(id))
            .collect();
        stale.sort_unstable();
        for id in stale {
            let p = site.manifest_of(id);
            if !dry_run {
                fsops::remove_tree(&p)?;
            }
            repair(
                format!("{} {}", verb("removed", "remove"), p.display()),
                "stored manifest of a release that no longer exists",
                Some(id),
                &mut out,
            );
        }
        // From the listing already taken: an idle pass makes no call for this.
        let stored: BTreeSet<&OsStr> = names.iter().map(|(n, _)| n.as_os_str()).collect();
        for id in &on_disk {
            if state.get(id).is_some()
                && !redone.contains(id)
                && !stored.contains(OsStr::new(id.as_str()))
            {
                out.report(
                    format!(
                        "releases/{id} has no stored manifest ({} is gone); it cannot be \
                         verified, and drift in it goes unnoticed",
                        site.manifest_of(id).display()
                    ),
                    Some(id),
                );
            }
        }
    }
    Ok(out)
}

/// What the pipeline does with a claim whose release was finalized and journaled before
/// the interruption: it is not rebuilt, only activated if it still awaits its activation,
/// else the claim is closed. `None` for a claim whose upload is redone from scratch.
fn finalized_claim_work(
    journal: &Journal,
    claim: &marker::Claim,
    verb: &dyn Fn(&str, &str) -> String,
) -> Option<String> {
    let release = journal.state().get(&claim.id).filter(|_| claim.finalized)?;
    let undecided = release.failed.is_none() && !release.activated;
    Some(if claim.activate && undecided {
        format!(
            "{} release {}, finalized before the interruption (not rebuilt)",
            verb("activating", "activate"),
            claim.id
        )
    } else {
        format!(
            "{} the claim of release {}, finalized before the interruption (not rebuilt)",
            verb("closing", "close"),
            claim.id
        )
    })
}

/// The release healing points a lost `current` at, with what to add to the repair's
/// words. Only a release that was activated: one that never was (staged, or a crash while
/// its `before_activate` ran) has not had its hooks and health check, so healing making it
/// current would put it live unchecked; its redone upload activates it properly. A
/// release known to have drifted is passed over for a clean one; with none left, it still
/// beats no `current` at all (the site would be down), and is reported.
fn release_for_current(
    site: &Site,
    state: &store::State,
    dry_run: bool,
    why: &str,
    out: &mut Outcome,
) -> Option<(String, Option<String>)> {
    let exists = |id: &str| site.release_exists(id);
    let any = state.last_good_activated(exists)?;
    let clean = |id: &str| exists(id) && crate::verify::drifted(site, id).is_none();
    match state.last_good_activated(clean) {
        Some(c) if c == any => Some((c, None)),
        Some(c) => {
            if !dry_run {
                tracing::warn!(event = events::DRIFT_SKIPPED, site = site.name(),
                    release = %any, to = %c, reason = "its last verify found drift",
                    "healing passes over a drifted release");
            }
            let note = format!(" (passed over release {any}: its last verify found drift)");
            Some((c, Some(note)))
        }
        None => {
            if let Some(r) = crate::verify::drifted(site, &any) {
                out.report(
                    format!(
                        "{why}: current {} at release {any}, the only good release that was \
                         activated, though its last verify ({}) found drift: {}; restore it \
                         and run `release-keeper verify {} {any}`, or deploy a fixed release",
                        if dry_run {
                            "would be pointed"
                        } else {
                            "was pointed"
                        },
                        r.checked,
                        crate::verify::summarize(&r.drift),
                        site.name()
                    ),
                    Some(&any),
                );
            }
            Some((any, None))
        }
    }
}

/// Recreates missing shared directories (a missing shared *file* is only reported). Only
/// once some release exists (`linked`): before the first one nothing links to shared
/// entries yet, and the first upload decides whether each is a file (seeded from it) or a
/// directory.
fn heal_shared(
    site: &Site,
    linked: bool,
    dry_run: bool,
    out: &mut Outcome,
    repair: &mut impl FnMut(String, &str, Option<&str>, &mut Outcome),
) -> Result<()> {
    let verb = |done: &str, todo: &str| if dry_run { todo } else { done }.to_string();
    for entry in site.cfg.shared.iter().filter(|_| linked) {
        let p = site.shared().join(entry);
        if fs::symlink_metadata(&p).is_ok() {
            continue;
        }
        if site.is_shared_file(entry) {
            // Recreating `.env` empty (or as a directory) would start the app with the
            // wrong settings; only a person can restore it.
            out.report(
                format!(
                    "{} (a shared file) is missing; not recreated, restore it",
                    p.display()
                ),
                None,
            );
            continue;
        }
        if !dry_run {
            fsops::ensure_dir(&p, 0o755)?;
        }
        repair(
            format!("{} {}", verb("created", "create"), p.display()),
            "configured shared entry missing",
            None,
            out,
        );
    }
    Ok(())
}

/// Records again releases the journal lost (deleted by hand, truncated, restored from an
/// old backup) whose stored manifest shows they are the keeper's: left unknown they would
/// count as foreign, never pruned nor chosen by healing. They are recorded in the order
/// their manifests were written (the keeper's own files, not the upload's mtimes) as
/// finalized, created when their manifest was written, and not activated, since whether
/// one failed is lost with the journal; the
/// release `current` points at is recorded as activated, and one `.release-keeper/pins` lists
/// as pinned. Returns the ids, in that order, each with whether it was pinned again.
fn recover_releases(
    site: &Site,
    journal: &mut Journal,
    ids: Vec<&String>,
    dry_run: bool,
) -> Result<Vec<(String, bool)>> {
    let mut dated = Vec::with_capacity(ids.len());
    for id in ids {
        let path = site.manifest_of(id);
        let written = fs::metadata(&path).and_then(|m| m.modified()).at(&path)?;
        dated.push((written, id.clone()));
    }
    dated.sort();
    let current = site.current_id();
    let pins = store::saved_pins(site);
    let mut out = Vec::with_capacity(dated.len());
    for (written, id) in dated {
        let pinned = pins.contains(&id);
        if !dry_run {
            let entries = store::read_release_manifest(site, &id)?;
            let files = entries.iter().filter(|e| e.kind == store::Kind::File);
            journal.append(Op::Finalized {
                release: id.clone(),
                files: files.clone().count() as u64,
                bytes: files.map(|e| e.size).sum(),
                activate: false,
                message: Some("recovered: the journal had lost this release".into()),
                // The record is written now; the release was made when its manifest was
                // stored, which is what `list` must say it was created.
                created: Some(crate::clock::rfc3339_of(written)),
            })?;
            if current.as_deref() == Some(id.as_str()) {
                journal.append(Op::Activated {
                    release: id.clone(),
                    previous: None,
                })?;
            }
            if pinned {
                journal.append(Op::Pinned {
                    release: id.clone(),
                })?;
            }
        }
        out.push((id, pinned));
    }
    Ok(out)
}

/// The `reason` of a `release.pruned` logged by healing: the policy's own reason was not
/// kept past the crash.
const RESUMED_PRUNE_REASON: &str =
    "pruning interrupted before it was journaled (release already out of releases/); finished by healing";

/// Journals and logs the pruning of `id` that a crash cut short between taking the
/// release out of `releases/` and its journal record, when it is one: the journal still
/// has it live, and `releases/<id>` is gone. Monitoring counts prunings by
/// `release.pruned`, which the interrupted run never logged (it goes with the record).
fn record_cut_short_prune(
    site: &Site,
    journal: &mut Journal,
    id: &str,
    dry_run: bool,
    out: &mut Outcome,
    repair: &mut impl FnMut(String, &str, Option<&str>, &mut Outcome),
) -> Result<()> {
    let live = journal.state().get(id).map(|r| (r.files, r.bytes));
    let Some((files, bytes)) = live.filter(|_| fs::symlink_metadata(site.release(id)).is_err())
    else {
        return Ok(());
    };
    if !dry_run {
        journal.append(Op::Pruned {
            release: id.to_string(),
        })?;
        tracing::info!(
            event = events::RELEASE_PRUNED,
            site = site.name(),
            release = id,
            reason = RESUMED_PRUNE_REASON,
            files,
            bytes,
            resumed = true,
            "release pruned"
        );
        let _ = fs::remove_file(site.manifest_of(id));
        crate::verify::forget(site, id);
    }
    repair(
        format!(
            "{} the pruning of release {id}",
            if dry_run { "record" } else { "recorded" }
        ),
        "deletion interrupted before it was journaled",
        Some(id),
        out,
    );
    Ok(())
}

/// Finishes interrupted deletions: a trash entry of a release the journal still has live
/// (crash between the rename out of `releases/` and the `pruned` record) is recorded as
/// pruned and logged as `release.pruned` (`resumed = true`), then the trash is emptied. A
/// release the journal has as pruned already had its event with the record.
fn heal_trash(
    site: &Site,
    journal: &mut Journal,
    dry_run: bool,
    listings: &mut Listings,
    out: &mut Outcome,
    repair: &mut impl FnMut(String, &str, Option<&str>, &mut Outcome),
) -> Result<()> {
    let Ok(names) = listings.names(&site.trash()) else {
        return Ok(());
    };
    let mut names: Vec<&str> = names.iter().filter_map(|(n, _)| n.to_str()).collect();
    names.sort_unstable();
    for name in names {
        let path = site.trash().join(name);
        if let Some(id) = trashed_id(name) {
            record_cut_short_prune(site, journal, id, dry_run, out, repair)?;
        }
        if !dry_run {
            if let Err(e) = changes::recorded(site, || fsops::remove_tree(&path)) {
                // One stubborn tree (an immutable file, one owned by someone else) must not
                // stop the pass before `current` is looked at; it stays out of
                // `releases/` and the next pass tries again.
                tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(),
                    release = trashed_id(name), path = %path.display(), reason = %e,
                    "cannot finish deleting a trashed release yet; will retry");
                continue;
            }
        }
        repair(
            format!(
                "{} {}",
                if dry_run {
                    "finish deleting"
                } else {
                    "finished deleting"
                },
                path.display()
            ),
            "deletion interrupted",
            trashed_id(name),
            out,
        );
    }
    Ok(())
}

fn heal_current(
    site: &Site,
    journal: &mut Journal,
    dry_run: bool,
    out: &mut Outcome,
    repair: &mut impl FnMut(String, &str, Option<&str>, &mut Outcome),
) -> Result<()> {
    let current = site.current();
    // `readlink` first: it alone tells a missing `current` and one that is not a symlink
    // apart from a symlink, so the usual case (a good link) costs it and one `stat`.
    // A link to a good release spelled another way (`ln -sfn /srv/shop/releases/v1`, a
    // manual switch): only its form is repaired, the operator's choice of release is kept.
    let mut keep = None;
    // The release the link names, even when it is dangling: the one being left.
    let mut named = None;
    let (why, meta) = match fs::read_link(&current) {
        Ok(target) => {
            named = site::release_id_of_target(&target, site.root());
            // `releases/<id>` itself a symlink (`ln -s /etc releases/evil`) leads outside
            // as surely as a target outside: what it names is no release.
            let through_link = |id: &str| {
                fs::symlink_metadata(site.release(id)).is_ok_and(|m| m.file_type().is_symlink())
            };
            let problem = match named.clone() {
                None => Some("current points outside releases/"),
                Some(id) if through_link(&id) => {
                    Some("current points outside releases/ (through a symlink there)")
                }
                Some(id) if !site.release_exists(&id) => Some("current is dangling"),
                // Byte for byte: `Path` equality ignores a trailing slash and doubled
                // slashes, and `releases/v1/` would pass for canonical.
                Some(id) if target.as_os_str() != Site::current_target_for(&id).as_os_str() => {
                    let problem = if target.is_absolute() {
                        "current has an absolute target"
                    } else {
                        "current has a non-canonical target"
                    };
                    keep = journal.state().is_good(&id).then_some(id);
                    Some(problem)
                }
                Some(_) => None,
            };
            let Some(problem) = problem else {
                // Made current by hand (`ln -sfn`): a person's
                // choice, kept, but said, since healing and rollbacks never choose it.
                let failed = named
                    .as_deref()
                    .and_then(|id| journal.state().get(id).cloned())
                    .and_then(|r| r.failed.map(|(reason, _)| (r.id, reason)));
                // A directory put in `releases/` by hand: no release of the keeper's, so
                // nothing verified it. Said; the person who pointed `current` there decides.
                if let Some(id) = named
                    .as_deref()
                    .filter(|id| journal.state().get(id).is_none())
                {
                    out.report(
                        format!(
                            "current points at releases/{id}, which release-keeper did not make \
                             (nothing verified it); healing leaves it: `release-keeper rollback {}` \
                             or `activate` puts a release of the keeper's back",
                            site.name()
                        ),
                        Some(id),
                    );
                    return Ok(());
                }
                // A staged release (`activate = false`) put live by hand: its hooks and
                // health check never ran, and nothing says whether it serves. Said, like a
                // failed one; an open trial of it is the keeper's own switch, not this.
                let staged = named.as_deref().filter(|id| {
                    let state = journal.state();
                    state
                        .get(id)
                        .is_some_and(|r| !r.activated && r.failed.is_none())
                        && state.open_trial.as_ref().is_none_or(|t| t.release != *id)
                });
                if let Some(id) = staged {
                    out.report(
                        format!(
                            "current points at release {id}, which was staged and never \
                             activated (its hooks and health check never ran); healing \
                             leaves it: `release-keeper activate {} {id}` runs them, \
                             `rollback` goes back",
                            site.name()
                        ),
                        Some(id),
                    );
                    return Ok(());
                }
                if let Some((id, reason)) = failed {
                    // What the operator can do: roll back while a good release exists; the
                    // first release failing its checks has none (nothing was live before).
                    let exists = |r: &str| site.release_exists(r);
                    let next = match journal.state().previous_good(Some(&id), exists) {
                        Some(good) => format!(
                            "`release-keeper rollback {}` goes back to the last good one ({good})",
                            site.name()
                        ),
                        None => "there is no good release to go back to: \
                                 deploy a fixed release"
                            .to_string(),
                    };
                    out.report(
                        format!(
                            "current points at release {id}, which failed ({reason}); healing \
                             leaves it: {next}"
                        ),
                        Some(&id),
                    );
                }
                return Ok(());
            };
            (problem, fs::symlink_metadata(&current).ok())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ("current is missing", None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
            "current is not a symlink",
            Some(fs::symlink_metadata(&current).at(&current)?),
        ),
        Err(e) => return Err(e).at(&current),
    };
    let state = journal.state();
    let (target, drift_note) = match keep {
        Some(k) => (Some(k), None),
        None => match release_for_current(site, state, dry_run, why, out) {
            Some((target, note)) => (Some(target), note),
            None => (None, None),
        },
    };
    let Some(target) = target else {
        // Said once the site has had a live release, or one that failed getting there (a
        // first release that failed its checks stays current, with nothing to go back
        // to): without `current` that site is down. A site with only staged releases has
        // simply not been switched on yet.
        let failed_one = state
            .releases
            .iter()
            .any(|r| r.failed.is_some() && site.release_exists(&r.id));
        if meta.is_some() || !state.history.is_empty() || failed_one {
            out.report(
                format!(
                    "{why}, and no good release that was activated is left to point it at; \
                     choose one with `release-keeper activate {} ID`",
                    site.name()
                ),
                None,
            );
        }
        return Ok(());
    };
    // The release `current` leaves: the one its link named, else the one the keeper last
    // put live. A switch to another release is journaled like a rollback, so that
    // `previous`, `last_event` and the next rollback reason from where `current` really
    // is; the same record keeps the left release from being gone back to first. It is
    // written before the swap: a crash in between leaves a link the next pass repairs
    // (and records) again, never a switch the journal does not know.
    // A failed release that stayed current (`auto_rollback = false`) counts: moving off it
    // is a switch like any other, recorded, with `after_activate` for the new one.
    let left = named.or_else(|| state.live.clone().or_else(|| state.history.last().cloned()));
    let switched = left.filter(|l| !l.is_empty() && *l != target);
    if let (Some(from), false) = (&switched, dry_run) {
        journal.append(Op::RolledBack {
            release: from.clone(),
            to: target.clone(),
            reason: format!("healing: {why}"),
        })?;
    }
    let mut linked = false;
    if let Some(m) = &meta {
        if !m.file_type().is_symlink() {
            let what = if dry_run {
                format!(
                    "move {} aside to {}/",
                    current.display(),
                    site.displaced().display()
                )
            } else {
                let to = Site::current_target_for(&target);
                let aside = displace_by_link(site, &current, "current", &to)?;
                linked = true;
                format!("moved {} aside to {}", current.display(), aside.display())
            };
            repair(
                what,
                "current is not a symlink (never deleted)",
                Some(&target),
                out,
            );
        }
    }
    if !dry_run && !linked {
        fsops::swap_symlink(&current, &Site::current_target_for(&target))?;
    }
    let verb = if dry_run { "point" } else { "pointed" };
    let mut what = match &switched {
        Some(from) => format!("{verb} current at releases/{target} (it was at {from})"),
        None => format!("{verb} current at releases/{target}"),
    };
    what.push_str(drift_note.as_deref().unwrap_or_default());
    repair(what, why, Some(&target), out);
    if let (Some(from), false) = (&switched, dry_run) {
        activate::after_heal_switch(site, &target, from);
    }
    Ok(())
}
