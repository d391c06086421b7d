//! The kernel's per-destination IPVS counters of a namespace, for the metrics scrape:
//! the kernel side of [`crate::metrics::IpvsCounters`].

use std::path::Path;

use crate::core::ipvs::{Destination, ServiceKey};
use crate::core::model::FwMark;
use crate::ipvs::netlink::NetlinkIpvs;
use crate::ipvs::{IpvsError, IpvsTable as _};
use crate::metrics::{IpvsCounters, ReadError};
use crate::netns::{NetnsError, NetnsPath};

/// Reads a namespace's IPVS table over generic netlink, on a thread that enters it.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelIpvsCounters;

impl IpvsCounters for KernelIpvsCounters {
    fn read(&self, netns: &Path, marks: &[FwMark]) -> Result<Vec<(FwMark, Destination)>, ReadError> {
        let span = tracing::debug_span!("ipvs_counters", netns = %netns.display());
        let _entered = span.enter();
        let ns = NetnsPath::from_arg(&netns.display().to_string());
        match crate::netns::run_in(&ns, || read_marks(marks)) {
            Ok(read) => Ok(read?),
            // A sandbox whose container stopped: no longer there to read.
            Err(NetnsError::Open { .. }) => Err(ReadError::Vanished),
            Err(e) => Err(ReadError::Netns(e)),
        }
    }
}

/// The destinations of the services of `marks` that the calling thread's namespace has.
fn read_marks(marks: &[FwMark]) -> Result<Vec<(FwMark, Destination)>, IpvsError> {
    let mut ipvs = NetlinkIpvs::open()?;
    let keys: Vec<ServiceKey> = marks.iter().map(|m| ServiceKey::fwmark(*m)).collect();
    let present = ipvs.services_including(&keys)?;
    let mut out = Vec::new();
    for mark in marks {
        let key = ServiceKey::fwmark(*mark);
        if present.iter().any(|s| s.key == key) {
            out.extend(ipvs.destinations(&key)?.into_iter().map(|d| (*mark, d)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_that_is_not_there_is_vanished_not_an_error() {
        let marks = [FwMark::new(256).unwrap()];
        let read = KernelIpvsCounters.read(Path::new("/nonexistent-vipd/netns"), &marks);
        assert!(matches!(read, Err(ReadError::Vanished)), "{read:?}");
    }
}
