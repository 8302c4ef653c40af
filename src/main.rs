//! The `redstream` binary; everything lives in the library (see `redstream::cli`).

fn main() -> std::process::ExitCode {
    redstream::cli::main()
}
