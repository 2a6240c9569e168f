"""The ebpf proxy mode (see :mod:`.dataplane`): bcc-compiled socket LB + tc NodePort programs."""

from .dataplane import EbpfDataPlane

__all__ = ["EbpfDataPlane"]
