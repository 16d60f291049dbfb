//! `wrk` through the ingress proxy and through Debian's nginx, both proxying the same small hyper
//! backend in the same run: requests/s and p99 latency, and their ratios (ours / nginx).
//!
//! Ours runs twice: on two threads of its own (`Proxy::serve_threads`, like nginx's two worker
//! processes) and on a two-worker multi-thread tokio runtime (`Proxy::serve`).
//!
//! `cargo bench -p deployer-agent --bench ingress`; needs `wrk` and `nginx` on the PATH (Debian:
//! `apt-get install -y wrk nginx`) and says so, without failing, when they are missing.
//! `INGRESS_BENCH_SECS` sets the length of one wrk run (default 10), `INGRESS_BENCH_ROUNDS` the
//! number of alternating rounds (default 3). `INGRESS_BENCH_HOLD=1` starts everything, prints the
//! addresses and waits an hour instead of measuring, for profiling (perf, callgrind) under a load
//! sent by hand.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deployer_agent::ingress::{Proxy, ProxySettings, Route, RouteTable};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

const HOST: &str = "bench.localhost";

fn main() {
    let missing: Vec<&str> = ["wrk", "nginx"].into_iter().filter(|tool| !on_path(tool)).collect();
    if !missing.is_empty() {
        println!(
            "ingress benchmark skipped: {} not found (on Debian: apt-get install -y wrk nginx)",
            missing.join(" and ")
        );
        return;
    }
    let seconds: u64 = env_number("INGRESS_BENCH_SECS", 10);
    let rounds: usize = env_number("INGRESS_BENCH_ROUNDS", 3);

    // The backend and each proxy get runtimes of their own, as they would be separate processes.
    let backend_runtime = runtime("bench-backend", 2);
    let backend = backend_runtime.block_on(start_backend());
    let control_runtime = runtime("bench-control", 1);
    let threads = control_runtime.block_on(start_proxy(backend, Serving::Threads(2)));
    let proxy_runtime = runtime("bench-ingress", 2);
    let multi = proxy_runtime.block_on(start_proxy(backend, Serving::Runtime));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let nginx = Nginx::start(dir.path(), backend);

    let targets = [("ours, 2 threads", threads), ("ours, runtime", multi), ("nginx, 2 workers", nginx.addr)];
    println!("backend {backend}; wrk -t2 -c64 -d{seconds}s --latency, {rounds} rounds");
    for (name, addr) in targets {
        println!("  {name:<17} {addr}");
        // Warm up: connection pools, caches, CPU frequency.
        wrk(addr, 2);
    }
    if std::env::var_os("INGRESS_BENCH_HOLD").is_some() {
        println!("holding for an hour (INGRESS_BENCH_HOLD): profile or load the addresses above by hand");
        std::thread::sleep(Duration::from_secs(3600));
        return;
    }
    let mut runs: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (i, (name, addr)) in targets.iter().enumerate() {
            let run = wrk(*addr, seconds);
            println!("round {round} {name:<17} {run}");
            runs[i].push(run);
        }
    }
    drop(nginx);

    let median = |runs: &[Run], value: fn(&Run) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(value).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let medians: Vec<(f64, f64)> = runs.iter().map(|r| (median(r, |r| r.rps), median(r, |r| r.p99_ms))).collect();
    let (nginx_rps, nginx_p99) = medians[2];
    println!();
    println!("median of {rounds}         requests/s       p99   rps/nginx  p99/nginx");
    for ((name, _), (rps, p99)) in targets.iter().zip(&medians) {
        println!("{name:<17} {rps:>12.0} {p99:>6.2} ms {:>11.2} {:>10.2}", rps / nginx_rps, p99 / nginx_p99);
    }
    println!("(throughput: higher is better; p99: lower is better)");
}

fn runtime(name: &str, workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Answers `ok` to everything, with keep-alive.
async fn start_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the backend");
    let addr = listener.local_addr().expect("the backend's address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    addr
}

enum Serving {
    Threads(usize),
    Runtime,
}

async fn start_proxy(backend: SocketAddr, serving: Serving) -> SocketAddr {
    let proxy = Proxy::new(ProxySettings::default());
    proxy.set_routes(RouteTable::new(vec![Route {
        host: HOST.into(),
        backends: vec![backend],
        service: "bench".into(),
        via_peer: false,
    }]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
    let addr = listener.local_addr().expect("the proxy's address");
    match serving {
        Serving::Threads(threads) => drop(tokio::spawn(proxy.serve_threads(listener, threads, std::future::pending()))),
        Serving::Runtime => drop(tokio::spawn(proxy.serve(listener, std::future::pending()))),
    }
    addr
}

/// Debian's nginx as a reverse proxy to the backend, configured like ours: keep-alive to the
/// backend, the client's Host and the X-Forwarded-* headers passed on.
struct Nginx {
    child: Child,
    addr: SocketAddr,
}

impl Nginx {
    fn start(dir: &Path, backend: SocketAddr) -> Nginx {
        let addr = free_port();
        let d = dir.display();
        let config = format!(
            r#"daemon off;
master_process on;
worker_processes 2;
error_log {d}/error.log;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream backend {{
        server {backend};
        keepalive 64;
    }}
    server {{
        listen {addr};
        server_name {HOST};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
        }}
    }}
}}
"#
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).expect("write nginx.conf");
        let child = Command::new("nginx")
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "nginx did not listen on {addr} within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM to the master stops its workers too; killing it outright would orphan them.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address")
}

struct Run {
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    errors: Vec<String>,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>9.0} req/s, p50 {:>5.2} p90 {:>5.2} p99 {:>6.2} ms",
            self.rps, self.p50_ms, self.p90_ms, self.p99_ms
        )?;
        if !self.errors.is_empty() {
            write!(f, "  ({})", self.errors.join("; "))?;
        }
        Ok(())
    }
}

fn wrk(addr: SocketAddr, seconds: u64) -> Run {
    let output = Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{seconds}s"), "--latency", "-H", &format!("Host: {HOST}")])
        .arg(format!("http://{addr}/"))
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&output.stderr));
    let rps = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{text}"));
    let percentile = |label: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(label))
            .and_then(|value| milliseconds(value.trim()))
            .unwrap_or_else(|| panic!("no {label} latency in wrk's output:\n{text}"))
    };
    let (p50_ms, p90_ms, p99_ms) = (percentile("50%"), percentile("90%"), percentile("99%"));
    let errors = text
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("Non-2xx") || line.starts_with("Socket errors"))
        .map(str::to_string)
        .collect();
    Run { rps, p50_ms, p90_ms, p99_ms, errors }
}

/// wrk's `812.00us`, `1.23ms`, `1.01s`.
fn milliseconds(value: &str) -> Option<f64> {
    let split = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(number / 1000.0),
        "ms" => Some(number),
        "s" => Some(number * 1000.0),
        "m" => Some(number * 60_000.0),
        _ => None,
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file()
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}
