"""Cluster DNS: the Kubernetes DNS-Based Service Discovery records (schema 1.1.0), served and exported.

Modules, one job each:

- :mod:`.records` — Services, EndpointSlices, Nodes → resource records (pure).
- :mod:`.table` — merges records into RRsets and prebuilds every response as bytes; incremental builds.
- :mod:`.zone` — keeps a table in step with a :class:`~kproxy.store.ClusterStore` (``dns`` consumer).
- :mod:`.wire` — the hot path: plain queries answered by slicing the packet and one dict lookup.
- :mod:`.slow` — everything else, parsed with dnspython: errors, ANY, pod records, deferrals.
- :mod:`.server` — :class:`~.server.DnsService`: UDP + TCP on uvloop, upstream forwarding.
- :mod:`.export` — RFC 1035 master files for ``named-checkzone``.
- :mod:`.cli` — ``kproxy dns`` and ``kproxy dns export``.

kproxy extension (not in the spec): for NodePort and LoadBalancer Services,
``_<port>._<proto>.<svc>.<ns>.nodeport.<zone>`` SRV → ``<node>.node.<zone>`` with the node port, one per
node, and ``<node>.node.<zone>`` A/AAAA → the Node's InternalIP/ExternalIP addresses, so clients outside
the pod network can find node ports.
"""
