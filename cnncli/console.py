"""Rich consoles shared by every command: results go to stdout, messages and progress to stderr."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def fmt_count(n: float) -> str:
    """1234567 -> '1.23M' (for parameter counts, MACs and memory)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"
