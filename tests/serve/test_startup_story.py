"""What `paphos run` tells a user: the start-up lines (model, CPU path, weights loaded, KV cache,
URL), each exactly once; the resolved config at debug level only, with resolved values and only
the settings of the device; the periodic stats line while requests run; fast start-up errors that
name the flag to fix, before torch is imported."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from paphos.config import EngineConfig
from paphos.engine.stats_logger import StatsLogger
from paphos.sampling_params import SamplingParams
from paphos.serve.server_config import ServerConfig
from paphos.serve.startup_log import log_startup

ENGINE_KWARGS = dict(device="cpu", dtype="float32", kv_cache_space=0.01, max_model_len=128)


@pytest.fixture(scope="module")
def started(tiny_llama_dir, tmp_path_factory):
    """An engine built with every paphos log record captured, then `log_startup` run on it."""
    from paphos.engine.engine import Engine

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger("paphos")
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), **ENGINE_KWARGS)
        engine = Engine(config)
        log_startup(config, engine, ServerConfig(port=4321), "tiny")
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    yield engine, records
    engine.shutdown()


def _messages(records, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == level]


@pytest.mark.parametrize(
    "start",
    [
        "model ",
        "CPU kernels: ",
        "loaded ",
        "KV cache: ",
        "serving tiny on http://127.0.0.1:4321/v1",
    ],
)
def test_each_startup_line_appears_exactly_once(started, start) -> None:
    _, records = started
    assert sum(m.startswith(start) for m in _messages(records)) == 1, _messages(records)


def test_startup_lines_say_what_runs_and_what_fits(started, tiny_llama_dir) -> None:
    engine, records = started
    info = "\n".join(_messages(records))
    model_line = next(m for m in _messages(records) if m.startswith("model "))
    assert f"model {tiny_llama_dir.name}: LlamaForCausalLM, paphos's implementation" in model_line
    assert "dtype float32; quantization none; device cpu" in model_line
    assert "GiB of weights in " in info and " s (UnquantizedLinearMethod" in info
    blocks = engine.num_kv_blocks
    fit = blocks * 16 // 128
    assert (
        f"KV cache: {blocks} blocks of 16 tokens ({blocks * 16} tokens); max_model_len 128; "
        in info
    )
    assert f"{fit} sequences of max_model_len fit at once" in info


def test_resolved_config_is_debug_only_with_resolved_values_for_the_device(
    started, tiny_llama_dir
) -> None:
    _, records = started
    debug = _messages(records, logging.DEBUG)
    assert "resolved engine config:" in debug
    assert not any("resolved engine config" in m for m in _messages(records))
    settings = dict(m.split(None, 1) for m in debug if m.startswith("  "))
    assert settings["tokenizer"] == str(tiny_llama_dir)
    assert settings["max_model_len"] == "128"
    assert settings["dtype"] == "float32" and settings["device"] == "cpu"
    assert settings["served_model_name"] == "tiny"
    assert settings["async_scheduling"] == "False"
    assert "None" not in settings.values()
    # CUDA-only settings are not shown on a CPU run; CPU ones are
    assert "gpu_memory_utilization" not in settings and "enforce_eager" not in settings
    assert "kv_cache_space" in settings and "num_threads" in settings


def test_stats_logger_reports_rates_and_stays_quiet_when_idle_or_early() -> None:
    def stats(prompt, gen, running=0, waiting=0, queries=0, hits=0, preempted=0):
        return SimpleNamespace(
            num_prompt_tokens_total=prompt,
            num_generation_tokens_total=gen,
            num_running=running,
            num_waiting=waiting,
            kv_cache_usage=0.25,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            num_preemptions=preempted,
        )

    stats_logger = StatsLogger(10.0, stats(0, 0), now=0.0)
    assert stats_logger.line(stats(100, 50, running=2), now=5.0) is None  # interval not over
    line = stats_logger.line(stats(200, 100, 2, 1, 64, 16, 1), now=10.0)
    assert line == (
        "prompt 20.0 tok/s, generation 10.0 tok/s; running 2, waiting 1; KV cache 25.0% used; "
        "prefix cache hit rate 25.0%; preemptions 1"
    )
    assert stats_logger.line(stats(200, 100, 0, 0, 64, 16, 1), now=20.0) is None  # nothing ran
    with pytest.raises(ValueError, match="log_stats_interval"):
        StatsLogger(0.0, stats(0, 0), now=0.0)


def _serve_one_request(model_dir, interval: float | None, caplog) -> list[str]:
    """Stats lines logged while an AsyncEngine over a fresh engine serves one request."""
    from paphos.engine.async_engine import AsyncEngine
    from paphos.engine.engine import Engine

    engine = Engine(EngineConfig.from_kwargs(model=str(model_dir), **ENGINE_KWARGS))

    async def run() -> None:
        async_engine = AsyncEngine(engine, log_stats_interval_s=interval)
        async_engine.start()
        try:
            params = SamplingParams(max_tokens=24, ignore_eos=True)
            prompt = {"prompt_token_ids": [5, 9, 17, 33]}
            async for _ in async_engine.generate(prompt, params, "r"):
                await asyncio.sleep(0.01)  # a slow reader: the request spans several intervals
            await asyncio.sleep(0.1)
        finally:
            async_engine.shutdown()

    with caplog.at_level(logging.INFO, logger="paphos.engine.async_engine"):
        asyncio.run(run())
    return [r.getMessage() for r in caplog.records if "tok/s" in r.getMessage()]


def test_stats_line_appears_while_serving_and_not_when_disabled(tiny_llama_dir, caplog) -> None:
    lines = _serve_one_request(tiny_llama_dir, 0.02, caplog)
    assert lines and all("running" in line and "KV cache" in line for line in lines)
    assert any("generation 0.0 tok/s" not in line for line in lines)  # tokens went through
    caplog.clear()
    assert _serve_one_request(tiny_llama_dir, None, caplog) == []


def _cli_in_subprocess(*argv: str) -> subprocess.CompletedProcess:
    """Run `paphos` ARGV in a fresh interpreter; stdout says whether torch was imported by then."""
    code = textwrap.dedent(
        f"""
        import sys
        from paphos.serve.cli import main
        try:
            main({list(argv)!r})
        except SystemExit:
            pass
        print("torch imported:", "torch" in sys.modules)
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_missing_model_path_fails_before_torch_is_imported(tmp_path) -> None:
    done = _cli_in_subprocess("run", str(tmp_path / "nope"))
    assert "torch imported: False" in done.stdout, done.stderr
    assert f"--model='{tmp_path / 'nope'}' does not exist" in done.stderr
    assert "HF model directory or a .gguf file" in done.stderr


def test_bad_config_value_fails_before_the_model_is_read_and_names_its_flag(tiny_llama_dir) -> None:
    done = _cli_in_subprocess("run", str(tiny_llama_dir), "--block-size", "12")
    assert "torch imported: False" in done.stdout, done.stderr
    assert "--block-size=12 is invalid: expected a multiple of 8" in done.stderr


def test_flag_names_rewrites_field_names_as_flags() -> None:
    from paphos.serve.cli import build_parser, flag_names

    _, dests = build_parser()
    message = "max_model_len=9 does not fit: raise kv_cache_space/gpu_memory_utilization"
    assert flag_names(message, dests) == (
        "--max-model-len=9 does not fit: raise --kv-cache-space/--gpu-memory-utilization"
    )
    assert flag_names("the model path", dests) == "the model path"  # prose stays prose
    quoted = "model='/data/kv_cache_space/m' holds no block_size=3"
    assert flag_names(quoted, dests) == "--model='/data/kv_cache_space/m' holds no --block-size=3"


def test_home_paths_expand_for_the_model(tiny_llama_dir, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tiny_llama_dir.parent))
    config = EngineConfig.from_kwargs(model=f"~/{tiny_llama_dir.name}", device="cpu")
    assert config.model.model == str(tiny_llama_dir)


def test_fused_decode_off_message_says_why_in_words(caplog) -> None:
    from paphos.layers import cpu_decode
    from paphos.quant.gguf import GGUFLinearMethod

    quantized = SimpleNamespace(linear_method=object.__new__(GGUFLinearMethod))
    reason = cpu_decode.quantized_reason([None, quantized])
    assert reason is not None and "quantized (GGUFLinearMethod)" in reason
    with caplog.at_level(logging.INFO, logger="paphos.layers.cpu_decode"):
        assert cpu_decode.build_fused_decode([reason], anchor=None) is None
    assert caplog.messages == [
        "fused CPU decode off (decode steps run layer by layer): layer 0: " + reason
    ]


def test_a_taken_port_fails_before_the_model_loads_naming_the_flag() -> None:
    import socket

    from paphos.serve.cli import build_parser, check_port_free, flag_names

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError) as error:
            check_port_free("127.0.0.1", port)
    message = flag_names(str(error.value), build_parser()[1])
    assert f"cannot listen on 127.0.0.1:{port}" in message and "--port=N" in message
    check_port_free("127.0.0.1", port)  # free again
