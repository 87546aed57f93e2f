//! Healing: each case of the healing pass, the triggers (start, inotify, SIGHUP,
//! heal_interval), `heal --dry-run`, foreign releases, locks, and the watcher's recovery
//! (inotify overflow, a recreated deploy-cache/, a root that appears after start).
mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const SITE: &str = "web";

/// Waits for a `heal.repaired` event whose JSON contains every one of `needles`.
fn wait_repaired(svc: &Service, needles: &[&str]) -> Value {
    svc.wait_event(
        "heal.repaired",
        |v| {
            let s = v.to_string();
            needles.iter().all(|n| s.contains(n))
        },
        WAIT,
    )
}

/// `heal` that reported a problem it must leave to an operator: it exits 1 (SPEC: "found
/// a problem").
fn assert_left_a_problem(out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "heal left a problem unrepaired: exit 1; {}",
        show(out)
    );
}

/// Replaces `path` by a symlink to `target` the way an operator's `ln -sfn` would not:
/// atomically (so the test itself never observes a missing link).
fn force_symlink(path: &Path, target: &str) {
    let tmp = path.with_file_name(".test-link-tmp");
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp).unwrap();
    fs::rename(&tmp, path).unwrap();
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn signal(svc: &Service, sig: Signal) {
    kill(Pid::from_raw(svc.pid()), sig).unwrap();
}

fn wait_current(site: &Site, id: &str, timeout: Duration, what: &str) {
    wait_until(
        timeout,
        || site.current_id().as_deref() == Some(id),
        || format!("{what}: current -> {id}, is {:?}", site.current_target()),
    );
}

fn displaced(site: &Site) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(site.root.join(".release-keeper/displaced"))
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn deleted_current_comes_back_within_a_second() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1h\"", "");
    deploy_and_activate(&site, &svc, "v1");
    for round in 0..3 {
        fs::remove_file(site.current_path()).unwrap();
        let t0 = Instant::now();
        wait_current(
            &site,
            "v1",
            Duration::from_millis(1500),
            &format!("round {round}"),
        );
        eprintln!("current restored after {:?}", t0.elapsed());
    }
    let ev = wait_repaired(&svc, &["current is missing", "releases/v1"]);
    assert_eq!(ev["site"], SITE, "{ev}");
    svc.stop();
}

#[test]
fn dangling_current_points_at_last_good_release() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");

    // While running: `current` made to dangle.
    force_symlink(&site.current_path(), "releases/nope");
    wait_current(&site, "v2", WAIT, "dangling current healed");
    wait_repaired(&svc, &["current is dangling"]);
    svc.stop();

    // While stopped: the current release deleted by hand; the last good one that exists
    // is v1.
    make_writable(&site.release("v2"));
    fs::remove_dir_all(site.release("v2")).unwrap();
    let svc = Service::start_config(&cfg);
    wait_current(
        &site,
        "v1",
        WAIT,
        "current of a deleted release healed at start",
    );
    wait_repaired(&svc, &["current is dangling", "releases/v1"]);
    drop(svc);
}

#[test]
fn current_directory_is_moved_aside_never_deleted() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    for (n, text) in ["first precious\n", "second precious\n"].iter().enumerate() {
        // Swapped in atomically (RENAME_EXCHANGE): a plain rm + mkdir races with the
        // healing of the missing link, and would then write into the release.
        let staged = site.root.join("staged-dir");
        write_tree(&staged, &[("data/precious.txt", text.as_bytes())]);
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &staged,
            nix::fcntl::AT_FDCWD,
            &site.current_path(),
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .unwrap();
        fs::remove_file(&staged).unwrap();
        wait_current(
            &site,
            "v1",
            WAIT,
            "a real current directory replaced by the link",
        );
        wait_until(
            WAIT,
            || displaced(&site).len() == n + 1,
            || format!("moved-aside directories: {:?}", displaced(&site)),
        );
    }
    // Both directories kept, contents intact, even when displaced in the same second.
    let mut texts: Vec<String> = displaced(&site)
        .iter()
        .map(|d| fs::read_to_string(d.join("data/precious.txt")).unwrap())
        .collect();
    texts.sort();
    assert_eq!(texts, ["first precious\n", "second precious\n"]);
    wait_repaired(&svc, &["current is not a symlink", "displaced"]);
    svc.stop();
}

/// Replacing a real `current` directory by the link leaves no moment without `current`:
/// a web server serving from it must never get "no such file" in between.
#[test]
fn current_directory_is_replaced_without_a_moment_missing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
    fs::remove_file(site.current_path()).unwrap();
    write_tree(
        &site.current_path(),
        &[("index.html", b"by hand\n" as &[u8])],
    );

    let stop = Arc::new(AtomicBool::new(false));
    let current = site.current_path();
    let watcher = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut missing = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if fs::symlink_metadata(&current).is_err() {
                    missing += 1;
                }
            }
            missing
        })
    };
    let out = cli(&cfg, &["heal", SITE]);
    stop.store(true, Ordering::Relaxed);
    let missing = watcher.join().unwrap();
    assert_ok(&out, "heal");
    assert_eq!(site.current_id().as_deref(), Some("v1"), "{}", show(&out));
    assert_eq!(displaced(&site).len(), 1, "{}", show(&out));
    assert_eq!(
        missing, 0,
        "current was seen missing {missing} times while healing replaced the directory"
    );
}

/// `current` pointed by hand at a release that failed its checks: a person's choice, so
/// healing keeps it, but says so (healing and rollbacks never choose a failed release,
/// and nothing else would tell that the site now serves one).
#[test]
fn current_pointed_by_hand_at_a_failed_release_is_reported() {
    let site = Site::new();
    let cfg = site.write_config(
        SITE,
        "health_retries = 1",
        "health_check = [\"/bin/sh\", \"-c\", \"test ! -e bad\"]",
    );
    let mut svc = Service::start_config(&cfg);
    deploy_and_activate(&site, &svc, "v1");
    site.deploy(
        &[("index.html", b"v2" as &[u8]), ("bad", b"1")],
        "id = \"v2\"\n",
    );
    svc.wait_release_event("release.rolled_back", "v2");
    svc.stop();
    force_symlink(&site.current_path(), "releases/v2");

    let out = cli(&cfg, &["heal", SITE]);
    assert_left_a_problem(&out);
    let text = stdout_of(&out);
    assert!(
        text.contains("current points at release v2, which failed"),
        "heal says current serves a failed release: {}",
        show(&out)
    );
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "the choice is kept"
    );
}

#[test]
fn current_pointing_outside_releases_is_repaired() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    let outside = site.tmp_path("elsewhere");
    fs::create_dir_all(&outside).unwrap();
    let abs_release = site.release("v1").display().to_string();
    for target in [
        outside.to_str().unwrap(),
        "../elsewhere",
        "deploy-cache",
        "releases/../deploy-cache",
        "releases/.partial.v1",
        abs_release.as_str(),
    ] {
        force_symlink(&site.current_path(), target);
        wait_until(
            WAIT,
            || site.current_target().as_deref() == Some(Path::new("releases/v1")),
            || {
                format!(
                    "current -> {target} repaired to releases/v1, is {:?}",
                    site.current_target()
                )
            },
        );
    }
    wait_repaired(&svc, &["current points outside releases/"]);
    wait_repaired(&svc, &["absolute target"]);
    svc.stop();
}

/// `ln -sfn /srv/shop/releases/v1 /srv/shop/current` (a manual switch, written the way
/// many operators do, with an absolute path) names a good release: healing makes the
/// link relative and keeps the operator's choice instead of switching the site back to
/// the release that was current before.
#[test]
fn absolute_current_to_a_good_release_is_made_relative_not_switched() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");
    let abs_v1 = site.release("v1").display().to_string();
    let dotted_v2 = "./releases/v2/".to_string();
    // The same releases reached through another name of the root (a symlinked /srv, a
    // `pwd -P` path) or through `..`: still inside releases/, still the operator's choice.
    let alias = site.tmp_path("alias");
    symlink(&site.root, &alias).unwrap();
    let alias_v1 = alias.join("releases/v1").display().to_string();
    let climbing_v2 = "releases/../releases/v2".to_string();
    for (target, id) in [
        (abs_v1.as_str(), "v1"),
        (dotted_v2.as_str(), "v2"),
        (alias_v1.as_str(), "v1"),
        (climbing_v2.as_str(), "v2"),
    ] {
        force_symlink(&site.current_path(), target);
        wait_until(
            WAIT,
            || site.current_target().as_deref() != Some(Path::new(target)),
            || format!("current -> {target} to be rewritten"),
        );
        // Never a switch to another release in between.
        assert_eq!(
            site.current_target().as_deref(),
            Some(Path::new(&format!("releases/{id}"))),
            "current -> {target} made relative, keeping {id}"
        );
    }
    svc.stop();
}

/// `.release-keeper/claims` turned into a regular file while the service runs: the claim
/// of the next upload fails, and the error names `.release-keeper/claims`, what is wrong
/// and must be fixed. It used to name the marker, which is fine.
#[test]
fn a_claim_that_fails_on_the_claims_directory_names_it() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    let claims = site.root.join(".release-keeper/claims");
    fs::remove_dir(&claims).unwrap();
    fs::write(&claims, b"").unwrap();
    site.deploy(&as_refs(&small_build("v1")), "");
    let failed = svc.wait_event(
        "site.error",
        |v| reason_of(v).contains("Not a directory"),
        WAIT,
    );
    let reason = reason_of(&failed);
    assert!(
        reason.contains(".release-keeper/claims") && !reason.contains(".release-ready"),
        "the error names .release-keeper/claims, not the marker: {reason}"
    );
    svc.stop();
}

/// `current -> releases/v1/` (a trailing slash, made by hand: `ln -sfn releases/v1/
/// current`) is rewritten to the canonical `releases/v1`, as `./releases/v1` is, keeping
/// the release. `Path` comparison ignores a trailing slash, so it used to be taken for
/// canonical and left as it was.
#[test]
fn current_with_a_trailing_slash_is_made_canonical_not_switched() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");
    for (target, id) in [("releases/v1/", "v1"), ("releases//v2//", "v2")] {
        force_symlink(&site.current_path(), target);
        wait_until(
            WAIT,
            || site.current_target().as_deref().map(Path::as_os_str) != Some(target.as_ref()),
            || format!("current -> {target} to be rewritten"),
        );
        assert_eq!(
            site.current_target().map(|t| t.as_os_str().to_os_string()),
            Some(format!("releases/{id}").into()),
            "current -> {target} made canonical, keeping {id}"
        );
        wait_repaired(&svc, &["non-canonical target", &format!("releases/{id}")]);
    }
    svc.stop();
}

/// A pid that cannot be a live process (above the kernel's pid_max).
const DEAD_PID: u32 = 99_999_999;

#[test]
fn leftover_partials_and_temporary_links_are_removed_at_start() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();

    // What a crash leaves: a half-built, partly read-only release, and temporary names.
    let partial = site.releases_dir().join(".partial.v2");
    write_tree(&partial, &[("a/b/index.html", b"half" as &[u8])]);
    for d in ["a/b", "a", ""] {
        fs::set_permissions(
            partial.join(d),
            std::os::unix::fs::PermissionsExt::from_mode(0o555),
        )
        .unwrap();
    }
    // A dotted id ends like a temporary name's `.<pid>.<n>` (here pid 2, always alive):
    // a partial is removed all the same.
    write_tree(
        &site.releases_dir().join(".partial.v1.2.0"),
        &[("index.html", b"half" as &[u8])],
    );
    let dead = |name: &str| format!(".rk-tmp.{name}.{DEAD_PID}.0");
    symlink("releases/v1", site.root.join(dead("current"))).unwrap();
    // A shared file's seed copy, held for an upload the crash cut short.
    fs::create_dir_all(site.root.join("shared")).unwrap();
    fs::write(site.root.join("shared").join(dead(".env")), b"DB=x\n").unwrap();
    fs::write(
        site.root.join(".release-keeper").join(dead("journal")),
        b"x",
    )
    .unwrap();
    fs::write(
        site.root
            .join(".release-keeper/claims")
            .join(dead("x.claim")),
        b"{",
    )
    .unwrap();
    // A temporary name of a live process (this test) may be in use: left alone.
    let live = site
        .root
        .join(format!(".rk-tmp.drift.json.{}.0", std::process::id()));
    fs::write(&live, b"in use").unwrap();

    let mut svc = Service::start_config(&cfg);
    let leftovers = |site: &Site| {
        let mut v = site.hidden_release_entries();
        for dir in [
            site.root.clone(),
            site.root.join(".release-keeper"),
            site.root.join(".release-keeper/claims"),
            site.root.join("shared"),
        ] {
            for e in fs::read_dir(&dir).unwrap() {
                let n = e.unwrap().file_name().to_string_lossy().to_string();
                if n.starts_with(".rk-tmp") && n.contains(&DEAD_PID.to_string()) {
                    v.push(n);
                }
            }
        }
        v
    };
    assert!(
        leftovers(&site).is_empty(),
        "healed before daemon.started: {:?}",
        leftovers(&site)
    );
    assert!(live.exists(), "a live process's temporary file was removed");
    wait_repaired(&svc, &[".partial.v2", "interrupted build"]);
    wait_repaired(&svc, &[".partial.v1.2.0", "interrupted build"]);
    wait_repaired(&svc, &[".rk-tmp.current"]);
    wait_repaired(&svc, &[".rk-tmp..env"]);
    assert_eq!(site.release_ids(), ["v1"]);
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    svc.stop();
}

/// Starts the service, deploys v1 and kills it (SIGKILL) once v1's marker is consumed and
/// resolved but nothing is built (a long settle_time holds it); returns the config.
fn killed_with_v1_claimed(site: &Site) -> PathBuf {
    let (cfg, svc) = start_site(site, SITE, "settle_time = \"1h\"", "");
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    svc.wait_release_event("upload.detected", "v1");
    site.wait_marker_consumed(WAIT);
    signal(&svc, Signal::SIGKILL);
    svc.wait_exit(WAIT);
    cfg
}

#[test]
fn consumed_marker_of_an_interrupted_upload_is_redone() {
    let site = Site::new();
    let cfg = killed_with_v1_claimed(&site);
    assert!(site.current_target().is_none());

    site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    let ev = wait_repaired(&svc, &["v1", "never completed"]);
    assert_eq!(ev["site"], SITE);
    svc.wait_release_event("release.activated", "v1");
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    assert_eq!(
        fs::read(site.release("v1").join("index.html")).unwrap(),
        small_build("v1")[0].1
    );
    svc.stop();
}

/// An upload cut short by a crash, then replaced in `deploy-cache/` by the next one while
/// the keeper was down: its claim must not be redone from the newer files under its id.
#[test]
fn interrupted_upload_replaced_while_down_is_superseded_not_redone_from_the_new_files() {
    let site = Site::new();
    let cfg = killed_with_v1_claimed(&site);

    site.deploy(&as_refs(&small_build("v2")), "id = \"v2\"\n");
    site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    let ev = svc.wait_release_event("release.rejected", "v1");
    assert!(reason_of(&ev).contains("superseded"), "{ev}");
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(site.release_ids(), ["v2"], "no v1 built from v2's files");
    assert_eq!(
        fs::read(site.release("v2").join("index.html")).unwrap(),
        small_build("v2")[0].1
    );
    assert_eq!(site.claim_count(), 0);
    svc.stop();
}

#[test]
fn missing_links_and_shared_entries_are_recreated() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(
        &site,
        SITE,
        "heal_interval = \"1h\"",
        "shared = [\"storage\"]\nlinks = { htdocs = \"current/public\" }",
    );
    site.deploy(
        &[("public/index.html", b"<h1>v1</h1>\n" as &[u8])],
        "id = \"v1\"\n",
    );
    svc.wait_release_event("release.activated", "v1");
    let htdocs = site.root.join("htdocs");
    assert!(htdocs.join("index.html").is_file());

    // A deleted link comes back (inotify in the root).
    fs::remove_file(&htdocs).unwrap();
    wait_until(
        WAIT,
        || htdocs.join("index.html").is_file(),
        || "htdocs recreated".into(),
    );
    wait_repaired(&svc, &["htdocs", "missing or wrong"]);
    // A link pointing elsewhere is corrected.
    force_symlink(&htdocs, "deploy-cache");
    wait_until(
        WAIT,
        || fs::read_link(&htdocs).ok().as_deref() == Some(Path::new("current/public")),
        || format!("htdocs corrected, is {:?}", fs::read_link(&htdocs)),
    );

    // A deleted shared entry: `shared/` is watched for it (see
    // shared_dir_entry_deleted_while_running_is_recreated_at_once); a SIGHUP on top of
    // that changes nothing.
    let storage = site.root.join("shared/storage");
    assert!(storage.is_dir());
    fs::remove_dir_all(&storage).unwrap();
    signal(&svc, Signal::SIGHUP);
    wait_until(
        WAIT,
        || storage.is_dir(),
        || "shared/storage recreated".into(),
    );
    wait_repaired(&svc, &["storage", "shared entry missing"]);
    assert!(
        site.release("v1").join("storage").is_dir(),
        "the release's shared link resolves again"
    );
    let _ = cfg;
    svc.stop();
}

#[test]
fn heal_interval_heals_what_inotify_does_not_see() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(
        &site,
        SITE,
        "heal_interval = \"1s\"",
        "shared = [\"cache\"]",
    );
    deploy_and_activate(&site, &svc, "v1");
    settle_after_deploy();
    let cache = site.root.join("shared/cache");
    fs::remove_dir_all(&cache).unwrap();
    wait_until(
        Duration::from_secs(5),
        || cache.is_dir(),
        || "shared/cache recreated by the periodic pass".into(),
    );
    svc.stop();
}

/// The service keeps directory listings (and its lock file) from one pass to the next
/// once the site's directories have settled: what changes after a long idle stretch, in
/// directories inotify does not watch, is still found by the periodic pass.
#[test]
fn periodic_pass_after_an_idle_stretch_still_sees_every_change() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1s\"", "");
    deploy_and_activate(&site, &svc, "v1");
    let state = site.root.join(".release-keeper");
    // Longer than it takes a directory to count as settled (3 s), plus a pass.
    let settle = || std::thread::sleep(Duration::from_secs(5));
    settle();
    // The pid part does not parse, so the name belongs to no live process.
    let tmp = state.join("manifests/.rk-tmp.x.99999999.1");
    fs::write(&tmp, b"").unwrap();
    let junk = state.join("trash/junk");
    fs::create_dir_all(&junk).unwrap();
    wait_until(
        Duration::from_secs(5),
        || !tmp.exists() && !junk.exists(),
        || "the periodic pass to remove a temporary file and a trash entry".into(),
    );

    settle();
    let lock = state.join("lock");
    fs::remove_file(&lock).unwrap();
    fs::create_dir(&lock).unwrap();
    wait_repaired(&svc, &["foreign lock"]);
    // The lock the service takes is the new lock file: a CLI command holding it keeps
    // the service's next job waiting.
    wait_until(
        Duration::from_secs(5),
        || lock.is_file(),
        || "a new lock file".into(),
    );
    settle();
    let held = fs::OpenOptions::new().write(true).open(&lock).unwrap();
    held.lock().unwrap();
    site.stage_upload(&as_refs(&small_build("v2")));
    site.drop_marker("id = \"v2\"\n");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "no job while the lock is held elsewhere"
    );
    drop(held);
    svc.wait_release_event("release.activated", "v2");
    let _ = cfg;
    svc.stop();
}

#[test]
fn stale_lock_of_a_killed_process_does_not_block() {
    let site = Site::new();
    let hook = r#"before_activate = ["/bin/sh", "-c", "if [ \"$RELEASE_ID\" = slow ]; then echo $$ > \"$SITE_ROOT/../hook-pid\"; mv \"$SITE_ROOT/../hook-pid\" \"$SITE_ROOT/../hook-slow\"; exec sleep 30; fi"]"#;
    let (cfg, svc) = start_site(&site, SITE, "", hook);
    deploy_and_activate(&site, &svc, "v1");
    site.deploy(&as_refs(&small_build("slow")), "id = \"slow\"\n");
    let flag = site.tmp_path("hook-slow");
    wait_until(WAIT, || flag.exists(), || "slow hook to start".into());
    // The service holds the operation lock now; it dies holding it.
    let out = cli(&cfg, &["pin", SITE, "v1"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "busy while working; {}",
        show(&out)
    );
    signal(&svc, Signal::SIGKILL);
    svc.wait_exit(WAIT);
    drop(svc);
    // Stop the orphaned hook too (started by the service this test started), by its pid.
    if let Ok(pid) = fs::read_to_string(&flag)
        .unwrap_or_default()
        .trim()
        .parse::<i32>()
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    // Old lock files with content of some other tool's making mean nothing either.
    fs::write(site.root.join(".release-keeper/lock"), b"12345\n").unwrap();

    let t0 = Instant::now();
    let out = cli(&cfg, &["pin", SITE, "v1"]);
    assert_ok(&out, "pin right after the holder was killed");
    assert!(t0.elapsed() < Duration::from_secs(5));
    site.write_config(SITE, "", "");
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal redoes the interrupted upload");
    assert!(
        stdout_of(&out).contains("slow"),
        "heal says it redid `slow`; {}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("slow"));
}

/// Every configured link a pass recreates is said, not only the first: `heal` reports
/// (and the service logs `heal.repaired` for) each of them, as `heal --dry-run` lists them.
/// Recreating the first missing link used to make all of them at once, so the pass then
/// found the others in place and said nothing of them.
#[test]
fn heal_says_every_link_it_recreates() {
    let site = Site::new();
    let links =
        "links = { htdocs = \"current\", \"web/root\" = \"../current\", api = \"current\" }";
    let (cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1h\"", links);
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
    let names = ["htdocs", "web/root", "api"];
    for l in names {
        fs::remove_file(site.root.join(l)).unwrap();
    }
    let dry = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert_ok(&dry, "heal --dry-run");
    let out = cli(&cfg, &["heal", SITE, "--log-format", "json"]);
    assert_ok(&out, "heal");
    let repaired: Vec<String> = stderr_events(&out)
        .iter()
        .filter(|e| e["event"] == "heal.repaired")
        .map(|e| e["what"].as_str().unwrap_or("").to_string())
        .collect();
    for l in names {
        assert!(
            stdout_of(&dry).contains(l),
            "dry run lists {l}; {}",
            show(&dry)
        );
        assert!(
            stdout_of(&out).contains(&format!("{l} ->")),
            "heal says it linked {l}; {}",
            show(&out)
        );
        assert!(
            repaired.iter().any(|w| w.contains(&format!("{l} ->"))),
            "heal.repaired for {l}: {repaired:?}"
        );
        assert!(
            site.root.join(l).join("index.html").is_file(),
            "{l} leads to the current release again"
        );
    }
}

/// SPEC: exit 1 when an operation "found a problem". `heal` exited 0 after reporting a
/// problem it must leave to an operator (a hand-made directory in `releases/`), so a timer
/// or script running it never noticed. What it repaired, or a tree with nothing wrong, is
/// success; a dry run only says what a pass would do, and succeeds too.
#[test]
fn heal_exits_1_when_it_leaves_a_problem_unrepaired_and_0_when_it_repaired_all() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.stage_upload(&as_refs(&small_build("v1")));
    assert_ok(&cli(&cfg, &["finalize", SITE, "--id", "v1"]), "finalize v1");

    // Only repairs: success.
    fs::remove_file(site.current_path()).unwrap();
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal that repaired `current`");
    assert_eq!(site.current_id().as_deref(), Some("v1"), "{}", show(&out));
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal with nothing to heal");
    assert!(
        stdout_of(&out).contains("nothing to heal"),
        "{}",
        show(&out)
    );

    // A repair and a problem left alone: the problem decides.
    write_tree(
        &site.releases_dir().join("handmade"),
        &[("index.html", b"by hand\n" as &[u8])],
    );
    fs::remove_file(site.current_path()).unwrap();
    let dry = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert_ok(&dry, "heal --dry-run only says what it would do");
    assert!(stdout_of(&dry).contains("not made by"), "{}", show(&dry));
    let out = cli(&cfg, &["heal", SITE]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "heal found a problem it did not repair: {}",
        show(&out)
    );
    assert!(stdout_of(&out).contains("not made by"), "{}", show(&out));
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "repaired all the same"
    );
    // Still there at the next pass: still a failure.
    let out = cli(&cfg, &["heal", SITE]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
}

#[test]
fn foreign_lock_paths_are_moved_aside() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
    let state = site.root.join(".release-keeper");
    for name in ["lock", "service.lock"] {
        let p = state.join(name);
        fs::remove_file(&p).unwrap();
        fs::create_dir(&p).unwrap();
        fs::write(p.join("owner"), name).unwrap();
    }
    // The CLI copes...
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal with a directory in place of the lock");
    // ...and so does the service.
    fs::remove_file(state.join("lock")).unwrap();
    fs::create_dir(state.join("lock")).unwrap();
    let mut svc = Service::start_config(&cfg);
    wait_repaired(&svc, &["foreign lock"]);
    deploy_and_activate(&site, &svc, "v2");
    svc.stop();
    let kept: Vec<String> = displaced(&site)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert!(
        kept.iter().filter(|n| n.starts_with("lock.")).count() == 2
            && kept.iter().any(|n| n.starts_with("service.lock.")),
        "the foreign lock paths are kept aside: {kept:?}"
    );
}

#[test]
fn foreign_releases_are_reported_never_deleted_or_counted() {
    let site = Site::new();
    write_tree(
        &site.releases_dir().join("handmade"),
        &[("index.html", b"by hand\n" as &[u8])],
    );
    let (cfg, mut svc) = start_site(&site, SITE, "keep = 1", "");
    for id in ["v1", "v2", "v3", "v4"] {
        deploy_and_activate(&site, &svc, id);
    }
    svc.wait_release_event("release.pruned", "v2");
    assert_eq!(site.release_ids(), ["handmade", "v3", "v4"]);
    let out = cli_when_idle(&cfg, &["heal", SITE]);
    assert_left_a_problem(&out);
    assert!(
        stdout_of(&out).contains("handmade") && stdout_of(&out).contains("not made by"),
        "heal reports the foreign release; {}",
        show(&out)
    );
    let out = cli_when_idle(&cfg, &["list", SITE, "--json"]);
    assert_ok(&out, "list");
    assert!(
        !stdout_of(&out).contains("handmade"),
        "a foreign release is not listed as one of the keeper's: {}",
        show(&out)
    );
    // Not deleted by pruning, and never chosen by healing.
    let out = cli_when_idle(&cfg, &["prune", SITE]);
    assert_ok(&out, "prune");
    fs::remove_file(site.current_path()).unwrap();
    wait_current(&site, "v4", WAIT, "healing ignores the foreign release");
    assert!(site.release("handmade/index.html").is_file());
    svc.stop();
}

/// A lost or truncated journal (deleted by hand, a restore from an old backup) must not
/// turn the keeper's own releases into foreign ones: those would never be pruned again
/// (the disk fills) and `current` could no longer be healed. A release with a stored
/// manifest under `.release-keeper/` is the keeper's: healing records it again, and the
/// release `current` points at becomes the last activated one.
#[test]
fn releases_are_recovered_when_the_journal_is_lost() {
    for damage in ["deleted", "truncated"] {
        let site = Site::new();
        let (cfg, mut svc) = start_site(&site, SITE, "keep = 3", "");
        for id in ["v1", "v2", "v3"] {
            deploy_and_activate(&site, &svc, id);
        }
        svc.stop();
        let journal = site.root.join(".release-keeper/journal");
        match damage {
            "deleted" => fs::remove_file(&journal).unwrap(),
            _ => {
                // Only v1's finalized record survives.
                let text = fs::read_to_string(&journal).unwrap();
                fs::write(&journal, text.lines().next().unwrap().to_string() + "\n").unwrap();
            }
        }

        let out = cli(&cfg, &["heal", SITE, "--dry-run"]);
        assert_ok(&out, "heal --dry-run");
        assert!(
            stdout_of(&out).contains("v3") && !stdout_of(&out).contains("not made by"),
            "{damage} journal: the dry run says it would recover the keeper's releases: {}",
            show(&out)
        );
        let out = cli(&cfg, &["heal", SITE]);
        assert_ok(&out, "heal");
        let out = cli(&cfg, &["list", SITE, "--json"]);
        assert_ok(&out, "list");
        let list = stdout_json(&out);
        let ids: Vec<&str> = list["releases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            ["v3", "v2", "v1"],
            "{damage} journal: every release is the keeper's again: {}",
            show(&out)
        );
        assert_eq!(list["current"], "v3", "{damage} journal: {}", show(&out));

        // Healing `current` and pruning work on the recovered releases.
        let mut svc = Service::start_config(&cfg);
        fs::remove_file(site.current_path()).unwrap();
        wait_current(&site, "v3", WAIT, "current healed to the recovered release");
        deploy_and_activate(&site, &svc, "v4");
        svc.wait_release_event("release.pruned", "v1");
        svc.stop();
    }
}

/// With the journal lost, a release recorded again by healing is dated by when its
/// stored manifest was written (the keeper wrote it as the release was made), not by the
/// recovery: `list` showed every recovered release as created at the moment of the heal.
#[test]
fn a_recovered_release_is_dated_by_its_stored_manifest_not_the_recovery() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");
    svc.stop();
    let dated = [
        ("v1", "@1709618828", "2024-03-05T06:07:08Z"),
        ("v2", "@1709705228", "2024-03-06T06:07:08Z"),
    ];
    for (id, stamp, _) in dated {
        let manifest = site.root.join(".release-keeper/manifests").join(id);
        sh(
            &site.root,
            &format!("touch -h -d {stamp} '{}'", manifest.display()),
        );
    }
    fs::remove_file(site.root.join(".release-keeper/journal")).unwrap();
    assert_ok(&cli(&cfg, &["heal", SITE]), "heal");
    let out = cli(&cfg, &["list", SITE, "--json"]);
    assert_ok(&out, "list --json");
    let list = stdout_json(&out);
    let created: Vec<(&str, &str)> = list["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["created"].as_str().unwrap()))
        .collect();
    assert_eq!(
        created,
        [("v2", dated[1].2), ("v1", dated[0].2)],
        "created is the stored manifest's mtime: {}",
        show(&out)
    );
}

/// A pin is the operator's "never delete this": with the journal lost, the recovered
/// release must come back pinned (from `.release-keeper/pins`), not become prunable.
#[test]
fn pins_survive_the_loss_of_the_journal() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "keep = 1", "");
    // keep = 1 with v3 current and v2 previous: only its pin keeps v1.
    for id in ["v1", "v2", "v3"] {
        deploy_and_activate(&site, &svc, id);
        if id == "v1" {
            assert_ok(&cli(&cfg, &["pin", SITE, "v1"]), "pin v1");
        }
    }
    svc.stop();
    assert_ok(&cli(&cfg, &["pin", SITE, "v2"]), "pin v2");
    assert_ok(&cli(&cfg, &["unpin", SITE, "v2"]), "unpin v2");
    fs::remove_file(site.root.join(".release-keeper/journal")).unwrap();

    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal");
    assert!(
        stdout_of(&out).contains("release v1 in the journal, pinned"),
        "{}",
        show(&out)
    );
    let out = cli(&cfg, &["list", SITE, "--json"]);
    let list = stdout_json(&out);
    let pinned = |id: &str| {
        list["releases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .map(|r| r["pinned"].clone())
    };
    assert_eq!(pinned("v1"), Some(serde_json::json!(true)), "{list}");
    assert_eq!(pinned("v2"), Some(serde_json::json!(false)), "{list}");
    let out = cli(&cfg, &["prune", SITE, "--dry-run"]);
    assert_ok(&out, "prune --dry-run");
    assert!(
        !stdout_of(&out).contains("v1"),
        "the pinned v1 is not pruned: {}",
        show(&out)
    );
    assert!(site.release("v1").is_dir());
}

#[test]
fn heal_dry_run_lists_everything_and_changes_nothing() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(
        &site,
        SITE,
        "",
        "shared = [\"storage\"]\nlinks = { htdocs = \"current\" }",
    );
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();

    fs::remove_file(site.current_path()).unwrap();
    fs::remove_file(site.root.join("htdocs")).unwrap();
    fs::remove_dir_all(site.root.join("shared/storage")).unwrap();
    write_tree(
        &site.releases_dir().join(".partial.v2"),
        &[("x", b"x" as &[u8])],
    );
    symlink(
        "releases/v1",
        site.root.join(format!(".rk-tmp.current.{DEAD_PID}.7")),
    )
    .unwrap();
    let before = tree(&site.root, &[]);

    let out = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert_ok(&out, "heal --dry-run");
    let text = stdout_of(&out);
    for needle in [
        "current",
        ".partial.v2",
        "htdocs",
        "storage",
        ".rk-tmp.current",
    ] {
        assert!(
            text.contains(needle),
            "dry run mentions {needle}; {}",
            show(&out)
        );
    }
    assert!(
        text.contains("would"),
        "dry run says `would`; {}",
        show(&out)
    );
    assert_eq!(
        tree(&site.root, &[]),
        before,
        "heal --dry-run changed the tree"
    );

    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal");
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    assert!(site.root.join("htdocs/index.html").is_file());
    assert!(site.root.join("shared/storage").is_dir());
    assert!(site.hidden_release_entries().is_empty());
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "second heal");
    assert!(
        stdout_of(&out).contains("nothing to heal"),
        "a healed tree needs nothing; {}",
        show(&out)
    );
}

#[test]
fn deploy_cache_deleted_and_recreated_keeps_working() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1h\"", "");
    deploy_and_activate(&site, &svc, "v1");

    // Deleted and recreated at once.
    remove_deploy_cache(&site);
    fs::create_dir_all(site.deploy_cache()).unwrap();
    deploy_and_activate(&site, &svc, "v2");

    // Deleted, and left missing for a while (the keeper recreates it, or the uploader does).
    fs::remove_dir_all(site.deploy_cache()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = fs::create_dir(site.deploy_cache());
    deploy_and_activate(&site, &svc, "v3");
    svc.stop();
}

/// What an uploader does to empty `deploy-cache/`: `rm -rf` (its read-only leftovers made
/// writable first).
fn remove_deploy_cache(site: &Site) {
    make_writable(&site.deploy_cache());
    fs::remove_dir_all(site.deploy_cache()).unwrap();
}

fn assert_no_site_error(svc: &Service) {
    assert!(
        svc.events("site.error").is_empty(),
        "no error for a deploy-cache/ the uploader is replacing; log:\n{}",
        svc.log_text()
    );
}

/// The uploader's own ways of emptying `deploy-cache/` between deploys work while the
/// service runs: `rm -rf deploy-cache && mkdir deploy-cache`, and `mv build deploy-cache`.
/// The keeper used to make the directory again the moment it went (healing runs on every
/// event in the root), so the `mkdir` failed with "File exists" and the `mv` put the build
/// into `deploy-cache/build/`. It leaves that to the uploader now, and watches the new one.
#[test]
fn deploy_cache_removed_while_running_is_left_to_the_uploader() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1h\"", "");
    deploy_and_activate(&site, &svc, "v1");

    for round in 0..3 {
        remove_deploy_cache(&site);
        // Long enough for the healing pass the removal starts.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !site.deploy_cache().exists(),
            "round {round}: the keeper made deploy-cache/ again; log:\n{}",
            svc.log_text()
        );
        fs::create_dir(site.deploy_cache()).unwrap();
    }
    deploy_and_activate(&site, &svc, "v2");

    // A build renamed into place as a whole.
    let build = site.tmp_path("build");
    write_tree(&build, &as_refs(&small_build("v3")));
    write_sha256sums(&build);
    remove_deploy_cache(&site);
    std::thread::sleep(Duration::from_millis(300));
    fs::rename(&build, site.deploy_cache()).unwrap();
    site.drop_marker("id = \"v3\"\n");
    svc.wait_release_event("release.activated", "v3");
    assert_eq!(
        fs::read(site.release("v3").join("index.html")).unwrap(),
        b"<h1>v3</h1>\n"
    );
    assert_no_site_error(&svc);
    svc.stop();
}

/// An uploader that replaces `deploy-cache/` again and again (a CI loop of `rm -rf
/// deploy-cache && mkdir deploy-cache`, or `mv build deploy-cache`) races the keeper's
/// watch of it: a directory gone between the keeper's look and its watch is the same
/// removal, not an error (no `site.error`), and deploys work afterwards.
#[test]
fn deploy_cache_replaced_in_a_tight_loop_logs_no_error() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1h\"", "");
    deploy_and_activate(&site, &svc, "v1");
    for round in 0..300 {
        remove_deploy_cache(&site);
        std::thread::sleep(Duration::from_micros(round % 7 * 500));
        fs::create_dir(site.deploy_cache()).unwrap();
        std::thread::sleep(Duration::from_micros(round % 5 * 500));
    }
    deploy_and_activate(&site, &svc, "v2");
    assert_no_site_error(&svc);
    svc.stop();
}

#[test]
fn root_that_appears_after_start_is_served() {
    let site = Site::new();
    let root = site.tmp_path("late/root");
    fs::create_dir_all(root.parent().unwrap()).unwrap();
    let cfg = site.tmp_path("config.toml");
    fs::write(
        &cfg,
        format!(
            "[defaults]\nheal_interval = \"1h\"\n\n[sites.{SITE}]\nroot = \"{}\"\n",
            root.display()
        ),
    )
    .unwrap();
    let mut svc = Service::start_config(&cfg);
    assert!(!root.exists());
    fs::create_dir(&root).unwrap();
    wait_until(
        WAIT,
        || root.join("deploy-cache").is_dir() && root.join("releases").is_dir(),
        || "the layout of the late root to be created".into(),
    );
    let upload = root.join("deploy-cache");
    write_tree(&upload, &as_refs(&small_build("late")));
    write_sha256sums(&upload);
    fs::write(upload.join(MARKER), "id = \"late\"\n").unwrap();
    svc.wait_release_event("release.activated", "late");
    assert_eq!(
        fs::read_link(root.join("current")).unwrap(),
        Path::new("releases/late")
    );
    svc.stop();
}

/// True for the `site.error` that says the root at `root` is not a directory.
fn says_root_is_not_a_directory(v: &Value, root: &Path) -> bool {
    v["root"] == root.to_str().unwrap() && reason_of(v).contains("is not a directory")
}

/// The messages of the service's log lines from index `from` on that say a root "does
/// not exist".
fn says_missing_since(svc: &Service, from: usize) -> Vec<String> {
    svc.json_lines()[from..]
        .iter()
        .map(Value::to_string)
        .filter(|l| l.contains("does not exist"))
        .collect()
}

/// A site's root replaced by a file while the service runs: every pass failed on
/// `.release-keeper/lock: Not a directory` and a root that is a file was said to "not
/// exist yet". It is said once, as what it is; the service keeps waiting, and serves the
/// site again (deploys included) once a directory is back.
#[test]
fn a_root_replaced_by_a_file_while_running_is_reported_as_such_and_recovered_from() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1s\"", "");
    deploy_and_activate(&site, &svc, "v1");
    let from = svc.json_lines().len();
    let aside = site.tmp_path("root-aside");
    fs::rename(&site.root, &aside).unwrap();
    fs::write(&site.root, b"not a directory\n").unwrap();
    svc.wait_event(
        "site.error",
        |v| says_root_is_not_a_directory(v, &site.root),
        WAIT,
    );
    // Still waiting a few passes later, having said it once. (Between the rename and the
    // write the root was missing for a moment, which a pass may have seen and said.)
    std::thread::sleep(Duration::from_millis(2500));
    assert!(svc.is_running(), "log:\n{}", svc.log_text());
    let lines = svc.json_lines();
    let said: Vec<usize> = (from..lines.len())
        .filter(|&i| {
            lines[i]["event"] == "site.error" && says_root_is_not_a_directory(&lines[i], &site.root)
        })
        .collect();
    assert_eq!(said.len(), 1, "said once; log:\n{}", svc.log_text());
    assert!(
        says_missing_since(&svc, said[0]).is_empty(),
        "a file in the root's place is not a root that does not exist: {:?}",
        says_missing_since(&svc, said[0])
    );

    fs::remove_file(&site.root).unwrap();
    fs::rename(&aside, &site.root).unwrap();
    svc.wait_event("site.resumed", |v| v["site"] == SITE, WAIT);
    deploy_and_activate(&site, &svc, "v2");
    svc.stop();
}

/// At start, a root not made yet is waited for; a file that then appears in its place is
/// said to be no directory (it was left as "does not exist yet"), and a directory after
/// it is served.
#[test]
fn a_file_appearing_where_a_missing_root_was_awaited_is_reported_as_such() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "heal_interval = \"1s\"", "");
    fs::remove_dir_all(&site.root).unwrap();
    let mut svc = Service::start_config(&cfg);
    svc.wait_event("site.waiting", |v| v["site"] == SITE, WAIT);
    let from = svc.json_lines().len();
    fs::write(&site.root, b"not a directory\n").unwrap();
    svc.wait_event(
        "site.error",
        |v| says_root_is_not_a_directory(v, &site.root),
        WAIT,
    );
    assert!(
        says_missing_since(&svc, from).is_empty(),
        "log:\n{}",
        svc.log_text()
    );
    fs::remove_file(&site.root).unwrap();
    fs::create_dir_all(site.deploy_cache()).unwrap();
    svc.wait_event("site.resumed", |v| v["site"] == SITE, WAIT);
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
}

#[test]
fn inotify_queue_overflow_triggers_a_full_rescan() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1h\"", "");
    deploy_and_activate(&site, &svc, "v1");
    // Stopped, the service cannot read its inotify queue: flood it past its limit, then
    // drop the marker (its event is lost in the overflow).
    let cont = stop_until_continued(&svc);
    site.stage_upload(&as_refs(&small_build("v2")));
    flood_inotify_queue(&site.deploy_cache());
    site.drop_marker("id = \"v2\"\n");
    drop(cont); // SIGCONT
    svc.wait_release_event("release.activated", "v2");
    // The overflow is the last event of a full queue, and the watcher logs it when it gets
    // there: a pass already due before the stop (the healing v1's swap started) may find
    // the marker first, so the line can come after the activation. Reading the log at
    // once failed about one run in fifty.
    svc.wait_event("watch.overflow", |v| v["site"] == SITE, WAIT);
    svc.stop();
}

/// Makes more events in `dir` than an inotify queue holds: each create, write, close and
/// remove is several events, so half the limit of files is enough.
fn flood_inotify_queue(dir: &Path) {
    let max: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16384);
    for i in 0..max / 2 + 100 {
        let p = dir.join(format!("flood-{i}"));
        fs::write(&p, b"").unwrap();
        fs::remove_file(&p).unwrap();
    }
}

/// Sends SIGCONT to `pid` when dropped (also when the test panics while it is stopped).
struct Cont(i32);

impl Drop for Cont {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// Stops the service (SIGSTOP) and waits until every one of its threads is stopped, so
/// that none reads its inotify queue any more; it continues when the guard is dropped.
/// `kill` only queues the signal: a thread still running meanwhile (the machine busy with
/// other tests) could drain part of a flood meant to overflow the queue.
fn stop_until_continued(svc: &Service) -> Cont {
    let pid = svc.pid();
    let cont = Cont(pid);
    signal(svc, Signal::SIGSTOP);
    let all_stopped = || {
        fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
            tasks.flatten().all(|t| {
                fs::read_to_string(t.path().join("stat"))
                    // The state follows the parenthesised command name.
                    .is_ok_and(|st| st.rsplit(") ").next().is_some_and(|r| r.starts_with('T')))
            })
        })
    };
    wait_until(WAIT, all_stopped, || format!("service {pid} to be stopped"));
    cont
}

/// A shared entry that was created as a file (seeded from the upload's `.env`) is never
/// recreated as a directory or an empty file: healing reports it for a person to restore,
/// while a missing shared directory is recreated.
#[test]
fn missing_shared_file_is_reported_not_recreated_as_a_directory() {
    let site = Site::new();
    let cfg = site.write_config("app", "", "shared = [\".env\", \"storage\"]");
    let mut svc = Service::start_config(&cfg);
    let files: Vec<(&str, &[u8])> = vec![("index.html", b"hi"), (".env", b"APP_KEY=1\n")];
    site.deploy(&files, "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    let shared = site.root.join("shared");
    assert!(shared.join(".env").is_file(), "seeded from the upload");
    assert!(shared.join("storage").is_dir());
    svc.stop();

    std::fs::remove_file(shared.join(".env")).unwrap();
    std::fs::remove_dir(shared.join("storage")).unwrap();
    let out = cli(&cfg, &["heal", "app"]);
    assert_left_a_problem(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        shared.join("storage").is_dir(),
        "shared dir recreated: {text}"
    );
    assert!(
        std::fs::symlink_metadata(shared.join(".env")).is_err(),
        "a shared file must not come back as a directory or empty file: {text}"
    );
    assert!(
        text.contains(".env") && text.contains("restore"),
        "reported: {text}"
    );
}

/// A shared file the operator put in `shared/` before the first deploy (the usual way to
/// provide `.env`) is a file too: once deleted, healing reports it and never recreates it
/// as a directory, which the app would fail to read as its settings.
#[test]
fn operator_provided_shared_file_is_not_recreated_as_a_directory() {
    let site = Site::new();
    let cfg = site.write_config("app", "", "shared = [\".env\"]");
    let shared = site.root.join("shared");
    fs::create_dir_all(&shared).unwrap();
    fs::write(shared.join(".env"), "APP_KEY=1\n").unwrap();
    let mut svc = Service::start_config(&cfg);
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();

    fs::remove_file(shared.join(".env")).unwrap();
    let out = cli(&cfg, &["heal", "app"]);
    assert_left_a_problem(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        fs::symlink_metadata(shared.join(".env")).is_err(),
        "an operator's shared file must not come back as a directory: {text}"
    );
    assert!(
        text.contains(".env") && text.contains("restore"),
        "reported: {text}"
    );
}

/// The same for a shared file kept elsewhere and linked in by the operator
/// (`shared/.env -> /etc/shop/env`): a link to a file is a file entry; once the link is
/// deleted, healing must not make `.env` a directory.
#[test]
fn operator_linked_shared_file_is_not_recreated_as_a_directory() {
    let site = Site::new();
    let cfg = site.write_config("app", "", "shared = [\".env\"]");
    assert_ok(&cli(&cfg, &["init", "app"]), "init");
    let kept = site.tmp_path("shop.env");
    fs::write(&kept, "APP_KEY=1\n").unwrap();
    let shared = site.root.join("shared");
    symlink(&kept, shared.join(".env")).unwrap();
    clear_dir(&site.deploy_cache());
    write_tree(&site.deploy_cache(), &[("index.html", b"v1\n")]);
    write_sha256sums(&site.deploy_cache());
    assert_ok(&cli(&cfg, &["finalize", "app", "--id", "v1"]), "finalize");

    fs::remove_file(shared.join(".env")).unwrap();
    let out = cli(&cfg, &["heal", "app"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        fs::symlink_metadata(shared.join(".env")).is_err(),
        "a linked-in shared file must not come back as a directory: {text}"
    );
    assert!(
        text.contains(".env") && text.contains("restore"),
        "reported: {text}"
    );
}

/// The `heal.repaired` events of repairs that concern a release name it in `release`:
/// above all the release `current` is pointed at again, which a monitor needs to know
/// what is being served.
#[test]
fn heal_repaired_names_the_release_current_now_points_at() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");
    svc.stop();

    // A real directory in place of `current` (moved aside, then `current` relinked), and
    // a half-built release.
    fs::remove_file(site.current_path()).unwrap();
    fs::create_dir(site.current_path()).unwrap();
    write_tree(
        &site.releases_dir().join(".partial.v3"),
        &[("index.html", b"half" as &[u8])],
    );

    let out = cli(&cfg, &["heal", SITE, "--log-format", "json"]);
    assert_ok(&out, "heal");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    let events: Vec<Value> = stderr_events(&out)
        .into_iter()
        .filter(|v| v["event"] == "heal.repaired")
        .collect();
    let find = |needle: &str| {
        events
            .iter()
            .find(|v| v.to_string().contains(needle))
            .unwrap_or_else(|| panic!("no heal.repaired with {needle:?}: {}", show(&out)))
            .clone()
    };
    let pointed = find("pointed current at releases/v2");
    assert_eq!(
        pointed["release"], "v2",
        "healing that repoints current names the release it now points at: {pointed}"
    );
    let aside = find("aside to");
    assert_eq!(aside["release"], "v2", "{aside}");
    let partial = find(".partial.v3");
    assert_eq!(partial["release"], "v3", "{partial}");
    for ev in &events {
        assert_eq!(ev["site"], SITE, "{ev}");
    }
}

/// An inotify overflow is process-wide, but every event names its site: it is logged once
/// for each site it makes rescan (not once per watched directory, and never without a
/// `site`).
#[test]
fn inotify_overflow_is_logged_once_per_site_with_its_name() {
    let site = Site::new();
    let other = site.tmp_path("other");
    fs::create_dir_all(other.join("deploy-cache")).unwrap();
    let cfg = site.write_config(
        SITE,
        "heal_interval = \"1h\"",
        &format!("\n[sites.api]\nroot = \"{}\"\n", other.display()),
    );
    let mut svc = Service::start_config(&cfg);
    let cont = stop_until_continued(&svc);
    flood_inotify_queue(&site.deploy_cache());
    drop(cont); // SIGCONT
    svc.wait_count("watch.overflow", 1, WAIT);
    // Still serving after the rescan; stopping reads the log to its end before counting.
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
    let evs_now = svc.events("watch.overflow");
    let count = |name: &str| evs_now.iter().filter(|v| v["site"] == name).count();
    assert!(
        evs_now
            .iter()
            .all(|v| v["site"] == SITE || v["site"] == "api"),
        "every watch.overflow names one site: {evs_now:?}"
    );
    assert!(count(SITE) >= 1, "{evs_now:?}");
    assert_eq!(
        count(SITE),
        count("api"),
        "once per site per overflow (web has two watched directories): {evs_now:?}"
    );
}

/// A trashed tree that cannot be deleted (here an immutable file) is reported and left for
/// the next pass; it must not stop the pass before `current` is repaired.
/// A file made immutable (`chattr +i`) for a test, made mutable again (everything under
/// `under`) when dropped, whatever happens, so the temp dir can be removed.
struct Immutable(PathBuf);

impl Immutable {
    /// None where `chattr +i` is not possible (not root, or a filesystem without it).
    fn set(file: &Path, under: &Path) -> Option<Immutable> {
        std::process::Command::new("chattr")
            .arg("+i")
            .arg(file)
            .status()
            .is_ok_and(|s| s.success())
            .then(|| Immutable(under.to_path_buf()))
    }

    fn undo(&self) {
        let _ = std::process::Command::new("chattr")
            .args(["-R", "-i"])
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        self.undo();
    }
}

#[test]
fn undeletable_trash_entry_does_not_block_repairing_current() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1h\"", "");
    deploy_and_activate(&site, &svc, "v1");
    let stuck = site.root.join(".release-keeper/trash/old.1.0");
    fs::create_dir_all(&stuck).unwrap();
    let file = stuck.join("pinned");
    fs::write(&file, b"x").unwrap();
    let Some(_undo) = Immutable::set(&file, &file) else {
        eprintln!("skipped: chattr +i is not possible here (needs root and a filesystem that supports it)");
        svc.stop();
        return;
    };

    fs::remove_file(site.current_path()).unwrap();
    wait_current(
        &site,
        "v1",
        Duration::from_secs(5),
        "current repaired despite a trash entry that cannot be deleted",
    );
    let warned = svc.wait_event(
        "site.error",
        |v| v["path"].as_str().is_some_and(|p| p.ends_with("old.1.0")),
        WAIT,
    );
    assert_eq!(warned["site"], SITE, "{warned}");
    assert!(stuck.exists(), "the stubborn entry stays for the next pass");
    svc.stop();
}

/// deploy-cache/ on another filesystem is claimed in two steps (rename to a hidden name in
/// deploy-cache/, then copy into the claims). A crash between them left the hidden marker
/// behind: the upload was lost, and the hidden file, not in SHA256SUMS, got every later
/// upload rejected. The next start finishes the claim instead.
#[test]
fn claim_across_filesystems_cut_short_by_a_crash_is_finished_at_start() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.stage_upload(&as_refs(&small_build("v1")));
    // Named as the claim makes it: `.rk-tmp.<24-digit time>-<pid>`; the pid is long gone.
    let hidden = site
        .deploy_cache()
        .join(".rk-tmp.000001796277318447591246-4194999");
    fs::write(&hidden, "id = \"v1\"\nmessage = \"cut short\"\n").unwrap();

    let mut svc = Service::start_config(&cfg);
    svc.wait_release_event("release.activated", "v1");
    assert!(!hidden.exists(), "the hidden marker must be consumed");
    assert!(
        !site
            .release("v1")
            .join(hidden.file_name().unwrap())
            .exists(),
        "the hidden marker must not end up in the release"
    );
    let repaired = svc.wait_event(
        "heal.repaired",
        |v| v.to_string().contains("hidden as"),
        WAIT,
    );
    assert_eq!(repaired["site"], SITE, "{repaired}");

    // And the next upload is not rejected for an unlisted file.
    deploy_and_activate(&site, &svc, "v2");
    svc.stop();
}

/// What healing leaves for a person (a hand-made release, a real directory where a
/// configured link belongs) is logged when it appears, once: every inotify event in the
/// root starts a pass, and repeating the warning at each would flood log-based alerts.
/// Put right and broken again, it is logged again.
#[test]
fn what_healing_leaves_alone_is_reported_once_per_appearance() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "links = { htdocs = \"current\" }");
    deploy_and_activate(&site, &svc, "v1");
    let reported = |svc: &Service, needle: &str| {
        svc.events("heal.reported")
            .into_iter()
            .filter(|v| reason_of(v).contains(needle))
            .count()
    };
    write_tree(
        &site.releases_dir().join("handmade"),
        &[("index.html", b"by hand\n" as &[u8])],
    );
    fs::remove_file(site.root.join("htdocs")).unwrap();
    fs::create_dir(site.root.join("htdocs")).unwrap();
    let ev = svc.wait_event("heal.reported", |v| reason_of(v).contains("handmade"), WAIT);
    assert_eq!(release_of(&ev), Some("handmade"), "{ev}");
    svc.wait_event(
        "heal.reported",
        |v| reason_of(v).contains("htdocs is not a symlink"),
        WAIT,
    );
    // More passes: events in the root, each starting one.
    for i in 0..5 {
        fs::write(site.root.join(format!("stray-{i}")), b"x").unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(reported(&svc, "handmade"), 1, "{}", svc.log_text());
    assert_eq!(reported(&svc, "htdocs is not a symlink"), 1);
    // Gone, then back: a new appearance, logged again.
    fs::rename(
        site.releases_dir().join("handmade"),
        site.root.join("handmade-away"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    fs::rename(
        site.root.join("handmade-away"),
        site.releases_dir().join("handmade"),
    )
    .unwrap();
    wait_until(
        WAIT,
        || reported(&svc, "handmade") == 2,
        || {
            format!(
                "a second report after it came back; log:\n{}",
                svc.log_text()
            )
        },
    );
    svc.stop();
}

/// A site whose layout is broken (here `releases` is a file) must not take the whole
/// service down: the service exited with an error, so systemd restarted it in a loop and
/// no other site was served. The broken site is logged with the path, retried at each
/// healing pass, and served once fixed.
#[test]
fn a_broken_site_does_not_stop_the_other_sites() {
    let good = Site::new();
    let broken = Site::new();
    fs::write(broken.releases_dir(), "not a directory\n").unwrap();
    let cfg = good.tmp_path("two.toml");
    fs::write(
        &cfg,
        format!(
            "[sites.good]\nroot = \"{}\"\n\n[sites.broken]\nroot = \"{}\"\nheal_interval = \"1s\"\n",
            good.root.display(),
            broken.root.display()
        ),
    )
    .unwrap();
    let mut svc = Service::start_config(&cfg);
    let err = svc.wait_event(
        "site.error",
        |v| v["site"] == "broken" && v.to_string().contains("releases"),
        WAIT,
    );
    assert!(
        err.to_string().contains("not a directory"),
        "the error says what is wrong: {err}"
    );
    deploy_and_activate(&good, &svc, "g1");

    fs::remove_file(broken.releases_dir()).unwrap();
    deploy_and_activate(&broken, &svc, "b1");
    assert!(svc.is_running());
    svc.stop();
}

/// A journal whose last record lost only its newline (edited by hand with an editor that
/// strips it) keeps that record at the next append: it was cut off as if torn by a crash,
/// which here forgot the activation of the current release.
#[test]
fn journal_record_without_its_newline_is_kept_at_the_next_append() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
    let path = site.root.join(".release-keeper/journal");
    let text = fs::read_to_string(&path).unwrap();
    let records = text.lines().count();
    fs::write(&path, text.trim_end_matches('\n')).unwrap();

    let mut svc = Service::start_config(&site.config_path());
    deploy_and_activate(&site, &svc, "v2");
    svc.stop();
    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > records, "the journal grew: {text}");
    assert!(
        lines[records - 1].contains("\"op\":\"activated\"") && lines[records - 1].contains("v1"),
        "v1's activation is still recorded: {text}"
    );
    for l in &lines {
        assert!(
            serde_json::from_str::<Value>(l).is_ok(),
            "every line parses: {l:?}"
        );
    }
}

/// A directory in `.release-keeper/claims/` (a hand edit) is not a claim: it made every
/// healing pass and every upload fail on reading it, so the site deployed nothing more.
/// It is moved aside, never deleted, and uploads go on.
#[test]
fn a_directory_among_the_claims_does_not_block_uploads() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
    let odd = site
        .root
        .join(".release-keeper/claims/000001796290000000000001-1.claim");
    fs::create_dir(&odd).unwrap();
    fs::write(odd.join("keep.txt"), "mine\n").unwrap();

    let mut svc = Service::start_config(&cfg);
    deploy_and_activate(&site, &svc, "v2");
    svc.stop();
    assert!(!odd.exists(), "moved out of the claims");
    assert!(
        displaced(&site)
            .iter()
            .any(|p| p.join("keep.txt").is_file()),
        "kept, with its content, under displaced/: {:?}",
        displaced(&site)
    );
}

/// A release whose stored manifest was deleted can no longer be verified: healing says so
/// (it said "nothing to heal", and drift in the live release would go unnoticed).
#[test]
fn a_deleted_stored_manifest_is_reported() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
    fs::remove_file(site.root.join(".release-keeper/manifests/v1")).unwrap();
    let out = cli(&cfg, &["heal", SITE]);
    assert_left_a_problem(&out);
    let text = stdout_of(&out);
    assert!(
        text.contains("releases/v1 has no stored manifest"),
        "{}",
        show(&out)
    );
}

/// Healing that points `current` at another release (the live one was deleted by hand)
/// wrote no journal record: `status` showed a stale `last_event`, and the journal still
/// took the deleted release for current. The switch is recorded like a rollback, and
/// `after_activate` runs for the release now current (a server caching resolved paths
/// must be told); its failure is only logged, once, and never retried.
#[test]
fn healing_that_switches_current_records_it_and_runs_after_activate_once() {
    let site = Site::new();
    let log = site.tmp_path("after.log");
    let fail = site.tmp_path("after-fails");
    let after = format!(
        "after_activate = [\"/bin/sh\", \"-c\", \"echo \\\"$RELEASE_ID $PREVIOUS_RELEASE_ID\\\" >> {}; test ! -e {}\"]",
        log.display(),
        fail.display()
    );
    let (cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1h\"", &after);
    for id in ["v0", "v1", "v2"] {
        deploy_and_activate(&site, &svc, id);
    }
    let calls = || fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(calls().lines().count(), 3, "{}", calls());
    fs::write(&fail, b"").unwrap();

    // The live release deleted by hand: healing goes back to v1.
    make_writable(&site.release("v2"));
    fs::remove_dir_all(site.release("v2")).unwrap();
    wait_current(
        &site,
        "v1",
        WAIT,
        "current healed after its release was deleted",
    );
    let failed = svc.wait_event(
        "hook.failed",
        |v| release_of(v) == Some("v1") && v["hook"] == "after_activate",
        WAIT,
    );
    assert_eq!(failed["site"], SITE, "{failed}");
    assert_eq!(
        calls().lines().last(),
        Some("v1 v2"),
        "after_activate runs for v1, leaving v2: {}",
        calls()
    );
    svc.stop();
    assert!(
        svc.events("release.rolled_back").is_empty(),
        "healing is not logged as a rollback: {}",
        svc.log_text()
    );
    let records = site.journal_records();
    let last = records.last().unwrap();
    assert_eq!(
        (&last["op"], &last["release"], &last["to"]),
        (
            &Value::from("rolled_back"),
            &Value::from("v2"),
            &Value::from("v1")
        ),
        "the switch is journaled: {last}"
    );

    let out = cli(&cfg, &["status", SITE, "--json"]);
    assert_ok(&out, "status --json");
    let doc = stdout_json(&out);
    let st = find_site_obj(&doc, SITE, "last_event").unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(st["current"], "v1", "{st}");
    assert_eq!(st["last_event"]["to"], "v1", "{st}");
    assert_eq!(st["previous"], "v0", "{st}");
    // The failed after_activate changed nothing more: v1 is good and already current,
    // and another pass has nothing to do (no second hook run).
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal");
    let out = cli(&cfg, &["activate", SITE, "v1", "--log-format", "json"]);
    assert_ok(&out, "activate v1");
    assert!(
        stderr_events(&out)
            .iter()
            .any(|v| v["event"] == "release.already_current"),
        "the journal knows v1 is current: {}",
        show(&out)
    );
    assert_eq!(calls().lines().count(), 4, "no retry: {}", calls());
    fs::remove_file(&fail).unwrap();
    let out = cli(&cfg, &["rollback", SITE]);
    assert_ok(&out, "rollback");
    assert_eq!(site.current_id().as_deref(), Some("v0"), "{}", show(&out));
}

/// With `.release-keeper/journal` lost, the "is there a release yet?" check for shared
/// entries ran before the pass recovered the releases, so a missing shared directory was
/// only recreated by the second pass. One pass (and its dry run) must do it.
#[test]
fn shared_entry_is_recreated_by_one_pass_after_the_journal_is_lost() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(
        &site,
        SITE,
        "heal_interval = \"1h\"",
        "shared = [\"storage\"]",
    );
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
    let storage = site.root.join("shared/storage");
    assert!(storage.is_dir(), "made with the first release");
    fs::remove_file(site.root.join(".release-keeper/journal")).unwrap();
    fs::remove_dir_all(&storage).unwrap();

    let out = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert_ok(&out, "heal --dry-run");
    assert!(
        stdout_of(&out).contains(&format!("create {}", storage.display())),
        "the dry run says it would recreate shared/storage: {}",
        show(&out)
    );
    assert!(!storage.exists(), "a dry run changes nothing");
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal");
    assert!(
        storage.is_dir(),
        "one pass recovers the release and recreates its shared entry: {}",
        show(&out)
    );
    assert!(
        site.release("v1").join("storage").is_dir(),
        "the release's shared link resolves again"
    );
}

/// How soon an entry deleted under `shared/` or a link's directory is back: an inotify
/// event's pass, not `heal_interval` (an hour in these tests).
const HEALED_SOON: Duration = Duration::from_secs(5);

/// Lets the pass that a deploy's own changes in the root start end, so that what a test
/// deletes next is seen by the watches under test, not by that pass by chance.
fn settle_after_deploy() {
    std::thread::sleep(Duration::from_secs(1));
}

/// A service on `site` (with `site_cfg`) serving v1, the deploy's own healing pass over,
/// and no timed pass for an hour: only what inotify reports is healed.
fn serving_v1_healed_by_events_only(site: &Site, site_cfg: &str) -> Service {
    let (_cfg, svc) = start_site(site, SITE, "heal_interval = \"1h\"", site_cfg);
    deploy_and_activate(site, &svc, "v1");
    settle_after_deploy();
    svc
}

/// Deletes the directory `dir` (`rm -r`), or with `aside` moves it there first (a tree
/// whose entries healing recreates as `rm -r` goes would make it fail with "Directory not
/// empty"), and waits until healing has made it again.
fn remove_dir_and_wait_healed(dir: &Path, aside: Option<&Path>, what: &str) {
    match aside {
        Some(to) => {
            fs::rename(dir, to).unwrap();
            fs::remove_dir_all(to).unwrap();
        }
        None => fs::remove_dir_all(dir).unwrap(),
    }
    let t0 = Instant::now();
    wait_until(
        HEALED_SOON,
        || dir.is_dir(),
        || {
            format!(
                "{what}: {} recreated by the inotify-driven pass",
                dir.display()
            )
        },
    );
    eprintln!("{what}: recreated after {:?}", t0.elapsed());
}

/// The audit's case: `rm -r shared/storage` while the service ran left every live
/// release's `storage` link dangling until `heal_interval`, since only the root was
/// watched. `shared/` is watched for its entries leaving.
#[test]
fn shared_dir_entry_deleted_while_running_is_recreated_at_once() {
    let site = Site::new();
    let mut svc = serving_v1_healed_by_events_only(&site, "shared = [\"storage\"]");
    let storage = site.root.join("shared/storage");
    assert!(storage.is_dir(), "made with the first release");
    for round in 0..2 {
        remove_dir_and_wait_healed(&storage, None, &format!("round {round}"));
        assert!(
            site.release("v1").join("storage").is_dir(),
            "round {round}: the release's shared link resolves again"
        );
    }
    wait_repaired(&svc, &["storage", "shared entry missing"]);
    svc.stop();
}

/// A nested shared entry (`cache/views`) is watched through every directory on its way:
/// deleted itself, deleted with its parent (which the pass makes again and watches again),
/// then deleted once more from that new parent.
#[test]
fn nested_shared_dir_entry_deleted_while_running_is_recreated_at_once() {
    let site = Site::new();
    let mut svc =
        serving_v1_healed_by_events_only(&site, "shared = [\"storage\", \"cache/views\"]");
    let cache = site.root.join("shared/cache");
    let views = cache.join("views");
    assert!(views.is_dir(), "made with the first release");
    remove_dir_and_wait_healed(&views, None, "the entry");
    let aside = site.tmp_path("cache-aside");
    remove_dir_and_wait_healed(&cache, Some(&aside), "its parent");
    // The parent may be seen back a moment before the entry in it (`create_dir_all`).
    wait_until(
        HEALED_SOON,
        || views.is_dir(),
        || "the entry to be back with its parent".into(),
    );
    remove_dir_and_wait_healed(&views, None, "the entry in the recreated parent");
    assert!(
        site.release("v1").join("cache/views").is_dir(),
        "the release's shared link resolves again"
    );
    svc.stop();
}

/// A nested link (`web/docs`) is watched in its directory: deleted itself, deleted with
/// its directory (the root's watch), then deleted from the directory the pass made again.
#[test]
fn nested_link_deleted_while_running_is_recreated_at_once() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(
        &site,
        SITE,
        "heal_interval = \"1h\"",
        "links = { \"web/docs\" = \"../current/docs\" }",
    );
    site.deploy(
        &[
            ("index.html", b"<h1>v1</h1>\n" as &[u8]),
            ("docs/index.html", b"docs\n"),
        ],
        "id = \"v1\"\n",
    );
    svc.wait_release_event("release.activated", "v1");
    settle_after_deploy();
    let web = site.root.join("web");
    let docs = web.join("docs");
    let resolves = || docs.join("index.html").is_file();
    assert!(resolves(), "made with the first release");
    let healed = |what: &str| {
        wait_until(HEALED_SOON, resolves, || {
            format!("{what} deleted: web/docs recreated by the inotify-driven pass")
        })
    };
    fs::remove_file(&docs).unwrap();
    healed("the link");
    let aside = site.tmp_path("web-aside");
    fs::rename(&web, &aside).unwrap();
    fs::remove_dir_all(&aside).unwrap();
    healed("its directory");
    fs::remove_file(&docs).unwrap();
    healed("the link in the recreated directory");
    wait_repaired(&svc, &["web/docs", "missing or wrong"]);
    svc.stop();
}

/// Context switches of the threads of `pid` named `comm`: one that woke, even for
/// nothing, adds at least one.
fn thread_switches(pid: i32, comm: &str) -> u64 {
    let mut n = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let name = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if name.trim() != comm {
            continue;
        }
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        n += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    n
}

/// The app's own writes under the watched `shared/` (uploads, caches, temporary files
/// renamed into place, old ones deleted) start no healing pass: the watches there ask for
/// names leaving only, and wake the site only for the configured entries.
#[test]
fn app_writes_into_shared_start_no_healing_pass() {
    let site = Site::new();
    let mut svc =
        serving_v1_healed_by_events_only(&site, "shared = [\"storage\", \"cache/views\"]");
    let worker = format!("rk:{SITE}");
    let pid = svc.pid();
    let (worker_before, reader_before) = (
        thread_switches(pid, &worker),
        thread_switches(pid, "inotify"),
    );
    assert!(worker_before > 0, "the worker thread {worker} is found");
    let shared = site.root.join("shared");
    let dirs = [shared.clone(), shared.join("storage"), shared.join("cache")];
    for dir in &dirs {
        for i in 0..200 {
            fs::write(dir.join(format!("upload-{i}")), b"data").unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        (
            thread_switches(pid, &worker),
            thread_switches(pid, "inotify")
        ),
        (worker_before, reader_before),
        "writing 600 files under shared/ woke the worker or the inotify reader \
         (context switches: worker, reader)"
    );
    // Names leaving that are no configured entry: the reader sees them, the site does not.
    for dir in &dirs {
        for i in 0..200 {
            let from = dir.join(format!("upload-{i}"));
            if i % 2 == 0 {
                fs::rename(&from, dir.join(format!("kept-{i}"))).unwrap();
            } else {
                fs::remove_file(&from).unwrap();
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        thread_switches(pid, &worker),
        worker_before,
        "renaming and deleting the app's own files under shared/ woke the worker"
    );
    assert!(
        svc.events("heal.repaired").is_empty(),
        "nothing was repaired: {:?}",
        svc.events("heal.repaired")
    );
    // Still watched: a configured entry leaving is healed.
    remove_dir_and_wait_healed(&shared.join("cache/views"), None, "after the writes");
    svc.stop();
}

/// The inotify watches `pid` holds, counted from its inotify descriptors' fdinfo.
fn inotify_watches(pid: i32) -> usize {
    let mut n = 0;
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let is_inotify =
            fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().contains("inotify"));
        if !is_inotify {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        n += info
            .lines()
            .filter(|l| l.starts_with("inotify wd:"))
            .count();
    }
    n
}

/// The watches under `shared/` and a link's directory are the site's: reloads leave one
/// each (a reload that keeps the site keeps them, one that changes it replaces them), and
/// a site that no longer has the entries no longer has their watches.
#[test]
fn watches_of_healed_directories_do_not_leak_across_reloads() {
    let site = Site::new();
    let nested = "shared = [\"storage\", \"cache/views\"]\n\
                  links = { \"web/docs\" = \"../current/docs\" }";
    let (cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1h\"", nested);
    site.deploy(
        &[
            ("index.html", b"<h1>v1</h1>\n" as &[u8]),
            ("docs/index.html", b"docs\n"),
        ],
        "id = \"v1\"\n",
    );
    svc.wait_release_event("release.activated", "v1");
    let pid = svc.pid();
    // The root, deploy-cache/, releases/, shared/, shared/cache/, web/.
    wait_until(
        WAIT,
        || inotify_watches(pid) == 6,
        || {
            format!(
                "6 watches after the first release, are {}",
                inotify_watches(pid)
            )
        },
    );
    let mut reloads = 0;
    let mut reload = |svc: &Service| {
        signal(svc, Signal::SIGHUP);
        reloads += 1;
        svc.wait_count("config.reloaded", reloads, WAIT);
    };
    for _ in 0..3 {
        reload(&svc);
    }
    let _ = cfg;
    wait_until(
        WAIT,
        || inotify_watches(pid) == 6,
        || {
            format!(
                "unchanged reloads keep 6 watches, are {}",
                inotify_watches(pid)
            )
        },
    );
    site.write_config(SITE, "heal_interval = \"1h\"\nkeep = 3", nested);
    reload(&svc);
    wait_until(
        WAIT,
        || inotify_watches(pid) == 6,
        || {
            format!(
                "a restarted site has 6 watches again, are {}",
                inotify_watches(pid)
            )
        },
    );
    // Still healed through the restarted site's watches.
    remove_dir_and_wait_healed(&site.root.join("shared/cache/views"), None, "after reloads");
    site.write_config(SITE, "heal_interval = \"1h\"", "");
    reload(&svc);
    wait_until(
        WAIT,
        || inotify_watches(pid) == 3,
        || {
            format!(
                "without shared entries or links, 3 watches, are {}",
                inotify_watches(pid)
            )
        },
    );
    svc.stop();
}

/// A shared *file* deleted while the service runs is heard of through the same watch, and
/// reported at once; it is still never recreated (an empty `.env` would start the app with
/// the wrong settings).
#[test]
fn shared_file_deleted_while_running_is_reported_at_once_not_recreated() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(
        &site,
        SITE,
        "heal_interval = \"1h\"",
        "shared = [\".env\", \"storage\"]",
    );
    let files: Vec<(&str, &[u8])> = vec![("index.html", b"hi"), (".env", b"APP_KEY=1\n")];
    site.deploy(&files, "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    settle_after_deploy();
    let env = site.root.join("shared/.env");
    assert!(env.is_file(), "seeded from the upload");
    fs::remove_file(&env).unwrap();
    let ev = svc.wait_event(
        "heal.reported",
        |v| v.to_string().contains(".env"),
        HEALED_SOON,
    );
    assert!(reason_of(&ev).contains("restore"), "{ev}");
    assert!(
        fs::symlink_metadata(&env).is_err(),
        "a shared file is not recreated"
    );
    svc.stop();
}

/// The keeper's own directories removed by hand are made again, and `heal` says so: it
/// answered "nothing to heal" after making them, hiding that someone had removed them. A
/// new site's layout made at its first start is setting it up, not a repair.
#[test]
fn heal_says_it_made_the_layout_again() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let out = cli(&cfg, &["init", SITE]);
    assert_ok(&out, "init");
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal of a new site");
    assert!(
        stdout_of(&out).contains("nothing to heal"),
        "{}",
        show(&out)
    );

    fs::remove_dir(site.releases_dir()).unwrap();
    fs::remove_dir(site.deploy_cache()).unwrap();
    let releases = format!("{}/", site.releases_dir().display());
    let uploads = format!("{}/", site.deploy_cache().display());
    let out = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert_ok(&out, "heal --dry-run");
    let said = stdout_of(&out);
    assert!(
        said.contains(&format!("create {releases}")) && said.contains(&format!("create {uploads}")),
        "{}",
        show(&out)
    );
    assert!(!site.releases_dir().exists(), "a dry run makes nothing");

    let out = cli(&cfg, &["--log-format", "json", "heal", SITE]);
    assert_ok(&out, "heal");
    let said = stdout_of(&out);
    assert!(
        said.contains(&format!("created {releases}"))
            && said.contains(&format!("created {uploads}")),
        "{}",
        show(&out)
    );
    assert!(site.releases_dir().is_dir() && site.deploy_cache().is_dir());
    let logged = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        logged.contains("heal.repaired") && logged.contains("missing directory"),
        "{logged}"
    );
}

/// A root whose parent does not exist either (`/srv/new/site`, made later with `mkdir -p`)
/// is served as soon as it is made, not at the next `heal_interval`: the nearest
/// directory on the way to it is watched, and each one made moves the watch down. Nor is
/// the missing parent logged as a `site.error`: waiting for a root is normal.
#[test]
fn a_root_made_with_its_missing_parents_is_served_at_once() {
    let site = Site::new();
    let root = site.tmp_path("new/deep/site");
    let cfg = site.tmp_path("deep.toml");
    fs::write(
        &cfg,
        format!(
            "[defaults]\nheal_interval = \"1h\"\n[sites.{SITE}]\nroot = \"{}\"\n",
            root.display()
        ),
    )
    .unwrap();
    let mut svc = Service::start_config(&cfg);
    svc.wait_event("site.waiting", |v| v["site"] == SITE, WAIT);
    fs::create_dir_all(root.join("deploy-cache")).unwrap();
    svc.wait_event("site.resumed", |v| v["site"] == SITE, WAIT);
    assert!(
        svc.events("site.error").is_empty(),
        "log:\n{}",
        svc.log_text()
    );
    svc.stop();
}

/// `current` pointing at a symlink in `releases/` (`releases/evil -> /etc`) points outside
/// releases/ as surely as a target outside: it served what the link led to, and healing
/// left it. A directory put in `releases/` by hand is a person's choice, left, but said.
#[test]
fn current_through_a_symlink_in_releases_is_healed_and_a_hand_made_target_reported() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.stage_upload(&as_refs(&small_build("v1")));
    assert_ok(&cli(&cfg, &["finalize", SITE, "--id", "v1"]), "finalize v1");
    let outside = site.tmp_path("outside");
    write_tree(&outside, &[("secret", b"not the site's\n" as &[u8])]);
    std::os::unix::fs::symlink(&outside, site.releases_dir().join("evil")).unwrap();
    let point = |to: &str| {
        fs::remove_file(site.current_path()).unwrap();
        std::os::unix::fs::symlink(to, site.current_path()).unwrap();
    };
    point("releases/evil");
    let out = cli(&cfg, &["heal", SITE]);
    // Exit 1 all the same: `releases/evil` itself is left for a person, and said.
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(site.current_id().as_deref(), Some("v1"), "{}", show(&out));
    assert!(
        stdout_of(&out).contains("through a symlink"),
        "{}",
        show(&out)
    );
    assert!(
        fs::symlink_metadata(site.releases_dir().join("evil")).is_ok(),
        "what the keeper did not make is never deleted"
    );

    write_tree(
        &site.releases_dir().join("handmade"),
        &[("index.html", b"by hand\n" as &[u8])],
    );
    point("releases/handmade");
    let out = cli(&cfg, &["heal", SITE]);
    assert_eq!(out.status.code(), Some(1), "a problem left: {}", show(&out));
    assert!(
        stdout_of(&out)
            .contains("current points at releases/handmade, which release-keeper did not make"),
        "{}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("handmade"));
}

/// A first release that failed its checks stays current (there is nothing to go back to).
/// With `current` then deleted the site is down: `heal` said "nothing to heal" and exited
/// 0. It says there is no good release to point `current` at, and exits 1.
#[test]
fn a_site_left_without_current_and_without_a_good_release_is_reported() {
    let site = Site::new();
    let cfg = site.write_config(
        SITE,
        "",
        "after_activate = [\"/bin/sh\", \"-c\", \"exit 3\"]",
    );
    site.stage_upload(&as_refs(&small_build("b1")));
    let out = cli(&cfg, &["finalize", SITE, "--id", "b1"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(site.current_id().as_deref(), Some("b1"), "{}", show(&out));
    fs::remove_file(site.current_path()).unwrap();
    let out = cli(&cfg, &["heal", SITE]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stdout_of(&out).contains("current is missing, and no good release"),
        "{}",
        show(&out)
    );
}

/// A release that failed its checks and stayed current (`auto_rollback = false`) is live:
/// healing a deleted `current` to the last good release moves production off it, and that
/// is a switch like any other, journaled like a rollback, with `after_activate` run for
/// the release now live. It was done silently, the journal still saying the failed
/// release was the last event.
#[test]
fn healing_off_a_failed_release_that_stayed_current_is_a_recorded_switch() {
    let site = Site::new();
    let ran = site.tmp_path("after.log");
    let cfg = site.write_config(
        SITE,
        "auto_rollback = false\nhealth_retries = 1",
        &format!(
            "after_activate = [\"/bin/sh\", \"-c\", \"echo $RELEASE_ID >> {}\"]\n\
             health_check = [\"/bin/sh\", \"-c\", \"test ! -e bad\"]",
            ran.display()
        ),
    );
    site.stage_upload(&as_refs(&small_build("c1")));
    assert_ok(&cli(&cfg, &["finalize", SITE, "--id", "c1"]), "finalize c1");
    site.stage_upload(&[("index.html", b"c3\n" as &[u8]), ("bad", b"1\n")]);
    let out = cli(&cfg, &["finalize", SITE, "--id", "c3"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(site.current_id().as_deref(), Some("c3"), "stays current");

    fs::remove_file(site.current_path()).unwrap();
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal");
    assert_eq!(site.current_id().as_deref(), Some("c1"));
    assert!(
        stdout_of(&out).contains("(it was at c3)"),
        "the switch is said: {}",
        show(&out)
    );
    assert_eq!(
        fs::read_to_string(&ran).unwrap(),
        "c1\nc3\nc1\n",
        "after_activate runs for the release healing put live"
    );
    let last = site.journal_records().pop().unwrap();
    assert_eq!(
        (&last["op"], &last["release"], &last["to"]),
        (
            &serde_json::json!("rolled_back"),
            &serde_json::json!("c3"),
            &serde_json::json!("c1")
        ),
        "{last}"
    );
}

/// A keeper killed mid-prune, after the release left `releases/` (renamed into the trash)
/// but before the `pruned` record: the next healing pass records and finishes the pruning,
/// and logs `release.pruned` for it (with `resumed = true` and the size the journal
/// recorded), exactly once, so monitoring counting prunings misses none. Before the fix
/// only `heal.repaired` was logged.
#[test]
fn a_pruning_interrupted_before_its_record_is_logged_once_when_healing_finishes_it() {
    // What `retention::prune` leaves when killed between its rename and the journal: v1
    // under `.release-keeper/trash/<id>.<pid>.<n>`, still live in the journal.
    pruning_cut_short_is_logged_once(|site| {
        let trash = site.root.join(".release-keeper/trash");
        fs::create_dir_all(&trash).unwrap();
        fs::rename(site.release("v1"), trash.join("v1.4242.0")).unwrap();
        trash
    });
}

/// Where `releases/` is a filesystem of its own, a pruned release is moved aside beside
/// the others (`releases/.rk-tmp.<id>.<pid>.<n>`), not into the trash: cut short there,
/// it was removed as an interrupted build, never journaled nor logged as pruned.
#[test]
fn a_pruning_cut_short_beside_the_releases_is_logged_once_when_healing_finishes_it() {
    pruning_cut_short_is_logged_once(|site| {
        let aside = site.releases_dir().join(".rk-tmp.v1.99999999.0");
        fs::rename(site.release("v1"), &aside).unwrap();
        aside
    });
}

/// Deploys v1 to v3, stops, lets `cut_short` move v1 where a killed pruning leaves it (it
/// returns what must be gone once healed), restarts, and checks one `release.pruned` for
/// v1 (`resumed`), one journal record, and nothing more from a later `heal`.
fn pruning_cut_short_is_logged_once(cut_short: impl Fn(&Site) -> PathBuf) {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "keep = 5\nheal_interval = \"1h\"", "");
    for id in ["v1", "v2", "v3"] {
        deploy_and_activate(&site, &svc, id);
    }
    let made = svc.wait_release_event("release.finalized", "v1");
    svc.stop();
    let left = cut_short(&site);

    let mut svc = Service::start_config(&cfg);
    let ev = svc.wait_release_event("release.pruned", "v1");
    assert_eq!(ev["resumed"], true, "{ev}");
    assert_eq!(ev["files"], made["files"], "{ev}");
    assert_eq!(ev["bytes"], made["bytes"], "{ev}");
    assert!(ev["reason"].as_str().is_some_and(|r| !r.is_empty()), "{ev}");
    let gone = |p: &Path| match fs::read_dir(p) {
        Ok(mut d) => p.ends_with("trash") && d.next().is_none(),
        Err(_) => true,
    };
    wait_until(
        WAIT,
        || gone(&left),
        || format!("{} to be removed or emptied", left.display()),
    );
    // Later passes (here `heal` beside the service) find nothing more to log.
    let out = cli_when_idle(&cfg, &["heal", SITE, "--log-format", "json"]);
    assert_ok(&out, "heal");
    let again: Vec<_> = stderr_events(&out)
        .into_iter()
        .filter(|v| v["event"] == "release.pruned")
        .collect();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(svc.events("release.pruned").len(), 1, "{}", svc.log_text());
    let pruned = site
        .journal_records()
        .iter()
        .filter(|r| r["op"] == "pruned" && r["release"] == "v1")
        .count();
    assert_eq!(pruned, 1, "{:?}", site.journal_records());
    assert_eq!(site.release_ids(), ["v2", "v3"]);
    svc.stop();
}

/// A pruning whose removal fails (a file that cannot be deleted) is journaled and logged
/// once, before the removal (what a keeper killed during the removal leaves: logged,
/// journaled, in the trash); the healing pass that later finishes the removal does not log
/// it again.
#[test]
fn a_pruning_finished_by_healing_after_a_failed_removal_is_logged_once() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "keep = 1\nheal_interval = \"1h\"", "");
    deploy_and_activate(&site, &svc, "v1");
    let file = site.release("v1").join("stuck");
    // The release is read-only: its directory is opened up for the test's file only.
    make_writable(&site.release("v1"));
    fs::write(&file, b"x").unwrap();
    // Undone under the whole root: the file moves into the trash with its release.
    let Some(undo) = Immutable::set(&file, &site.root) else {
        eprintln!("skipped: chattr +i is not possible here (needs root and a filesystem that supports it)");
        svc.stop();
        return;
    };
    let trash = site.root.join(".release-keeper/trash");
    deploy_and_activate(&site, &svc, "v2");
    deploy_and_activate(&site, &svc, "v3");
    svc.wait_release_event("release.pruned", "v1");
    // The failed removal's warning follows the event; the log is read only once it is there.
    svc.wait_release_event("site.error", "v1");
    let stuck = fs::read_dir(&trash)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("v1."))
        })
        .expect("v1 left in the trash");
    assert!(stuck.join("stuck").exists(), "the removal failed");
    // The event goes with the journal record, before the removal: a keeper killed while
    // removing (the slow part) has logged it already. The failed removal's warning comes
    // after it.
    let lines = svc.json_lines();
    let at = |event: &str| {
        lines
            .iter()
            .position(|v| v["event"] == event && v["release"] == "v1")
            .unwrap_or_else(|| panic!("no {event} for v1: {}", svc.log_text()))
    };
    assert!(
        at("release.pruned") < at("site.error"),
        "release.pruned logged only after the removal: {}",
        svc.log_text()
    );
    undo.undo();
    let out = cli_when_idle(&cfg, &["heal", SITE, "--log-format", "json"]);
    assert_ok(&out, "heal");
    assert!(!stuck.exists(), "heal finished the removal: {}", show(&out));
    let by_heal: Vec<_> = stderr_events(&out)
        .into_iter()
        .filter(|v| v["event"] == "release.pruned")
        .collect();
    assert!(by_heal.is_empty(), "{by_heal:?}");
    assert_eq!(svc.events_for("release.pruned", "v1").len(), 1);
    svc.stop();
}

/// The live release replaced by a symlink to a directory outside the root: what it names
/// is no release. Healing pointed `current` back at the same name, so the site went on
/// serving the outside directory, and each swap's inotify event started the next pass: a
/// busy loop of `heal.repaired`. `current` goes to the last good release that is a real
/// directory, once.
#[test]
fn a_release_replaced_by_a_symlink_out_of_the_root_is_no_release_to_heal_to() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "heal_interval = \"1h\"", "");
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");
    let elsewhere = site.tmp_path("elsewhere");
    write_tree(&elsewhere, &[("index.html", b"not the site's" as &[u8])]);
    make_writable(&site.release("v2"));
    fs::remove_dir_all(site.release("v2")).unwrap();
    symlink(&elsewhere, site.release("v2")).unwrap();
    wait_until(
        WAIT,
        || site.current_id().as_deref() == Some("v1"),
        || format!("current to go to v1; log:\n{}", svc.log_text()),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let settled = svc.events("heal.repaired").len();
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(
        svc.events("heal.repaired").len(),
        settled,
        "healing keeps repairing:\n{}",
        svc.log_text()
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    assert_eq!(
        fs::canonicalize(site.current_path()).unwrap(),
        fs::canonicalize(site.release("v1")).unwrap()
    );
    svc.stop();
}

/// Only the whole form of the keeper's temporary names (`.rk-tmp.<name>.<pid>.<n>`, a
/// file or symlink outside `releases/`) is a leftover of the keeper's: a person's
/// `.rk-tmp.notes` or `.rk-tmp.dir/` in the root was removed as one, data and all.
#[test]
fn entries_merely_named_like_temporary_ones_are_left_alone() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.stage_upload(&as_refs(&small_build("v1")));
    finalize_expecting(&cfg, SITE, "v1", &[], 0);
    write_tree(
        &site.root,
        &[
            (".rk-tmp.dir/data", b"keep\n" as &[u8]),
            (".rk-tmp.notes", b"notes\n"),
            (".rk-tmp.x.99999999.0/data", b"a directory\n"),
        ],
    );
    write_tree(
        &site.releases_dir(),
        &[(".rk-tmp.mine", b"mine\n" as &[u8])],
    );
    symlink("releases/v1", site.root.join(".rk-tmp.current.99999999.0")).unwrap();
    let out = cli(&cfg, &["heal", SITE, "--log-format", "json"]);
    assert_ok(&out, "heal");
    for kept in [
        ".rk-tmp.dir/data",
        ".rk-tmp.notes",
        ".rk-tmp.x.99999999.0/data",
        "releases/.rk-tmp.mine",
    ] {
        assert!(
            site.root.join(kept).exists(),
            "{kept} removed: {}",
            show(&out)
        );
    }
    assert!(
        fs::symlink_metadata(site.root.join(".rk-tmp.current.99999999.0")).is_err(),
        "the keeper's own leftover stays: {}",
        show(&out)
    );
}

/// `current` pointed by hand at a staged release (`activate = false`): its hooks and health
/// check never ran. Left as the person chose, but reported like a failed one, not passed
/// over in silence.
#[test]
fn current_pointed_by_hand_at_a_staged_release_is_reported() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.stage_upload(&as_refs(&small_build("v1")));
    finalize_expecting(&cfg, SITE, "v1", &[], 0);
    site.stage_upload(&as_refs(&small_build("v2")));
    finalize_expecting(&cfg, SITE, "v2", &["--no-activate"], 0);
    let out = cli(&cfg, &["heal", SITE, "--log-format", "json"]);
    assert_ok(&out, "heal");
    assert!(
        !stderr_events(&out)
            .iter()
            .any(|v| v["event"] == "heal.reported"),
        "nothing to report yet: {}",
        show(&out)
    );
    let tmp = site.root.join("current.new");
    symlink("releases/v2", &tmp).unwrap();
    fs::rename(&tmp, site.current_path()).unwrap();
    let out = cli(&cfg, &["heal", SITE, "--log-format", "json"]);
    let reported: Vec<_> = stderr_events(&out)
        .into_iter()
        .filter(|v| v["event"] == "heal.reported" && release_of(v) == Some("v2"))
        .collect();
    assert_eq!(reported.len(), 1, "{}", show(&out));
    assert!(
        reason_of(&reported[0]).contains("staged"),
        "{:?}",
        reported[0]
    );
    assert_eq!(site.current_id().as_deref(), Some("v2"), "left as chosen");
}
