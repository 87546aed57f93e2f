//! Hostile uploads (issue 5). Uploaders are the least trusted party: whatever they drop
//! into `deploy-cache/`, the keeper must never read, write, follow or expose anything
//! outside the site root, never publish a release that differs from its manifest, and
//! always answer with a clear rejection.
//!
//! Every corpus case asserts:
//! - the rejection is logged (`release.rejected`) with a `reason` naming what is wrong;
//! - `current` and the live release are unchanged, no release, `.partial.*`, temporary
//!   name, claim or marker is left behind, and nothing new appears in the site root;
//! - nothing outside the site root was read or written: a sentinel tree beside the root
//!   has its atimes set 3 days back (older than its mtimes, so that even under `relatime`
//!   any read or readdir would advance them), and its contents and listing are compared.
//!
//! The corpus runs in groups, one service per group; a failing case is recorded and the
//! group goes on, so one run reports every failing case.
mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, FileTimes};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use release_keeper::upload::manifest::{format_line, hash_reader, Digest};
use serde_json::Value;

const SITE: &str = "web";
/// The sentinel's content. It is also a valid marker naming release `stolen`, so a keeper
/// that followed a symlinked marker to it would visibly make that release.
const SECRET: &[u8] = b"id = \"stolen\"\n# sentinel outside the site root: never to be read\n";
const DAY: Duration = Duration::from_secs(86_400);
/// Bound for one case's outcome.
const OUTCOME_WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Helpers: digests, manifests, raw trees
// ---------------------------------------------------------------------------

fn digest(bytes: &[u8]) -> Digest {
    hash_reader(&mut &bytes[..]).expect("hash").0
}

/// One GNU `sha256sum` line for raw path bytes holding `content`.
fn line(path: &[u8], content: &[u8]) -> Vec<u8> {
    format_line(Path::new(OsStr::from_bytes(path)), &digest(content))
}

/// Writes `dir/SHA256SUMS` with exactly `text`.
fn write_manifest(dir: &Path, text: &[u8]) {
    fs::write(dir.join(MANIFEST), text).unwrap();
}

/// The ordinary part of every hostile upload.
const BASE: &[(&str, &[u8])] = &[
    ("index.html", b"<h1>hostile</h1>\n"),
    ("assets/app.js", b"console.log('hostile');\n"),
];

/// Manifest lines for [`BASE`].
fn base_lines() -> Vec<u8> {
    BASE.iter()
        .flat_map(|(p, c)| line(p.as_bytes(), c))
        .collect()
}

/// Writes [`BASE`] into `dc`.
fn put_base(dc: &Path) {
    write_tree(dc, BASE);
}

/// Every entry under `dir` (symlinks not followed) by raw relative path bytes.
fn raw_tree(dir: &Path) -> BTreeMap<Vec<u8>, Entry> {
    fn walk(base: &Path, p: &Path, out: &mut BTreeMap<Vec<u8>, Entry>) {
        let mut names: Vec<_> = fs::read_dir(p)
            .unwrap_or_else(|e| panic!("read_dir {p:?}: {e}"))
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for path in names {
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let ft = fs::symlink_metadata(&path).unwrap().file_type();
            if ft.is_symlink() {
                out.insert(rel, Entry::Link(fs::read_link(&path).unwrap()));
            } else if ft.is_dir() {
                out.insert(rel, Entry::Dir);
                walk(base, &path, out);
            } else if ft.is_file() {
                out.insert(rel, Entry::File(fs::read(&path).unwrap()));
            } else {
                out.insert(rel, Entry::Other);
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

/// Relative paths under `dir` (symlinks not followed), without reading any file.
fn listing(dir: &Path) -> Vec<Vec<u8>> {
    fn walk(base: &Path, p: &Path, out: &mut Vec<Vec<u8>>) {
        let Ok(rd) = fs::read_dir(p) else { return };
        for e in rd.flatten() {
            let path = e.path();
            out.push(
                path.strip_prefix(base)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            );
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(base, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Top-level names of `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
}

/// `mknod` of a device; false when not permitted (not root).
fn mknod(p: &Path, kind: nix::sys::stat::SFlag, major: u64, minor: u64) -> bool {
    nix::sys::stat::mknod(
        p,
        kind,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        nix::sys::stat::makedev(major, minor),
    )
    .is_ok()
}

/// Opens directory `name` relative to `at` without following symlinks.
fn open_dir<Fd: std::os::fd::AsFd>(at: Fd, name: &Path) -> std::os::fd::OwnedFd {
    use nix::fcntl::OFlag;
    nix::fcntl::openat(
        at,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", name.display()))
}

/// Drops a marker holding `content` atomically (written aside, then renamed into place):
/// a marker written in place can be claimed before its content is there (a keeper bug,
/// see `marker_still_being_written_is_not_claimed`), which would make these tests flaky.
fn drop_marker(site: &Site, content: &str) {
    let staging = site.tmp_path("marker.staging");
    fs::write(&staging, content).unwrap();
    fs::rename(&staging, site.marker_path()).unwrap();
}

/// Stages `small_build("v1")` and drops its marker (`id = "v1"`).
fn deploy_v1(site: &Site) {
    site.stage_upload(&as_refs(&small_build("v1")));
    drop_marker(site, "id = \"v1\"\n");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

// ---------------------------------------------------------------------------
// The sentinel: a tree outside the site root that must never be read or written
// ---------------------------------------------------------------------------

struct Sentinel {
    /// `<tmp>/outside`.
    dir: PathBuf,
    /// The site's temp dir (holds the root, the sentinel, the config, scratch space).
    tmp: PathBuf,
    /// Watched paths and, for files, their content.
    watched: Vec<(PathBuf, Option<Vec<u8>>)>,
    atimes: Vec<SystemTime>,
    listing: Vec<Vec<u8>>,
    tmp_names: Vec<String>,
}

impl Sentinel {
    /// Creates `<tmp>/outside/{secret.txt, sub/inner.txt}` plus `extra` files (relative to
    /// `outside/`), and arms it: every file written and every directory above one is watched.
    fn new(site: &Site, extra: &[(&str, &[u8])]) -> Sentinel {
        let tmp = site.tmp.path().to_path_buf();
        fs::create_dir_all(tmp.join("scratch")).unwrap();
        let dir = tmp.join("outside");
        let mut files: Vec<(&str, &[u8])> = vec![("secret.txt", SECRET), ("sub/inner.txt", SECRET)];
        files.extend_from_slice(extra);
        write_tree(&dir, &files);
        let mut watched: Vec<(PathBuf, Option<Vec<u8>>)> = vec![(dir.clone(), None)];
        for (rel, content) in &files {
            let p = dir.join(rel);
            let mut parent = p.parent();
            while let Some(d) = parent {
                if d.starts_with(&tmp) && d != tmp && !watched.iter().any(|(w, _)| w == d) {
                    watched.push((d.to_path_buf(), None));
                }
                parent = d.parent();
            }
            watched.push((p, Some(content.to_vec())));
        }
        let mut s = Sentinel {
            dir,
            tmp,
            watched,
            atimes: Vec::new(),
            listing: Vec::new(),
            tmp_names: Vec::new(),
        };
        s.arm();
        s
    }

    fn secret(&self) -> PathBuf {
        self.dir.join("secret.txt")
    }

    /// Sets every watched atime 3 days back (mtimes stay recent) and records the state.
    fn arm(&mut self) {
        // Listing reads the directories: first, before their atimes are set back.
        self.listing = listing(&self.dir);
        self.tmp_names = names(&self.tmp);
        let past = SystemTime::now() - 3 * DAY;
        self.atimes = self
            .watched
            .iter()
            .map(|(p, _)| {
                File::open(p)
                    .and_then(|f| f.set_times(FileTimes::new().set_accessed(past)))
                    .unwrap_or_else(|e| panic!("arming sentinel {p:?}: {e}"));
                fs::metadata(p).unwrap().accessed().unwrap()
            })
            .collect();
    }

    /// Checks that nothing was read (atimes), written (contents, listings) or created
    /// beside the root, then re-arms (the check itself reads the contents).
    fn check(&mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        for ((p, _), before) in self.watched.iter().zip(&self.atimes) {
            let now = fs::metadata(p).unwrap().accessed().unwrap();
            if now != *before {
                problems.push(format!("{} was read (atime advanced)", p.display()));
            }
        }
        for (p, content) in &self.watched {
            if let Some(c) = content {
                if fs::read(p).ok().as_ref() != Some(c) {
                    problems.push(format!("{} was modified", p.display()));
                }
            }
        }
        if listing(&self.dir) != self.listing {
            problems.push(format!("entries under {} changed", self.dir.display()));
        }
        let tmp_names = names(&self.tmp);
        if tmp_names != self.tmp_names {
            problems.push(format!(
                "entries beside the site root changed: {:?} -> {tmp_names:?}",
                self.tmp_names
            ));
        }
        self.arm();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

// ---------------------------------------------------------------------------
// The corpus runner
// ---------------------------------------------------------------------------

/// How a case drops its marker.
enum Marker<'a> {
    /// A plain write, like `echo ... > .release-ready`.
    Text(&'a [u8]),
    /// A symlink renamed into place.
    Symlink(PathBuf),
    /// A fifo renamed into place.
    Fifo,
    /// A directory renamed into place.
    Dir,
    /// A sparse file of this size renamed into place.
    Sparse(u64),
}

/// The marker for an explicit id.
fn id_marker(id: &str) -> Vec<u8> {
    format!("id = \"{id}\"\n").into_bytes()
}

/// What one upload ended in, from the log.
#[derive(Debug)]
#[allow(dead_code)] // the events are there for the failure messages
enum Outcome {
    Rejected(Value),
    Finalized(Value),
    Error(Value),
    Timeout,
}

/// Waits for the first outcome logged after line `from`.
fn wait_outcome(svc: &Service, from: usize, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    loop {
        for v in svc.json_lines().into_iter().skip(from) {
            match v.get("event").and_then(Value::as_str) {
                Some("release.rejected") => return Outcome::Rejected(v),
                Some("release.finalized") => return Outcome::Finalized(v),
                _ if v.get("level").and_then(Value::as_str) == Some("ERROR") => {
                    return Outcome::Error(v)
                }
                _ => {}
            }
        }
        if Instant::now() >= deadline || !svc.is_running() {
            return Outcome::Timeout;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What must not change across a rejected upload.
#[derive(Debug, PartialEq)]
struct Snapshot {
    current: Option<PathBuf>,
    releases: Vec<String>,
    root: Vec<String>,
    shared: Vec<Vec<u8>>,
    live: BTreeMap<Vec<u8>, Entry>,
}

struct Corpus {
    site: Site,
    svc: Service,
    sentinel: Sentinel,
    failures: Vec<String>,
    cases: usize,
}

impl Corpus {
    /// Starts site `web` with extra `[defaults]` and site lines, activates `v1`, arms the sentinel.
    fn start(defaults: &str, site_extra: &str) -> Corpus {
        Corpus::start_with(defaults, site_extra, &[])
    }

    fn start_with(defaults: &str, site_extra: &str, outside: &[(&str, &[u8])]) -> Corpus {
        let site = Site::new();
        let cfg = site.write_config(SITE, defaults, site_extra);
        let svc = Service::start_config(&cfg);
        deploy_v1(&site);
        svc.wait_release_event("release.activated", "v1");
        let sentinel = Sentinel::new(&site, outside);
        Corpus {
            site,
            svc,
            sentinel,
            failures: Vec::new(),
            cases: 0,
        }
    }

    fn dc(&self) -> PathBuf {
        self.site.deploy_cache()
    }

    /// The sentinel directory, for cases that aim at it.
    fn outside(&self) -> PathBuf {
        self.sentinel.dir.clone()
    }

    fn snapshot(&self) -> Snapshot {
        let current = self.site.current_target();
        let live = current
            .as_ref()
            .map(|t| raw_tree(&self.site.root.join(t)))
            .unwrap_or_default();
        Snapshot {
            current,
            releases: self.site.releases_entries(),
            root: names(&self.site.root),
            shared: listing(&self.site.root.join("shared")),
            live,
        }
    }

    /// Drops the marker: made in scratch space and renamed in, so the keeper never sees it
    /// half-written (see `marker_still_being_written_is_not_claimed`).
    fn drop_marker(&self, m: Marker<'_>) {
        let dest = self.site.marker_path();
        let staging = self.site.tmp_path("scratch/marker");
        match m {
            Marker::Text(t) => fs::write(&staging, t).unwrap(),
            Marker::Symlink(target) => symlink(target, &staging).unwrap(),
            Marker::Fifo => mkfifo(&staging),
            Marker::Dir => fs::create_dir(&staging).unwrap(),
            Marker::Sparse(n) => File::create(&staging).unwrap().set_len(n).unwrap(),
        }
        fs::rename(&staging, &dest).unwrap();
    }

    /// One hostile case: empties `deploy-cache/`, lets `stage` fill it, drops `marker`,
    /// and expects a rejection of `id` (`None`: the marker itself is rejected) whose reason
    /// contains every string of `want`; then checks that nothing changed anywhere.
    fn reject(
        &mut self,
        name: &str,
        id: Option<&str>,
        stage: impl FnOnce(&Path),
        marker: Marker<'_>,
        want: &[&str],
    ) {
        self.cases += 1;
        clear_dir(&self.dc());
        stage(&self.dc());
        let before = self.snapshot();
        let raw_before = raw_lines(&self.svc);
        let from = self.svc.json_lines().len();
        self.drop_marker(marker);
        let outcome = wait_outcome(&self.svc, from, OUTCOME_WAIT);
        let mut problems = Vec::new();
        match &outcome {
            Outcome::Rejected(ev) => {
                let reason = reason_of(ev);
                eprintln!("case {name}: rejected: {reason}");
                if reason.len() > 4096 {
                    problems.push(format!("reason is {} bytes long", reason.len()));
                }
                for w in want {
                    if !reason.contains(w) {
                        problems.push(format!("reason lacks {w:?}: {reason:?}"));
                    }
                }
                let logged = release_of(ev).unwrap_or("");
                if logged != id.unwrap_or("") {
                    problems.push(format!("rejection logged for release {logged:?}"));
                }
            }
            other => problems.push(format!("expected a rejection, got {other:?}")),
        }
        // Let anything that would follow (an activation, a retry) show up.
        thread::sleep(Duration::from_millis(50));
        let later: Vec<Value> = self.svc.json_lines().into_iter().skip(from).collect();
        for ev in ["release.finalized", "release.activated"] {
            if later.iter().any(|v| v["event"] == ev) {
                problems.push(format!("{ev} logged for a hostile upload"));
            }
        }
        if raw_lines(&self.svc) != raw_before {
            problems.push("the service wrote a non-JSON log line".into());
        }
        let after = self.snapshot();
        if after != before {
            if after.current != before.current {
                problems.push(format!(
                    "current changed: {:?} -> {:?}",
                    before.current, after.current
                ));
            }
            if after.releases != before.releases {
                problems.push(format!(
                    "releases/ changed: {:?} -> {:?}",
                    before.releases, after.releases
                ));
            }
            if after.root != before.root {
                problems.push(format!(
                    "site root entries changed: {:?} -> {:?}",
                    before.root, after.root
                ));
            }
            if after.shared != before.shared {
                problems.push("shared/ changed".into());
            }
            if after.live != before.live {
                problems.push("the live release changed".into());
            }
        }
        problems.extend(leftovers(&self.site));
        if let Err(e) = self.sentinel.check() {
            problems.push(format!("outside the root: {e}"));
        }
        if !problems.is_empty() {
            self.failures
                .push(format!("case {name}:\n    {}", problems.join("\n    ")));
        }
        clear_dir(&self.dc());
    }

    /// Stops the service and fails with every failing case.
    fn finish(mut self) {
        self.svc.stop();
        assert!(
            self.failures.is_empty(),
            "{} of {} hostile cases failed:\n{}\n\nlog:\n{}",
            self.failures.len(),
            self.cases,
            self.failures.join("\n"),
            self.svc.log_text()
        );
    }
}

/// Non-JSON lines of the service log so far.
fn raw_lines(svc: &Service) -> usize {
    svc.log_text()
        .lines()
        .filter(|l| l.starts_with("RAW: "))
        .count()
}

/// Half-done state the keeper must never leave: partial releases, temporary names,
/// claims, trash, the marker.
fn leftovers(site: &Site) -> Vec<String> {
    // A rejection is logged (and journaled) before its claim is removed, since the claim
    // is the upload's only trace until then: the removal may follow the event a moment
    // later, so a claim still there is only a leftover once this bounded wait is over.
    let claims = site.root.join(".release-keeper/claims");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !names(&claims).is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let mut out = Vec::new();
    for n in site.hidden_release_entries() {
        out.push(format!("left behind in releases/: {n}"));
    }
    for n in names(&site.root) {
        if n.starts_with(".rk-tmp") {
            out.push(format!("left behind in the root: {n}"));
        }
    }
    for d in ["claims", "trash"] {
        let n = names(&site.root.join(".release-keeper").join(d));
        if !n.is_empty() {
            out.push(format!("left behind in .release-keeper/{d}: {n:?}"));
        }
    }
    if fs::symlink_metadata(site.marker_path()).is_ok() {
        out.push("the marker was not consumed".into());
    }
    out
}

// ---------------------------------------------------------------------------
// Corpus: symlinks, special files, marker and manifest of the wrong type
// ---------------------------------------------------------------------------

#[test]
fn hostile_links_and_special_files_are_rejected() {
    let mut c = Corpus::start("", "");
    let outside = c.outside();
    let secret = c.sentinel.secret();
    let sums = |dc: &Path| write_manifest(dc, &base_lines());

    c.reject(
        "absolute symlink to a file outside",
        Some("h-abs-link"),
        |dc| {
            put_base(dc);
            symlink(&secret, dc.join("evil")).unwrap();
            sums(dc);
        },
        Marker::Text(&id_marker("h-abs-link")),
        &["evil", "absolute"],
    );
    c.reject(
        "absolute symlink inside the tree",
        Some("h-abs-link-in-tree"),
        |dc| {
            put_base(dc);
            // Absolute even though it names a file of the upload itself.
            symlink(dc.join("index.html"), dc.join("assets/home")).unwrap();
            sums(dc);
        },
        Marker::Text(&id_marker("h-abs-link-in-tree")),
        &["assets/home", "absolute"],
    );
    c.reject(
        "relative symlink climbing out to the sentinel",
        Some("h-rel-escape"),
        |dc| {
            put_base(dc);
            // From releases/<id>/evil, ../../../outside is the sentinel.
            symlink("../../../outside/secret.txt", dc.join("evil")).unwrap();
            sums(dc);
        },
        Marker::Text(&id_marker("h-rel-escape")),
        &["evil", "outside the release"],
    );
    c.reject(
        "deep relative symlink climbing out",
        Some("h-deep-escape"),
        |dc| {
            put_base(dc);
            write_symlink(dc, "a/b/c/evil", "../../../../../../outside/secret.txt");
            sums(dc);
        },
        Marker::Text(&id_marker("h-deep-escape")),
        &["a/b/c/evil", "outside the release"],
    );
    c.reject(
        "symlink that climbs out through an in-tree '.' link",
        Some("h-dot-escape"),
        |dc| {
            put_base(dc);
            symlink(".", dc.join("dot")).unwrap();
            // Lexically dot/.. is the release itself; really it is releases/.
            symlink("dot/../../../outside/secret.txt", dc.join("evil")).unwrap();
            sums(dc);
        },
        Marker::Text(&id_marker("h-dot-escape")),
        &["evil", "outside the release"],
    );
    c.reject(
        "symlink that climbs out through an in-tree directory link",
        Some("h-dirlink-escape"),
        |dc| {
            put_base(dc);
            write_symlink(dc, "deep", "assets");
            // deep/.. is the release root, deep/../.. is releases/.
            write_symlink(dc, "assets/evil", "../deep/../../outside");
            sums(dc);
        },
        Marker::Text(&id_marker("h-dirlink-escape")),
        &["assets/evil", "outside the release"],
    );
    c.reject(
        "symlinked directory to the outside, with its files in the manifest",
        Some("h-abs-dir-link"),
        |dc| {
            put_base(dc);
            symlink(&outside, dc.join("data")).unwrap();
            let mut m = base_lines();
            m.extend(line(b"data/secret.txt", SECRET));
            m.extend(line(b"data/sub/inner.txt", SECRET));
            write_manifest(dc, &m);
        },
        Marker::Text(&id_marker("h-abs-dir-link")),
        &["data"],
    );
    c.reject(
        "relative symlinked directory to the outside",
        Some("h-rel-dir-link"),
        |dc| {
            put_base(dc);
            symlink("../../../outside", dc.join("data")).unwrap();
            sums(dc);
        },
        Marker::Text(&id_marker("h-rel-dir-link")),
        &["data", "outside the release"],
    );
    c.reject(
        "symlink loop",
        Some("h-link-loop"),
        |dc| {
            put_base(dc);
            symlink("loop2", dc.join("loop1")).unwrap();
            symlink("loop1", dc.join("loop2")).unwrap();
            sums(dc);
        },
        Marker::Text(&id_marker("h-link-loop")),
        &["loop"],
    );
    c.reject(
        "fifo",
        Some("h-fifo"),
        |dc| {
            put_base(dc);
            mkfifo(&dc.join("assets/pipe"));
            sums(dc);
        },
        Marker::Text(&id_marker("h-fifo")),
        &["assets/pipe", "fifo"],
    );
    c.reject(
        "unix socket",
        Some("h-socket"),
        |dc| {
            put_base(dc);
            // Bound, then the listener is dropped: the socket file stays.
            std::os::unix::net::UnixListener::bind(dc.join("sock")).unwrap();
            sums(dc);
        },
        Marker::Text(&id_marker("h-socket")),
        &["sock", "socket"],
    );
    if is_root() {
        c.reject(
            "character device (a copy of /dev/null)",
            Some("h-chardev"),
            |dc| {
                put_base(dc);
                assert!(mknod(
                    &dc.join("null"),
                    nix::sys::stat::SFlag::S_IFCHR,
                    1,
                    3
                ));
                sums(dc);
            },
            Marker::Text(&id_marker("h-chardev")),
            &["null", "character device"],
        );
        c.reject(
            "block device",
            Some("h-blockdev"),
            |dc| {
                put_base(dc);
                assert!(mknod(
                    &dc.join("assets/disk"),
                    nix::sys::stat::SFlag::S_IFBLK,
                    7,
                    0
                ));
                sums(dc);
            },
            Marker::Text(&id_marker("h-blockdev")),
            &["assets/disk", "block device"],
        );
    } else {
        eprintln!("device-file cases skipped: mknod needs root");
    }
    c.reject(
        "marker is a symlink to a valid marker outside",
        None,
        |dc| {
            put_base(dc);
            sums(dc);
        },
        Marker::Symlink(secret.clone()),
        &["symlink"],
    );
    c.reject(
        "marker is a fifo (must not hang the keeper)",
        None,
        |dc| {
            put_base(dc);
            sums(dc);
        },
        Marker::Fifo,
        &["not a regular file"],
    );
    c.reject(
        "marker is a directory",
        None,
        |dc| {
            put_base(dc);
            sums(dc);
        },
        Marker::Dir,
        &["not a regular file"],
    );
    c.reject(
        "manifest is a symlink to a file outside",
        Some("h-manifest-link"),
        |dc| {
            put_base(dc);
            symlink(&secret, dc.join(MANIFEST)).unwrap();
        },
        Marker::Text(&id_marker("h-manifest-link")),
        &[MANIFEST, "symlink"],
    );
    c.reject(
        "manifest is a fifo (must not hang the keeper)",
        Some("h-manifest-fifo"),
        |dc| {
            put_base(dc);
            mkfifo(&dc.join(MANIFEST));
        },
        Marker::Text(&id_marker("h-manifest-fifo")),
        &[MANIFEST, "not a regular file"],
    );
    c.reject(
        "manifest is a directory",
        Some("h-manifest-dir"),
        |dc| {
            put_base(dc);
            fs::create_dir(dc.join(MANIFEST)).unwrap();
        },
        Marker::Text(&id_marker("h-manifest-dir")),
        &[MANIFEST, "not a regular file"],
    );
    c.finish();
}

// ---------------------------------------------------------------------------
// Corpus: manifest paths and content
// ---------------------------------------------------------------------------

#[test]
fn hostile_manifests_are_rejected() {
    let mut c = Corpus::start("", "");
    let secret = c.sentinel.secret();
    let abs_secret = secret.as_os_str().as_bytes().to_vec();

    // Each: a manifest that is valid for BASE plus one hostile line.
    let unsafe_lines: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "'..' reaching the sentinel",
            line(b"../../../outside/secret.txt", SECRET),
            vec!["line 3", "'..' component"],
        ),
        (
            "'..' in the middle",
            line(b"assets/../../x", b""),
            vec!["line 3", "'..' component"],
        ),
        (
            "absolute path of the sentinel",
            line(&abs_secret, SECRET),
            vec!["line 3", "absolute path"],
        ),
        (
            "empty path",
            [
                &b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  "[..],
                b"\n",
            ]
            .concat(),
            vec!["line 3", "empty path"],
        ),
        (
            "empty component",
            line(b"assets//app.js", b""),
            vec!["line 3", "empty component"],
        ),
        (
            "'.' component",
            line(b"assets/./app.js", b""),
            vec!["line 3", "'.' component"],
        ),
        (
            "NUL byte",
            line(b"index.html\0.jpg", b""),
            vec!["line 3", "NUL"],
        ),
        (
            "trailing slash",
            line(b"assets/", b""),
            vec!["line 3", "trailing slash"],
        ),
        (
            "escaped-form absolute path",
            line(&[&abs_secret[..], b"\\x"].concat(), SECRET),
            vec!["line 3", "absolute path"],
        ),
        (
            "BSD-form '..'",
            format!(
                "SHA256 (../../../outside/secret.txt) = {}\n",
                release_keeper::upload::manifest::to_hex(&digest(SECRET))
            )
            .into_bytes(),
            vec!["line 3", "'..' component"],
        ),
    ];
    for (i, (name, bad, want)) in unsafe_lines.into_iter().enumerate() {
        let id = format!("h-path-{i}");
        c.reject(
            &format!("manifest path: {name}"),
            Some(&id),
            |dc| {
                put_base(dc);
                write_manifest(dc, &[base_lines(), bad].concat());
            },
            Marker::Text(&id_marker(&id)),
            &[&[MANIFEST][..], &want[..]].concat(),
        );
    }

    c.reject(
        "duplicate entry, other digest",
        Some("h-dup-other"),
        |dc| {
            put_base(dc);
            let m = [base_lines(), line(b"index.html", b"other")].concat();
            write_manifest(dc, &m);
        },
        Marker::Text(&id_marker("h-dup-other")),
        &[
            MANIFEST,
            "duplicate entry \"index.html\" with another hash",
            "line 3",
            "line 1",
        ],
    );
    c.reject(
        "duplicate entry through a './' prefix, other digest",
        Some("h-dup-dot"),
        |dc| {
            put_base(dc);
            let m = [base_lines(), line(b"./assets/app.js", b"other")].concat();
            write_manifest(dc, &m);
        },
        Marker::Text(&id_marker("h-dup-dot")),
        &[MANIFEST, "duplicate entry \"assets/app.js\""],
    );
    c.reject(
        "malformed line",
        Some("h-malformed"),
        |dc| {
            put_base(dc);
            write_manifest(
                dc,
                &[base_lines(), b"not a checksum line\n".to_vec()].concat(),
            );
        },
        Marker::Text(&id_marker("h-malformed")),
        &[MANIFEST, "line 3", "malformed"],
    );
    c.reject(
        "bad escape",
        Some("h-bad-escape"),
        |dc| {
            put_base(dc);
            let hex = release_keeper::upload::manifest::to_hex(&digest(b""));
            let bad = format!("\\{hex}  a\\tb\n").into_bytes();
            write_manifest(dc, &[base_lines(), bad].concat());
        },
        Marker::Text(&id_marker("h-bad-escape")),
        &[MANIFEST, "line 3", "bad escape"],
    );
    c.reject(
        "manifest over the size limit (sparse)",
        Some("h-huge-manifest"),
        |dc| {
            put_base(dc);
            let f = File::create(dc.join(MANIFEST)).unwrap();
            f.set_len(release_keeper::upload::manifest::MAX_MANIFEST_BYTES + 1)
                .unwrap();
        },
        Marker::Text(&id_marker("h-huge-manifest")),
        &[MANIFEST, "larger than"],
    );
    c.reject(
        "manifest listing 50000 missing files: the reason stays short",
        Some("h-many-missing"),
        |dc| {
            put_base(dc);
            let mut m = base_lines();
            for i in 0..50_000 {
                m.extend(line(format!("missing/{i:05}.js").as_bytes(), b""));
            }
            write_manifest(dc, &m);
        },
        Marker::Text(&id_marker("h-many-missing")),
        &[
            "missing/00000.js",
            "listed in SHA256SUMS but missing",
            "more",
        ],
    );
    c.reject(
        "manifest lists a directory",
        Some("h-lists-dir"),
        |dc| {
            put_base(dc);
            write_manifest(dc, &[base_lines(), line(b"assets", b"")].concat());
        },
        Marker::Text(&id_marker("h-lists-dir")),
        &["assets", "is a directory"],
    );
    c.reject(
        "manifest lists a symlink instead of its target",
        Some("h-lists-link"),
        |dc| {
            put_base(dc);
            symlink("index.html", dc.join("home.html")).unwrap();
            write_manifest(dc, &[base_lines(), line(b"home.html", BASE[0].1)].concat());
        },
        Marker::Text(&id_marker("h-lists-link")),
        &["home.html", "is a symlink"],
    );
    c.reject(
        "manifest names files through an in-tree directory symlink",
        Some("h-via-link"),
        |dc| {
            write_tree(dc, &[("real/app.js", b"x")]);
            symlink("real", dc.join("alias")).unwrap();
            write_manifest(dc, &line(b"alias/app.js", b"x"));
        },
        Marker::Text(&id_marker("h-via-link")),
        &[
            "real/app.js",
            "not listed",
            "alias/app.js",
            "alias is a symlink in the upload (-> real)",
        ],
    );
    c.reject(
        "checksum mismatch",
        Some("h-mismatch"),
        |dc| {
            put_base(dc);
            write_manifest(dc, &base_lines());
            fs::write(dc.join("assets/app.js"), b"tampered").unwrap();
        },
        Marker::Text(&id_marker("h-mismatch")),
        &["checksum mismatch", "assets/app.js"],
    );
    c.reject(
        "unlisted file whose name is a forged log line",
        Some("h-log-forgery"),
        |dc| {
            put_base(dc);
            write_manifest(dc, &base_lines());
            let forged = "x\n{\"level\":\"INFO\",\"event\":\"release.activated\",\"site\":\"web\",\"release\":\"pwned\"}\n";
            fs::write(dc.join(forged), b"").unwrap();
        },
        Marker::Text(&id_marker("h-log-forgery")),
        &["not listed", "pwned"],
    );
    assert!(
        c.svc
            .events("release.activated")
            .iter()
            .all(|v| release_of(v) != Some("pwned")),
        "a file name forged a log event"
    );
    c.finish();
}

// ---------------------------------------------------------------------------
// Corpus: markers and release ids
// ---------------------------------------------------------------------------

#[test]
fn hostile_markers_and_release_ids_are_rejected() {
    let mut c = Corpus::start("", "");
    let stage = |dc: &Path| {
        put_base(dc);
        write_manifest(dc, &base_lines());
    };
    let long = "a".repeat(129);
    let markers: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "id '../x'",
            b"id = \"../x\"\n".to_vec(),
            "invalid release id",
        ),
        (
            "id '../../escaped' (outside the root)",
            b"id = \"../../escaped\"\n".to_vec(),
            "invalid release id",
        ),
        ("bare id '../x'", b"../x\n".to_vec(), "invalid release id"),
        ("id '.'", b"id = \".\"\n".to_vec(), "invalid release id"),
        ("id '..'", b"id = \"..\"\n".to_vec(), "invalid release id"),
        ("bare id '..'", b"..\n".to_vec(), "invalid release id"),
        ("empty id", b"id = \"\"\n".to_vec(), "invalid release id"),
        (
            "id of 129 characters",
            format!("id = \"{long}\"\n").into_bytes(),
            "invalid release id",
        ),
        (
            "bare id of 129 characters",
            long.clone().into_bytes(),
            "invalid release id",
        ),
        (
            "id with a slash",
            b"id = \"a/b\"\n".to_vec(),
            "invalid release id",
        ),
        (
            "absolute id",
            b"id = \"/tmp/x\"\n".to_vec(),
            "invalid release id",
        ),
        (
            "id starting with '-'",
            b"id = \"-rf\"\n".to_vec(),
            "invalid release id",
        ),
        (
            "id naming a partial",
            b"id = \".partial.v1\"\n".to_vec(),
            "invalid release id",
        ),
        (
            "id with a newline",
            b"id = \"v2\\nv3\"\n".to_vec(),
            "invalid release id",
        ),
        (
            "id with NUL",
            b"id = \"v2\\u0000\"\n".to_vec(),
            "invalid release id",
        ),
        (
            "id with a space",
            b"id = \"v 2\"\n".to_vec(),
            "invalid release id",
        ),
        (
            "non-ASCII id",
            "id = \"v\u{e9}\"\n".as_bytes().to_vec(),
            "invalid release id",
        ),
        (
            "marker not UTF-8",
            b"id = \"v\xff\"\n".to_vec(),
            "not UTF-8",
        ),
        (
            "unknown key",
            b"idd = \"v2\"\n".to_vec(),
            "neither a bare id nor valid TOML",
        ),
        (
            "wrong type",
            b"id = \"v2\"\nactivate = \"yes\"\n".to_vec(),
            "neither a bare id nor valid TOML",
        ),
        (
            "two bare lines",
            b"v2\nv3\n".to_vec(),
            "neither a bare id nor valid TOML",
        ),
        (
            "id as a table",
            b"[id]\nx = 1\n".to_vec(),
            "neither a bare id nor valid TOML",
        ),
        (
            "64 KiB + 1 of comments",
            {
                let mut m = b"id = \"v2\"\n".to_vec();
                m.resize(64 * 1024 + 1, b'#');
                m
            },
            "larger than",
        ),
    ];
    for (name, text, want) in &markers {
        c.reject(
            &format!("marker: {name}"),
            None,
            stage,
            Marker::Text(text),
            &[want],
        );
    }
    c.reject(
        "marker: sparse 1 GiB",
        None,
        stage,
        Marker::Sparse(1 << 30),
        &["larger than"],
    );
    for bad in ["x", "escaped", "tmp"] {
        assert!(
            !c.site.root.join(bad).exists() && !c.site.tmp_path(bad).exists(),
            "an invalid id made {bad}"
        );
    }
    c.finish();
}

// ---------------------------------------------------------------------------
// Corpus: limits
// ---------------------------------------------------------------------------

#[test]
fn uploads_over_the_limits_are_rejected() {
    let mut c = Corpus::start(
        "max_files = 10\nmax_bytes = 100000\nupload_timeout = \"2s\"",
        "",
    );
    let many = |n: usize, nested: bool| {
        move |dc: &Path| {
            for i in 0..n {
                let p = if nested {
                    format!("a/b{}/c/f{i}.txt", i % 3)
                } else {
                    format!("f{i}.txt")
                };
                write_tree(dc, &[(p.as_str(), b"x")]);
            }
            write_sha256sums(dc);
        }
    };
    c.reject(
        "11 files (10 + the manifest)",
        Some("h-files"),
        many(10, false),
        Marker::Text(&id_marker("h-files")),
        &["max_files = 10"],
    );
    c.reject(
        "12 files in nested directories",
        Some("h-files-nested"),
        many(12, true),
        Marker::Text(&id_marker("h-files-nested")),
        &["max_files = 10"],
    );
    c.reject(
        "100001 bytes in one file",
        Some("h-bytes"),
        |dc| {
            write_tree(dc, &[("big.bin", &vec![7u8; 100_001])]);
            write_sha256sums(dc);
        },
        Marker::Text(&id_marker("h-bytes")),
        &["max_bytes = 100000"],
    );
    let t0 = Instant::now();
    c.reject(
        "sparse 16 GiB file (rejected without reading it)",
        Some("h-sparse"),
        |dc| {
            put_base(dc);
            File::create(dc.join("hole.bin"))
                .unwrap()
                .set_len(16 << 30)
                .unwrap();
            write_manifest(dc, &[base_lines(), line(b"hole.bin", b"")].concat());
        },
        Marker::Text(&id_marker("h-sparse")),
        &["max_bytes = 100000"],
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the sparse file took {:?}: was it read?\n{}",
        t0.elapsed(),
        c.svc.log_text()
    );
    c.reject(
        "file in flight forever",
        Some("h-in-flight"),
        |dc| {
            put_base(dc);
            write_manifest(dc, &base_lines());
            fs::write(dc.join("assets/.app.js.Xy12Zw"), b"half").unwrap();
        },
        Marker::Text(&id_marker("h-in-flight")),
        &["in flight", "assets/.app.js.Xy12Zw"],
    );

    // At the limits exactly: accepted (no off-by-one).
    clear_dir(&c.dc());
    let dc = c.dc();
    for i in 0..9 {
        write_tree(&dc, &[(format!("f{i}.txt").as_str(), b"x")]);
    }
    write_sha256sums(&dc);
    let (_, total) = count_files_bytes(&dc);
    fs::write(
        dc.join("f0.txt"),
        vec![b'x'; (100_000 - total + 1) as usize],
    )
    .unwrap();
    write_sha256sums(&dc);
    assert_eq!(count_files_bytes(&dc), (10, 100_000), "test bug: sizes");
    c.drop_marker(Marker::Text(&id_marker("at-limits")));
    c.svc.wait_release_event("release.activated", "at-limits");
    c.finish();
}

// ---------------------------------------------------------------------------
// Names that are not UTF-8, hold newlines or backslashes, or are very long
// ---------------------------------------------------------------------------

/// Names `sha256sum` escapes or that look like something else; nested and long ones.
fn awkward_names() -> Vec<Vec<u8>> {
    let mut names: Vec<Vec<u8>> = [
        &b"caf\xe9.html"[..], // Latin-1: not UTF-8
        b"bad\xff\xfe.bin",
        b"new\nline.txt",
        b"back\\slash.txt",
        b"cr\rreturn.txt",
        b"tab\tname.txt",
        b"\\\n\r mixed\\",
        b" leading space",
        b"trailing space ",
        b"-dash",
        b"*star",
        b"#hash.txt",
        b"(paren) = x",
        b"SHA256 (x) = y",
        b"\xe2\x80\xaertl-override.txt",
        b"d\nir/f\\x",
        b"sub/.release-ready",
        b"sub/SHA256SUMS",
        b".env.Ab12Cd", // looks like an rsync temp name, but is listed
        b"x.part",
        b"a\\nb", // a literal backslash-n, not a newline
    ]
    .iter()
    .map(|n| n.to_vec())
    .collect();
    names.push(vec![b'L'; 255]);
    // A deep path: 13 directories of 250 bytes (about 3.3 KB, under PATH_MAX with the root).
    let mut deep = Vec::new();
    for i in 0..13u8 {
        deep.extend(vec![b'a' + i; 250]);
        deep.push(b'/');
    }
    deep.extend(b"leaf\n\\\xff");
    names.push(deep);
    names
}

#[test]
fn awkward_names_round_trip_with_sha256sum() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    let build = site.tmp_path("build");
    for n in awkward_names() {
        let p = build.join(OsStr::from_bytes(&n));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &n).unwrap();
    }
    // Only the top-level SHA256SUMS and marker are not part of the upload.
    sh(
        &build,
        "find . -type f ! -path ./SHA256SUMS ! -path ./.release-ready -print0 | sort -z \\
         | xargs -0 sha256sum > SHA256SUMS",
    );
    let sums = fs::read(build.join(MANIFEST)).unwrap();
    assert!(
        sums.starts_with(b"\\") || sums.windows(2).any(|w| w == b"\n\\"),
        "test bug: sha256sum should have escaped some names"
    );
    rsync_upload(&build, &site.deploy_cache());
    // The message tries to forge a log line; it must stay inside one JSON string.
    drop_marker(&site,
        "id = \"v2\"\nmessage = \"ok\\n{\\\"event\\\":\\\"release.activated\\\",\\\"site\\\":\\\"web\\\",\\\"release\\\":\\\"pwned\\\"}\"\n",
    );
    svc.wait_release_event("release.activated", "v2");
    let rel = site.release("v2");
    assert_eq!(
        raw_tree(&rel),
        raw_tree(&build),
        "the release must hold exactly the upload, names byte for byte"
    );
    let check = Command::new("sha256sum")
        .args(["-c", "--strict", "--quiet", MANIFEST])
        .current_dir(&rel)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "sha256sum -c fails in the release: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let out = cli(&cfg, &["verify", SITE, "v2"]);
    assert_ok(&out, "verify v2");

    // The same build with a BSD-style (`--tag`) manifest.
    sh(
        &build,
        "find . -type f ! -path ./SHA256SUMS -print0 | sort -z | xargs -0 sha256sum --tag > SHA256SUMS",
    );
    rsync_upload(&build, &site.deploy_cache());
    drop_marker(&site, "id = \"v3\"\n");
    svc.wait_release_event("release.activated", "v3");
    assert_eq!(raw_tree(&site.release("v3")), raw_tree(&build));

    // `sha256sum -z`: NUL-terminated lines, names unescaped (a newline, CR or backslash
    // of a name written raw).
    sh(
        &build,
        "find . -type f ! -path ./SHA256SUMS -print0 | sort -z | xargs -0 sha256sum -z > SHA256SUMS",
    );
    rsync_upload(&build, &site.deploy_cache());
    drop_marker(&site, "id = \"v4\"\n");
    svc.wait_release_event("release.activated", "v4");
    assert_eq!(raw_tree(&site.release("v4")), raw_tree(&build));

    // Saved by a Windows editor (a byte-order mark first), with a few lines listed twice
    // (two manifests concatenated), which `sha256sum -c` passes.
    sh(
        &build,
        "find . -type f ! -path ./SHA256SUMS -print0 | sort -z | xargs -0 sha256sum > ../sums \\
         && { printf '\\357\\273\\277'; cat ../sums; head -n 3 ../sums; } > SHA256SUMS",
    );
    assert!(fs::read(build.join(MANIFEST))
        .unwrap()
        .starts_with(b"\xef\xbb\xbf"));
    rsync_upload(&build, &site.deploy_cache());
    drop_marker(&site, "id = \"v5\"\n");
    svc.wait_release_event("release.activated", "v5");
    assert_eq!(raw_tree(&site.release("v5")), raw_tree(&build));

    assert!(
        svc.events("release.activated")
            .iter()
            .all(|v| release_of(v) != Some("pwned")),
        "the marker message forged a log event"
    );
    assert!(
        !svc.log_text().lines().any(|l| l.starts_with("RAW: ")),
        "a non-JSON line reached the log"
    );
    svc.stop();
}

/// A path longer than PATH_MAX (4096) can only be reached with `openat`; the keeper either
/// publishes it intact or rejects it with a reason, and in both cases leaves nothing behind.
#[test]
fn path_longer_than_path_max_is_handled() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");
    let mut sentinel = Sentinel::new(&site, &[]);

    let dc = site.deploy_cache();
    clear_dir(&dc);
    write_tree(&dc, BASE);
    // 18 levels of 250 bytes: 4.5 KB, made relative to each parent (mkdirat/openat), as
    // an uploader's tool working directory by directory would.
    let comps: Vec<String> = (0..18)
        .map(|i| format!("{i:02}{}", "d".repeat(248)))
        .collect();
    let mut dir = open_dir(nix::fcntl::AT_FDCWD, &dc);
    for c in &comps {
        let mode = nix::sys::stat::Mode::from_bits_truncate(0o755);
        nix::sys::stat::mkdirat(&dir, c.as_str(), mode).unwrap();
        dir = open_dir(&dir, Path::new(c));
    }
    let leaf = nix::fcntl::openat(
        &dir,
        "leaf.txt",
        nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    File::from(leaf).write_all(b"deep").unwrap();
    let deep_rel = format!("{}/leaf.txt", comps.join("/"));
    assert!(deep_rel.len() > 4096);
    write_manifest(
        &dc,
        &[base_lines(), line(deep_rel.as_bytes(), b"deep")].concat(),
    );
    let from = svc.json_lines().len();
    drop_marker(&site, "id = \"v2\"\n");
    match wait_outcome(&svc, from, OUTCOME_WAIT) {
        Outcome::Finalized(_) => {
            svc.wait_release_event("release.activated", "v2");
            let mut dir = open_dir(nix::fcntl::AT_FDCWD, &site.release("v2"));
            for c in &comps {
                dir = open_dir(&dir, Path::new(c));
            }
            let leaf = nix::fcntl::openat(
                &dir,
                "leaf.txt",
                nix::fcntl::OFlag::O_RDONLY,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
            let got = std::io::read_to_string(File::from(leaf)).unwrap();
            assert_eq!(got, "deep", "the deep file was not published intact");
        }
        Outcome::Rejected(ev) => {
            let reason = reason_of(&ev);
            eprintln!("deep path rejected: {reason}");
            assert_eq!(release_of(&ev), Some("v2"));
            assert!(
                reason.contains("leaf.txt") || reason.contains("long"),
                "the reason should say which path is too long: {reason}"
            );
            assert_eq!(site.current_id().as_deref(), Some("v1"));
            assert_eq!(site.release_ids(), ["v1"]);
        }
        other => panic!(
            "no outcome for the deep path: {other:?}\n{}",
            svc.log_text()
        ),
    }
    let left = leftovers(&site);
    assert!(left.is_empty(), "{left:?}");
    sentinel.check().unwrap();
    svc.stop();
}

// ---------------------------------------------------------------------------
// Races: a file changing while copied, names swapped for symlinks mid-walk
// ---------------------------------------------------------------------------

/// Rewrites one byte of `path` with its own value every millisecond until `stop`: the
/// content never changes, but its mtime/ctime do, as with any writer.
fn touch_in_place(path: PathBuf, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let off = (n * 4096 * 257) % len;
            f.write_at(&[(off % 251) as u8], off).unwrap();
            n += 1;
            thread::sleep(Duration::from_millis(1));
        }
        n
    })
}

#[test]
fn file_changing_while_copied_is_rejected() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");

    // About 200 MB whose byte at offset k is k % 251: rewriting a byte with its own value
    // keeps the content (and so the manifest) right.
    let dc = site.deploy_cache();
    clear_dir(&dc);
    write_tree(&dc, BASE);
    let block: Vec<u8> = (0..251 * 4096).map(|k| (k % 251) as u8).collect();
    let mut f = File::create(dc.join("big.bin")).unwrap();
    for _ in 0..200 {
        f.write_all(&block).unwrap();
    }
    drop(f);
    let big = hash_reader(&mut File::open(dc.join("big.bin")).unwrap())
        .unwrap()
        .0;
    let big_line = format_line(Path::new("big.bin"), &big);
    write_manifest(&dc, &[base_lines(), big_line].concat());

    let mut reason = None;
    for attempt in 0..3 {
        let id = format!("changing-{attempt}");
        let stop = Arc::new(AtomicBool::new(false));
        let writer = touch_in_place(dc.join("big.bin"), Arc::clone(&stop));
        let from = svc.json_lines().len();
        drop_marker(&site, &format!("id = \"{id}\"\n"));
        let outcome = wait_outcome(&svc, from, Duration::from_secs(60));
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().unwrap();
        match outcome {
            Outcome::Rejected(ev) => {
                assert_eq!(release_of(&ev), Some(id.as_str()));
                reason = Some(reason_of(&ev));
                break;
            }
            Outcome::Finalized(_) => {
                // No write landed while the file was copied (timing): the release is
                // still byte-identical, so try again.
                eprintln!("attempt {attempt}: finalized despite {writes} writes; retrying");
                svc.wait_release_event("release.activated", &id);
            }
            other => panic!("unexpected outcome {other:?}\n{}", svc.log_text()),
        }
    }
    let reason = reason.expect("a file rewritten throughout finalize was never rejected");
    assert!(
        reason.contains("big.bin") && reason.contains("changed while it was being copied"),
        "reason should name big.bin as changing: {reason}"
    );
    let left = leftovers(&site);
    assert!(left.is_empty(), "{left:?}");
    svc.stop();
}

/// Swaps `dc/<name>` between the real entry (parked in `hold`) and a symlink to `target`
/// until `stop`. Returns how many swaps were made.
fn swapper(
    dc: PathBuf,
    name: &'static str,
    hold: PathBuf,
    targets: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let real = dc.join(name);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            fs::rename(&real, &hold).unwrap();
            symlink(&targets[n as usize % targets.len()], &real).unwrap();
            thread::sleep(Duration::from_micros(300));
            fs::remove_file(&real).unwrap();
            fs::rename(&hold, &real).unwrap();
            thread::sleep(Duration::from_micros(300));
            n += 1;
        }
        n
    })
}

/// TOCTOU: while the keeper walks and copies, an entry keeps being swapped for a symlink
/// to the outside (a directory, then a file). Whatever the timing, nothing outside may be
/// read, and a release, if one is made, holds only the real upload.
#[test]
fn names_swapped_for_symlinks_during_finalize_never_leak_the_outside() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");

    // The outside mirrors the upload's names, so that a walk following the swapped
    // symlink would find exactly the files it expects.
    let files: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| (format!("f{i:03}.txt"), format!("real {i}\n").into_bytes()))
        .collect();
    let mirror: Vec<(String, &[u8])> = files
        .iter()
        .map(|(n, _)| (format!("mirror/{n}"), SECRET))
        .collect();
    let mirror_refs: Vec<(&str, &[u8])> = mirror.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    let mut sentinel = Sentinel::new(&site, &mirror_refs);

    let dc = site.deploy_cache();
    let hold = site.tmp_path("scratch/hold");
    let mut outcomes = Vec::new();
    let cases: [(&'static str, Vec<PathBuf>); 2] = [
        (
            "d",
            vec![
                sentinel.dir.join("mirror"),
                PathBuf::from("../../outside/mirror"),
            ],
        ),
        (
            "d/f100.txt",
            vec![
                sentinel.dir.join("mirror/f100.txt"),
                PathBuf::from("../../../outside/mirror/f100.txt"),
            ],
        ),
    ];
    let mut attempt = 0;
    for (name, targets) in cases {
        for _ in 0..3 {
            attempt += 1;
            clear_dir(&dc);
            let upload: Vec<(String, Vec<u8>)> = files
                .iter()
                .map(|(n, c)| (format!("d/{n}"), c.clone()))
                .collect();
            write_tree(&dc, &as_refs(&upload));
            write_sha256sums(&dc);
            let id = format!("swap-{attempt}");
            let stop = Arc::new(AtomicBool::new(false));
            let t = swapper(
                dc.clone(),
                name,
                hold.clone(),
                targets.clone(),
                Arc::clone(&stop),
            );
            let from = svc.json_lines().len();
            drop_marker(&site, &format!("id = \"{id}\"\n"));
            // The swapper runs for at most 3 s; a keeper waiting for a vanished name then
            // sees the real upload again.
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut outcome = Outcome::Timeout;
            while Instant::now() < deadline {
                outcome = wait_outcome(&svc, from, Duration::from_millis(100));
                if !matches!(outcome, Outcome::Timeout) {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
            let swaps = t.join().unwrap();
            if matches!(outcome, Outcome::Timeout) {
                outcome = wait_outcome(&svc, from, OUTCOME_WAIT);
            }
            match &outcome {
                Outcome::Finalized(_) => {
                    svc.wait_release_event("release.activated", &id);
                    let got = raw_tree(&site.release(&id));
                    let mut want = raw_tree(&dc);
                    want.remove(MARKER.as_bytes());
                    assert_eq!(got, want, "release {id} differs from the real upload");
                    outcomes.push(format!("{name}: finalized ({swaps} swaps)"));
                }
                Outcome::Rejected(ev) => {
                    outcomes.push(format!(
                        "{name}: rejected: {} ({swaps} swaps)",
                        reason_of(ev)
                    ));
                }
                other => panic!("attempt {attempt}: {other:?}\n{}", svc.log_text()),
            }
            let left = leftovers(&site);
            assert!(left.is_empty(), "attempt {attempt}: {left:?}");
            sentinel
                .check()
                .unwrap_or_else(|e| panic!("attempt {attempt} ({name}): {e}\n{outcomes:?}"));
        }
    }
    // No release anywhere holds the sentinel's bytes.
    for (path, e) in raw_tree(&site.releases_dir()) {
        if let Entry::File(bytes) = e {
            assert!(
                bytes != SECRET,
                "{} holds the outside content",
                String::from_utf8_lossy(&path)
            );
        }
    }
    eprintln!("swap outcomes: {outcomes:#?}");
    svc.stop();
}

// ---------------------------------------------------------------------------
// Publishing exactly what was verified
// ---------------------------------------------------------------------------

/// The keeper reads the manifest, then waits for an in-flight file. If the uploader swaps
/// the manifest meanwhile, the release must not carry a manifest it never verified.
#[test]
fn manifest_swapped_while_waiting_is_never_published_unverified() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");

    let dc = site.deploy_cache();
    clear_dir(&dc);
    write_tree(&dc, BASE);
    write_manifest(&dc, &base_lines());
    fs::write(dc.join(".late.txt.Ab12Cd"), b"in flight").unwrap();
    let from = svc.json_lines().len();
    drop_marker(&site, "id = \"v2\"\n");
    svc.wait_event("upload.waiting", |_| true, WAIT);
    // A manifest that says something else about index.html.
    let forged = [
        line(b"index.html", b"forged"),
        line(b"assets/app.js", BASE[1].1),
    ]
    .concat();
    write_manifest(&dc, &forged);
    fs::remove_file(dc.join(".late.txt.Ab12Cd")).unwrap();
    match wait_outcome(&svc, from, OUTCOME_WAIT) {
        Outcome::Rejected(ev) => {
            assert_eq!(site.current_id().as_deref(), Some("v1"), "{ev}");
        }
        Outcome::Finalized(_) => {
            let rel = site.release("v2");
            let check = Command::new("sha256sum")
                .args(["-c", "--strict", "--quiet", MANIFEST])
                .current_dir(&rel)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "release v2 was published with a SHA256SUMS it does not match \
                 (the manifest was replaced after it was verified):\n{}",
                String::from_utf8_lossy(&check.stdout)
            );
        }
        other => panic!("{other:?}\n{}", svc.log_text()),
    }
    let left = leftovers(&site);
    assert!(left.is_empty(), "{left:?}");
    svc.stop();
}

// ---------------------------------------------------------------------------
// Shared entries: the links the keeper adds must not open a way out
// ---------------------------------------------------------------------------

/// Where the symlink at `link` points: its real path when it resolves, else its parent's
/// real path joined with the target, normalized lexically (a dangling link still exposes
/// whatever appears there later).
fn resolved(link: &Path) -> PathBuf {
    if let Ok(real) = fs::canonicalize(link) {
        return real;
    }
    let mut out = fs::canonicalize(link.parent().unwrap()).unwrap();
    for c in fs::read_link(link).unwrap().components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::RootDir => out = PathBuf::from("/"),
            _ => {}
        }
    }
    out
}

/// Every symlink of release `id` resolves inside the release, except the configured
/// shared links, which resolve inside `ROOT/shared`.
fn links_stay_inside(site: &Site, id: &str, shared: &[&str]) -> Result<(), String> {
    let rel = fs::canonicalize(site.release(id)).unwrap();
    let shared_dir = fs::canonicalize(site.root.join("shared")).unwrap();
    for (path, e) in raw_tree(&rel) {
        let Entry::Link(target) = e else { continue };
        let real = resolved(&rel.join(OsStr::from_bytes(&path)));
        let inside = if shared.iter().any(|s| s.as_bytes() == path.as_slice()) {
            real.starts_with(&shared_dir)
        } else {
            real.starts_with(&rel)
        };
        if !inside {
            return Err(format!(
                "{} -> {} resolves to {}, outside the release",
                String::from_utf8_lossy(&path),
                target.display(),
                real.display()
            ));
        }
    }
    Ok(())
}

#[test]
fn symlinked_parent_of_a_nested_shared_entry_cannot_redirect_it_outside_the_root() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "shared = [\"app/var/data\"]");
    let mut svc = Service::start_config(&cfg);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");
    let mut sentinel = Sentinel::new(&site, &[]);

    let dc = site.deploy_cache();
    clear_dir(&dc);
    write_tree(&dc, BASE);
    // app/var -> .. is an in-tree link (to the release root), so app/var/data is data.
    write_symlink(&dc, "app/var", "..");
    write_manifest(&dc, &base_lines());
    let from = svc.json_lines().len();
    drop_marker(&site, "id = \"v2\"\n");
    match wait_outcome(&svc, from, OUTCOME_WAIT) {
        Outcome::Rejected(ev) => {
            assert_eq!(site.current_id().as_deref(), Some("v1"), "{ev}");
            assert!(reason_of(&ev).contains("app/var"), "{ev}");
        }
        Outcome::Finalized(_) => {
            svc.wait_release_event("release.activated", "v2");
            links_stay_inside(&site, "v2", &["app/var/data"]).unwrap();
        }
        other => panic!("{other:?}\n{}", svc.log_text()),
    }
    assert!(leftovers(&site).is_empty());
    sentinel.check().unwrap();
    svc.stop();
}

#[test]
fn symlink_through_a_shared_entry_cannot_leave_the_release() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "shared = [\"storage\"]");
    let mut svc = Service::start_config(&cfg);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");

    let dc = site.deploy_cache();
    clear_dir(&dc);
    write_tree(&dc, BASE);
    fs::create_dir(dc.join("storage")).unwrap();
    // Lexically storage/.. is the release; once storage is the shared link, it is ROOT/shared.
    write_symlink(&dc, "peek", "storage/../other");
    write_manifest(&dc, &base_lines());
    let from = svc.json_lines().len();
    drop_marker(&site, "id = \"v2\"\n");
    match wait_outcome(&svc, from, OUTCOME_WAIT) {
        Outcome::Rejected(ev) => {
            assert_eq!(site.current_id().as_deref(), Some("v1"), "{ev}");
        }
        Outcome::Finalized(_) => {
            svc.wait_release_event("release.activated", "v2");
            let target = site.release("v2").join("peek");
            let lexical_parent = site.release("v2").join("storage").join("..");
            let real_parent = fs::canonicalize(&lexical_parent).unwrap();
            assert!(
                real_parent.starts_with(fs::canonicalize(site.release("v2")).unwrap()),
                "{} -> {:?} resolves into {} (outside the release)",
                target.display(),
                fs::read_link(&target).unwrap(),
                real_parent.display()
            );
        }
        other => panic!("{other:?}\n{}", svc.log_text()),
    }
    assert!(leftovers(&site).is_empty());
    svc.stop();
}

// ---------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------

/// Hooks see a clean environment: the documented variables, PATH and LANG, and nothing
/// of the service's own environment (here RUST_BACKTRACE, HOME, CARGO_*).
#[test]
fn hooks_get_a_clean_environment() {
    let site = Site::new();
    let dump = site.root.join("shared/hook-env");
    let cfg = site.write_config(
        SITE,
        "",
        &format!(
            "after_activate = [\"/bin/sh\", \"-c\", \"exec /usr/bin/env -0 > {}\"]",
            dump.display()
        ),
    );
    let mut svc = Service::start_config(&cfg);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");
    wait_until(WAIT, || dump.exists(), || "the hook's env dump".into());
    thread::sleep(Duration::from_millis(100));
    let raw = fs::read(&dump).unwrap();
    let env: BTreeMap<String, String> = raw
        .split(|&b| b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    // What the shell itself adds is not the keeper's doing.
    let shell = ["PWD", "OLDPWD", "SHLVL", "_"];
    let allowed = [
        "PATH",
        "LANG",
        "RELEASE_ID",
        "RELEASE_PATH",
        "PREVIOUS_RELEASE_ID",
        "SITE_NAME",
        "SITE_ROOT",
    ];
    let extra: Vec<&String> = env
        .keys()
        .filter(|k| !allowed.contains(&k.as_str()) && !shell.contains(&k.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "hook environment leaks {extra:?}: {env:?}"
    );
    assert_eq!(env.get("RELEASE_ID").map(String::as_str), Some("v1"));
    assert_eq!(env.get("SITE_NAME").map(String::as_str), Some(SITE));
    assert_eq!(
        env.get("RELEASE_PATH").map(PathBuf::from),
        Some(std::path::absolute(site.release("v1")).unwrap())
    );
    assert_eq!(env.get("PREVIOUS_RELEASE_ID").map(String::as_str), Some(""));
    svc.stop();
}

/// With `hook_user` (the service runs as root), hooks run as that user, still with a clean
/// environment: the documented variables plus that user's `HOME`, `USER` and `LOGNAME`.
#[test]
fn hooks_run_as_hook_user() {
    if !is_root() {
        eprintln!("skipped: hook_user needs the service to run as root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: no user `nobody`");
        return;
    };
    let site = Site::new();
    // The hook's user must reach the release (its cwd) and a place to write.
    fs::set_permissions(site.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let out = site.root.join("shared/hook-out");
    fs::create_dir_all(&out).unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o777)).unwrap();
    let cfg = site.write_config(
        SITE,
        "hook_user = \"nobody\"",
        &format!(
            "after_activate = [\"/bin/sh\", \"-c\", \"id -u > {0}/uid; exec /usr/bin/env -0 > {0}/env\"]",
            out.display()
        ),
    );
    let mut svc = Service::start_config(&cfg);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");
    wait_until(
        WAIT,
        || out.join("env").exists(),
        || "the hook's output".into(),
    );
    thread::sleep(Duration::from_millis(100));
    let uid = fs::read_to_string(out.join("uid")).unwrap();
    assert_eq!(
        uid.trim(),
        nobody.uid.to_string(),
        "the hook ran as uid {uid}"
    );
    let env = fs::read(out.join("env")).unwrap();
    let keys: Vec<String> = env
        .split(|&b| b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            String::from_utf8_lossy(kv)
                .split('=')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let allowed = [
        "PATH",
        "LANG",
        "RELEASE_ID",
        "RELEASE_PATH",
        "PREVIOUS_RELEASE_ID",
        "SITE_NAME",
        "SITE_ROOT",
        "HOME",
        "USER",
        "LOGNAME",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
    ];
    let extra: Vec<&String> = keys
        .iter()
        .filter(|k| !allowed.contains(&k.as_str()))
        .collect();
    assert!(extra.is_empty(), "hook environment leaks {extra:?}");
    svc.stop();
}

// ---------------------------------------------------------------------------
// Free space
// ---------------------------------------------------------------------------

/// A sparse file claiming 1 TiB costs the uploader nothing; the keeper must refuse it by
/// the free-space check (statvfs) before copying anything, keep `current`, leave no partial
/// release, and keep the claim for a retry when space returns.
#[test]
fn sparse_upload_larger_than_the_disk_is_refused_before_copying() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");
    let mut sentinel = Sentinel::new(&site, &[]);

    let dc = site.deploy_cache();
    clear_dir(&dc);
    write_tree(&dc, BASE);
    File::create(dc.join("hole.bin"))
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    write_manifest(&dc, &[base_lines(), line(b"hole.bin", b"")].concat());
    let t0 = Instant::now();
    let from = svc.json_lines().len();
    drop_marker(&site, "id = \"hole\"\n");
    let ev = match wait_outcome(&svc, from, OUTCOME_WAIT) {
        Outcome::Rejected(ev) => ev,
        other => panic!("{other:?}\n{}", svc.log_text()),
    };
    let reason = reason_of(&ev);
    assert_eq!(release_of(&ev), Some("hole"), "{}", svc.log_text());
    assert!(
        reason.contains("free") || reason.contains("space"),
        "the reason should say that space is missing: {reason}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "refusing took {:?}: was the file read?",
        t0.elapsed()
    );
    assert_eq!(
        ev["retrying"], true,
        "a lack of space is retried later: {ev}"
    );
    let claims = names(&site.root.join(".release-keeper/claims"));
    assert_eq!(
        claims.len(),
        1,
        "the claim is kept for the retry: {claims:?}"
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    // A retry (any healing pass retries a deferred upload) builds a partial release for a
    // moment and removes it again on the same check.
    let until = Instant::now() + WAIT;
    while site.releases_entries() != ["v1"] && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        site.releases_entries(),
        ["v1"],
        "no partial release left\n{}",
        svc.log_text()
    );
    assert!(sentinel.check().is_ok());
    svc.stop();
}

// ---------------------------------------------------------------------------
// The marker itself
// ---------------------------------------------------------------------------

/// An uploader writes the marker in place (`echo 'id = "v2"' > .release-ready`, sftp
/// `put`): between its creation and its last write it is empty or partial. Whatever wakes
/// the keeper meanwhile (here an event in the root, which runs a healing pass that also
/// claims markers), it must not claim the marker before it is complete, or the upload is
/// released under a generated id (or rejected for a torn marker).
#[test]
fn marker_still_being_written_is_not_claimed() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");
    site.stage_upload(BASE);
    let from = svc.json_lines().len();
    let mut marker = File::create(site.marker_path()).unwrap();
    // Anything in the root wakes a healing pass, which processes pending markers.
    fs::write(site.root.join("wake-up"), b"").unwrap();
    thread::sleep(Duration::from_millis(1500));
    marker.write_all(b"id = \"v2\"\n").unwrap();
    drop(marker);
    let outcome = wait_outcome(&svc, from, OUTCOME_WAIT);
    let made: Vec<String> = site
        .release_ids()
        .into_iter()
        .filter(|id| id != "v1")
        .collect();
    assert!(
        matches!(&outcome, Outcome::Finalized(ev) if release_of(ev) == Some("v2")),
        "the marker was claimed before it was written: {outcome:?}; releases made: {made:?}"
    );
    svc.stop();
}

/// A directory tree nested thousands of levels deep (each level one short name: cheap to
/// make with mkdirat/openat). The keeper walks uploads recursively, one stack frame and
/// descriptor per level: it must answer with a rejection and keep running, not overflow
/// its stack and abort (which, the claim being kept, would repeat at every restart).
#[test]
fn very_deep_tree_is_rejected_and_the_keeper_survives() {
    let site = Site::new();
    // A short upload_timeout: were the depth rejection mistaken for files still moving,
    // the reason would still surface within the test's bound.
    let cfg = site.write_config(SITE, "upload_timeout = \"1s\"", "");
    let mut svc = Service::start_config(&cfg);
    deploy_v1(&site);
    svc.wait_release_event("release.activated", "v1");

    let dc = site.deploy_cache();
    clear_dir(&dc);
    write_tree(&dc, BASE);
    write_manifest(&dc, &base_lines());
    let depth = 5_000;
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o755);
    let mut dir = open_dir(nix::fcntl::AT_FDCWD, &dc);
    for _ in 0..depth {
        nix::sys::stat::mkdirat(&dir, "d", mode).unwrap();
        dir = open_dir(&dir, Path::new("d"));
    }
    drop(dir);
    let from = svc.json_lines().len();
    drop_marker(&site, "id = \"deep\"\n");
    let outcome = wait_outcome(&svc, from, Duration::from_secs(60));
    // Clean up with rm (fts), which handles any depth; std's remove_dir_all recurses.
    let rm = |p: &Path| {
        let st = Command::new("rm").arg("-rf").arg(p).status().unwrap();
        assert!(st.success());
    };
    eprintln!("deep tree: {outcome:?}");
    let running = svc.is_running();
    let log = svc.log_text();
    rm(&dc.join("d"));
    for e in site.releases_entries() {
        if e.starts_with('.') {
            rm(&site.releases_dir().join(e));
        }
    }
    assert!(running, "the keeper died on a deep tree; log:\n{log}");
    match outcome {
        Outcome::Rejected(ev) => {
            assert_eq!(release_of(&ev), Some("deep"));
            assert!(reason_of(&ev).contains("levels deep"), "{ev}");
        }
        other => panic!("expected a rejection, got {other:?}\n{log}"),
    }
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    let left = leftovers(&site);
    assert!(left.is_empty(), "{left:?}");
    svc.stop();
}

/// A rejection quotes the uploaded names it is about; a name holding a newline or a
/// terminal escape must come out escaped, not as a forged line of the text log or of the
/// command's output (or a cleared screen).
#[test]
fn names_with_control_characters_cannot_forge_log_or_output_lines() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    assert_ok(&cli(&cfg, &["init", SITE]), "init");
    let dc = site.deploy_cache();
    put_base(&dc);
    write_manifest(&dc, &base_lines());
    let forged = "INFO release activated event=release.activated";
    fs::write(dc.join(format!("x\n{forged}\x1b[2J")), b"unlisted\n").unwrap();
    let out = cli(
        &cfg,
        &["--log-format", "text", "finalize", SITE, "--id", "cc"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = output_text(&out);
    assert!(
        text.lines().all(|l| !l.starts_with(forged)) && !text.contains('\x1b'),
        "a control character of a name reached the output raw:\n{text}"
    );
    assert!(
        text.contains(&format!("x\\n{forged}\\x1b[2J is not listed")),
        "the name is shown escaped:\n{text}"
    );
    assert!(site.release_ids().is_empty());
}

/// An uploader with write access to the root replaces `deploy-cache/` with a symlink to
/// another site's `deploy-cache/` (or anywhere): the keeper must neither take the markers
/// it finds through the link (another site's uploads, silently gone) nor read or remove
/// anything there, and must say what is wrong.
#[test]
fn deploy_cache_replaced_by_a_symlink_is_not_read_through() {
    let (a, b) = (Site::new(), Site::new());
    let cfg = a.tmp_path("two.toml");
    fs::write(
        &cfg,
        format!(
            "[sites.a]\nroot = \"{}\"\n[sites.b]\nroot = \"{}\"\n",
            a.root.display(),
            b.root.display()
        ),
    )
    .unwrap();
    let svc = Service::start_config(&cfg);
    a.deploy(&as_refs(&small_build("a1")), "id = \"a1\"\n");
    svc.wait_release_event("release.activated", "a1");

    // A marker waiting somewhere outside every root, then a's deploy-cache/ swapped for
    // a link to there.
    let elsewhere = a.tmp_path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let outside_marker = elsewhere.join(".release-ready");
    fs::write(&outside_marker, SECRET).unwrap();
    fs::rename(a.deploy_cache(), a.tmp_path("dc.bak")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, a.deploy_cache()).unwrap();
    // Every path to a claim: the events in a's root, and a full pass.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(svc.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let ev = svc.wait_event(
        "site.error",
        |v| v["site"] == "a" && reason_of(v).contains("is a symlink"),
        OUTCOME_WAIT,
    );
    assert!(
        reason_of(&ev).contains(&a.deploy_cache().display().to_string()),
        "the error names the link: {ev}"
    );
    assert_eq!(
        fs::read(&outside_marker).ok().as_deref(),
        Some(SECRET),
        "site a took or altered a marker outside its root"
    );

    // Pointed at b's deploy-cache/ instead: b's upload is b's alone.
    fs::remove_file(a.deploy_cache()).unwrap();
    std::os::unix::fs::symlink(b.deploy_cache(), a.deploy_cache()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    b.deploy(&as_refs(&small_build("b1")), "id = \"b1\"\n");
    let done = svc.wait_release_event("release.activated", "b1");
    assert_eq!(done["site"], "b", "{done}");
    let stolen: Vec<Value> = svc
        .json_lines()
        .into_iter()
        .filter(|v| v["site"] == "a" && release_of(v).is_some_and(|r| r == "b1" || r == "stolen"))
        .collect();
    assert!(stolen.is_empty(), "site a saw b's uploads: {stolen:?}");
    assert_eq!(a.current_id().as_deref(), Some("a1"));
}
