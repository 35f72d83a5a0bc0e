"""What machine a figure was measured on."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo where available."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
