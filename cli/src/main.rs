//! `flotilla`: the CLI. A thin root; the commands are the library beside it.

fn main() {
    flotilla_cli::main();
}
