//! Benchmark of the control-plane API (issue 4): `wrk` (Debian's package) against one real
//! `deployer-controller` (release build) on loopback. It prints figures beside the issue's
//! targets and a baseline run in the same process; it never asserts a timing.
//!
//! - baseline: `GET /api/v1/health` (no authentication, no state);
//! - reads: `GET /api/v1/projects` (the first 100 of 200 projects) with a bearer token;
//! - writes: `POST /api/v1/projects` with unique names, with a bearer token.
//!
//! ```text
//! apt-get install wrk
//! cargo build --release --bins && cargo bench -p deployer-tests --bench api [-- --quick]
//! ```
//!
//! Environment: `API_BENCH_SECS` (per run, default 15; quick 5), `API_BENCH_CONNECTIONS`
//! (default 64), `API_BENCH_THREADS` (wrk threads, default 2), `API_BENCH_REPS` (runs of each,
//! interleaved, medians reported; default 3, quick 1).

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use deployer_tests::Cluster;
use serde_json::json;

const TARGET_READS: f64 = 20_000.0;
const TARGET_READ_P99_MS: f64 = 10.0;
/// Issue 7: signed deliveries verified per second, accepted or refused, without a 5xx.
const TARGET_WEBHOOKS: f64 = 10_000.0;
/// The default webhook secret of the benchmark's controller.
const WEBHOOK_SECRET: &str = "bench-webhook-secret";

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// What one wrk run measured.
#[derive(Clone, Debug)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    errors: u64,
    /// Answers 500 and up, when the script counts them (`5xx: N`).
    server_errors: u64,
}

/// `1.23ms`, `456.78us`, `1.02s` -> milliseconds.
fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (number, factor) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60_000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

fn parse_wrk(out: &str) -> anyhow::Result<Run> {
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    let (mut non_2xx, mut errors, mut server_errors) = (0, 0, 0);
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["50%", v] => p50 = parse_duration_ms(v),
            ["99%", v] => p99 = parse_duration_ms(v),
            ["Non-2xx", "or", "3xx", "responses:", v] => non_2xx = v.parse().unwrap_or(0),
            ["5xx:", v] => server_errors = v.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                errors = rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum();
            }
            _ => {}
        }
    }
    Ok(Run {
        rps: rps.context("no Requests/sec in wrk's output")?,
        p50_ms: p50.context("no 50% latency in wrk's output (--latency)")?,
        p99_ms: p99.context("no 99% latency in wrk's output (--latency)")?,
        non_2xx,
        errors,
        server_errors,
    })
}

struct Wrk {
    threads: u32,
    connections: u32,
    secs: u64,
    scripts: tempfile::TempDir,
}

impl Wrk {
    fn run(&self, url: &str, script: Option<&str>) -> anyhow::Result<Run> {
        let mut cmd = Command::new("wrk");
        cmd.args(["--latency", "-t", &self.threads.to_string(), "-c", &self.connections.to_string()]);
        cmd.args(["-d", &format!("{}s", self.secs), "--timeout", "10s"]);
        if let Some(script) = script {
            let path = self.scripts.path().join(format!("s{}.lua", rand_suffix()));
            std::fs::write(&path, script)?;
            cmd.arg("-s").arg(&path);
        }
        let out = cmd.arg(url).output().context("run wrk (install Debian's wrk package)")?;
        if !out.status.success() {
            bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        parse_wrk(&String::from_utf8_lossy(&out.stdout))
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick") || env::<String>("API_BENCH_QUICK").is_some_and(|v| v != "0");
    if Command::new("wrk").arg("--version").output().is_err() {
        bail!("wrk is not installed: apt-get install wrk");
    }
    let wrk = Wrk {
        threads: env("API_BENCH_THREADS").unwrap_or(2),
        connections: env("API_BENCH_CONNECTIONS").unwrap_or(64),
        secs: env("API_BENCH_SECS").unwrap_or(if quick { 5 } else { 15 }),
        scripts: tempfile::tempdir()?,
    };
    let reps: usize = env("API_BENCH_REPS").unwrap_or(if quick { 1 } else { 3 });
    let cluster = Cluster::start(1, &["--webhook-secret", WEBHOOK_SECRET]).await.context("start a controller")?;
    let base = cluster.nodes[0].url();
    let pid = cluster.nodes[0].pid().context("controller pid")?;
    for i in 0..200 {
        let (status, body) =
            cluster.api.post(&format!("{base}/api/v1/projects"), &json!({"name": format!("seed-{i}")})).await?;
        if status != 201 {
            bail!("seeding answered {status}: {body}");
        }
    }
    let token = cluster.api.token.clone();
    let auth = format!("wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n");
    let read_script = auth.clone();
    let write_script = format!(
        "{auth}wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
         local counter = 0\nlocal threads = 0\n\
         function setup(thread)\n  threads = threads + 1\n  thread:set(\"tid\", threads)\nend\n\
         function init(args)\n  prefix = tostring(tid) .. \"-\" .. tostring(os.time())\nend\n\
         request = function()\n  counter = counter + 1\n  \
         return wrk.format(nil, nil, nil, '{{\"name\":\"w' .. prefix .. '-' .. counter .. '\"}}')\nend\n"
    );
    // Webhook deliveries: a forged signature (401), and a signed push of a repository no service
    // builds (202, ignored): both verified before anything else, neither writes.
    let push = serde_json::to_string(&json!({
        "ref": "refs/heads/main",
        "after": "0123456789abcdef0123456789abcdef01234567",
        "deleted": false,
        "repository": {"full_name": "acme/none", "clone_url": "https://git.example.invalid/acme/none.git", "default_branch": "main"}
    }))?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, WEBHOOK_SECRET.as_bytes());
    let signature = format!("sha256={}", hex::encode(ring::hmac::sign(&key, push.as_bytes()).as_ref()));
    let count_5xx = "local threads = {}\nfunction setup(thread)\n  table.insert(threads, thread)\nend\n\
         function init(args)\n  fivexx = 0\nend\n\
         function response(status, headers, body)\n  if status >= 500 then fivexx = fivexx + 1 end\nend\n\
         function done(summary, latency, requests)\n  local n = 0\n  \
         for _, t in ipairs(threads) do n = n + t:get(\"fivexx\") end\n  io.write(\"5xx: \" .. n .. \"\\n\")\nend\n";
    let hook = |signature: &str| {
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"X-GitHub-Event\"] = \"push\"\nwrk.headers[\"X-GitHub-Delivery\"] = \"bench\"\n\
             wrk.headers[\"X-Hub-Signature-256\"] = \"{signature}\"\nwrk.body = [[{push}]]\n{count_5xx}"
        )
    };
    let forged_script = hook(&format!("sha256={}", "0".repeat(64)));
    let signed_script = hook(&signature);
    println!(
        "api bench: 1 controller (release), wrk -t{} -c{} for {} s per run, {reps} run(s) each, interleaved",
        wrk.threads, wrk.connections, wrk.secs
    );
    let mut results: Vec<(&str, Vec<Run>, Vec<f64>)> = vec![
        ("GET /api/v1/health (baseline)", vec![], vec![]),
        ("GET /api/v1/projects", vec![], vec![]),
        ("POST /api/v1/projects", vec![], vec![]),
        ("POST /webhooks/github, forged", vec![], vec![]),
        ("POST /webhooks/github, signed", vec![], vec![]),
    ];
    for rep in 0..reps {
        for (i, (name, url, script)) in [
            ("health", format!("{base}/api/v1/health"), None),
            ("reads", format!("{base}/api/v1/projects"), Some(read_script.as_str())),
            ("writes", format!("{base}/api/v1/projects"), Some(write_script.as_str())),
            ("forged", format!("{base}/webhooks/github"), Some(forged_script.as_str())),
            ("signed", format!("{base}/webhooks/github"), Some(signed_script.as_str())),
        ]
        .into_iter()
        .enumerate()
        {
            let cpu0 = cpu_seconds(pid);
            let run = wrk.run(&url, script)?;
            let cpu = (cpu_seconds(pid) - cpu0) / wrk.secs as f64 * 100.0;
            println!(
                "  run {}/{reps} {name:<7} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  non-2xx {}  5xx {}  errors {}  controller cpu {:.0}%",
                rep + 1,
                run.rps,
                run.p50_ms,
                run.p99_ms,
                run.non_2xx,
                run.server_errors,
                run.errors,
                cpu
            );
            results[i].1.push(run);
            results[i].2.push(cpu);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    println!("\n== API throughput, medians of {reps} run(s) ==");
    let baseline = median(results[0].1.iter().map(|r| r.rps).collect());
    for (i, (name, runs, cpu)) in results.iter().enumerate() {
        let rps = median(runs.iter().map(|r| r.rps).collect());
        let p50 = median(runs.iter().map(|r| r.p50_ms).collect());
        let p99 = median(runs.iter().map(|r| r.p99_ms).collect());
        // A forged delivery is refused by design: its 401s are not failures.
        let bad: u64 = runs.iter().map(|r| if i == 3 { r.errors } else { r.non_2xx + r.errors }).sum();
        let verdict = match i {
            1 => format!(
                "  targets >= {TARGET_READS:.0}/s: {}, p99 <= {TARGET_READ_P99_MS:.0} ms: {}",
                if rps >= TARGET_READS { "met" } else { "MISSED" },
                if p99 <= TARGET_READ_P99_MS { "met" } else { "MISSED" }
            ),
            3 | 4 => {
                let fives: u64 = runs.iter().map(|r| r.server_errors).sum();
                format!(
                    "  target >= {TARGET_WEBHOOKS:.0}/s without a 5xx: {} ({fives} 5xx)",
                    if rps >= TARGET_WEBHOOKS && fives == 0 { "met" } else { "MISSED" }
                )
            }
            _ => String::new(),
        };
        println!(
            "  {name:<30} {rps:>8.0} req/s ({:.2} of baseline)  p50 {p50:.2} ms  p99 {p99:.2} ms  controller cpu {:.0}%  non-2xx/errors {bad}{verdict}",
            rps / baseline,
            median(cpu.clone())
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at the end: {} (wrk shares the 2 cores with the controller)",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 5s test\n  Latency Distribution\n     50%  1.20ms\n     99%  12.50ms\n  \
                   Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\n\
                   Requests/sec:  21234.56\n5xx: 2\n";
        let run = super::parse_wrk(out).unwrap();
        assert_eq!(run.rps, 21234.56);
        assert_eq!(run.p50_ms, 1.2);
        assert_eq!(run.p99_ms, 12.5);
        assert_eq!((run.non_2xx, run.errors, run.server_errors), (4, 3, 2));
        assert_eq!(super::parse_duration_ms("850.00us"), Some(0.85));
    }
}
