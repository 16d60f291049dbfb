//! A replicated controller cluster as its users see it: any node takes a write, every node reads
//! it back (reads pass a read barrier, so they need no waiting), leaders fail over, lagging and
//! restarted nodes catch up from the log or from a snapshot, and every acknowledged write
//! survives a restart of the whole cluster, graceful or not.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployer_tests::{wait_for, Api, Cluster};
use serde_json::Value;
use sqlx::Connection;

const CATCH_UP: Duration = Duration::from_secs(30);

/// Asserts that node `i` lists at least the projects in `expected`.
async fn assert_lists(cluster: &Cluster, i: usize, expected: &BTreeSet<String>) {
    let listed: BTreeSet<String> = cluster.project_names(i).await.expect("list projects").into_iter().collect();
    let missing: Vec<&String> = expected.difference(&listed).collect();
    assert!(missing.is_empty(), "node {i} does not list {missing:?}");
}

/// Waits until node `i` answers a listing that holds every project in `expected` (it may be
/// restarting, electing or catching up until then).
async fn wait_lists(cluster: &Cluster, i: usize, expected: &BTreeSet<String>) {
    wait_for(&format!("node {i} to list {} projects", expected.len()), CATCH_UP, || async {
        let listed: BTreeSet<String> = cluster.project_names(i).await.ok()?.into_iter().collect();
        listed.is_superset(expected).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nnode {i} output:\n{}", cluster.nodes[i].log_text()));
}

/// Creates `names` through node `i`, asserting each is acknowledged with 201.
async fn create_all(cluster: &Cluster, i: usize, names: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    let mut created = BTreeSet::new();
    for name in names {
        let (status, body) = cluster.create_project(i, &name).await.expect("create project");
        assert_eq!(status, 201, "creating {name} on node {i}: {body}");
        created.insert(name);
    }
    created
}

/// Waits until every running node reports the same leader, other than `not`, and `voters`
/// voters, and returns the leader's id.
async fn wait_agreed_leader(cluster: &Cluster, voters: usize, not: Option<u64>) -> u64 {
    let running: Vec<usize> = (0..cluster.nodes.len()).filter(|&i| cluster.nodes[i].pid().is_some()).collect();
    wait_for("the running nodes to agree on a leader", CATCH_UP, || async {
        let mut leaders = BTreeSet::new();
        for &i in &running {
            let view = cluster.cluster_view(i).await.ok()?;
            let nodes = view["nodes"].as_array()?;
            if nodes.iter().filter(|n| n["voter"] == true).count() != voters {
                return None;
            }
            leaders.insert(view["leader_id"].as_u64()?);
        }
        let leaders_agree = leaders.len() == 1;
        let leader = leaders.into_iter().next()?;
        (leaders_agree && Some(leader) != not).then_some(leader)
    })
    .await
    .expect("an agreed leader")
}

/// The cluster's id for node `i`, from its own cluster view (matched by gRPC address).
async fn node_id(cluster: &Cluster, i: usize) -> u64 {
    let view = cluster.cluster_view(i).await.expect("cluster view");
    let addr = cluster.nodes[i].grpc_addr();
    view["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["addr"] == addr.as_str()))
        .and_then(|n| n["id"].as_u64())
        .unwrap_or_else(|| panic!("node {i} ({addr}) is not in {view}"))
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|k| format!("{prefix}-{k}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_on_a_follower_is_read_on_every_node() {
    let cluster = Cluster::start(3, &[]).await.expect("start three controllers");
    let leader = cluster.leader().await.expect("a leader");
    let follower = (0..3).find(|&i| i != leader).unwrap();

    let (status, body) = cluster.create_project(follower, "from-follower").await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["name"], "from-follower");

    // No waiting: a listing on any node goes through a read barrier, so it sees every write
    // acknowledged before it began.
    let expected = BTreeSet::from(["from-follower".to_string()]);
    for i in 0..3 {
        assert_lists(&cluster, i, &expected).await;
    }

    // Every node shows the same leader and the same three voters, at the addresses the nodes
    // listen on.
    let leader_id = wait_agreed_leader(&cluster, 3, None).await;
    let addrs: BTreeSet<String> = cluster.nodes.iter().map(|n| n.grpc_addr()).collect();
    let mut ids = BTreeSet::new();
    for i in 0..3 {
        let view = cluster.cluster_view(i).await.unwrap();
        let nodes = view["nodes"].as_array().unwrap();
        let listed: BTreeSet<String> = nodes.iter().map(|n| n["addr"].as_str().unwrap().to_string()).collect();
        assert_eq!(listed, addrs, "node {i}: {view}");
        assert!(nodes.iter().all(|n| n["voter"] == true), "node {i}: {view}");
        ids.insert(node_id(&cluster, i).await);
    }
    assert_eq!(ids.len(), 3, "three distinct node ids: {ids:?}");
    assert!(ids.contains(&leader_id), "the leader {leader_id} is one of {ids:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn after_kill9_of_the_leader_a_new_one_takes_writes_and_the_old_one_catches_up() {
    let mut cluster = Cluster::start(3, &[]).await.expect("start three controllers");
    let old = cluster.leader().await.expect("a leader");
    let old_id = node_id(&cluster, old).await;
    let mut expected = create_all(&cluster, old, names("before", 5)).await;

    cluster.nodes[old].kill9();

    // The survivors elect one of themselves.
    let new_id = wait_agreed_leader(&cluster, 3, Some(old_id)).await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let mut survivor_ids = Vec::new();
    for &i in &survivors {
        survivor_ids.push(node_id(&cluster, i).await);
    }
    assert!(survivor_ids.contains(&new_id), "the new leader {new_id} is a survivor: {survivor_ids:?}");
    for (k, &i) in survivors.iter().enumerate() {
        expected.extend(create_all(&cluster, i, names(&format!("after-{k}"), 5)).await);
    }
    for &i in &survivors {
        assert_lists(&cluster, i, &expected).await;
    }

    // Same data dir, same ports.
    cluster.nodes[old].start(&[]).expect("restart the killed node");
    wait_lists(&cluster, old, &expected).await;
    // ... and agrees with the others on who leads.
    wait_agreed_leader(&cluster, 3, None).await;
}

/// `snapshots/current.json` of a data dir, if a snapshot was built or installed there.
fn current_snapshot(dir: &Path) -> Option<Value> {
    let bytes = std::fs::read(dir.join("snapshots/current.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn snapshot_index(snapshot: &Value) -> u64 {
    snapshot["meta"]["last_log_id"]["index"].as_u64().unwrap_or(0)
}

/// What a node's Raft log still holds, read from its `raft-log.db` (read-only; the node may be
/// running).
struct LogExtent {
    first: Option<u64>,
    last: Option<u64>,
    /// The index the log was purged up to (0: never purged).
    purged: u64,
}

async fn log_extent(dir: &Path) -> anyhow::Result<LogExtent> {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join("raft-log.db")).read_only(true);
    let mut db = sqlx::SqliteConnection::connect_with(&options).await?;
    let (first, last): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT MIN(idx), MAX(idx) FROM log").fetch_one(&mut db).await?;
    let purged: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT value FROM log_meta WHERE key = 'last_purged'").fetch_optional(&mut db).await?;
    db.close().await?;
    let purged = match purged {
        Some(bytes) => serde_json::from_slice::<Value>(&bytes)?["index"].as_u64().unwrap_or(0),
        None => 0,
    };
    Ok(LogExtent { first: first.map(|i| i as u64), last: last.map(|i| i as u64), purged })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_was_down_while_the_log_was_purged_catches_up_through_a_snapshot() {
    let mut cluster = Cluster::start(
        3,
        // Small chunks, so the snapshot (tens of KiB) crosses in many InstallSnapshot calls.
        &["--raft-snapshot-logs", "20", "--raft-keep-logs", "0", "--raft-snapshot-chunk-bytes", "4096"],
    )
    .await
    .expect("start three controllers");
    let leader = cluster.leader().await.expect("a leader");
    let lagging = (0..3).find(|&i| i != leader).unwrap();
    let mut expected = create_all(&cluster, leader, names("early", 3)).await;
    assert_lists(&cluster, lagging, &expected).await;

    cluster.nodes[lagging].kill9();
    let lagging_last = log_extent(&cluster.nodes[lagging].dir)
        .await
        .expect("read the lagging node's log")
        .last
        .expect("the lagging node has a log");

    expected.extend(create_all(&cluster, leader, names("while-down", 120)).await);

    // The leader snapshots and purges its log past everything the lagging node holds, so the
    // log alone can no longer bring it up to date.
    let leader_dir = cluster.nodes[leader].dir.clone();
    wait_for("the leader to snapshot and purge its log", CATCH_UP, || async {
        let snapshot = current_snapshot(&leader_dir)?;
        let log = log_extent(&leader_dir).await.ok()?;
        let needed = lagging_last + 1;
        (snapshot_index(&snapshot) > lagging_last + 100 && log.purged >= needed && log.first.is_none_or(|f| f > needed))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nleader output:\n{}", cluster.nodes[leader].log_text()));

    cluster.nodes[lagging].start(&[]).expect("restart the lagging node");
    wait_lists(&cluster, lagging, &expected).await;

    // It got there by installing a snapshot that a running node built.
    let output = cluster.nodes[lagging].log_text();
    assert!(output.contains("installed snapshot"), "the lagging node installed a snapshot:\n{output}");
    let installed = current_snapshot(&cluster.nodes[lagging].dir).expect("the lagging node keeps the snapshot");
    let built: Vec<Value> = (0..3)
        .filter(|&i| i != lagging)
        .filter_map(|i| current_snapshot(&cluster.nodes[i].dir))
        .map(|s| s["meta"]["snapshot_id"].clone())
        .collect();
    assert!(
        built.contains(&installed["meta"]["snapshot_id"]),
        "the installed snapshot {} is one the others built: {built:?}",
        installed["meta"]["snapshot_id"]
    );
    assert!(snapshot_index(&installed) > lagging_last + 100, "{installed}");
}

/// Writes projects named `<prefix>-<worker>-<n>` through every node, a few at a time, until
/// stopped, and records the names whose creation was acknowledged (201).
struct Writer {
    acknowledged: Arc<Mutex<BTreeSet<String>>>,
    stop: tokio::sync::watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Writer {
    const WORKERS: usize = 4;

    fn start(cluster: &Cluster, prefix: &str) -> Writer {
        let urls: Vec<String> = cluster.nodes.iter().map(|n| format!("{}/api/v1/projects", n.url())).collect();
        let api = Api {
            client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
            token: cluster.api.token.clone(),
        };
        let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let workers = (0..Self::WORKERS)
            .map(|w| {
                let (api, urls, stopped, acks) = (api.clone(), urls.clone(), stopped.clone(), acknowledged.clone());
                let prefix = format!("{prefix}-{w}");
                tokio::spawn(async move {
                    for n in 0.. {
                        if *stopped.borrow() {
                            return;
                        }
                        let name = format!("{prefix}-{n}");
                        let body = serde_json::json!({ "name": name });
                        if let Ok((201, _)) = api.post(&urls[(w + n) % urls.len()], &body).await {
                            acks.lock().unwrap().insert(name);
                        }
                    }
                })
            })
            .collect();
        Writer { acknowledged, stop, workers }
    }

    fn count(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    async fn finish(self) -> BTreeSet<String> {
        let _ = self.stop.send(true);
        for worker in self.workers {
            worker.await.expect("writer task");
        }
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        acknowledged
    }
}

async fn wait_acknowledged(writer: &Writer, n: usize) {
    wait_for(&format!("{n} acknowledged writes"), CATCH_UP, || async { (writer.count() >= n).then_some(()) })
        .await
        .expect("writes are acknowledged");
}

async fn restart_all_and_check(cluster: &mut Cluster, acknowledged: &BTreeSet<String>) {
    for node in &mut cluster.nodes {
        node.start(&[]).expect("restart");
    }
    for i in 0..cluster.nodes.len() {
        wait_lists(cluster, i, acknowledged).await;
    }
    wait_agreed_leader(cluster, 3, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_acknowledged_write_survives_sigterm_of_the_whole_cluster() {
    let mut cluster = Cluster::start(3, &[]).await.expect("start three controllers");
    let writer = Writer::start(&cluster, "graceful");
    wait_acknowledged(&writer, 30).await;

    // Writes keep coming while the nodes drain one after the other.
    for i in 0..3 {
        let node = &mut cluster.nodes[i];
        let status = tokio::task::block_in_place(|| node.stop()).expect("stop");
        assert!(status.success(), "node {i} exits 0 on SIGTERM: {status:?}\n{}", node.log_text());
    }
    let acknowledged = writer.finish().await;
    assert!(acknowledged.len() >= 30);

    restart_all_and_check(&mut cluster, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_acknowledged_write_survives_kill9_of_the_whole_cluster() {
    let mut cluster = Cluster::start(3, &[]).await.expect("start three controllers");
    let writer = Writer::start(&cluster, "abrupt");
    wait_acknowledged(&writer, 30).await;

    // Killed mid-stream: writes in flight may or may not have committed, but every one that was
    // answered 201 must be there after the restart.
    for node in &mut cluster.nodes {
        node.kill9();
    }
    let acknowledged = writer.finish().await;
    assert!(acknowledged.len() >= 30);

    restart_all_and_check(&mut cluster, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_a_node_cleanly_and_it_resumes_from_its_data_dir() {
    let mut cluster = Cluster::start(1, &[]).await.expect("start a controller");
    let expected = create_all(&cluster, 0, names("kept", 3)).await;

    let status = tokio::task::block_in_place(|| cluster.nodes[0].stop()).expect("exits within the deadline");

    let output = cluster.nodes[0].log_text();
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}\n{output}");
    for step in ["HTTP API stopped", "gRPC stopped", "Raft stopped"] {
        assert!(output.contains(step), "the log reports {step:?}:\n{output}");
    }
    cluster.nodes[0].start(&[]).expect("restart");
    wait_lists(&cluster, 0, &expected).await;
}

/// A node authenticates API tokens against its own copy of the state, which may be behind the
/// cluster: just after joining, after a slow replication, or when its state database lost its
/// last transactions (power loss; here, deterministically, lost entirely). It must not tell the
/// holder of a valid token that the token is invalid: until it has caught up it answers 503 (no
/// leader to catch up from), then it serves the request.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_state_is_behind_never_calls_a_valid_token_invalid() {
    let mut cluster = Cluster::start(3, &[]).await.expect("start three controllers");
    let leader = cluster.leader().await.expect("a leader");
    let expected = create_all(&cluster, leader, names("before", 2)).await;
    let behind = (0..3).find(|&i| i != leader).unwrap();
    for node in &mut cluster.nodes {
        node.kill9();
    }
    for file in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(cluster.nodes[behind].dir.join(file));
    }

    // Alone, with its log but no applied state, it cannot catch up yet.
    cluster.nodes[behind].start(&[]).expect("restart");
    let url = cluster.nodes[behind].url();
    wait_for("the node to serve HTTP", CATCH_UP, || async {
        deployer_tests::answer(cluster.api.client.get(format!("{url}/api/v1/health"))).await.ok().map(|_| ())
    })
    .await
    .expect("the node serves HTTP");
    let (status, body) = cluster.api.get(&format!("{url}/api/v1/projects")).await.expect("an answer");
    assert_eq!(status, 503, "the admin token is valid; the node is only behind: {body}");

    // With its peers back it catches up and serves the same token.
    for i in (0..3).filter(|&i| i != behind) {
        cluster.nodes[i].start(&[]).expect("restart");
    }
    wait_lists(&cluster, behind, &expected).await;
}
