"""ISA dispatch of the C kernels (paphos.kernels.cpu.isa): the level read from the CPU's flags,
PAPHOS_CPU_ISA lowering it, each level's library built with its own flags and key, and the
SiLU-and-mul kernel at every level this CPU has against the torch reference."""

from __future__ import annotations

import pytest
import torch

from paphos.kernels.cpu import activation, isa, native
from paphos.ops import activation as reference_activation
from paphos.ops import registry

AVX2 = frozenset({"avx2", "fma", "sse4_2"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
ZEN4 = AVX512 | {"avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize(
    "flags, level",
    [
        (frozenset({"sse4_2", "avx"}), None),
        (frozenset({"avx2"}), None),  # no FMA
        (AVX2, "avx2"),
        (AVX2 | {"avx512f"}, "avx2"),  # F alone is not the avx512 level
        (AVX512, "avx512"),
        (ZEN4, "avx512_bf16"),
        (SAPPHIRE_RAPIDS, "amx"),
        (AVX2 | {"amx_tile", "amx_bf16", "amx_int8"}, "avx2"),  # levels include those below
    ],
)
def test_detect_takes_the_highest_level_whose_flags_are_all_present(flags, level) -> None:
    assert isa.detect(flags) == level


def test_requested_level_lowers_but_never_raises_the_detected_one() -> None:
    assert isa.lowered("amx", None) == "amx"
    assert isa.lowered("amx", "AVX2") == "avx2"
    assert isa.lowered("avx512", "avx512_bf16") == "avx512"  # above the CPU: ignored
    with pytest.raises(ValueError, match="PAPHOS_CPU_ISA='sse9' is not one of avx2, avx512"):
        isa.lowered("avx2", "sse9")


def test_each_level_builds_with_its_own_flags_and_cache_key() -> None:
    flags = {level: set(native.flags_for(level)) for level in isa.LEVELS}
    assert "-mavx2" in flags["avx2"] and "-mavx512f" not in flags["avx2"]
    assert flags["avx2"] < flags["avx512"] < flags["avx512_bf16"] <= flags["amx"]
    assert "-mavx512bf16" in flags["avx512_bf16"]
    paths = {native.library_path("k", "cc", b"source", level) for level in isa.available()}
    assert len(paths) == len(isa.available())
    assert isa.kernel_level("amx") == "avx512_bf16" and "amx" not in isa.available()


def test_every_available_level_loads_and_reports_itself() -> None:
    for level in isa.available():
        lib = activation.load_library(level)
        assert lib is not None and lib.paphos_isa_level == level


@pytest.mark.parametrize("level", isa.available())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, width", [(1, 48), (3, 1536), (20, 100), (4, 7)])
def test_silu_and_mul_kernel_matches_reference(level, dtype, rows, width) -> None:
    gen = torch.Generator().manual_seed(rows * width)
    x = (torch.randn(rows, 2 * width, generator=gen) * 4).to(dtype)  # [rows, 2 * width]
    got = activation.silu_and_mul(x, level)
    want = reference_activation.silu_and_mul(x)
    assert got.shape == want.shape and got.dtype == dtype
    # fp32: the two exps differ in the last bits; bf16: at most one rounding of silu and product
    fp32 = dtype == torch.float32
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if fp32 else {"rtol": 2**-7, "atol": 0}
    torch.testing.assert_close(got, want, **tolerance)


def test_registry_picks_the_c_silu_and_mul_on_cpu() -> None:
    if activation.load_library() is None:
        pytest.skip("no C kernels here")
    assert registry.pick("silu_and_mul", "cpu") is activation.silu_and_mul
    assert registry.describe_cpu_kernels().startswith(f"CPU kernels: {isa.selected()} ")


def test_a_level_that_fails_to_build_falls_back_to_the_level_below(monkeypatch, tmp_path) -> None:
    if not isa.available():
        pytest.skip("no AVX2 here")
    real_build = native.build

    def build(compiler, source, target, level):
        if level != "avx2":
            raise RuntimeError(f"cc: unknown flags for {level}")
        real_build(compiler, source, target, level)

    monkeypatch.setattr(native, "build", build)
    target_for = lambda compiler, source, level: tmp_path / f"silu-{level}.so"  # noqa: E731
    lib = native.load_library(
        "activation", activation.SOURCE, "cc", target_for, activation.bind, "avx512_bf16"
    )
    assert lib is not None and lib.paphos_isa_level == "avx2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["silu-avx2.so"]
