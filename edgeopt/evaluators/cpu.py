"""Facts about the CPU running edgeopt that decide how int8 must be laid out for it."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path


@cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_needs_reduce_range() -> bool:
    """True on x86 without VNNI, where onnxruntime's u8 x s8 kernels sum pairs in int16 and
    saturate on full-range 8-bit weights; those weights must then use 7 bits."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    return not cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}


@cache
def l2_cache_bytes() -> int | None:
    """One core's L2 cache (Linux sysfs), or None where it cannot be read."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if level == "2" and kind in ("Unified", "Data"):
            units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
            try:
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
            except ValueError:
                return None
    return None
