//! `ip2p serve`: the command starts the server on the tiny model, prints where it listens and
//! serves the page; a folder that is not a model is an error before anything listens. (The
//! server itself is tested in ip2p-serve.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serves_the_page_and_the_api_on_the_tiny_model() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ip2p"))
        .args(["serve", "--addr", "127.0.0.1:0", "--model"])
        .arg(fixtures().join("models/tiny"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("a line saying where it serves")
            .unwrap();
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let page = get(&addr, "/");
    let info = get(&addr, "/api/info");
    let _ = child.kill();
    let _ = child.wait();
    assert!(page.starts_with("HTTP/1.1 200"), "{page:.200}");
    assert!(page.contains("id=\"generate\""));
    assert!(info.contains("\"model\":\"tiny\""), "{info}");
}

#[test]
fn a_folder_that_is_not_a_model_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ip2p"))
        .args(["serve", "--addr", "127.0.0.1:0", "--model"])
        .arg(fixtures().join("text"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error:") && stderr.contains("model_index.json"),
        "{stderr}"
    );
}
