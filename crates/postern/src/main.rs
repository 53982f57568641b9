//! The `postern` command: run the proxy, check a configuration, inspect routes.

use std::process::ExitCode;

fn main() -> ExitCode {
    postern::cli::main()
}
