"""Launch-shape arithmetic on the host, in plain Python.

Triton 3.6 makes `triton.cdiv` and `triton.next_power_of_2` constexpr functions: called from
host code each costs ~3 us of argument unwrapping, and a chunk step's attention wrappers
made seven such calls per layer (~20 us of the ~33 us of Python per layer measured on CPU
with the launches stubbed out). These are the same functions without that.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as `triton.next_power_of_2` (which gives 0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


__all__ = ["cdiv", "next_power_of_2"]
