//! Shared by the switch benchmarks (`bench_switch`, `bench_switch_socket`); not an example
//! of its own (Cargo takes only `examples/*.rs` and `examples/*/main.rs`).

use cutover::nat::{Firewall, NftFirewall};

/// Deletes the benchmark's own table when dropped, also when the benchmark fails.
pub struct TableGuard<'a> {
    pub fw: &'a NftFirewall,
    pub table: String,
}

impl Drop for TableGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.fw.delete_table(&self.table) {
            eprintln!("could not delete table {}: {e}", self.table);
        }
    }
}
