"""The deployment manifests: valid Kubernetes objects (offline schemas), a config kproxy accepts, args
its CLI parses, and the wiring between DaemonSet, image and CNI installer."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kproxy import config as kconfig
from kproxy.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# The oldest Kubernetes minor we support and the newest whose schemas kubernetes-validate ships offline.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def one(kind: str) -> dict:
    found = [d for _, d in manifests() if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def daemonset_pod() -> dict:
    return one("DaemonSet")["spec"]["template"]["spec"]


def container() -> dict:
    (c,) = daemonset_pod()["containers"]
    return c


def test_expected_objects_present():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in manifests())
    assert kinds == [("ClusterRole", "kproxy"), ("ClusterRoleBinding", "kproxy"), ("ConfigMap", "kproxy"),
                     ("DaemonSet", "kproxy"), ("ServiceAccount", "kproxy")]
    for _, d in manifests():
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == "kube-system"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version):
    for name, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} invalid for {version}: {e.message}")


def test_validator_rejects_a_broken_daemonset():
    """The schema check above is real: a typo'd field and a wrong type are caught."""
    ds = copy.deepcopy(one("DaemonSet"))
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[0], strict=True)
    ds = copy.deepcopy(one("DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = [10256]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[0], strict=True)


def config_doc() -> dict:
    return yaml.safe_load(one("ConfigMap")["data"]["config.conf"])


def test_configmap_is_a_config_kproxy_accepts():
    doc = config_doc()
    assert set(doc) - {"apiVersion", "kind"} <= set(kconfig._TOP)
    cfg = kconfig.from_document(doc)
    assert cfg.mode == doc["mode"]
    assert cfg.healthz_bind_address == doc["healthzBindAddress"]
    assert cfg.metrics_bind_address == doc["metricsBindAddress"]
    assert cfg.cluster_cidrs == (doc["clusterCIDR"],)
    assert cfg.sync_period == kconfig.parse_duration(doc["syncPeriod"], "syncPeriod")
    assert cfg.conntrack_tcp_established_timeout == 86400.0
    assert cfg.conntrack_min == doc["conntrack"]["min"]


def test_daemonset_args_are_flags_kproxy_accepts(tmp_path):
    c = container()
    assert c["command"] == ["/opt/kproxy/.venv/bin/kproxy"]
    args = c["args"]
    assert args == ["--config=/var/lib/kproxy/config.conf", "--hostname-override=$(NODE_NAME)"]
    # Expand $(NODE_NAME) as the kubelet does and point --config at a real copy of the ConfigMap.
    (tmp_path / "config.conf").write_text(one("ConfigMap")["data"]["config.conf"])
    env = {e["name"]: "node-7" for e in c["env"] if e["name"] == "NODE_NAME"}
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]
    expanded[0] = f"--config={tmp_path / 'config.conf'}"
    ns = build_parser().parse_args(expanded)
    cfg = config_from_args(ns)
    assert cfg.hostname_override == "node-7" and cfg.node_name == "node-7"
    assert cfg.mode == config_doc()["mode"]
    # The config file mount provides exactly the path the args name.
    mount = next(m for m in c["volumeMounts"] if m["name"] == "kproxy-config")
    assert Path(mount["mountPath"]) / "config.conf" == Path(args[0].split("=", 1)[1])
    vol = next(v for v in daemonset_pod()["volumes"] if v["name"] == "kproxy-config")
    assert vol["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]


def test_daemonset_runs_like_kube_proxy():
    pod = daemonset_pod()
    c = container()
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    assert {"operator": "Exists"} in pod["tolerations"]
    assert c["securityContext"]["privileged"] is True
    assert c["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    assert c["image"] == "kproxy:0.1.0"

    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    lock = mounts["/run/xtables.lock"]
    assert vols[lock["name"]]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert mounts["/lib/modules"]["readOnly"] is True
    assert vols[mounts["/lib/modules"]["name"]]["hostPath"]["path"] == "/lib/modules"
    assert vols[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["path"] == "/sys/fs/bpf"

    # Probes hit the health server where the config binds it.
    port = int(config_doc()["healthzBindAddress"].rsplit(":", 1)[1])
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port, "scheme": "HTTP"}
    assert c["readinessProbe"]["httpGet"]["port"] == port


def test_init_container_installs_cni_with_the_script_in_the_image():
    pod = daemonset_pod()
    (init,) = pod["initContainers"]
    assert init["command"] == ["/opt/kproxy/deploy/cni/install-cni.sh"]
    assert init["image"] == container()["image"]
    # The Dockerfile copies the repo to /opt/kproxy, so the script comes from deploy/cni/ here.
    script = ROOT / init["command"][0].removeprefix("/opt/kproxy/")
    assert script.is_file() and os.access(script, os.X_OK)
    text = script.read_text()
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: vols[m["name"]]["hostPath"]["path"] for m in init["volumeMounts"]}
    assert mounts == {"/host/opt/cni/bin": "/opt/cni/bin", "/host/etc/cni/net.d": "/etc/cni/net.d"}
    # ...which are the script's default target directories.
    assert "CNI_BIN_DIR:-/host/opt/cni/bin" in text and "CNI_CONF_DIR:-/host/etc/cni/net.d" in text
    env = {e["name"]: e.get("value") for e in init.get("env", [])}
    assert env["SRC_PYTHON"] == "/opt/kproxy/.venv/bin/python"


def test_rbac_grants_what_kube_proxy_needs():
    rules = one("ClusterRole")["rules"]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)

    for verb in ("list", "watch"):
        assert allowed("", "services", verb)
        assert allowed("discovery.k8s.io", "endpointslices", verb)
    for verb in ("get", "list", "watch"):
        assert allowed("", "nodes", verb)
    for group in ("", "events.k8s.io"):
        assert allowed(group, "events", "create") and allowed(group, "events", "patch")
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in rules)
    binding = one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one("ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kproxy", "namespace": "kube-system"}]


def test_dockerfile_matches_the_daemonset():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:12-slim$", text, re.M)
    for pkg in ("iptables", "nftables", "ipset", "conntrack", "iproute2", "python3", "python3-venv"):
        assert re.search(rf"\s{re.escape(pkg)}(\s|;|\\)", text), pkg
    assert "COPY . /opt/kproxy" in text
    assert "pip install --no-cache-dir --disable-pip-version-check /opt/kproxy" in text
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]$', text, re.M)
    assert entry and entry.group(1) == container()["command"][0]
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignore and ".venv" in ignore
    assert not any(p in ignore for p in ("deploy", "kproxy", "cni", "pyproject.toml"))
