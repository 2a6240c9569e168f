#!/bin/sh
# Install kproxy's CNI plugins (kproxy-bridge, kproxy-host-local) and network config onto a node.
#
# Meant to run as an initContainer of the kproxy DaemonSet with the node's CNI directories mounted
# (hostPath) at /host/opt/cni/bin and /host/etc/cni/net.d, but works directly on a node as well:
#
#   install-cni.sh [--bin-dir DIR] [--conf-dir DIR] [--node-bin-dir DIR] [--python PATH] [--pod-cidr CIDR]
#                  [--no-conf]
#
#   --bin-dir       where to write the plugins            (env CNI_BIN_DIR,      default /host/opt/cni/bin)
#   --conf-dir      where to write 10-kproxy.conflist      (env CNI_CONF_DIR,     default /host/etc/cni/net.d)
#   --node-bin-dir  the bin dir as the *node* sees it      (env CNI_NODE_BIN_DIR, default /opt/cni/bin)
#   --python        interpreter on the node (>= 3.11)      (env CNI_NODE_PYTHON,  default /usr/bin/python3)
#   --pod-cidr      this node's pod CIDR for the conflist  (env POD_CIDR; in a cluster, default: the Node's
#                   spec.podCIDR read from the API with the pod's service account and env NODE_NAME;
#                   elsewhere 10.244.0.0/24)
#   --conflist      conflist template to install            (env CNI_CONFLIST,     default: 10-kproxy.conflist
#                   next to this script, else the built-in copy of it)
#   --no-conf       install the binaries only
#
# Layout written to the bin dir:
#   kproxy-bridge, kproxy-host-local   launchers: "#!<python> -SE", no site-packages, no entry-point
#                                      machinery, so a plugin starts in a few ms (pod start latency)
#   kproxy-cni.d/{cni,pyroute2}        the plugin code and its only dependency, pre-compiled
# Every file is staged and then renamed into place, so kubelet/containerd never exec a half-written
# plugin, and re-running the script is an idempotent upgrade.
set -eu

BIN_DIR=${CNI_BIN_DIR:-/host/opt/cni/bin}
CONF_DIR=${CNI_CONF_DIR:-/host/etc/cni/net.d}
NODE_BIN_DIR=${CNI_NODE_BIN_DIR:-/opt/cni/bin}
NODE_PYTHON=${CNI_NODE_PYTHON:-/usr/bin/python3}
POD_CIDR=${POD_CIDR:-}
SRC_PYTHON=${SRC_PYTHON:-python3}   # the interpreter that has kproxy (and pyroute2) installed, in the image
WRITE_CONF=1
CONFLIST=${CNI_CONFLIST:-}
node_bin_set=${CNI_NODE_BIN_DIR:+1}

while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --conf-dir) CONF_DIR=$2; shift 2 ;;
    --node-bin-dir) NODE_BIN_DIR=$2; node_bin_set=1; shift 2 ;;
    --python) NODE_PYTHON=$2; shift 2 ;;
    --pod-cidr) POD_CIDR=$2; shift 2 ;;
    --no-conf) WRITE_CONF=0; shift ;;
    --conflist) CONFLIST=$2; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "install-cni.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
# Every node needs its own pod range (kube-controller-manager's Node.spec.podCIDR): the downward API cannot
# expose it, so in a cluster it is read from the API server with the pod's service account.
node_pod_cidr() {
  "$SRC_PYTHON" - <<'PY'
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
if ":" in host:
    host = f"[{host}]"
with open(sa + "/token") as f:
    token = f.read().strip()
req = urllib.request.Request(f"https://{host}:{port}/api/v1/nodes/{os.environ['NODE_NAME']}",
                             headers={"Authorization": "Bearer " + token, "Accept": "application/json"})
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
spec = json.load(urllib.request.urlopen(req, context=ctx, timeout=10)).get("spec") or {}
cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
print(cidrs[0] if cidrs else "")
PY
}
if [ -z "$POD_CIDR" ] && [ "$WRITE_CONF" = 1 ] && [ -n "${KUBERNETES_SERVICE_HOST:-}" ] && [ -n "${NODE_NAME:-}" ]; then
  POD_CIDR=$(node_pod_cidr) || { echo "install-cni.sh: cannot read Node $NODE_NAME's podCIDR" >&2; exit 1; }
  [ -n "$POD_CIDR" ] || { echo "install-cni.sh: Node $NODE_NAME has no spec.podCIDR (set POD_CIDR)" >&2; exit 1; }
fi
POD_CIDR=${POD_CIDR:-10.244.0.0/24}
# Installing straight onto a node (no hostPath indirection): the node path is the bin dir itself.
[ -n "$node_bin_set" ] || [ "$BIN_DIR" != "${BIN_DIR#/host/}" ] || NODE_BIN_DIR=$BIN_DIR

here=$(cd "$(dirname "$0")" && pwd)
pkgdir() {
  "$SRC_PYTHON" -c 'import importlib.util,sys; print(importlib.util.find_spec(sys.argv[1]).submodule_search_locations[0])' "$1"
}
CNI_SRC=$(pkgdir cni)
PYROUTE2_SRC=$(pkgdir pyroute2)

mkdir -p "$BIN_DIR"
stage="$BIN_DIR/.kproxy-cni.d.$$"
trap 'rm -rf "$stage" "$BIN_DIR/.kproxy-bridge.$$" "$BIN_DIR/.kproxy-host-local.$$"' EXIT
mkdir -p "$stage"
for src in "$CNI_SRC" "$PYROUTE2_SRC"; do
  (cd "$(dirname "$src")" && tar --exclude=__pycache__ -cf - "$(basename "$src")") | (cd "$stage" && tar -xf -)
done
# Pre-compile so the first pod does not pay for it (only used when the node python is the same version).
if [ -x "$NODE_PYTHON" ]; then "$NODE_PYTHON" -m compileall -q "$stage" >/dev/null 2>&1 || true; fi
if [ -d "$BIN_DIR/kproxy-cni.d" ]; then mv "$BIN_DIR/kproxy-cni.d" "$BIN_DIR/.kproxy-cni.d.old.$$"; fi
mv "$stage" "$BIN_DIR/kproxy-cni.d"
rm -rf "$BIN_DIR/.kproxy-cni.d.old.$$"

launcher() { # name module
  tmp="$BIN_DIR/.$1.$$"
  cat >"$tmp" <<LAUNCHER
#!$NODE_PYTHON -SE
# kproxy CNI plugin launcher, written by install-cni.sh
import sys
sys.path.insert(0, "$NODE_BIN_DIR/kproxy-cni.d")
from $2 import main
sys.exit(main())
LAUNCHER
  chmod 0755 "$tmp"
  mv -f "$tmp" "$BIN_DIR/$1"
}
launcher kproxy-bridge cni.bridge
launcher kproxy-host-local cni.host_local

if [ "$WRITE_CONF" = 1 ]; then
  mkdir -p "$CONF_DIR"
  tmp="$CONF_DIR/.10-kproxy.conflist.$$"
  if [ -z "$CONFLIST" ] && [ -f "$here/10-kproxy.conflist" ]; then CONFLIST=$here/10-kproxy.conflist; fi
  if [ -n "$CONFLIST" ]; then
    sed "s#__POD_CIDR__#$POD_CIDR#g" "$CONFLIST" >"$tmp"
  else # the script was copied somewhere on its own: same content as deploy/cni/10-kproxy.conflist
    cat >"$tmp" <<CONF
{
  "cniVersion": "1.1.0",
  "name": "kproxy",
  "plugins": [
    {
      "type": "kproxy-bridge",
      "bridge": "kproxy0",
      "isGateway": true,
      "isDefaultGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "kproxy-host-local",
        "dataDir": "/var/lib/cni/networks",
        "ranges": [[{"subnet": "$POD_CIDR"}]]
      }
    }
  ]
}
CONF
  fi
  mv -f "$tmp" "$CONF_DIR/10-kproxy.conflist"
fi
echo "install-cni.sh: installed kproxy-bridge, kproxy-host-local into $BIN_DIR" >&2
[ "$WRITE_CONF" = 1 ] && echo "install-cni.sh: wrote $CONF_DIR/10-kproxy.conflist (pod CIDR $POD_CIDR)" >&2
exit 0
