"""Peak host memory of this process (Linux /proc; reports None elsewhere)."""

from __future__ import annotations

from pathlib import Path


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int | None:
    """High-water mark of resident memory since start or the last reset_peak_rss()."""
    return _status_bytes("VmHWM")


def rss_bytes() -> int | None:
    """Resident memory now."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Restart the high-water mark, so one phase (one component's export) is measured alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"
