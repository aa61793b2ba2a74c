use std::process::ExitCode;

use sandlet::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    let args = match cli.command {
        // The shim is single-threaded and needs no runtime: it starts fast and stays small.
        Some(Command::Shim(args)) => return ExitCode::from(sandlet::process::shim::run(args) as u8),
        Some(Command::Serve(args)) => args,
        None => cli.serve,
    };
    sandlet::telemetry::init(args.log_format, &args.log_level);
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
    match runtime.block_on(sandlet::serve::serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sandlet stopped");
            ExitCode::FAILURE
        }
    }
}
