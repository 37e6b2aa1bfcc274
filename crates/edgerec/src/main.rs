//! The `edgerec` binary: everything is in the library's command line (`edgerec::cli`).

fn main() -> std::process::ExitCode {
    edgerec::cli::main()
}
