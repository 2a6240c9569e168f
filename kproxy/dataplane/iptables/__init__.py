"""iptables proxy mode (kube-proxy's iptables semantics, KPROXY- chains, atomic iptables-restore)."""

from .proxier import IptablesDataPlane

__all__ = ["IptablesDataPlane"]
