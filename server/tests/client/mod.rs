//! A blocking HTTP/1.1 client for the API tests (one request per connection), and tokens.
#![allow(dead_code)] // shared by test targets that each use part of it

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use rabbitry_store::{NewToken, Scope, Store};

/// An answer: status, head (lower-cased), body.
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("JSON body ({e}): {}", self.body))
    }
}

/// One request on a connection of its own (blocking, on a blocking thread).
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    if let Some(token) = token {
        raw.extend_from_slice(format!("Authorization: Bearer {token}\r\n").as_bytes());
    }
    for (k, v) in extra {
        raw.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(body);
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("the API listens");
        stream.write_all(&raw).unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a status line: {response:?}"));
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        Answer {
            status,
            head: head.to_lowercase(),
            body: body.to_owned(),
        }
    })
    .await
    .unwrap()
}

pub async fn token(store: &Store, scopes: &[&str], edit: impl FnOnce(&mut NewToken)) -> String {
    let scopes = scopes.iter().map(|s| Scope::parse(s).unwrap()).collect();
    let mut new = NewToken::new("test", scopes);
    edit(&mut new);
    store.create_token(&new).await.unwrap().1
}
