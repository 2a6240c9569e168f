"""Every record kind of the Kubernetes DNS spec (schema 1.1.0), asked of a running ``kproxy dns``."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from kdns_testlib import Server


def rdatas(msg: dns.message.Message, rdtype: str, section: str = "answer") -> set[str]:
    out = set()
    for rrset in getattr(msg, section):
        if rrset.rdtype == dns.rdatatype.from_text(rdtype):
            out.update(r.to_text() for r in rrset)
    return out


def test_schema_version_soa_ns(server: Server) -> None:
    r = server.query("dns-version.cluster.local", "TXT")
    assert rdatas(r, "TXT") == {'"1.1.0"'}
    assert r.flags & dns.flags.AA
    soa = server.query("cluster.local", "SOA")
    (text,) = rdatas(soa, "SOA")
    assert text.startswith("ns.dns.cluster.local. hostmaster.cluster.local. ")
    ns = server.query("cluster.local", "NS")
    assert rdatas(ns, "NS") == {"ns.dns.cluster.local."}
    assert rdatas(ns, "A", "additional") == {"10.96.0.10"}  # glue
    # the NS target resolves to the kube-dns Service's ClusterIP, as with CoreDNS
    assert rdatas(server.query("ns.dns.cluster.local", "A"), "A") == {"10.96.0.10"}


def test_clusterip_dual_stack(server: Server) -> None:
    assert rdatas(server.query("web.default.svc.cluster.local", "A"), "A") == {"10.96.0.20"}
    assert rdatas(server.query("web.default.svc.cluster.local", "AAAA"), "AAAA") == {"fd00:10:96::20"}
    # single-stack IPv6 Service: AAAA, and A is NODATA
    assert rdatas(server.query("v6only.apps.svc.cluster.local", "AAAA"), "AAAA") == {"fd00:10:96::99"}
    r = server.query("v6only.apps.svc.cluster.local", "A")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer


def test_clusterip_srv_named_ports(server: Server) -> None:
    r = server.query("_https._tcp.web.default.svc.cluster.local", "SRV")
    assert rdatas(r, "SRV") == {"0 100 443 web.default.svc.cluster.local."}
    # the additional section carries the target's addresses
    assert rdatas(r, "A", "additional") == {"10.96.0.20"}
    assert rdatas(r, "AAAA", "additional") == {"fd00:10:96::20"}
    assert rdatas(server.query("_syslog._udp.web.default.svc.cluster.local", "SRV"), "SRV") == {
        "0 100 514 web.default.svc.cluster.local."}
    # a port name with the wrong protocol does not exist
    assert server.query("_syslog._tcp.web.default.svc.cluster.local", "SRV").rcode() == dns.rcode.NXDOMAIN
    # unnamed ports have no SRV record
    assert server.query("_tcp.v6only.apps.svc.cluster.local", "SRV").rcode() == dns.rcode.NXDOMAIN


def test_clusterip_ptr_v4_and_v6(server: Server) -> None:
    for ip in ("10.96.0.20", "fd00:10:96::20"):
        r = server.query(dns.reversename.from_address(ip).to_text(), "PTR")
        assert rdatas(r, "PTR") == {"web.default.svc.cluster.local."}, ip


def test_statefulset_headless(server: Server) -> None:
    # only ready endpoints (db-2 is not ready)
    assert rdatas(server.query("db.data.svc.cluster.local", "A"), "A") == {"10.244.1.10", "10.244.2.11"}
    assert rdatas(server.query("db.data.svc.cluster.local", "AAAA"), "AAAA") == {"fd00:244:1::10"}
    assert rdatas(server.query("db-0.db.data.svc.cluster.local", "A"), "A") == {"10.244.1.10"}
    assert rdatas(server.query("db-0.db.data.svc.cluster.local", "AAAA"), "AAAA") == {"fd00:244:1::10"}
    assert rdatas(server.query("db-1.db.data.svc.cluster.local", "A"), "A") == {"10.244.2.11"}
    assert server.query("db-2.db.data.svc.cluster.local", "A").rcode() == dns.rcode.NXDOMAIN
    srv = server.query("_pg._tcp.db.data.svc.cluster.local", "SRV")
    assert rdatas(srv, "SRV") == {"0 50 5432 db-0.db.data.svc.cluster.local.",
                                  "0 50 5432 db-1.db.data.svc.cluster.local."}
    assert rdatas(srv, "A", "additional") == {"10.244.1.10", "10.244.2.11"}
    ptr = server.query(dns.reversename.from_address("10.244.1.10").to_text(), "PTR")
    assert rdatas(ptr, "PTR") == {"db-0.db.data.svc.cluster.local."}
    ptr6 = server.query(dns.reversename.from_address("fd00:244:1::10").to_text(), "PTR")
    assert rdatas(ptr6, "PTR") == {"db-0.db.data.svc.cluster.local."}


def test_headless_without_hostnames_gets_system_assigned_ones(server: Server) -> None:
    srv = server.query("_http._tcp.anon.data.svc.cluster.local", "SRV")
    # headless SRV uses the EndpointSlice port (what the pods listen on)
    assert rdatas(srv, "SRV") == {"0 100 8080 10-244-5-5.anon.data.svc.cluster.local."}
    assert rdatas(server.query("10-244-5-5.anon.data.svc.cluster.local", "A"), "A") == {"10.244.5.5"}


def test_headless_publish_not_ready_and_no_ready_endpoints(server: Server) -> None:
    assert rdatas(server.query("peers.data.svc.cluster.local", "A"), "A") == {"10.244.6.1"}
    assert rdatas(server.query("peer-0.peers.data.svc.cluster.local", "A"), "A") == {"10.244.6.1"}
    r = server.query("nobody.data.svc.cluster.local", "A")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert rdatas(r, "SOA", "authority")


def test_externalname(server: Server) -> None:
    r = server.query("ext.default.svc.cluster.local", "A")
    assert r.rcode() == dns.rcode.NOERROR
    assert rdatas(r, "CNAME") == {"www.example.com."}
    assert rdatas(server.query("ext.default.svc.cluster.local", "CNAME"), "CNAME") == {"www.example.com."}
    # an in-zone target is followed
    r = server.query("alias.default.svc.cluster.local", "A")
    assert rdatas(r, "CNAME") == {"web.default.svc.cluster.local."}
    assert rdatas(r, "A") == {"10.96.0.20"}


def test_nodeport_extension(server: Server) -> None:
    r = server.query("_http._tcp.np.default.nodeport.cluster.local", "SRV")
    assert rdatas(r, "SRV") == {"0 50 30080 node-a.node.cluster.local.", "0 50 30080 node-b.node.cluster.local."}
    assert rdatas(r, "A", "additional") == {"192.168.50.1", "192.168.50.2"}
    assert rdatas(server.query("node-a.node.cluster.local", "A"), "A") == {"192.168.50.1"}
    assert rdatas(server.query("node-a.node.cluster.local", "AAAA"), "AAAA") == {"fd00:50::1"}
    lb = server.query("_web._tcp.lb.default.nodeport.cluster.local", "SRV")
    assert {t.split()[2] for t in rdatas(lb, "SRV")} == {"30081"}
    # and NodePort/LoadBalancer Services keep their ClusterIP records
    assert rdatas(server.query("lb.default.svc.cluster.local", "A"), "A") == {"10.96.0.31"}
    assert rdatas(server.query("_http._tcp.np.default.svc.cluster.local", "SRV"), "SRV") == {
        "0 100 80 np.default.svc.cluster.local."}


def test_deprecated_pod_records(server: Server) -> None:
    assert rdatas(server.query("10-1-2-3.default.pod.cluster.local", "A"), "A") == {"10.1.2.3"}
    assert rdatas(server.query("fd00--7.default.pod.cluster.local", "AAAA"), "AAAA") == {"fd00::7"}
    assert server.query("not-an-ip.default.pod.cluster.local", "A").rcode() == dns.rcode.NXDOMAIN
    assert server.query("10-1-2-3.default.pod.cluster.local", "AAAA").rcode() == dns.rcode.NOERROR  # NODATA
    # the parents of synthesized names exist (QNAME minimisation must not stop there)
    for parent in ("pod.cluster.local", "default.pod.cluster.local"):
        r = server.query(parent, "A")
        assert r.rcode() == dns.rcode.NOERROR and not r.answer, parent
    assert server.query("x.10-1-2-3.default.pod.cluster.local", "A").rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("name", ["WEB.Default.SVC.Cluster.Local", "wEb.DeFaUlT.sVc.ClUsTeR.lOcAl"])
def test_case_insensitive_and_case_preserving(server: Server, name: str) -> None:
    r = server.query(name, "A")
    assert rdatas(r, "A") == {"10.96.0.20"}
    assert r.question[0].name.to_text() == name + "."  # 0x20: the question comes back as sent
    assert r.answer[0].name.to_text() == name + "."


def test_nxdomain_vs_nodata(server: Server) -> None:
    nodata = server.query("web.default.svc.cluster.local", "TXT")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    (soa,) = nodata.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == "cluster.local."
    nx = server.query("missing.default.svc.cluster.local", "A")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0].rdtype == dns.rdatatype.SOA
    # empty non-terminals exist: NODATA, not NXDOMAIN
    for ent in ("default.svc.cluster.local", "svc.cluster.local", "_tcp.web.default.svc.cluster.local"):
        r = server.query(ent, "A")
        assert r.rcode() == dns.rcode.NOERROR and not r.answer, ent
    assert server.query("nosuchns.svc.cluster.local", "A").rcode() == dns.rcode.NXDOMAIN


def test_ttl(server: Server) -> None:
    r = server.query("web.default.svc.cluster.local", "A")
    assert r.answer[0].ttl == 5


def test_out_of_zone_refused_without_upstream(server: Server) -> None:
    assert server.query("example.com", "A").rcode() == dns.rcode.REFUSED
    assert server.query(dns.reversename.from_address("192.0.2.1").to_text(), "PTR").rcode() == dns.rcode.REFUSED


def test_any_query(server: Server) -> None:
    r = server.query("web.default.svc.cluster.local", "ANY")
    assert rdatas(r, "A") == {"10.96.0.20"} and rdatas(r, "AAAA") == {"fd00:10:96::20"}


def test_tcp_fallback_for_large_headless_answer(server: Server) -> None:
    udp = server.query("big.data.svc.cluster.local", "A")
    assert udp.flags & dns.flags.TC and not udp.answer
    no_edns = server.query("big.data.svc.cluster.local", "A", edns=-1)
    assert no_edns.flags & dns.flags.TC
    tcp = server.query("big.data.svc.cluster.local", "A", tcp=True)
    assert not tcp.flags & dns.flags.TC
    assert len(rdatas(tcp, "A")) == 120
    # a large EDNS buffer is capped at 1232 (DNS flag day 2020), still truncated
    assert server.query("big.data.svc.cluster.local", "A", payload=65000).flags & dns.flags.TC


def test_srv_drops_additional_before_truncating(server: Server) -> None:
    # 120 SRV records do not fit; the answer section alone does not either: TC. With TCP everything.
    tcp = server.query("_http._tcp.big.data.svc.cluster.local", "SRV", tcp=True)
    assert len(rdatas(tcp, "SRV")) == 120 and len(rdatas(tcp, "A", "additional")) == 120
    # the 2-record SRV answer with additional fits in 512 bytes without EDNS
    r = server.query("_pg._tcp.db.data.svc.cluster.local", "SRV", edns=-1)
    assert not r.flags & dns.flags.TC and len(rdatas(r, "SRV")) == 2


def test_dig_end_to_end(server: Server) -> None:
    out = server.dig("db.data.svc.cluster.local", "A", "+short")
    assert set(out.split()) == {"10.244.1.10", "10.244.2.11"}
    out = server.dig("_pg._tcp.db.data.svc.cluster.local", "SRV", "+short")
    assert set(out.strip().splitlines()) == {"0 50 5432 db-0.db.data.svc.cluster.local.",
                                            "0 50 5432 db-1.db.data.svc.cluster.local."}
    assert server.dig("-x", "10.96.0.20", "+short").strip() == "web.default.svc.cluster.local."
    assert server.dig("-x", "fd00:10:96::20", "+short").strip() == "web.default.svc.cluster.local."
    # dig retries over TCP by itself when it sees TC
    out = server.dig("big.data.svc.cluster.local", "A")
    assert "Truncated, retrying in TCP mode" in out and "ANSWER: 120" in out
    assert "status: NXDOMAIN" in server.dig("missing.default.svc.cluster.local")
    out = server.dig("web.default.svc.cluster.local", "MX")
    assert "status: NOERROR" in out and "ANSWER: 0" in out
