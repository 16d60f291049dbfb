//! The ingress as users reach it: services answer at `<service>-<project>.<base domain>` and at
//! their custom domains through any agent's proxy, over HTTP and HTTPS; a redeploy, a rollback
//! and a release that never turns healthy drop no request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployer_tests::deploy::*;
use deployer_tests::{wait_for, web_client};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Each agent's ingress: (plain HTTP address, HTTPS port), by agent index.
async fn ingresses(setup: &Setup) -> Vec<(String, u16)> {
    let (_, agents) = setup.cluster.api.get(&format!("{}/api/v1/agents", setup.url())).await.unwrap();
    let mut found = Vec::new();
    for i in 0..setup.agents.len() {
        let agent = agents
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["hostname"] == format!("agent{i}"))
            .unwrap_or_else(|| panic!("agent{i} in {agents:#}"));
        let http = agent["ingress"].as_str().unwrap_or_else(|| panic!("agent{i} has an ingress: {agent:#}"));
        let https = agent["ingress_https_port"].as_u64().unwrap_or_else(|| panic!("HTTPS port: {agent:#}"));
        found.push((http.to_string(), https as u16));
    }
    found
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// `GET http://<host>:<port>/` through an ingress, with the host resolved to loopback.
async fn get(host: &str, port: u16) -> (u16, String) {
    let client = reqwest::Client::builder()
        .resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let response = client.get(format!("http://{host}:{port}/")).send().await.expect("GET through the ingress");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// `GET https://<host>:<port>/` over TLS with SNI `host`, trusting only `ca_pem`: (status, body).
async fn get_tls(host: &str, port: u16, ca_pem: &str) -> anyhow::Result<(u16, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in deployer_common::tls::certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
    let mut tls = connector.connect(name, tcp).await?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A project besides the setup's; returns its id and name.
async fn second_project(setup: &Setup) -> (String, String) {
    let name = format!("q{}", &uuid_like()[..10]);
    let (status, body) =
        setup.cluster.api.post(&format!("{}/api/v1/projects", setup.url()), &json!({"name": name})).await.unwrap();
    assert_eq!(status, 201, "{body}");
    (body["id"].as_str().unwrap().to_string(), name)
}

/// A service of `project` serving `page` from a new local repository.
async fn web_service(
    setup: &Setup,
    project_id: &str,
    name: &str,
    page: &str,
    extra: Value,
) -> (String, std::path::PathBuf) {
    let repo = setup.cluster.root.join("repos").join(format!("{project_id}-{name}"));
    make_repo(&repo, &setup.base, page);
    let mut spec = json!({
        "name": name,
        "source": {"git": {"url": format!("file://{}", repo.display())}},
        "port": 8080,
        "health_check": {"path": "/", "timeout_s": 5},
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let url = format!("{}/api/v1/projects/{project_id}/services", setup.url());
    let (status, body) = setup.cluster.api.post(&url, &spec).await.unwrap();
    assert_eq!(status, 201, "{body}");
    (body["id"].as_str().unwrap().to_string(), repo)
}

async fn deploy(setup: &Setup, project_id: &str, service: &str) -> Value {
    let url = format!("{}/api/v1/projects/{project_id}/services/{service}/deploy", setup.url());
    let (status, queued) = setup.cluster.api.post(&url, &json!({})).await.unwrap();
    assert_eq!(status, 201, "{queued}");
    let done = setup.finished(queued["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "running", "{done:#}\n{}", setup.diagnostics());
    done
}

#[tokio::test]
async fn hosts_reach_their_service_through_every_agent_over_http_and_https() {
    let setup = Setup::start(1, 2, &[]).await;
    let (other_id, other) = second_project(&setup).await;
    let (one, _) =
        web_service(&setup, &setup.project_id, "web", "page one\n", json!({"domains": ["www.one.test"]})).await;
    let (two, _) = web_service(&setup, &other_id, "web", "page two\n", json!({})).await;
    let first = deploy(&setup, &setup.project_id, &one).await;
    deploy(&setup, &other_id, &two).await;

    let ingresses = ingresses(&setup).await;
    let host_one = format!("web-{}.localhost", setup.project);
    let host_two = format!("web-{other}.localhost");
    // The deployment names where it answers: its host, on the ingress of the agent running it.
    assert!(
        ingresses.iter().any(|(http, _)| first["url"] == format!("http://{host_one}:{}", port_of(http))),
        "the url {} names an agent's ingress: {ingresses:?}",
        first["url"]
    );
    assert_eq!(page(first["url"].as_str().unwrap()).await, "page one\n");

    // Every agent serves every host, as soon as the deployment says `running`: the one running
    // it directly, the other by forwarding.
    for (http, _) in &ingresses {
        let port = port_of(http);
        assert_eq!(get(&host_one, port).await, (200, "page one\n".to_string()), "{}", setup.diagnostics());
        assert_eq!(get(&host_two, port).await, (200, "page two\n".to_string()));
        assert_eq!(get("www.one.test", port).await, (200, "page one\n".to_string()));
        let (status, body) = get(&format!("nothing-{}.localhost", setup.project), port).await;
        assert_eq!(status, 404, "an unknown host: {body}");
    }

    // HTTPS on every default host name, with a certificate from the ingress CA.
    let (status, ca) = {
        let r = setup
            .cluster
            .api
            .client
            .get(format!("{}/api/v1/cluster/ingress-ca", setup.url()))
            .bearer_auth(&setup.cluster.api.token)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(status, 200, "{ca}");
    assert!(ca.contains("BEGIN CERTIFICATE"), "{ca}");
    for (_, https) in &ingresses {
        let (status, body) = get_tls(&host_two, *https, &ca).await.expect("HTTPS through the ingress");
        assert_eq!((status, body.as_str()), (200, "page two\n"));
    }
    // A name the ingress has no certificate for fails the handshake rather than getting another's.
    assert!(get_tls("www.unknown.test", ingresses[0].1, &ca).await.is_err());

    // A domain is one service's: another claiming it is refused, and so is a host name that is not one.
    let services = format!("{}/api/v1/projects/{other_id}/services", setup.url());
    let (status, body) = setup
        .cluster
        .api
        .post(&services, &json!({"name": "api", "source": {"image": "x"}, "port": 80, "domains": ["www.one.test"]}))
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("www.one.test"), "{body}");
    let (status, body) = setup
        .cluster
        .api
        .post(&services, &json!({"name": "api", "source": {"image": "x"}, "port": 80, "domains": ["not a host"]}))
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    // `web` in project `<q>-x` and `web-<q>` in project `x` would share the host `web-<q>-x`.
    let mut ids = Vec::new();
    for name in [format!("{other}-x"), "x".to_string()] {
        let (status, body) =
            setup.cluster.api.post(&format!("{}/api/v1/projects", setup.url()), &json!({"name": name})).await.unwrap();
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let service = |project: &str, name: String| {
        let url = format!("{}/api/v1/projects/{project}/services", setup.url());
        let api = setup.cluster.api.clone();
        async move { api.post(&url, &json!({"name": name, "source": {"image": "x"}, "port": 80})).await.unwrap() }
    };
    let (status, body) = service(&ids[0], "web".into()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = service(&ids[1], format!("web-{other}")).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains(&format!("web-{other}-x")), "the error names the host: {body}");
}

#[tokio::test]
async fn an_agent_restarted_while_no_controller_is_up_serves_its_routes_again() {
    let mut setup = Setup::start(1, 1, &[]).await;
    let (web, _) = web_service(&setup, &setup.project_id, "web", "still here\n", json!({})).await;
    deploy(&setup, &setup.project_id, &web).await;
    let (http, _) = ingresses(&setup).await.remove(0);
    let host = format!("web-{}.localhost", setup.project);
    assert_eq!(get(&host, port_of(&http)).await, (200, "still here\n".to_string()));
    // The table holds certificate keys: only the agent's user may read it.
    let saved = setup.agents[0].dir.join("ingress-routes.pb");
    let mode = wait_for("the route table to be saved", Duration::from_secs(10), || {
        let mode = std::fs::metadata(&saved).ok().map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
        async move { mode }
    })
    .await
    .unwrap();
    assert_eq!(mode & 0o777, 0o600);

    // The control plane goes away, then the agent restarts (a reboot of the host, say). Its
    // container keeps running; the agent finds no controller to ask for routes.
    let controller = setup.cluster.nodes[0].grpc_addr();
    setup.cluster.nodes[0].kill9();
    setup.agents[0].kill9();
    setup.agents[0]
        .start(&[
            "--controller".into(),
            format!("https://{controller}"),
            "--hostname".into(),
            "agent0".into(),
            "--allow-local-git".into(),
            "--ingress-http".into(),
            http.clone(),
        ])
        .unwrap();
    let answer = wait_for("the restarted agent to serve the saved route", Duration::from_secs(30), || {
        let host = host.clone();
        let port = port_of(&http);
        async move {
            let client = reqwest::Client::builder()
                .resolve(&host, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .timeout(Duration::from_secs(2))
                .build()
                .ok()?;
            let response = client.get(format!("http://{host}:{port}/")).send().await.ok()?;
            let status = response.status().as_u16();
            Some((status, response.text().await.ok()?))
        }
    })
    .await
    .unwrap();
    assert_eq!(answer, (200, "still here\n".to_string()), "{}", setup.diagnostics());
    let (status, body) = get(&format!("nothing-{}.localhost", setup.project), port_of(&http)).await;
    assert_eq!(status, 404, "an unknown host is still unknown: {body}");
}

/// Sends requests without pause until stopped; counts what a user would notice.
#[derive(Default)]
struct Traffic {
    /// Successful answers.
    answered: std::sync::atomic::AtomicU64,
    /// The pages seen, each time it changed.
    ok: Mutex<Vec<String>>,
    failures: Mutex<Vec<String>>,
}

fn hammer(host: String, port: u16, stop: Arc<AtomicBool>) -> (Arc<Traffic>, tokio::task::JoinHandle<()>) {
    let traffic = Arc::new(Traffic::default());
    let seen = traffic.clone();
    let task = tokio::spawn(async move {
        let reused = web_client();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            // Mostly kept-alive connections, and a new connection every tenth request.
            let client = if n.is_multiple_of(10) { web_client() } else { reused.clone() };
            match client.get(format!("http://{host}:{port}/")).send().await {
                Ok(r) if r.status().is_success() => {
                    let body = r.text().await.unwrap_or_else(|e| format!("<body error {e}>"));
                    seen.answered.fetch_add(1, Ordering::Relaxed);
                    let mut ok = seen.ok.lock().unwrap();
                    if ok.last() != Some(&body) {
                        ok.push(body);
                    }
                }
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    seen.failures.lock().unwrap().push(format!("HTTP {status}: {body}"));
                }
                Err(e) => seen.failures.lock().unwrap().push(format!("request {n}: {e:?}")),
            }
        }
    });
    (traffic, task)
}

#[tokio::test]
async fn a_redeploy_a_rollback_and_a_release_that_never_turns_healthy_drop_no_request() {
    let setup = Setup::start(1, 1, &[]).await;
    let (service, repo) = web_service(&setup, &setup.project_id, "web", "v1\n", json!({})).await;
    let v1 = deploy(&setup, &setup.project_id, &service).await;
    let host = format!("web-{}.localhost", setup.project);
    let port = port_of(&ingresses(&setup).await[0].0);
    assert_eq!(v1["url"], format!("http://{host}:{port}"));
    wait_for("the route", Duration::from_secs(10), || async { (get(&host, port).await.0 == 200).then_some(()) })
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (traffic, task) = hammer(host.clone(), port, stop.clone());
    let serving = |page: &'static str| {
        let traffic = traffic.clone();
        async move {
            wait_for(&format!("{page:?} to be served"), Duration::from_secs(15), || async {
                traffic.ok.lock().unwrap().last().is_some_and(|p| p == page).then_some(())
            })
            .await
            .unwrap()
        }
    };

    // A redeploy: the new release takes over, the old one drains and stops.
    std::fs::write(repo.join("index.html"), "v2\n").unwrap();
    commit(&repo, "v2");
    deploy(&setup, &setup.project_id, &service).await;
    serving("v2\n").await;
    // A rollback: the image of v1 again, with the same switch.
    let rollback = format!("{}/api/v1/projects/{}/services/{service}/rollback", setup.url(), setup.project_id);
    let (status, back) = setup.cluster.api.post(&rollback, &json!({})).await.unwrap();
    assert_eq!(status, 201, "{back}");
    let back = setup.finished(back["id"].as_str().unwrap()).await;
    assert_eq!(back["status"], "running", "{back:#}");
    serving("v1\n").await;
    // A release that never answers: it fails, and traffic never leaves v1.
    write_app(&repo, &setup.base, "never\n", "");
    std::fs::write(
        repo.join("Dockerfile"),
        format!("FROM {}\nCMD [\"/bin/busybox\", \"sleep\", \"600\"]\n", setup.base),
    )
    .unwrap();
    commit(&repo, "broken");
    let url = format!("{}/api/v1/projects/{}/services/{service}/deploy", setup.url(), setup.project_id);
    let (_, broken) = setup.cluster.api.post(&url, &json!({})).await.unwrap();
    let broken = setup.finished(broken["id"].as_str().unwrap()).await;
    assert_eq!(broken["status"], "failed", "{broken:#}");
    // Traffic a moment longer, then the verdict.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
    let failures = traffic.failures.lock().unwrap().clone();
    let pages = traffic.ok.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        setup.diagnostics()
    );
    assert_eq!(pages, ["v1\n", "v2\n", "v1\n"], "what the client saw, in order");
    let answered = traffic.answered.load(Ordering::Relaxed);
    assert!(answered > 200, "the client kept sending: {answered} answers");
    // The replaced instances are gone; one runs.
    let running = docker(&["ps", "-q", "--filter", &format!("label=deployer.service={service}")]);
    assert_eq!(running.split_whitespace().count(), 1, "one instance left: {running}");
}

/// A custom domain gets a certificate by ACME (HTTP-01 answered by the agent's ingress) from
/// Pebble, which a client trusting only Pebble's root accepts; plain HTTP then redirects to it.
#[tokio::test]
async fn a_custom_domain_gets_a_certificate_from_pebble_and_http_redirects_to_it() {
    let http_port = deployer_tests::free_port();
    let pebble = deployer_tests::pebble::Pebble::start(http_port).await;
    let roots = pebble.dir.path().join("acme-roots.pem");
    std::fs::write(&roots, &pebble.https_ca_pem).unwrap();
    let directory = pebble.directory_url();
    let roots_arg = roots.display().to_string();
    let setup = Setup::start_with(
        1,
        1,
        &["--acme-directory", &directory, "--acme-ca-file", &roots_arg, "--acme-email", "ops@example.test"],
        &["--ingress-http".into(), format!("127.0.0.1:{http_port}")],
    )
    .await;
    let (service, _) =
        web_service(&setup, &setup.project_id, "shop", "the shop\n", json!({"domains": ["www.shop.test"]})).await;
    deploy(&setup, &setup.project_id, &service).await;
    let https_port = ingresses(&setup).await[0].1;
    let root = pebble.issuing_root_pem().await;
    let served = wait_for("the certificate to be issued and served", Duration::from_secs(60), || async {
        get_tls("www.shop.test", https_port, &root).await.ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", setup.diagnostics(), pebble.pebble.log()));
    assert_eq!(served, (200, "the shop\n".to_string()));
    // The API says so, with the expiry; and names the default host.
    let (status, shown) = setup
        .cluster
        .api
        .get(&format!("{}/api/v1/projects/{}/services/{service}", setup.url(), setup.project_id))
        .await
        .unwrap();
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["host"], format!("shop-{}.localhost", setup.project));
    assert_eq!(shown["certificates"][0]["domain"], "www.shop.test", "{shown:#}");
    assert_eq!(shown["certificates"][0]["status"], "issued", "{shown:#}");
    assert!(shown["certificates"][0]["expires_at"].is_string(), "{shown:#}");
    // Plain HTTP for the domain now goes to HTTPS; the default host name (private CA) does not.
    let client = reqwest::Client::builder()
        .resolve("www.shop.test", std::net::SocketAddr::from(([127, 0, 0, 1], http_port)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client.get(format!("http://www.shop.test:{http_port}/cart?x=1")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 308);
    assert_eq!(response.headers()["location"], format!("https://www.shop.test:{https_port}/cart?x=1"));
    let (status, body) = get(&format!("shop-{}.localhost", setup.project), http_port).await;
    assert_eq!((status, body.as_str()), (200, "the shop\n"));
}
