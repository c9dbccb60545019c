"""`from_pretrained` for DeFINE checkpoints, through transformers' own loader.

The model class is subclassed for the load only: its __init__ builds the transformers model and
applies the saved DeFINE settings, so transformers' `from_pretrained` builds a model that already
has the DeFINE modules (on the meta device) and loads, casts, places, reports and initialises it
as it does for its own models. Every argument goes to transformers and means what it means
there; afterwards the instance gets its own class back.
"""
from __future__ import annotations

import os
import re

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ...define import DeFINE
from .convert import CONFIG_KEY, FORMAT_VERSION, convert

# The lowest transformers whose loader restores a module's extra state (DeFINE keeps the
# description of its options there); setup.py's extra [hf] asks for it too.
MIN_TRANSFORMERS = (5, 4)
# Where the config is found: copied (not taken) from the caller's arguments to read the settings.
_CONFIG_LOOKUP_KEYS = ("cache_dir", "force_download", "local_files_only", "proxies", "token",
                       "revision", "subfolder", "trust_remote_code")


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_transformers_version() -> None:
    if _version_tuple(transformers.__version__) < MIN_TRANSFORMERS:
        wanted = ".".join(map(str, MIN_TRANSFORMERS))
        raise ImportError(f"define_kernels' from_pretrained needs transformers>={wanted} (its loader restores "
                          f"DeFINE's saved options); found {transformers.__version__}")


def _saved_settings(config) -> dict | None:
    saved = getattr(config, CONFIG_KEY, None) if config is not None else None
    return saved if isinstance(saved, dict) and "define" in saved else None


def _read_config(source, kwargs: dict):
    lookup = {key: kwargs[key] for key in _CONFIG_LOOKUP_KEYS if key in kwargs}
    return AutoConfig.from_pretrained(source, **lookup)


def _settings_and_config(path, kwargs: dict):
    """(saved DeFINE settings, the config that picks the class): from `config=` when it has
    the settings, else from the checkpoint's own config."""
    given = kwargs.get("config")
    if given is not None and not isinstance(given, (PretrainedConfig, str, os.PathLike)):
        raise TypeError(f"config must be a PretrainedConfig or a path, got {type(given).__name__}")
    config = given if isinstance(given, PretrainedConfig) or given is None else _read_config(given, kwargs)
    saved = _saved_settings(config)
    if saved is None and path is not None:
        checkpoint_config = _read_config(path, kwargs)
        saved = _saved_settings(checkpoint_config)
        config = config if config is not None else checkpoint_config
    if config is None:
        raise ValueError("pretrained_model_name_or_path is None: pass config= (and state_dict=), "
                         "as with transformers' from_pretrained")
    where = path if path is not None else "config"
    if saved is None:
        raise ValueError(f"{where}: config has no {CONFIG_KEY!r} entry; this is not a checkpoint saved "
                         "after use_define (load it with transformers' from_pretrained)")
    if saved.get("format") != FORMAT_VERSION:
        raise ValueError(f"{where}: {CONFIG_KEY} format {saved.get('format')!r} is not supported "
                         f"(this version reads {FORMAT_VERSION})")
    return saved, config


def _concrete_class(model_class, config) -> type:
    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        raise TypeError("model_class must be a transformers Auto class (e.g. AutoModelForCausalLM) or a "
                        f"PreTrainedModel subclass, got {model_class!r}")
    from transformers.models.auto.auto_factory import _get_model_class
    try:
        return _get_model_class(config, mapping)
    except (KeyError, ValueError):
        raise ValueError(f"model_class {model_class.__name__} has no model for "
                         f"{type(config).__name__}") from None


def _prefix_mapping(config, base: type) -> dict | None:
    """key_mapping for a checkpoint saved from a task class whose body has another name than
    `base`'s (Llama's causal LM keeps it in `model.`, its QA class in `transformer.`).

    transformers adds or strips one base-model prefix but does not rename one into another, so
    such a load would leave the whole body, DeFINE included, at its init.
    """
    architectures = getattr(config, "architectures", None) or []
    source = getattr(transformers, architectures[0], None) if architectures else None
    if not (isinstance(source, type) and issubclass(source, PreTrainedModel)):
        return None
    src, dst = source.base_model_prefix, base.base_model_prefix
    source_is_body = any(candidate is source for candidate in _base_model_classes(config))
    if not src or not dst or src == dst or source_is_body:
        return None
    return {f"^{re.escape(src)}\\.": f"{dst}."}


def _base_model_classes(config) -> list:
    try:
        found = transformers.MODEL_MAPPING[type(config)]
    except KeyError:
        return []
    return list(found) if isinstance(found, (list, tuple)) else [found]


def _loader_class(base: type, saved: dict) -> type:
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        convert(self, saved["define"], saved["tie"], saved["head_bias"])
        for _, embedding in _define_modules(self):
            # transformers' init knows no DeFINE: missing DeFINE weights are set after the load
            for module in embedding.modules():
                module._is_hf_initialized = True

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__,
                                         "__qualname__": base.__qualname__, "__doc__": base.__doc__})


def _define_modules(model) -> list:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, DeFINE)]


@torch.no_grad()
def _finish_define(model, missing: set) -> None:
    """DeFINE's own init for its weights the checkpoint lacked (reported missing), then what
    DeFINE's load_state_dict would do: zero padding row, no stale inference table."""
    for name, embedding in _define_modules(model):
        prefix = f"{name}." if name else ""
        absent = {key[len(prefix):] for key in missing if key.startswith(prefix)}
        absent.discard("_extra_state")
        if absent:
            kept = {key: value.detach().clone() for key, value in embedding.state_dict().items()
                    if key not in absent and isinstance(value, torch.Tensor) and key != "_extra_state"}
            embedding.reset_parameters()
            params = dict(embedding.named_parameters())
            for key, value in kept.items():
                if key in params:
                    params[key].copy_(value)
        embedding._zero_padding_row()
        embedding.cache.clear()
        for module in embedding.modules():
            module.__dict__.pop("_is_hf_initialized", None)


def from_pretrained(pretrained_model_name_or_path, model_class=AutoModelForCausalLM, *model_args, **kwargs):
    """Load a DeFINE model saved with `save_pretrained` (after `use_define`).

    The same call as `<model_class>.from_pretrained(pretrained_model_name_or_path, *model_args,
    **kwargs)` in transformers, with the DeFINE modules rebuilt from `config.define_kernels`
    first: dtype (a torch.dtype, "bfloat16", "auto", ...), device_map, output_loading_info,
    ignore_mismatched_sizes, config=, state_dict=, attn_implementation, revision, ... all keep
    their transformers meaning; an argument nothing takes raises TypeError naming it.

    model_class: an Auto class (default AutoModelForCausalLM) or a concrete PreTrainedModel
    class. Another class than the one saved works as in transformers (causal LM <-> base model
    <-> sequence / token classification / QA): new heads are initialised and reported as
    missing keys, weights the class has no place for as unexpected keys, and the DeFINE weights
    are always loaded; where the two classes name the body differently (Llama's causal LM
    `model.`, its QA class `transformer.`), the body is renamed (a key_mapping, unless one is
    given), which transformers alone does not do. The saved `tie` applies to a class with an LM head; a class without one
    gets no head. DeFINE weights absent from the checkpoint (e.g. a partial state_dict=) get
    DeFINE's own init and are reported missing. Returns the model in eval mode, or (model,
    loading info) with output_loading_info=True.
    """
    check_transformers_version()
    path = pretrained_model_name_or_path
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path must be a path or a model id, got {type(path).__name__}")
    saved, config = _settings_and_config(path, kwargs)
    base = _concrete_class(model_class, config)
    want_info = bool(kwargs.pop("output_loading_info", False))
    if "key_mapping" not in kwargs and path is not None:
        try:
            mapping = _prefix_mapping(_read_config(path, kwargs), base)
        except (OSError, ValueError):  # weights without a config.json (config= given): no class to read
            mapping = None
        if mapping:
            kwargs["key_mapping"] = mapping
    model, info = _loader_class(base, saved).from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
    model.__class__ = base
    _finish_define(model, set(info.get("missing_keys", ())))
    return (model, info) if want_info else model
