"""Running the ``nft`` tool: one atomic transaction per call (``nft -f -``), JSON listings."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from .. import SetupError, SyncError

NFT = "nft"


def available() -> str:
    path = shutil.which(NFT)
    if path is None:
        raise SetupError("the nft command is missing (install the 'nftables' package)")
    return path


def apply(script: str, timeout: float = 120.0) -> None:
    """Commit ``script`` as one nftables transaction; raise SyncError (nothing applied) on failure."""
    try:
        p = subprocess.run([NFT, "-f", "-"], input=script, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SyncError(f"nft failed to run: {e}") from None
    if p.returncode != 0:
        err = p.stderr.strip().splitlines()
        raise SyncError("nft -f failed: " + " | ".join(err[:6]) + (" ..." if len(err) > 6 else ""))


def start(script: str, timeout: float = 120.0) -> Callable[[], None]:
    """Begin :func:`apply` of ``script`` in the background; return the function that waits for it.

    The waiter raises what :func:`apply` would have raised. A full sync uses this to let ``nft`` build
    the structure while this process encodes the element transaction (which needs that structure only
    when it is sent).
    """
    errors: list[SyncError] = []

    def run() -> None:
        try:
            apply(script, timeout)
        except SyncError as e:
            errors.append(e)

    thread = threading.Thread(target=run, name="nft-apply", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if errors:
            raise errors[0]

    return wait


def list_json(*what: str, timeout: float = 120.0, terse: bool = False) -> list[dict[str, Any]]:
    """``nft -j list <what>`` as the list of objects; [] when the object does not exist."""
    return list_json_many(what, timeout=timeout, terse=terse)


def list_json_many(*queries: tuple[str, ...], timeout: float = 120.0, terse: bool = False) -> list[dict[str, Any]]:
    """Several ``list`` commands in one nft process (``list a; list b``): their objects, in order.

    nft prints one JSON document per command, one per line.
    """
    what = "; ".join("list " + " ".join(q) for q in queries)
    try:
        argv = [NFT, *(["-t"] if terse else []), "-j", what]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SyncError(f"nft failed to run: {e}") from None
    if p.returncode != 0:
        if "No such file or directory" in p.stderr or "does not exist" in p.stderr:
            return []
        raise SyncError(f"nft {what} failed: {p.stderr.strip()[:300]}")
    try:
        return [obj for line in p.stdout.splitlines() if line.strip()
                for obj in json.loads(line).get("nftables", [])]
    except ValueError as e:
        raise SyncError(f"nft {what}: invalid JSON: {e}") from None


def flat(value: Any) -> list[Any]:
    """The components of a JSON key or value (a concatenation, a plain value or an {"elem": ...})."""
    if isinstance(value, dict):
        if "elem" in value:
            return flat(value["elem"].get("val"))
        if "concat" in value:
            out: list[Any] = []
            for v in value["concat"]:
                out.extend(flat(v))
            return out
        if "prefix" in value:
            p = value["prefix"]
            return [f"{p['addr']}/{p['len']}"]
        if "goto" in value:
            return [("goto", value["goto"]["target"])]
        if "jump" in value:
            return [("jump", value["jump"]["target"])]
        if "drop" in value:
            return [("drop", "")]
        if "accept" in value:
            return [("accept", "")]
        return [value]
    return [value]


def comment_of(value: Any) -> str:
    if isinstance(value, dict) and "elem" in value:
        return str(value["elem"].get("comment", ""))
    return ""
