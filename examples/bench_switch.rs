//! How long does a cutover (one map element replaced in one transaction) take, and does
//! it depend on the size of the map?
//!
//! Run as root: `cargo run --release --example bench_switch [runs]`. Uses its own table
//! `cutover_bench_<pid>` (deleted at the end, also on error) and sends no traffic.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use cutover::manifest::Protocol;
use cutover::nat::{Firewall, NatError, NftFirewall};
use cutover::plan::{self, Desired, ElementKey, ElementOp, Target};

#[path = "common/mod.rs"]
mod common;
use common::TableGuard;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() -> Result<(), NatError> {
    let runs: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200).max(1);
    let fw = NftFirewall::new();
    let table = format!("cutover_bench_{}", std::process::id());
    let _guard = TableGuard { fw: &fw, table: table.clone() };

    println!("one-element switch (delete + add in one batch), {runs} runs each");
    println!("{:>9} {:>12} {:>12} {:>12} {:>12}", "elements", "sync", "median", "p99", "max");
    for size in [1u16, 100, 1000, 10000] {
        let targets: Vec<Target> = (0..size)
            .map(|i| Target::new(&format!("s{i}"), 1, Protocol::Tcp, 20000 + i, Ipv4Addr::new(10, 231, 200, 2), 80))
            .collect();
        let rs = plan::ruleset(&Desired { table: table.clone(), mark: plan::DEFAULT_MARK, targets, bridges: vec![] });
        let t0 = Instant::now();
        fw.sync(&rs)?;
        let sync = t0.elapsed();

        let key = ElementKey::v4(Protocol::Tcp, 20000);
        let mut samples = Vec::with_capacity(runs);
        for run in 0..runs {
            // Alternate between two releases so every switch really changes the element.
            let last = if run % 2 == 0 { 3 } else { 2 };
            let ops = [
                ElementOp::Delete(key),
                ElementOp::Add(plan::Element { key, addr: Ipv4Addr::new(10, 231, 200, last).into(), port: 80 }),
            ];
            let t = Instant::now();
            fw.apply_ops(&table, plan::DNAT_MAP, &ops)?;
            samples.push(t.elapsed());
        }
        samples.sort();
        println!(
            "{size:>9} {:>12?} {:>12?} {:>12?} {:>12?}",
            sync,
            percentile(&samples, 0.5),
            percentile(&samples, 0.99),
            samples[samples.len() - 1]
        );
    }
    Ok(())
}
