//! Without a quorum there is no leader: the API says so with a 503 and a clear message, and
//! nothing is written; once a quorum is back, writes succeed again.

use std::time::Duration;

use deployer_tests::{wait_for, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_without_a_quorum_answer_503_and_resume_after() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, &[]).await?;
    let (status, _) = cluster.create_project(0, "before").await?;
    assert_eq!(status, 201);

    // Two of three controllers gone: the survivor cannot commit anything.
    let survivor = cluster.leader().await?;
    let others: Vec<usize> = (0..3).filter(|i| *i != survivor).collect();
    for &i in &others {
        cluster.nodes[i].kill9();
    }
    // The first writes may wait for a commit that cannot come (503 "unconfirmed": the outcome is
    // unknown until the quorum is back); once the leader notices it is cut off, it refuses at
    // once without writing anything (503 "no_quorum").
    let mut attempt = 0;
    let refused = wait_for("the leader to refuse writes for lack of quorum", Duration::from_secs(60), || {
        attempt += 1;
        let name = format!("during-{attempt}");
        let cluster = &cluster;
        async move {
            let (status, body) = cluster.create_project(survivor, &name).await.ok()?;
            assert_eq!(status, 503, "answer without quorum: {body}");
            let code = body["error"]["code"].as_str().unwrap_or_default().to_string();
            assert!(["unconfirmed", "no_quorum", "no_leader"].contains(&code.as_str()), "{body}");
            (code == "no_quorum").then(|| (name, body["error"]["message"].as_str().unwrap_or_default().to_string()))
        }
    })
    .await?;
    let (refused_name, message) = refused;
    assert!(message.contains("majority") && message.contains("nothing was written"), "{message}");

    // One peer back: a quorum again, writes go through, and the refused write never appeared.
    cluster.nodes[others[0]].start(&[])?;
    let names = wait_for("a write to succeed after the quorum is back", Duration::from_secs(30), || async {
        match cluster.create_project(survivor, "after").await {
            Ok((201, _)) | Ok((409, _)) => cluster.project_names(survivor).await.ok(),
            _ => None,
        }
    })
    .await?;
    assert!(names.contains(&"before".to_string()) && names.contains(&"after".to_string()), "{names:?}");
    assert!(!names.contains(&refused_name), "a write refused for lack of quorum must not be applied: {names:?}");
    Ok(())
}
