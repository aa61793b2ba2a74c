//! Starting and driving one process of the exec API (a command, or one run of a bash session).
//!
//! Every process runs under a shim, like a task: started by the same launcher (an idle shim,
//! one fork+exec on the critical path), placed by the same rules (sidecar mode: inside the main
//! container), in its own process group, with its tree below the shim. Unlike a task's, the
//! shim is reused: once the tree is gone it goes back to the launcher for the next process. The [`Driver`] turns the
//! shim's reports into output, pings and the ending, and carries out the deadline (SIGKILL to the
//! whole tree, as execd) and interrupts (SIGTERM, then SIGKILL after [`INTERRUPT_GRACE`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, sleep_until};

use super::env_file::EnvFile;
use crate::container::{PlaceError, StartIn, TargetWatch, metadata_in, start_in};
use crate::deadline;
use crate::process::shim::{OutputMode, ShimSpec};
use crate::process::{ExitRecord, ExitWatch, Launcher, PidFd, ShimEvent, Tree};

/// Between SIGTERM and SIGKILL on interrupt (execd's figure).
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
/// Between ping events on a stream (execd's figure).
pub const PING_INTERVAL: Duration = Duration::from_secs(3);
/// Output frames read ahead of the consumer.
const REPORT_BUFFER: usize = 8;
/// After SIGKILL, the tree is swept again at this interval until it is gone.
const KILL_SWEEP: Duration = Duration::from_millis(100);
/// The terminal type of an interactive shell whose environment names none (execd sets none,
/// and full-screen programs then misbehave).
pub const DEFAULT_TERM: &str = "xterm-256color";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run: a shell script or a program with its arguments, where and as whom.
pub struct Spawn {
    pub script: String,
    /// A program and its arguments, run without a shell instead of `script`: a name with a
    /// slash is a path (a relative one from the working directory), a bare name is looked up
    /// in the absolute directories of the process's `PATH`.
    pub argv: Option<Vec<String>>,
    /// An interactive shell (PTY sessions): `bash --norc --noprofile`, with `-c script` when
    /// the script is not empty, or `sh` where there is no bash; `TERM` defaults to
    /// [`DEFAULT_TERM`]; the shim is not reused.
    pub interactive: bool,
    /// Working directory, already expanded; `None`: the default (see `container::start_in`).
    pub cwd: Option<String>,
    /// Variables on top of the base environment.
    pub envs: Vec<(String, String)>,
    /// Replaces the base environment altogether (bash sessions carry their own).
    pub env_override: Option<Vec<(String, String)>>,
    /// Variables from the `EXECD_ENVS` file between the base environment and `envs`.
    pub env_file: Option<EnvFile>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub output: OutputMode,
    /// Where the log of an [`OutputMode::Combined`] process goes (the caller creates it); none
    /// when the output goes to sandlet.
    pub dir: Option<PathBuf>,
    pub log_limit: u64,
}

/// Why a process could not be started: the request's fault (400) or not (500).
pub enum SpawnError {
    Invalid(String),
    Failed(String),
}

/// A started process and what it takes to drive it.
pub struct Started {
    pub shim_pidfd: PidFd,
    pub tree: Tree,
    pub exit: ExitWatch,
    /// The shim's spec pipe, to give the shim back once the run is over.
    next_spec: Option<pipe::Sender>,
    /// The task's input end (interactive shells): see [`crate::process::Launched::input`].
    pub input: Option<std::os::fd::OwnedFd>,
}

/// Resolves placement, user, environment and shell, checks the working directory, and starts.
pub async fn spawn(
    launcher: &Arc<Launcher>,
    target: Option<&TargetWatch>,
    spec: Spawn,
) -> Result<Started, SpawnError> {
    let user = match (spec.uid, spec.gid) {
        (None, Some(_)) => {
            return Err(SpawnError::Invalid(
                "uid is required when gid is provided".into(),
            ));
        }
        (None, None) => String::new(),
        (Some(uid), None) => uid.to_string(),
        (Some(uid), Some(gid)) => format!("{uid}:{gid}"),
    };
    let place = start_in(target, &user).map_err(|e| match e {
        PlaceError::Unavailable(m) => SpawnError::Failed(m),
        PlaceError::User(m) => SpawnError::Invalid(m),
    })?;
    spawn_in(launcher, place, spec).await
}

/// Starts in a place resolved by the caller (an isolated session's); `spec`'s `uid` and `gid`
/// are the place's business then, and not looked at.
pub async fn spawn_in(
    launcher: &Arc<Launcher>,
    place: StartIn,
    spec: Spawn,
) -> Result<Started, SpawnError> {
    let StartIn {
        clear_env,
        env: base,
        placement,
        credentials,
        root,
    } = place;
    let (clear_env, mut env) = match spec.env_override {
        Some(env) => (true, env),
        None => {
            let mut env = base;
            if let Some(file) = &spec.env_file {
                let under: Vec<(String, String)> = if clear_env {
                    env.clone()
                } else {
                    std::env::vars().chain(env.iter().cloned()).collect()
                };
                env.extend(file.variables(&root, &under));
            }
            env.extend(spec.envs);
            (clear_env, env)
        }
    };
    if spec.interactive
        && !env.iter().any(|(k, _)| k == "TERM")
        && (clear_env || std::env::var_os("TERM").is_none())
    {
        env.push(("TERM".into(), DEFAULT_TERM.into()));
    }
    if let Some(cwd) = &spec.cwd
        && cwd.starts_with('/')
    {
        match metadata_in(&root, cwd) {
            Ok(t) if t.is_dir() => {}
            Ok(_) => {
                return Err(SpawnError::Invalid(format!(
                    "working directory path is not a directory: {cwd}"
                )));
            }
            Err(e) => {
                return Err(SpawnError::Invalid(format!(
                    "working directory does not exist: {cwd}: {e}"
                )));
            }
        }
    }
    let path_var = search_path(clear_env, &env);
    // The program is looked up here, once, and handed to the shim as a path (the name it was
    // called by goes along as argv[0]). A plain command line (words only, no shell syntax) runs
    // without a shell in between: the same result, without the shell's start-up. Anything else
    // goes to bash (or sh) as in execd.
    let found = |name: &str| find_program(&root, &path_var, name);
    let shell = || match found("bash") {
        Some(bash) => (bash, "bash".to_string(), true),
        // Not found either: the shim's own lookup reports it.
        None => (
            found("sh").unwrap_or_else(|| "sh".into()),
            "sh".to_string(),
            false,
        ),
    };
    let (program, arg0, args) = if let Some(mut argv) = spec.argv {
        let name = argv.remove(0);
        let program = if name.contains('/') {
            // Relative: resolved by exec, after the change to the working directory.
            name.clone()
        } else {
            found(&name).ok_or_else(|| {
                SpawnError::Failed(format!(
                    "exec: {name:?}: executable file not found in $PATH"
                ))
            })?
        };
        (program, name, argv)
    } else if spec.interactive {
        let (program, arg0, bash) = shell();
        let mut args = Vec::new();
        if bash {
            args.extend(["--norc".to_string(), "--noprofile".to_string()]);
        }
        if !spec.script.is_empty() {
            args.extend(["-c".to_string(), spec.script]);
        }
        (program, arg0, args)
    } else {
        let plain = simple_command(&spec.script).and_then(|mut words| {
            let program = found(&words[0])?;
            let arg0 = words.remove(0);
            Some((program, arg0, words))
        });
        plain.unwrap_or_else(|| {
            let (program, arg0, _) = shell();
            (program, arg0, vec!["-c".to_string(), spec.script])
        })
    };
    let shim_spec = ShimSpec {
        task_dir: spec.dir,
        log_limit: spec.log_limit,
        arg0: (arg0 != program).then_some(arg0),
        program,
        args,
        env,
        working_dir: spec.cwd.map(PathBuf::from),
        clear_env,
        placement,
        credentials,
        output: spec.output,
        records: false,
        reuse: !spec.interactive,
        // Nothing on disk is needed to stop it after a crash: its shim does.
        ends_with_sandlet: true,
    };
    let launched = launcher
        .launch(shim_spec)
        .await
        .map_err(SpawnError::Failed)?;
    Ok(Started {
        tree: Tree {
            shim: launched.shim,
            pgid: launched.task.pid,
        },
        shim_pidfd: launched.shim_pidfd,
        exit: launched.exit,
        next_spec: launched.next_spec,
        input: launched.input,
    })
}

/// The `PATH` a process started with this environment searches.
fn search_path(clear_env: bool, env: &[(String, String)]) -> String {
    env.iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| (!clear_env).then(|| std::env::var("PATH").ok()).flatten())
        .unwrap_or_else(|| DEFAULT_PATH.into())
}

/// Where `program` (a name searched on the sandbox's `PATH`, or a path) is in the place a
/// command would start in; `None` when it is not there. Errs when that place is unavailable.
pub fn locate_program(
    target: Option<&TargetWatch>,
    program: &str,
) -> Result<Option<String>, String> {
    let place = start_in(target, "").map_err(|e| e.to_string())?;
    if program.contains('/') {
        return Ok(metadata_in(&place.root, program)
            .is_ok_and(|m| m.is_file())
            .then(|| program.to_string()));
    }
    let path_var = search_path(place.clear_env, &place.env);
    Ok(find_program(&place.root, &path_var, program))
}

/// The words of a command line that a shell would run as one program with these exact
/// arguments: only characters no shell treats specially, the first word an executable's name
/// rather than a shell builtin, keyword or variable assignment.
fn simple_command(script: &str) -> Option<Vec<String>> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./=:,+@%-".contains(c);
    let words: Vec<String> = script
        .split_ascii_whitespace()
        .map(str::to_string)
        .collect();
    let first = words.first()?;
    let ok = script.chars().all(|c| plain(c) || c == ' ' || c == '\t')
        && !first.contains(['=', '/'])
        && !SHELL_ONLY.contains(&first.as_str());
    ok.then_some(words)
}

/// Builtins and keywords of bash with no external program that behaves the same.
const SHELL_ONLY: &[&str] = &[
    "alias",
    "bg",
    "bind",
    "break",
    "builtin",
    "caller",
    "case",
    "cd",
    "command",
    "compgen",
    "complete",
    "compopt",
    "continue",
    "coproc",
    "declare",
    "dirs",
    "disown",
    "do",
    "done",
    "elif",
    "else",
    "enable",
    "esac",
    "eval",
    "exec",
    "exit",
    "export",
    "fc",
    "fg",
    "fi",
    "for",
    "function",
    "getopts",
    "hash",
    "help",
    "history",
    "if",
    "in",
    "jobs",
    "kill",
    "let",
    "local",
    "logout",
    "mapfile",
    "popd",
    "pushd",
    "pwd",
    "read",
    "readarray",
    "readonly",
    "return",
    "select",
    "set",
    "shift",
    "shopt",
    "source",
    "suspend",
    "then",
    "time",
    "times",
    "trap",
    "type",
    "typeset",
    "ulimit",
    "umask",
    "unalias",
    "unset",
    "until",
    "wait",
    "while",
];

/// Where execvp would find `name` on `path_var`, inside `root`: the first regular file with an
/// execute bit in an absolute directory (a relative entry is left to the shell).
fn find_program(root: &std::path::Path, path_var: &str, name: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    path_var
        .split(':')
        .filter(|d| d.starts_with('/'))
        .map(|dir| format!("{}/{name}", dir.trim_end_matches('/')))
        .find(|candidate| {
            metadata_in(root, candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What a driven process produced.
pub enum Driven {
    Output(u8, Vec<u8>),
    Ping,
    Ended(ExitRecord),
}

/// Drives a started process: see the module docs.
pub struct Driver {
    /// Output and the ending, read by a task of their own so that reading the pipes overlaps
    /// with turning the last read into events (measured: streaming is faster than with the
    /// reads inline). The channel is small, so a slow consumer still holds the process back.
    events: mpsc::Receiver<ShimEvent>,
    /// The reader gives the report socket back once it has read the ending.
    reader: JoinHandle<ExitWatch>,
    shim_pidfd: PidFd,
    next_spec: Option<pipe::Sender>,
    tree: Tree,
    deadline: Option<Instant>,
    kill_at: Option<Instant>,
    interrupts: mpsc::UnboundedReceiver<()>,
    interrupts_open: bool,
    ping: Option<Interval>,
    pub timed_out: bool,
    pub interrupted: bool,
}

impl Driver {
    pub fn new(
        started: Started,
        timeout: Option<Duration>,
        interrupts: mpsc::UnboundedReceiver<()>,
        pings: bool,
    ) -> Driver {
        let (tx, events) = mpsc::channel(REPORT_BUFFER);
        let mut exit = started.exit;
        let reader = tokio::spawn(async move {
            loop {
                let event = exit.next().await;
                let ended = matches!(event, ShimEvent::Ended(_));
                if tx.send(event).await.is_err() || ended {
                    return exit;
                }
            }
        });
        Driver {
            events,
            reader,
            shim_pidfd: started.shim_pidfd,
            next_spec: started.next_spec,
            tree: started.tree,
            deadline: timeout.and_then(deadline::after),
            kill_at: None,
            interrupts,
            interrupts_open: true,
            ping: pings
                .then(|| tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL)),
            timed_out: false,
            interrupted: false,
        }
    }

    pub async fn next(&mut self) -> Driven {
        let far = deadline::far();
        loop {
            let deadline = self.deadline.filter(|_| self.kill_at.is_none());
            tokio::select! {
                biased;
                event = self.events.recv() => return match event {
                    Some(ShimEvent::Output(stream, data)) => Driven::Output(stream, data),
                    Some(ShimEvent::Ended(record)) => Driven::Ended(record),
                    None => unreachable!("the reader sends the ending before it stops"),
                },
                _ = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    self.timed_out = true;
                    self.tree.signal(Signal::SIGKILL);
                    self.kill_at = Some(Instant::now() + KILL_SWEEP);
                }
                request = self.interrupts.recv(), if self.interrupts_open => match request {
                    Some(()) if self.kill_at.is_none() => {
                        self.interrupted = true;
                        self.tree.signal(Signal::SIGTERM);
                        self.kill_at = Some(Instant::now() + INTERRUPT_GRACE);
                    }
                    Some(()) => {}
                    None => self.interrupts_open = false,
                },
                _ = sleep_until(self.kill_at.unwrap_or(far)), if self.kill_at.is_some() => {
                    self.tree.signal(Signal::SIGKILL);
                    self.kill_at = Some(Instant::now() + KILL_SWEEP);
                }
                _ = async { self.ping.as_mut().expect("guarded").tick().await }, if self.ping.is_some() => {
                    return Driven::Ping;
                }
            }
        }
    }

    /// After the ending of a process that must not leave anything behind (a Jupyter server's
    /// kernels): kills the rest of its tree, and [`Driver::finish`] sweeps until it is gone.
    pub fn kill_leftovers(&mut self) {
        self.tree.signal(Signal::SIGKILL);
        self.kill_at = Some(Instant::now());
    }

    /// The pid of the process started (the leader of its group).
    pub fn task_pid(&self) -> i32 {
        self.tree.pgid
    }

    /// After the ending: once the tree is gone, gives the shim back to the launcher (or reaps
    /// it, if it ended), and meanwhile keeps killing the tree if a deadline or interrupt had
    /// started to, so nothing of it is left behind.
    pub fn finish(self, launcher: Arc<Launcher>) {
        let killing = self.kill_at.is_some();
        let Driver {
            reader,
            shim_pidfd,
            next_spec,
            tree,
            ..
        } = self;
        tokio::spawn(async move {
            // Held until the shim is idle or gone: the shim takes its closing for sandlet's
            // end and kills what is left of the tree.
            let mut reports = reader.await.ok().and_then(ExitWatch::into_reports);
            // The shim says it is idle when the tree is gone; a one-shot shim exits instead.
            let idle = {
                let tree_gone = async {
                    if let (Some(reports), Some(_)) = (reports.as_mut(), &next_spec)
                        && reports.idle().await
                    {
                        return true;
                    }
                    let _ = shim_pidfd.exited().await;
                    false
                };
                tokio::pin!(tree_gone);
                let mut sweep = tokio::time::interval(KILL_SWEEP);
                loop {
                    tokio::select! {
                        idle = &mut tree_gone => break idle,
                        _ = sweep.tick(), if killing => {
                            tree.signal(Signal::SIGKILL);
                        }
                    }
                }
            };
            match (idle, reports, next_spec) {
                (true, Some(reports), Some(spec)) => {
                    launcher.idle(tree.shim, shim_pidfd, spec, reports)
                }
                _ => launcher.reaper().reap_owned(&shim_pidfd),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::simple_command;

    #[test]
    fn only_plain_command_lines_skip_the_shell() {
        assert_eq!(simple_command("true").unwrap(), ["true"]);
        assert_eq!(
            simple_command(" seq  1 2000 ").unwrap(),
            ["seq", "1", "2000"]
        );
        for shell in [
            "echo $HOME",
            "echo 'a b'",
            "ls *.txt",
            "true; false",
            "a | b",
            "x=1 true",
            "cd /tmp",
            "exit 3",
            "sleep 1 &",
            "echo a\nb",
            "~/bin/x",
            "./run",
            "",
        ] {
            assert!(simple_command(shell).is_none(), "{shell:?}");
        }
    }
}
