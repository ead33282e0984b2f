"""Specification of runner.bench.memory_table: which compiler produces each cell, and what it passes on."""

from __future__ import annotations

import pytest

from runner.bench import memory_table


@pytest.mark.parametrize("installed", [True, False])
def test_tpu_rows_are_compiled_by_libtpu_where_it_is_installed_and_are_upper_bounds_otherwise(monkeypatch, installed):
    monkeypatch.setattr(memory_table, "libtpu_installed", lambda: installed)
    if installed:
        assert memory_table.compiler("v5e-8") == "libtpu, compile-only v5e:2x4 devices"
        assert memory_table.compiler("v6e-8") == "libtpu, compile-only v6e:2x4 devices"
    else:
        assert memory_table.compiler("v5e-8") == "XLA CPU backend, 8 fake devices (upper bound)"
    assert memory_table.compiler("H100-80GB") == "XLA CPU backend (upper bound)"
    assert memory_table.compiler("CPU-24GB") == "XLA CPU backend"


def test_only_the_compiled_batch_lines_of_the_subprocess_are_passed_on():
    assert memory_table._PROGRESS_LINE.match("gemma2-9b v5e-8 bfloat16 batch 64: [0.717, 1.846] GiB (148 s)\n")
    assert not memory_table._PROGRESS_LINE.match("WARNING: could not determine TPU accelerator type\n")
