"""Concurrent and interrupted plugin invocations: distinct IPs, nothing leaked, GC reclaims the rest."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cnihelpers import (
    Netns,
    Plugins,
    bridge_conf,
    have_reference,
    hl_conf,
    ip_files,
    ip_json,
    ipam_only,
    iptables_nat,
    netns_path,
    ping,
)

from cni import runtime

Node = tuple[str, Plugins]


@pytest.mark.netns
def test_64_parallel_bridge_adds_get_distinct_ips_and_del_leaves_nothing(
    node: Node, netns: Netns, data_dir: str
) -> None:
    nname, pl = node
    conf = bridge_conf("par", data_dir, "10.244.50.0/24", ipMasq=True)
    pods = [netns.new(f"p{i}") for i in range(64)]
    with ThreadPoolExecutor(64) as ex:
        results = list(ex.map(lambda ip: pl.call(conf, "ADD", f"c{ip[0]}", netns_path(ip[1]), "eth0"), enumerate(pods)))
    assert all(rc == 0 for rc, _ in results), [out for rc, out in results if rc]
    addrs = [out["ips"][0]["address"] for _, out in results if out]
    assert len(set(addrs)) == 64
    assert sorted(ip_files(data_dir, "par")) == sorted(a.split("/")[0] for a in addrs)
    # the address each pod got is the one configured in it
    for (_, out), p in zip(results, pods, strict=True):
        assert out is not None
        have = ip_json(p, "addr", "show", "dev", "eth0")[0]["addr_info"]
        assert out["ips"][0]["address"] in {f"{a['local']}/{a['prefixlen']}" for a in have}
    assert ping(pods[0], addrs[63].split("/")[0]) and ping(pods[63], addrs[0].split("/")[0])
    assert iptables_nat(nname).count("-j MASQUERADE") == 64

    with ThreadPoolExecutor(64) as ex:
        dels = list(ex.map(lambda ip: pl.call(conf, "DEL", f"c{ip[0]}", netns_path(ip[1]), "eth0"), enumerate(pods)))
    assert all(rc == 0 for rc, _ in dels), dels
    assert ip_files(data_dir, "par") == []
    assert "CNI-" not in iptables_nat(nname)
    assert [n for n in ip_json(nname, "link", "show") if n["ifname"].startswith("veth")] == []


def _hl_add(pl: Plugins, conf: dict, cid: str) -> tuple[int, dict | None]:
    return pl.call(ipam_only(conf), "ADD", cid, "/x", "eth0")


@pytest.mark.skipif(not have_reference(), reason="reference plugins missing")
def test_parallel_mixed_reference_and_kproxy_host_local(plugins: Plugins, data_dir: str) -> None:
    """Both implementations take the same flock: interleaved, they still never hand out an IP twice."""
    ours = hl_conf("mixpar", data_dir, [[{"subnet": "10.244.51.0/24"}]])
    ref = hl_conf("mixpar", data_dir, [[{"subnet": "10.244.51.0/24"}]], ours=False)
    jobs = [(ours if i % 2 else ref, f"c{i}") for i in range(64)]
    with ThreadPoolExecutor(64) as ex:
        results = list(ex.map(lambda j: _hl_add(plugins, *j), jobs))
    assert all(rc == 0 for rc, _ in results), results
    addrs = [out["ips"][0]["address"] for _, out in results if out]
    assert len(set(addrs)) == 64 and len(ip_files(data_dir, "mixpar")) == 64
    with ThreadPoolExecutor(64) as ex:
        list(ex.map(lambda j: plugins.ok(ipam_only(j[0]), "DEL", j[1], "", "eth0"), jobs))
    assert ip_files(data_dir, "mixpar") == []


def test_exhausted_under_contention(plugins: Plugins, data_dir: str) -> None:
    """More parallel requests than addresses: exactly the available ones succeed, the rest get the error."""
    conf = hl_conf("scarce", data_dir, [[{"subnet": "10.244.52.0/28"}]])  # .2 .. .14 = 13 addresses
    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(lambda i: _hl_add(plugins, conf, f"c{i}"), range(20)))
    ok = [out for rc, out in results if rc == 0]
    failed = [out for rc, out in results if rc != 0]
    assert len(ok) == 13 and len(failed) == 7
    assert all(f is not None and f["code"] == 999 and "no IP addresses available" in f["msg"] for f in failed)
    assert len({o["ips"][0]["address"] for o in ok if o}) == 13 and len(ip_files(data_dir, "scarce")) == 13


def test_kill_at_any_point_never_duplicates_and_gc_reclaims(plugins: Plugins, data_dir: str, cni_bin: str) -> None:
    """SIGKILL host-local invocations at random moments while others run; then GC with the survivors."""
    conf = ipam_only(hl_conf("crash", data_dir, [[{"subnet": "10.244.53.0/24"}]]))
    exe = runtime.find("kproxy-host-local", [cni_bin])
    rnd = random.Random(1234)
    procs = []
    for i in range(40):
        env = dict(
            os.environ, CNI_COMMAND="ADD", CNI_CONTAINERID=f"c{i}", CNI_NETNS="/x", CNI_IFNAME="eth0", CNI_PATH=cni_bin
        )
        p = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert p.stdin is not None
        p.stdin.write(json.dumps(conf).encode())
        p.stdin.close()
        procs.append((f"c{i}", p, rnd.random() < 0.5, rnd.uniform(0.0, 0.06)))
    start = time.monotonic()
    for _, p, kill, delay in sorted(procs, key=lambda x: x[3]):
        if kill:
            time.sleep(max(0.0, start + delay - time.monotonic()))
            p.send_signal(signal.SIGKILL)
    survivors: dict[str, str] = {}
    killed = 0
    for cid, p, _, _ in procs:
        out = p.stdout.read() if p.stdout else b""
        rc = p.wait()
        if rc == 0:
            survivors[cid] = json.loads(out)["ips"][0]["address"].split("/")[0]
        killed += rc == -signal.SIGKILL
    assert killed > 0 and survivors  # both outcomes really happened
    assert len(set(survivors.values())) == len(survivors)
    d = os.path.join(data_dir, "crash")
    owners: dict[str, str] = {}
    for ip in ip_files(data_dir, "crash"):
        with open(os.path.join(d, ip), "rb") as f:
            owners[ip] = f.read().split(b"\r\n")[0].decode()
    for cid, ip in survivors.items():  # every answered ADD is backed by its own file
        assert owners[ip] == cid
    # killed calls may have left allocations (or empty files) behind: GC keeps exactly the survivors'
    valid = [{"containerID": cid, "ifname": "eth0"} for cid in survivors]
    gc = dict(conf, cniVersion="1.1.0", **{"cni.dev/valid-attachments": valid})
    assert plugins.call(gc, "GC") == (0, None)
    assert sorted(ip_files(data_dir, "crash")) == sorted(survivors.values())
    # and allocation still works afterwards (the lock was released by the kernel with the killed process)
    rc, out = plugins.call(conf, "ADD", "after", "/x", "eth0")
    assert rc == 0 and out is not None and out["ips"][0]["address"].split("/")[0] not in survivors.values()
