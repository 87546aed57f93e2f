//! Prometheus metrics for node_exporter's textfile collector: a site with `metrics_file`
//! set gets that file rewritten atomically (temp file + rename, so the collector never reads
//! half a file) after every job of the service's worker.
//!
//! Everything is derived from the site's journal, the releases on disk and the last verify
//! result, so the counters survive restarts and agree with `status` and `list`.
//!
//! ```text
//! release_keeper_current_release_info{site="shop",release="v2"} 1
//! release_keeper_last_activation_timestamp_seconds{site="shop"} 1795000000
//! release_keeper_releases{site="shop",state="good"} 3
//! release_keeper_rejections_total{site="shop"} 1
//! release_keeper_drift_paths{site="shop",release="v2"} 0
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::fsops;
use crate::release::store::{Journal, Op, State};
use crate::site::Site;
use crate::verify;

/// The `state` label values of `release_keeper_releases`, as in `list --json`.
pub const STATES: [&str; 5] = ["current", "previous", "good", "staged", "failed"];

/// Rewrites the site's metrics file, if it has one, from `journal` (the site's, current).
/// Failures are logged (once per distinct error, not at every pass) and never fail the
/// job. A file that would get the same content is left alone for half a `heal_interval`, so
/// a burst of passes does not rewrite (and sync) it each time; past that it is renewed even
/// unchanged, since its mtime is how monitoring tells a live keeper from a dead or stuck
/// one (README: `node_textfile_mtime_seconds`), and an idle keeper's only jobs are the
/// periodic healing passes, `heal_interval` apart.
pub fn update(site: &Site, journal: Result<&Journal>) {
    let Some(path) = site.cfg.metrics_file.as_deref() else {
        return;
    };
    let result = journal
        .and_then(|j| render(site, j))
        .and_then(|text| write_if_changed(path, text, site.cfg.heal_interval / 2));
    static LAST_ERROR: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let Ok(mut last) = LAST_ERROR.get_or_init(Default::default).lock() else {
        return;
    };
    match result {
        Ok(()) => {
            last.remove(site.name());
        }
        Err(e) => {
            let msg = e.to_string();
            if last.get(site.name()) != Some(&msg) {
                tracing::warn!(event = crate::events::SITE_ERROR, site = site.name(), path = %path.display(), reason = %msg,
                    "cannot write the metrics file");
                last.insert(site.name().to_string(), msg);
            }
        }
    }
}

/// Identity of a file as this process wrote it: (dev, inode, size, mtime s, mtime ns).
type Written = (u64, u64, u64, i64, i64);

fn identity(path: &Path) -> Option<Written> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// Writes `text` to `path` atomically, unless this process last wrote exactly `text`
/// there less than `renew_after` ago and the file is still the one it wrote (not deleted,
/// replaced or edited since).
fn write_if_changed(path: &Path, text: String, renew_after: Duration) -> Result<()> {
    type Last = (String, Written, Instant);
    static WRITTEN: OnceLock<Mutex<HashMap<PathBuf, Last>>> = OnceLock::new();
    let written = WRITTEN.get_or_init(Default::default);
    if let Ok(w) = written.lock() {
        if let Some((last, id, at)) = w.get(path) {
            if *last == text && at.elapsed() < renew_after && identity(path).as_ref() == Some(id) {
                return Ok(());
            }
        }
    }
    fsops::write_atomic(path, text.as_bytes())?;
    if let (Ok(mut w), Some(id)) = (written.lock(), identity(path)) {
        w.insert(path.to_path_buf(), (text, id, Instant::now()));
    }
    Ok(())
}

/// The metrics of `site` in the Prometheus text exposition format.
pub fn render(site: &Site, journal: &Journal) -> Result<String> {
    let state = journal.state();
    let mut out = String::new();
    let s = label(site.name());
    let current = site.current_id();

    metric(
        &mut out,
        "release_keeper_current_release_info",
        "gauge",
        "The release `current` points at (value always 1).",
    );
    if let Some(id) = &current {
        let _ = writeln!(
            out,
            "release_keeper_current_release_info{{site=\"{s}\",release=\"{}\"}} 1",
            label(id)
        );
    }

    metric(
        &mut out,
        "release_keeper_last_activation_timestamp_seconds",
        "gauge",
        "Unix time of the last successful activation.",
    );
    let last_activation = journal
        .records()
        .iter()
        .rev()
        .find(|r| matches!(r.op, Op::Activated { .. }))
        .and_then(|r| unix_seconds(&r.at));
    if let Some(t) = last_activation {
        let _ = writeln!(
            out,
            "release_keeper_last_activation_timestamp_seconds{{site=\"{s}\"}} {t}"
        );
    }

    metric(
        &mut out,
        "release_keeper_releases",
        "gauge",
        "Releases on disk by state (current, previous, good, staged, failed), as in `list`.",
    );
    let counts = release_counts(site, state, current.as_deref());
    for (state_name, n) in STATES.iter().zip(counts) {
        let _ = writeln!(
            out,
            "release_keeper_releases{{site=\"{s}\",state=\"{state_name}\"}} {n}"
        );
    }

    let count = |pred: fn(&Op) -> bool| journal.records().iter().filter(|r| pred(&r.op)).count();
    let counters: [(&str, &str, usize); 5] = [
        (
            "release_keeper_releases_finalized_total",
            "Releases built and verified.",
            count(|op| matches!(op, Op::Finalized { .. })),
        ),
        (
            "release_keeper_activations_total",
            "Successful activations.",
            count(|op| matches!(op, Op::Activated { .. })),
        ),
        (
            "release_keeper_activation_failures_total",
            "Releases marked failed by a hook or the health check.",
            count(|op| matches!(op, Op::Failed { .. })),
        ),
        (
            "release_keeper_rejections_total",
            "Uploads rejected.",
            count(|op| matches!(op, Op::Rejected { .. })),
        ),
        (
            "release_keeper_rollbacks_total",
            "Rollbacks (automatic and by `rollback`).",
            count(|op| matches!(op, Op::RolledBack { .. })),
        ),
    ];
    for (name, help, n) in counters {
        metric(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name}{{site=\"{s}\"}} {n}");
    }

    // Each family's samples follow its own HELP/TYPE lines, as the text format requires.
    let report = verify::last(site);
    metric(
        &mut out,
        "release_keeper_drift_paths",
        "gauge",
        "Paths of the last verified release that differ from its stored manifest (0: clean).",
    );
    if let Some(r) = &report {
        let _ = writeln!(
            out,
            "release_keeper_drift_paths{{site=\"{s}\",release=\"{}\"}} {}",
            label(&r.release),
            r.drift.len()
        );
    }
    metric(
        &mut out,
        "release_keeper_last_verify_timestamp_seconds",
        "gauge",
        "Unix time of the last re-hash of the current release.",
    );
    if let Some(t) = report.as_ref().and_then(|r| unix_seconds(&r.checked)) {
        let _ = writeln!(
            out,
            "release_keeper_last_verify_timestamp_seconds{{site=\"{s}\"}} {t}"
        );
    }
    Ok(out)
}

/// Counts of live releases present on disk, in the order of `STATES`.
fn release_counts(site: &Site, state: &State, current: Option<&str>) -> [u64; 5] {
    // Not `previous_good(current)`: with the link deleted by hand that counted the
    // release it had named as `previous`, where `list` and `rollback` skip it.
    let (_, previous) =
        state.current_and_previous(current.map(str::to_string), |r| site.release_exists(r));
    let mut counts = [0u64; 5];
    for r in state
        .live_newest_first()
        .filter(|r| site.release_exists(&r.id))
    {
        // The same precedence as `list --json`.
        let i = if Some(r.id.as_str()) == current {
            0
        } else if r.failed.is_some() {
            4
        } else if Some(&r.id) == previous.as_ref() {
            1
        } else if !r.activated {
            3
        } else {
            2
        };
        counts[i] += 1;
    }
    counts
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value escaped for the text format (`\`, `"` and newlines).
fn label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Seconds since the epoch of an RFC 3339 UTC time as the journal writes it
/// (`YYYY-MM-DDTHH:MM:SS[.frac]Z`); `None` for anything else.
fn unix_seconds(at: &str) -> Option<i64> {
    let b = at.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || !at.ends_with('Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| at.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Howard Hinnant's days-from-civil, the inverse of `clock::Utc::from_unix`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Utc;

    #[test]
    fn rfc3339_round_trips_with_the_clock() {
        for t in [0, 951_782_400, 1_795_000_000, 4_102_444_799] {
            assert_eq!(unix_seconds(&Utc::from_unix(t).rfc3339()), Some(t), "{t}");
        }
        assert_eq!(
            unix_seconds("2026-11-22T11:05:01.250Z"),
            Some(1_795_345_501)
        );
        assert_eq!(unix_seconds("2026-11-22 11:05:01"), None);
        assert_eq!(unix_seconds("2026-13-22T11:05:01Z"), None);
        assert_eq!(unix_seconds(""), None);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("x\ny"), r"x\ny");
    }
}
