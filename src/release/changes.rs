//! When the keeper itself last changed the inodes of releases, so a build can tell its
//! own changes from a hand edit.
//!
//! A file of the previous release is shared with a new one only while it is intact. Size
//! and mtime catch an ordinary edit, but not one that also set the mtime back (`touch -r`,
//! `cp -p` of a same-sized file over it). The inode's ctime catches that: every write,
//! chmod, `touch` and link count change sets it to the time of the change, and nothing
//! can set it back. The keeper changes it too (a build links to the file, pruning and
//! the removal of a failed build unlink other names of it), so each of its operations
//! that may do so records its time span, start and end in nanoseconds since the epoch, as
//! one line of `.release-keeper/changes`. A file whose ctime falls in no recorded span was
//! changed by someone else since the keeper last touched it: it is not shared, the new
//! release gets its own copy of the upload's verified file.
//!
//! The log only ever saves work: a span lost in a crash, a torn line or a log cut short
//! makes files look changed, so they are copied once, never wrongly shared. With no log
//! at all (the first build after an upgrade, or the file deleted by hand) the ctime is not
//! consulted for that build, as before the log existed, and the build starts it.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::stat::FileStat;

use crate::fsops;
use crate::site::Site;

/// Spans kept when the log is cut short: a file untouched by the keeper for this many
/// operations is copied once at its next sharing, a small price.
const KEEP: usize = 512;
/// The log is cut back to [`KEEP`] spans when it passes this many.
const MAX: usize = 2 * KEEP;
/// Slack before a span: the kernel may stamp a ctime from a clock that runs up to one tick
/// (1 to 10 ms) behind the one the span is read from. A ctime is never ahead of it, so
/// the end needs none beyond rounding.
const SLACK: Duration = Duration::from_millis(15);
const END_SLACK: Duration = Duration::from_millis(1);

/// The recorded spans of the keeper's own changes to a site's release inodes.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Sorted `(start, end)` nanoseconds since the epoch; `None` without a log.
    spans: Option<Vec<(i128, i128)>>,
    /// The start of an operation still running.
    open_since: Option<i128>,
    /// The inodes (device, inode) the running operation has linked: in its span, only
    /// their ctimes are its own. Any ctime since it started once counted as its own, so a
    /// file edited by hand while a build ran (or in the slack just before it) was shared
    /// into the new release unread, and went live unverified.
    own: Arc<Mutex<HashSet<(u64, u64)>>>,
}

fn nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn parse_line(line: &str) -> Option<(i128, i128)> {
    let (a, b) = line.split_once(' ')?;
    let (a, b) = (a.parse::<i128>().ok()?, b.parse::<i128>().ok()?);
    (a <= b).then_some((a, b))
}

/// The spans of a log, sorted and merged where they overlap (their slack, a clock stepped
/// back), so a ctime can only be in the last span starting at or before it.
fn parse_spans(bytes: &[u8]) -> Vec<(i128, i128)> {
    let text = String::from_utf8_lossy(bytes);
    let mut spans: Vec<(i128, i128)> = text.lines().filter_map(parse_line).collect();
    spans.sort_unstable();
    let mut merged: Vec<(i128, i128)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

impl Changes {
    /// Reads the site's log. A missing or unreadable one gives `Changes` that explain
    /// every ctime (see the module comment); bad lines are skipped.
    pub fn load(site: &Site) -> Changes {
        let spans = std::fs::read(site.changes_log())
            .ok()
            .map(|bytes| parse_spans(&bytes));
        Changes {
            spans,
            ..Changes::default()
        }
    }

    /// The same, also explaining what an operation running since `since` changes.
    pub fn with_open(mut self, since: SystemTime) -> Changes {
        self.open_since = Some(nanos(since) - SLACK.as_nanos() as i128);
        self.own = Arc::default();
        self
    }

    /// Records that the running operation linked a new name to the inode of `st` (which
    /// moves its ctime into the operation's span).
    pub fn linked(&self, st: &FileStat) {
        if let Ok(mut own) = self.own.lock() {
            own.insert((st.st_dev, st.st_ino));
        }
    }

    /// Whether the keeper may have made the last change to the inode of `st`.
    pub fn explains(&self, st: &FileStat) -> bool {
        let Some(spans) = &self.spans else {
            return true;
        };
        let ctime = st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128;
        let i = spans.partition_point(|&(start, _)| start <= ctime);
        if i > 0 && spans.get(i - 1).is_some_and(|&(_, end)| ctime <= end) {
            return true;
        }
        self.open_since.is_some_and(|s| ctime >= s)
            && self
                .own
                .lock()
                .is_ok_and(|own| own.contains(&(st.st_dev, st.st_ino)))
    }
}

/// An operation that may change the inodes of releases: its span is recorded when it
/// ends (dropped), however it ends.
pub struct Window {
    site: String,
    log: PathBuf,
    start: SystemTime,
}

impl Window {
    /// Starts the span of an operation on `site`.
    pub fn open(site: &Site) -> Window {
        Window {
            site: site.name().to_string(),
            log: site.changes_log(),
            start: SystemTime::now(),
        }
    }

    /// When it started.
    pub fn start(&self) -> SystemTime {
        self.start
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let line = format!(
            "{} {}\n",
            nanos(self.start) - SLACK.as_nanos() as i128,
            nanos(SystemTime::now()) + END_SLACK.as_nanos() as i128
        );
        if let Err(e) = append(&self.log, line.as_bytes()) {
            // Files it touched look edited to the next build, which copies them: said, as
            // a log that stays unwritable would make every release a full copy.
            tracing::warn!(event = crate::events::SITE_ERROR, site = %self.site,
                path = %self.log.display(), reason = %e,
                "cannot record the keeper's own changes; the next release copies the files they touched");
        }
    }
}

/// Runs `f`, an operation that may change the inodes of releases, within a [`Window`].
pub fn recorded<T>(site: &Site, f: impl FnOnce() -> T) -> T {
    let _window = Window::open(site);
    f()
}

/// Appends a span, not synced: a span lost in a crash only costs copies. Cuts the log back
/// to its last [`KEEP`] spans when it has grown past [`MAX`].
fn append(log: &std::path::Path, line: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(log)?;
    f.write_all(line)?;
    // About 40 bytes a line: only a long log is read back to be cut.
    if f.metadata()?.len() > (MAX * 40) as u64 {
        let bytes = std::fs::read(log)?;
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().filter(|l| parse_line(l).is_some()).collect();
        if lines.len() > MAX {
            let mut kept = lines[lines.len() - KEEP..].join("\n");
            kept.push('\n');
            fsops::write_atomic(log, kept.as_bytes()).map_err(std::io::Error::other)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_at(ctime_ns: i128) -> FileStat {
        // SAFETY: FileStat is a plain C struct of integers; all-zero is a valid value.
        let mut st: FileStat = unsafe { std::mem::zeroed() };
        st.st_ctime = (ctime_ns / 1_000_000_000) as i64;
        st.st_ctime_nsec = (ctime_ns % 1_000_000_000) as i64;
        st
    }

    fn changes(spans: &[(i128, i128)]) -> Changes {
        Changes {
            spans: Some(spans.to_vec()),
            ..Changes::default()
        }
    }

    #[test]
    fn a_ctime_inside_a_recorded_span_is_the_keepers_own() {
        let c = changes(&[(100, 200), (300, 400), (1_000, 5_000)]);
        assert!(c.explains(&stat_at(150)));
        for t in [100, 150, 200, 300, 400, 1_000, 4_999] {
            assert!(c.explains(&stat_at(t)), "{t}");
        }
        for t in [99, 201, 299, 401, 999, 5_001, 0] {
            assert!(!c.explains(&stat_at(t)), "{t}");
        }
    }

    #[test]
    fn no_log_explains_everything_and_an_open_operation_its_own_changes() {
        assert!(Changes::default().explains(&stat_at(12_345)));
        let c = changes(&[(100, 200)]).with_open(UNIX_EPOCH + Duration::from_secs(10));
        let mut linked = stat_at(10_000_000_000);
        linked.st_ino = 7;
        // Since the operation started, only the inodes it linked are its own changes: an
        // edit made meanwhile (or just before, in the slack) is someone else's.
        assert!(!c.explains(&linked));
        assert!(!c.explains(&stat_at(9_990_000_000)));
        c.linked(&linked);
        assert!(c.explains(&linked));
        let mut other = linked;
        other.st_ino = 8;
        assert!(!c.explains(&other));
        assert!(!c.explains(&stat_at(5_000_000_000)));
        // A later operation starts with none of its own.
        let next = changes(&[(100, 200)]).with_open(UNIX_EPOCH + Duration::from_secs(10));
        assert!(!next.explains(&linked));
    }

    #[test]
    fn spans_are_read_back_skipping_torn_lines_and_the_log_is_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("changes");
        let spans = parse_spans(b"500 600\n100 200\ngarbage\n300 2\n150 250\n7");
        assert_eq!(spans, vec![(100, 250), (500, 600)]);
        let c = changes(&spans);
        assert!(c.explains(&stat_at(240)) && !c.explains(&stat_at(300)));
        // Spans as real ones are: nanoseconds of this century.
        let at = |i: i128| 1_796_333_440_000_000_000 + i * 1_000_000_000;
        for i in 0..(MAX as i128 + 10) {
            append(&log, format!("{} {}\n", at(i), at(i) + 5).as_bytes()).unwrap();
        }
        let text = std::fs::read_to_string(&log).unwrap();
        let n = text.lines().count();
        assert!((KEEP..=MAX).contains(&n), "{n} lines");
        let last = text.lines().last().and_then(parse_line);
        let want = at(MAX as i128 + 9);
        assert_eq!(last, Some((want, want + 5)));
    }
}
