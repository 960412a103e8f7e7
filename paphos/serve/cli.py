"""`paphos run [MODEL]`: the command line. Flags are generated from the fields of the engine
config parts and of `ServerConfig`, so names, help, choices and defaults cannot drift."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import socket
import sys
from collections.abc import Sequence
from typing import Any

import paphos
from paphos.config import PART_CLASSES, EngineConfig
from paphos.serve import client_commands
from paphos.serve.server_config import ServerConfig

logger = logging.getLogger("paphos.serve")

_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str}


def _flag_kwargs(f: dataclasses.Field) -> dict[str, Any]:
    """argparse keyword arguments for one dataclass field (type read from its annotation)."""
    annotation = str(f.type).replace(" ", "")
    base = annotation.replace("|None", "").replace("None|", "")
    help_text = f.metadata.get("help", "")
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = None
    kwargs: dict[str, Any] = {"default": default, "help": help_text}
    shown = default not in (None, "", ()) and "default" not in help_text.lower()
    if base == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif base.startswith(("tuple[", "list[")):
        inner = base[base.index("[") + 1 :].split(",")[0].rstrip("]")
        kwargs["type"] = _SCALARS.get(inner, str)
        kwargs["nargs"] = f.metadata.get("nargs", "+")
        kwargs["metavar"] = f.name.upper().rstrip("S")
    else:
        kwargs["type"] = _SCALARS.get(base, str)
        kwargs["help"] = f"{help_text} (default: {default})" if shown else help_text
    if "choices" in f.metadata:
        kwargs["choices"] = list(f.metadata["choices"])
    return kwargs


def add_dataclass_flags(group: Any, cls: type, skip: Sequence[str] = ()) -> list[str]:
    """Add one `--field-name` flag per user-facing field of `cls`; returns the field names added."""
    names = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False or f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-")]
        if "short" in f.metadata:
            flags.insert(0, f.metadata["short"])
        action = group.add_argument(*flags, dest=f.name, **_flag_kwargs(f))
        if isinstance(action, argparse.BooleanOptionalAction) and "default" not in action.help:
            action.help += f" (default: {action.default})"  # Python < 3.11 adds it itself
        names.append(f.name)
    return names


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, list[str]]]:
    """The parser and, per config part ('model', ..., 'server'), the dests of its flags."""
    parser = argparse.ArgumentParser(prog="paphos", description="paphos: serve open-weight LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {paphos.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="Serve a model over an OpenAI-compatible HTTP API.",
        description="Serve MODEL (an HF model directory or a .gguf file; default: the packaged "
        "SmolLM2-135M-Instruct) over an OpenAI-compatible HTTP API.",
    )
    run.add_argument(
        "model_path",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="HF model directory or .gguf file (same as --model; default: the "
        "packaged SmolLM2-135M-Instruct).",
    )
    dests: dict[str, list[str]] = {}
    server_group = run.add_argument_group("server")
    dests["server"] = add_dataclass_flags(server_group, ServerConfig)
    for part, cls in PART_CLASSES.items():
        group = run.add_argument_group(part)
        dests[part] = add_dataclass_flags(group, cls)
    client_commands.add_commands(commands)
    return parser, dests


def configs_from_args(
    args: argparse.Namespace, dests: dict[str, list[str]]
) -> tuple[dict[str, Any], ServerConfig]:
    """Flat engine kwargs (for `EngineConfig.from_kwargs`) and the `ServerConfig`."""
    if args.model_path and args.model and args.model_path != args.model:
        raise ValueError(f"two models given: {args.model_path!r} and --model {args.model!r}")
    engine_kwargs = {
        name: getattr(args, name)
        for part, names in dests.items()
        if part != "server"
        for name in names
    }
    engine_kwargs["model"] = args.model_path or args.model or ""
    server_kwargs = {name: getattr(args, name) for name in dests["server"]}
    server_kwargs["api_keys"] = tuple(server_kwargs["api_keys"] or ())
    return engine_kwargs, ServerConfig(**server_kwargs)


_QUOTED = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


def flag_names(message: str, dests: dict[str, list[str]]) -> str:
    """`message` with config field names written as the flags that set them: `name=` of any field,
    and bare multi-word names (`kv_cache_space/gpu_memory_utilization`); quoted values (paths)
    stay as they are."""
    names = sorted({n for names in dests.values() for n in names}, key=len, reverse=True)
    pieces = _QUOTED.split(message)  # odd indices: quoted values
    for index in range(0, len(pieces), 2):
        for name in names:
            flag = "--" + name.replace("_", "-")
            after = "(?==)" if "_" not in name else r"(?!\w)"
            pieces[index] = re.sub(rf"(?<![\w\-]){name}{after}", flag, pieces[index])
    return "".join(pieces)


def check_port_free(host: str, port: int) -> None:
    """Fail before the model loads when the port is taken (as uvicorn would bind it)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ValueError(
                f"cannot listen on {host}:{port} ({e.strerror}): another server may be using "
                "it; pick another port=N or host=ADDRESS"
            ) from e


def run_server(engine_kwargs: dict[str, Any], server_config: ServerConfig) -> None:
    """Build the engine, log what was resolved, and serve until interrupted. The config is
    resolved before the server stack is imported, so a bad path or value fails at once."""
    check_port_free(server_config.host, server_config.port)
    config = EngineConfig.from_kwargs(**engine_kwargs)

    import uvicorn

    from paphos.engine.async_engine import AsyncEngine
    from paphos.engine.engine import Engine
    from paphos.serve.app import build_app
    from paphos.serve.openai.serving import served_model_names
    from paphos.serve.startup_log import log_startup

    engine = Engine(config)
    runtime = config.runtime
    interval = None if runtime.disable_log_stats else runtime.log_stats_interval
    try:
        async_engine = AsyncEngine(engine, log_stats_interval_s=interval)
        app = build_app(async_engine, server_config)
        log_startup(config, engine, server_config, served_model_names(config.model)[0])
        uvicorn.run(
            app,
            host=server_config.host,
            port=server_config.port,
            log_level=server_config.uvicorn_log_level,
            timeout_graceful_shutdown=5,
        )
    finally:
        engine.shutdown()  # stops tensor-parallel workers too


def configure_logging(level: str) -> None:
    """paphos's own loggers at `level` (debug adds the resolved config); others at info."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("paphos").setLevel(level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    parser, dests = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        return args.handler(args)
    try:
        engine_kwargs, server_config = configs_from_args(args, dests)
        configure_logging(server_config.log_level)
        run_server(engine_kwargs, server_config)
    except ValueError as e:
        parser.exit(2, f"paphos: error: {flag_names(str(e), dests)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
