"""The IPVS mode's fixed iptables rules: a constant number of rules, whatever the number of Services.

Per-Service state lives in ipsets (see :mod:`.desired`); these rules only match on the sets. Chains are
``KPROXY-IPVS-*`` (never shared with the iptables mode's ``KPROXY-*`` chains, so switching modes and
cleaning up one mode cannot break the other). The masquerade mark is the same bit as in the iptables mode
(``1 << masqueradeBit``, 0x4000 by default).

nat table
  KPROXY-IPVS-SERVICES      (PREROUTING, OUTPUT) mark for masquerade: cluster IPs from outside the cluster
                            CIDRs (or everything with masqueradeAll), externalIPs, LoadBalancer IPs and
                            NodePorts without a Local policy; then ACCEPT (nothing else to do for VIPs)
  KPROXY-IPVS-CLUSTER-IP    the cluster-CIDR exemption for cluster IPs
  KPROXY-IPVS-LOAD-BALANCER the Local-policy exemption for LoadBalancer IPs
  KPROXY-IPVS-NODE-PORT     NodePorts: Local policy → no SNAT, otherwise mark
  KPROXY-IPVS-MARK-MASQ     sets the mark
  KPROXY-IPVS-POSTROUTING   (POSTROUTING) hairpin masquerade (KUBE-LOOP-BACK) and marked traffic
filter table
  KPROXY-IPVS-FILTER        (INPUT) reject new connections to a VIP on a port no Service serves
  KPROXY-IPVS-PROXY-FIREWALL (INPUT, FORWARD) loadBalancerSourceRanges
  KPROXY-IPVS-SOURCE-RANGES  the allowed (LB IP, port, source CIDR) triples, DROP otherwise
  KPROXY-IPVS-FORWARD       (FORWARD) accept marked and established service traffic
"""

from __future__ import annotations

from ...model import family_of
from .. import SyncError
from ..iptables.backend import Backend
from . import desired as d

PREFIX = "KPROXY-IPVS-"
SERVICES = "KPROXY-IPVS-SERVICES"
CLUSTER_IP = "KPROXY-IPVS-CLUSTER-IP"
LOAD_BALANCER = "KPROXY-IPVS-LOAD-BALANCER"
NODE_PORT = "KPROXY-IPVS-NODE-PORT"
MARK_MASQ = "KPROXY-IPVS-MARK-MASQ"
POSTROUTING = "KPROXY-IPVS-POSTROUTING"
FILTER = "KPROXY-IPVS-FILTER"
PROXY_FIREWALL = "KPROXY-IPVS-PROXY-FIREWALL"
SOURCE_RANGES = "KPROXY-IPVS-SOURCE-RANGES"
FORWARD = "KPROXY-IPVS-FORWARD"

NAT_CHAINS = (SERVICES, CLUSTER_IP, LOAD_BALANCER, NODE_PORT, MARK_MASQ, POSTROUTING)
FILTER_CHAINS = (FILTER, PROXY_FIREWALL, SOURCE_RANGES, FORWARD)

HOOKS = (
    ("nat", "PREROUTING", ["-m", "comment", "--comment", "kproxy ipvs service portals", "-j", SERVICES]),
    ("nat", "OUTPUT", ["-m", "comment", "--comment", "kproxy ipvs service portals", "-j", SERVICES]),
    ("nat", "POSTROUTING", ["-m", "comment", "--comment", "kproxy ipvs postrouting rules", "-j", POSTROUTING]),
    ("filter", "INPUT", ["-m", "comment", "--comment", "kproxy ipvs load balancer firewall", "-j", PROXY_FIREWALL]),
    ("filter", "INPUT", ["-m", "comment", "--comment", "kproxy ipvs unmatched VIP traffic", "-j", FILTER]),
    ("filter", "FORWARD", ["-m", "comment", "--comment", "kproxy ipvs load balancer firewall", "-j",
                           PROXY_FIREWALL]),
    ("filter", "FORWARD", ["-m", "comment", "--comment", "kproxy ipvs forwarding rules", "-j", FORWARD]),
)


def _set(base: str, family: int) -> str:
    return d.set_name(base, family)


def render(family: int, mark: str, cluster_cidrs: tuple[str, ...], masquerade_all: bool) -> str:
    """The complete ``iptables-restore --noflush`` input for our chains of one family."""
    s = lambda base: _set(base, family)  # noqa: E731
    cidrs = [c for c in cluster_cidrs if c != "primary" and family_of(c.split("/")[0]) == family]
    nat = [
        f"-A {MARK_MASQ} -j MARK --or-mark {mark}",
        f"-A {POSTROUTING} -m comment --comment \"kproxy ipvs hairpin\" -m set --match-set {s(d.LOOP_BACK)} "
        f"dst,dst,src -j MASQUERADE",
        f"-A {POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
        f"-A {POSTROUTING} -j MARK --xor-mark {mark}",
        f"-A {POSTROUTING} -m comment --comment \"kproxy service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        f"-A {SERVICES} -m set --match-set {s(d.LOAD_BALANCER)} dst,dst -j {LOAD_BALANCER}",
        f"-A {SERVICES} -m set --match-set {s(d.CLUSTER_IP)} dst,dst -j {CLUSTER_IP}",
        f"-A {SERVICES} -m set --match-set {s(d.EXTERNAL_IP)} dst,dst -j {MARK_MASQ}",
        f"-A {SERVICES} -m set --match-set {s(d.EXTERNAL_IP_LOCAL)} dst,dst -m addrtype --src-type LOCAL "
        f"-j {MARK_MASQ}",
        f"-A {SERVICES} -m addrtype --dst-type LOCAL -j {NODE_PORT}",
        f"-A {SERVICES} -m set --match-set {s(d.CLUSTER_IP)} dst,dst -j ACCEPT",
        f"-A {SERVICES} -m set --match-set {s(d.LOAD_BALANCER)} dst,dst -j ACCEPT",
        f"-A {LOAD_BALANCER} -m set --match-set {s(d.LOAD_BALANCER_LOCAL)} dst,dst -j RETURN",
        f"-A {LOAD_BALANCER} -j {MARK_MASQ}",
    ]
    if not masquerade_all:
        nat += [f"-A {CLUSTER_IP} -s {c} -j RETURN" for c in cidrs]
    if masquerade_all or cidrs:
        nat.append(f"-A {CLUSTER_IP} -j {MARK_MASQ}")
    for proto in ("tcp", "udp", "sctp"):
        up = proto.upper()
        nat += [
            f"-A {NODE_PORT} -p {proto} -m set --match-set {d.NODE_PORT_LOCAL[up]} dst -m addrtype ! --src-type LOCAL "
            f"-j RETURN",
            f"-A {NODE_PORT} -p {proto} -m set --match-set {d.NODE_PORT[up]} dst -j {MARK_MASQ}",
            f"-A {NODE_PORT} -p {proto} -m set --match-set {d.NODE_PORT_LOCAL[up]} dst -j {MARK_MASQ}",
        ]
    flt = [
        f"-A {FILTER} -m set --match-set {s(d.LOAD_BALANCER)} dst,dst -j RETURN",
        f"-A {FILTER} -m set --match-set {s(d.CLUSTER_IP)} dst,dst -j RETURN",
        f"-A {FILTER} -m set --match-set {s(d.EXTERNAL_IP)} dst,dst -j RETURN",
        f"-A {FILTER} -m set --match-set {s(d.EXTERNAL_IP_LOCAL)} dst,dst -j RETURN",
        f"-A {FILTER} -m set --match-set {d.HEALTH_CHECK_NODE_PORT} dst -j RETURN",
        f"-A {FILTER} -m conntrack --ctstate NEW -m set --match-set {s(d.IPVS_IPS)} dst "
        f"-m comment --comment \"no service on this VIP port\" -j REJECT",
        f"-A {PROXY_FIREWALL} -m set --match-set {s(d.LOAD_BALANCER_FW)} dst,dst -j {SOURCE_RANGES}",
        f"-A {SOURCE_RANGES} -m set --match-set {s(d.LOAD_BALANCER_SOURCE_CIDR)} dst,dst,src -j RETURN",
        f"-A {SOURCE_RANGES} -m comment --comment \"loadBalancerSourceRanges\" -j DROP",
        f"-A {FORWARD} -m conntrack --ctstate INVALID -j DROP",
        f"-A {FORWARD} -m mark --mark {mark}/{mark} -j ACCEPT",
        f"-A {FORWARD} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    out = ["*nat", *(f":{c} - [0:0]" for c in NAT_CHAINS), *nat, "COMMIT",
           "*filter", *(f":{c} - [0:0]" for c in FILTER_CHAINS), *flt, "COMMIT"]
    return "\n".join(out) + "\n"


def rule_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


def apply(b: Backend, text: str) -> None:
    """Write our chains atomically, then make sure the hooks jump to them (idempotent)."""
    b.restore(text)
    for table, chain, spec in HOOKS:
        b.ensure_rule(table, chain, spec)


def remove(b: Backend) -> bool:
    """Delete hooks and chains of one back end; True if anything was there."""
    found = False
    for table, chain, spec in HOOKS:
        if b.run("-t", table, "-L", chain, "-n", check=False).returncode != 0:
            continue
        found |= b.delete_rule(table, chain, spec)
    try:
        saved = b.save()
    except SyncError:
        return found
    present = {line[1:].split()[0] for line in saved.splitlines() if line.startswith(":" + PREFIX)}
    if not present:
        return found
    lines = []
    for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
        mine = [c for c in chains if c in present]
        if mine:
            lines += [f"*{table}", *(f":{c} - [0:0]" for c in mine), *(f"-X {c}" for c in mine), "COMMIT"]
    if lines:
        b.restore("\n".join(lines) + "\n")
    return True
