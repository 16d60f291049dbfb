//! The agent's HTTP reverse proxy: it routes each request by host name to one instance of a
//! service, round-robin, streams bodies both ways, and tunnels WebSocket (HTTP/1.1 upgrade)
//! connections.
//!
//! HTTP/1.1 only, to clients and to backends (HTTP/2 comes later). TLS terminates here
//! ([`Proxy::serve_tls`]) with the certificate the client's SNI names; plain HTTP answers ACME
//! HTTP-01 challenges and redirects hosts that have a certificate to HTTPS. The route table, the
//! certificates and the challenges are each immutable and replaced whole ([`Proxy::set_routes`],
//! [`Proxy::set_certificates`], [`Proxy::set_challenges`]), so a request keeps the route it was
//! given while new requests see the new table at once.
//!
//! Every client connection is bounded: a semaphore caps their number, hyper caps the size of and
//! the time to send a request head, and one watchdog per connection closes it when an exchange
//! stalls for `idle_timeout` (a client that stops sending its body or reading its response, a
//! backend that stops sending its body, an idle tunnel).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::header::{CONNECTION, CONTENT_TYPE, HOST, LOCATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1 as backend_http1;
use hyper::server::conn::http1;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use self::upstream::{BadResponse, Framing, Parsed, Step};

mod upstream;

/// One route: a host name and the backends (instances) it balances across.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Lower case, no port.
    pub host: String,
    pub backends: Vec<SocketAddr>,
    /// The service's name, for logs and error pages.
    pub service: String,
    /// The backends are other agents' ingress (the service runs there): requests to them are
    /// marked as forwarded, and one that arrives marked is not forwarded again (a loop while
    /// two agents' tables disagree).
    pub via_peer: bool,
}

/// The whole route table, replaced atomically. Cloning shares the round-robin counters.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    routes: HashMap<String, Arc<RouteEntry>>,
    /// The other agents' addresses: a request from one of them marked as forwarded keeps the
    /// `X-Forwarded-Proto` and `X-Forwarded-Host` it carries.
    peers: std::collections::HashSet<std::net::IpAddr>,
}

impl RouteTable {
    /// Host names are normalized as requests' are (lower case, no port, no trailing dot); a route
    /// whose host is not a host name is left out, and of two routes for one host the later wins.
    pub fn new(routes: Vec<Route>) -> RouteTable {
        let mut table = RouteTable::default();
        for mut route in routes {
            let Some(host) = normalize_host(&route.host).map(Cow::into_owned) else {
                tracing::warn!(host = %route.host, service = %route.service, "ignoring a route whose host is not a host name");
                continue;
            };
            route.host = host.clone();
            if route.via_peer {
                table.peers.extend(route.backends.iter().map(|a| a.ip().to_canonical()));
            }
            let backends = route.backends.iter().map(|&addr| Backend::new(addr)).collect();
            table.routes.insert(host, Arc::new(RouteEntry { route, backends, next: AtomicUsize::new(0) }));
        }
        table
    }

    /// The route for `host`, which may carry a port or upper case as a `Host` header does.
    pub fn get(&self, host: &str) -> Option<&Route> {
        let host = normalize_host(host)?;
        self.routes.get(host.as_ref()).map(|entry| &entry.route)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Every route, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.values().map(|entry| &entry.route)
    }
}

#[derive(Debug)]
struct RouteEntry {
    route: Route,
    backends: Vec<Backend>,
    next: AtomicUsize,
}

impl RouteEntry {
    /// The backends in the order to try them: round-robin from the next one, those that failed
    /// lately last.
    fn order(&self, now: u64) -> impl Iterator<Item = &Backend> {
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Relaxed);
        let ring = (0..n).map(move |i| &self.backends[(start + i) % n]);
        ring.clone().filter(move |b| b.is_up(now)).chain(ring.filter(move |b| !b.is_up(now)))
    }
}

#[derive(Debug)]
struct Backend {
    addr: SocketAddr,
    /// Until when (in [`now_ms`] units) this backend goes to the back of the line; 0: never failed.
    backoff_until: AtomicU64,
    /// Its idle connections, shared with the same address in other tables (see `set_routes`).
    pool: OnceLock<Arc<Pool>>,
}

impl Backend {
    fn new(addr: SocketAddr) -> Backend {
        Backend { addr, backoff_until: AtomicU64::new(0), pool: OnceLock::new() }
    }

    fn is_up(&self, now: u64) -> bool {
        self.backoff_until.load(Relaxed) <= now
    }

    fn pool(&self) -> &Arc<Pool> {
        self.pool.get_or_init(Arc::default)
    }
}

/// Idle keep-alive connections to one backend, the most recently used last, in one list per
/// thread: a connection's task runs where it was opened, so a thread reusing its own connections
/// wakes no other (and with a runtime per thread, nothing crosses threads).
///
/// Two kinds: hyper's client connections (for requests with a body, and upgrades), each served
/// by a task of its own, and plain sockets that bodiless requests are written to directly (see
/// [`upstream`]). A socket is registered with the runtime of the thread that opened it, so it is
/// only ever taken again on that thread.
struct Pool {
    shards: [Shard; POOL_SHARDS],
    /// Requests to this backend in flight now (see [`InFlight`]).
    in_flight: AtomicUsize,
}

/// A connection to a backend, as requests are sent on it.
type Sender = backend_http1::SendRequest<RequestBody>;

/// Idle connections of one shard.
type Shard = Mutex<Idle>;

/// Idle connections, with when each was last used; sockets also with their read buffer (empty:
/// kept so that a request allocates none) and the thread that opened them.
#[derive(Default)]
struct Idle {
    senders: VecDeque<(Sender, u64)>,
    sockets: VecDeque<(TcpStream, BytesMut, u64, usize)>,
}

const POOL_SHARDS: usize = 8;

/// Idle keep-alive connections kept per backend and shard.
const MAX_IDLE_PER_BACKEND: usize = 128;

impl Default for Pool {
    fn default() -> Pool {
        Pool { shards: std::array::from_fn(|_| Mutex::default()), in_flight: AtomicUsize::new(0) }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl Pool {
    /// The most recently used connection that is still open, if any; those idle for longer than
    /// `max_idle_ms` are closed.
    fn take(&self, now: u64, max_idle_ms: u64) -> Option<Sender> {
        let mut idle = self.shard().lock().unwrap_or_else(PoisonError::into_inner);
        let senders = &mut idle.senders;
        while senders.front().is_some_and(|(_, since)| now.saturating_sub(*since) >= max_idle_ms) {
            senders.pop_front();
        }
        while let Some((sender, _)) = senders.pop_back() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, sender: Sender) {
        let mut idle = self.shard().lock().unwrap_or_else(PoisonError::into_inner);
        if idle.senders.len() >= MAX_IDLE_PER_BACKEND {
            idle.senders.pop_front();
        }
        idle.senders.push_back((sender, now_ms()));
    }

    /// The most recently used socket this thread opened that the backend has neither closed nor
    /// written to since; as [`Pool::take`] for the rest. Checking costs no system call unless the
    /// socket was signalled readable.
    fn take_socket(&self, now: u64, max_idle_ms: u64) -> Option<(TcpStream, BytesMut)> {
        let me = thread_number();
        loop {
            let (socket, buf) = {
                let mut idle = self.shard().lock().unwrap_or_else(PoisonError::into_inner);
                let sockets = &mut idle.sockets;
                while sockets.front().is_some_and(|(_, _, since, _)| now.saturating_sub(*since) >= max_idle_ms) {
                    sockets.pop_front();
                }
                let mine = sockets.iter().rposition(|(_, _, _, thread)| *thread == me)?;
                let (socket, buf, _, _) = sockets.remove(mine)?;
                (socket, buf)
            };
            let mut probe = [0; 1];
            match socket.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some((socket, buf)),
                // Closed, failed, or bytes nobody asked for: not usable.
                _ => {}
            }
        }
    }

    fn put_socket(&self, socket: TcpStream, buf: BytesMut) {
        let mut idle = self.shard().lock().unwrap_or_else(PoisonError::into_inner);
        if idle.sockets.len() >= MAX_IDLE_PER_BACKEND {
            idle.sockets.pop_front();
        }
        idle.sockets.push_back((socket, buf, now_ms(), thread_number()));
    }

    fn shard(&self) -> &Shard {
        &self.shards[thread_number() % POOL_SHARDS]
    }
}

/// A number for the current thread, unique in the process.
fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Relaxed);
    }
    NUMBER.with(|number| *number)
}

/// One request counted in flight to a backend, from when the backend is picked until the guard
/// is dropped: with the response body once it is done, or with the tunnel once it closes.
struct InFlight(Arc<Pool>);

impl InFlight {
    fn start(pool: &Arc<Pool>) -> InFlight {
        pool.in_flight.fetch_add(1, Relaxed);
        InFlight(pool.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A connection lent to one exchange, counted in flight until the exchange ends.
struct Lent {
    sender: Sender,
    in_flight: InFlight,
}

impl Lent {
    /// The exchange ended cleanly: the connection goes back to its pool (before the count drops,
    /// so that a drained backend has its connections idle).
    fn give_back(self) {
        self.in_flight.0.put(self.sender);
    }
}

/// Limits and timeouts of the proxy.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// To open a TCP connection to a backend.
    pub connect_timeout: Duration,
    /// The backend must start answering within this, counted from the last byte of the request
    /// body it took (or from the request, without a body).
    pub response_header_timeout: Duration,
    /// A client must send a whole request head within this (the slowloris guard), counted from
    /// when the connection opened or its last answer was written out, so it bounds idle
    /// keep-alive connections too. Checked a few times per timeout: a connection is cut between
    /// this and a quarter more.
    pub request_header_timeout: Duration,
    /// Larger request bodies get 413, also chunked ones (counted as they stream).
    pub max_request_body: u64,
    /// Larger request heads get 431.
    pub max_header_bytes: usize,
    /// The longest an exchange may stall: a client that stops sending its body or reading its
    /// response, a backend that stops sending its body, a tunnel with no traffic. Also how long an
    /// unused pooled connection to a backend is kept.
    pub idle_timeout: Duration,
    /// Concurrent client connections (tunnels included); one more is closed at once.
    pub max_connections: usize,
    /// After shutdown, how long in-flight requests and tunnels may take before they are cut.
    pub shutdown_grace: Duration,
    /// A backend that refused or timed out a connection is tried after the others for this long.
    pub backend_backoff: Duration,
    /// The port clients reach HTTPS on: a plain-HTTP request for a host that has a route and a
    /// certificate is redirected there (308). `None`: no HTTPS listener, never redirect.
    pub https_port: Option<u16>,
}

impl Default for ProxySettings {
    fn default() -> ProxySettings {
        ProxySettings {
            connect_timeout: Duration::from_secs(5),
            response_header_timeout: Duration::from_secs(60),
            request_header_timeout: Duration::from_secs(10),
            max_request_body: 64 << 20,
            max_header_bytes: 64 << 10,
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(30),
            backend_backoff: Duration::from_secs(10),
            https_port: None,
        }
    }
}

/// A certificate and the host names it is served for, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CertifiedHost {
    /// Exact host names (`app.example.com`) or one-label wildcards (`*.example.com`, which covers
    /// `a.example.com` but neither `example.com` nor `a.b.example.com`, as browsers match).
    pub names: Vec<String>,
    /// The leaf certificate first, then its intermediates.
    pub cert_chain_pem: String,
    /// PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key_pem: String,
    /// Whether plain-HTTP requests for these names are redirected to HTTPS: yes for publicly
    /// trusted certificates; no for those of a private CA, which browsers would not accept.
    pub redirect: bool,
}

impl std::fmt::Debug for CertifiedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: this ends up in logs.
        f.debug_struct("CertifiedHost").field("names", &self.names).finish_non_exhaustive()
    }
}

/// Why a [`CertifiedHost`] was left out.
#[derive(Debug, thiserror::Error)]
enum CertificateError {
    #[error("it names no host")]
    NoName,
    #[error("{0:?} is neither a host name nor a one-label wildcard")]
    BadName(String),
    #[error("the certificate chain is not valid PEM: {0}")]
    ChainPem(#[source] io::Error),
    #[error("the certificate chain holds no certificate")]
    NoCertificate,
    #[error("the private key is not valid PEM: {0}")]
    KeyPem(#[source] io::Error),
    #[error("no private key found")]
    NoKey,
    #[error("the private key is not usable: {0}")]
    Key(#[source] rustls::Error),
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    #[error("the certificate is not usable: {0}")]
    Certificate(#[source] rustls::Error),
}

/// A name a certificate is served for, normalized as request hosts are.
enum CertifiedName {
    Exact(String),
    /// `*.example.com`, by its parent `example.com`.
    Wildcard(String),
}

impl CertifiedName {
    fn parse(raw: &str) -> Result<CertifiedName, CertificateError> {
        let bad = || CertificateError::BadName(raw.to_string());
        let (wildcard, name) = match raw.strip_prefix("*.") {
            Some(parent) => (true, parent),
            None => (false, raw),
        };
        // No port, no IP literal, no other wildcard; every label non-empty.
        if name.contains([':', '[', '*']) {
            return Err(bad());
        }
        let name = normalize_host(name).ok_or_else(bad)?;
        if name.split('.').any(str::is_empty) {
            return Err(bad());
        }
        let name = name.into_owned();
        Ok(if wildcard { CertifiedName::Wildcard(name) } else { CertifiedName::Exact(name) })
    }
}

/// The certificates by the names they are served for, each with whether it redirects.
#[derive(Default)]
struct CertificateSet {
    exact: HashMap<String, (Arc<CertifiedKey>, bool)>,
    /// Wildcard certificates by the parent of the names they cover.
    wildcard: HashMap<String, (Arc<CertifiedKey>, bool)>,
}

impl CertificateSet {
    /// The certificate for a normalized host name: its own, else the wildcard one label up.
    fn find(&self, host: &str) -> Option<&(Arc<CertifiedKey>, bool)> {
        self.exact.get(host).or_else(|| match host.split_once('.') {
            Some((label, parent)) if !label.is_empty() => self.wildcard.get(parent),
            _ => None,
        })
    }
}

/// The current certificates, replaced whole by [`Proxy::set_certificates`]; TLS handshakes pick
/// one by SNI.
#[derive(Default)]
struct Certificates(RwLock<CertificateSet>);

impl Certificates {
    /// Whether plain HTTP for a normalized host name goes to HTTPS: it has a certificate that
    /// asks for it.
    fn redirects(&self, host: &str) -> bool {
        self.0.read().unwrap_or_else(PoisonError::into_inner).find(host).is_some_and(|(_, redirect)| *redirect)
    }

    /// The certificate for a name as a client sends it (any case, maybe a trailing dot).
    fn for_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = normalize_host(name)?;
        self.0.read().unwrap_or_else(PoisonError::into_inner).find(&name).map(|(key, _)| key.clone())
    }
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Certificates").field("exact", &set.exact.len()).field("wildcard", &set.wildcard.len()).finish()
    }
}

impl ResolvesServerCert for Certificates {
    /// No SNI, or no certificate for it: `None` fails the handshake.
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            tracing::debug!("TLS handshake without SNI: no certificate to offer");
            return None;
        };
        let key = self.for_name(name);
        if key.is_none() {
            tracing::debug!(sni = name, "TLS handshake for a name without a certificate");
        }
        key
    }
}

/// Where ACME HTTP-01 challenges are fetched (RFC 8555, section 8.3).
const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// The reverse proxy. Cheap to share: [`Proxy::new`] hands out an `Arc`.
pub struct Proxy {
    settings: ProxySettings,
    table: RwLock<Arc<RouteTable>>,
    /// Every backend's pool, by address, so that a new table keeps the connections of the old.
    pools: Mutex<HashMap<SocketAddr, std::sync::Weak<Pool>>>,
    certificates: Arc<Certificates>,
    /// ACME HTTP-01 key authorizations, by token.
    challenges: RwLock<HashMap<String, String>>,
    crypto: Arc<CryptoProvider>,
    /// Made on first use and shared by every TLS listener, and so is its session cache.
    tls: OnceLock<Arc<ServerConfig>>,
    http: http1::Builder,
    connections: Arc<Semaphore>,
}

impl Proxy {
    pub fn new(settings: ProxySettings) -> Arc<Proxy> {
        let mut http = http1::Builder::new();
        // No timer for hyper: the request head timeout is the connection's watchdog's (see
        // `ConnState::watchdog`). hyper's arms a timer per request (a clock read, an allocation,
        // a timer wheel insertion and removal): 9% of the proxy's instructions per request
        // (callgrind, `benches/ingress.rs`).
        http.keep_alive(true).header_read_timeout(None).max_header_size(settings.max_header_bytes);
        Arc::new(Proxy {
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
            table: RwLock::new(Arc::new(RouteTable::default())),
            pools: Mutex::new(HashMap::new()),
            certificates: Arc::default(),
            challenges: RwLock::default(),
            crypto: Arc::new(rustls::crypto::ring::default_provider()),
            tls: OnceLock::new(),
            http,
        })
    }

    /// Replaces the table atomically: requests already routed finish on their backend; new ones
    /// see the new table.
    pub fn set_routes(&self, table: RouteTable) {
        {
            // A backend's idle connections outlive the tables that name it, and go with the last.
            let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
            pools.retain(|_, pool| pool.strong_count() > 0);
            for backend in table.routes.values().flat_map(|entry| &entry.backends) {
                backend.pool.get_or_init(|| {
                    let known = pools.get(&backend.addr).and_then(std::sync::Weak::upgrade);
                    known.unwrap_or_else(|| {
                        let pool = Arc::default();
                        pools.insert(backend.addr, Arc::downgrade(&pool));
                        pool
                    })
                });
            }
        }
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
    }

    /// The table requests are routed by now.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.table.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// How many requests are being proxied to any of `backends` now: each from when its backend
    /// is picked until its response body is done (read or dropped), a WebSocket tunnel while it
    /// is open. Counted across route tables, so it tells when an instance that is no longer
    /// routed to has finished its last request.
    pub fn in_flight(&self, backends: &[SocketAddr]) -> usize {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        let mut counted = Vec::with_capacity(backends.len());
        let mut total = 0;
        for addr in backends {
            if counted.contains(addr) {
                continue;
            }
            counted.push(*addr);
            if let Some(pool) = pools.get(addr).and_then(std::sync::Weak::upgrade) {
                total += pool.in_flight.load(Relaxed);
            }
        }
        total
    }

    /// Replaces the certificates atomically (handshakes in progress keep the one they picked).
    /// An entry that does not parse, or names a host badly, is left out: the answer has one
    /// message per entry left out, naming its hosts.
    ///
    /// Of two entries for one name the later wins; an exact name wins over a wildcard.
    pub fn set_certificates(&self, hosts: Vec<CertifiedHost>) -> Vec<String> {
        let mut set = CertificateSet::default();
        let mut errors = Vec::new();
        for host in hosts {
            match self.certified_key(&host) {
                Ok((key, names)) => {
                    for name in names {
                        match name {
                            CertifiedName::Exact(name) => set.exact.insert(name, (key.clone(), host.redirect)),
                            CertifiedName::Wildcard(parent) => {
                                set.wildcard.insert(parent, (key.clone(), host.redirect))
                            }
                        };
                    }
                }
                Err(error) => {
                    let names = if host.names.is_empty() { "no host".to_string() } else { host.names.join(", ") };
                    tracing::warn!(hosts = %names, %error, "leaving out a certificate");
                    errors.push(format!("the certificate for {names}: {error}"));
                }
            }
        }
        *self.certificates.0.write().unwrap_or_else(PoisonError::into_inner) = set;
        errors
    }

    fn certified_key(&self, host: &CertifiedHost) -> Result<(Arc<CertifiedKey>, Vec<CertifiedName>), CertificateError> {
        if host.names.is_empty() {
            return Err(CertificateError::NoName);
        }
        let names = host.names.iter().map(|name| CertifiedName::parse(name)).collect::<Result<Vec<_>, _>>()?;
        let chain = rustls_pemfile::certs(&mut host.cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(CertificateError::ChainPem)?;
        if chain.is_empty() {
            return Err(CertificateError::NoCertificate);
        }
        let key = rustls_pemfile::private_key(&mut host.key_pem.as_bytes())
            .map_err(CertificateError::KeyPem)?
            .ok_or(CertificateError::NoKey)?;
        let key = self.crypto.key_provider.load_private_key(key).map_err(CertificateError::Key)?;
        let certified = CertifiedKey::new(chain, key);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                return Err(CertificateError::KeyMismatch)
            }
            Err(e) => return Err(CertificateError::Certificate(e)),
        }
        Ok((Arc::new(certified), names))
    }

    /// Replaces the ACME HTTP-01 challenges atomically: token -> key authorization.
    pub fn set_challenges(&self, challenges: HashMap<String, String>) {
        *self.challenges.write().unwrap_or_else(PoisonError::into_inner) = challenges;
    }

    /// The answer to an ACME HTTP-01 challenge whose token is known, for any host.
    fn challenge_answer<B>(&self, req: &Request<B>) -> Option<Response<ResponseBody>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return None;
        }
        let token = req.uri().path().strip_prefix(ACME_CHALLENGE)?;
        let key_authorization = self.challenges.read().unwrap_or_else(PoisonError::into_inner).get(token)?.clone();
        tracing::debug!(token, "answering an ACME challenge");
        Some(page(StatusCode::OK, key_authorization))
    }

    /// The redirect to HTTPS for a plain-HTTP request to `host` (normalized), if HTTPS is served
    /// and the host has a certificate.
    fn https_redirect(&self, host: &str, uri: &Uri) -> Option<Response<ResponseBody>> {
        let port = self.settings.https_port?;
        if !self.certificates.redirects(host) {
            return None;
        }
        let path = uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let path = if path.starts_with('/') { path } else { "/" };
        let location = match port {
            443 => format!("https://{host}{path}"),
            port => format!("https://{host}:{port}{path}"),
        };
        let value = HeaderValue::try_from(&location).ok()?;
        let mut response = page(StatusCode::PERMANENT_REDIRECT, format!("moved to {location}\n"));
        response.headers_mut().insert(LOCATION, value);
        Some(response)
    }

    /// The TLS configuration every HTTPS listener shares: certificates by SNI, HTTP/1.1 by ALPN.
    fn tls_config(&self) -> Result<Arc<ServerConfig>, rustls::Error> {
        if let Some(config) = self.tls.get() {
            return Ok(config.clone());
        }
        let mut config = ServerConfig::builder_with_provider(self.crypto.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.certificates.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(self.tls.get_or_init(|| Arc::new(config)).clone())
    }

    /// A new connection to a backend. Its task ends when the backend closes it or when its
    /// sender is dropped (by the pool, or with an exchange that did not end cleanly).
    async fn connect(&self, addr: SocketAddr) -> Result<Sender, Failure> {
        let stream = self.open(addr).await?;
        let (sender, conn) =
            backend_http1::handshake(TokioIo::new(stream)).await.map_err(|e| Failure::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(backend = %addr, error = %e, "backend connection ended");
            }
        });
        Ok(sender)
    }

    /// A new TCP connection to a backend, within `connect_timeout`.
    async fn open(&self, addr: SocketAddr) -> Result<TcpStream, Failure> {
        let stream = match tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(Failure::Connect(e.into())),
            Err(_) => return Err(Failure::Connect("timed out".into())),
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Serves plain HTTP on `listener` until `shutdown` resolves, then stops accepting and lets
    /// in-flight requests and tunnels finish for up to `shutdown_grace`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) {
        self.serve_as(listener, Scheme::Http, None, shutdown).await
    }

    /// Like [`Proxy::serve`], for HTTPS: each connection's TLS handshake comes first (within
    /// `request_header_timeout`), with the certificate its SNI names (see
    /// [`Proxy::set_certificates`]); then the `Host` header routes as on plain HTTP, and backends
    /// see `X-Forwarded-Proto: https`.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        self.serve_as(listener, Scheme::Https, None, shutdown).await
    }

    /// Like [`Proxy::serve`], on `threads` threads of its own, each with a single-threaded
    /// runtime accepting from the same listener (nginx's worker model): a request and its backend
    /// connection stay on one thread, without the cross-thread wake-ups of a work-stealing
    /// runtime (worth about a fifth more requests per second in `benches/ingress.rs`). Accepted
    /// connections are dealt to the threads in turn, whichever accepted them (see [`Balance`]).
    /// Returns when every thread has stopped after `shutdown`.
    pub async fn serve_threads(
        self: Arc<Self>,
        listener: TcpListener,
        threads: usize,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        self.serve_threads_as(listener, threads, Scheme::Http, shutdown).await
    }

    /// [`Proxy::serve_tls`] on threads of its own, as [`Proxy::serve_threads`] does.
    pub async fn serve_tls_threads(
        self: Arc<Self>,
        listener: TcpListener,
        threads: usize,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        self.serve_threads_as(listener, threads, Scheme::Https, shutdown).await
    }

    async fn serve_threads_as(
        self: Arc<Self>,
        listener: TcpListener,
        threads: usize,
        scheme: Scheme,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let listener = listener.into_std()?;
        let (stop, stopped) = watch::channel(false);
        let threads = threads.max(1);
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..threads).map(|_| tokio::sync::mpsc::unbounded_channel()).unzip();
        let inboxes: Arc<[Inbox]> = inboxes.into();
        let dealt = Arc::new(AtomicUsize::new(0));
        let mut running = Vec::new();
        let mut started = Ok(());
        for (n, inbox) in receivers.into_iter().enumerate() {
            let balance = Balance { me: n, inboxes: inboxes.clone(), inbox, dealt: dealt.clone() };
            let spawned = listener.try_clone().and_then(|listener| {
                let proxy = self.clone();
                let mut stopped = stopped.clone();
                let (done, finished) = tokio::sync::oneshot::channel::<()>();
                std::thread::Builder::new().name(format!("ingress-{n}")).spawn(move || {
                    let _done = done;
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(e) => return tracing::error!(error = %e, "ingress thread has no runtime"),
                    };
                    runtime.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => {
                                let shutdown = async move {
                                    let _ = stopped.wait_for(|stopped| *stopped).await;
                                };
                                proxy.serve_as(listener, scheme, Some(balance), shutdown).await
                            }
                            Err(e) => tracing::error!(error = %e, "ingress thread cannot listen"),
                        }
                    });
                })?;
                Ok(finished)
            });
            match spawned {
                Ok(finished) => running.push(finished),
                Err(e) => {
                    started = Err(e);
                    break;
                }
            }
        }
        if started.is_ok() {
            let all_stopped = futures::future::join_all(running.iter_mut());
            tokio::select! {
                () = shutdown => {}
                _ = all_stopped => tracing::error!("every ingress thread stopped"),
            }
        }
        let _ = stop.send(true);
        futures::future::join_all(running).await;
        started
    }

    async fn serve_as(
        self: Arc<Self>,
        listener: TcpListener,
        scheme: Scheme,
        mut balance: Option<Balance>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let tls = match scheme {
            Scheme::Http => None,
            Scheme::Https => match self.tls_config() {
                Ok(config) => Some(TlsAcceptor::from(config)),
                Err(e) => return tracing::error!(addr = %local, error = %e, "ingress cannot set up TLS"),
            },
        };
        tracing::info!(addr = %local, proto = scheme.as_str(), "ingress listening");
        let (drain_tx, drain_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let serve = |connections: &mut JoinSet<()>, (stream, peer, permit): Accepted| {
            connections.spawn(self.clone().serve_connection(stream, peer, tls.clone(), permit, drain_rx.clone()));
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                Some(dealt) = async { balance.as_mut()?.inbox.recv().await } => {
                    if let Some(accepted) = dealt.adopt() {
                        serve(&mut connections, accepted);
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                            tracing::debug!(%peer, "connection limit reached: closing a new connection");
                            continue;
                        };
                        let accepted = (stream, peer, permit);
                        match &balance {
                            Some(balance) => {
                                if let Some(mine) = balance.deal(accepted) {
                                    serve(&mut connections, mine);
                                }
                            }
                            None => serve(&mut connections, accepted),
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors, most likely: wait for some to free up.
                        tracing::warn!(error = %e, "ingress cannot accept connections");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        if let Some(mut balance) = balance {
            // Connections dealt here before the stop are served (and drained) like the others.
            balance.inbox.close();
            while let Ok(dealt) = balance.inbox.try_recv() {
                if let Some(accepted) = dealt.adopt() {
                    serve(&mut connections, accepted);
                }
            }
        }
        let _ = drain_tx.send(true);
        let in_flight = connections.len();
        let drained = tokio::time::timeout(self.settings.shutdown_grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(left = connections.len(), "ingress grace period over: cutting the remaining connections");
            connections.shutdown().await;
        }
        tracing::info!(addr = %local, drained = in_flight, "ingress stopped");
    }

    /// One client connection, holding its permit: the TLS handshake first on an HTTPS listener.
    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<TlsAcceptor>,
        _permit: OwnedSemaphorePermit,
        draining: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        let Some(acceptor) = tls else {
            return self.serve_client(stream, peer, Scheme::Http, draining).await;
        };
        // Bounded like a request head, so that a slow handshaker cannot hold a permit for ever.
        match tokio::time::timeout(self.settings.request_header_timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => self.serve_client(stream, peer, Scheme::Https, draining).await,
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    }

    /// Serves HTTP/1.1 on a client connection (TCP, or TLS over it), then the tunnel it may
    /// have upgraded to.
    async fn serve_client<S>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        scheme: Scheme,
        mut draining: watch::Receiver<bool>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let idle_timeout = self.settings.idle_timeout;
        let state = Arc::new(ConnState {
            proxy: self.clone(),
            client_ip: HeaderValue::try_from(peer.ip().to_canonical().to_string())
                .expect("an IP address is a valid header value"),
            client_addr: peer.ip().to_canonical(),
            from_peer: AtomicBool::new(false),
            tls: scheme == Scheme::Https,
            proto: HeaderValue::from_static(scheme.as_str()),
            write_blocked_since: AtomicU64::new(0),
            request_waiting_since: AtomicU64::new(0),
            response_waiting_since: AtomicU64::new(0),
            body_progress: AtomicU64::new(0),
            request_body_open: AtomicBool::new(false),
            tunnelling: AtomicBool::new(false),
            last_io: AtomicU64::new(0),
            tunnel: Mutex::new(None),
            unread_body: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            answering: AtomicBool::new(false),
        });
        let io = TokioIo::new(ClientIo { stream, state: state.clone() });
        let service = {
            let state = state.clone();
            hyper::service::service_fn(move |req| {
                state.requests.fetch_add(1, Relaxed);
                state.answering.store(true, Relaxed);
                let state = state.clone();
                async move {
                    let response = state.clone().handle(req).await;
                    Ok::<_, Infallible>(response.map(|body| Answer { body, _answered: Answered(state) }))
                }
            })
        };
        let mut conn = self.http.serve_connection(io, service).with_upgrades();
        let watchdog = state.watchdog(idle_timeout, self.settings.request_header_timeout);
        tokio::pin!(watchdog);
        let mut drain_started = false;
        loop {
            tokio::select! {
                result = &mut conn => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "client connection ended");
                    }
                    break;
                }
                _ = draining.wait_for(|draining| *draining), if !drain_started => {
                    drain_started = true;
                    Pin::new(&mut conn).graceful_shutdown();
                }
                why = &mut watchdog => {
                    tracing::debug!(%peer, why, "closing a stalled client connection");
                    return;
                }
            }
        }
        if state.unread_body.load(Relaxed) {
            if let Some(parts) = conn.into_parts() {
                linger(parts.io.into_inner().stream).await;
            }
            return;
        }
        let tunnel = state.tunnel.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(tunnel) = tunnel {
            state.last_io.store(now_ms(), Relaxed);
            state.tunnelling.store(true, Relaxed);
            tokio::select! {
                result = tunnel.run() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "tunnel ended");
                    }
                }
                why = &mut watchdog => tracing::debug!(%peer, why, "closing an idle tunnel"),
            }
        }
    }
}

/// A connection accepted and counted against the limit.
type Accepted = (TcpStream, SocketAddr, OwnedSemaphorePermit);

/// A connection on its way to the thread it was dealt to: out of the accepting thread's IO
/// driver, to be registered with the receiving one's.
struct Dealt(std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

impl Dealt {
    fn adopt(self) -> Option<Accepted> {
        let Dealt(stream, peer, permit) = self;
        match TcpStream::from_std(stream) {
            Ok(stream) => Some((stream, peer, permit)),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "ingress cannot take over a connection");
                None
            }
        }
    }
}

type Inbox = tokio::sync::mpsc::UnboundedSender<Dealt>;

/// Deals the connections that ingress threads accept to the threads in turn. Threads that accept
/// from one listener do not share the connections evenly: one that wakes first takes a burst of
/// them, and its clients then wait longer while the other thread idles (under `wrk -c64` in
/// `benches/ingress.rs`, one of two threads did 57% of the work; dealt, each does half). A
/// connection dealt elsewhere costs one hand-over when it opens, nothing per request.
struct Balance {
    me: usize,
    inboxes: Arc<[Inbox]>,
    inbox: tokio::sync::mpsc::UnboundedReceiver<Dealt>,
    /// Connections dealt so far, by all threads.
    dealt: Arc<AtomicUsize>,
}

impl Balance {
    /// Hands the connection to the thread whose turn it is; it comes back if that is this one,
    /// or if the hand-over failed (that thread has stopped).
    fn deal(&self, (stream, peer, permit): Accepted) -> Option<Accepted> {
        let to = self.dealt.fetch_add(1, Relaxed) % self.inboxes.len();
        if to == self.me {
            return Some((stream, peer, permit));
        }
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "ingress cannot hand over a connection");
                return None;
            }
        };
        match self.inboxes[to].send(Dealt(stream, peer, permit)) {
            Ok(()) => None,
            Err(returned) => returned.0.adopt(),
        }
    }
}

/// What a listener speaks to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// As `X-Forwarded-Proto` says it.
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What one client connection shares with the requests it carries and with its watchdog.
/// HTTP/1.1 serves one request at a time, so the per-request fields need no more than this.
struct ConnState {
    proxy: Arc<Proxy>,
    /// The client's IP address, for `X-Forwarded-For`.
    client_ip: HeaderValue,
    client_addr: std::net::IpAddr,
    /// The request being handled came from another agent's ingress (see [`Route::via_peer`]).
    from_peer: AtomicBool,
    /// TLS terminated here: no ACME challenges, no redirect.
    tls: bool,
    /// For `X-Forwarded-Proto`.
    proto: HeaderValue,
    /// Since when ([`now_ms`]) a write to the client has been blocked; 0: not blocked.
    write_blocked_since: AtomicU64,
    /// Since when the request body has been waiting for the client; 0: not waiting.
    request_waiting_since: AtomicU64,
    /// Since when the response body has been waiting for the backend; 0: not waiting.
    response_waiting_since: AtomicU64,
    /// When the request body last moved towards the backend (or the request started).
    body_progress: AtomicU64,
    /// The request body is still on its way to the backend (its connection is not reusable yet).
    request_body_open: AtomicBool,
    tunnelling: AtomicBool,
    /// When a byte last moved on the client socket; kept only while tunnelling.
    last_io: AtomicU64,
    /// An upgrade agreed by the backend, run by the connection once hyper lets go of it.
    tunnel: Mutex<Option<Tunnel>>,
    /// Request heads received so far.
    requests: AtomicU64,
    /// A request is being answered: from its head until hyper has taken its whole response (see
    /// [`Answer`]). Otherwise the connection waits for a request head.
    answering: AtomicBool,
    /// A request was answered before its body was read: hyper will close the connection, and
    /// the client may still be sending.
    unread_body: AtomicBool,
}

impl ConnState {
    /// Resolves, with the reason, when the connection has stalled for `idle`, or has waited for a
    /// request head for `head` (no new request counted, none being answered, no write blocked).
    async fn watchdog(&self, idle: Duration, head: Duration) -> &'static str {
        let idle_ms = idle.as_millis() as u64;
        let head_ms = head.as_millis() as u64;
        let tick = (idle.min(head) / 4).max(Duration::from_millis(10));
        // Since when (as first seen here) the connection has waited for the request head after
        // this many requests.
        let mut head_wait: Option<(u64, u64)> = None;
        loop {
            tokio::time::sleep(tick).await;
            let now = now_ms();
            let waiting_for_head = !self.answering.load(Relaxed)
                && !self.tunnelling.load(Relaxed)
                && self.write_blocked_since.load(Relaxed) == 0;
            if waiting_for_head {
                let requests = self.requests.load(Relaxed);
                match head_wait {
                    Some((seen, since)) if seen == requests => {
                        if now.saturating_sub(since) >= head_ms {
                            return "no request head within the request header timeout";
                        }
                    }
                    _ => head_wait = Some((requests, now)),
                }
            } else {
                head_wait = None;
            }
            let stalled = |since: &AtomicU64| {
                let since = since.load(Relaxed);
                since != 0 && now.saturating_sub(since) >= idle_ms
            };
            if stalled(&self.write_blocked_since) {
                return "the client stopped reading";
            }
            if stalled(&self.request_waiting_since) {
                return "the client stopped sending its request body";
            }
            if stalled(&self.response_waiting_since) {
                return "the backend stopped sending its response body";
            }
            if self.tunnelling.load(Relaxed) && now.saturating_sub(self.last_io.load(Relaxed)) >= idle_ms {
                return "no traffic in the tunnel";
            }
        }
    }

    /// Passes on a poll of a backend's response body, noting for the watchdog since when it has
    /// been waiting for the backend.
    fn waited<T>(&self, polled: Poll<T>) -> Poll<T> {
        let waiting = &self.response_waiting_since;
        if polled.is_pending() {
            if waiting.load(Relaxed) == 0 {
                waiting.store(now_ms(), Relaxed);
            }
        } else if waiting.load(Relaxed) != 0 {
            waiting.store(0, Relaxed);
        }
        polled
    }

    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<ResponseBody> {
        match self.route(&mut req) {
            Ok(entry) => self.forward(entry, req).await,
            Err(page) => {
                if !req.body().is_end_stream() {
                    self.unread_body.store(true, Relaxed);
                }
                page
            }
        }
    }

    /// The route a request takes, or the page that answers it. On plain HTTP, an ACME challenge
    /// is answered for any host, and a host with a certificate is redirected to HTTPS.
    fn route(&self, req: &mut Request<Incoming>) -> Result<Arc<RouteEntry>, Response<ResponseBody>> {
        let settings = &self.proxy.settings;
        let challenge = !self.tls && req.uri().path().starts_with(ACME_CHALLENGE);
        if challenge {
            if let Some(answer) = self.proxy.challenge_answer(req) {
                return Err(answer);
            }
        }
        let entry = {
            let host = request_host(req).map_err(|message| page(StatusCode::BAD_REQUEST, message.to_string()))?;
            let table = self.proxy.routes();
            let entry = match table.routes.get(host.as_ref()) {
                Some(entry) => entry.clone(),
                None => return Err(page(StatusCode::NOT_FOUND, format!("no service answers at {host}\n"))),
            };
            let forwarded = req.headers().contains_key(X_DEPLOYER_HOP);
            if forwarded && entry.route.via_peer {
                let text = format!("{} is being moved between hosts; try again in a moment\n", entry.route.service);
                return Err(page(StatusCode::LOOP_DETECTED, text));
            }
            self.from_peer.store(forwarded && table.peers.contains(&self.client_addr), Relaxed);
            if !self.tls && !challenge {
                if let Some(redirect) = self.proxy.https_redirect(&host, req.uri()) {
                    return Err(redirect);
                }
            }
            entry
        };
        if entry.backends.is_empty() {
            let text = format!("{} has no instance running\n", entry.route.service);
            return Err(page(StatusCode::SERVICE_UNAVAILABLE, text));
        }
        if req.body().size_hint().lower() > settings.max_request_body {
            return Err(too_large(settings.max_request_body));
        }
        if let Some(authority) = req.uri().authority() {
            // Absolute-form: the URI's authority overrides Host (RFC 9112, section 3.2.2).
            let host = match authority.port() {
                Some(port) => format!("{}:{port}", authority.host()),
                None => authority.host().to_string(),
            };
            if let Ok(host) = HeaderValue::try_from(host) {
                req.headers_mut().insert(HOST, host);
            }
        }
        Ok(entry)
    }

    async fn forward(self: Arc<Self>, entry: Arc<RouteEntry>, mut req: Request<Incoming>) -> Response<ResponseBody> {
        let settings = &self.proxy.settings;
        let route = &entry.route;
        let client_upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let has_body = !body.is_end_stream();
        // Only a request that cannot have reached an application is sent again: the connection
        // failed, so nothing was sent; with a body, it is gone with the first attempt.
        let attempts = if !has_body && parts.method.is_idempotent() { entry.backends.len() } else { 1 };
        let now = now_ms();
        let mut used = None;
        let forwarding = Forwarding {
            client_ip: &self.client_ip,
            proto: &self.proto,
            from_peer: self.from_peer.load(Relaxed),
            via_peer: route.via_peer,
        };

        if !has_body && client_upgrade.is_none() {
            let mut head = Vec::with_capacity(512);
            let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            if !forwarding.write_head(&parts.method, target, &parts.headers, &mut head) {
                head.clear();
                forwarding.apply(&mut parts.headers, None);
                upstream::write_head(&parts.method, target, &parts.headers, &mut head);
            }
            let ask =
                Ask { head: &head, to_head: parts.method == Method::HEAD, idempotent: parts.method.is_idempotent() };
            let mut outcome = Err(Failure::NoBackend);
            for backend in entry.order(now).take(attempts) {
                used = Some(backend.addr);
                outcome = self.exchange_plain(backend, &ask, now).await;
                if !try_next(backend, &outcome, settings.backend_backoff) {
                    break;
                }
            }
            return self.answered(route, used, &parts.method, outcome);
        }

        let protocol = client_upgrade.as_ref().and_then(|_| parts.headers.get(UPGRADE).cloned());
        forwarding.apply(&mut parts.headers, protocol);
        let mut path = parts.uri.into_parts().path_and_query.map_or_else(|| Uri::from_static("/"), Uri::from);
        let mut body = Some(if has_body {
            RequestBody::streaming(body, settings.max_request_body, self.clone())
        } else {
            RequestBody::empty()
        });
        self.body_progress.store(now, Relaxed);
        self.request_body_open.store(has_body, Relaxed);
        let mut outcome = Err(Failure::NoBackend);
        for (attempt, backend) in entry.order(now).take(attempts).enumerate() {
            let last = attempt + 1 == attempts;
            let mut forward =
                Request::new(if last { body.take().unwrap_or_else(RequestBody::empty) } else { RequestBody::empty() });
            *forward.method_mut() = parts.method.clone();
            *forward.uri_mut() = if last { std::mem::take(&mut path) } else { path.clone() };
            *forward.headers_mut() = if last { std::mem::take(&mut parts.headers) } else { parts.headers.clone() };
            used = Some(backend.addr);
            outcome = self.exchange(backend, forward, now).await;
            if !try_next(backend, &outcome, settings.backend_backoff) {
                break;
            }
        }
        let outcome = match outcome {
            Ok((mut response, lent)) if response.status() == StatusCode::SWITCHING_PROTOCOLS => match client_upgrade {
                Some(client) => {
                    let backend = hyper::upgrade::on(&mut response);
                    let tunnel = Tunnel { client, backend, _in_flight: lent.in_flight };
                    *self.tunnel.lock().unwrap_or_else(PoisonError::into_inner) = Some(tunnel);
                    let protocol = response.headers().get(UPGRADE).cloned();
                    strip_hop_by_hop(response.headers_mut());
                    response.headers_mut().insert(CONNECTION, HeaderValue::from_static("upgrade"));
                    if let Some(protocol) = protocol {
                        response.headers_mut().insert(UPGRADE, protocol);
                    }
                    Ok(response.map(|_| ResponseBody::empty()))
                }
                None => Err(Failure::Answer(BadResponse::SwitchedUnasked)),
            },
            Ok((mut response, lent)) => {
                strip_hop_by_hop(response.headers_mut());
                *response.version_mut() = Version::HTTP_11;
                Ok(response.map(|body| ResponseBody::backend(body, self.clone(), lent)))
            }
            Err(failure) => Err(failure),
        };
        self.answered(route, used, &parts.method, outcome)
    }

    /// The response to the client: the backend's, or the page that says why there is none.
    fn answered(
        &self,
        route: &Route,
        backend: Option<SocketAddr>,
        method: &Method,
        outcome: Result<Response<ResponseBody>, Failure>,
    ) -> Response<ResponseBody> {
        match outcome {
            Ok(response) => {
                tracing::debug!(host = %route.host, service = %route.service, ?backend, %method, status = response.status().as_u16(), "proxied");
                response
            }
            Err(failure) => {
                tracing::debug!(host = %route.host, service = %route.service, ?backend, error = %failure, "proxying failed");
                failure.page(&route.service, &self.proxy.settings)
            }
        }
    }

    /// One request without a body to one backend, over a plain socket (see [`upstream`]), idle
    /// or new: the response, its body read from the socket as the client takes it. Counted in
    /// flight from here until the body has been read.
    async fn exchange_plain(
        self: &Arc<Self>,
        backend: &Backend,
        ask: &Ask<'_>,
        started: u64,
    ) -> Result<Response<ResponseBody>, Failure> {
        let pool = backend.pool();
        let in_flight = InFlight::start(pool);
        let settings = &self.proxy.settings;
        let deadline = instant_at(started) + settings.response_header_timeout;
        let max_idle_ms = settings.idle_timeout.as_millis() as u64;
        loop {
            let (mut socket, mut buf, reused) = match pool.take_socket(started, max_idle_ms) {
                Some((socket, buf)) => (socket, buf, true),
                None => (self.proxy.open(backend.addr).await?, BytesMut::with_capacity(READ_BUFFER), false),
            };
            let head = match tokio::time::timeout_at(deadline, ask.send(&mut socket, &mut buf)).await {
                Ok(Ok(head)) => head,
                // A kept-alive socket the backend had closed: the request did not get there (or,
                // if it did, asking again is harmless).
                Ok(Err(Failure::Unsent)) if reused => continue,
                Ok(Err(Failure::Closed)) if reused && ask.idempotent => continue,
                Ok(Err(Failure::Unsent)) => return Err(Failure::Connect("closed at once".into())),
                Ok(Err(failure)) => return Err(failure),
                Err(_) => return Err(Failure::Timeout),
            };
            let upstream::Head { status, mut headers, framing, keep_alive } = head;
            strip_hop_by_hop(&mut headers);
            let whole = match framing {
                Framing::Length(len) if buf.len() as u64 >= len => Some(len as usize),
                _ => None,
            };
            let body = match whole {
                Some(len) => {
                    // The whole body came with the head: the socket is free before the client
                    // has the answer (and goes back before the count drops, see `Lent`).
                    let data = buf.split_to(len).freeze();
                    if keep_alive && buf.is_empty() {
                        pool.put_socket(socket, buf);
                    }
                    drop(in_flight);
                    ResponseBody(ResponseKind::Page((len > 0).then_some(data)))
                }
                None => ResponseBody(ResponseKind::Plain(Box::new(PlainBody {
                    socket: Some(socket),
                    buf,
                    framing,
                    keep_alive,
                    conn: self.clone(),
                    in_flight: Some(in_flight),
                }))),
            };
            let mut response = Response::new(body);
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            return Ok(response);
        }
    }

    /// One request to one backend, on an idle connection or a new one: the head of the answer,
    /// and the connection to give back once the body has been read. Counted in flight from here.
    async fn exchange(
        &self,
        backend: &Backend,
        mut req: Request<RequestBody>,
        started: u64,
    ) -> Result<(Response<Incoming>, Lent), Failure> {
        let pool = backend.pool();
        let in_flight = InFlight::start(pool);
        let max_idle_ms = self.proxy.settings.idle_timeout.as_millis() as u64;
        loop {
            let (mut sender, reused) = match pool.take(started, max_idle_ms) {
                Some(sender) => (sender, true),
                None => (self.proxy.connect(backend.addr).await?, false),
            };
            // Its last exchange ended; hyper may not have noticed yet.
            if !sender.is_ready() && sender.ready().await.is_err() {
                continue;
            }
            match self.response_head(sender.try_send_request(req), started).await {
                Ok(response) => return Ok((response, Lent { sender, in_flight })),
                // The backend had closed that idle connection: nothing was sent, try another.
                Err(Unsent::Request(request)) if reused => req = *request,
                Err(Unsent::Request(_)) => return Err(Failure::Connect("closed at once".into())),
                Err(Unsent::Failed(failure)) => return Err(failure),
            }
        }
    }

    /// Waits for the head of the answer: at most `response_header_timeout` after the request
    /// body last moved (time the client takes to send it does not count).
    async fn response_head(
        &self,
        response: impl Future<Output = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<RequestBody>>>>,
        started: u64,
    ) -> Result<Response<Incoming>, Unsent> {
        let timeout = self.proxy.settings.response_header_timeout;
        tokio::pin!(response);
        let mut since = started;
        loop {
            tokio::select! {
                biased;
                result = &mut response => return result.map_err(|mut e| match e.take_message() {
                    Some(request) => Unsent::Request(Box::new(request)),
                    None => Unsent::Failed(Failure::from(e.into_error())),
                }),
                () = tokio::time::sleep_until(instant_at(since) + timeout) => {
                    let progress = self.body_progress.load(Relaxed);
                    if self.request_waiting_since.load(Relaxed) != 0 {
                        // The client's turn: the watchdog deals with a client that stalls.
                        since = now_ms();
                    } else if progress > since {
                        since = progress;
                    } else {
                        return Err(Unsent::Failed(Failure::Timeout));
                    }
                }
            }
        }
    }
}

/// A request without a body, as [`ConnState::exchange_plain`] sends it.
struct Ask<'a> {
    /// The request head, serialized.
    head: &'a [u8],
    /// A HEAD request: the answer has no body.
    to_head: bool,
    idempotent: bool,
}

impl Ask<'_> {
    /// Writes the request to a backend and reads the head of its final answer into `buf`
    /// (interim 1xx answers are skipped), leaving there what follows the head.
    async fn send(&self, socket: &mut TcpStream, buf: &mut BytesMut) -> Result<upstream::Head, Failure> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        socket.write_all(self.head).await.map_err(|_| Failure::Unsent)?;
        let mut answered = false;
        loop {
            if !buf.is_empty() {
                match upstream::parse_head(buf, self.to_head).map_err(Failure::Answer)? {
                    Parsed::Final(head, len) => {
                        buf.advance(len);
                        return Ok(head);
                    }
                    Parsed::Interim(len) => {
                        buf.advance(len);
                        answered = true;
                        continue;
                    }
                    Parsed::Partial => {}
                }
            }
            if buf.capacity() - buf.len() < READ_BUFFER / 4 {
                buf.reserve(READ_BUFFER);
            }
            let silent = buf.is_empty() && !answered;
            match socket.read_buf(buf).await {
                Ok(0) | Err(_) if silent => return Err(Failure::Closed),
                Ok(0) => return Err(Failure::Answer(BadResponse::ClosedEarly)),
                Ok(_) => {}
                Err(e) => return Err(Failure::Io(e)),
            }
        }
    }
}

/// What a read from a backend socket asks room for.
const READ_BUFFER: usize = 8 << 10;

/// Notes how an attempt on `backend` went (a backend that refused the connection goes to the
/// back of the line for `backoff`); whether to try the next backend.
fn try_next<T>(backend: &Backend, outcome: &Result<T, Failure>, backoff: Duration) -> bool {
    match outcome {
        Err(Failure::Connect(_)) => {
            let until = now_ms() + backoff.as_millis() as u64;
            backend.backoff_until.store(until, Relaxed);
            true
        }
        Ok(_) => {
            if backend.backoff_until.load(Relaxed) != 0 {
                backend.backoff_until.store(0, Relaxed);
            }
            false
        }
        Err(_) => false,
    }
}

/// Why no response came back from a connection.
enum Unsent {
    /// The connection closed before the request was sent: here it is back.
    Request(Box<Request<RequestBody>>),
    Failed(Failure),
}

/// An HTTP/1.1 upgrade both sides agreed to: the bytes are copied both ways until one closes.
struct Tunnel {
    client: OnUpgrade,
    backend: OnUpgrade,
    /// A tunnel counts as a request in flight to its backend until it closes.
    _in_flight: InFlight,
}

impl Tunnel {
    async fn run(self) -> io::Result<(u64, u64)> {
        let (client, backend) = tokio::try_join!(self.client, self.backend).map_err(io::Error::other)?;
        tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(backend)).await
    }
}

/// Why a request got no answer from a backend.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("the route has no backend")]
    NoBackend,
    /// Nothing was sent.
    #[error("connecting: {0}")]
    Connect(#[source] Box<dyn StdError + Send + Sync>),
    #[error("no response head in time")]
    Timeout,
    #[error("the request body is too large")]
    TooLarge(u64),
    #[error("the client's request body failed")]
    ClientBody,
    #[error("{0}")]
    Backend(#[source] hyper::Error),
    #[error("{0}")]
    Answer(#[source] BadResponse),
    /// Writing the request failed: nothing was sent.
    #[error("the connection was closed before the request was sent")]
    Unsent,
    #[error("the backend closed the connection without answering")]
    Closed,
    #[error("reading the answer: {0}")]
    Io(#[source] io::Error),
}

impl From<hyper::Error> for Failure {
    fn from(error: hyper::Error) -> Failure {
        let mut source: Option<&(dyn StdError + 'static)> = Some(&error);
        while let Some(e) = source {
            match e.downcast_ref::<BodyError>() {
                Some(BodyError::TooLarge(limit)) => return Failure::TooLarge(*limit),
                Some(BodyError::Client(_)) => return Failure::ClientBody,
                _ => source = e.source(),
            }
        }
        Failure::Backend(error)
    }
}

impl Failure {
    fn page(&self, service: &str, settings: &ProxySettings) -> Response<ResponseBody> {
        match self {
            Failure::NoBackend => page(StatusCode::SERVICE_UNAVAILABLE, format!("{service} has no instance running\n")),
            Failure::Connect(_) => page(StatusCode::BAD_GATEWAY, format!("{service} is not answering\n")),
            Failure::Timeout => page(
                StatusCode::GATEWAY_TIMEOUT,
                format!("{service} did not answer within {} s\n", settings.response_header_timeout.as_secs_f64()),
            ),
            Failure::TooLarge(limit) => too_large(*limit),
            Failure::ClientBody => page(StatusCode::BAD_REQUEST, "the request body could not be read\n".into()),
            Failure::Answer(BadResponse::SwitchedUnasked) => {
                page(StatusCode::BAD_GATEWAY, format!("{service} switched protocols unasked\n"))
            }
            Failure::Backend(_) | Failure::Answer(_) | Failure::Unsent | Failure::Closed | Failure::Io(_) => {
                page(StatusCode::BAD_GATEWAY, format!("{service} failed to answer\n"))
            }
        }
    }
}

fn too_large(limit: u64) -> Response<ResponseBody> {
    page(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is larger than the limit of {limit} bytes\n"))
}

/// A plain-text page of the proxy's own.
fn page(status: StatusCode, text: String) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody(ResponseKind::Page(Some(Bytes::from(text)))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(http::header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The host a request is for: the URI's authority (absolute-form) or its one `Host` header,
/// normalized.
fn request_host<B>(req: &Request<B>) -> Result<Cow<'_, str>, &'static str> {
    if let Some(authority) = req.uri().authority() {
        return normalize_host(authority.host()).ok_or("the request URI does not name a valid host\n");
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next().ok_or("the request has no Host header\n")?;
    if hosts.next().is_some() {
        return Err("the request has more than one Host header\n");
    }
    let host = host.to_str().map_err(|_| "the Host header is not a valid host name\n")?;
    normalize_host(host).ok_or("the Host header is not a valid host name\n")
}

/// `App.Example.COM:8080` -> `app.example.com`, `example.com.` -> `example.com`,
/// `[::1]:80` -> `[::1]`; `None` for what is not a host name.
fn normalize_host(raw: &str) -> Option<Cow<'_, str>> {
    let valid_port = |port: &str| port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    let host = if raw.starts_with('[') {
        let end = raw.find(']')?;
        let (literal, rest) = raw.split_at(end + 1);
        let valid = literal[1..end].bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !valid || end < 2 || !(rest.is_empty() || rest.strip_prefix(':').is_some_and(valid_port)) {
            return None;
        }
        literal
    } else {
        let host = match raw.rsplit_once(':') {
            Some((host, port)) if valid_port(port) => host,
            Some(_) => return None,
            None => raw,
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_') {
            return None;
        }
        host
    };
    if host.is_empty() {
        None
    } else if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Marks a request one agent's ingress forwards to another's.
const X_DEPLOYER_HOP: HeaderName = HeaderName::from_static("x-deployer-hop");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE];

/// Removes the hop-by-hop headers and those the `Connection` header names (but never `Host`).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the few headers beats seven lookups.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .filter(|name| *name != HOST)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Whether the request asks to switch protocols (`Connection: upgrade` and an `Upgrade`).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|token| token.trim().eq_ignore_ascii_case("upgrade")))
}

/// How a request's headers change on their way to the backend: no hop-by-hop headers (but the
/// upgrade, when asked), the original `Host`, `X-Forwarded-For`, `-Proto` and `-Host`, and the
/// hop marker when the route goes through another agent.
struct Forwarding<'a> {
    /// The client's address as a header value, made once per connection.
    client_ip: &'a HeaderValue,
    proto: &'a HeaderValue,
    /// The request came from another agent's ingress: the `X-Forwarded-Proto` and `-Host` it
    /// set stand.
    from_peer: bool,
    via_peer: bool,
}

/// More names in a request's `Connection` header than [`Forwarding::write_head`] takes.
const MAX_CONNECTION_TOKENS: usize = 8;

impl Forwarding<'_> {
    /// Changes `headers` as the backend is to get them.
    fn apply(&self, headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
        strip_hop_by_hop(headers);
        if let Some(protocol) = upgrade {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, protocol);
        }
        let chain = if headers.contains_key(X_FORWARDED_FOR) {
            let mut chain = Vec::new();
            for value in headers.get_all(X_FORWARDED_FOR).iter() {
                let value = value.as_bytes().trim_ascii();
                if !value.is_empty() {
                    chain.extend_from_slice(value);
                    chain.extend_from_slice(b", ");
                }
            }
            chain.extend_from_slice(self.client_ip.as_bytes());
            HeaderValue::from_bytes(&chain).unwrap_or_else(|_| self.client_ip.clone())
        } else {
            self.client_ip.clone()
        };
        headers.insert(X_FORWARDED_FOR, chain);
        if self.via_peer {
            headers.insert(X_DEPLOYER_HOP, HeaderValue::from_static("1"));
        } else {
            headers.remove(X_DEPLOYER_HOP);
        }
        if self.from_peer && headers.contains_key(X_FORWARDED_PROTO) && headers.contains_key(X_FORWARDED_HOST) {
            return;
        }
        headers.insert(X_FORWARDED_PROTO, self.proto.clone());
        match headers.get(HOST).cloned() {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }

    /// Appends the request head the backend gets to `out`, as [`Forwarding::apply`] and
    /// [`upstream::write_head`] would make it, without changing the client's header map (whose
    /// new entries would grow it: an allocation and a rehash per request). `false`, with `out`
    /// partly written, when the `Connection` header names more than [`MAX_CONNECTION_TOKENS`]
    /// headers: then `apply` it is.
    fn write_head(&self, method: &Method, target: &str, headers: &HeaderMap, out: &mut Vec<u8>) -> bool {
        // The names the `Connection` header lists are dropped with the hop-by-hop ones.
        let mut named = [&[] as &[u8]; MAX_CONNECTION_TOKENS];
        let mut listed = 0;
        for value in headers.get_all(CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if listed == named.len() {
                    return false;
                }
                named[listed] = token.as_bytes();
                listed += 1;
            }
        }
        let named = &named[..listed];
        upstream::write_request_line(method, target, out);
        let (mut forwarded_for, mut forwarded_proto, mut forwarded_host, mut host) = (false, false, false, None);
        for (name, value) in headers {
            if HOP_BY_HOP.contains(name)
                || (*name != HOST && named.iter().any(|n| n.eq_ignore_ascii_case(name.as_str().as_bytes())))
            {
                continue;
            }
            if *name == X_FORWARDED_FOR {
                forwarded_for = true;
            } else if *name == X_FORWARDED_PROTO {
                forwarded_proto = true;
            } else if *name == X_FORWARDED_HOST {
                forwarded_host = true;
            } else if *name != X_DEPLOYER_HOP {
                if *name == HOST && host.is_none() {
                    host = Some(value);
                }
                upstream::write_field(name.as_str(), value.as_bytes(), out);
            }
        }
        // X-Forwarded-For: what came, then this client.
        out.extend_from_slice(b"x-forwarded-for: ");
        if forwarded_for {
            for value in headers.get_all(X_FORWARDED_FOR) {
                let value = value.as_bytes().trim_ascii();
                if !value.is_empty() {
                    out.extend_from_slice(value);
                    out.extend_from_slice(b", ");
                }
            }
        }
        out.extend_from_slice(self.client_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
        if self.via_peer {
            upstream::write_field(X_DEPLOYER_HOP.as_str(), b"1", out);
        }
        if self.from_peer && forwarded_proto && forwarded_host {
            for name in [X_FORWARDED_PROTO, X_FORWARDED_HOST] {
                for value in headers.get_all(&name) {
                    upstream::write_field(name.as_str(), value.as_bytes(), out);
                }
            }
        } else {
            upstream::write_field(X_FORWARDED_PROTO.as_str(), self.proto.as_bytes(), out);
            if let Some(host) = host {
                upstream::write_field(X_FORWARDED_HOST.as_str(), host.as_bytes(), out);
            }
        }
        out.extend_from_slice(b"\r\n");
        true
    }
}

/// Milliseconds since the first call, never 0 (0 means "not set" in the state above).
fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

fn instant_at(ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(*epoch() + Duration::from_millis(ms.saturating_sub(1)))
}

fn epoch() -> &'static Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now)
}

/// Why a body stopped.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the request body is larger than {0} bytes")]
    TooLarge(u64),
    #[error("reading the request body: {0}")]
    Client(#[source] hyper::Error),
    #[error("reading the response body: {0}")]
    Backend(#[source] hyper::Error),
    #[error("reading the response body: {0}")]
    Answer(#[source] BadResponse),
    #[error("reading the response body: {0}")]
    BackendIo(#[source] io::Error),
}

/// The client's request body on its way to the backend: counted against the limit as it streams,
/// and telling the connection when it waits for the client and when it moves.
struct RequestBody {
    inner: Option<Incoming>,
    limit: u64,
    seen: u64,
    conn: Option<Arc<ConnState>>,
}

impl RequestBody {
    fn empty() -> RequestBody {
        RequestBody { inner: None, limit: 0, seen: 0, conn: None }
    }

    fn streaming(body: Incoming, limit: u64, conn: Arc<ConnState>) -> RequestBody {
        RequestBody { inner: Some(body), limit, seen: 0, conn: Some(conn) }
    }

    fn finished(&mut self) {
        self.moved();
        self.inner = None;
        if let Some(conn) = &self.conn {
            conn.request_body_open.store(false, Relaxed);
        }
    }

    fn moved(&self) {
        if let Some(conn) = &self.conn {
            conn.body_progress.store(now_ms(), Relaxed);
            if conn.request_waiting_since.load(Relaxed) != 0 {
                conn.request_waiting_since.store(0, Relaxed);
            }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.seen > self.limit {
            return Poll::Ready(Some(Err(BodyError::TooLarge(self.limit))));
        }
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        match polled {
            Poll::Pending => {
                if let Some(conn) = &self.conn {
                    if conn.request_waiting_since.load(Relaxed) == 0 {
                        conn.request_waiting_since.store(now_ms(), Relaxed);
                    }
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                self.finished();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.moved();
                Poll::Ready(Some(Err(BodyError::Client(e))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                self.moved();
                if let Some(data) = frame.data_ref() {
                    self.seen += data.len() as u64;
                    if self.seen > self.limit {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(self.limit))));
                    }
                }
                // hyper stops polling a body of known length at its last byte.
                if self.inner.as_ref().is_some_and(Body::is_end_stream) {
                    self.finished();
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(conn) = &self.conn {
            conn.request_waiting_since.store(0, Relaxed);
            if self.inner.as_ref().is_some_and(|body| !body.is_end_stream()) {
                conn.unread_body.store(true, Relaxed);
            }
        }
    }
}

/// What the proxy answers with: a page of its own or the backend's body, streamed.
struct ResponseBody(ResponseKind);

enum ResponseKind {
    /// A body known whole: a page of the proxy's own, or a backend's that came with its head.
    Page(Option<Bytes>),
    /// Through hyper's client.
    Backend { body: Incoming, conn: Arc<ConnState>, lent: Option<Lent> },
    /// Read from a plain socket (see [`upstream`]).
    Plain(Box<PlainBody>),
}

/// A response body read from a backend socket as the client takes it.
struct PlainBody {
    /// Until the body has ended.
    socket: Option<TcpStream>,
    /// Read and not yet given.
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    conn: Arc<ConnState>,
    in_flight: Option<InFlight>,
}

impl PlainBody {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            match self.framing.step(&mut self.buf) {
                Ok(Step::Data(data)) => {
                    if self.framing.is_done() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::End) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => return Poll::Ready(Some(Err(self.fail(BodyError::Answer(e))))),
            }
            let Some(socket) = &self.socket else { return Poll::Ready(None) };
            if self.buf.capacity() - self.buf.len() < READ_BUFFER / 4 {
                self.buf.reserve(READ_BUFFER);
            }
            match socket.try_read_buf(&mut self.buf) {
                Ok(0) => match self.framing.closed() {
                    Ok(()) => {
                        self.keep_alive = false;
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Err(e) => return Poll::Ready(Some(Err(self.fail(BodyError::Answer(e))))),
                },
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = ready!(socket.poll_read_ready(cx)) {
                        return Poll::Ready(Some(Err(self.fail(BodyError::BackendIo(e)))));
                    }
                }
                Err(e) => return Poll::Ready(Some(Err(self.fail(BodyError::BackendIo(e))))),
            }
        }
    }

    /// The body has ended: the socket goes back to its pool if the backend keeps it open and
    /// sent nothing after the body (before the count drops, see `Lent`).
    fn finish(&mut self) {
        let socket = self.socket.take();
        if let (Some(socket), Some(in_flight)) = (socket, &self.in_flight) {
            if self.keep_alive && self.buf.is_empty() {
                in_flight.0.put_socket(socket, std::mem::take(&mut self.buf));
            }
        }
        self.in_flight = None;
    }

    /// The body cannot go on: the socket is closed.
    fn fail(&mut self, error: BodyError) -> BodyError {
        self.socket = None;
        self.in_flight = None;
        self.framing = Framing::Done;
        error
    }
}

impl ResponseBody {
    fn empty() -> ResponseBody {
        ResponseBody(ResponseKind::Page(None))
    }

    fn backend(body: Incoming, conn: Arc<ConnState>, lent: Lent) -> ResponseBody {
        ResponseBody(ResponseKind::Backend { body, conn, lent: Some(lent) })
    }

    /// Ends the exchange: the backend connection goes back to its pool if the exchange ended
    /// cleanly (the whole response read, the whole request sent), and stops counting in flight.
    fn release(&mut self) {
        if let ResponseKind::Backend { body, conn, lent } = &mut self.0 {
            if let Some(lent) = lent.take() {
                if body.is_end_stream() && !conn.request_body_open.load(Relaxed) {
                    lent.give_back();
                }
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.0 {
            ResponseKind::Page(text) => Poll::Ready(text.take().map(|text| Ok(Frame::data(text)))),
            ResponseKind::Plain(body) => {
                let polled = body.poll(cx);
                body.conn.waited(polled)
            }
            ResponseKind::Backend { body, conn, lent } => {
                let frame = ready!(conn.waited(Pin::new(body).poll_frame(cx)));
                if frame.is_none() && !conn.request_body_open.load(Relaxed) {
                    if let Some(lent) = lent.take() {
                        lent.give_back();
                    }
                }
                Poll::Ready(frame.map(|frame| frame.map_err(BodyError::Backend)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            ResponseKind::Page(text) => text.is_none(),
            ResponseKind::Backend { body, .. } => body.is_end_stream(),
            ResponseKind::Plain(body) => body.framing.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            ResponseKind::Page(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
            ResponseKind::Backend { body, .. } => body.size_hint(),
            ResponseKind::Plain(body) => body.framing.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Bodies known to be empty or complete are not always polled to their end.
        self.release();
        match &self.0 {
            ResponseKind::Backend { conn, .. } => conn.response_waiting_since.store(0, Relaxed),
            ResponseKind::Plain(body) => body.conn.response_waiting_since.store(0, Relaxed),
            ResponseKind::Page(_) => {}
        }
    }
}

/// A response as hyper writes it to the client: its body, then the mark that the request has been
/// answered, dropped once hyper has taken the whole body (the watchdog then times the wait for the
/// next request head).
struct Answer {
    body: ResponseBody,
    _answered: Answered,
}

struct Answered(Arc<ConnState>);

impl Drop for Answered {
    fn drop(&mut self) {
        self.0.answering.store(false, Relaxed);
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's socket (TCP, or TLS over it), telling the connection's watchdog when writes block
/// and, in a tunnel, when bytes move.
struct ClientIo<S> {
    stream: S,
    state: Arc<ConnState>,
}

impl<S> ClientIo<S> {
    fn read_or_wrote(&self) {
        if self.state.tunnelling.load(Relaxed) {
            self.state.last_io.store(now_ms(), Relaxed);
        }
    }

    fn write_polled<T>(&self, polled: &Poll<io::Result<T>>) {
        let blocked = &self.state.write_blocked_since;
        match polled {
            Poll::Pending => {
                if blocked.load(Relaxed) == 0 {
                    blocked.store(now_ms(), Relaxed);
                }
            }
            Poll::Ready(_) => {
                if blocked.load(Relaxed) != 0 {
                    blocked.store(0, Relaxed);
                }
                self.read_or_wrote();
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if polled.is_ready() {
            self.read_or_wrote();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.write_polled(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.write_polled(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TLS holds written bytes back until a flush gets them out: a flush blocks as a write does.
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.write_polled(&polled);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// How long a connection closed before its request body was read keeps reading, so that the
/// client sees the answer (a 413, say) rather than a reset for the bytes it was still sending.
const LINGER: Duration = Duration::from_secs(2);

async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sink = vec![0; 16 << 10];
    let _ = tokio::time::timeout(LINGER, async {
        // Over TLS, a close_notify to flush first: it may block too.
        let _ = stream.shutdown().await;
        while let Ok(1..) = stream.read(&mut sink).await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{mpsc, oneshot, Notify};
    use tokio_tungstenite::tungstenite::Message;

    /// What a test backend saw; shared with the test.
    #[derive(Default)]
    struct Seen {
        connections: AtomicUsize,
        requests: AtomicUsize,
        body_bytes: AtomicU64,
        /// Notified at the first byte of a request body.
        body_started: Notify,
        /// Lets `/drip` send its second part.
        release: Notify,
    }

    /// A hyper backend that answers with its name and what it got (`key=value` lines, headers as
    /// `header:<name>=<value>`); `/slow` waits 500 ms first, `/bytes/<n>` streams n bytes of
    /// [`pattern`], `/drip` sends `first` and then `second` once released.
    struct TestBackend {
        addr: SocketAddr,
        seen: Arc<Seen>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestBackend {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    type TestBody = BoxBody<Bytes, Infallible>;

    async fn backend(name: &'static str) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Relaxed);
                let seen = shared.clone();
                let service = hyper::service::service_fn(move |req| answer(name, seen.clone(), req));
                connections
                    .spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades());
            }
        });
        TestBackend { addr, seen, task }
    }

    async fn answer(name: &str, seen: Arc<Seen>, req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
        seen.requests.fetch_add(1, Relaxed);
        let path = req.uri().path().to_string();
        if let Some(n) = path.strip_prefix("/bytes/") {
            let total: usize = n.parse().unwrap();
            let chunks = (0..total)
                .step_by(64 << 10)
                .map(move |at| Ok::<_, Infallible>(Frame::data(Bytes::from(pattern(at, (64 << 10).min(total - at))))));
            return Ok(Response::new(BodyExt::boxed(StreamBody::new(futures::stream::iter(chunks)))));
        }
        if path == "/drip" {
            let parts = futures::stream::unfold(0, move |step| {
                let seen = seen.clone();
                async move {
                    match step {
                        0 => Some((Ok::<_, Infallible>(Frame::data(Bytes::from("first\n"))), 1)),
                        1 => {
                            seen.release.notified().await;
                            Some((Ok(Frame::data(Bytes::from("second\n"))), 2))
                        }
                        _ => None,
                    }
                }
            });
            return Ok(Response::new(BodyExt::boxed(StreamBody::new(parts))));
        }
        if path == "/slow" {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut text = format!("backend={name}\nmethod={}\nuri={}\n", req.method(), req.uri());
        for (header, value) in req.headers() {
            text.push_str(&format!("header:{header}={}\n", value.to_str().unwrap_or("?")));
        }
        let mut body = req.into_body();
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut length = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Ok(Response::new(Full::new(Bytes::from("body broke\n")).boxed()));
            };
            if let Some(data) = frame.data_ref() {
                if length == 0 {
                    seen.body_started.notify_one();
                }
                length += data.len() as u64;
                seen.body_bytes.fetch_add(data.len() as u64, Relaxed);
                digest.update(data);
            }
        }
        text.push_str(&format!("body-len={length}\nbody-sha256={}\n", hex::encode(digest.finish())));
        Ok(Response::new(Full::new(Bytes::from(text)).boxed()))
    }

    /// Deterministic bytes, so both ends can check a large body.
    fn pattern(at: usize, len: usize) -> Vec<u8> {
        (at..at + len).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
    }

    fn sha256(data: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
    }

    fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
        text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
    }

    struct RunningProxy {
        addr: SocketAddr,
        proxy: Arc<Proxy>,
        stop: Option<oneshot::Sender<()>>,
        task: Option<tokio::task::JoinHandle<()>>,
    }

    impl Drop for RunningProxy {
        fn drop(&mut self) {
            if let Some(task) = &self.task {
                task.abort();
            }
        }
    }

    fn route(host: &str, service: &str, backends: &[SocketAddr]) -> Route {
        Route { host: host.into(), service: service.into(), backends: backends.to_vec(), via_peer: false }
    }

    async fn start(settings: ProxySettings, routes: Vec<Route>) -> RunningProxy {
        start_as(Scheme::Http, settings, routes).await
    }

    /// An HTTPS proxy, with no certificate yet.
    async fn start_tls(settings: ProxySettings, routes: Vec<Route>) -> RunningProxy {
        start_as(Scheme::Https, settings, routes).await
    }

    async fn start_as(scheme: Scheme, settings: ProxySettings, routes: Vec<Route>) -> RunningProxy {
        let proxy = Proxy::new(settings);
        proxy.set_routes(RouteTable::new(routes));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = match scheme {
            Scheme::Http => tokio::spawn(proxy.clone().serve(listener, shutdown)),
            Scheme::Https => tokio::spawn(proxy.clone().serve_tls(listener, shutdown)),
        };
        RunningProxy { addr, proxy, stop: Some(stop), task: Some(task) }
    }

    /// A certificate authority of the tests' own, and clients that trust only it.
    struct TestCa {
        issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl TestCa {
        fn new() -> TestCa {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
            params.distinguished_name.push(rcgen::DnType::CommonName, "Deployer test CA");
            let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
            TestCa { issuer }
        }

        /// A leaf certificate for `names`, with its key.
        fn certify(&self, names: &[&str]) -> CertifiedHost {
            let key = rcgen::KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
            let cert = rcgen::CertificateParams::new(names.clone()).unwrap().signed_by(&key, &*self.issuer).unwrap();
            CertifiedHost { names, cert_chain_pem: cert.pem(), key_pem: key.serialize_pem(), redirect: true }
        }

        fn connector(&self) -> tokio_rustls::TlsConnector {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.issuer.der().clone()).unwrap();
            let mut config =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(config))
        }
    }

    /// Sends one request over HTTPS on a new connection, `sni` naming the server; the error is
    /// the handshake's.
    async fn send_tls<B>(
        addr: SocketAddr,
        ca: &TestCa,
        sni: &str,
        req: Request<B>,
    ) -> Result<Response<Incoming>, io::Error>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let stream = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let tls = ca.connector().connect(name, stream).await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]), "ALPN should settle on HTTP/1.1");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender.send_request(req).await.unwrap())
    }

    async fn get_tls_text(addr: SocketAddr, ca: &TestCa, host: &str, path: &str) -> (StatusCode, String) {
        let response = send_tls(addr, ca, host, get(host, path)).await.unwrap();
        (response.status(), text(response).await)
    }

    /// Sends one request on a new connection.
    async fn send<B>(addr: SocketAddr, req: Request<B>) -> Response<Incoming>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender.send_request(req).await.unwrap()
    }

    fn get(host: &str, path: &str) -> Request<Empty<Bytes>> {
        Request::builder().uri(path).header(HOST, host).body(Empty::new()).unwrap()
    }

    async fn text(response: Response<Incoming>) -> String {
        String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    async fn get_text(addr: SocketAddr, host: &str, path: &str) -> (StatusCode, String) {
        let response = send(addr, get(host, path)).await;
        (response.status(), text(response).await)
    }

    /// Writes `request` on a new connection and reads until the proxy closes it.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    async fn wait_until(what: &str, condition: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A port nothing listens on.
    async fn closed_port() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
    }

    #[test]
    fn host_names_are_normalized() {
        assert_eq!(normalize_host("App.Example.COM:8080").as_deref(), Some("app.example.com"));
        assert_eq!(normalize_host("example.com.").as_deref(), Some("example.com"));
        assert_eq!(normalize_host("example.com.:80").as_deref(), Some("example.com"));
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("a-b_c.localhost").as_deref(), Some("a-b_c.localhost"));
        for bad in ["", ":80", "a b", "a:b:80", "a:port", "[::1", "[zz]", "a/b", "."] {
            assert_eq!(normalize_host(bad), None, "{bad:?}");
        }
        let table = RouteTable::new(vec![route("Web-Demo.Localhost.", "web", &[])]);
        assert_eq!(table.get("web-demo.localhost:80").map(|r| r.service.as_str()), Some("web"));
        assert_eq!(table.len(), 1);
    }

    #[tokio::test]
    async fn routes_by_host_and_answers_plain_pages() {
        let (a, b) = (backend("a").await, backend("b").await);
        let routes = vec![
            route("a.test", "svc-a", &[a.addr]),
            route("b.test", "svc-b", &[b.addr]),
            route("c.test", "svc-c", &[]),
        ];
        let proxy = start(ProxySettings::default(), routes).await;

        let (status, body) = get_text(proxy.addr, "a.test", "/x?y=1").await;
        assert_eq!((status, field(&body, "backend"), field(&body, "uri")), (StatusCode::OK, Some("a"), Some("/x?y=1")));
        let (status, body) = get_text(proxy.addr, "B.Test:8080", "/").await;
        assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("b")));
        let (_, body) = get_text(proxy.addr, "a.test.", "/").await;
        assert_eq!(field(&body, "backend"), Some("a"));

        let response = send(proxy.addr, get("nowhere.test", "/")).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(text(response).await, "no service answers at nowhere.test\n");

        let (status, body) = get_text(proxy.addr, "c.test", "/").await;
        assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "svc-c has no instance running\n"));

        let answer = raw(proxy.addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.ends_with("the request has no Host header\n"), "{answer}");
        let answer = raw(proxy.addr, b"GET / HTTP/1.0\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.0 400") || answer.starts_with("HTTP/1.1 400"), "{answer}");
        let answer =
            raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        // Absolute-form: the URI names the host.
        let answer =
            raw(proxy.addr, b"GET http://b.test/abs HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(
            (field(&answer, "backend"), field(&answer, "uri"), field(&answer, "header:host")),
            (Some("b"), Some("/abs"), Some("b.test"))
        );
        assert_eq!((a.seen.requests.load(Relaxed), b.seen.requests.load(Relaxed)), (2, 2));
    }

    #[tokio::test]
    async fn balances_round_robin() {
        let (a, b) = (backend("a").await, backend("b").await);
        let proxy = start(ProxySettings::default(), vec![route("rr.test", "rr", &[a.addr, b.addr])]).await;
        let mut answers = Vec::new();
        for _ in 0..10 {
            let (_, body) = get_text(proxy.addr, "rr.test", "/").await;
            answers.push(field(&body, "backend").unwrap().to_string());
        }
        assert_eq!(answers.iter().filter(|name| *name == "a").count(), 5, "{answers:?}");
        assert_eq!(answers.iter().filter(|name| *name == "b").count(), 5, "{answers:?}");
        assert_eq!((a.seen.requests.load(Relaxed), b.seen.requests.load(Relaxed)), (5, 5));
    }

    #[tokio::test]
    async fn keeps_backend_connections_alive() {
        let echo = backend("echo").await;
        let proxy = start(ProxySettings::default(), vec![route("pool.test", "pool", &[echo.addr])]).await;
        for _ in 0..10 {
            assert_eq!(get_text(proxy.addr, "pool.test", "/").await.0, StatusCode::OK);
        }
        let upload = Request::post("/").header(HOST, "pool.test").body(Full::new(Bytes::from("x"))).unwrap();
        assert_eq!(send(proxy.addr, upload).await.status(), StatusCode::OK);
        assert_eq!(
            send(proxy.addr, get("pool.test", "/bytes/100000"))
                .await
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .len(),
            100000
        );
        assert_eq!(get_text(proxy.addr, "pool.test", "/").await.0, StatusCode::OK);
        // One connection for the requests without a body, one (through hyper) for the upload.
        assert_eq!((echo.seen.requests.load(Relaxed), echo.seen.connections.load(Relaxed)), (13, 2));
        // A new table naming the same backend keeps its connections.
        proxy.proxy.set_routes(RouteTable::new(vec![route("pool.test", "pool", &[echo.addr])]));
        assert_eq!(get_text(proxy.addr, "pool.test", "/").await.0, StatusCode::OK);
        let upload = Request::post("/").header(HOST, "pool.test").body(Full::new(Bytes::from("y"))).unwrap();
        assert_eq!(send(proxy.addr, upload).await.status(), StatusCode::OK);
        assert_eq!(echo.seen.connections.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn a_kept_alive_connection_the_backend_closed_is_replaced() {
        // Answers one request per connection, as if keep-alive, then closes it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let rude = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let n = counter.fetch_add(1, Relaxed) + 1;
                let mut head = Vec::new();
                let mut buf = [0; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let body = format!("connection {n}");
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        let proxy = start(ProxySettings::default(), vec![route("rude.test", "rude", &[addr])]).await;
        for n in 1..=3 {
            let (status, body) = get_text(proxy.addr, "rude.test", "/").await;
            assert_eq!((status, body), (StatusCode::OK, format!("connection {n}")));
        }
        rude.abort();
    }

    #[tokio::test]
    async fn a_dead_backend_is_skipped_for_requests_that_can_be_retried() {
        let live = backend("live").await;
        let dead = closed_port().await;
        let routes = vec![route("get.test", "svc", &[dead, live.addr]), route("post.test", "svc", &[dead, live.addr])];
        let proxy = start(ProxySettings::default(), routes).await;
        for _ in 0..4 {
            let (status, body) = get_text(proxy.addr, "get.test", "/").await;
            assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("live")));
        }
        // A request with a body is sent once: the first in turn is the dead one.
        let post = || Request::post("/").header(HOST, "post.test").body(Full::new(Bytes::from("data"))).unwrap();
        let response = send(proxy.addr, post()).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(text(response).await, "svc is not answering\n");
        // Now known dead, it goes to the back of the line.
        let response = send(proxy.addr, post()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(field(&text(response).await, "body-len"), Some("4"));
    }

    /// A listener whose accept queue is full, so the kernel drops new SYNs: connecting times out.
    /// The connections that fill the queue are returned to keep it full.
    async fn black_hole() -> (SocketAddr, tokio::net::TcpListener, Vec<TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(stream) => fillers.push(stream.unwrap()),
                Err(_) => return (addr, listener, fillers),
            }
            assert!(fillers.len() < 64, "the accept queue never filled up");
        }
    }

    #[tokio::test]
    async fn no_live_backend_answers_502_within_the_connect_timeout() {
        let settings = ProxySettings { connect_timeout: Duration::from_millis(300), ..ProxySettings::default() };
        let (silent, _listener, _fillers) = black_hole().await;
        let proxy = start(settings, vec![route("dead.test", "gone", &[closed_port().await, silent])]).await;
        let started = Instant::now();
        let (status, body) = get_text(proxy.addr, "dead.test", "/").await;
        let took = started.elapsed();
        assert_eq!((status, body.as_str()), (StatusCode::BAD_GATEWAY, "gone is not answering\n"));
        // Refused at once, then timed out after 300 ms.
        assert!(took >= Duration::from_millis(250) && took < Duration::from_millis(1000), "took {took:?}");
        // Both are now at the back of the line; still tried, still 502.
        let (status, _) = get_text(proxy.addr, "dead.test", "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn a_request_goes_through_at_most_one_other_agent_and_keeps_what_the_first_saw() {
        // This agent forwards `far.test` to another agent (here the echo backend stands in for
        // that agent's ingress) and serves `near.test` itself.
        let peer = backend("peer").await;
        let near = backend("near").await;
        let far = Route { via_peer: true, ..route("far.test", "far", &[peer.addr]) };
        let proxy = start(ProxySettings::default(), vec![far, route("near.test", "near", &[near.addr])]).await;
        // Forwarded: marked, so the other agent will not forward it again.
        let (status, body) = get_text(proxy.addr, "far.test", "/").await;
        assert_eq!((status, field(&body, "header:x-deployer-hop")), (StatusCode::OK, Some("1")));
        // Arriving marked for a route that would forward again: a loop, refused.
        let looped = Request::builder().uri("/").header(HOST, "far.test").header("x-deployer-hop", "1");
        let response = send(proxy.addr, looped.body(Empty::<Bytes>::new()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::LOOP_DETECTED);
        assert_eq!(peer.seen.requests.load(Relaxed), 1);
        // Arriving marked from a peer (the agent's address is a peer's here, loopback): served
        // here with the scheme and host the first agent saw, and without the mark.
        let hopped = Request::builder()
            .uri("/")
            .header(HOST, "near.test")
            .header("x-deployer-hop", "1")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "near.test")
            .header("x-forwarded-for", "203.0.113.9");
        let body = text(send(proxy.addr, hopped.body(Empty::<Bytes>::new()).unwrap()).await).await;
        assert_eq!(field(&body, "backend"), Some("near"));
        assert_eq!(field(&body, "header:x-forwarded-proto"), Some("https"));
        assert_eq!(field(&body, "header:x-forwarded-for"), Some("203.0.113.9, 127.0.0.1"));
        assert_eq!(field(&body, "header:x-deployer-hop"), None);
        // Without the mark, a client's own X-Forwarded-Proto is not believed.
        let spoofed = Request::builder().uri("/").header(HOST, "near.test").header("x-forwarded-proto", "https");
        let body = text(send(proxy.addr, spoofed.body(Empty::<Bytes>::new()).unwrap()).await).await;
        assert_eq!(field(&body, "header:x-forwarded-proto"), Some("http"));
    }

    #[tokio::test]
    async fn forwards_with_x_forwarded_headers_and_without_hop_by_hop_ones() {
        let echo = backend("echo").await;
        let proxy = start(ProxySettings::default(), vec![route("echo.test", "echo", &[echo.addr])]).await;
        let request = Request::builder()
            .uri("/h")
            .header(HOST, "Echo.Test:8080")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-proto", "https")
            .header(CONNECTION, "keep-alive, X-Secret-Hop")
            .header("x-secret-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header(TE, "trailers")
            .header("authorization", "Bearer t")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let body = text(send(proxy.addr, request).await).await;
        assert_eq!(field(&body, "header:x-forwarded-for"), Some("203.0.113.7, 127.0.0.1"));
        assert_eq!(field(&body, "header:x-forwarded-proto"), Some("http"));
        assert_eq!(field(&body, "header:x-forwarded-host"), Some("Echo.Test:8080"));
        assert_eq!(field(&body, "header:host"), Some("Echo.Test:8080"));
        assert_eq!(field(&body, "header:authorization"), Some("Bearer t"));
        for gone in
            ["connection", "x-secret-hop", "keep-alive", "proxy-connection", "te", "upgrade", "transfer-encoding"]
        {
            assert_eq!(field(&body, &format!("header:{gone}")), None, "{gone} was forwarded:\n{body}");
        }
    }

    /// The head written straight from the client's headers says what the changed map does, on
    /// requests with and without each kind of header that is dropped, replaced or kept.
    #[test]
    fn a_head_written_from_the_client_headers_matches_the_changed_map() {
        let client_ip = HeaderValue::from_static("198.51.100.2");
        let proto = HeaderValue::from_static("https");
        let cases: &[&[(&str, &str)]] = &[
            &[("host", "a.test")],
            &[],
            &[("host", "a.test"), ("x-forwarded-for", "203.0.113.7"), ("x-forwarded-for", " , 10.0.0.1 ")],
            &[("host", "a.test"), ("connection", "keep-alive, X-Secret, host"), ("x-secret", "1"), ("te", "trailers")],
            &[("host", "a.test"), ("connection", "x-forwarded-for"), ("x-forwarded-for", "203.0.113.7")],
            &[("host", "a.test"), ("x-forwarded-proto", "http"), ("x-forwarded-host", "b.test"), ("accept", "*/*")],
            &[("host", "a.test"), ("x-forwarded-proto", "http")],
            &[("host", "a.test"), ("x-deployer-hop", "1"), ("keep-alive", "timeout=5"), ("proxy-connection", "x")],
            &[("host", "a.test"), ("connection", "close"), ("cookie", "a=1"), ("cookie", "b=2")],
            &[("host", "a.test"), ("host", "b.test")],
        ];
        let mut compared = 0;
        for headers in cases {
            let map: HeaderMap = headers
                .iter()
                .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                .fold(HeaderMap::new(), |mut map, (n, v)| {
                    map.append(n, v);
                    map
                });
            for (from_peer, via_peer) in [(false, false), (true, false), (false, true), (true, true)] {
                let forwarding = Forwarding { client_ip: &client_ip, proto: &proto, from_peer, via_peer };
                let mut direct = Vec::new();
                assert!(forwarding.write_head(&Method::GET, "/p?q=1", &map, &mut direct));
                let mut changed = map.clone();
                forwarding.apply(&mut changed, None);
                let mut expected = Vec::new();
                upstream::write_head(&Method::GET, "/p?q=1", &changed, &mut expected);
                let lines = |head: &[u8]| {
                    let text = String::from_utf8(head.to_vec()).unwrap();
                    assert!(text.starts_with("GET /p?q=1 HTTP/1.1\r\n") && text.ends_with("\r\n\r\n"), "{text}");
                    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
                    lines.sort();
                    lines
                };
                assert_eq!(lines(&direct), lines(&expected), "{headers:?}, from_peer {from_peer}, via_peer {via_peer}");
                compared += 1;
            }
        }
        assert_eq!(compared, cases.len() * 4);
        // Too many names in `Connection`: the caller changes the map instead.
        let mut map = HeaderMap::new();
        map.insert(CONNECTION, HeaderValue::from_static("a, b, c, d, e, f, g, h, i"));
        let forwarding = Forwarding { client_ip: &client_ip, proto: &proto, from_peer: false, via_peer: false };
        assert!(!forwarding.write_head(&Method::GET, "/", &map, &mut Vec::new()));
    }

    #[tokio::test]
    async fn streams_request_bodies() {
        let echo = backend("echo").await;
        let proxy = start(ProxySettings::default(), vec![route("up.test", "up", &[echo.addr])]).await;
        let data = Bytes::from(pattern(0, 20 << 20));
        let request = Request::put("/big").header(HOST, "up.test").body(Full::new(data.clone())).unwrap();
        let body = text(send(proxy.addr, request).await).await;
        assert_eq!(field(&body, "body-len"), Some("20971520"));
        assert_eq!(field(&body, "body-sha256"), Some(sha256(&data).as_str()));

        // Chunked, and the backend sees the first chunk before the client sends the rest.
        let (chunks, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let request = Request::post("/chunked").header(HOST, "up.test").body(body).unwrap();
        let started = echo.seen.body_started.notified();
        let response = tokio::spawn(send(proxy.addr, request));
        chunks.send(Ok(Frame::data(Bytes::from("hello ")))).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), started).await.expect("the first chunk was held back");
        chunks.send(Ok(Frame::data(Bytes::from("world")))).await.unwrap();
        drop(chunks);
        let body = text(response.await.unwrap()).await;
        assert_eq!(field(&body, "body-len"), Some("11"));
        assert_eq!(field(&body, "body-sha256"), Some(sha256(b"hello world").as_str()));
    }

    #[tokio::test]
    async fn streams_response_bodies() {
        let echo = backend("echo").await;
        let proxy = start(ProxySettings::default(), vec![route("down.test", "down", &[echo.addr])]).await;
        let response = send(proxy.addr, get("down.test", "/bytes/20971520")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 20 << 20);
        assert_eq!(sha256(&body), sha256(&pattern(0, 20 << 20)));

        // The first part arrives while the backend still holds the second.
        let mut body = send(proxy.addr, get("down.test", "/drip")).await.into_body();
        let first =
            tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("the first part was held back");
        assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "first\n");
        echo.seen.release.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "second\n");
    }

    #[tokio::test]
    async fn a_request_body_over_the_limit_gets_413() {
        let echo = backend("echo").await;
        let settings = ProxySettings { max_request_body: 1 << 20, ..ProxySettings::default() };
        let proxy = start(settings, vec![route("limit.test", "limit", &[echo.addr])]).await;

        // Declared too large: refused before any backend hears of it.
        let request =
            Request::post("/").header(HOST, "limit.test").body(Full::new(Bytes::from(vec![7; 2 << 20]))).unwrap();
        let response = send(proxy.addr, request).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(text(response).await, "the request body is larger than the limit of 1048576 bytes\n");
        assert_eq!(echo.seen.requests.load(Relaxed), 0);

        // Chunked: counted as it streams, cut at the limit; the client still gets the answer.
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        let sender = tokio::spawn(async move {
            let head = "POST /up HTTP/1.1\r\nHost: limit.test\r\nTransfer-Encoding: chunked\r\n\r\n";
            writer.write_all(head.as_bytes()).await?;
            let chunk = [format!("{:x}\r\n", 64 << 10).into_bytes(), vec![b'x'; 64 << 10], b"\r\n".to_vec()].concat();
            for _ in 0..64 {
                writer.write_all(&chunk).await?;
            }
            writer.write_all(b"0\r\n\r\n").await
        });
        // Even a client that sends it all before reading gets the answer, not a reset.
        let _ = tokio::time::timeout(Duration::from_secs(10), sender).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0; 4096];
            while !answer.ends_with(b"bytes\n") {
                let n = reader.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the answer: {:?}", String::from_utf8_lossy(&answer));
                answer.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert_eq!(echo.seen.requests.load(Relaxed), 1);
        assert!(
            echo.seen.body_bytes.load(Relaxed) <= 1 << 20,
            "the backend got {} bytes",
            echo.seen.body_bytes.load(Relaxed)
        );
    }

    #[tokio::test]
    async fn tunnels_websockets() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ws_backend = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            while let Some(Ok(message)) = ws.next().await {
                if message.is_text() || message.is_binary() {
                    ws.send(message).await.unwrap();
                }
            }
        });
        let proxy = start(ProxySettings::default(), vec![route("ws.test", "ws", &[addr])]).await;
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut ws, response) = tokio_tungstenite::client_async("ws://ws.test/chat", stream).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        let big = Message::binary(pattern(0, 200 << 10));
        ws.send(big.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), big);
        // An open tunnel is a request in flight to its backend.
        assert_eq!(proxy.proxy.in_flight(&[addr]), 1);
        ws.close(None).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), ws_backend).await.unwrap().unwrap();
        // The tunnel lasts until both sides have closed.
        drop(ws);
        wait_until("the closed tunnel is no longer counted", || proxy.proxy.in_flight(&[addr]) == 0).await;
    }

    #[tokio::test]
    async fn set_routes_lets_routed_requests_finish_on_the_old_backend() {
        let (old, new) = (backend("old").await, backend("new").await);
        let proxy = start(ProxySettings::default(), vec![route("swap.test", "swap", &[old.addr])]).await;
        let addr = proxy.addr;
        let in_flight = tokio::spawn(async move { get_text(addr, "swap.test", "/slow").await });
        wait_until("the old backend has the request", || old.seen.requests.load(Relaxed) == 1).await;
        proxy.proxy.set_routes(RouteTable::new(vec![route("swap.test", "swap", &[new.addr])]));
        let (_, body) = get_text(proxy.addr, "swap.test", "/").await;
        assert_eq!(field(&body, "backend"), Some("new"));
        assert!(!in_flight.is_finished(), "the slow request should still be in flight");
        let (status, body) = in_flight.await.unwrap();
        assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("old")));
        assert_eq!(proxy.proxy.routes().get("swap.test").unwrap().backends, vec![new.addr]);
    }

    #[tokio::test]
    async fn a_slow_client_is_cut_off_while_others_are_served() {
        let echo = backend("echo").await;
        let settings = ProxySettings { request_header_timeout: Duration::from_millis(500), ..ProxySettings::default() };
        let proxy = start(settings, vec![route("slow.test", "slow", &[echo.addr])]).await;
        let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: slo").await.unwrap();
        let started = Instant::now();
        let (status, _) = get_text(proxy.addr, "slow.test", "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(started.elapsed() < Duration::from_millis(400), "the other client waited {:?}", started.elapsed());
        let mut buf = [0; 1024];
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await.expect("never cut off");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(2), "cut off after {waited:?}");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
        let echo = backend("echo").await;
        let settings = ProxySettings { request_header_timeout: Duration::from_millis(300), ..ProxySettings::default() };
        let proxy = start(settings, vec![route("idle.test", "idle", &[echo.addr])]).await;
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        let conn = tokio::spawn(conn);
        let response = sender.send_request(get("idle.test", "/")).await.unwrap();
        assert_eq!(text(response).await.lines().next(), Some("backend=echo"));
        let idle_since = Instant::now();
        // hyper arms its header timer as soon as the connection goes idle.
        tokio::time::timeout(Duration::from_secs(5), conn).await.expect("never closed").unwrap().unwrap();
        let idle = idle_since.elapsed();
        assert!(idle >= Duration::from_millis(250) && idle < Duration::from_secs(2), "closed after {idle:?}");
    }

    #[tokio::test]
    async fn oversized_request_heads_get_431() {
        let echo = backend("echo").await;
        let settings = ProxySettings { max_header_bytes: 16 << 10, ..ProxySettings::default() };
        let proxy = start(settings, vec![route("big.test", "big", &[echo.addr])]).await;
        let request = format!("GET / HTTP/1.1\r\nHost: big.test\r\nX-Big: {}\r\n\r\n", "a".repeat(20 << 10));
        let answer = raw(proxy.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        assert_eq!(echo.seen.requests.load(Relaxed), 0);
        // Just under the limit is fine.
        let request = Request::get("/")
            .header(HOST, "big.test")
            .header("x-big", "a".repeat(15 << 10))
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(send(proxy.addr, request).await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed() {
        let echo = backend("echo").await;
        let settings = ProxySettings { max_connections: 1, ..ProxySettings::default() };
        let proxy = start(settings, vec![route("one.test", "one", &[echo.addr])]).await;
        let held = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(held)).await.unwrap();
        let held = tokio::spawn(conn);
        assert_eq!(sender.send_request(get("one.test", "/")).await.unwrap().status(), StatusCode::OK);

        let mut refused = TcpStream::connect(proxy.addr).await.unwrap();
        let _ = refused.write_all(b"GET / HTTP/1.1\r\nHost: one.test\r\n\r\n").await;
        let mut buf = [0; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf)).await.unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        drop(sender);
        let _ = held.await;
        let answer = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn a_backend_that_stalls_mid_body_is_cut_off() {
        let echo = backend("echo").await;
        let settings = ProxySettings { idle_timeout: Duration::from_millis(300), ..ProxySettings::default() };
        let proxy = start(settings, vec![route("stall.test", "stall", &[echo.addr])]).await;
        let mut body = send(proxy.addr, get("stall.test", "/drip")).await.into_body();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "first\n");
        let started = Instant::now();
        let rest = tokio::time::timeout(Duration::from_secs(5), body.collect()).await.expect("never cut off");
        assert!(rest.is_err(), "the body should end in an error, not look complete");
        assert!(started.elapsed() >= Duration::from_millis(250), "cut off after {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_backend_that_never_answers_gets_504() {
        // Accepts and reads, never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mute = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        });
        let settings =
            ProxySettings { response_header_timeout: Duration::from_millis(300), ..ProxySettings::default() };
        let proxy = start(settings, vec![route("mute.test", "mute", &[addr])]).await;
        let (status, body) = get_text(proxy.addr, "mute.test", "/").await;
        assert_eq!((status, body.as_str()), (StatusCode::GATEWAY_TIMEOUT, "mute did not answer within 0.3 s\n"));
        mute.abort();
    }

    /// The request header timeout bounds the wait for a request, not for its answer: a backend
    /// slower than it is waited for, on a connection that then serves another request.
    #[tokio::test]
    async fn a_slow_answer_is_not_cut_by_the_request_header_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let slow = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            loop {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(Duration::from_millis(700)).await;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        });
        let settings = ProxySettings { request_header_timeout: Duration::from_millis(200), ..ProxySettings::default() };
        let proxy = start(settings, vec![route("slow.test", "slow", &[addr])]).await;
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        let conn = tokio::spawn(conn);
        for _ in 0..2 {
            let response = sender.send_request(get("slow.test", "/")).await.expect("answered, not cut off");
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(text(response).await, "slow");
        }
        // Then idle: cut after the header timeout.
        tokio::time::timeout(Duration::from_secs(5), conn).await.expect("never closed").unwrap().unwrap();
        slow.abort();
    }

    /// A backend speaking raw HTTP/1.1 from a script: the answer for each path, and whether it
    /// closes the connection after it. Returns its address and how many connections it took.
    async fn scripted(script: &'static [(&'static str, &'static [u8], bool)]) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut buf = [0; 4096];
                    loop {
                        let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => pending.extend_from_slice(&buf[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&pending[..end]).into_owned();
                        pending.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or_default().to_string();
                        let Some((_, answer, close)) = script.iter().find(|(p, _, _)| *p == path) else { return };
                        if stream.write_all(answer).await.is_err() || *close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, connections)
    }

    #[tokio::test]
    async fn relays_every_framing_of_a_response_to_a_request_without_body() {
        static SCRIPT: &[(&str, &[u8], bool)] = &[
            ("/length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kind: length\r\n\r\nhello", false),
            (
                "/chunked",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
                false,
            ),
            ("/interim", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
            ("/head", b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", false),
            ("/empty", b"HTTP/1.1 204 No Content\r\n\r\n", false),
            ("/close", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", true),
            ("/bye", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye", true),
        ];
        let (addr, connections) = scripted(SCRIPT).await;
        let proxy = start(ProxySettings::default(), vec![route("raw.test", "raw", &[addr])]).await;
        let response = send(proxy.addr, get("raw.test", "/length")).await;
        assert_eq!(response.headers()["x-kind"], "length");
        assert_eq!(text(response).await, "hello");
        let response = send(proxy.addr, get("raw.test", "/chunked")).await;
        assert!(!response.headers().contains_key("trailer"), "hop-by-hop headers are not passed on");
        assert_eq!(text(response).await, "hello world");
        assert_eq!(get_text(proxy.addr, "raw.test", "/interim").await, (StatusCode::OK, "ok".to_string()));
        let head = Request::head("/head").header(HOST, "raw.test").body(Empty::<Bytes>::new()).unwrap();
        let response = send(proxy.addr, head).await;
        assert_eq!((response.status(), response.headers()["content-length"].as_bytes()), (StatusCode::OK, &b"7"[..]));
        assert_eq!(text(response).await, "");
        assert_eq!(get_text(proxy.addr, "raw.test", "/empty").await, (StatusCode::NO_CONTENT, String::new()));
        assert_eq!(connections.load(Relaxed), 1, "one kept-alive connection so far");
        assert_eq!(get_text(proxy.addr, "raw.test", "/close").await, (StatusCode::OK, "until the end".to_string()));
        assert_eq!(get_text(proxy.addr, "raw.test", "/bye").await, (StatusCode::OK, "bye".to_string()));
        assert_eq!(get_text(proxy.addr, "raw.test", "/length").await, (StatusCode::OK, "hello".to_string()));
        assert_eq!(connections.load(Relaxed), 3, "a connection is not reused after a body that ends with it");
    }

    #[tokio::test]
    async fn a_broken_answer_gets_502_and_a_short_body_is_not_passed_off_as_whole() {
        static SCRIPT: &[(&str, &[u8], bool)] = &[
            ("/garbage", b"SSH-2.0-OpenSSH\r\n\r\n", true),
            ("/switch", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", true),
            ("/lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", true),
            ("/silent", b"", true),
            ("/short", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true),
            ("/bad-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n", true),
            ("/ok", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        ];
        let (addr, _) = scripted(SCRIPT).await;
        let proxy = start(ProxySettings::default(), vec![route("broken.test", "broken", &[addr])]).await;
        for path in ["/garbage", "/lengths", "/silent"] {
            let answer = get_text(proxy.addr, "broken.test", path).await;
            assert_eq!(answer, (StatusCode::BAD_GATEWAY, "broken failed to answer\n".to_string()), "{path}");
        }
        let answer = get_text(proxy.addr, "broken.test", "/switch").await;
        assert_eq!(answer, (StatusCode::BAD_GATEWAY, "broken switched protocols unasked\n".to_string()));
        for path in ["/short", "/bad-chunk"] {
            // Cut off before or after the head, depending on when it was flushed, never whole.
            let stream = TcpStream::connect(proxy.addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            if let Ok(response) = sender.send_request(get("broken.test", path)).await {
                assert!(response.into_body().collect().await.is_err(), "{path}: the body should end in an error");
            }
        }
        assert_eq!(get_text(proxy.addr, "broken.test", "/ok").await, (StatusCode::OK, "ok".to_string()));
    }

    #[tokio::test]
    async fn a_kept_alive_connection_closed_unseen_is_replaced_for_a_get_but_not_for_a_post() {
        // Answers the first request on each connection, then closes it without a word on the
        // next one, as a backend whose keep-alive timeout just ran out.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = [0; 4096];
                    for answered in [false, true] {
                        let mut head = Vec::new();
                        while !head.ends_with(b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        seen.fetch_add(1, Relaxed);
                        if answered {
                            return;
                        }
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                    }
                });
            }
        });
        let proxy = start(ProxySettings::default(), vec![route("flaky.test", "flaky", &[addr])]).await;
        assert_eq!(get_text(proxy.addr, "flaky.test", "/").await, (StatusCode::OK, "ok".to_string()));
        assert_eq!(get_text(proxy.addr, "flaky.test", "/").await, (StatusCode::OK, "ok".to_string()));
        assert_eq!(requests.load(Relaxed), 3, "the GET was sent again on a new connection");
        let post = Request::post("/").header(HOST, "flaky.test").body(Empty::<Bytes>::new()).unwrap();
        let response = send(proxy.addr, post).await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "a POST the backend may have seen is not sent twice");
        assert_eq!(requests.load(Relaxed), 4);
    }

    #[tokio::test]
    async fn threads_are_dealt_connections_in_turn() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = Arc::new(Semaphore::new(16));
        let (inboxes, mut receivers): (Vec<_>, Vec<_>) = (0..3).map(|_| tokio::sync::mpsc::unbounded_channel()).unzip();
        let inboxes: Arc<[Inbox]> = inboxes.into();
        let dealt = Arc::new(AtomicUsize::new(0));
        let mut balances: Vec<Balance> = receivers
            .drain(..)
            .enumerate()
            .map(|(me, inbox)| Balance { me, inboxes: inboxes.clone(), inbox, dealt: dealt.clone() })
            .collect();
        let mut clients = Vec::new();
        let mut served = Vec::new();
        // Thread 0 accepts all nine: it keeps every third and hands the others on in turn.
        for _ in 0..9 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (stream, peer) = listener.accept().await.unwrap();
            let permit = limit.clone().try_acquire_owned().unwrap();
            served.extend(balances[0].deal((stream, peer, permit)));
        }
        assert_eq!(served.len(), 3);
        for balance in &mut balances[1..] {
            for _ in 0..3 {
                let accepted = balance.inbox.try_recv().expect("a connection dealt").adopt().unwrap();
                assert_eq!(accepted.0.peer_addr().unwrap(), accepted.1);
                served.push(accepted);
            }
            assert!(balance.inbox.try_recv().is_err(), "more than its turn");
        }
        // Dealt connections still hold their place under the connection limit.
        assert_eq!(limit.available_permits(), 16 - 9);
        drop(served);
        // A thread that has stopped gets none: the dealer serves its turn itself.
        drop(balances.pop());
        let mut back = 0;
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (stream, peer) = listener.accept().await.unwrap();
            let permit = limit.clone().try_acquire_owned().unwrap();
            if balances[0].deal((stream, peer, permit)).is_some() {
                back += 1;
            }
        }
        assert_eq!(back, 2, "its own turn and the stopped thread's");
    }

    #[tokio::test]
    async fn serves_on_threads_of_its_own() {
        let (a, b) = (backend("a").await, backend("b").await);
        let proxy = Proxy::new(ProxySettings::default());
        proxy.set_routes(RouteTable::new(vec![route("t.test", "t", &[a.addr])]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(proxy.clone().serve_threads(listener, 2, async move {
            let _ = stopped.await;
        }));
        for _ in 0..8 {
            let (status, body) = get_text(addr, "t.test", "/").await;
            assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("a")));
        }
        proxy.set_routes(RouteTable::new(vec![route("t.test", "t", &[b.addr])]));
        for _ in 0..4 {
            assert_eq!(field(&get_text(addr, "t.test", "/").await.1, "backend"), Some("b"));
        }
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), serving).await.unwrap().unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
    }

    #[tokio::test]
    async fn shutdown_lets_in_flight_requests_finish() {
        let echo = backend("echo").await;
        let mut proxy = start(ProxySettings::default(), vec![route("bye.test", "bye", &[echo.addr])]).await;
        let addr = proxy.addr;
        let in_flight = tokio::spawn(async move { get_text(addr, "bye.test", "/slow").await });
        wait_until("the backend has the request", || echo.seen.requests.load(Relaxed) == 1).await;
        proxy.stop.take().unwrap().send(()).unwrap();
        let (status, body) = in_flight.await.unwrap();
        assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("echo")));
        tokio::time::timeout(Duration::from_secs(5), proxy.task.take().unwrap()).await.unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
    }

    /// The leaf certificate of an entry, as a handshake presents it.
    fn leaf(host: &CertifiedHost) -> rustls::pki_types::CertificateDer<'static> {
        rustls_pemfile::certs(&mut host.cert_chain_pem.as_bytes()).next().unwrap().unwrap()
    }

    #[test]
    fn certificates_match_exact_names_first_then_one_label_wildcards() {
        let ca = TestCa::new();
        let proxy = Proxy::new(ProxySettings::default());
        let wildcard = ca.certify(&["*.apps.test"]);
        let exact = ca.certify(&["App.Test.", "special.apps.test"]);
        assert_eq!(proxy.set_certificates(vec![wildcard.clone(), exact.clone()]), Vec::<String>::new());
        let picked = |name: &str| proxy.certificates.for_name(name).map(|key| key.cert[0].clone());
        assert_eq!(picked("app.test"), Some(leaf(&exact)));
        assert_eq!(picked("APP.test."), Some(leaf(&exact)));
        assert_eq!(picked("special.apps.test"), Some(leaf(&exact)));
        assert_eq!(picked("x.apps.test"), Some(leaf(&wildcard)));
        assert_eq!(picked("X.Apps.Test."), Some(leaf(&wildcard)));
        for uncovered in ["apps.test", "a.b.apps.test", ".apps.test", "other.test", "test"] {
            assert_eq!(picked(uncovered), None, "{uncovered}");
        }

        // Names that are not host names leave their entry out, and the set is replaced whole.
        let named =
            |names: &[&str]| CertifiedHost { names: names.iter().map(|n| n.to_string()).collect(), ..exact.clone() };
        let errors = proxy.set_certificates(vec![
            named(&[]),
            named(&["*.*.test"]),
            named(&["ok.test", "a.*.test"]),
            named(&["app.test:443"]),
            named(&["a..test"]),
        ]);
        assert_eq!(
            errors,
            [
                "the certificate for no host: it names no host",
                "the certificate for *.*.test: \"*.*.test\" is neither a host name nor a one-label wildcard",
                "the certificate for ok.test, a.*.test: \"a.*.test\" is neither a host name nor a one-label wildcard",
                "the certificate for app.test:443: \"app.test:443\" is neither a host name nor a one-label wildcard",
                "the certificate for a..test: \"a..test\" is neither a host name nor a one-label wildcard",
            ]
        );
        assert_eq!((picked("app.test"), picked("ok.test"), picked("x.apps.test")), (None, None, None));
    }

    #[tokio::test]
    async fn terminates_tls_for_exact_and_wildcard_names() {
        let ca = TestCa::new();
        let echo = backend("echo").await;
        let routes = vec![route("app.test", "app", &[echo.addr]), route("x.apps.test", "x", &[echo.addr])];
        let proxy = start_tls(ProxySettings::default(), routes).await;
        assert_eq!(proxy.proxy.set_certificates(vec![ca.certify(&["app.test", "*.apps.test"])]), Vec::<String>::new());
        for host in ["app.test", "x.apps.test"] {
            let (status, body) = get_tls_text(proxy.addr, &ca, host, "/path?q=1").await;
            assert_eq!(
                (status, field(&body, "backend"), field(&body, "uri")),
                (StatusCode::OK, Some("echo"), Some("/path?q=1"))
            );
            assert_eq!(field(&body, "header:x-forwarded-proto"), Some("https"), "{body}");
            assert_eq!(field(&body, "header:host"), Some(host));
        }

        // Bodies stream both ways through TLS.
        let data = Bytes::from(pattern(0, 3 << 20));
        let upload = Request::put("/up").header(HOST, "app.test").body(Full::new(data.clone())).unwrap();
        let body = text(send_tls(proxy.addr, &ca, "app.test", upload).await.unwrap()).await;
        assert_eq!(field(&body, "body-sha256"), Some(sha256(&data).as_str()));
        let download = send_tls(proxy.addr, &ca, "app.test", get("app.test", "/bytes/3145728")).await.unwrap();
        let body = download.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(sha256(&body), sha256(&pattern(0, 3 << 20)));

        // The SNI picks the certificate, the Host header the route.
        let response = send_tls(proxy.addr, &ca, "app.test", get("x.apps.test", "/")).await.unwrap();
        assert_eq!(field(&text(response).await, "header:host"), Some("x.apps.test"));
        let response = send_tls(proxy.addr, &ca, "y.apps.test", get("y.apps.test", "/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(text(response).await, "no service answers at y.apps.test\n");

        // Neither ACME challenges nor redirects on HTTPS: the path goes to the backend.
        proxy.proxy.set_challenges(HashMap::from([("tok".to_string(), "tok.key".to_string())]));
        let (status, body) = get_tls_text(proxy.addr, &ca, "app.test", "/.well-known/acme-challenge/tok").await;
        assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("echo")));
    }

    #[tokio::test]
    async fn a_name_without_a_certificate_fails_the_handshake() {
        let ca = TestCa::new();
        let echo = backend("echo").await;
        let routes = vec![route("app.test", "app", &[echo.addr]), route("other.test", "other", &[echo.addr])];
        let proxy = start_tls(ProxySettings::default(), routes).await;
        assert_eq!(proxy.proxy.set_certificates(vec![ca.certify(&["app.test", "*.apps.test"])]), Vec::<String>::new());
        // No certificate for the name; a wildcard covers one label only; an IP address sends no SNI.
        for sni in ["other.test", "a.b.apps.test", "127.0.0.1"] {
            let handshake = send_tls(proxy.addr, &ca, sni, get("other.test", "/")).await;
            assert!(handshake.is_err(), "the handshake for {sni} succeeded");
        }
        assert_eq!(echo.seen.requests.load(Relaxed), 0);
        assert_eq!(get_tls_text(proxy.addr, &ca, "app.test", "/").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_certificate_that_does_not_parse_is_reported_and_the_others_serve() {
        let ca = TestCa::new();
        let echo = backend("echo").await;
        let proxy = start_tls(ProxySettings::default(), vec![route("app.test", "app", &[echo.addr])]).await;
        let good = ca.certify(&["app.test"]);
        let garbage = CertifiedHost {
            names: vec!["bad.test".into(), "www.bad.test".into()],
            cert_chain_pem: "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n".into(),
            key_pem: good.key_pem.clone(),
            redirect: true,
        };
        let no_certificate =
            CertifiedHost { names: vec!["empty.test".into()], cert_chain_pem: "hello".into(), ..good.clone() };
        let mismatched = CertifiedHost {
            key_pem: rcgen::KeyPair::generate().unwrap().serialize_pem(),
            ..ca.certify(&["mismatch.test"])
        };
        let no_key = CertifiedHost { key_pem: String::new(), ..ca.certify(&["nokey.test"]) };
        let errors = proxy.proxy.set_certificates(vec![garbage, good, no_certificate, mismatched, no_key]);
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(
            errors[0].starts_with("the certificate for bad.test, www.bad.test: the certificate chain is not valid PEM"),
            "{errors:?}"
        );
        assert_eq!(errors[1], "the certificate for empty.test: the certificate chain holds no certificate");
        assert_eq!(errors[2], "the certificate for mismatch.test: the private key does not match the certificate");
        assert_eq!(errors[3], "the certificate for nokey.test: no private key found");

        let (status, body) = get_tls_text(proxy.addr, &ca, "app.test", "/").await;
        assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("echo")));
        for sni in ["bad.test", "mismatch.test"] {
            assert!(send_tls(proxy.addr, &ca, sni, get(sni, "/")).await.is_err(), "{sni} has a certificate");
        }
    }

    #[tokio::test]
    async fn a_stalled_tls_handshake_is_cut_off() {
        let ca = TestCa::new();
        let echo = backend("echo").await;
        let settings = ProxySettings {
            request_header_timeout: Duration::from_millis(300),
            max_connections: 1,
            ..ProxySettings::default()
        };
        let proxy = start_tls(settings, vec![route("app.test", "app", &[echo.addr])]).await;
        proxy.proxy.set_certificates(vec![ca.certify(&["app.test"])]);
        // Connects, holds the only permit, never says hello.
        let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
        let started = Instant::now();
        let mut buf = [0; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await.expect("never cut off");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(2), "cut off after {waited:?}");
        // Its permit is free again.
        assert_eq!(get_tls_text(proxy.addr, &ca, "app.test", "/").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn serves_tls_on_threads_of_its_own() {
        let ca = TestCa::new();
        let echo = backend("echo").await;
        let proxy = Proxy::new(ProxySettings::default());
        proxy.set_routes(RouteTable::new(vec![route("app.test", "app", &[echo.addr])]));
        proxy.set_certificates(vec![ca.certify(&["app.test"])]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(proxy.clone().serve_tls_threads(listener, 2, async move {
            let _ = stopped.await;
        }));
        for _ in 0..4 {
            let (status, body) = get_tls_text(addr, &ca, "app.test", "/").await;
            assert_eq!((status, field(&body, "header:x-forwarded-proto")), (StatusCode::OK, Some("https")));
        }
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), serving).await.unwrap().unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
    }

    #[tokio::test]
    async fn plain_http_redirects_hosts_with_a_certificate_to_https() {
        let ca = TestCa::new();
        let echo = backend("echo").await;
        let routes = vec![
            route("app.test", "app", &[echo.addr]),
            route("x.apps.test", "x", &[echo.addr]),
            route("plain.test", "plain", &[echo.addr]),
        ];
        for (port, suffix) in [(443, ""), (8443, ":8443")] {
            let settings = ProxySettings { https_port: Some(port), ..ProxySettings::default() };
            let proxy = start(settings, routes.clone()).await;
            proxy.proxy.set_certificates(vec![ca.certify(&["app.test", "*.apps.test"])]);
            for (host, path, location) in [
                ("App.Test:80", "/path?q=1", format!("https://app.test{suffix}/path?q=1")),
                ("x.apps.test", "/", format!("https://x.apps.test{suffix}/")),
            ] {
                let response = send(proxy.addr, get(host, path)).await;
                assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
                assert_eq!(response.headers()[LOCATION], location.as_str());
                assert_eq!(text(response).await, format!("moved to {location}\n"));
            }
            // A route without a certificate, and a certificate without a route: no redirect.
            let (status, body) = get_text(proxy.addr, "plain.test", "/p").await;
            assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("echo")));
            // A certificate of a private CA (not asking to redirect): HTTP keeps serving.
            let private = CertifiedHost { redirect: false, ..ca.certify(&["plain.test"]) };
            proxy.proxy.set_certificates(vec![ca.certify(&["app.test", "*.apps.test"]), private]);
            let (status, body) = get_text(proxy.addr, "plain.test", "/p").await;
            assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("echo")));
            assert_eq!(get_text(proxy.addr, "y.apps.test", "/").await.0, StatusCode::NOT_FOUND);
            // An ACME challenge path is never redirected: an unknown token goes to the backend.
            let (status, body) = get_text(proxy.addr, "app.test", "/.well-known/acme-challenge/nope").await;
            assert_eq!((status, field(&body, "uri")), (StatusCode::OK, Some("/.well-known/acme-challenge/nope")));
        }
        // Without an HTTPS port, never.
        let proxy = start(ProxySettings::default(), routes).await;
        proxy.proxy.set_certificates(vec![ca.certify(&["app.test"])]);
        let (status, body) = get_text(proxy.addr, "app.test", "/").await;
        assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("echo")));
    }

    #[tokio::test]
    async fn answers_acme_challenges_for_any_host() {
        let echo = backend("echo").await;
        let settings = ProxySettings { https_port: Some(443), ..ProxySettings::default() };
        let proxy = start(settings, vec![route("app.test", "app", &[echo.addr])]).await;
        proxy.proxy.set_challenges(HashMap::from([("tok-1".to_string(), "tok-1.thumbprint".to_string())]));
        for host in ["unknown.test", "app.test"] {
            let response = send(proxy.addr, get(host, "/.well-known/acme-challenge/tok-1")).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert!(response.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
            assert_eq!(text(response).await, "tok-1.thumbprint");
        }
        assert_eq!(echo.seen.requests.load(Relaxed), 0);
        // Other paths under the prefix are routed as usual.
        for path in
            ["/.well-known/acme-challenge/tok-2", "/.well-known/acme-challenge/", "/.well-known/acme-challenge/tok-1/x"]
        {
            let (status, body) = get_text(proxy.addr, "unknown.test", path).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::NOT_FOUND, "no service answers at unknown.test\n"),
                "{path}"
            );
        }
        let (status, body) = get_text(proxy.addr, "app.test", "/.well-known/acme-challenge/tok-2").await;
        assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("echo")));
        // Replaced whole.
        proxy.proxy.set_challenges(HashMap::from([("tok-2".to_string(), "tok-2.thumbprint".to_string())]));
        assert_eq!(
            get_text(proxy.addr, "unknown.test", "/.well-known/acme-challenge/tok-1").await.0,
            StatusCode::NOT_FOUND
        );
        let (status, body) = get_text(proxy.addr, "unknown.test", "/.well-known/acme-challenge/tok-2").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "tok-2.thumbprint"));
    }

    #[tokio::test]
    async fn in_flight_counts_requests_until_their_answer_is_done() {
        let (old, new) = (backend("old").await, backend("new").await);
        let proxy = start(ProxySettings::default(), vec![route("drain.test", "drain", &[old.addr])]).await;
        let in_flight = |backends: &[SocketAddr]| proxy.proxy.in_flight(backends);
        assert_eq!(in_flight(&[old.addr, new.addr]), 0);

        let addr = proxy.addr;
        let slow = tokio::spawn(async move { get_text(addr, "drain.test", "/slow").await });
        wait_until("the slow request is counted", || in_flight(&[old.addr]) == 1).await;
        // Still counted once the table no longer routes to it; the new backend has none.
        proxy.proxy.set_routes(RouteTable::new(vec![route("drain.test", "drain", &[new.addr])]));
        assert_eq!((in_flight(&[old.addr]), in_flight(&[new.addr]), in_flight(&[old.addr, old.addr])), (1, 0, 1));
        let (status, body) = slow.await.unwrap();
        assert_eq!((status, field(&body, "backend")), (StatusCode::OK, Some("old")));
        wait_until("the slow request is no longer counted", || in_flight(&[old.addr]) == 0).await;

        // A streamed answer counts until its body is done.
        let mut body = send(proxy.addr, get("drain.test", "/drip")).await.into_body();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "first\n");
        assert_eq!(in_flight(&[new.addr]), 1);
        new.seen.release.notify_one();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "second\n");
        wait_until("the streamed answer is no longer counted", || in_flight(&[new.addr]) == 0).await;
    }

    #[tokio::test]
    async fn a_request_body_over_the_limit_gets_413_over_tls() {
        let ca = TestCa::new();
        let echo = backend("echo").await;
        let settings = ProxySettings { max_request_body: 1 << 20, ..ProxySettings::default() };
        let proxy = start_tls(settings, vec![route("app.test", "app", &[echo.addr])]).await;
        proxy.proxy.set_certificates(vec![ca.certify(&["app.test"])]);
        // The client is still sending when the answer comes: it gets the answer, not a reset.
        let request =
            Request::post("/").header(HOST, "app.test").body(Full::new(Bytes::from(vec![7; 4 << 20]))).unwrap();
        let response = send_tls(proxy.addr, &ca, "app.test", request).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(text(response).await, "the request body is larger than the limit of 1048576 bytes\n");
        assert_eq!(echo.seen.requests.load(Relaxed), 0);
    }
}
