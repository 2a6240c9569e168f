"""The ``kproxy`` command line.

``kproxy [FLAGS]`` runs the node daemon and accepts kube-proxy's flag names (``--flag=value`` or
``--flag value``; booleans also as bare ``--flag``), so a kube-proxy DaemonSet's args work unchanged.
Flags given explicitly override the ``--config`` file. Subcommands: ``demo``, ``status``, ``dns``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from .config import (
    ConfigError,
    ProxyConfig,
    load_config_file,
    parse_bind_address,
    parse_cidrs,
    parse_duration,
    validate,
)

VERSION = "0.1.0"


def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "t", "yes"):
        return True
    if v.lower() in ("false", "0", "f", "no"):
        return False
    raise argparse.ArgumentTypeError(f"want true or false, got {v!r}")


def _checked(parse: Callable[[Any, str], Any], flag: str) -> Callable[[str], Any]:
    """An argparse type from one of config.py's parsers, so flags and the config file share validation."""
    def conv(v: str) -> Any:
        try:
            return parse(v, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return conv


def _dur(flag: str) -> Callable[[str], float]:
    return _checked(parse_duration, flag)


def _cidrs(flag: str) -> Callable[[str], tuple[str, ...]]:
    return _checked(parse_cidrs, flag)


def _addr(flag: str) -> Callable[[str], str]:
    return _checked(parse_bind_address, flag)


def _gates(v: str) -> dict[str, bool]:
    out = {}
    for item in filter(None, (s.strip() for s in v.split(","))):
        k, sep, val = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--feature-gates: want Name=true|false, got {item!r}")
        out[k] = _bool(val)
    return out


# flag → (ProxyConfig field or None when accepted but ignored, type, help)
FLAGS: dict[str, tuple[str | None, Any, str]] = {
    "--kubeconfig": ("kubeconfig", str, "path to a kubeconfig file (default: in-cluster config)"),
    "--master": ("master", str, "API server address, overrides the kubeconfig"),
    "--manifests": ("manifests", str, "kproxy: a directory of Service/EndpointSlice/Node manifests "
                    "used instead of the API server (changes are picked up within 1 s)"),
    "--hostname-override": ("hostname_override", str, "the name of this node"),
    "--proxy-mode": ("mode", str, "iptables (default), nftables, ipvs or ebpf"),
    "--cluster-cidr": ("cluster_cidrs", _cidrs("--cluster-cidr"), "pod CIDR(s), comma separated; traffic from "
                       "outside them to a ClusterIP is masqueraded"),
    "--masquerade-all": ("masquerade_all", _bool, "SNAT all traffic sent via Service cluster IPs"),
    "--iptables-masquerade-bit": ("masquerade_bit", int, "fwmark bit used to mark packets for SNAT (0-31)"),
    "--nodeport-addresses": ("nodeport_addresses", _cidrs("--nodeport-addresses"),
                             "CIDRs of the node addresses NodePorts answer on (default: all local addresses)"),
    "--iptables-localhost-nodeports": ("localhost_nodeports", _bool, "accept NodePort traffic to 127.0.0.1"),
    "--detect-local-mode": ("detect_local_mode", str, "ClusterCIDR, NodeCIDR, BridgeInterface or "
                            "InterfaceNamePrefix"),
    "--pod-bridge-interface": ("pod_bridge_interface", str, "bridge name for detect-local-mode BridgeInterface"),
    "--pod-interface-name-prefix": ("pod_interface_name_prefix", str,
                                    "interface prefix for detect-local-mode InterfaceNamePrefix"),
    "--sync-period": ("sync_period", _dur("--sync-period"), "maximum interval between syncs (default 30s)"),
    "--min-sync-period": ("min_sync_period", _dur("--min-sync-period"),
                          "minimum interval between syncs; bursts are coalesced (default 1s)"),
    "--iptables-sync-period": ("sync_period", _dur("--iptables-sync-period"), "alias of --sync-period"),
    "--iptables-min-sync-period": ("min_sync_period", _dur("--iptables-min-sync-period"),
                                   "alias of --min-sync-period"),
    "--ipvs-sync-period": ("sync_period", _dur("--ipvs-sync-period"), "alias of --sync-period"),
    "--ipvs-min-sync-period": ("min_sync_period", _dur("--ipvs-min-sync-period"), "alias of --min-sync-period"),
    "--iptables-backend": ("iptables_backend", str, "kproxy: auto (default: the back end the node uses), "
                           "legacy or nft"),
    "--ipvs-scheduler": ("ipvs_scheduler", str, "IPVS scheduler (rr, wrr, lc, wlc, sh, mh, ...)"),
    "--ipvs-strict-arp": ("ipvs_strict_arp", _bool, "set arp_ignore=1/arp_announce=2"),
    "--ipvs-tcp-timeout": ("ipvs_tcp_timeout", _dur("--ipvs-tcp-timeout"), "IPVS idle TCP timeout"),
    "--ipvs-tcpfin-timeout": ("ipvs_tcpfin_timeout", _dur("--ipvs-tcpfin-timeout"), "IPVS TCP FIN_WAIT timeout"),
    "--ipvs-udp-timeout": ("ipvs_udp_timeout", _dur("--ipvs-udp-timeout"), "IPVS UDP timeout"),
    "--ipvs-exclude-cidrs": ("ipvs_exclude_cidrs", _cidrs("--ipvs-exclude-cidrs"),
                             "CIDRs the IPVS proxier must not touch on cleanup"),
    "--bpf-cgroup-path": ("bpf_cgroup_path", str, "kproxy ebpf: cgroup v2 directory to attach socket LB to"),
    "--bpf-interfaces": ("bpf_interfaces", lambda v: tuple(filter(None, v.split(","))),
                         "kproxy ebpf: interfaces for the tc NodePort program (comma separated)"),
    "--bpf-pin-path": ("bpf_pin_path", str, "kproxy ebpf: bpffs directory for pinned maps"),
    "--conntrack-max-per-core": ("conntrack_max_per_core", int, "max conntrack entries per CPU core"),
    "--conntrack-min": ("conntrack_min", int, "minimum conntrack entries"),
    "--conntrack-tcp-timeout-established": ("conntrack_tcp_established_timeout",
                                            _dur("--conntrack-tcp-timeout-established"), "idle TCP timeout"),
    "--conntrack-tcp-timeout-close-wait": ("conntrack_tcp_close_wait_timeout",
                                           _dur("--conntrack-tcp-timeout-close-wait"), "CLOSE_WAIT timeout"),
    "--conntrack-udp-timeout": ("conntrack_udp_timeout", _dur("--conntrack-udp-timeout"), "UDP timeout"),
    "--conntrack-udp-timeout-stream": ("conntrack_udp_stream_timeout", _dur("--conntrack-udp-timeout-stream"),
                                       "UDP stream timeout"),
    "--conntrack-tcp-be-liberal": (None, _bool, "accepted for compatibility"),
    "--healthz-bind-address": ("healthz_bind_address", _addr("--healthz-bind-address"),
                               "address:port for /healthz and /livez (default 0.0.0.0:10256; empty disables)"),
    "--metrics-bind-address": ("metrics_bind_address", _addr("--metrics-bind-address"),
                               "address:port for /metrics (default 127.0.0.1:10249; empty disables)"),
    "--bind-address-hard-fail": ("bind_address_hard_fail", _bool, "exit if a server cannot bind"),
    "--oom-score-adj": ("oom_score_adj", int, "oom_score_adj for the daemon process"),
    "--config-sync-period": ("config_sync_period", _dur("--config-sync-period"), "API relist period"),
    "--kube-api-qps": ("api_qps", float, "API request rate"),
    "--kube-api-burst": ("api_burst", int, "API request burst"),
    "--feature-gates": ("feature_gates", _gates, "Name=true|false,... (accepted; unknown gates are ignored)"),
    "--dns-listen": ("dns_listen", str, "kproxy: also serve cluster DNS on ADDR:PORT"),
    "--dns-zone": ("dns_zone", str, "kproxy: cluster DNS zone (default cluster.local)"),
    "--dns-upstream": ("dns_upstream", str, "kproxy: forward out-of-zone queries to ADDR[:PORT]"),
    # accepted for kube-proxy compatibility, no effect in kproxy
    "--bind-address": (None, str, "accepted for compatibility"),
    "--kube-api-content-type": (None, str, "accepted for compatibility (kproxy always reads JSON)"),
    "--proxy-port-range": (None, str, "accepted for compatibility (userspace mode only)"),
    "--profiling": (None, _bool, "accepted for compatibility"),
    "--show-hidden-metrics-for-version": (None, str, "accepted for compatibility"),
    "--log-flush-frequency": (None, str, "accepted for compatibility"),
    "--logging-format": (None, str, "accepted for compatibility (text only)"),
    "--vmodule": (None, str, "accepted for compatibility"),
    "--alsologtostderr": (None, _bool, "accepted for compatibility"),
    "--logtostderr": (None, _bool, "accepted for compatibility"),
    "--log-file": (None, str, "accepted for compatibility"),
    "--one-output": (None, _bool, "accepted for compatibility"),
    "--skip-headers": (None, _bool, "accepted for compatibility"),
    "--stderrthreshold": (None, str, "accepted for compatibility"),
    "--write-config-to": (None, str, "accepted for compatibility"),
}
BOOL_TYPES = (_bool,)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kproxy",
        description="kproxy: a kernel-level Kubernetes service proxy (kube-proxy replacement).\n"
                    "Subcommands: 'kproxy demo' (a self-contained demo in network namespaces), "
                    "'kproxy status' (what the kernel holds, by Service), 'kproxy dns ...' (cluster DNS).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    ap.add_argument("--config", help="a KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1); "
                    "flags given explicitly override it")
    ap.add_argument("--cleanup", nargs="?", const=True, type=_bool,
                    help="remove every rule, chain, map and program kproxy created, then exit")
    ap.add_argument("--init-only", nargs="?", const=True, type=_bool, help="set up the node and exit")
    ap.add_argument("-v", "--v", dest="verbosity", type=int, help="log level (0 info, 4+ debug)")
    ap.add_argument("--version", action="version", version=f"kproxy {VERSION}")
    for flag, (_dest, typ, hlp) in FLAGS.items():
        d = flag[2:].replace("-", "_")
        if typ in BOOL_TYPES:
            ap.add_argument(flag, dest=d, nargs="?", const=True, type=typ, help=hlp)
        else:
            ap.add_argument(flag, dest=d, type=typ, help=hlp)
    return ap


def config_from_args(ns: argparse.Namespace) -> ProxyConfig:
    given = vars(ns)
    cfg = load_config_file(given["config"]) if given.get("config") else ProxyConfig()
    updates: dict[str, Any] = {}
    for flag, (dest, _, _) in FLAGS.items():
        key = flag[2:].replace("-", "_")
        if dest is not None and key in given:
            updates[dest] = given[key]
    if "verbosity" in given:
        updates["verbosity"] = given["verbosity"]
    return validate(cfg.with_changes(**updates))


def setup_logging(verbosity: int) -> None:
    logging.basicConfig(level=logging.DEBUG if verbosity >= 4 else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    ap = build_parser()
    ns = ap.parse_args(argv)
    try:
        cfg = config_from_args(ns)
    except ConfigError as e:
        print(f"kproxy: invalid configuration: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.verbosity)
    from . import dataplane

    if getattr(ns, "cleanup", False):
        return _cleanup(cfg)
    if not cfg.manifests and not cfg.kubeconfig and not _in_cluster():
        print("kproxy: no source of Services: give --kubeconfig, --manifests DIR, or run in a cluster "
              "(try 'kproxy demo')", file=sys.stderr)
        return 2
    try:
        if getattr(ns, "init_only", False):
            dataplane.load(cfg.mode, cfg).setup()
            return 0
        from .daemon import run

        return run(cfg)
    except dataplane.SetupError as e:
        print(f"kproxy: cannot start {cfg.mode} mode: {e}", file=sys.stderr)
        return 1


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _cleanup(cfg: ProxyConfig) -> int:
    """Remove state of every mode (kube-proxy --cleanup semantics: all modes, not just the current)."""
    from . import dataplane

    found = False
    failed = False
    for mode in dataplane.MODES:
        try:
            dp = dataplane.load(mode, cfg)
        except (dataplane.SetupError, ImportError):
            continue
        try:
            found |= bool(dp.cleanup())
        except Exception as e:
            logging.getLogger("kproxy").error("cleanup of %s mode failed: %s", mode, e)
            failed = True
    print("kproxy: cleanup done" + ("" if found else " (nothing to remove)"), file=sys.stderr)
    return 1 if failed else 0


def status_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kproxy status", description="Print what the kernel holds, by Service.")
    ap.add_argument("--proxy-mode", default="", help="mode to read (default: every mode with state)")
    ap.add_argument("--iptables-backend", default="auto")
    ap.add_argument("--bpf-pin-path", default=ProxyConfig().bpf_pin_path, help="bpffs directory of the ebpf maps")
    ap.add_argument("-o", "--output", choices=("table", "json"), default="table")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from . import dataplane
    from .status import collect, format_table

    cfg = ProxyConfig(iptables_backend=a.iptables_backend, bpf_pin_path=a.bpf_pin_path)
    modes = [a.proxy_mode] if a.proxy_mode else list(dataplane.MODES)
    try:
        results = collect(cfg, modes, explicit=bool(a.proxy_mode))
    except dataplane.SetupError as e:
        print(f"kproxy status: {e}", file=sys.stderr)
        return 1
    if a.output == "json":
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
    return 0


def _demo(argv: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(argv)


def _dns(argv: list[str]) -> int:
    from .dns.cli import main as dns_main

    return dns_main(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"demo": _demo, "status": status_main, "dns": _dns}
