"""kernels/host_math.py agrees with Triton's own cdiv and next_power_of_2."""

from __future__ import annotations

import triton

from mnemosyne.kernels.host_math import cdiv, next_power_of_2


def test_same_as_triton() -> None:
    for n in range(0, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 8, 16, 64, 127):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
