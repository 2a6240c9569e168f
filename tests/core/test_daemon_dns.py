"""The daemon serves cluster DNS next to the proxy (--dns-listen) from the same store, in its namespace."""

from pathlib import Path

import pytest
import yaml

from kproxy.testing.topology import Topology

from .objs import ep, eps, svc

pytestmark = pytest.mark.netns


def test_daemon_serves_dns_for_the_services_it_proxies(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(yaml.safe_dump_all([
        svc("web", ips=("10.96.0.10", "fd00:10:96::10"), ports=[{"name": "http", "port": 80}]),
        eps("web", [ep("10.244.1.10")])]))
    with Topology(pods=1) as topo:
        p = topo.start_daemon(str(tmp_path), "iptables", "--dns-listen", "127.0.0.1:5353")
        topo.wait_healthy(30)

        def dig(name: str, qtype: str) -> str:
            return topo.exec(topo.node, ["dig", "+short", "+time=2", "+tries=3", "@127.0.0.1", "-p", "5353",
                                         name, qtype]).stdout.strip()

        assert dig("web.default.svc.cluster.local", "A") == "10.96.0.10"
        assert dig("web.default.svc.cluster.local", "AAAA") == "fd00:10:96::10"
        assert dig("_http._tcp.web.default.svc.cluster.local", "SRV") == "0 100 80 web.default.svc.cluster.local."
        # and the name resolves to a VIP that the same daemon proxies
        res = topo.probe(topo.client, "http", dig("web.default.svc.cluster.local", "A"), 80, "-n", "3")
        assert res["counts"] == {"pod0": 3}
        topo.stop_daemon(p)
