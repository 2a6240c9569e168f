"""kproxy's configuration: a KubeProxyConfiguration file, overridden by kube-proxy-compatible flags.

:class:`ProxyConfig` is the single resolved configuration every component reads. It is built by
:func:`load_config_file` (``kubeproxy.config.k8s.io/v1alpha1`` KubeProxyConfiguration, the supported
fields) and :func:`apply_flags` (kube-proxy's flag names, see :mod:`kproxy.cli`). Unknown fields and
invalid values raise :class:`ConfigError` with a message naming the field.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field."""


@dataclass(slots=True)
class ProxyConfig:
    # --- where desired state comes from
    kubeconfig: str = ""
    master: str = ""
    manifests: str = ""  # kproxy extension: a directory of Service/EndpointSlice manifests
    hostname_override: str = ""
    config_sync_period: float = 900.0
    api_qps: float = 50.0
    api_burst: int = 100
    # --- proxy
    mode: str = "iptables"
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs; "primary" or empty = all local addresses
    localhost_nodeports: bool = True
    detect_local_mode: str = "ClusterCIDR"  # ClusterCIDR | NodeCIDR | BridgeInterface | InterfaceNamePrefix
    pod_bridge_interface: str = ""
    pod_interface_name_prefix: str = ""
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    # --- iptables
    iptables_backend: str = "auto"  # kproxy extension: auto | legacy | nft
    # --- ipvs
    ipvs_scheduler: str = "rr"
    ipvs_strict_arp: bool = False
    ipvs_tcp_timeout: float = 0.0
    ipvs_tcpfin_timeout: float = 0.0
    ipvs_udp_timeout: float = 0.0
    ipvs_exclude_cidrs: tuple[str, ...] = ()
    # --- ebpf (kproxy extension)
    bpf_cgroup_path: str = ""
    bpf_interfaces: tuple[str, ...] = ()
    bpf_pin_path: str = "/sys/fs/bpf/kproxy"
    # --- conntrack
    conntrack_max_per_core: int = 32768
    conntrack_min: int = 131072
    conntrack_tcp_established_timeout: float = 86400.0
    conntrack_tcp_close_wait_timeout: float = 3600.0
    conntrack_udp_timeout: float = 0.0
    conntrack_udp_stream_timeout: float = 0.0
    # --- operations
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    bind_address_hard_fail: bool = False
    oom_score_adj: int = -999
    verbosity: int = 0
    feature_gates: dict[str, bool] = field(default_factory=dict)
    # --- DNS (kproxy extension)
    dns_listen: str = ""  # empty: the daemon does not serve DNS
    dns_zone: str = "cluster.local"
    dns_upstream: str = ""

    @property
    def node_name(self) -> str:
        return (self.hostname_override or socket.gethostname()).strip().lower()

    def with_changes(self, **kw: Any) -> ProxyConfig:
        return replace(self, **kw)


# ---- parsing helpers ---------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, what: str) -> float:
    """Parse a Go duration ("1s", "1m30s", "250ms", "0") or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: invalid duration {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{what}: negative duration {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what}: invalid duration {value!r}")
    s = value.strip()
    if s in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ConfigError(f"{what}: invalid duration {value!r} (want e.g. 1s, 500ms, 1m30s)")
    return total


def parse_cidrs(value: Any, what: str) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{what}: want a list of CIDRs, got {value!r}")
    out = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        if item == "primary":
            out.append(item)
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{what}: invalid CIDR {item!r}") from None
    return tuple(out)


def parse_bind_address(value: Any, what: str) -> str:
    """host:port, [v6]:port or a bare IP (port then 0 = disabled, as in kube-proxy)."""
    if not isinstance(value, str):
        raise ConfigError(f"{what}: invalid address {value!r}")
    v = value.strip()
    if not v:
        return ""
    host, sep, port = v.rpartition(":")
    if not sep or (v.count(":") > 1 and not v.startswith("[")):
        host, port = v, "0"
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{what}: invalid IP in {value!r}") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: invalid port in {value!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{what}: want true or false, got {value!r}")


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{what}: want an integer in [{lo}, {hi}], got {value!r}")
    return value


MODES = ("iptables", "nftables", "ipvs", "ebpf")
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf", "twos")
DETECT_LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")


def validate(cfg: ProxyConfig) -> ProxyConfig:
    """Check cross-field constraints; return cfg."""
    if cfg.mode not in MODES:
        raise ConfigError(f"mode: unknown proxy mode {cfg.mode!r} (supported: {', '.join(MODES)})")
    if cfg.ipvs_scheduler not in SCHEDULERS:
        raise ConfigError(f"ipvs.scheduler: unknown scheduler {cfg.ipvs_scheduler!r}")
    if cfg.detect_local_mode not in DETECT_LOCAL_MODES:
        raise ConfigError(f"detectLocalMode: unknown mode {cfg.detect_local_mode!r}")
    if cfg.detect_local_mode == "BridgeInterface" and not cfg.pod_bridge_interface:
        raise ConfigError("detectLocal.bridgeInterface: required with detectLocalMode BridgeInterface")
    if cfg.detect_local_mode == "InterfaceNamePrefix" and not cfg.pod_interface_name_prefix:
        raise ConfigError("detectLocal.interfaceNamePrefix: required with detectLocalMode InterfaceNamePrefix")
    if cfg.iptables_backend not in ("auto", "legacy", "nft"):
        raise ConfigError(f"iptables backend: want auto, legacy or nft, got {cfg.iptables_backend!r}")
    if not 0 <= cfg.masquerade_bit <= 31:
        raise ConfigError(f"iptables.masqueradeBit: {cfg.masquerade_bit} not in [0, 31]")
    if cfg.min_sync_period > cfg.sync_period > 0:
        raise ConfigError("minSyncPeriod must not exceed syncPeriod")
    if cfg.kubeconfig and cfg.manifests:
        raise ConfigError("--kubeconfig and --manifests are mutually exclusive")
    return cfg


# ---- KubeProxyConfiguration --------------------------------------------------------------------------

def load_config_file(path: str, base: ProxyConfig | None = None) -> ProxyConfig:
    """Read a KubeProxyConfiguration (YAML or JSON) into a ProxyConfig."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    return from_document(doc, base, source=path)


def from_document(doc: Any, base: ProxyConfig | None = None, source: str = "config") -> ProxyConfig:
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: want a KubeProxyConfiguration object")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        raise ConfigError(f"{source}: want apiVersion {API_VERSION} and kind {KIND}, "
                          f"got {doc.get('apiVersion')!r} / {doc.get('kind')!r}")
    cfg = base if base is not None else ProxyConfig()
    out: dict[str, Any] = {}
    known = {"apiVersion", "kind", *_TOP}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s): {', '.join(unknown)}")
    for key, value in doc.items():
        if key in ("apiVersion", "kind") or value is None:
            continue
        handler = _TOP[key]
        handler(value, key, out)
    return validate(replace(cfg, **out))


def _section(subfields: dict[str, Any]) -> Any:
    def handle(value: Any, what: str, out: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise ConfigError(f"{what}: want an object")
        unknown = sorted(set(value) - set(subfields))
        if unknown:
            raise ConfigError(f"{what}: unknown field(s): {', '.join(unknown)}")
        for k, v in value.items():
            if v is None:
                continue
            subfields[k](v, f"{what}.{k}", out)
    return handle


def _set(attr: str, conv: Any = None) -> Any:
    def handle(value: Any, what: str, out: dict[str, Any]) -> None:
        out[attr] = conv(value, what) if conv else value
    return handle


def _ignore(value: Any, what: str, out: dict[str, Any]) -> None:
    return None


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: want a string, got {value!r}")
    return value


def _mode(value: Any, what: str) -> str:
    v = _str(value, what) or "iptables"
    if v not in MODES:
        raise ConfigError(f"{what}: unknown proxy mode {v!r} (supported: {', '.join(MODES)})")
    return v


def _feature_gates(value: Any, what: str) -> dict[str, bool]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: want a map of gate: bool")
    return {str(k): _bool(v, f"{what}.{k}") for k, v in value.items()}


def _nodeport_addresses(value: Any, what: str) -> tuple[str, ...]:
    return parse_cidrs(value, what)


_TOP: dict[str, Any] = {
    "bindAddress": _ignore,
    "bindAddressHardFail": _set("bind_address_hard_fail", _bool),
    "healthzBindAddress": _set("healthz_bind_address", parse_bind_address),
    "metricsBindAddress": _set("metrics_bind_address", parse_bind_address),
    "enableProfiling": _ignore,
    "clusterCIDR": _set("cluster_cidrs", parse_cidrs),
    "hostnameOverride": _set("hostname_override", _str),
    "clientConnection": _section({
        "kubeconfig": _set("kubeconfig", _str),
        "qps": _set("api_qps", lambda v, w: float(v)),
        "burst": _set("api_burst", lambda v, w: _int(v, w, 0, 1 << 20)),
        "contentType": _ignore,
        "acceptContentTypes": _ignore,
    }),
    "iptables": _section({
        "masqueradeAll": _set("masquerade_all", _bool),
        "masqueradeBit": _set("masquerade_bit", lambda v, w: _int(v, w, 0, 31)),
        "localhostNodePorts": _set("localhost_nodeports", _bool),
        "syncPeriod": _set("sync_period", parse_duration),
        "minSyncPeriod": _set("min_sync_period", parse_duration),
    }),
    "ipvs": _section({
        "syncPeriod": _set("sync_period", parse_duration),
        "minSyncPeriod": _set("min_sync_period", parse_duration),
        "scheduler": _set("ipvs_scheduler", lambda v, w: _str(v, w) or "rr"),
        "excludeCIDRs": _set("ipvs_exclude_cidrs", parse_cidrs),
        "strictARP": _set("ipvs_strict_arp", _bool),
        "tcpTimeout": _set("ipvs_tcp_timeout", parse_duration),
        "tcpFinTimeout": _set("ipvs_tcpfin_timeout", parse_duration),
        "udpTimeout": _set("ipvs_udp_timeout", parse_duration),
    }),
    "nftables": _section({
        "masqueradeAll": _set("masquerade_all", _bool),
        "masqueradeBit": _set("masquerade_bit", lambda v, w: _int(v, w, 0, 31)),
        "syncPeriod": _set("sync_period", parse_duration),
        "minSyncPeriod": _set("min_sync_period", parse_duration),
    }),
    "syncPeriod": _set("sync_period", parse_duration),
    "minSyncPeriod": _set("min_sync_period", parse_duration),
    "mode": _set("mode", _mode),
    "portRange": _ignore,
    "conntrack": _section({
        "maxPerCore": _set("conntrack_max_per_core", lambda v, w: _int(v, w, 0, 1 << 30)),
        "min": _set("conntrack_min", lambda v, w: _int(v, w, 0, 1 << 30)),
        "tcpEstablishedTimeout": _set("conntrack_tcp_established_timeout", parse_duration),
        "tcpCloseWaitTimeout": _set("conntrack_tcp_close_wait_timeout", parse_duration),
        "tcpBeLiberal": _ignore,
        "udpTimeout": _set("conntrack_udp_timeout", parse_duration),
        "udpStreamTimeout": _set("conntrack_udp_stream_timeout", parse_duration),
    }),
    "configSyncPeriod": _set("config_sync_period", parse_duration),
    "nodePortAddresses": _set("nodeport_addresses", _nodeport_addresses),
    "detectLocalMode": _set("detect_local_mode", lambda v, w: _str(v, w) or "ClusterCIDR"),
    "detectLocal": _section({
        "bridgeInterface": _set("pod_bridge_interface", _str),
        "interfaceNamePrefix": _set("pod_interface_name_prefix", _str),
        "clusterCIDRs": _set("cluster_cidrs", parse_cidrs),
    }),
    "featureGates": _set("feature_gates", _feature_gates),
    "logging": _ignore,
    "oomScoreAdj": _set("oom_score_adj", lambda v, w: _int(v, w, -1000, 1000)),
    "showHiddenMetricsForVersion": _ignore,
    "winkernel": _ignore,
    "windowsRunAsService": _ignore,
    "portRangeDeprecated": _ignore,
}
