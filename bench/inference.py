"""Action-chunk latency and peak memory on the CPU: torch eager vs onnxruntime fp32 vs onnxruntime int8.

For each model (`--model tiny`, `--model full-random`: SmolVLM2-500M shape, random weights; or `--checkpoint
DIR`), a seeded SmolVLA is built for a small synthetic SO-101 dataset (two 48x64 cameras; SmolVLA resizes them
to the VLM's image size), exported once with `zk0.learn.onnx_export` (fp32, then its int8 dynamic
quantization), and each backend runs in its own child process, so peak RSS is comparable:

- chunk latency p50 / p99: `predict_action_chunk` on one pre-processed observation with fresh noise, after
  `--warmup` chunks, `--chunks` times (the pre-processor, tokenizer included, is outside the timing: it is
  the same Python code for every backend);
- peak RSS: the child's maximum resident set, VmHWM (imports, model load and inference);
- prefix p50 (onnxruntime): the prefix graph alone (VLM: images + language + state -> KV cache); the rest of
  a chunk is `--steps` denoise steps;
- parity: max abs difference of normalized actions vs torch on the same batch and noise (onnxruntime only);
- compute bound: a chunk's floating-point work (`chunk_gflop`, counted on the torch model by torch's
  FlopCounterMode: matmuls, convolutions, attention) and this CPU's fp32 matmul throughput through
  onnxruntime (`matmul_peak_gflops`: the best of a few runs of one MatMul the size of the vision MLP), so each
  backend's `fraction_of_peak` and the best ratio to torch any fp32 backend could reach (`fp32_floor_vs_torch`:
  the chunk at peak throughput against torch's p50) show how far fp32 can still go.

`--threads N` sets torch's and onnxruntime's intra-op threads (default: each library's own choice). Prints one
JSON object; only meaningful on a quiet machine (`load_1m` is recorded alongside).

  python bench/inference.py --model tiny [--model full-random] [--chunks 20] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKENDS = ("torch", "onnxruntime-fp32", "onnxruntime-int8")


def build_checkpoint(model: str, work: Path) -> Path:
    """A seeded `model` SmolVLA for a synthetic two-camera SO-101 dataset, saved as a checkpoint."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from zk0.learn.checkpoint import CheckpointMeta, save_checkpoint
    from zk0.learn.policy import PolicySpec, seeded_policy_bundle

    root = work / "dataset"
    if not root.exists():
        _synthetic_dataset(root)
    meta = LeRobotDatasetMetadata("local/bench", root=root)
    save_checkpoint(work / model, seeded_policy_bundle(PolicySpec(model=model), meta, seed=0),
                    CheckpointMeta(run="bench", round=0))
    return work / model


def _synthetic_dataset(root: Path) -> None:
    """One short episode: the features and statistics a policy is built for (values do not matter here)."""
    import numpy as np
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    names = [f"{j}.pos" for j in ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")]
    image = {"dtype": "video", "shape": (48, 64, 3), "names": ["height", "width", "channels"]}
    features = {"observation.state": {"dtype": "float32", "shape": (6,), "names": names},
                "action": {"dtype": "float32", "shape": (6,), "names": names},
                "observation.images.front": image, "observation.images.wrist": image}
    dataset = LeRobotDataset.create(repo_id="local/bench", fps=30, features=features, root=root,
                                    robot_type="so101_follower")
    rng = np.random.default_rng(0)
    for _ in range(8):
        state = rng.uniform(-40, 40, 6).astype(np.float32)
        dataset.add_frame({"observation.state": state, "action": state,
                           "observation.images.front": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
                           "observation.images.wrist": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
                           "task": "pick the red cube"})
    dataset.save_episode()
    dataset.finalize()


def child(args: argparse.Namespace) -> dict:
    """Time one backend in this process; prints its JSON line."""
    import numpy as np
    import torch
    from lerobot.policies.utils import prepare_observation_for_inference

    from zk0.learn.checkpoint import load_checkpoint
    from zk0.learn.onnx_parity import TASK, raw_observation
    from zk0.learn.onnx_runtime import load_onnx_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.child == "torch":
        bundle, _ = load_checkpoint(args.checkpoint)
        bundle.policy.eval().config.num_steps = args.steps
    else:
        bundle = load_onnx_bundle(args.export, threads=args.threads)
    load_s = time.perf_counter() - started
    config = bundle.policy.config
    frame = raw_observation(config, np.random.default_rng(0))
    generator = torch.Generator().manual_seed(0)
    latencies, first = [], None
    with torch.inference_mode():
        batch = bundle.preprocessor(prepare_observation_for_inference(dict(frame), torch.device("cpu"), TASK,
                                                                      "so101_follower"))
        for i in range(args.warmup + args.chunks):
            noise = torch.randn((1, config.chunk_size, config.max_action_dim), generator=generator)
            t0 = time.perf_counter()
            actions = bundle.policy.predict_action_chunk(dict(batch), noise=noise)
            if i >= args.warmup:
                latencies.append(time.perf_counter() - t0)
            first = actions if first is None else first
        # onnxruntime: the prefix graph alone, so a chunk splits into prefix + steps x denoise step
        prefix = []
        if args.child != "torch":
            feeds = bundle.policy.prefix_feeds(dict(batch))
            for _ in range(args.chunks):
                t0 = time.perf_counter()
                bundle.policy.prefix_session.run(None, feeds)
                prefix.append(time.perf_counter() - t0)
        work = {"chunk_gflop": chunk_gflop(bundle.policy, batch, noise)} if args.child == "torch" else {}
    np.save(args.actions_out, first.numpy())
    split = {"prefix_p50_s": round(statistics.median(prefix), 4)} if prefix else {}
    if args.child == "onnxruntime-fp32":
        split["matmul_peak_gflops"] = matmul_peak_gflops(args.threads)
    return {**split, **work, "load_s": round(load_s, 2), "chunk_p50_s": round(statistics.median(latencies), 4),
            "chunk_p99_s": round(float(np.percentile(latencies, 99)), 4), "chunks": len(latencies),
            "peak_rss_mb": peak_rss_mb()}


def chunk_gflop(policy, batch: dict, noise) -> float:
    """Floating-point operations (GFLOP) of one action chunk, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        policy.predict_action_chunk(dict(batch), noise=noise)
    return round(counter.get_total_flops() / 1e9, 2)


def matmul_peak_gflops(threads: int | None, rows: int = 1024, inner: int = 768, cols: int = 3072) -> float:
    """fp32 GFLOP/s of one onnxruntime MatMul (rows x inner @ inner x cols, SigLIP's MLP at 512x512), best of
    10 after a warm-up: what the CPU's GEMM kernels give a large, well-shaped product."""
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((inner, cols), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, inner])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])], [weight])
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(helper.make_model(graph).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((rows, inner), np.float32)
    session.run(None, {"x": x})
    best = min(_timed(lambda: session.run(None, {"x": x})) for _ in range(10))
    return round(2 * rows * inner * cols / best / 1e9, 1)


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over fork and exec, so a
    child would report its parent's peak when that is higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(backend: str, checkpoint: Path, export: Path | None, args: argparse.Namespace, actions: Path) -> dict:
    command = [sys.executable, __file__, "--child", backend, "--checkpoint", str(checkpoint), "--chunks",
               str(args.chunks), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--actions-out", str(actions)]
    if export is not None:
        command += ["--export", str(export)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_model(checkpoint: Path, work: Path, args: argparse.Namespace) -> dict:
    import numpy as np

    from zk0.learn.checkpoint import load_checkpoint
    from zk0.learn.onnx_export import ExportOptions, export_policy, quantize_export

    exports: dict[str, Path | None] = {"torch": None, "onnxruntime-fp32": work / f"{checkpoint.name}-fp32",
                                       "onnxruntime-int8": work / f"{checkpoint.name}-int8"}
    timings = {}
    if not exports["onnxruntime-fp32"].exists():
        bundle, meta = load_checkpoint(checkpoint)
        started = time.perf_counter()
        export_policy(bundle, checkpoint, meta.sha256, exports["onnxruntime-fp32"], ExportOptions(steps=args.steps))
        timings["export_fp32_s"] = round(time.perf_counter() - started, 1)
        del bundle
    if not exports["onnxruntime-int8"].exists():
        started = time.perf_counter()
        quantize_export(exports["onnxruntime-fp32"], exports["onnxruntime-int8"])
        timings["quantize_int8_s"] = round(time.perf_counter() - started, 1)
    results = {}
    for backend in args.backend:
        actions = work / f"{checkpoint.name}-{backend}.npy"
        results[backend] = run_child(backend, checkpoint, exports[backend], args, actions)
    reference = work / f"{checkpoint.name}-torch.npy"
    for backend, result in results.items():
        actions = work / f"{checkpoint.name}-{backend}.npy"
        if backend != "torch" and reference.exists() and actions.exists() and "error" not in result:
            result["max_abs_vs_torch"] = float(np.abs(np.load(actions) - np.load(reference)).max())
            if "chunk_p50_s" in results.get("torch", {}):
                result["p50_vs_torch"] = round(result["chunk_p50_s"] / results["torch"]["chunk_p50_s"], 3)
    compute_bound(results)
    sizes = {name: sum(p.stat().st_size for p in path.glob("*.onnx*")) / 2**20
             for name, path in exports.items() if path is not None}
    return {**timings, "export_mb": {k: round(v, 1) for k, v in sizes.items()}, "backends": results}


def compute_bound(results: dict) -> None:
    """Add each backend's share of the measured fp32 matmul peak, and the best fp32 ratio to torch it allows."""
    gflop = results.get("torch", {}).get("chunk_gflop")
    peak = results.get("onnxruntime-fp32", {}).get("matmul_peak_gflops")
    if not gflop or not peak:
        return
    for result in results.values():
        if "chunk_p50_s" in result:
            result["fraction_of_peak"] = round(gflop / result["chunk_p50_s"] / peak, 3)
    results["onnxruntime-fp32"]["fp32_floor_vs_torch"] = round(gflop / peak / results["torch"]["chunk_p50_s"], 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="tiny, full-random (repeatable; default tiny)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint to bench instead of building --model")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="flow-matching Euler steps, every backend")
    parser.add_argument("--threads", type=int, help="intra-op threads for torch and onnxruntime")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="default: all three")
    parser.add_argument("--work", type=Path, help="keep checkpoints and exports here (default: a temp dir)")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--actions-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    args.backend = args.backend or list(BACKENDS)
    # lerobot's model-building chatter goes to stderr: stdout carries the one JSON object
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="zk0-bench-inference-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        models = {}
        if args.checkpoint:
            models[args.checkpoint.name] = bench_model(args.checkpoint, work, args)
        for model in args.model or ([] if args.checkpoint else ["tiny"]):
            checkpoint = work / model if (work / model / "zk0.json").exists() else build_checkpoint(model, work)
            models[model] = bench_model(checkpoint, work, args)
    print(json.dumps({"load_1m": os.getloadavg()[0], "cpus": os.cpu_count(), "steps": args.steps,
                      "threads": args.threads, "chunks": args.chunks, "models": models}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
