//! The cluster network: one Docker bridge network of one name on every node, each with
//! the node's /24. vipd creates it, or adopts the one it made before; one it did not
//! make is never touched.

use std::collections::BTreeMap;

use tracing::info;

use super::subnet::NodeSubnet;
use crate::docker::{Engine, EngineError, NetworkCreate, NetworkDetail, NetworkId};

/// The default name of the cluster network.
pub const DEFAULT_NETWORK: &str = "vipd";
/// The default name of its bridge: fixed, so vipd's firewall rules can name it.
pub const DEFAULT_BRIDGE: &str = "vipd0";
/// The label that marks a network as vipd's.
pub const LABEL: &str = "vipd.cluster-network";
/// The aux address name that reserves the ingress namespace's `.2`.
pub const INGRESS_AUX: &str = "vipd-ingress";

/// Docker's bridge driver options vipd sets.
const OPT_BRIDGE_NAME: &str = "com.docker.network.bridge.name";
const OPT_MTU: &str = "com.docker.network.driver.mtu";
const OPT_MASQUERADE: &str = "com.docker.network.bridge.enable_ip_masquerade";
/// Docker 28.2+: lets packets from the VXLAN device reach containers directly (older
/// versions ignore it).
const OPT_TRUSTED: &str = "com.docker.network.bridge.trusted_host_interfaces";

/// What the cluster network of this node must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: NodeSubnet,
    pub bridge: String,
    /// The underlay's MTU less the VXLAN overhead.
    pub mtu: u32,
    /// The VXLAN device (trusted to reach containers).
    pub vxlan: String,
}

impl NetworkSpec {
    /// The network as Docker is asked to create it.
    pub fn create_request(&self) -> NetworkCreate {
        let net = self.subnet.net();
        NetworkCreate {
            name: self.name.clone(),
            subnet: (net.network(), net.prefix_len()),
            gateway: self.subnet.gateway(),
            aux_addresses: [(INGRESS_AUX.to_owned(), self.subnet.ingress())].into(),
            options: self.options(),
            labels: [(LABEL.to_owned(), "true".to_owned())].into(),
        }
    }

    fn options(&self) -> BTreeMap<String, String> {
        [
            (OPT_BRIDGE_NAME, self.bridge.clone()),
            (OPT_MTU, self.mtu.to_string()),
            (OPT_MASQUERADE, "false".to_owned()),
            (OPT_TRUSTED, self.vxlan.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Whether `found` is this network as vipd made it: same subnet, gateway, reserved
    /// address, and every option vipd sets that Docker reports with the same value (an
    /// option an older Docker does not know may not be reported).
    fn matches(&self, found: &NetworkDetail) -> bool {
        let want = self.create_request();
        found.subnets == [want.subnet]
            && found.gateways == [want.gateway]
            && found.aux_addresses.get(INGRESS_AUX) == Some(&self.subnet.ingress())
            && want
                .options
                .iter()
                .all(|(k, v)| found.options.get(k).is_none_or(|have| have == v))
    }
}

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// There was none: created.
    Created(NetworkId),
    /// vipd's, as wanted: nothing changed.
    Adopted(NetworkId),
    /// vipd's with another subnet or options (the node's lease changed), no container
    /// attached: removed and created again.
    Recreated(NetworkId),
}

/// Why the cluster network could not be ensured.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("a network named {name} exists that vipd did not create; remove it or choose --cluster-network")]
    Foreign { name: String },
    #[error("the network {name} was made by vipd for the subnet {found}, not this node's {want}, and {containers} container(s) are attached; disconnect them (docker network disconnect) so vipd can re-create it")]
    InUse {
        name: String,
        found: String,
        want: NodeSubnet,
        containers: usize,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Make the cluster network exist as `spec` says: create it when absent, adopt vipd's
/// own when it is as wanted, re-create vipd's own when it is not and no container is
/// attached; refuse one vipd did not make.
pub async fn ensure(engine: &dyn Engine, spec: &NetworkSpec) -> Result<Outcome, NetworkError> {
    use tracing::Instrument as _;
    let span = tracing::info_span!("cluster_network", network = %spec.name, subnet = %spec.subnet);
    ensure_in_span(engine, spec).instrument(span).await
}

async fn ensure_in_span(engine: &dyn Engine, spec: &NetworkSpec) -> Result<Outcome, NetworkError> {
    let Some(found) = engine.network(&spec.name).await? else {
        let id = engine.create_network(&spec.create_request()).await?;
        info!(id = %id.0, "cluster network created");
        return Ok(Outcome::Created(id));
    };
    if found.labels.get(LABEL).map(String::as_str) != Some("true") {
        return Err(NetworkError::Foreign {
            name: spec.name.clone(),
        });
    }
    if spec.matches(&found) {
        return Ok(Outcome::Adopted(found.id));
    }
    if found.containers > 0 {
        let found_subnets: Vec<String> = found.subnets.iter().map(|(a, p)| format!("{a}/{p}")).collect();
        return Err(NetworkError::InUse {
            name: spec.name.clone(),
            found: found_subnets.join(","),
            want: spec.subnet,
            containers: found.containers,
        });
    }
    engine.remove_network(&found.id.0).await?;
    let id = engine.create_network(&spec.create_request()).await?;
    info!(id = %id.0, old = %found.id.0, "cluster network re-created for this node's subnet");
    Ok(Outcome::Recreated(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::fake::FakeEngine;

    fn spec(subnet: &str) -> NetworkSpec {
        NetworkSpec {
            name: DEFAULT_NETWORK.into(),
            subnet: NodeSubnet::new(subnet.parse().unwrap()).unwrap(),
            bridge: DEFAULT_BRIDGE.into(),
            mtu: 1450,
            vxlan: "vipd-vx".into(),
        }
    }

    fn found(engine: &FakeEngine) -> NetworkDetail {
        futures::executor::block_on(engine.network(DEFAULT_NETWORK))
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn an_absent_network_is_created_with_the_nodes_slice_and_options() {
        let engine = FakeEngine::new();
        let out = ensure(&engine, &spec("10.230.1.0/24")).await.unwrap();
        assert!(matches!(out, Outcome::Created(_)), "{out:?}");
        let n = found(&engine);
        assert_eq!(n.subnets, [("10.230.1.0".parse().unwrap(), 24)]);
        assert_eq!(n.gateways, ["10.230.1.1".parse::<std::net::Ipv4Addr>().unwrap()]);
        assert_eq!(
            n.aux_addresses[INGRESS_AUX],
            "10.230.1.2".parse::<std::net::Ipv4Addr>().unwrap()
        );
        assert_eq!(n.options[OPT_BRIDGE_NAME], "vipd0");
        assert_eq!(n.options[OPT_MTU], "1450");
        assert_eq!(n.options[OPT_MASQUERADE], "false");
        assert_eq!(n.options[OPT_TRUSTED], "vipd-vx");
        assert_eq!(n.labels[LABEL], "true");
    }

    #[tokio::test]
    async fn vipds_own_network_is_adopted_unchanged() {
        let engine = FakeEngine::new();
        let Outcome::Created(id) = ensure(&engine, &spec("10.230.1.0/24")).await.unwrap() else {
            panic!("not created")
        };
        let before = found(&engine);
        assert_eq!(
            ensure(&engine, &spec("10.230.1.0/24")).await.unwrap(),
            Outcome::Adopted(id)
        );
        assert_eq!(found(&engine), before);
        // An option an older Docker does not report does not make it another network.
        let mut older = before.clone();
        older.options.remove(OPT_TRUSTED);
        engine.put_network(older);
        assert!(matches!(
            ensure(&engine, &spec("10.230.1.0/24")).await.unwrap(),
            Outcome::Adopted(_)
        ));
    }

    #[tokio::test]
    async fn a_changed_lease_re_creates_an_empty_network_and_refuses_a_used_one() {
        let engine = FakeEngine::new();
        ensure(&engine, &spec("10.230.1.0/24")).await.unwrap();
        let out = ensure(&engine, &spec("10.230.9.0/24")).await.unwrap();
        assert!(matches!(out, Outcome::Recreated(_)), "{out:?}");
        assert_eq!(found(&engine).subnets, [("10.230.9.0".parse().unwrap(), 24)]);
        let mut used = found(&engine);
        used.containers = 2;
        engine.put_network(used);
        let err = ensure(&engine, &spec("10.230.1.0/24")).await.unwrap_err();
        assert!(
            matches!(err, NetworkError::InUse { containers: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("10.230.9.0/24"), "{err}");
        assert_eq!(found(&engine).subnets, [("10.230.9.0".parse().unwrap(), 24)]);
    }

    #[tokio::test]
    async fn a_network_vipd_did_not_make_is_refused_and_left_alone() {
        let engine = FakeEngine::new();
        let mut foreign = spec("10.230.1.0/24").create_request();
        foreign.labels.clear();
        engine.create_network(&foreign).await.unwrap();
        let before = found(&engine);
        let err = ensure(&engine, &spec("10.230.1.0/24")).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "a network named vipd exists that vipd did not create; remove it or choose --cluster-network"
        );
        assert_eq!(found(&engine), before);
    }
}
