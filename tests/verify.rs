//! `verify SITE [ID] [--all]`: drift of a changed byte, a changed mode, a deleted file and
//! an added file (each alone, and all at once with every path listed); `--all` and an
//! explicit ID; the service's periodic re-hash (`drift.detected`) and `status`.
mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const SITE: &str = "web";

/// A site with releases v1 and v2 (current) made by a short-lived service.
fn site_with_releases(defaults: &str) -> (Site, PathBuf) {
    let site = Site::new();
    let cfg = site.write_config(SITE, defaults, "");
    let mut svc = Service::start_config(&cfg);
    for id in ["v1", "v2"] {
        site.deploy(&as_refs(&build(id)), &format!("id = \"{id}\"\n"));
        svc.wait_release_event("release.activated", id);
    }
    svc.stop();
    (site, cfg)
}

fn build(tag: &str) -> Vec<(String, Vec<u8>)> {
    let mut b = small_build(tag);
    b.push(("docs/readme.txt".into(), b"read me\n".to_vec()));
    b
}

/// Runs `f` with write access to `path`'s (read-only) directory restored around it.
fn in_writable_dir(path: &Path, f: impl FnOnce()) {
    let dir = path.parent().unwrap();
    let dm = mode(dir);
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    f();
    fs::set_permissions(dir, fs::Permissions::from_mode(dm)).unwrap();
}

/// Flips one bit of the first byte of a read-only file, keeping its size and mode.
fn flip_byte(path: &Path) {
    let m = mode(path);
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    let mut b = fs::read(path).unwrap();
    b[0] ^= 0x20;
    fs::write(path, b).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(m)).unwrap();
}

fn verify(cfg: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut full = vec!["verify", SITE];
    full.extend_from_slice(args);
    let out = cli(cfg, &full);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        show(&out),
    )
}

/// Asserts `verify` exits 1 and lists `path` on a line saying `what`.
fn assert_drift(cfg: &Path, args: &[&str], path: &str, what: &str) {
    let (code, stdout, shown) = verify(cfg, args);
    assert_eq!(code, Some(1), "drift in {path} -> exit 1; {shown}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(path) && l.to_lowercase().contains(what)),
        "verify lists {path} as `{what}`; {shown}"
    );
}

fn assert_clean(cfg: &Path, args: &[&str]) {
    let (code, _, shown) = verify(cfg, args);
    assert_eq!(code, Some(0), "verify {args:?} on intact releases; {shown}");
}

#[test]
fn changed_byte_is_drift() {
    let (site, cfg) = site_with_releases("");
    assert_clean(&cfg, &[]);
    flip_byte(&site.release("v2").join("index.html"));
    assert_drift(&cfg, &[], "index.html", "content");
    let (_, stdout, shown) = verify(&cfg, &[]);
    assert!(
        stdout.contains("DRIFT (1 path)\n"),
        "one drifted path is counted as `1 path`; {shown}"
    );
}

#[test]
fn changed_mode_is_drift() {
    let (site, cfg) = site_with_releases("");
    let p = site.release("v2").join("assets/app.js");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o555)).unwrap();
    assert_drift(&cfg, &[], "assets/app.js", "mode");
    // A directory's mode too.
    let d = site.release("v2").join("docs");
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    assert_drift(&cfg, &[], "docs", "mode");
}

#[test]
fn deleted_file_is_drift() {
    let (site, cfg) = site_with_releases("");
    let p = site.release("v2").join("docs/readme.txt");
    in_writable_dir(&p, || fs::remove_file(&p).unwrap());
    assert_drift(&cfg, &[], "docs/readme.txt", "missing");
}

#[test]
fn added_file_is_drift() {
    let (site, cfg) = site_with_releases("");
    let p = site.release("v2").join("assets/evil.php");
    in_writable_dir(&p, || fs::write(&p, b"<?php system($_GET['c']);").unwrap());
    assert_drift(&cfg, &[], "assets/evil.php", "added");
}

#[test]
fn every_drifted_path_is_listed_and_ids_and_all_are_honoured() {
    let (site, cfg) = site_with_releases("");
    let r = site.release("v1");
    flip_byte(&r.join("index.html"));
    fs::set_permissions(r.join("assets/app.js"), fs::Permissions::from_mode(0o400)).unwrap();
    let gone = r.join("docs/readme.txt");
    in_writable_dir(&gone, || fs::remove_file(&gone).unwrap());
    let added = r.join("docs/new.txt");
    in_writable_dir(&added, || fs::write(&added, b"new").unwrap());
    // A symlink replacing a file: a type change.
    let swapped = r.join("SHA256SUMS");
    in_writable_dir(&swapped, || {
        fs::remove_file(&swapped).unwrap();
        std::os::unix::fs::symlink("index.html", &swapped).unwrap();
    });

    // The current release (v2) is intact.
    assert_clean(&cfg, &[]);
    assert_clean(&cfg, &["v2"]);
    let (code, stdout, shown) = verify(&cfg, &["v1"]);
    assert_eq!(code, Some(1), "{shown}");
    for (path, what) in [
        ("index.html", "content"),
        ("assets/app.js", "mode"),
        ("docs/readme.txt", "missing"),
        ("docs/new.txt", "added"),
        ("SHA256SUMS", "type"),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(path) && l.to_lowercase().contains(what)),
            "verify v1 lists {path} ({what}); {shown}"
        );
    }
    let (code, stdout, shown) = verify(&cfg, &["--all"]);
    assert_eq!(code, Some(1), "--all sees v1's drift; {shown}");
    assert!(stdout.contains("v2") && stdout.contains("v1"), "{shown}");
    // An unknown id is an error, not a pass.
    let (code, _, shown) = verify(&cfg, &["nope"]);
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("\"nope\"") && shown.contains(&format!("site {SITE}")),
        "the error names the release and the site, as activate and pin do: {shown}"
    );
}

/// README and SPEC speak of drifted *paths* (`drift.detected` `paths` and `count`,
/// `status`'s "N paths", `release_keeper_drift_paths`): a file edited in place (new size,
/// write bit added) is one path, listed once with everything that changed about it, not
/// one line and one count per difference.
#[test]
fn a_file_changed_in_several_ways_is_one_drifted_path() {
    let (site, cfg) = site_with_releases("");
    let f = site.release("v2").join("index.html");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&f, b"<h1>edited in place, longer</h1>\n").unwrap();

    let out = cli(&cfg, &["--log-format", "json", "verify", SITE, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("verify --json");
    let drift = v["releases"][0]["drift"]
        .as_array()
        .expect("drift list")
        .clone();
    assert_eq!(drift.len(), 1, "one line for index.html: {drift:?}");
    let line = drift[0].as_str().unwrap_or_default();
    assert!(
        line.starts_with("index.html: ") && line.contains("size") && line.contains("mode"),
        "the line names the path and both changes: {line:?}"
    );
    let ev = stderr_events(&out)
        .into_iter()
        .find(|e| e["event"] == "drift.detected")
        .unwrap_or_else(|| panic!("drift.detected; {}", show(&out)));
    assert_eq!(ev["count"], 1, "{ev}");

    let out = cli(&cfg, &["status", SITE]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("drift:    1 path in v2"),
        "status counts paths: {text}"
    );
}

#[test]
fn service_reverifies_current_and_status_shows_drift() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "verify_interval = \"1s\"", "");
    let mut svc = Service::start_config(&cfg);
    site.deploy(&as_refs(&build("v1")), "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    let p = site.release("v1").join("docs/readme.txt");
    flip_byte(&p);
    let ev = svc.wait_event("drift.detected", |v| release_of(v) == Some("v1"), WAIT);
    assert!(ev.to_string().contains("docs/readme.txt"), "{ev}");
    assert_eq!(ev["site"], SITE);

    // SPEC: exit 1 when the command "found a problem (drift, ...)"; the document is
    // printed whole either way.
    let status = |cfg: &Path| -> (Option<i32>, Value) {
        let out = cli_when_idle(cfg, &["status", SITE, "--json"]);
        (out.status.code(), stdout_json(&out))
    };
    let (code, v) = status(&cfg);
    assert_eq!(code, Some(1), "status exits 1 while it shows drift: {v}");
    let out = cli_when_idle(&cfg, &["status", SITE]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("drift found: site web release v1 (1 path)"),
        "stderr names the site, release and count: {}",
        show(&out)
    );
    let s = find_site_obj(&v, SITE, "drift").unwrap_or_else(|| panic!("no drift: {v}"));
    assert_eq!(s["drift"]["release"], "v1", "{v}");
    assert!(
        s["drift"]["paths"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p.to_string().contains("docs/readme.txt"))),
        "status lists the drifted path: {v}"
    );

    // Repaired by hand: the next check clears it.
    flip_byte(&p);
    wait_until(
        WAIT,
        || {
            let (code, v) = status(&cfg);
            code == Some(0)
                && find_site_obj(&v, SITE, "drift")
                    .and_then(|s| s["drift"]["paths"].as_array().map(Vec::is_empty))
                    .unwrap_or(false)
        },
        || "status to show no drift (and exit 0) after the fix".into(),
    );
    svc.stop();
}

/// The last drift check may be of an earlier release than `current` (the service re-checks
/// every `verify_interval`): human `status` must say which release "none" is about, or it
/// reads as a clean bill for a release nobody checked.
#[test]
fn status_says_which_release_the_clean_drift_check_was_of() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    site.stage_upload(&as_refs(&small_build("v1")));
    assert_ok(
        &cli(&cfg, &["finalize", "web", "--id", "v1"]),
        "finalize v1",
    );
    assert_ok(&cli(&cfg, &["verify", "web"]), "verify v1");
    site.stage_upload(&as_refs(&small_build("v2")));
    assert_ok(
        &cli(&cfg, &["finalize", "web", "--id", "v2"]),
        "finalize v2",
    );
    let out = cli(&cfg, &["status", "web"]);
    assert_ok(&out, "status web");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let drift = text
        .lines()
        .find(|l| l.trim_start().starts_with("drift:"))
        .unwrap_or_default();
    assert!(
        drift.contains("v1"),
        "the drift line must name the release that was checked (v1): {}",
        show(&out)
    );
}

/// Finalizes v1 from `build("v1")`, lets `edit` change v1's `docs/readme.txt` by hand,
/// then finalizes v2 from the unchanged `deploy-cache/` (the same persistent mirror) and
/// checks v2 holds what was uploaded, not the edit, and shares no inode with it; and,
/// when v1 is still `a_link_source`, that its unedited files are shared.
fn edit_v1_then_finalize_v2(
    a_link_source: bool,
    edit: impl FnOnce(&Path, &Path),
) -> (Site, PathBuf) {
    use std::os::unix::fs::MetadataExt;
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.stage_upload(&as_refs(&build("v1")));
    assert_ok(&cli(&cfg, &["finalize", SITE, "--id", "v1"]), "finalize v1");
    let edited = site.release("v1").join("docs/readme.txt");
    edit(&cfg, &edited);

    assert_ok(&cli(&cfg, &["finalize", SITE, "--id", "v2"]), "finalize v2");
    let fresh = site.release("v2").join("docs/readme.txt");
    assert_eq!(
        fs::read(&fresh).unwrap(),
        b"read me\n",
        "v2 holds what was uploaded, not v1's hand edit"
    );
    assert_ne!(
        fs::metadata(&fresh).unwrap().ino(),
        fs::metadata(&edited).unwrap().ino(),
        "v2 shares the edited inode"
    );
    let same_inode = |f: &str| {
        fs::metadata(site.release("v1").join(f)).unwrap().ino()
            == fs::metadata(site.release("v2").join(f)).unwrap().ino()
    };
    assert_eq!(
        same_inode("index.html"),
        a_link_source,
        "an unedited file shared with v1"
    );
    assert_clean(&cfg, &["v2"]);
    (site, cfg)
}

/// A release file edited in place (drift) must not be hard-linked into the next release:
/// that release would then hold content its upload never had, and share the edit. Found
/// by a hand edit (`chmod u+w; echo >>`) of `current` followed by a deploy with the file
/// unchanged in `deploy-cache/`: the new release linked the edited inode.
#[test]
fn an_edited_release_file_is_not_linked_into_the_next_release() {
    let (_site, cfg) = edit_v1_then_finalize_v2(true, |_, edited| {
        fs::set_permissions(edited, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(edited, b"read me\nand this was added by hand\n").unwrap();
        fs::set_permissions(edited, fs::Permissions::from_mode(0o444)).unwrap();
    });
    assert_drift(&cfg, &["v1"], "docs/readme.txt", "size");
}

/// Same, for an edit that kept the size, the mode and even the mtime (only a re-hash sees
/// it): once a drift check has found it, the drifted release is no source of hard links.
#[test]
fn a_release_with_detected_drift_is_not_a_source_of_hard_links() {
    edit_v1_then_finalize_v2(false, |cfg, edited| {
        let mtime = fs::metadata(edited).unwrap().modified().unwrap();
        flip_byte(edited);
        let f = fs::File::options().write(true).open(edited).unwrap();
        f.set_modified(mtime).unwrap();
        assert_drift(cfg, &[], "docs/readme.txt", "content");
    });
}

/// An edit in place that keeps the size and mode, made before any drift check: the next
/// release must not share it either. Only the mtime tells it apart without a re-hash, so
/// the stored manifest records each release file's mtime and `finalize` compares it.
#[test]
fn an_edit_keeping_size_and_mode_is_not_linked_even_before_a_drift_check() {
    edit_v1_then_finalize_v2(true, |_, edited| flip_byte(edited));
}

/// An edit in place that keeps the size and the mode and sets the mtime back (`touch -r`,
/// `cp -p`), before any drift check: only the ctime, which nothing can set back, tells it
/// from an intact file. The keeper records when it changed release inodes itself, so a
/// ctime outside those spans keeps the file from being shared.
#[test]
fn an_edit_that_sets_the_mtime_back_is_not_linked_even_before_a_drift_check() {
    edit_v1_then_finalize_v2(true, |_, edited| {
        let mtime = fs::metadata(edited).unwrap().modified().unwrap();
        // Clear of the keeper's spans (and their slack of a clock tick) on both sides, as
        // a hand edit between two deploys is.
        std::thread::sleep(std::time::Duration::from_millis(100));
        flip_byte(edited);
        let f = fs::File::options().write(true).open(edited).unwrap();
        f.set_modified(mtime).unwrap();
        assert_eq!(fs::metadata(edited).unwrap().modified().unwrap(), mtime);
        std::thread::sleep(std::time::Duration::from_millis(100));
    });
}

/// A release made by an older version has no mtimes in its stored manifest: its files are
/// still shared (checked by type, mode and size as before), and the new release's manifest
/// records them.
#[test]
fn releases_whose_manifest_has_no_mtimes_are_still_a_source_of_hard_links() {
    use std::os::unix::fs::MetadataExt;
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.stage_upload(&as_refs(&build("v1")));
    assert_ok(&cli(&cfg, &["finalize", SITE, "--id", "v1"]), "finalize v1");
    let stored = site.root.join(".release-keeper/manifests/v1");
    let text = fs::read_to_string(&stored).unwrap();
    assert!(text.contains("\tmtime="), "no mtimes recorded: {text}");
    let old: String = text
        .lines()
        .map(|l| format!("{}\n", l.split("\tmtime=").next().unwrap()))
        .collect();
    fs::write(&stored, old).unwrap();

    assert_ok(&cli(&cfg, &["finalize", SITE, "--id", "v2"]), "finalize v2");
    for f in ["index.html", "docs/readme.txt"] {
        assert_eq!(
            fs::metadata(site.release("v1").join(f)).unwrap().ino(),
            fs::metadata(site.release("v2").join(f)).unwrap().ino(),
            "{f} was copied, not linked"
        );
    }
    let v2 = fs::read_to_string(site.root.join(".release-keeper/manifests/v2")).unwrap();
    assert_eq!(
        v2.lines().filter(|l| l.starts_with("f ")).count(),
        v2.matches("\tmtime=").count(),
        "{v2}"
    );
    assert_clean(&cfg, &["--all"]);
}

/// The release's own directory made writable is drift too (it is not a manifest line, so
/// `verify` used to say OK while anyone with that bit could add files to the release).
#[test]
fn a_writable_release_directory_is_drift() {
    let (site, cfg) = site_with_releases("");
    let r = site.release("v2");
    let m = mode(&r);
    assert_eq!(m & 0o7222, 0, "a release's directory is read-only: {m:o}");
    fs::set_permissions(&r, fs::Permissions::from_mode(0o775)).unwrap();
    assert_drift(&cfg, &[], ".", "mode");
    fs::set_permissions(&r, fs::Permissions::from_mode(m)).unwrap();
    assert_clean(&cfg, &[]);
}

/// Drift found in one release must not go on being shown once another is `current`: a
/// deploy that replaces a tampered release clears the report at once, not after a whole
/// `verify_interval` (an hour by default).
#[test]
fn a_deployed_release_clears_the_drift_of_the_one_it_replaced() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "verify_interval = \"1h\"", "");
    let mut svc = Service::start_config(&cfg);
    site.deploy(&as_refs(&build("v1")), "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    flip_byte(&site.release("v1").join("docs/readme.txt"));
    let out = cli_when_idle(&cfg, &["verify", SITE]);
    assert_eq!(out.status.code(), Some(1), "drift in v1; {}", show(&out));

    site.deploy(&as_refs(&build("v2")), "id = \"v2\"\n");
    svc.wait_release_event("release.activated", "v2");
    wait_until(
        WAIT,
        || {
            let out = cli_when_idle(&cfg, &["status", SITE, "--json"]);
            let v = stdout_json(&out);
            find_site_obj(&v, SITE, "drift").is_some_and(|s| {
                s["drift"]["release"] == "v2"
                    && s["drift"]["paths"].as_array().is_some_and(Vec::is_empty)
            })
        },
        || {
            let out = cli(&cfg, &["status", SITE, "--json"]);
            format!(
                "status to show v2 checked and clean: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        },
    );
    svc.stop();

    // The same after a rollback, the other answer to drift: v2 tampered with, back to v1.
    // v1 is restored and checked first: a release whose last check found drift is no
    // rollback target.
    flip_byte(&site.release("v1").join("docs/readme.txt"));
    assert_clean(&cfg, &["v1"]);
    flip_byte(&site.release("v2").join("docs/readme.txt"));
    let out = cli(&cfg, &["verify", SITE]);
    assert_eq!(out.status.code(), Some(1), "drift in v2; {}", show(&out));
    assert_ok(&cli(&cfg, &["rollback", SITE]), "rollback to v1");
    let v = stdout_json(&cli(&cfg, &["status", SITE, "--json"]));
    let s = find_site_obj(&v, SITE, "drift").unwrap_or_else(|| panic!("no drift: {v}"));
    assert_eq!(
        s["drift"]["release"], "v1",
        "v1 checked after the rollback: {v}"
    );
}

/// A directory in `releases/` without a stored manifest (not the keeper's, or its manifest
/// deleted) cannot be verified: `verify SITE ID` says so plainly instead of a bare
/// "No such file or directory", and `verify --all` still checks the others, then fails.
#[test]
fn a_release_without_stored_manifest_is_a_clear_error_and_all_checks_the_rest() {
    let (site, cfg) = site_with_releases("");
    let manifests = site.root.join(".release-keeper/manifests");
    fs::rename(manifests.join("v1"), site.tmp_path("v1.manifest")).unwrap();

    let (code, _, shown) = verify(&cfg, &["v1"]);
    assert_eq!(code, Some(1), "{shown}");
    assert!(shown.contains("no stored manifest"), "says why: {shown}");

    let (code, stdout, shown) = verify(&cfg, &["--all"]);
    assert_eq!(
        code,
        Some(1),
        "an unverifiable release fails --all; {shown}"
    );
    assert!(stdout.contains("web v2: OK"), "v2 still checked: {shown}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("v1") && l.contains("no stored manifest")),
        "v1 reported: {shown}"
    );
}

/// `releases/<id>` swapped for a symlink to a copy elsewhere is drift, even when the copy
/// is identical today: whoever owns the copy can change the live site at will.
#[test]
fn a_release_directory_swapped_for_a_symlink_is_drift() {
    let (site, cfg) = site_with_releases("");
    let r = site.release("v2");
    let copy = site.tmp_path("v2-copy");
    let out = sh(
        site.tmp.path(),
        &format!("cp -a {} {}", r.display(), copy.display()),
    );
    assert!(out.status.success(), "cp -a");
    make_writable(&r);
    fs::remove_dir_all(&r).unwrap();
    std::os::unix::fs::symlink(&copy, &r).unwrap();
    assert_drift(&cfg, &["v2"], ".", "symlink");
}

// ---------------------------------------------------------------------------------------------
// Switching to a release known to have drifted
// ---------------------------------------------------------------------------------------------

/// Releases `ids` made live in turn by `finalize` (no service): the last one is current.
/// Only `index.html` and `assets/app.js` differ between them (the rest is hard-linked), so
/// a test editing one of those edits that release alone.
fn live_releases(ids: &[&str]) -> (Site, PathBuf) {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    for id in ids {
        site.stage_upload(&as_refs(&build(id)));
        assert_ok(&cli(&cfg, &["finalize", SITE, "--id", id]), id);
    }
    (site, cfg)
}

/// Asserts `out` is a refusal (exit 1) of release `id` for drift that names the release,
/// the drifted `path`, when the drift was found and both ways forward.
fn assert_refused_for_drift(out: &std::process::Output, id: &str, path: &str) {
    let text = output_text(out);
    assert_eq!(out.status.code(), Some(1), "refused; {}", show(out));
    for want in [
        format!("release {id} has drifted"),
        path.to_string(),
        "`verify` at 20".to_string(),
        format!("release-keeper verify {SITE} {id}"),
        "--force".to_string(),
    ] {
        assert!(
            text.contains(&want),
            "the refusal says {want:?}; {}",
            show(out)
        );
    }
}

/// The bug: `verify` found drift in an old release, yet `rollback --to` put it live and
/// exited 0. A switch to a release whose last check found drift is refused (exit 1,
/// `current` untouched) unless `--force` is given.
#[test]
fn rollback_to_a_release_verify_found_drifted_is_refused_unless_forced() {
    let (site, cfg) = live_releases(&["v1", "v2", "v3"]);
    flip_byte(&site.release("v1").join("index.html"));
    assert_drift(&cfg, &["v1"], "index.html", "content");

    let out = cli(&cfg, &["rollback", SITE, "--to", "v1"]);
    assert_refused_for_drift(&out, "v1", "index.html: content changed");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v3"),
        "current unchanged"
    );

    let out = cli(
        &cfg,
        &[
            "--log-format",
            "json",
            "rollback",
            SITE,
            "--to",
            "v1",
            "--force",
        ],
    );
    assert_ok(&out, "rollback --to v1 --force");
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    assert!(
        stderr_events(&out)
            .iter()
            .any(|e| e["event"] == "drift.overridden" && e["release"] == "v1"),
        "the forced switch is logged; {}",
        show(&out)
    );
    // `status` shows the drift now live at once, not after `verify_interval`.
    let v = stdout_json(&cli(&cfg, &["status", SITE, "--json"]));
    let s = find_site_obj(&v, SITE, "drift").unwrap_or_else(|| panic!("no drift: {v}"));
    assert_eq!(s["drift"]["release"], "v1", "{v}");
    assert_eq!(s["drift"]["paths"].as_array().map(Vec::len), Some(1), "{v}");
}

/// Only the last check of the release itself counts: a clean check of another release
/// (the current one) leaves the refusal, and so does restoring the file without a new
/// check; a clean `verify SITE ID` of the restored release lifts it.
#[test]
fn a_clean_verify_of_the_restored_release_lifts_the_refusal() {
    let (site, cfg) = live_releases(&["v1", "v2", "v3"]);
    let edited = site.release("v1").join("index.html");
    flip_byte(&edited);
    assert_drift(&cfg, &["v1"], "index.html", "content");
    assert_clean(&cfg, &[]);
    assert_clean(&cfg, &["v2"]);
    let out = cli(&cfg, &["rollback", SITE, "--to", "v1"]);
    assert_refused_for_drift(&out, "v1", "index.html");

    flip_byte(&edited);
    let out = cli(&cfg, &["rollback", SITE, "--to", "v1"]);
    assert_refused_for_drift(&out, "v1", "index.html");
    assert_eq!(site.current_id().as_deref(), Some("v3"));

    assert_clean(&cfg, &["v1"]);
    assert_ok(
        &cli(&cfg, &["rollback", SITE, "--to", "v1"]),
        "rollback --to v1",
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
}

/// `activate` refuses a drifted release as `rollback --to` does (a staged one here, never
/// live), listing a few paths and counting the rest; `--force` overrides, and a clean
/// re-check lifts the refusal.
#[test]
fn activate_refuses_a_drifted_release_unless_forced() {
    let (site, cfg) = live_releases(&["v1"]);
    for id in ["v2", "v3"] {
        site.stage_upload(&as_refs(&build(id)));
        assert_ok(
            &cli(&cfg, &["finalize", SITE, "--id", id, "--no-activate"]),
            id,
        );
    }
    let r = site.release("v2");
    flip_byte(&r.join("index.html"));
    let app = r.join("assets/app.js");
    fs::set_permissions(&app, fs::Permissions::from_mode(0o644)).unwrap();
    for name in ["a.txt", "b.txt", "c.txt"] {
        let added = r.join(name);
        in_writable_dir(&added, || fs::write(&added, b"added").unwrap());
    }
    let (code, _, shown) = verify(&cfg, &["v2"]);
    assert_eq!(code, Some(1), "5 drifted paths; {shown}");

    let out = cli(&cfg, &["activate", SITE, "v2"]);
    assert_refused_for_drift(&out, "v2", "a.txt: not in the release's manifest");
    let text = output_text(&out);
    assert!(
        text.contains("5 changed paths") && text.contains("and 2 more"),
        "a few paths, then how many more; {}",
        show(&out)
    );
    assert!(!text.contains("index.html"), "only the first few: {text}");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "current unchanged"
    );

    // Another release's drift does not stand in the way of v3.
    assert_ok(&cli(&cfg, &["activate", SITE, "v3"]), "activate v3");
    assert_ok(
        &cli(&cfg, &["activate", SITE, "v2", "--force"]),
        "activate v2 --force",
    );
    assert_eq!(site.current_id().as_deref(), Some("v2"));

    // Repaired and checked clean: allowed again without --force.
    assert_ok(&cli(&cfg, &["activate", SITE, "v1"]), "activate v1");
    flip_byte(&r.join("index.html"));
    fs::set_permissions(&app, fs::Permissions::from_mode(0o444)).unwrap();
    for name in ["a.txt", "b.txt", "c.txt"] {
        let added = r.join(name);
        in_writable_dir(&added, || fs::remove_file(&added).unwrap());
    }
    assert_clean(&cfg, &["v2"]);
    assert_ok(&cli(&cfg, &["activate", SITE, "v2"]), "activate v2");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
}

/// A plain `rollback` goes back to the last good state: it passes over a previous release
/// known to have drifted for the clean one before it, and says so. With no clean release
/// to go to, it refuses rather than put the drifted one live, unless `--force`.
#[test]
fn plain_rollback_passes_over_a_drifted_previous_release() {
    let (site, cfg) = live_releases(&["v1", "v2", "v3"]);
    flip_byte(&site.release("v2").join("index.html"));
    assert_drift(&cfg, &["v2"], "index.html", "content");
    let out = cli(&cfg, &["rollback", SITE]);
    assert_ok(&out, "rollback");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "v2 drifted: back to v1; {}",
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("skipped release v2"),
        "says which release it passed over; {}",
        show(&out)
    );

    let (site, cfg) = live_releases(&["v1", "v2"]);
    flip_byte(&site.release("v1").join("index.html"));
    assert_drift(&cfg, &["v1"], "index.html", "content");
    let out = cli(&cfg, &["rollback", SITE]);
    assert_refused_for_drift(&out, "v1", "index.html");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "current unchanged"
    );
    assert_ok(
        &cli(&cfg, &["rollback", SITE, "--force"]),
        "rollback --force",
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
}

/// Healing a deleted `current` prefers the last activated release that has not drifted;
/// when the only one has, it is still made current (a site without `current` is down) and
/// the drift is reported.
#[test]
fn healing_prefers_a_clean_release_but_never_leaves_the_site_without_current() {
    let (site, cfg) = live_releases(&["v1", "v2"]);
    flip_byte(&site.release("v2").join("index.html"));
    assert_drift(&cfg, &[], "index.html", "content");
    fs::remove_file(site.current_path()).unwrap();
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal");
    assert_eq!(site.current_id().as_deref(), Some("v1"), "{}", show(&out));
    assert!(
        output_text(&out).contains("passed over release v2"),
        "says why not v2; {}",
        show(&out)
    );

    let (site, cfg) = live_releases(&["v1"]);
    flip_byte(&site.release("v1").join("index.html"));
    assert_drift(&cfg, &[], "index.html", "content");
    fs::remove_file(site.current_path()).unwrap();
    let out = cli(&cfg, &["--log-format", "json", "heal", SITE]);
    assert_eq!(site.current_id().as_deref(), Some("v1"), "{}", show(&out));
    assert_eq!(out.status.code(), Some(1), "a report; {}", show(&out));
    assert!(
        stderr_events(&out)
            .iter()
            .any(|e| e["event"] == "heal.reported"
                && e["release"] == "v1"
                && e["reason"].as_str().is_some_and(|r| r.contains("drift"))),
        "the drift is reported; {}",
        show(&out)
    );
}

/// `status` for people: the last check may be of an earlier release. "drift: none in v1"
/// beside a current v2 nobody checked read as a clean bill for v2.
#[test]
fn status_says_when_the_current_release_is_not_the_one_last_checked() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.stage_upload(&as_refs(&build("v1")));
    assert_ok(&cli(&cfg, &["finalize", SITE, "--id", "v1"]), "finalize v1");
    assert_ok(&cli(&cfg, &["verify", SITE]), "verify v1");
    let text = String::from_utf8_lossy(&cli(&cfg, &["status", SITE]).stdout).to_string();
    assert!(text.contains("drift:    none in v1 (checked "), "{text}");

    site.stage_upload(&as_refs(&build("v2")));
    assert_ok(&cli(&cfg, &["finalize", SITE, "--id", "v2"]), "finalize v2");
    let text = String::from_utf8_lossy(&cli(&cfg, &["status", SITE]).stdout).to_string();
    assert!(
        text.contains("drift:    v2 not checked yet (last check: none in v1 (checked "),
        "{text}"
    );
}

/// A release edited by hand after its last check (a file added to an old release, or one
/// rewritten with its size and mtime kept) is checked before a rollback or an activation
/// makes it live: the switch walked into it unchecked, and `shell.php` was served until
/// the next periodic verify. The walk re-hashes only files whose metadata moved.
#[test]
fn a_switch_checks_the_target_for_hand_edits_first() {
    let (site, cfg) = site_with_releases("");
    let v1 = site.release("v1");
    let shell = v1.join("shell.php");
    in_writable_dir(&shell, || {
        fs::write(&shell, b"<?php system($_GET[c]);").unwrap()
    });
    let out = cli(&cfg, &["rollback", SITE]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(show(&out).contains("shell.php"), "{}", show(&out));
    assert_eq!(site.current_id().as_deref(), Some("v2"));

    // A file rewritten with its size and mtime kept: found by its ctime, then its hash.
    let (site, cfg) = site_with_releases("");
    let file = site.release("v1").join("docs/readme.txt");
    let mtime = fs::metadata(&file).unwrap().modified().unwrap();
    in_writable_dir(&file, || {
        let mode = fs::metadata(&file).unwrap().permissions();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&file, b"EVIL me\n").unwrap();
        fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        fs::set_permissions(&file, mode).unwrap();
    });
    let out = cli(&cfg, &["activate", SITE, "v1"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        show(&out).contains("docs/readme.txt: content changed"),
        "{}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    // The refusal stands until a clean `verify` (here: none).
    let out = cli(&cfg, &["--log-format", "json", "rollback", SITE]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "v1 is refused still: {}",
        show(&out)
    );
}
