//! Shared by the HTTP and browser tests: a server on the tiny fixture model, test images, and
//! a server-sent-events reader.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use ip2p_serve::{ServeConfig, Server};

pub type B = burn::backend::Flex;

pub fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny")
}

/// A server on 127.0.0.1 (a free port) with the tiny model; `tweak` changes the config.
pub fn start(tweak: impl FnOnce(&mut ServeConfig)) -> Server {
    let mut config = ServeConfig::new(tiny_model());
    config.addr = "127.0.0.1:0".parse().unwrap();
    tweak(&mut config);
    Server::start::<B>(config, Default::default()).expect("the server starts on the tiny model")
}

/// A `w × h` PNG with a colour gradient (so that the edit has something to work on).
pub fn test_png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / w) as u8,
            (y * 255 / h) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub event: String,
    pub data: serde_json::Value,
}

/// Reads events from a streaming response.
pub struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        Self {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped), or `None` when the stream ends.
    pub async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut data) = (String::from("message"), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some(Sse {
                    event,
                    data: serde_json::from_str(&data).expect("event data is JSON"),
                });
            }
            let chunk = tokio::time::timeout(Duration::from_secs(120), self.resp.chunk())
                .await
                .expect("an event within 2 minutes")
                .ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Every event up to and including the final one (done, error, cancelled).
    pub async fn until_final(&mut self) -> Vec<Sse> {
        let mut all = Vec::new();
        while let Some(e) = self.next().await {
            let last = matches!(e.event.as_str(), "done" | "error" | "cancelled");
            all.push(e);
            if last {
                break;
            }
        }
        all
    }
}
