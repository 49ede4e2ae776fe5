"""Training-step time of recipe options, side by side in one process: each option gets its own trainer on
the same data and, with --weights, the same trained starting weights (later in a run there are more
positive RoIs than at the start, so a fresh model times the cheap early steps). The options take turns
step by step, each round starting with the next one, so a slow minute of a noisy machine slows them all alike.

    python benchmarks/train_step_options.py --annotations data/shapes/annotations/instances_train.json \\
        --images data/shapes/train --weights runs/shapes/model.safetensors

Options are TrainConfig changes on top of the defaults, as JSON: --option NAME='{"model": {...}}'.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from maskrcnn.engine import distributed
from maskrcnn.engine.train import TrainConfig, config_with, resolve_defaults
from maskrcnn.engine.trainer import _Trainer

DEFAULT_OPTIONS = {
    "default": {},
    "gn_fpn_and_heads": {"model": {"fpn_norm": "gn", "head_norm": "gn"}},
    "mlp_head_no_norm": {"model": {"mlp_head_norm": None}},
    "shared_box_head": {"model": {"box_head": "mlp"}},
    "no_gt_jitter": {"model": {"gt_jitter_copies": 0}},
    "mask_rois_32": {"model": {"mask_rois_per_image": 32}},
    "box_rois_64": {"model": {"box_batch_size_per_image": 64}},
    "rpn_top_500": {"model": {"rpn": {"pre_nms_top_n_train": 500, "post_nms_top_n_train": 500}}},
    "box_points_2x2": {"model": {"box_sampling_ratio": 2}},
    "box_points_3x3": {"model": {"box_sampling_ratio": 3}},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--weights", help="safetensors of a trained model with the default architecture")
    p.add_argument("--option", action="append", default=[], metavar="NAME=JSON")
    p.add_argument("--steps", type=int, default=12, help="timed steps per option (after 2 warm-up steps)")
    args = p.parse_args()
    options = dict(DEFAULT_OPTIONS)
    for item in args.option:
        name, _, text = item.partition("=")
        options[name] = json.loads(text)

    info, device = distributed.setup("cpu")
    state = None
    if args.weights:
        from safetensors.torch import load_file

        state = load_file(args.weights)
    steps = {}
    with tempfile.TemporaryDirectory() as out:
        for name, changes in options.items():
            base = TrainConfig(train_annotations=args.annotations, train_images=args.images, out=out, iters=600,
                               epochs=None, batch_size=4)
            trainer = _Trainer(resolve_defaults(config_with(base, changes), device), info, device, False, False)
            if state is not None:
                # strict=False: a GroupNorm option has no running statistics to take, a shared box head
                # none of the split head's layers, a narrower head other shapes; the rest of the weights
                # is all their timing needs
                own = trainer.network.state_dict()
                fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
                trainer.network.load_state_dict(fitting, strict=False)
            steps[name] = _stepper(trainer)
        times = {name: [] for name in steps}
        names = list(steps)
        for i in range(args.steps + 2):
            # a different option goes first each round: the first step after another trainer's ran slower
            for name in names[i % len(names):] + names[:i % len(names)]:
                step = steps[name]
                start = time.perf_counter()
                step(i)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
    base = _median(times["default"]) if "default" in times else None
    print(f"median seconds per training step over {args.steps} steps, batch 4, {torch.get_num_threads()} threads")
    for name, values in times.items():
        ratio = f"  {_median(values) / base:.2f}x the default" if base else ""
        print(f"{name:20s} {_median(values):.3f}{ratio}")


def _stepper(trainer):
    """The trainer's own step (forward, backward, clipping, update), on its own data order."""
    batches = trainer._local_batches(0)

    def step(i: int) -> None:
        images, targets = trainer._to_device(*next(batches))
        trainer.step(images, targets, i)

    return step


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


if __name__ == "__main__":
    main()
