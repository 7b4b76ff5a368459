//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol on
//! `--remote-debugging-pipe`: fd 3 = commands in, fd 4 = replies out, messages
//! separated by NUL. That needs nothing beyond std + serde_json: no WebSocket
//! client, no driver binary.
//!
//! For tests that need a real browser's rules (CORS, no-cors requests, DNS names)
//! or a real rendering (the monitor page): launch, navigate, evaluate
//! JavaScript, wait for a condition, emulate viewports and colour schemes, take
//! screenshots, and read the protocol events (network requests, exceptions).
//!
//! The browser reaches 127.0.0.1 and nothing else: every other name fails to
//! resolve (`--host-resolver-rules`), and a test may also route every request
//! that is not to loopback through a proxy of its own that records and refuses
//! it (`proxy` in [`Browser::launch`]).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Generous bound for anything a page should do "within a few updates"; also how
/// long [`Browser::wait_for`] waits.
pub const UI_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one protocol command may take before the browser counts as hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`Browser::wait_for`] shows of the page when it times out, unless the
/// test set its own with [`Browser::set_state_probe`].
const DEFAULT_STATE_PROBE: &str = "({url: location.href, ready: document.readyState, title: document.title})";

pub struct Browser {
    child: Child,
    commands: ChildStdin,
    replies: Receiver<Value>,
    next_id: u64,
    /// The page's session (flattened `Target.attachToTarget`); commands go there.
    session: String,
    /// Every protocol event seen so far (network requests, exceptions, ...).
    events: Vec<Value>,
    /// JavaScript whose value a timed-out [`Browser::wait_for`] reports.
    state_probe: &'static str,
    log_path: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromium` headless with a fresh profile and opens one page at
    /// 1920x1080.
    ///
    /// `host_rules` are extra `--host-resolver-rules` entries (say,
    /// `MAP rebound.example 127.0.0.1`); every other name fails to resolve and
    /// 127.0.0.1 stays reachable. With `proxy`, every request not to 127.0.0.1
    /// goes there (a canary of the test's that records and refuses it); without
    /// one, the browser uses no proxy at all.
    pub fn launch(chromium: &Path, host_rules: &[&str], proxy: Option<SocketAddr>) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let log_path = profile.path().join("chromium.log");
        let log = std::fs::File::create(&log_path).expect("chromium log");
        let resolver_rules: Vec<&str> = host_rules.iter().copied().chain(["MAP * ~NOTFOUND", "EXCLUDE 127.0.0.1"]).collect();
        let mut flags = vec![
            "--headless".to_string(),
            "--no-sandbox".into(), // CI runs as root
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-default-apps".into(),
            "--disable-extensions".into(),
            "--disable-domain-reliability".into(),
            "--disable-client-side-phishing-detection".into(),
            "--no-pings".into(),
            "--disable-quic".into(),
            // Chromium's own background services (time sync, autofill, sign-in,
            // optimisation hints): none is the page's business.
            "--disable-features=NetworkTimeServiceQuerying,AutofillServerCommunication,OptimizationHints,MediaRouter,Translate,CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions".into(),
            "--disable-breakpad".into(),
            "--hide-scrollbars".into(),
            "--mute-audio".into(),
            "--window-size=1920,1080".into(),
            format!("--user-data-dir={}", profile.path().display()),
            format!("--host-resolver-rules={}", resolver_rules.join(", ")),
        ];
        match proxy {
            Some(proxy) => {
                flags.push(format!("--proxy-server=http://{proxy}"));
                flags.push("--proxy-bypass-list=127.0.0.1".into());
            }
            None => flags.push("--no-proxy-server".into()),
        }
        flags.push("--remote-debugging-pipe".into());
        flags.push("about:blank".into());
        // The protocol pipe lives on fds 3 and 4; std can only hand over 0-2, so a
        // shell moves our stdin/stdout pipes there before exec'ing chromium.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(chromium)
            .args(&flags)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn chromium");
        let commands = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, replies) = channel();
        std::thread::spawn(move || loop {
            let mut msg = Vec::new();
            match out.read_until(0, &mut msg) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if msg.last() == Some(&0) {
                        msg.pop();
                    }
                    let Ok(v) = serde_json::from_slice::<Value>(&msg) else { continue };
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            commands,
            replies,
            next_id: 0,
            session: String::new(),
            events: Vec::new(),
            state_probe: DEFAULT_STATE_PROBE,
            log_path,
            _profile: profile,
        };
        let target = b.send(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b.send(None, "Target.attachToTarget", json!({"targetId": target_id, "flatten": true}));
        b.session = attached["sessionId"].as_str().expect("sessionId").to_string();
        for domain in ["Page.enable", "Runtime.enable", "Network.enable"] {
            b.call(domain, json!({}));
        }
        b.set_viewport(1920, 1080, false);
        b
    }

    /// Sends one command (to the page session or, with `None`, to the browser) and
    /// waits for its reply, keeping the events that arrive meanwhile.
    fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        if let Err(e) = self.commands.write_all(&bytes).and_then(|_| self.commands.flush()) {
            panic!("{method}: writing to chromium failed: {e}\n{}", self.log());
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(reply) if reply["id"] == json!(id) => {
                    if let Some(err) = reply.get("error") {
                        panic!("{method} failed: {err}");
                    }
                    return reply["result"].clone();
                }
                Ok(event) => self.events.push(event),
                Err(RecvTimeoutError::Timeout) => panic!("{method}: no reply from chromium in {COMMAND_TIMEOUT:?}\n{}", self.log()),
                Err(RecvTimeoutError::Disconnected) => panic!("{method}: chromium went away\n{}", self.log()),
            }
        }
    }

    /// Sends one command to the page's session.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params)
    }

    /// Evaluates a JS expression in the page (promises awaited) and returns its
    /// JSON value; panics if it throws.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}));
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("evaluating {expr:?} threw: {ex}");
        }
        r["result"]["value"].clone()
    }

    /// Starts loading `url` without waiting for it (a page that keeps a stream
    /// open never finishes loading); follow with [`Browser::wait_for`].
    pub fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        assert!(r.get("errorText").is_none(), "navigating to {url}: {r}");
    }

    /// Opens `url` and waits until its document has loaded. Unlike
    /// [`Browser::navigate`] it accepts any response, error pages included: tests
    /// of refusals open pages the daemon refuses.
    pub fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        let deadline = Instant::now() + UI_TIMEOUT;
        while Instant::now() < deadline {
            let state = self.eval("document.readyState + ' ' + location.href");
            if state.as_str().is_some_and(|s| s.starts_with("complete") && s.contains(url.trim_end_matches('/'))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{url} did not load\n{}", self.log());
    }

    /// The JavaScript expression whose value a timed-out [`Browser::wait_for`]
    /// prints, so a failure shows what the test would have read from the page.
    pub fn set_state_probe(&mut self, js: &'static str) {
        self.state_probe = js;
    }

    /// Polls a JS condition until it is `true` (at most [`UI_TIMEOUT`]); on
    /// timeout panics with `what` and the page's state (see
    /// [`Browser::set_state_probe`]). A condition that throws (the document is
    /// still loading after a navigation) counts as not yet true.
    pub fn wait_for(&mut self, what: &str, cond: &str) {
        let guarded = format!("(() => {{ try {{ return ({cond}) === true; }} catch (e) {{ return false; }} }})()");
        let deadline = Instant::now() + UI_TIMEOUT;
        while Instant::now() < deadline {
            if self.eval(&guarded) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let probe = self.state_probe;
        let state = self.eval(probe);
        panic!("timed out waiting for {what} ({cond})\npage state: {state:#}\n{}", self.log());
    }

    pub fn set_viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        );
    }

    /// Emulates `prefers-color-scheme: scheme` (`light` or `dark`).
    pub fn set_color_scheme(&mut self, scheme: &str) {
        self.call("Emulation.setEmulatedMedia", json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}));
    }

    /// Lets the page download files, into `dir`.
    pub fn allow_downloads_to(&mut self, dir: &Path) {
        self.send(None, "Browser.setDownloadBehavior", json!({"behavior": "allow", "downloadPath": dir.display().to_string()}));
    }

    /// Saves a PNG of the viewport into `test-artifacts/`, for a person to look at.
    pub fn screenshot(&mut self, name: &str) -> PathBuf {
        self.capture(name, json!({"format": "png"}))
    }

    /// Saves a PNG of the whole page (everything below the fold too).
    pub fn screenshot_full_page(&mut self, name: &str) -> PathBuf {
        let size = self.call("Page.getLayoutMetrics", json!({}))["cssContentSize"].clone();
        let clip = json!({"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1});
        self.capture(name, json!({"format": "png", "captureBeyondViewport": true, "clip": clip}))
    }

    fn capture(&mut self, name: &str, params: Value) -> PathBuf {
        let shot = self.call("Page.captureScreenshot", params);
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-artifacts");
        std::fs::create_dir_all(&dir).expect("create test-artifacts/");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }

    /// Drains pending events (so `events` is current without sending a command).
    fn pump(&mut self) {
        while let Ok(ev) = self.replies.try_recv() {
            self.events.push(ev);
        }
    }

    /// The parameters of every protocol event named `method` so far.
    pub fn events_named(&mut self, method: &str) -> Vec<Value> {
        self.pump();
        self.events.iter().filter(|e| e["method"] == json!(method)).map(|e| e["params"].clone()).collect()
    }

    /// URLs of every request the page made (documents, assets, fetch, EventSource).
    pub fn requested_urls(&mut self) -> Vec<String> {
        self.events_named("Network.requestWillBeSent")
            .iter()
            .map(|p| p["request"]["url"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The tail of chromium's own log, for panic messages.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        format!("--- chromium log (tail) ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ask politely so chromium takes its helper processes down with it, then
        // make sure (bounded) before the profile dir is removed.
        let mut bytes = serde_json::to_vec(&json!({"id": 0, "method": "Browser.close"})).unwrap();
        bytes.push(0);
        let _ = self.commands.write_all(&bytes);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (screenshots arrive base64-encoded); no crate for 20 lines.
fn base64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some((c - b'A') as u32),
            b'a'..=b'z' => Some((c - b'a' + 26) as u32),
            b'0'..=b'9' => Some((c - b'0' + 52) as u32),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
