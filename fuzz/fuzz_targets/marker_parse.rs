//! `upload::marker::parse` on arbitrary bytes. Beyond "never panics", an accepted marker
//! must name only a release id that is safe as a directory name under `releases/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use release_keeper::upload::marker::{parse, valid_id, MAX_ID_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = parse(data) else {
        return;
    };
    assert!(
        std::str::from_utf8(data).is_ok(),
        "non-UTF-8 marker accepted"
    );
    if let Some(id) = &spec.id {
        assert!(valid_id(id), "invalid id accepted: {id:?}");
        assert!(
            !id.is_empty() && id.len() <= MAX_ID_LEN,
            "id length: {id:?}"
        );
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
            "id with a forbidden byte: {id:?}"
        );
        assert!(
            id.as_bytes()[0].is_ascii_alphanumeric(),
            "id must not start with '.', '-' or '_': {id:?}"
        );
        // Safe as one path component: never '.', '..', a hidden or a partial name.
        let p = std::path::Path::new(id);
        assert_eq!(p.components().count(), 1);
        assert!(matches!(
            p.components().next(),
            Some(std::path::Component::Normal(_))
        ));
    }
});
