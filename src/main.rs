//! `tunneld`: one binary, two roles. See `tunneld --help`.

fn main() -> std::process::ExitCode {
    tunneld::cli::main()
}
