//! End to end: the `deployer` binary against a real `deployer-controller` on loopback.
//!
//! The controller binary is taken from the target dir next to `deployer` (build it first with
//! `cargo build --bins`), or from `DEPLOYER_CONTROLLER_BIN`.

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const START_TIMEOUT: Duration = Duration::from_secs(60);

fn controller_bin() -> PathBuf {
    sibling_bin("deployer-controller")
}

/// A workspace binary next to `deployer`, or from `<NAME>_BIN`.
fn sibling_bin(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("{}_BIN", name.to_uppercase().replace('-', "_"))) {
        return PathBuf::from(p);
    }
    let path = PathBuf::from(env!("CARGO_BIN_EXE_deployer")).with_file_name(name);
    assert!(path.exists(), "{} not found: run `cargo build --bins` first", path.display());
    path
}

/// Two distinct ports that were free a moment ago.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

/// What a user sees from one `deployer` invocation.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "expected success\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }

    fn json(self) -> Value {
        let run = self.ok();
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stdout))
    }
}

/// A config file no test writes, so a developer's own `deployer login` cannot change a test.
const NO_CONFIG: &str = "/nonexistent/deployer-cli-tests/config.json";

/// Runs `deployer` with exactly this URL and token, whatever the test's own environment holds.
fn deployer(url: &str, token: Option<&str>, args: &[&str]) -> Run {
    let mut env = vec![("DEPLOYER_URL", url), ("DEPLOYER_CONFIG", NO_CONFIG)];
    env.extend(token.map(|t| ("DEPLOYER_TOKEN", t)));
    deployer_env(&env, args, None)
}

/// Runs `deployer` with these of its environment variables and none other of the test's
/// (DEPLOYER_URL, DEPLOYER_TOKEN, DEPLOYER_CONFIG, XDG_CONFIG_HOME), writing `stdin` to it.
fn deployer_env(env: &[(&str, &str)], args: &[&str], stdin: Option<&str>) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_deployer"));
    command.args(args);
    for name in ["DEPLOYER_URL", "DEPLOYER_TOKEN", "DEPLOYER_CONFIG", "XDG_CONFIG_HOME"] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("run deployer");
    if let Some(text) = stdin {
        // A command that refuses its arguments exits without reading stdin: that is not an error here.
        match child.stdin.take().unwrap().write_all(text.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write deployer's stdin: {e}"),
            _ => {}
        }
    }
    let out = child.wait_with_output().expect("run deployer");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `deployer` as someone who logged in: the URL and token come only from the config file.
fn logged_in(config: &Path, args: &[&str]) -> Run {
    deployer_env(&[("DEPLOYER_CONFIG", config.to_str().unwrap())], args, None)
}

/// `deployer login` with this password on stdin, with only the config file in the environment.
fn login(config: &Path, url: &str, email: &str, password: &str) -> Run {
    let args = ["login", "--url", url, "--email", email, "--password-stdin"];
    deployer_env(&[("DEPLOYER_CONFIG", config.to_str().unwrap())], &args, Some(&format!("{password}\n")))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The `name:  value` lines of a `fields` output.
fn field<'a>(stdout: &'a str, name: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| l.strip_prefix(&format!("{name}:")).map(str::trim))
}

/// A table's rows, split on whitespace, the header first.
fn rows(stdout: &str) -> Vec<Vec<&str>> {
    stdout.lines().map(|l| l.split_whitespace().collect()).collect()
}

/// A one-node cluster in a temporary data dir; killed on drop, its log printed if the test failed.
struct Controller {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
    grpc: String,
    token: String,
}

impl Controller {
    fn start() -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (http, grpc) = free_ports();
        let log = File::create(dir.path().join("controller.log")).unwrap();
        let child = Command::new(controller_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(["--http", &format!("127.0.0.1:{http}"), "--grpc", &format!("127.0.0.1:{grpc}")])
            .env("DEPLOYER_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn deployer-controller");
        let mut c = Controller {
            child,
            dir,
            url: format!("http://127.0.0.1:{http}"),
            grpc: format!("127.0.0.1:{grpc}"),
            token: String::new(),
        };
        let token_file = data.join("admin-token");
        c.token = wait_until(&mut c.child, "the admin token file", || {
            std::fs::read_to_string(&token_file).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        wait_until(&mut c.child, "the health check", || {
            (deployer(&c.url, None, &["health"]).code == Some(0)).then_some(())
        });
        // The token file is written before the token is committed, so wait until it works and
        // there is a leader.
        wait_until(&mut c.child, "an elected leader that accepts the admin token", || {
            let run = deployer(&c.url, Some(&c.token), &["cluster", "status", "-o", "json"]);
            let v: Value = serde_json::from_str(&run.stdout).ok()?;
            v["leader_id"].as_u64().map(|_| ())
        });
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        deployer(&self.url, Some(&self.token), args)
    }
}

/// Polls `f` until it answers, failing after [`START_TIMEOUT`] or if the controller exits.
fn wait_until<T>(controller: &mut Child, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if let Ok(Some(status)) = controller.try_wait() {
            panic!("the controller exited ({status}) while waiting for {what}");
        }
        assert!(Instant::now() < deadline, "timed out after {START_TIMEOUT:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default();
            eprintln!("--- controller log ---\n{log}");
        }
    }
}

#[test]
fn projects_cluster_and_tokens_against_a_real_controller() {
    let c = Controller::start();

    let health = deployer(&c.url, None, &["health"]).ok();
    assert_eq!(health.stdout, format!("ok ({})\n", c.url));

    // Cluster status: one voter, and it leads.
    let status = c.run(&["cluster", "status"]).ok().stdout;
    let lines: Vec<&str> = status.lines().collect();
    assert!(lines[0].starts_with("leader:"), "{status}");
    assert!(lines[1].starts_with("term:"), "{status}");
    let header = lines.iter().position(|l| l.starts_with("ID ")).expect("a node table");
    assert_eq!(lines[header].split_whitespace().collect::<Vec<_>>(), ["ID", "ADDR", "HTTP_ADDR", "VOTER", "LEADER"]);
    let nodes = &lines[header + 1..];
    assert_eq!(nodes.len(), 1, "{status}");
    let node: Vec<&str> = nodes[0].split_whitespace().collect();
    assert_eq!(node[3..], ["yes", "*"], "{status}");
    assert_eq!(lines[0].split_whitespace().nth(1), Some(node[0]), "the leader is the one node: {status}");
    let cluster = c.run(&["cluster", "status", "--output", "json"]).json();
    assert_eq!(cluster["nodes"].as_array().map(Vec::len), Some(1));
    assert_eq!(cluster["nodes"][0]["voter"], true);
    assert_eq!(cluster["nodes"][0]["id"], cluster["leader_id"]);

    // Projects: an empty list says so on stderr, and prints [] as JSON.
    let empty = c.run(&["projects", "list"]).ok();
    assert_eq!(empty.stdout, "");
    assert!(empty.stderr.contains("No projects"), "{}", empty.stderr);
    assert_eq!(c.run(&["projects", "list", "-o", "json"]).json(), serde_json::json!([]));

    let web = c.run(&["projects", "create", "web"]).ok().stdout;
    assert!(web.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["name:", "web"]), "{web}");
    let api = c.run(&["projects", "create", "api", "--output", "json"]).ok();
    assert!(api.stdout.starts_with("{\n  \"id\": "), "the API's key order is kept: {}", api.stdout);
    let api: Value = serde_json::from_str(&api.stdout).unwrap();
    assert_eq!(api["name"], "api");
    let api_id = api["id"].as_str().unwrap().to_string();

    let table = c.run(&["projects", "list"]).ok().stdout;
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert_eq!(rows[0], ["ID", "NAME", "CREATED"]);
    assert_eq!((rows[1][0], rows[1][1]), (api_id.as_str(), "api"), "newest first: {table}");
    assert_eq!(rows[2][1], "web");
    let name_column = table.lines().next().unwrap().find("NAME").unwrap();
    assert!(table.lines().all(|l| l[name_column..].starts_with(|ch: char| ch != ' ')), "aligned: {table}");
    let listed = c.run(&["projects", "list", "-o", "json"]).json();
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["api", "web"]);
    assert_eq!(c.run(&["projects", "list", "--limit", "1", "-o", "json"]).json().as_array().map(Vec::len), Some(1));

    // A taken name is the API's message, on stderr, and a failure.
    let duplicate = c.run(&["projects", "create", "web"]);
    assert_eq!(duplicate.code, Some(1));
    assert_eq!(duplicate.stderr, "error: a project named \"web\" already exists\n");
    assert_eq!(duplicate.stdout, "");
    let invalid = c.run(&["projects", "create", "Web"]);
    assert_eq!(invalid.code, Some(1));
    assert!(invalid.stderr.starts_with("error: name may contain only lowercase"), "{}", invalid.stderr);

    let shown = c.run(&["projects", "show", &api_id]).ok().stdout;
    assert!(shown.contains(&api_id) && shown.contains("api"), "{shown}");
    assert_eq!(c.run(&["projects", "delete", &api_id]).ok().stdout, format!("deleted project {api_id}\n"));
    let gone = c.run(&["projects", "show", &api_id]);
    assert_eq!(gone.code, Some(1));
    assert_eq!(gone.stderr, format!("error: no project with id {api_id}\n"));
    // An id cannot reach another route.
    let odd = c.run(&["projects", "show", "../cluster"]);
    assert_eq!(odd.code, Some(1));
    assert!(odd.stderr.starts_with("error: no project with id ../cluster"), "{}", odd.stderr);
    assert_eq!(c.run(&["projects", "show", ".."]).code, Some(2));

    // Tokens: a wrong one is refused with a hint; a missing one is a usage error.
    let bad = deployer(&c.url, Some("dpl_not-a-token"), &["projects", "list"]);
    assert_eq!(bad.code, Some(1));
    assert!(bad.stderr.starts_with("error: the API token is not valid\nhint: "), "{}", bad.stderr);
    assert!(bad.stderr.contains("DEPLOYER_TOKEN"), "{}", bad.stderr);
    let missing = deployer(&c.url, None, &["projects", "list"]);
    assert_eq!(missing.code, Some(2));
    assert!(missing.stderr.contains("DEPLOYER_TOKEN") && missing.stderr.contains("admin-token"), "{}", missing.stderr);
    let flag = deployer(&c.url, None, &["projects", "list", "--token", &c.token]).ok();
    assert!(flag.stdout.contains("web"));

    // Join tokens: create, list, revoke.
    let created = c.run(&["cluster", "token", "create", "--kind", "agent"]).ok();
    let token_line = created.stdout.lines().next().unwrap();
    assert!(token_line.starts_with("token:") && token_line.contains("DPLY1."), "{}", created.stdout);
    assert!(created.stdout.contains("expires:"), "{}", created.stdout);
    let quiet = c.run(&["cluster", "token", "create", "--kind", "controller", "--ttl", "600", "-q"]).ok().stdout;
    assert!(quiet.starts_with("DPLY1.") && quiet.lines().count() == 1, "{quiet}");
    let as_json = c.run(&["cluster", "token", "create", "--kind", "agent", "-o", "json"]).json();
    assert_eq!(as_json["kind"], "agent");
    assert!(as_json["expires_at"].is_string());
    let revoke_id = as_json["id"].as_str().unwrap().to_string();
    let too_long = c.run(&["cluster", "token", "create", "--kind", "agent", "--ttl", "99999999"]);
    assert_eq!(too_long.code, Some(1));
    assert!(too_long.stderr.starts_with("error: ttl_s must be between"), "{}", too_long.stderr);

    let revoked = c.run(&["cluster", "token", "revoke", &revoke_id]).ok();
    assert_eq!(revoked.stdout, format!("revoked join token {revoke_id}\n"));
    let list = c.run(&["cluster", "token", "list"]).ok().stdout;
    let rows: Vec<Vec<&str>> = list.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["ID", "KIND", "CREATED", "EXPIRES", "STATUS"]);
    assert_eq!(rows.len(), 4, "{list}");
    let status_of = |id: &str| rows.iter().find(|r| r[0] == id).map(|r| r[4]);
    assert_eq!(status_of(&revoke_id), Some("revoked"), "{list}");
    assert_eq!(rows.iter().filter(|r| r[4] == "active").count(), 2, "{list}");
    assert_eq!(c.run(&["cluster", "token", "list", "-o", "json"]).json().as_array().map(Vec::len), Some(3));
    let unknown = c.run(&["cluster", "token", "revoke", "no-such-token"]);
    assert_eq!(unknown.code, Some(1));
    assert_eq!(unknown.stderr, "error: no join token with id no-such-token\n");
}

#[test]
fn an_unreachable_controller_is_named_with_a_hint() {
    let (port, _) = free_ports();
    let url = format!("http://127.0.0.1:{port}");
    let run = deployer(&url, Some("t"), &["projects", "list"]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.starts_with(&format!("error: cannot reach the controller at {url}: ")), "{}", run.stderr);
    assert!(run.stderr.contains("is the controller running?") && run.stderr.contains("DEPLOYER_URL"), "{}", run.stderr);
    let health = deployer(&url, None, &["health"]);
    assert_eq!(health.code, Some(1));
}

#[test]
fn usage_errors_exit_2() {
    let url = "http://127.0.0.1:9";
    assert_eq!(deployer(url, Some("t"), &["cluster", "token", "create"]).code, Some(2));
    assert_eq!(deployer(url, Some("t"), &["cluster", "token", "create", "--kind", "admin"]).code, Some(2));
    assert_eq!(deployer(url, Some("t"), &["projects", "list", "--output", "yaml"]).code, Some(2));
    let both =
        deployer(url, Some("t"), &["services", "create", "p", "web", "--git", "https://x/a.git", "--image", "a"]);
    assert_eq!(both.code, Some(2));
    assert!(both.stderr.contains("'--git <URL>' cannot be used with '--image <REF>'"), "{}", both.stderr);
    let neither = deployer(url, Some("t"), &["services", "create", "p", "web"]);
    assert_eq!(neither.code, Some(2));
    assert!(neither.stderr.contains("<--git <URL>|--image <REF>|--upload>"), "{}", neither.stderr);
    let no_equals = deployer(url, Some("t"), &["services", "create", "p", "web", "--upload", "--env", "NOEQUALS"]);
    assert_eq!(no_equals.code, Some(2));
    assert!(no_equals.stderr.contains("invalid value 'NOEQUALS' for '--env <KEY=VALUE>'"), "{}", no_equals.stderr);
    assert_eq!(deployer(url, Some("t"), &["env", "set", "p", "s", "NOEQUALS"]).code, Some(2));
    assert_eq!(
        deployer(url, Some("t"), &["services", "create", "p", "w", "--image", "a", "--memory", "1X"]).code,
        Some(2)
    );
    assert_eq!(
        deployer(url, Some("t"), &["services", "create", "p", "w", "--image", "a", "--branch", "b"]).code,
        Some(2)
    );
    let no_scheme = deployer("127.0.0.1:7700", Some("t"), &["health"]);
    assert_eq!(no_scheme.code, Some(2));
    assert!(no_scheme.stderr.contains("http://127.0.0.1:7700"), "{}", no_scheme.stderr);
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        // A bad URL does not matter: completions never talk to the controller.
        let run = deployer("nonsense", None, &["completions", shell]).ok();
        assert!(run.stdout.contains("deployer") && run.stdout.contains("projects"), "{shell}: {}", run.stdout);
    }
}

#[test]
fn agents_are_listed_shown_and_revoked() {
    let mut c = Controller::start();
    let empty = c.run(&["agents", "list"]).ok();
    assert_eq!(empty.stdout, "");
    assert!(empty.stderr.contains("No agents"), "{}", empty.stderr);
    assert_eq!(c.run(&["nodes", "list", "-o", "json"]).json(), serde_json::json!([]));
    let unknown = c.run(&["agents", "revoke", "no-such-agent"]);
    assert_eq!(unknown.code, Some(1));
    assert_eq!(unknown.stderr, "error: no agent with id no-such-agent\n");

    // A real agent on this machine's Docker engine.
    let token = c.run(&["cluster", "token", "create", "--kind", "agent", "-o", "json"]).json();
    let agent_dir = c.dir.path().join("agent");
    let mut agent = Command::new(sibling_bin("deployer-agent"))
        .args(["run", "--controller", &format!("https://{}", c.grpc), "--hostname", "box-1", "--labels", "zone=a"])
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["--token", token["token"].as_str().unwrap(), "--heartbeat-ms", "500"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(c.dir.path().join("agent.log")).unwrap())
        .spawn()
        .expect("spawn deployer-agent");
    let listed = wait_until(&mut c.child, "the agent to be listed ready with metrics", || {
        let v = deployer(&c.url, Some(&c.token), &["agents", "list", "-o", "json"]);
        let v: Value = serde_json::from_str(&v.stdout).ok()?;
        let a = v.as_array()?.first()?.clone();
        (a["status"] == "ready" && a["metrics"].is_object()).then_some(a)
    });
    let id = listed["id"].as_str().unwrap().to_string();
    let table = c.run(&["agents", "list"]).ok().stdout;
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["ID", "HOSTNAME", "STATUS", "CPU", "MEMORY", "DISK", "LABELS", "LAST", "SEEN"]);
    assert_eq!(rows[1][..3], [id.as_str(), "box-1", "ready"], "{table}");
    assert_eq!(rows[1][6], "zone=a", "{table}");
    let shown = c.run(&["agents", "show", &id]).ok().stdout;
    assert!(shown.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["session:", "connected"]), "{shown}");

    assert_eq!(c.run(&["agents", "revoke", &id]).ok().stdout, format!("revoked agent {id}\n"));
    let exited = wait_until(&mut c.child, "the revoked agent to exit", || agent.try_wait().ok().flatten());
    assert_eq!(exited.code(), Some(77));
    assert_eq!(c.run(&["agents", "list", "-o", "json"]).json(), serde_json::json!([]));
}

#[test]
fn users_log_in_make_tokens_share_projects_and_are_audited() {
    let c = Controller::start();
    const ALICE: &str = "alice@example.com";
    const BOB: &str = "bob@example.com";
    const PASSWORD: &str = "correct horse battery";

    // Users, made with the cluster's first admin token.
    let none = c.run(&["users", "list"]).ok();
    assert_eq!(none.stdout, "");
    assert!(none.stderr.contains("No users"), "{}", none.stderr);
    let create = |args: &[&str], password: &str| {
        deployer_env(
            &[("DEPLOYER_URL", &c.url), ("DEPLOYER_TOKEN", &c.token), ("DEPLOYER_CONFIG", NO_CONFIG)],
            args,
            Some(&format!("{password}\n")),
        )
    };
    let alice = create(&["users", "create", ALICE, "--password-stdin"], PASSWORD).ok().stdout;
    assert_eq!(field(&alice, "email"), Some(ALICE), "{alice}");
    assert_eq!(field(&alice, "admin"), Some("no"), "{alice}");
    let bob = create(&["users", "create", BOB, "--password-stdin", "-o", "json"], PASSWORD).json();
    assert_eq!((bob["email"].as_str(), bob["admin"].as_bool()), (Some(BOB), Some(false)));
    let bob_id = bob["id"].as_str().unwrap().to_string();
    let short = create(&["users", "create", "carol@example.com", "--password-stdin"], "short");
    assert_eq!(short.code, Some(1));
    assert_eq!(short.stderr, "error: password must be 10 to 256 characters long\n");
    let no_terminal = c.run(&["users", "create", "carol@example.com"]);
    assert_eq!(no_terminal.code, Some(2));
    assert!(no_terminal.stderr.contains("--password-stdin"), "{}", no_terminal.stderr);
    let users = c.run(&["users", "list"]).ok().stdout;
    let table = rows(&users);
    assert_eq!(table[0], ["ID", "EMAIL", "ADMIN", "CREATED"]);
    assert_eq!(table[1][1..3], [BOB, "no"], "newest first: {users}");
    assert_eq!(table[2][1], ALICE, "{users}");

    // Login: the token goes to a new private config file, and later commands use it.
    let config = c.dir.path().join("home").join("deployer").join("config.json");
    let wrong = login(&config, &c.url, ALICE, "not the password");
    assert_eq!(wrong.code, Some(1));
    assert_eq!(wrong.stderr, "error: wrong email or password\n");
    assert!(!config.exists());
    let logged = login(&config, &c.url, ALICE, PASSWORD).ok();
    assert!(logged.stdout.starts_with(&format!("logged in to {} as {ALICE}; token cli@", c.url)), "{}", logged.stdout);
    assert!(logged.stdout.contains(&config.display().to_string()), "{}", logged.stdout);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&config), 0o600);
    assert_eq!(mode(config.parent().unwrap()), 0o700);
    let saved = read_json(&config);
    assert_eq!(saved["url"], c.url.as_str());
    assert_eq!(saved["email"], ALICE);
    let first_token = saved["token"].as_str().unwrap().to_string();
    assert!(first_token.starts_with("dpl_"), "{saved}");

    let whoami = logged_in(&config, &["whoami"]).ok().stdout;
    assert_eq!(field(&whoami, "user"), Some(ALICE), "{whoami}");
    assert_eq!(field(&whoami, "admin"), Some("no"), "{whoami}");
    assert_eq!(field(&whoami, "scopes"), Some("read,deploy,write,admin"), "{whoami}");
    assert_eq!(field(&whoami, "via"), Some("token"), "{whoami}");
    assert_eq!(logged_in(&config, &["whoami", "-o", "json"]).json()["user"]["email"], ALICE);
    let admin = c.run(&["whoami"]).ok().stdout;
    assert_eq!(field(&admin, "user"), Some("the cluster's first admin token"), "{admin}");
    assert!(field(&admin, "admin").unwrap().starts_with("yes"), "{admin}");
    // DEPLOYER_TOKEN wins over the file; the file's token is never sent to another URL.
    let env = [("DEPLOYER_CONFIG", config.to_str().unwrap()), ("DEPLOYER_TOKEN", c.token.as_str())];
    let overridden = deployer_env(&env, &["whoami"], None).ok().stdout;
    assert_eq!(field(&overridden, "user"), Some("the cluster's first admin token"), "{overridden}");
    let elsewhere = c.url.replace("127.0.0.1", "localhost");
    let env = [("DEPLOYER_CONFIG", config.to_str().unwrap()), ("DEPLOYER_URL", elsewhere.as_str())];
    let not_sent = deployer_env(&env, &["whoami"], None);
    assert_eq!(not_sent.code, Some(2), "{}", not_sent.stderr);
    assert!(not_sent.stderr.contains("deployer login"), "{}", not_sent.stderr);

    // A project of Alice's, shared with Bob.
    let project = logged_in(&config, &["projects", "create", "shop", "-o", "json"]).json();
    let project_id = project["id"].as_str().unwrap().to_string();
    let added = logged_in(&config, &["collaborators", "add", &project_id, BOB, "--role", "developer"]).ok().stdout;
    assert_eq!(field(&added, "user"), Some(bob_id.as_str()), "{added}");
    assert_eq!(field(&added, "role"), Some("developer"), "{added}");
    let listed = logged_in(&config, &["collaborators", "list", &project_id]).ok().stdout;
    let table = rows(&listed);
    assert_eq!(table[0], ["USER_ID", "EMAIL", "ROLE"]);
    assert!(table.iter().any(|r| r[1..] == [ALICE, "owner"]), "{listed}");
    assert!(table.iter().any(|r| r[..] == [bob_id.as_str(), BOB, "developer"]), "{listed}");
    let bad_role = logged_in(&config, &["collaborators", "add", &project_id, BOB, "--role", "superuser"]);
    assert_eq!(bad_role.code, Some(1));
    assert_eq!(bad_role.stderr, "error: role must be one of viewer, developer, admin, owner\n");
    assert_eq!(bad_role.stdout, "");
    let removed = logged_in(&config, &["collaborators", "remove", &project_id, BOB]).ok().stdout;
    assert_eq!(removed, format!("removed user {bob_id} from project {project_id}\n"));
    logged_in(&config, &["collaborators", "add", &project_id, BOB, "--role", "viewer"]).ok();
    logged_in(&config, &["collaborators", "remove", &project_id, &bob_id]).ok();
    let left = logged_in(&config, &["collaborators", "list", &project_id, "-o", "json"]).json();
    let emails: Vec<&str> = left.as_array().unwrap().iter().map(|c| c["email"].as_str().unwrap()).collect();
    assert_eq!(emails, [ALICE]);
    let not_there = logged_in(&config, &["collaborators", "remove", &project_id, &bob_id]);
    assert_eq!(not_there.code, Some(1));
    assert!(not_there.stderr.contains("is not a collaborator"), "{}", not_there.stderr);

    // Tokens: made once, listed, limited to their scopes, and refused once revoked.
    let args = ["tokens", "create", "ci", "--scope", "read", "--scope", "deploy", "--expires-in", "30d"];
    let made = logged_in(&config, &args).ok();
    assert!(made.stderr.contains("not shown again"), "{}", made.stderr);
    let ci_token = field(&made.stdout, "token").unwrap().to_string();
    let ci_id = field(&made.stdout, "id").unwrap().to_string();
    assert!(ci_token.starts_with("dpl_"), "{}", made.stdout);
    assert_eq!(field(&made.stdout, "scopes"), Some("read,deploy"), "{}", made.stdout);
    assert_ne!(field(&made.stdout, "expires"), Some("never"), "{}", made.stdout);
    let writer = logged_in(&config, &["tokens", "create", "writer", "--scope", "read,write", "-q"]).ok().stdout;
    assert!(writer.starts_with("dpl_") && writer.lines().count() == 1, "{writer}");
    let as_ci = deployer(&c.url, Some(&ci_token), &["whoami"]).ok().stdout;
    assert_eq!((field(&as_ci, "user"), field(&as_ci, "scopes")), (Some(ALICE), Some("read,deploy")), "{as_ci}");
    let wider = deployer(&c.url, Some(writer.trim()), &["tokens", "create", "x", "--scope", "admin"]);
    assert_eq!(wider.code, Some(1));
    assert_eq!(wider.stderr, "error: you cannot grant the \"admin\" scope, which you do not hold\n");
    assert_eq!(logged_in(&config, &["tokens", "create", "x", "--scope", "root"]).code, Some(2));
    assert_eq!(logged_in(&config, &["tokens", "create", "x", "--scope", "read", "--expires-in", "2w"]).code, Some(2));

    assert_eq!(logged_in(&config, &["tokens", "revoke", &ci_id]).ok().stdout, format!("revoked API token {ci_id}\n"));
    let refused = deployer(&c.url, Some(&ci_token), &["projects", "list"]);
    assert_eq!(refused.code, Some(1));
    assert!(refused.stderr.starts_with("error: the API token has been revoked\nhint: "), "{}", refused.stderr);
    let tokens = logged_in(&config, &["tokens", "list"]).ok().stdout;
    let table = rows(&tokens);
    assert_eq!(table[0], ["ID", "NAME", "USER", "SCOPES", "CREATED", "EXPIRES", "STATUS"]);
    assert_eq!(table.len(), 4, "the login's, ci and writer: {tokens}");
    let row = |name: &str| table.iter().find(|r| r[1] == name).unwrap_or_else(|| panic!("{name}: {tokens}"));
    assert_eq!((row("ci")[2], row("ci")[6]), (ALICE, "revoked"), "{tokens}");
    assert_eq!((row("writer")[3], row("writer")[5], row("writer")[6]), ("read,write", "never", "active"), "{tokens}");
    assert!(table[1..].iter().any(|r| r[1].starts_with("cli@") && r[3] == "read,deploy,write,admin"), "{tokens}");

    // The audit log: the cluster's admins see all of it, Alice her project's part.
    let audit = c.run(&["audit"]).ok().stdout;
    let table = rows(&audit);
    assert_eq!(table[0], ["SEQ", "AT", "ACTOR", "ACTION", "TARGET", "PROJECT", "SOURCE"]);
    let created = table.iter().find(|r| r[3] == "project.create").unwrap_or_else(|| panic!("{audit}"));
    assert_eq!(created[2..6], [&format!("user:{ALICE}"), "project.create", "shop", project_id.as_str()], "{audit}");
    assert!(table.iter().any(|r| r[2..5] == ["token:admin", "user.create", ALICE]), "{audit}");
    assert_eq!(c.run(&["audit", "--limit", "1", "-o", "json"]).json().as_array().map(Vec::len), Some(1));
    let mine = logged_in(&config, &["audit", "--project", &project_id, "-o", "json"]).json();
    let actions: Vec<&str> = mine.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions.last(), Some(&"project.create"), "oldest last: {mine}");
    assert!(actions.iter().all(|a| a.starts_with("project.") || a.starts_with("collaborator.")), "{mine}");
    let everything = logged_in(&config, &["audit"]);
    assert_eq!(everything.code, Some(1));
    assert!(everything.stderr.starts_with("error: only cluster administrators"), "{}", everything.stderr);

    // Logging in again replaces the saved token and revokes the old one.
    login(&config, &c.url, ALICE, PASSWORD).ok();
    let second_token = read_json(&config)["token"].as_str().unwrap().to_string();
    assert_ne!(second_token, first_token);
    let old = deployer(&c.url, Some(&first_token), &["whoami"]);
    assert_eq!(old.stderr.lines().next(), Some("error: the API token has been revoked"), "{}", old.stderr);

    // Logout revokes the token and removes it from the file.
    let out = logged_in(&config, &["logout"]).ok().stdout;
    assert!(out.starts_with(&format!("logged out of {}: revoked token ", c.url)), "{out}");
    let saved = read_json(&config);
    assert_eq!(saved, serde_json::json!({ "url": c.url }), "only the URL is left");
    assert_eq!(mode(&config), 0o600);
    let gone = deployer(&c.url, Some(&second_token), &["whoami"]);
    assert_eq!(gone.code, Some(1));
    assert!(gone.stderr.starts_with("error: the API token has been revoked\n"), "{}", gone.stderr);
    let anonymous = logged_in(&config, &["whoami"]);
    assert_eq!(anonymous.code, Some(2));
    assert!(anonymous.stderr.contains("deployer login"), "{}", anonymous.stderr);
    let again = logged_in(&config, &["logout"]).ok();
    assert!(again.stderr.starts_with("Not logged in"), "{}", again.stderr);

    // A saved token revoked elsewhere says to log in again; logout then just forgets it.
    login(&config, &c.url, BOB, PASSWORD).ok();
    let bob_token_id = read_json(&config)["token_id"].as_str().unwrap().to_string();
    c.run(&["tokens", "revoke", &bob_token_id]).ok();
    let stale = logged_in(&config, &["whoami"]);
    assert_eq!(stale.code, Some(1));
    assert!(
        stale.stderr.starts_with("error: the API token has been revoked\nhint: the token saved in "),
        "{}",
        stale.stderr
    );
    assert!(stale.stderr.contains("run `deployer login` again"), "{}", stale.stderr);
    let forgotten = logged_in(&config, &["logout"]).ok();
    assert!(forgotten.stderr.contains("no longer takes the token"), "{}", forgotten.stderr);
    assert_eq!(read_json(&config), serde_json::json!({ "url": c.url }));
}

#[test]
fn services_env_and_secrets_against_a_real_controller() {
    let c = Controller::start();
    const SECRET: &str = "s3cr3t-from-the-command-line";
    const PIPED: &str = "s3cr3t-from-stdin";
    const ROTATED: &str = "s3cr3t-rotated";
    let with_stdin = |args: &[&str], stdin: &str| {
        let env = [("DEPLOYER_URL", c.url.as_str()), ("DEPLOYER_TOKEN", &c.token), ("DEPLOYER_CONFIG", NO_CONFIG)];
        deployer_env(&env, args, Some(stdin))
    };
    // No output of any command shows a secret's value.
    let secret_free = |run: Run| {
        for value in [SECRET, PIPED, ROTATED] {
            assert!(!run.stdout.contains(value) && !run.stderr.contains(value), "{}\n{}", run.stdout, run.stderr);
        }
        run
    };

    let project = c.run(&["projects", "create", "shop", "-o", "json"]).json();
    let p = project["id"].as_str().unwrap().to_string();
    let empty = c.run(&["services", "list", &p]).ok();
    assert_eq!(empty.stdout, "");
    assert!(empty.stderr.contains("No services") && empty.stderr.contains("services create"), "{}", empty.stderr);

    let db = c.run(&["services", "create", &p, "db", "--image", "postgres:17", "--port", "5432", "-o", "json"]).json();
    assert_eq!(db["source"], serde_json::json!({ "image": "postgres:17" }));
    let db_id = db["id"].as_str().unwrap().to_string();

    let args = [
        "services",
        "create",
        &p,
        "web",
        "--git",
        "https://github.com/acme/web.git",
        "--branch",
        "prod",
        "--port",
        "3000",
        "--env",
        "NODE_ENV=production",
        "--env",
        "LOG=debug",
        "--secret",
        &format!("API_KEY={SECRET}"),
        "--secret",
        "DB_PASSWORD",
        "--replicas",
        "2",
        "--cpu",
        "250",
        "--memory",
        "256M",
        "--health-path",
        "/healthz",
        "--depends-on",
        "db",
        "--domain",
        "www.example.com",
    ];
    let web = secret_free(with_stdin(&args, &format!("{PIPED}\n")).ok()).stdout;
    assert_eq!(field(&web, "name"), Some("web"), "{web}");
    assert_eq!(field(&web, "source"), Some("git https://github.com/acme/web.git (branch prod, Dockerfile)"), "{web}");
    assert_eq!(field(&web, "memory"), Some("256 MiB"), "{web}");
    assert_eq!(field(&web, "depends_on"), Some("db"), "{web}");
    assert_eq!(field(&web, "secrets"), Some("API_KEY=********"), "{web}");
    assert!(web.lines().any(|l| l.trim() == "DB_PASSWORD=********"), "{web}");
    assert!(web.lines().any(|l| l.trim() == "NODE_ENV=production"), "{web}");
    let web_id = field(&web, "id").unwrap().to_string();

    let listed = secret_free(c.run(&["services", "list", &p]).ok()).stdout;
    let table = rows(&listed);
    assert_eq!(table[0], ["ID", "NAME", "SOURCE", "PORT", "REPLICAS", "DOMAINS", "UPDATED"]);
    assert_eq!(table[1][..6], [db_id.as_str(), "db", "image:postgres:17", "5432", "1", "-"], "{listed}");
    let web_row = [web_id.as_str(), "web", "git:https://github.com/acme/web.git#prod", "3000", "2", "www.example.com"];
    assert_eq!(table[2][..6], web_row, "{listed}");
    assert_eq!(table.len(), 3, "{listed}");
    secret_free(c.run(&["services", "list", &p, "-o", "json"]).ok());

    let show = |c: &Controller| secret_free(c.run(&["services", "show", &p, &web_id, "-o", "json"]).ok()).json();
    let shown = show(&c);
    assert_eq!(shown["env"], serde_json::json!({ "LOG": "debug", "NODE_ENV": "production" }));
    assert_eq!(shown["secrets"], serde_json::json!({ "API_KEY": "********", "DB_PASSWORD": "********" }));
    assert_eq!(shown["resources"], serde_json::json!({ "cpu_millis": 250, "memory_bytes": 256 << 20 }));
    assert_eq!(shown["health_check"]["path"], "/healthz");
    assert_eq!(shown["depends_on"], serde_json::json!(["db"]));
    assert_eq!(shown["domains"], serde_json::json!(["www.example.com"]));
    let text = secret_free(c.run(&["services", "show", &p, &web_id]).ok()).stdout;
    assert_eq!(field(&text, "health_check"), Some("/healthz"), "{text}");

    // Environment variables.
    let set = c.run(&["env", "set", &p, &web_id, "LOG=info", "EXTRA=a=b"]).ok();
    assert_eq!(set.stdout, "set EXTRA, LOG on service web\n");
    let unset = c.run(&["env", "unset", &p, &web_id, "LOG", "NOT_THERE"]).ok();
    assert_eq!(unset.stdout, "removed LOG, NOT_THERE from service web\n");
    assert!(unset.stderr.contains("no environment variable NOT_THERE"), "{}", unset.stderr);
    assert_eq!(show(&c)["env"], serde_json::json!({ "EXTRA": "a=b", "NODE_ENV": "production" }));
    let env = secret_free(c.run(&["env", "list", &p, &web_id]).ok()).stdout;
    assert_eq!(rows(&env), [vec!["NAME", "VALUE"], vec!["EXTRA", "a=b"], vec!["NODE_ENV", "production"]]);
    let clash = c.run(&["env", "set", &p, &web_id, "API_KEY=x"]);
    assert_eq!(clash.code, Some(1));
    assert_eq!(clash.stderr, "error: API_KEY is both in env and in secrets; keep one\n");

    // Secrets: set from stdin or the command line, removed, and listed by name only.
    let piped = secret_free(with_stdin(&["secrets", "set", &p, &web_id, "TOKEN"], &format!("{PIPED}\n")).ok());
    assert_eq!(piped.stdout, "set secrets TOKEN on service web\n");
    let rotated = secret_free(c.run(&["secrets", "set", &p, &web_id, &format!("API_KEY={ROTATED}"), "-o", "json"]));
    assert_eq!(rotated.json()["secrets"]["API_KEY"], "********");
    let removed = c.run(&["secrets", "unset", &p, &web_id, "DB_PASSWORD"]).ok();
    assert_eq!(removed.stdout, "removed secrets DB_PASSWORD from service web\n");
    assert_eq!(show(&c)["secrets"], serde_json::json!({ "API_KEY": "********", "TOKEN": "********" }));
    let names = secret_free(c.run(&["secrets", "list", &p, &web_id]).ok()).stdout;
    assert_eq!(names, "NAME\nAPI_KEY\nTOKEN\n");
    let two = with_stdin(&["secrets", "set", &p, &web_id, "A", "B"], "x\n");
    assert_eq!(two.code, Some(2));
    assert!(two.stderr.starts_with("error: only one secret's value can be read from stdin"), "{}", two.stderr);
    let nothing = with_stdin(&["secrets", "set", &p, &web_id, "A"], "");
    assert_eq!(nothing.code, Some(2));
    assert!(nothing.stderr.starts_with("error: no value was given for the secret A\n"), "{}", nothing.stderr);
    secret_free(c.run(&["audit", "-o", "json"]).ok());

    // The API's own messages, naming the field.
    let port = c.run(&["services", "create", &p, "api", "--image", "acme/api", "--port", "0"]);
    assert_eq!(port.code, Some(1));
    assert_eq!(port.stderr, "error: port must be between 1 and 65535\n");
    assert_eq!(port.stdout, "");
    let unknown = c.run(&["services", "create", &p, "api", "--upload", "--depends-on", "cache"]);
    assert_eq!(unknown.code, Some(1));
    assert_eq!(unknown.stderr, "error: depends_on: there is no service named \"cache\" in this project\n");

    // Deletion: refused while another service depends on it.
    let needed = c.run(&["services", "delete", &p, &db_id]);
    assert_eq!(needed.code, Some(1));
    assert!(needed.stderr.starts_with("error: service db is in the depends_on of"), "{}", needed.stderr);
    assert_eq!(c.run(&["services", "delete", &p, &web_id]).ok().stdout, format!("deleted service {web_id}\n"));
    c.run(&["services", "delete", &p, &db_id]).ok();
    let gone = c.run(&["services", "show", &p, &web_id]);
    assert_eq!(gone.code, Some(1));
    assert_eq!(gone.stderr, format!("error: no service with id {web_id} in this project\n"));
    assert_eq!(c.run(&["services", "list", &p, "-o", "json"]).json(), serde_json::json!([]));
}
