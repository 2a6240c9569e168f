"""kproxy's CNI plugins: ``kproxy-bridge`` (main plugin) and ``kproxy-host-local`` (IPAM).

Both are drop-in replacements for the reference ``bridge`` and ``host-local`` plugins of
containernetworking/plugins (CNI spec 0.3.0 .. 1.1.0, including STATUS and GC).

Modules:

- :mod:`cni._skel`     -- shared dispatch layer (env, stdin, version negotiation, errors, result formats)
- :mod:`cni.host_local` -- IPAM plugin, on-disk state compatible with the reference host-local
- :mod:`cni.bridge`    -- bridge + veth main plugin, delegates IPAM to any IPAM binary in ``CNI_PATH``
- :mod:`cni._nl`       -- minimal rtnetlink client built on pyroute2's message classes
- :mod:`cni.runtime`   -- helper that executes plugins the way a container runtime does

Plugin start-up time is part of pod start latency, so this package must stay import-light:
nothing here is imported at package import time.
"""
