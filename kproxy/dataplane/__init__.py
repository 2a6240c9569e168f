"""The data-plane interface every proxy mode implements (iptables, nftables, ipvs, ebpf).

Data flows one way: the sync runner updates the :class:`~kproxy.snapshot.ProxySnapshot`, then calls
:meth:`DataPlane.sync` with the snapshot and the :class:`~kproxy.snapshot.Changes` since the last
successful sync. A data plane renders the desired kernel state for the changed service ports (or for
everything when ``full`` is true) and applies it atomically: on failure it raises
:class:`SyncError` and the kernel must still hold the previous, complete ruleset. The daemon then
keeps the failed changes pending (for conntrack cleanup) and makes the retry a full sync.

Each mode lives in its own subpackage and registers a factory in :data:`MODES`.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Protocol

from ..config import ProxyConfig
from ..snapshot import Changes, ProxySnapshot


class SyncError(RuntimeError):
    """Applying rules to the kernel failed; the previous rules are still in place."""


class SetupError(RuntimeError):
    """The mode cannot run on this node (missing kernel feature, tool or permission)."""


@dataclass(slots=True)
class SyncResult:
    """What one sync did, for logs, metrics and benchmarks."""

    full: bool
    services: int = 0  # service ports written
    rules: int = 0  # rules / elements / real servers written
    render_seconds: float = 0.0
    apply_seconds: float = 0.0
    stale_udp_deleted: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class BackendStatus:
    address: str  # ip:port
    weight: float | None = None  # probability (iptables), weight (ipvs) or slot share
    local: bool = False


@dataclass(slots=True)
class FrontendStatus:
    kind: str  # ClusterIP | NodePort | ExternalIP | LoadBalancer
    address: str  # vip:port or *:nodePort
    protocol: str


@dataclass(slots=True)
class ServiceStatus:
    """One service port as read back from the kernel (not from the daemon's memory)."""

    name: str  # namespace/name:port/protocol (as far as the kernel state records it)
    family: int
    frontends: list[FrontendStatus] = field(default_factory=list)
    backends: list[BackendStatus] = field(default_factory=list)
    affinity_seconds: int = 0
    notes: list[str] = field(default_factory=list)


class DataPlane(Protocol):
    """A proxy mode. Implementations must be safe to construct without touching the kernel."""

    mode: str
    # Optional attribute ``full_resync_period`` (seconds): how often the daemon forces a full sync
    # (default: hourly, like kube-proxy's iptables mode; cheap modes resync every syncPeriod).

    def setup(self) -> None:
        """Check prerequisites and create static state (base chains, tables, interfaces).

        Must adopt existing state left by a previous run without interrupting traffic.
        Raises SetupError with a clear message when the node cannot run this mode.
        """

    def sync(self, snapshot: ProxySnapshot, changes: Changes, full: bool) -> SyncResult:
        """Make the kernel match ``snapshot``; touch only what ``changes`` names unless ``full``."""

    def cleanup(self) -> bool:
        """Remove everything this mode ever created; return True if anything was found."""

    def status(self) -> list[ServiceStatus]:
        """Read the kernel's current state back, by service port."""


def enable_localhost_nodeports(config: ProxyConfig) -> None:
    """NodePorts on 127.0.0.1 need route_localnet (kube-proxy sets it too); only when they are wanted."""
    if not (config.localhost_nodeports and not config.nodeport_addresses):
        return
    try:
        with open("/proc/sys/net/ipv4/conf/all/route_localnet", "w") as f:
            f.write("1")
    except OSError as e:
        logging.getLogger(__name__).warning("cannot enable route_localnet (localhost NodePorts will not work): %s",
                                            e)


MODES: dict[str, str] = {
    "iptables": "kproxy.dataplane.iptables:IptablesDataPlane",
    "nftables": "kproxy.dataplane.nftables:NftablesDataPlane",
    "ipvs": "kproxy.dataplane.ipvs:IpvsDataPlane",
    "ebpf": "kproxy.dataplane.ebpf:EbpfDataPlane",
}


def load(mode: str, config: ProxyConfig) -> DataPlane:
    """Instantiate the data plane for ``mode`` (imports only that mode's package)."""
    try:
        target = MODES[mode]
    except KeyError:
        raise SetupError(f"unknown proxy mode {mode!r} (supported: {', '.join(MODES)})") from None
    mod_name, _, cls_name = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(mod_name):
            raise SetupError(f"proxy mode {mode!r} is not available in this build") from None
        raise
    cls = getattr(mod, cls_name, None)
    if cls is None:
        raise SetupError(f"proxy mode {mode!r} is not available in this build")
    return cls(config)
