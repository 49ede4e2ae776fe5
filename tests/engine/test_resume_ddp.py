"""Exact resume and DDP equivalence: the two promises of the trainer's seeding scheme.

Both use a tiny GroupNorm model (no batch statistics) on tiny synthetic images so they run in seconds. A third
test documents what the default recipe's BatchNorm does under 2 CPU processes (it is not the 1-process run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from maskrcnn.data.synthetic import make_shapes
from maskrcnn.engine.plots import read_metrics
from maskrcnn.engine.train import TrainConfig, build_training_model, train

TINY_MODEL = {"fpn_channels": 32, "mask_head_channels": 32, "box_head_hidden": 64, "box_batch_size_per_image": 32,
              "rpn": {"batch_size_per_image": 64, "pre_nms_top_n_train": 300, "post_nms_top_n_train": 100,
                      "pre_nms_top_n_test": 100, "post_nms_top_n_test": 50},
              "anchor_sizes": [16, 32, 64, 128, 256],
              # batch-independent normalisation: with BatchNorm each process would normalise over its own images.
              # No norm in the tiny mlp box head: GroupNorm's 32 groups of its 64 features hold 2 values each,
              # which turns the last-bit differences of DDP's gradient sums into weight differences of ~3e-3.
              # The shared box head and no jittered boxes for the same reason: with either of the recipe's two
              # options the weights drifted apart by 3e-5 to 5e-5, with neither by under 1e-5. The jitter is
              # drawn from the same per-image generators as the sampling, which this test does check, and
              # the resume test below runs with both options.
              "backbone_norm": "gn", "fpn_norm": "gn", "head_norm": "gn", "mlp_head_norm": None,
              "box_head": "mlp", "gt_jitter_copies": 0}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=2, size=64, seed=3, progress=False)



def tiny_config(shapes, out, **changes) -> TrainConfig:
    config = TrainConfig(train_annotations=shapes["train_annotations"], train_images=shapes["train_images"],
                         out=str(out), iters=7, epochs=None, batch_size=2, lr=0.01, warmup_iters=3, optimizer="sgd", bf16=False,
                         min_sizes=(64, 80), max_size=107, num_workers=0, checkpoint_every=3, log_every=1,
                         eval_every=None, device="cpu", model=dict(TINY_MODEL), seed=5, ema_decay=0.9)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def test_resume_is_bit_exact(shapes, tmp_path, one_thread):
    """Killed after iteration 4 (last checkpoint at 3), resumed, the run ends bit-identical to a straight one.
    Aspect-ratio grouping gives 3 iterations per epoch here, so the resumed part crosses epoch boundaries;
    the resumed half also uses a DataLoader worker, which must not change anything either."""
    recipe = {**TINY_MODEL, "box_head": "split_mlp", "gt_jitter_copies": 10}
    straight = train(tiny_config(shapes, tmp_path / "straight", model=dict(recipe)), progress=False)
    assert straight["completed"] and straight["iterations"] == 7

    interrupted = tiny_config(shapes, tmp_path / "resumed", model=dict(recipe))
    first = train(interrupted, _stop_after=4, progress=False)
    assert not first["completed"] and first["iterations"] == 4
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["iteration"] == 3
    assert not (tmp_path / "resumed" / "model.safetensors").exists()

    interrupted.num_workers = 1  # operational settings may change on resume
    second = train(interrupted, resume=True, progress=False)
    assert second["completed"] and second["iterations"] == 7

    # model.safetensors is the weight average (ema_decay), so it also checks that the average resumed exactly
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"

    # The raw weights and the optimizer state (momentum) must match too, or the runs would diverge from here on.
    sa = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    sb = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert sa["ema"]["updates"] == sb["ema"]["updates"] == 7
    averaged = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], sa["model"][k])]
    assert averaged, "the saved weights should be the average, not the last step's"
    for key, state in sa["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], sb["optimizer"]["state"][key]["momentum_buffer"])

    # The log is replayed from the checkpoint: one record per iteration, no duplicates from the lost iteration 4.
    iterations = [r["iteration"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if r["type"] == "train"]
    assert iterations == list(range(1, 8))
    losses_a = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    losses_b = [r["loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
    assert losses_a == losses_b


def _train_on_two_processes(shapes, tmp_path, common: dict) -> None:
    """The same tiny config through torchrun with 2 CPU processes x 1 image, into tmp_path / "ddp"."""
    config_path = tmp_path / "ddp.json"
    config_path.write_text(json.dumps(tiny_config(shapes, tmp_path / "ddp", **common).to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "maskrcnn.cli", "train", "--config", str(config_path), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-8000:]
    assert "2 processes x 1 images" in done.stdout


def test_two_process_ddp_matches_one_process(shapes, tmp_path, one_thread):
    """torchrun with 2 CPU processes x 1 image == 1 process x 2 images (same global batch of 2).

    Large scale jitter makes every training image 64x64, so padding is identical either way."""
    common = dict(lsj=64, lsj_scale=[0.5, 1.5], iters=3, warmup_iters=0, lr=0.005, checkpoint_every=100)
    single = train(tiny_config(shapes, tmp_path / "single", **common), progress=False)
    assert single["completed"]

    _train_on_two_processes(shapes, tmp_path, common)

    a = load_file(tmp_path / "single" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    # After one step the two agree to ~1e-6 (float summation order of the gradient sums); over the next steps
    # that grows with the CPU's kernels: under 1e-5 on an Intel AMX machine, 4e-5 to 6e-5 on an AMD EPYC one,
    # mostly in the first conv and the class logits. A wrong gradient average, shard or seed moves weights
    # by the order of one update (the check below: > 100x the difference).
    assert worst < 1e-4, f"DDP weights differ from single-process weights by up to {worst}"
    # The weights moved far more than the tolerance, so the agreement is not trivial.
    initial, _ = build_training_model(tiny_config(shapes, tmp_path / "x", **common), 7, ["bg"] * 7, list(range(7)))
    moved = max((a[k] - v).abs().max().item() for k, v in initial.state_dict().items() if v.is_floating_point())
    assert moved > 100 * max(worst, 1e-6), (moved, worst)
    single_losses = [r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if r["type"] == "train"]
    ddp_losses = [r["loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if r["type"] == "train"]
    # the first loss comes before any update: the same global batch gives the same loss up to summation order;
    # the later ones inherit the weights' drift above
    assert single_losses[0] == pytest.approx(ddp_losses[0], rel=1e-6)
    assert single_losses == pytest.approx(ddp_losses, rel=1e-3)
    # Only rank 0 wrote files.
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir())


def test_two_process_ddp_with_batchnorm_on_cpu_normalises_per_process(shapes, tmp_path, one_thread):
    """The default recipe's BatchNorm under torchrun on CPU: SyncBatchNorm is CUDA-only, so the trainer leaves
    BatchNorm as it is and each process normalises over its own image. 2 processes x 1 image are then NOT the
    same run as 1 process x 2 images: already the first loss (before any update) differs, by far more than
    the 1e-6 summation-order difference the GroupNorm test above allows. If the trainer ever synchronised the
    batch statistics on CPU, this test fails and the GroupNorm-only caveat in config.py can go."""
    bn = {**TINY_MODEL, "backbone_norm": "bn", "fpn_norm": "bn", "head_norm": "bn", "mlp_head_norm": "bn"}
    common = dict(lsj=64, lsj_scale=[0.5, 1.5], iters=1, warmup_iters=0, lr=0.005, checkpoint_every=100,
                  model=bn, ema_decay=None)
    single = train(tiny_config(shapes, tmp_path / "single", **common), progress=False)
    assert single["completed"]
    _train_on_two_processes(shapes, tmp_path, common)
    single_loss, = [r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if r["type"] == "train"]
    ddp_loss, = [r["loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if r["type"] == "train"]
    a = load_file(tmp_path / "single" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point() and "running" not in k)
    stats = max(((a[k] - b[k]).abs().max().item() for k in a if "running" in k), default=0.0)
    # Measured: first losses 4.44576 vs 4.44118 (rel. 1e-3), weights after the one step up to 2.4e-3 apart,
    # running statistics (DDP keeps rank 0's, from its one image) up to 0.51 apart. With GroupNorm the same
    # comparison gives ~1e-6 for the loss and the weights.
    assert abs(single_loss - ddp_loss) > 1e-4 * abs(single_loss), (single_loss, ddp_loss)
    assert worst > 1e-4 and stats > 1e-2, (worst, stats)
