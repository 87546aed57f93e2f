//! Shared harness for release-keeper's integration tests: temp sites, builds,
//! real-tool uploads (rsync, sftp), a log-watching service runner and a CLI runner.
//! Everything lives in temp dirs; nothing touches /etc or /srv.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_release-keeper");
/// Default marker name.
pub const MARKER: &str = ".release-ready";
/// Default manifest name.
pub const MANIFEST: &str = "SHA256SUMS";
/// Default bound for waiting on one event.
pub const WAIT: Duration = Duration::from_secs(20);

/// Regex-free check that `id` looks like a timestamp release id `YYYYMMDDTHHMMSSZ(-N)?`.
pub fn is_timestamp_id(id: &str) -> bool {
    let b = id.as_bytes();
    if b.len() < 16 {
        return false;
    }
    let head_ok = b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'Z';
    let tail = &id[16..];
    let tail_ok = tail.is_empty()
        || (tail.len() >= 2
            && tail.starts_with('-')
            && tail[1..].bytes().all(|c| c.is_ascii_digit()));
    head_ok && tail_ok
}

/// Regex-free check that `s` is an RFC 3339 timestamp.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 {
        return false;
    }
    let d = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if !(d(0..4)
        && b[4] == b'-'
        && d(5..7)
        && b[7] == b'-'
        && d(8..10)
        && (b[10] == b'T' || b[10] == b't' || b[10] == b' ')
        && d(11..13)
        && b[13] == b':'
        && d(14..16)
        && b[16] == b':'
        && d(17..19))
    {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &r[n..];
    }
    if rest == "Z" || rest == "z" {
        return true;
    }
    let rb = rest.as_bytes();
    rb.len() == 6
        && (rb[0] == b'+' || rb[0] == b'-')
        && rb[1..3].iter().all(u8::is_ascii_digit)
        && rb[3] == b':'
        && rb[4..6].iter().all(u8::is_ascii_digit)
}

// ---------------------------------------------------------------------------
// Sites
// ---------------------------------------------------------------------------

/// A temp dir holding a site root (`<tmp>/root`) plus room for builds and configs.
pub struct Site {
    pub tmp: TempDir,
    pub root: PathBuf,
}

impl Site {
    /// New temp site; creates the root and its `deploy-cache/` (as an uploader's account would have).
    pub fn new() -> Site {
        let tmp = tempfile::Builder::new()
            .prefix("rk-it-")
            .tempdir()
            .expect("create temp dir");
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("deploy-cache")).expect("create deploy-cache");
        Site { tmp, root }
    }

    /// Path inside the temp dir (outside the site root).
    pub fn tmp_path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// `ROOT/deploy-cache`.
    pub fn deploy_cache(&self) -> PathBuf {
        self.root.join("deploy-cache")
    }

    /// `ROOT/releases`.
    pub fn releases_dir(&self) -> PathBuf {
        self.root.join("releases")
    }

    /// `ROOT/releases/<id>`.
    pub fn release(&self, id: &str) -> PathBuf {
        self.releases_dir().join(id)
    }

    /// `ROOT/current`.
    pub fn current_path(&self) -> PathBuf {
        self.root.join("current")
    }

    /// `ROOT/deploy-cache/.release-ready`.
    pub fn marker_path(&self) -> PathBuf {
        self.deploy_cache().join(MARKER)
    }

    /// Raw link target of `current` (None if missing or not a symlink).
    pub fn current_target(&self) -> Option<PathBuf> {
        fs::read_link(self.current_path()).ok()
    }

    /// Release id `current` points to, asserting the link has the form `releases/<id>`.
    pub fn current_id(&self) -> Option<String> {
        let t = self.current_target()?;
        let s = t.to_string_lossy().to_string();
        let s = s.trim_end_matches('/');
        let id = s.strip_prefix("releases/").unwrap_or_else(|| {
            panic!("`current` should be a relative link `releases/<id>`, is -> {s:?}")
        });
        Some(id.to_string())
    }

    /// The site's journal records, as JSON.
    pub fn journal_records(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.root.join(".release-keeper/journal"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l}: {e}")))
            .collect()
    }

    /// Entries of `.release-keeper/claims/`: uploads claimed and not yet done with.
    pub fn claim_count(&self) -> usize {
        fs::read_dir(self.root.join(".release-keeper/claims")).map_or(0, |d| d.count())
    }

    /// Visible entries (release ids) of `releases/`, sorted.
    pub fn release_ids(&self) -> Vec<String> {
        self.releases_entries()
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect()
    }

    /// Hidden entries of `releases/` (e.g. leftover `.partial.*`), sorted.
    pub fn hidden_release_entries(&self) -> Vec<String> {
        self.releases_entries()
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    /// All entries of `releases/`, sorted (empty if it does not exist).
    pub fn releases_entries(&self) -> Vec<String> {
        let mut v: Vec<String> = match fs::read_dir(self.releases_dir()) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    /// Writes `<tmp>/config.toml` with `[defaults]` lines and one `[sites.NAME]` for this root plus `site_extra` lines.
    pub fn write_config(&self, name: &str, defaults: &str, site_extra: &str) -> PathBuf {
        let path = self.tmp.path().join("config.toml");
        let text = format!(
            "[defaults]\n{defaults}\n\n[sites.{name}]\nroot = \"{}\"\n{site_extra}\n",
            self.root.display()
        );
        fs::write(&path, text).expect("write config");
        path
    }

    /// Drops the marker with `content` (a plain write, like `echo ... > .release-ready`).
    pub fn drop_marker(&self, content: &str) {
        fs::write(self.marker_path(), content).expect("drop marker");
    }

    /// Empties `deploy-cache/` and writes `files` plus a real SHA256SUMS into it (no marker).
    pub fn stage_upload(&self, files: &[(&str, &[u8])]) {
        clear_dir(&self.deploy_cache());
        write_tree(&self.deploy_cache(), files);
        write_sha256sums(&self.deploy_cache());
    }

    /// Stages an upload of `files` and drops a marker with `marker` content.
    pub fn deploy(&self, files: &[(&str, &[u8])], marker: &str) {
        self.stage_upload(files);
        self.drop_marker(marker);
    }

    /// Waits (bounded) until the marker has been consumed from `deploy-cache/`.
    pub fn wait_marker_consumed(&self, timeout: Duration) {
        let p = self.marker_path();
        wait_until(
            timeout,
            || !p.exists(),
            || format!("marker {p:?} to be consumed"),
        );
    }

    /// `config.toml` path in this site's temp dir.
    pub fn config_path(&self) -> PathBuf {
        self.tmp.path().join("config.toml")
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // Releases are read-only; give the owner write bits back so cleanup works as non-root too.
        make_writable(self.tmp.path());
    }
}

/// Recursively adds u+w to directories under `p` (symlinks not followed).
pub fn make_writable(p: &Path) {
    if let Ok(md) = fs::symlink_metadata(p) {
        if md.is_dir() {
            let mode = md.permissions().mode();
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode | 0o700));
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    make_writable(&e.path());
                }
            }
        }
    }
}

/// Removes every entry of `dir` (keeps `dir`).
pub fn clear_dir(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            make_writable(&p);
            fs::remove_dir_all(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
    }
}

/// Polls `cond` every 20ms until true or `timeout`; panics describing `what()`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {}", what());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Builds
// ---------------------------------------------------------------------------

/// Writes `(path, bytes)` files under `dir` (mode 0644), creating parent dirs.
pub fn write_tree(dir: &Path, files: &[(&str, &[u8])]) {
    for (rel, bytes) in files {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// Writes `(path, bytes, mode)` files under `dir`, creating parent dirs.
pub fn write_tree_modes(dir: &Path, files: &[(&str, &[u8], u32)]) {
    for (rel, bytes, mode) in files {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
    }
}

/// Creates symlink `dir/link` -> `target` (target taken verbatim).
pub fn write_symlink(dir: &Path, link: &str, target: &str) {
    let p = dir.join(link);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    symlink(target, &p).unwrap();
}

/// Runs `sh -c script` in `cwd`, panicking with stderr if it fails.
pub fn sh(cwd: &Path, script: &str) -> Output {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "shell command failed in {cwd:?}: {script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes `dir/SHA256SUMS` with the real coreutils `sha256sum` over every regular file except it and the marker.
pub fn write_sha256sums(dir: &Path) {
    sh(
        dir,
        "find . -type f ! -name SHA256SUMS ! -name .release-ready -print0 | sort -z \
         | xargs -0 -r sha256sum > SHA256SUMS",
    );
}

/// SHA-256 hex of `bytes`, computed by the real `sha256sum`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Kind + content of one tree entry, for comparisons.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum Entry {
    File(Vec<u8>),
    Dir,
    Link(PathBuf),
    Other,
}

/// Snapshot of a tree: relative path -> entry (symlinks not followed), skipping names in `skip` at top level.
pub fn tree(dir: &Path, skip: &[&str]) -> BTreeMap<String, Entry> {
    fn walk(base: &Path, p: &Path, out: &mut BTreeMap<String, Entry>) {
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let md = fs::symlink_metadata(&path).unwrap();
            let ft = md.file_type();
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
    walk(dir, dir, &mut out);
    out.retain(|k, _| !skip.contains(&k.as_str()));
    out
}

/// Permission bits (07777) of `p`, not following symlinks.
pub fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {p:?}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

/// (count, total bytes) of regular files under `dir`.
pub fn count_files_bytes(dir: &Path) -> (u64, u64) {
    tree(dir, &[])
        .values()
        .filter_map(|e| match e {
            Entry::File(b) => Some(b.len() as u64),
            _ => None,
        })
        .fold((0, 0), |(n, s), l| (n + 1, s + l))
}

// ---------------------------------------------------------------------------
// Real-tool uploads
// ---------------------------------------------------------------------------

/// Uploads `src/` into `dest/` with the real `rsync -a --delete`.
pub fn rsync_upload(src: &Path, dest: &Path) {
    let out = Command::new("rsync")
        .arg("-a")
        .arg("--delete")
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dest.display()))
        .output()
        .expect("spawn rsync");
    assert!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Uploads `src/` into `dest/` with the real OpenSSH sftp client against sftp-server (batch mode):
/// `put -rp`, then `extra` commands (e.g. `ln -s`, `chmod`), then the marker (with `marker` content) LAST.
pub fn sftp_upload(src: &Path, dest: &Path, extra: &[String], marker: &str, work: &Path) {
    let marker_file = work.join("marker-to-upload");
    fs::write(&marker_file, marker).unwrap();
    let mut batch = format!("lcd {}\ncd {}\nput -rp .\n", src.display(), dest.display());
    for c in extra {
        batch.push_str(c);
        batch.push('\n');
    }
    batch.push_str(&format!("put {} {}\n", marker_file.display(), MARKER));
    let batch_file = work.join("sftp-batch");
    fs::write(&batch_file, &batch).unwrap();
    let out = Command::new("sftp")
        .arg("-D")
        .arg("/usr/lib/openssh/sftp-server")
        .arg("-b")
        .arg(&batch_file)
        .stdin(Stdio::null())
        .output()
        .expect("spawn sftp");
    assert!(
        out.status.success(),
        "sftp failed: batch:\n{batch}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------

/// One stderr line of the service: parsed JSON or raw text.
#[derive(Debug, Clone)]
pub enum LogLine {
    Json(Value),
    Raw(String),
}

/// A running `release-keeper run` with its stderr collected and parsed.
pub struct Service {
    child: Mutex<Child>,
    lines: Arc<Mutex<Vec<LogLine>>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    exited: Mutex<Option<ExitStatus>>,
    args: Vec<String>,
}

impl Service {
    /// Spawns the binary with `args` (e.g. `["run", "--root", DIR, "--log-format", "json"]`).
    pub fn spawn(args: &[&str]) -> Service {
        Service::spawn_via(&[], args)
    }

    /// Like `spawn`, the binary run through `wrapper` (e.g. `setpriv` and its options).
    pub fn spawn_via(wrapper: &[&str], args: &[&str]) -> Service {
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(args)
            .env_remove("RELEASE_KEEPER_CONFIG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn release-keeper");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let reader = thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let s = String::from_utf8_lossy(&buf).trim_end().to_string();
                        let line = match serde_json::from_str::<Value>(&s) {
                            Ok(v) if v.is_object() => LogLine::Json(v),
                            _ => LogLine::Raw(s),
                        };
                        l2.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    }
                }
            }
        });
        Service {
            child: Mutex::new(child),
            lines,
            reader: Mutex::new(Some(reader)),
            exited: Mutex::new(None),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Starts `run --root ROOT --log-format json` (no config file) and waits for `daemon.started`.
    pub fn start_root(root: &Path) -> Service {
        let s = Service::spawn(&[
            "run",
            "--root",
            root.to_str().unwrap(),
            "--log-format",
            "json",
        ]);
        s.wait_started();
        s
    }

    /// Starts `--config FILE run --log-format json` and waits for `daemon.started`.
    pub fn start_config(config: &Path) -> Service {
        let s = Service::spawn_config(config);
        s.wait_started();
        s
    }

    /// `run` with `config` and JSON logs, not waiting for it to start (it may refuse to).
    pub fn spawn_config(config: &Path) -> Service {
        Service::spawn(&[
            "--config",
            config.to_str().unwrap(),
            "run",
            "--log-format",
            "json",
        ])
    }

    /// Waits for `daemon.started` and returns it.
    pub fn wait_started(&self) -> Value {
        self.wait_event("daemon.started", |_| true, WAIT)
    }

    /// Site name taken from the `daemon.started` (or any) event.
    pub fn site(&self) -> String {
        let v = self.wait_started();
        if let Some(s) = v.get("site").and_then(Value::as_str) {
            return s.to_string();
        }
        self.json_lines()
            .iter()
            .find_map(|v| v.get("site").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| panic!("no `site` field in any log line:\n{}", self.log_text()))
    }

    /// All parsed JSON log lines so far.
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|l| match l {
                LogLine::Json(v) => Some(v.clone()),
                LogLine::Raw(_) => None,
            })
            .collect()
    }

    /// All log events named `event` so far.
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.json_lines()
            .into_iter()
            .filter(|v| v.get("event").and_then(Value::as_str) == Some(event))
            .collect()
    }

    /// Log events named `event` for release `id` so far.
    pub fn events_for(&self, event: &str, id: &str) -> Vec<Value> {
        self.events(event)
            .into_iter()
            .filter(|v| release_of(v) == Some(id))
            .collect()
    }

    /// The whole log as text (JSON lines re-serialized, raw lines verbatim).
    pub fn log_text(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|l| match l {
                LogLine::Json(v) => v.to_string(),
                LogLine::Raw(s) => format!("RAW: {s}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Process id of the service.
    pub fn pid(&self) -> i32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id() as i32
    }

    /// True while the child process is still running.
    pub fn is_running(&self) -> bool {
        if self
            .exited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return false;
        }
        match self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_wait()
        {
            Ok(Some(st)) => {
                *self.exited.lock().unwrap_or_else(|e| e.into_inner()) = Some(st);
                false
            }
            _ => true,
        }
    }

    /// Waits (bounded) for an event named `event` matching `pred`; panics with the whole log on timeout or exit.
    pub fn wait_event(
        &self,
        event: &str,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.events(event).into_iter().find(|v| pred(v)) {
                return v;
            }
            if !self.is_running() {
                // Let the reader drain the rest of stderr, then look once more.
                thread::sleep(Duration::from_millis(100));
                if let Some(v) = self.events(event).into_iter().find(|v| pred(v)) {
                    return v;
                }
                let status = *self.exited.lock().unwrap_or_else(|e| e.into_inner());
                panic!(
                    "service {:?} exited ({status:?}) while waiting for event `{event}`; log:\n{}",
                    self.args,
                    self.log_text()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for event `{event}` (matching the test's predicate); log:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for event `event` whose `release` field is `id`.
    pub fn wait_release_event(&self, event: &str, id: &str) -> Value {
        self.wait_event(event, |v| release_of(v) == Some(id), WAIT)
    }

    /// Waits until at least `n` events named `event` were logged; returns them.
    pub fn wait_count(&self, event: &str, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let evs = self.events(event);
            if evs.len() >= n {
                return evs;
            }
            if !self.is_running() || Instant::now() >= deadline {
                thread::sleep(Duration::from_millis(100));
                let evs = self.events(event);
                if evs.len() >= n {
                    return evs;
                }
                panic!(
                    "waited for {n} `{event}` events, got {} (service running: {}); log:\n{}",
                    evs.len(),
                    self.is_running(),
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for the process to exit on its own; returns its status.
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                // The exit can be seen before the reader has drained stderr; without
                // this the caller would look at a log that misses the last lines.
                self.join_reader();
                return self
                    .exited
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap();
            }
            if Instant::now() >= deadline {
                panic!(
                    "service {:?} did not exit within {timeout:?}; log:\n{}",
                    self.args,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM, waits up to 10s (then SIGKILL), and asserts it exited 0.
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(
            status.as_ref().map(|s| s.success()).unwrap_or(false),
            "service should exit 0 after SIGTERM, got {status:?}; log:\n{}",
            self.log_text()
        );
    }

    /// SIGTERM, wait up to 10s, SIGKILL; returns the exit status (None if it had to be killed).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        if !self.is_running() {
            self.join_reader();
            return *self.exited.lock().unwrap_or_else(|e| e.into_inner());
        }
        let pid = self.child.lock().unwrap_or_else(|e| e.into_inner()).id() as i32;
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !self.is_running() {
                self.join_reader();
                return *self.exited.lock().unwrap_or_else(|e| e.into_inner());
            }
            thread::sleep(Duration::from_millis(20));
        }
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = c.kill();
        let st = c.wait().ok();
        drop(c);
        *self.exited.lock().unwrap_or_else(|e| e.into_inner()) = st;
        self.join_reader();
        eprintln!("service did not exit within 10s of SIGTERM; killed");
        None
    }

    fn join_reader(&self) {
        let handle = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.is_running() {
            let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `release` field of a log event.
pub fn release_of(v: &Value) -> Option<&str> {
    v.get("release").and_then(Value::as_str)
}

/// The `reason` field of a log event ("" if absent).
pub fn reason_of(v: &Value) -> String {
    match v.get("reason") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------

/// Runs `release-keeper --config CONFIG args...` (bounded to 20s) and returns its output.
pub fn cli(config: &Path, args: &[&str]) -> Output {
    let mut full = vec!["--config", config.to_str().unwrap()];
    full.extend_from_slice(args);
    cli_raw(&full)
}

/// Runs `finalize SITE --id ID --log-format json EXTRA...` on what is staged in
/// `deploy-cache/` and asserts it exits with `code`.
pub fn finalize_expecting(
    config: &Path,
    site: &str,
    id: &str,
    extra: &[&str],
    code: i32,
) -> Output {
    let mut args = vec!["finalize", site, "--id", id, "--log-format", "json"];
    args.extend_from_slice(extra);
    let out = cli(config, &args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "finalize {id}: {}",
        show(&out)
    );
    out
}

/// Runs `release-keeper args...` (bounded to 20s, killed after) and returns its output.
pub fn cli_raw(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RELEASE_KEEPER_CONFIG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn release-keeper");
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let t2 = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`release-keeper {}` did not finish within 20s",
                args.join(" ")
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

/// Like `cli`, but retries while the site is busy (exit 75) for up to 15s, as a user would.
pub fn cli_when_idle(config: &Path, args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = cli(config, args);
        if out.status.code() != Some(75) || Instant::now() >= deadline {
            return out;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The JSON log lines a CLI run (with `--log-format json`) wrote to stderr.
pub fn stderr_events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Human-readable dump of a CLI output, for failure messages.
pub fn show(out: &Output) -> String {
    format!(
        "exit={:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The command's stdout followed by its stderr, as text.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts the CLI exited 0, with the output in the message.
pub fn assert_ok(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what} should exit 0; {}",
        show(out)
    );
}

/// Parses stdout as one JSON document, panicking with the output otherwise.
pub fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}); {}", show(out)))
}

/// Finds (depth-first) the first JSON object whose "site" is `site` and which has key `key`.
pub fn find_site_obj<'a>(v: &'a Value, site: &str, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => {
            if m.get("site").and_then(Value::as_str) == Some(site) && m.contains_key(key) {
                return Some(v);
            }
            // An object keyed by site name: {"sites": {"web": {...}}}
            if let Some(inner) = m.get(site) {
                if inner.is_object() && inner.get(key).is_some() {
                    return Some(inner);
                }
            }
            m.values().find_map(|x| find_site_obj(x, site, key))
        }
        Value::Array(a) => a.iter().find_map(|x| find_site_obj(x, site, key)),
        _ => None,
    }
}

/// A small two-file build whose content depends on `tag`.
pub fn small_build(tag: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "index.html".to_string(),
            format!("<h1>{tag}</h1>\n").into_bytes(),
        ),
        (
            "assets/app.js".to_string(),
            format!("console.log({tag:?});\n").into_bytes(),
        ),
    ]
}

/// Borrowed view of an owned build, for `write_tree`/`deploy`.
pub fn as_refs(files: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect()
}

// ---------------------------------------------------------------------------
// Reference build shared by the upload tests
// ---------------------------------------------------------------------------

/// Writes the reference build (nested dirs, 0755/0644/04755 files, in-tree symlink) + real SHA256SUMS.
pub fn reference_build(dir: &Path) {
    write_tree_modes(
        dir,
        &[
            ("index.html", b"<!doctype html><h1>hello</h1>\n", 0o644),
            ("public/css/site.css", b"body { color: red }\n", 0o644),
            ("public/js/app.js", b"console.log('app');\n", 0o644),
            ("bin/console", b"#!/bin/sh\necho console\n", 0o755),
            ("bin/setuid-helper", b"#!/bin/sh\necho helper\n", 0o4755),
        ],
    );
    write_symlink(dir, "public/app.js", "js/app.js");
    // A setgid dir and a sticky, world-writable dir: both must come out 0555.
    fs::set_permissions(dir.join("public/css"), fs::Permissions::from_mode(0o2775)).unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();
    fs::write(dir.join("tmp/keep"), b"").unwrap();
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    write_sha256sums(dir);
}

/// Checks the finalized release against the build, the spec's mode rules and the log.
pub fn check_release(site: &Site, svc: &Service, build: &Path, id: &str) {
    // `current` is a relative symlink to releases/<id>.
    let target = site
        .current_target()
        .expect("`current` should exist and be a symlink");
    assert!(
        target.is_relative(),
        "`current` must have a relative target, is {target:?}"
    );
    assert_eq!(
        target.to_string_lossy().trim_end_matches('/'),
        format!("releases/{id}"),
        "`current` should point to releases/<id>"
    );
    assert!(
        is_timestamp_id(id),
        "release id without explicit id should be YYYYMMDDTHHMMSSZ(-N), got {id:?}"
    );
    let rel = site.release(id);
    assert!(rel.is_dir(), "release dir {rel:?} missing");

    // Same entries and bytes as the build (marker excluded; SHA256SUMS included).
    let want = tree(build, &[]);
    let got = tree(&rel, &[]);
    assert!(
        want.contains_key("SHA256SUMS"),
        "test bug: build lacks SHA256SUMS"
    );
    assert!(
        !got.contains_key(MARKER),
        "the marker must not be part of the release"
    );
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "release entries should be exactly the upload's"
    );
    assert_eq!(got, want, "release content differs from the uploaded build");

    // Modes: write bits and setuid removed, read/exec kept.
    assert_eq!(mode(&rel.join("bin/console")), 0o555, "0755 file -> 0555");
    assert_eq!(mode(&rel.join("index.html")), 0o444, "0644 file -> 0444");
    assert_eq!(
        mode(&rel.join("bin/setuid-helper")),
        0o555,
        "04755 file -> 0555 (setuid removed)"
    );
    assert_eq!(
        mode(&rel.join("SHA256SUMS")) & 0o222,
        0,
        "manifest read-only"
    );
    for (path, e) in &got {
        let p = rel.join(path);
        match e {
            Entry::File(_) | Entry::Dir => {
                let m = mode(&p);
                assert_eq!(m & 0o222, 0, "{path} still has write bits: {m:o}");
                assert_eq!(m & 0o7000, 0, "{path} has setuid/setgid/sticky: {m:o}");
                assert_eq!(m & 0o444, 0o444, "{path} lost read bits: {m:o}");
            }
            _ => {}
        }
    }
    let m = mode(&rel);
    assert_eq!(m & 0o222, 0, "release root dir still writable: {m:o}");
    // The in-tree symlink is kept and resolves inside the release.
    assert_eq!(
        fs::read_link(rel.join("public/app.js")).unwrap(),
        Path::new("js/app.js")
    );
    assert_eq!(
        fs::read(rel.join("public/app.js")).unwrap(),
        b"console.log('app');\n"
    );

    // Marker consumed.
    assert!(
        !site.marker_path().exists(),
        "marker should be gone from deploy-cache/"
    );
    // Nothing half-done left behind.
    assert!(
        site.hidden_release_entries()
            .iter()
            .all(|n| !n.starts_with(".partial")),
        "leftover partial dirs: {:?}",
        site.hidden_release_entries()
    );

    // Log.
    for ev in ["upload.detected", "release.finalized", "release.activated"] {
        if ev == "upload.detected" {
            // upload.detected may not know the release id yet; require it logged at least once.
            svc.wait_event(ev, |_| true, WAIT);
        } else {
            svc.wait_release_event(ev, id);
        }
    }
}

/// Writes a config for site `name` under this temp site and starts the service on it.
pub fn start_site(site: &Site, name: &str, defaults: &str, site_extra: &str) -> (PathBuf, Service) {
    let cfg = site.write_config(name, defaults, site_extra);
    let svc = Service::start_config(&cfg);
    (cfg, svc)
}

/// Deploys `small_build(id)` with marker `id = "<id>"` and waits for its activation.
pub fn deploy_and_activate(site: &Site, svc: &Service, id: &str) {
    site.deploy(&as_refs(&small_build(id)), &format!("id = \"{id}\"\n"));
    svc.wait_release_event("release.activated", id);
    assert_eq!(site.current_id().as_deref(), Some(id), "current after {id}");
}
