//! Crash safety: the service is killed with SIGKILL at many points while it finalizes,
//! swaps `current` to, and prunes around a sizeable upload, then restarted. After every
//! kill and every restart the tree must hold:
//! - `current` resolves to a complete release whose every file matches its upload;
//! - after the restart, the in-flight upload ends activated, no `.partial.*`, temporary
//!   link or trash entry remains, `verify --all` passes, and the journal parses.
//!
//! Bounded for CI: `RK_CRASH_KILLS` kill points (default 30) within `RK_CRASH_BUDGET`
//! seconds (default 40), at least `RK_CRASH_MIN` (default 8) of them. `scripts/soak.sh`
//! runs the same test with hundreds of kills. `RK_CRASH_VERBOSE=1` prints each kill point.
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::{Digest, Sha256};

const SITE: &str = "crash";
/// Small files of the upload, spread over `DIRS` directories.
const SMALL: usize = 2000;
const DIRS: usize = 30;
/// Large files of the upload and their size.
const BIG: usize = 3;
const BIG_SIZE: usize = 1 << 20;

type Hash = [u8; 32];

fn sha(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// The upload in `deploy-cache/`, rewritten incrementally between releases.
struct Upload {
    dir: PathBuf,
    small_gen: Vec<u32>,
    big_gen: Vec<u32>,
    /// Every file of the upload except SHA256SUMS and the marker.
    hashes: BTreeMap<String, Hash>,
}

fn small_path(j: usize) -> String {
    format!("app/d{:02}/f{j:04}.txt", j % DIRS)
}

fn big_path(k: usize) -> String {
    format!("assets/big{k}.bin")
}

fn small_content(j: usize, gen: u32) -> Vec<u8> {
    let mut s = format!("file {j} generation {gen}\n");
    while s.len() < 200 {
        s.push_str("lorem ipsum ");
    }
    s.into_bytes()
}

fn big_content(k: usize, gen: u32) -> Vec<u8> {
    // xorshift, seeded by file and generation: cheap, incompressible enough.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ ((k as u64) << 32) ^ gen as u64;
    let mut out = Vec::with_capacity(BIG_SIZE);
    while out.len() < BIG_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

impl Upload {
    fn new(dir: &Path) -> Upload {
        let mut u = Upload {
            dir: dir.to_path_buf(),
            small_gen: vec![0; SMALL],
            big_gen: vec![0; BIG],
            hashes: BTreeMap::new(),
        };
        for j in 0..SMALL {
            u.write_small(j);
        }
        for k in 0..BIG {
            u.write_big(k);
        }
        u
    }

    fn write(&mut self, rel: String, bytes: &[u8]) {
        let p = self.dir.join(&rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        self.hashes.insert(rel, sha(bytes));
    }

    fn write_small(&mut self, j: usize) {
        let c = small_content(j, self.small_gen[j]);
        self.write(small_path(j), &c);
    }

    fn write_big(&mut self, k: usize) {
        let c = big_content(k, self.big_gen[k]);
        self.write(big_path(k), &c);
    }

    /// Changes the upload for release number `i`: one directory of small files and one
    /// large file every time, every small file on every fourth release (so that some
    /// finalizes copy everything and some mostly hard-link). Writes SHA256SUMS and
    /// returns the expected content of the release (path -> hash, SHA256SUMS included).
    fn next(&mut self, i: usize) -> BTreeMap<String, Hash> {
        let all = i.is_multiple_of(4);
        for j in 0..SMALL {
            if all || j % DIRS == i % DIRS {
                self.small_gen[j] += 1;
                self.write_small(j);
            }
        }
        self.big_gen[i % BIG] += 1;
        self.write_big(i % BIG);
        let mut sums = String::new();
        for (p, h) in &self.hashes {
            sums.push_str(&format!("{}  {p}\n", hex(h)));
        }
        fs::write(self.dir.join(MANIFEST), &sums).unwrap();
        let mut want = self.hashes.clone();
        want.insert(MANIFEST.to_string(), sha(sums.as_bytes()));
        want
    }
}

/// path -> hash of every regular file under `dir`; panics on anything but files and dirs.
fn hash_tree(dir: &Path) -> BTreeMap<String, Hash> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {d:?}: {e}")) {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.insert(rel, sha(&fs::read(&p).unwrap()));
            } else {
                panic!("unexpected entry in a release: {p:?}");
            }
        }
    }
    out
}

fn start(cfg: &Path) -> Service {
    let s = Service::spawn_config(cfg);
    // The first healing pass redoes the interrupted upload before `daemon.started`.
    s.wait_event("daemon.started", |_| true, Duration::from_secs(60));
    s
}

fn sigkill(svc: &Service) {
    let _ = kill(Pid::from_raw(svc.pid()), Signal::SIGKILL);
    svc.wait_exit(Duration::from_secs(10));
}

/// Entries of `dir` (non-hidden claim files or markers).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Journal records, asserting that every line parses and `seq` strictly increases.
fn journal(root: &Path) -> Vec<Value> {
    let path = root.join(".release-keeper/journal");
    let text = fs::read_to_string(&path).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "journal ends with a torn line: {:?}",
        text.lines().last()
    );
    let mut last = 0u64;
    text.lines()
        .enumerate()
        .map(|(n, l)| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("journal line {} does not parse ({e}): {l}", n + 1));
            let seq = v["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {l}"));
            assert!(
                seq > last,
                "journal seq not increasing at line {}: {l}",
                n + 1
            );
            last = seq;
            v
        })
        .collect()
}

/// `current` resolves to `releases/<id>` with `id` one of `allowed`, and the release holds
/// exactly the files of its upload. Returns the id.
fn check_current(
    site: &Site,
    allowed: &[&str],
    want: &BTreeMap<String, BTreeMap<String, Hash>>,
    when: &str,
) -> String {
    let id = site
        .current_id()
        .unwrap_or_else(|| panic!("{when}: `current` is missing or not a symlink"));
    assert!(
        allowed.contains(&id.as_str()),
        "{when}: current is {id}, expected one of {allowed:?}"
    );
    let got = hash_tree(&site.release(&id));
    let expected = &want[&id];
    if &got != expected {
        let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
        let changed: Vec<_> = expected
            .iter()
            .filter(|(k, h)| got.get(*k).is_some_and(|g| g != *h))
            .map(|(k, _)| k)
            .collect();
        panic!(
            "{when}: release {id} is not complete: {} missing (e.g. {:?}), {} extra ({:?}), {} changed ({:?})",
            missing.len(),
            missing.iter().take(3).collect::<Vec<_>>(),
            extra.len(),
            extra.iter().take(3).collect::<Vec<_>>(),
            changed.len(),
            changed.iter().take(3).collect::<Vec<_>>()
        );
    }
    id
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Time from dropping the marker until the upload is activated, pruned and its claim gone.
fn wait_done(site: &Site, svc: &Service, id: &str, claims: &Path) -> Duration {
    let t0 = Instant::now();
    svc.wait_event(
        "release.activated",
        |v| release_of(v) == Some(id),
        Duration::from_secs(60),
    );
    wait_until(
        Duration::from_secs(30),
        || entries(claims).is_empty(),
        || format!("claims of {id} to be done: {:?}", entries(claims)),
    );
    assert_eq!(site.current_id().as_deref(), Some(id));
    t0.elapsed()
}

#[test]
fn kill_9_during_finalize_swap_and_prune() {
    let kills_wanted = env_or("RK_CRASH_KILLS", 30) as usize;
    let budget = Duration::from_secs(env_or("RK_CRASH_BUDGET", 40));
    let started = Instant::now();

    let site = Site::new();
    // keep = 1: every activation prunes a 2000-file release. The after_activate hook
    // widens the window between the swap and the verdict (an open trial).
    let cfg = site.write_config(
        SITE,
        "keep = 1\nkeep_failed = 1\nheal_interval = \"1h\"\nverify_interval = \"1h\"",
        "after_activate = [\"/bin/sh\", \"-c\", \"sleep 0.05\"]",
    );
    let claims = site.root.join(".release-keeper/claims");
    let mut upload = Upload::new(&site.deploy_cache());
    let mut want: BTreeMap<String, BTreeMap<String, Hash>> = BTreeMap::new();

    // Warm-up: three releases without kills (prune starts with the third); the last
    // two measure how long a copying and a mostly-linking release take.
    let mut svc = start(&cfg);
    let mut durations = [Duration::ZERO; 2];
    for i in 0..3 {
        let id = format!("r{i}");
        want.insert(id.clone(), upload.next(i));
        site.drop_marker(&format!("id = \"{id}\"\n"));
        durations[usize::from(!i.is_multiple_of(4))] = wait_done(&site, &svc, &id, &claims);
    }
    eprintln!(
        "crash test: one release takes {:?} (copying) / {:?} (linking); up to {kills_wanted} kills",
        durations[0], durations[1]
    );

    let mut kills = 0usize;
    let mut restarts_redid = 0usize;
    let mut after_done = 0usize;
    let mut i = 3usize;
    let mut prev = "r2".to_string();
    while kills < kills_wanted && started.elapsed() < budget {
        let id = format!("r{i}");
        want.insert(id.clone(), upload.next(i));
        // Delays spread over [0, 1.2 x the measured duration] (golden-ratio sequence).
        // The estimate of a release's duration follows the machine's load: a kill below
        // 1.0 that found the work done shrinks it, one above 1.0 that found work grows it.
        let frac = (kills as f64 * 0.618_033_988_75).fract() * 1.2;
        let kind = usize::from(!i.is_multiple_of(4));
        let delay = durations[kind].max(Duration::from_millis(50)).mul_f64(frac);

        site.drop_marker(&format!("id = \"{id}\"\n"));
        std::thread::sleep(delay);
        sigkill(&svc);
        kills += 1;
        let when = format!("kill {kills} ({id}, {:?} after the marker)", delay);

        // At the crash point: `current` is the old or the new release, complete either way.
        check_current(
            &site,
            &[&prev, &id],
            &want,
            &format!("{when}, before restart"),
        );
        journal(&site.root);
        let finished = site.current_id().as_deref() == Some(id.as_str())
            && entries(&claims).is_empty()
            && !site.marker_path().exists();
        if finished {
            after_done += 1;
            if frac < 1.0 {
                durations[kind] = durations[kind].mul_f64(0.85);
            }
        } else if frac > 1.0 {
            durations[kind] = durations[kind].mul_f64(1.15);
        }
        drop(svc);

        let t_restart = Instant::now();
        svc = start(&cfg);
        let t_started = t_restart.elapsed();
        let after = format!("{when}, after restart");
        wait_until(
            Duration::from_secs(60),
            || site.current_id().as_deref() == Some(id.as_str()) && entries(&claims).is_empty(),
            || {
                format!(
                    "{after}: upload {id} to end activated; current {:?}, claims {:?}; log:\n{}",
                    site.current_id(),
                    entries(&claims),
                    svc.log_text()
                )
            },
        );
        if !svc.events_for("release.activated", &id).is_empty() {
            restarts_redid += 1;
        }
        check_current(&site, &[&id], &want, &after);
        let records = journal(&site.root);
        assert!(
            records
                .iter()
                .any(|r| r["op"] == "activated" && r["release"] == id.as_str()),
            "{after}: the journal records the activation of {id}"
        );
        let hidden = site.hidden_release_entries();
        assert!(
            hidden.is_empty(),
            "{after}: leftovers in releases/: {hidden:?}"
        );
        for dir in [site.root.clone(), site.root.join(".release-keeper")] {
            let tmp: Vec<_> = entries(&dir)
                .into_iter()
                .filter(|n| n.starts_with(".rk-tmp"))
                .collect();
            assert!(
                tmp.is_empty(),
                "{after}: temporary links left in {dir:?}: {tmp:?}"
            );
        }
        let trash = entries(&site.root.join(".release-keeper/trash"));
        // Pruning may still be emptying the trash; wait for it, bounded.
        if !trash.is_empty() {
            wait_until(
                Duration::from_secs(20),
                || entries(&site.root.join(".release-keeper/trash")).is_empty(),
                || format!("{after}: trash to be emptied"),
            );
        }
        // Every release on disk is one the keeper made and verifies.
        let out = cli(&cfg, &["verify", SITE, "--all"]);
        assert_ok(&out, &format!("{after}: verify --all"));
        for r in site.release_ids() {
            assert!(
                want.contains_key(&r),
                "{after}: unknown release {r} on disk"
            );
        }
        if std::env::var_os("RK_CRASH_VERBOSE").is_some() {
            eprintln!(
                "{when}: started after {t_started:?}, checked after {:?}",
                t_restart.elapsed()
            );
        }
        prev = id;
        i += 1;
    }
    svc.stop();
    eprintln!(
        "crash test: {kills} kill points tried ({} during the work, {after_done} after it; the restart redid the upload {restarts_redid} times), all invariants held, {:?}",
        kills - after_done,
        started.elapsed()
    );
    let min = env_or("RK_CRASH_MIN", 8).min(kills_wanted as u64) as usize;
    assert!(
        kills >= min,
        "only {kills} kill points fit in the time budget (at least {min} wanted)"
    );
}

/// A crash while `before_activate` runs for the very first release leaves it finalized
/// but never activated, and no `current`. Healing must not make it current (its
/// `before_activate`, e.g. the migrations, never completed, and no health check ran):
/// the redone upload runs the activation, hooks and health check included.
#[test]
fn crash_in_before_activate_of_the_first_release_redoes_the_activation() {
    let site = Site::new();
    let runs = site.tmp_path("before-runs");
    let go = site.tmp_path("go");
    // Each run is counted, then waits until `go` exists.
    let hook = format!(
        "before_activate = [\"/bin/sh\", \"-c\", \"echo run >> {}; while [ ! -e {} ]; do sleep 0.05; done\"]",
        runs.display(),
        go.display()
    );
    let cfg = site.write_config(SITE, "", &hook);
    let svc = start(&cfg);
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    wait_until(WAIT, || runs.exists(), || "before_activate to start".into());
    sigkill(&svc);
    // The hook's own process group outlives the service; let it end.
    fs::write(&go, "").unwrap();
    assert!(
        site.current_target().is_none(),
        "no current before the restart"
    );

    let out = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert!(
        output_text(&out)
            .contains("activate release v1, finalized before the interruption (not rebuilt)"),
        "{}",
        show(&out)
    );
    let mut svc = start(&cfg);
    svc.wait_release_event("release.activated", "v1");
    assert!(
        svc.events("heal.repaired").iter().any(|e| e["what"]
            == "activating release v1, finalized before the interruption (not rebuilt)"),
        "{}",
        svc.log_text()
    );
    assert!(
        svc.events_for("release.already_current", "v1").is_empty(),
        "the redo must activate v1, not find it made current by healing"
    );
    let runs = fs::read_to_string(&runs).unwrap();
    assert_eq!(
        runs.lines().count(),
        2,
        "before_activate runs again after the crash: {runs:?}"
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    svc.stop();
}

/// Whether process `pid` still runs (a zombie waiting to be reaped does not).
fn running(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

/// Outside systemd, whose cgroup would take it along, nothing killed a hook whose keeper
/// was killed outright (-9, the OOM killer): it ran on beside the one the restarted keeper
/// starts (two migrations at once). The hook now dies with its keeper.
#[test]
fn a_hook_dies_with_the_keeper_killed_outright() {
    let site = Site::new();
    let pidfile = site.tmp_path("hook.pid");
    let hook = format!(
        "health_check = [\"/bin/sh\", \"-c\", \"echo $$ > {}.tmp && mv {0}.tmp {0}; exec sleep 60\"]",
        pidfile.display()
    );
    let cfg = site.write_config(SITE, "health_retries = 1", &hook);
    let svc = start(&cfg);
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    wait_until(
        WAIT,
        || pidfile.exists(),
        || "the health check to start".into(),
    );
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(running(pid), "the health check runs");
    sigkill(&svc);
    wait_until(
        Duration::from_secs(5),
        || !running(pid),
        || format!("the health check (pid {pid}) to end with its killed keeper"),
    );
}

/// What a hook started stays in its process group when the keeper is killed outright
/// (only the hook's first process dies with it). The restarted keeper kills it before the
/// redone activation runs the migration again, and says so.
#[test]
fn what_a_hook_started_is_killed_before_the_hook_runs_again() {
    let site = Site::new();
    let (leader, child, once) = (
        site.tmp_path("hook.pid"),
        site.tmp_path("child.pid"),
        site.tmp_path("ran-once"),
    );
    let script = format!(
        "[ -e {once} ] && exit 0; touch {once}; sleep 60 & echo $! > {child}.tmp; \
         echo $$ > {leader}.tmp; mv {child}.tmp {child}; mv {leader}.tmp {leader}; wait",
        once = once.display(),
        child = child.display(),
        leader = leader.display(),
    );
    let hook = format!("before_activate = [\"/bin/sh\", \"-c\", {script:?}]");
    let cfg = site.write_config(SITE, "", &hook);
    let svc = start(&cfg);
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    wait_until(WAIT, || leader.exists(), || "the migration to start".into());
    let pid_in = |p: &Path| -> i32 { fs::read_to_string(p).unwrap().trim().parse().unwrap() };
    let (leader_pid, child_pid) = (pid_in(&leader), pid_in(&child));
    sigkill(&svc);
    wait_until(
        Duration::from_secs(5),
        || !running(leader_pid),
        || "the hook's first process to die with its keeper".into(),
    );
    assert!(
        running(child_pid),
        "the test needs what the hook started to outlive the keeper"
    );

    let svc = start(&cfg);
    svc.wait_release_event("release.activated", "v1");
    assert!(
        !running(child_pid),
        "pid {child_pid}, started by the killed keeper's before_activate, still runs"
    );
    let repaired = svc.events("heal.repaired");
    assert!(
        repaired.iter().any(|e| e["what"]
            .as_str()
            .is_some_and(|w| w.contains("killed what was left of before_activate (process group"))),
        "{repaired:?}"
    );
    assert!(
        !site.root.join(".release-keeper/hook").exists(),
        "the note of the group is gone once no hook runs"
    );
}

/// A crash after a failed health check was journaled but before `current` was switched
/// back leaves `current` on the failed release (the state is made here by hand: the
/// journal without its `rolled_back` record, `current` on the failed release). Healing
/// must finish the rollback, not leave the site on a release known to be broken.
#[test]
fn crash_between_failed_verdict_and_switch_back_finishes_the_rollback() {
    let site = Site::new();
    let cfg = site.write_config(
        SITE,
        "health_retries = 1",
        "health_check = [\"/bin/sh\", \"-c\", \"test ! -e bad\"]",
    );
    let mut svc = start(&cfg);
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    site.deploy(
        &[("index.html", b"v2" as &[u8]), ("bad", b"1")],
        "id = \"v2\"\n",
    );
    svc.wait_release_event("release.rolled_back", "v2");
    svc.stop();

    let path = site.root.join(".release-keeper/journal");
    let text = fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("\"op\":\"rolled_back\""))
        .collect();
    assert_eq!(kept.len() + 1, text.lines().count(), "one rollback record");
    fs::write(&path, kept.join("\n") + "\n").unwrap();
    fs::remove_file(site.current_path()).unwrap();
    std::os::unix::fs::symlink("releases/v2", site.current_path()).unwrap();

    let out = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert_ok(&out, "heal --dry-run");
    assert!(
        output_text(&out).contains("finish the rollback from the failed release v2"),
        "{}",
        show(&out)
    );
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "a dry run changes nothing"
    );
    let mut svc = start(&cfg);
    svc.wait_release_event("release.rolled_back", "v2");
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    let rolled = journal(&site.root)
        .iter()
        .filter(|r| r["op"] == "rolled_back")
        .count();
    assert_eq!(rolled, 1, "the rollback is journaled");
    svc.stop();
}

/// A `rollback` killed while its target's checks run used to leave the target current
/// with the switch journaled as done (`rolled_back` was written before the checks), so
/// nothing ran them again: a target failing them stayed live and was never marked failed.
/// The switch is now an open trial until the verdict, and the next start resumes it: the
/// target fails its health check, is marked failed, and `current` goes back.
#[test]
fn rollback_killed_during_the_targets_checks_resumes_them_at_the_next_start() {
    let site = Site::new();
    let (hold, started, go, bad) = (
        site.tmp_path("hold"),
        site.tmp_path("started"),
        site.tmp_path("go"),
        site.tmp_path("bad"),
    );
    // While `hold` exists, after_activate says it started, then waits for `go`.
    let hooks = format!(
        "after_activate = [\"/bin/sh\", \"-c\", \"if [ -e {h} ]; then touch {s}; while [ ! -e {g} ]; do sleep 0.05; done; fi\"]\n\
         health_check = [\"/bin/sh\", \"-c\", \"test ! -e {b}\"]",
        h = hold.display(),
        s = started.display(),
        g = go.display(),
        b = bad.display()
    );
    let cfg = site.write_config(SITE, "health_retries = 1", &hooks);
    finalize_v1_then_v2(&site, &cfg);
    assert_eq!(site.current_id().as_deref(), Some("v2"));

    // v1 has gone bad since; the rollback to it is killed while its checks run.
    fs::write(&hold, "").unwrap();
    fs::write(&bad, "").unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap(), "rollback", SITE])
        .env_remove("RELEASE_KEEPER_CONFIG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn rollback");
    wait_until(
        WAIT,
        || started.exists(),
        || "the rollback's after_activate to start".into(),
    );
    let _ = child.kill();
    let _ = child.wait();
    // The hook's own process group outlives the command; let it end.
    fs::remove_file(&hold).unwrap();
    fs::write(&go, "").unwrap();
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "killed after the switch"
    );
    let dry = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert_ok(&dry, "heal --dry-run");
    let said = String::from_utf8_lossy(&dry.stdout);
    assert!(
        said.contains("resolve the interrupted rollback to v1"),
        "heal --dry-run says it is a rollback that would be resolved:\n{said}"
    );

    let mut svc = start(&cfg);
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "the resumed checks of v1 fail and current goes back to v2; log:\n{}",
        svc.log_text()
    );
    let list = stdout_json(&cli(&cfg, &["list", SITE, "--json"]));
    let v1 = list["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "v1")
        .cloned()
        .unwrap_or_default();
    assert_eq!(v1["state"], "failed", "v1 is marked failed: {list}");
    assert!(
        svc.log_text()
            .contains("resumed the interrupted rollback to v1"),
        "heal.repaired says it was a rollback that was resumed:\n{}",
        svc.log_text()
    );
    let records = journal(&site.root);
    assert!(
        records
            .last()
            .is_some_and(|r| r["op"] == "rolled_back" && r["to"] == "v2"),
        "the journal ends with the switch back to v2: {:?}",
        records.last()
    );
    svc.stop();
}

/// A `rollback` records its trial before it switches `current`. Killed after the record
/// but before the switch (forged here: the window is a few system calls), the next start
/// closes the trial with nothing switched: `current` stays, and the target is still a
/// good release that a rollback goes back to (not stepped past, as an activation
/// interrupted there is).
#[test]
fn rollback_interrupted_before_its_switch_is_closed_with_the_target_still_a_rollback_target() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    finalize_v1_then_v2(&site, &cfg);
    let records = journal(&site.root);
    let seq = records.last().and_then(|r| r["seq"].as_u64()).unwrap();
    let trial = serde_json::json!({"seq": seq + 1, "at": "2026-01-01T00:00:00Z", "op": "trial",
        "release": "v1", "previous": "v2", "rollback": true});
    let mut text = fs::read_to_string(site.root.join(".release-keeper/journal")).unwrap();
    text.push_str(&format!("{trial}\n"));
    fs::write(site.root.join(".release-keeper/journal"), text).unwrap();

    let mut svc = start(&cfg);
    assert_eq!(site.current_id().as_deref(), Some("v2"), "nothing switched");
    assert!(
        svc.log_text()
            .contains("closed the interrupted rollback to v1"),
        "heal.repaired says a rollback was closed:\n{}",
        svc.log_text()
    );
    let last = journal(&site.root).last().cloned().unwrap_or_default();
    assert_eq!(last["op"], "trial_closed", "{last}");
    assert_eq!(last["release"], "v1", "{last}");
    let status = stdout_json(&cli(&cfg, &["status", SITE, "--json"]));
    assert_eq!(
        status["previous"], "v1",
        "v1 is still the rollback target: {status}"
    );
    svc.stop();
    let out = cli(&cfg, &["rollback", SITE]);
    assert_ok(&out, "rollback after the closed trial");
    assert_eq!(site.current_id().as_deref(), Some("v1"));
}

/// Makes and activates `v1`, then `v2`, with the CLI.
fn finalize_v1_then_v2(site: &Site, cfg: &Path) {
    for id in ["v1", "v2"] {
        site.stage_upload(&as_refs(&small_build(id)));
        finalize_expecting(cfg, SITE, id, &[], 0);
    }
}

/// A `rollback` whose switch of `current` fails (here an immutable site root: the new
/// link cannot be made beside `current`) fails, with its trial closed at once, so no
/// healing pass later takes it for a crash, and nothing else changed.
#[test]
fn rollback_whose_switch_fails_closes_its_trial_and_changes_nothing() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    finalize_v1_then_v2(&site, &cfg);
    let Some(immutable) = Immutable::set(&site.root) else {
        eprintln!("skipped: chattr +i needs root and a filesystem that supports it");
        return;
    };
    let out = cli(&cfg, &["rollback", SITE]);
    drop(immutable);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    let records = journal(&site.root);
    let ops: Vec<_> = records
        .iter()
        .rev()
        .take(2)
        .map(|r| r["op"].clone())
        .collect();
    assert_eq!(ops, ["trial_closed", "trial"], "{records:?}");
    let status = stdout_json(&cli(&cfg, &["status", SITE, "--json"]));
    assert_eq!(status["previous"], "v1", "{status}");
    let heal = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert_ok(&heal, "heal --dry-run");
    assert!(
        !String::from_utf8_lossy(&heal.stdout).contains("interrupted"),
        "no trial left for healing: {}",
        String::from_utf8_lossy(&heal.stdout)
    );
    assert_ok(
        &cli(&cfg, &["rollback", SITE]),
        "rollback once the root is writable",
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
}

/// Undoes `chattr +i` on a path when the test ends, whatever happens.
struct Immutable(PathBuf);

impl Immutable {
    /// Makes `path` immutable; None (the test is skipped) where that is not possible.
    fn set(path: &Path) -> Option<Immutable> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Immutable(path.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// The claim is a rejected upload's only trace until its rejection is journaled. The
/// claim used to be removed first, so a crash, or a journal write that failed (here an
/// immutable journal), dropped the upload with no record. It must stay, and the rejection
/// be made again once the journal can be written.
#[test]
fn rejection_whose_journal_record_fails_keeps_the_claim_and_is_retried() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "heal_interval = \"1h\"", "");
    let mut svc = start(&cfg);
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    let path = site.root.join(".release-keeper/journal");
    let Some(immutable) = Immutable::set(&path) else {
        eprintln!("skipped: chattr +i is not possible here (needs root and a filesystem that supports it)");
        svc.stop();
        return;
    };
    let rejected = |records: &[Value]| {
        records
            .iter()
            .filter(|r| r["op"] == "rejected" && r["release"] == "bad")
            .count()
    };

    // No manifest: rejected.
    site.stage_upload(&as_refs(&small_build("bad")));
    fs::remove_file(site.deploy_cache().join(MANIFEST)).unwrap();
    site.drop_marker("id = \"bad\"\n");
    svc.wait_event(
        "site.error",
        |v| v["reason"].as_str().is_some_and(|e| e.contains("journal")),
        WAIT,
    );
    let claims = site.root.join(".release-keeper/claims");
    let visible = || -> Vec<String> {
        entries(&claims)
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect()
    };
    assert_eq!(
        visible().len(),
        1,
        "the claim must stay while the rejection is not journaled; log:\n{}",
        svc.log_text()
    );
    assert_eq!(
        rejected(&journal(&site.root)),
        0,
        "the journal was immutable"
    );

    drop(immutable);
    kill(Pid::from_raw(svc.pid()), Signal::SIGHUP).unwrap();
    wait_until(
        WAIT,
        || rejected(&journal(&site.root)) == 1 && visible().is_empty(),
        || {
            format!(
                "the retried rejection to be journaled and its claim removed (claims: {:?}); log:\n{}",
                visible(),
                svc.log_text()
            )
        },
    );
    assert!(
        svc.events_for("release.rejected", "bad")
            .iter()
            .any(|v| reason_of(v).contains(MANIFEST)),
        "the retry logs the rejection with its reason; log:\n{}",
        svc.log_text()
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    svc.stop();
}

/// A marker the keeper cannot consume (here an immutable `deploy-cache/`; in production a
/// `deploy-cache/` the keeper's user may not write) was retried every second, and each
/// retry logged the same `site.error`: an ERROR line a second in the journal for as long
/// as it lasted. The failure is logged once (again after `heal_interval` if it persists),
/// retried quietly, and the marker is processed once it can be consumed.
#[test]
fn a_marker_that_cannot_be_consumed_is_reported_once_not_every_second() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "heal_interval = \"1h\"", "");
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    let Some(immutable) = Immutable::set(&site.deploy_cache()) else {
        eprintln!("skipped: chattr +i is not possible here (needs root and a filesystem that supports it)");
        return;
    };
    let mut svc = start(&cfg);
    let errors = |svc: &Service| {
        svc.events("site.error")
            .into_iter()
            .filter(|v| reason_of(v).contains(".release-ready"))
            .count()
    };
    wait_until(
        WAIT,
        || errors(&svc) >= 1,
        || {
            format!(
                "the marker's failure to be logged; log:\n{}",
                svc.log_text()
            )
        },
    );
    // The marker is retried once a second: a few retries' worth of time.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        errors(&svc),
        1,
        "the same failure must be logged once, not at every retry; log:\n{}",
        svc.log_text()
    );
    assert!(
        site.marker_path().exists(),
        "the marker could not be consumed"
    );

    drop(immutable);
    svc.wait_release_event("release.activated", "v1");
    assert!(
        !site.marker_path().exists(),
        "marker consumed once it could be"
    );
    svc.stop();
}
