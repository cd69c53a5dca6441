"""Services and endpoints from ordinary Kubernetes YAML files, reloaded when they change.

PATH is a file or a directory (searched recursively for *.yaml, *.yml and *.json). Files may
hold several documents and `kind: List` objects. Kinds other than Service, EndpointSlice and
Endpoints are ignored, so a whole application manifest can be pointed at.

A file that does not parse is reported and its previously loaded objects stay in force (a
half-saved edit does not take services down); a document that parses but is not a valid
object is reported with its file, index, name and reason, and skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog
import yaml

from userproxy.sources.router import KINDS, ObjectRouter

log = structlog.get_logger("userproxy.manifests")

SUFFIXES = (".yaml", ".yml", ".json")
Loaded = list[tuple[Mapping[str, Any], str]]
Signature = tuple[tuple[str, int, int], ...]


class ManifestError(ValueError):
    pass


def manifest_files(path: Path) -> list[Path]:
    try:
        if path.is_dir():
            return sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if path.exists():
            return [path]
    except OSError as err:  # unreadable, or out of descriptors (EMFILE)
        raise ManifestError(f"{path}: {err.strerror or err}") from None
    raise ManifestError(f"{path}: no such file or directory")


def load_file(path: Path) -> Loaded:
    """The proxy-relevant objects of one file, each with its origin `file: document N`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: {_first_line(err)}") from None
    documents = []
    try:
        for document in yaml.safe_load_all(text):
            documents.append(document)
    except Exception as err:
        # YAMLError, and what PyYAML's constructors raise for well-formed but impossible
        # values (ValueError for a date like 2024-02-30 or `!!int abc`, KeyError for
        # `!!bool maybe`, RecursionError for very deep nesting).
        where = f"document {len(documents)}"
        raise ManifestError(f"{path}: {where}: {_first_line(err) or type(err).__name__}") from None
    loaded: Loaded = []
    for index, doc in enumerate(documents):
        origin = f"{path}: document {index}"
        for obj in _objects(doc, origin=origin):
            loaded.append((obj, origin))
    return loaded


def _objects(doc: Any, *, origin: str) -> Iterator[Mapping[str, Any]]:
    if doc is None:
        return
    if not isinstance(doc, Mapping):
        log.error(
            "Skipped a document that is not a Kubernetes object.",
            origin=origin,
            reason=f"it is a {type(doc).__name__}, not a mapping",
        )
        return
    if doc.get("kind") == "List" or str(doc.get("kind", "")).endswith("List"):
        items = doc.get("items") or ()
        if not isinstance(items, list | tuple):
            log.error("Skipped a List whose items are not a list.", origin=origin)
            return
        for item in items:
            yield from _objects(item, origin=origin)
    elif doc.get("kind") in KINDS:
        yield doc


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def signature(files: list[Path]) -> Signature:
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(out)


class ManifestSource:
    def __init__(
        self,
        path: Path,
        router: ObjectRouter,
        *,
        poll_interval: float = 1.0,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.router = router
        self.poll_interval = poll_interval
        self.on_change = on_change
        self._by_file: dict[Path, Loaded] = {}
        self._signature: Signature = ()
        #: The path's last read failure, logged once while it lasts.
        self._last_error = ""
        self.loads = 0

    def load(self) -> None:
        """Read every file and make the routed objects equal to what they hold."""
        files = manifest_files(self.path)
        self._signature = signature(files)
        by_file: dict[Path, Loaded] = {}
        for f in files:
            try:
                by_file[f] = load_file(f)
            except ManifestError as err:
                log.error(
                    "Could not read a manifest file; keeping what it held before.", reason=str(err)
                )
                by_file[f] = self._by_file.get(f, [])
        self._by_file = by_file
        self.router.replace_all(obj for loaded in by_file.values() for obj in loaded)
        self.loads += 1
        self.on_change()

    async def watch(self) -> None:
        """Poll for changes (mtime, size, file set) and reload; runs until cancelled."""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                current = signature(manifest_files(self.path))
            except ManifestError as err:
                if str(err) != self._last_error:
                    log.error(
                        "Cannot read the manifest path; keeping the current services.",
                        reason=str(err),
                    )
                self._last_error = str(err)
                continue
            self._last_error = ""
            if current != self._signature:
                log.info("Manifests changed; reloading.", path=str(self.path))
                self.load()
