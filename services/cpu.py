"""What this CPU can do fast, read once from /proc/cpuinfo.

Used to pick the LLM's dtype at start-up (bf16 is ~4x slower than float32 on a CPU without
native bf16 instructions: measured TTFT 1216 ms vs 273 ms for SmolLM2-135M on an AVX2-only
AMD EPYC) and to record the CPU next to every benchmark figure.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")

#: Instruction sets with which bf16 beats float32 in vLLM's CPU kernels. AMX only: on a Xeon
#: with AVX512_BF16 but no AMX, SmolLM2-135M's TTFT was 283 ms in bf16 vs 173 ms in float32
#: (decode about equal, 14.7 vs 13.6 tok/s; 4 concurrent TTFT 893 vs 456 ms), so float32 wins there.
FAST_BF16_FLAGS = frozenset({"amx_bf16"})
#: Flags worth printing beside a benchmark figure (the ones that change kernel choice).
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                 "avx_vnni", "f16c")

LLMDtype = Literal["bfloat16", "float32"]


def _cpuinfo_field(name: str) -> str:
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return ""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is missing, e.g. macOS)."""
    # x86 lists them under "flags", arm64 under "Features"
    return frozenset((_cpuinfo_field("flags") or _cpuinfo_field("Features")).split())


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """Marketing name of the CPU, e.g. 'AMD EPYC 7B13' (the machine type where unknown)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def supports_fast_bf16(flags: Iterable[str] | None = None) -> bool:
    """True only with AMX bf16 tiles (AVX512_BF16 alone does not make bf16 faster, see above)."""
    have = cpu_flags() if flags is None else frozenset(flags)
    return bool(have & FAST_BF16_FLAGS)


def choose_llm_dtype(flags: Iterable[str] | None = None) -> LLMDtype:
    """The LLM dtype for a CPU: bfloat16 where it is native, else float32."""
    return "bfloat16" if supports_fast_bf16(flags) else "float32"


def describe_cpu() -> str:
    """One line for logs and benchmark records: model, usable cores and the notable flags."""
    flags = cpu_flags()
    notable = [f for f in NOTABLE_FLAGS if f in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} usable cores, flags: {' '.join(notable) or 'none notable'}"


def resolve_llm_dtype(dtype: str, on_cpu: bool) -> str:
    """The dtype handed to vLLM: 'auto' becomes this CPU's best choice (logged); on a GPU it
    stays 'auto' (the checkpoint's own dtype); any other value is the user's and is kept."""
    if dtype != "auto" or not on_cpu:
        return dtype
    chosen = choose_llm_dtype()
    reason = ("native bf16 instructions: " + " ".join(sorted(cpu_flags() & FAST_BF16_FLAGS))
              if chosen == "bfloat16" else "no AMX: float32 has the faster prefill")
    log.info("LLM dtype auto -> %s (%s; %s)", chosen, reason, describe_cpu())
    return chosen


#: lscpu fields kept in benchmark records.
LSCPU_FIELDS = ("Architecture", "Model name", "Vendor ID", "CPU(s)", "Thread(s) per core",
                "Core(s) per socket", "Socket(s)", "Hypervisor vendor", "L2 cache", "L3 cache", "Flags")


def lscpu() -> dict[str, str]:
    """``lscpu``'s fields (empty where lscpu is not installed)."""
    exe = shutil.which("lscpu")
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def machine_record() -> dict[str, object]:
    """What a benchmark result must carry about the machine it ran on (CPU model and flags,
    cores, load average at the time)."""
    info = lscpu()
    return {
        "cpu": describe_cpu(),
        "cpu_model": info.get("Model name") or cpu_model(),
        "notable_flags": [f for f in NOTABLE_FLAGS if f in cpu_flags()],
        "llm_dtype_auto": choose_llm_dtype(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "lscpu": {k: info[k] for k in LSCPU_FIELDS if k in info} or None,
    }
