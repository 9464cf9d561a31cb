"""CPU linears chosen by measurement: each shape gets the faster of F.linear and the oneDNN-packed
weight on this machine, timed once and kept in the cache folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from truffula.kernels import linear_cpu

pytestmark = pytest.mark.skipif(
    not linear_cpu.available(torch.float32), reason="oneDNN packing is not available here"
)

SHAPES = [(96, 64), (64, 96), (320, 64)]


def test_every_candidate_computes_f_linear() -> None:
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=gen)
        x = torch.randn(5, in_f, generator=gen)
        torch.testing.assert_close(linear_cpu.linear(x, linear_cpu.pack(w), None), F.linear(x, w))


def test_the_faster_candidate_is_chosen_and_kept(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cpu-linear.json"
    # a measurement that makes packing faster for one shape and F.linear for the others
    timed: list[tuple[int, int]] = []

    def fake(shape: tuple[int, int], dtype: torch.dtype) -> dict[str, float]:
        timed.append(shape)
        fast = "packed" if shape == SHAPES[0] else "torch"
        return {"torch": 10.0, "packed": 10.0} | {fast: 5.0}  # µs: fast enough to be believed

    monkeypatch.setattr(linear_cpu, "measure", fake)
    monkeypatch.setattr(linear_cpu, "_decided", {})
    chosen = linear_cpu.choose(SHAPES + SHAPES[:1], torch.float32, cache)
    assert chosen == {SHAPES[0]: "packed", SHAPES[1]: "torch", SHAPES[2]: "torch"}
    assert sorted(set(timed)) == sorted(SHAPES) and len(timed) == 3 * linear_cpu.ROUNDS
    stored = json.loads(cache.read_text())
    assert len(stored) == 3 and all(linear_cpu.cpu_model() in key for key in stored)
    # another process reads the cache and times nothing
    timed.clear()
    monkeypatch.setattr(linear_cpu, "_decided", {})
    assert linear_cpu.choose(SHAPES, torch.float32, cache) == chosen and not timed
    # another dtype is another key
    linear_cpu.choose(SHAPES[:1], torch.bfloat16, cache)
    assert timed == [SHAPES[0]] * linear_cpu.ROUNDS


def test_disagreeing_measurements_keep_the_default_and_are_not_kept(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cpu-linear.json"
    turns = iter([{"torch": 1.0, "packed": 2.0}, {"torch": 2.0, "packed": 1.0}] * 3)
    monkeypatch.setattr(linear_cpu, "measure", lambda shape, dtype: next(turns))
    monkeypatch.setattr(linear_cpu, "_decided", {})
    assert linear_cpu.choose(SHAPES[:1], torch.float32, cache) == {SHAPES[0]: "packed"}
    assert not cache.exists()
    # the process keeps to it: no engine of it measures again and decides otherwise
    monkeypatch.setattr(linear_cpu, "measure", lambda shape, dtype: {"torch": 1.0, "packed": 2.0})
    assert linear_cpu.choose(SHAPES[:1], torch.float32, cache) == {SHAPES[0]: "packed"}


def test_a_measurement_of_a_busy_machine_is_not_kept(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cpu-linear.json"
    # 20 ms for a 96 x 64 weight: threads waited for cores, not for memory
    monkeypatch.setattr(linear_cpu, "measure", lambda s, d: {"torch": 2e4, "packed": 3e4})
    monkeypatch.setattr(linear_cpu, "_decided", {})
    assert linear_cpu.choose(SHAPES[:1], torch.float32, cache) == {SHAPES[0]: "packed"}
    assert not cache.exists()


def test_a_real_measurement_is_finite_and_positive() -> None:
    times = linear_cpu.measure((64, 64), torch.float32)
    assert set(times) == set(linear_cpu.CANDIDATES)
    assert all(0 < t < 1e6 for t in times.values())
