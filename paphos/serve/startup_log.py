"""What `paphos run` says once the engine is built: the resolved config (debug level: only the
settings that apply to the device, each as it was resolved, not as it was given) and the URL.
The model, CPU path, weight load and KV cache lines come from the runner and the engine, once each.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from paphos.config import PART_CLASSES, EngineConfig
from paphos.models.registry import TRANSFORMERS_FALLBACK
from paphos.serve.server_config import ServerConfig

logger = logging.getLogger("paphos.serve")

# A field whose help starts with one of these applies to that device only.
_DEVICE_PREFIXES = {"cpu": "CPU:", "cuda": "CUDA:"}


def applies_to(f: dataclasses.Field, device: str) -> bool:
    """Whether config field `f` means anything on `device` ('cpu' or 'cuda')."""
    text = f.metadata.get("help", "")
    return not any(
        text.startswith(prefix) for other, prefix in _DEVICE_PREFIXES.items() if other != device
    )


def resolved_settings(config: EngineConfig, engine: Any, served_name: str) -> dict[str, Any]:
    """The user-facing settings of `config` as the running `engine` resolved them; settings of
    the other device and optional ones left unset (None: no effect) are left out."""
    runner = engine.executor.runner
    device = runner.device.type
    model = config.model
    threads = getattr(runner, "threads", None)
    backend = config.parallel.distributed_executor_backend
    fallback = type(runner.model).__module__ == TRANSFORMERS_FALLBACK.split(":")[0]
    resolved = {
        "tokenizer": "none (skip_tokenizer_init)"
        if model.skip_tokenizer_init
        else model.tokenizer or model.model,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "max_model_len": engine.max_model_len,
        "served_model_name": served_name,
        "chat_template": model.chat_template or _template_source(engine.tokenizer),
        "model_impl": "transformers" if fallback else "paphos",
        "quantization": model.quant_method or "none",
        "device": device,
        "num_threads": len(threads.cores) if threads is not None else None,
        "distributed_executor_backend": backend
        or ("uni" if config.parallel.world_size == 1 else "mp"),
        "async_scheduling": engine.executor.overlaps_steps,
    }
    out: dict[str, Any] = {}
    for part_name in PART_CLASSES:
        for f in dataclasses.fields(getattr(config, part_name)):
            if not f.metadata.get("cli", True) or not applies_to(f, device):
                continue
            value = resolved.get(f.name, getattr(getattr(config, part_name), f.name))
            if value is not None:
                out[f.name] = value
    return out


def _template_source(tokenizer: Any) -> str:
    if tokenizer is None:
        return "none"
    return "the model's" if getattr(tokenizer, "chat_template", None) else "none"


def log_startup(
    config: EngineConfig, engine: Any, server_config: ServerConfig, served_name: str
) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("resolved engine config:")
        for key, value in resolved_settings(config, engine, served_name).items():
            logger.debug("  %-28s %s", key, value)
    host = f"[{server_config.host}]" if ":" in server_config.host else server_config.host
    logger.info("serving %s on http://%s:%d/v1", served_name, host, server_config.port)
