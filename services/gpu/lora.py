"""LoRA adapters: which ones the GPU tier serves, under which stable integer id, from which folder.

The engine caches adapters by id, so every engine client of one engine must map a name to the
same id and path, and an id is never given to another adapter. `AdapterRegistry` keeps that map
in a small JSON file the workers share (docs/architecture.md, "LoRA adapters"). Nothing here runs
for a request on the base model.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

from services.lora_modules import LoraModule


class Adapter(BaseModel):
    """One served adapter: its name, the engine's integer id for it, and its resolved path."""

    name: str
    id: int = Field(ge=1)
    path: str
    base_model_name: str | None = None


def resolve_adapter_path(path: str) -> str:
    """A local folder for an adapter: the folder itself, the folder of a BentoML model-store tag,
    or the value unchanged (vLLM then tries it as a Hugging Face id)."""
    if Path(path).is_dir():
        return str(Path(path).resolve())
    if "/" not in path and not path.startswith("."):
        try:
            import bentoml

            return bentoml.models.get(path).path
        except Exception:  # not in the store (or not a valid tag): left to vLLM
            pass
    return path


def sanitize_message(message: str) -> str:
    """An engine error as a client may see it: no memory addresses, tracebacks or server paths
    (vLLM 0.32's `sanitize_message`, same patterns, so the messages match its server's)."""
    message = re.sub(r" at 0x[0-9a-fA-F]+>", ">", message)
    message = re.sub(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?', "", message)
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()


def default_registry_path() -> str:
    """The replica's run directory, which all its engine clients share and which is new each
    time the replica starts (services/gpu/engine_clients.py); without one (one engine client, or
    outside `bentoml serve`), a fresh folder of this process."""
    from services.gpu.engine_clients import RUN_DIR_ENV

    run_dir = os.environ.get(RUN_DIR_ENV)
    folder = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="lora-registry-"))
    return str(folder / "lora-adapters.json")


class AdapterRegistry:
    """Adapter name -> (id, path), the same in every process that shares `path` (see the module
    docstring). Reads are cheap: a `stat` of the file, parsed again only when it changed."""

    def __init__(self, configured: list[LoraModule], path: str | None = None, *, resolve=resolve_adapter_path) -> None:
        self.path = Path(path or default_registry_path())
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._configured = [
            Adapter(name=m.name, id=i, path=resolve(m.path), base_model_name=m.base_model_name)
            for i, m in enumerate(configured, start=1)
        ]
        self._resolve = resolve
        self._stamp: tuple[int, int] | None = None
        self._adapters: dict[str, Adapter] = {}
        self._next_id = len(self._configured) + 1
        with self._locked():
            state = self._read()
            # a file of another configuration (or none): start from this one's adapters
            if state is None or state.get("configured") != [a.model_dump() for a in self._configured]:
                self._write({a.name: a for a in self._configured}, len(self._configured) + 1)
            else:
                self._take(state)

    @classmethod
    def read_only(cls, path: Path) -> AdapterRegistry:
        """The registry at `path`, which the replica's workers keep, for reading only (the KV
        indexer's lora id -> name)."""
        registry = cls.__new__(cls)
        registry.path, registry._lock_path = Path(path), Path(path).with_name(Path(path).name + ".lock")
        registry._configured, registry._resolve = [], resolve_adapter_path
        registry._stamp, registry._adapters, registry._next_id = None, {}, 1
        return registry

    # --- reading ---------------------------------------------------------------------------------

    def get(self, name: str) -> Adapter | None:
        """The adapter served under `name`, or None."""
        self._refresh()
        return self._adapters.get(name)

    def name_of(self, adapter_id: int) -> str | None:
        """The name of the adapter the engine knows by `adapter_id` (None: none served now)."""
        return next((adapter.name for adapter in self.adapters() if adapter.id == adapter_id), None)

    def adapters(self) -> list[Adapter]:
        """Every adapter served now, in id order."""
        self._refresh()
        return sorted(self._adapters.values(), key=lambda adapter: adapter.id)

    # --- changing (each under the file lock) -------------------------------------------------------

    def reserve(self, name: str, path: str, *, inplace: bool = False) -> Adapter:
        """The adapter `name` would be with its files at `path`: its old id when it is reloaded in
        place, else the next id never used (spent now, whatever happens next). Nothing is served
        until `commit`: the lock is not held while the engine loads the adapter."""
        with self._locked():
            self._take(self._read() or {})
            known = self._adapters.get(name)
            if known is not None and not inplace:
                raise AdapterExists(name)
            if known is not None:
                return known.model_copy(update={"path": self._resolve(path)})
            adapter = Adapter(name=name, id=self._next_id, path=self._resolve(path))
            self._write(self._adapters, self._next_id + 1)
            return adapter

    def commit(self, adapter: Adapter, *, inplace: bool = False) -> None:
        """Serve `adapter` (reserved, and accepted by the engine) from now on."""
        with self._locked():
            self._take(self._read() or {})
            if adapter.name in self._adapters and not inplace:
                raise AdapterExists(adapter.name)  # another worker loaded the name meanwhile
            self._write({**self._adapters, adapter.name: adapter}, self._next_id)

    def remove(self, name: str) -> Adapter:
        """Stop serving `name` (KeyError if it is not served); its id is not given out again."""
        with self._locked():
            self._take(self._read() or {})
            removed = self._adapters[name]
            self._write({key: a for key, a in self._adapters.items() if key != name}, self._next_id)
            return removed

    # --- the file ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        if (stat.st_ino, stat.st_mtime_ns) != self._stamp:
            self._take(self._read() or {})

    def _read(self) -> dict | None:
        try:
            stat = self.path.stat()
            state = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        state["_stamp"] = (stat.st_ino, stat.st_mtime_ns)
        return state

    def _take(self, state: dict) -> None:
        if not state:
            return
        self._adapters = {item["name"]: Adapter.model_validate(item) for item in state.get("adapters", [])}
        self._next_id = int(state.get("next_id", len(self._configured) + 1))
        self._stamp = tuple(state["_stamp"]) if "_stamp" in state else None

    def _write(self, adapters: dict[str, Adapter], next_id: int) -> None:
        state = {
            "configured": [a.model_dump() for a in self._configured],
            "adapters": [a.model_dump() for a in sorted(adapters.values(), key=lambda a: a.id)],
            "next_id": next_id,
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".adapters-", suffix=".json")
        with os.fdopen(fd, "w") as out:
            json.dump(state, out)
        os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one
        stat = self.path.stat()
        self._adapters, self._next_id, self._stamp = dict(adapters), next_id, (stat.st_ino, stat.st_mtime_ns)


class AdapterExists(Exception):
    """A load of a name already served, without `load_inplace`."""
