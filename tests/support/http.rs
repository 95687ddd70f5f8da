//! A minimal blocking HTTP/1.1 client for the endpoint tests: one request per connection.
#![allow(dead_code)] // shared by test targets that each use part of it

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};

/// `GET path` on `addr`: the status code and the body.
pub fn get(addr: impl ToSocketAddrs, path: &str) -> (u16, String) {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

/// Send `raw` as is and read the answer until the server closes: status and body.
pub fn request(addr: impl ToSocketAddrs, raw: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("the endpoint listens");
    stream.write_all(raw.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = String::from_utf8(response).expect("a text response");
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
