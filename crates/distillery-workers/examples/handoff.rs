//! What handing a small product to the threads costs: regions of two tasks of 30 µs each,
//! after a pause of the calling thread's own work (as a decoding step runs norms, rotary
//! embeddings and attention between its products), on rayon's threads and on the workers.
//!
//! `cargo run --release -p distillery-workers --example handoff`

use std::time::{Duration, Instant};

use rayon::prelude::*;

const TASK: Duration = Duration::from_micros(30);
const REGIONS: u32 = 2000;

fn busy(duration: Duration) {
    let start = Instant::now();
    while start.elapsed() < duration {
        std::hint::spin_loop();
    }
}

/// The mean time of a region that `run_two_tasks` runs, each after `pause` of busy work.
fn mean_region(pause: Duration, run_two_tasks: &dyn Fn()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..REGIONS {
        busy(pause);
        let start = Instant::now();
        run_two_tasks();
        total += start.elapsed();
    }
    total / REGIONS
}

fn main() {
    let threads = rayon::current_num_threads();
    println!(
        "{threads} threads; a region is two tasks of {} µs, so {} µs when both run at once",
        TASK.as_micros(),
        TASK.as_micros() * 2 / threads.min(2) as u128
    );
    println!("| pause before each region | rayon | distillery-workers |");
    println!("|---:|---:|---:|");
    // On one of rayon's threads, as decoding runs, so that a split is a fork and not a
    // hand-over from outside the pool.
    rayon::scope(|_| {
        for pause in [0, 20, 100, 500].map(Duration::from_micros) {
            let on_rayon = mean_region(pause, &|| (0..2).into_par_iter().for_each(|_| busy(TASK)));
            let on_workers = mean_region(pause, &|| {
                distillery_workers::for_each_task(2, |_| busy(TASK))
            });
            println!(
                "| {} µs | {:.1} µs | {:.1} µs |",
                pause.as_micros(),
                on_rayon.as_secs_f64() * 1e6,
                on_workers.as_secs_f64() * 1e6
            );
        }
    });
}
