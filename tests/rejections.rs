//! Uploads that must be rejected: nothing half-done is left, `current` is untouched,
//! the marker is consumed, and the reason names what is wrong.
mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

const SITE: &str = "web";

/// Starts site `web` with extra `[defaults]` lines and activates a first good release `v1`.
fn start_with_v1(site: &Site, defaults: &str) -> (PathBuf, Service) {
    let cfg = site.write_config(SITE, defaults, "");
    let svc = Service::start_config(&cfg);
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    (cfg, svc)
}

/// Waits for the rejection of `id`, checks nothing changed, and returns the reason.
fn expect_rejected(site: &Site, svc: &Service, id: &str) -> String {
    let ev = svc.wait_release_event("release.rejected", id);
    let reason = reason_of(&ev);
    assert!(!reason.is_empty(), "rejection must carry a reason: {ev}");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "`current` must stay on v1 after rejecting {id}"
    );
    assert_eq!(
        site.release_ids(),
        ["v1"],
        "no release may be left behind by a rejected upload"
    );
    assert!(
        !site.release(id).exists(),
        "releases/{id} must not exist after rejection"
    );
    let hidden = site.hidden_release_entries();
    assert!(
        hidden.iter().all(|n| !n.starts_with(".partial")),
        "leftover partial dirs after rejection: {hidden:?}"
    );
    assert!(
        !site.marker_path().exists(),
        "a rejected upload's marker is consumed too"
    );
    assert!(
        svc.events_for("release.activated", id).is_empty(),
        "rejected {id} was activated"
    );
    reason
}

#[test]
fn checksum_mismatch_is_rejected_naming_the_file() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    fs::write(
        site.deploy_cache().join("assets/app.js"),
        b"tampered after hashing\n",
    )
    .unwrap();
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("assets/app.js"),
        "reason should name assets/app.js: {reason:?}"
    );
    svc.stop();
}

#[test]
fn fixed_upload_after_rejection_is_activated() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    fs::write(site.deploy_cache().join("index.html"), b"corrupt\n").unwrap();
    site.drop_marker("id = \"v2\"\n");
    expect_rejected(&site, &svc, "v2");

    // Fix the upload and drop a new marker.
    site.deploy(&as_refs(&small_build("v2")), "id = \"v2\"\n");
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    assert_eq!(
        fs::read(site.release("v2").join("index.html")).unwrap(),
        small_build("v2")[0].1
    );
    svc.stop();
}

#[test]
fn missing_manifest_is_rejected_when_required() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    fs::remove_file(site.deploy_cache().join(MANIFEST)).unwrap();
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("SHA256SUMS") || reason.to_lowercase().contains("manifest"),
        "reason should mention the missing manifest: {reason:?}"
    );
    svc.stop();
}

/// A missing manifest beside a build file named like a temporary one (`.env.sample`: `.` +
/// name + `.` + six letters) is waited for up to `upload_timeout`, as SPEC waits while any
/// file looks in flight; the rejection then says the manifest is missing, not only that
/// `.env.sample` is "still in flight".
#[test]
fn missing_manifest_beside_a_file_named_like_a_temporary_one_is_named_at_the_timeout() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "upload_timeout = \"1s\"");
    let mut files = small_build("v2");
    files.push((".env.sample".into(), b"APP_ENV=production\n".to_vec()));
    site.stage_upload(&as_refs(&files));
    fs::remove_file(site.deploy_cache().join(MANIFEST)).unwrap();
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("SHA256SUMS is missing") && reason.contains(".env.sample"),
        "the reason names the missing manifest first, and what looked in flight: {reason:?}"
    );
    svc.stop();
}

#[test]
fn missing_manifest_is_accepted_with_warning_when_not_required() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "require_manifest = false");
    site.stage_upload(&as_refs(&small_build("v2")));
    fs::remove_file(site.deploy_cache().join(MANIFEST)).unwrap();
    site.drop_marker("id = \"v2\"\n");
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    assert_eq!(
        tree(&site.release("v2"), &[]),
        tree(&site.deploy_cache(), &[]),
        "release equals the upload"
    );
    let warned: Vec<Value> = svc
        .json_lines()
        .into_iter()
        .filter(|v| {
            v["level"].as_str().is_some_and(|l| {
                l.eq_ignore_ascii_case("warn") || l.eq_ignore_ascii_case("warning")
            })
        })
        .collect();
    assert_eq!(
        warned.len(),
        1,
        "a missing manifest (require_manifest=false) logs one warning; log:\n{}",
        svc.log_text()
    );
    // It names the release whose hashes nobody vouched for.
    assert_eq!(release_of(&warned[0]), Some("v2"), "{}", warned[0]);
    // The present-manifest rule still applies with require_manifest=false.
    site.stage_upload(&as_refs(&small_build("v3")));
    fs::write(site.deploy_cache().join("index.html"), b"corrupt\n").unwrap();
    site.drop_marker("id = \"v3\"\n");
    svc.wait_release_event("release.rejected", "v3");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    svc.stop();
}

#[test]
fn file_listed_but_missing_is_rejected_naming_it() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    fs::remove_file(site.deploy_cache().join("assets/app.js")).unwrap();
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("assets/app.js"),
        "reason should name the missing assets/app.js: {reason:?}"
    );
    svc.stop();
}

/// Names an uploader chose are told apart in the reason: a trailing space in quotes (it
/// read as `a/one.txt  is not listed`), bytes that are not UTF-8 as `\xNN` (each was one
/// U+FFFD, which could be any of them).
#[test]
fn odd_names_in_a_rejection_are_shown_exactly() {
    use std::os::unix::ffi::OsStrExt;
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    fs::write(site.deploy_cache().join("one.txt "), b"x\n").unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
    fs::write(site.deploy_cache().join(odd), b"y\n").unwrap();
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("\"one.txt \" is not listed")
            && reason.contains("caf\\xe9.txt is not listed"),
        "{reason:?}"
    );
    svc.stop();
}

#[test]
fn extra_file_not_in_manifest_is_rejected_naming_it() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    write_tree(
        &site.deploy_cache(),
        &[("assets/stray.txt", b"not listed\n")],
    );
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("assets/stray.txt"),
        "reason should name the extra assets/stray.txt: {reason:?}"
    );
    svc.stop();
}

#[test]
fn invalid_release_id_is_rejected() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.deploy(&as_refs(&small_build("evil")), "id = \"../x\"\n");
    site.wait_marker_consumed(WAIT);
    let ev = svc.wait_event("release.rejected", |_| true, WAIT);
    assert!(!reason_of(&ev).is_empty(), "{ev}");
    assert!(!site.root.join("x").exists(), "ROOT/x must not be created");
    assert!(!site.tmp_path("x").exists());
    assert_eq!(site.release_ids(), ["v1"]);
    assert_eq!(site.current_id().as_deref(), Some("v1"));

    // Other invalid ids: leading dot, slash, too long.
    let long = "a".repeat(129);
    for bad in [".hidden", "a/b", long.as_str()] {
        let before = svc.events("release.rejected").len();
        site.deploy(&as_refs(&small_build("evil")), &format!("id = \"{bad}\"\n"));
        svc.wait_count("release.rejected", before + 1, WAIT);
        assert_eq!(site.release_ids(), ["v1"], "after id {bad:?}");
        assert_eq!(site.current_id().as_deref(), Some("v1"));
    }
    svc.stop();
}

/// `max_files` bounds every entry of the upload (files, directories, symlinks; the manifest
/// too), so a tree of empty directories cannot get around it. The reason must say so: "more
/// than max_files = 4 files" for an upload of exactly 4 files sends the operator looking
/// for a fifth file that does not exist.
#[test]
fn max_files_rejection_says_it_counts_entries() {
    let site = Site::new();
    // v1: index.html, assets/, assets/app.js, SHA256SUMS: four entries.
    let (_cfg, mut svc) = start_with_v1(&site, "max_files = 4");
    let mut build = small_build("v2");
    build.push(("robots.txt".to_string(), b"User-agent: *\n".to_vec()));
    // Four regular files (with SHA256SUMS) and one directory.
    site.deploy(&as_refs(&build), "id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("max_files = 4") && reason.contains("entries"),
        "reason must say max_files counts entries, not only files: {reason:?}"
    );
    assert!(
        reason.contains("directories"),
        "reason must say directories count: {reason:?}"
    );
    svc.stop();
}

#[test]
fn absolute_symlink_is_rejected() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    write_symlink(&site.deploy_cache(), "assets/passwd", "/etc/passwd");
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("assets/passwd"),
        "reason should name the symlink: {reason:?}"
    );
    svc.stop();
}

#[test]
fn escaping_symlink_is_rejected() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    // Resolves to ROOT/deploy-cache/index.html from inside the upload, i.e. outside the release.
    write_symlink(&site.deploy_cache(), "assets/up", "../../index.html");
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("assets/up"),
        "reason should name the symlink: {reason:?}"
    );
    svc.stop();
}

#[test]
fn fifo_in_upload_is_rejected() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    nix::unistd::mkfifo(
        &site.deploy_cache().join("assets/pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    site.drop_marker("id = \"v2\"\n");
    expect_rejected(&site, &svc, "v2");
    svc.stop();
}

#[test]
fn dotdot_path_in_manifest_is_rejected() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    // A file outside the upload whose hash is correct, so only the path is wrong.
    fs::write(site.root.join("secret.txt"), b"outside\n").unwrap();
    let line = format!("{}  ../secret.txt\n", sha256_hex(b"outside\n"));
    let m = site.deploy_cache().join(MANIFEST);
    let mut text = fs::read_to_string(&m).unwrap();
    text.push_str(&line);
    fs::write(&m, text).unwrap();
    site.drop_marker("id = \"v2\"\n");
    expect_rejected(&site, &svc, "v2");
    svc.stop();
}

#[test]
fn absolute_path_in_manifest_is_rejected() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    let outside = site.tmp_path("outside.txt");
    fs::write(&outside, b"outside\n").unwrap();
    let line = format!("{}  {}\n", sha256_hex(b"outside\n"), outside.display());
    let m = site.deploy_cache().join(MANIFEST);
    let mut text = fs::read_to_string(&m).unwrap();
    text.push_str(&line);
    fs::write(&m, text).unwrap();
    site.drop_marker("id = \"v2\"\n");
    expect_rejected(&site, &svc, "v2");
    svc.stop();
}

#[test]
fn bsd_style_manifest_is_accepted() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    sh(
        &site.deploy_cache(),
        "find . -type f ! -name SHA256SUMS -print0 | sort -z | xargs -0 sha256sum --tag > ../bsd \
         && mv ../bsd SHA256SUMS",
    );
    assert!(fs::read_to_string(site.deploy_cache().join(MANIFEST))
        .unwrap()
        .starts_with("SHA256 ("));
    site.drop_marker("id = \"v2\"\n");
    svc.wait_release_event("release.activated", "v2");
    svc.stop();
}

#[test]
fn manifest_without_dot_slash_and_binary_marker_is_accepted() {
    // `sha256sum -b index.html assets/app.js` style: no ./ prefix, `*` binary marker.
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    sh(
        &site.deploy_cache(),
        "sha256sum -b index.html assets/app.js > SHA256SUMS",
    );
    site.drop_marker("id = \"v2\"\n");
    svc.wait_release_event("release.activated", "v2");
    svc.stop();
}

/// A manifest listing nothing beside files of the upload (made before the build, or all
/// comments) is rejected for the files it does not list: calling that upload "empty"
/// sends the operator looking for files that are plainly there. An upload of the
/// manifest alone is the empty one.
#[test]
fn empty_manifest_beside_files_names_them_not_an_empty_upload() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    fs::write(
        site.deploy_cache().join(MANIFEST),
        b"# made before the build\n",
    )
    .unwrap();
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("index.html is not listed in SHA256SUMS") && !reason.contains("empty"),
        "{reason}"
    );

    clear_dir(&site.deploy_cache());
    fs::write(site.deploy_cache().join(MANIFEST), b"").unwrap();
    site.drop_marker("id = \"v3\"\n");
    let reason = expect_rejected(&site, &svc, "v3");
    assert!(reason.contains("the upload is empty"), "{reason}");
    svc.stop();
}

#[test]
fn in_flight_upload_waits_then_proceeds() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "upload_timeout = \"15s\"");
    site.stage_upload(&as_refs(&small_build("v2")));
    // app.js is still being written under an rsync temp name.
    let dc = site.deploy_cache();
    fs::rename(dc.join("assets/app.js"), dc.join("assets/.app.js.Xy12Ab")).unwrap();
    site.drop_marker("id = \"v2\"\n");
    let waiting = svc.wait_event("upload.waiting", |_| true, WAIT);
    // Monitoring ties the wait to the release it holds up.
    assert_eq!(release_of(&waiting), Some("v2"), "{waiting}");
    assert!(svc.events_for("release.rejected", "v2").is_empty());
    // The transfer completes.
    fs::rename(dc.join("assets/.app.js.Xy12Ab"), dc.join("assets/app.js")).unwrap();
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    svc.stop();
}

/// The manifest is a file of the upload like any other: while it is still being written
/// under a temporary name (rsync's `.SHA256SUMS.XXXXXX`, WinSCP's `SHA256SUMS.filepart`
/// with parallel transfers), the keeper waits for it instead of rejecting the upload as
/// having no manifest.
#[test]
fn manifest_still_in_flight_is_waited_for() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "upload_timeout = \"15s\"");
    let dc = site.deploy_cache();
    for (id, temp) in [("v2", ".SHA256SUMS.Xy12Ab"), ("v3", "SHA256SUMS.filepart")] {
        site.stage_upload(&as_refs(&small_build(id)));
        fs::rename(dc.join(MANIFEST), dc.join(temp)).unwrap();
        site.drop_marker(&format!("id = \"{id}\"\n"));
        let waiting = svc.wait_event("upload.waiting", |v| release_of(v) == Some(id), WAIT);
        assert!(
            waiting["paths"].as_str().unwrap_or("").contains(temp),
            "upload.waiting names the manifest in flight: {waiting}"
        );
        assert!(
            svc.events_for("release.rejected", id).is_empty(),
            "an upload whose manifest is still in flight ({temp}) must not be rejected: {:?}",
            svc.events_for("release.rejected", id)
        );
        fs::rename(dc.join(temp), dc.join(MANIFEST)).unwrap();
        svc.wait_release_event("release.activated", id);
        assert_eq!(site.current_id().as_deref(), Some(id));
    }
    svc.stop();
}

/// With `require_manifest = true`, a manifest that never arrives while a temporary name
/// stays is rejected at `upload_timeout`, naming the file in flight.
#[test]
fn manifest_in_flight_past_upload_timeout_is_rejected_naming_it() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "upload_timeout = \"1s\"");
    let dc = site.deploy_cache();
    site.stage_upload(&as_refs(&small_build("v2")));
    fs::rename(dc.join(MANIFEST), dc.join(".SHA256SUMS.Xy12Ab")).unwrap();
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("upload_timeout") && reason.contains(".SHA256SUMS.Xy12Ab"),
        "the reason names the timeout and the file in flight: {reason}"
    );
    svc.stop();
}

/// `rsync --delay-updates` puts every updated file into a `.~tmp~/` directory beside it
/// and renames them all into place at the end: while `.~tmp~/` exists, rsync is still
/// at work (with the marker sent in the same run, it lands first, as names starting with
/// `.` sort first).
#[test]
fn rsync_delay_updates_directory_is_waited_for() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "upload_timeout = \"15s\"");
    let dc = site.deploy_cache();
    site.stage_upload(&as_refs(&small_build("v2")));
    fs::create_dir(dc.join("assets/.~tmp~")).unwrap();
    fs::rename(dc.join("assets/app.js"), dc.join("assets/.~tmp~/app.js")).unwrap();
    site.drop_marker("id = \"v2\"\n");
    let waiting = svc.wait_event("upload.waiting", |v| release_of(v) == Some("v2"), WAIT);
    assert!(
        waiting["paths"].as_str().unwrap_or("").contains(".~tmp~"),
        "upload.waiting names rsync's holding directory: {waiting}"
    );
    assert!(svc.events_for("release.rejected", "v2").is_empty());
    fs::rename(dc.join("assets/.~tmp~/app.js"), dc.join("assets/app.js")).unwrap();
    fs::remove_dir(dc.join("assets/.~tmp~")).unwrap();
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    svc.stop();
}

/// Uploaders write files under temporary names, never directories: a build directory
/// named like one (`assets.part/`, `.cache.abcdef/`; directories are never listed in a
/// manifest) is part of the upload, not a transfer to wait for until `upload_timeout`.
/// rsync's own holding directory `.~tmp~/` is, unless the manifest lists files in it:
/// then the build has one (`release-keeper manifest` lists it), and it was held up.
#[test]
fn directories_named_like_temporary_files_are_not_in_flight() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "upload_timeout = \"1s\"");
    site.stage_upload(&[
        ("index.html", b"v2\n"),
        ("assets.part/app.js", b"app\n"),
        (".cache.abcdef/x", b"x\n"),
        ("sub/chunk.filepart/y", b"y\n"),
        ("lib/.~tmp~/kept", b"k\n"),
    ]);
    site.drop_marker("id = \"v2\"\n");
    let ev = svc.wait_event(
        "release.activated",
        |v| release_of(v) == Some("v2"),
        Duration::from_secs(15),
    );
    assert!(
        svc.events("upload.waiting").is_empty() && svc.events("release.rejected").is_empty(),
        "nothing is in flight: {ev}\n{}",
        svc.log_text()
    );
    assert_eq!(
        fs::read(site.release("v2").join("assets.part/app.js")).unwrap(),
        b"app\n"
    );
    assert_eq!(
        fs::read(site.release("v2").join("lib/.~tmp~/kept")).unwrap(),
        b"k\n"
    );
    svc.stop();
}

#[test]
fn in_flight_upload_is_rejected_after_upload_timeout() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "upload_timeout = \"1s\"");
    site.stage_upload(&as_refs(&small_build("v2")));
    let busy = ["assets/video.mp4.filepart", ".a.Xy12Zq", "d/big.part"];
    write_tree(&site.deploy_cache(), &busy.map(|p| (p, b"half" as &[u8])));
    site.drop_marker("id = \"v2\"\n");
    let ev = svc.wait_event(
        "release.rejected",
        |v| release_of(v).is_none_or(|r| r == "v2"),
        Duration::from_secs(15),
    );
    let reason = reason_of(&ev);
    assert!(
        reason.contains("after upload_timeout") && busy.iter().all(|p| reason.contains(p)),
        "the rejection names every file still in flight, as upload.waiting did: {ev}"
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    assert_eq!(site.release_ids(), ["v1"]);
    svc.stop();
}

#[test]
fn finalize_cli_of_bad_upload_exits_1() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    assert_ok(&cli(&cfg, &["init", SITE]), "init");
    site.stage_upload(&as_refs(&small_build("x")));
    fs::write(site.deploy_cache().join("index.html"), b"corrupt\n").unwrap();
    let out = cli(&cfg, &["finalize", SITE, "--id", "x"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a rejected upload -> exit 1; {}",
        show(&out)
    );
    let text = output_text(&out);
    assert!(
        text.contains("index.html"),
        "names the file; {}",
        show(&out)
    );
    assert!(
        site.release_ids().is_empty(),
        "{:?}",
        site.releases_entries()
    );
    assert!(site.current_target().is_none());
}

/// A marker that cannot be read names no release: its `release.rejected` leaves the
/// `release` field out instead of logging `release: ""` (which a monitor would group as
/// one release named "").
#[test]
fn unparsable_marker_rejection_has_no_empty_release_field() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    for marker in ["id = [unclosed\n", "id = \"../x\"\n"] {
        let before = svc.events("release.rejected").len();
        site.deploy(&as_refs(&small_build("v2")), marker);
        let evs = svc.wait_count("release.rejected", before + 1, WAIT);
        let ev = &evs[before];
        assert!(!reason_of(ev).is_empty(), "{ev}");
        assert_eq!(ev["site"], SITE, "{ev}");
        assert!(
            ev.get("release").is_none(),
            "marker {marker:?}: no release id is known, so no `release` field: {ev}"
        );
    }
    assert_eq!(site.release_ids(), ["v1"]);
    svc.stop();
}

/// An emptied `deploy-cache/` with a marker (a CI job whose build step produced nothing)
/// must not replace the live site by an empty release, with or without a manifest.
#[test]
fn empty_upload_is_rejected_not_activated() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "require_manifest = false");

    clear_dir(&site.deploy_cache());
    site.drop_marker("id = \"empty1\"\n");
    let reason = expect_rejected(&site, &svc, "empty1");
    assert!(
        reason.contains("empty"),
        "reason should say the upload is empty: {reason:?}"
    );

    // Only a manifest that lists nothing: just as empty.
    clear_dir(&site.deploy_cache());
    fs::write(site.deploy_cache().join(MANIFEST), b"").unwrap();
    site.drop_marker("id = \"empty2\"\n");
    let reason = expect_rejected(&site, &svc, "empty2");
    assert!(
        reason.contains("empty") && reason.contains(MANIFEST),
        "reason should say the manifest lists no files: {reason:?}"
    );
    svc.stop();
}

/// `sha256sum *` hashes through symlinks, so a manifest made that way lists an in-tree
/// link: the rejection must say it is a symlink, not that the (visible) path is missing.
#[test]
fn symlink_listed_in_manifest_is_named_as_a_symlink_not_missing() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    let dc = site.deploy_cache();
    std::os::unix::fs::symlink("index.html", dc.join("latest.html")).unwrap();
    let mut sums = fs::read_to_string(dc.join(MANIFEST)).unwrap();
    let digest = sha256_hex(&fs::read(dc.join("index.html")).unwrap());
    sums.push_str(&format!("{digest}  latest.html\n"));
    fs::write(dc.join(MANIFEST), sums).unwrap();
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("latest.html") && reason.contains("symlink") && !reason.contains("missing"),
        "reason should say latest.html is a symlink: {reason:?}"
    );
    svc.stop();
}

/// `sha256sum $(find -L . -type f)` lists paths through a symlinked directory; one to
/// `/etc` lists files of the host. The rejection must name the symlink and where it
/// points, not call the (visible) path missing.
#[test]
fn path_through_a_symlink_listed_in_manifest_names_the_symlink() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    site.stage_upload(&as_refs(&small_build("v2")));
    let dc = site.deploy_cache();
    std::os::unix::fs::symlink("/etc", dc.join("conf")).unwrap();
    let mut sums = fs::read_to_string(dc.join(MANIFEST)).unwrap();
    sums.push_str(&format!("{}  conf/hostname\n", sha256_hex(b"host\n")));
    fs::write(dc.join(MANIFEST), sums).unwrap();
    site.drop_marker("id = \"v2\"\n");
    let reason = expect_rejected(&site, &svc, "v2");
    assert!(
        reason.contains("conf/hostname")
            && reason.contains("conf is a symlink in the upload (-> /etc)")
            && !reason.contains("missing"),
        "reason should name the symlink conf -> /etc: {reason:?}"
    );
    svc.stop();
}

/// A marker that is not a regular file (`mkdir .release-ready`, `ln -s ... .release-ready`)
/// gets no close-write event; it must still be answered at once, not at the next periodic
/// pass (an hour by default), with a rejection that says what the marker is.
#[test]
fn directory_or_symlink_marker_is_rejected_at_once() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "heal_interval = \"1h\"");
    let outside = site.tmp.path().join("outside-marker");
    fs::write(&outside, "id = \"v9\"\n").unwrap();
    let makers: [(&str, &dyn Fn()); 2] = [
        ("directory", &|| fs::create_dir(site.marker_path()).unwrap()),
        ("symlink", &|| {
            std::os::unix::fs::symlink(&outside, site.marker_path()).unwrap()
        }),
    ];
    for (kind, make) in makers {
        let before = svc.events("release.rejected").len();
        site.stage_upload(&as_refs(&small_build("v2")));
        let dropped = std::time::Instant::now();
        make();
        let evs = svc.wait_count("release.rejected", before + 1, Duration::from_secs(10));
        assert!(
            dropped.elapsed() < Duration::from_secs(5),
            "a {kind} marker was answered only after {:?}",
            dropped.elapsed()
        );
        let reason = reason_of(&evs[before]);
        assert!(
            reason.contains(kind) && reason.contains(".release-ready"),
            "the reason names the marker and what it is ({kind}): {reason}"
        );
        assert!(
            fs::symlink_metadata(site.marker_path()).is_err(),
            "the {kind} marker is consumed"
        );
        assert_eq!(site.current_id().as_deref(), Some("v1"));
    }
    assert!(
        outside.exists(),
        "a symlinked marker's target is never touched"
    );
    svc.stop();
}

/// `ln prepared-marker .release-ready` publishes a whole marker in one step, without a
/// close-write: the release is made at once.
#[test]
fn hard_linked_marker_is_taken_at_once() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "heal_interval = \"1h\"");
    site.stage_upload(&as_refs(&small_build("v2")));
    let prepared = site.tmp.path().join("prepared-marker");
    fs::write(&prepared, "id = \"v2\"\n").unwrap();
    let dropped = std::time::Instant::now();
    fs::hard_link(&prepared, site.marker_path()).unwrap();
    svc.wait_release_event("release.activated", "v2");
    assert!(
        dropped.elapsed() < Duration::from_secs(5),
        "a hard-linked marker was taken only after {:?}",
        dropped.elapsed()
    );
    svc.stop();
}

/// A marker the keeper's user cannot read (an uploader's umask of 077, common with sftp)
/// is rejected naming why, and consumed: it stalled every later upload of the site, each
/// claimed and never processed, until someone removed the claim by hand. Needs root (to
/// run the keeper as `nobody` and write a marker it cannot read); skipped otherwise.
#[test]
fn a_marker_the_keeper_cannot_read_is_rejected_and_later_uploads_go_on() {
    use std::os::unix::fs::PermissionsExt;
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: no user `nobody`");
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let site = Site::new();
    let tmp = site.root.parent().unwrap();
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = site.write_config(SITE, "", "");
    assert_ok(&cli(&cfg, &["init", SITE, "--owner", "nobody"]), "init");
    let (uid, gid) = (nobody.uid.to_string(), nobody.gid.to_string());
    let mut svc = Service::spawn_via(
        &[
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
        ],
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--log-format",
            "json",
            "run",
        ],
    );
    svc.wait_started();

    site.stage_upload(&as_refs(&small_build("private")));
    let marker = site.marker_path();
    {
        // Private from the start, as the uploader's umask makes it: the keeper may claim
        // it the moment it is closed.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&marker)
            .unwrap();
        f.write_all(b"id = \"private\"\n").unwrap();
    }
    let ev = svc.wait_event(
        "release.rejected",
        |v| reason_of(v).contains(".release-ready"),
        WAIT,
    );
    let reason = reason_of(&ev);
    assert!(
        reason.contains("cannot be read") && reason.contains("Permission denied"),
        "the reason says the marker cannot be read, and why: {ev}"
    );
    assert_eq!(site.claim_count(), 0, "the unreadable claim is consumed");

    site.deploy(&as_refs(&small_build("public")), "id = \"public\"\n");
    svc.wait_release_event("release.activated", "public");
    assert_eq!(site.release_ids(), ["public"]);
    svc.stop();
}

/// Names in `ROOT/shared/`, sorted (empty if it does not exist).
fn shared_names(site: &Site) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(site.root.join("shared"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_rejected_upload_seeds_no_shared_entry() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "shared = [\".env\", \"storage\"]");
    // Rejected once the tree is built (a symlink out of the site): its `.env` must not
    // become the site's, nor `storage/` be made for it.
    site.stage_upload(&[
        ("index.html", b"<p>bad</p>\n" as &[u8]),
        (".env", b"DB=staging\n"),
    ]);
    write_symlink(&site.deploy_cache(), "leak", "/etc/passwd");
    finalize_expecting(&cfg, SITE, "bad", &[], 1);
    assert_eq!(
        shared_names(&site),
        Vec::<String>::new(),
        "shared/ after a rejection"
    );

    site.stage_upload(&[
        ("index.html", b"<p>v1</p>\n" as &[u8]),
        (".env", b"DB=production\n"),
    ]);
    finalize_expecting(&cfg, SITE, "v1", &[], 0);
    assert_eq!(
        fs::read(site.root.join("shared/.env")).unwrap(),
        b"DB=production\n",
        "the accepted upload seeds .env"
    );
    assert_eq!(shared_names(&site), [".env", "storage"]);

    // Rejected after the build (the id exists with other content), with a new shared
    // entry configured meanwhile: nothing is made for it either.
    let cfg = site.write_config(SITE, "", "shared = [\".env\", \"storage\", \"config.php\"]");
    site.stage_upload(&[
        ("index.html", b"<p>v1 again, other</p>\n" as &[u8]),
        ("config.php", b"<?php // staging\n"),
    ]);
    let out = finalize_expecting(&cfg, SITE, "v1", &[], 1);
    assert!(show(&out).contains("already exists"), "{}", show(&out));
    assert_eq!(
        shared_names(&site),
        [".env", "storage"],
        "shared/ after the second rejection"
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
}

/// A directory moved in under the marker's name is no marker, and is rejected; what it
/// holds is someone's, so it is moved aside into `.release-keeper/displaced/`, not deleted.
#[test]
fn a_directory_dropped_as_the_marker_is_rejected_and_kept_aside() {
    let site = Site::new();
    let (_cfg, mut svc) = start_with_v1(&site, "");
    let dir = site.tmp_path("marker-dir");
    write_tree(&dir, &[("keep", b"important\n" as &[u8])]);
    fs::rename(&dir, site.marker_path()).unwrap();
    let ev = svc.wait_event(
        "release.rejected",
        |v| reason_of(v).contains("directory"),
        WAIT,
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"), "{ev}");
    let displaced = site.root.join(".release-keeper/displaced");
    wait_until(
        WAIT,
        || {
            fs::read_dir(&displaced).is_ok_and(|d| {
                d.filter_map(Result::ok)
                    .any(|e| fs::read(e.path().join("keep")).is_ok_and(|b| b == b"important\n"))
            })
        },
        || {
            format!(
                "the directory's file kept under {}; log:\n{}",
                displaced.display(),
                svc.log_text()
            )
        },
    );
    assert!(!site.marker_path().exists());
    svc.stop();
}
