"""Tokenizers and chat templates: an HF tokenizer from a model directory or a GGUF file.

Invariant: the tokenizer returned encodes exactly as transformers' own for the same source, and its
`chat_template` is the user's override when one was given, else the model's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from paphos.config import ModelConfig

# Any one of these makes a directory loadable by AutoTokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
)


def get_tokenizer(model_config: ModelConfig) -> PreTrainedTokenizerBase | None:
    """Load the tokenizer for `model_config` (None when `skip_tokenizer_init` is set)."""
    if model_config.skip_tokenizer_init:
        return None
    source = model_config.tokenizer or model_config.gguf_file or model_config.model
    if source.endswith(".gguf") and os.path.isfile(source):
        tokenizer = _tokenizer_from_gguf(source)
    elif os.path.isdir(source):
        tokenizer = _tokenizer_from_dir(source)
    else:
        raise ValueError(f"tokenizer source {source!r} is neither a .gguf file nor a directory")
    if model_config.chat_template is not None:
        tokenizer.chat_template = load_chat_template(model_config.chat_template)
    return tokenizer


def _tokenizer_from_gguf(path: str) -> PreTrainedTokenizerBase:
    # The class-level loader reads only the vocabulary and merges (~0.5 s for SmolLM2);
    # AutoTokenizer first re-derives the model config through gguf.GGUFReader (~6 s).
    directory, name = os.path.split(os.path.abspath(path))
    return PreTrainedTokenizerFast.from_pretrained(directory, gguf_file=name, local_files_only=True)


def _tokenizer_from_dir(directory: str) -> PreTrainedTokenizerBase:
    present = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))]
    if not present:
        raise ValueError(
            f"{directory!r} holds no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); "
            "pass tokenizer=<dir> or skip_tokenizer_init=True (CLI: --tokenizer DIR or "
            "--skip-tokenizer-init) to work with token ids only"
        )
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the tokenizer of {directory!r}: {e}") from e


def load_chat_template(template_or_path: str) -> str:
    """A chat template given inline (Jinja text) or as a path to a file holding it."""
    if os.path.isfile(template_or_path):
        with open(template_or_path, encoding="utf-8") as f:
            return f.read()
    if "{{" in template_or_path or "{%" in template_or_path:
        return template_or_path
    raise ValueError(
        f"chat_template={template_or_path!r} is neither an existing file nor a Jinja template"
    )


def eos_token_ids(
    model_config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None
) -> list[int]:
    """EOS ids: generation_config.json (int or list), else the model config, else the tokenizer."""
    for value in (
        _generation_config_eos(model_config.model),
        getattr(model_config.text_config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None,
    ):
        ids = _as_id_list(value)
        if ids:
            return ids
    return []


def _generation_config_eos(model: str) -> Any:
    path = os.path.join(model, "generation_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("eos_token_id")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    ids: list[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"eos_token_id={value!r} is invalid: expected ints >= 0")
        if v not in ids:
            ids.append(v)
    return ids


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> str:
    """Render `messages` to prompt text (not tokens) with the given or the model's template."""
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if not template:
        raise ValueError(
            "the model has no chat template: pass chat_template=<jinja text or file> "
            "or use a completion prompt instead"
        )
    if isinstance(messages, (str, bytes)) or not all(
        isinstance(m, Mapping) and "role" in m for m in messages
    ):
        raise ValueError(f"messages={messages!r} is invalid: expected a list of {{'role', ...}}")
    text = tokenizer.apply_chat_template(
        list(messages),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    assert isinstance(text, str)
    return text
