"""Malformed Services / EndpointSlices next to good ones: the good ones work, the bad ones are named in the log."""

from __future__ import annotations

import copy

import pytest

from kproxy.testing.topology import HTTP_PORT, UDP_PORT

from . import manifests as m
from .harness import Scenario

pytestmark = [pytest.mark.netns]


def svc(name: str, vip: str, **kw: object) -> dict:
    return m.service(name, vip, [m.port(80, HTTP_PORT, name="p")], **kw)  # type: ignore[arg-type]


@pytest.mark.feature("bad_input")
def test_malformed_objects_are_skipped_and_logged(sc: Scenario) -> None:
    good_vip, fixed_vip = sc.vip(), sc.vip()
    bad: dict[str, dict] = {}

    s = svc("bad-ip", "10.96.300.1")
    bad["bad-ip"] = s
    s = svc("no-ports", sc.vip())
    s["spec"]["ports"] = []
    bad["no-ports"] = s
    s = m.service("dup-ports", sc.vip(), [m.port(80, HTTP_PORT, name="p"), m.port(81, HTTP_PORT, name="p")])
    bad["dup-ports"] = s
    s = m.service("bad-proto", sc.vip(), [m.port(80, HTTP_PORT, name="p", protocol="ICMP")])
    bad["bad-proto"] = s
    s = svc("bad-port", sc.vip())
    s["spec"]["ports"][0]["port"] = "eighty"
    bad["bad-port"] = s
    s = svc("bad-ext-ip", sc.vip(), external_ips=["198.51.100.999"])
    bad["bad-ext-ip"] = s
    s = svc("bad-affinity", sc.vip(), affinity_timeout=999999)
    bad["bad-affinity"] = s

    sl_bad_addr = m.endpoint_slice("good", [m.endpoint("not-an-ip")], [m.slice_port(HTTP_PORT, name="p")],
                                   name="good-badaddr", address_type="IPv4")
    sl_dup = m.endpoint_slice("good", [m.endpoint(sc.ip("pod2"))],
                              [m.slice_port(HTTP_PORT, name="p"), m.slice_port(UDP_PORT, name="p", protocol="UDP")],
                              name="good-dupports")
    sl_noport = m.endpoint_slice("good", [m.endpoint(sc.ip("pod2"))], [m.slice_port(HTTP_PORT, name="p")],
                                 name="good-noport")
    del sl_noport["ports"][0]["port"]
    sl_nolabel = m.endpoint_slice("good", [m.endpoint(sc.ip("pod2"))], [m.slice_port(HTTP_PORT, name="p")],
                                  name="good-nolabel")
    sl_nolabel["metadata"]["labels"] = {}
    bad_slices = {"good-badaddr": sl_bad_addr, "good-dupports": sl_dup, "good-noport": sl_noport,
                  "good-nolabel": sl_nolabel}

    good = svc("good", good_vip)
    good_slice = m.endpoint_slice("good", [m.endpoint(sc.ip("pod0")), m.endpoint(sc.ip("pod1"))],
                                  [m.slice_port(HTTP_PORT, name="p")])
    # good and bad objects mixed in one file, more bad ones in another, plus a file that is not valid YAML
    sc.apply("mixed", good, bad["bad-ip"], good_slice, sl_bad_addr, bad["dup-ports"], sl_dup, wait=False)
    sc.apply("more-bad", *(v for k, v in bad.items() if k not in ("bad-ip", "dup-ports")), sl_noport, sl_nolabel,
             wait=False)
    m.write_raw(sc.dir, "broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: broken\n  spec: [\n")
    sc.on_cleanup(lambda: m.remove(sc.dir, "broken.yaml"))
    sc.barrier()

    p = sc.http(sc.topo.client, good_vip, 80, n=60)
    assert p.ok == 60 and p.backends == {"pod0", "pod1"}, \
        f"the good Service must work with only its good slice's endpoints: {p}"

    log = sc.log()
    missing = [name for name in (*bad, *bad_slices) if name not in log]
    assert not missing, f"the daemon log does not name the skipped objects {missing}:\n{log[-4000:]}"
    reasons = {"bad-ip": "10.96.300.1", "bad-proto": "ICMP", "dup-ports": "duplicate", "good-badaddr": "not-an-ip",
               "good-dupports": "duplicate", "bad-port": "eighty"}
    lines = log.splitlines()
    for name, reason in reasons.items():
        assert any(name in ln and reason in ln for ln in lines), f"no log line names {name} with its reason " \
                                                                  f"({reason!r}):\n{log[-4000:]}"
    assert "broken.yaml" in log, f"the unparsable file is not reported:\n{log[-3000:]}"

    # a skipped object that is fixed later is programmed
    fixed = copy.deepcopy(bad["bad-ip"])
    fixed["spec"]["clusterIP"] = fixed_vip
    fixed["spec"]["clusterIPs"] = [fixed_vip]
    sc.apply("fixed", fixed, m.endpoint_slice("bad-ip", [m.endpoint(sc.ip("pod2"))],
                                              [m.slice_port(HTTP_PORT, name="p")]))
    sc.delete("mixed")  # drops the bad copy of bad-ip too (the fixed one lives in "fixed")
    p = sc.http(sc.topo.client, fixed_vip, 80, n=5)
    assert p.counts == {"pod2": 5}, str(p)
