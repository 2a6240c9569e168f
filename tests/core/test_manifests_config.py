import os
import time
from pathlib import Path

import pytest
import yaml

from kproxy.cli import build_parser, config_from_args, main
from kproxy.config import ConfigError, from_document, parse_duration
from kproxy.sources.manifests import ManifestsSource
from kproxy.store import ClusterStore

from .objs import ep, eps, svc


def _write(path: Path, *docs: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    os.replace(tmp, path)


def test_manifests_add_edit_remove_and_lists(tmp_path: Path) -> None:
    st = ClusterStore("node-a")
    src = ManifestsSource(str(tmp_path))
    _write(tmp_path / "a.yaml", svc("a"), eps("a", [ep("10.0.0.1")]))
    (tmp_path / "b.json").write_text('{"kind": "List", "items": [' + __import__("json").dumps(svc("b")) + "]}")
    src.scan(st)
    assert set(st.services) == {("default", "a"), ("default", "b")}
    assert len(st.slices) == 1
    # a half-written (broken) file keeps its previous objects
    (tmp_path / "a.yaml").write_text("kind: Service\nmetadata: [broken")
    src.scan(st)
    assert ("default", "a") in st.services
    _write(tmp_path / "a.yaml", svc("a", ips=("10.96.0.99",)))
    time.sleep(0.01)
    src.scan(st)
    assert st.services[("default", "a")].cluster_ips == ("10.96.0.99",)
    assert not st.slices  # the slice vanished from the file
    (tmp_path / "b.json").unlink()
    src.scan(st)
    assert set(st.services) == {("default", "a")}


def test_duration_parsing() -> None:
    assert parse_duration("1m30s", "x") == 90
    assert parse_duration("250ms", "x") == 0.25
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration("5 minutes", "x")


def test_kube_proxy_configuration_and_flag_override(tmp_path: Path) -> None:
    cfg_file = tmp_path / "config.conf"
    cfg_file.write_text(yaml.safe_dump({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "mode": "iptables", "clusterCIDR": "10.244.0.0/16", "iptables": {"masqueradeAll": True, "syncPeriod": "10s"},
        "ipvs": {"scheduler": "wrr"}, "nodePortAddresses": ["203.0.113.0/24"], "metricsBindAddress": "127.0.0.1:9999",
    }))
    ns = build_parser().parse_args(["--config", str(cfg_file), "--masquerade-all=false", "--manifests", "/tmp/x",
                                    "--min-sync-period", "2s"])
    cfg = config_from_args(ns)
    assert cfg.cluster_cidrs == ("10.244.0.0/16",)
    assert cfg.masquerade_all is False  # the explicit flag wins
    assert cfg.sync_period == 10 and cfg.min_sync_period == 2
    assert cfg.ipvs_scheduler == "wrr" and cfg.nodeport_addresses == ("203.0.113.0/24",)
    assert cfg.metrics_bind_address == "127.0.0.1:9999"


@pytest.mark.parametrize(("doc", "msg"), [
    ({"mode": "userspace"}, "unknown proxy mode"),
    ({"bogusField": 1}, "unknown field"),
    ({"iptables": {"masqueradeBit": 40}}, "masqueradeBit"),
    ({"clusterCIDR": "10.0.0.0/33"}, "invalid CIDR"),
    ({"iptables": {"syncPeriod": "forever"}}, "invalid duration"),
])
def test_invalid_configuration_names_the_field(doc: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        from_document({"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration", **doc})


def test_kube_proxy_daemonset_args_are_accepted() -> None:
    # args as kubeadm / kube-up render them for kube-proxy
    args = ["--config=/var/lib/kube-proxy/config.conf", "--hostname-override=node-1", "--v=2",
            "--cluster-cidr=10.244.0.0/16", "--oom-score-adj=-998", "--proxy-mode=iptables",
            "--iptables-sync-period=30s", "--iptables-min-sync-period=1s", "--masquerade-all",
            "--feature-gates=SomeGate=true", "--conntrack-max-per-core=0", "--metrics-bind-address=0.0.0.0:10249",
            "--healthz-bind-address=0.0.0.0:10256", "--nodeport-addresses=10.0.0.0/8,primary"]
    ns = build_parser().parse_args(args)
    assert ns.hostname_override == "node-1" and ns.masquerade_all is True
    assert ns.nodeport_addresses == ("10.0.0.0/8", "primary")


def test_cli_reports_invalid_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--manifests", "/nonexistent", "--proxy-mode", "bogus"]) == 2
    assert "unknown proxy mode" in capsys.readouterr().err
