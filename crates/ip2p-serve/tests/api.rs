//! The HTTP API against a real server on a free loopback port, with the tiny fixture model
//! (64×64 images, a few steps): event order, byte-identical results for a seed, the
//! randomized seed reproducing, cancel, 429, 413, 400, expiry, a client that goes away.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{SseReader, start, test_png};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

fn url(server: &ip2p_serve::Server, path: &str) -> String {
    format!("http://{}{path}", server.addr())
}

fn form(png: Vec<u8>, fields: &[(&str, &str)]) -> Form {
    let mut f = Form::new().part(
        "image",
        Part::bytes(png)
            .file_name("in.png")
            .mime_str("image/png")
            .unwrap(),
    );
    for (k, v) in fields {
        f = f.text(k.to_string(), v.to_string());
    }
    f
}

async fn submit(
    client: &reqwest::Client,
    server: &ip2p_serve::Server,
    fields: &[(&str, &str)],
) -> Value {
    let resp = client
        .post(url(server, "/api/edits"))
        .multipart(form(test_png(96, 64), fields))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 202, "{body}");
    body
}

async fn events(client: &reqwest::Client, server: &ip2p_serve::Server, id: &str) -> SseReader {
    SseReader::new(
        client
            .get(url(server, &format!("/api/edits/{id}/events")))
            .send()
            .await
            .unwrap(),
    )
}

async fn result_png(client: &reqwest::Client, server: &ip2p_serve::Server, id: &str) -> Vec<u8> {
    let resp = client
        .get(url(server, &format!("/api/edits/{id}/result.png")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    resp.bytes().await.unwrap().to_vec()
}

async fn error_of(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

const SMALL: [(&str, &str); 3] = [
    ("prompt", "make it snow"),
    ("steps", "3"),
    ("resolution", "64"),
];

#[tokio::test]
async fn events_come_in_order_and_a_seed_gives_the_same_png() {
    let server = start(|_| {});
    let client = reqwest::Client::new();
    let fields = [
        SMALL.as_slice(),
        &[("seed", "42"), ("scheduler", "euler-ancestral")],
    ]
    .concat();
    // A long edit runs first, so that ours is subscribed to while it waits: every event of
    // its life arrives, in order.
    let blocker = submit(
        &client,
        &server,
        &[("prompt", "wait"), ("steps", "1000"), ("resolution", "64")],
    )
    .await;
    let sub = submit(&client, &server, &fields).await;
    assert_eq!(
        (
            sub["seed"].as_u64(),
            sub["width"].as_u64(),
            sub["height"].as_u64(),
            sub["position"].as_u64()
        ),
        (Some(42), Some(64), Some(64), Some(1))
    );
    let id = sub["id"].as_str().unwrap().to_string();
    let mut reader = events(&client, &server, &id).await;
    let first = reader.next().await.unwrap();
    assert_eq!(
        (first.event.as_str(), first.data["position"].as_u64()),
        ("queued", Some(1))
    );
    let blocker_id = blocker["id"].as_str().unwrap();
    let resp = client
        .post(url(&server, &format!("/api/edits/{blocker_id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);

    let all = reader.until_final().await;
    let names: Vec<&str> = all.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        ["queued", "started", "step", "step", "step", "done"],
        "{names:?}"
    );
    assert_eq!(all[0].data["position"], 0, "moved up when the first left");
    let start = 1;
    for (k, e) in all[start + 1..start + 4].iter().enumerate() {
        assert_eq!(
            (e.data["i"].as_u64(), e.data["n"].as_u64()),
            (Some(k as u64 + 1), Some(3))
        );
        assert!(
            e.data["preview"]
                .as_str()
                .unwrap()
                .starts_with("data:image/png;base64,")
        );
    }
    let done = &all.last().unwrap().data;
    assert_eq!(done["seed"], 42);
    assert_eq!(
        (done["guidance"].as_f64(), done["image_guidance"].as_f64()),
        (Some(7.5), Some(1.5))
    );
    assert_eq!(
        (done["width"].as_u64(), done["height"].as_u64()),
        (Some(64), Some(64))
    );

    let state: Value = client
        .get(url(&server, &format!("/api/edits/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["state"], "done");
    assert_eq!(state["step"], 3);
    let first = result_png(&client, &server, &id).await;
    let img = image::load_from_memory(&first).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    let params: Value = serde_json::from_str(
        &ip2p_serve::output::read_parameters(&first).expect("a parameters chunk"),
    )
    .unwrap();
    assert_eq!(
        (params["seed"].as_u64(), params["steps"].as_u64()),
        (Some(42), Some(3))
    );
    assert_eq!(params["prompt"], "make it snow");
    assert_eq!(params["scheduler"], "euler-ancestral");

    // The same settings through the JSON API (base64 image): the same bytes.
    let b64 = base64::engine::general_purpose::STANDARD.encode(test_png(96, 64));
    let resp = client
        .post(url(&server, "/api/edits"))
        .json(&json!({ "image": format!("data:image/png;base64,{b64}"), "prompt": "make it snow", "steps": 3, "resolution": 64, "seed": 42 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let again: Value = resp.json().await.unwrap();
    let id2 = again["id"].as_str().unwrap();
    let end = events(&client, &server, id2).await.until_final().await;
    assert_eq!(end.last().unwrap().event, "done");
    assert_eq!(
        result_png(&client, &server, id2).await,
        first,
        "same seed and settings, same PNG bytes"
    );

    // Another seed: another image.
    let other = submit(
        &client,
        &server,
        &[SMALL.as_slice(), &[("seed", "43")]].concat(),
    )
    .await;
    let oid = other["id"].as_str().unwrap();
    events(&client, &server, oid).await.until_final().await;
    assert_ne!(result_png(&client, &server, oid).await, first);
    server.stop().unwrap();
}

#[tokio::test]
async fn a_randomized_seed_is_reported_and_reproduces() {
    let server = start(|_| {});
    let client = reqwest::Client::new();
    let sub = submit(
        &client,
        &server,
        &[
            SMALL.as_slice(),
            &[
                ("randomize_seed", "true"),
                ("seed", "5"),
                ("randomize_guidance", "true"),
            ],
        ]
        .concat(),
    )
    .await;
    let id = sub["id"].as_str().unwrap();
    let done = events(&client, &server, id)
        .await
        .until_final()
        .await
        .pop()
        .unwrap();
    assert_eq!(done.event, "done");
    let (seed, g, ig) = (
        done.data["seed"].as_u64().unwrap(),
        done.data["guidance"].as_f64().unwrap(),
        done.data["image_guidance"].as_f64().unwrap(),
    );
    assert_eq!(
        Some(seed),
        sub["seed"].as_u64(),
        "the 202 answer and the done event agree"
    );
    assert!(
        (6.0..=9.0).contains(&g) && (1.2..=1.8).contains(&ig),
        "{g} {ig}"
    );
    let png = result_png(&client, &server, id).await;

    let (s, g, ig) = (seed.to_string(), g.to_string(), ig.to_string());
    let fixed = submit(
        &client,
        &server,
        &[
            SMALL.as_slice(),
            &[
                ("seed", s.as_str()),
                ("guidance", g.as_str()),
                ("image_guidance", ig.as_str()),
            ],
        ]
        .concat(),
    )
    .await;
    let fid = fixed["id"].as_str().unwrap();
    events(&client, &server, fid).await.until_final().await;
    assert_eq!(
        result_png(&client, &server, fid).await,
        png,
        "the reported seed and guidance reproduce the edit"
    );
    server.stop().unwrap();
}

#[tokio::test]
async fn cancel_mid_run_then_the_next_edit_runs_and_a_full_queue_is_429() {
    let server = start(|c| c.queue = 1);
    let client = reqwest::Client::new();
    let long = [
        ("prompt", "slowly"),
        ("steps", "1000"),
        ("resolution", "64"),
        ("seed", "1"),
    ];
    let a = submit(&client, &server, &long).await;
    let a_id = a["id"].as_str().unwrap().to_string();
    let mut a_events = events(&client, &server, &a_id).await;
    // Wait for A to be running (a step done), so that B waits behind it.
    loop {
        let e = a_events.next().await.unwrap();
        if e.event == "step" {
            break;
        }
    }
    let b = submit(&client, &server, &SMALL).await;
    assert_eq!(b["position"], 1, "one edit (the running one) ahead");
    let b_id = b["id"].as_str().unwrap().to_string();
    // Queue of 1 is full now.
    let resp = client
        .post(url(&server, "/api/edits"))
        .multipart(form(test_png(96, 64), &SMALL))
        .send()
        .await
        .unwrap();
    let (status, message) = error_of(resp).await;
    assert_eq!(status, 429, "{message}");
    assert!(message.contains("queue is full"), "{message}");

    let mut b_events = events(&client, &server, &b_id).await;
    let first = b_events.next().await.unwrap();
    assert_eq!(
        (first.event.as_str(), first.data["position"].as_u64()),
        ("queued", Some(1))
    );

    // Cancel A mid-run.
    let resp = client
        .post(url(&server, &format!("/api/edits/{a_id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let rest = a_events.until_final().await;
    assert_eq!(rest.last().unwrap().event, "cancelled");
    let steps = rest.iter().filter(|e| e.event == "step").count();
    assert!(
        steps < 999,
        "cancelled long before the end ({steps} more steps)"
    );
    let state: Value = client
        .get(url(&server, &format!("/api/edits/{a_id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["state"], "cancelled");
    let (status, _) = error_of(
        client
            .get(url(&server, &format!("/api/edits/{a_id}/result.png")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409, "a cancelled edit has no result");

    // B moves up, runs and finishes.
    let b_all = b_events.until_final().await;
    let names: Vec<&str> = b_all.iter().map(|e| e.event.as_str()).collect();
    assert!(
        names.contains(&"started") && names.last() == Some(&"done"),
        "{names:?}"
    );
    assert_eq!(
        b_all
            .iter()
            .find(|e| e.event == "queued")
            .map(|e| e.data["position"].as_u64()),
        Some(Some(0)),
        "{names:?}"
    );

    // Cancel a queued one: C waits behind a long D.
    let d = submit(&client, &server, &long).await;
    let c = submit(&client, &server, &SMALL).await;
    let c_id = c["id"].as_str().unwrap();
    let resp = client
        .post(url(&server, &format!("/api/edits/{c_id}/cancel")))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["state"], "cancelled");
    assert_eq!(
        events(&client, &server, c_id)
            .await
            .until_final()
            .await
            .pop()
            .unwrap()
            .event,
        "cancelled"
    );
    let d_id = d["id"].as_str().unwrap();
    client
        .post(url(&server, &format!("/api/edits/{d_id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        events(&client, &server, d_id)
            .await
            .until_final()
            .await
            .pop()
            .unwrap()
            .event,
        "cancelled"
    );
    // Cancelling a finished edit is a conflict.
    let (status, _) = error_of(
        client
            .post(url(&server, &format!("/api/edits/{b_id}/cancel")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409);
    server.stop().unwrap();
}

#[tokio::test]
async fn bad_requests_get_400_and_413_and_the_server_goes_on() {
    let server = start(|c| {
        c.max_upload_bytes = 256 << 10;
        c.max_image_pixels = 512 * 512;
    });
    let client = reqwest::Client::new();
    let post = |f: Form| client.post(url(&server, "/api/edits")).multipart(f).send();

    let cases: Vec<(Form, &str)> = vec![
        (form(b"not an image at all".to_vec(), &SMALL), "image"),
        (form(test_png(96, 64)[..40].to_vec(), &SMALL), "image"),
        (
            form(test_png(96, 64), &[("prompt", "x"), ("steps", "many")]),
            "steps",
        ),
        (
            form(test_png(96, 64), &[("prompt", "x"), ("steps", "0")]),
            "steps",
        ),
        (
            form(test_png(96, 64), &[("prompt", "x"), ("guidance", "high")]),
            "guidance",
        ),
        (
            form(test_png(96, 64), &[("prompt", "x"), ("seed", "-3")]),
            "seed",
        ),
        (
            form(test_png(96, 64), &[("prompt", "x"), ("scheduler", "plms")]),
            "scheduler",
        ),
        (
            form(test_png(96, 64), &[("prompt", "x"), ("resolution", "10")]),
            "resolution",
        ),
        (
            form(test_png(96, 64), &[("prompt", "x"), ("colour", "red")]),
            "colour",
        ),
        (form(test_png(96, 64), &[("steps", "3")]), "prompt"),
        (Form::new().text("prompt", "x"), "image"),
    ];
    for (f, field) in cases {
        let (status, message) = error_of(post(f).await.unwrap()).await;
        assert_eq!(status, 400, "{field}: {message}");
        assert!(message.contains(field), "{field}: {message}");
    }
    // JSON: wrong types, unknown fields, bad base64.
    for (body, field) in [
        (
            json!({ "image": "aGVsbG8=", "prompt": "x", "steps": "3" }),
            "steps",
        ),
        (json!({ "image": "%%%", "prompt": "x" }), "base64"),
        (
            json!({ "image": "aGVsbG8=", "prompt": "x", "cfg": 3 }),
            "cfg",
        ),
        (json!({ "prompt": "x" }), "image"),
    ] {
        let (status, message) = error_of(
            client
                .post(url(&server, "/api/edits"))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 400, "{field}: {message}");
        assert!(message.contains(field), "{field}: {message}");
    }
    let resp = client
        .post(url(&server, "/api/edits"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Over the body limit (256 KiB) and over the pixel limit (512²): 413.
    let noise: Vec<u8> = (0..400_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let (status, message) = error_of(post(form(noise.clone(), &SMALL)).await.unwrap()).await;
    assert_eq!(status, 413, "{message}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&noise);
    let resp = client
        .post(url(&server, "/api/edits"))
        .json(&json!({ "image": b64, "prompt": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let big = {
        let img = image::RgbImage::new(1024, 1024);
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    assert!(big.len() < 256 << 10);
    let (status, message) = error_of(post(form(big, &SMALL)).await.unwrap()).await;
    assert_eq!(status, 413, "{message}");
    assert!(message.contains("1024×1024"), "{message}");

    // Unknown ids.
    for path in [
        "/api/edits/nope",
        "/api/edits/nope/result.png",
        "/api/edits/nope/events",
    ] {
        assert_eq!(
            client
                .get(url(&server, path))
                .send()
                .await
                .unwrap()
                .status(),
            404,
            "{path}"
        );
    }
    // Still serving.
    let ok = submit(&client, &server, &SMALL).await;
    let end = events(&client, &server, ok["id"].as_str().unwrap())
        .await
        .until_final()
        .await;
    assert_eq!(end.last().unwrap().event, "done");
    server.stop().unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_mid_run_does_not_stop_the_server_and_results_expire() {
    let server = start(|c| c.keep_results = Duration::from_secs(2));
    let client = reqwest::Client::new();
    let sub = submit(
        &client,
        &server,
        &[("prompt", "x"), ("steps", "20"), ("resolution", "64")],
    )
    .await;
    let id = sub["id"].as_str().unwrap().to_string();
    {
        let mut ev = events(&client, &server, &id).await;
        while ev.next().await.unwrap().event != "step" {}
        // Dropped here: the connection closes mid-run.
    }
    // The edit finishes anyway and its result is there until it expires.
    let mut state = Value::Null;
    for _ in 0..600 {
        state = client
            .get(url(&server, &format!("/api/edits/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if state["state"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state["state"], "done", "{state}");
    result_png(&client, &server, &id).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resp = client
        .get(url(&server, &format!("/api/edits/{id}/result.png")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "expired");

    // An empty instruction returns the resized input, as the original app does.
    let sub = submit(
        &client,
        &server,
        &[("prompt", ""), ("resolution", "64"), ("seed", "1")],
    )
    .await;
    let id = sub["id"].as_str().unwrap();
    assert_eq!(
        events(&client, &server, id)
            .await
            .until_final()
            .await
            .pop()
            .unwrap()
            .event,
        "done"
    );
    let png = result_png(&client, &server, id).await;
    assert_eq!(
        image::load_from_memory(&png)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (64, 64)
    );

    // The page and the info.
    let page = client
        .get(url(&server, "/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("id=\"generate\"") && !page.contains("http://") && !page.contains("https://"),
        "self-contained"
    );
    let info: Value = client
        .get(url(&server, "/api/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["model"], "tiny");
    server.stop().unwrap();
}
