//! sandlet in execd's places, as OpenSandbox's server installs it into a sandbox: the binary
//! copied as `execd` (execd's flags, the exec API only) and as `bootstrap.sh` (the container's
//! entrypoint wrapper that starts execd, then becomes the sandbox's command).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{free_port, pid_alive, scratch, wait_until};

fn copy_as(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::copy(env!("CARGO_BIN_EXE_sandlet"), &path).unwrap();
    path
}

fn ping(port: u16, token: Option<&str>) -> Option<u16> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(format!("http://127.0.0.1:{port}/ping"));
    if let Some(token) = token {
        request = request.header("X-EXECD-ACCESS-TOKEN", token);
    }
    request.call().ok().map(|r| r.status().as_u16())
}

/// Kills what a test started, also when it fails.
struct Killed(Vec<i32>);

impl Drop for Killed {
    fn drop(&mut self) {
        for pid in &self.0 {
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
}

#[test]
fn as_execd_it_takes_execds_flags_and_serves_only_the_exec_api() {
    let dir = scratch();
    let execd = copy_as(dir.path(), "execd");
    let port = free_port();
    let mut child = Command::new(&execd)
        .args([
            format!("-port={port}"),
            "-access-token".into(),
            "s3cret".into(),
        ])
        .env("TMPDIR", dir.path())
        .env_remove("SANDLET_EXEC_LISTEN_ADDR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _killed = Killed(vec![child.id() as i32]);
    wait_until("execd answers /ping", || {
        ping(port, Some("s3cret")) == Some(200)
    });
    assert_eq!(ping(port, None), Some(401), "the token is in force");
    // No task API: execd has none, and the place it runs in has no data dir for one.
    let listening = std::fs::read_to_string(format!("/proc/{}/net/tcp", child.id())).unwrap();
    let ours: Vec<&str> = listening
        .lines()
        .filter(|l| l.split_whitespace().nth(3) == Some("0A"))
        .filter(|l| {
            let inode = l.split_whitespace().nth(9).unwrap_or_default();
            std::fs::read_dir(format!("/proc/{}/fd", child.id()))
                .unwrap()
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|t| t.to_string_lossy() == format!("socket:[{inode}]"))
                })
        })
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "one listening socket, the exec API's: {ours:?}"
    );
    assert!(
        dir.path().join("sandlet-execd").is_dir(),
        "records in TMPDIR"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn as_bootstrap_it_starts_execd_then_becomes_the_sandboxs_command() {
    let dir = scratch();
    let execd = copy_as(dir.path(), "execd");
    let bootstrap = copy_as(dir.path(), "bootstrap.sh");
    let port = free_port();
    let out = dir.path().join("entrypoint");
    let mut child = Command::new(&bootstrap)
        .args(["sh", "-c", "echo $$ $EXECD_ENVS > \"$OUT\"; exec sleep 300"])
        .env("EXECD", &execd)
        .env("OUT", &out)
        .env("TMPDIR", dir.path())
        .env("SANDLET_EXEC_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env_remove("EXECD_ENVS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut killed = Killed(vec![child.id() as i32]);
    wait_until("the entrypoint ran", || {
        std::fs::read_to_string(&out).is_ok_and(|s| s.ends_with('\n'))
    });
    let written = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        written.trim(),
        format!("{} /opt/opensandbox/.env", child.id()),
        "the entrypoint is the container's process itself (exec), with execd's EXECD_ENVS"
    );
    wait_until("execd (started by bootstrap.sh) answers", || {
        ping(port, None) == Some(200)
    });
    // execd is the entrypoint's child now: find it, so it is cleaned up too.
    let execd_pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == execd))
        .expect("the execd process");
    killed.0.push(execd_pid);
    assert!(pid_alive(execd_pid));
    child.kill().unwrap();
    child.wait().unwrap();
}
