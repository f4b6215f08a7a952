"""Registers Param2MoE's config with transformers' AutoConfig (model types param2moe and
bailing_moe_v2), so `AutoConfig.from_pretrained(dir)` works without trust_remote_code. (The model class,
`param2moe.hf_model`, registers with AutoModelForCausalLM when it is imported.)

transformers is optional and heavy: if it is already imported we register at once, otherwise a
tiny import hook registers the moment something imports it. A transformers release that defines a
model type itself keeps its own class for it in AutoConfig.
"""

from __future__ import annotations

import importlib.abc
import sys

from .config import MODEL_TYPES, Param2MoEConfig

_registered = False
CONFIG_CLASSES: dict[str, type] = {}  # model type -> our PretrainedConfig subclass (made by register())


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from transformers import AutoConfig, PretrainedConfig

    for model_type in MODEL_TYPES:
        def __init__(self, **kwargs):
            # Our dataclass holds the one list of keys and defaults (docs/model.md §2); validate through it.
            # architectures, the token ids and torch_dtype are PretrainedConfig's own: leave them to it.
            own = {"model_type", "architectures", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id",
                   "tie_word_embeddings"}
            known = {k: kwargs.pop(k) for k in list(kwargs) if k in Param2MoEConfig.__dataclass_fields__
                     and k not in own}
            if {"vocab_size", "hidden_size"} <= known.keys():
                ours = Param2MoEConfig.from_dict({"model_type": self.model_type, **known})
                known = {k: v for k, v in ours.to_dict().items() if k not in own}
            for key, value in known.items():
                if key == "rope_scaling" and value is None:  # transformers 5 aliases it (with a warning)
                    continue
                setattr(self, key, value)
            PretrainedConfig.__init__(self, **kwargs)

        cls = type(f"Param2MoEConfig_{model_type}", (PretrainedConfig,), {"model_type": model_type,
                                                                          "__init__": __init__})
        CONFIG_CLASSES[model_type] = cls
        try:
            AutoConfig.register(model_type, cls)
        except ValueError:  # a transformers release that defines it already
            pass


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            try:
                register()
            except Exception:  # never break the user's import of transformers
                pass

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
