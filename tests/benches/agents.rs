//! Benchmark of agent sessions (issue 3): one real `deployer-controller` (release build, product
//! defaults) and many simulated agents in this process, each with its own key, certificate and
//! mutual-TLS connection on loopback, speaking the agent protocol as `deployer-agent` does; and
//! one real `deployer-agent` idling beside the Docker engine. It prints figures beside the
//! issue's targets; it never asserts a timing.
//!
//! - sessions: N agents join (64 at a time), open their sessions (64 handshakes at a time), and
//!   heartbeat every interval with their start times spread uniformly over it. Over a steady
//!   window: the controller's CPU (from `/proc`) and RSS. Then the heartbeat handling latency:
//!   the controller stamps each heartbeat it records with its wall clock (`metrics.at`, whole
//!   ms) and this process notes when it sent it (same host, same clock); each heartbeat carries
//!   its seq in `net_tx_bytes` so the two can be matched; a few listings of
//!   `GET /api/v1/agents` give one sample per agent each. Last, failure detection: K agents have
//!   their connection dropped (as by kill -9: the task holding it is aborted) and K others keep
//!   their session open but stop heartbeating (a frozen agent); `GET /api/v1/agents/{id}` is
//!   polled every 200 ms until each shows `down`.
//! - footprint: a real `deployer-agent run` (5 s heartbeat, the local Docker engine) joins a
//!   controller; once it is in session its RSS and CPU are sampled from `/proc` while it idles.
//!
//! ```text
//! cargo build --release --bins && cargo bench -p deployer-tests --bench agents             # full
//! cargo build --release --bins && cargo bench -p deployer-tests --bench agents -- --quick  # ~1 min
//! ```
//!
//! Flags (after `--`) or environment:
//! - `--quick` / `AGENTS_BENCH_QUICK=1`: 1,000 agents, a 15 s window, a 20 s idle agent.
//! - `--parts sessions,footprint` / `AGENTS_BENCH_PARTS`: which parts to run (default both).
//! - `AGENTS_BENCH_N` (simulated agents, default 10,000), `AGENTS_BENCH_INTERVAL_MS` (heartbeat
//!   interval of the simulated agents, default 5000), `AGENTS_BENCH_SECS` (steady window, default
//!   60), `AGENTS_BENCH_SILENCED` (agents silenced each way, default 10), `AGENTS_BENCH_IDLE_SECS`
//!   (footprint window, default 60).
//! - `AGENTS_BENCH_ARGS="--agent-ttl-s 8 ..."`: extra `serve` flags for the controller.
//!
//! Each simulated agent holds one file descriptor here and one in the controller (which inherits
//! this process's limits): the soft `RLIMIT_NOFILE` must exceed N by a margin. The bench refuses
//! to start otherwise; raise it with `sh -c 'ulimit -n 40000 && exec cargo bench ...'` (up to the
//! hard limit; with 20,000 about 19,000 agents fit).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use deployer_common::grpc_client;
use deployer_common::pki;
use deployer_common::tls::{controller_client_config, ServerTrust};
use deployer_common::token::JoinToken;
use deployer_proto::agent::agent_client::AgentClient;
use deployer_proto::agent::agent_message::Body as AgentBody;
use deployer_proto::agent::controller_message::Body as ControllerBody;
use deployer_proto::agent::{AgentMessage, Capacity, ControllerMessage, Heartbeat, Hello, HostMetrics, JoinRequest};
use deployer_tests::{wait_for, Agent, Api, Cluster};
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;

/// The issue's targets, printed beside the figures.
const TARGET_CONTROLLER_CPU_PCT: f64 = 50.0;
const TARGET_HEARTBEAT_P99_MS: f64 = 50.0;
const TARGET_DETECTION_S: f64 = 10.0;
const TARGET_AGENT_RSS_MIB: f64 = 15.0;
const TARGET_AGENT_CPU_PCT: f64 = 0.5;

/// Joins and session handshakes in flight at once.
const JOIN_CONCURRENCY: usize = 64;
const OPEN_CONCURRENCY: usize = 64;
/// Attempts at a join or a session before the agent counts as failed.
const ATTEMPTS: u32 = 3;
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Heartbeat send times kept per agent, to match the controller's stamps against.
const SENT_RING: usize = 8;
/// How often a silenced agent's status is polled.
const DOWN_POLL: Duration = Duration::from_millis(200);
/// File descriptors kept free beside one per agent (sockets of the API client, logs, the log).
const FD_MARGIN: u64 = 1000;

#[derive(Clone, Debug)]
struct Opts {
    quick: bool,
    sessions: bool,
    footprint: bool,
    agents: usize,
    interval: Duration,
    secs: u64,
    /// Listings of all agents for the latency samples, one interval apart.
    listings: usize,
    silenced: usize,
    idle_secs: u64,
    controller_args: Vec<String>,
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl Opts {
    fn parse() -> anyhow::Result<Opts> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let quick =
            args.iter().any(|a| a == "--quick") || env::<String>("AGENTS_BENCH_QUICK").is_some_and(|v| v != "0");
        let mut parts = env::<String>("AGENTS_BENCH_PARTS");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(v) = a.strip_prefix("--parts=") {
                parts = Some(v.to_string());
            } else if a == "--parts" {
                parts = it.next().cloned();
            } else if a != "--quick" && a != "--bench" {
                bail!("unknown argument {a:?}: use --quick and --parts sessions,footprint");
            }
        }
        let parts = parts.unwrap_or_else(|| "sessions,footprint".into());
        for p in parts.split(',') {
            if !["sessions", "footprint"].contains(&p.trim()) {
                bail!("unknown part {p:?}: the parts are sessions, footprint");
            }
        }
        let has = |p: &str| parts.split(',').any(|x| x.trim() == p);
        Ok(Opts {
            quick,
            sessions: has("sessions"),
            footprint: has("footprint"),
            agents: env("AGENTS_BENCH_N").unwrap_or(if quick { 1_000 } else { 10_000 }).max(1),
            interval: Duration::from_millis(env("AGENTS_BENCH_INTERVAL_MS").unwrap_or(5_000).max(100)),
            secs: env("AGENTS_BENCH_SECS").unwrap_or(if quick { 15 } else { 60 }).max(1),
            listings: if quick { 2 } else { 3 },
            silenced: env("AGENTS_BENCH_SILENCED").unwrap_or(10).max(1),
            idle_secs: env("AGENTS_BENCH_IDLE_SECS").unwrap_or(if quick { 20 } else { 60 }).max(1),
            controller_args: env::<String>("AGENTS_BENCH_ARGS")
                .map(|a| a.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
        })
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse()?;
    deployer_common::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(opts))
}

async fn run(opts: Opts) -> anyhow::Result<()> {
    println!("agents bench: controller {}", deployer_tests::binary("deployer-controller").display());
    println!(
        "  {} mode; {} CPUs, load average {}; parts:{}{}",
        if opts.quick { "quick" } else { "full" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load_average(),
        if opts.sessions { " sessions" } else { "" },
        if opts.footprint { " footprint" } else { "" },
    );
    if !opts.controller_args.is_empty() {
        println!("  controller flags: {}", opts.controller_args.join(" "));
    }
    let sessions = match opts.sessions {
        true => Some(sessions(&opts).await.context("sessions")?),
        false => None,
    };
    let footprint = match opts.footprint {
        true => Some(footprint(&opts).await.context("footprint")?),
        false => None,
    };
    println!();
    if let Some(s) = &sessions {
        s.print(&opts);
    }
    if let Some(f) = &footprint {
        f.print();
    }
    println!("load average at the end: {} (other work on the machine skews every figure)", load_average());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Simulated agents

/// One joined simulated agent: its identity, and what the bench tracks of it.
struct SimAgent {
    index: usize,
    id: String,
    key_pem: String,
    cert_pem: String,
    /// (seq, send time in µs since the Unix epoch) of its latest heartbeats, by seq modulo
    /// [`SENT_RING`].
    sent: Mutex<[(u64, u64); SENT_RING]>,
    /// Stops its heartbeats while its session stays open (a frozen agent).
    silent: AtomicBool,
}

impl SimAgent {
    fn record_sent(&self, seq: u64, at_us: u64) {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())[seq as usize % SENT_RING] = (seq, at_us);
    }

    fn sent_at(&self, seq: u64) -> Option<u64> {
        let (s, at) = self.sent.lock().unwrap_or_else(|e| e.into_inner())[seq as usize % SENT_RING];
        (s == seq && at > 0).then_some(at)
    }

    fn last_sent(&self) -> Option<u64> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|&(_, at)| at).max().filter(|&at| at > 0)
    }
}

/// Counts over all sessions.
#[derive(Default)]
struct Counters {
    welcomed: AtomicUsize,
    failed_to_open: AtomicUsize,
    /// Sessions that ended without the bench ending them.
    dropped: AtomicUsize,
    heartbeats: AtomicU64,
    /// Messages the controller sent after the welcome.
    answers: AtomicU64,
    /// Whether heartbeat round trips are being recorded (the measured window).
    measuring: AtomicBool,
    /// Heartbeat sent -> its ack received, ms, during the window.
    round_trips_ms: Mutex<Vec<f64>>,
}

/// What every session task shares.
struct Shared {
    grpc: String,
    ca_pem: String,
    interval: Duration,
    /// Heartbeat phases are offsets from this instant.
    epoch: Instant,
    agents: usize,
    opening: Semaphore,
    counters: Counters,
}

/// The running sessions; dropping it ends them all.
struct Fleet {
    agents: Vec<Arc<SimAgent>>,
    sessions: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for s in &self.sessions {
            s.abort();
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Joins `n` agents with `token`, `JOIN_CONCURRENCY` at a time, each over its own connection
/// with its own key; returns the joined ones, the CA and how many failed.
async fn join_agents(grpc: &str, token: &JoinToken, n: usize) -> (Vec<Arc<SimAgent>>, Option<String>, usize) {
    let permits = Arc::new(Semaphore::new(JOIN_CONCURRENCY));
    let mut joins = JoinSet::new();
    for index in 0..n {
        let (permits, grpc, token) = (permits.clone(), grpc.to_string(), token.clone());
        joins.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut attempt = 1;
            loop {
                match join_one(&grpc, &token, index).await {
                    Ok(joined) => return Ok(joined),
                    Err(e) if attempt >= ATTEMPTS => return Err(e),
                    Err(_) => attempt += 1,
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    let (mut agents, mut ca, mut failed) = (Vec::with_capacity(n), None, 0);
    let mut progress = Progress::new("joined", n);
    while let Some(result) = joins.join_next().await {
        match result.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((agent, ca_pem)) => {
                agents.push(Arc::new(agent));
                ca.get_or_insert(ca_pem);
            }
            Err(e) => {
                if failed == 0 {
                    eprintln!("  a join failed: {e:#}");
                }
                failed += 1;
            }
        }
        progress.update(agents.len() + failed);
    }
    agents.sort_by_key(|a| a.index);
    (agents, ca, failed)
}

async fn join_one(grpc: &str, token: &JoinToken, index: usize) -> anyhow::Result<(SimAgent, String)> {
    let tls = controller_client_config(&ServerTrust::Fingerprint(token.ca_fingerprint.clone()), None)?;
    let channel = grpc_client::channel(grpc, tls)?;
    let (key_pem, csr_pem) = pki::generate_key_and_csr()?;
    let mut request = tonic::Request::new(JoinRequest {
        token_secret: token.secret.clone(),
        csr_pem,
        hostname: hostname(index),
        labels: Default::default(),
    });
    request.set_timeout(OPEN_TIMEOUT);
    let reply = AgentClient::new(channel).join(request).await?.into_inner();
    let agent = SimAgent {
        index,
        id: reply.agent_id,
        key_pem,
        cert_pem: reply.cert_pem,
        sent: Mutex::new([(0, 0); SENT_RING]),
        silent: AtomicBool::new(false),
    };
    Ok((agent, reply.ca_pem))
}

fn hostname(index: usize) -> String {
    format!("sim-{index:05}")
}

impl Fleet {
    /// Starts one session task per agent; they open `OPEN_CONCURRENCY` at a time.
    fn start(agents: Vec<Arc<SimAgent>>, grpc: &str, ca_pem: String, interval: Duration) -> Fleet {
        let shared = Arc::new(Shared {
            grpc: grpc.to_string(),
            ca_pem,
            interval,
            epoch: Instant::now(),
            agents: agents.len(),
            opening: Semaphore::new(OPEN_CONCURRENCY),
            counters: Counters::default(),
        });
        let sessions = agents.iter().map(|a| tokio::spawn(session(shared.clone(), a.clone()))).collect();
        Fleet { agents, sessions, shared }
    }

    fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Drops agent `i`'s connection, as a kill -9 of its process would.
    fn kill(&self, i: usize) {
        self.sessions[i].abort();
    }
}

/// One agent's session: open it (with retries), then heartbeat on its phase until aborted.
async fn session(shared: Arc<Shared>, agent: Arc<SimAgent>) {
    let mut attempt = 1;
    let (_client, tx, mut inbound) = loop {
        let permit = shared.opening.acquire().await;
        match open_session(&shared, &agent).await {
            Ok(opened) => break opened,
            Err(e) if attempt >= ATTEMPTS => {
                eprintln!("  agent {} could not open its session: {e:#}", agent.index);
                shared.counters.failed_to_open.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => attempt += 1,
        }
        drop(permit);
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    shared.counters.welcomed.fetch_add(1, Ordering::Relaxed);

    // Agent i heartbeats at epoch + i/N of the interval, + k intervals: spread uniformly.
    let phase = shared.interval.mul_f64(agent.index as f64 / shared.agents as f64);
    let since = shared.epoch.elapsed().saturating_sub(phase);
    let periods = since.as_nanos().div_ceil(shared.interval.as_nanos()) as u32;
    let first = shared.epoch + phase + shared.interval * periods;
    let mut ticks = tokio::time::interval_at(first.into(), shared.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if agent.silent.load(Ordering::Relaxed) {
                    continue;
                }
                seq += 1;
                agent.record_sent(seq, now_us());
                if tx.send(heartbeat(seq)).await.is_err() {
                    break;
                }
                shared.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            message = inbound.message() => match message {
                Ok(Some(m)) => {
                    shared.counters.answers.fetch_add(1, Ordering::Relaxed);
                    if let Some(ControllerBody::HeartbeatAck(ack)) = m.body {
                        if shared.counters.measuring.load(Ordering::Relaxed) {
                            if let Some(sent) = agent.sent_at(ack.seq) {
                                let ms = now_us().saturating_sub(sent) as f64 / 1000.0;
                                shared.counters.round_trips_ms.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
                            }
                        }
                    }
                }
                Ok(None) | Err(_) => break,
            },
        }
    }
    shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
}

type Opened = (AgentClient<tonic::transport::Channel>, mpsc::Sender<AgentMessage>, tonic::Streaming<ControllerMessage>);

/// Dials with the agent's own certificate over a connection of its own, says hello and waits
/// for the welcome.
async fn open_session(shared: &Shared, agent: &SimAgent) -> anyhow::Result<Opened> {
    let tls =
        controller_client_config(&ServerTrust::Ca(shared.ca_pem.clone()), Some((&agent.cert_pem, &agent.key_pem)))?;
    let mut client = AgentClient::new(grpc_client::channel(&shared.grpc, tls)?);
    let (tx, rx) = mpsc::channel(4);
    tx.try_send(hello(agent.index))?;
    let opened = tokio::time::timeout(OPEN_TIMEOUT, client.session(ReceiverStream::new(rx))).await;
    let mut inbound = opened.context("no answer to the session")??.into_inner();
    let first = tokio::time::timeout(OPEN_TIMEOUT, inbound.message()).await.context("no welcome")??;
    match first.and_then(|m| m.body) {
        Some(ControllerBody::Welcome(w)) if w.agent_id == agent.id => Ok((client, tx, inbound)),
        other => bail!("expected a welcome for {}, got {other:?}", agent.id),
    }
}

fn hello(index: usize) -> AgentMessage {
    AgentMessage {
        body: Some(AgentBody::Hello(Hello {
            version: "bench".into(),
            hostname: hostname(index),
            labels: Default::default(),
            capacity: Some(Capacity { cpu_millis: 4_000, memory_bytes: 8 << 30 }),
            docker_version: "bench".into(),
            ..Default::default()
        })),
    }
}

/// A heartbeat with plausible host metrics; `net_tx_bytes` carries the seq so that the
/// controller's stamp of it can be found through the API.
fn heartbeat(seq: u64) -> AgentMessage {
    AgentMessage {
        body: Some(AgentBody::Heartbeat(Heartbeat {
            seq,
            host: Some(HostMetrics {
                cpu_percent: 3.5,
                load1: 0.2,
                load5: 0.15,
                load15: 0.1,
                memory_used_bytes: 2 << 30,
                memory_total_bytes: 8 << 30,
                disk_used_bytes: 20 << 30,
                disk_total_bytes: 100 << 30,
                net_rx_bytes: 1 << 30,
                net_tx_bytes: seq,
            }),
            containers: Vec::new(),
        })),
    }
}

/// Prints `what: done/total` to stderr every 10 s while a phase runs.
struct Progress {
    what: &'static str,
    total: usize,
    last: Instant,
}

impl Progress {
    fn new(what: &'static str, total: usize) -> Progress {
        Progress { what, total, last: Instant::now() }
    }

    fn update(&mut self, done: usize) {
        if self.last.elapsed() >= Duration::from_secs(10) {
            eprintln!("  {} {done}/{}", self.what, self.total);
            self.last = Instant::now();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: sessions

struct Sessions {
    agents: usize,
    joined: usize,
    join_failed: usize,
    join_time: Duration,
    welcomed: usize,
    failed_to_open: usize,
    in_session_time: Duration,
    window: Duration,
    heartbeats_in_window: u64,
    controller_cpu_pct: f64,
    controller_rss_mib: f64,
    controller_peak_mib: f64,
    bench_cpu_pct: f64,
    /// Send to recorded, ms (upper bounds: the controller stamps whole ms).
    latencies_ms: Vec<f64>,
    /// Send to ack received, ms, every heartbeat of the window (sorted).
    round_trips_ms: Vec<f64>,
    unmatched: usize,
    listing_ms: Vec<f64>,
    /// Agents listed as not `ready` or not connected (none was silenced yet).
    not_ready: usize,
    dropped: usize,
    answers: u64,
    killed: Vec<Option<f64>>,
    silent: Vec<Option<f64>>,
    show_ms: Vec<f64>,
    ttl_s: u64,
    grace_s: u64,
}

async fn sessions(opts: &Opts) -> anyhow::Result<Sessions> {
    let fd_limit = open_files_limit().context("read RLIMIT_NOFILE")?;
    if (opts.agents as u64) + FD_MARGIN > fd_limit {
        bail!(
            "{} agents need about {} file descriptors here and in the controller, but the soft limit is {fd_limit}: \
             raise it with `ulimit -n` (see the top of benches/agents.rs) or set AGENTS_BENCH_N",
            opts.agents,
            opts.agents as u64 + FD_MARGIN
        );
    }
    let args: Vec<&str> = opts.controller_args.iter().map(String::as_str).collect();
    let cluster = Cluster::start(1, &args).await.context("start a controller")?;
    let node = &cluster.nodes[0];
    let pid = node.pid().context("controller pid")?;
    let token = JoinToken::parse(&cluster.agent_token().await?)?;
    let grpc = node.grpc_addr();
    let flag = |name: &str, default: u64| {
        let args = &opts.controller_args;
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(default)
    };
    let (ttl_s, grace_s) = (flag("--agent-ttl-s", 15), flag("--agent-disconnect-grace-s", 3));
    println!(
        "\n[sessions] {} simulated agents -> {grpc}, heartbeat every {:?}, agent TTL {ttl_s} s, grace {grace_s} s",
        opts.agents, opts.interval
    );

    let started = Instant::now();
    let (agents, ca_pem, join_failed) = join_agents(&grpc, &token, opts.agents).await;
    let join_time = started.elapsed();
    let joined = agents.len();
    println!("  joined {joined} in {:.1} s ({join_failed} failed)", join_time.as_secs_f64());
    let ca_pem = ca_pem.context("no agent could join")?;

    let started = Instant::now();
    let fleet = Fleet::start(agents, &grpc, ca_pem, opts.interval);
    let mut progress = Progress::new("in session", joined);
    let deadline = Duration::from_secs(120).max(Duration::from_millis(20 * joined as u64));
    loop {
        let c = fleet.counters();
        let done = c.welcomed.load(Ordering::Relaxed) + c.failed_to_open.load(Ordering::Relaxed);
        if done >= joined {
            break;
        }
        if started.elapsed() > deadline {
            bail!("only {done} of {joined} sessions opened or failed within {deadline:?}");
        }
        progress.update(done);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let in_session_time = started.elapsed();
    let welcomed = fleet.counters().welcomed.load(Ordering::Relaxed);
    println!("  {welcomed} in session in {:.1} s", in_session_time.as_secs_f64());

    // One interval to settle into the uniform spread, then the measured window.
    tokio::time::sleep(opts.interval).await;
    println!("  measuring for {} s", opts.secs);
    fleet.counters().measuring.store(true, Ordering::Relaxed);
    let (cpu0, bench0, hb0, t0) = (
        cpu_seconds(pid),
        cpu_seconds(std::process::id()),
        fleet.counters().heartbeats.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(opts.secs)).await;
    let (cpu1, bench1, hb1, window) = (
        cpu_seconds(pid),
        cpu_seconds(std::process::id()),
        fleet.counters().heartbeats.load(Ordering::Relaxed),
        t0.elapsed(),
    );
    fleet.counters().measuring.store(false, Ordering::Relaxed);
    let mut round_trips_ms =
        std::mem::take(&mut *fleet.counters().round_trips_ms.lock().unwrap_or_else(|e| e.into_inner()));
    round_trips_ms.sort_by(f64::total_cmp);
    let pct = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (b - a) / window.as_secs_f64() * 100.0,
        _ => f64::NAN,
    };
    let (controller_rss_mib, controller_peak_mib) = rss_mib(pid);

    // Heartbeat latency: one sample per agent from each listing.
    let url = format!("{}/api/v1/agents", node.url());
    let index: HashMap<&str, &SimAgent> = fleet.agents.iter().map(|a| (a.id.as_str(), a.as_ref())).collect();
    let (mut latencies_ms, mut seen, mut unmatched, mut listing_ms, mut not_ready) =
        (Vec::new(), HashSet::new(), 0, Vec::new(), 0);
    for round in 0..opts.listings {
        if round > 0 {
            tokio::time::sleep(opts.interval).await;
        }
        let asked = Instant::now();
        let (status, body) = cluster.api.get(&url).await?;
        listing_ms.push(asked.elapsed().as_secs_f64() * 1000.0);
        let listed = match (status, body) {
            (200, Value::Array(listed)) => listed,
            (status, body) => bail!("GET /api/v1/agents answered {status}: {body}"),
        };
        not_ready = listed.iter().filter(|a| a["status"] != "ready" || a["connected"] != true).count();
        for a in &listed {
            let Some(agent) = a["id"].as_str().and_then(|id| index.get(id)) else { continue };
            let (Some(seq), Some(at_us)) =
                (a["metrics"]["net_tx_bytes"].as_u64(), a["metrics"]["at"].as_str().and_then(parse_us))
            else {
                continue;
            };
            if !seen.insert((agent.index, seq)) {
                continue;
            }
            match agent.sent_at(seq) {
                // The stamp is whole ms: the heartbeat was recorded before at + 1 ms.
                Some(sent) => latencies_ms.push((at_us + 1000).saturating_sub(sent) as f64 / 1000.0),
                None => unmatched += 1,
            }
        }
    }
    latencies_ms.sort_by(f64::total_cmp);

    // Failure detection, both ways at once.
    let k = opts.silenced.min(fleet.agents.len() / 2).max(1);
    let spread = (fleet.agents.len() / (2 * k)).max(1);
    let chosen: Vec<usize> = (0..2 * k).map(|j| (j * spread) % fleet.agents.len()).collect();
    let (killed, silent) = chosen.split_at(k);
    println!("  silencing {k} agents by dropping their connection and {k} by stopping their heartbeats");
    let mut polls = JoinSet::new();
    for &i in killed {
        let since = now_us();
        fleet.kill(i);
        polls.spawn(wait_down(cluster.api.clone(), node.url(), fleet.agents[i].clone(), Some(since)));
    }
    for &i in silent {
        fleet.agents[i].silent.store(true, Ordering::Relaxed);
        polls.spawn(wait_down(cluster.api.clone(), node.url(), fleet.agents[i].clone(), None));
    }
    let (mut killed_s, mut silent_s, mut show_ms) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(done) = polls.join_next().await {
        let down = done?;
        show_ms.extend(down.show_ms);
        match killed.contains(&down.index) {
            true => killed_s.push(down.after_s),
            false => silent_s.push(down.after_s),
        }
    }
    show_ms.sort_by(f64::total_cmp);
    let c = fleet.counters();
    Ok(Sessions {
        agents: opts.agents,
        joined,
        join_failed,
        join_time,
        welcomed,
        failed_to_open: c.failed_to_open.load(Ordering::Relaxed),
        in_session_time,
        window,
        heartbeats_in_window: hb1 - hb0,
        controller_cpu_pct: pct(cpu0, cpu1),
        controller_rss_mib,
        controller_peak_mib,
        bench_cpu_pct: pct(bench0, bench1),
        latencies_ms,
        round_trips_ms,
        unmatched,
        listing_ms,
        not_ready,
        dropped: c.dropped.load(Ordering::Relaxed),
        answers: c.answers.load(Ordering::Relaxed),
        killed: killed_s,
        silent: silent_s,
        show_ms,
        ttl_s,
        grace_s,
    })
}

struct Down {
    index: usize,
    /// Seconds from the failure to `down` in the API; `None` if not seen within the deadline.
    after_s: Option<f64>,
    show_ms: Vec<f64>,
}

/// Polls `GET /api/v1/agents/{id}` until the agent is `down`. The failure happened at `since`
/// (µs since the epoch), or, for a silent agent, at its last heartbeat.
async fn wait_down(api: Api, base: String, agent: Arc<SimAgent>, since: Option<u64>) -> Down {
    let url = format!("{base}/api/v1/agents/{}", agent.id);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut ticks = tokio::time::interval(DOWN_POLL);
    let mut show_ms = Vec::new();
    while Instant::now() < deadline {
        ticks.tick().await;
        let asked = Instant::now();
        let Ok((200, body)) = api.get(&url).await else { continue };
        show_ms.push(asked.elapsed().as_secs_f64() * 1000.0);
        if body["status"] == "down" {
            let seen = now_us();
            let since = since.or_else(|| agent.last_sent()).unwrap_or(seen);
            return Down { index: agent.index, after_s: Some(seen.saturating_sub(since) as f64 / 1e6), show_ms };
        }
    }
    Down { index: agent.index, after_s: None, show_ms }
}

/// `2025-01-02T03:04:05.678Z` as µs since the Unix epoch.
fn parse_us(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

// ---------------------------------------------------------------------------------------------
// Part 2: footprint of a real agent

struct Footprint {
    /// SIGSTOP of the agent until it is listed down, seconds, per trial.
    frozen_s: Vec<f64>,
    idle: Duration,
    connect_s: f64,
    rss_start_mib: f64,
    rss_max_mib: f64,
    rss_end_mib: f64,
    peak_mib: f64,
    /// CPU time spent during the idle window.
    cpu_s: f64,
}

async fn footprint(opts: &Opts) -> anyhow::Result<Footprint> {
    println!("\n[footprint] one deployer-agent, heartbeat every 5 s, Docker engine at its default address");
    let cluster = Cluster::start(1, &[]).await.context("start a controller")?;
    let token = cluster.agent_token().await?;
    let mut agent = Agent::new(cluster.root.join("agent"));
    let args = ["--controller", &format!("https://{}", cluster.nodes[0].grpc_addr()), "--token", &token];
    let args: Vec<String> =
        args.iter().chain(&["--hostname", "footprint", "--heartbeat-ms", "5000"]).map(|s| s.to_string()).collect();
    let started = Instant::now();
    agent.start(&args)?;
    let pid = agent.pid().context("agent pid")?;
    let url = format!("{}/api/v1/agents", cluster.nodes[0].url());
    wait_for("the agent to be in session with metrics", Duration::from_secs(60), || async {
        let (_, body) = cluster.api.get(&url).await.ok()?;
        body.as_array()?
            .iter()
            .any(|a| a["status"] == "ready" && a["connected"] == true && !a["metrics"].is_null())
            .then_some(())
    })
    .await
    .with_context(|| format!("agent log:\n{}", agent.log_text()))?;
    let connect_s = started.elapsed().as_secs_f64();
    println!("  in session after {:.0} ms; idling for {} s", connect_s * 1000.0, opts.idle_secs);

    let (rss_start_mib, _) = rss_mib(pid);
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let mut rss_max_mib = rss_start_mib;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    while t0.elapsed() < Duration::from_secs(opts.idle_secs) {
        ticks.tick().await;
        rss_max_mib = rss_max_mib.max(rss_mib(pid).0);
    }
    let (cpu1, idle) = (cpu_seconds(pid), t0.elapsed());
    let (rss_end_mib, peak_mib) = rss_mib(pid);
    let (Some(cpu0), Some(cpu1)) = (cpu0, cpu1) else {
        bail!("the agent exited during the idle window; its log:\n{}", agent.log_text());
    };
    let cpu_s = cpu1 - cpu0;

    // A frozen host: the agent process is stopped (SIGSTOP), so it neither heartbeats nor
    // answers the controller's HTTP/2 pings. Time until it is listed down, three times.
    let agent_url = {
        let (_, body) = cluster.api.get(&url).await?;
        let id = body[0]["id"].as_str().context("the agent's id")?.to_string();
        format!("{url}/{id}")
    };
    let status_of = || async {
        let (_, body) = cluster.api.get(&agent_url).await.ok()?;
        body["status"].as_str().map(str::to_string)
    };
    let mut frozen_s = Vec::new();
    for _ in 0..3 {
        let signal = |sig: &str| std::process::Command::new("kill").args([sig, &pid.to_string()]).status();
        signal("-STOP")?;
        let stopped = Instant::now();
        let down = wait_for("the stopped agent to be down", Duration::from_secs(60), || async {
            (status_of().await.as_deref() == Some("down")).then_some(())
        })
        .await;
        frozen_s.push(stopped.elapsed().as_secs_f64());
        signal("-CONT")?;
        down?;
        wait_for("the agent to be ready again", Duration::from_secs(60), || async {
            (status_of().await.as_deref() == Some("ready")).then_some(())
        })
        .await?;
        // A few heartbeats in session before the next trial.
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    Ok(Footprint {
        frozen_s,
        idle,
        connect_s,
        rss_start_mib,
        rss_max_mib: rss_max_mib.max(rss_end_mib),
        rss_end_mib,
        peak_mib,
        cpu_s,
    })
}

// ---------------------------------------------------------------------------------------------
// /proc

/// utime + stime of a process, in seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// (VmRSS, VmHWM) of a process in MiB; NaN when unknown.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// This process's soft limit on open files.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `/proc/loadavg`'s 1, 5 and 15 minute figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------------
// Report

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// p50 and max of detection times, and how many were never seen `down`.
fn detection(times: &[Option<f64>]) -> (f64, f64, usize) {
    let mut seen: Vec<f64> = times.iter().flatten().copied().collect();
    seen.sort_by(f64::total_cmp);
    (percentile(&seen, 0.5), seen.last().copied().unwrap_or(f64::NAN), times.len() - seen.len())
}

impl Sessions {
    fn print(&self, opts: &Opts) {
        println!(
            "== 1. Agent sessions: {} simulated agents (own key, certificate and mutual-TLS connection each), \
             heartbeat every {:?}, TTL {} s, grace {} s ==",
            self.agents, opts.interval, self.ttl_s, self.grace_s
        );
        println!(
            "  joined                               {} in {:.1} s ({:.0}/s), {} failed",
            self.joined,
            self.join_time.as_secs_f64(),
            self.joined as f64 / self.join_time.as_secs_f64(),
            self.join_failed
        );
        println!(
            "  in session (welcomed)                {} in {:.1} s, {} failed to open",
            self.welcomed,
            self.in_session_time.as_secs_f64(),
            self.failed_to_open
        );
        let secs = self.window.as_secs_f64();
        println!(
            "  heartbeats sent in the window        {} in {secs:.0} s ({:.0}/s)",
            self.heartbeats_in_window,
            self.heartbeats_in_window as f64 / secs
        );
        println!(
            "  controller CPU                       {:<8} target <= {TARGET_CONTROLLER_CPU_PCT:.0}%: {}",
            format!("{:.1}%", self.controller_cpu_pct),
            verdict(self.controller_cpu_pct <= TARGET_CONTROLLER_CPU_PCT)
        );
        println!(
            "  controller RSS                       {:.0} MiB at the end of the window (peak {:.0} MiB)",
            self.controller_rss_mib, self.controller_peak_mib
        );
        println!(
            "  bench process CPU                    {:.1}% (the simulated agents, on the same {} cores)",
            self.bench_cpu_pct,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        let lat = &self.latencies_ms;
        let p99 = percentile(lat, 0.99);
        println!(
            "  heartbeat sent -> recorded p99 ms    {:<8} target <= {TARGET_HEARTBEAT_P99_MS:.0} ms: {}",
            format!("{p99:.1}"),
            verdict(p99 <= TARGET_HEARTBEAT_P99_MS)
        );
        println!(
            "  heartbeat sent -> recorded           p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms; {} samples from {} listings{}",
            percentile(lat, 0.5),
            percentile(lat, 0.9),
            lat.last().copied().unwrap_or(f64::NAN),
            lat.len(),
            self.listing_ms.len(),
            if self.unmatched > 0 { format!(", {} unmatched", self.unmatched) } else { String::new() }
        );
        println!("    (controller's wall-clock stamp of the heartbeat, whole ms rounded up, minus the send time here)");
        let rt = &self.round_trips_ms;
        let rt99 = percentile(rt, 0.99);
        println!(
            "  heartbeat sent -> acked p99 ms       {:<8} target <= {TARGET_HEARTBEAT_P99_MS:.0} ms: {}",
            format!("{rt99:.1}"),
            verdict(!rt.is_empty() && rt99 <= TARGET_HEARTBEAT_P99_MS)
        );
        println!(
            "  heartbeat sent -> acked              p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms; {} heartbeats of the window",
            percentile(rt, 0.5),
            percentile(rt, 0.9),
            rt.last().copied().unwrap_or(f64::NAN),
            rt.len()
        );
        println!(
            "  GET /api/v1/agents                   [{}] ms; agents not ready or not connected in the last: {}",
            self.listing_ms.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(" "),
            self.not_ready
        );
        for (label, times, from) in [
            ("after a kill (conn. dropped)", &self.killed, "from the drop"),
            ("after a freeze (no heartbeat)", &self.silent, "from its last heartbeat"),
        ] {
            let (p50, max, missed) = detection(times);
            println!(
                "  down, {label:<30} p50 {p50:.1} s, max {:<6} target <= {TARGET_DETECTION_S:.0} s: {}  ({from}{})",
                format!("{max:.1} s"),
                verdict(missed == 0 && max <= TARGET_DETECTION_S),
                if missed > 0 { format!("; {missed} never seen down") } else { String::new() }
            );
        }
        println!(
            "    (polled every {} ms; GET /api/v1/agents/{{id}} meanwhile p50 {:.1} ms, p99 {:.1} ms)",
            DOWN_POLL.as_millis(),
            percentile(&self.show_ms, 0.5),
            percentile(&self.show_ms, 0.99)
        );
        println!(
            "  sessions ended by the controller     {}; controller messages after the welcomes: {}",
            self.dropped, self.answers
        );
        println!();
    }
}

impl Footprint {
    fn print(&self) {
        println!(
            "== 2. Agent footprint: deployer-agent idle for {:.0} s, in session, Docker engine connected ==",
            self.idle.as_secs_f64()
        );
        println!(
            "  RSS max MiB                          {:<8} target <= {TARGET_AGENT_RSS_MIB:.0} MiB: {}  (at the start {:.1}, at the end {:.1}, peak since start {:.1})",
            format!("{:.1}", self.rss_max_mib),
            verdict(self.rss_max_mib <= TARGET_AGENT_RSS_MIB),
            self.rss_start_mib,
            self.rss_end_mib,
            self.peak_mib
        );
        let cpu_pct = self.cpu_s / self.idle.as_secs_f64() * 100.0;
        println!(
            "  CPU                                  {:<8} target <= {TARGET_AGENT_CPU_PCT}%: {}  ({:.0} ms of CPU, counted in 10 ms ticks)",
            format!("{cpu_pct:.2}%"),
            verdict(cpu_pct <= TARGET_AGENT_CPU_PCT),
            self.cpu_s * 1000.0
        );
        println!(
            "  in session after                     {:.0} ms from the start (join included)",
            self.connect_s * 1000.0
        );
        let max = self.frozen_s.iter().copied().fold(0.0, f64::max);
        println!(
            "  down after SIGSTOP of the agent      max {:<6} target <= {TARGET_DETECTION_S:.0} s: {}  (trials: {}; HTTP/2 pings go unanswered, the connection is closed, then the disconnect grace)",
            format!("{max:.1} s"),
            verdict(!self.frozen_s.is_empty() && max <= TARGET_DETECTION_S),
            self.frozen_s.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" ")
        );
        println!();
    }
}
