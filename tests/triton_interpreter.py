"""Triton's interpreter (TRITON_INTERPRET=1, the CPU test runs) without its repeated
language patching.

A kernel launch patches `triton.language` with the interpreter's semantics and restores it
when the launch ends. A call of a `@triton.jit` helper from inside a kernel patches it again
(triton 3.6, `InterpretedFunction.__call__`), in a scope nothing ever restores, and finds
nothing left to patch: every builtin is the launch's wrapper by then. The scan costs ~0.3 ms
a call, once per helper call per program: a third of the interpreter's time in the engine's
kernel-path exactness tests (cProfile, 105 of 324 s). `skip_nested_language_patches` makes
that call a no-op when the helper's language modules are already patched; a launch, which
finds them unpatched, patches and restores them as before.
"""

from __future__ import annotations

import functools
import inspect

import triton.language as tl
from triton.runtime import interpreter


@functools.cache  # a helper's module globals name the same modules for the whole run
def _language_modules(fn) -> tuple:
    return tuple(v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def skip_nested_language_patches() -> None:
    patch_lang = interpreter._patch_lang
    if getattr(patch_lang, "skips_nested", False):
        return

    def patch_unless_patched(fn):
        langs = _language_modules(fn)
        if langs and not any(tl.core.is_builtin(lang.arange) for lang in langs):
            return interpreter._LangPatchScope()  # inside a launch: already patched
        return patch_lang(fn)

    patch_unless_patched.skips_nested = True
    interpreter._patch_lang = patch_unless_patched
