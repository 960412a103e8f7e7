"""Weight loading from tiny HF Llama checkpoints made here: safetensors, sharded, .bin, dummy."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from paphos.config import ModelConfig
from paphos.models.loader import (
    check_all_loaded,
    initialize_dummy_weights,
    iterate_weights,
    load_model_weights,
    resolve_load_format,
)


def _tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _saved(tmp_path, tie: bool = False, **save_kwargs) -> tuple[dict[str, torch.Tensor], str]:
    model = _tiny_llama(tie)
    model.save_pretrained(str(tmp_path), **save_kwargs)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight")  # HF saves the tied head once, as the embedding
    return state, str(tmp_path)


def _assert_same(yielded: Iterable[tuple[str, torch.Tensor]], expected: dict[str, torch.Tensor]):
    pairs = list(yielded)
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), "a weight was yielded twice"
    assert set(names) == set(expected)
    for name, tensor in pairs:
        assert torch.equal(tensor, expected[name]), name


def test_safetensors_single_file_yields_the_hf_state_dict(tmp_path):
    expected, model_dir = _saved(tmp_path)
    assert os.path.isfile(os.path.join(model_dir, "model.safetensors"))
    config = ModelConfig(model=model_dir, load_format="safetensors")
    _assert_same(iterate_weights(config), expected)


def test_sharded_safetensors_read_every_shard_of_the_index(tmp_path):
    expected, model_dir = _saved(tmp_path, max_shard_size="50KB")
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 1
    _assert_same(iterate_weights(ModelConfig(model=model_dir)), expected)


def _save_bin(model_dir: str, state: dict[str, torch.Tensor], num_shards: int) -> None:
    """Write a .bin checkpoint as older HF versions did (transformers 5 saves safetensors only)."""
    names = sorted(state)
    if num_shards == 1:
        torch.save(state, os.path.join(model_dir, "pytorch_model.bin"))
        return
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
        shard_names = names[shard::num_shards]
        torch.save({n: state[n] for n in shard_names}, os.path.join(model_dir, file_name))
        weight_map.update(dict.fromkeys(shard_names, file_name))
    with open(os.path.join(model_dir, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_pt_bin_checkpoint_yields_the_hf_state_dict(tmp_path, num_shards):
    expected = {k: v.detach().clone() for k, v in _tiny_llama().state_dict().items()}
    _save_bin(str(tmp_path), expected, num_shards)
    torch.save({"lr": torch.ones(1)}, str(tmp_path / "training_args.bin"))  # not weights
    config = ModelConfig(model=str(tmp_path))
    assert resolve_load_format(config) == "pt"
    _assert_same(iterate_weights(config), expected)


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    expected, model_dir = _saved(tmp_path, tie=True)
    assert "lm_head.weight" not in expected
    _assert_same(iterate_weights(ModelConfig(model=model_dir)), expected)


def test_auto_prefers_safetensors_over_bin(tmp_path):
    _saved(tmp_path)
    torch.save({"junk": torch.zeros(1)}, str(tmp_path / "pytorch_model.bin"))
    assert resolve_load_format(ModelConfig(model=str(tmp_path))) == "safetensors"


def test_auto_picks_gguf_when_a_gguf_file_is_set(tmp_path):
    config = ModelConfig(model=str(tmp_path), gguf_file=str(tmp_path / "m.gguf"))
    assert resolve_load_format(config) == "gguf"


def test_directory_without_weights_raises_naming_it(tmp_path):
    with pytest.raises(ValueError, match="holds no weights"):
        list(iterate_weights(ModelConfig(model=str(tmp_path))))
    with pytest.raises(ValueError, match=r"holds no \*\.safetensors"):
        list(iterate_weights(ModelConfig(model=str(tmp_path), load_format="safetensors")))


def test_gguf_format_without_gguf_file_raises(tmp_path):
    with pytest.raises(ValueError, match="no .gguf file"):
        iterate_weights(ModelConfig(model=str(tmp_path), load_format="gguf"))


def test_index_naming_a_missing_shard_raises(tmp_path):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="do not exist"):
        list(iterate_weights(ModelConfig(model=str(tmp_path), load_format="safetensors")))


def test_bin_holding_a_non_tensor_raises(tmp_path):
    torch.save({"w": torch.zeros(2), "step": 3}, str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(ValueError, match="'step' is a int"):
        list(iterate_weights(ModelConfig(model=str(tmp_path))))


class _TinyTied(nn.Module):
    """A model following the paphos contract: load_weights returns the names it filled."""

    def __init__(self, skip_on_load: frozenset[str] = frozenset()):
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight  # tied: one parameter, two names
        self.skip_on_load = skip_on_load

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name in self.skip_on_load:
                continue
            params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded


def _save_safetensors(tmp_path, tensors: dict[str, torch.Tensor]) -> ModelConfig:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "model.safetensors"))
    return ModelConfig(model=str(tmp_path))


def test_load_model_weights_fills_parameters_and_accepts_tied_alias(tmp_path):
    tensors = {
        "embed.weight": torch.arange(32.0).reshape(8, 4),  # [vocab, hidden]
        "norm.weight": torch.full((4,), 2.0),  # [hidden]
        "norm.bias": torch.full((4,), 0.5),  # [hidden]
    }
    model = _TinyTied()
    loaded = load_model_weights(model, _save_safetensors(tmp_path, tensors))
    assert loaded == set(tensors)
    assert torch.equal(model.head.weight, tensors["embed.weight"])
    assert torch.equal(model.norm.bias, tensors["norm.bias"])


def test_load_model_weights_raises_listing_unloaded_parameters(tmp_path):
    tensors = {"embed.weight": torch.zeros(8, 4), "norm.weight": torch.ones(4)}  # no norm.bias
    with pytest.raises(ValueError, match=r"did not provide 1 parameters: norm\.bias"):
        load_model_weights(_TinyTied(), _save_safetensors(tmp_path, tensors))


def test_check_all_loaded_names_each_missing_parameter_once():
    model = _TinyTied()
    with pytest.raises(ValueError, match=r"3 parameters: embed\.weight, norm\.bias, norm\.weight"):
        check_all_loaded(model, set())
    check_all_loaded(model, {"head.weight", "norm.weight", "norm.bias"})  # alias is enough


def test_dummy_weights_are_deterministic_small_and_norms_one():
    first, second, other = _tiny_llama(), _tiny_llama(), _tiny_llama()
    initialize_dummy_weights(first, seed=7)
    initialize_dummy_weights(second, seed=7)
    initialize_dummy_weights(other, seed=8)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
        if name.endswith("norm.weight"):
            assert torch.all(tensor == 1.0), name
        else:
            assert tensor.abs().max() <= 1e-3, name
            assert not torch.equal(tensor, c[name]), name


def test_dummy_llama_produces_finite_logits():
    model = _tiny_llama()
    loaded = load_model_weights(model, ModelConfig(model="unused", load_format="dummy"), seed=3)
    assert "model.embed_tokens.weight" in loaded
    input_ids = torch.tensor([[1, 5, 9, 100]])  # [batch=1, seq=4]
    with torch.no_grad():
        logits = model(input_ids).logits  # [1, 4, vocab]
    assert torch.isfinite(logits).all()
    assert logits.abs().max() > 0


def test_iterating_dummy_format_raises():
    with pytest.raises(ValueError, match="dummy"):
        iterate_weights(ModelConfig(model="unused", load_format="dummy"))
