"""Edge export: each variant's compact network as a standalone ONNX file.

The file is the network the service runs (BatchNorm folded, emptied channels removed, every layer on
its dense path), in float32 with a dynamic batch, opset pinned (engine.compact.ONNX_OPSET). Input
"x": float32 [N, 3, 32, 32], RGB scaled to 0..1 then standardised with the manifest's mean and std
(both stored in the file's metadata, with the class names); output "logits" [N, classes]. No test-time
augmentation (an edge device runs one view: the accuracy to expect is `test_acc_no_tta_mean`).
Every export is checked against PyTorch with ONNX Runtime to 1e-4 before it is written or served.

    prune-export --models-dir models --out onnx/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from core.checkpoint import load_model
from core.manifest import Manifest
from engine.compact import ONNX_OPSET, CompactNet, compact, dense_graph, onnx_bytes, onnxruntime_available

TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graph does not reproduce the network (or ONNX Runtime is missing)."""


def export_compact(net: CompactNet, metadata: dict[str, str] | None = None) -> bytes:
    """The ONNX file of ``net`` (float32 copy), verified with ONNX Runtime against PyTorch."""
    import onnx

    graph = dense_graph(net)
    data = onnx_bytes(graph, torch.randn(2, 3, *net.input_hw))
    model = onnx.load_from_string(data)
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    data = model.SerializeToString()
    verify(data, graph, net.input_hw)
    return data


def verify(data: bytes, module: torch.nn.Module, input_hw: tuple[int, int]) -> float:
    """Largest |ONNX Runtime − PyTorch| on random inputs at batch 1 and 5; ExportError above TOLERANCE."""
    if not onnxruntime_available():
        raise ExportError("onnxruntime is not installed: the export cannot be verified")
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 5):
        x = torch.randn(batch, 3, *input_hw)
        with torch.inference_mode():
            expected = module(x).float()
        got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        worst = max(worst, (got - expected).abs().max().item())
    if worst > TOLERANCE:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {TOLERANCE:g})")
    return worst


def file_metadata(manifest: Manifest, name: str) -> dict[str, str]:
    return {"variant": name, "classes": json.dumps(manifest.classes),
            "normalization": json.dumps(manifest.normalization.model_dump()),
            "input": "float32 [N,3,32,32]: RGB/255, minus mean, divided by std", "opset": str(ONNX_OPSET)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prune-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="models", help="the models directory (manifest + checkpoints)")
    p.add_argument("--out", required=True, help="directory for <variant>.onnx files")
    p.add_argument("--variants", nargs="*", help="names to export (default: every variant)")
    args = p.parse_args(argv)
    models_dir = Path(args.models_dir)
    try:
        manifest = Manifest.model_validate_json((models_dir / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"prune-export: cannot read {models_dir / 'manifest.json'}: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    print("| variant | checkpoint bytes | ONNX bytes | max abs diff vs PyTorch |\n|---|---|---|---|")
    for entry in manifest.variants:
        if args.variants and entry.name not in args.variants:
            continue
        model = load_model(models_dir / entry.file, entry.sha256, root=models_dir, base_cache=cache)
        net = compact(model)
        data = export_compact(net, file_metadata(manifest, entry.name))
        (out / f"{entry.name}.onnx").write_bytes(data)
        diff = verify(data, dense_graph(net), net.input_hw)
        print(f"| {entry.name} | {entry.bytes or 0:,} | {len(data):,} | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
