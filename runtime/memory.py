"""What memory this machine has free, for the checks that refuse a load the kernel would kill
(the runtime's fp16-on-CPU check, verification's side-by-side sessions)."""
from __future__ import annotations

from typing import Optional


def memory_available_bytes() -> Optional[int]:
    """Memory a new allocation can get without the kernel killing something: MemAvailable plus free
    swap (Linux /proc/meminfo); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
    except (OSError, ValueError, IndexError):
        return None
    if "MemAvailable" not in info:
        return None
    return info["MemAvailable"] + info.get("SwapFree", 0)
