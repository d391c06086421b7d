//! The iptables backend of vipd's rules: its chains, reading them back, and the
//! difference. [`render`] turns the planner's intents ([`super::rules::Intent`]) into
//! rule lines; everything here works on those lines.
//!
//! In a sandbox (and in the ingress namespace) vipd owns the chains of
//! [`SANDBOX_CHAINS`]; in the host's namespace those of [`HOST_CHAINS`] (the routing mesh).
//! Each has one jump into it from a built-in chain. Rules are rendered
//! in exactly the form `iptables-save` prints them, so what is read back compares equal to
//! what was written and a second run changes nothing. Rules in any other chain are never
//! touched; in a built-in chain vipd touches only its own jump.

pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use super::model::{FwMark, ServiceName, Vip};
use super::rules::Intent;
pub use render::render;

/// The prefix of every comment vipd puts on its rules.
pub const COMMENT_PREFIX: &str = "vipd:";

/// An iptables table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Mangle,
    Nat,
    Filter,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

/// A chain vipd owns, and the built-in chain that jumps to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct OwnedChain {
    pub table: Table,
    pub name: &'static str,
    pub hook: &'static str,
    /// Matches on the jump before `-j NAME`, as `iptables-save` prints them; empty for an
    /// unconditional jump.
    pub jump_match: &'static str,
}

impl OwnedChain {
    /// The jump rule in the hook, after `-A HOOK `, as `iptables-save` prints it.
    pub fn jump(&self) -> String {
        if self.jump_match.is_empty() {
            format!("-j {}", self.name)
        } else {
            format!("{} -j {}", self.jump_match, self.name)
        }
    }
}

/// mangle: marks packets to a VIP with the service's fwmark.
pub const MANGLE_OUTPUT: OwnedChain = OwnedChain {
    table: Table::Mangle,
    name: "VIPD-OUTPUT",
    hook: "OUTPUT",
    jump_match: "",
};
/// mangle: marks packets to a published port of the ingress namespace with the port's
/// fwmark.
pub const MANGLE_PREROUTING: OwnedChain = OwnedChain {
    table: Table::Mangle,
    name: "VIPD-PREROUTING",
    hook: "PREROUTING",
    jump_match: "",
};
/// nat: answers `ping VIP` locally.
pub const NAT_OUTPUT: OwnedChain = OwnedChain {
    table: Table::Nat,
    name: "VIPD-OUTPUT",
    hook: "OUTPUT",
    jump_match: "",
};
/// nat: source-NATs IPVS-forwarded packets to the sandbox's own address on the backends' network.
pub const NAT_POSTROUTING: OwnedChain = OwnedChain {
    table: Table::Nat,
    name: "VIPD-POSTROUTING",
    hook: "POSTROUTING",
    jump_match: "",
};

/// Every chain vipd owns in a sandbox or the ingress namespace.
pub const SANDBOX_CHAINS: [OwnedChain; 4] = [NAT_OUTPUT, NAT_POSTROUTING, MANGLE_OUTPUT, MANGLE_PREROUTING];

/// Host, nat: DNATs published ports arriving for a local address to the ingress namespace.
pub const HOST_NAT_PREROUTING: OwnedChain = OwnedChain {
    table: Table::Nat,
    name: "VIPD-INGRESS",
    hook: "PREROUTING",
    jump_match: "-m addrtype --dst-type LOCAL",
};
/// Host, nat: the same for connections the host itself opens (`127.0.0.1:<published>`).
pub const HOST_NAT_OUTPUT: OwnedChain = OwnedChain {
    table: Table::Nat,
    name: "VIPD-INGRESS-OUT",
    hook: "OUTPUT",
    jump_match: "-m addrtype --dst-type LOCAL",
};
/// Host, nat: connections the host opens leave towards the ingress namespace with the
/// host's address on the link (never 127.0.0.1).
pub const HOST_NAT_POSTROUTING: OwnedChain = OwnedChain {
    table: Table::Nat,
    name: "VIPD-INGRESS-POST",
    hook: "POSTROUTING",
    jump_match: "",
};
/// Host, filter: lets traffic to and from the ingress namespace through FORWARD, whatever
/// Docker's own chains drop.
pub const HOST_FILTER_FORWARD: OwnedChain = OwnedChain {
    table: Table::Filter,
    name: "VIPD-FORWARD",
    hook: "FORWARD",
    jump_match: "",
};

/// Host, filter, cluster mode: lets traffic between the VXLAN device and the cluster
/// bridge through FORWARD. Jumped from `DOCKER-USER`, the one chain of Docker's that
/// Docker never edits and that FORWARD passes first, so Docker's drops come after it.
pub const HOST_OVERLAY_FORWARD: OwnedChain = OwnedChain {
    table: Table::Filter,
    name: "VIPD-OVERLAY",
    hook: "DOCKER-USER",
    jump_match: "",
};
/// Host, nat, cluster mode: no masquerade inside the cluster range, masquerade from the
/// node's slice to the world (the cluster network has Docker's own masquerade off).
pub const HOST_OVERLAY_NAT: OwnedChain = OwnedChain {
    table: Table::Nat,
    name: "VIPD-OVERLAY-NAT",
    hook: "POSTROUTING",
    jump_match: "",
};
/// Host, filter, cluster mode: VXLAN packets accepted from peers only.
pub const HOST_VXLAN_INPUT: OwnedChain = OwnedChain {
    table: Table::Filter,
    name: "VIPD-VXLAN-IN",
    hook: "INPUT",
    jump_match: "",
};

/// Docker's `DOCKER-USER` chain, as a chain vipd jumps from: vipd creates it (and
/// FORWARD's jump to it) when it is absent, as Docker does at start, and never flushes
/// or deletes it, since its rules are the operator's.
pub const DOCKER_USER: OwnedChain = OwnedChain {
    table: Table::Filter,
    name: "DOCKER-USER",
    hook: "FORWARD",
    jump_match: "",
};

/// Every chain vipd owns in the host's namespace: the routing mesh's, then the cluster
/// overlay's. One set, programmed in one call, so a second run changes nothing.
pub const HOST_CHAINS: [OwnedChain; 7] = [
    HOST_NAT_PREROUTING,
    HOST_NAT_OUTPUT,
    HOST_NAT_POSTROUTING,
    HOST_FILTER_FORWARD,
    HOST_OVERLAY_FORWARD,
    HOST_OVERLAY_NAT,
    HOST_VXLAN_INPUT,
];

/// Chains whose rules act in order (an ACCEPT or RETURN before a catch-all DROP or
/// MASQUERADE): they are kept exactly in the rendered order, rewritten whole when not.
pub const ORDERED_CHAINS: [OwnedChain; 2] = [HOST_OVERLAY_NAT, HOST_VXLAN_INPUT];

/// Chains whose jump must come before any rule of others in its hook: a foreign ACCEPT
/// before the VXLAN drop, or a foreign MASQUERADE before the cluster's RETURN, would
/// defeat them. Docker inserts its own rules at the top (`-I`) on restart and on network
/// create; [`ObservedFirewall::displaced`] says when that happened.
pub const FIRST_JUMPS: [OwnedChain; 2] = [HOST_OVERLAY_NAT, HOST_VXLAN_INPUT];

/// Every chain vipd owns anywhere: what is read back from `iptables-save`.
pub const OWNED_CHAINS: [OwnedChain; 11] = [
    NAT_OUTPUT,
    NAT_POSTROUTING,
    MANGLE_OUTPUT,
    MANGLE_PREROUTING,
    HOST_NAT_PREROUTING,
    HOST_NAT_OUTPUT,
    HOST_NAT_POSTROUTING,
    HOST_FILTER_FORWARD,
    HOST_OVERLAY_FORWARD,
    HOST_OVERLAY_NAT,
    HOST_VXLAN_INPUT,
];

/// One line in an owned chain: the text after `-A CHAIN `, exactly as `iptables-save`
/// prints it. Made only by [`render`] (and read back from the kernel).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ChainRule {
    pub chain: OwnedChain,
    pub spec: String,
}

/// A vipd service as its mark rule describes it: the VIP and mark from the rule's match
/// and target, the name from its comment (the one record of the name in the kernel,
/// read when vipd's saved allocations are lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MarkedService {
    pub name: ServiceName,
    pub vip: Vip,
    pub fwmark: FwMark,
}

/// What `iptables-save` shows of vipd's chains.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedFirewall {
    /// Owned chains that exist, with their rules in order.
    pub chains: BTreeMap<OwnedChain, Vec<String>>,
    /// How many jumps to each owned chain its hook has.
    pub jumps: BTreeMap<OwnedChain, usize>,
    /// Chains of [`FIRST_JUMPS`] whose jump is there but behind a rule that is not one of
    /// vipd's jumps.
    pub displaced: BTreeSet<OwnedChain>,
    /// What the filter table has of [`DOCKER_USER`].
    pub docker_user: DockerUser,
}

/// Whether `DOCKER-USER` exists and FORWARD jumps to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DockerUser {
    pub exists: bool,
    pub jumped: bool,
}

impl ObservedFirewall {
    /// The rules of vipd's own mark chains ([`MANGLE_OUTPUT`], [`MANGLE_PREROUTING`]).
    fn mark_chain_rules(&self) -> impl Iterator<Item = &String> {
        [MANGLE_OUTPUT, MANGLE_PREROUTING]
            .into_iter()
            .flat_map(|c| self.chains.get(&c).into_iter().flatten())
    }

    /// The marks vipd's MARK rules set: which IPVS fwmark services are vipd's. A rule
    /// counts by where it is (a chain vipd owns) and what it does (`-d VIP/32 -j MARK
    /// --set-xmark MARK/0xffffffff`), whatever its comment says.
    pub fn marks(&self) -> BTreeSet<FwMark> {
        self.mark_chain_rules()
            .filter_map(|r| render::read_mark(r))
            .map(|(_, mark)| mark)
            .collect()
    }

    /// The VIPs vipd's ping rules answer for ([`NAT_OUTPUT`]).
    pub fn pinged(&self) -> BTreeSet<IpAddr> {
        self.chains
            .get(&NAT_OUTPUT)
            .into_iter()
            .flatten()
            .filter_map(|r| render::read_ping(r))
            .collect()
    }

    /// The services vipd's mark rules describe, in mark order, named by their comments:
    /// what the kernel says was allocated, when vipd's saved allocations are lost. A
    /// mark rule without vipd's comment names nothing and is left out.
    pub fn marked_services(&self) -> Vec<MarkedService> {
        let mut by_mark = BTreeMap::new();
        for r in self.mark_chain_rules() {
            if let (Some((vip, fwmark)), Some(name)) = (render::read_mark(r), render::read_service_name(r)) {
                by_mark.insert(
                    fwmark,
                    MarkedService {
                        name,
                        vip: Vip::new(vip),
                        fwmark,
                    },
                );
            }
        }
        by_mark.into_values().collect()
    }

    /// What keeps vipd's host rules from working as planned, though every rule is in
    /// place: a jump of [`FIRST_JUMPS`] pushed down by another's rule, a jump missing, or
    /// `DOCKER-USER` (or FORWARD's jump to it) gone while vipd has a chain jumped from it.
    /// Empty when nothing needs re-asserting; what the agent checks after Docker's
    /// network events and on a timer.
    pub fn needs_reassert(&self) -> Vec<Reassert> {
        let mut out: Vec<Reassert> = self.displaced.iter().map(|c| Reassert::Displaced(*c)).collect();
        for chain in self.chains.keys() {
            if self.jumps.get(chain).copied().unwrap_or(0) == 0 {
                out.push(Reassert::MissingJump(*chain));
            }
        }
        if self.chains.contains_key(&HOST_OVERLAY_FORWARD)
            && !(self.docker_user.exists && self.docker_user.jumped)
        {
            out.push(Reassert::MissingJump(DOCKER_USER));
        }
        out
    }

    /// True when vipd has nothing at all in this namespace's firewall.
    pub fn is_clean(&self) -> bool {
        self.chains.is_empty() && self.jumps.values().all(|n| *n == 0)
    }
}

/// Why vipd's host rules need programming again though every rule is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", content = "chain", rename_all = "snake_case")]
pub enum Reassert {
    /// The jump to the chain is no longer first in its hook.
    Displaced(OwnedChain),
    /// The chain is there, nothing jumps to it.
    MissingJump(OwnedChain),
}

impl fmt::Display for Reassert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reassert::Displaced(c) => write!(
                f,
                "{} {}: the jump to {} is no longer first",
                c.table.name(),
                c.hook,
                c.name
            ),
            Reassert::MissingJump(c) => write!(
                f,
                "{} {}: the jump to {} is missing",
                c.table.name(),
                c.hook,
                c.name
            ),
        }
    }
}

/// Whether `spec`, a rule of the built-in (or Docker's) chain `hook`, is a jump of vipd's.
fn is_owned_jump(table: Table, hook: &str, spec: &str) -> bool {
    OWNED_CHAINS
        .iter()
        .any(|c| c.table == table && c.hook == hook && spec == c.jump())
}

/// Parse `iptables-save` output, keeping only what concerns vipd's chains.
pub fn parse_save(text: &str) -> ObservedFirewall {
    let mut seen = ObservedFirewall::default();
    let mut table: Option<Table> = None;
    // Hooks (by table and name) where a rule that is not vipd's jump was already seen.
    let mut foreign_before: BTreeSet<(Table, &str)> = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(t) = line.strip_prefix('*') {
            table = match t {
                "mangle" => Some(Table::Mangle),
                "nat" => Some(Table::Nat),
                "filter" => Some(Table::Filter),
                _ => None,
            };
            continue;
        }
        let Some(table) = table else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if table == DOCKER_USER.table && name == DOCKER_USER.name {
                seen.docker_user.exists = true;
            }
            for c in OWNED_CHAINS.iter().filter(|c| c.table == table && c.name == name) {
                seen.chains.entry(*c).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            if table == DOCKER_USER.table && chain == DOCKER_USER.hook && spec == DOCKER_USER.jump() {
                seen.docker_user.jumped = true;
            }
            for c in OWNED_CHAINS.iter().filter(|c| c.table == table) {
                if chain == c.name {
                    seen.chains.entry(*c).or_default().push(unquote_comment(spec));
                } else if chain == c.hook && spec == c.jump() {
                    *seen.jumps.entry(*c).or_default() += 1;
                    if FIRST_JUMPS.contains(c) && foreign_before.contains(&(table, chain)) {
                        seen.displaced.insert(*c);
                    }
                }
            }
            if !is_owned_jump(table, chain, spec) {
                foreign_before.insert((table, chain));
            }
        }
    }
    seen
}

/// `iptables-save` quotes a comment that has characters such as `:` in it
/// (`--comment "vipd:web"`); vipd's comments have no spaces or quotes, so they are
/// compared, and given back to `iptables-restore`, without the quotes.
fn unquote_comment(spec: &str) -> String {
    let Some(start) = spec.find("--comment \"") else {
        return spec.to_owned();
    };
    let value_at = start + "--comment \"".len();
    match spec[value_at..].find('"') {
        Some(len) if !spec[value_at..value_at + len].contains([' ', '\\', '\'']) => format!(
            "{}--comment {}{}",
            &spec[..start],
            &spec[value_at..value_at + len],
            &spec[value_at + len + 1..]
        ),
        _ => spec.to_owned(),
    }
}

/// One change to the firewall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FwOp {
    NewChain(OwnedChain),
    AddJump(OwnedChain),
    AddRule(ChainRule),
    DelRule(ChainRule),
    DelJump(OwnedChain),
    DelChain(OwnedChain),
}

impl fmt::Display for FwOp {
    /// The change as the equivalent `iptables` command, for logs and `--dry-run`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = |c: &OwnedChain| c.table.name();
        match self {
            FwOp::NewChain(c) => write!(f, "iptables -t {} -N {}", t(c), c.name),
            FwOp::AddJump(c) => write!(f, "iptables -t {} -I {} 1 {}", t(c), c.hook, c.jump()),
            FwOp::AddRule(r) => write!(f, "iptables -t {} -A {} {}", t(&r.chain), r.chain.name, r.spec),
            FwOp::DelRule(r) => write!(f, "iptables -t {} -D {} {}", t(&r.chain), r.chain.name, r.spec),
            FwOp::DelJump(c) => write!(f, "iptables -t {} -D {} {}", t(c), c.hook, c.jump()),
            FwOp::DelChain(c) => write!(f, "iptables -t {} -X {}", t(c), c.name),
        }
    }
}

/// The operations that turn `seen` into `want` in a sandbox's chains
/// ([`SANDBOX_CHAINS`]).
pub fn plan(want: &[Intent], seen: &ObservedFirewall) -> Vec<FwOp> {
    plan_chains(&SANDBOX_CHAINS, want, seen)
}

/// The operations that turn `seen` into `want` in `chains` (rules in those chains only).
///
/// A chain exists exactly when it has rules; its hook then has exactly one jump to it.
pub fn plan_chains(chains: &[OwnedChain], want: &[Intent], seen: &ObservedFirewall) -> Vec<FwOp> {
    let ranked: Vec<(u8, ChainRule)> = want.iter().map(|i| (render::rank(i), render(i))).collect();
    plan_lines(chains, &ranked, seen)
}

/// [`plan_chains`] for rendered lines (with their rank in an ordered chain): compared as
/// text with what `iptables-save` printed, so a rule changed by hand in any way is put
/// back.
fn plan_lines(chains: &[OwnedChain], want: &[(u8, ChainRule)], seen: &ObservedFirewall) -> Vec<FwOp> {
    let mut ops = Vec::new();
    for &chain in chains {
        let mut wanted: Vec<(u8, &str)> = want
            .iter()
            .filter(|(_, r)| r.chain == chain)
            .map(|(rank, r)| (*rank, r.spec.as_str()))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let wanted: Vec<&str> = wanted.into_iter().map(|(_, spec)| spec).collect();
        let have = seen.chains.get(&chain);
        let jumps = seen.jumps.get(&chain).copied().unwrap_or(0);
        if wanted.is_empty() {
            for _ in 0..jumps {
                ops.push(FwOp::DelJump(chain));
            }
            if have.is_some() {
                ops.push(FwOp::DelChain(chain));
            }
            continue;
        }
        if chain.hook == DOCKER_USER.name && chain.table == DOCKER_USER.table {
            if !seen.docker_user.exists {
                ops.push(FwOp::NewChain(DOCKER_USER));
            }
            if !seen.docker_user.jumped {
                ops.push(FwOp::AddJump(DOCKER_USER));
            }
        }
        if have.is_none() {
            ops.push(FwOp::NewChain(chain));
        }
        if ORDERED_CHAINS.contains(&chain) {
            plan_ordered(
                chain,
                &wanted,
                have.map(Vec::as_slice).unwrap_or_default(),
                &mut ops,
            );
        } else {
            plan_unordered(chain, &wanted, have, &mut ops);
        }
        match jumps {
            0 => ops.push(FwOp::AddJump(chain)),
            1 if seen.displaced.contains(&chain) => {
                ops.push(FwOp::DelJump(chain));
                ops.push(FwOp::AddJump(chain));
            }
            1 => {}
            n => ops.extend((1..n).map(|_| FwOp::DelJump(chain))),
        }
    }
    ops
}

/// An ordered chain's rules: kept when they are exactly `wanted` in order, else every
/// rule is deleted and `wanted` appended in order (one `iptables-restore`, so no packet
/// sees the chain half done).
fn plan_ordered(chain: OwnedChain, wanted: &[&str], have: &[String], ops: &mut Vec<FwOp>) {
    if have.iter().map(String::as_str).eq(wanted.iter().copied()) {
        return;
    }
    let rule = |spec: &str| ChainRule {
        chain,
        spec: spec.to_owned(),
    };
    ops.extend(have.iter().map(|spec| FwOp::DelRule(rule(spec))));
    ops.extend(wanted.iter().map(|spec| FwOp::AddRule(rule(spec))));
}

/// An unordered chain's rules: what is missing is appended, what is not wanted (or a
/// duplicate) deleted.
fn plan_unordered(chain: OwnedChain, wanted: &[&str], have: Option<&Vec<String>>, ops: &mut Vec<FwOp>) {
    // Multiset difference: a duplicate of a wanted rule is removed too.
    let mut pending: BTreeMap<&str, usize> = BTreeMap::new();
    for r in have.into_iter().flatten() {
        *pending.entry(r.as_str()).or_default() += 1;
    }
    for spec in wanted {
        match pending.get_mut(spec) {
            Some(n) if *n > 0 => *n -= 1,
            _ => ops.push(FwOp::AddRule(ChainRule {
                chain,
                spec: (*spec).to_owned(),
            })),
        }
    }
    for (spec, n) in pending {
        for _ in 0..n {
            ops.push(FwOp::DelRule(ChainRule {
                chain,
                spec: spec.to_owned(),
            }));
        }
    }
}

/// The `iptables-restore --noflush` input that carries out `ops`, one `COMMIT` per table.
/// Empty when there is nothing to do.
pub fn render_restore(ops: &[FwOp]) -> String {
    let mut out = String::new();
    for table in [Table::Nat, Table::Mangle, Table::Filter] {
        let mut decls = Vec::new();
        let mut body = Vec::new();
        let mut tail = Vec::new();
        for op in ops {
            match op {
                FwOp::NewChain(c) if c.table == table => decls.push(format!(":{} - [0:0]", c.name)),
                FwOp::AddJump(c) if c.table == table => body.push(format!("-I {} 1 {}", c.hook, c.jump())),
                FwOp::AddRule(r) if r.chain.table == table => {
                    body.push(format!("-A {} {}", r.chain.name, r.spec))
                }
                FwOp::DelRule(r) if r.chain.table == table => {
                    body.push(format!("-D {} {}", r.chain.name, r.spec))
                }
                FwOp::DelJump(c) if c.table == table => body.push(format!("-D {} {}", c.hook, c.jump())),
                // A chain must be empty and unreferenced to go: flush it by declaring it,
                // and delete it after the jumps are gone.
                FwOp::DelChain(c) if c.table == table => {
                    decls.push(format!(":{} - [0:0]", c.name));
                    tail.push(format!("-X {}", c.name));
                }
                _ => {}
            }
        }
        if decls.is_empty() && body.is_empty() && tail.is_empty() {
            continue;
        }
        out.push_str(&format!("*{}\n", table.name()));
        for line in decls.iter().chain(&body).chain(&tail) {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::render::tests::{name, vip};
    use super::*;

    fn mark_rule(name: &ServiceName, vip: Vip, mark: FwMark) -> Intent {
        Intent::MarkVip {
            service: name.clone(),
            vip,
            mark,
        }
    }

    fn ping_rule(name: &ServiceName, vip: Vip, mark: FwMark) -> Intent {
        Intent::PingVip {
            service: name.clone(),
            vip,
            mark,
        }
    }

    const SAVED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j VIPD-OUTPUT
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:VIPD-OUTPUT - [0:0]
:FOREIGN - [0:0]
-A OUTPUT -j VIPD-OUTPUT
-A OUTPUT -d 10.9.9.9/32 -j MARK --set-xmark 0x5/0xffffffff
-A VIPD-OUTPUT -d 10.0.0.100/32 -m comment --comment \"vipd:web:256\" -j MARK --set-xmark 0x100/0xffffffff
-A FOREIGN -j RETURN
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
";

    #[test]
    fn save_output_is_read_for_owned_chains_only() {
        let seen = parse_save(SAVED);
        assert_eq!(seen.chains.len(), 1);
        assert_eq!(seen.chains[&MANGLE_OUTPUT].len(), 1);
        assert_eq!(seen.jumps.get(&MANGLE_OUTPUT), Some(&1));
        assert_eq!(seen.jumps.get(&NAT_OUTPUT), None);
        assert_eq!(
            seen.marked_services(),
            [MarkedService {
                name: name("web"),
                vip: vip("10.0.0.100"),
                fwmark: FwMark::new(256).unwrap()
            }]
        );
    }

    #[test]
    fn quoted_comments_read_back_unquoted() {
        assert_eq!(
            unquote_comment(
                "-d 1.2.3.4/32 -m comment --comment \"vipd:web\" -j MARK --set-xmark 0x1/0xffffffff"
            ),
            "-d 1.2.3.4/32 -m comment --comment vipd:web -j MARK --set-xmark 0x1/0xffffffff"
        );
        let spaced = "-m comment --comment \"two words\" -j RETURN";
        assert_eq!(unquote_comment(spaced), spaced);
        assert_eq!(unquote_comment("-j RETURN"), "-j RETURN");
    }

    #[test]
    fn ownership_is_read_from_vipds_chains_by_what_the_rules_do() {
        let mut seen = parse_save(SAVED);
        // A foreign MARK rule in a built-in chain is not vipd's, whatever its comment.
        seen.chains.entry(NAT_OUTPUT).or_default().push(
            render(&ping_rule(
                &name("web"),
                vip("10.0.0.100"),
                FwMark::new(256).unwrap(),
            ))
            .spec,
        );
        assert_eq!(seen.marks(), [FwMark::new(256).unwrap()].into());
        assert_eq!(seen.pinged(), ["10.0.0.100".parse::<IpAddr>().unwrap()].into());
        // A comment that claims a mark the rule does not set claims nothing: the mark
        // comes from the target, the name alone from the comment.
        let lying = "-d 10.0.0.101/32 -m comment --comment vipd:api:999 -j MARK --set-xmark 0x101/0xffffffff";
        seen.chains.get_mut(&MANGLE_OUTPUT).unwrap().push(lying.into());
        // A rule without vipd's comment still sets a mark vipd owns, but names nothing.
        let bare = "-d 10.0.0.102/32 -j MARK --set-xmark 0x102/0xffffffff";
        seen.chains.get_mut(&MANGLE_OUTPUT).unwrap().push(bare.into());
        let marks: Vec<u32> = seen.marks().iter().map(|m| m.get()).collect();
        assert_eq!(marks, [0x100, 0x101, 0x102]);
        let named: Vec<(String, u32)> = seen
            .marked_services()
            .iter()
            .map(|m| (m.name.to_string(), m.fwmark.get()))
            .collect();
        assert_eq!(named, [("web".into(), 0x100), ("api".into(), 0x101)]);
        assert!(ObservedFirewall::default().marks().is_empty());
    }

    #[test]
    fn a_fresh_namespace_gets_chains_jumps_and_rules_in_one_script() {
        let n = name("web");
        let want = vec![
            mark_rule(&n, vip("10.0.0.100"), FwMark::new(256).unwrap()),
            ping_rule(&n, vip("10.0.0.100"), FwMark::new(256).unwrap()),
        ];
        let ops = plan(&want, &ObservedFirewall::default());
        assert_eq!(ops.len(), 6, "{ops:#?}");
        let script = render_restore(&ops);
        assert_eq!(
            script,
            "*nat\n:VIPD-OUTPUT - [0:0]\n-A VIPD-OUTPUT -d 10.0.0.100/32 -p icmp -m icmp --icmp-type 8 -m comment --comment vipd:web:256 -j DNAT --to-destination 127.0.0.1\n-I OUTPUT 1 -j VIPD-OUTPUT\nCOMMIT\n\
             *mangle\n:VIPD-OUTPUT - [0:0]\n-A VIPD-OUTPUT -d 10.0.0.100/32 -m comment --comment vipd:web:256 -j MARK --set-xmark 0x100/0xffffffff\n-I OUTPUT 1 -j VIPD-OUTPUT\nCOMMIT\n"
        );
    }

    #[test]
    fn what_is_there_already_is_not_written_again() {
        let seen = parse_save(SAVED);
        let want = vec![mark_rule(
            &name("web"),
            vip("10.0.0.100"),
            FwMark::new(256).unwrap(),
        )];
        assert_eq!(plan(&want, &seen), []);
        assert_eq!(render_restore(&[]), "");
    }

    #[test]
    fn removed_services_and_duplicates_go_and_empty_chains_are_deleted() {
        let mut seen = parse_save(SAVED);
        let dup = seen.chains[&MANGLE_OUTPUT][0].clone();
        seen.chains.get_mut(&MANGLE_OUTPUT).unwrap().push(dup.clone());
        *seen.jumps.get_mut(&MANGLE_OUTPUT).unwrap() = 2;
        let want = vec![mark_rule(
            &name("web"),
            vip("10.0.0.100"),
            FwMark::new(256).unwrap(),
        )];
        assert_eq!(
            plan(&want, &seen),
            [
                FwOp::DelRule(ChainRule {
                    chain: MANGLE_OUTPUT,
                    spec: dup
                }),
                FwOp::DelJump(MANGLE_OUTPUT)
            ]
        );
        let ops = plan(&[], &seen);
        assert_eq!(
            ops,
            [
                FwOp::DelJump(MANGLE_OUTPUT),
                FwOp::DelJump(MANGLE_OUTPUT),
                FwOp::DelChain(MANGLE_OUTPUT)
            ]
        );
        assert_eq!(
            render_restore(&ops),
            "*mangle\n:VIPD-OUTPUT - [0:0]\n-D OUTPUT -j VIPD-OUTPUT\n-D OUTPUT -j VIPD-OUTPUT\n-X VIPD-OUTPUT\nCOMMIT\n"
        );
    }

    const DOCKER_HOST: &str = "\
*nat
:POSTROUTING ACCEPT [0:0]
:VIPD-OVERLAY-NAT - [0:0]
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A POSTROUTING -j VIPD-OVERLAY-NAT
-A VIPD-OVERLAY-NAT -s 10.230.1.0/24 ! -o vipd0 -m comment --comment \"vipd:overlay\" -j MASQUERADE
-A VIPD-OVERLAY-NAT -s 10.230.0.0/16 -d 10.230.0.0/16 -m comment --comment \"vipd:overlay\" -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
:VIPD-OVERLAY - [0:0]
-A INPUT -j VIPD-VXLAN-IN
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -s 192.0.2.9/32 -j DROP
-A DOCKER-USER -j VIPD-OVERLAY
-A VIPD-OVERLAY -i vipd-vx -o vipd0 -m comment --comment \"vipd:overlay\" -j ACCEPT
COMMIT
";

    #[test]
    fn a_jump_pushed_down_by_another_rule_is_displaced_and_put_first_again() {
        let seen = parse_save(DOCKER_HOST);
        assert_eq!(seen.displaced, [HOST_OVERLAY_NAT].into());
        // DOCKER-USER's position is the operator's business: present is enough.
        assert_eq!(seen.jumps[&HOST_OVERLAY_FORWARD], 1);
        assert_eq!(
            seen.docker_user,
            DockerUser {
                exists: true,
                jumped: true
            }
        );
        // A jump to a chain that is gone is not missing; a chain nothing jumps to is.
        assert_eq!(seen.needs_reassert(), [Reassert::Displaced(HOST_OVERLAY_NAT)]);
        let nat = [
            Intent::KeepClusterSource {
                range: "10.230.0.0/16".parse().unwrap(),
            },
            Intent::MasqueradeNodeSubnet {
                subnet: "10.230.1.0/24".parse().unwrap(),
                bridge: "vipd0".into(),
            },
        ];
        let ops = plan_chains(&[HOST_OVERLAY_NAT], &nat, &seen);
        // Out of order: rewritten whole, RETURN first; the jump moved back to the top.
        assert_eq!(
            render_restore(&ops),
            "*nat\n\
             -D VIPD-OVERLAY-NAT -s 10.230.1.0/24 ! -o vipd0 -m comment --comment vipd:overlay -j MASQUERADE\n\
             -D VIPD-OVERLAY-NAT -s 10.230.0.0/16 -d 10.230.0.0/16 -m comment --comment vipd:overlay -j RETURN\n\
             -A VIPD-OVERLAY-NAT -s 10.230.0.0/16 -d 10.230.0.0/16 -m comment --comment vipd:overlay -j RETURN\n\
             -A VIPD-OVERLAY-NAT -s 10.230.1.0/24 ! -o vipd0 -m comment --comment vipd:overlay -j MASQUERADE\n\
             -D POSTROUTING -j VIPD-OVERLAY-NAT\n\
             -I POSTROUTING 1 -j VIPD-OVERLAY-NAT\n\
             COMMIT\n"
        );
    }

    #[test]
    fn a_missing_jump_or_docker_user_chain_needs_reasserting() {
        let seen = parse_save("*filter\n:INPUT ACCEPT [0:0]\n:VIPD-OVERLAY - [0:0]\n:VIPD-VXLAN-IN - [0:0]\n-A INPUT -j VIPD-VXLAN-IN\nCOMMIT\n");
        assert!(seen.displaced.is_empty());
        assert_eq!(
            seen.needs_reassert(),
            [
                Reassert::MissingJump(HOST_OVERLAY_FORWARD),
                Reassert::MissingJump(DOCKER_USER)
            ]
        );
        assert_eq!(
            Reassert::MissingJump(DOCKER_USER).to_string(),
            "filter FORWARD: the jump to DOCKER-USER is missing"
        );
        // vipd's own jumps ahead of it do not displace a jump.
        let two = parse_save("*nat\n:VIPD-INGRESS-POST - [0:0]\n:VIPD-OVERLAY-NAT - [0:0]\n-A POSTROUTING -j VIPD-INGRESS-POST\n-A POSTROUTING -j VIPD-OVERLAY-NAT\nCOMMIT\n");
        assert!(two.needs_reassert().is_empty(), "{:?}", two.needs_reassert());
        assert!(ObservedFirewall::default().needs_reassert().is_empty());
    }

    #[test]
    fn ops_print_as_iptables_commands() {
        let r = render(&mark_rule(
            &name("web"),
            vip("10.0.0.100"),
            FwMark::new(256).unwrap(),
        ));
        assert_eq!(
            FwOp::AddRule(r).to_string(),
            "iptables -t mangle -A VIPD-OUTPUT -d 10.0.0.100/32 -m comment --comment vipd:web:256 -j MARK --set-xmark 0x100/0xffffffff"
        );
        assert_eq!(
            FwOp::AddJump(NAT_POSTROUTING).to_string(),
            "iptables -t nat -I POSTROUTING 1 -j VIPD-POSTROUTING"
        );
    }
}
