//! A minimal HTTP/1.1 client over `std::net` for the cluster tests' few calls to the HTTP API
//! (one request per connection, `Connection: close`). The HTTP API's full tests use the
//! official `openai` client and a browser (tests/http).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `POST {base}{path}` with a JSON body; the status and the body.
pub fn post_json(base: &str, path: &str, body: &serde_json::Value) -> (u16, String) {
    request(base, "POST", path, Some(&body.to_string()))
}

pub fn get(base: &str, path: &str) -> (u16, String) {
    request(base, "GET", path, None)
}

fn request(base: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let host = base
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("an http:// URL, not {base:?}"))
        .trim_end_matches('/');
    let mut s = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect to {host}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let rest = &raw[split + 4..];
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head:?}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    (status, String::from_utf8_lossy(&body).to_string())
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&rest[..eol]).to_string();
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        let data = &rest[eol + 2..];
        if n == 0 || data.len() < n {
            break;
        }
        out.extend_from_slice(&data[..n]);
        rest = data[n..].strip_prefix(b"\r\n").unwrap_or(&data[n..]);
    }
    out
}
