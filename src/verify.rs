//! Drift detection: re-hash a release against the manifest stored when it was made.
//! Content, type, mode, missing and extra entries are all drift.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

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

/// Verifies release `id` against its stored manifest.
pub fn verify_release(site: &Site, id: &str) -> Result<Report> {
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
                drift.push(format!("{}: cannot be read ({e})", rel.display()));
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
                    rel.display()
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
                drift.push(format!("{}: became a special file", rel.display()));
                continue;
            };
            if kind != w.kind {
                drift.push(format!(
                    "{}: type changed ({:?} -> {:?})",
                    rel.display(),
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
                            rel.display(),
                            t.display()
                        ));
                    }
                    continue;
                }
                Kind::File => {
                    if meta.len() != w.size {
                        changes.push(format!("size changed ({} -> {})", w.size, meta.len()));
                    } else {
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
                drift.push(format!("{}: {}", rel.display(), changes.join(", ")));
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

/// Stores the latest result for `status`, then logs `drift.detected` for a report with
/// drift: in that order, so whoever reacts to the event (an alert, an operator running
/// `status`) finds the drift already shown.
pub fn record(site: &Site, report: &Report) -> Result<()> {
    let bytes = serde_json::to_vec(report)
        .map_err(|e| Error::Failed(format!("cannot encode drift report: {e}")))?;
    fsops::write_atomic(&site.drift_file(), &bytes)?;
    log_drift(site, report);
    Ok(())
}

/// After `current` may have switched: when the last check found drift in a release that is
/// no longer current, re-hashes the one that is and records that, so `status` stops
/// reporting drift that is no longer live (a deploy or a rollback is how an operator
/// answers drift) instead of showing it for up to `verify_interval`. Costs nothing
/// otherwise. Failures are logged: the periodic check retries.
pub fn recheck_after_switch(site: &Site) {
    let Some(current) = site.current_id() else {
        return;
    };
    match last(site) {
        Some(r) if r.release != current && !r.drift.is_empty() => {}
        _ => return,
    }
    let result = verify_release(site, &current).and_then(|r| record(site, &r));
    if let Err(e) = result {
        tracing::warn!(event = events::SITE_ERROR, site = site.name(), release = %current, reason = %e,
            "cannot check the new current release for drift");
    }
}

/// The last stored verify result, if any.
pub fn last(site: &Site) -> Option<Report> {
    let bytes = fs::read(site.drift_file()).ok()?;
    serde_json::from_slice(&bytes).ok()
}
