"""Tokenizer loading (GGUF file, HF directory), chat template overrides, EOS ids, bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from paphos.config import ModelConfig, default_model_path
from paphos.tokenizer import (
    apply_chat_template,
    eos_token_ids,
    get_tokenizer,
    load_chat_template,
)

_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
_USER = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def gguf_config() -> ModelConfig:
    path = default_model_path()
    return ModelConfig(model=path, gguf_file=path)


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_config):
    return get_tokenizer(gguf_config)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, gguf_tokenizer) -> str:
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    gguf_tokenizer.save_pretrained(str(directory))
    return str(directory)


def test_skip_tokenizer_init_gives_no_tokenizer(gguf_config):
    config = ModelConfig(model=gguf_config.model, skip_tokenizer_init=True)
    assert get_tokenizer(config) is None


def test_gguf_tokenizer_has_vocab_special_tokens_and_template(gguf_tokenizer):
    assert len(gguf_tokenizer) == 49152
    assert gguf_tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in gguf_tokenizer.chat_template


def test_hf_directory_tokenizer_encodes_like_the_gguf_one(hf_dir, gguf_tokenizer):
    tokenizer = get_tokenizer(ModelConfig(model=hf_dir))
    text = "Hello, world! <|im_start|>user\nnaïve café 1234<|im_end|>"
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert tokenizer.chat_template == gguf_tokenizer.chat_template


def test_tokenizer_field_overrides_the_model_directory(tmp_path, hf_dir):
    config = ModelConfig(model=str(tmp_path), tokenizer=hf_dir)  # model dir has no tokenizer
    assert len(get_tokenizer(config)) == 49152


def test_directory_without_tokenizer_files_suggests_skip_tokenizer_init(tmp_path):
    with pytest.raises(ValueError, match="skip_tokenizer_init=True"):
        get_tokenizer(ModelConfig(model=str(tmp_path)))


def test_missing_tokenizer_hint_names_the_cli_flags(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer DIR or --skip-tokenizer-init"):
        get_tokenizer(ModelConfig(model=str(tmp_path)))


def test_missing_tokenizer_source_raises_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere"):
        get_tokenizer(ModelConfig(model=missing))


def test_chat_template_override_inline_and_from_file(tmp_path, hf_dir):
    inline = get_tokenizer(ModelConfig(model=hf_dir, chat_template=_TEMPLATE))
    assert apply_chat_template(inline, _USER) == "[user]hi there"
    template_file = tmp_path / "t.jinja"
    template_file.write_text("<{{ messages[0]['content'] }}>")
    from_file = get_tokenizer(ModelConfig(model=hf_dir, chat_template=str(template_file)))
    assert apply_chat_template(from_file, _USER) == "<hi there>"


def test_chat_template_that_is_neither_file_nor_jinja_raises():
    with pytest.raises(ValueError, match="no_such_template.jinja"):
        load_chat_template("no_such_template.jinja")


def test_apply_chat_template_with_explicit_template_and_generation_prompt(gguf_tokenizer):
    assert apply_chat_template(gguf_tokenizer, _USER, chat_template=_TEMPLATE) == "[user]hi there"
    with_prompt = apply_chat_template(gguf_tokenizer, _USER, add_generation_prompt=True)
    without = apply_chat_template(gguf_tokenizer, _USER, add_generation_prompt=False)
    assert with_prompt == without + "<|im_start|>assistant\n"


def test_apply_chat_template_without_any_template_raises(hf_dir):
    tokenizer = get_tokenizer(ModelConfig(model=hf_dir))
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(tokenizer, _USER)


@pytest.mark.parametrize("messages", ["hello", [{"content": "no role"}], [["user", "x"]]])
def test_apply_chat_template_rejects_malformed_messages(gguf_tokenizer, messages):
    with pytest.raises(ValueError, match="messages="):
        apply_chat_template(gguf_tokenizer, messages)


def test_eos_ids_prefer_generation_config_list(tmp_path, gguf_tokenizer):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 7]}))
    config = ModelConfig(model=str(tmp_path), hf_config=SimpleNamespace(eos_token_id=5))
    assert eos_token_ids(config, gguf_tokenizer) == [7, 2]


def test_eos_ids_fall_back_to_model_config_then_tokenizer(tmp_path, gguf_tokenizer):
    with_config = ModelConfig(model=str(tmp_path), hf_config=SimpleNamespace(eos_token_id=5))
    assert eos_token_ids(with_config, gguf_tokenizer) == [5]
    without = ModelConfig(model=str(tmp_path), hf_config=SimpleNamespace(eos_token_id=None))
    assert eos_token_ids(without, gguf_tokenizer) == [2]
    assert eos_token_ids(without, None) == []


def test_eos_ids_reject_invalid_values(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    with pytest.raises(ValueError, match="eos_token_id"):
        eos_token_ids(ModelConfig(model=str(tmp_path)), None)
