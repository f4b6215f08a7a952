"""The server's settings (`param2moe serve` options beyond the engine's), one dataclass field each: the
command-line flags are generated from the fields. No web framework is imported here, so the CLI can
build its parser without the server extra."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


def _opt(default, help: str, nargs: str | None = None):
    return field(default=default, metadata={"help": help, "nargs": nargs})


@dataclass
class ServerOptions:
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    api_key: str | None = _opt(None, "require `Authorization: Bearer KEY` (but on /health, /ping, /metrics, "
                                     "/version)")
    served_model_name: str | None = _opt(None, "the model's name in the API (default: the checkpoint folder's)")
    max_queued_requests: int = _opt(1024, "sequences that may wait beyond --max-num-seqs running; more get a 503")
    max_request_bytes: int = _opt(4 << 20, "largest request body; larger ones get a 413 (0: no limit)")
    drain_seconds: float = _opt(10.0, "on SIGTERM, time to let requests in flight finish")
    enable_access_log: bool = _opt(False, "log every request (4xx and 5xx replies are logged, with their request "
                                          "id, regardless)")
    lora_modules: list[str] | None = _opt(None, "with --enable-lora: LoRA adapters to serve, each NAME=PATH (a PEFT "
                                                "folder); requests name one as their model", nargs="+")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("server")
        for f in dataclasses.fields(cls):
            flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
            if f.type in (bool, "bool"):
                group.add_argument(flag, dest=f.name, action="store_true", help=help)
                continue
            kind = {"int": int, "float": float}.get(str(f.type), str)
            shown = "" if f.default is None else f" (default: {f.default})"
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help + shown,
                               nargs=f.metadata["nargs"])

    @classmethod
    def from_args(cls, args) -> ServerOptions:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
