//! Sending a webhook request without being turned against the network it runs in (SSRF):
//! the host is resolved here, every address it resolves to is checked against the
//! non-public ranges, and the socket connects to a checked address — so neither a DNS
//! answer that changed since registration nor an IP literal in any spelling reaches an
//! internal service. No redirect is followed, no proxy is used, the response is read up
//! to a bound and the whole attempt is bounded in time.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;

/// Response bytes read at most (the rest is not waited for).
const MAX_RESPONSE: usize = 64 * 1024;

/// Ranges never reached unless allowed: private, loopback, link-local (cloud metadata
/// included), shared, benchmarking, documentation, multicast, reserved.
const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    // IPv4-compatible (and the unspecified and loopback addresses inside it).
    "::/96",
    // NAT64, which reaches IPv4 (private included) where it is deployed.
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    // Teredo and 6to4 embed an IPv4 address; documentation.
    "2001::/32",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// Where webhooks may go, and how long an attempt may take.
#[derive(Clone)]
pub struct Egress {
    blocked: Arc<Vec<IpNet>>,
    allowed: Arc<Vec<IpNet>>,
    timeout: Duration,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("allowed", &self.allowed)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why a webhook URL or request was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// The URL is not an absolute `http(s)://host[:port]/path` URL without credentials.
    #[error("invalid webhook URL: {0}")]
    Url(String),
    /// The host resolves to an address in a range webhooks may not reach.
    #[error(
        "refused: {host} resolves to {ip}, a private, loopback, link-local or reserved address (allow its range in the server's configuration to reach it)"
    )]
    Refused {
        /// The host as written.
        host: String,
        /// The address refused.
        ip: IpAddr,
    },
    /// The host does not resolve.
    #[error("cannot resolve {host}: {error}")]
    Resolve {
        /// The host.
        host: String,
        /// What the resolver said.
        error: String,
    },
    /// Connecting, TLS or the exchange failed, or it took too long.
    #[error("{0}")]
    Transport(String),
}

/// A webhook endpoint's answer.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// The start of its body.
    pub excerpt: String,
}

impl Egress {
    /// Public addresses only, 10-second attempts.
    pub fn new() -> Egress {
        let blocked = BLOCKED
            .iter()
            .map(|n| n.parse().expect("a valid range"))
            .collect();
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Egress {
            blocked: Arc::new(blocked),
            allowed: Arc::new(Vec::new()),
            timeout: Duration::from_secs(10),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }

    /// Let webhooks reach `range` though it is not public (a test's `127.0.0.0/8`, an
    /// internal network the operator trusts).
    pub fn allow(mut self, range: IpNet) -> Egress {
        Arc::make_mut(&mut self.allowed).push(range);
        self
    }

    /// How long one attempt may take, connection to last byte read (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Egress {
        self.timeout = timeout;
        self
    }

    /// Check `url`'s form and where it resolves now (what registration asks).
    pub async fn check(&self, url: &str) -> Result<(), EgressError> {
        let target = Target::parse(url)?;
        match tokio::time::timeout(self.timeout, self.resolve(&target)).await {
            Ok(resolved) => resolved.map(drop),
            Err(_) => Err(EgressError::Resolve {
                host: target.host,
                error: format!("no answer within {:?}", self.timeout),
            }),
        }
    }

    /// Whether `ip` may be reached.
    fn permits(&self, ip: IpAddr) -> bool {
        // An IPv4 address inside IPv6 is judged as the IPv4 address it is.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allowed.iter().any(|n| n.contains(&ip))
            || !self.blocked.iter().any(|n| n.contains(&ip))
    }

    /// Every address `target` resolves to, each checked; refused if any is not allowed.
    async fn resolve(&self, target: &Target) -> Result<Vec<SocketAddr>, EgressError> {
        let resolved: Vec<SocketAddr> = match target.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, target.port)],
            Err(_) => tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map_err(|e| EgressError::Resolve {
                    host: target.host.clone(),
                    error: e.to_string(),
                })?
                .collect(),
        };
        // Every address must pass: a name that also resolves inside is refused outright.
        if let Some(bad) = resolved.iter().find(|a| !self.permits(a.ip())) {
            return Err(EgressError::Refused {
                host: target.host.clone(),
                ip: bad.ip(),
            });
        }
        if resolved.is_empty() {
            return Err(EgressError::Resolve {
                host: target.host.clone(),
                error: "no address".into(),
            });
        }
        Ok(resolved)
    }

    /// POST `body` with `headers` to `url`: resolve and check, connect to a checked
    /// address (the next one if it refuses), send, read the answer (up to a bound), all
    /// within the timeout.
    pub async fn post(
        &self,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Answer, EgressError> {
        let target = Target::parse(url)?;
        let attempt = async {
            let addrs = self.resolve(&target).await?;
            self.exchange(&target, &addrs, headers, body).await
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(answer) => answer,
            Err(_) => Err(EgressError::Transport(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    async fn exchange(
        &self,
        target: &Target,
        addrs: &[SocketAddr],
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Answer, EgressError> {
        let transport = |e: &dyn std::fmt::Display| EgressError::Transport(e.to_string());
        let mut connected = Err(transport(&"no address"));
        for addr in addrs {
            connected = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| transport(&format!("cannot connect to {addr}: {e}")));
            if connected.is_ok() {
                break;
            }
        }
        let tcp = connected?;
        let _ = tcp.set_nodelay(true);
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(target.path_and_query.as_str())
            .header(header::HOST, target.authority.as_str())
            .header(header::CONTENT_LENGTH, body.len())
            .body(Full::new(body))
            .map_err(|e| transport(&e))?;
        request.headers_mut().extend(headers);
        let response = match target.tls {
            false => send(TokioIo::new(tcp), request).await?,
            true => {
                let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                    .map_err(|e| transport(&e))?;
                let tls = self
                    .tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| transport(&format!("TLS: {e}")))?;
                send(TokioIo::new(tls), request).await?
            }
        };
        let (parts, body) = response.into_parts();
        // Only the start is kept: an endpoint cannot make the server read without bound.
        let bytes = match Limited::new(body, MAX_RESPONSE).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            excerpt: excerpt(&bytes),
        })
    }
}

impl Default for Egress {
    fn default() -> Self {
        Egress::new()
    }
}

async fn send<T>(
    io: TokioIo<T>,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, EgressError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| EgressError::Transport(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| EgressError::Transport(e.to_string()));
    if response.is_err() {
        driver.abort();
    }
    response
}

/// The first 256 characters of a body, as text.
fn excerpt(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(1024)])
        .chars()
        .filter(|c| !c.is_control() || *c == ' ')
        .take(256)
        .collect()
}

/// A parsed webhook URL.
struct Target {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
    path_and_query: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, EgressError> {
        let bad = |why: &str| EgressError::Url(why.to_owned());
        if url.len() > 2048 {
            return Err(bad("longer than 2048 bytes"));
        }
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not accepted"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if port == 0 {
            return Err(bad("port 0"));
        }
        Ok(Target {
            tls,
            host: host.to_owned(),
            port,
            authority: authority.as_str().to_owned(),
            path_and_query: uri
                .path_and_query()
                .map_or("/".to_owned(), |p| p.as_str().to_owned()),
        })
    }
}

/// The `Retry-After` of an answer in seconds (delta-seconds only; capped at a day).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value: &HeaderValue = headers.get(header::RETRY_AFTER)?;
    let secs: u64 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(86_400)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn internal_addresses_are_refused_in_every_spelling() {
        let egress = Egress::new();
        for url in [
            "http://127.0.0.1/",
            "http://localhost:8080/x",
            "http://10.1.2.3/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[::ffff:10.0.0.1]/",
            "http://[::ffff:a00:1]/",
            "http://[::10.0.0.1]/",
            "http://[64:ff9b::a00:1]/",
            "http://[2002:a00:1::]/",
            "http://[fe80::1]/",
            "http://[fec0::1]/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            // Numeric spellings the resolver reads as 127.0.0.1 and 0.0.0.0, without DNS.
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://0/",
        ] {
            let refused = egress.check(url).await;
            assert!(
                matches!(refused, Err(EgressError::Refused { .. })),
                "{url}: {refused:?}"
            );
        }
        for url in [
            "ftp://example.com/",
            "http://user:pw@example.com/",
            "/relative",
            "http://",
        ] {
            assert!(
                matches!(egress.check(url).await, Err(EgressError::Url(_))),
                "{url}"
            );
        }
        let allowed = Egress::new().allow("127.0.0.0/8".parse().unwrap());
        assert_eq!(allowed.check("http://127.0.0.1:9/").await, Ok(()));
        assert!(matches!(
            allowed.check("http://10.0.0.1/").await,
            Err(EgressError::Refused { .. })
        ));
    }
}
