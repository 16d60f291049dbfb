//! Placement on 10,000 simulated agents. The target (one replica): 20,000 placements per second, 50 µs
//! each. Prints the placements per second derived from criterion's medians at the end.
//!
//! `cargo bench -p deployer-controller --bench scheduler`

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::path::PathBuf;
use std::time::SystemTime;

use criterion::Criterion;
use deployer_controller::scheduler::{place, AgentSnapshot, Request, Resources};

const AGENTS: usize = 10_000;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const GROUP: &str = "scheduler";

/// Each case: its name, how many replicas one request places, and the request.
fn cases() -> Vec<(&'static str, u32, Request)> {
    let web = |replicas| Request {
        service_id: "svc-7".into(),
        resources: Resources { cpu_millis: 500, memory_bytes: 512 * MIB },
        constraints: BTreeMap::new(),
        replicas,
        exclude: vec!["agent-00042".into()],
        seed: 0,
    };
    let mut gpu = web(1);
    gpu.constraints.insert("gpu".into(), "true".into());
    // A label only one agent has: the walk finds one feasible agent and so visits all 10,000.
    let mut pinned = web(1);
    pinned.constraints.insert("hostname".into(), "agent-04242".into());
    vec![
        ("place_1_replica", 1, web(1)),
        ("place_3_replicas_spread", 3, web(3)),
        ("place_1_replica_gpu_10pct", 1, gpu),
        ("place_1_replica_1_feasible", 1, pinned),
    ]
}

/// SplitMix64, so the simulated cluster is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
        choices[self.below(choices.len() as u64) as usize]
    }
}

/// 5% not ready; 2 to 32 CPUs and 4 to 128 GiB, 0 to 95% reserved; region, zone, disk and hostname
/// labels, gpu=true on every tenth; 0 to 5 instances of 200 services each.
fn cluster() -> Vec<AgentSnapshot> {
    let mut rng = Rng(2024);
    (0..AGENTS)
        .map(|i| {
            let id = format!("agent-{i:05}");
            let capacity = Resources {
                cpu_millis: [2000, 4000, 8000, 16000, 32000][rng.below(5) as usize],
                memory_bytes: [4, 8, 16, 32, 64, 128][rng.below(6) as usize] * GIB,
            };
            let reserved = Resources {
                cpu_millis: capacity.cpu_millis * rng.below(96) / 100,
                memory_bytes: capacity.memory_bytes * rng.below(96) / 100,
            };
            let mut labels = BTreeMap::new();
            labels.insert("region".to_owned(), rng.pick(&["eu", "us", "ap"]).to_owned());
            labels.insert("zone".to_owned(), rng.pick(&["a", "b", "c"]).to_owned());
            labels.insert("disk".to_owned(), rng.pick(&["ssd", "hdd"]).to_owned());
            labels.insert("hostname".to_owned(), id.clone());
            if i % 10 == 0 {
                labels.insert("gpu".to_owned(), "true".to_owned());
            }
            let mut instances = HashMap::new();
            for _ in 0..rng.below(6) {
                *instances.entry(format!("svc-{}", rng.below(200))).or_insert(0) += 1;
            }
            let mut agent = AgentSnapshot { id, ready: rng.below(20) != 0, labels, capacity, reserved, instances };
            if i == 4242 {
                // The one agent the pinned case can use.
                agent.ready = true;
                agent.reserved = Resources::default();
            }
            agent
        })
        .collect()
}

fn bench_place(c: &mut Criterion) {
    let agents = cluster();
    let mut group = c.benchmark_group(GROUP);
    for (name, replicas, mut request) in cases() {
        group.bench_function(name, |b| {
            b.iter(|| {
                request.seed = request.seed.wrapping_add(1);
                let placement = place(black_box(&agents), black_box(&request)).expect("the cluster has room");
                assert_eq!(placement.agents.len(), replicas as usize);
                placement
            })
        });
    }
    group.finish();
}

/// Where criterion writes its estimates: as criterion decides, except that the target directory is found
/// from this executable's path (`<target>/release/deps/`) rather than by running `cargo metadata`.
fn criterion_home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(home.into());
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(target).join("criterion"));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().map(|dir| dir.join("criterion")).find(|dir| dir.is_dir())
}

/// The median time of one request in nanoseconds, if criterion measured it in this run.
fn median_nanos(home: &std::path::Path, name: &str, since: SystemTime) -> Option<f64> {
    let path = home.join(GROUP).join(name).join("new").join("estimates.json");
    let fresh = std::fs::metadata(&path).and_then(|meta| meta.modified()).is_ok_and(|modified| modified >= since);
    if !fresh {
        return None;
    }
    let estimates: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    estimates["median"]["point_estimate"].as_f64()
}

fn print_rates(since: SystemTime) {
    let Some(home) = criterion_home() else { return };
    for (name, replicas, _) in cases() {
        let Some(nanos) = median_nanos(&home, name, since) else { continue };
        let requests = 1e9 / nanos;
        println!(
            "{GROUP}/{name}: median {:.2} µs per request, {requests:.0} requests/s, {:.0} replicas placed/s",
            nanos / 1e3,
            requests * f64::from(replicas)
        );
    }
}

fn main() {
    // Estimates older than this are from an earlier run (a filtered or `--test` run writes none).
    let started = SystemTime::now();
    let mut criterion = Criterion::default().configure_from_args();
    bench_place(&mut criterion);
    criterion.final_summary();
    print_rates(started);
}
