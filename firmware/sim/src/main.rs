//! `ferrite-sim`: see `ferrite-sim --help`.

use std::sync::Arc;

use ferrite_sim::args::{Args, USAGE};
use ferrite_sim::fleet;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return;
    }
    let args = match Args::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ferrite-sim: {e}");
            std::process::exit(2);
        }
    };
    let started = std::time::Instant::now();
    let identities = match fleet::provision(&args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("ferrite-sim: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "ferrite-sim: {} devices registered in {:.1} s; sending {} readings/s each for {:?} to stream {}",
        identities.len(),
        started.elapsed().as_secs_f64(),
        args.rate,
        args.duration,
        args.stream()
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferrite-sim: {e}");
            std::process::exit(1);
        }
    };
    let counters = Arc::new(fleet::Counters::default());
    let json = args.summary_json;
    let summary = runtime.block_on(fleet::run(args, identities, counters));
    if json {
        println!("{summary}");
    } else {
        eprintln!("ferrite-sim: summary");
        if let Some(o) = summary.as_object() {
            for (k, v) in o {
                eprintln!("  {k:<22} {v}");
            }
        }
    }
}
