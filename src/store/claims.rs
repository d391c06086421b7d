//! Cluster-wide claims over the [`Kv`] port: node registration on a lease, a node's
//! subnet, a service's VIP and fwmark, a published port, tasks. Every unique thing is a
//! create-only key written in the same transaction as the claim, so two nodes never hand
//! out the same one; a claimer that loses a race reads the winner's value (or picks again).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, instrument};

use super::kv::{Compare, KeyValue, Kv, KvError, LeaseId, Op, Txn};
use super::layout::{ClusterState, Keys, NodeName, NodeRecord, TaskRecord, VipClaim};
use crate::core::alloc::FIRST_FWMARK;
use crate::core::labels::ServiceDefinition;
use crate::core::model::Protocol;
use crate::core::model::{Ipv4Net, ServiceName};

/// Lost races before a claim gives up: each loss means another claim went through, so
/// this is only reached when hundreds of claims compete at once.
const MAX_ATTEMPTS: usize = 512;

/// Why a claim failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("node name {name} is already registered by a live node (at {address}, on another lease): choose another node name, or wait for that node's lease to end")]
    NameTaken { name: NodeName, address: IpAddr },
    #[error("address {address} is already registered by live node {by}: two nodes cannot share an address")]
    AddressTaken { address: IpAddr, by: String },
    #[error("a /{prefix_len} subnet does not fit the cluster range {range} (use a length from the range's own to 30)")]
    BadSubnetSize { range: Ipv4Net, prefix_len: u8 },
    #[error("the cluster range {range} is exhausted: all {count} /{prefix_len} subnets are claimed")]
    SubnetsExhausted {
        range: Ipv4Net,
        prefix_len: u8,
        count: u64,
    },
    #[error(
        "service {service}: the VIP pool {pool} is exhausted ({size} addresses, all claimed in the cluster)"
    )]
    VipPoolExhausted {
        service: ServiceName,
        pool: Ipv4Net,
        size: u64,
    },
    #[error("service {service}: no fwmark left in the cluster")]
    FwmarksExhausted { service: ServiceName },
    #[error("published port {port}/{proto} is already claimed by service {by}")]
    PortTaken { proto: Protocol, port: u16, by: String },
    #[error("service {service} still has {tasks} task(s) in the cluster: its VIP is kept")]
    InUse { service: ServiceName, tasks: usize },
    #[error("{what}: lost {attempts} races in a row; the cluster store is too contended")]
    Contended { what: String, attempts: usize },
    #[error("key {key}: cannot read its value: {error}")]
    Corrupt { key: String, error: String },
}

/// The claim logic, over any store.
#[derive(Clone)]
pub struct Cluster {
    kv: Arc<dyn Kv>,
    keys: Keys,
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize to JSON")
}

fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|e| StoreError::Corrupt {
        key: kv.key.clone(),
        error: e.to_string(),
    })
}

fn text(kv: &KeyValue) -> String {
    String::from_utf8_lossy(&kv.value).into_owned()
}

fn put(key: String, value: Vec<u8>, lease: Option<LeaseId>) -> Op {
    Op::Put { key, value, lease }
}

/// The first and last address of a pool that may be handed out: not the network or
/// broadcast address of a /30 or larger.
fn usable(pool: Ipv4Net) -> (u64, u64) {
    let base = u64::from(u32::from(pool.network()));
    let size = 1u64 << (32 - u32::from(pool.prefix_len()));
    if size >= 4 {
        (base + 1, base + size - 2)
    } else {
        (base, base + size - 1)
    }
}

impl Cluster {
    pub fn new(kv: Arc<dyn Kv>, keys: Keys) -> Self {
        Cluster { kv, keys }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn kv(&self) -> &Arc<dyn Kv> {
        &self.kv
    }

    /// The key itself (a prefix read returns its longer siblings too).
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let listing = self.kv.get_prefix(key).await?;
        Ok(listing.kvs.into_iter().find(|kv| kv.key == key))
    }

    /// The lease a node runs on: `resume` if it is still alive (a restart within the TTL
    /// keeps the node's keys), else a new one. The caller keeps the id in its state dir.
    #[instrument(skip(self), fields(resume = ?resume.map(|l| l.to_string())))]
    pub async fn lease(&self, ttl: Duration, resume: Option<LeaseId>) -> Result<LeaseId, StoreError> {
        if let Some(id) = resume {
            match self.kv.lease_keep_alive(id).await {
                Ok(_) => {
                    info!(lease = %id, "resumed the lease");
                    return Ok(id);
                }
                Err(KvError::LeaseNotFound(_)) => debug!(lease = %id, "the saved lease has ended"),
                Err(e) => return Err(e.into()),
            }
        }
        let id = self.kv.lease_grant(ttl).await?;
        info!(lease = %id, ?ttl, "granted a new lease");
        Ok(id)
    }

    /// Register `node` on `lease`. Refused if its name is held by another live lease, or
    /// its address by another live node. Registering again on the same lease (a restart
    /// that resumed it) updates the record.
    #[instrument(skip_all, fields(node = %node.name, address = %node.address, lease = %lease))]
    pub async fn register_node(&self, node: &NodeRecord, lease: LeaseId) -> Result<(), StoreError> {
        let node_key = self.keys.node(&node.name);
        let addr_key = self.keys.node_addr(node.address);
        for _ in 0..MAX_ATTEMPTS {
            let mut when = Vec::new();
            let mut then = vec![
                put(node_key.clone(), json(node), Some(lease)),
                put(addr_key.clone(), node.name.as_str().into(), Some(lease)),
            ];
            match self.get(&node_key).await? {
                Some(kv) if kv.lease != Some(lease) => {
                    let held: NodeRecord = decode(&kv)?;
                    return Err(StoreError::NameTaken {
                        name: node.name.clone(),
                        address: held.address,
                    });
                }
                Some(kv) => {
                    // Our own record (a resumed lease): a changed address frees the old one.
                    let old: NodeRecord = decode(&kv)?;
                    if old.address != node.address {
                        then.push(Op::Delete(self.keys.node_addr(old.address)));
                    }
                    when.push(Compare::ModRevisionIs(node_key.clone(), kv.mod_revision));
                }
                None => when.push(Compare::Absent(node_key.clone())),
            }
            match self.get(&addr_key).await? {
                Some(kv) if kv.value != node.name.as_str().as_bytes() => {
                    return Err(StoreError::AddressTaken {
                        address: node.address,
                        by: text(&kv),
                    });
                }
                Some(kv) => when.push(Compare::ModRevisionIs(addr_key.clone(), kv.mod_revision)),
                None => when.push(Compare::Absent(addr_key.clone())),
            }
            let txn = Txn {
                when,
                then,
                otherwise: vec![],
            };
            if self.kv.txn(txn).await?.succeeded {
                info!("node registered");
                return Ok(());
            }
            debug!("lost a race registering the node; reading again");
        }
        Err(self.contended(format!("registering node {}", node.name)))
    }

    fn contended(&self, what: String) -> StoreError {
        StoreError::Contended {
            what,
            attempts: MAX_ATTEMPTS,
        }
    }

    /// The node's `/prefix_len` slice of `range`: the one it already has (kept across
    /// restarts), else the lowest free one. Put on `lease` (a long one: flannel keeps
    /// 24 h) or on none.
    #[instrument(skip(self), fields(node = %node, range = %range))]
    pub async fn claim_subnet(
        &self,
        node: &NodeName,
        range: Ipv4Net,
        prefix_len: u8,
        lease: Option<LeaseId>,
    ) -> Result<Ipv4Net, StoreError> {
        if prefix_len < range.prefix_len() || prefix_len > 30 {
            return Err(StoreError::BadSubnetSize { range, prefix_len });
        }
        let range = range.trunc();
        let mine_key = self.keys.node_subnet(node);
        let count = 1u64 << (prefix_len - range.prefix_len());
        let step = 1u64 << (32 - u32::from(prefix_len));
        for _ in 0..MAX_ATTEMPTS {
            if let Some(kv) = self.get(&mine_key).await? {
                let net = text(&kv)
                    .parse::<Ipv4Net>()
                    .ok()
                    .ok_or_else(|| StoreError::Corrupt {
                        key: kv.key.clone(),
                        error: "not an IPv4 network".into(),
                    })?;
                return Ok(net);
            }
            let taken: BTreeSet<String> = self
                .kv
                .get_prefix(&self.keys.dir("subnets"))
                .await?
                .kvs
                .into_iter()
                .map(|kv| kv.key)
                .collect();
            let base = u64::from(u32::from(range.addr()));
            let free = (0..count)
                .filter_map(|i| {
                    let addr = Ipv4Addr::from(u32::try_from(base + i * step).ok()?);
                    Ipv4Net::new(addr, prefix_len).ok()
                })
                .find(|net| !taken.contains(&self.keys.subnet(*net)));
            let Some(net) = free else {
                return Err(StoreError::SubnetsExhausted {
                    range,
                    prefix_len,
                    count,
                });
            };
            let txn = Txn {
                when: vec![
                    Compare::Absent(mine_key.clone()),
                    Compare::Absent(self.keys.subnet(net)),
                ],
                then: vec![
                    put(mine_key.clone(), net.to_string().into_bytes(), lease),
                    put(self.keys.subnet(net), node.as_str().into(), lease),
                ],
                otherwise: vec![],
            };
            if self.kv.txn(txn).await?.succeeded {
                info!(subnet = %net, "subnet claimed");
                return Ok(net);
            }
            debug!(subnet = %net, "lost a race for the subnet; reading again");
        }
        Err(self.contended(format!("a subnet for node {node}")))
    }

    /// Give the node's subnet back (only the node's own claim is removed).
    #[instrument(skip(self), fields(node = %node))]
    pub async fn release_subnet(&self, node: &NodeName) -> Result<bool, StoreError> {
        let mine_key = self.keys.node_subnet(node);
        let Some(kv) = self.get(&mine_key).await? else {
            return Ok(false);
        };
        let mut ops = vec![Op::Delete(mine_key.clone())];
        let mut when = vec![Compare::ModRevisionIs(mine_key, kv.mod_revision)];
        if let Ok(net) = text(&kv).parse::<Ipv4Net>() {
            let index = self.keys.subnet(net);
            when.push(Compare::ValueIs(index.clone(), node.as_str().into()));
            ops.push(Op::Delete(index));
        }
        let txn = Txn {
            when,
            then: ops,
            otherwise: vec![],
        };
        Ok(self.kv.txn(txn).await?.succeeded)
    }

    /// The VIP and fwmark of `service`: the same answer on every node. The first claimer
    /// takes the lowest free address of `pool` and the mark above every claimed one;
    /// the service key and both index keys are created in one transaction.
    #[instrument(skip(self), fields(service = %service, pool = %pool))]
    pub async fn claim_vip(&self, service: &ServiceName, pool: Ipv4Net) -> Result<VipClaim, StoreError> {
        let service_key = self.keys.service(service);
        let (first, last) = usable(pool);
        for _ in 0..MAX_ATTEMPTS {
            if let Some(kv) = self.get(&service_key).await? {
                return decode(&kv);
            }
            let vips: BTreeSet<String> = self.list_keys("vips").await?;
            let marks = self.list_keys("fwmarks").await?;
            let Some(vip) = (first..=last)
                .filter_map(|n| u32::try_from(n).ok().map(Ipv4Addr::from))
                .find(|ip| !vips.contains(&self.keys.vip(*ip)))
            else {
                return Err(StoreError::VipPoolExhausted {
                    service: service.clone(),
                    pool,
                    size: last + 1 - first,
                });
            };
            let top = marks
                .iter()
                .filter_map(|k| k.rsplit('/').next()?.parse::<u32>().ok())
                .max();
            let fwmark =
                match top {
                    None => FIRST_FWMARK,
                    Some(m) => m.max(FIRST_FWMARK - 1).checked_add(1).ok_or_else(|| {
                        StoreError::FwmarksExhausted {
                            service: service.clone(),
                        }
                    })?,
                };
            let claim = VipClaim { vip, fwmark };
            let owner: Vec<u8> = service.as_str().into();
            let txn = Txn {
                when: vec![
                    Compare::Absent(service_key.clone()),
                    Compare::Absent(self.keys.vip(vip)),
                    Compare::Absent(self.keys.fwmark(fwmark)),
                ],
                then: vec![
                    put(service_key.clone(), json(&claim), None),
                    put(self.keys.vip(vip), owner.clone(), None),
                    put(self.keys.fwmark(fwmark), owner, None),
                ],
                otherwise: vec![],
            };
            if self.kv.txn(txn).await?.succeeded {
                info!(%vip, fwmark, "VIP claimed");
                return Ok(claim);
            }
            debug!(%vip, fwmark, "lost a race for the VIP; reading again");
        }
        Err(self.contended(format!("a VIP for service {service}")))
    }

    async fn list_keys(&self, kind: &str) -> Result<BTreeSet<String>, StoreError> {
        let listing = self.kv.get_prefix(&self.keys.dir(kind)).await?;
        Ok(listing.kvs.into_iter().map(|kv| kv.key).collect())
    }

    /// Give the service's VIP and fwmark back, only if no task of it is left anywhere in
    /// the cluster and it has no stored definition (`vipd service`), both checked in the
    /// same transaction. `Ok(false)`: it had none, or it is defined.
    #[instrument(skip(self), fields(service = %service))]
    pub async fn release_vip(&self, service: &ServiceName) -> Result<bool, StoreError> {
        let service_key = self.keys.service(service);
        let tasks = self.keys.tasks_of(service);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.get(&service_key).await? else {
                return Ok(false);
            };
            let claim: VipClaim = decode(&kv)?;
            let txn = Txn {
                when: vec![
                    Compare::ModRevisionIs(service_key.clone(), kv.mod_revision),
                    Compare::NoneUnder(tasks.clone()),
                    Compare::Absent(self.keys.definition(service)),
                ],
                then: vec![
                    Op::Delete(service_key.clone()),
                    Op::Delete(self.keys.vip(claim.vip)),
                    Op::Delete(self.keys.fwmark(claim.fwmark)),
                ],
                otherwise: vec![],
            };
            if self.kv.txn(txn).await?.succeeded {
                info!(vip = %claim.vip, fwmark = claim.fwmark, "VIP released");
                return Ok(true);
            }
            let left = self.kv.get_prefix(&tasks).await?.kvs.len();
            if left > 0 {
                return Err(StoreError::InUse {
                    service: service.clone(),
                    tasks: left,
                });
            }
            if self.get(&self.keys.definition(service)).await?.is_some() {
                return Ok(false);
            }
        }
        Err(self.contended(format!("releasing the VIP of service {service}")))
    }

    /// Publish `port`/`proto` for `service`: one service per published port in the
    /// cluster. Claiming it again for the same service is fine.
    #[instrument(skip(self), fields(service = %service))]
    pub async fn claim_port(
        &self,
        proto: Protocol,
        port: u16,
        service: &ServiceName,
    ) -> Result<(), StoreError> {
        let key = self.keys.port(proto, port);
        let txn = Txn {
            when: vec![Compare::Absent(key.clone())],
            then: vec![put(key.clone(), service.as_str().into(), None)],
            otherwise: vec![],
        };
        if self.kv.txn(txn).await?.succeeded {
            info!(port, %proto, "published port claimed");
            return Ok(());
        }
        match self.get(&key).await? {
            Some(kv) if kv.value == service.as_str().as_bytes() => Ok(()),
            Some(kv) => Err(StoreError::PortTaken {
                proto,
                port,
                by: text(&kv),
            }),
            // Released between our transaction and our read: try once more from the top.
            None => Box::pin(self.claim_port(proto, port, service)).await,
        }
    }

    /// Give a published port back; only its claimer can. `Ok(false)`: not ours.
    #[instrument(skip(self), fields(service = %service))]
    pub async fn release_port(
        &self,
        proto: Protocol,
        port: u16,
        service: &ServiceName,
    ) -> Result<bool, StoreError> {
        let key = self.keys.port(proto, port);
        let txn = Txn {
            when: vec![Compare::ValueIs(key.clone(), service.as_str().into())],
            then: vec![Op::Delete(key)],
            otherwise: vec![],
        };
        Ok(self.kv.txn(txn).await?.succeeded)
    }

    /// Announce a task on its node's lease: it vanishes with the node.
    #[instrument(skip_all, fields(task = %task.id, service = %task.service, node = %task.node))]
    pub async fn put_task(&self, task: &TaskRecord, lease: LeaseId) -> Result<(), StoreError> {
        let txn = Txn {
            when: vec![],
            then: vec![put(self.keys.task(task), json(task), Some(lease))],
            otherwise: vec![],
        };
        self.kv.txn(txn).await?;
        Ok(())
    }

    /// Withdraw a task.
    #[instrument(skip_all, fields(task = %task.id, service = %task.service, node = %task.node))]
    pub async fn delete_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        let txn = Txn {
            when: vec![],
            then: vec![Op::Delete(self.keys.task(task))],
            otherwise: vec![],
        };
        self.kv.txn(txn).await?;
        Ok(())
    }

    /// A service's stored definition, if it has one.
    pub async fn definition(&self, service: &ServiceName) -> Result<Option<ServiceDefinition>, StoreError> {
        match self.get(&self.keys.definition(service)).await? {
            Some(kv) => decode(&kv).map(Some),
            None => Ok(None),
        }
    }

    /// Store `def` if the stored definition of its service is still `expected` (`None`:
    /// there is none), in one transaction: false, and nothing written, if it is not.
    #[instrument(skip_all, fields(service = %def.name))]
    pub async fn put_definition(
        &self,
        def: &ServiceDefinition,
        expected: Option<&ServiceDefinition>,
    ) -> Result<bool, StoreError> {
        let key = self.keys.definition(&def.name);
        let when = match expected {
            None => Compare::Absent(key.clone()),
            Some(old) => Compare::ValueIs(key.clone(), json(old)),
        };
        let txn = Txn {
            when: vec![when],
            then: vec![put(key, json(def), None)],
            otherwise: vec![],
        };
        let done = self.kv.txn(txn).await?.succeeded;
        if done {
            info!("service definition stored");
        }
        Ok(done)
    }

    /// Delete a service's definition; false if it had none.
    #[instrument(skip(self), fields(service = %service))]
    pub async fn delete_definition(&self, service: &ServiceName) -> Result<bool, StoreError> {
        let key = self.keys.definition(service);
        let Some(kv) = self.get(&key).await? else {
            return Ok(false);
        };
        let txn = Txn {
            when: vec![Compare::ModRevisionIs(key.clone(), kv.mod_revision)],
            then: vec![Op::Delete(key)],
            otherwise: vec![],
        };
        Ok(self.kv.txn(txn).await?.succeeded)
    }

    /// Every stored service definition.
    pub async fn definitions(&self) -> Result<BTreeMap<ServiceName, ServiceDefinition>, StoreError> {
        let listing = self.kv.get_prefix(&self.keys.dir("services-defs")).await?;
        let mut defs = BTreeMap::new();
        for kv in &listing.kvs {
            let def: ServiceDefinition = decode(kv)?;
            defs.insert(def.name.clone(), def);
        }
        Ok(defs)
    }

    /// Every task in the cluster.
    pub async fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        Ok(self.state().await?.tasks.into_values().collect())
    }

    /// What is written on `lease` (a node's record, its address, its tasks), read at one
    /// revision: what a node that resumed its lease left there before.
    pub async fn on_lease(&self, lease: LeaseId) -> Result<ClusterState, StoreError> {
        let listing = self.kv.get_prefix(self.keys.root()).await?;
        let mine = listing.kvs.iter().filter(|kv| kv.lease == Some(lease));
        Ok(ClusterState::from_kvs(&self.keys, mine, listing.revision))
    }

    /// Everything under the prefix, read at one revision.
    pub async fn state(&self) -> Result<ClusterState, StoreError> {
        let listing = self.kv.get_prefix(self.keys.root()).await?;
        Ok(ClusterState::from_kvs(&self.keys, &listing.kvs, listing.revision))
    }
}
