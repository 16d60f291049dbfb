//! How soon a committed route change is in force on an agent: a service's custom domains are
//! changed through the API (which answers once the change is committed and applied), then the
//! new domain is requested through the agent's ingress every millisecond until it answers.
//! The commit itself (the API call) is timed beside it as the baseline.
//!
//! Run with `cargo build --release --bins && cargo bench -p deployer-tests --bench routes`.

use std::time::{Duration, Instant};

use deployer_tests::deploy::{make_repo, Setup};
use serde_json::json;

const TRIALS: usize = 60;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let setup = Setup::start(1, 1, &[]).await;
    let repo = setup.cluster.root.join("repos").join("web");
    make_repo(&repo, &setup.base, "bench\n");
    let service = setup
        .create_service(json!({
            "name": "web",
            "source": {"git": {"url": format!("file://{}", repo.display())}},
            "port": 8080,
        }))
        .await;
    let queued = setup.deploy(&service, json!({})).await;
    let done = setup.finished(queued["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "running", "{done:#}");
    let (_, agents) = setup.cluster.api.get(&format!("{}/api/v1/agents", setup.url())).await.unwrap();
    let ingress = agents[0]["ingress"].as_str().expect("the agent's ingress").to_string();
    let port: u16 = ingress.rsplit_once(':').unwrap().1.parse().unwrap();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let service_url = format!("{}/api/v1/projects/{}/services/{service}", setup.url(), setup.project_id);

    let mut commits = Vec::new();
    let mut applied = Vec::new();
    for trial in 0..TRIALS {
        let domain = format!("r{trial}.bench.test");
        let started = Instant::now();
        let (status, body) = setup.cluster.api.patch(&service_url, &json!({"domains": [domain]})).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let committed = Instant::now();
        let url = format!("http://127.0.0.1:{port}/");
        loop {
            let answered = client.get(&url).header("host", domain.as_str()).send().await;
            if answered.is_ok_and(|r| r.status() == 200) {
                break;
            }
            assert!(committed.elapsed() < Duration::from_secs(10), "{domain} never answered");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        commits.push(committed - started);
        applied.push(committed.elapsed());
    }
    commits.sort();
    applied.sort();
    println!("route change, {TRIALS} trials (commit = the API call that commits it; in force = from then until the agent serves it)");
    println!("{:<28} {:>10} {:>10} {:>10}", "", "p50", "p90", "max");
    for (name, samples) in [("commit (baseline)", &commits), ("commit -> in force", &applied)] {
        println!(
            "{:<28} {:>10} {:>10} {:>10}",
            name,
            ms(percentile(samples, 0.5)),
            ms(percentile(samples, 0.9)),
            ms(*samples.last().unwrap())
        );
    }
}
