use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;

use super::{ExecApi, ExecJson, invalid, limit_error, millis};
use crate::exec::commands::{CommandError, Request};
use crate::http::error::ApiError;

#[derive(Deserialize)]
pub struct RunCommand {
    #[serde(default)]
    command: String,
    /// A program and its arguments, run without a shell (execd 1.1); excludes `command`.
    #[serde(default)]
    argv: Option<Vec<String>>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    background: bool,
    /// Milliseconds; 0 or absent: none.
    #[serde(default)]
    timeout: Option<i64>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
    #[serde(default)]
    envs: Option<BTreeMap<String, String>>,
}

/// `POST /command`: runs `command` with the shell, or `argv` without one; the response is its
/// event stream.
pub async fn run_command(
    State(api): State<ExecApi>,
    ExecJson(body): ExecJson<RunCommand>,
) -> Result<Response, ApiError> {
    let command = match &body.argv {
        None => {
            super::command_line(
                &body.command,
                "invalid request, validation error command or argv is required",
            )?;
            body.command
        }
        Some(argv) => {
            if !body.command.is_empty() {
                return Err(invalid(
                    "invalid request, validation error command and argv are mutually exclusive; send one",
                ));
            }
            check_argv(argv)?;
            shell_words(argv)
        }
    };
    let envs: Vec<(String, String)> = body.envs.unwrap_or_default().into_iter().collect();
    if let Some((k, _)) = envs
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(invalid(format!(
            "invalid request, validation error env {k:?} is not a valid variable"
        )));
    }
    let cwd = match body.cwd.filter(|c| !c.is_empty()) {
        Some(cwd) => Some(crate::exec::expand_path(&cwd, &envs).map_err(invalid)?),
        None => None,
    };
    let request = Request {
        id: None,
        place: None,
        stop_when_client_leaves: false,
        command,
        argv: body.argv,
        cwd,
        envs,
        uid: body.uid,
        gid: body.gid,
        timeout: millis(body.timeout)?,
        background: body.background,
    };
    match api.commands.run(request).await {
        Ok(frames) => Ok(super::event_stream(frames)),
        Err(CommandError::Invalid(m)) => {
            Err(invalid(format!("invalid request, validation error {m}")))
        }
        Err(CommandError::Limit(m)) => Err(limit_error(m)),
        Err(CommandError::NotFound(m) | CommandError::NotRunning(m)) => {
            Err(super::runtime_error(m))
        }
    }
}

/// execd 1.1's rules for `argv`: a program name, and no NUL anywhere (the kernel takes C
/// strings).
fn check_argv(argv: &[String]) -> Result<(), ApiError> {
    match argv.first() {
        None => Err(invalid(
            "invalid request, validation error argv must name a program",
        )),
        Some(program) if program.is_empty() => Err(invalid(
            "invalid request, validation error argv[0] must not be empty",
        )),
        _ => match argv.iter().position(|a| a.contains('\0')) {
            Some(i) => Err(invalid(format!(
                "invalid request, validation error argv[{i}] contains NUL"
            ))),
            None => Ok(()),
        },
    }
}

/// `argv` as a shell would read it back: the command's `content` in its status.
fn shell_words(argv: &[String]) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./=:,+@%-".contains(c);
    argv.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(plain) {
                a.clone()
            } else {
                crate::exec::sessions::quote(a)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_reads_back_as_shell_words() {
        let argv = ["python3", "-c", "print('hi')", ""].map(String::from);
        assert_eq!(shell_words(&argv), "python3 -c 'print('\\''hi'\\'')' ''");
        assert!(check_argv(&argv).is_ok());
        assert!(check_argv(&[]).is_err());
        assert!(check_argv(&[String::new()]).is_err());
        assert!(check_argv(&["a".into(), "b\0".into()]).is_err());
    }
}
