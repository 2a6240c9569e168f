#!/usr/bin/env bash
# Installs everything kproxy needs on a Debian 12 machine (as root) and creates ./.venv with the project.
# Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PKGS=(python3 python3-venv python3-dev gcc iproute2 iptables nftables ipset conntrack
          containernetworking-plugins dnsutils bind9-utils iperf3 wrk procps psmisc curl
          qemu-system-x86 linux-image-amd64 busybox-static ipvsadm kmod
          python3-bpfcc bpfcc-tools bpftool linux-headers-amd64 dnsperf)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing apt packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.kproxy-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
# bcc (eBPF) comes from Debian's python3-bpfcc: make it visible to the venv without exposing all of dist-packages.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$site/bcc" ]; then
  ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi
echo "setup: ok (.venv ready)" >&2
