"""`paphos run`: flags are generated from the config dataclasses (every user-facing field, same
defaults and choices, --x/--no-x for bools), parse into EngineConfig kwargs and a ServerConfig, and
`--help` is readable; bad flag values exit with a clear message."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

import paphos
from paphos.config import PART_CLASSES
from paphos.serve.cli import build_parser, configs_from_args, main
from paphos.serve.server_config import ServerConfig


def parse(*argv: str) -> tuple[dict, ServerConfig]:
    parser, dests = build_parser()
    return configs_from_args(parser.parse_args(["run", *argv]), dests)


def test_every_user_facing_config_field_has_a_flag_with_its_default() -> None:
    engine_kwargs, server = parse()
    for cls in PART_CLASSES.values():
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True) is False or f.name == "model":
                assert f.name not in engine_kwargs or f.name == "model"
                continue
            assert engine_kwargs[f.name] == f.default, f.name
    assert server == ServerConfig()
    assert server.port == 2242 and server.host == "127.0.0.1"


def test_flags_the_issue_names_parse_into_engine_and_server_configs() -> None:
    engine_kwargs, server = parse(
        "/models/x",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--served-model-name",
        "m",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        "1024",
        "--kv-cache-space",
        "1.5",
        "--gpu-memory-utilization",
        "0.5",
        "--block-size",
        "32",
        "--no-enable-prefix-caching",
        "--tensor-parallel-size",
        "2",
        "--device",
        "cpu",
        "--seed",
        "7",
        "--api-keys",
        "k1",
        "k2",
        "--chat-template",
        "t.jinja",
        "--load-format",
        "safetensors",
        "--uvicorn-log-level",
        "debug",
    )
    assert engine_kwargs["model"] == "/models/x"
    expected = {
        "served_model_name": "m",
        "dtype": "bfloat16",
        "max_model_len": 512,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 1024,
        "kv_cache_space": 1.5,
        "gpu_memory_utilization": 0.5,
        "block_size": 32,
        "enable_prefix_caching": False,
        "tensor_parallel_size": 2,
        "device": "cpu",
        "seed": 7,
        "chat_template": "t.jinja",
        "load_format": "safetensors",
    }
    assert {k: engine_kwargs[k] for k in expected} == expected
    assert server == ServerConfig("0.0.0.0", 8000, ("k1", "k2"), "debug")


def test_model_flag_and_positional_agree_or_fail() -> None:
    assert parse("--model", "/m")[0]["model"] == "/m"
    with pytest.raises(ValueError, match="two models"):
        parse("/a", "--model", "/b")


def test_help_is_readable_and_lists_the_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "paphos.serve.cli", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for flag in (
        "--port",
        "--max-model-len",
        "--no-enable-prefix-caching",
        "--api-keys",
        "--kv-cache-space",
        "--tensor-parallel-size",
        "(default: 2242)",
    ):
        assert flag in result.stdout, flag


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtype", "float8"], "invalid choice"),
        (["--port", "http"], "invalid int value"),
        (["--block-size", "12"], "--block-size=12"),
        (["--port", "70000"], "port=70000"),
        (["/no/such/model"], "does not exist"),
    ],
)
def test_bad_flag_values_exit_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_tool_reasoning_kobold_and_grammar_flags() -> None:
    _, server = parse(
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "qwen3_coder",
        "--reasoning-parser",
        "qwen3",
        "--no-kobold-api",
        "--grammar-compile-timeout-s",
        "5",
    )
    assert server.enable_auto_tool_choice and server.tool_call_parser == "qwen3_coder"
    assert server.reasoning_parser == "qwen3" and not server.kobold_api
    assert server.grammar_compile_timeout_s == 5.0
    assert parse()[1].kobold_api  # on by default
    with pytest.raises(ValueError, match="tool_call_parser"):
        parse("--enable-auto-tool-choice")


def test_version_prints_the_package_version_and_exits_0(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser()[0].parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"paphos {paphos.__version__}"


def test_boolean_flags_show_their_default_in_help() -> None:
    run = build_parser()[0]._subparsers._group_actions[0].choices["run"]
    for action in run._actions:
        if isinstance(action, argparse.BooleanOptionalAction):
            assert "(default: " in action.help, action.option_strings


def test_docs_serving_flag_list_equals_the_parsers_flags() -> None:
    """docs/serving.md's copy of `paphos run --help` lists exactly the flags the parser has."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "serving.md").read_text()
    start = text.index("This is the output of `paphos run --help`:")
    block = text[text.index("```\n", start) + 4 : text.index("\n```", start + 50)]
    documented = set()
    for line in block.splitlines():
        if line.startswith("  -"):  # an option line (help text is indented further)
            documented |= set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line.split("  ", 2)[1]))
    run = build_parser()[0]._subparsers._group_actions[0].choices["run"]
    flags = {s for a in run._actions for s in a.option_strings} - {"-h", "--help"}
    assert documented == flags
