"""nftables proxy mode: flat verdict and endpoint maps in ``ip kproxy`` / ``ip6 kproxy`` (see render.py)."""

from .proxier import NftablesDataPlane

__all__ = ["NftablesDataPlane"]
