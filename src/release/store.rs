//! The keeper's memory: an append-only journal of what it did, and the full manifest of
//! every release it made. Release order, "previous", failures and pins are derived from the
//! journal alone, never from mtimes or name sorting, because hand copies and clock jumps
//! make those lie.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clock;
use crate::error::{Error, IoContext, Result};
use crate::fsops;
use crate::site::Site;
use crate::upload::manifest::{from_hex, push_hex, Digest};

/// One step the keeper took, as written to the journal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A release was built, verified and renamed into place.
    Finalized {
        /// Release id.
        release: String,
        /// Number of regular files.
        files: u64,
        /// Total bytes of regular files.
        bytes: u64,
        /// Whether the upload asked to be activated.
        activate: bool,
        /// The marker's message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// RFC 3339 time the release was made, when that is not the record's own: a
        /// release the journal lost is recorded again by healing long after it was made.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        created: Option<String>,
    },
    /// `current` is about to be switched to `release`; the verdict is pending.
    Trial {
        /// Release id.
        release: String,
        /// What `current` pointed at before.
        previous: Option<String>,
        /// A `rollback` to `release` (from `previous`), not an activation: a resumed trial
        /// then records the rollback, so that `previous` stays stepped past.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        rollback: bool,
    },
    /// `release` is current and passed its checks.
    Activated {
        /// Release id.
        release: String,
        /// What `current` pointed at before.
        previous: Option<String>,
    },
    /// `release` failed a hook or the health check; it is never chosen again automatically.
    Failed {
        /// Release id.
        release: String,
        /// Why, naming the hook and its exit status.
        reason: String,
    },
    /// `current` went back from `release` to `to`.
    RolledBack {
        /// The release moved away from.
        release: String,
        /// The release now current.
        to: String,
        /// Why.
        reason: String,
    },
    /// An open trial ended with nothing switched: `current` never named `release` (a
    /// rollback interrupted, or whose swap failed, before the switch). The state is as it
    /// was before the trial; `release` is not stepped past.
    TrialClosed {
        /// The release of the trial.
        release: String,
        /// Why.
        reason: String,
    },
    /// Protected from pruning.
    Pinned {
        /// Release id.
        release: String,
    },
    /// No longer protected.
    Unpinned {
        /// Release id.
        release: String,
    },
    /// Deleted by retention.
    Pruned {
        /// Release id.
        release: String,
    },
    /// An upload was rejected.
    Rejected {
        /// The release id it would have had, if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<String>,
        /// Why.
        reason: String,
    },
}

/// A journal line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Sequence number, 1-based, strictly increasing.
    pub seq: u64,
    /// RFC 3339 UTC time of the step.
    pub at: String,
    /// The step.
    #[serde(flatten)]
    pub op: Op,
}

/// What the journal says about one release.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReleaseInfo {
    /// Release id.
    pub id: String,
    /// Sequence number of its `Finalized` record: the keeper's order of releases.
    pub seq: u64,
    /// RFC 3339 creation time.
    pub created: String,
    /// Number of regular files.
    pub files: u64,
    /// Total bytes.
    pub bytes: u64,
    /// The marker's message.
    pub message: Option<String>,
    /// Ever activated successfully.
    pub activated: bool,
    /// Failure reason and time, if failed.
    pub failed: Option<(String, String)>,
    /// Sequence number of the record that marked it failed (0 when it is not): the order
    /// of failures, which is not the order of releases when a staged or older release
    /// fails later.
    pub failed_seq: u64,
    /// Protected from pruning.
    pub pinned: bool,
    /// Deleted by retention.
    pub pruned: bool,
    /// Left by a rollback and not activated since: a rollback steps past it to an older
    /// release while there is one (see `State::previous_good`).
    pub rolled_back: bool,
}

/// A switch of `current` whose verdict is pending: the journal's last `trial` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenTrial {
    /// The release under trial.
    pub release: String,
    /// What `current` pointed at before.
    pub previous: Option<String>,
    /// A `rollback`'s trial rather than an activation's.
    pub rollback: bool,
}

impl OpenTrial {
    /// What it is, for messages: "interrupted activation of ID" or "interrupted rollback
    /// to ID".
    pub fn what(&self) -> String {
        let kind = match self.rollback {
            true => "rollback to",
            false => "activation of",
        };
        format!("interrupted {kind} {}", self.release)
    }
}

/// The state derived from the journal.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Releases in the order they were finalized (oldest first), pruned ones included.
    pub releases: Vec<ReleaseInfo>,
    /// Every switch of `current` in order (activations and rollbacks' targets).
    pub history: Vec<String>,
    /// The release the keeper last pointed `current` at: an activation, a rollback's
    /// target, or a trial's release, which a failed check with `auto_rollback` off leaves
    /// live although it is in no `history`.
    pub live: Option<String>,
    /// A trial (swap done, verdict pending) that never got a verdict.
    pub open_trial: Option<OpenTrial>,
    /// A trial that failed and whose rollback was not recorded: the release and what was
    /// current before it. A crash between the `failed` record and the switch back leaves
    /// `current` on the failed release; healing finishes the rollback.
    pub unfinished_rollback: Option<(String, Option<String>)>,
    /// The last record.
    pub last: Option<Record>,
    /// Index in `releases` of the newest `Finalized` record of each id, so replaying a
    /// record costs O(1) however long the journal grows.
    index: HashMap<String, usize>,
}

impl State {
    /// Replays records into a state.
    pub fn from_records(records: &[Record]) -> State {
        let mut st = State::default();
        for rec in records {
            st.apply(rec);
        }
        // Cloned once here rather than per record: a long journal replays thousands.
        st.last = records.last().cloned();
        st
    }

    /// Adds one record (appended after those already replayed) to the state.
    pub fn push(&mut self, rec: &Record) {
        self.apply(rec);
        self.last = Some(rec.clone());
    }

    /// Whether the open trial, if any, is `release`'s.
    fn trial_of(&self, release: &str) -> bool {
        self.open_trial
            .as_ref()
            .is_some_and(|t| t.release == release)
    }

    /// Replays one record, except for `last`.
    fn apply(&mut self, rec: &Record) {
        let st = self;
        match &rec.op {
            Op::Finalized {
                release,
                files,
                bytes,
                message,
                created,
                ..
            } => {
                // An id finalized again replaces its older record: the keeper only
                // builds an id whose directory is gone (removed by hand, or a stored
                // manifest whose journal record was lost), so one directory is one
                // release. Left live, the older record listed the id twice and counted
                // toward `keep` on its own, and pruning it deleted the new release.
                if let Some(&old) = st.index.get(release) {
                    st.releases[old].pruned = true;
                }
                st.index.insert(release.clone(), st.releases.len());
                st.releases.push(ReleaseInfo {
                    id: release.clone(),
                    seq: rec.seq,
                    created: created.clone().unwrap_or_else(|| rec.at.clone()),
                    files: *files,
                    bytes: *bytes,
                    message: message.clone(),
                    ..ReleaseInfo::default()
                });
            }
            Op::Trial {
                release,
                previous,
                rollback,
            } => {
                st.open_trial = Some(OpenTrial {
                    release: release.clone(),
                    previous: previous.clone(),
                    rollback: *rollback,
                });
                st.live = Some(release.clone());
                st.unfinished_rollback = None;
            }
            Op::Activated { release, .. } => {
                if let Some(&i) = st.index.get(release) {
                    let r = &mut st.releases[i];
                    r.activated = true;
                    r.rolled_back = false;
                    r.failed = None;
                }
                st.history.push(release.clone());
                st.live = Some(release.clone());
                st.open_trial = None;
                st.unfinished_rollback = None;
            }
            Op::Failed { release, reason } => {
                if let Some(&i) = st.index.get(release) {
                    st.releases[i].failed = Some((reason.clone(), rec.at.clone()));
                    st.releases[i].failed_seq = rec.seq;
                }
                if st.trial_of(release) {
                    st.unfinished_rollback = st.open_trial.take().map(|t| (t.release, t.previous));
                }
            }
            Op::RolledBack { release, to, .. } => {
                if let Some(&i) = st.index.get(release) {
                    st.releases[i].rolled_back = true;
                }
                // Current again: when a rollback's target fails its checks, `current`
                // returns to the release the rollback had left, which must again be the
                // `previous` of the next activation rather than be stepped past.
                if let Some(&i) = st.index.get(to) {
                    st.releases[i].rolled_back = false;
                }
                st.history.push(to.clone());
                st.live = Some(to.clone());
                st.open_trial = None;
                st.unfinished_rollback = None;
            }
            Op::TrialClosed { release, .. } => {
                if st.trial_of(release) {
                    st.open_trial = None;
                    // Closed without a switch: `current` stayed where it was.
                    st.live = st.history.last().cloned();
                }
            }
            Op::Pinned { release } | Op::Unpinned { release } => {
                if let Some(&i) = st.index.get(release) {
                    st.releases[i].pinned = matches!(rec.op, Op::Pinned { .. });
                }
            }
            Op::Pruned { release } => {
                if let Some(&i) = st.index.get(release) {
                    st.releases[i].pruned = true;
                }
            }
            Op::Rejected { .. } => {}
        }
    }

    /// The live (not pruned) record of release `id`.
    pub fn get(&self, id: &str) -> Option<&ReleaseInfo> {
        self.releases.iter().rev().find(|r| r.id == id && !r.pruned)
    }

    /// Live releases, newest first.
    pub fn live_newest_first(&self) -> impl Iterator<Item = &ReleaseInfo> {
        self.releases.iter().rev().filter(|r| !r.pruned)
    }

    /// True when `id` is a live release that has not failed.
    pub fn is_good(&self, id: &str) -> bool {
        self.get(id).is_some_and(|r| r.failed.is_none())
    }

    /// The release a plain `rollback` goes back to, which `list` and `status` show as
    /// `previous`. Walking the switch history back from the newest, skipping `current`
    /// and releases that are failed, pruned or not on disk (`exists`): the first one not
    /// left by a rollback, so that rolling back again steps further back (C, B, A) instead
    /// of forward to what was just rolled back from. Once rollbacks reached the oldest,
    /// the one `current` was switched from most recently: it is good, so it stays a
    /// rollback target, and `previous` is never empty while such a release exists.
    pub fn previous_good(
        &self,
        current: Option<&str>,
        exists: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let candidates = || {
            self.history
                .iter()
                .rev()
                .filter(|id| Some(id.as_str()) != current)
                .filter(|id| self.is_good(id) && exists(id))
        };
        candidates()
            .find(|id| self.get(id).is_some_and(|r| !r.rolled_back))
            .or_else(|| candidates().next())
            .cloned()
    }

    /// The release `current` is taken for, and the previous good release from it: the one
    /// answer `list`, `status`, the metrics, pruning and `rollback` all use, so what they
    /// call `previous` cannot differ. `link` is what the `current` link names; `exists`
    /// says whether a release is on disk.
    pub fn current_and_previous(
        &self,
        link: Option<String>,
        exists: impl Fn(&str) -> bool,
    ) -> (Option<String>, Option<String>) {
        let current = self.effective_current(link, &exists);
        let previous = self.previous_good(current.as_deref(), &exists);
        (current, previous)
    }

    /// The release `current` should be taken for: what the link names (`link`), else, with
    /// the link missing or dangling (a hand edit no healing pass has repaired yet), the
    /// release the keeper last switched to, if it is still on disk. Rollback and pruning
    /// reason from it, so a deleted link neither makes `rollback` "go back" to the live
    /// release nor lets pruning delete the release a rollback would go to. Private: taking
    /// `previous` from the raw link instead is how the metrics once disagreed with `list`.
    fn effective_current(
        &self,
        link: Option<String>,
        exists: impl Fn(&str) -> bool,
    ) -> Option<String> {
        link.or_else(|| self.history.last().filter(|id| exists(id)).cloned())
    }

    /// True when the keeper's last switch of `current` (an activation, or a rollback's
    /// target) went to `id` and `id` is still good: only then is a request to make `id`
    /// current already satisfied. A link pointed at `id` by hand (`ln -sfn`) is not:
    /// `id` never had its hooks and health check for that switch, and nothing recorded it.
    pub fn is_settled_current(&self, id: &str) -> bool {
        self.history.last().is_some_and(|h| h == id) && self.is_good(id)
    }

    /// The release `current` is taken to leave when it already points at `id` by hand and
    /// the keeper activates `id` (or rolls back to it): the one the keeper last switched to
    /// other than `id`, if still on disk. `id` itself would make an automatic rollback
    /// "go back" to the very release that just failed.
    pub fn switched_from(&self, id: &str, exists: impl Fn(&str) -> bool) -> Option<String> {
        self.history
            .iter()
            .rev()
            .find(|h| h.as_str() != id && !h.is_empty() && exists(h))
            .cloned()
    }

    /// The release an activation of `id` leaves while the `current` link names none
    /// (deleted, dangling or pointing outside `releases/` by hand): the one healing would
    /// point it at ([`State::last_good_activated`]), or, when that is `id` itself, the
    /// previous good release from `id`, as an automatic rollback from `id` would choose.
    pub fn left_when_current_lost(
        &self,
        id: &str,
        exists: impl Fn(&str) -> bool,
    ) -> Option<String> {
        self.last_good_activated(&exists)
            .filter(|h| h != id)
            .or_else(|| self.previous_good(Some(id), &exists))
    }

    /// True when the keeper ever switched `current` to `id` (an activation, or a
    /// rollback's target): false for a release only staged, or one whose activation was
    /// interrupted before the swap, which never had its `before_activate`.
    pub fn was_current(&self, id: &str) -> bool {
        self.history.iter().any(|h| h == id)
    }

    /// The last release `current` was switched to that is still good and exists, passing
    /// over one a rollback left (as `previous_good` does) while another is there: after
    /// `rollback` from C to B, with B then deleted, healing brought C back, the release
    /// the operator had just rolled away from, unchecked.
    pub fn last_good_activated(&self, exists: impl Fn(&str) -> bool) -> Option<String> {
        let candidates = || {
            self.history
                .iter()
                .rev()
                .filter(|id| self.is_good(id) && exists(id))
        };
        candidates()
            .find(|id| self.get(id).is_some_and(|r| !r.rolled_back))
            .or_else(|| candidates().next())
            .cloned()
    }
}

/// What identifies one version of the journal file: appends change the size and the
/// mtime, a replaced file changes the inode. Compared before re-reading the journal, so a
/// long-lived reader (the service) replays it only when it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Not known (never read, or written by this `Journal` since): read it again.
    Unknown,
    /// There was no journal file.
    Missing,
    /// The file as it was just before it was read.
    File(fsops::Stamp),
}

impl Seen {
    fn of(meta: &fs::Metadata) -> Seen {
        Seen::File(fsops::Stamp::of(meta))
    }
}

/// The journal of one site, loaded, with the state derived from it.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    site: String,
    records: Vec<Record>,
    state: State,
    seen: Seen,
}

impl Journal {
    /// Loads the journal (a missing one is empty; unparsable lines are skipped and logged).
    pub fn load(site: &Site) -> Result<Journal> {
        let mut journal = Journal {
            path: site.journal(),
            site: site.name().to_string(),
            records: Vec::new(),
            state: State::default(),
            seen: Seen::Unknown,
        };
        journal.read()?;
        Ok(journal)
    }

    /// Re-reads the journal if the file changed since it was read (another process
    /// appended to it). Costs one `stat` when it did not.
    pub fn refresh(&mut self) -> Result<()> {
        let now = match fs::metadata(&self.path) {
            Ok(m) => Seen::of(&m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Seen::Missing,
            Err(e) => return Err(e).at(&self.path),
        };
        if self.seen != Seen::Unknown && now == self.seen {
            return Ok(());
        }
        self.read()
    }

    /// Reads the file into `records` and `state`; on an error both stay as they were and
    /// the next `refresh` reads again.
    fn read(&mut self) -> Result<()> {
        let path = &self.path;
        self.seen = Seen::Unknown;
        let mut records = Vec::new();
        let seen = match fs::File::open(path) {
            Ok(f) => {
                // Identity first: an append that races with the read changes it again, so
                // the next `refresh` re-reads instead of missing the record.
                let seen = Seen::of(&f.metadata().at(path)?);
                for (n, line) in BufReader::new(f).split(b'\n').enumerate() {
                    let line = line.at(path)?;
                    if line.is_empty() {
                        continue;
                    }
                    match serde_json::from_slice::<Record>(&line) {
                        Ok(r) => records.push(r),
                        Err(e) => tracing::warn!(event = crate::events::SITE_ERROR,
                            site = %self.site,
                            path = %path.display(),
                            line = n + 1,
                            reason = %e,
                            "skipping unreadable journal line"
                        ),
                    }
                }
                seen
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Seen::Missing,
            Err(e) => return Err(e).at(path),
        };
        self.state = State::from_records(&records);
        self.records = records;
        self.seen = seen;
        Ok(())
    }

    /// All records, oldest first.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The derived state (kept up to date by `append` and `refresh`, never replayed here).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Appends a record durably.
    pub fn append(&mut self, op: Op) -> Result<()> {
        let seq = self.records.last().map_or(1, |r| r.seq + 1);
        let rec = Record {
            seq,
            at: clock::now_rfc3339(),
            op,
        };
        let line = serde_json::to_vec(&rec)
            .map_err(|e| Error::Failed(format!("cannot encode journal record: {e}")))?;
        // Whatever happens to the write, the file is no longer the one that was read.
        self.seen = Seen::Unknown;
        fsops::append_line(&self.path, &line)?;
        self.state.push(&rec);
        self.records.push(rec);
        Ok(())
    }
}

/// Kind of a release entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
}

/// A file's modification time, as `stat` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mtime {
    /// Seconds since the epoch.
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nsecs: i64,
}

impl Mtime {
    /// The modification time in `st`.
    pub fn of(st: &nix::sys::stat::FileStat) -> Mtime {
        Mtime {
            secs: st.st_mtime,
            nsecs: st.st_mtime_nsec,
        }
    }

    /// Appends the manifest trailer of a file line: `\tmtime=<secs>.<9-digit nsecs>`.
    fn push_trailer(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\tmtime=");
        push_i64(out, self.secs);
        out.push(b'.');
        let n = self.nsecs.clamp(0, 999_999_999) as u64;
        let start = out.len();
        push_u64(out, n);
        let digits = out.len() - start;
        out.splice(start..start, std::iter::repeat_n(b'0', 9 - digits));
    }

    /// Parses what follows the tab of a file line, written by `push_trailer`.
    fn parse_trailer(field: &[u8]) -> Option<Mtime> {
        let value = field.strip_prefix(b"mtime=")?;
        let dot = value.iter().position(|&b| b == b'.')?;
        let nsecs = &value[dot + 1..];
        if nsecs.len() != 9 {
            return None;
        }
        Some(Mtime {
            secs: parse_i64(&value[..dot])?,
            nsecs: i64::try_from(parse_u64(nsecs)?).ok()?,
        })
    }
}

/// Splits the rest of a file line after its hash into the escaped path and the
/// modification time its release file was given (absent in lines of older versions).
fn split_file_rest(rest: &[u8]) -> Option<(&[u8], Option<Mtime>)> {
    match rest.iter().position(|&b| b == b'\t') {
        Some(i) => Some((&rest[..i], Some(Mtime::parse_trailer(&rest[i + 1..])?))),
        None => Some((rest, None)),
    }
}

/// One entry of a release's full manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the release root.
    pub path: PathBuf,
    /// File, directory or symlink.
    pub kind: Kind,
    /// Permission bits (07777).
    pub mode: u32,
    /// Size in bytes (files only; 0 otherwise).
    pub size: u64,
    /// SHA-256 (files only).
    pub hash: Option<Digest>,
    /// Link target (symlinks only).
    pub target: Option<PathBuf>,
    /// The modification time the release's file was given (files only; not part of its
    /// content, and unknown in manifests of older versions): what `finalize` checks
    /// before it hard-links the file into a new release, so an in-place edit of the
    /// same size is not shared.
    pub mtime: Option<Mtime>,
}

/// Escapes a path for one field of a manifest line (`\\`, `\n`, `\t`, `\r`).
pub fn escape_path(p: &[u8], out: &mut Vec<u8>) {
    // Almost every path has nothing to escape: one copy instead of a push per byte.
    if !p
        .iter()
        .any(|&b| matches!(b, b'\\' | b'\n' | b'\t' | b'\r'))
    {
        out.extend_from_slice(p);
        return;
    }
    for &b in p {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// Reverses `escape_path`.
pub fn unescape_path(field: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(field.len());
    unescape_path_into(field, &mut out)?;
    Some(out)
}

/// Reverses `escape_path`, appending to `out` (left partly written on a bad escape).
pub fn unescape_path_into(field: &[u8], out: &mut Vec<u8>) -> Option<()> {
    if !field.contains(&b'\\') {
        out.extend_from_slice(field);
        return Some(());
    }
    let mut it = field.iter();
    while let Some(&b) = it.next() {
        if b == b'\\' {
            out.push(match it.next()? {
                b'\\' => b'\\',
                b'n' => b'\n',
                b't' => b'\t',
                b'r' => b'\r',
                _ => return None,
            });
        } else {
            out.push(b);
        }
    }
    Some(())
}

/// Appends `v` in decimal (what `write!` does, without the formatting machinery that
/// showed in profiles of 20,000-line manifests).
pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends `v` in decimal, with a `-` when negative.
pub fn push_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    push_u64(out, v.unsigned_abs());
}

/// Parses a decimal `u64` written by [`push_u64`]: digits only, no sign, no overflow.
pub fn parse_u64(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 20 {
        return None;
    }
    field.iter().try_fold(0u64, |acc, &b| {
        let d = b.checked_sub(b'0').filter(|d| *d < 10)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Parses a decimal `i64` written by [`push_i64`].
pub fn parse_i64(field: &[u8]) -> Option<i64> {
    match field.strip_prefix(b"-") {
        Some(rest) => 0i64.checked_sub_unsigned(parse_u64(rest)?),
        None => i64::try_from(parse_u64(field)?).ok(),
    }
}

/// The fields of a file's manifest line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileFields<'a> {
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content.
    pub digest: Digest,
    /// The path, still escaped.
    pub path: &'a [u8],
    /// The modification time the release file was given, if recorded.
    pub mtime: Option<Mtime>,
}

/// Parses a file's manifest line, `f <mode> <size> <hex> <path>[\tmtime=...]`, without
/// unescaping its path; `None` for any other line.
pub fn parse_file_fields(line: &[u8]) -> Option<FileFields<'_>> {
    let rest = line.strip_prefix(b"f ")?;
    let (mode, rest) = split_field(rest)?;
    let (size, rest) = split_field(rest)?;
    let (hash, rest) = split_field(rest)?;
    let mode = std::str::from_utf8(mode).ok()?;
    let (path, mtime) = split_file_rest(rest)?;
    Some(FileFields {
        mode: u32::from_str_radix(mode, 8).ok()?,
        size: parse_u64(size)?,
        digest: from_hex(hash)?,
        path,
        mtime,
    })
}

fn split_field(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == b' ')?;
    Some((&s[..i], &s[i + 1..]))
}

fn escape(p: &Path, out: &mut Vec<u8>) {
    escape_path(fsops::path_bytes(p), out);
}

fn unescape(field: &[u8]) -> Option<PathBuf> {
    unescape_path(field).map(fsops::path_from_bytes)
}

impl Entry {
    /// One line: `<f|d|l> <mode octal> <size> <hex|-> <path>[\t<target>]\n`; a file's
    /// line ends in `\tmtime=<secs>.<nsecs>` instead when its mtime is known.
    pub fn to_line(&self, out: &mut Vec<u8>) {
        format_line(
            out,
            self.kind,
            self.mode,
            self.size,
            self.hash.as_ref(),
            &self.path,
            self.target.as_deref(),
            self.mtime,
        );
    }

    /// Equal but for the mtime, which is not content: a re-upload of the same bytes,
    /// touched since, is the same release. (Destructured, so a new field must be placed.)
    fn same_content(&self, other: &Entry) -> bool {
        let Entry {
            path,
            kind,
            mode,
            size,
            hash,
            target,
            mtime: _,
        } = self;
        (path, kind, mode, size, hash, target)
            == (
                &other.path,
                &other.kind,
                &other.mode,
                &other.size,
                &other.hash,
                &other.target,
            )
    }

    /// Parses a line written by `to_line`.
    pub fn from_line(line: &[u8]) -> Option<Entry> {
        let mut parts = line.splitn(5, |&b| b == b' ');
        let kind = match parts.next()? {
            b"f" => Kind::File,
            b"d" => Kind::Dir,
            b"l" => Kind::Symlink,
            _ => return None,
        };
        let mode = u32::from_str_radix(std::str::from_utf8(parts.next()?).ok()?, 8).ok()?;
        let size = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
        let hash = match parts.next()? {
            b"-" => None,
            h => Some(from_hex(h)?),
        };
        let rest = parts.next()?;
        let (path, target, mtime) = if kind == Kind::File {
            let (path, mtime) = split_file_rest(rest)?;
            (unescape(path)?, None, mtime)
        } else {
            match rest.iter().position(|&b| b == b'\t') {
                Some(i) => (unescape(&rest[..i])?, Some(unescape(&rest[i + 1..])?), None),
                None => (unescape(rest)?, None, None),
            }
        };
        Some(Entry {
            path,
            kind,
            mode,
            size,
            hash,
            target,
            mtime,
        })
    }
}

/// Appends one manifest line (the format of [`Entry::to_line`]) without making an `Entry`.
#[allow(clippy::too_many_arguments)]
pub fn format_line(
    out: &mut Vec<u8>,
    kind: Kind,
    mode: u32,
    size: u64,
    hash: Option<&Digest>,
    path: &Path,
    target: Option<&Path>,
    mtime: Option<Mtime>,
) {
    let letter = match kind {
        Kind::File => b'f',
        Kind::Dir => b'd',
        Kind::Symlink => b'l',
    };
    out.extend_from_slice(&[letter, b' ']);
    if mode > 0o7777 {
        let _ = write!(out, "{mode:o}");
    } else {
        // `{mode:04o}`: four octal digits.
        out.extend((0..4).rev().map(|i| b'0' + ((mode >> (3 * i)) & 7) as u8));
    }
    out.push(b' ');
    push_u64(out, size);
    out.push(b' ');
    match hash {
        Some(h) => push_hex(out, h),
        None => out.push(b'-'),
    }
    out.push(b' ');
    escape(path, out);
    if let Some(t) = target {
        out.push(b'\t');
        escape(t, out);
    }
    if let Some(m) = mtime.filter(|_| kind == Kind::File) {
        m.push_trailer(out);
    }
    out.push(b'\n');
}

/// Reads release `id`'s full manifest.
pub fn read_release_manifest(site: &Site, id: &str) -> Result<Vec<Entry>> {
    read_manifest_file(&site.manifest_of(id))
}

/// Reads a release manifest file.
pub fn read_manifest_file(path: &Path) -> Result<Vec<Entry>> {
    let data = fs::read(path).at(path)?;
    data.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(n, l)| {
            Entry::from_line(l).ok_or_else(|| {
                Error::Failed(format!(
                    "{}:{}: unreadable manifest line",
                    path.display(),
                    n + 1
                ))
            })
        })
        .collect()
}

/// Ids of the directories in `releases/` (no hidden names).
pub fn release_dirs_on_disk(site: &Site) -> Result<BTreeSet<String>> {
    let dir = site.releases();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e).at(&dir),
    };
    let names = entries
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()
        .at(&dir)?;
    Ok(release_ids(&names))
}

/// The release ids among the names of `releases/`: what is not hidden (and is UTF-8).
pub fn release_ids<'a>(
    names: impl IntoIterator<Item = &'a std::ffi::OsString>,
) -> BTreeSet<String> {
    names
        .into_iter()
        .filter_map(|n| n.to_str())
        .filter(|n| !n.starts_with('.'))
        .map(str::to_string)
        .collect()
}

/// The first difference in content between a release's entries (`stored`) and an
/// upload's (`uploaded`), by path, in words; `None` when they describe the same content
/// (order-insensitive, mtimes aside). Said to whoever re-uploads an existing id: "different
/// content" alone left them diffing trees by hand.
pub fn first_difference(stored: &[Entry], uploaded: &[Entry]) -> Option<String> {
    let mut a: Vec<&Entry> = stored.iter().collect();
    let mut b: Vec<&Entry> = uploaded.iter().collect();
    a.sort_by(|x, y| x.path.cmp(&y.path));
    b.sort_by(|x, y| x.path.cmp(&y.path));
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        // A side that has run out is behind every path of the other.
        let order = match (a.peek(), b.peek()) {
            (None, None) => return None,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => x.path.cmp(&y.path),
        };
        let (x, y) = match order {
            std::cmp::Ordering::Less => {
                return a
                    .next()
                    .map(|x| format!("{}: not in the upload", x.path.display()))
            }
            std::cmp::Ordering::Greater => {
                return b
                    .next()
                    .map(|y| format!("{}: not in the release", y.path.display()))
            }
            std::cmp::Ordering::Equal => (a.next()?, b.next()?),
        };
        if !x.same_content(y) {
            let what = if x.kind != y.kind {
                "a different type"
            } else if x.target != y.target {
                "a different symlink target"
            } else if x.mode != y.mode {
                "a different mode"
            } else {
                "different content"
            };
            return Some(format!("{}: {what}", x.path.display()));
        }
    }
}

/// Writes the ids of the pinned releases of `state` to `.release-keeper/pins`, one per
/// line: a copy outside the journal, so a pin survives the journal's loss (pins are the
/// operator's "never delete this"; a journal rebuilt from the stored manifests would
/// otherwise make those releases prunable).
pub fn save_pins(site: &Site, state: &State) -> Result<()> {
    let mut text = String::new();
    for r in state.releases.iter().filter(|r| r.pinned) {
        text.push_str(&r.id);
        text.push('\n');
    }
    fsops::write_atomic(&site.pins_file(), text.as_bytes())
}

/// The ids `.release-keeper/pins` lists (none when it is missing or unreadable).
pub fn saved_pins(site: &Site) -> BTreeSet<String> {
    fs::read_to_string(site.pins_file())
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The manifest path helper for callers that only need to know whether it exists.
pub fn has_manifest(site: &Site, id: &str) -> bool {
    site.manifest_of(id).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, op: Op) -> Record {
        Record {
            seq,
            at: "2026-01-01T00:00:00Z".into(),
            op,
        }
    }

    fn fin(id: &str) -> Op {
        Op::Finalized {
            release: id.into(),
            files: 1,
            bytes: 1,
            activate: true,
            message: None,
            created: None,
        }
    }

    /// A rollback from `from` to `to`, as record `seq`.
    fn rolled(seq: u64, from: &str, to: &str) -> Record {
        rec(
            seq,
            Op::RolledBack {
                release: from.into(),
                to: to.into(),
                reason: "rollback requested".into(),
            },
        )
    }

    fn act(id: &str, prev: Option<&str>) -> Op {
        Op::Activated {
            release: id.into(),
            previous: prev.map(Into::into),
        }
    }

    /// Records 1-4: `a` made and activated, then `b`; then `more`.
    fn a_then_b_live(more: impl IntoIterator<Item = Record>) -> Vec<Record> {
        let mut recs = vec![
            rec(1, fin("a")),
            rec(2, act("a", None)),
            rec(3, fin("b")),
            rec(4, act("b", Some("a"))),
        ];
        recs.extend(more);
        recs
    }

    #[test]
    fn an_id_finalized_again_replaces_its_older_record() {
        let recs = vec![
            rec(1, fin("a")),
            rec(
                2,
                Op::Pinned {
                    release: "a".into(),
                },
            ),
            rec(3, fin("b")),
            rec(4, fin("a")),
        ];
        let st = State::from_records(&recs);
        let live: Vec<_> = st
            .live_newest_first()
            .map(|r| (r.id.as_str(), r.seq))
            .collect();
        assert_eq!(live, [("a", 4), ("b", 3)]);
        assert!(
            !st.get("a").is_some_and(|r| r.pinned),
            "the new release is not the pinned one"
        );
    }

    #[test]
    fn previous_skips_failed_and_rolled_back_releases() {
        let recs = a_then_b_live([
            rec(5, fin("c")),
            rec(
                6,
                Op::Failed {
                    release: "c".into(),
                    reason: "health".into(),
                },
            ),
        ]);
        let st = State::from_records(&recs);
        assert_eq!(st.previous_good(Some("b"), |_| true), Some("a".into()));
        let mut recs2 = recs.clone();
        recs2.push(rec(
            7,
            Op::RolledBack {
                release: "b".into(),
                to: "a".into(),
                reason: "manual".into(),
            },
        ));
        let st = State::from_records(&recs2);
        // Rolled back from b to a, the oldest: b was current before a and is good, so it
        // is the previous (never none while a good release could be gone back to).
        assert_eq!(st.previous_good(Some("a"), |_| true), Some("b".into()));
        assert_eq!(st.previous_good(Some("a"), |id| id != "b"), None);
        assert_eq!(st.last_good_activated(|_| true), Some("a".into()));
    }

    #[test]
    fn healing_passes_over_the_release_a_rollback_left() {
        // a, b, c live in turn; `rollback` from c to b; b then deleted by hand.
        let recs = a_then_b_live([
            rec(5, fin("c")),
            rec(6, act("c", Some("b"))),
            rolled(7, "c", "b"),
        ]);
        let st = State::from_records(&recs);
        let without_b = |id: &str| id != "b";
        assert_eq!(st.last_good_activated(without_b), Some("a".into()));
        assert_eq!(st.left_when_current_lost("d", without_b), Some("a".into()));
        // Only c left: better than nothing.
        assert_eq!(st.last_good_activated(|id| id == "c"), Some("c".into()));
        // Activated again by hand, c is no longer the release a rollback left.
        let mut again = recs.clone();
        again.push(rec(8, act("c", Some("b"))));
        let st = State::from_records(&again);
        assert_eq!(st.last_good_activated(without_b), Some("c".into()));
    }

    #[test]
    fn the_release_left_with_current_lost_is_where_healing_would_go() {
        let recs = a_then_b_live([rec(5, fin("c"))]);
        let st = State::from_records(&recs);
        assert_eq!(st.left_when_current_lost("c", |_| true), Some("b".into()));
        // `b` itself is activated again: the good release before it.
        assert_eq!(st.left_when_current_lost("b", |_| true), Some("a".into()));
        assert_eq!(
            st.left_when_current_lost("c", |id| id != "b"),
            Some("a".into())
        );
        assert_eq!(st.left_when_current_lost("c", |_| false), None);
    }

    #[test]
    fn a_missing_link_is_taken_for_the_last_switch_when_finding_previous() {
        let recs = a_then_b_live([]);
        let st = State::from_records(&recs);
        let link = st.current_and_previous(Some("b".into()), |_| true);
        assert_eq!(link, (Some("b".into()), Some("a".into())));
        assert_eq!(st.current_and_previous(None, |_| true), link);
        // The release last switched to is gone from disk too: nothing is taken for
        // current, and a is still the way back.
        assert_eq!(
            st.current_and_previous(None, |id| id != "b"),
            (None, Some("a".into()))
        );
    }

    #[test]
    fn repeated_rollbacks_step_back_then_keep_a_previous() {
        let mut recs = a_then_b_live([rec(5, fin("c")), rec(6, act("c", Some("b")))]);
        let st = State::from_records(&recs);
        assert_eq!(st.previous_good(Some("c"), |_| true), Some("b".into()));
        recs.push(rolled(7, "c", "b"));
        let st = State::from_records(&recs);
        // Again from b: further back to a, not forward to c that was just left.
        assert_eq!(st.previous_good(Some("b"), |_| true), Some("a".into()));
        recs.push(rolled(8, "b", "a"));
        let st = State::from_records(&recs);
        assert_eq!(
            st.previous_good(Some("a"), |_| true),
            Some("b".into()),
            "after two rollbacks b (current before a) is still a good release to go to"
        );
    }

    #[test]
    fn a_release_a_failed_rollback_returned_to_is_the_next_previous() {
        let recs = vec![
            rec(1, fin("z")),
            rec(2, act("z", None)),
            rec(3, fin("a")),
            rec(4, act("a", Some("z"))),
            rec(5, fin("b")),
            rec(6, act("b", Some("a"))),
            // `rollback` to a, whose health check fails: a is marked failed and current
            // returns to b.
            rolled(7, "b", "a"),
            rec(
                8,
                Op::Failed {
                    release: "a".into(),
                    reason: "health".into(),
                },
            ),
            rolled(9, "a", "b"),
            rec(10, fin("c")),
            rec(11, act("c", Some("b"))),
        ];
        let st = State::from_records(&recs);
        assert_eq!(
            st.previous_good(Some("c"), |_| true),
            Some("b".into()),
            "b was current right before c, not z"
        );
    }

    #[test]
    fn only_the_last_switch_is_settled_and_a_hand_switch_leaves_it() {
        let recs = vec![rec(1, fin("a")), rec(2, act("a", None)), rec(3, fin("b"))];
        let st = State::from_records(&recs);
        assert!(st.is_settled_current("a"));
        // b staged, then made current by hand: not settled, and it leaves a.
        assert!(!st.is_settled_current("b"));
        assert_eq!(st.switched_from("b", |_| true), Some("a".into()));
        assert_eq!(st.switched_from("a", |_| true), None);
        let mut recs = recs;
        recs.push(rec(
            4,
            Op::Failed {
                release: "a".into(),
                reason: "health".into(),
            },
        ));
        let st = State::from_records(&recs);
        assert!(
            !st.is_settled_current("a"),
            "a failed release is never settled"
        );
    }

    #[test]
    fn open_trial_is_detected_and_closed_by_verdict() {
        let trial = Op::Trial {
            release: "b".into(),
            previous: Some("a".into()),
            rollback: false,
        };
        let st = State::from_records(&[rec(1, fin("b")), rec(2, trial.clone())]);
        assert_eq!(
            st.open_trial,
            Some(OpenTrial {
                release: "b".into(),
                previous: Some("a".into()),
                rollback: false
            })
        );
        let st = State::from_records(&[rec(1, fin("b")), rec(2, trial), rec(3, act("b", None))]);
        assert_eq!(st.open_trial, None);
    }

    #[test]
    fn a_rollback_trial_closed_before_its_switch_leaves_the_state_as_it_was() {
        let before = State::from_records(&a_then_b_live([]));
        let recs = a_then_b_live([
            rec(
                5,
                Op::Trial {
                    release: "a".into(),
                    previous: Some("b".into()),
                    rollback: true,
                },
            ),
            rec(
                6,
                Op::TrialClosed {
                    release: "a".into(),
                    reason: "interrupted before the switch".into(),
                },
            ),
        ]);
        let st = State::from_records(&recs);
        assert_eq!(st.open_trial, None);
        assert_eq!(st.history, before.history, "no switch recorded");
        let a = st.get("a").unwrap();
        assert!(
            !a.rolled_back && a.failed.is_none(),
            "a is untouched: {a:?}"
        );
        assert_eq!(
            st.previous_good(Some("b"), |_| true),
            Some("a".into()),
            "a is still what a rollback goes back to"
        );
        // A close naming another release leaves the open trial alone.
        let mut other = recs[..5].to_vec();
        other.push(rec(
            6,
            Op::TrialClosed {
                release: "c".into(),
                reason: "x".into(),
            },
        ));
        assert!(State::from_records(&other).open_trial.is_some());
    }

    #[test]
    fn manifest_lines_round_trip_awkward_names() {
        let e = Entry {
            path: fsops::path_from_bytes(b"a b/\\x\n\t\xff.txt".to_vec()),
            kind: Kind::Symlink,
            mode: 0o777,
            size: 0,
            hash: None,
            target: Some(PathBuf::from("../c d")),
            mtime: None,
        };
        let mut buf = Vec::new();
        e.to_line(&mut buf);
        assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(Entry::from_line(&buf[..buf.len() - 1]), Some(e));
        let f = Entry {
            path: PathBuf::from("x"),
            kind: Kind::File,
            mode: 0o444,
            size: 3,
            hash: Some([7u8; 32]),
            target: None,
            mtime: Some(Mtime {
                secs: 1_733_212_345,
                nsecs: 1_500,
            }),
        };
        let mut buf = Vec::new();
        f.to_line(&mut buf);
        assert!(
            buf.ends_with(b" x\tmtime=1733212345.000001500\n"),
            "{buf:?}"
        );
        assert_eq!(Entry::from_line(&buf[..buf.len() - 1]), Some(f.clone()));
        // A line of an older version, without the mtime, still reads.
        let old = format!("f 0444 3 {} x", "07".repeat(32));
        let e = Entry::from_line(old.as_bytes()).expect("old line");
        assert_eq!(
            e,
            Entry {
                mtime: None,
                ..f.clone()
            }
        );
        assert_eq!(
            parse_file_fields(old.as_bytes()).map(|f| f.mtime),
            Some(None)
        );
        // Its content is all that counts for an identical re-upload.
        assert_eq!(
            first_difference(std::slice::from_ref(&f), std::slice::from_ref(&e)),
            None
        );
        let other = Entry {
            path: PathBuf::from("y"),
            ..e.clone()
        };
        let bigger = Entry {
            size: 4,
            hash: Some([8; 32]),
            ..e.clone()
        };
        let wider = Entry {
            mode: 0o555,
            ..e.clone()
        };
        let diff = |a: &[Entry], b: &[Entry]| first_difference(a, b).unwrap_or_default();
        assert_eq!(diff(std::slice::from_ref(&e), &[]), "x: not in the upload");
        assert_eq!(
            diff(std::slice::from_ref(&e), &[e.clone(), other]),
            "y: not in the release"
        );
        assert_eq!(
            diff(std::slice::from_ref(&e), &[bigger]),
            "x: different content"
        );
        assert_eq!(
            diff(std::slice::from_ref(&e), &[wider]),
            "x: a different mode"
        );
        // A trailer that is not a well-formed mtime makes the line unreadable.
        for bad in [
            "\tmtime=1.5",
            "\tmtime=x.000000001",
            "\tsize=3",
            "\tmtime=1",
        ] {
            let line = format!("{old}{bad}");
            assert_eq!(Entry::from_line(line.as_bytes()), None, "{bad}");
            assert_eq!(parse_file_fields(line.as_bytes()), None, "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn numbers_round_trip_like_display(u in proptest::num::u64::ANY, i in proptest::num::i64::ANY) {
            let mut out = Vec::new();
            push_u64(&mut out, u);
            proptest::prop_assert_eq!(String::from_utf8(out.clone()).ok(), Some(u.to_string()));
            proptest::prop_assert_eq!(parse_u64(&out), Some(u));
            out.clear();
            push_i64(&mut out, i);
            proptest::prop_assert_eq!(String::from_utf8(out.clone()).ok(), Some(i.to_string()));
            proptest::prop_assert_eq!(parse_i64(&out), Some(i));
        }

        #[test]
        fn lines_round_trip_with_any_path(path in proptest::collection::vec(1u8..=255, 1..40), mode in 0u32..0o10000, size in proptest::num::u64::ANY, secs in proptest::num::i64::ANY, nsecs in 0i64..1_000_000_000, with_mtime in proptest::bool::ANY) {
            let p = fsops::path_from_bytes(path.clone());
            let hash = [7u8; 32];
            let mtime = with_mtime.then_some(Mtime { secs, nsecs });
            let mut line = Vec::new();
            format_line(&mut line, Kind::File, mode, size, Some(&hash), &p, None, mtime);
            let text = &line[..line.len() - 1];
            let e = Entry::from_line(text).expect("parses");
            proptest::prop_assert_eq!((e.mode, e.size, e.hash, &e.path, e.mtime), (mode, size, Some(hash), &p, mtime));
            let f = parse_file_fields(text).expect("file fields");
            proptest::prop_assert_eq!((f.mode, f.size, f.digest, f.mtime), (mode, size, hash, mtime));
            let mut back = Vec::new();
            proptest::prop_assert!(unescape_path_into(f.path, &mut back).is_some());
            proptest::prop_assert_eq!(back, path);
        }
    }

    #[test]
    fn bad_numbers_and_non_file_lines_are_refused() {
        for bad in [&b""[..], b"-", b"1a", b" 1", b"99999999999999999999", b"+1"] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        assert_eq!(parse_file_fields(b"d 0555 0 - dir"), None);
        assert_eq!(parse_file_fields(b"f 0444 3 zz x"), None);
    }
}
