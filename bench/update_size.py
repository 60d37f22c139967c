"""Bytes per federated update, per codec, for the tiny stand-in and full-size SmolVLA; JSON on stdout.

Full size is computed from tensor shapes only: SmolVLA with the SmolVLM2-500M-Video-Instruct architecture is
instantiated on torch's 'meta' device (no weights, no downloads). The reference is what the zk0 research
prototype (ivelin/zk0) sends per client per direction each round: the full fp32 state dict, frozen VLM
included (~450 M parameters, ~1.8 GB). Target: <= 1/16 of that.

With `--federated-rounds N`, each codec also runs a short real federation (`zk0 fleet local`: SuperLink +
two SuperNodes, tiny model, two datasets recorded with `zk0 record --sim` unless `--dataset` is given) and
reports its final server eval loss, bytes received per round, and whether it lands within 2% of fp32's loss
(either side). The federations run with the shipped server defaults (LR/mu schedule, validation) except the
few settings that make a tiny-model round short: local steps, batch size, server eval samples.

  python bench/update_size.py [--federated-rounds 3 [--local-steps 8] [--dataset A --dataset B]]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROTOTYPE_BYTES_PER_ROUND = 1.8e9  # ivelin/zk0: full fp32 state dict per client per direction
TARGET_FRACTION = 1 / 16
LOSS_TOLERANCE = 0.02  # a codec's final server eval loss within 2% of fp32's


def _smolvla(vlm_shape: Any, on_meta: bool) -> Any:
    """SmolVLA for an SO-101 (6-dof state/action, two cameras) around a randomly initialised SmolVLM."""
    import tempfile
    from pathlib import Path

    import torch
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from zk0.learn.tiny_vlm import is_vlm_dir, write_tiny_vlm

    vlm_dir = Path(tempfile.gettempdir()) / f"zk0-vlm-{vlm_shape.fingerprint()}"
    if not is_vlm_dir(vlm_dir):
        write_tiny_vlm(vlm_dir, vlm_shape)
    side = vlm_shape.image_size
    config = SmolVLAConfig(
        vlm_model_name=str(vlm_dir),
        load_vlm_weights=False,
        device="cpu",
        push_to_hub=False,
        resize_imgs_with_padding=(side, side),
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (6,)),
            "observation.images.front": PolicyFeature(FeatureType.VISUAL, (3, side, side)),
            "observation.images.wrist": PolicyFeature(FeatureType.VISUAL, (3, side, side)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))},
    )
    # lerobot prints progress to stdout; keep stdout for the JSON result alone.
    with contextlib.redirect_stdout(sys.stderr), torch.device("meta" if on_meta else "cpu"):
        return SmolVLAPolicy(config)


def _model_row(name: str, policy: Any) -> dict[str, Any]:
    from zk0.learn.codec import report

    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    summary = report(trainable)
    total = sum(p.numel() for p in policy.parameters())
    full_state_fp32 = 4 * sum(t.numel() for t in policy.state_dict().values())
    return {
        "model": name,
        "parameters_total": total,
        "parameters_trainable": summary["parameters"],
        "trainable_tensors": summary["tensor_count"],
        "full_state_dict_fp32_bytes": full_state_fp32,
        "bytes_per_update": summary["bytes"],
        "fraction_of_prototype": {c: b / PROTOTYPE_BYTES_PER_ROUND for c, b in summary["bytes"].items()},
        "fraction_of_own_full_state_dict": {c: b / full_state_fp32 for c, b in summary["bytes"].items()},
    }


def measure(eval_loss_by_codec: Callable[[str], float] | None = None) -> dict[str, Any]:
    """Bytes per update per codec (tiny and full size); with the hook, each codec's final server eval loss."""
    from zk0.learn.codec import CODECS
    from zk0.learn.tiny_vlm import SMOLVLM2_500M, VLMShape

    tiny = _model_row("tiny", _smolvla(VLMShape(), on_meta=False))
    full = _model_row("smolvla-smolvlm2-500m (shapes only)", _smolvla(SMOLVLM2_500M, on_meta=True))
    target = PROTOTYPE_BYTES_PER_ROUND * TARGET_FRACTION
    result: dict[str, Any] = {
        "prototype_bytes_per_client_per_direction": PROTOTYPE_BYTES_PER_ROUND,
        "target_bytes": target,
        "models": [tiny, full],
        "full_size_meets_target": {c: b <= target for c, b in full["bytes_per_update"].items()},
    }
    if eval_loss_by_codec is not None:
        result["server_eval_loss"] = {codec: eval_loss_by_codec(codec) for codec in CODECS}
        fp32 = result["server_eval_loss"]["fp32"]
        result["relative_to_fp32"] = {c: loss / fp32 - 1 for c, loss in result["server_eval_loss"].items()}
        result["within_2pct_of_fp32"] = {c: abs(r) <= LOSS_TOLERANCE for c, r in result["relative_to_fp32"].items()}
    return result


def _zk0(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "zk0.cli", *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"zk0 {args[0]} failed:\n{result.stderr[-3000:]}")


def _record_datasets(root: Path) -> list[Path]:
    config = Path(__file__).resolve().parents[1] / "configs" / "agent.yaml"
    for name, task in (("red", "pick the red cube"), ("blue", "push the blue cube left")):
        _zk0("record", "--sim", "--config", str(config), "--root", str(root), "--dataset", name, "--task", task,
             "--episodes", "4", "--episode-time-s", "3", "--reset-time-s", "0", "--no-progress")
    return [root / "red", root / "blue"]


class FederatedLoss:
    """Runs `zk0 fleet local` with one codec; returns the final server eval loss, keeps bytes in per round."""

    def __init__(self, datasets: list[Path], rounds: int, local_steps: int, work: Path) -> None:
        self.datasets, self.rounds, self.local_steps, self.work = datasets, rounds, local_steps, work
        self.bytes_in_per_round: dict[str, float] = {}
        self.initial_loss: dict[str, float] = {}  # round 0: the same model for every codec

    def __call__(self, codec: str) -> float:
        config = self.work / f"server-{codec}.yaml"
        config.write_text(f"training: {{codec: {codec}, local_steps: {self.local_steps}, batch_size: 4, seed: 0}}\n"
                          "evaluation: {max_samples: 32}\n")
        run_dir = self.work / f"run-{codec}"
        dataset_args = [arg for d in self.datasets for arg in ("--dataset", str(d))]
        _zk0("fleet", "local", *dataset_args, "--rounds", str(self.rounds), "--out", str(run_dir),
             "--model", "tiny", "--config", str(config))
        history = json.loads((run_dir / "federated_metrics.json").read_text())["rounds"]
        self.bytes_in_per_round[codec] = sum(r["bytes_in"] for r in history if r["round"] > 0) / self.rounds
        self.initial_loss[codec] = float(history[0]["server_eval"]["loss"])
        print(f"{codec}: server eval loss {history[0]['server_eval']['loss']:.5f} (round 0) -> "
              f"{history[-1]['server_eval']['loss']:.5f} (round {history[-1]['round']})", file=sys.stderr)
        return float(history[-1]["server_eval"]["loss"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--federated-rounds", type=int, default=0, help="also run a federation per codec")
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--dataset", action="append", type=Path, help="node dataset (default: two recorded)")
    args = parser.parse_args()
    if args.federated_rounds <= 0:
        print(json.dumps(measure()))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datasets = args.dataset or _record_datasets(work / "datasets")
        loss = FederatedLoss(datasets, args.federated_rounds, args.local_steps, work)
        result = measure(loss)
        fp32_drop = loss.initial_loss["fp32"] - result["server_eval_loss"]["fp32"]
        result["federated"] = {
            "rounds": args.federated_rounds, "local_steps": args.local_steps, "nodes": len(datasets),
            "bytes_in_per_round": loss.bytes_in_per_round, "round0_server_eval_loss": loss.initial_loss,
            # how far each codec's final loss is from fp32's, relative to how much fp32 itself learned
            "difference_over_fp32_improvement": {
                c: (v - result["server_eval_loss"]["fp32"]) / fp32_drop if fp32_drop else None
                for c, v in result["server_eval_loss"].items()},
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
