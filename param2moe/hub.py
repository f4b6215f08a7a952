"""`--model` as a Hugging Face Hub id: a folder is taken as it is; anything else that reads as a Hub id
(`org/name`) is fetched through huggingface_hub, which keeps its cache (HF_HOME, HF_HUB_CACHE), honours
HF_HUB_OFFLINE (the cached snapshot, no network) and HF_TOKEN, and takes a revision."""

from __future__ import annotations

import os
import re

# What the engine reads from a checkpoint; pickled weights (*.bin, *.pt) are never fetched (checkpoint.py
# refuses them).
_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(OSError):
    """The model is neither a folder nor a Hub id that could be fetched; the message says which and why."""


def resolve_model(model: str, revision: str | None = None) -> str:
    """The local folder of `model` (a folder, or a Hub id fetched into the Hub's cache)."""
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ModelNotFoundError(f"model {model!r} is a file; expected a checkpoint folder or a Hub id")
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model folder {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(f"model {model!r} is not a folder, and fetching it from the Hugging Face Hub "
                                 "needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return snapshot_download(model, revision=revision, allow_patterns=_FILES)
    except Exception as e:  # huggingface_hub's errors have no common base: not found, offline, network, auth
        offline = " (HF_HUB_OFFLINE is set and it is not in the cache)" if _offline() else ""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        at = f" at revision {revision!r}" if revision else ""
        raise ModelNotFoundError(f"model {model!r}: no such folder, and the Hugging Face Hub could not provide "
                                 f"it{at}{offline}: {type(e).__name__}: {reason}") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
