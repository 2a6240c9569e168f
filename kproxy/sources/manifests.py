"""A directory of Kubernetes manifests as the source of desired state (kproxy's standalone mode).

Files ending in ``.yaml``, ``.yml`` or ``.json`` may hold several documents (``---``) or a ``kind: List``.
Services, EndpointSlices and Nodes are used; other kinds are ignored. The directory is rescanned every
``interval`` seconds (default 0.25 s) by file size and mtime, so an added, edited or removed file is
picked up well within 1 s; only changed files are re-parsed. A file that fails to parse keeps its
previous objects (a half-written file must not delete Services) and is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..store import KIND_NODE, KIND_SERVICE, KIND_SLICE, ClusterStore, Event

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
KINDS = {"Service": KIND_SERVICE, "EndpointSlice": KIND_SLICE, "Node": KIND_NODE}

try:  # the C loader is ~10x faster on large directories
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Loader = yaml.SafeLoader


def _ident(kind: str, obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    ns = "" if kind == KIND_NODE else (meta.get("namespace") or "default")
    return (kind, ns, str(meta.get("name", "")))


def parse_documents(text: str, filename: str) -> list[tuple[str, dict[str, Any]]]:
    """Return [(kind, object)] for every supported object in one file's text."""
    if filename.endswith(".json"):
        docs: list[Any] = [json.loads(text)]
    else:
        docs = list(yaml.load_all(text, Loader=_Loader))
    out: list[tuple[str, dict[str, Any]]] = []
    stack = [d for d in docs if d]
    while stack:
        doc = stack.pop(0)
        if not isinstance(doc, dict):
            raise ValueError(f"{filename}: a document is not an object")
        kind = doc.get("kind")
        if kind == "List" or (isinstance(kind, str) and kind.endswith("List") and "items" in doc):
            stack.extend(i for i in doc.get("items") or [] if i)
            continue
        if kind in KINDS:
            out.append((KINDS[kind], doc))
    return out


@dataclass
class _FileState:
    stamp: tuple[int, int]
    idents: set[tuple[str, str, str]] = field(default_factory=set)


class ManifestsSource:
    """Feeds a ClusterStore from a directory, watching it for changes."""

    def __init__(self, directory: str, interval: float = 0.25) -> None:
        self.directory = directory
        self.interval = interval
        self._files: dict[str, _FileState] = {}
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}

    def scan(self, store: ClusterStore) -> int:
        """Rescan once; apply what changed; return the number of store changes."""
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(SUFFIXES) and not n.startswith("."))
        except FileNotFoundError:
            names = []
        events: list[Event] = []
        current: set[str] = set()
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            current.add(name)
            stamp = (st.st_mtime_ns, st.st_size)
            prev = self._files.get(name)
            if prev is not None and prev.stamp == stamp:
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    objs = parse_documents(f.read(), name)
            except (OSError, ValueError, yaml.YAMLError) as e:
                log.warning("manifests: cannot load %s (keeping its previous objects): %s", path, e)
                if prev is not None:
                    prev.stamp = stamp
                else:
                    self._files[name] = _FileState(stamp)
                continue
            idents = set()
            for kind, obj in objs:
                ident = _ident(kind, obj)
                idents.add(ident)
                if self._objects.get(ident) != obj:
                    self._objects[ident] = obj
                    events.append(Event("MODIFIED", kind, obj))
            old = prev.idents if prev else set()
            events.extend(self._deleted(old - idents, exclude=name))
            self._files[name] = _FileState(stamp, idents)
        for name in set(self._files) - current:
            events.extend(self._deleted(self._files.pop(name).idents, exclude=name))
        return store.apply(events) if events else 0

    def _deleted(self, idents: set[tuple[str, str, str]], exclude: str) -> list[Event]:
        out = []
        for ident in idents:
            # The same object may also be defined in another file; only delete when no file has it.
            if any(ident in fs.idents for n, fs in self._files.items() if n != exclude):
                continue
            self._objects.pop(ident, None)
            kind, ns, name = ident
            meta = {"name": name} if kind == KIND_NODE else {"name": name, "namespace": ns}
            out.append(Event("DELETED", kind, {"metadata": meta}))
        return out

    async def run(self, store: ClusterStore) -> None:
        if not os.path.isdir(self.directory):
            log.warning("manifests: %s does not exist (yet); waiting for it", self.directory)
        self.scan(store)
        store.synced = True
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.scan(store)
            except Exception:
                log.exception("manifests: scan of %s failed", self.directory)
