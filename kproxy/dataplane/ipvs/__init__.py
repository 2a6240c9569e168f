"""``--proxy-mode ipvs``: Services as IPVS virtual servers, like kube-proxy's and kube-router's IPVS modes.

* Every ClusterIP, externalIP and LoadBalancer IP is an address on the dummy interface ``kube-ipvs0``;
  each VIP:port:protocol, and each node address:nodePort, is an IPVS virtual server whose real servers are
  the endpoints (masquerade / NAT forwarding, weight 1).
* Per-Service facts the packet path needs beyond IPVS (which traffic to masquerade, hairpin, which VIP
  ports exist) live in ipsets (``KUBE-CLUSTER-IP``, ``KUBE-LOOP-BACK``, ``KUBE-NODE-PORT-TCP`` ...), matched
  by a fixed set of ~40 iptables rules in ``KPROXY-IPVS-*`` chains: the rule count does not grow with the
  number of Services.
* Schedulers: ``--ipvs-scheduler`` / ``ipvs.scheduler`` (rr by default), per Service with the annotation
  ``kproxy.io/ipvs-scheduler``; ``sh`` and ``mh`` get the fallback flag so a draining (weight 0) real server
  is skipped. sessionAffinity ClientIP is IPVS persistence with the Service's timeout.
* Graceful termination, incremental sync and adoption on restart: see :mod:`.proxier`.

IPVS connection timeouts and long-lived idle connections
    IPVS tracks TCP connections itself and forgets an idle ESTABLISHED connection after its TCP timeout
    (kernel default 900 s); the next packet of that connection then hits no IPVS entry and is reset. Linux
    sends the first TCP keepalive only after ``net.ipv4.tcp_keepalive_time`` = 7200 s, so idle keepalive
    connections (database pools, gRPC, message queues) through a Service break after 15 minutes. Either
    lower the keepalive time of the clients below the IPVS timeout (``net.ipv4.tcp_keepalive_time=600``
    in the pods; the usual fix) or raise ``ipvs.tcpTimeout`` above it (e.g. ``7260s``; costs memory for
    half-dead entries). kproxy applies ``ipvs.tcpTimeout``, ``ipvs.tcpFinTimeout`` and ``ipvs.udpTimeout``
    to the kernel when they are non-zero (0 keeps the kernel's value); ``kproxy status`` shows the values
    in effect.
"""

from .proxier import IpvsDataPlane

__all__ = ["IpvsDataPlane"]
