//! The `bitfog` executable: everything is in the library; this maps the
//! outcome of one command to the process's exit code.

fn main() {
    std::process::exit(bitfog::main(std::env::args_os().skip(1).collect()));
}
