//! Services as users define them: the full spec, secrets that are sealed and never shown again,
//! edits, dependencies without cycles, domains claimed once, and bad input refused with a message
//! naming the field, with nothing written.

use deployer_tests::{files_containing, Cluster};
use serde_json::{json, Value};

#[tokio::test]
async fn services_specs_secrets_dependencies_and_domains() {
    let cluster = Cluster::start(1, &[]).await.expect("cluster");
    let base = cluster.nodes[0].url();
    let api = &cluster.api;
    let (status, project) = api.post(&format!("{base}/api/v1/projects"), &json!({"name": "shop"})).await.unwrap();
    assert_eq!(status, 201);
    let pid = project["id"].as_str().unwrap().to_string();
    let services = format!("{base}/api/v1/projects/{pid}/services");

    // A database from an image, with defaults filled in.
    let (status, db) =
        api.post(&services, &json!({"name": "db", "source": {"image": "postgres:17"}, "port": 5432})).await.unwrap();
    assert_eq!(status, 201, "{db}");
    assert_eq!(db["replicas"], 1);
    assert_eq!(db["resources"], json!({"cpu_millis": 500, "memory_bytes": 536870912}));
    assert_eq!(db["health_check"], json!({"path": "/"}));

    // A web service from git with env, secrets, a dependency and a domain.
    const SECRET: &str = "s3cr3t-value-that-must-never-leak-7f2c9";
    let web_spec = json!({
        "name": "web",
        "source": {"git": {"url": "https://git.example.com/shop.git", "branch": "main", "dockerfile": "docker/Dockerfile"}},
        "port": 3000,
        "env": {"RUST_LOG": "info", "MODE": "production"},
        "secrets": {"DATABASE_PASSWORD": SECRET},
        "replicas": 2,
        "resources": {"cpu_millis": 250, "memory_bytes": 268435456},
        "health_check": {"path": "/healthz"},
        "depends_on": ["db"],
        "domains": ["shop.example.com"]
    });
    let (status, web) = api.post(&services, &web_spec).await.unwrap();
    assert_eq!(status, 201, "{web}");
    let wid = web["id"].as_str().unwrap().to_string();
    assert_eq!(web["secrets"], json!({"DATABASE_PASSWORD": "********"}));
    assert_eq!(web["source"]["git"]["dockerfile"], "docker/Dockerfile");
    let (status, shown) = api.get(&format!("{services}/{wid}")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(shown["secrets"], json!({"DATABASE_PASSWORD": "********"}));
    assert_eq!(shown["env"], json!({"MODE": "production", "RUST_LOG": "info"}));
    assert_eq!(shown["depends_on"], json!(["db"]));
    assert!(!shown.to_string().contains(SECRET));
    let (_, listed) = api.get(&services).await.unwrap();
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["db", "web"]);

    // Edits: env and secrets set and unset, other fields kept.
    let (status, patched) = api
        .patch(
            &format!("{services}/{wid}"),
            &json!({"env": {"MODE": null, "FEATURE": "on"}, "secrets": {"API_KEY": "k-123456789"}, "replicas": 3}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["env"], json!({"FEATURE": "on", "RUST_LOG": "info"}));
    assert_eq!(patched["secrets"], json!({"API_KEY": "********", "DATABASE_PASSWORD": "********"}));
    assert_eq!(patched["replicas"], 3);
    assert_eq!(patched["port"], 3000);
    let (status, _) = api.patch(&format!("{services}/{wid}"), &json!({"secrets": {"API_KEY": null}})).await.unwrap();
    assert_eq!(status, 200);
    let (_, shown) = api.get(&format!("{services}/{wid}")).await.unwrap();
    assert_eq!(shown["secrets"], json!({"DATABASE_PASSWORD": "********"}));

    // The secret is nowhere in the controller's files (database, Raft log, snapshots) or logs.
    let leaked = files_containing(&cluster.nodes[0].dir, SECRET.as_bytes());
    assert!(leaked.is_empty(), "the secret is in plaintext in {leaked:?}");
    assert!(!cluster.nodes[0].log_text().contains(SECRET), "the secret is in the controller's log");

    // Bad input: each answer names the field; nothing is written.
    let bad: Vec<(Value, u16, &str)> = vec![
        (json!({"name": "Web2", "source": {"image": "x"}}), 422, "name"),
        (json!({"name": "web2"}), 422, "source is required"),
        (json!({"name": "web2", "source": {"image": "x"}, "colour": "red"}), 422, "colour"),
        (json!({"name": "web2", "source": {"image": "x"}, "port": "eighty"}), 422, "port"),
        (json!({"name": "web2", "source": {"image": "x"}, "port": 0}), 422, "port"),
        (json!({"name": "web2", "source": {"image": "x", "git": {"url": "https://x"}}}), 422, "invalid request body"),
        (json!({"name": "web2", "source": {"git": {"url": "ftp://x"}}}), 422, "source.git.url"),
        (
            json!({"name": "web2", "source": {"git": {"url": "https://x", "dockerfile": "../../etc/passwd"}}}),
            422,
            "source.git.dockerfile",
        ),
        (json!({"name": "web2", "source": {"image": "x"}, "env": {"1BAD": "x"}}), 422, "env"),
        (
            json!({"name": "web2", "source": {"image": "x"}, "env": {"A": "x"}, "secrets": {"A": "y"}}),
            422,
            "both in env and in secrets",
        ),
        (json!({"name": "web2", "source": {"image": "x"}, "domains": ["Not A Host"]}), 422, "domains"),
        (json!({"name": "web2", "source": {"image": "x"}, "depends_on": ["nope"]}), 422, "depends_on"),
        (
            json!({"name": "web2", "source": {"image": "x"}, "resources": {"cpu_millis": 1}}),
            422,
            "resources.cpu_millis",
        ),
        (
            json!({"name": "web2", "source": {"image": "x"}, "health_check": {"path": "healthz"}}),
            422,
            "health_check.path",
        ),
        (json!({"name": "web", "source": {"image": "x"}}), 409, "already exists"),
        (
            json!({"name": "web2", "source": {"image": "x"}, "domains": ["shop.example.com"]}),
            409,
            "domain shop.example.com",
        ),
    ];
    for (body, status, needle) in bad {
        let (got, answer) = api.post(&services, &body).await.unwrap();
        assert_eq!(got, status, "{body} -> {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body}: the message should name {needle:?}: {message}");
    }
    let (_, listed) = api.get(&services).await.unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "refused requests wrote nothing: {listed}");

    // Dependencies: no cycles, and a service others depend on stays until they let go.
    let (status, body) = api
        .patch(&format!("{services}/{}", db["id"].as_str().unwrap()), &json!({"depends_on": ["web"]}))
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("db -> web -> db"), "{body}");
    let (status, body) =
        api.delete(&format!("{services}/{}", db["id"].as_str().unwrap())).await.map(|s| (s, ())).unwrap();
    assert_eq!(status, 409, "{body:?}");
    let (status, body) = api.patch(&format!("{services}/{wid}"), &json!({"name": "renamed"})).await.unwrap();
    assert_eq!(status, 422, "{body}");
    let (status, _) = api.patch(&format!("{services}/{wid}"), &json!({"depends_on": []})).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(api.delete(&format!("{services}/{}", db["id"].as_str().unwrap())).await.unwrap(), 204);
    assert_eq!(api.delete(&format!("{services}/{}", db["id"].as_str().unwrap())).await.unwrap(), 404);

    // A domain is claimed once across projects; freed when its service goes.
    let (_, other) = api.post(&format!("{base}/api/v1/projects"), &json!({"name": "other"})).await.unwrap();
    let other_services = format!("{base}/api/v1/projects/{}/services", other["id"].as_str().unwrap());
    let claim = json!({"name": "site", "source": {"upload": {}}, "domains": ["shop.example.com"]});
    let (status, _) = api.post(&other_services, &claim).await.unwrap();
    assert_eq!(status, 409);
    assert_eq!(api.delete(&format!("{services}/{wid}")).await.unwrap(), 204);
    let (status, site) = api.post(&other_services, &claim).await.unwrap();
    assert_eq!(status, 201, "{site}");

    // Unknown project or service ids.
    let (status, _) = api.get(&format!("{base}/api/v1/projects/nope/services")).await.unwrap();
    assert_eq!(status, 404);
    let (status, _) = api.get(&format!("{services}/nope")).await.unwrap();
    assert_eq!(status, 404);
}
