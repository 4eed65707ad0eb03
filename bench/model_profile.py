"""Where the model's time goes, per ONNX operator, and what a leaner group norm would give.

    .venv/bin/python -m bench.model_profile [--model-dir DIR] [--threads 1]

1. onnxruntime's own profiler on real images: milliseconds per run by operator type and the
   slowest nodes. On the shipped model most of the time is not in the convolutions but in the
   element-wise operators tf2onnx emits for Keras ``GroupNormalization`` (a 5-D reshape to
   ``[N, H, W, groups, C/groups]``, moments over axes 1, 2, 4, and broadcast Sub/Mul/Add).
2. ``--instance-norm``: the same graph with every such group norm rewritten the way PyTorch
   exports ``GroupNorm`` (NCHW ``Reshape [N, groups, -1]`` -> ``InstanceNormalization`` ->
   ``Reshape`` -> per-channel ``Mul``/``Add``), checked against the original on the same
   images (max abs difference of both outputs) and timed the same way. Optionally written out
   (``--write``) with a model card whose sha256 is updated, so the service and
   ``bench.throughput --model-dir`` can run it. The rewrite itself now lives in
   ``training/onnx_rewrite.py`` and runs in every export; on a model exported since then this
   mode finds nothing left to rewrite.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.model_card import read_card
from app.onnx_model import session_options
from app.preprocessing import preprocess_bytes
from bench.images import select_images
from training.onnx_rewrite import rewrite_group_norms

REPO = Path(__file__).resolve().parents[1]


def op_profile(model: bytes | str, batch: np.ndarray, threads: int, runs: int) -> dict[str, Any]:
    """Mean milliseconds per run by operator type and the ten slowest nodes."""
    options = session_options(threads, False)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="ort-profile-")) / "run")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batch}
    for _ in range(3):
        session.run(None, feed)
    started = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    wall_ms = (time.perf_counter() - started) * 1000 / runs
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter[str] = collections.Counter()
    by_node: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
            by_node[event["name"].removesuffix("_kernel_time")] += event["dur"]
    profiled_runs = runs + 3
    return {
        "wall_ms_per_run": round(wall_ms, 3),
        "by_op_ms": {op: round(us / profiled_runs / 1000, 3) for op, us in by_op.most_common()},
        "slowest_nodes_ms": {
            node: round(us / profiled_runs / 1000, 3) for node, us in by_node.most_common(10)
        },
    }


def write_model_dir(source: Path, target: Path, model_bytes: bytes) -> None:
    """A copy of ``source`` with the rewritten ONNX and the card's sha256/size updated."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("plots", "checkpoint"))
    card_path = target / "model_card.json"
    card = json.loads(card_path.read_text())
    (target / card["onnx"]["file"]).write_bytes(model_bytes)
    card["onnx"]["sha256"] = hashlib.sha256(model_bytes).hexdigest()
    card["onnx"]["size_bytes"] = len(model_bytes)
    card_path.write_text(json.dumps(card, indent=2) + "\n")


def _print_profile(title: str, profile: dict[str, Any]) -> None:
    print(f"{title}: {profile['wall_ms_per_run']} ms per run (wall)")
    total = sum(profile["by_op_ms"].values())
    for op, ms in list(profile["by_op_ms"].items())[:8]:
        print(f"  {op:<22} {ms:7.3f} ms  {100 * ms / total:5.1f} %")
    print("  slowest nodes:")
    for node, ms in list(profile["slowest_nodes_ms"].items())[:5]:
        print(f"    {ms:7.3f} ms  {node}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_profile", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "ballscrew-pitting")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--instance-norm", action="store_true", help="also try the rewrite")
    parser.add_argument("--write", type=Path, help="model folder for the rewritten model")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    card, _ = read_card(args.model_dir)
    images = select_images()
    spec = card.input_spec
    batch = np.stack([preprocess_bytes(images[i].data, spec) for i in range(args.batch)])
    check = np.stack([preprocess_bytes(image.data, spec) for image in images[:16]])
    model_bytes = (args.model_dir / card.onnx.file).read_bytes()
    results: dict[str, Any] = {"model": f"{card.name} {card.version}", "threads": args.threads}
    results["shipped"] = op_profile(model_bytes, batch, args.threads, args.runs)
    _print_profile(f"{card.name} {card.version}, batch {args.batch}", results["shipped"])
    if args.instance_norm or args.write:
        rewritten, count = rewrite_group_norms(model_bytes)
        options = session_options(args.threads, False)
        before = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        after = ort.InferenceSession(rewritten, options, providers=["CPUExecutionProvider"])
        name = before.get_inputs()[0].name
        diffs = [
            float(np.max(np.abs(a - b)))
            for a, b in zip(
                before.run(None, {name: check}), after.run(None, {name: check}), strict=True
            )
        ]
        results["instance_norm"] = {
            "group_norms_rewritten": count,
            "max_abs_diff_outputs": diffs,
            **op_profile(rewritten, batch, args.threads, args.runs),
        }
        print(
            f"\n{count} group norms rewritten; max abs difference of the outputs on 16 real "
            f"images: {', '.join(f'{d:.2e}' for d in diffs)}"
        )
        _print_profile("with InstanceNormalization", results["instance_norm"])
        speedup = (
            results["shipped"]["wall_ms_per_run"] / results["instance_norm"]["wall_ms_per_run"]
        )
        print(f"speed-up of a model run: {speedup:.2f}x")
        if args.write:
            write_model_dir(args.model_dir, args.write, rewritten)
            print(f"rewritten model folder: {args.write}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
