//! The agent's command line, as a user sees it (joining and sessions: tests/tests/agents.rs).

use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deployer-agent"))
        .args(args)
        .env_remove("DEPLOYER_CONTROLLER")
        .env_remove("DEPLOYER_JOIN_TOKEN")
        .env_remove("DEPLOYER_DATA_DIR")
        .env_remove("DEPLOYER_LABELS")
        .output()
        .expect("run deployer-agent")
}

#[test]
fn version_is_printed() {
    let out = agent(&["--version"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("deployer-agent {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn bad_values_are_refused_before_anything_is_dialed() {
    let out = agent(&[
        "run",
        "--controller",
        "https://127.0.0.1:7701",
        "--token",
        "DPLY1.abc.def",
        "--data-dir",
        "/tmp/agent",
        "--labels",
        "zone=eu-1,disk=ssd",
    ]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: invalid --token: join token CA fingerprint must be 64 hex characters"), "{stderr}");
    assert!(!stderr.contains("DPLY1.abc"), "the token must not be echoed: {stderr}");

    let out = agent(&["run", "--controller", "127.0.0.1:7701", "--data-dir", "/tmp/agent"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--controller must look like https://HOST:PORT"), "{stderr}");
}

#[test]
fn bad_flags_are_usage_errors() {
    let missing = agent(&["run", "--token", "t", "--data-dir", "/tmp/agent"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--controller"));
    let bad_label =
        agent(&["run", "--controller", "https://c:1", "--token", "t", "--data-dir", "d", "--labels", "zone"]);
    assert_eq!(bad_label.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_label.stderr).contains("key=value"));
}
