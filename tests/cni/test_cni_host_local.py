"""kproxy-host-local exec'd like a runtime (no namespaces needed): allocation, state format, errors."""

from __future__ import annotations

import os

import pytest
from cnihelpers import Plugins, hl_conf, ip_files, ipam_only, needs_reference


def add(plugins: Plugins, conf: dict, cid: str, ifname: str = "eth0", **kw: object) -> dict:
    out = plugins.ok(ipam_only(conf), "ADD", cid, "/nonexistent", ifname, **kw)
    assert out is not None
    return out


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def addresses(res: dict) -> list[str]:
    return [ip["address"] for ip in res["ips"]]


def test_add_result_and_reference_file_format(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf("net1", data_dir, [[{"subnet": "10.244.9.0/24"}]], routes=[{"dst": "0.0.0.0/0"}])
    res = add(plugins, conf, "c1")
    assert res == {
        "cniVersion": "1.0.0",
        "ips": [{"address": "10.244.9.2/24", "gateway": "10.244.9.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }
    d = os.path.join(data_dir, "net1")
    with open(os.path.join(d, "10.244.9.2"), "rb") as f:
        assert f.read() == b"c1\r\neth0"
    with open(os.path.join(d, "last_reserved_ip.0"), "rb") as f:
        assert f.read() == b"10.244.9.2"
    assert os.path.exists(os.path.join(d, "lock"))


@pytest.mark.parametrize(
    ("version", "has_version_field"),
    [("0.3.0", True), ("0.3.1", True), ("0.4.0", True), ("1.0.0", False), ("1.1.0", False)],
)
def test_result_format_per_version(plugins: Plugins, data_dir: str, version: str, has_version_field: bool) -> None:
    conf = hl_conf("v", data_dir, [[{"subnet": "10.244.9.0/24"}], [{"subnet": "fd00:9::/64"}]])
    conf["cniVersion"] = version
    res = add(plugins, conf, "c1")
    assert res["cniVersion"] == version
    assert [("version" in ip) for ip in res["ips"]] == [has_version_field] * 2
    if has_version_field:
        assert [ip["version"] for ip in res["ips"]] == ["4", "6"]


def test_round_robin_skips_gateway_and_wraps(plugins: Plugins, data_dir: str) -> None:
    # .1 is the gateway, range .1-.6 (the /29 broadcast .7 is excluded)
    conf = hl_conf("rr", data_dir, [[{"subnet": "10.244.9.0/29"}]])
    got = [addresses(add(plugins, conf, f"c{i}"))[0] for i in range(5)]
    assert got == [f"10.244.9.{i}/29" for i in range(2, 7)]
    plugins.ok(ipam_only(conf), "DEL", "c1", "", "eth0")  # frees .3
    plugins.ok(ipam_only(conf), "DEL", "c0", "", "eth0")  # frees .2
    # round robin continues after the last reserved (.6), wraps, and takes .2 before .3
    assert addresses(add(plugins, conf, "n1")) == ["10.244.9.2/29"]
    assert addresses(add(plugins, conf, "n2")) == ["10.244.9.3/29"]


def test_range_start_end_gateway_and_legacy_subnet(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf(
        "rs",
        data_dir,
        [
            [
                {
                    "subnet": "10.244.9.0/24",
                    "rangeStart": "10.244.9.100",
                    "rangeEnd": "10.244.9.101",
                    "gateway": "10.244.9.254",
                }
            ]
        ],
    )
    assert add(plugins, conf, "a")["ips"] == [{"address": "10.244.9.100/24", "gateway": "10.244.9.254"}]
    assert addresses(add(plugins, conf, "b")) == ["10.244.9.101/24"]
    rc, out = plugins.call(ipam_only(conf), "ADD", "c", "/x", "eth0")
    assert rc != 0 and out is not None and "no IP addresses available" in out["msg"]

    legacy = hl_conf("legacy", data_dir, None, subnet="10.244.8.0/24", rangeStart="10.244.8.50")
    assert add(plugins, legacy, "a")["ips"] == [{"address": "10.244.8.50/24", "gateway": "10.244.8.1"}]


def test_dual_stack_and_two_range_sets(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf(
        "ds",
        data_dir,
        [[{"subnet": "10.244.9.0/30"}, {"subnet": "10.244.10.0/30"}], [{"subnet": "fd00:9::/120"}]],
    )
    assert addresses(add(plugins, conf, "a")) == ["10.244.9.2/30", "fd00:9::2/120"]
    # the first range of the set is full (.1 gw, .2 taken): the allocator moves on to the second range
    assert addresses(add(plugins, conf, "b")) == ["10.244.10.2/30", "fd00:9::3/120"]
    assert sorted(ip_files(data_dir, "ds")) == ["10.244.10.2", "10.244.9.2", "fd00:9::2", "fd00:9::3"]
    assert read(os.path.join(data_dir, "ds", "last_reserved_ip.1")) == b"fd00:9::3"


def test_requested_ips_all_three_ways(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf("req", data_dir, [[{"subnet": "10.244.9.0/24"}]])
    assert addresses(add(plugins, conf, "a", args={"IP": "10.244.9.77"})) == ["10.244.9.77/24"]
    c2 = dict(conf, args={"cni": {"ips": ["10.244.9.78"]}})
    assert addresses(add(plugins, c2, "b")) == ["10.244.9.78/24"]
    c3 = dict(conf, runtimeConfig={"ips": ["10.244.9.79/24"]})
    assert addresses(add(plugins, c3, "c")) == ["10.244.9.79/24"]
    # taken, gateway, and out-of-range requests fail and allocate nothing
    before = ip_files(data_dir, "req")
    for ip in ("10.244.9.77", "10.244.9.1", "10.9.9.9"):
        rc, out = plugins.call(ipam_only(conf), "ADD", "d", "/x", "eth0", args={"IP": ip})
        assert rc != 0 and out is not None and out["code"] == 999, out
    assert ip_files(data_dir, "req") == before


def test_del_is_idempotent_and_scoped_to_ifname(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf("del", data_dir, [[{"subnet": "10.244.9.0/24"}]])
    add(plugins, conf, "a", "eth0")
    add(plugins, conf, "a", "net1")
    plugins.ok(ipam_only(conf), "DEL", "a", "", "eth0")
    assert ip_files(data_dir, "del") == ["10.244.9.3"]
    plugins.ok(ipam_only(conf), "DEL", "a", "", "eth0")
    plugins.ok(ipam_only(conf), "DEL", "a", "", "net1")
    assert ip_files(data_dir, "del") == []
    other = hl_conf("never-used", data_dir, [[{"subnet": "10.244.9.0/24"}]])
    plugins.ok(ipam_only(other), "DEL", "zzz", "", "eth0")  # no state directory at all


def test_repeated_add_returns_same_allocation(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf("idem", data_dir, [[{"subnet": "10.244.9.0/24"}]])
    first = add(plugins, conf, "a")
    assert add(plugins, conf, "a") == first
    assert ip_files(data_dir, "idem") == ["10.244.9.2"]


def test_exhausted_range_errors_and_changes_nothing(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf("full", data_dir, [[{"subnet": "10.244.9.0/30"}], [{"subnet": "fd00:9::/126"}]])
    add(plugins, conf, "a")
    d = os.path.join(data_dir, "full")
    snapshot = {f: read(os.path.join(d, f)) for f in os.listdir(d)}
    rc, out = plugins.call(ipam_only(conf), "ADD", "b", "/x", "eth0")
    assert rc == 1
    assert out == {
        "cniVersion": "1.0.0",
        "code": 999,
        "msg": "no IP addresses available in range set: 10.244.9.1-10.244.9.2",
    }
    # the IPv6 set had room, but the failed ADD must not keep half an allocation
    assert {f: read(os.path.join(d, f)) for f in os.listdir(d)} == snapshot


def test_status_and_gc(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf("gc", data_dir, [[{"subnet": "10.244.9.0/29"}]])
    conf["cniVersion"] = "1.1.0"
    assert plugins.call(ipam_only(conf), "STATUS") == (0, None)
    for cid in ("a", "b", "c"):
        add(plugins, conf, cid)
    # a leftover of a kill between create and write: empty file, owner unknown
    open(os.path.join(data_dir, "gc", "10.244.9.6"), "wb").close()
    gc = dict(ipam_only(conf), **{"cni.dev/valid-attachments": [{"containerID": "b", "ifname": "eth0"}]})
    assert plugins.call(gc, "GC") == (0, None)
    assert ip_files(data_dir, "gc") == ["10.244.9.3"]
    # exhausted -> STATUS says so with "plugin not available"
    for cid in ("d", "e", "f", "g"):
        add(plugins, conf, cid)
    rc, out = plugins.call(ipam_only(conf), "STATUS")
    assert rc == 1 and out is not None and out["code"] == 50


def test_status_and_gc_need_cni_1_1(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf("old", data_dir, [[{"subnet": "10.244.9.0/29"}]])
    for cmd in ("STATUS", "GC"):
        rc, out = plugins.call(ipam_only(conf), cmd)
        assert rc == 1 and out is not None and out["code"] == 1


def test_check(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf("chk", data_dir, [[{"subnet": "10.244.9.0/29"}]])
    res = add(plugins, conf, "a")
    c = dict(ipam_only(conf), prevResult=res)
    assert plugins.call(c, "CHECK", "a", "/x", "eth0") == (0, None)
    plugins.ok(ipam_only(conf), "DEL", "a", "", "eth0")
    rc, out = plugins.call(c, "CHECK", "a", "/x", "eth0")
    assert rc == 1 and out is not None and "Failed to find address" in out["msg"]


def test_resolv_conf(plugins: Plugins, data_dir: str, tmp_path: object) -> None:
    rc_path = os.path.join(data_dir, "resolv.conf")
    with open(rc_path, "w") as f:
        f.write("# comment\nnameserver 10.96.0.10\nnameserver 1.1.1.1\nsearch a.svc b.svc\noptions ndots:5\n")
    conf = hl_conf("dns", data_dir, [[{"subnet": "10.244.9.0/29"}]], resolvConf=rc_path)
    assert add(plugins, conf, "a")["dns"] == {
        "nameservers": ["10.96.0.10", "1.1.1.1"],
        "search": ["a.svc", "b.svc"],
        "options": ["ndots:5"],
    }


@pytest.mark.parametrize(
    ("raw", "drop", "code"),
    [
        (b"{not json", (), 6),
        (b'{"cniVersion": "9.9.9", "name": "x", "ipam": {}}', (), 1),
        (None, ("CNI_CONTAINERID",), 4),
        (None, ("CNI_IFNAME",), 4),
        (None, ("CNI_PATH",), 4),
        (b'{"cniVersion": "1.0.0", "name": "x", "ipam": {"type": "kproxy-host-local"}}', (), 7),
        (b'{"cniVersion": "1.0.0", "name": "x", "ipam": {"ranges": [[{"subnet": "10.0.0.0/31"}]]}}', (), 7),
    ],
)
def test_errors_use_spec_codes_and_leak_nothing(
    plugins: Plugins, data_dir: str, raw: bytes | None, drop: tuple[str, ...], code: int
) -> None:
    conf = ipam_only(hl_conf("err", data_dir, [[{"subnet": "10.244.9.0/29"}]]))
    rc, out = plugins.call(conf, "ADD", "a", "/x", "eth0", raw=raw, env_drop=drop)
    assert rc == 1 and out is not None
    assert out["code"] == code and out["msg"]
    assert ip_files(data_dir, "err") == []


def test_version(plugins: Plugins) -> None:
    rc, out = plugins.call({"type": "kproxy-host-local", "cniVersion": "1.1.0"}, "VERSION")
    assert rc == 0 and out == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


# ---------------------------------------------------------------------------------------------
# on-disk compatibility with the reference host-local


@needs_reference
def test_switching_between_reference_and_kproxy_host_local(plugins: Plugins, data_dir: str) -> None:
    ours = hl_conf("mix", data_dir, [[{"subnet": "10.244.9.0/24"}]])
    ref = hl_conf("mix", data_dir, [[{"subnet": "10.244.9.0/24"}]], ours=False)
    a = addresses(add(plugins, ref, "r1"))
    b = addresses(add(plugins, ours, "k1"))
    c = addresses(add(plugins, ref, "r2"))
    d = addresses(add(plugins, ours, "k2"))
    # one shared round-robin sequence, no duplicates
    assert a + b + c + d == [f"10.244.9.{i}/24" for i in range(2, 6)]
    d_ = os.path.join(data_dir, "mix")
    assert read(os.path.join(d_, "10.244.9.2")) == b"r1\r\neth0"  # written by the reference
    assert read(os.path.join(d_, "10.244.9.3")) == b"k1\r\neth0"  # written by us: same format
    # each releases what the other allocated
    plugins.ok(ipam_only(ours), "DEL", "r1", "", "eth0")
    plugins.ok(ipam_only(ref), "DEL", "k1", "", "eth0")
    assert ip_files(data_dir, "mix") == ["10.244.9.4", "10.244.9.5"]
    # and the reference honours an address we requested
    add(plugins, ours, "k3", args={"IP": "10.244.9.9"})
    rc, out = plugins.call(ipam_only(ref), "ADD", "r3", "/x", "eth0", args={"IP": "10.244.9.9"})
    assert rc != 0 and out is not None and "10.244.9.9" in out["msg"]


@needs_reference
def test_reference_and_kproxy_agree_on_results(plugins: Plugins, data_dir: str) -> None:
    for version in ("0.3.1", "0.4.0", "1.0.0"):
        results = []
        for ours in (True, False):
            conf = hl_conf(
                f"same-{ours}-{version}",
                data_dir,
                [[{"subnet": "10.244.9.0/24"}], [{"subnet": "fd00::/64"}]],
                ours=ours,
                routes=[{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}],
            )
            conf["cniVersion"] = version
            results.append(add(plugins, conf, "a"))
        assert results[0] == results[1], version


def test_kubelet_style_cni_args_are_accepted(plugins: Plugins, data_dir: str) -> None:
    conf = hl_conf("k8s", data_dir, [[{"subnet": "10.244.9.0/24"}]])
    args = {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": "default",
        "K8S_POD_NAME": "web-0",
        "K8S_POD_INFRA_CONTAINER_ID": "abc123",
        "K8S_POD_UID": "0d2c-11",
    }
    assert addresses(add(plugins, conf, "abc123", args=args)) == ["10.244.9.2/24"]
    assert addresses(add(plugins, conf, "def456", args={**args, "IP": "10.244.9.50"})) == ["10.244.9.50/24"]
