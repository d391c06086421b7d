//! Claims under races, as checks any [`Kv`] must pass: the unit tests run them on the
//! in-memory store, the host suite on a real etcd.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::claims::{Cluster, StoreError};
use super::kv::Kv;
use super::layout::{Keys, VipClaim};
use crate::core::model::{Ipv4Net, ServiceName};

fn pool() -> Ipv4Net {
    Ipv4Net::new("10.253.0.0".parse().expect("an address"), 16).expect("a prefix")
}

/// `claimers` concurrent claims of one service's VIP: all get the same answer.
pub async fn one_service_one_vip(kv: Arc<dyn Kv>, keys: Keys, claimers: usize) -> Result<VipClaim, String> {
    let service = ServiceName::new("web").map_err(|e| e.to_string())?;
    let runs = (0..claimers).map(|_| {
        let cluster = Cluster::new(kv.clone(), keys.clone());
        let service = service.clone();
        tokio::spawn(async move { cluster.claim_vip(&service, pool()).await })
    });
    let answers = collect(runs).await?;
    let first = answers[0];
    if answers.iter().any(|a| *a != first) {
        return Err(format!(
            "claimers of one service got different answers: {answers:?}"
        ));
    }
    Ok(first)
}

/// `services` services claimed at once by `nodes` nodes each: every node gets the same
/// answer for a service, and no two services share a VIP or an fwmark.
pub async fn many_services_distinct(
    kv: Arc<dyn Kv>,
    keys: Keys,
    services: usize,
    nodes: usize,
) -> Result<Vec<VipClaim>, String> {
    let mut runs = Vec::new();
    for node in 0..nodes {
        for s in 0..services {
            let cluster = Cluster::new(kv.clone(), keys.clone());
            let service = ServiceName::new(&format!("svc{s}")).map_err(|e| e.to_string())?;
            runs.push(tokio::spawn(async move {
                cluster.claim_vip(&service, pool()).await.map(|c| (node, s, c))
            }));
        }
    }
    let answers = collect(runs.into_iter()).await?;
    let mut per_service: Vec<Option<VipClaim>> = vec![None; services];
    for (node, s, claim) in answers {
        match per_service[s] {
            None => per_service[s] = Some(claim),
            Some(c) if c == claim => {}
            Some(c) => {
                return Err(format!(
                    "service svc{s}: node {node} got {claim:?}, another {c:?}"
                ))
            }
        }
    }
    let claims: Vec<VipClaim> = per_service.into_iter().flatten().collect();
    let vips: BTreeSet<_> = claims.iter().map(|c| c.vip).collect();
    let marks: BTreeSet<_> = claims.iter().map(|c| c.fwmark).collect();
    if vips.len() != services || marks.len() != services {
        return Err(format!(
            "{services} services got {} VIPs and {} fwmarks: {claims:?}",
            vips.len(),
            marks.len()
        ));
    }
    Ok(claims)
}

async fn collect<T>(
    runs: impl Iterator<Item = tokio::task::JoinHandle<Result<T, StoreError>>>,
) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    for r in futures::future::join_all(runs).await {
        out.push(r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?);
    }
    Ok(out)
}
