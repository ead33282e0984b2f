"""Compiled programs of a worker, with their traces kept on disk (`jax.export`) between worker starts.

Tracing a Penzai model is Python work that takes seconds (named axes vectorise every layer), and the persistent
XLA compilation cache only saves the compilation that follows it. A `ProgramCache` keeps the traced program
itself, serialized by `jax.export`, so that a worker starting again (a new sweep of the same shapes, a resumed
sweep, a restarted or rescheduled worker) skips tracing and, with the XLA cache, compiling.

A cached trace is found by a key of everything the trace depends on: the program's name and static settings,
the structure of its arguments (the Penzai model's pytree structure, with every static field, such as layer
configurations, axis names and sizes), the shape, dtype and sharding of every argument array, the devices, the
versions of jax, jaxlib and penzai, JAX's x64 and matmul-precision settings, and a digest of runner's own source
files. Changing any of them traces again.
The files are written atomically; one that cannot be read is traced again and replaced.

Multi-process programs (`jax.distributed`) are not cached: every process must trace them identically anyway.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
import penzai

from runner.errors import error_line
from runner.files import write_bytes_atomically

_log = logging.getLogger(__name__)

#: File suffix of a cached trace.
SUFFIX = ".jaxexport"


@functools.cache
def runner_source_digest() -> str:
    """SHA-256 over runner's Python sources (names and contents), so a cached trace never outlives the code."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _array_spec(leaf: Any) -> jax.ShapeDtypeStruct:
    """What a trace knows of an argument: shape, dtype and, for an array committed to devices, its sharding (an
    uncommitted one, e.g. a scalar made by `jnp.asarray`, goes wherever the program runs)."""
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)
    committed = getattr(leaf, "committed", isinstance(leaf, jax.ShapeDtypeStruct))
    return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=leaf.sharding if committed else None)


def program_key(name: str, static: Any, args: tuple) -> str:
    """The cache key of program `name` with static settings `static` (JSON-able) on arguments `args`."""
    leaves, treedef = jax.tree.flatten(args)
    specs = [_array_spec(leaf) for leaf in leaves]
    described = {
        "name": name,
        "static": static,
        "tree": _without_addresses(str(treedef)),
        "arrays": [[list(spec.shape), str(spec.dtype), str(spec.sharding)] for spec in specs],
        "devices": [str(device) for device in jax.devices()],
        "versions": [jax.__version__, jaxlib.__version__, penzai.__version__],
        "jax_config": [jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision)],
        "runner": runner_source_digest(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _without_addresses(text: str) -> str:
    """`text` without the memory addresses in reprs such as `<function gelu at 0x7f...>` (static fields of some
    Penzai layers), which differ between processes."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


class ProgramCache:
    """Lowers and compiles a worker's programs, reusing their traces from `directory` when an earlier process left
    them there; with `directory` None it traces every program (plain `jax.jit`).

    Args:
      directory: Where traces are kept (created on first write), or None.
    """

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.misses = 0

    def lower(
        self, name: str, function: Callable[..., Any], args: tuple, *, static: Any, out_shardings: Any = None
    ) -> LoweredProgram:
        """`function` lowered for `args` (arrays or `jax.ShapeDtypeStruct`s, in any pytree): traced now (Python
        work, holding the GIL) or read from the cache. `LoweredProgram.compile` then compiles it (XLA's work,
        which releases the GIL).

        `static` must name everything besides `args` that the trace depends on (sizes, token ids, flags): it is
        part of the key. The function's outputs must be arrays in lists, tuples and dicts.
        """
        if self.directory is None or jax.process_count() > 1:
            return LoweredProgram(jax.jit(function, out_shardings=out_shardings).lower(*args), flat=False)
        leaves, treedef = jax.tree.flatten(args)
        specs = [_array_spec(leaf) for leaf in leaves]
        path = self.directory / f"{name}-{program_key(name, static, args)[:40]}{SUFFIX}"
        exported = self._read(path)
        if exported is None:
            self.misses += 1

            def flat_function(*flat_leaves: Any) -> Any:
                return function(*jax.tree.unflatten(treedef, flat_leaves))

            exported = jax.export.export(jax.jit(flat_function, out_shardings=out_shardings))(*specs)
            self._write(path, exported)
        else:
            self.hits += 1
        return LoweredProgram(jax.jit(exported.call).lower(*specs), flat=True)

    @staticmethod
    def _read(path: Path) -> Any:
        if not path.is_file():
            return None
        try:
            return jax.export.deserialize(bytearray(path.read_bytes()))
        except Exception as error:  # noqa: BLE001 - a damaged or foreign file is traced again
            _log.warning("ignoring the cached trace %s: %s", path.name, error_line(error))
            return None

    def _write(self, path: Path, exported: Any) -> None:
        try:
            write_bytes_atomically(path, exported.serialize())
        except Exception as error:  # noqa: BLE001 - the program still runs; only the next start traces again
            _log.warning("could not keep the trace of %s: %s", path.name, error_line(error))


class LoweredProgram:
    """A program lowered by `ProgramCache.lower`, to be compiled."""

    def __init__(self, lowered: Any, *, flat: bool):
        self._lowered = lowered
        self._flat = flat

    def compile(self) -> CompiledProgram:
        """Compiles it (from the persistent XLA cache when enabled); returns a callable taking the arguments
        `lower` was given, in the same structure."""
        return CompiledProgram(self._lowered.compile(), flat=self._flat)


class CompiledProgram:
    """A program compiled by `LoweredProgram.compile`: call it with the arguments `lower` was given; XLA's
    `memory_analysis()` says what it needs (arguments, outputs, temporaries) on its devices."""

    def __init__(self, compiled: Any, *, flat: bool):
        self._compiled = compiled
        self._flat = flat

    def __call__(self, *args: Any) -> Any:
        return self._compiled(*jax.tree.leaves(args)) if self._flat else self._compiled(*args)

    def memory_analysis(self) -> Any:
        """XLA's compiled memory analysis (`argument_size_in_bytes`, `output_size_in_bytes`,
        `temp_size_in_bytes`, `alias_size_in_bytes`), per device."""
        return self._compiled.memory_analysis()

