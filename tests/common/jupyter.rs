//! The real Jupyter server of the tests and benchmarks: `jupyter-server` of `.ci/jupytervenv`
//! (jupyter_server, ipykernel, bash_kernel and matplotlib from PyPI; `.ci/setup` makes it).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const VENV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/jupytervenv");
/// Starting Jupyter and a kernel takes seconds on a busy machine.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// `jupyter-server` of the venv (`.ci/setup` makes it). Tests that use it are `#[ignore]`d
/// with the reason.
pub fn server_program() -> String {
    let bin = format!("{VENV}/bin/jupyter-server");
    assert!(
        Path::new(&bin).exists(),
        "no Jupyter at {bin}: `./test` installs it (.ci/setup) and runs every test"
    );
    bin
}

/// A Jupyter server run by the test itself (as a `JUPYTER_HOST`). It and its kernels carry
/// `marker` (see [`super::MARKER_VAR`]), so the sandlet of that data dir takes them along when
/// it is dropped; dropping this kills the server.
pub struct External {
    child: Child,
    _root: tempfile::TempDir,
}

impl External {
    pub fn start(program: &str, port: u16, token: &str, marker: &Path) -> External {
        let root = super::scratch();
        let child = Command::new(program)
            .args([
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                &format!("--ServerApp.port={port}"),
                "--ServerApp.port_retries=0",
                "--ServerApp.open_browser=False",
                &format!("--ServerApp.root_dir={}", root.path().display()),
            ])
            .env("JUPYTER_TOKEN", token)
            .env(super::MARKER_VAR, marker)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + DEADLINE;
        while ureq::get(format!("http://127.0.0.1:{port}/api"))
            .header("Authorization", format!("Token {token}"))
            .call()
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the external Jupyter did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        External { child, _root: root }
    }
}

impl Drop for External {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
