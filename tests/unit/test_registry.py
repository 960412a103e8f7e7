"""ModelRegistry: lazy built-ins, out-of-tree registration checked against the contract, plugins."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

from paphos.models.registry import ModelRegistry, contract_problems, load_plugins

GOOD_MODEL_SOURCE = textwrap.dedent(
    """
    from torch import nn

    class PluginForCausalLM(nn.Module):
        def __init__(self, config, linear_method, parallel, prefix=""):
            super().__init__()

        def forward(self, input_ids, positions, kv_caches, attn_metadata):
            return input_ids

        def compute_logits(self, hidden_states, attn_metadata):
            return hidden_states

        def load_weights(self, weights):
            return set()

    CALLS = []

    def register():
        from paphos.models.registry import ModelRegistry

        CALLS.append(1)
        ModelRegistry.register_model("PluginForCausalLM", PluginForCausalLM)
    """
)


class GoodForCausalLM(nn.Module):
    def __init__(self, config, linear_method, parallel, prefix=""):
        super().__init__()

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        return input_ids

    def compute_logits(self, hidden_states, attn_metadata):
        return hidden_states

    def load_weights(self, weights):
        return set()


class NoLoadWeightsForCausalLM(nn.Module):
    def __init__(self, config, linear_method, parallel):
        super().__init__()

    def forward(self, input_ids, positions, attn_metadata):
        return input_ids

    def compute_logits(self, hidden_states, attn_metadata):
        return hidden_states


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test sees only the built-ins and no plugins loaded; the real registry is restored."""
    monkeypatch.setattr(ModelRegistry, "_models", dict(ModelRegistry._models))
    monkeypatch.setattr(ModelRegistry, "_plugins_loaded", False)


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch) -> Path:
    """An installed-looking distribution with a `paphos.plugins` entry point, on sys.path."""
    (tmp_path / "paphos_test_plugin.py").write_text(GOOD_MODEL_SOURCE)
    dist_info = tmp_path / "paphos_test_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: paphos-test-plugin\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[paphos.plugins]\ntest_plugin = paphos_test_plugin:register\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "paphos_test_plugin", raising=False)
    return tmp_path


def test_llama_is_builtin_and_registry_import_does_not_import_it():
    assert "LlamaForCausalLM" in ModelRegistry.supported_architectures()
    code = "import sys, paphos.models.registry; print('paphos.models.llama' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unsupported_architecture_error_lists_supported_ones():
    ModelRegistry.register_model("GoodForCausalLM", GoodForCausalLM)
    with pytest.raises(ValueError) as info:
        ModelRegistry.resolve("NopeForCausalLM")
    # other tests in the same process may have registered more architectures: list them all
    supported = ModelRegistry.supported_architectures()
    assert {"GoodForCausalLM", "LlamaForCausalLM"} <= set(supported)
    message = str(info.value)
    assert message.startswith(
        "architecture 'NopeForCausalLM' is not supported; closest supported: "
    )
    assert "--model-impl transformers" in message
    assert message.endswith(f"(all supported: {', '.join(supported)})")


def test_unsupported_architecture_error_names_the_closest_families_first():
    message = str(ModelRegistry.unsupported_error("LlamaForCausalLLM"))
    closest = message.split("closest supported: ")[1].split(";")[0].split(", ")
    assert closest[0] == "LlamaForCausalLM" and len(closest) <= 3


def test_registered_class_resolves_to_itself():
    ModelRegistry.register_model("GoodForCausalLM", GoodForCausalLM)
    assert ModelRegistry.resolve("GoodForCausalLM") is GoodForCausalLM
    assert ModelRegistry.is_supported("GoodForCausalLM")
    assert contract_problems(GoodForCausalLM) == []


def test_registering_invalid_class_names_every_missing_part():
    with pytest.raises(ValueError) as info:
        ModelRegistry.register_model("NoLoadWeightsForCausalLM", NoLoadWeightsForCausalLM)
    assert str(info.value) == (
        f"cannot register 'NoLoadWeightsForCausalLM': {NoLoadWeightsForCausalLM!r} does not "
        "follow the paphos model contract: missing load_weights(weights); "
        "forward() lacks parameter 'kv_caches'"
    )
    assert not ModelRegistry.is_supported("NoLoadWeightsForCausalLM")


class BadInitForCausalLM(GoodForCausalLM):
    def __init__(self, config, tokenizer):
        super().__init__(config, None, None)


class ExtraArgForCausalLM(GoodForCausalLM):
    def __init__(self, config, linear_method, parallel, vocab):
        super().__init__(config, linear_method, parallel)


class NoForwardForCausalLM(nn.Module):
    def __init__(self, config, linear_method, parallel):
        super().__init__()

    def compute_logits(self, hidden_states, attn_metadata):
        return hidden_states

    def load_weights(self, weights):
        return set()


@pytest.mark.parametrize(
    ("cls", "problem"),
    [
        (BadInitForCausalLM, "__init__ does not accept (config, linear_method, parallel)"),
        (ExtraArgForCausalLM, "__init__ requires unexpected parameter 'vocab'"),
        (NoForwardForCausalLM, "missing forward(input_ids, positions, kv_caches, attn_metadata)"),
        (dict, "it is not a torch.nn.Module subclass"),
        (GoodForCausalLM(None, None, None), "it is not a torch.nn.Module subclass"),
    ],
)
def test_registering_class_that_breaks_contract_fails(cls, problem):
    with pytest.raises(ValueError, match="does not follow the paphos model contract") as info:
        ModelRegistry.register_model("XForCausalLM", cls)
    assert str(info.value).endswith(problem)


@pytest.mark.parametrize("path", ["no_colon", "a:b:c", "mod:", ":Cls", "mod:Cls.attr", "1mod:C"])
def test_malformed_class_path_is_rejected_at_registration(path):
    with pytest.raises(ValueError, match="is not of the form 'module:Class'"):
        ModelRegistry.register_model("XForCausalLM", path)


@pytest.mark.parametrize("arch", ["", None, 3])
def test_bad_architecture_name_is_rejected(arch):
    with pytest.raises(ValueError, match="arch="):
        ModelRegistry.register_model(arch, GoodForCausalLM)


def test_class_path_is_imported_only_on_resolve(plugin_dir):
    ModelRegistry.register_model("PluginForCausalLM", "paphos_test_plugin:PluginForCausalLM")
    assert "paphos_test_plugin" not in sys.modules
    cls = ModelRegistry.resolve("PluginForCausalLM")
    assert cls.__name__ == "PluginForCausalLM" and cls.__module__ == "paphos_test_plugin"
    assert ModelRegistry.resolve("PluginForCausalLM") is cls


def test_class_path_that_breaks_contract_fails_on_resolve(plugin_dir):
    ModelRegistry.register_model("XForCausalLM", "paphos_test_plugin:register")
    with pytest.raises(ValueError, match="cannot register 'XForCausalLM'.*not a torch.nn.Module"):
        ModelRegistry.resolve("XForCausalLM")


@pytest.mark.parametrize(
    ("path", "reason"),
    [("paphos_no_such_module:Model", "No module named"), ("paphos.parallel:Missing", "no Missing")],
)
def test_class_path_that_cannot_be_imported_fails_on_resolve(path, reason):
    ModelRegistry.register_model("XForCausalLM", path)
    expected = re.escape(f"cannot import '{path}' for architecture 'XForCausalLM'") + f".*{reason}"
    with pytest.raises(ValueError, match=expected):
        ModelRegistry.resolve("XForCausalLM")


def test_registering_a_builtin_again_replaces_it():
    ModelRegistry.register_model("LlamaForCausalLM", GoodForCausalLM)
    assert ModelRegistry.resolve("LlamaForCausalLM") is GoodForCausalLM


def test_load_plugins_runs_each_entry_point_once_per_process(plugin_dir):
    assert load_plugins() == ["test_plugin"]
    assert load_plugins() == []
    assert sys.modules["paphos_test_plugin"].CALLS == [1]
    assert ModelRegistry.resolve("PluginForCausalLM").__module__ == "paphos_test_plugin"


def test_plugin_models_exist_in_a_fresh_worker_process(plugin_dir):
    code = (
        "from paphos.models.registry import ModelRegistry, load_plugins\n"
        "load_plugins()\n"
        "print(ModelRegistry.resolve('PluginForCausalLM').__module__)\n"
    )
    python_path = os.pathsep.join(filter(None, [str(plugin_dir), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    out = run
    assert out.stdout.strip() == "paphos_test_plugin"


def _model_config(arch: str, impl: str):
    from types import SimpleNamespace

    from paphos.config import ModelConfig

    return ModelConfig(model="x", model_impl=impl, hf_config=SimpleNamespace(architectures=[arch]))


def test_model_impl_picks_native_fallback_or_refuses():
    from paphos.models.transformers_impl import TransformersForCausalLM

    llama = ModelRegistry.resolve("LlamaForCausalLM")
    assert ModelRegistry.resolve_for(_model_config("LlamaForCausalLM", "auto")) is llama
    assert ModelRegistry.resolve_for(_model_config("LlamaForCausalLM", "paphos")) is llama
    fallback = ModelRegistry.resolve_for(_model_config("LlamaForCausalLM", "transformers"))
    assert fallback is TransformersForCausalLM
    assert ModelRegistry.resolve_for(_model_config("HeliumForCausalLM", "auto")) is fallback
    with pytest.raises(ValueError, match="--model-impl transformers"):
        ModelRegistry.resolve_for(_model_config("HeliumForCausalLM", "paphos"))
    with pytest.raises(ValueError, match="transformers has no such architecture either"):
        ModelRegistry.resolve_for(_model_config("NopeForCausalLM", "auto"))


def test_unsupported_architecture_error_says_what_to_do() -> None:
    message = str(ModelRegistry.unsupported_error("NoSuchForCausalLM"))
    for hint in ("--model-impl transformers", "docs/adding_a_model.md", "register_model"):
        assert hint in message
