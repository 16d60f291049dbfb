//! Benchmark of the replicated controller (issue 2): real `deployer-controller` processes on
//! loopback with the product's defaults (durable SQLite log, default Raft timing), driven through
//! the HTTP API. It prints figures beside the issue's targets and a 1-node baseline run in the
//! same process; it never asserts a timing.
//!
//! - Throughput: `POST /api/v1/projects` with unique names from N keep-alive clients, to the
//!   leader and to the followers (which forward over gRPC); a write counts when answered 201.
//!   Each configuration runs `RAFT_BENCH_REPS` times, interleaved with the others and with the
//!   1-node baseline, and the medians are printed, with each process's CPU time and context
//!   switches per write read from `/proc`.
//! - Failover: one client keeps writing, moving to the next node on an error; the leader is
//!   killed with SIGKILL; the figure is the time until a surviving node acknowledges a write.
//!   The killed node is restarted and the next trial waits for one stable leader for 2 s.
//! - Steady: a write load while `GET /api/v1/cluster` is polled on every node every 100 ms;
//!   every term change counts as a leader change.
//!
//! ```text
//! cargo build --release --bins && cargo bench -p deployer-tests --bench raft            # full
//! cargo build --release --bins && cargo bench -p deployer-tests --bench raft -- --quick # ~2 min
//! ```
//!
//! Flags (after `--`) or environment:
//! - `--quick` / `RAFT_BENCH_QUICK=1`: short windows, 5 failover trials, a 20 s steady phase.
//! - `--parts throughput,failover,steady` / `RAFT_BENCH_PARTS`: which parts to run (default all).
//! - `RAFT_BENCH_SECS` (measured seconds per throughput run), `RAFT_BENCH_REPS` (runs per
//!   configuration; medians are reported), `RAFT_BENCH_CLIENTS` (e.g. `1,64`),
//!   `RAFT_BENCH_TRIALS` (failover trials, default 20), `RAFT_BENCH_STEADY_SECS` (default 300),
//!   `RAFT_BENCH_STEADY_CLIENTS` (default 64).
//! - `RAFT_BENCH_ARGS="--raft-heartbeat-ms 20 ..."`: extra `serve` flags for every node.
//! - `RAFT_BENCH_CLIENT=reqwest`: the load's writes through reqwest rather than the hand-written
//!   keep-alive client (see `RawClient`), to compare the client's own cost.
//! - `RAFT_BENCH_KEEP=1`: keep the 3-node cluster's data dirs and logs (path printed).
//! - `RAFT_BENCH_PERF=DIR`: record `perf` profiles during the first run with the most clients
//!   against the leader: the 3-node leader and a follower (`DIR/leader.data`,
//!   `DIR/follower1.data`) and the 1-node baseline (`DIR/baseline.data`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use deployer_tests::{wait_for, Cluster};
use serde_json::Value;
use tokio::sync::watch;

/// The issue's targets, printed beside the figures.
const TARGET_WRITES_64: f64 = 10_000.0;
const TARGET_P50_1_MS: f64 = 1.0;
const TARGET_FAILOVER_P50_MS: f64 = 300.0;
const TARGET_FAILOVER_MAX_MS: f64 = 600.0;

#[derive(Clone, Debug)]
struct Opts {
    quick: bool,
    throughput: bool,
    failover: bool,
    steady: bool,
    secs: f64,
    warmup: f64,
    reps: usize,
    clients: Vec<usize>,
    trials: usize,
    steady_secs: u64,
    steady_clients: usize,
    perf: Option<PathBuf>,
    /// Extra `serve` flags for every node (e.g. Raft timing), to compare against the defaults.
    controller_args: Vec<String>,
    keep: bool,
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl Opts {
    fn parse() -> anyhow::Result<Opts> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let quick = args.iter().any(|a| a == "--quick") || env::<String>("RAFT_BENCH_QUICK").is_some_and(|v| v != "0");
        let mut parts = env::<String>("RAFT_BENCH_PARTS");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(v) = a.strip_prefix("--parts=") {
                parts = Some(v.to_string());
            } else if a == "--parts" {
                parts = it.next().cloned();
            } else if a != "--quick" && a != "--bench" {
                bail!("unknown argument {a:?}: use --quick and --parts throughput,failover,steady");
            }
        }
        let parts = parts.unwrap_or_else(|| "throughput,failover,steady".into());
        let has = |p: &str| parts.split(',').any(|x| x.trim() == p);
        for p in parts.split(',') {
            if !["throughput", "failover", "steady"].contains(&p.trim()) {
                bail!("unknown part {p:?}: the parts are throughput, failover, steady");
            }
        }
        let clients = match env::<String>("RAFT_BENCH_CLIENTS") {
            Some(list) => list
                .split(',')
                .map(|c| c.trim().parse::<usize>().context("RAFT_BENCH_CLIENTS is a list of numbers"))
                .collect::<anyhow::Result<Vec<_>>>()?,
            None => vec![1, 64],
        };
        Ok(Opts {
            quick,
            throughput: has("throughput"),
            failover: has("failover"),
            steady: has("steady"),
            secs: env("RAFT_BENCH_SECS").unwrap_or(if quick { 3.0 } else { 10.0 }),
            warmup: if quick { 0.5 } else { 1.0 },
            reps: env("RAFT_BENCH_REPS").unwrap_or(3).max(1),
            clients,
            trials: env("RAFT_BENCH_TRIALS").unwrap_or(if quick { 5 } else { 20 }),
            steady_secs: env("RAFT_BENCH_STEADY_SECS").unwrap_or(if quick { 20 } else { 300 }),
            steady_clients: env("RAFT_BENCH_STEADY_CLIENTS").unwrap_or(64),
            perf: env::<String>("RAFT_BENCH_PERF").map(PathBuf::from),
            controller_args: env::<String>("RAFT_BENCH_ARGS")
                .map(|a| a.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            keep: env::<String>("RAFT_BENCH_KEEP").is_some_and(|v| v != "0"),
        })
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(opts))
}

async fn run(opts: Opts) -> anyhow::Result<()> {
    let binary = deployer_tests::binary("deployer-controller");
    println!("raft bench: controller {}", binary.display());
    println!(
        "  {} mode; {} CPUs, load average {}; durable log (product defaults); parts:{}{}{}",
        if opts.quick { "quick" } else { "full" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load_average(),
        if opts.throughput { " throughput" } else { "" },
        if opts.failover { " failover" } else { "" },
        if opts.steady { " steady" } else { "" },
    );
    if !opts.controller_args.is_empty() {
        println!("  controller flags: {}", opts.controller_args.join(" "));
    }
    let args: Vec<&str> = opts.controller_args.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start(3, &args).await.context("start a 3-node cluster")?;
    if opts.keep {
        cluster.keep_files();
        eprintln!("  keeping data dirs and logs under {}", cluster.root.display());
    }
    let mut report = Report::default();
    if opts.throughput {
        let baseline = Cluster::start(1, &args).await.context("start the 1-node baseline")?;
        report.throughput = Some(throughput(&opts, &cluster, &baseline).await?);
    }
    if opts.steady {
        report.steady = Some(steady(&opts, &cluster).await?);
    }
    if opts.failover {
        report.failover = Some(failover(&opts, &mut cluster).await?);
    }
    report.print(&opts);
    println!("load average at the end: {} (other work on the machine skews every figure)", load_average());
    Ok(())
}

/// `/proc/loadavg`'s 1, 5 and 15 minute figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------------
// Write load

static NEXT_NAME: AtomicU64 = AtomicU64::new(0);

/// A project name no earlier write used (names are unique in the cluster).
fn unique_name() -> String {
    format!("b{}", NEXT_NAME.fetch_add(1, Ordering::Relaxed))
}

/// One keep-alive connection per worker, as a real client would hold.
fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1)
        .build()
        .expect("http client")
}

/// `POST /api/v1/projects` with a fresh name; `Ok(status)` or a transport error.
async fn create_project(client: &reqwest::Client, base: &str, auth: &str) -> Result<u16, reqwest::Error> {
    let body = format!("{{\"name\":\"{}\"}}", unique_name());
    let answer = client
        .post(format!("{base}/api/v1/projects"))
        .header(reqwest::header::AUTHORIZATION, auth)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await?;
    let status = answer.status().as_u16();
    answer.bytes().await?;
    Ok(status)
}

/// The load's client: `POST /api/v1/projects` written by hand on one kept-alive connection, the
/// answer's head parsed for its status and `Content-Length` (as wrk does). The bench client
/// shares the two cores with the three nodes: reqwest (hyper's client, a connection task and
/// channels per request) cost 21 to 33 µs of CPU per write, a seventh of the whole; this costs
/// under half of that. `RAFT_BENCH_CLIENT=reqwest` measures with reqwest instead.
struct RawClient {
    addr: String,
    head: String,
    stream: Option<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl RawClient {
    fn new(base: &str, auth: &str) -> RawClient {
        let addr = base.trim_start_matches("http://").trim_end_matches('/').to_string();
        let head = format!(
            "POST /api/v1/projects HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\n\
             Content-Type: application/json\r\nContent-Length: "
        );
        RawClient { addr, head, stream: None, buf: Vec::with_capacity(4096) }
    }

    /// One write with a fresh name: `Ok(status)`, or an error after which the connection is
    /// dropped (the next write opens another).
    async fn create_project(&mut self) -> std::io::Result<u16> {
        let result = tokio::time::timeout(Duration::from_secs(10), self.exchange()).await;
        match result {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                Err(std::io::ErrorKind::TimedOut.into())
            }
        }
    }

    async fn exchange(&mut self) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        if self.stream.is_none() {
            let stream = tokio::net::TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected above");
        let body = format!("{{\"name\":\"{}\"}}", unique_name());
        let request = format!("{}{}\r\n\r\n{body}", self.head, body.len());
        stream.write_all(request.as_bytes()).await?;
        self.buf.clear();
        let (status, head_len, body_len) = loop {
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let head = std::str::from_utf8(&self.buf[..end]).map_err(|_| bad("a head that is not text"))?;
            let status = head.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| bad("no status"))?;
            let length = head
                .split("\r\n")
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
                })
                .ok_or_else(|| bad("an answer without Content-Length"))?;
            break (status, end + 4, length);
        };
        while self.buf.len() < head_len + body_len {
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(status)
    }
}

/// One acknowledged write: when it was answered (since the load started) and how long it took.
#[derive(Clone, Copy)]
struct Ack {
    at: Duration,
    latency: Duration,
}

#[derive(Default)]
struct LoadResult {
    acks: Vec<Ack>,
    /// Non-201 answers by status; 0 = transport error.
    failures: BTreeMap<u16, usize>,
}

/// `clients` workers write as fast as they are answered, worker `i` to `targets[i % len]`, for
/// `duration`; `during` runs beside them (it gets the load's start instant).
async fn write_load<F, Fut, T>(
    targets: &[String],
    auth: &str,
    clients: usize,
    duration: Duration,
    during: F,
) -> (LoadResult, T)
where
    F: FnOnce(Instant) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let start = Instant::now();
    let end = start + duration;
    let mut workers = tokio::task::JoinSet::new();
    let use_reqwest = env::<String>("RAFT_BENCH_CLIENT").is_some_and(|c| c == "reqwest");
    for i in 0..clients {
        let base = targets[i % targets.len()].clone();
        let auth = auth.to_string();
        workers.spawn(async move {
            let client = http_client(Duration::from_secs(10));
            let mut raw = RawClient::new(&base, &auth);
            let mut result = LoadResult::default();
            loop {
                let sent = Instant::now();
                if sent >= end {
                    return result;
                }
                let answer = if use_reqwest {
                    create_project(&client, &base, &auth).await.map_err(|_| ())
                } else {
                    raw.create_project().await.map_err(|_| ())
                };
                match answer {
                    Ok(201) => {
                        let done = Instant::now();
                        result.acks.push(Ack { at: done - start, latency: done - sent });
                    }
                    Ok(status) => *result.failures.entry(status).or_default() += 1,
                    Err(()) => *result.failures.entry(0).or_default() += 1,
                }
            }
        });
    }
    let side = during(start).await;
    let mut all = LoadResult::default();
    while let Some(r) = workers.join_next().await {
        let r = r.expect("load worker panicked");
        all.acks.extend(r.acks);
        for (k, v) in r.failures {
            *all.failures.entry(k).or_default() += v;
        }
    }
    (all, side)
}

/// Figures of the acknowledgements answered within `[from, to)` of a load.
#[derive(Clone, Debug, Default)]
struct Figures {
    writes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    count: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn figures(acks: &[Ack], from: Duration, to: Duration) -> Figures {
    let mut lat: Vec<f64> =
        acks.iter().filter(|a| a.at >= from && a.at < to).map(|a| a.latency.as_secs_f64() * 1000.0).collect();
    lat.sort_by(f64::total_cmp);
    Figures {
        writes_per_s: lat.len() as f64 / (to - from).as_secs_f64(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        count: lat.len(),
    }
}

// ---------------------------------------------------------------------------------------------
// CPU accounting, from /proc: where the cores went during a run.

/// utime + stime of a process, in seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Voluntary and involuntary context switches of all threads of a process.
fn context_switches(pid: u32) -> Option<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Some(total)
}

/// Processes to account: (label, pid).
type Procs = Vec<(String, u32)>;

/// Per process: (CPU seconds, context switches).
fn usage_snapshot(procs: &Procs) -> Vec<(f64, f64)> {
    procs
        .iter()
        .map(|(_, pid)| (cpu_seconds(*pid).unwrap_or(f64::NAN), context_switches(*pid).unwrap_or(f64::NAN)))
        .collect()
}

/// What one process spent during a measured window.
#[derive(Clone, Debug)]
struct ProcUse {
    label: String,
    /// % of one core.
    cpu_pct: f64,
    cpu_us_per_write: f64,
    switches_per_write: f64,
}

// ---------------------------------------------------------------------------------------------
// Part 1 (and 4): throughput and commit latency, against a 1-node baseline

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Leader,
    Followers,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Config {
    clients: usize,
    target: Target,
    nodes: usize,
}

#[derive(Default)]
struct Runs {
    figures: Vec<Figures>,
    /// Per run: what each accounted process spent.
    usage: Vec<Vec<ProcUse>>,
    failures: BTreeMap<u16, usize>,
}

async fn leader_and_followers(cluster: &Cluster) -> anyhow::Result<(usize, Vec<usize>)> {
    let leader = cluster.leader().await?;
    let followers = (0..cluster.nodes.len()).filter(|&i| i != leader).collect();
    Ok((leader, followers))
}

async fn measure(
    opts: &Opts,
    cluster: &Cluster,
    config: &Config,
    perf: Option<&PathBuf>,
) -> anyhow::Result<(Figures, Vec<ProcUse>, LoadResult)> {
    let (leader, followers) = leader_and_followers(cluster).await?;
    let targets: Vec<String> = match config.target {
        Target::Leader => vec![cluster.nodes[leader].url()],
        Target::Followers => followers.iter().map(|&i| cluster.nodes[i].url()).collect(),
    };
    let mut procs: Procs = vec![("leader".into(), cluster.nodes[leader].pid().context("leader pid")?)];
    for (n, &f) in followers.iter().enumerate() {
        procs.push((format!("follower{}", n + 1), cluster.nodes[f].pid().context("follower pid")?));
    }
    procs.push(("bench client".into(), std::process::id()));
    let auth = format!("Bearer {}", cluster.api.token);
    let warmup = Duration::from_secs_f64(opts.warmup);
    let window = Duration::from_secs_f64(opts.secs);
    let perf_pids: Vec<(String, u32)> = match perf {
        // The 3-node leader and a follower; the baseline's only node as `baseline`.
        Some(_) if config.nodes == 1 => vec![("baseline".into(), procs[0].1)],
        Some(_) => procs.iter().take(2).cloned().collect(),
        None => Vec::new(),
    };
    let (load, spent) = write_load(&targets, &auth, config.clients, warmup + window, |start| {
        let procs = procs.clone();
        async move {
            tokio::time::sleep_until((start + warmup).into()).await;
            let recorders: Vec<std::process::Child> =
                perf_pids.iter().filter_map(|(label, pid)| start_perf(perf.expect("perf dir"), label, *pid)).collect();
            let before = usage_snapshot(&procs);
            tokio::time::sleep_until((start + warmup + window).into()).await;
            let after = usage_snapshot(&procs);
            for r in recorders {
                stop_perf(r);
            }
            before.into_iter().zip(after).map(|(b, a)| (a.0 - b.0, a.1 - b.1)).collect::<Vec<_>>()
        }
    })
    .await;
    let fig = figures(&load.acks, warmup, warmup + window);
    let writes = fig.count.max(1) as f64;
    let usage = procs
        .iter()
        .zip(spent)
        .map(|((label, _), (cpu_s, switches))| ProcUse {
            label: label.clone(),
            cpu_pct: cpu_s / window.as_secs_f64() * 100.0,
            cpu_us_per_write: cpu_s * 1e6 / writes,
            switches_per_write: switches / writes,
        })
        .collect();
    Ok((fig, usage, load))
}

fn start_perf(dir: &PathBuf, label: &str, pid: u32) -> Option<std::process::Child> {
    let _ = std::fs::create_dir_all(dir);
    let out = dir.join(format!("{label}.data"));
    let child = std::process::Command::new("perf")
        .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match child {
        Ok(c) => {
            eprintln!("  perf recording {label} (pid {pid}) into {}", out.display());
            Some(c)
        }
        Err(e) => {
            eprintln!("  cannot run perf: {e}");
            None
        }
    }
}

fn stop_perf(mut child: std::process::Child) {
    let _ = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let _ = child.wait();
}

async fn throughput(opts: &Opts, cluster: &Cluster, baseline: &Cluster) -> anyhow::Result<BTreeMap<Config, Runs>> {
    let mut configs = Vec::new();
    for &clients in &opts.clients {
        configs.push(Config { clients, target: Target::Leader, nodes: 3 });
        configs.push(Config { clients, target: Target::Leader, nodes: 1 });
    }
    for &clients in &opts.clients {
        configs.push(Config { clients, target: Target::Followers, nodes: 3 });
    }
    let max_clients = opts.clients.iter().copied().max().unwrap_or(1);
    let mut results: BTreeMap<Config, Runs> = BTreeMap::new();
    // Rounds interleave the configurations, so a noisy minute hurts each of them alike.
    for rep in 0..opts.reps {
        for config in &configs {
            let on = if config.nodes == 3 { cluster } else { baseline };
            let profiled = rep == 0 && config.target == Target::Leader && config.clients == max_clients;
            let perf = if profiled { opts.perf.as_ref() } else { None };
            let (fig, usage, load) = measure(opts, on, config, perf).await?;
            eprintln!(
                "  run {}/{}: {} node(s), {:>3} client(s) -> {:?}: {:>8.0} writes/s  p50 {:>7.2} ms  p99 {:>7.2} ms{}",
                rep + 1,
                opts.reps,
                config.nodes,
                config.clients,
                config.target,
                fig.writes_per_s,
                fig.p50_ms,
                fig.p99_ms,
                if load.failures.is_empty() { String::new() } else { format!("  failures {:?}", load.failures) },
            );
            let runs = results.entry(config.clone()).or_default();
            runs.figures.push(fig);
            runs.usage.push(usage);
            for (k, v) in load.failures {
                *runs.failures.entry(k).or_default() += v;
            }
        }
    }
    Ok(results)
}

// ---------------------------------------------------------------------------------------------
// Part 2: leader failover

struct Trial {
    /// Kill to the first write acknowledged by a surviving node.
    commit: Duration,
    /// Kill to a survivor reporting a new leader in a higher term (polled every 5 ms).
    elected: Option<Duration>,
    /// Restart of the killed node to it serving linearizable reads as a voter again.
    rejoined: Duration,
    /// Terms started between the failover's election and a stable cluster after the restart:
    /// elections the rejoining node caused.
    rejoin_terms: u64,
}

/// Waits until every node names the same leader in the same term for `window`; returns the term.
async fn wait_stable(cluster: &Cluster, window: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut since: Option<(Instant, (u64, u64))> = None;
    loop {
        let mut agreed: Option<(u64, u64)> = None;
        let mut all = true;
        for i in 0..cluster.nodes.len() {
            let view = cluster.cluster_view(i).await.ok();
            match (view.as_ref().map(raft_id_and_term), agreed) {
                (Some((Some(l), t)), None) => agreed = Some((l, t)),
                (Some((Some(l), t)), Some(a)) if a == (l, t) => {}
                _ => all = false,
            }
        }
        let now = Instant::now();
        match (all, agreed) {
            (true, Some(a)) => match since {
                Some((t0, b)) if b == a => {
                    if now - t0 >= window {
                        return Ok(a.1);
                    }
                }
                _ => since = Some((now, a)),
            },
            _ => since = None,
        }
        if now > deadline {
            bail!("the cluster did not settle on one leader within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn raft_id_and_term(view: &Value) -> (Option<u64>, u64) {
    (view["leader_id"].as_u64(), view["term"].as_u64().unwrap_or(0))
}

async fn failover(opts: &Opts, cluster: &mut Cluster) -> anyhow::Result<Vec<Trial>> {
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let auth = format!("Bearer {}", cluster.api.token);
    // The writer: one client that keeps writing; on an error it moves to the next node. The main
    // task points it at the leader before each trial through `redirect`.
    let redirect = Arc::new(AtomicUsize::new(usize::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let (acked_tx, mut acked) = watch::channel((Instant::now(), usize::MAX));
    let writer = {
        let (urls, auth, redirect, stop) = (urls.clone(), auth.clone(), redirect.clone(), stop.clone());
        tokio::spawn(async move {
            let client = http_client(Duration::from_secs(3));
            let mut node = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = redirect.swap(usize::MAX, Ordering::Relaxed);
                if r != usize::MAX {
                    node = r;
                }
                match create_project(&client, &urls[node], &auth).await {
                    Ok(201) => {
                        acked_tx.send_replace((Instant::now(), node));
                    }
                    _ => node = (node + 1) % urls.len(),
                }
            }
        })
    };
    let poll_client = http_client(Duration::from_millis(500));
    let mut trials = Vec::new();
    for trial in 0..opts.trials {
        let leader = cluster.leader().await?;
        let view = cluster.cluster_view(leader).await?;
        let (Some(leader_id), term) = raft_id_and_term(&view) else { bail!("no leader id in {view}") };
        let pointed = Instant::now();
        redirect.store(leader, Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(10), acked.wait_for(|(at, n)| *at > pointed && *n == leader))
            .await
            .context("the writer made no write through the leader")??;

        // Watches the survivors for the new leader while the writer retries.
        let survivors: Vec<String> = (0..urls.len()).filter(|&i| i != leader).map(|i| urls[i].clone()).collect();
        let killed_at = Instant::now();
        let election = {
            let (client, auth) = (poll_client.clone(), auth.clone());
            tokio::spawn(async move {
                loop {
                    for url in &survivors {
                        let answer = client
                            .get(format!("{url}/api/v1/cluster"))
                            .header(reqwest::header::AUTHORIZATION, &auth)
                            .send()
                            .await;
                        if let Ok(a) = answer {
                            if let Ok(v) = a.json::<Value>().await {
                                let (new_leader, new_term) = raft_id_and_term(&v);
                                if new_term > term && new_leader.is_some_and(|l| l != leader_id) {
                                    return (killed_at.elapsed(), new_term);
                                }
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        cluster.nodes[leader].kill9();
        let (at, _) =
            *tokio::time::timeout(Duration::from_secs(20), acked.wait_for(|(at, n)| *at > killed_at && *n != leader))
                .await
                .context("no write committed within 20 s of killing the leader")??;
        let commit = at - killed_at;
        let elected = tokio::time::timeout(Duration::from_secs(5), election).await.ok().and_then(Result::ok);
        let new_term = match elected {
            Some((_, t)) => t,
            None => raft_id_and_term(&cluster.cluster_view(cluster.leader().await?).await?).1,
        };
        let elected = elected.map(|(d, _)| d);

        let restarted = Instant::now();
        cluster.nodes[leader].start(&[])?;
        let url = urls[leader].clone();
        let api = cluster.api.clone();
        let cluster_ref = &*cluster;
        let voters_wanted = urls.len();
        wait_for("the killed node to serve as a voter again", Duration::from_secs(60), || {
            let (api, url) = (api.clone(), url.clone());
            async move {
                let view = cluster_ref.cluster_view(leader).await.ok()?;
                let voters = view["nodes"].as_array()?.iter().filter(|n| n["voter"] == true).count();
                if voters != voters_wanted || view["leader_id"].is_null() {
                    return None;
                }
                // A linearizable read on the node: it knows the leader and has applied its commits.
                let (status, _) = api.get(&format!("{url}/api/v1/projects?limit=1")).await.ok()?;
                (status == 200).then_some(())
            }
        })
        .await?;
        let rejoined = restarted.elapsed();
        // The next trial starts from a settled cluster: the rejoining node may still force an
        // election or two (openraft 0.9 has no pre-vote).
        let stable_term = wait_stable(cluster, Duration::from_secs(2)).await?;
        let rejoin_terms = stable_term.saturating_sub(new_term);
        eprintln!(
            "  failover {}/{}: first commit after kill {:>6.1} ms, new leader seen {:>6} ms, rejoin {:>6.0} ms, elections caused by the rejoin {}",
            trial + 1,
            opts.trials,
            commit.as_secs_f64() * 1000.0,
            elected.map(|e| format!("{:.1}", e.as_secs_f64() * 1000.0)).unwrap_or_else(|| "-".into()),
            rejoined.as_secs_f64() * 1000.0,
            rejoin_terms,
        );
        trials.push(Trial { commit, elected, rejoined, rejoin_terms });
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    Ok(trials)
}

// ---------------------------------------------------------------------------------------------
// Part 3: leader stability under a steady write load

struct Steady {
    secs: u64,
    clients: usize,
    terms: Vec<u64>,
    /// (seconds into the load, node, term, leader id) of each term change seen.
    changes: Vec<(f64, usize, u64, Option<u64>)>,
    polls: usize,
    failed_polls: usize,
    load: LoadResult,
}

async fn steady(opts: &Opts, cluster: &Cluster) -> anyhow::Result<Steady> {
    let (leader, _) = leader_and_followers(cluster).await?;
    let auth = format!("Bearer {}", cluster.api.token);
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let duration = Duration::from_secs(opts.steady_secs);
    eprintln!(
        "  steady: {} clients -> leader for {} s, polling /api/v1/cluster every 100 ms",
        opts.steady_clients, opts.steady_secs
    );
    let targets = [cluster.nodes[leader].url()];
    let (load, (terms, changes, polls, failed_polls)) =
        write_load(&targets, &auth, opts.steady_clients, duration, |start| {
            let (urls, auth) = (urls.clone(), auth.clone());
            async move {
                let client = http_client(Duration::from_millis(1000));
                let mut last: Vec<Option<(u64, Option<u64>)>> = vec![None; urls.len()];
                let mut terms = std::collections::BTreeSet::new();
                let mut changes = Vec::new();
                let (mut polls, mut failed) = (0, 0);
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while start.elapsed() < duration {
                    tick.tick().await;
                    let views = futures_join(&client, &urls, &auth).await;
                    for (i, view) in views.into_iter().enumerate() {
                        polls += 1;
                        let Some(v) = view else {
                            failed += 1;
                            continue;
                        };
                        let (leader_id, term) = raft_id_and_term(&v);
                        terms.insert(term);
                        if let Some((t, _)) = last[i] {
                            if t != term {
                                changes.push((start.elapsed().as_secs_f64(), i, term, leader_id));
                            }
                        }
                        last[i] = Some((term, leader_id));
                    }
                }
                (terms.into_iter().collect::<Vec<_>>(), changes, polls, failed)
            }
        })
        .await;
    Ok(Steady { secs: opts.steady_secs, clients: opts.steady_clients, terms, changes, polls, failed_polls, load })
}

/// `GET /api/v1/cluster` from every node at once; `None` where it failed.
async fn futures_join(client: &reqwest::Client, urls: &[String], auth: &str) -> Vec<Option<Value>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, url) in urls.iter().enumerate() {
        let request = client.get(format!("{url}/api/v1/cluster")).header(reqwest::header::AUTHORIZATION, auth);
        set.spawn(async move {
            let view = async { request.send().await.ok()?.json::<Value>().await.ok() }.await;
            (i, view)
        });
    }
    let mut views = vec![None; urls.len()];
    while let Some(Ok((i, v))) = set.join_next().await {
        views[i] = v;
    }
    views
}

// ---------------------------------------------------------------------------------------------
// The report

#[derive(Default)]
struct Report {
    throughput: Option<BTreeMap<Config, Runs>>,
    failover: Option<Vec<Trial>>,
    steady: Option<Steady>,
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn list(values: &[f64], decimals: usize) -> String {
    values.iter().map(|v| format!("{v:.decimals$}")).collect::<Vec<_>>().join(" ")
}

impl Report {
    fn print(&self, opts: &Opts) {
        println!();
        if let Some(results) = &self.throughput {
            print_throughput(opts, results);
        }
        if let Some(s) = &self.steady {
            print_steady(s);
        }
        if let Some(trials) = &self.failover {
            print_failover(trials);
        }
    }
}

fn print_throughput(opts: &Opts, results: &BTreeMap<Config, Runs>) {
    println!(
        "== 1. Replicated writes: POST /api/v1/projects (acknowledged = 201), median of {} runs of {} s after {} s warm-up ==",
        opts.reps, opts.secs, opts.warmup
    );
    println!("{:<30} {:>12} {:>18} {:>9}   {:<22} 3-node runs", "", "3 nodes", "1 node (baseline)", "3n/1n", "target");
    for target in [Target::Leader, Target::Followers] {
        for &clients in &opts.clients {
            let Some(three) = results.get(&Config { clients, target, nodes: 3 }) else { continue };
            let one = results.get(&Config { clients, target: Target::Leader, nodes: 1 });
            let title = match target {
                Target::Leader => format!("{clients} client(s) -> leader"),
                Target::Followers => format!("{clients} client(s) -> followers"),
            };
            println!("{title}");
            type Pick = fn(&Figures) -> f64;
            let rows: [(&str, Pick, usize); 3] = [
                ("writes/s", |f| f.writes_per_s, 0),
                ("p50 commit latency ms", |f| f.p50_ms, 2),
                ("p99 commit latency ms", |f| f.p99_ms, 2),
            ];
            for (label, pick, decimals) in rows {
                let values: Vec<f64> = three.figures.iter().map(pick).collect();
                let m3 = median(&values);
                let m1 = one.map(|o| median(&o.figures.iter().map(pick).collect::<Vec<_>>()));
                let base = match target {
                    Target::Leader => m1.map(|v| format!("{v:.decimals$}")).unwrap_or_else(|| "-".into()),
                    Target::Followers => m1.map(|v| format!("({v:.decimals$})")).unwrap_or_else(|| "-".into()),
                };
                let target_text = match (label, clients, target) {
                    ("writes/s", 64, _) => format!(">= {TARGET_WRITES_64:.0}: {}", verdict(m3 >= TARGET_WRITES_64)),
                    ("p50 commit latency ms", 1, _) => {
                        format!("<= {TARGET_P50_1_MS} ms: {}", verdict(m3 <= TARGET_P50_1_MS))
                    }
                    _ => String::new(),
                };
                println!(
                    "  {:<28} {:>12.decimals$} {:>18} {:>9} {:<24} [{}]",
                    label,
                    m3,
                    base,
                    m1.map(|v| format!("{:.2}", m3 / v)).unwrap_or_else(|| "-".into()),
                    target_text,
                    list(&values, decimals),
                );
            }
            print_usage("3 nodes", &three.usage);
            if let Some(one) = one.filter(|_| target == Target::Leader) {
                print_usage("baseline", &one.usage);
            }
            if !three.failures.is_empty() {
                println!("  {:<28} {:?} (status: count; 0 = transport error)", "failed writes", three.failures);
            }
        }
    }
    println!("  (followers rows: baseline in parentheses is the 1-node leader run; a follower forwards over gRPC)");
    println!("  (cpu: % of one core over the window; us = CPU microseconds and cs = context switches per acknowledged write)");
    println!();
}

/// Medians over the runs of what each process spent, and the write rate the machine's cores
/// could carry at that CPU cost per write.
fn print_usage(what: &str, runs: &[Vec<ProcUse>]) {
    let Some(first) = runs.first() else { return };
    let per_proc = |pick: fn(&ProcUse) -> f64| -> Vec<f64> {
        (0..first.len()).map(|i| median(&runs.iter().filter_map(|r| r.get(i).map(pick)).collect::<Vec<_>>())).collect()
    };
    let pct = per_proc(|u| u.cpu_pct);
    let us = per_proc(|u| u.cpu_us_per_write);
    let sw = per_proc(|u| u.switches_per_write);
    let cells: Vec<String> = first
        .iter()
        .enumerate()
        .map(|(i, u)| format!("{} {:.0}% {:.0}us {:.1}cs", u.label, pct[i], us[i], sw[i]))
        .collect();
    let total_us: f64 = us.iter().filter(|v| !v.is_nan()).sum();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    println!("  {:<28} {}", format!("{what}: cpu, per write"), cells.join(", "));
    println!(
        "  {:<28} {:.0} us of CPU per write in all; {} cores carry at most ~{:.0} writes/s at that cost",
        "",
        total_us,
        cores,
        cores * 1e6 / total_us
    );
}

fn print_steady(s: &Steady) {
    let end = Duration::from_secs(s.secs);
    let total = figures(&s.load.acks, Duration::ZERO, end);
    println!(
        "== 3. Steady write load: {} clients -> leader for {} s, GET /api/v1/cluster on every node every 100 ms ==",
        s.clients, s.secs
    );
    println!(
        "  leader changes (term changes seen)  {:<6} target 0: {}   terms seen {:?}",
        s.terms.len().saturating_sub(1),
        verdict(s.terms.len() == 1),
        s.terms
    );
    for (at, node, term, leader) in &s.changes {
        println!("    at {at:>7.1} s node{node} saw term {term}, leader {leader:?}");
    }
    println!("  cluster polls                        {} ({} failed or slower than 1 s)", s.polls, s.failed_polls);
    println!(
        "  writes                               {} acknowledged, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms{}",
        total.count,
        total.writes_per_s,
        total.p50_ms,
        total.p99_ms,
        total.max_ms,
        if s.load.failures.is_empty() { String::new() } else { format!(", failed {:?}", s.load.failures) }
    );
    let buckets = 10u64.min(s.secs.max(1));
    let width = s.secs as f64 / buckets as f64;
    println!("  per {width:.0} s:  writes/s | p99 ms | max ms");
    for b in 0..buckets {
        let from = Duration::from_secs_f64(b as f64 * width);
        let to = Duration::from_secs_f64((b + 1) as f64 * width);
        let f = figures(&s.load.acks, from, to);
        println!(
            "    {:>5.0}-{:<5.0} {:>8.0} | {:>6.2} | {:>6.1}",
            from.as_secs_f64(),
            to.as_secs_f64(),
            f.writes_per_s,
            f.p99_ms,
            f.max_ms
        );
    }
    println!();
}

fn print_failover(trials: &[Trial]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let commits: Vec<f64> = trials.iter().map(|t| ms(t.commit)).collect();
    let elected: Vec<f64> = trials.iter().filter_map(|t| t.elected.map(ms)).collect();
    let rejoined: Vec<f64> = trials.iter().map(|t| ms(t.rejoined)).collect();
    let max = commits.iter().copied().fold(f64::NAN, f64::max);
    let p50 = median(&commits);
    println!(
        "== 2. Leader failover: kill -9 of the leader until the first write committed by a survivor, {} trials ==",
        trials.len()
    );
    println!(
        "  failover p50 ms                      {p50:<8.1} target <= {TARGET_FAILOVER_P50_MS:.0}: {}",
        verdict(p50 <= TARGET_FAILOVER_P50_MS)
    );
    println!(
        "  failover max ms                      {max:<8.1} target <= {TARGET_FAILOVER_MAX_MS:.0}: {}",
        verdict(max <= TARGET_FAILOVER_MAX_MS)
    );
    println!("  trials ms                            [{}]", list(&commits, 0));
    println!(
        "  new leader seen by a survivor ms     p50 {:.1}, max {:.1}  [{}]",
        median(&elected),
        elected.iter().copied().fold(f64::NAN, f64::max),
        list(&elected, 0)
    );
    println!(
        "  restart to voter serving reads ms    p50 {:.0}, max {:.0}",
        median(&rejoined),
        rejoined.iter().copied().fold(f64::NAN, f64::max)
    );
    let rejoin_terms: Vec<u64> = trials.iter().map(|t| t.rejoin_terms).collect();
    println!(
        "  elections forced by the restarted node rejoining: {} in {} restarts {:?} (each is a leader change outside the failover)",
        rejoin_terms.iter().sum::<u64>(),
        trials.len(),
        rejoin_terms
    );
    println!();
}
