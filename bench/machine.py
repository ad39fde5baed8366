"""What the benches print above their tables: the CPU, the flags that decide its speed, and the load."""
import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # AVX-512-BF16 and AMX: native bf16


def cpu_description() -> str:
    """The CPU's model name and whether it has each of FLAGS, from /proc/cpuinfo (what lscpu reads)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    name = fields.get("model name", platform.processor() or platform.machine())
    listed = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in FLAGS)
    return f"CPU: {name}, {os.cpu_count()} cores; flags: {listed}" if flags else f"CPU: {name} (no /proc/cpuinfo)"


def load_average() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else ""
