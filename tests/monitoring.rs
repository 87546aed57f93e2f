//! What monitoring and scripts see (SPEC "Logs", "Command line"): the events a command
//! logs for what it did, its human output and its exit code.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const SITE: &str = "mon";

/// Writes an executable shell script and returns its path.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut perm = fs::metadata(&p).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    fs::set_permissions(&p, perm).unwrap();
    p
}

/// A config whose health check fails while `<tmp>/fail-<RELEASE_ID>` exists.
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

/// Stages a small build and runs `finalize --id ID` (json logs), asserting its exit code.
fn finalize_as(site: &Site, cfg: &Path, id: &str, code: i32) -> std::process::Output {
    let b = small_build(id);
    site.stage_upload(&as_refs(&b));
    finalize_expecting(cfg, SITE, id, &[], code)
}

fn events_named(out: &std::process::Output, name: &str) -> Vec<Value> {
    stderr_events(out)
        .into_iter()
        .filter(|v| v["event"] == name)
        .collect()
}

/// `release.rolled_back` means `current` went back to an earlier release. A `rollback`
/// whose target then failed its health check logged it before the check ran, so a
/// monitor counted a rollback to v1 that never held (v1 failed, `current` returned to v2)
/// and read `current` as v1. Only the return to v2 may be logged as a rollback.
#[test]
fn rollback_whose_target_fails_its_checks_logs_no_rollback_to_it() {
    let site = Site::new();
    let cfg = flag_health_config(&site, "", "");
    for id in ["v1", "v2"] {
        finalize_as(&site, &cfg, id, 0);
    }
    fs::write(site.tmp_path("fail-v1"), b"").unwrap();
    let out = cli(&cfg, &["rollback", SITE, "--log-format", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(site.current_id().as_deref(), Some("v2"), "{}", show(&out));
    let rolled = events_named(&out, "release.rolled_back");
    assert!(
        !rolled.iter().any(|v| v["previous"] == "v1"),
        "no release.rolled_back to v1: it failed its health check; {}",
        show(&out)
    );
    assert!(
        rolled
            .iter()
            .any(|v| v["release"] == "v1" && v["previous"] == "v2"),
        "the return to v2 is logged; {}",
        show(&out)
    );

    // A rollback that holds is logged once, after its checks, with the fields of SPEC.
    fs::remove_file(site.tmp_path("fail-v1")).unwrap();
    finalize_as(&site, &cfg, "v3", 0);
    let out = cli(&cfg, &["rollback", SITE, "--log-format", "json"]);
    assert_ok(&out, "rollback v3 -> v2");
    let all = stderr_events(&out);
    let rolled: Vec<&Value> = all
        .iter()
        .filter(|v| v["event"] == "release.rolled_back")
        .collect();
    assert_eq!(rolled.len(), 1, "{}", show(&out));
    let ev = rolled[0];
    assert_eq!(ev["site"], SITE, "{ev}");
    assert_eq!(ev["release"], "v3", "{ev}");
    assert_eq!(ev["previous"], "v2", "{ev}");
    assert!(ev["reason"].is_string(), "{ev}");
    assert!(ev["duration_ms"].is_u64(), "{ev}");
}

/// `finalize` whose release fails its checks with nowhere to roll back to: `current` is
/// on the release, so the output must not say it was "not activated", and the error names
/// what failed instead of "finalize did not complete".
#[test]
fn finalize_with_failed_activation_says_what_happened() {
    let site = Site::new();
    let cfg = flag_health_config(&site, "", "");
    fs::write(site.tmp_path("fail-v1"), b"").unwrap();
    let out = finalize_as(&site, &cfg, "v1", 1);
    assert_eq!(site.current_id().as_deref(), Some("v1"), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("not activated") && stdout.contains("v1 finalized; activation failed"),
        "stdout contradicts where current is: {}",
        show(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("did not complete")
            && stderr.contains(&format!(
                "site {SITE}: release v1 was finalized but its activation failed"
            )),
        "the error names the site, the release and what failed: {}",
        show(&out)
    );

    // A rejected upload says so on stderr too.
    let b = small_build("v2");
    site.stage_upload(&as_refs(&b));
    fs::write(
        site.deploy_cache().join("extra.txt"),
        b"not in the manifest",
    )
    .unwrap();
    let out = cli(&cfg, &["finalize", SITE, "--id", "v2"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("site {SITE}: the upload was rejected")),
        "{}",
        show(&out)
    );
}

/// SPEC: "human output goes to stdout, logs to stderr". `manifest DIR` said what it
/// wrote on stderr, where a script capturing the command's output did not see it.
#[test]
fn manifest_says_what_it_wrote_on_stdout() {
    let site = Site::new();
    let build = site.tmp_path("build");
    write_tree(&build, &as_refs(&small_build("m1")));
    let out = cli_raw(&["manifest", build.to_str().unwrap()]);
    assert_ok(&out, "manifest DIR");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("wrote {}", build.join(MANIFEST).display()))
            && stdout.contains("(2 files)"),
        "{}",
        show(&out)
    );
    assert!(out.stderr.is_empty(), "nothing on stderr: {}", show(&out));
    // `-o -`: stdout is the manifest and nothing else.
    let out = cli_raw(&["manifest", build.to_str().unwrap(), "-o", "-"]);
    assert_ok(&out, "manifest DIR -o -");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().count() == 2 && !text.contains("wrote"),
        "{}",
        show(&out)
    );
}

/// A configured site whose root does not exist yet is waited for, not an error (SPEC);
/// `status` showed it with no releases, but `list` failed with exit 1 and printed no
/// JSON, so a script listing every configured site broke on one not deployed yet.
#[test]
fn list_of_a_site_whose_root_is_not_made_yet_is_an_empty_list() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    fs::remove_dir_all(site.root.clone()).unwrap();
    let out = cli(&cfg, &["list", SITE, "--json"]);
    assert_ok(&out, "list --json of a site without its root");
    let doc = stdout_json(&out);
    assert_eq!(doc["site"], SITE, "{doc}");
    assert_eq!(doc["current"], Value::Null, "{doc}");
    assert_eq!(doc["releases"], serde_json::json!([]), "{doc}");
    let out = cli(&cfg, &["list", SITE]);
    assert_ok(&out, "list of a site without its root");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("no releases") && stdout.contains("does not exist yet"),
        "{}",
        show(&out)
    );
    // Nothing was created by looking.
    assert!(!site.root.exists());
}

/// `verify --all` of a site without releases printed nothing at all, which reads like a
/// command that did not run; it says there was nothing to verify (exit 0, no drift).
#[test]
fn verify_all_without_releases_says_so() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    assert_ok(&cli(&cfg, &["init", SITE]), "init");
    let out = cli(&cfg, &["verify", SITE, "--all"]);
    assert_ok(&out, "verify --all of an empty site");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{SITE}: no releases to verify")),
        "{}",
        show(&out)
    );
    let out = cli(&cfg, &["verify", SITE, "--all", "--json"]);
    assert_ok(&out, "verify --all --json of an empty site");
    assert_eq!(stdout_json(&out)["releases"], serde_json::json!([]));
}

/// SPEC "Logs": what went wrong is the `reason` field. A second service for a site logged
/// `site.error` with the cause in `error`, where a monitor reading `reason` saw nothing.
#[test]
fn a_refused_second_service_logs_its_reason_as_reason() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    let out = cli(&cfg, &["run", "--log-format", "json"]);
    assert_eq!(out.status.code(), Some(75), "busy: {}", show(&out));
    let ev = stderr_events(&out)
        .into_iter()
        .find(|v| v["event"] == "site.error")
        .unwrap_or_else(|| panic!("no site.error: {}", show(&out)));
    assert_eq!(ev["site"], SITE, "{ev}");
    assert!(
        reason_of(&ev).contains("already running"),
        "the cause is in `reason`: {ev}"
    );
    assert!(ev.get("error").is_none(), "{ev}");
    svc.stop();
}

/// Two services for a site whose root does not exist yet: both start and wait for it.
/// Once it appears, the one that does not get the site's lifetime lock is refused as at
/// start (`site.error` with the cause in `reason`, exit 75). Its refusal went to a
/// readiness channel already used while it waited, so it was dropped: that service went
/// on running, serving nothing, and said nothing.
#[test]
fn a_second_service_waiting_for_the_root_is_refused_once_it_appears() {
    let site = Site::new();
    fs::remove_dir_all(&site.root).unwrap();
    let cfg = site.write_config(SITE, "", "");
    let a = Service::start_config(&cfg);
    a.wait_event("site.waiting", |_| true, WAIT);
    let b = Service::start_config(&cfg);
    b.wait_event("site.waiting", |_| true, WAIT);
    fs::create_dir_all(site.deploy_cache()).unwrap();
    // Both watch for the root: either may take the site.
    wait_until(
        WAIT,
        || !a.is_running() || !b.is_running(),
        || {
            format!(
                "one service to be refused; a:\n{}\nb:\n{}",
                a.log_text(),
                b.log_text()
            )
        },
    );
    let (mut served, refused) = if a.is_running() { (a, b) } else { (b, a) };
    let st = refused.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(75), "busy: {}", refused.log_text());
    let ev = refused
        .events("site.error")
        .into_iter()
        .find(|v| reason_of(v).contains("already running"))
        .unwrap_or_else(|| panic!("no site.error with the cause: {}", refused.log_text()));
    assert_eq!(ev["site"], SITE, "{ev}");
    // The other one serves the site.
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    served.wait_release_event("release.activated", "v1");
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    assert!(served.is_running());
    served.stop();
}

/// `--wait` takes the next word as its optional DURATION, so `pin --wait SITE ID` took
/// the site for a duration and complained that ID was missing. The error now names the
/// value `--wait` got and says how to write it (still exit 2, a usage error).
#[test]
fn wait_before_the_positional_arguments_names_the_mistake() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let out = cli(&cfg, &["pin", "--wait", SITE, "v1"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("'{SITE}'")) && stderr.contains("--wait=DURATION"),
        "{}",
        show(&out)
    );
    assert!(!stderr.contains("<ID>"), "{}", show(&out));
    // The forms that work still do.
    assert_ok(&cli(&cfg, &["init", SITE]), "init");
    let out = cli(&cfg, &["pin", "--wait=1s", SITE, "nope"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "no such release: {}",
        show(&out)
    );
    let out = cli(&cfg, &["prune", SITE, "--wait"]);
    assert_ok(&out, "prune --wait");
    let out = cli(&cfg, &["prune", SITE, "--wait", "2s"]);
    assert_ok(&out, "prune --wait 2s");
}

/// `prune` and `heal` printed their lines without the site ("deleted v1 (...)",
/// "linked htdocs -> ..."), unlike every other command and their own "SITE: nothing to
/// prune": a loop over sites could not tell which site a line was about.
#[test]
fn prune_and_heal_lines_name_the_site() {
    let site = Site::new();
    let links = "links = { htdocs = \"current\" }";
    let cfg = site.write_config(SITE, "", links);
    for id in ["v1", "v2", "v3"] {
        finalize_as(&site, &cfg, id, 0);
    }
    // With keep = 1, and v2 the previous good release, v1 goes at the next prune.
    let cfg = site.write_config(SITE, "keep = 1\n", links);
    for (args, what) in [
        (&["prune", SITE, "--dry-run"][..], "would delete v1"),
        (&["prune", SITE], "deleted v1"),
    ] {
        let out = cli(&cfg, args);
        assert_ok(&out, what);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("{SITE}: {what} ("))),
            "{}",
            show(&out)
        );
    }
    fs::remove_file(site.root.join("htdocs")).unwrap();
    fs::create_dir(site.releases_dir().join("handmade")).ok();
    let out = cli(&cfg, &["heal", SITE, "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !stdout.is_empty() && stdout.lines().all(|l| l.starts_with(&format!("{SITE}: "))),
        "{}",
        show(&out)
    );
    assert!(stdout.contains("would link htdocs"), "{}", show(&out));
    let out = cli(&cfg, &["heal", SITE]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        stdout.lines().all(|l| l.starts_with(&format!("{SITE}: ")))
            && stdout.contains(&format!("{SITE}: linked htdocs"))
            && stdout.contains(&format!("{SITE}: note: ")),
        "{}",
        show(&out)
    );
}

/// `manifest DIR` with a DIR that does not exist or is a file is a wrong argument: exit 2
/// naming it, not 1 with a bare OS error.
#[test]
fn manifest_of_a_missing_dir_is_a_usage_error() {
    let site = Site::new();
    let missing = site.tmp_path("no-such-build");
    let out = cli_raw(&["manifest", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "manifest {}: no such directory",
            missing.display()
        )),
        "{}",
        show(&out)
    );
    let file = site.tmp_path("a-file");
    fs::write(&file, b"x").unwrap();
    let out = cli_raw(&["manifest", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a directory"),
        "{}",
        show(&out)
    );
}

/// SPEC "Logs": with `--log-format json` the output is one JSON object per line. A failing
/// command ended its stderr with a plain `release-keeper: ...` line, so `2>&1 | jq`
/// stopped at the one line that said what went wrong. It is a `command.failed` event now,
/// with the reason and the exit code; text mode keeps the plain line.
#[test]
fn with_json_logs_a_failing_command_ends_with_a_json_line() {
    let site = Site::new();
    let cfg = flag_health_config(&site, "", "");
    finalize_as(&site, &cfg, "v1", 0);
    fs::write(site.tmp_path("fail-v2"), b"").unwrap();
    let out = finalize_as(&site, &cfg, "v2", 1);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()),
            "not a JSON object: {line:?}; {}",
            show(&out)
        );
    }
    let ev = stderr_events(&out)
        .into_iter()
        .find(|v| v["event"] == "command.failed")
        .unwrap_or_else(|| panic!("no command.failed: {}", show(&out)));
    assert_eq!(ev["site"], SITE, "{ev}");
    assert_eq!(ev["exit_code"], 1, "{ev}");
    assert!(reason_of(&ev).contains("activation failed"), "{ev}");

    // Usage errors too (exit 2), and the text format keeps its plain line.
    let out = cli(&cfg, &["--log-format", "json", "list", "nosuch"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let events = stderr_events(&out);
    assert!(
        events.len() == String::from_utf8_lossy(&out.stderr).lines().count()
            && events
                .iter()
                .any(|v| v["event"] == "command.failed" && v["exit_code"] == 2),
        "{}",
        show(&out)
    );
    let out = cli(&cfg, &["list", "nosuch"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("release-keeper: unknown site"),
        "{}",
        show(&out)
    );
}

/// Asserts every line of the command's stderr is one JSON object (SPEC "Logs", json).
fn assert_stderr_all_json(out: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !stderr.trim().is_empty(),
        "nothing on stderr; {}",
        show(out)
    );
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()),
            "not a JSON object: {line:?}; {}",
            show(out)
        );
    }
}

/// A command line clap rejected (a missing SITE, a bad `--wait` DURATION) printed clap's
/// plain multi-line message even with `--log-format json`, so stderr was not one JSON
/// object per line for the mistake a script most needs to read. It is `command.failed`
/// (exit 2) now, wherever `--log-format json` stands; help, and the text format, unchanged.
#[test]
fn with_json_logs_a_command_line_error_is_a_json_line() {
    for args in [
        &["--log-format", "json", "list"][..],
        &["list", "--log-format=json"][..],
        &["pin", "web", "v1", "--wait", "5x", "--log-format", "json"][..],
    ] {
        let out = cli_raw(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert_stderr_all_json(&out);
        let ev = stderr_events(&out)
            .into_iter()
            .find(|v| v["event"] == "command.failed")
            .unwrap_or_else(|| panic!("{args:?}: no command.failed: {}", show(&out)));
        assert_eq!(ev["exit_code"], 2, "{ev}");
        assert_eq!(ev["site"], "", "{ev}");
        assert!(!reason_of(&ev).is_empty(), "{ev}");
    }
    let ev = stderr_events(&cli_raw(&[
        "--log-format",
        "json",
        "pin",
        "web",
        "v1",
        "--wait",
        "5x",
    ]))
    .into_iter()
    .find(|v| v["event"] == "command.failed")
    .unwrap_or_default();
    assert!(
        reason_of(&ev).contains("5x"),
        "the reason names the bad value: {ev}"
    );

    let out = cli_raw(&["list"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error: "),
        "text keeps clap's message: {}",
        show(&out)
    );
    let out = cli_raw(&["--log-format", "json", "--help"]);
    assert_ok(&out, "--help with json logs");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Usage:"),
        "{}",
        show(&out)
    );
}

/// `manifest DIR` warns about a symlink the keeper would reject; with `--log-format json`
/// that warning was a plain `warning: ...` line among JSON ones. It is a JSON event now,
/// naming the path; the text format keeps the plain line.
#[test]
fn with_json_logs_the_manifest_symlink_warning_is_a_json_line() {
    let site = Site::new();
    let build = site.tmp_path("build");
    write_tree(&build, &[("index.html", b"hi\n" as &[u8])]);
    write_symlink(&build, "etc", "/etc/passwd");
    let dir = build.to_str().unwrap();
    let out = cli_raw(&["manifest", dir, "--log-format", "json"]);
    assert_ok(&out, "manifest DIR --log-format json");
    assert_stderr_all_json(&out);
    let ev = stderr_events(&out)
        .into_iter()
        .find(|v| v["event"] == "manifest.bad_symlink")
        .unwrap_or_else(|| panic!("no manifest.bad_symlink: {}", show(&out)));
    assert_eq!(ev["path"], "etc", "{ev}");
    assert!(reason_of(&ev).contains("is absolute"), "{ev}");
    assert!(ev.get("site").is_some(), "every event carries site: {ev}");
}

/// A site whose `root` names a file: `check-config`, `status`, `list` and the command
/// errors said it "does not exist yet", sending the operator to look for a missing
/// directory (or run `init`, which cannot help) instead of at the file in its place. It is
/// a config error now, the same from every command that loads the config.
#[test]
fn a_root_that_is_a_file_is_not_reported_as_missing() {
    let site = Site::new();
    let file = site.tmp_path("root-is-a-file");
    fs::write(&file, b"x").unwrap();
    let cfg = site.tmp_path("file-root.toml");
    fs::write(
        &cfg,
        format!("[sites.{SITE}]\nroot = \"{}\"\n", file.display()),
    )
    .unwrap();
    for args in [
        &["check-config"][..],
        &["status"],
        &["list", SITE],
        &["prune", SITE],
    ] {
        let out = cli(&cfg, args);
        let all = output_text(&out);
        assert!(
            out.status.code() == Some(2)
                && all.contains("file-root.toml:2:")
                && all.contains("is not a directory")
                && !all.contains("does not exist"),
            "`{}`: {}",
            args.join(" "),
            show(&out)
        );
    }
}

/// A pipe whose reading end is already closed: every write to it fails with EPIPE, as
/// stderr does under `release-keeper run 2>&1 | head -1` once `head` has its line.
fn closed_pipe() -> std::os::fd::OwnedFd {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    write
}

#[test]
fn a_closed_stderr_does_not_stop_a_command() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.stage_upload(&as_refs(&small_build("v1")));
    for format in ["json", "text"] {
        let id = format!("v1-{format}");
        let out = std::process::Command::new(BIN)
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "finalize",
                SITE,
                "--id",
                &id,
            ])
            .args(["--log-format", format])
            .env_remove("RELEASE_KEEPER_CONFIG")
            .env_remove("JOURNAL_STREAM")
            .stdin(std::process::Stdio::null())
            .stderr(closed_pipe())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "finalize with {format} logs to a closed pipe"
        );
        assert_eq!(site.current_id().as_deref(), Some(id.as_str()));
        assert_eq!(site.claim_count(), 0, "the claim is done with");
    }
    // A failure's last line goes to the closed pipe too; the exit code still says why.
    let out = std::process::Command::new(BIN)
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "activate",
            SITE,
            "nosuch",
        ])
        .env_remove("RELEASE_KEEPER_CONFIG")
        .env_remove("JOURNAL_STREAM")
        .stderr(closed_pipe())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(101), "a panic is not an exit code");
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn a_closed_stderr_does_not_stop_the_service() {
    let site = Site::new();
    let mut child = std::process::Command::new(BIN)
        .args([
            "run",
            "--root",
            site.root.to_str().unwrap(),
            "--log-format",
            "text",
        ])
        .env_remove("RELEASE_KEEPER_CONFIG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(closed_pipe())
        .spawn()
        .unwrap();
    for n in 1..=2 {
        site.deploy(&as_refs(&small_build(&format!("v{n}"))), &format!("v{n}"));
        let want = format!("v{n}");
        wait_until(
            WAIT,
            || site.current_id().as_deref() == Some(want.as_str()) && site.claim_count() == 0,
            || format!("current -> {want} with the service's stderr closed"),
        );
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the service is still running"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "a clean stop after logging into a closed pipe"
    );
}
