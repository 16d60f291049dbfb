//! The OpenAPI description at `/api/openapi.json`: served without credentials, valid OpenAPI 3
//! (by openapi-spec-validator), describing only routes the controller serves; and a property-based
//! run of schemathesis against the live API, with the admin token, finds no 5xx answer.
//!
//! The Python tools are installed by `scripts/test` in a virtualenv that `DEPLOYER_PYTHON` names
//! (its `schemathesis` beside it); without them this test fails and says how to get them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use deployer_tests::{answer, Cluster};
use serde_json::{json, Value};

/// The Python interpreter with the tools, and the schemathesis command.
fn python_tools() -> (PathBuf, PathBuf) {
    match std::env::var_os("DEPLOYER_PYTHON") {
        Some(python) => {
            let python = PathBuf::from(python);
            let schemathesis = python.parent().map(|d| d.join("schemathesis")).unwrap_or_default();
            (python, schemathesis)
        }
        None => ("python3".into(), "schemathesis".into()),
    }
}

const HOW_TO_INSTALL: &str =
    "run the tests with scripts/test, which installs openapi-spec-validator and schemathesis in \
     target/py and sets DEPLOYER_PYTHON (or install them and point DEPLOYER_PYTHON at that python)";

/// Runs `program args` in `dir` within `limit`; returns its exit success and its output.
async fn run(program: &Path, args: &[&str], dir: &Path, limit: Duration) -> (bool, String) {
    let child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}; {HOW_TO_INSTALL}", program.display()));
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not finish within {limit:?}", program.display()))
        .expect("output");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test]
async fn openapi_description_is_valid_and_the_api_gives_schemathesis_no_5xx() {
    let cluster = Cluster::start(1, &[]).await.expect("cluster");
    let base = cluster.nodes[0].url();
    let api = &cluster.api;

    // Served without credentials, as JSON.
    let response = reqwest::get(format!("{base}/api/openapi.json")).await.expect("GET /api/openapi.json");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let doc: Value = response.json().await.expect("JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "openapi: {}", doc["openapi"]);
    assert_eq!(doc["info"]["title"], "Deployer API");

    // Every described operation is served: none gets the answer for an unknown route or method.
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 20, "only {} paths described", paths.len());
    for (path, item) in paths {
        let concrete = path.split('/').map(|s| if s.starts_with('{') { "x" } else { s }).collect::<Vec<_>>().join("/");
        let url = format!("{base}{concrete}");
        for method in item.as_object().expect("path item").keys() {
            let request = match method.as_str() {
                "get" => api.client.get(&url),
                "delete" => api.client.delete(&url),
                "post" => api.client.post(&url).json(&json!({})),
                "patch" => api.client.patch(&url).json(&json!({})),
                "put" => api.client.put(&url).json(&json!({})),
                other => panic!("{other} {path}: a method the API does not use"),
            };
            let (status, body) = answer(request.bearer_auth(&api.token)).await.expect("request");
            assert_ne!(status, 405, "{method} {path} is described but not served");
            assert_ne!(body["error"]["message"], "no such route", "{method} {path} is described but not served");
            assert!(status < 500, "{method} {path} answered {status}: {body}");
        }
    }

    let (python, schemathesis) = python_tools();
    let dir = cluster.root.clone();
    let file = dir.join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).expect("serialize")).expect("write the description");

    // Valid OpenAPI (3.0 or 3.1, whichever it declares).
    let file_arg = file.to_str().expect("utf-8 path");
    let (ok, output) = run(&python, &["-m", "openapi_spec_validator", file_arg], &dir, Duration::from_secs(120)).await;
    assert!(ok, "openapi-spec-validator refused the description ({HOW_TO_INSTALL} if it is missing):\n{output}");

    // Property-based requests against the live API: no answer may be a 5xx.
    let schema_url = format!("{base}/api/openapi.json");
    let auth = format!("Authorization: Bearer {}", api.token);
    let args = [
        "run",
        &schema_url,
        "--url",
        &base,
        "-H",
        &auth,
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "30",
        "--request-timeout",
        "30",
        "--generation-database",
        "none",
        "--no-color",
    ];
    let (ok, output) = run(&schemathesis, &args, &dir, Duration::from_secs(600)).await;
    let output = output.replace(&api.token, "<admin token>");
    println!("{output}");
    assert!(ok, "schemathesis found failures ({HOW_TO_INSTALL} if it is missing):\n{output}");
    assert!(output.contains("generated"), "schemathesis ran no test case:\n{output}");

    // The controller is still up and serving.
    let (status, _) = api.get(&format!("{base}/api/v1/health")).await.expect("health");
    assert_eq!(status, 200);
}
