"""Proven norms kept by content: reused for the same operator, never for another, never unproven."""

import json
import math
import os

import pytest
import torch
from torch import nn

import certify_fx as cfx
from certify_fx.bounds.cache import BOUND_VERSION, NormCache, cache_directory, norm_cache, operator_key
from certify_fx.bounds.norms import NormBound
from certify_fx.bounds.operators import Conv2d, Dense


@pytest.fixture
def directory(tmp_path, monkeypatch):
    monkeypatch.setenv("CERTIFY_FX_CACHE", str(tmp_path / "norms"))
    return tmp_path / "norms"


def _conv(seed: int = 0, hw: int = 8, stride: int = 1) -> Conv2d:
    weight = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(seed))
    return Conv2d((64, hw, hw), weight, (stride, stride), (1, 1, 1, 1))


def _counted(op):
    calls = []

    def compute():
        calls.append(1)
        return op.upper_bound()

    return compute, calls


def test_the_key_is_the_operator_content():
    a = _conv()
    assert operator_key(a) == operator_key(_conv())  # the same content, another object
    assert operator_key(a) != operator_key(_conv(seed=1))  # other weights
    assert operator_key(a) != operator_key(_conv(hw=9))  # another input size
    assert operator_key(a) != operator_key(_conv(stride=2))  # another geometry
    assert operator_key(Conv2d((2, 4, 4), torch.randn(2, 2, 3, 3))) is None  # too small to be worth it
    assert operator_key(Dense((512,), torch.randn(64, 512))) is not None


def test_a_norm_is_proven_once_and_read_back_in_another_process(directory):
    op = _conv()
    compute, calls = _counted(op)
    first = NormCache().upper_bound(op, compute)
    assert calls == [1] and first.sound
    files = list(directory.rglob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["version"] == BOUND_VERSION
    again = NormCache().upper_bound(_conv(), compute)  # a fresh process: only the directory is shared
    assert calls == [1] and again.value == first.value and again.sound and again.method.endswith("(kept)")


def test_damaged_or_foreign_entries_are_proven_again(directory):
    op = _conv()
    compute, calls = _counted(op)
    NormCache().upper_bound(op, compute)
    (path,) = directory.rglob("*.json")
    entry = json.loads(path.read_text())
    for damaged in ("{not json", json.dumps({**entry, "version": BOUND_VERSION - 1}),
                    json.dumps({**entry, "key": "0" * 64}), json.dumps({**entry, "sound": False}),
                    json.dumps({**entry, "value": "nan"}), json.dumps({**entry, "value": -1.0})):
        path.write_text(damaged)
        bound = NormCache().upper_bound(op, compute)
        assert bound.value > 0 and math.isfinite(bound.value) and not bound.method.endswith("(kept)")
    assert len(calls) == 7


def test_unproven_norms_are_not_kept_and_off_keeps_nothing_on_disk(directory, monkeypatch):
    op = _conv()
    cache = NormCache()
    cache.upper_bound(op, lambda: NormBound(1.0, False, "power-iteration"))
    assert not directory.exists() and not cache._memory
    monkeypatch.setenv("CERTIFY_FX_CACHE", "off")
    assert cache_directory() is None
    cache.upper_bound(op)
    assert not directory.exists() and len(cache._memory) == 1


def test_bounding_the_same_weights_again_reads_the_kept_norms(directory):
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4 * 4, 5)).eval()
    norm_cache.clear()
    first = cfx.bound(model, (64, 4, 4), estimate_steps=0, materialize_limit=0)
    norm_cache.clear()  # as in a new process: only the directory is left
    second = cfx.bound(model, (64, 4, 4), estimate_steps=0, materialize_limit=0)
    assert torch.equal(first.margin, second.margin) and second.sound
    assert any(row.method.endswith("(kept)") for row in second.nodes)
    with torch.no_grad():
        model[0].weight.mul_(2)  # other weights: proven again, never read back
    third = cfx.bound(model, (64, 4, 4), estimate_steps=0, materialize_limit=0)
    assert not any(row.method.endswith("(kept)") for row in third.nodes)
    assert third.max_margin > first.max_margin


def test_the_directory_keeps_the_newest_entries_of_each_shard(directory, monkeypatch):
    import certify_fx.bounds.cache as cache

    monkeypatch.setattr(cache, "SHARD_ENTRIES", 2)
    shard = directory / "ab"
    shard.mkdir(parents=True)
    for i in range(4):
        path = shard / f"ab{i:062d}.json"
        path.write_text("{}")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # written in this order
    cache._prune(shard)
    assert sorted(p.name for p in shard.glob("*.json")) == [f"ab{i:062d}.json" for i in (2, 3)]
