//! Manifests: what a good one gives, and the typed error (file and line) for each bad one.

mod common;

use std::path::PathBuf;

use ip2p_dataset::{DatasetError, Manifest, PromptSource};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ip2p-dataset-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn jsonl(name: &str, lines: &[&str]) -> PathBuf {
    let p = dir(name).join("m.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn read_err(name: &str, lines: &[&str]) -> DatasetError {
    Manifest::read(jsonl(name, lines)).unwrap_err()
}

#[test]
fn reads_items_with_their_columns() {
    let p = jsonl(
        "good",
        &[
            r#"{"id": "a-1", "image": "img/a.png", "prompt": "make it snowy", "caption": "x", "score": 0.5}"#,
            "",
            r#"{"id": 7, "image": "b.png", "prompt_ids": [49406, 49407], "seed": 42, "steps": 3, "guidance": 5, "image_guidance": 1.2}"#,
        ],
    );
    let m = Manifest::read(&p).unwrap();
    assert_eq!(m.items.len(), 2);
    let a = &m.items[0];
    assert_eq!(
        (a.line, a.id.as_str(), a.image.as_str()),
        (1, "a-1", "img/a.png")
    );
    assert_eq!(a.image_path, p.parent().unwrap().join("img/a.png"));
    assert_eq!(a.prompt, PromptSource::Text("make it snowy".into()));
    assert_eq!((a.seed, a.steps, a.guidance), (None, None, None));
    assert_eq!(a.extra["caption"], "x");
    assert_eq!(a.extra["score"], 0.5);
    let b = &m.items[1];
    assert_eq!((b.line, b.id.as_str()), (3, "7"));
    assert_eq!(b.prompt, PromptSource::Ids(vec![49406, 49407]));
    assert_eq!(
        (b.seed, b.steps, b.guidance, b.image_guidance),
        (Some(42), Some(3), Some(5.0), Some(1.2))
    );
    assert!(b.extra.is_empty());
}

fn line_of(e: &DatasetError) -> usize {
    match e {
        DatasetError::Json { line, .. }
        | DatasetError::MissingField { line, .. }
        | DatasetError::BadField { line, .. }
        | DatasetError::BadId { line, .. }
        | DatasetError::DuplicateId { line, .. } => *line,
        other => panic!("no line in {other:?}"),
    }
}

#[test]
fn bad_manifests_name_the_line() {
    let ok = r#"{"id": "a", "image": "a.png", "prompt": "p"}"#;
    let cases: &[(&str, &str, &str)] = &[
        ("json", "{not json", "not a JSON object"),
        ("array", "[1, 2]", "found an array"),
        (
            "noid",
            r#"{"image": "a.png", "prompt": "p"}"#,
            "no `id` field",
        ),
        (
            "slash",
            r#"{"id": "a/b", "image": "a.png", "prompt": "p"}"#,
            "contains '/'",
        ),
        (
            "dot",
            r#"{"id": "..", "image": "a.png", "prompt": "p"}"#,
            "starts with `.`",
        ),
        (
            "emptyid",
            r#"{"id": "", "image": "a.png", "prompt": "p"}"#,
            "is empty",
        ),
        (
            "negid",
            r#"{"id": -1, "image": "a.png", "prompt": "p"}"#,
            "non-negative integer",
        ),
        ("dup", ok, "already used on line 1"),
        (
            "noimage",
            r#"{"id": "b", "prompt": "p"}"#,
            "no `image` field",
        ),
        (
            "imagenum",
            r#"{"id": "b", "image": 3, "prompt": "p"}"#,
            "must be a path",
        ),
        (
            "noprompt",
            r#"{"id": "b", "image": "a.png"}"#,
            "no `prompt` field",
        ),
        (
            "both",
            r#"{"id": "b", "image": "a.png", "prompt": "p", "prompt_ids": [1]}"#,
            "both given",
        ),
        (
            "ids",
            r#"{"id": "b", "image": "a.png", "prompt_ids": [1.5]}"#,
            "array of integers",
        ),
        (
            "seed",
            r#"{"id": "b", "image": "a.png", "prompt": "p", "seed": -3}"#,
            "`seed` must be",
        ),
        (
            "steps",
            r#"{"id": "b", "image": "a.png", "prompt": "p", "steps": 0}"#,
            "positive",
        ),
        (
            "g",
            r#"{"id": "b", "image": "a.png", "prompt": "p", "guidance": "x"}"#,
            "finite",
        ),
        (
            "reserved",
            r#"{"id": "b", "image": "a.png", "prompt": "p", "status": "x"}"#,
            "results file writes",
        ),
    ];
    for (name, line2, want) in cases {
        let e = read_err(name, &[ok, line2]);
        let text = e.to_string();
        assert_eq!(line_of(&e), 2, "{name}: {text}");
        assert!(text.contains(want), "{name}: {text}");
        assert!(text.contains("m.jsonl:2:"), "{name}: {text}");
    }
    assert!(matches!(
        read_err("empty", &["", " "]),
        DatasetError::Empty { .. }
    ));
    let e = Manifest::read(dir("fmt").join("m.csv")).unwrap_err();
    assert!(matches!(e, DatasetError::UnknownFormat { .. }), "{e}");
    let e = Manifest::read(dir("missing").join("none.jsonl")).unwrap_err();
    assert!(matches!(e, DatasetError::Io { .. }), "{e}");
}

#[cfg(feature = "parquet")]
#[test]
fn reads_parquet_like_jsonl() {
    let p = dir("parquet").join("m.parquet");
    common::write_parquet(&p);
    let m = Manifest::read(&p).unwrap();
    let ids: Vec<&str> = m.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["r0", "r1", "r2"]);
    let b = &m.items[1];
    assert_eq!((b.line, b.image.as_str()), (2, "b.png"));
    assert_eq!(b.prompt, PromptSource::Text("rain".into()));
    assert_eq!((m.items[0].seed, b.seed), (None, Some(5)));
    assert_eq!(b.extra["score"], 20);
    assert!(!b.extra.contains_key("edited_image_bytes"), "{:?}", b.extra);

    let bad = dir("parquet-bad").join("m.parquet");
    std::fs::write(&bad, b"PAR1 not really").unwrap();
    let e = Manifest::read(&bad).unwrap_err();
    assert!(matches!(e, DatasetError::Parquet { .. }), "{e}");
}
