"""CPU feature detection and the LLM dtype it picks (fake flag sets: pure logic)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services import cpu
from services.llm import LLMConfig

AVX2_EPYC = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}  # the AMD EPYC of issue 12
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
COOPER_LAKE = AVX2_EPYC | {"avx512f", "avx512_bf16"}
AVX512_NO_BF16 = AVX2_EPYC | {"avx512f", "avx512_vnni"}


@pytest.mark.parametrize(("flags", "fast", "dtype"), [
    (AVX2_EPYC, False, "float32"),
    (AVX512_NO_BF16, False, "float32"),
    (COOPER_LAKE, False, "float32"),  # AVX512_BF16 without AMX: float32 prefills faster
    (SAPPHIRE_RAPIDS, True, "bfloat16"),
    ({"amx_bf16"}, True, "bfloat16"),
    (set(), False, "float32"),
])
def test_dtype_from_flags(flags: set[str], fast: bool, dtype: str) -> None:
    assert cpu.supports_fast_bf16(flags) is fast
    assert cpu.choose_llm_dtype(flags) == dtype


def test_this_machine_is_described() -> None:
    flags = cpu.cpu_flags()
    assert cpu.cpu_flags() is flags  # read once
    assert cpu.choose_llm_dtype() == cpu.choose_llm_dtype(flags)
    line = cpu.describe_cpu()
    assert cpu.cpu_model() in line and "usable cores" in line


def test_cpuinfo_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n")
    monkeypatch.setattr(cpu, "CPUINFO", info)
    cpu.cpu_flags.cache_clear()
    cpu.cpu_model.cache_clear()
    try:
        assert cpu.cpu_flags() == {"fpu", "avx2", "fma"}
        assert cpu.cpu_model() == "AMD EPYC 7B13"
        assert cpu.choose_llm_dtype() == "float32"
        monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "missing")
        cpu.cpu_flags.cache_clear()
        assert cpu.cpu_flags() == frozenset()  # no /proc: no fast bf16 assumed
        assert cpu.choose_llm_dtype() == "float32"
    finally:
        cpu.cpu_flags.cache_clear()
        cpu.cpu_model.cache_clear()


def test_llm_dtype_auto_is_resolved_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert LLMConfig().dtype == "auto"
    with caplog.at_level(logging.INFO, logger="services.cpu"):
        chosen = cpu.resolve_llm_dtype("auto", on_cpu=True)
    assert chosen == cpu.choose_llm_dtype()
    assert f"auto -> {chosen}" in caplog.text
    assert cpu.resolve_llm_dtype("auto", on_cpu=False) == "auto"  # GPU: the model's own dtype
    assert cpu.resolve_llm_dtype("float16", on_cpu=True) == "float16"  # the user's choice wins


def test_machine_record_for_benchmarks() -> None:
    record = cpu.machine_record()
    assert record["cpu_model"] and record["usable_cores"]
    assert record["llm_dtype_auto"] in ("bfloat16", "float32")
    lscpu = record["lscpu"]
    if lscpu is not None:  # lscpu installed: its flags are the kernel's, as in /proc/cpuinfo
        assert isinstance(lscpu, dict)
        assert set(lscpu["Flags"].split()) == cpu.cpu_flags()
