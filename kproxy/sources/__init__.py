"""Sources of desired state: where the Services, EndpointSlices and Nodes in the store come from.

A source is any object with::

    async def run(self, store: ClusterStore) -> None

``run`` feeds the store for as long as it runs: it calls :meth:`ClusterStore.apply` with batches of
:class:`~kproxy.store.Event` (ADDED / MODIFIED / DELETED, raw API dicts) and :meth:`ClusterStore.replace`
for a complete (re)list of one kind, and sets ``store.synced = True`` once the initial state of every
kind is in (the daemon programs nothing before that, so no Service is ever programmed without its
endpoints). ``run`` only returns or raises on a fatal error (the daemon then exits); transient errors are
retried inside. Cancelling the task stops the source.

Implementations:

- :class:`kproxy.sources.kube.KubeSource`: list+watch against the Kubernetes API (the normal mode).
- :class:`kproxy.sources.manifests.ManifestsSource`: a directory of manifests (standalone mode).
"""
