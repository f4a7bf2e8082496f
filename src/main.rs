//! The `pinkeeper` binary: everything is in the library's `cli` module.

fn main() -> std::process::ExitCode {
    pinkeeper::cli::main()
}
