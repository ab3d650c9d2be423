//! The page in a real browser: headless Chromium driven through the Chrome DevTools protocol
//! (a small client over a websocket, below). It uploads an image, types an instruction,
//! clicks Generate, watches the queue position and the progress bar reach n/n, reads the seed
//! used, then starts a long run and clicks Cancel. The screenshot of the finished page is
//! saved under the test's output folder (`$CARGO_TARGET_TMPDIR/serve-browser/page.png`).
//!
//! Skips, saying why, when no Chromium is installed (`apt-get install chromium`; or set
//! `IP2P_CHROMIUM` to a Chrome/Chromium binary).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{start, test_png};
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("IP2P_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
    .find(|p| p.is_file())
}

/// A headless Chromium and one page, driven over CDP.
struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
}

impl Browser {
    fn launch(binary: &Path, dir: &Path) -> Browser {
        let profile = dir.join("profile");
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(dir.join("chromium.log")).unwrap();
        // Without these flags Chromium reaches for the network (updates, sync, first-run) and
        // stalls on a machine that has none.
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        // Chromium writes its port and browser target path here once it listens.
        let port_file = profile.join("DevToolsActivePort");
        let started = Instant::now();
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&port_file)
                && t.lines().count() >= 2
            {
                break t;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Chromium did not open its DevTools port in 30 s; see {}",
                dir.join("chromium.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut lines = text.lines();
        let (port, path) = (lines.next().unwrap(), lines.next().unwrap());
        let (ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}{path}")).unwrap();
        if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
            tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        let mut b = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" }));
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b.call("Page.enable", json!({}));
        b.call("Runtime.enable", json!({}));
        b
    }

    /// Send a command (to the page's session once attached) and wait for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().expect("a DevTools message within 60 s");
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Evaluate a JS expression in the page (promises awaited) and return its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Poll `expr` until it is truthy; its value.
    fn wait_for(&mut self, what: &str, expr: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            let v = self.eval(expr);
            if !(v.is_null() || v == json!(false)) {
                return v;
            }
            assert!(
                started.elapsed() < timeout,
                "waiting for {what}: timed out after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A real mouse click at the centre of the element `selector`.
    fn click(&mut self, selector: &str) {
        let rect = self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector:?}); e.scrollIntoView({{block: 'center'}}); \
             const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// Focus an input and type `text` into it.
    fn type_into(&mut self, selector: &str, text: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector:?}); e.focus(); e.value = ''; }})()"
        ));
        self.call("Input.insertText", json!({ "text": text }));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The state of the edit card for `id` (or the newest one).
fn card(id: Option<&str>) -> String {
    let sel = match id {
        Some(id) => format!(".job[data-id='{id}']"),
        None => ".job".to_string(),
    };
    format!(
        "(() => {{ const j = document.querySelector({sel:?}); if (!j) return null; \
         const img = j.querySelector('img.result'); \
         return {{ id: j.dataset.id, cls: j.className, status: j.querySelector('.status').textContent, \
           value: j.querySelector('progress').value, max: j.querySelector('progress').max, \
           steps_seen: Number(j.dataset.steps || 0), position: j.dataset.position ?? null, seed: j.dataset.seed ?? null, \
           shown_seed: j.querySelector('.seed') ? j.querySelector('.seed').textContent : null, \
           preview: !!j.querySelector('img.output').src, \
           result: img && img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null }}; }})()"
    )
}

/// A plain HTTP/1.1 request to the server (for the test's own API calls).
fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<&str>) -> Value {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let json = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(json).unwrap_or(Value::Null)
}

#[test]
fn the_page_edits_an_image_in_chromium() {
    let Some(binary) = chromium() else {
        eprintln!(
            "skipped: no Chromium found (install Debian's `chromium`, or set IP2P_CHROMIUM); the browser test did not run"
        );
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-browser");
    std::fs::create_dir_all(&dir).unwrap();
    let image_path = dir.join("input.png");
    std::fs::write(&image_path, test_png(96, 64)).unwrap();

    let server = start(|_| {});
    let addr = server.addr();
    let mut b = Browser::launch(&binary, &dir);
    b.call("Page.navigate", json!({ "url": format!("http://{addr}/") }));
    b.wait_for(
        "the page and its scheduler list",
        "document.readyState === 'complete' && document.querySelectorAll('#scheduler option').length > 0",
        Duration::from_secs(30),
    );

    // A long edit through the API first, so that the page's edit waits in the queue.
    let png = base64::engine::general_purpose::STANDARD.encode(test_png(64, 64));
    let blocker = http(
        addr,
        "POST",
        "/api/edits",
        Some(
            &json!({ "image": png, "prompt": "block", "steps": 1000, "resolution": 64 })
                .to_string(),
        ),
    );
    let blocker_id = blocker["id"]
        .as_str()
        .expect("the blocking edit is accepted")
        .to_string();

    // Pick the image, type the instruction, small settings, Generate.
    let input = b.call(
        "Runtime.evaluate",
        json!({ "expression": "document.getElementById('image')" }),
    );
    b.call(
        "DOM.setFileInputFiles",
        json!({ "files": [image_path.display().to_string()], "objectId": input["result"]["objectId"] }),
    );
    b.wait_for(
        "the input preview",
        "!!document.querySelector('#input-preview')",
        Duration::from_secs(10),
    );
    b.type_into("#prompt", "turn the sky purple");
    b.type_into("#steps", "12");
    b.type_into("#resolution", "64");
    assert_eq!(
        b.eval("document.getElementById('prompt').value"),
        "turn the sky purple"
    );
    b.click("#generate");

    let queued = b.wait_for(
        "the edit queued behind the API's",
        &format!(
            "(() => {{ const c = {}; return c && c.position === '1' ? c : null; }})()",
            card(None)
        ),
        Duration::from_secs(20),
    );
    assert!(
        queued["status"].as_str().unwrap().contains("1 ahead"),
        "{queued}"
    );
    let id = queued["id"].as_str().unwrap().to_string();
    http(
        addr,
        "POST",
        &format!("/api/edits/{blocker_id}/cancel"),
        None,
    );

    let done = b.wait_for(
        "the result image",
        &format!(
            "(() => {{ const c = {}; return c && c.result ? c : null; }})()",
            card(Some(&id))
        ),
        Duration::from_secs(120),
    );
    assert!(done["cls"].as_str().unwrap().contains("done"), "{done}");
    assert_eq!(
        (done["value"].as_f64(), done["max"].as_f64()),
        (Some(12.0), Some(12.0)),
        "progress at n/n: {done}"
    );
    assert_eq!(
        done["steps_seen"], 12,
        "every step arrived as an event: {done}"
    );
    assert!(done["preview"].as_bool().unwrap());
    assert_eq!(done["result"], json!([64, 64]));
    let seed = done["shown_seed"].as_str().unwrap().to_string();
    assert_eq!(done["seed"].as_str(), Some(seed.as_str()));
    let state = http(addr, "GET", &format!("/api/edits/{id}"), None);
    assert_eq!(
        state["done"]["seed"].to_string(),
        seed,
        "the page shows the seed used"
    );

    // A long run, cancelled mid-way with the Cancel button.
    b.type_into("#steps", "1000");
    b.click("#generate");
    let running = b.wait_for(
        "the long edit running",
        &format!(
            "(() => {{ const c = {}; return c && c.id !== {id:?} && c.steps_seen >= 2 ? c : null; }})()",
            card(None)
        ),
        Duration::from_secs(60),
    );
    let long_id = running["id"].as_str().unwrap().to_string();
    b.click(&format!(".job[data-id='{long_id}'] .cancel"));
    let cancelled = b.wait_for(
        "the cancelled state",
        &format!(
            "(() => {{ const c = {}; return c && c.cls.includes('cancelled') ? c : null; }})()",
            card(Some(&long_id))
        ),
        Duration::from_secs(60),
    );
    assert!(cancelled["value"].as_f64().unwrap() < 1000.0, "{cancelled}");
    assert_eq!(
        http(addr, "GET", &format!("/api/edits/{long_id}"), None)["state"],
        "cancelled"
    );

    b.eval("window.scrollTo(0, 0)");
    let shot = b.call("Page.captureScreenshot", json!({ "format": "png" }));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    std::fs::write(dir.join("page.png"), bytes).unwrap();
    eprintln!("screenshot: {}", dir.join("page.png").display());
    drop(b);
    server.stop().unwrap();
}
