//! `ferrite-agent`: see `ferrite-agent --help`.

use ferrite_agent::agent::{Exit, main_with};
use ferrite_agent::config::{Config, USAGE};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return;
    }
    let cfg = match Config::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferrite-agent: {e}");
            std::process::exit(2);
        }
    };
    match main_with(cfg) {
        Ok(Exit::Done) => {}
        Ok(Exit::Wiped) => std::process::exit(0),
        Ok(Exit::Reboot) => {
            eprintln!("ferrite-agent: rebooting (re-executing)");
            reexec();
        }
        Err(e) => {
            eprintln!("ferrite-agent: {e}");
            std::process::exit(1);
        }
    }
}

/// Replaces the process with a fresh copy of itself, same arguments.
fn reexec() {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ferrite-agent: cannot find my own program to reboot: {e}");
            std::process::exit(1);
        }
    };
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).exec();
    eprintln!("ferrite-agent: reboot failed: {err}");
    std::process::exit(1);
}
