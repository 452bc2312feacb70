"""Checkpoints in safetensors (never pickle), with sha256 verification.

Dense gated checkpoint: every tensor of the gated model (weights, scores, BN), stored as is.

Pruned checkpoint: only what survives. Gates and masks are folded into the weights first; each
pruned weight tensor is then stored in whichever encoding is smallest:
  dense    the full float32 tensor (used when little was pruned)
  bitmask  1 bit per weight (packed uint8) + the nonzero values in row-major order
  delta    gaps between consecutive nonzero flat indices (uint8/uint16/int32) + the values
  masked   1 bit per weight and no values at all: the tensor is the base checkpoint's folded weight
           times the mask. Variants that were pruned but not fine-tuned share every surviving value
           with the dense gated checkpoint, so they cost ~N/8 bytes instead of ~N·4·keep.
Loading rebuilds bit-identical float32 tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from core.model import GatedNet, NetConfig

FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, tampered with, or not one of ours."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Sparse tensor encodings
# ---------------------------------------------------------------------------------------------
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    flat = mask.flatten().to(torch.uint8)
    padded = torch.cat([flat, flat.new_zeros((-len(flat)) % 8)])
    return (padded.view(-1, 8) * _BITS).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    return ((packed.view(-1, 1) & _BITS) > 0).flatten()[:count]


def _gap_dtype(max_gap: int) -> torch.dtype:
    if max_gap < 2**8:
        return torch.uint8
    if max_gap < 2**16:
        return torch.uint16
    return torch.int32


def encode(weight: Tensor, base: Tensor | None = None) -> tuple[str, dict[str, Tensor]]:
    """Smallest encoding for one float32 tensor (``masked`` only when it equals ``base`` × its mask)."""
    flat = weight.detach().flatten().float().contiguous()
    nonzero = flat.nonzero().flatten()
    values = flat[nonzero]
    options: dict[str, dict[str, Tensor]] = {"dense": {"values": flat}}
    if base is not None and base.shape == weight.shape:
        kept = flat != 0
        if torch.equal(base.detach().flatten().float() * kept, flat):
            options["masked"] = {"bits": pack_bits(kept)}
    options["bitmask"] = {"bits": pack_bits(flat != 0), "values": values}
    gaps = torch.diff(nonzero, prepend=nonzero.new_zeros(1)) if len(nonzero) else nonzero
    gap_dtype = _gap_dtype(int(gaps.max()) if len(gaps) else 0)
    options["delta"] = {"gaps": gaps.to(gap_dtype), "values": values}
    sizes = {k: sum(t.numel() * t.element_size() for t in v.values()) for k, v in options.items()}
    best = min(sizes, key=lambda k: (sizes[k], list(options).index(k)))
    return best, options[best]


def decode(encoding: str, parts: dict[str, Tensor], shape: list[int], base: Tensor | None = None) -> Tensor:
    count = 1
    for dim in shape:
        count *= dim
    if encoding == "dense":
        flat = parts["values"]
    elif encoding == "masked":
        if base is None or base.numel() != count:
            raise CheckpointError("masked tensor needs its base checkpoint's tensor of the same shape")
        flat = base.flatten().float() * unpack_bits(parts["bits"], count)
    else:
        flat = torch.zeros(count, dtype=torch.float32)
        if encoding == "bitmask":
            positions = unpack_bits(parts["bits"], count).nonzero().flatten()
        elif encoding == "delta":
            positions = torch.cumsum(parts["gaps"].to(torch.int64), 0)
        else:
            raise CheckpointError(f"unknown encoding {encoding!r}")
        if len(positions) != len(parts["values"]) or (len(positions) and int(positions.max()) >= count):
            raise CheckpointError("sparse tensor's indices and values disagree")
        flat[positions] = parts["values"]
    if flat.numel() != count:
        raise CheckpointError(f"tensor has {flat.numel()} values, shape {shape} needs {count}")
    return flat.view(shape).clone()


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def _write(path: Path, tensors: dict[str, Tensor], metadata: dict) -> tuple[int, str]:
    # One metadata key: safetensors writes a multi-key metadata map in random order, and equal
    # models must give byte-identical files (same sha256).
    header = {"gated_prune": json.dumps(metadata, sort_keys=True)}
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=header)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: readers never see half a file
    return len(data), sha256_bytes(data)


def save_dense(model: GatedNet, path: str | Path) -> tuple[int, str]:
    """Full gated model (weights + scores + BN). Returns (bytes, sha256)."""
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith(".mask")}
    # Scores that never left their initial value (phase 1 keeps them fixed) are one number, not a tensor.
    constant = {k: float(v.flatten()[0]) for k, v in tensors.items()
                if k.endswith(".score") and v.numel() and bool((v == v.flatten()[0]).all())}
    for key in constant:
        del tensors[key]
    meta = {"format": "gated-dense", "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
            "constant_scores": constant}
    return _write(Path(path), tensors, meta)


def folded_weights(model: GatedNet) -> dict[str, Tensor]:
    """Effective (gate- and mask-folded) weight of every prunable layer, by state-dict key."""
    return {f"{name}.weight": layer.effective_weight().detach().cpu() for name, layer in model.gated_layers()}


def save_pruned(model: GatedNet, path: str | Path, base: tuple[str, str, dict[str, Tensor]] | None = None
                ) -> tuple[int, str]:
    """Folded, compactly encoded inference model. ``model`` may be gated+masked or already folded.

    ``base`` = (path of the dense gated checkpoint relative to ``path``'s folder, its sha256, its folded
    weights) lets tensors that are the base times a mask be stored as the mask alone.
    """
    gated = folded_weights(model)
    base_weights = base[2] if base is not None else {}
    tensors: dict[str, Tensor] = {}
    encodings: dict[str, dict] = {}
    for key, value in model.state_dict().items():
        if key.endswith(".score") or key.endswith(".mask"):
            continue
        if key in gated:
            encoding, parts = encode(gated[key], base_weights.get(key))
            encodings[key] = {"encoding": encoding, "shape": list(gated[key].shape)}
            for part, tensor in parts.items():
                tensors[f"{key}::{part}"] = tensor
        else:
            tensors[key] = value.detach().cpu()
    meta = {"format": "pruned", "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
            "encodings": encodings}
    if any(info["encoding"] == "masked" for info in encodings.values()):
        meta["base"] = {"file": base[0], "sha256": base[1]}
    return _write(Path(path), tensors, meta)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def read_verified(path: str | Path, expected_sha256: str | None = None) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: file is missing") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise CheckpointError(f"{path}: sha256 mismatch (expected {expected_sha256}, "
                              f"got {sha256_bytes(data)}): the file is corrupt or was modified")
    return data


def _parse(data: bytes, path: Path) -> tuple[dict[str, Tensor], dict]:
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__", {}) or {}
        metadata = json.loads(metadata.get("gated_prune", "{}"))
    except (SafetensorError, ValueError, json.JSONDecodeError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc
    return tensors, metadata


def base_reference(data: bytes, path: str | Path = "<bytes>") -> str | None:
    """The base checkpoint a pruned checkpoint's masked tensors refer to (path relative to it), or None."""
    ref = _parse(data, Path(path))[1].get("base")
    return ref["file"] if ref else None


def load_model(path: str | Path, expected_sha256: str | None = None, root: str | Path | None = None,
               base_cache: dict[str, dict[str, Tensor]] | None = None) -> GatedNet:
    """Rebuild a model from a dense or pruned checkpoint (pruned → folded inference model).

    A pruned checkpoint that refers to a base checkpoint loads it too (sha256-verified; it must lie
    inside ``root``, default: the checkpoint's own folder's parent). ``base_cache`` (sha256 → folded
    weights) lets many variants share one read of the base.
    """
    path = Path(path)
    tensors, meta = _parse(read_verified(path, expected_sha256), path)
    base_weights = _base_weights(path, meta, Path(root) if root is not None else path.parent.parent, base_cache)
    try:
        model = GatedNet(NetConfig.from_dict(meta["config"]))
        if meta.get("format") == "gated-dense":
            state = dict(tensors)
            for key, value in (meta.get("constant_scores") or {}).items():
                shape = model.state_dict()[key].shape
                state[key] = torch.full(shape, float(value))
            model.load_state_dict(state, strict=True)
        elif meta.get("format") == "pruned":
            encodings = meta["encodings"]
            state = {k: v for k, v in tensors.items() if "::" not in k}
            for key, info in encodings.items():
                parts = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(key + "::")}
                state[key] = decode(info["encoding"], parts, info["shape"], base_weights.get(key))
            model.fold()
            for _, layer in model.gated_layers():
                layer.weight.requires_grad_(False)
            model.load_state_dict(state, strict=True)
        else:
            raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: checkpoint does not match the network definition ({exc})") from exc
    return model.eval()


def _base_weights(path: Path, meta: dict, root: Path, cache: dict | None) -> dict[str, Tensor]:
    ref = meta.get("base")
    if not ref:
        return {}
    try:
        base_path = (path.parent / ref["file"]).resolve()
        sha = ref["sha256"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed base reference") from exc
    if not base_path.is_relative_to(root.resolve()):
        raise CheckpointError(f"{path}: base checkpoint {ref['file']!r} lies outside {root}")
    if cache is not None and sha in cache:
        return cache[sha]
    try:
        base = load_model(base_path, sha)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: its base checkpoint is unusable: {exc}") from exc
    weights = folded_weights(base)
    if cache is not None:
        cache[sha] = weights
    return weights
