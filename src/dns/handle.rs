//! The catalog the servers answer from, shared with the daemon that rebuilds it.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::catalog::Catalog;
use super::fast;
use crate::metrics::Metrics;

/// The catalog the server answers from, shared with the daemon: reads are lock-free and
/// cheap; [`CatalogHandle::store`] swaps in a new snapshot, seen by the next query. It
/// also carries the metrics the servers that answer from it count their queries in.
#[derive(Debug, Clone)]
pub struct CatalogHandle {
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Metrics,
}

/// One catalog and the fast path's table of its answers.
#[derive(Debug)]
struct Snapshot {
    catalog: Arc<Catalog>,
    table: fast::Table,
    /// How many catalogs were swapped in before this one.
    generation: u64,
}

impl Snapshot {
    fn new(catalog: Catalog, generation: u64) -> Self {
        Snapshot {
            table: fast::Table::build(&catalog),
            catalog: Arc::new(catalog),
            generation,
        }
    }
}

impl CatalogHandle {
    pub fn new(catalog: Catalog) -> Self {
        CatalogHandle {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::new(catalog, 0))),
            metrics: Metrics::disabled(),
        }
    }

    /// The same catalog, whose servers count every query they answer in `metrics`.
    pub fn with_metrics(self, metrics: Metrics) -> Self {
        CatalogHandle { metrics, ..self }
    }

    /// Where queries answered from this catalog are counted.
    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Replace the catalog (and encode the fast path's answers); queries already being
    /// answered finish with the old one. A catalog equal to the current one changes
    /// nothing: the daemon stores one on every sync, and most syncs change no name, so
    /// the table is not encoded again. True when the catalog was replaced.
    pub fn store(&self, catalog: Catalog) -> bool {
        let current = self.snapshot.load();
        if *current.catalog == catalog {
            return false;
        }
        let generation = current.generation + 1;
        self.snapshot.store(Arc::new(Snapshot::new(catalog, generation)));
        true
    }

    /// The current catalog.
    pub fn load(&self) -> Arc<Catalog> {
        self.snapshot.load().catalog.clone()
    }

    /// How many times a changed catalog was stored.
    pub fn generation(&self) -> u64 {
        self.snapshot.load().generation
    }

    /// Run `f` on the current catalog, without taking a reference to it.
    pub(super) fn with_catalog<R>(&self, f: impl FnOnce(&Catalog) -> R) -> R {
        f(&self.snapshot.load().catalog)
    }

    /// Run `f` on the current catalog's fast path table.
    pub(super) fn with_table<R>(&self, f: impl FnOnce(&fast::Table) -> R) -> R {
        f(&self.snapshot.load().table)
    }
}

impl Default for CatalogHandle {
    fn default() -> Self {
        CatalogHandle::new(Catalog::empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::catalog::ContainerRecord;

    fn catalog(addr: &str) -> Catalog {
        Catalog::builder()
            .container(ContainerRecord {
                name: "box".into(),
                addr: addr.parse().unwrap(),
                aliases: vec![],
            })
            .build()
            .unwrap()
    }

    #[test]
    fn an_unchanged_catalog_is_neither_encoded_nor_swapped_again() {
        let handle = CatalogHandle::default();
        assert_eq!(handle.generation(), 0);
        assert!(handle.store(catalog("10.0.0.1")));
        assert_eq!(handle.generation(), 1);
        let stored = handle.load();
        // The same records, built again: nothing happens.
        assert!(!handle.store(catalog("10.0.0.1")));
        assert_eq!(handle.generation(), 1);
        assert!(Arc::ptr_eq(&stored, &handle.load()), "the snapshot was swapped");
        // A changed record is swapped in, and answered on the fast path.
        assert!(handle.store(catalog("10.0.0.2")));
        assert_eq!(handle.generation(), 2);
        assert_eq!(handle.load().containers()[0].addr.to_string(), "10.0.0.2");
        assert!(handle.with_table(|t| !t.is_empty()));
        // Back to empty is a change too.
        assert!(handle.store(Catalog::empty()));
        assert!(handle.with_table(fast::Table::is_empty));
        assert_eq!(handle.generation(), 3);
    }

    #[test]
    fn clones_share_the_catalog_and_its_generation() {
        let handle = CatalogHandle::default();
        let clone = handle.clone();
        handle.store(catalog("10.0.0.1"));
        assert_eq!(clone.generation(), 1);
        assert_eq!(*clone.load(), catalog("10.0.0.1"));
    }
}
