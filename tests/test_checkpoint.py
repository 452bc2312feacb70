"""Checkpoint round trips: bit-identical tensors, sha256 verification, tampering rejected, compact storage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from core import checkpoint
from core.checkpoint import CheckpointError, decode, encode, load_model, pack_bits, unpack_bits
from tests.conftest import tiny_model
from training.prune import prune


@pytest.mark.parametrize("density", [0.0, 0.01, 0.05, 0.3, 0.9, 1.0])
def test_every_encoding_round_trips_exactly(density: float) -> None:
    torch.manual_seed(0)
    weight = torch.randn(37, 11, 3, 3)
    weight[torch.rand_like(weight) >= density] = 0
    name, parts = encode(weight)
    assert torch.equal(decode(name, parts, list(weight.shape)), weight)
    for forced in ("dense", "bitmask", "delta"):  # every format, not just the chosen one
        flat = weight.flatten()
        nz = flat.nonzero().flatten()
        forced_parts = {
            "dense": {"values": flat},
            "bitmask": {"bits": pack_bits(flat != 0), "values": flat[nz]},
            "delta": {"gaps": torch.diff(nz, prepend=nz.new_zeros(1)).to(torch.int32), "values": flat[nz]},
        }[forced]
        assert torch.equal(decode(forced, forced_parts, list(weight.shape)), weight), forced


def test_encoding_choice_is_the_smallest() -> None:
    weight = torch.randn(64, 64, 3, 3)
    assert encode(weight)[0] == "dense"
    weight[torch.rand_like(weight) > 0.1] = 0
    assert encode(weight)[0] in ("bitmask", "delta")
    weight[torch.rand_like(weight) > 0.02] = 0
    assert encode(weight)[0] == "delta"


def test_pack_bits_round_trip() -> None:
    mask = torch.rand(1001) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), 1001), mask)


def test_dense_checkpoint_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model = tiny_model()
    size, sha = checkpoint.save_dense(model, tmp_path / "dense.safetensors")
    data = (tmp_path / "dense.safetensors").read_bytes()
    assert size == len(data) and sha == hashlib.sha256(data).hexdigest()
    loaded = load_model(tmp_path / "dense.safetensors", sha)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_pruned_checkpoint_round_trip_and_size(tmp_path: Path) -> None:
    model = tiny_model()
    dense_size, _ = checkpoint.save_pruned(model, tmp_path / "full.safetensors")
    prune(model, "gate", 0.1)
    x = torch.randn(3, 3, 32, 32)
    expected = model(x)
    size, sha = checkpoint.save_pruned(model, tmp_path / "p.safetensors")
    loaded = load_model(tmp_path / "p.safetensors", sha)
    for name, layer in model.gated_layers():
        folded = dict(loaded.gated_layers())[name]
        assert torch.equal(folded.weight, layer.effective_weight().detach())
    torch.testing.assert_close(loaded(x), expected)
    assert size < 0.4 * dense_size  # tiny model: headers and BN dominate; the real one is far smaller


def test_tampered_truncated_and_missing_files_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    _, sha = checkpoint.save_pruned(tiny_model(), path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_model(path, sha)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_model(path)  # no sha given: the parser itself must refuse it
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "nope.safetensors", sha)


def test_a_pickle_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, path)  # a zip/pickle file under a safetensors name
    with pytest.raises(CheckpointError):
        load_model(path)


def test_masked_variant_stores_no_values_and_needs_its_verified_base(tmp_path: Path) -> None:
    model = tiny_model()
    _, base_sha = checkpoint.save_dense(model, tmp_path / "dense.safetensors")
    base = ("../dense.safetensors", base_sha, checkpoint.folded_weights(model))
    prune(model, "gate_magnitude", 0.3)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    size, sha = checkpoint.save_pruned(model, tmp_path / "variants" / "v.safetensors", base)
    plain_size, _ = checkpoint.save_pruned(model, tmp_path / "plain.safetensors")
    assert size < plain_size
    cache: dict = {}
    loaded = load_model(tmp_path / "variants" / "v.safetensors", sha, base_cache=cache)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert base_sha in cache
    data = bytearray((tmp_path / "dense.safetensors").read_bytes())
    data[-7] ^= 0x10
    (tmp_path / "dense.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="base checkpoint is unusable.*sha256 mismatch"):
        load_model(tmp_path / "variants" / "v.safetensors", sha)
