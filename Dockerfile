# kproxy node image: the proxy daemon plus the kernel tools its data planes and CNI installer use.
#
#   docker build -t kproxy:0.1.0 .                       # iptables, nftables, ipvs modes
#   docker build --build-arg WITH_BCC=1 -t kproxy:0.1.0 . # adds python3-bpfcc for the ebpf mode
FROM debian:12-slim

ARG WITH_BCC=0

# iptables ships both iptables-nft (Debian's default) and iptables-legacy; kproxy picks the one the node
# uses (--iptables-backend=auto). kmod for modprobe of ip_vs/nf_conntrack through the /lib/modules mount.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends \
        iptables nftables ipset conntrack iproute2 kmod ca-certificates \
        python3 python3-venv; \
    if [ "$WITH_BCC" = "1" ]; then apt-get install -y --no-install-recommends python3-bpfcc; fi; \
    rm -rf /var/lib/apt/lists/*

COPY . /opt/kproxy

# --system-site-packages lets the venv import Debian's bcc bindings (python3-bpfcc) when installed;
# everything kproxy depends on is installed into the venv itself, which takes precedence.
RUN set -eux; \
    python3 -m venv --system-site-packages /opt/kproxy/.venv; \
    /opt/kproxy/.venv/bin/pip install --no-cache-dir --disable-pip-version-check /opt/kproxy; \
    chmod 0755 /opt/kproxy/deploy/cni/install-cni.sh; \
    /opt/kproxy/.venv/bin/kproxy --version

# the ebpf mode compiles bpf/kproxy_lb.c (or loads KPROXY_BPF_OBJECT, a precompiled object) at start
ENV PATH=/opt/kproxy/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KPROXY_BPF_DIR=/opt/kproxy/bpf

ENTRYPOINT ["/opt/kproxy/.venv/bin/kproxy"]
