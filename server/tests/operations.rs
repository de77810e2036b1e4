//! Operations, end to end on the embedded model: the Prometheus endpoint under real traffic.

mod common;

use common::{settings, start};
use persona_client::{chat_request, generate_text, pb, steer_by_name};
use prometheus_parse::{Sample, Scrape, Value};
use std::net::SocketAddr;

fn scrape(addr: SocketAddr) -> Scrape {
    let resp = ureq::get(&format!("http://{addr}/metrics")).call().expect("GET /metrics");
    let content_type = resp.header("content-type").unwrap_or_default().to_string();
    assert!(content_type.starts_with("application/openmetrics-text"), "content type {content_type}");
    let body = resp.into_string().unwrap();
    assert!(body.ends_with("# EOF\n"), "an OpenMetrics exposition ends with # EOF");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("the exposition parses")
}

/// Samples of `metric` whose labels include every pair of `labels`.
fn samples<'a>(s: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    s.samples.iter().filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))).collect()
}

/// The value of a counter or gauge (summed over matching series; 0 when there is none).
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples(s, metric, labels)
        .iter()
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{metric} is not a counter or gauge: {other:?}"),
        })
        .sum()
}

/// The observation count of a histogram (summed over matching series).
fn histogram_count(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> u64 {
    samples(s, metric, labels)
        .iter()
        .map(|x| match &x.value {
            Value::Histogram(buckets) => {
                let inf = buckets.iter().find(|b| b.less_than.is_infinite()).expect("a +Inf bucket");
                inf.count as u64
            }
            other => panic!("{metric} is not a histogram: {other:?}"),
        })
        .sum()
}

fn greedy(user: &str, max_tokens: u32) -> pb::GenerateRequest {
    let mut req = chat_request(user, Some("You are a helpful assistant."));
    req.sampling = Some(pb::SamplingParams { max_tokens, ..Default::default() });
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_real_traffic_and_parse() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.metrics_listen = "127.0.0.1:0".into();
    let running = start(s);
    let maddr = running.metrics_addr.expect("metrics endpoint bound");
    let mut c = persona_client::connect(&running.addr.to_string()).await.unwrap();
    let model = c.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models[0].id.clone();
    let m = [("model", model.as_str())];

    let before = scrape(maddr);
    let tokens_before = value(&before, "persona_generation_tokens_total", &m);
    assert!(tokens_before > 0.0, "the warm-up generation is counted");
    assert_eq!(value(&before, "persona_vectors_stored", &[]), 0.0);
    assert!(value(&before, "process_resident_memory_bytes", &[]) > 50e6, "RSS holds at least the model");
    assert!(value(&before, "persona_kv_cache_budget_bytes", &m) > 0.0);
    assert_eq!(value(&before, "persona_engine_serving", &m), 1.0);

    // A vector to steer and monitor with.
    let values = persona_client::pseudo_random_vector(7, 31 * 576);
    c.put_vector(pb::PutVectorRequest { name: "noise".into(), values, ..Default::default() }).await.unwrap();

    // Concurrent traffic, scraped while it runs: plain, steered, and monitored with an alert
    // threshold every token crosses.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let addr = running.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = persona_client::connect(&addr.to_string()).await.unwrap();
            let mut req = greedy(&format!("Write a long story about the number {i}."), 120);
            if i % 2 == 1 {
                req.steering = vec![steer_by_name("noise", Some(10), 4.0)];
            }
            if i == 2 {
                req.monitors = vec![pb::ProjectionTarget { vector: "noise".into(), layer: Some(12) }];
                req.alert_threshold = Some(-1e9);
            }
            generate_text(&mut c, req).await.unwrap()
        }));
    }
    let mut saw_running = false;
    while !tasks.iter().all(|t| t.is_finished()) {
        let during = tokio::task::spawn_blocking(move || scrape(maddr)).await.unwrap();
        saw_running |= value(&during, "persona_sequences_running", &m) >= 1.0
            && value(&during, "persona_kv_cache_reserved_bytes", &m) > 0.0
            && value(&during, "persona_kv_cache_usage_ratio", &m) > 0.0;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut completion_tokens = 0.0;
    for t in tasks {
        completion_tokens += f64::from(t.await.unwrap().summary.unwrap().completion_tokens);
    }
    assert!(saw_running, "a scrape during the generations saw running sequences and their KV reservation");

    // Failures are counted by code.
    let missing = c.get_vector(pb::GetVectorRequest { name: "absent".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let mut bad = greedy("hi", 4);
    bad.steering = vec![steer_by_name("absent", None, 1.0)];
    let bad = generate_text(&mut c, bad).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::NotFound);

    let after = scrape(maddr);
    let rpc = |method: &str, code: &str| {
        value(
            &after,
            "grpc_server_handled_total",
            &[("grpc_service", "persona.v1.PersonaService"), ("grpc_method", method), ("grpc_code", code)],
        )
    };
    assert_eq!(rpc("Generate", "OK"), 4.0);
    assert_eq!(rpc("Generate", "NOT_FOUND"), 1.0);
    assert_eq!(rpc("GetVector", "NOT_FOUND"), 1.0);
    assert_eq!(rpc("PutVector", "OK"), 1.0);
    assert_eq!(
        histogram_count(&after, "grpc_server_handling_seconds", &[("grpc_method", "Generate")]),
        5,
        "every Generate call is timed"
    );
    assert_eq!(
        value(&after, "persona_generation_tokens_total", &m) - tokens_before,
        completion_tokens,
        "the token counter moves by the tokens the calls received"
    );
    assert!(value(&after, "persona_prefill_tokens_total", &m) > value(&before, "persona_prefill_tokens_total", &m));
    let started = |steered| {
        value(&after, "persona_sequences_total", &[("model", &model), ("kind", "generate"), ("steered", steered)])
    };
    assert_eq!(started("true"), 2.0);
    assert_eq!(started("false"), 3.0, "two plain calls and the warm-up");
    assert_eq!(histogram_count(&after, "persona_time_to_first_token_seconds", &m), 5);
    assert_eq!(histogram_count(&after, "persona_queue_wait_seconds", &m), 5);
    let itl = histogram_count(&after, "persona_inter_token_latency_seconds", &m);
    assert_eq!(
        itl as f64,
        value(&after, "persona_generation_tokens_total", &m) - 5.0,
        "one gap per token after the first"
    );
    assert!(histogram_count(&after, "persona_batch_size", &m) > 0);
    assert!(histogram_count(&after, "persona_engine_step_seconds", &m) > 0);
    let noise = [("vector", "noise"), ("layer", "12"), ("scale", "raw")];
    assert!(histogram_count(&after, "persona_monitor_score", &noise) > 0, "monitored tokens are observed");
    assert_eq!(value(&after, "persona_monitor_alerts_total", &[("vector", "noise")]), 1.0);
    assert_eq!(value(&after, "persona_vectors_stored", &[]), 1.0);

    // A MonitorStream item lands in the same histogram.
    let monitored = histogram_count(&after, "persona_monitor_score", &noise);
    let item = pb::MonitorRequest {
        id: "1".into(),
        item: Some(pb::ProjectActivationRequest {
            conversation: Some(pb::Conversation { messages: vec![persona_client::message("user", "Hello")] }),
            response: "Hi there.".into(),
            targets: vec![pb::ProjectionTarget { vector: "noise".into(), layer: Some(12) }],
            ..Default::default()
        }),
    };
    let mut replies = c.monitor_stream(tokio_stream::iter(vec![item])).await.unwrap().into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    assert!(reply.result.is_some(), "{}", reply.error_message);
    while replies.message().await.unwrap().is_some() {}
    let last = scrape(maddr);
    assert_eq!(histogram_count(&last, "persona_monitor_score", &noise), monitored + 1);
    assert_eq!(
        value(&last, "grpc_server_handled_total", &[("grpc_method", "MonitorStream"), ("grpc_code", "OK")]),
        1.0
    );
}

/// A `persona-server` process on 127.0.0.1 serving the embedded model; killed when dropped.
struct ServerProcess {
    child: std::process::Child,
    addr: SocketAddr,
    /// Every line the server wrote to stderr so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    /// Starts the server binary on `vector_dir` and waits until its models are loaded.
    async fn start(vector_dir: &std::path::Path) -> Self {
        Self::start_with(vector_dir, &[]).await
    }

    /// [`Self::start`] with more environment variables.
    async fn start_with(vector_dir: &std::path::Path, env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_persona-server"))
            .env("PERSONA__HTTP_LISTEN", "")
            .envs(env.iter().copied())
            .args(["--listen", "127.0.0.1:0"])
            .env("PERSONA__MODEL_DIR", common::embedded_gguf().parent().unwrap())
            .env("PERSONA__AUTO_FETCH", "false")
            .env("PERSONA__VECTOR_DIR", vector_dir)
            .env("PERSONA__MODELS__0__MAX_CONTEXT", "1024")
            .env("PERSONA__CPU_THREADS", "1")
            .env("PERSONA__TELEMETRY__LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            .env_remove("PERSONA_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting persona-server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            // Reads every line so the pipe never fills; the listening line carries the address.
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening")
                    && let Some(addr) = line.split("addr=").nth(1).and_then(|a| a.split_whitespace().next())
                {
                    let _ = tx.send(addr.parse::<SocketAddr>().expect("listening address"));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the server printed its address");
        let process = Self { child, addr, log };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(mut c) = persona_client::connect(&addr.to_string()).await
                && c.list_models(pb::ListModelsRequest {}).await.is_ok()
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the server did not load its model");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        process
    }

    async fn client(&self) -> persona_client::Client {
        persona_client::connect(&self.addr.to_string()).await.unwrap()
    }
}

fn steered(vector: &str) -> pb::GenerateRequest {
    let mut req = greedy("What should I do this weekend?", 16);
    req.steering = vec![steer_by_name(vector, Some(10), 8.0)];
    req
}

async fn put(c: &mut persona_client::Client, name: &str, seed: u64, overwrite: bool) -> Result<(), tonic::Status> {
    let values = persona_client::pseudo_random_vector(seed, 31 * 576);
    c.put_vector(pb::PutVectorRequest { name: name.into(), values, overwrite, ..Default::default() }).await.map(|_| ())
}

async fn values_of(c: &mut persona_client::Client, name: &str) -> Result<Vec<f32>, tonic::Status> {
    let req = pb::GetVectorRequest { name: name.into(), include_values: true };
    Ok(c.get_vector(req).await?.into_inner().values)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_directory_see_overwrites_and_deletes_on_next_use() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (ServerProcess::start(dir.path()).await, ServerProcess::start(dir.path()).await);
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    put(&mut ca, "shared", 1, false).await.unwrap();
    assert_eq!(values_of(&mut cb, "shared").await.unwrap(), persona_client::pseudo_random_vector(1, 31 * 576));
    let first = generate_text(&mut cb, steered("shared")).await.unwrap().token_ids;
    assert_eq!(first, generate_text(&mut ca, steered("shared")).await.unwrap().token_ids);

    // B has used the vector; A replaces it.
    put(&mut ca, "shared", 2, true).await.unwrap();
    assert_eq!(values_of(&mut cb, "shared").await.unwrap(), persona_client::pseudo_random_vector(2, 31 * 576));
    let second = generate_text(&mut cb, steered("shared")).await.unwrap().token_ids;
    assert_eq!(
        second,
        generate_text(&mut ca, steered("shared")).await.unwrap().token_ids,
        "B steers with A's new values"
    );
    assert_ne!(first, second, "the two vectors steer differently");
    let exists = put(&mut cb, "shared", 3, false).await.unwrap_err();
    assert_eq!(exists.code(), tonic::Code::AlreadyExists);

    ca.delete_vector(pb::DeleteVectorRequest { name: "shared".into() }).await.unwrap();
    assert_eq!(values_of(&mut cb, "shared").await.unwrap_err().code(), tonic::Code::NotFound);
    assert_eq!(generate_text(&mut cb, steered("shared")).await.unwrap_err().code(), tonic::Code::NotFound);
    let listed = cb.list_vectors(pb::ListVectorsRequest::default()).await.unwrap().into_inner().vectors;
    assert!(listed.is_empty(), "B lists nothing after A's delete: {listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_during_puts_keeps_every_acknowledged_vector_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path()).await;
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (addr, acknowledged) = (server.addr, acknowledged.clone());
        writers.push(tokio::spawn(async move {
            let mut c = persona_client::connect(&addr.to_string()).await.unwrap();
            for i in 0.. {
                // Overwrites too: a name acknowledged twice must hold the later values.
                let (name, seed) = (format!("w{w}-{}", i % 7), w * 1000 + i);
                match put(&mut c, &name, seed, true).await {
                    Ok(()) => acknowledged.lock().unwrap().push((name, seed)),
                    Err(_) => break,
                }
            }
        }));
    }
    // Let a few dozen puts land, then kill -9 mid-stream.
    while acknowledged.lock().unwrap().len() < 40 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let restarted = ServerProcess::start(dir.path()).await;
    let mut c = restarted.client().await;
    let listed = c.list_vectors(pb::ListVectorsRequest::default()).await.unwrap().into_inner().vectors;
    let names: std::collections::BTreeSet<String> = listed.iter().map(|v| v.name.clone()).collect();
    // The last acknowledged seed of each name is what it holds (a put after it may have landed
    // unacknowledged: then that one's values, which are whole too).
    let mut last = std::collections::BTreeMap::new();
    for (name, seed) in &acknowledged {
        last.insert(name.clone(), *seed);
    }
    for (name, seed) in &last {
        assert!(names.contains(name), "acknowledged `{name}` is listed after the crash");
        let held = values_of(&mut c, name).await.unwrap();
        let w = seed / 1000;
        let whole =
            (*seed..seed + 50).any(|s| s / 1000 == w && held == persona_client::pseudo_random_vector(s, 31 * 576));
        assert!(whole, "`{name}` holds a whole vector written at or after its last acknowledged put");
    }
    for name in &names {
        assert!(name.starts_with('w') && name.len() <= 5, "only put names are listed, no partial files: {name}");
    }
    drop(restarted);
    drop(server);
}

/// A CA and certificates it signs, written as PEM files into a directory.
struct Pki {
    dir: std::path::PathBuf,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(dir: &std::path::Path, name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), issuer.pem()).unwrap();
        Self { dir: dir.to_path_buf(), issuer }
    }

    fn ca(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    /// A leaf certificate for `localhost` signed by this CA: (cert, key) paths.
    fn leaf(&self, file: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (self.dir.join(format!("{file}.pem")), self.dir.join(format!("{file}-key.pem")));
        // Written beside and renamed, as a secret volume swaps its files.
        std::fs::write(c.with_extension("tmp"), cert.pem()).unwrap();
        std::fs::write(k.with_extension("tmp"), key.serialize_pem()).unwrap();
        std::fs::rename(c.with_extension("tmp"), &c).unwrap();
        std::fs::rename(k.with_extension("tmp"), &k).unwrap();
        (c, k)
    }
}

fn key(name: &str, secret: &str, scopes: &[&str]) -> persona_server::auth::ApiKey {
    let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    persona_server::auth::ApiKey::from_hex(name, &persona_server::auth::hash_hex(secret), &scopes).unwrap()
}

async fn tls_client(
    addr: SocketAddr,
    ca: &std::path::Path,
    api_key: Option<&str>,
) -> anyhow::Result<persona_client::Client> {
    let opts = persona_client::ConnectOptions {
        api_key: api_key.map(str::to_string),
        tls_ca: Some(ca.to_path_buf()),
        tls_domain: Some("localhost".into()),
        ..Default::default()
    };
    persona_client::connect_with(&addr.to_string(), &opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_scopes_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    let pki = Pki::new(certs.path(), "one");
    let (cert, key_file) = pki.leaf("server");
    let security = persona_server::security::Security::open()
        .with_keys(vec![
            key("reader", "read-secret", &["read"]),
            key("writer", "write-secret", &["read", "write"]),
            key("generator", "gen-secret", &["generate"]),
        ])
        .with_tls(persona_server::security::TlsFiles { cert, key: key_file, client_ca: None })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.http_listen = "127.0.0.1:0".into();
    let running = common::start_secured(s, security);
    let ca = pki.ca("one");
    let list = pb::ListVectorsRequest::default;

    let mut anonymous = tls_client(running.addr, &ca, None).await.unwrap();
    let e = anonymous.list_vectors(list()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("Bearer"), "{}", e.message());

    let mut wrong = tls_client(running.addr, &ca, Some("guess")).await.unwrap();
    let e = wrong.list_vectors(list()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(e.message(), "unknown API key");

    let mut reader = tls_client(running.addr, &ca, Some("read-secret")).await.unwrap();
    assert!(reader.list_vectors(list()).await.is_ok());
    let e = put(&mut reader, "guarded", 1, false).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("`write` scope"), "{}", e.message());
    let e = generate_text(&mut reader, greedy("Hi", 2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    let mut writer = tls_client(running.addr, &ca, Some("write-secret")).await.unwrap();
    put(&mut writer, "guarded", 1, false).await.unwrap();
    assert_eq!(values_of(&mut reader, "guarded").await.unwrap().len(), 31 * 576);
    let e = writer.delete_vector(pb::DeleteVectorRequest { name: "guarded".into() });
    assert!(e.await.is_ok());

    let mut generator = tls_client(running.addr, &ca, Some("gen-secret")).await.unwrap();
    let out = generate_text(&mut generator, greedy("What is the capital of France?", 8)).await.unwrap();
    assert!(!out.token_ids.is_empty());

    // The HTTP API of the same server: the same certificate, keys and scopes.
    let http = running.http_addr.unwrap();
    assert_eq!(https_get(http, &ca, "/v1/models", None).await.0, 401);
    assert_eq!(https_get(http, &ca, "/v1/models", Some("guess")).await.0, 401);
    let (status, body) = https_get(http, &ca, "/v1/models", Some("read-secret")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("smollm2-135m-instruct"), "{body}");
    let (status, body) = https_get(http, &ca, "/v1/models", Some("gen-secret")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("`read` scope"), "{body}");
    assert!(https_get(http, &ca, "/", None).await.1.contains("persona-steer console"), "the console's files are open");

    // Health needs no key.
    let channel = persona_client::channel(
        &running.addr.to_string(),
        &persona_client::ConnectOptions {
            tls_ca: Some(ca.clone()),
            tls_domain: Some("localhost".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let req = tonic_health::pb::HealthCheckRequest { service: "persona.v1.PersonaService".into() };
    assert_eq!(health.check(req).await.unwrap().into_inner().status, 1, "SERVING");

    // Plaintext to the TLS port gets nowhere.
    let plain = async {
        let mut c = persona_client::connect(&running.addr.to_string()).await?;
        c.list_models(pb::ListModelsRequest {}).await?;
        anyhow::Ok(())
    };
    assert!(tokio::time::timeout(std::time::Duration::from_secs(10), plain).await.map_or(true, |r| r.is_err()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_and_certificates_reload_without_dropping_connections() {
    let certs = tempfile::tempdir().unwrap();
    let (server_ca, client_ca) = (Pki::new(certs.path(), "server"), Pki::new(certs.path(), "client"));
    let (cert, key_file) = server_ca.leaf("server");
    let (client_cert, client_key) = client_ca.leaf("client");
    let files = persona_server::security::TlsFiles {
        cert: cert.clone(),
        key: key_file.clone(),
        client_ca: Some(client_ca.ca("client")),
    };
    let security = persona_server::security::Security::open().with_tls(files).unwrap();
    let watcher = tokio::spawn(security.clone().watch(std::time::Duration::from_millis(100)));
    let dir = tempfile::tempdir().unwrap();
    let running = common::start_secured(settings(dir.path()), security);
    let opts = |ca: std::path::PathBuf, with_cert: bool| persona_client::ConnectOptions {
        tls_ca: Some(ca),
        tls_domain: Some("localhost".into()),
        tls_cert: with_cert.then(|| client_cert.clone()),
        tls_key: with_cert.then(|| client_key.clone()),
        ..Default::default()
    };
    let addr = running.addr.to_string();
    let models = pb::ListModelsRequest {};

    let without = async {
        let mut c = persona_client::connect_with(&addr, &opts(server_ca.ca("server"), false)).await?;
        c.list_models(models).await?;
        anyhow::Ok(())
    };
    assert!(without.await.is_err(), "no client certificate, no call");
    let mut held = persona_client::connect_with(&addr, &opts(server_ca.ca("server"), true)).await.unwrap();
    held.list_models(models).await.unwrap();

    // Rotate the server certificate to one from a new CA: the watcher notices the files change.
    let rotated = Pki::new(certs.path(), "rotated");
    let (new_cert, new_key) = rotated.leaf("new-server");
    std::fs::rename(&new_cert, &cert).unwrap();
    std::fs::rename(&new_key, &key_file).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let fresh = async {
            let mut c = persona_client::connect_with(&addr, &opts(rotated.ca("rotated"), true)).await?;
            c.list_models(models).await?;
            anyhow::Ok(())
        };
        if fresh.await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "new connections never got the rotated certificate");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // New connections no longer see the old certificate; the connection opened before keeps working.
    let old = async {
        let mut c = persona_client::connect_with(&addr, &opts(server_ca.ca("server"), true)).await?;
        c.list_models(models).await?;
        anyhow::Ok(())
    };
    assert!(old.await.is_err(), "the old certificate is gone for new connections");
    held.list_models(models).await.expect("the connection opened before the rotation is not dropped");
    watcher.abort();
}

/// Which of two servers answered: each holds one vector named after itself.
async fn answered_by(c: &mut persona_client::Client) -> String {
    let listed = c.list_vectors(pb::ListVectorsRequest::default()).await.unwrap().into_inner().vectors;
    listed.into_iter().map(|v| v.name).collect::<Vec<_>>().join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_addresses_spread_calls_over_every_replica_and_follow_re_resolution() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (start(settings(da.path())), start(settings(db.path())));
    for (server, name) in [(&a, "a"), (&b, "b")] {
        let mut c = persona_client::connect(&server.addr.to_string()).await.unwrap();
        put(&mut c, name, 1, false).await.unwrap();
    }
    // The name resolves to both replicas, then to A only (B scaled away).
    let resolved = std::sync::Arc::new(std::sync::Mutex::new(vec![a.addr, b.addr]));
    let lookup = {
        let resolved = resolved.clone();
        move |_name: String| {
            let addrs = resolved.lock().unwrap().clone();
            async move { Ok(addrs) }
        }
    };
    let every = std::time::Duration::from_millis(200);
    let opts = persona_client::ConnectOptions::default();
    let channel = persona_client::balanced_with("persona-server-headless:50051", &opts, every, lookup).await.unwrap();
    let mut c =
        pb::persona_service_client::PersonaServiceClient::with_interceptor(channel, persona_client::ApiKey::default());
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        *seen.entry(answered_by(&mut c).await).or_default() += 1;
    }
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["a", "b"], "both replicas answer: {seen:?}");
    assert!(seen.values().all(|&n| n >= 5), "calls are spread: {seen:?}");

    *resolved.lock().unwrap() = vec![a.addr];
    tokio::time::sleep(every * 4).await;
    for _ in 0..20 {
        assert_eq!(answered_by(&mut c).await, "a", "B left the name; calls go to A only");
    }

    // The real resolver: a name with one address works the same way.
    let port = a.addr.port();
    let mut real = persona_client::connect(&format!("dns:///localhost:{port}")).await.unwrap();
    assert_eq!(answered_by(&mut real).await, "a");
}

/// An OTLP trace collector: keeps every span exported to it.
#[derive(Clone, Default)]
struct Collector(std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let spans = req.into_inner().resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(Default::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_traced_to_an_otlp_collector_with_queue_prefill_and_decode_spans() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_with(dir.path(), &[("PERSONA__TELEMETRY__OTLP_ENDPOINT", &endpoint)]).await;

    // The caller's trace context: the server's spans join this trace.
    let (trace, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut c = server.client().await;
    let mut req = tonic::Request::new(greedy("Name a colour.", 6));
    req.metadata_mut().insert("traceparent", format!("00-{trace}-{caller_span}-01").parse().unwrap());
    let mut stream = c.generate(req).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}

    // SIGTERM: the server drains, then flushes its spans on the way out.
    let status = std::process::Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status();
    assert!(status.unwrap().success());
    assert!(server.child.wait().unwrap().success(), "clean exit on SIGTERM");

    let spans = collector.0.lock().unwrap().clone();
    let find = |name: &str| {
        spans.iter().find(|s| s.name == name && hex(&s.trace_id) == trace).unwrap_or_else(|| {
            panic!("no `{name}` span in trace {trace}: {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>())
        })
    };
    let rpc = find("persona.v1.PersonaService/Generate");
    assert_eq!(hex(&rpc.parent_span_id), caller_span, "the request span continues the caller's trace");
    let phases = ["queue", "prefill", "decode"].map(find);
    for p in &phases {
        assert_eq!(p.parent_span_id, rpc.span_id, "`{}` is a child of the request span", p.name);
        let inside =
            p.start_time_unix_nano >= rpc.start_time_unix_nano && p.end_time_unix_nano <= rpc.end_time_unix_nano;
        assert!(
            inside,
            "`{}` [{}, {}] lies within the request [{}, {}]",
            p.name, p.start_time_unix_nano, p.end_time_unix_nano, rpc.start_time_unix_nano, rpc.end_time_unix_nano
        );
    }
    for w in phases.windows(2) {
        assert!(
            w[0].end_time_unix_nano <= w[1].start_time_unix_nano + 1_000_000,
            "{} ends before {} starts",
            w[0].name,
            w[1].name
        );
    }
    let log = server.log.lock().unwrap().clone();
    let line =
        log.iter().find(|l| l.contains("rpc finished") && l.contains("Generate")).expect("a log line per request");
    assert!(line.contains(&format!("trace_id={trace}")), "the log line carries the trace id: {line}");
}

/// A GET over TLS (verified against `ca` for "localhost"), HTTP/1.1: the status and the body.
async fn https_get(addr: SocketAddr, ca: &std::path::Path, path: &str, key: Option<&str>) -> (u16, String) {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // A peer that closes without close_notify is fine here: the body is complete.
    let _ = tls.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}
