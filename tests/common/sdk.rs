//! The real OpenSandbox Python SDKs (`opensandbox`, `opensandbox-code-interpreter`, 1.1.1 from
//! PyPI, in `.ci/sdkvenv`), run on a check script of `tests/sdk/` against a sandlet.

use std::path::Path;

/// The SDK venv's Python (`SANDLET_SDK_PYTHON` overrides), or `None` (printing why) where it
/// is missing; under CI its absence fails the test.
pub fn python() -> Option<String> {
    let python = std::env::var("SANDLET_SDK_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/sdkvenv/bin/python").to_string()
    });
    if Path::new(&python).exists() {
        return Some(python);
    }
    assert!(
        std::env::var("CI").is_err(),
        "CI must install the OpenSandbox SDKs ({python} is missing)"
    );
    eprintln!("skipped: no OpenSandbox SDK at {python} (.ci/run installs it)");
    None
}

/// Runs `tests/sdk/<script>` against sandlet's exec API at `exec_base` and asserts that every
/// check passed.
pub fn run_checks(python: &str, script: &str, exec_base: &str, envs: &[(&str, String)]) {
    let out = std::process::Command::new(python)
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
