use std::process::ExitCode;

use sandlet::cli::{Cli, Command};
use sandlet::process::{nofile, shim};
use sandlet::roles::{self, Role};

fn main() -> ExitCode {
    // Descriptors inherited from whoever started sandlet (a shell's, a runtime's) are not
    // passed on to shims, tasks and commands: those start with their standard streams only.
    // SAFETY: plain syscall; it only sets close-on-exec flags.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    // The shim role runs once per task start: no CLI parser, no async runtime.
    if std::env::args_os().nth(1).is_some_and(|a| a == shim::ROLE) {
        if let Some(arg) = std::env::args_os().nth(2) {
            nofile::restore(&arg);
        }
        return ExitCode::from(shim::run() as u8);
    }
    // An isolated session's holder: neither (see `isolation::holder`), whatever sandlet's
    // name (the holder is started as sandlet's own executable, `execd` included).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == sandlet::isolation::ROLE)
    {
        return ExitCode::from(sandlet::isolation::run_holder() as u8);
    }
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let mut args = match Role::of(&argv0) {
        Some(Role::Bootstrap) => return roles::bootstrap(std::env::args_os().skip(1).collect()),
        Some(Role::Execd) => match roles::execd_serve_args(std::env::args_os()) {
            Ok(args) => args,
            Err(e) => e.exit(),
        },
        None => {
            let cli = Cli::parse_args();
            match cli.command {
                Some(Command::Serve(args)) => args,
                Some(Command::Target(args)) => return print_target(args),
                Some(Command::Install(args)) => return install(&args.destination),
                None => cli.serve,
            }
        }
    };
    // Shims, tasks and commands inherit sandlet's environment: the token must not be in it.
    // SAFETY: no other thread exists yet.
    let from_env = std::env::var(sandlet::http::auth::EXEC_TOKEN_VAR).ok();
    args.exec_token_from_env = args.exec_token_from_env.or(from_env);
    unsafe { std::env::remove_var(sandlet::http::auth::EXEC_TOKEN_VAR) };
    sandlet::telemetry::init(args.log_format, &args.log_level);
    match nofile::raise() {
        Ok(Some((before, after))) => tracing::info!(
            before,
            after,
            "raised the descriptor soft limit to the hard limit (tasks and commands keep the original)"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor soft limit"),
    }
    sandlet::memory::configure();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandlet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        tokio::spawn(sandlet::memory::give_back_periodically());
        sandlet::serve::serve(args).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sandlet stopped");
            ExitCode::FAILURE
        }
    }
}

fn print_target(args: sandlet::cli::TargetArgs) -> ExitCode {
    use sandlet::container::{Locator, locate};
    let locator = if args.other_container {
        Locator::OtherContainer
    } else {
        Locator::Marker(args.main_container_name)
    };
    match locate(&locator) {
        Ok(target) => {
            println!(
                "{}",
                serde_json::to_string(&target).expect("a target serialises")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sandlet: {e}");
            ExitCode::FAILURE
        }
    }
}

fn install(destination: &std::path::Path) -> ExitCode {
    use std::os::unix::fs::PermissionsExt;
    let copy = || -> std::io::Result<()> {
        let binary = std::fs::read("/proc/self/exe")?;
        sandlet::atomic_file::write(
            destination,
            &binary,
            sandlet::atomic_file::Durability::Durable,
        )?;
        std::fs::set_permissions(destination, std::fs::Permissions::from_mode(0o755))
    };
    match copy() {
        Ok(()) => {
            println!("installed sandlet at {}", destination.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sandlet: cannot install to {}: {e}", destination.display());
            ExitCode::FAILURE
        }
    }
}
