//! The web console in a real browser: Chromium (Debian's `chromium` and `chromium-driver`)
//! driven headless over WebDriver against a server on the embedded model with an extracted and
//! evaluated vector. Each page is screenshotted at 1280 px and at phone width into
//! `$CARGO_TARGET_DIR/console-screenshots/` (or `PERSONA_SCREENSHOT_DIR`), for people to look at.

mod common;

use common::{settings, start};
use fantoccini::{Client, Locator};
use persona_client::pb;
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a free port, killed on drop.
struct Driver(std::process::Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chromedriver() -> Driver {
    assert!(
        std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
        "the console test needs Chromium: apt-get install chromium chromium-driver (scripts/test and .ci/run do)"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting chromedriver");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Driver(child, port)
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--window-size=1280,1000", "--force-device-scale-factor=1"],
        }),
    );
    fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.1))
        .await
        .expect("a Chromium session")
}

fn screenshot_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("PERSONA_SCREENSHOT_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").into());
        target.join("console-screenshots")
    });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shoot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
}

/// Waits until `js` (a function body) returns a truthy value; returns it.
async fn until(c: &Client, what: &str, js: &str, timeout: Duration) -> serde_json::Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let v = c.execute(js, vec![]).await.unwrap();
        if !(v.is_null() || v == false || v == "" || v == 0) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn no_console_errors(c: &Client, page: &str) {
    let errors = c.execute("return window.__consoleErrors", vec![]).await.unwrap();
    assert_eq!(errors, serde_json::json!([]), "console errors on {page}");
}

/// Types into the inputs labelled so, replacing what they held.
async fn fill(c: &Client, fields: &[(&str, &str)]) {
    for (label, value) in fields {
        let input =
            c.find(Locator::XPath(&format!("//label[text()='{label}']/following-sibling::input"))).await.unwrap();
        input.clear().await.unwrap();
        input.send_keys(value).await.unwrap();
    }
}

/// The text an element shows, by the browser's own rendering rules (`innerText`: line breaks
/// where the page breaks lines, `white-space: pre-wrap` kept). Not WebDriver's Get Element Text:
/// chromedriver 156's drops the paragraph breaks of an answer's pre-wrap token spans that
/// Chromium itself renders (and 148's kept), so comparisons on it tested the driver.
async fn text(c: &Client, css: &str) -> String {
    c.wait().for_element(Locator::Css(css)).await.unwrap();
    let js = format!("return document.querySelector({}).innerText", serde_json::to_string(css).unwrap());
    let v = c.execute(&js, vec![]).await.unwrap();
    v.as_str().unwrap_or_else(|| panic!("{css} has no text: {v}")).to_string()
}

/// An answer shows exactly what the model wrote, its line breaks included: what the browser
/// renders (`innerText`) equals the streamed tokens' text (`textContent`).
async fn shows_every_line_break(c: &Client, css: &str) {
    let js = format!(
        "const e = document.querySelector({}); return [e.innerText, e.textContent]",
        serde_json::to_string(css).unwrap()
    );
    let v = c.execute(&js, vec![]).await.unwrap();
    let (shown, held) = (v[0].as_str().unwrap(), v[1].as_str().unwrap());
    assert!(!held.is_empty(), "{css} holds an answer");
    assert_eq!(shown, held, "{css} renders the answer as written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_steers_sweeps_and_monitors_in_chromium() {
    let driver = chromedriver();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.http_listen = "127.0.0.1:0".into();
    let running = start(s);
    let base = format!("http://{}", running.http_addr.unwrap());

    // An extracted vector with a small evaluation, so every page has something to show.
    let mut c = persona_client::connect(&running.addr.to_string()).await.unwrap();
    common::extract(&mut c, common::small_evil_extraction()).await;
    let mut st = c
        .evaluate_steering(pb::EvaluateSteeringRequest {
            vector: "evil".into(),
            coefficients: vec![1.0, 4.0],
            max_questions: 2,
            sampling: Some(pb::SamplingParams { max_tokens: 16, ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while st.message().await.unwrap().is_some() {}

    let b = browser(&driver).await;
    let result = drive(&b, &base).await;
    b.close().await.unwrap();
    result
}

async fn drive(b: &Client, base: &str) {
    let long = Duration::from_secs(120);

    // Playground: pick the vector, generate, then move the coefficient and see the steered answer change.
    b.goto(&format!("{base}/#/playground")).await.unwrap();
    b.wait().for_element(Locator::Css("form select")).await.unwrap().select_by_value("evil").await.unwrap();
    let rec = text(b, "form .slider output").await;
    assert!(!rec.is_empty(), "the layer slider shows its value");
    b.find(Locator::Css("form button[type=submit]")).await.unwrap().click().await.unwrap();
    let done = "return [...document.querySelectorAll('.meta')].every(m => /tokens/.test(m.textContent)) \
                && document.querySelectorAll('#answer-steered .tok').length > 0";
    until(b, "both answers", done, long).await;
    let warning = text(b, "#answer-steered").await;
    assert!(!warning.is_empty());
    let first = text(b, "#answer-steered").await;
    let unsteered = text(b, "#answer-unsteered").await;
    shows_every_line_break(b, "#answer-steered").await;
    shows_every_line_break(b, "#answer-unsteered").await;
    let tinted = b
        .execute(
            "return [...document.querySelectorAll('#answer-steered .tok')].filter(t => t.style.background && t.title).length",
            vec![],
        )
        .await
        .unwrap();
    let sample =
        b.execute("return document.querySelector('#answer-steered').innerHTML.slice(0, 400)", vec![]).await.unwrap();
    assert!(tinted.as_u64().unwrap() > 0, "tokens are tinted by their monitor score: {sample}");
    let prompt_note = b
        .execute("return document.querySelector('#answer-steered').previousElementSibling.textContent", vec![])
        .await
        .unwrap();
    assert!(
        prompt_note.as_str().unwrap().contains("before the first token"),
        "the last-prompt-token reading: {prompt_note}"
    );
    shoot(b, "playground-1280").await;
    // The coefficient slider to its far end with the keyboard: the steered side re-runs alone.
    let coef = b.find(Locator::Css("form .field:nth-child(3) input[type=range]")).await.unwrap();
    coef.send_keys("\u{E010}").await.unwrap(); // End
    until(b, "a changed steered answer", &format!(
        "const t = document.querySelector('#answer-steered').textContent; \
         return !document.querySelector('section[aria-busy]') && t.length > 0 && t !== {} && /tokens/.test(document.querySelector('.meta').textContent)",
        serde_json::to_string(&first).unwrap()
    ), long).await;
    assert_eq!(text(b, "#answer-unsteered").await, unsteered, "the unsteered side stays");
    let changed = text(b, "#answer-steered").await;
    // A second turn: each side goes on from its own answer.
    b.find(Locator::XPath("//button[text()='Reply to these answers']")).await.unwrap().click().await.unwrap();
    let message = b.find(Locator::XPath("//label[text()='Your message']/following-sibling::textarea")).await.unwrap();
    message.send_keys("Why?").await.unwrap();
    b.find(Locator::Css("form button[type=submit]")).await.unwrap().click().await.unwrap();
    until(b, "second answers", done, long).await;
    shows_every_line_break(b, "#answer-steered").await;
    shows_every_line_break(b, "#answer-unsteered").await;
    let past = text(b, "#history-steered").await;
    assert!(past.contains("You: What should I do if I find a lost wallet?"), "{past}");
    assert!(past.contains(changed.trim()), "the steered side remembers its own answer: {past:?} lacks {changed:?}");
    let past_unsteered = text(b, "#history-unsteered").await;
    assert!(
        past_unsteered.contains(unsteered.trim()),
        "and the unsteered side its own: {past_unsteered:?} lacks {unsteered:?}"
    );
    shoot(b, "playground-conversation-1280").await;
    no_console_errors(b, "playground").await;

    // Spectrum: five answers with scores.
    b.goto(&format!("{base}/#/spectrum")).await.unwrap();
    b.wait().for_element(Locator::Css("form button[type=submit]")).await.unwrap().click().await.unwrap();
    until(b, "five spectrum cards", "return document.querySelectorAll('.grid5 .card').length === 5", long).await;
    let labels = b
        .execute(
            "return [...document.querySelectorAll('.grid5 .card h3 span:first-child')].map(s => s.textContent)",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(labels, serde_json::json!(["−2c", "−c", "unsteered", "+c", "+2c"]));
    shoot(b, "spectrum-1280").await;
    no_console_errors(b, "spectrum").await;

    // Sweep: the stored evaluation as two charts; then a new (small) evaluation with progress.
    b.goto(&format!("{base}/#/sweep/vector=evil")).await.unwrap();
    until(b, "sweep charts", "return document.querySelectorAll('svg.chart').length === 2", long).await;
    assert!(text(b, "main").await.contains("Recommended: layer"));
    shoot(b, "sweep-1280").await;
    fill(b, &[("Questions", "1"), ("Tokens per answer", "8"), ("Coefficients", "2 5")]).await;
    b.find(Locator::XPath("//button[text()='Run evaluation']")).await.unwrap().click().await.unwrap();
    let done = until(
        b,
        "the evaluation's result",
        "const t = document.querySelector('form [aria-live]').textContent; \
        return /Done in|nothing recommended/.test(t) && t",
        long,
    )
    .await;
    let heat_columns = b
        .execute("return [...document.querySelectorAll('svg.chart')].at(-1).querySelectorAll('text').length", vec![])
        .await
        .unwrap();
    assert!(heat_columns.as_u64().unwrap() > 0, "{done}");
    let coefs =
        b.execute("return document.querySelector('main').textContent.includes('coefficient')", vec![]).await.unwrap();
    assert_eq!(coefs, true);
    no_console_errors(b, "sweep").await;

    // Vectors: the library and the selected vector's separation and calibration charts.
    b.goto(&format!("{base}/#/vectors")).await.unwrap();
    until(b, "vector charts", "return document.querySelectorAll('svg.chart').length === 2", long).await;
    let rows = b.execute("return document.querySelectorAll('tbody tr').length", vec![]).await.unwrap();
    assert_eq!(rows, 3, "evil and its prompt_avg and prompt_last variants");
    // Deleting asks first; cancelling keeps the vector.
    b.find(Locator::Css("button.danger")).await.unwrap().click().await.unwrap();
    until(b, "the delete dialog", "return document.querySelector('dialog[open]')", Duration::from_secs(5)).await;
    shoot(b, "vectors-delete-1280").await;
    b.find(Locator::Css("dialog[open] button[value=cancel]")).await.unwrap().click().await.unwrap();
    until(b, "the dialog closed", "return !document.querySelector('dialog[open]')", Duration::from_secs(5)).await;
    shoot(b, "vectors-1280").await;
    no_console_errors(b, "vectors").await;

    // Traits: draft one offline, then extract it (a small one) with progress.
    b.goto(&format!("{base}/#/traits")).await.unwrap();
    until(b, "the trait library", "return document.querySelectorAll('[role=listitem]').length >= 3", long).await;
    shoot(b, "traits-1280").await;
    b.find(Locator::Css("input[placeholder='e.g. pessimistic']")).await.unwrap().send_keys("gloomy").await.unwrap();
    b.find(Locator::Css("textarea[placeholder^='What the trait means']"))
        .await
        .unwrap()
        .send_keys("Expects the worst and says so.")
        .await
        .unwrap();
    b.find(Locator::XPath("//button[text()='Draft']")).await.unwrap().click().await.unwrap();
    until(b, "the drafted definition", "return document.querySelector('pre.json')", long).await;
    assert!(text(b, "#trait-title").await.contains("gloomy"), "the draft is selected for extraction");
    fill(b, &[("Pairs (0 = all)", "1"), ("Questions (0 = all)", "2"), ("Tokens per answer", "8")]).await;
    b.find(Locator::XPath("//button[text()='Extract vector']")).await.unwrap().click().await.unwrap();
    until(
        b,
        "the extraction's result",
        "return /Stored gloomy/.test(document.querySelector('main').textContent)",
        long,
    )
    .await;
    shoot(b, "traits-extracted-1280").await;
    no_console_errors(b, "traits").await;
    b.goto(&format!("{base}/#/monitor")).await.unwrap();
    until(
        b,
        "monitored traffic",
        "return document.querySelectorAll('tbody tr').length >= 3 && document.querySelector('svg.chart')",
        long,
    )
    .await;
    shoot(b, "monitor-1280").await;
    no_console_errors(b, "monitor").await;

    // Phone width: every page lays out without horizontal scrolling.
    b.set_window_size(390, 844).await.unwrap();
    for page in ["playground", "spectrum", "sweep", "vectors", "traits", "monitor"] {
        b.goto(&format!("{base}/#/{page}")).await.unwrap();
        until(b, &format!("{page} rendered"), "return document.querySelector('main h1')", long).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let overflow = b
            .execute("return document.documentElement.scrollWidth - document.documentElement.clientWidth", vec![])
            .await
            .unwrap();
        assert!(overflow.as_i64().unwrap() <= 0, "{page} scrolls sideways at phone width by {overflow} px");
        shoot(b, &format!("{page}-390")).await;
        no_console_errors(b, page).await;
    }
}
