//! Test harness: boots the real `sandlet` binary on a free loopback port with its own data dir,
//! talks to it over HTTP, and on drop kills it and every process tree it started (shims outlive
//! sandlet by design, so they are found by an environment marker they inherit from sandlet).

#![allow(dead_code)]

pub mod form;
pub mod jupyter;
pub mod pod;
pub mod schemas;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const DEADLINE: Duration = Duration::from_secs(20);

pub struct Sandlet {
    pub child: Option<Child>,
    pub base: String,
    /// The exec API (execd's protocol).
    pub exec_base: String,
    pub data: tempfile::TempDir,
    pub extra_args: Vec<String>,
    pub token: Option<String>,
    pub stderr_log: PathBuf,
    /// Builds the command that runs the binary (the arguments follow); by default the binary
    /// itself.
    pub runner: Option<Box<dyn Fn() -> Command>>,
    agent: ureq::Agent,
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Asserts an error reply: the status and a `{"code","message"}` body with that code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "body: {}", self.text());
        let body = self.json();
        assert_eq!(body["code"], code, "body: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "body: {body}"
        );
    }
}

#[derive(Clone)]
pub struct ExecClient {
    base: String,
    agent: ureq::Agent,
}

impl ExecClient {
    /// The same client with `deadline` for each whole request instead of the harness's 30 s:
    /// for requests whose work grows with their size, on a machine that may be busy.
    pub fn with_deadline(&self, deadline: Duration) -> ExecClient {
        ExecClient {
            base: self.base.clone(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(deadline))
                .build()
                .into(),
        }
    }

    /// A request to the exec API with any body and headers.
    pub fn exec_bytes(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let url = format!("{}{}", self.base, path);
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let result = match body {
            Some(b) => self.agent.run(builder.body(b).unwrap()),
            None => self.agent.run(builder.body(()).unwrap()),
        };
        Reply::read(result.expect("exec API request"), 1 << 30)
    }
}

impl Reply {
    /// A response read whole, its body up to `limit` bytes (empty if it cannot be read).
    fn read(mut resp: ureq::http::Response<ureq::Body>, limit: u64) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = resp
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .unwrap_or_default();
        Reply {
            status,
            headers,
            body,
        }
    }
}

impl Sandlet {
    pub fn start(extra_args: &[&str]) -> Sandlet {
        Self::start_with(extra_args, None)
    }

    pub fn start_with(extra_args: &[&str], token: Option<&str>) -> Sandlet {
        Self::start_prepared(extra_args, token, |_| {})
    }

    /// Like `start_with`, running `prepare` on the (not yet created) data dir path first.
    pub fn start_prepared(
        extra_args: &[&str],
        token: Option<&str>,
        prepare: impl FnOnce(&Path),
    ) -> Sandlet {
        let data = tempfile::Builder::new()
            .prefix("sandlet-test-")
            .tempdir()
            .unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut s = Sandlet {
            child: None,
            base: String::new(),
            exec_base: String::new(),
            stderr_log: data.path().with_extension("stderr.log"),
            data,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            token: token.map(str::to_string),
            runner: None,
            agent,
        };
        prepare(&s.data_dir());
        s.boot();
        s
    }

    /// Like `start`, with the binary run by `runner` (in a simulated pod's sidecar place, say).
    pub fn start_as(extra_args: &[&str], runner: impl Fn() -> Command + 'static) -> Sandlet {
        let data = tempfile::Builder::new()
            .prefix("sandlet-test-")
            .tempdir()
            .unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut s = Sandlet {
            child: None,
            base: String::new(),
            exec_base: String::new(),
            stderr_log: data.path().with_extension("stderr.log"),
            data,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            token: None,
            runner: Some(Box::new(runner)),
            agent,
        };
        s.boot();
        s
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("tasks")
    }

    /// Starts (or restarts) the binary on the same data dir and waits until it answers.
    pub fn boot(&mut self) {
        let mut cmd = match &self.runner {
            Some(runner) => runner(),
            None => Command::new(env!("CARGO_BIN_EXE_sandlet")),
        };
        cmd.arg("serve")
            .args(["--listen-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--exec-listen-addr", "127.0.0.1:0"])
            .args(self.args_logging_addresses())
            .env("SANDLET_LOG", "debug")
            .env(MARKER_VAR, self.data_dir())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.stderr_log)
                    .unwrap(),
            );
        if let Some(token) = &self.token {
            let path = self.data.path().join("token");
            std::fs::write(&path, format!("{token}\n")).unwrap();
            cmd.arg("--token-file").arg(path);
        }
        // Port 0, and the ports sandlet bound read from its log: a port picked here and bound
        // there could be taken in between by any other test's connection.
        let log_start = std::fs::metadata(&self.stderr_log).map_or(0, |m| m.len() as usize);
        self.child = Some(cmd.spawn().expect("start sandlet"));
        let apis = ["task", "exec"].map(|api| self.serves(api).then_some(api));
        let mut bound = [None, None];
        wait_until("sandlet logs the addresses it serves on", || {
            let log = std::fs::read(&self.stderr_log).unwrap_or_default();
            let log = String::from_utf8_lossy(log.get(log_start..).unwrap_or_default());
            for (api, addr) in apis.iter().zip(&mut bound) {
                *addr = api.and_then(|api| served_addr(&log, api));
            }
            apis.iter()
                .zip(&bound)
                .all(|(api, addr)| api.is_none() || addr.is_some())
        });
        let [task, exec] = bound.map(|a| a.map(|a| format!("http://{a}")).unwrap_or_default());
        (self.base, self.exec_base) = (task, exec);
        wait_until("sandlet answers /health", || {
            self.try_get("/health").is_some_and(|r| r.status == 200)
        });
    }

    /// The extra arguments, with a `--log-level` filter widened to keep the "serving" lines
    /// [`Sandlet::boot`] reads the ports from.
    fn args_logging_addresses(&self) -> Vec<String> {
        let mut args = self.extra_args.clone();
        for i in 1..args.len() {
            if args[i - 1] == "--log-level" {
                args[i] = format!("{},sandlet::serve=info", args[i]);
            }
        }
        args
    }

    /// Whether `api` ("task" or "exec") is on: not switched off by the extra arguments (the
    /// last of a flag wins).
    fn serves(&self, api: &str) -> bool {
        let flag = if api == "task" {
            "--listen-addr"
        } else {
            "--exec-listen-addr"
        };
        let value = self
            .extra_args
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .next_back();
        value != Some("off")
    }

    /// The sandlet process itself (a runner's wrappers may stand between it and `child`).
    pub fn pid(&self) -> i32 {
        let mut found = None;
        wait_until("the sandlet process runs", || {
            found = self.find_pid();
            found.is_some()
        });
        found.unwrap()
    }

    fn find_pid(&self) -> Option<i32> {
        let child = self.child.as_ref()?.id() as i32;
        if self.runner.is_none() {
            return Some(child);
        }
        let marker = format!("{MARKER_VAR}={}", self.data_dir().display());
        let bin = std::fs::canonicalize(env!("CARGO_BIN_EXE_sandlet")).ok()?;
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == bin)
                    && std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"serve"))
                    && std::fs::read(format!("/proc/{pid}/environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|e| e == marker.as_bytes()))
            })
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.find_pid() {
            unsafe { libc_kill(pid, 9) };
            let deadline = Instant::now() + DEADLINE;
            while pid_alive(pid) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Option<Reply> {
        let url = format!("{}{}", self.base, path);
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token.or(self.token.as_deref()) {
            builder = builder.header("Authorization", format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => self.agent.run(
                builder
                    .header("Content-Type", "application/json")
                    .body(b.to_vec())
                    .unwrap(),
            ),
            None => self.agent.run(builder.body(()).unwrap()),
        };
        Some(Reply::read(result.ok()?, 64 << 20))
    }

    /// A request to the exec API, with extra headers.
    pub fn exec(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        match body {
            Some(b) => {
                let mut headers = headers.to_vec();
                headers.push(("Content-Type", "application/json"));
                self.exec_bytes(method, path, Some(b.to_string().into_bytes()), &headers)
            }
            None => self.exec_bytes(method, path, None, headers),
        }
    }

    /// A request to the exec API with any body and headers.
    pub fn exec_bytes(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.exec_client().exec_bytes(method, path, body, headers)
    }

    /// A client of the exec API that other threads can use (`Sandlet` itself stays on the
    /// test's thread).
    pub fn exec_client(&self) -> ExecClient {
        ExecClient {
            base: self.exec_base.clone(),
            agent: self.agent.clone(),
        }
    }

    /// `POST path` on the exec API and every SSE event of the answer, to its end.
    pub fn exec_events(&self, path: &str, body: &Value) -> Vec<Value> {
        let r = self.exec("POST", path, Some(body), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        sse_events(&r.text())
    }

    pub fn try_get(&self, path: &str) -> Option<Reply> {
        self.request("GET", path, None, None)
    }
    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, None, None).expect("GET")
    }
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        self.request(method, path, body, None).expect("request")
    }
    pub fn call_with_token(&self, method: &str, path: &str, token: Option<&str>) -> Reply {
        let url = format!("{}{}", self.base, path);
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            builder = builder.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = self.agent.run(builder.body(()).unwrap()).expect("request");
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_vec().unwrap();
        Reply {
            status,
            headers: vec![],
            body,
        }
    }
    pub fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, Some(body.to_string().as_bytes()))
    }
    pub fn set_tasks(&self, tasks: Value) -> Reply {
        self.post_json("/setTasks", &tasks)
    }
    pub fn tasks(&self) -> Vec<Value> {
        let r = self.get("/getTasks");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().as_array().unwrap().clone()
    }
    pub fn task(&self, name: &str) -> Option<Value> {
        let r = self.get(&format!("/tasks/{name}"));
        match r.status {
            200 => Some(r.json()),
            404 => None,
            s => panic!("GET /tasks/{name}: {s} {}", r.text()),
        }
    }

    /// Waits until the task's `processStatus` has `state` (waiting/running/terminated).
    pub fn wait_state(&self, name: &str, state: &str) -> Value {
        let mut last = Value::Null;
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Some(t) = self.task(name) {
                if t["processStatus"][state].is_object() {
                    return t;
                }
                last = t;
            }
            thread::sleep(Duration::from_millis(5));
        }
        panic!("task {name} never reached {state}; last seen {last}");
    }

    pub fn wait_gone(&self, name: &str) {
        wait_until(&format!("task {name} forgotten"), || {
            self.task(name).is_none()
        });
    }

    /// Opens the change feed; events arrive on the returned channel as (event, data).
    pub fn watch(&self) -> mpsc::Receiver<(String, Value)> {
        let (tx, rx) = mpsc::channel();
        let url = format!("{}/watchTasks", self.base);
        let token = self.token.clone();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        thread::spawn(move || {
            let mut req = agent.get(&url);
            if let Some(t) = token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let Ok(resp) = req.call() else { return };
            let reader = BufReader::new(resp.into_body().into_reader());
            let mut event = String::new();
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    let data: Value = serde_json::from_str(d.trim()).expect("feed data is JSON");
                    if tx.send((event.clone(), data)).is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}

impl Drop for Sandlet {
    fn drop(&mut self) {
        self.kill9();
        kill_trees_marked(&self.data_dir());
        if thread::panicking() {
            eprintln!("--- sandlet stderr ---\n{}", self.stderr());
        }
        let _ = std::fs::remove_file(&self.stderr_log);
    }
}

/// What a refused request must leave untouched: the list, byte for byte, and the task dirs.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub tasks: String,
    pub dirs: std::collections::BTreeSet<String>,
}

impl Sandlet {
    /// A task's `run.json` (its shim's and process's identities), once written.
    pub fn run_record(&self, task: &str) -> Value {
        let path = self.data_dir().join(task).join("run.json");
        wait_until("run.json written", || path.exists());
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    }

    /// The entries of the data dir, without the directories of forgotten tasks that sandlet has
    /// renamed aside (`.deleted-*`) and deletes in the background.
    pub fn task_dirs(&self) -> std::collections::BTreeSet<String> {
        std::fs::read_dir(self.data_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".deleted-"))
            .collect()
    }

    pub fn snapshot(&self) -> Snapshot {
        let r = self.get("/getTasks");
        assert_eq!(r.status, 200, "{}", r.text());
        Snapshot {
            tasks: r.text(),
            dirs: self.task_dirs(),
        }
    }

    pub fn assert_nothing_lost(&self, before: &Snapshot, what: &str) {
        assert_eq!(&self.snapshot(), before, "after {what}");
    }
}

/// The JSON events of an SSE body (`data: <json>` frames).
pub fn sse_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let json = f
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data frame: {f:?}"));
            serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"))
        })
        .collect()
}

/// The lines one output stream (`stdout`, `stderr`) of a command's events carries, each without
/// its line ending (execd 1.1 events carry one line each, with its ending as written).
pub fn stream_lines<'a>(events: &'a [Value], kind: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| {
            let t = e["text"].as_str().unwrap();
            t.strip_suffix("\r\n")
                .or_else(|| t.strip_suffix(['\n', '\r']))
                .unwrap_or(t)
        })
        .collect()
}

/// The stdout lines of a run in isolated session `session` (`/v1/isolated`), which must succeed.
pub fn isolated_out(s: &Sandlet, session: &str, code: &str) -> Vec<String> {
    let events = s.exec_events(
        &format!("/v1/isolated/session/{session}/run"),
        &serde_json::json!({"code": code}),
    );
    assert_eq!(
        events.last().unwrap()["type"],
        "execution_complete",
        "{code}: {events:?}"
    );
    stream_lines(&events, "stdout")
        .into_iter()
        .map(String::from)
        .collect()
}

/// The Python of the venv that holds the real OpenSandbox SDKs from PyPI (`.ci/setup` makes it;
/// `SANDLET_SDK_PYTHON` points elsewhere). Tests that use it are `#[ignore]`d with the reason.
pub fn sdk_python() -> String {
    let python = std::env::var("SANDLET_SDK_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/sdkvenv/bin/python").to_string()
    });
    assert!(
        Path::new(&python).exists(),
        "no OpenSandbox SDK venv at {python}: `./test` installs it and runs every test"
    );
    python
}

/// `POST <prefix>/files/upload` of one file, as the SDK frames it.
pub fn upload_one(s: &Sandlet, prefix: &str, path: &str, content: &[u8], mode: u32) -> Reply {
    let boundary = "sandlet-execd11-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"; filename=\"metadata\"\r\nContent-Type: application/json\r\n\r\n{}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\nContent-Type: application/octet-stream\r\n\r\n",
        serde_json::json!({"path": path, "mode": mode})
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    s.exec_bytes(
        "POST",
        &format!("{prefix}/files/upload"),
        Some(body),
        &[(
            "Content-Type",
            &format!("multipart/form-data; boundary={boundary}"),
        )],
    )
}

/// Runs `tests/sdk/<script>` with the SDK venv's Python against sandlet's exec API at
/// `exec_base`, and asserts that every check passed.
pub fn run_sdk_checks(script: &str, exec_base: &str, envs: &[(&str, String)]) {
    let out = Command::new(sdk_python())
        .arg(format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR")))
        .env("SANDLET_EXEC_ADDR", exec_base.trim_start_matches("http://"))
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(" 0 failed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the tests run as root. A test that needs root and finds it missing skips with a
/// line saying so, outside CI; under CI (`./test` sets `CI`) it fails instead.
pub fn root_or_skip(why: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "{why}: needs root, and CI runs as root"
        );
        eprintln!("skipped ({why}): needs root; `sudo ./test` runs every test");
    }
    root
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out waiting for: {what}");
}

/// The address sandlet's log says `api` serves on (its "serving" line, text or JSON), if
/// logged yet.
fn served_addr(log: &str, api: &str) -> Option<String> {
    let text = (format!("api=\"{api}\""), " listen=");
    let json = (format!("\"api\":\"{api}\""), "\"listen\":\"");
    log.lines().filter(|l| l.contains("serving")).find_map(|l| {
        [&text, &json].into_iter().find_map(|(api_field, listen)| {
            if !l.contains(api_field.as_str()) {
                return None;
            }
            let (_, rest) = l.split_once(listen)?;
            rest.split(['"', ' ', ',']).next().map(str::to_string)
        })
    })
}

/// A port free now. Racy by nature: for programs that cannot bind port 0 and say which port
/// they got; sandlet itself is started on port 0 (see [`Sandlet::boot`]).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A memory figure of `/proc/<pid>/status` in KiB: `field` is `"VmRSS:"`, `"VmHWM:"`, ...
pub fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

pub fn pid_alive(pid: i32) -> bool {
    // A zombie has exited: only count processes that still run.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next()),
            Some("Z") | Some("X")
        ),
        Err(_) => false,
    }
}

/// Set on each sandlet under test; its shims and tasks inherit it.
pub const MARKER_VAR: &str = "SANDLET_TEST_INSTANCE";

/// SIGKILLs every process that carries this instance's marker, and all their descendants.
pub fn kill_trees_marked(data_dir: &Path) {
    let marker = format!("{MARKER_VAR}={}", data_dir.display());
    let mut parents: Vec<(i32, i32)> = Vec::new();
    let mut roots = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ"))
            && environ
                .split(|b| *b == 0)
                .any(|entry| entry == marker.as_bytes())
        {
            roots.push(pid);
        }
        if let Some(ppid) = parent_of(pid) {
            parents.push((pid, ppid));
        }
    }
    let mut doomed = roots.clone();
    let mut i = 0;
    while i < doomed.len() {
        let p = doomed[i];
        doomed.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    for pid in doomed {
        unsafe { libc_kill(pid, 9) };
    }
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A scratch dir for files tasks write (pid files, counters).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sandlet-scratch-")
        .tempdir()
        .unwrap()
}

pub fn read_pid(path: &Path) -> i32 {
    wait_until(&format!("pid file {}", path.display()), || {
        std::fs::read_to_string(path).is_ok_and(|s| s.trim().parse::<i32>().is_ok())
    });
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Receives feed events until `pred` matches one, with a deadline.
pub fn recv_until(
    rx: &mpsc::Receiver<(String, Value)>,
    mut pred: impl FnMut(&str, &Value) -> bool,
) -> (String, Value) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((event, data)) if pred(&event, &data) => return (event, data),
            Ok(_) => {}
            Err(e) => panic!("feed: no matching event before the deadline ({e})"),
        }
    }
}

/// How many descriptors `pid` has open.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The shims `pid` (a sandlet) has started that still run, busy or idle.
pub fn shims_of(pid: i32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            parent_of(*child) == Some(pid)
                && pid_alive(*child)
                && std::fs::read(format!("/proc/{child}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).next() == Some(b"sandlet-shim"))
        })
        .count()
}
