//! `omni`: the command-line front end of Omni (see the `omni_cli` library
//! for the commands).
fn main() -> std::process::ExitCode {
    omni_cli::main()
}
