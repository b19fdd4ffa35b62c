"""Compile the Triton kernels for sm_90 (H100 / H200) on a machine without a GPU.

Triton's interpreter, which runs the kernels in CI, executes them untyped: a kernel that
runs there can still fail to compile (a name bound in both branches of a runtime `if` with
two types did, on the GPU, 2026-11-30). So the tests record every launch a CPU workload
makes under the interpreter (`record_launches`: kernel, argument types as Triton mangles
them, constexprs, num_warps / num_stages) and compile each distinct one for sm_90 in a
child process without the interpreter::

    parent (TRITON_INTERPRET=1)                child (python tests/compile_sm90.py SPECS.json)
    workload -> InterpretedFunction.run        for spec: import module.name (a JITFunction),
             -> LaunchSpec per launch   ---->      ASTSource(signature, constexprs) -> PTX for sm_90
                                               prints each compiled kernel

INTERPRET constexprs are compiled as False (the GPU's path). Pointer alignment is not
specialised, so the code compiled is the generic variant of each launch.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

SM90 = ("cuda", 90, 32)  # backend, capability, warp size


@dataclass(frozen=True)
class LaunchSpec:
    module: str
    name: str
    signature: dict[str, str]  # every parameter: a Triton type, or "constexpr"
    constexprs: dict[str, object]
    options: dict[str, int]  # num_warps, num_stages, ...

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def launch_spec(fn, args: tuple, kwargs: dict) -> LaunchSpec:
    """The spec of one launch of the Python kernel `fn` with these arguments."""
    from triton.runtime.jit import mangle_type

    params = inspect.signature(fn).parameters
    values = dict(zip(params, args, strict=False)) | {k: v for k, v in kwargs.items() if k in params}
    options = {k: v for k, v in kwargs.items() if k not in params}
    signature, constexprs = {}, {}
    for name, param in params.items():
        value = values.get(name, param.default)
        if "constexpr" in str(param.annotation) or value is None:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = mangle_type(value)
    return LaunchSpec(fn.__module__, fn.__name__, signature, constexprs, options)


@contextmanager
def record_launches() -> Iterator[dict[str, LaunchSpec]]:
    """Record every interpreted kernel launch inside the block: {spec key: spec}."""
    from triton.runtime.interpreter import InterpretedFunction

    specs: dict[str, LaunchSpec] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = launch_spec(self.fn, args, kwargs)
        specs.setdefault(spec.key(), spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield specs
    finally:
        InterpretedFunction.run = run


def compile_spec(spec: LaunchSpec) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec.module), spec.name)
    names = kernel.arg_names
    constexprs = {k: (False if k == "INTERPRET" else v) for k, v in spec.constexprs.items()}
    src = ASTSource(kernel, spec.signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    triton.compile(src, target=GPUTarget(*SM90), options=spec.options)


if __name__ == "__main__":
    for d in json.loads(Path(sys.argv[1]).read_text()):
        spec = LaunchSpec(**d)
        compile_spec(spec)
        print(spec.name, flush=True)
