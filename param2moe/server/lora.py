"""The LoRA adapters a server serves, by name. Each adapter is a model id of its own: a request names it as
`model`, /v1/models lists it beside the base model (its `parent`). They come from `--lora-modules name=path`
at start and from vLLM's /v1/load_lora_adapter at run time, until /v1/unload_lora_adapter; all need
`--enable-lora`."""

from __future__ import annotations

import itertools
import json

from ..lora import LoRAError, LoRARequest
from ..lora.adapter import read_adapter_config
from .protocol import RequestError


def parse_lora_modules(specs: list[str] | None) -> list[tuple[str, str]]:
    """(name, path) of each `--lora-modules` entry: `name=path`, or vLLM's JSON form
    `{"name": "...", "path": "..."}`."""
    out = []
    for spec in specs or ():
        if spec.lstrip().startswith("{"):
            try:
                d = json.loads(spec)
                name, path = d["name"], d["path"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules {spec!r}: expected name=path or {{\"name\": ..., \"path\": ...}} "
                                 f"({e})") from None
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {spec!r}: expected name=path")
        out.append((name, path))
    return out


def check_lora_modules(specs: list[str] | None, enable_lora: bool) -> list[tuple[str, str]]:
    """--lora-modules as (name, path) pairs, each folder's adapter_config.json read: what can be checked before
    the model loads (LoRAError otherwise; the tensors are checked against the model once it is loaded)."""
    try:
        adapters = parse_lora_modules(specs)
    except ValueError as e:
        raise LoRAError(str(e)) from None
    if adapters and not enable_lora:
        raise LoRAError("--lora-modules: needs --enable-lora")
    names = [name for name, _ in adapters]
    if len(set(names)) < len(names):
        raise LoRAError(f"--lora-modules: a name given twice ({', '.join(names)})")
    for _, path in adapters:
        read_adapter_config(path)
    return adapters


class ServedAdapters:
    def __init__(self, async_engine, base_name: str):
        self.async_engine, self.base_name = async_engine, base_name
        self.enabled = async_engine.engine.lora is not None
        self.requests: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def lookup(self, name: str | None) -> LoRARequest | None:
        return self.requests.get(name) if name is not None else None

    def _new(self, name: str, path: str) -> LoRARequest:
        if not self.enabled:
            raise RequestError("this server was started without --enable-lora", "lora_name")
        if not name or not path:
            raise RequestError("lora_name and lora_path are both required", "lora_name" if not name else "lora_path")
        if name in self.requests or name == self.base_name:
            raise RequestError(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        return LoRARequest(name, next(self._ids), path)

    def register(self, name: str, path: str) -> None:
        """At start, before the engine runs (--lora-modules): read and check it now (LoRAError)."""
        try:
            request = self._new(name, path)
        except RequestError as e:
            raise LoRAError(f"--lora-modules {name}={path}: {e.message}") from None
        self.async_engine.engine.add_lora(request)
        self.requests[name] = request

    async def load(self, name: str, path: str) -> None:
        request = self._new(name, path)
        try:
            await self.async_engine.add_lora(request)
        except (LoRAError, OSError) as e:
            raise RequestError(f"loading adapter '{name}': {e}", "lora_path") from None
        self.requests[name] = request

    async def unload(self, name: str) -> None:
        request = self.requests.get(name)
        if request is None:
            raise RequestError(f"The lora adapter '{name}' cannot be found.", "lora_name", status=404,
                               code="model_not_found")
        try:
            await self.async_engine.remove_lora(request.lora_int_id)
        except LoRAError as e:
            raise RequestError(f"unloading adapter '{name}': {e}", "lora_name") from None
        del self.requests[name]

    def cards(self, created: int, max_model_len: int) -> list[dict]:
        return [{"id": name, "object": "model", "created": created, "owned_by": "param2moe", "root": r.lora_path,
                 "parent": self.base_name, "max_model_len": max_model_len} for name, r in self.requests.items()]
