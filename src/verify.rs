//! Drift detection: re-hash a release against the manifest stored when it was made.
//! Content, type, mode, missing and extra entries are all drift.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::events;
use crate::fsops;
use crate::release::store::{self, Kind};
use crate::site::Site;
use crate::upload::manifest::hash_reader;

/// The drift of one release.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Release id.
    pub release: String,
    /// One line per drifted path: `<path>: <what>`.
    pub drift: Vec<String>,
    /// RFC 3339 time of the check.
    pub checked: String,
}

/// How closely a check looks at file contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Every file is hashed (`verify`).
    Full,
    /// A file is hashed only when its metadata says it may have changed: its mtime is not
    /// the recorded one, or its ctime is no change of the keeper's own
    /// (`release::changes`). What a switch checks: a tree walk, not a re-read.
    Changed,
}

/// Verifies release `id` against its stored manifest.
pub fn verify_release(site: &Site, id: &str) -> Result<Report> {
    verify_release_at(site, id, Depth::Full)
}

/// Verifies release `id` against its stored manifest, hashing files as `depth` says.
pub fn verify_release_at(site: &Site, id: &str, depth: Depth) -> Result<Report> {
    // Read only for a check that trusts metadata: a full one hashes every file anyway.
    let changes_log =
        (depth == Depth::Changed).then(|| crate::release::changes::Changes::load(site));
    let root = site.release(id);
    if !root.is_dir() {
        return Err(site.no_release(id));
    }
    if !store::has_manifest(site, id) {
        return Err(Error::Failed(format!(
            "release {id} has no stored manifest ({}): it was not made by the keeper, or its \
             manifest was deleted, so it cannot be verified",
            site.manifest_of(id).display()
        )));
    }
    let expected = store::read_release_manifest(site, id)?;
    let mut want: HashMap<PathBuf, store::Entry> =
        expected.into_iter().map(|e| (e.path.clone(), e)).collect();
    let mut drift = Vec::new();
    // The release's own directory is not a manifest line (it is made 0555, whatever
    // `deploy-cache/`'s mode); a write or special bit on it is drift all the same:
    // it lets anyone with that bit add files to the release.
    let root_meta = fs::symlink_metadata(&root).at(&root)?;
    let root_mode = root_meta.permissions().mode() & 0o7777;
    if root_meta.file_type().is_symlink() {
        drift.push(".: type changed (the release's directory is now a symlink)".to_string());
    } else if root_mode & 0o7222 != 0 {
        drift.push(format!(
            ".: mode changed ({root_mode:04o}: the release's directory must be read-only)"
        ));
    }
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        // An unreadable directory is drift (its mode or owner changed), not an error.
        let mut names: Vec<_> = match fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            Err(e) if !rel.as_os_str().is_empty() => {
                drift.push(format!(
                    "{}: cannot be read ({e})",
                    crate::events::shown(&rel)
                ));
                want.retain(|p, _| !p.starts_with(&rel) || p == &rel);
                continue;
            }
            Err(e) => return Err(e).at(&dir),
        };
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path).at(&path)?;
            let Some(w) = want.remove(&rel) else {
                drift.push(format!(
                    "{}: not in the release's manifest (added)",
                    crate::events::shown(&rel)
                ));
                continue;
            };
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_file() {
                Kind::File
            } else {
                drift.push(format!(
                    "{}: became a special file",
                    crate::events::shown(&rel)
                ));
                continue;
            };
            if kind != w.kind {
                drift.push(format!(
                    "{}: type changed ({:?} -> {:?})",
                    crate::events::shown(&rel),
                    w.kind,
                    kind
                ));
                continue;
            }
            // Everything that changed about this one path goes on one line: drift is
            // counted in paths (`count`, `status`, `release_keeper_drift_paths`), and a
            // file edited in place usually changed its size and its mode at once.
            let mut changes = Vec::new();
            match kind {
                Kind::Dir => {
                    stack.push(rel.clone());
                }
                Kind::Symlink => {
                    let t = fs::read_link(&path).at(&path)?;
                    if Some(&t) != w.target.as_ref() {
                        drift.push(format!(
                            "{}: symlink target changed to {}",
                            crate::events::shown(&rel),
                            t.display()
                        ));
                    }
                    continue;
                }
                Kind::File => {
                    if meta.len() != w.size {
                        changes.push(format!("size changed ({} -> {})", w.size, meta.len()));
                    } else if !changes_log
                        .as_ref()
                        .is_some_and(|log| unchanged(&path, &w, log))
                    {
                        match File::open(&path).and_then(|mut f| hash_reader(&mut f)) {
                            Ok((d, _)) if Some(d) == w.hash => {}
                            Ok(_) => changes.push("content changed".to_string()),
                            Err(e) => changes.push(format!("cannot be read ({e})")),
                        }
                    }
                }
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode != w.mode {
                changes.push(format!("mode changed ({:04o} -> {:04o})", w.mode, mode));
            }
            if !changes.is_empty() {
                drift.push(format!(
                    "{}: {}",
                    crate::events::shown(&rel),
                    changes.join(", ")
                ));
            }
        }
    }
    let mut missing: Vec<_> = want.keys().collect();
    missing.sort();
    for p in missing {
        drift.push(format!("{}: missing", p.display()));
    }
    drift.sort();
    Ok(Report {
        release: id.to_string(),
        drift,
        checked: crate::clock::now_rfc3339(),
    })
}

/// True when a file's metadata shows no change since the keeper made it: the recorded
/// mtime, and a ctime the keeper's own operations explain (an edit that set the mtime
/// back still moved the ctime).
fn unchanged(path: &Path, want: &store::Entry, changes: &crate::release::changes::Changes) -> bool {
    let Some(recorded) = want.mtime else {
        return false;
    };
    nix::sys::stat::lstat(path)
        .is_ok_and(|st| store::Mtime::of(&st) == recorded && changes.explains(&st))
}

/// Logs `drift.detected` with every drifted path, when the report has any.
pub fn log_drift(site: &Site, report: &Report) {
    if !report.drift.is_empty() {
        tracing::warn!(
            event = events::DRIFT_DETECTED,
            site = site.name(),
            release = %report.release,
            paths = %report.drift.join("; "),
            count = report.drift.len(),
            "release differs from its manifest"
        );
    }
}

/// Stores the result of a check of the current release: for `status` and as that
/// release's own record (see [`record_release`]), then logs `drift.detected` for a report
/// with drift: in that order, so whoever reacts to the event (an alert, an operator
/// running `status`) finds the drift already shown.
pub fn record(site: &Site, report: &Report) -> Result<()> {
    let bytes = encode(report)?;
    // The release's own record first: it is what activations and healing trust, so a
    // failure after it leaves `status` behind, never a refusal based on an older check.
    store_release(site, report, &bytes)?;
    fsops::write_atomic(&site.drift_file(), &bytes)?;
    log_drift(site, report);
    Ok(())
}

/// Stores the result of a check of any release as that release's last check (what
/// [`drifted`] answers from), without touching what `status` shows, then logs
/// `drift.detected` for a report with drift.
pub fn record_release(site: &Site, report: &Report) -> Result<()> {
    store_release(site, report, &encode(report)?)?;
    log_drift(site, report);
    Ok(())
}

fn encode(report: &Report) -> Result<Vec<u8>> {
    serde_json::to_vec(report)
        .map_err(|e| Error::Failed(format!("cannot encode drift report: {e}")))
}

fn store_release(site: &Site, report: &Report, bytes: &[u8]) -> Result<()> {
    fsops::ensure_dir(&site.drift_dir(), 0o750)?;
    fsops::write_atomic(&site.drift_of(&report.release), bytes)
}

/// After `current` may have switched: when the last check shown by `status` is of another
/// release and either found drift (a deploy or a rollback is how an operator answers
/// drift: `status` must stop reporting drift that is no longer live) or the new current
/// release is known to have drifted (a forced switch to it: `status` must show that drift
/// now, not after up to `verify_interval`), re-hashes the current release and records
/// that. Costs nothing otherwise. Failures are logged: the periodic check retries.
pub fn recheck_after_switch(site: &Site) {
    let Some(current) = site.current_id() else {
        return;
    };
    match last(site) {
        Some(r) if r.release != current && !r.drift.is_empty() => {}
        Some(r) if r.release != current && drifted(site, &current).is_some() => {}
        None if drifted(site, &current).is_some() => {}
        _ => return,
    }
    let result = verify_release(site, &current).and_then(|r| record(site, &r));
    if let Err(e) = result {
        tracing::warn!(event = events::SITE_ERROR, site = site.name(), release = %current, reason = %e,
            "cannot check the new current release for drift");
    }
}

/// The last stored verify result of the current release, as `status` shows it.
pub fn last(site: &Site) -> Option<Report> {
    read_report(&site.drift_file())
}

/// The last stored verify result of release `id`, if it is about the release on disk now.
/// Checks made before per-release records existed are found in `status`'s record when
/// it names `id`.
pub fn last_of(site: &Site, id: &str) -> Option<Report> {
    let own = site.drift_of(id);
    let (path, report) = match read_report(&own) {
        Some(r) if r.release == id => (own, r),
        Some(_) => return None,
        None => {
            let shared = site.drift_file();
            let r = read_report(&shared).filter(|r| r.release == id)?;
            (shared, r)
        }
    };
    // An id can come back after its release was pruned (an explicit id in a marker): a
    // record written before the stored manifest of the release now on disk is about the
    // old one.
    let written = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    match (written(&path), written(&site.manifest_of(id))) {
        (Some(checked), Some(made)) if checked < made => None,
        _ => Some(report),
    }
}

/// The last stored verify result of release `id` when it found drift: a release known to
/// differ from its manifest, which activations refuse and healing avoids. A later clean
/// check of `id` clears it.
pub fn drifted(site: &Site, id: &str) -> Option<Report> {
    last_of(site, id).filter(|r| !r.drift.is_empty())
}

/// Forgets the record of release `id` (pruned: a later release may take its id).
pub fn forget(site: &Site, id: &str) {
    let _ = fs::remove_file(site.drift_of(id));
}

fn read_report(path: &Path) -> Option<Report> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// How many drifted paths [`refusal`] names before "and N more".
const SHOWN_PATHS: usize = 3;

/// The paths of a drift report as a refusal shows them: the first few, then how many more.
pub fn summarize(paths: &[String]) -> String {
    let mut s = paths
        .iter()
        .take(SHOWN_PATHS)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("; ");
    if paths.len() > SHOWN_PATHS {
        s.push_str(&format!(" and {} more", paths.len() - SHOWN_PATHS));
    }
    s
}

/// The error for a switch to release `report.release` refused because of its drift.
pub fn refusal(site: &Site, report: &Report) -> Error {
    Error::Drifted {
        site: site.name().to_string(),
        release: report.release.clone(),
        checked: report.checked.clone(),
        count: report.drift.len(),
        paths: summarize(&report.drift),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_a_few_paths_then_counts_the_rest() {
        let paths = |n: usize| {
            (1..=n)
                .map(|i| format!("f{i}: missing"))
                .collect::<Vec<_>>()
        };
        assert_eq!(summarize(&paths(1)), "f1: missing");
        assert_eq!(
            summarize(&paths(3)),
            "f1: missing; f2: missing; f3: missing"
        );
        assert_eq!(
            summarize(&paths(5)),
            "f1: missing; f2: missing; f3: missing and 2 more"
        );
    }
}
