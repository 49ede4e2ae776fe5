"""Training-step time with and without keeping freed memory in the heap (maskrcnn.engine.memory).

malloc's settings hold for a whole process, so the two variants run in separate child processes, taking
turns, each timing the same steps on the same data from the same starting weights:

    python benchmarks/train_allocator.py --annotations data/shapes/annotations/instances_train.json \\
        --images data/shapes/train --weights runs/shapes/model.safetensors --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(args) -> None:
    import torch

    from maskrcnn.engine import distributed
    from maskrcnn.engine.memory import keep_freed_memory
    from maskrcnn.engine.train import TrainConfig, _Trainer, resolve_defaults

    applied = keep_freed_memory()
    info, device = distributed.setup("cpu")
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(train_annotations=args.annotations, train_images=args.images, out=out, iters=600,
                             epochs=None, batch_size=4)
        trainer = _Trainer(resolve_defaults(config, device), info, device, False, False)
        if args.weights:
            from safetensors.torch import load_file

            trainer.model.load_state_dict(load_file(args.weights), strict=False)
        batches = trainer._local_batches(0)
        times, faults = [], 0
        for i in range(args.steps + 2):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()  # the batch's loading too: it allocates as well
            images, targets = trainer._to_device(*next(batches))
            trainer.step(images, targets, i)
            if i >= 2:  # the first steps allocate for the first time in both variants
                times.append(time.perf_counter() - start)
                faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"applied": applied, "times": times, "faults_per_step": faults / args.steps,
                      "threads": torch.get_num_threads()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--weights", help="safetensors of a trained model with the default architecture")
    p.add_argument("--steps", type=int, default=10, help="timed steps per child process")
    p.add_argument("--rounds", type=int, default=3, help="child processes per variant, alternating")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    command = [sys.executable, __file__, "--child", "--annotations", args.annotations, "--images", args.images,
               "--steps", str(args.steps)] + (["--weights", args.weights] if args.weights else [])
    results: dict[str, dict] = {"malloc as is": {"times": [], "faults": []},
                                "freed memory kept": {"times": [], "faults": []}}
    for _ in range(args.rounds):
        for name, value in (("malloc as is", "0"), ("freed memory kept", "1")):
            env = dict(os.environ, MASKRCNN_KEEP_FREED_MEMORY=value)
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            record = json.loads(out.strip().splitlines()[-1])
            if record["applied"] != (value == "1"):
                raise SystemExit(f"{name}: the malloc settings were {'not ' if value == '1' else ''}applied")
            results[name]["times"] += record["times"]
            results[name]["faults"].append(record["faults_per_step"])
    medians = {name: sorted(r["times"])[len(r["times"]) // 2] for name, r in results.items()}
    base = medians["malloc as is"]
    print(f"median seconds per training step, {args.rounds} x {args.steps} steps per variant, batch 4, "
          f"{record['threads']} threads")
    for name, r in results.items():
        faults = sum(r["faults"]) / len(r["faults"])
        print(f"{name:18s} {medians[name]:.3f}  {medians[name] / base:.2f}x   page faults per step {faults:.0f}")


if __name__ == "__main__":
    main()
