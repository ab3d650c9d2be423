//! Fuzzed HTTP bodies: the JSON body of `POST /api/edits` (fields replaced by hostile values,
//! bytes mutated), multipart text fields, and the uploaded image bytes, through the functions
//! the routes call. The property: a typed `ApiError` (400/413) or valid parameters, never a
//! panic. Cases per property: 2,000 in `cargo test`; `IP2P_FUZZ_CASES=N` for a longer run.

use ip2p_sched::SchedulerKind;
use ip2p_serve::EditRequest;
use ip2p_serve::input::prepare_image;
use proptest::prelude::*;
use proptest::sample::Index;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("IP2P_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const BODY: &str = r#"{"image": "data:image/png;base64,iVBORw0KGgo=", "prompt": "make it snowy", "steps": 20, "guidance": 7.5, "image_guidance": 1.5, "seed": 3, "randomize_seed": false, "randomize_guidance": false, "resolution": 512, "scheduler": "ddim", "negative_prompt": "blurry"}"#;

const FIELDS: [&str; 12] = [
    "image",
    "prompt",
    "steps",
    "guidance",
    "image_guidance",
    "seed",
    "randomize_seed",
    "randomize_guidance",
    "resolution",
    "scheduler",
    "negative_prompt",
    "other",
];

fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "null",
            "-1",
            "0",
            "1e308",
            "-1e308",
            "18446744073709551615",
            "1.5",
            "\"\"",
            "\"NaN\"",
            "\"inf\"",
            "[]",
            "{}",
            "true",
            "4294967296",
            "-0",
        ])
        .prop_map(String::from),
        "[ -~]{0,20}".prop_map(|s| serde_json::to_string(&s).unwrap()),
    ]
}

fn edits() -> impl Strategy<Value = Vec<(Index, u8, u8)>> {
    prop::collection::vec((any::<Index>(), 0u8..4, any::<u8>()), 0..3)
}

fn mutate(bytes: &[u8], edits: &[(Index, u8, u8)]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for (i, kind, b) in edits {
        let p = i.index(out.len() + 1);
        match kind {
            0 if p < out.len() => out[p] = *b,
            1 => out.truncate(p),
            2 => out.insert(p, *b),
            3 if p < out.len() => {
                out.remove(p);
            }
            _ => {}
        }
    }
    out
}

fn check(req: &EditRequest) -> Result<(), TestCaseError> {
    if let Ok(p) = req.resolve(SchedulerKind::EulerAncestral) {
        prop_assert!((1..=1000).contains(&p.steps));
        prop_assert!(p.guidance.is_finite() && p.image_guidance.is_finite());
    }
    Ok(())
}

fn png() -> &'static [u8] {
    static PNG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PNG.get_or_init(|| {
        let img = image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([x as u8, y as u8, 7]));
        ip2p_vae::image_io::encode_image(&img, "a.png").unwrap()
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn json_bodies(field in any::<Index>(), value in hostile(), e in edits()) {
        let mut v: serde_json::Value = serde_json::from_str(BODY).unwrap();
        let key = FIELDS[field.index(FIELDS.len())];
        v[key] = serde_json::from_str(&value).unwrap();
        let body = mutate(serde_json::to_string(&v).unwrap().as_bytes(), &e);
        if let Ok(req) = EditRequest::from_json(&body) {
            check(&req)?;
        }
    }

    #[test]
    fn multipart_fields(fields in prop::collection::vec((any::<Index>(), "[ -~]{0,24}"), 1..6)) {
        let mut req = EditRequest::default();
        for (name, value) in &fields {
            let _ = req.set_field(FIELDS[name.index(FIELDS.len())], value);
        }
        check(&req)?;
    }

    #[test]
    fn uploaded_images(e in edits(), resolution in 1u32..100, max_pixels in 0u64..5000) {
        let bytes = mutate(png(), &e);
        if let Ok(img) = prepare_image(&bytes, resolution, 8, max_pixels) {
            prop_assert!(img.width() % 8 == 0 && img.height() % 8 == 0);
        }
    }
}
