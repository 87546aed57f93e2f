//! Safe activation (issue 3): real hook scripts, automatic rollback, failed releases kept
//! out of rollbacks and retention, hook timeouts, and a crash during the health check.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const SITE: &str = "app";

/// Writes an executable shell script and returns its path.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut perm = fs::metadata(&p).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    fs::set_permissions(&p, perm).unwrap();
    p
}

fn build(tag: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        ("index.html".into(), format!("<h1>{tag}</h1>").into_bytes()),
        ("app/version.txt".into(), tag.as_bytes().to_vec()),
    ]
}

fn deploy(site: &Site, id: &str) {
    let b = build(id);
    let files: Vec<(&str, &[u8])> = b.iter().map(|(n, c)| (n.as_str(), c.as_slice())).collect();
    site.deploy(&files, &format!("id = \"{id}\"\n"));
}

/// Deploys each of `ids` in turn, each once the previous one is active.
fn deploy_in_turn(site: &Site, svc: &Service, ids: &[&str]) {
    for id in ids {
        deploy(site, id);
        svc.wait_release_event("release.activated", id);
    }
}

/// A health check that fails for releases whose id starts with "bad".
fn health_config(site: &Site, defaults: &str) -> PathBuf {
    let health = script(
        &site.tmp_path(""),
        "health.sh",
        "case \"$RELEASE_ID\" in bad*) echo \"unhealthy $RELEASE_ID\" >&2; exit 1;; esac; exit 0",
    );
    site.write_config(
        SITE,
        &format!("health_retries = 2\nhealth_interval = \"100ms\"\n{defaults}"),
        &format!("health_check = [\"{}\"]", health.display()),
    )
}

/// Deploys v1, then bad1 (waiting for `bad_event` of it), then v2, and stops the service:
/// the worker handles one upload at a time, so once v2 is active everything bad1 logs is
/// in the log.
fn good_bad_good(site: &Site, svc: &mut Service, bad_event: &str) {
    deploy(site, "v1");
    svc.wait_release_event("release.activated", "v1");
    deploy(site, "bad1");
    svc.wait_release_event(bad_event, "bad1");
    deploy(site, "v2");
    svc.wait_release_event("release.activated", "v2");
    svc.stop();
}

fn release_obj(list: &Value, id: &str) -> Value {
    list["releases"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["id"] == id).cloned())
        .unwrap_or_else(|| panic!("release {id} not in list: {list}"))
}

fn list(cfg: &Path) -> Value {
    let out = cli_when_idle(cfg, &["list", SITE, "--json"]);
    assert_ok(&out, "list --json");
    stdout_json(&out)
}

#[test]
fn unhealthy_release_rolls_back_by_itself_and_is_marked_failed() {
    let site = Site::new();
    let cfg = health_config(&site, "");
    let mut svc = Service::start_config(&cfg);
    deploy(&site, "v1");
    svc.wait_release_event("release.activated", "v1");
    deploy(&site, "bad1");
    let rb = svc.wait_release_event("release.rolled_back", "bad1");
    assert_eq!(
        rb["previous"], "v1",
        "rolled back to the previous good release: {rb}"
    );
    assert!(
        reason_of(&rb).contains("health_check"),
        "reason names the check: {rb}"
    );
    assert!(
        !svc.events_for("health.failed", "bad1").is_empty(),
        "health.failed logged"
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    let l = list(&cfg);
    let bad = release_obj(&l, "bad1");
    assert_eq!(bad["state"], "failed", "{l}");
    let reason = bad["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("health_check")
            && reason.contains("exit status 1")
            && reason.contains("unhealthy bad1"),
        "list says which hook, its exit status and stderr: {reason}"
    );
    assert!(
        bad["failed_at"].as_str().is_some_and(is_rfc3339),
        "when: {bad}"
    );
    svc.stop();
}

#[test]
fn rollback_never_lands_on_a_failed_release() {
    let site = Site::new();
    let cfg = health_config(&site, "");
    let mut svc = Service::start_config(&cfg);
    deploy_in_turn(&site, &svc, &["v1", "v2"]);
    deploy(&site, "bad3");
    svc.wait_release_event("release.rolled_back", "bad3");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    // The previous good release of v2 is v1, not the failed bad3.
    let out = cli_when_idle(&cfg, &["rollback", SITE]);
    assert_ok(&out, "rollback");
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    // Explicitly asking for the failed one is refused.
    let out = cli_when_idle(&cfg, &["rollback", SITE, "--to", "bad3"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    // So is activating it without --force.
    let out = cli_when_idle(&cfg, &["activate", SITE, "bad3"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{}",
        show(&out)
    );
    svc.stop();
}

#[test]
fn failed_releases_do_not_push_good_ones_out_of_keep() {
    let site = Site::new();
    let cfg = health_config(&site, "keep = 2\nkeep_failed = 1\n");
    let mut svc = Service::start_config(&cfg);
    deploy_in_turn(&site, &svc, &["v1", "v2"]);
    for id in ["bad1", "bad2", "bad3"] {
        deploy(&site, id);
        svc.wait_release_event("release.rolled_back", id);
    }
    wait_until(
        WAIT,
        || site.release_ids() == ["bad3", "v1", "v2"],
        || {
            format!(
                "good releases kept, newest failed kept: {:?}",
                site.release_ids()
            )
        },
    );
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    assert!(svc.events_for("release.pruned", "v1").is_empty());
    svc.stop();
}

#[test]
fn before_activate_failure_keeps_the_release_unactivated_and_force_overrides() {
    let site = Site::new();
    let flag = site.tmp_path("block");
    let hook = script(
        &site.tmp_path(""),
        "before.sh",
        &format!(
            "if [ -e {} ]; then echo migration broke >&2; exit 4; fi",
            flag.display()
        ),
    );
    let cfg = site.write_config(
        SITE,
        "",
        &format!("before_activate = [\"{}\"]", hook.display()),
    );
    let mut svc = Service::start_config(&cfg);
    deploy(&site, "v1");
    svc.wait_release_event("release.activated", "v1");
    fs::write(&flag, b"").unwrap();
    deploy(&site, "v2");
    let hf = svc.wait_release_event("hook.failed", "v2");
    assert_eq!(hf["hook"], "before_activate", "{hf}");
    assert_eq!(hf["status"], "exit status 4", "{hf}");
    assert!(
        hf["stderr"]
            .as_str()
            .unwrap_or("")
            .contains("migration broke"),
        "{hf}"
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"), "not activated");
    assert!(
        site.release("v2").is_dir(),
        "the failed release is kept for inspection"
    );
    assert_eq!(release_obj(&list(&cfg), "v2")["state"], "failed");
    fs::remove_file(&flag).unwrap();
    let out = cli_when_idle(&cfg, &["activate", SITE, "v2"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "failed release needs --force: {}",
        show(&out)
    );
    let out = cli_when_idle(&cfg, &["activate", SITE, "v2", "--force"]);
    assert_ok(&out, "activate --force");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    svc.stop();
}

/// `hook_timeout` bounds each health-check attempt too (SPEC: "each bounded by
/// `hook_timeout`"): a hanging check is cut at the limit, counts as one failed attempt,
/// the next one follows, and after `health_retries` of them the release is rolled back,
/// long before the check itself would have ended.
#[test]
fn hook_timeout_bounds_each_health_attempt() {
    let site = Site::new();
    let health = script(
        &site.tmp_path(""),
        "hang.sh",
        "case \"$RELEASE_ID\" in bad*) exec sleep 60;; esac; exit 0",
    );
    let cfg = site.write_config(
        SITE,
        "hook_timeout = \"1s\"\nhealth_retries = 2\nhealth_interval = \"0\"\n",
        &format!("health_check = [\"{}\"]", health.display()),
    );
    let mut svc = Service::start_config(&cfg);
    deploy_in_turn(&site, &svc, &["v1"]);
    let started = std::time::Instant::now();
    deploy(&site, "bad1");
    let rb = svc.wait_release_event("release.rolled_back", "bad1");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "two attempts of at most hook_timeout = 1s, rolled back after {took:?}: {rb}"
    );
    let attempts = svc.events_for("health.attempt_failed", "bad1");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    for a in &attempts {
        assert!(
            a["status"]
                .as_str()
                .unwrap_or("")
                .starts_with("timed out after 1s"),
            "{a}"
        );
    }
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    svc.stop();
}

#[test]
fn hook_timeout_kills_the_whole_process_group() {
    let site = Site::new();
    let pidfile = site.tmp_path("child.pid");
    let hook = script(
        &site.tmp_path(""),
        "slow.sh",
        &format!("sleep 60 & echo $! > {}; wait", pidfile.display()),
    );
    let cfg = site.write_config(
        SITE,
        "hook_timeout = \"1s\"\n",
        &format!("after_activate = [\"{}\"]", hook.display()),
    );
    let mut svc = Service::start_config(&cfg);
    deploy(&site, "v1");
    let hf = svc.wait_release_event("hook.failed", "v1");
    assert!(
        hf["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("timed out after 1s"),
        "{hf}"
    );
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until(
        Duration::from_secs(5),
        || kill(Pid::from_raw(pid), None).is_err(),
        || format!("the hook's child {pid} must be killed with the group"),
    );
    svc.stop();
}

#[test]
fn without_auto_rollback_a_failed_release_stays_current_and_status_shows_it() {
    let site = Site::new();
    let cfg = health_config(&site, "auto_rollback = false\n");
    let mut svc = Service::start_config(&cfg);
    deploy(&site, "v1");
    svc.wait_release_event("release.activated", "v1");
    deploy(&site, "bad1");
    svc.wait_release_event("health.failed", "bad1");
    wait_until(
        WAIT,
        || site.current_id().as_deref() == Some("bad1"),
        || "bad1 stays current".into(),
    );
    assert!(svc.events_for("release.rolled_back", "bad1").is_empty());
    let out = cli_when_idle(&cfg, &["status", SITE, "--json"]);
    assert_ok(&out, "status");
    let st = stdout_json(&out);
    let s = &st["sites"][0];
    assert_eq!(s["current"], "bad1", "{st}");
    assert_eq!(s["failed"][0], "bad1", "{st}");
    svc.stop();
}

/// kill -9 while the health check of a new release runs: on restart the trial is resumed
/// (the check runs again) and ends with a verdict, never left undecided.
fn crash_during_trial(passes_after_restart: bool) {
    let site = Site::new();
    let started = site.tmp_path("check-started");
    let hold = site.tmp_path("hold");
    let verdict = site.tmp_path("verdict-fail");
    let health = script(
        &site.tmp_path(""),
        "health.sh",
        &format!(
            "[ \"$RELEASE_ID\" = v1 ] && exit 0\n\
             touch {started}\n\
             while [ -e {hold} ]; do sleep 0.05; done\n\
             [ -e {verdict} ] && exit 1\n\
             exit 0",
            started = started.display(),
            hold = hold.display(),
            verdict = verdict.display()
        ),
    );
    let cfg = site.write_config(
        SITE,
        "health_retries = 1\n",
        &format!("health_check = [\"{}\"]", health.display()),
    );
    let svc = Service::start_config(&cfg);
    deploy(&site, "v1");
    svc.wait_release_event("release.activated", "v1");
    fs::write(&hold, b"").unwrap();
    deploy(&site, "v2");
    wait_until(
        WAIT,
        || started.exists(),
        || "health check of v2 to start".into(),
    );
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "swap happens before the check"
    );
    kill(Pid::from_raw(svc.pid()), Signal::SIGKILL).unwrap();
    svc.wait_exit(Duration::from_secs(10));
    fs::remove_file(&hold).unwrap();
    if !passes_after_restart {
        fs::write(&verdict, b"").unwrap();
    }
    let mut svc = Service::start_config(&cfg);
    if passes_after_restart {
        svc.wait_release_event("release.activated", "v2");
        assert_eq!(site.current_id().as_deref(), Some("v2"));
        assert_eq!(release_obj(&list(&cfg), "v2")["state"], "current");
    } else {
        svc.wait_release_event("release.rolled_back", "v2");
        assert_eq!(site.current_id().as_deref(), Some("v1"));
        assert_eq!(release_obj(&list(&cfg), "v2")["state"], "failed");
    }
    // README: every heal.repaired carries `what` and `reason`, the trial's resumption too.
    let repaired = svc.events("heal.repaired");
    assert!(
        repaired.iter().any(|e| e["message"] == "resuming trial")
            && repaired
                .iter()
                .all(|e| e["what"].is_string() && e["reason"].is_string()),
        "heal.repaired without what or reason:\n{}",
        svc.log_text()
    );
    // The claim's release was finalized before the crash: healing closes the claim and
    // says so; it never claims to redo an upload nothing rebuilds.
    assert!(
        repaired.iter().any(|e| e["what"]
            == "closing the claim of release v2, finalized before the interruption (not rebuilt)")
            && !svc.log_text().contains("redoing the upload"),
        "heal.repaired for v2's claim:\n{}",
        svc.log_text()
    );
    // The claim of v2 is done: a later restart changes nothing.
    svc.stop();
    let mut svc = Service::start_config(&cfg);
    let want = if passes_after_restart { "v2" } else { "v1" };
    assert_eq!(site.current_id().as_deref(), Some(want));
    assert!(
        svc.events("release.activated").is_empty() && svc.events("release.rolled_back").is_empty()
    );
    svc.stop();
}

#[test]
fn crash_during_health_check_resumes_the_trial_and_activates() {
    crash_during_trial(true);
}

#[test]
fn crash_during_health_check_resumes_the_trial_and_rolls_back_on_failure() {
    crash_during_trial(false);
}

#[test]
fn automatic_rollback_runs_after_activate_for_the_restored_release() {
    let site = Site::new();
    let log = site.tmp_path("after.log");
    let after = script(
        &site.tmp_path(""),
        "after.sh",
        &format!(
            "echo \"$RELEASE_ID prev=$PREVIOUS_RELEASE_ID\" >> \"{}\"",
            log.display()
        ),
    );
    let health = script(
        &site.tmp_path(""),
        "health.sh",
        "case \"$RELEASE_ID\" in bad*) exit 1;; esac; exit 0",
    );
    let cfg = site.write_config(
        SITE,
        "health_retries = 1\n",
        &format!(
            "after_activate = [\"{}\"]\nhealth_check = [\"{}\"]",
            after.display(),
            health.display()
        ),
    );
    let mut svc = Service::start_config(&cfg);
    deploy(&site, "v1");
    svc.wait_release_event("release.activated", "v1");
    deploy(&site, "bad1");
    svc.wait_release_event("release.rolled_back", "bad1");
    svc.stop();
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "rolled back to v1"
    );
    let lines: Vec<String> = fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines,
        ["v1 prev=", "bad1 prev=v1", "v1 prev=bad1"],
        "after_activate must run for the release current went back to, so the server \
         (e.g. php-fpm reload) serves it again"
    );
}

/// One failed health check is one `health.failed`: without a rollback, the outcome
/// ("stays current") is its own event, not a second `health.failed` that a monitor would
/// count as another failure.
#[test]
fn failed_health_check_without_rollback_logs_health_failed_once() {
    let site = Site::new();
    let cfg = health_config(&site, "auto_rollback = false\n");
    let mut svc = Service::start_config(&cfg);
    good_bad_good(&site, &mut svc, "health.failed");
    let failed = svc.events_for("health.failed", "bad1");
    assert_eq!(
        failed.len(),
        1,
        "one failed health check must log exactly one health.failed; got {failed:?}"
    );
    let kept = svc.events_for("release.stays_current", "bad1");
    assert_eq!(
        kept.len(),
        1,
        "the no-rollback outcome is logged once as release.stays_current; log:\n{}",
        svc.log_text()
    );
    assert!(!reason_of(&kept[0]).is_empty(), "{}", kept[0]);
}

/// A failing `after_activate` hook is a `hook.failed`, not a `health.failed`: no health
/// check ran.
#[test]
fn after_activate_failure_without_rollback_is_not_logged_as_health_failed() {
    let site = Site::new();
    let after = script(
        &site.tmp_path(""),
        "after.sh",
        "case \"$RELEASE_ID\" in bad*) exit 3;; esac; exit 0",
    );
    let health = script(&site.tmp_path(""), "health.sh", "exit 0");
    let cfg = site.write_config(
        SITE,
        "auto_rollback = false\nhealth_retries = 1\n",
        &format!(
            "after_activate = [\"{}\"]\nhealth_check = [\"{}\"]",
            after.display(),
            health.display()
        ),
    );
    let mut svc = Service::start_config(&cfg);
    good_bad_good(&site, &mut svc, "hook.failed");
    assert_eq!(
        svc.events_for("hook.failed", "bad1").len(),
        1,
        "{}",
        svc.log_text()
    );
    assert!(
        svc.events_for("health.failed", "bad1").is_empty(),
        "after_activate failed, the health check never ran; log:\n{}",
        svc.log_text()
    );
    assert_eq!(
        svc.events_for("release.stays_current", "bad1").len(),
        1,
        "{}",
        svc.log_text()
    );
}

/// `previous` (list, status) is the release a plain `rollback` goes back to, and there is
/// one as long as another good release was ever current: after rolling back from C to B
/// to A, B (current before A) is still good and a rollback target.
#[test]
fn after_two_rollbacks_list_still_shows_the_previous_that_rollback_goes_to() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    deploy_in_turn(&site, &svc, &["a", "b", "c"]);
    let out = cli_when_idle(&cfg, &["rollback", SITE]);
    assert_ok(&out, "first rollback");
    assert_eq!(site.current_id().as_deref(), Some("b"));
    let l = list(&cfg);
    assert_eq!(release_obj(&l, "b")["state"], "current", "{l}");
    assert_eq!(release_obj(&l, "a")["state"], "previous", "{l}");
    let out = cli_when_idle(&cfg, &["rollback", SITE]);
    assert_ok(&out, "second rollback");
    assert_eq!(site.current_id().as_deref(), Some("a"));

    let l = list(&cfg);
    let previous: Vec<&str> = l["releases"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["state"] == "previous")
                .filter_map(|r| r["id"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        previous,
        ["b"],
        "b was current before a and is good: list must show it as previous: {l}"
    );
    let out = cli_when_idle(&cfg, &["status", SITE, "--json"]);
    assert_ok(&out, "status");
    let st = stdout_json(&out);
    assert_eq!(st["sites"][0]["previous"], "b", "{st}");
    let out = cli_when_idle(&cfg, &["rollback", SITE]);
    assert_ok(&out, "third rollback, to the previous that list shows");
    assert_eq!(site.current_id().as_deref(), Some("b"));
    svc.stop();
}

/// `rollback --to ID` while `current` is missing moves away from the release healing
/// would have restored: its `release.rolled_back` names it as `release` (it used to leave
/// the field out, having no link to read it from).
#[test]
fn rollback_with_current_missing_names_the_release_it_leaves() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    deploy_in_turn(&site, &svc, &["v1", "v2"]);
    svc.stop();
    fs::remove_file(site.current_path()).unwrap();
    let out = cli(
        &cfg,
        &["rollback", SITE, "--to", "v1", "--log-format", "json"],
    );
    assert_ok(&out, "rollback --to v1");
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    let ev: Value = stderr_events(&out)
        .into_iter()
        .find(|v| v["event"] == "release.rolled_back")
        .unwrap_or_else(|| panic!("no release.rolled_back: {}", show(&out)));
    assert_eq!(
        (&ev["release"], &ev["previous"]),
        (&"v2".into(), &"v1".into()),
        "{ev}"
    );
}

/// `rollback` with `current` deleted gives its hooks, the journal and the event the
/// release healing would restore as the one left, as `activate` does; a target failing
/// its health check goes back to it.
#[test]
fn rollback_after_current_was_deleted_names_the_release_healing_would_restore_as_previous() {
    let site = Site::new();
    let (cfg, log) = logging_hooks_config(&site);
    for id in ["v1", "v2", "v3"] {
        finalize_as(&site, &cfg, id, &[], 0);
    }
    fs::remove_file(site.current_path()).unwrap();
    let out = cli(&cfg, &["rollback", SITE, "--log-format", "json"]);
    assert_ok(&out, "rollback with current deleted");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    // v2's activation hooks, then the rollback's after_activate and health check.
    assert_eq!(
        hook_calls(&log, "v2")[3..],
        [
            ("after".to_string(), "v3".to_string()),
            ("health".into(), "v3".into())
        ],
        "{}",
        show(&out)
    );
    assert!(
        site.journal_records()
            .iter()
            .any(|r| r["op"] == "rolled_back" && r["release"] == "v3" && r["to"] == "v2"),
        "the rollback is journaled from v3: {:?}",
        site.journal_records()
    );

    // Unhealthy target, `current` dangling: back to where healing would have gone.
    fs::write(site.tmp_path("fail-v1"), b"").unwrap();
    sh(&site.root, "ln -sfn releases/gone current");
    let out = cli(&cfg, &["rollback", SITE, "--log-format", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "back to the release left: {}",
        show(&out)
    );
}

/// `rollback --to` the release that is already current is a no-op that succeeds, as
/// `activate` of it is: a script making sure a release is live must not see exit 1.
#[test]
fn activate_the_current_release_says_it_is_already_current() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    deploy_in_turn(&site, &svc, &["v1", "v2"]);
    svc.stop();
    let out = cli(&cfg, &["activate", SITE, "v2"]);
    assert_ok(&out, "activate the current release");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("release v2 is already current") && !stdout.contains("current -> v2"),
        "no switch claimed when none happened: {}",
        show(&out)
    );
    let out = cli(&cfg, &["activate", SITE, "v1"]);
    assert_ok(&out, "activate the previous release");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("current -> v1"),
        "{}",
        show(&out)
    );
}

#[test]
fn rollback_to_the_current_release_succeeds_without_switching() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    deploy_in_turn(&site, &svc, &["v1", "v2"]);
    svc.stop();
    let out = cli(
        &cfg,
        &["rollback", SITE, "--to", "v2", "--log-format", "json"],
    );
    assert_ok(&out, "rollback --to the current release");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already current"),
        "{}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    let events = stderr_events(&out);
    assert!(
        events
            .iter()
            .any(|v| v["event"] == "release.already_current" && v["release"] == "v2"),
        "{}",
        show(&out)
    );
    assert!(
        !events.iter().any(|v| v["event"] == "release.rolled_back"),
        "nothing was rolled back: {}",
        show(&out)
    );
}

/// A check that prints nothing gets no `stderr` field, rather than an empty one a monitor
/// would show as a blank error; the field is there when it printed something (above).
#[test]
fn a_silent_failed_health_check_has_no_empty_stderr_field() {
    let site = Site::new();
    let cfg = site.write_config(
        SITE,
        "health_retries = 1\n",
        "health_check = [\"/bin/false\"]",
    );
    let mut svc = Service::start_config(&cfg);
    deploy(&site, "v1");
    let ev = svc.wait_release_event("health.failed", "v1");
    assert!(ev.get("stderr").is_none(), "{ev}");
    assert!(!reason_of(&ev).is_empty(), "{ev}");
    svc.stop();
}

/// A hook whose descendant leaves the process group (`setsid`, as daemon launchers do) and
/// keeps the hook's stdout/stderr open must not hold the keeper past `hook_timeout`: the
/// hook is over when it exits (or is killed at the limit), not when every copy of its
/// output pipes is closed. Before the fix the keeper waited for the detached process.
#[test]
fn a_detached_descendant_holding_the_hook_output_does_not_stall_activation() {
    let site = Site::new();
    let pids = site.tmp_path("detached.pids");
    // Each hook starts a detached `sleep 30` that inherits stdout/stderr, then exits 0
    // (after_activate) or hangs until the limit (before_activate of "slow").
    let detach = format!(
        "setsid sh -c 'echo $$ >> {}; exec sleep 30' & sleep 0.3",
        pids.display()
    );
    let after = script(&site.tmp_path(""), "after.sh", &detach);
    let before = script(
        &site.tmp_path(""),
        "before.sh",
        &format!("[ \"$RELEASE_ID\" = slow ] || exit 0; {detach}; sleep 60"),
    );
    let cfg = site.write_config(
        SITE,
        "hook_timeout = \"2s\"\n",
        &format!(
            "after_activate = [\"{}\"]\nbefore_activate = [\"{}\"]",
            after.display(),
            before.display()
        ),
    );
    // Kills the detached sleeps however the test ends.
    struct Reap(PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            for pid in fs::read_to_string(&self.0).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
    let _reap = Reap(pids.clone());
    let mut svc = Service::start_config(&cfg);
    let t0 = std::time::Instant::now();
    deploy(&site, "v1");
    let ev = svc.wait_release_event("release.activated", "v1");
    let took = t0.elapsed();
    deploy(&site, "slow");
    let hf = svc.wait_release_event("hook.failed", "slow");
    let took_slow = t0.elapsed() - took;
    svc.stop();
    assert!(
        took < Duration::from_secs(10),
        "after_activate exited at once but activation took {took:?}: {ev}"
    );
    assert!(
        hf["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("timed out after 2s"),
        "{hf}"
    );
    assert!(
        took_slow < Duration::from_secs(12),
        "a hook killed at hook_timeout = 2s held the keeper {took_slow:?}: {hf}"
    );
}

/// The order SPEC gives: `before_activate` sees the old `current`, then the swap, then
/// `after_activate` and the health check see the new one; the health check makes
/// `health_retries` attempts in all, `health_interval` apart, before the rollback. The
/// first release of a site has no previous one: `PREVIOUS_RELEASE_ID` is set and empty
/// (so `set -u` scripts can use it).
#[test]
fn hooks_run_in_spec_order_and_health_retries_are_spaced() {
    let site = Site::new();
    let log = site.tmp_path("order.log");
    let hook = script(
        &site.tmp_path(""),
        "hook.sh",
        &format!(
            "set -u\nprintf '%s %s %s %s %s\\n' \"$1\" \"$RELEASE_ID\" \"$(readlink \"$SITE_ROOT/current\" || echo none)\" \"${{PREVIOUS_RELEASE_ID-UNSET}}:\" \"$(date +%s%N)\" >> {}\n\
             [ \"$1\" = health ] && [ \"$RELEASE_ID\" = bad ] && exit 1\nexit 0",
            log.display()
        ),
    );
    let h = hook.display();
    let cfg = site.write_config(
        SITE,
        "health_retries = 3\nhealth_interval = \"700ms\"\n",
        &format!(
            "before_activate = [\"{h}\", \"before\"]\nafter_activate = [\"{h}\", \"after\"]\nhealth_check = [\"{h}\", \"health\"]"
        ),
    );
    let mut svc = Service::start_config(&cfg);
    deploy_in_turn(&site, &svc, &["v1"]);
    deploy(&site, "bad");
    svc.wait_release_event("release.rolled_back", "bad");
    svc.stop();
    let text = fs::read_to_string(&log).unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    let of = |id: &str| -> Vec<(String, String, String, u128)> {
        rows.iter()
            .filter(|r| r[1] == id)
            .map(|r| {
                (
                    r[0].to_string(),
                    r[2].to_string(),
                    r[3].to_string(),
                    r[4].parse().unwrap(),
                )
            })
            .collect()
    };
    // (phase, what `current` was, PREVIOUS_RELEASE_ID) of the first `n` calls for `id`.
    let phases =
        |calls: &[(String, String, String, u128)], n: usize| -> Vec<(String, String, String)> {
            calls
                .iter()
                .take(n)
                .map(|(p, c, prev, _)| (p.clone(), c.clone(), prev.clone()))
                .collect()
        };
    let owned = |rows: &[(&str, &str, &str)]| -> Vec<(String, String, String)> {
        rows.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect()
    };
    assert_eq!(
        phases(&of("v1"), 3),
        owned(&
        [
            ("before", "none", ":"),
            ("after", "releases/v1", ":"),
            ("health", "releases/v1", ":")
        ]),
        "first release: before_activate while there is no current yet, PREVIOUS_RELEASE_ID set and empty; log:\n{text}"
    );
    let bad = of("bad");
    assert_eq!(
        phases(&bad, 5),
        owned(&[
            ("before", "releases/v1", "v1:"),
            ("after", "releases/bad", "v1:"),
            ("health", "releases/bad", "v1:"),
            ("health", "releases/bad", "v1:"),
            ("health", "releases/bad", "v1:"),
        ]),
        "before_activate -> swap -> after_activate -> health_check x health_retries; log:\n{text}"
    );
    for w in bad[2..5].windows(2) {
        let gap_ms = (w[1].3 - w[0].3) / 1_000_000;
        assert!(
            (650..3000).contains(&gap_ms),
            "health attempts are health_interval = 700ms apart, were {gap_ms} ms; log:\n{text}"
        );
    }
    assert_eq!(site.current_id().as_deref(), Some("v1"));
}

/// "A failed release is never chosen ... by healing": with `auto_rollback = false` a
/// failed release stays current, yet when `current` is deleted healing points it at the
/// last activated *good* release, not at the failed one activated after it.
#[test]
fn healing_never_points_current_at_a_failed_release() {
    let site = Site::new();
    let cfg = health_config(&site, "auto_rollback = false\n");
    let mut svc = Service::start_config(&cfg);
    deploy_in_turn(&site, &svc, &["v1"]);
    deploy(&site, "bad1");
    svc.wait_release_event("health.failed", "bad1");
    wait_until(
        WAIT,
        || site.current_id().as_deref() == Some("bad1"),
        || "bad1 stays current".into(),
    );
    fs::remove_file(site.current_path()).unwrap();
    wait_until(
        WAIT,
        || site.current_target().is_some(),
        || "current to be healed".into(),
    );
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "healing chose a failed release"
    );
    svc.stop();
}

/// Makes release `id` with `finalize` (no service), asserting the command's exit code.
fn finalize_as(
    site: &Site,
    cfg: &Path,
    id: &str,
    extra: &[&str],
    code: i32,
) -> std::process::Output {
    site.stage_upload(&as_refs(&build(id)));
    finalize_expecting(cfg, SITE, id, extra, code)
}

/// A health check that fails while `<tmp>/fail-<RELEASE_ID>` exists, so a release can
/// turn unhealthy after it was good.
fn flag_health_config(site: &Site, defaults: &str, site_extra: &str) -> PathBuf {
    let health = script(
        &site.tmp_path(""),
        "health.sh",
        &format!(
            "test ! -e \"{}/fail-$RELEASE_ID\"",
            site.tmp_path("").display()
        ),
    );
    site.write_config(
        SITE,
        &format!("health_retries = 1\nhealth_interval = \"0s\"\n{defaults}"),
        &format!("health_check = [\"{}\"]\n{site_extra}", health.display()),
    )
}

/// `rollback` returns "only after the health check has passed or rolled back": a target
/// that fails it gets an activation's verdict, marked failed (so no later rollback picks
/// it) with `current` back on the release the rollback started from. It used to stay
/// current, still "good", and the next plain rollback chose it again.
#[test]
fn rollback_to_an_unhealthy_release_marks_it_failed_and_goes_back() {
    let site = Site::new();
    let cfg = flag_health_config(&site, "", "");
    for id in ["v0", "v1", "v2"] {
        finalize_as(&site, &cfg, id, &[], 0);
    }
    fs::write(site.tmp_path("fail-v1"), b"").unwrap();
    let out = cli(&cfg, &["rollback", SITE, "--log-format", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "current must return to v2 after v1 failed its health check: {}",
        show(&out)
    );
    let l = list(&cfg);
    assert_eq!(release_obj(&l, "v1")["state"], "failed", "{l}");
    assert_eq!(release_obj(&l, "v2")["state"], "current", "{l}");
    assert!(
        stderr_events(&out)
            .iter()
            .any(|v| v["event"] == "release.rolled_back"
                && v["release"] == "v1"
                && v["previous"] == "v2"),
        "the return to v2 is logged as release.rolled_back: {}",
        show(&out)
    );
    // v2 is current again: the next activation's previous (rollback target) is v2, and
    // rolling back twice from there skips the failed v1.
    finalize_as(&site, &cfg, "v3", &[], 0);
    let l = list(&cfg);
    assert_eq!(l["previous"], "v2", "{l}");
    for to in ["v2", "v0"] {
        let out = cli(&cfg, &["rollback", SITE]);
        assert_ok(&out, "rollback");
        assert_eq!(site.current_id().as_deref(), Some(to), "{}", show(&out));
    }
}

/// With the `current` link deleted by hand (no service to heal it), a plain `rollback`
/// steps back from the release the keeper last made current, not onto it.
#[test]
fn rollback_with_the_current_link_deleted_steps_back_from_the_last_current() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    for id in ["v1", "v2", "v3"] {
        finalize_as(&site, &cfg, id, &[], 0);
    }
    fs::remove_file(site.current_path()).unwrap();
    let l = list(&cfg);
    assert_eq!(
        l["previous"], "v2",
        "list shows as previous the release rollback goes to: {l}"
    );
    let out = cli(&cfg, &["rollback", SITE]);
    assert_ok(&out, "rollback");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "v3 was live; rolling back must not land on it: {}",
        show(&out)
    );
}

/// `current` a real directory: `rename(2)` cannot replace it, so `activate` refuses before
/// any hook runs, says how to fix it, and leaves no open trial in the journal (which the
/// next healing pass took for a crash and reported as one).
#[test]
fn activate_while_current_is_a_real_directory_refuses_before_hooks_and_leaves_no_trial() {
    let site = Site::new();
    let marker = site.tmp_path("before-ran");
    let before = script(
        &site.tmp_path(""),
        "before.sh",
        &format!("echo \"$RELEASE_ID\" >> \"{}\"", marker.display()),
    );
    let cfg = site.write_config(
        SITE,
        "",
        &format!("before_activate = [\"{}\"]", before.display()),
    );
    finalize_as(&site, &cfg, "v1", &[], 0);
    finalize_as(&site, &cfg, "v2", &["--no-activate"], 0);
    fs::remove_file(site.current_path()).unwrap();
    fs::create_dir(site.current_path()).unwrap();
    let out = cli(&cfg, &["activate", SITE, "v2"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a symlink") && err.contains("heal"),
        "the error says what is wrong and how to fix it: {}",
        show(&out)
    );
    assert_eq!(
        fs::read_to_string(&marker).unwrap_or_default(),
        "v1\n",
        "before_activate must not run for a switch that cannot happen"
    );
    let heal = cli(&cfg, &["heal", SITE]);
    assert_ok(&heal, "heal");
    assert!(
        !String::from_utf8_lossy(&heal.stdout).contains("interrupted"),
        "no activation was interrupted: {}",
        show(&heal)
    );
    let out = cli(&cfg, &["activate", SITE, "v2"]);
    assert_ok(&out, "activate after heal");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
}

/// A real directory where a configured link belongs is reported, but once `current` has
/// switched it must not abort the activation: it did, leaving `current` on the new
/// release with no health check run, an open trial, and "not activated" printed.
#[test]
fn a_real_directory_where_a_link_belongs_does_not_abort_the_activation() {
    let site = Site::new();
    let cfg = flag_health_config(&site, "", "links = { htdocs = \"current/app\" }");
    finalize_as(&site, &cfg, "v1", &[], 0);
    fs::remove_file(site.root.join("htdocs")).unwrap();
    fs::create_dir(site.root.join("htdocs")).unwrap();
    fs::write(site.tmp_path("fail-v2"), b"").unwrap();
    let out = finalize_as(&site, &cfg, "v2", &[], 1);
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "v2's health check must run and roll it back: {}",
        show(&out)
    );
    let out = finalize_as(&site, &cfg, "v3", &[], 0);
    assert_eq!(site.current_id().as_deref(), Some("v3"), "{}", show(&out));
    assert!(
        site.root.join("htdocs").is_dir() && !site.root.join("htdocs").is_symlink(),
        "the directory is left alone"
    );
    assert!(
        stderr_events(&out)
            .iter()
            .any(|v| v["event"] == "site.error" && v["link"] == "htdocs"),
        "the link that could not be made is logged: {}",
        show(&out)
    );
    let l = list(&cfg);
    assert_eq!(release_obj(&l, "v3")["state"], "current", "{l}");
    assert_eq!(release_obj(&l, "v2")["state"], "failed", "{l}");
}

/// Interrupting `activate` (Ctrl-C, or SIGTERM from a script's timeout) reaches its hook
/// too: a hook runs in a process group of its own, which the terminal's Ctrl-C misses, so
/// the `before_activate` (a migration) ran on, orphaned, after the command had died.
#[test]
fn interrupting_activate_stops_its_running_hook() {
    let site = Site::new();
    let pid_file = site.tmp_path("hook.pid");
    let before = script(
        &site.tmp_path(""),
        "before.sh",
        &format!(
            "case \"$RELEASE_ID\" in slow) echo $$ > \"{0}\"; exec sleep 30;; \
             brief) echo $$ > \"{0}\"; sleep 1;; esac",
            pid_file.display()
        ),
    );
    let cfg = site.write_config(
        SITE,
        "",
        &format!("before_activate = [\"{}\"]", before.display()),
    );
    finalize_as(&site, &cfg, "v1", &[], 0);
    finalize_as(&site, &cfg, "slow", &["--no-activate"], 0);
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let _ = fs::remove_file(&pid_file);
        // Text for one signal, JSON for the other: each says it was interrupted.
        let json = sig == Signal::SIGTERM;
        let format = if json { "json" } else { "text" };
        let child = std::process::Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap(), "--log-format", format])
            .args(["activate", SITE, "slow"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn release-keeper");
        wait_until(
            Duration::from_secs(10),
            || fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n')),
            || "the hook to start".to_string(),
        );
        let hook: i32 = fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Ends an orphaned hook even when an assertion below fails.
        struct Reap(i32);
        impl Drop for Reap {
            fn drop(&mut self) {
                let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
            }
        }
        let _reap = Reap(hook);
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{sig}: {:?}", out.status);
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        let last = said.lines().last().unwrap_or_default().to_string();
        if json {
            let v: Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {said}"));
            assert_eq!(v["event"], "command.failed", "{said}");
            assert_eq!(v["site"], SITE, "{said}");
            assert!(reason_of(&v).contains("interrupted by SIGTERM"), "{said}");
        } else {
            assert!(
                last.contains("interrupted by SIGINT") && last.contains(&format!("heal {SITE}")),
                "{said}"
            );
        }
        wait_until(
            Duration::from_secs(5),
            || {
                // A zombie has ended too; it waits only for its new parent to reap it.
                kill(Pid::from_raw(hook), None).is_err()
                    || fs::read_to_string(format!("/proc/{hook}/stat")).is_ok_and(|st| {
                        st.rsplit(')')
                            .next()
                            .is_some_and(|r| r.trim_start().starts_with('Z'))
                    })
            },
            || format!("{sig}: the hook (pid {hook}) to end with the command"),
        );
        assert_eq!(site.current_id().as_deref(), Some("v1"), "{sig}");
    }
    // A signal the command was started ignoring (`nohup`) stays ignored, for the hook too.
    finalize_as(&site, &cfg, "brief", &["--no-activate"], 0);
    let _ = fs::remove_file(&pid_file);
    let mut child = std::process::Command::new("nohup")
        .args([
            BIN,
            "--config",
            cfg.to_str().unwrap(),
            "activate",
            SITE,
            "brief",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn nohup release-keeper");
    wait_until(
        Duration::from_secs(10),
        || fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n')),
        || "the hook to start".to_string(),
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "under nohup, SIGHUP is ignored: {status:?}"
    );
    assert_eq!(site.current_id().as_deref(), Some("brief"));
}

/// A config whose three hooks append `<phase> <RELEASE_ID> <PREVIOUS_RELEASE_ID>` to
/// `<tmp>/hooks.log`; the health check fails while `<tmp>/fail-<RELEASE_ID>` exists.
fn logging_hooks_config(site: &Site) -> (PathBuf, PathBuf) {
    let log = site.tmp_path("hooks.log");
    let hook = script(
        &site.tmp_path(""),
        "hook.sh",
        &format!(
            "echo \"$1 $RELEASE_ID $PREVIOUS_RELEASE_ID\" >> {}\n\
             [ \"$1\" = health ] && [ -e \"{}/fail-$RELEASE_ID\" ] && exit 1\nexit 0",
            log.display(),
            site.tmp_path("").display()
        ),
    );
    let h = hook.display();
    let cfg = site.write_config(
        SITE,
        "health_retries = 1\nhealth_interval = \"0s\"\n",
        &format!(
            "before_activate = [\"{h}\", \"before\"]\nafter_activate = [\"{h}\", \"after\"]\nhealth_check = [\"{h}\", \"health\"]"
        ),
    );
    (cfg, log)
}

/// Hook calls logged for release `id`, as `(phase, previous)`.
fn hook_calls(log: &Path, id: &str) -> Vec<(String, String)> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (phase, rel, prev) = (f.next()?, f.next()?, f.next().unwrap_or(""));
            (rel == id).then(|| (phase.to_string(), prev.to_string()))
        })
        .collect()
}

/// Points `current` at release `id` the way an operator does by hand.
fn ln_sfn(site: &Site, id: &str) {
    sh(&site.root, &format!("ln -sfn releases/{id} current"));
    assert_eq!(site.current_id().as_deref(), Some(id));
}

/// A staged release an operator made live by hand (`ln -sfn`) never had its hooks and
/// health check, and nothing recorded the switch. `activate` of it answered "already
/// current" and did nothing; it must run the activation (the swap alone is a no-op) and
/// record it. Asked again, it is then already current.
#[test]
fn activate_of_a_staged_release_made_current_by_hand_runs_its_hooks_and_is_recorded() {
    let site = Site::new();
    let (cfg, log) = logging_hooks_config(&site);
    finalize_as(&site, &cfg, "v1", &[], 0);
    finalize_as(&site, &cfg, "v2", &["--no-activate"], 0);
    assert!(hook_calls(&log, "v2").is_empty(), "v2 is only staged");
    ln_sfn(&site, "v2");

    let out = cli(&cfg, &["activate", SITE, "v2", "--log-format", "json"]);
    assert_ok(&out, "activate of the release current points at by hand");
    let calls: Vec<(String, String)> = ["before", "after", "health"]
        .iter()
        .map(|p| (p.to_string(), "v1".to_string()))
        .collect();
    assert_eq!(
        hook_calls(&log, "v2"),
        calls,
        "every hook runs for v2, with the release the keeper last made current as previous; {}",
        show(&out)
    );
    let events = stderr_events(&out);
    assert!(
        events
            .iter()
            .any(|v| v["event"] == "release.activated" && v["release"] == "v2"),
        "{}",
        show(&out)
    );
    assert!(
        !events
            .iter()
            .any(|v| v["event"] == "release.already_current"),
        "{}",
        show(&out)
    );
    assert!(
        site.journal_records()
            .iter()
            .any(|r| r["op"] == "activated" && r["release"] == "v2" && r["previous"] == "v1"),
        "the activation is journaled"
    );
    let l = list(&cfg);
    assert_eq!(release_obj(&l, "v2")["state"], "current", "{l}");
    assert_eq!(l["previous"], "v1", "{l}");

    // Now recorded as the keeper's last switch: already current, no hook runs again.
    let out = cli(&cfg, &["activate", SITE, "v2", "--log-format", "json"]);
    assert_ok(&out, "activate of the current release");
    assert!(
        stderr_events(&out)
            .iter()
            .any(|v| v["event"] == "release.already_current" && v["release"] == "v2"),
        "{}",
        show(&out)
    );
    assert_eq!(hook_calls(&log, "v2").len(), 3, "no hook ran again");
}

/// The same, with a health check that fails: the release made current by hand is marked
/// failed and `current` goes back to the release the keeper last made current, not
/// "back" to the failed release itself.
#[test]
fn activate_of_an_unhealthy_release_made_current_by_hand_rolls_back_to_the_last_activated() {
    let site = Site::new();
    let (cfg, _log) = logging_hooks_config(&site);
    finalize_as(&site, &cfg, "v1", &[], 0);
    finalize_as(&site, &cfg, "v2", &["--no-activate"], 0);
    ln_sfn(&site, "v2");
    fs::write(site.tmp_path("fail-v2"), b"").unwrap();

    let out = cli(&cfg, &["activate", SITE, "v2", "--log-format", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "rolled back to v1; {}",
        show(&out)
    );
    let l = list(&cfg);
    assert_eq!(release_obj(&l, "v2")["state"], "failed", "{l}");
    assert_eq!(release_obj(&l, "v1")["state"], "current", "{l}");
}

/// `rollback --to` the release `current` was pointed at by hand runs the target's checks
/// and records the rollback, as `activate` does.
#[test]
fn rollback_to_a_release_made_current_by_hand_runs_its_checks_and_is_recorded() {
    let site = Site::new();
    let (cfg, log) = logging_hooks_config(&site);
    for id in ["v1", "v2"] {
        finalize_as(&site, &cfg, id, &[], 0);
    }
    ln_sfn(&site, "v1");
    let before = hook_calls(&log, "v1").len();

    let out = cli(
        &cfg,
        &["rollback", SITE, "--to", "v1", "--log-format", "json"],
    );
    assert_ok(&out, "rollback --to the release current points at by hand");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rolled back"),
        "{}",
        show(&out)
    );
    assert_eq!(
        hook_calls(&log, "v1")[before..],
        [
            ("after".to_string(), "v2".to_string()),
            ("health".to_string(), "v2".to_string())
        ],
        "after_activate and the health check run for v1, leaving v2; {}",
        show(&out)
    );
    assert!(
        site.journal_records()
            .iter()
            .any(|r| r["op"] == "rolled_back" && r["release"] == "v2" && r["to"] == "v1"),
        "the rollback is journaled"
    );
    let l = list(&cfg);
    assert_eq!(l["previous"], "v2", "{l}");
}

/// A rollback goes back to a release that was live. `rollback --to` a staged release (never
/// activated) made it current with only `after_activate` and the health check: its
/// `before_activate` (migrations) never ran, and the log called it "rolled back". It is
/// refused before any hook runs, pointing at `activate`, which runs every step.
#[test]
fn rollback_to_a_staged_release_is_refused_before_any_hook_runs() {
    let site = Site::new();
    let (cfg, log) = logging_hooks_config(&site);
    finalize_as(&site, &cfg, "v1", &[], 0);
    finalize_as(&site, &cfg, "v2", &[], 0);
    finalize_as(&site, &cfg, "v3", &["--no-activate"], 0);

    let out = cli(
        &cfg,
        &["rollback", SITE, "--to", "v3", "--log-format", "json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = output_text(&out);
    assert!(
        text.contains("never activated") && text.contains("release-keeper activate app v3"),
        "the refusal says why and what to run instead: {}",
        show(&out)
    );
    assert!(
        hook_calls(&log, "v3").is_empty(),
        "no hook ran for the staged release; {}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("v2"), "{}", show(&out));
    assert!(
        !stderr_events(&out)
            .iter()
            .any(|v| v["event"] == "release.rolled_back"),
        "{}",
        show(&out)
    );
    assert_eq!(release_obj(&list(&cfg), "v3")["state"], "staged");

    // `activate` is the way to make it live: every hook runs, before_activate first.
    let out = cli(&cfg, &["activate", SITE, "v3", "--log-format", "json"]);
    assert_ok(&out, "activate of the staged release");
    let phases: Vec<String> = hook_calls(&log, "v3").into_iter().map(|c| c.0).collect();
    assert_eq!(phases, ["before", "after", "health"], "{}", show(&out));
    assert_eq!(site.current_id().as_deref(), Some("v3"));
}

/// The first release ever failing its health check: there is nothing to go back to, so it
/// stays current (a site with no `current` would serve nothing either), marked failed,
/// said by `release.stays_current`, exit 1. Its hooks saw an empty `PREVIOUS_RELEASE_ID`.
/// `heal` pointed the operator at a `rollback` that can only fail here.
#[test]
fn first_release_failing_its_health_check_stays_current_and_heal_says_there_is_no_good_one() {
    let site = Site::new();
    let (cfg, log) = logging_hooks_config(&site);
    fs::write(site.tmp_path("fail-v1"), b"").unwrap();
    let out = finalize_as(&site, &cfg, "v1", &[], 1);
    assert_eq!(site.current_id().as_deref(), Some("v1"), "{}", show(&out));
    let calls = hook_calls(&log, "v1");
    assert_eq!(
        calls,
        [
            ("before".to_string(), String::new()),
            ("after".to_string(), String::new()),
            ("health".to_string(), String::new())
        ],
        "every hook ran once with an empty PREVIOUS_RELEASE_ID; {}",
        show(&out)
    );
    let events = stderr_events(&out);
    let stays: Vec<&Value> = events
        .iter()
        .filter(|v| v["event"] == "release.stays_current" && v["release"] == "v1")
        .collect();
    assert_eq!(stays.len(), 1, "{}", show(&out));
    assert!(
        reason_of(stays[0]).contains("health_check failed"),
        "{}",
        show(&out)
    );
    assert!(
        !events.iter().any(|v| v["event"] == "release.rolled_back"),
        "{}",
        show(&out)
    );
    let l = list(&cfg);
    let v1 = release_obj(&l, "v1");
    assert_eq!(v1["state"], "current", "{l}");
    assert!(v1["reason"].as_str().is_some_and(|r| !r.is_empty()), "{l}");
    assert!(l["previous"].is_null(), "{l}");

    let out = cli(&cfg, &["rollback", SITE]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        output_text(&out).contains("no previous good release"),
        "{}",
        show(&out)
    );

    let out = cli(&cfg, &["heal", SITE]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "left for an operator: {}",
        show(&out)
    );
    let text = output_text(&out);
    assert!(
        text.contains("no good release to go back to") && !text.contains("rollback app"),
        "heal must not suggest a rollback that has nowhere to go: {}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
}

/// SPEC: an existing id uploaded again with identical content is a no-op. For a release
/// that failed its checks that no-op is no success: `finalize` said "unchanged" and exited
/// 0, so a CI job retrying a failed deploy reported it done while `current` stayed where
/// the rollback had put it. It exits 1 now, saying the release failed and what to do; the
/// same re-upload of a good release still exits 0.
#[test]
fn identical_reupload_of_a_failed_release_is_no_success() {
    let site = Site::new();
    let cfg = flag_health_config(&site, "", "");
    finalize_as(&site, &cfg, "v1", &[], 0);
    fs::write(site.tmp_path("fail-v2"), b"").unwrap();
    finalize_as(&site, &cfg, "v2", &[], 1);
    assert_eq!(site.current_id().as_deref(), Some("v1"));

    let out = finalize_as(&site, &cfg, "v2", &[], 1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("release v2 unchanged (identical upload), and failed")
            && stderr.contains("new id")
            && stderr.contains("--force"),
        "{}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));

    let out = finalize_as(&site, &cfg, "v1", &[], 0);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("release v1 unchanged (identical upload)"),
        "{}",
        show(&out)
    );
}

/// A release staged by a marker with `activate = false`, uploaded again identically with
/// a marker asking for activation (the default): the upload was taken for a no-op, the
/// release stayed staged and `finalize` exited 0, so the uploader's request to make it
/// live was dropped without a word. It is activated now exactly as `activate ID` does it:
/// every hook (with the release it leaves as previous), the health check, the events, and
/// on failure the automatic rollback and exit 1.
#[test]
fn identical_reupload_of_a_staged_release_asking_for_activation_activates_it() {
    let site = Site::new();
    let (cfg, log) = logging_hooks_config(&site);
    finalize_as(&site, &cfg, "v1", &[], 0);
    finalize_as(&site, &cfg, "v2", &["--no-activate"], 0);
    assert!(hook_calls(&log, "v2").is_empty(), "v2 is only staged");
    assert_eq!(site.current_id().as_deref(), Some("v1"));

    let out = finalize_as(&site, &cfg, "v2", &[], 0);
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "the staged release is activated; {}",
        show(&out)
    );
    let calls: Vec<(String, String)> = ["before", "after", "health"]
        .iter()
        .map(|p| (p.to_string(), "v1".to_string()))
        .collect();
    assert_eq!(hook_calls(&log, "v2"), calls, "{}", show(&out));
    let events = stderr_events(&out);
    assert!(
        events.iter().any(|v| v["event"] == "release.activated"
            && v["release"] == "v2"
            && v["previous"] == "v1"),
        "{}",
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("now activated"),
        "{}",
        show(&out)
    );
    let l = list(&cfg);
    assert_eq!(release_obj(&l, "v2")["state"], "current", "{l}");
    assert_eq!(l["previous"], "v1", "{l}");

    // Once activated, the same upload again is the plain no-op: no hook runs again.
    let out = finalize_as(&site, &cfg, "v2", &[], 0);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("release v2 unchanged (identical upload)"),
        "{}",
        show(&out)
    );
    assert_eq!(hook_calls(&log, "v2").len(), 3, "{}", show(&out));

    // Unhealthy: the usual verdict, rolled back to v2, exit 1.
    finalize_as(&site, &cfg, "v3", &["--no-activate"], 0);
    fs::write(site.tmp_path("fail-v3"), b"").unwrap();
    let out = finalize_as(&site, &cfg, "v3", &[], 1);
    assert_eq!(site.current_id().as_deref(), Some("v2"), "{}", show(&out));
    assert!(
        stderr_events(&out)
            .iter()
            .any(|v| v["event"] == "release.rolled_back"
                && v["release"] == "v3"
                && v["previous"] == "v2"),
        "{}",
        show(&out)
    );
    assert_eq!(release_obj(&list(&cfg), "v3")["state"], "failed");
    // A failed release uploaded again stays no success, as before.
    let out = finalize_as(&site, &cfg, "v3", &[], 1);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("and failed"),
        "{}",
        show(&out)
    );
    // A staged release uploaded again to stay staged stays a no-op.
    finalize_as(&site, &cfg, "v4", &["--no-activate"], 0);
    let out = finalize_as(&site, &cfg, "v4", &["--no-activate"], 0);
    assert!(hook_calls(&log, "v4").is_empty(), "{}", show(&out));
    assert_eq!(release_obj(&list(&cfg), "v4")["state"], "staged");
}

/// `current` deleted by hand, then `activate ID`: the link names no release, so the hooks
/// got an empty `PREVIOUS_RELEASE_ID` and `release.activated` no `previous`, as for a
/// site's first release, while healing would have pointed `current` at the last activated
/// good release and an automatic rollback goes back there. That release is the previous
/// one now, for the hooks, the event and the journal; activating that very release names
/// the good one before it.
#[test]
fn activate_after_current_was_deleted_names_the_release_healing_would_restore_as_previous() {
    let site = Site::new();
    let (cfg, log) = logging_hooks_config(&site);
    finalize_as(&site, &cfg, "v1", &[], 0);
    finalize_as(&site, &cfg, "v2", &[], 0);
    finalize_as(&site, &cfg, "v3", &["--no-activate"], 0);
    fs::remove_file(site.current_path()).unwrap();

    let out = cli(&cfg, &["activate", SITE, "v3", "--log-format", "json"]);
    assert_ok(&out, "activate with current deleted");
    assert_eq!(site.current_id().as_deref(), Some("v3"));
    let calls: Vec<(String, String)> = ["before", "after", "health"]
        .iter()
        .map(|p| (p.to_string(), "v2".to_string()))
        .collect();
    assert_eq!(
        hook_calls(&log, "v3"),
        calls,
        "PREVIOUS_RELEASE_ID is the release healing would restore; {}",
        show(&out)
    );
    assert!(
        stderr_events(&out)
            .iter()
            .any(|v| v["event"] == "release.activated"
                && v["release"] == "v3"
                && v["previous"] == "v2"),
        "{}",
        show(&out)
    );
    assert!(
        site.journal_records()
            .iter()
            .any(|r| r["op"] == "activated" && r["release"] == "v3" && r["previous"] == "v2"),
        "the activation is journaled with its previous release"
    );

    // Activating the very release healing would restore: the good one before it.
    fs::remove_file(site.current_path()).unwrap();
    let out = cli(&cfg, &["activate", SITE, "v3", "--log-format", "json"]);
    assert_ok(
        &out,
        "activate of the last activated release with current deleted",
    );
    assert_eq!(hook_calls(&log, "v3")[3..], calls, "{}", show(&out));

    // Unhealthy, with `current` dangling: rolled back to where healing would go.
    finalize_as(&site, &cfg, "v4", &["--no-activate"], 0);
    fs::write(site.tmp_path("fail-v4"), b"").unwrap();
    sh(&site.root, "ln -sfn releases/gone current");
    let out = cli(&cfg, &["activate", SITE, "v4", "--log-format", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        hook_calls(&log, "v4"),
        ["before", "after", "health"]
            .iter()
            .map(|p| (p.to_string(), "v3".to_string()))
            .collect::<Vec<_>>(),
        "{}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("v3"), "{}", show(&out));
    assert!(
        stderr_events(&out)
            .iter()
            .any(|v| v["event"] == "release.rolled_back"
                && v["release"] == "v4"
                && v["previous"] == "v3"),
        "{}",
        show(&out)
    );
}

/// The same through the service and markers: a release staged by `activate = false`,
/// the same upload marked again without it, is activated (`release.activated`).
#[test]
fn identical_reupload_of_a_staged_release_by_marker_activates_it_in_the_service() {
    let site = Site::new();
    let cfg = health_config(&site, "");
    let mut svc = Service::start_config(&cfg);
    deploy_in_turn(&site, &svc, &["v1"]);
    let b = build("v2");
    let files: Vec<(&str, &[u8])> = b.iter().map(|(n, c)| (n.as_str(), c.as_slice())).collect();
    site.deploy(&files, "id = \"v2\"\nactivate = false\n");
    svc.wait_release_event("release.finalized", "v2");
    site.wait_marker_consumed(WAIT);
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "v2 is only staged"
    );

    site.drop_marker("id = \"v2\"\n");
    let ev = svc.wait_release_event("release.activated", "v2");
    assert_eq!(ev["previous"], "v1", "{ev}");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    svc.stop();
}

/// A chatty hook (a migration printing every statement, a build log) is drained as fast as
/// it writes: its output must not slow it down towards `hook_timeout`. Before the fix the
/// pipes were read only between 10 ms sleeps, a pipe's worth (64 KiB) at a time, so 20 MB
/// of output took seconds and this hook timed out. What is logged is still only the tail.
#[test]
fn a_chatty_hook_is_not_throttled_by_its_output() {
    let site = Site::new();
    let hook = script(
        &site.tmp_path(""),
        "chatty.sh",
        "head -c 20000000 /dev/zero | tr '\\0' x; echo; echo done-stdout; \
         head -c 20000000 /dev/zero | tr '\\0' y >&2; echo >&2; echo done-stderr >&2",
    );
    let cfg = site.write_config(
        SITE,
        "hook_timeout = \"3s\"\n",
        &format!("before_activate = [\"{}\"]", hook.display()),
    );
    let mut svc = Service::start_config(&cfg);
    let t0 = std::time::Instant::now();
    deploy(&site, "v1");
    let ev = svc.wait_release_event("release.activated", "v1");
    let took = t0.elapsed();
    let failed = svc.events_for("hook.failed", "v1");
    svc.stop();
    assert!(failed.is_empty(), "the chatty hook failed: {failed:?}");
    assert!(
        took < Duration::from_secs(3),
        "40 MB of hook output took {took:?} to drain: {ev}"
    );
}

/// What a hook leaves running in its process group is stopped when the hook ends, gently:
/// SIGTERM first (a background job can finish its write), SIGKILL only for what is still
/// running after the grace. Before the fix the group was SIGKILLed at once, so the
/// leftover's TERM handler never ran.
#[test]
fn a_background_job_left_by_a_hook_gets_sigterm_before_sigkill() {
    let site = Site::new();
    let said = site.tmp_path("term.log");
    let pidfile = site.tmp_path("bg.pid");
    let hook = script(
        &site.tmp_path(""),
        "leaves.sh",
        &format!(
            "sh -c 'trap \"echo term >> {said}; exit 0\" TERM; echo $$ > {pid}; while :; do sleep 0.1; done' &\n\
             while [ ! -s {pid} ]; do sleep 0.01; done\nexit 0",
            said = said.display(),
            pid = pidfile.display()
        ),
    );
    let cfg = site.write_config(
        SITE,
        "hook_timeout = \"5s\"\n",
        &format!("before_activate = [\"{}\"]", hook.display()),
    );
    let mut svc = Service::start_config(&cfg);
    // Whatever the outcome, the background job must not outlive the test.
    struct Reap(PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Some(pid) = fs::read_to_string(&self.0)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    let _reap = Reap(pidfile.clone());
    deploy(&site, "v1");
    svc.wait_release_event("release.activated", "v1");
    svc.stop();
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // A zombie not reaped yet by its new parent counts as gone.
    let gone = || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    };
    wait_until(Duration::from_secs(3), gone, || {
        format!("the hook's background job {pid} to end")
    });
    assert_eq!(
        fs::read_to_string(&said).unwrap_or_default(),
        "term\n",
        "the background job was killed without SIGTERM first"
    );
}

/// The operation lock's file deleted while an activation holds it (a cleanup script, an
/// operator tidying `.release-keeper/`) lets no second command in: it used to open a new
/// file at the path, lock it (another inode, free) and activate alongside the first, which
/// swapped `current` back under it once its health check passed.
#[test]
fn an_activation_whose_lock_file_is_deleted_still_keeps_other_commands_out() {
    let site = Site::new();
    let started = site.tmp_path("b-checking");
    let health = script(
        &site.tmp_path(""),
        "health.sh",
        &format!(
            "if [ \"$RELEASE_ID\" = b ]; then touch '{}'; sleep 3; fi; exit 0",
            started.display()
        ),
    );
    let cfg = site.write_config(
        SITE,
        "health_retries = 1\nhook_timeout = \"10s\"",
        &format!("health_check = [\"{}\"]", health.display()),
    );
    for id in ["a", "b", "c"] {
        site.stage_upload(&as_refs(&small_build(id)));
        let out = cli(&cfg, &["finalize", SITE, "--id", id, "--no-activate"]);
        assert_ok(&out, &format!("finalize {id}"));
    }
    assert_ok(&cli(&cfg, &["activate", SITE, "a"]), "activate a");

    let b = {
        let cfg = cfg.clone();
        std::thread::spawn(move || cli(&cfg, &["activate", SITE, "b"]))
    };
    wait_until(
        WAIT,
        || started.exists(),
        || "the health check of b to start".into(),
    );
    fs::remove_file(site.root.join(".release-keeper/lock")).unwrap();

    let out = cli(&cfg, &["activate", SITE, "c"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "activate c while b's activation holds the lock (its file deleted) is busy; {}",
        show(&out)
    );
    // Waiting, it runs once b is done: last, so `current` ends at c, as it said.
    let out = cli(&cfg, &["activate", SITE, "c", "--wait=15s"]);
    assert_ok(&out, "activate c --wait");
    let b = b.join().unwrap();
    assert_ok(&b, "activate b");
    assert_eq!(site.current_id().as_deref(), Some("c"));
    let records = site.journal_records();
    let steps: Vec<String> = records
        .iter()
        .filter(|r| r["op"] == "trial" || r["op"] == "activated")
        .map(|r| {
            format!(
                "{} {}",
                r["op"].as_str().unwrap(),
                r["release"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            "trial a",
            "activated a",
            "trial b",
            "activated b",
            "trial c",
            "activated c"
        ],
        "activations one after the other"
    );
    let seqs: Vec<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert!(
        seqs.len() == records.len() && seqs.windows(2).all(|w| w[0] < w[1]),
        "journal sequence numbers unique and in order: {seqs:?}"
    );
}
