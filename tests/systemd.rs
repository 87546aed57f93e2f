//! Running under systemd, without systemd: the notify protocol against a real unix datagram
//! socket passed as `NOTIFY_SOCKET` (READY, STATUS, WATCHDOG, RELOADING + MONOTONIC_USEC,
//! STOPPING, in order), SIGHUP with good and bad configs (sites added and removed), SIGTERM
//! while a release is being finalized, the Prometheus metrics file, and the man page and
//! completions generated from the CLI.
mod common;

use std::fs::{self, File};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// `release-keeper ARGS` with a notify socket of our own, the watchdog asked for every
/// 200ms, stderr (JSON logs) in a file.
struct Keeper {
    child: Child,
    log: PathBuf,
    notes: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Keeper {
    fn start(dir: &Path, args: &[&str]) -> Keeper {
        let sock_path = dir.join(format!("notify-{}.sock", nanos()));
        let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let log = dir.join(format!("keeper-{}.log", nanos()));
        let child = Command::new(BIN)
            .args(args)
            .args(["--log-format", "json"])
            .env_remove("RELEASE_KEEPER_CONFIG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_PID")
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "200000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn release-keeper");
        let notes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (n2, s2) = (Arc::clone(&notes), Arc::clone(&stop));
        let reader = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s2.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    n2.lock().unwrap().push(msg);
                }
            }
        });
        Keeper {
            child,
            log,
            notes,
            stop,
            reader: Some(reader),
            status: None,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    /// Every assignment received so far, one per line (`READY=1`, `STATUS=...`), in order.
    fn lines(&self) -> Vec<String> {
        self.notes
            .lock()
            .unwrap()
            .iter()
            .flat_map(|d| d.lines().map(str::to_string).collect::<Vec<_>>())
            .collect()
    }

    /// Waits for a notify line after index `after` that satisfies `pred`; returns its index.
    fn wait_line(&self, after: Option<usize>, pred: impl Fn(&str) -> bool, what: &str) -> usize {
        let start = after.map_or(0, |a| a + 1);
        let deadline = Instant::now() + WAIT;
        loop {
            let lines = self.lines();
            if let Some(i) = lines.iter().skip(start).position(|l| pred(l)) {
                return start + i;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no notify line {what} after #{after:?}; got:\n{}\nlog:\n{}",
                    lines.join("\n"),
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn events(&self, event: &str) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// Waits until the log holds `n` events named `event` matching `pred`.
    fn wait_events(&self, event: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut evs = Vec::new();
        wait_until(
            WAIT,
            || {
                evs = self.events(event).into_iter().filter(|v| pred(v)).collect();
                evs.len() >= n
            },
            || format!("{n} `{event}` event(s); log:\n{}", self.log_text()),
        );
        evs
    }

    /// Waits for the process to exit (bounded); returns its status.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                self.status = Some(st);
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "release-keeper did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM; asserts STOPPING=1 was sent and the process exited 0.
    fn stop(&mut self) {
        let before = self.lines().len();
        self.signal(Signal::SIGTERM);
        let st = self.wait_exit(Duration::from_secs(15));
        assert!(
            st.success(),
            "exit 0 after SIGTERM, got {st:?}; log:\n{}",
            self.log_text()
        );
        self.wait_line(before.checked_sub(1), |l| l == "STOPPING=1", "STOPPING=1");
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn monotonic_usec() -> i128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_nsec()) / 1000
}

fn deploy(site: &Site, id: &str) {
    site.deploy(&as_refs(&small_build(id)), &format!("id = \"{id}\"\n"));
}

fn is(l: &str, want: &'static str) -> bool {
    l == want
}

#[test]
fn notify_protocol_ready_status_watchdog_reloading_stopping_in_order() {
    let site = Site::new();
    let mut k = Keeper::start(
        site.tmp.path(),
        &["run", "--root", site.root.to_str().unwrap()],
    );

    let ready = k.wait_line(None, |l| is(l, "READY=1"), "READY=1");
    k.wait_events("daemon.started", 1, |_| true);
    let lines = k.lines();
    // The status line goes with READY=1 and names the site and what it does.
    let status = lines[..=ready + 1]
        .iter()
        .rev()
        .find(|l| l.starts_with("STATUS="))
        .unwrap_or_else(|| panic!("a STATUS= line by READY=1: {lines:?}"));
    assert!(
        // What the site is doing right then: idle, or already looking for uploads.
        status.starts_with("STATUS=default: ") && status.ends_with(", no release yet"),
        "{status}"
    );
    assert!(
        !lines[..ready].iter().any(|l| l == "READY=1"),
        "READY=1 only once the first pass is done: {lines:?}"
    );

    // STATUS= is kept current: the new release shows up.
    deploy(&site, "v1");
    k.wait_line(
        Some(ready),
        |l| l.starts_with("STATUS=") && l.contains("default: idle, current v1"),
        "STATUS= with current v1",
    );

    // WATCHDOG=1 every 100ms (half of WATCHDOG_USEC=200000).
    let t0 = Instant::now();
    let n0 = k.lines().iter().filter(|l| *l == "WATCHDOG=1").count();
    thread::sleep(Duration::from_millis(1000));
    let n1 = k.lines().iter().filter(|l| *l == "WATCHDOG=1").count();
    let pings = n1 - n0;
    assert!(
        (4..=15).contains(&pings),
        "~10 WATCHDOG=1 in {:?}, got {pings}",
        t0.elapsed()
    );

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC of now, then READY=1 again.
    let before = k.lines().len() - 1;
    let sent_at = monotonic_usec();
    k.signal(Signal::SIGHUP);
    let reloading = k.wait_line(Some(before), |l| is(l, "RELOADING=1"), "RELOADING=1");
    let mono = k.wait_line(
        Some(reloading),
        |l| l.starts_with("MONOTONIC_USEC="),
        "MONOTONIC_USEC=",
    );
    let usec: i128 = k.lines()[mono]["MONOTONIC_USEC=".len()..].parse().unwrap();
    assert!(
        usec >= sent_at && usec <= monotonic_usec(),
        "MONOTONIC_USEC={usec} is the time of the reload (sent at {sent_at})"
    );
    let ready2 = k.wait_line(Some(mono), |l| is(l, "READY=1"), "READY=1 after reload");
    k.wait_events("config.reloaded", 1, |_| true);
    let after_ready2 = &k.lines()[ready2..];
    assert!(
        after_ready2
            .iter()
            .take(2)
            .any(|l| l.starts_with("STATUS=") && l.contains("current v1")),
        "READY=1 after the reload comes with the status line: {after_ready2:?}"
    );

    // SIGTERM: STOPPING=1, exit 0, and it is the last thing said (bar watchdog pings).
    let before = k.lines().len() - 1;
    k.stop();
    let stopping = k.wait_line(Some(before), |l| is(l, "STOPPING=1"), "STOPPING=1");
    let lines = k.lines();
    assert!(
        lines[stopping + 1..]
            .iter()
            .all(|l| l == "WATCHDOG=1" || l.starts_with("STATUS=")),
        "nothing but status after STOPPING=1: {:?}",
        &lines[stopping..]
    );
    assert!(ready < reloading && reloading < ready2 && ready2 < stopping);
    assert_eq!(k.events("daemon.stopping").len(), 1);
}

#[test]
fn sighup_adds_and_removes_sites_and_rejects_a_bad_config() {
    let a = Site::new();
    let b = Site::new();
    let cfg = a.tmp_path("config.toml");
    let write = |sites: &[(&str, &Site)]| {
        let mut text = String::from("[defaults]\nkeep = 3\n");
        for (name, s) in sites {
            text.push_str(&format!(
                "\n[sites.{name}]\nroot = \"{}\"\n",
                s.root.display()
            ));
        }
        fs::write(&cfg, text).unwrap();
    };
    write(&[("a", &a)]);
    let mut k = Keeper::start(a.tmp.path(), &["--config", cfg.to_str().unwrap(), "run"]);
    let ready = k.wait_line(None, |l| is(l, "READY=1"), "READY=1");
    deploy(&a, "a1");
    k.wait_events("release.activated", 1, |v| v["release"] == "a1");

    // Good config, one site added: RELOADING=1, READY=1, config.reloaded, b served.
    write(&[("a", &a), ("b", &b)]);
    let before = k.lines().len() - 1;
    k.signal(Signal::SIGHUP);
    let r = k.wait_line(Some(before), |l| is(l, "RELOADING=1"), "RELOADING=1");
    let ready2 = k.wait_line(Some(r), |l| is(l, "READY=1"), "READY=1 after reload");
    assert!(ready < ready2);
    let ev = k.wait_events("config.reloaded", 1, |_| true);
    assert_eq!(ev[0]["site"], "a,b", "{:?}", ev[0]);
    assert_eq!(
        (&ev[0]["added"], &ev[0]["removed"]),
        (&json!("b"), &json!("")),
        "{:?}",
        ev[0]
    );
    deploy(&b, "b1");
    k.wait_events("release.activated", 1, |v| v["release"] == "b1");
    assert_eq!(b.current_id().as_deref(), Some("b1"));
    k.wait_line(
        Some(ready2),
        |l| l.starts_with("STATUS=") && l.contains("a: idle, current a1; b: idle, current b1"),
        "STATUS= naming both sites",
    );

    // Site a removed: its worker stops and releases the site; b keeps working.
    write(&[("b", &b)]);
    let before = k.lines().len() - 1;
    k.signal(Signal::SIGHUP);
    k.wait_line(Some(before), |l| is(l, "RELOADING=1"), "RELOADING=1");
    // Said under the removed site's own name too, where a query for its events looks.
    let gone = k.wait_events("config.reloaded", 1, |v| v["removed"] == true);
    assert_eq!(gone[0]["site"], "a", "{:?}", gone[0]);
    let ev = k.wait_events("config.reloaded", 1, |v| v["removed"] == "a");
    assert_eq!(ev[0]["site"], "b", "{:?}", ev[0]);
    k.wait_line(
        Some(before),
        |l| l.starts_with("STATUS=") && !l.contains("a: ") && l.contains("b: "),
        "STATUS= without site a",
    );
    deploy(&a, "a2");
    thread::sleep(Duration::from_millis(800));
    assert!(
        a.marker_path().exists(),
        "a removed site is no longer served; log:\n{}",
        k.log_text()
    );
    let out = cli(&cfg, &["status", "b", "--json"]);
    assert_ok(&out, "status b");

    // A broken config: config.rejected, the running config stays, READY=1 follows RELOADING=1.
    fs::write(&cfg, "[defaults]\nkeep = \"many\"\n").unwrap();
    let before = k.lines().len() - 1;
    k.signal(Signal::SIGHUP);
    let r = k.wait_line(Some(before), |l| is(l, "RELOADING=1"), "RELOADING=1");
    k.wait_line(
        Some(r),
        |l| is(l, "READY=1"),
        "READY=1 after a rejected reload",
    );
    let rej = k.wait_events("config.rejected", 1, |_| true);
    assert!(
        rej[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("config.toml:2:8")),
        "the rejection names file:line:column: {:?}",
        rej[0]
    );
    deploy(&b, "b2");
    k.wait_events("release.activated", 1, |v| v["release"] == "b2");
    k.stop();
}

#[test]
fn sigterm_during_a_finalize_undoes_it_and_exits_0_then_it_is_redone() {
    let site = Site::new();
    let root = site.root.to_str().unwrap().to_string();
    let mut k = Keeper::start(site.tmp.path(), &["run", "--root", &root]);
    k.wait_line(None, |l| is(l, "READY=1"), "READY=1");
    deploy(&site, "v1");
    k.wait_events("release.activated", 1, |v| v["release"] == "v1");

    // A build big enough that finalizing it takes a while: 1500 files, 48 MiB.
    let files: Vec<(String, Vec<u8>)> = (0..1500)
        .map(|i| {
            let mut b = vec![(i % 251) as u8; 32 * 1024];
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            (format!("d{}/f{i}.bin", i % 30), b)
        })
        .collect();
    site.stage_upload(&as_refs(&files));
    site.drop_marker("id = \"big\"\n");
    wait_until(
        WAIT,
        || {
            site.hidden_release_entries()
                .iter()
                .any(|n| n.starts_with(".partial."))
                || site.release("big").exists()
        },
        || "the finalize of `big` to start".into(),
    );
    let interrupted = !site.release("big").exists();
    k.stop();
    eprintln!("SIGTERM arrived during the finalize: {interrupted}");

    assert!(
        site.hidden_release_entries()
            .iter()
            .all(|n| !n.starts_with(".partial.")),
        "no half-built release left: {:?}",
        site.releases_entries()
    );
    let cur = site.current_id();
    assert!(
        matches!(cur.as_deref(), Some("v1") | Some("big")),
        "current is intact: {cur:?}"
    );
    if interrupted {
        assert!(
            k.events("release.finalized")
                .iter()
                .all(|v| v["release"] != "big"),
            "interrupted, not finalized; log:\n{}",
            k.log_text()
        );
    }

    // The next start redoes it.
    let mut k2 = Keeper::start(site.tmp.path(), &["run", "--root", &root]);
    wait_until(
        Duration::from_secs(60),
        || site.current_id().as_deref() == Some("big"),
        || format!("`big` activated after restart; log:\n{}", k2.log_text()),
    );
    let (n, bytes) = count_files_bytes(&site.release("big"));
    assert_eq!(
        (n, bytes),
        (
            1501,
            1500 * 32 * 1024
                + fs::metadata(site.release("big").join(MANIFEST))
                    .unwrap()
                    .len()
        )
    );
    k2.stop();
}

/// A stop finishes an activation it finds running (SPEC: in-flight work is finished or
/// cleanly undone), and hooks and health checks can take far longer than the unit's
/// `TimeoutStopSec`: after STOPPING=1 the keeper asks systemd for the time that may still
/// take (EXTEND_TIMEOUT_USEC), or systemd would SIGKILL it halfway through the trial.
#[test]
fn sigterm_during_a_slow_health_check_extends_the_stop_timeout_and_finishes_it() {
    let site = Site::new();
    let started = site.tmp_path("health-check-started");
    let check = format!(
        r#"health_check = ["/bin/sh", "-c", "touch '{}'; sleep 3"]"#,
        started.display()
    );
    let cfg = site.write_config(
        "shop",
        "hook_timeout = \"30s\"\nhealth_retries = 2\nhealth_interval = \"1s\"",
        &check,
    );
    let mut k = Keeper::start(site.tmp.path(), &["--config", cfg.to_str().unwrap(), "run"]);
    k.wait_line(None, |l| is(l, "READY=1"), "READY=1");
    deploy(&site, "v1");
    wait_until(
        WAIT,
        || started.exists(),
        || format!("the health check of v1 to start; log:\n{}", k.log_text()),
    );

    let before = k.lines().len();
    k.signal(Signal::SIGTERM);
    let stopping = k.wait_line(before.checked_sub(1), |l| is(l, "STOPPING=1"), "STOPPING=1");
    let extend = k.wait_line(
        Some(stopping),
        |l| l.starts_with("EXTEND_TIMEOUT_USEC="),
        "EXTEND_TIMEOUT_USEC= while the health check runs",
    );
    let usec: u64 = k.lines()[extend]["EXTEND_TIMEOUT_USEC=".len()..]
        .parse()
        .unwrap();
    // What may be left: both attempts (30 s each) and the interval between them.
    assert!(
        usec >= 61_000_000,
        "EXTEND_TIMEOUT_USEC={usec} does not cover the rest of the trial"
    );
    let st = k.wait_exit(Duration::from_secs(15));
    assert!(st.success(), "exit 0, got {st:?}; log:\n{}", k.log_text());
    // Finished, not cut short: the verdict is in, and current is the checked release.
    assert_eq!(
        k.events("release.activated")
            .iter()
            .filter(|v| v["release"] == "v1")
            .count(),
        1,
        "log:\n{}",
        k.log_text()
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
}

/// Waits up to `limit` for READY=1; true when it came.
fn ready_within(k: &Keeper, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if k.lines().iter().any(|l| l == "READY=1") {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A command holding the site's operation lock while the service starts: READY=1 came only
/// once it let go, since the first healing pass waited for the lock, and systemd's
/// TimeoutStartSec could kill the start meanwhile. READY=1 now comes at once, with the
/// site watched; the pass runs once the lock is free.
#[test]
fn ready_is_not_held_back_by_a_command_holding_the_operation_lock() {
    let site = Site::new();
    let cfg = site.write_config("shop", "", "");
    let mut k = Keeper::start(site.tmp.path(), &["--config", cfg.to_str().unwrap(), "run"]);
    k.wait_line(None, |l| is(l, "READY=1"), "READY=1");
    deploy(&site, "v1");
    k.wait_events("release.activated", 1, |v| v["release"] == "v1");
    k.stop();

    // Something for the first pass to heal, and the lock held as a command holds it.
    fs::remove_file(site.current_path()).unwrap();
    let held = fs::OpenOptions::new()
        .write(true)
        .open(site.root.join(".release-keeper/lock"))
        .unwrap();
    held.lock().unwrap();
    let mut k = Keeper::start(site.tmp.path(), &["--config", cfg.to_str().unwrap(), "run"]);
    assert!(
        ready_within(&k, Duration::from_secs(3)),
        "READY=1 while a command holds the lock; got:\n{}\nlog:\n{}",
        k.lines().join("\n"),
        k.log_text()
    );
    k.wait_events("daemon.started", 1, |_| true);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(site.current_id(), None, "nothing done under the held lock");

    // Let go: the first pass runs, then uploads are served.
    drop(held);
    k.wait_events("heal.repaired", 1, |v| {
        v["what"].as_str().is_some_and(|w| w.contains("current"))
    });
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    deploy(&site, "v2");
    k.wait_events("release.activated", 1, |v| v["release"] == "v2");
    k.stop();
}

/// An activation that a crash (kill -9) interrupted during its health check is resumed at
/// the next start: the checks run again before READY=1 (SPEC: ready once healed, so
/// `current` is never left on an unchecked release), and a slow check (up to
/// `health_retries` x `hook_timeout`) could outlast systemd's TimeoutStartSec. The keeper
/// asks for the time it may take (EXTEND_TIMEOUT_USEC) soon after the start begins.
#[test]
fn a_start_resuming_an_interrupted_trial_asks_systemd_for_the_time_it_takes() {
    let site = Site::new();
    let (started, hold) = (site.tmp_path("check-started"), site.tmp_path("hold"));
    let check = format!(
        r#"health_check = ["/bin/sh", "-c", "[ \"$RELEASE_ID\" = v1 ] && exit 0; touch '{s}'; while [ -e '{h}' ]; do sleep 0.05; done"]"#,
        s = started.display(),
        h = hold.display()
    );
    let cfg = site.write_config("shop", "health_retries = 1\nhook_timeout = \"60s\"", &check);
    let mut k = Keeper::start(site.tmp.path(), &["--config", cfg.to_str().unwrap(), "run"]);
    k.wait_line(None, |l| is(l, "READY=1"), "READY=1");
    deploy(&site, "v1");
    k.wait_events("release.activated", 1, |v| v["release"] == "v1");
    fs::write(&hold, b"").unwrap();
    deploy(&site, "v2");
    wait_until(
        WAIT,
        || started.exists(),
        || format!("the health check of v2 to start; log:\n{}", k.log_text()),
    );
    k.signal(Signal::SIGKILL);
    k.wait_exit(Duration::from_secs(10));
    drop(k);
    fs::remove_file(&started).unwrap();

    // The check of the resumed trial blocks while `hold` exists.
    let mut k = Keeper::start(site.tmp.path(), &["--config", cfg.to_str().unwrap(), "run"]);
    let extend = k.wait_line(
        None,
        |l| l.starts_with("EXTEND_TIMEOUT_USEC="),
        "EXTEND_TIMEOUT_USEC= while the resumed health check runs",
    );
    let usec: u64 = k.lines()[extend]["EXTEND_TIMEOUT_USEC=".len()..]
        .parse()
        .unwrap();
    assert!(
        usec >= 60_000_000,
        "EXTEND_TIMEOUT_USEC={usec} does not cover the check"
    );
    assert!(
        !k.lines().iter().any(|l| l == "READY=1"),
        "READY=1 before the resumed trial was decided; got:\n{}",
        k.lines().join("\n")
    );
    fs::remove_file(&hold).unwrap();
    k.wait_line(None, |l| is(l, "READY=1"), "READY=1");
    // Decided by then: the checks passed, v2 is live.
    assert_eq!(
        k.events("release.activated")
            .iter()
            .filter(|v| v["release"] == "v2")
            .count(),
        1,
        "log:\n{}",
        k.log_text()
    );
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    k.stop();
}

/// Parses a node_exporter textfile into (series, value), checking every line's syntax.
fn parse_prom(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("# HELP release_keeper_") || line.starts_with("# TYPE release_keeper_")
        {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad metrics line {line:?}"));
        assert!(series.starts_with("release_keeper_"), "{line:?}");
        assert!(
            series.contains("{site=\"web\""),
            "every series has a site label: {line:?}"
        );
        out.push((
            series.to_string(),
            value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        ));
    }
    out
}

fn prom_value(text: &str, series: &str) -> Option<f64> {
    parse_prom(text)
        .into_iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| v)
}

#[test]
fn metrics_file_follows_the_journal_and_survives_restarts() {
    let site = Site::new();
    let dir = site.tmp_path("textfile");
    fs::create_dir(&dir).unwrap();
    let prom = dir.join("release-keeper-web.prom");
    let cfg = site.write_config(
        "web",
        "verify_interval = \"300ms\"",
        &format!("metrics_file = \"{}\"", prom.display()),
    );
    let mut k = Keeper::start(site.tmp.path(), &["--config", cfg.to_str().unwrap(), "run"]);
    k.wait_line(None, |l| is(l, "READY=1"), "READY=1");
    let text = fs::read_to_string(&prom).expect("metrics written after the first pass");
    assert_eq!(
        prom_value(
            &text,
            "release_keeper_releases_finalized_total{site=\"web\"}"
        ),
        Some(0.0),
        "{text}"
    );

    deploy(&site, "v1");
    k.wait_events("release.activated", 1, |v| v["release"] == "v1");
    deploy(&site, "v2");
    k.wait_events("release.activated", 1, |v| v["release"] == "v2");
    // A rejected upload: a file the manifest does not list.
    site.stage_upload(&as_refs(&small_build("v3")));
    fs::write(site.deploy_cache().join("extra.txt"), "x").unwrap();
    site.drop_marker("id = \"v3\"\n");
    k.wait_events("release.rejected", 1, |_| true);
    // A rollback by hand.
    assert_ok(&cli_when_idle(&cfg, &["rollback", "web"]), "rollback");
    let now = common_now();

    let want = [
        (
            "release_keeper_current_release_info{site=\"web\",release=\"v1\"}",
            1.0,
        ),
        (
            "release_keeper_releases{site=\"web\",state=\"current\"}",
            1.0,
        ),
        // v2, rolled back from, is good and what a plain rollback would go to again.
        (
            "release_keeper_releases{site=\"web\",state=\"previous\"}",
            1.0,
        ),
        ("release_keeper_releases{site=\"web\",state=\"good\"}", 0.0),
        (
            "release_keeper_releases{site=\"web\",state=\"failed\"}",
            0.0,
        ),
        ("release_keeper_releases_finalized_total{site=\"web\"}", 2.0),
        ("release_keeper_activations_total{site=\"web\"}", 2.0),
        ("release_keeper_rejections_total{site=\"web\"}", 1.0),
        ("release_keeper_rollbacks_total{site=\"web\"}", 1.0),
        (
            "release_keeper_activation_failures_total{site=\"web\"}",
            0.0,
        ),
        (
            "release_keeper_drift_paths{site=\"web\",release=\"v1\"}",
            0.0,
        ),
    ];
    let mut text = String::new();
    wait_until(
        WAIT,
        || {
            text = fs::read_to_string(&prom).unwrap_or_default();
            want.iter().all(|(s, v)| prom_value(&text, s) == Some(*v))
        },
        || {
            format!(
                "metrics {want:?}; file:\n{}\nlog:\n{}",
                fs::read_to_string(&prom).unwrap_or_default(),
                k.log_text()
            )
        },
    );
    let t = prom_value(
        &text,
        "release_keeper_last_activation_timestamp_seconds{site=\"web\"}",
    )
    .expect("last activation time");
    assert!((now - 120.0..=now + 5.0).contains(&t), "{t} vs now {now}");
    assert!(text.contains("# TYPE release_keeper_rejections_total counter"));

    // Drift in the current release shows up after the next verify.
    let f = site.release("v1").join("index.html");
    make_writable(&site.release("v1"));
    fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fs::write(&f, "tampered").unwrap();
    wait_until(
        WAIT,
        || {
            text = fs::read_to_string(&prom).unwrap_or_default();
            prom_value(
                &text,
                "release_keeper_drift_paths{site=\"web\",release=\"v1\"}",
            )
            // The content, the file's mode and its directory's mode.
            .is_some_and(|n| n >= 1.0)
        },
        || {
            format!(
                "drift_paths >= 1; file:\n{}",
                fs::read_to_string(&prom).unwrap_or_default()
            )
        },
    );
    k.stop();
    // Only the file itself: temp files are renamed over it, never left beside it.
    let names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [prom.file_name().unwrap()], "{names:?}");

    // The counts come from the journal, so a restart gives the same numbers.
    fs::remove_file(&prom).unwrap();
    let mut k = Keeper::start(site.tmp.path(), &["--config", cfg.to_str().unwrap(), "run"]);
    k.wait_line(None, |l| is(l, "READY=1"), "READY=1");
    let text = fs::read_to_string(&prom).expect("metrics rewritten after restart");
    for (s, v) in &want[4..9] {
        assert_eq!(prom_value(&text, s), Some(*v), "{s} after restart:\n{text}");
    }
    k.stop();
}

/// README's `ReleaseKeeperMetricsStale` alert (`time() - node_textfile_mtime_seconds > 600`)
/// tells a stopped or stuck keeper by the file's age, and the README promises a rewrite at
/// every healing pass, at least every `heal_interval`: an idle keeper with nothing new to
/// say must still renew the file, or the alert fires on a healthy one.
#[test]
fn metrics_file_is_renewed_by_idle_healing_passes() {
    let site = Site::new();
    let prom = site.tmp_path("release-keeper-web.prom");
    let cfg = site.write_config(
        "web",
        "heal_interval = \"1s\"",
        &format!("metrics_file = \"{}\"", prom.display()),
    );
    let mut k = Keeper::start(site.tmp.path(), &["--config", cfg.to_str().unwrap(), "run"]);
    k.wait_line(None, |l| is(l, "READY=1"), "READY=1");
    let mtime = || fs::metadata(&prom).and_then(|m| m.modified()).ok();
    let first = mtime().expect("metrics written after the first pass");
    let text = fs::read_to_string(&prom).unwrap();
    // Nothing happens on the site: only the periodic healing passes run.
    wait_until(
        Duration::from_secs(10),
        || mtime().is_some_and(|t| t > first),
        || {
            format!(
                "metrics file not rewritten by idle healing passes (heal_interval 1s); log:\n{}",
                k.log_text()
            )
        },
    );
    assert_eq!(fs::read_to_string(&prom).unwrap(), text, "same content");
    k.stop();
}

/// With `current` deleted by hand (no healing pass has run yet), the metrics counted the
/// release `current` had named as `previous`, taking the rollback target from the missing
/// link, while `list --json` (and `rollback`) take it from the release the keeper last made
/// current: the two reported different releases states.
#[test]
fn metrics_previous_agrees_with_list_when_current_was_deleted_by_hand() {
    use release_keeper::release::store::Journal;
    let site = Site::new();
    let prom = site.tmp_path("release-keeper-web.prom");
    let cfg = site.write_config("web", "", &format!("metrics_file = \"{}\"", prom.display()));
    site.stage_upload(&as_refs(&small_build("v1")));
    assert_ok(
        &cli(&cfg, &["finalize", "web", "--id", "v1"]),
        "finalize v1",
    );
    // Staged: the only good release besides v1 is not a rollback target.
    site.stage_upload(&as_refs(&small_build("v2")));
    assert_ok(
        &cli(&cfg, &["finalize", "web", "--id", "v2", "--no-activate"]),
        "finalize v2 --no-activate",
    );
    fs::remove_file(site.current_path()).unwrap();

    let out = cli(&cfg, &["list", "web", "--json"]);
    assert_ok(&out, "list --json");
    let list = stdout_json(&out);
    let config = release_keeper::commands::load_config(Some(&cfg), None).expect("load the config");
    let rsite = release_keeper::commands::site(&config, "web").expect("the site");
    let journal = Journal::load(&rsite).expect("load the journal");
    let text = release_keeper::metrics::render(&rsite, &journal).expect("render the metrics");
    for state in release_keeper::metrics::STATES {
        let in_list = list["releases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == state)
            .count() as f64;
        assert_eq!(
            prom_value(
                &text,
                &format!("release_keeper_releases{{site=\"web\",state=\"{state}\"}}")
            ),
            Some(in_list),
            "releases in state {state}: metrics vs list --json {list}\nmetrics:\n{text}"
        );
    }
}

fn common_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn man_page_and_completions_come_from_the_cli_and_stay_hidden() {
    let out = cli_raw(&["man"]);
    assert_ok(&out, "man");
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains("\n.TH release-keeper 1 "), "{page:.200}");
    for cmd in [
        "run",
        "status",
        "list",
        "activate",
        "rollback",
        "verify",
        "prune",
        "heal",
        "pin",
        "unpin",
        "finalize",
        "manifest",
        "init",
        "check-config",
    ] {
        assert!(
            page.contains(&format!(
                "release\\-keeper\\-{}(1)",
                cmd.replace('-', "\\-")
            )),
            "{cmd} in the man page"
        );
    }
    for section in ["EXIT STATUS", "SIGNALS", "ENVIRONMENT", "FILES"] {
        assert!(page.contains(section), "{section}");
    }
    assert!(!page.contains("completions"), "hidden commands stay out");

    let dir = tempfile::tempdir().unwrap();
    assert_ok(
        &cli_raw(&["man", "--dir", dir.path().to_str().unwrap()]),
        "man --dir",
    );
    for f in [
        "release-keeper.1",
        "release-keeper-run.1",
        "release-keeper-check-config.1",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    assert!(!dir.path().join("release-keeper-man.1").exists());

    for (shell, needle) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef release-keeper"),
        ("fish", "complete -c release-keeper"),
    ] {
        let out = cli_raw(&["completions", shell]);
        assert_ok(&out, shell);
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(needle), "{shell}: {text:.300}");
        assert!(text.contains("check-config"), "{shell} knows the commands");
    }
    let help = cli_raw(&["--help"]);
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(
        !help.contains("completions") && !help.contains(" man "),
        "{help}"
    );
}
