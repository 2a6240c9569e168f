"""``kproxy dns``: serve the cluster zone, or export it as master files.

    kproxy dns --manifests DIR | --kubeconfig PATH [--zone Z] [--listen ADDR:PORT] [--upstream ADDR[:PORT]]
               [--ttl SECONDS]
    kproxy dns export --manifests DIR | --kubeconfig PATH [--zone Z] [--ttl SECONDS] [-o FILE]
               [--reverse-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

from ..store import ClusterStore


def _ttl(v: str) -> int:
    t = int(v)
    if not 0 <= t <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"TTL out of range: {v}")
    return t


def _source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--manifests", metavar="DIR", help="directory of Service/EndpointSlice/Node manifests")
    g.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig of the cluster to watch")
    p.add_argument("--zone", default="cluster.local", help="cluster domain (default cluster.local)")
    p.add_argument("--ttl", type=_ttl, default=5, help="record TTL in seconds (default 5)")
    p.add_argument("-v", "--verbose", action="store_true")


def _make_source(args: argparse.Namespace) -> Any:
    if args.manifests:
        from ..sources.manifests import ManifestsSource

        return ManifestsSource(args.manifests)
    from ..config import ProxyConfig
    from ..sources.kube import KubeSource

    return KubeSource(ProxyConfig(kubeconfig=args.kubeconfig), all_nodes=True)


def serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kproxy dns", description="Serve the cluster DNS zone (UDP+TCP).",
                                epilog="'kproxy dns export --help': write the zone as RFC 1035 master files.")
    _source_args(p)
    p.add_argument("--listen", default="127.0.0.1:53", help="ADDR:PORT to serve on (default 127.0.0.1:53)")
    p.add_argument("--upstream", default="", help="forward other names to ADDR[:PORT] (default: REFUSED)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import DnsService

    async def run() -> int:
        store = ClusterStore()
        try:
            svc = DnsService(store, zone=args.zone, listen=args.listen, upstream=args.upstream, ttl=args.ttl)
        except ValueError as e:
            print(f"kproxy dns: {e}", file=sys.stderr)
            return 2
        source = _make_source(args)
        tasks = [asyncio.create_task(source.run(store), name="source"), asyncio.create_task(svc.run(), name="dns")]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        rc = 0
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                logging.getLogger(__name__).error("%s stopped: %s", t.get_name(), t.exception())
                rc = 1
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return rc

    try:
        import uvloop

        return uvloop.run(run())
    except KeyboardInterrupt:
        return 0


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kproxy dns export", description="Write the cluster zone as master files.")
    _source_args(p)
    p.add_argument("-o", "--output", default="-", help="file for the cluster zone (default stdout)")
    p.add_argument("--reverse-dir", metavar="DIR",
                   help="also write in-addr.arpa.zone and ip6.arpa.zone (the PTR records) into DIR")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    from .export import zone_files
    from .zone import ClusterZone

    store = ClusterStore()
    zone = ClusterZone(store, args.zone, args.ttl)
    if args.manifests:
        if not os.path.isdir(args.manifests):
            print(f"kproxy dns export: {args.manifests} is not a directory", file=sys.stderr)
            return 2
        from ..sources.manifests import ManifestsSource

        ManifestsSource(args.manifests).scan(store)
    else:
        asyncio.run(_load_until_synced(_make_source(args), store))
    zone.sync()
    files = zone_files(zone.builder)
    text = files.pop(zone.zone)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    if args.reverse_dir:
        os.makedirs(args.reverse_dir, exist_ok=True)
        for origin, body in files.items():
            with open(os.path.join(args.reverse_dir, origin.rstrip(".") + ".zone"), "w", encoding="utf-8") as f:
                f.write(body)
    return 0


async def _load_until_synced(source: Any, store: ClusterStore, timeout: float = 60.0) -> None:
    task = asyncio.create_task(source.run(store))
    try:
        async with asyncio.timeout(timeout):
            while not store.synced:
                if task.done():
                    task.result()
                    raise RuntimeError("source stopped before the initial list completed")
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def main(argv: list[str]) -> int:
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    return serve_main(argv)
