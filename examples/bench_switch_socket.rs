//! Where the time of a cutover switch goes: the same one-element replace as
//! `NftFirewall::apply_ops` (delete + add in one batch), timed in two parts, and the same
//! transaction over one long-lived netlink socket.
//!
//!     cargo run --release --example bench_switch_socket [runs] [sizes...]
//!
//! Per map size it prints `size commit_med close_med fresh_total_med persistent_med
//! persistent_p99` in microseconds:
//! - commit: open a socket, send the batch, wait for every ACK (the kernel has committed:
//!   new connections see the new element from here on);
//! - close: dropping that socket. Closing a netfilter netlink socket waits for the
//!   deferred release of the previous transaction (`nft_rcv_nl_event` -> `flush_work`),
//!   which includes an RCU grace period once an element was deleted;
//! - persistent: commit over one socket kept open across runs (what a daemon that keeps
//!   its socket would pay per switch).
//!
//! Root; its own table `cbench_sock_<pid>`, deleted at the end (also on error). No traffic.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use cutover::manifest::Protocol;
use cutover::nat::map::ElementsMsg;
use cutover::nat::netlink::{Socket, Transaction};
use cutover::nat::{Firewall, NftFirewall};
use cutover::plan::{self, Desired, Element, ElementKey, Target};
use nftnl::MsgType;

#[path = "common/mod.rs"]
mod common;
use common::TableGuard;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99(v: &mut [Duration]) -> Duration {
    v.sort();
    v[((v.len() - 1) * 99) / 100]
}

fn us(d: Duration) -> u128 {
    d.as_micros()
}

fn switch_tx(table: &std::ffi::CStr, map: &std::ffi::CStr, key: ElementKey, last: u8) -> Transaction {
    let mut tx = Transaction::new();
    let mut del = ElementsMsg::new(table, map);
    del.delete(&key);
    tx.add(&del, MsgType::Del, "delete element");
    let mut add = ElementsMsg::new(table, map);
    add.add(&Element { key, addr: Ipv4Addr::new(10, 232, 255, last).into(), port: 80 });
    tx.add(&add, MsgType::Add, "add element");
    tx
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(50).max(2);
    let mut sizes: Vec<u16> = args.iter().skip(1).filter_map(|s| s.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![1, 100, 1000, 10000];
    }
    let fw = NftFirewall::new();
    let table = format!("cbench_sock_{}", std::process::id());
    let _guard = TableGuard { fw: &fw, table: table.clone() };
    let table_c = std::ffi::CString::new(table.clone())?;
    let key = ElementKey::v4(Protocol::Tcp, 20000);
    // The IPv4 map by host port, the one a one-port service's switch changes.
    let map_c = std::ffi::CString::new(key.map())?;

    println!("# size commit_med_us close_med_us fresh_total_med_us persistent_med_us persistent_p99_us ({runs} runs)");
    for size in sizes {
        let targets: Vec<Target> =
            (0..size).map(|i| Target::new(&format!("s{i}"), 1, Protocol::Tcp, 20000 + i, Ipv4Addr::new(10, 232, 255, 2), 80)).collect();
        fw.sync(&plan::ruleset(&Desired { table: table.clone(), mark: plan::DEFAULT_MARK, targets, bridges: vec![] }))?;

        let (mut commit, mut close, mut total) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let tx = switch_tx(&table_c, &map_c, key, if run % 2 == 0 { 3 } else { 2 });
            let t0 = Instant::now();
            let socket = Socket::open()?;
            tx.commit(&socket)?;
            let t1 = Instant::now();
            drop(socket);
            let t2 = Instant::now();
            commit.push(t1 - t0);
            close.push(t2 - t1);
            total.push(t2 - t0);
        }
        let mut persistent = Vec::new();
        let socket = Socket::open()?;
        for run in 0..runs {
            let tx = switch_tx(&table_c, &map_c, key, if run % 2 == 0 { 3 } else { 2 });
            let t0 = Instant::now();
            tx.commit(&socket)?;
            persistent.push(t0.elapsed());
        }
        drop(socket);
        println!(
            "{size} {} {} {} {} {}",
            us(median(&mut commit)),
            us(median(&mut close)),
            us(median(&mut total)),
            us(median(&mut persistent)),
            us(p99(&mut persistent))
        );
    }
    Ok(())
}
