"""The subset of rtnetlink link messages (``ifinfmsg``) the bridge plugin uses, on pyroute2's nla machinery.

pyroute2's own ``pyroute2.netlink.rtnl.ifinfmsg`` describes every link kind the kernel knows and imports
a dozen plugin modules (bond, vxlan, team, can, ...) to do so: ~25 ms of every ADD, for attributes we never
send or read. This module declares only the attributes kproxy-bridge needs, with their kernel numbers, on
top of pyroute2's ``nlmsg``/``nla`` encoder and decoder; anything else the kernel sends is decoded as an
unknown attribute and ignored. ``tests/cni/test_cni_units.py`` checks that every message built here encodes
byte-for-byte like pyroute2's full ``ifinfmsg``.
"""

from __future__ import annotations

from pyroute2.netlink import NLA_F_NESTED, nla, nlmsg

AF_BRIDGE = 7

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_FIELDS = (
    ("family", "B"),
    ("__align", "x"),
    ("ifi_type", "H"),
    ("index", "i"),
    ("flags", "I"),
    ("change", "I"),
)


class _ifinf:
    """Attributes shared by the message and the veth peer (which carries its own ifinfomsg)."""

    prefix = "IFLA_"
    fields = _FIELDS
    nla_map = (
        (1, "IFLA_ADDRESS", "l2addr"),
        (3, "IFLA_IFNAME", "asciiz"),
        (4, "IFLA_MTU", "uint32"),
        (5, "IFLA_LINK", "uint32"),
        (10, "IFLA_MASTER", "uint32"),
        (12, "IFLA_PROTINFO", "protinfo"),
        (18, "IFLA_LINKINFO", "linkinfo"),
        (26, "IFLA_AF_SPEC", "af_spec"),
        (28, "IFLA_NET_NS_FD", "uint32"),
    )

    # IFLA_PROTINFO and IFLA_AF_SPEC only have the bridge layout in AF_BRIDGE messages; in replies of other
    # families the kernel puts per-protocol data there, which is left undecoded ("hex").
    @staticmethod
    def protinfo(self: Any, *argv: Any, **kwarg: Any) -> Any:
        return self.protinfo_bridge if self["family"] == AF_BRIDGE else self.hex

    @staticmethod
    def af_spec(self: Any, *argv: Any, **kwarg: Any) -> Any:
        return self.af_spec_bridge if self["family"] == AF_BRIDGE else self.hex

    class protinfo_bridge(nla):
        # The kernel only takes bridge port attributes as a nested IFLA_PROTINFO.
        nla_flags = NLA_F_NESTED
        prefix = "IFLA_BRPORT_"
        nla_map = ((4, "IFLA_BRPORT_MODE", "uint8"),)

    class af_spec_bridge(nla):
        prefix = "IFLA_BRIDGE_"
        nla_map = (
            (0, "IFLA_BRIDGE_FLAGS", "uint16"),
            (2, "IFLA_BRIDGE_VLAN_INFO", "vlan_info"),
        )

        class vlan_info(nla):
            prefix = ""
            fields = (("flags", "H"), ("vid", "H"))

    class linkinfo(nla):
        prefix = "IFLA_INFO_"
        nla_map = (
            (1, "IFLA_INFO_KIND", "asciiz"),
            (2, "IFLA_INFO_DATA", "info_data"),
        )

        @staticmethod
        def info_data(self: Any, *argv: Any, **kwarg: Any) -> Any:
            """IFLA_INFO_DATA's layout depends on IFLA_INFO_KIND (pyroute2 resolves this per message)."""
            kind = self.get_attr("IFLA_INFO_KIND")
            return {"bridge": self.bridge_data, "veth": self.veth_data}.get(kind, self.hex)

        class bridge_data(nla):
            prefix = "IFLA_BR_"
            nla_map = ((7, "IFLA_BR_VLAN_FILTERING", "uint8"),)

        class veth_data(nla):
            nla_map = ((1, "VETH_INFO_PEER", "peer"),)

            @staticmethod
            def peer(self: Any, *argv: Any, **kwarg: Any) -> Any:
                return ifinfpeer


class ifinfmsg(_ifinf, nlmsg):
    pass


class ifinfpeer(_ifinf, nla):
    pass
