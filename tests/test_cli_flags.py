"""Bad numbers, devices and folders on the command line: one line naming the problem, exit status 2, no work
done. The numeric rules live once (maskrcnn.checks) and apply to flags, config files and the API alike."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskrcnn import Predictor
from maskrcnn.checks import Number
from maskrcnn.cli import build_parser, main
from maskrcnn.commands import demo
from maskrcnn.devices import resolve_device
from maskrcnn.engine.evaluate import _to_coco
from maskrcnn.engine.train import TrainConfig, train
from maskrcnn.errors import MaskRCNNError
from maskrcnn.results import Detections

# pycocotools' decode trips a numpy 2 deprecation inside its own code; nothing to fix on our side.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# (command, flag, bad value): every numeric flag of every command, with NaN, infinity, negative, zero and
# out-of-range values among them. `export` has no numeric flag.
BAD_FLAGS = [
    ("train", "--iters", "0"), ("train", "--epochs", "-1"), ("train", "--batch-size", "0"),
    ("train", "--lr", "nan"), ("train", "--lr", "inf"), ("train", "--lr", "0"), ("train", "--lr", "-0.001"),
    ("train", "--weight-decay", "-1"), ("train", "--warmup-iters", "-1"), ("train", "--cooldown", "1.5"),
    ("train", "--ema", "1"), ("train", "--ema", "nan"), ("train", "--grad-clip", "-1"),
    ("train", "--grad-clip", "inf"), ("train", "--seed", "-1"), ("train", "--min-size", "0"),
    ("train", "--max-size", "0"), ("train", "--lsj", "-5"), ("train", "--workers", "-1"),
    ("train", "--threads", "0"), ("train", "--eval-every", "0"), ("train", "--checkpoint-every", "0"),
    ("train", "--log-every", "0"), ("train", "--iters", "2.5"),
    ("eval", "--batch-size", "0"), ("eval", "--score-thresh", "nan"), ("eval", "--score-thresh", "-0.1"),
    ("eval", "--mask-threshold", "2"), ("eval", "--max-detections", "0"), ("eval", "--proposals", "0"),
    ("predict", "--score-thresh", "inf"), ("predict", "--mask-threshold", "nan"),
    ("predict", "--max-detections", "-1"), ("predict", "--batch-size", "0"), ("predict", "--max-pixels", "nan"),
    ("predict", "--max-pixels", "-1"),
    ("demo", "--minutes", "nan"), ("demo", "--minutes", "0"), ("demo", "--iters", "0"),
    ("shapes", "--train", "0"), ("shapes", "--val", "-1"), ("shapes", "--size", "16"), ("shapes", "--seed", "-1"),
    ("inspect", "--score-thresh", "1.5"), ("inspect", "--max-boxes", "0"),
    ("serve", "--port", "0"), ("serve", "--port", "65536"), ("serve", "--score-thresh", "2"),
    ("serve", "--mask-threshold", "nan"), ("serve", "--max-detections", "0"), ("serve", "--queue-size", "0"),
    ("serve", "--max-batch", "-2"), ("serve", "--batch-wait-ms", "-1"), ("serve", "--max-upload-mb", "0"),
    ("serve", "--max-pixels", "inf"),
    ("shapes", "--videos", "-1"), ("shapes", "--frames", "1"),
    ("track", "--score-thresh", "nan"), ("track", "--mask-threshold", "2"), ("track", "--max-detections", "0"),
    ("track", "--high-score", "1.5"), ("track", "--low-score", "-0.1"), ("track", "--new-track-score", "inf"),
    ("track", "--min-hits", "0"), ("track", "--max-missed", "-1"),
]


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command, flag, value", BAD_FLAGS)
def test_bad_number_is_one_line_naming_the_flag(command, flag, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written anywhere
    assert main([command, flag, value]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"maskrcnn {command}: error: {flag} must be ") and value in lines[0].rsplit("got ", 1)[1]
    assert captured.out == "" and not list(tmp_path.iterdir())


def test_every_numeric_flag_has_a_rule_and_a_bad_value_case():
    covered = {(command, flag) for command, flag, _ in BAD_FLAGS}
    for command, parser in command_parsers().items():
        for action in parser._actions:
            assert action.type not in (int, float), f"{command} {action.option_strings}: plain {action.type}"
            if isinstance(getattr(action.type, "__self__", None), Number):
                assert (command, action.option_strings[0]) in covered, (command, action.option_strings)


def test_good_numbers_still_parse():
    args = build_parser().parse_args(["train", "--lr", "1e-3", "--grad-clip", "0", "--ema", "0", "--iters", "5",
                                      "--cooldown", "1", "--weight-decay", "0"])
    assert (args.lr, args.grad_clip, args.ema, args.iters, args.cooldown, args.weight_decay) == (1e-3, 0, 0, 5, 1, 0)


# ---------------------------------------------------------------------------------------------- config paths

@pytest.mark.parametrize("text, expected", [
    ("lr: .nan\n", "lr must be a finite number > 0 (or None), got nan"),
    ("grad_clip: -1\n", "grad_clip must be a finite number >= 0 (or None), got -1"),
    ("threads: 0\n", "threads must be a positive integer (or None), got 0"),
    ("lsj: -5\n", "lsj must be a positive integer (or None), got -5"),
    ("weight_decay: -1\n", "weight_decay must be a finite number >= 0 (or None), got -1"),
    ("lr: 1e-3\n", "lr must be a finite number > 0 (or None), got '1e-3' (text, not a number"),
    ("min_sizes: [256, 0]\n", "min_sizes[1] must be a positive integer, got 0"),
    ("loss_weights: {loss_mask: -2}\n", "loss_weights.loss_mask must be a finite number >= 0, got -2"),
    ("model: {score_thresh: .inf}\n", "model: score_thresh must be a number between 0 and 1, got inf"),
    ("model: {rpn: {nms_thresh: 2}}\n", "model: rpn.nms_thresh must be a number between 0 and 1, got 2"),
])
def test_config_file_values_follow_the_flag_rules(text, expected, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--train-annotations", "a.json", "--train-images", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"maskrcnn train: error: {config}: ") and expected in err


@pytest.mark.parametrize("option, expected", [
    ("score_thresh=nan", "score_thresh must be a number between 0 and 1, got nan"),
    ("detections_per_img=0", "detections_per_img must be a positive integer, got 0"),
    ("rpn.post_nms_top_n_test=-1", "rpn.post_nms_top_n_test must be a positive integer, got -1"),
    ("box_positive_fraction=1.5", "box_positive_fraction must be a number between 0 and 1, got 1.5"),
    ("anchor_sizes=[16, -32]", "anchor_sizes[1] must be a finite number > 0, got -32"),
])
def test_model_options_follow_the_model_rules(option, expected, capsys):
    code = main(["train", "--model-option", option, "--train-annotations", "a.json", "--train-images", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("maskrcnn train: error: --model-option: ")
    assert expected in err


def test_api_configs_meet_the_same_rules():
    with pytest.raises(MaskRCNNError, match=r"^settings: lr must be a finite number > 0 \(or None\), got nan$"):
        TrainConfig.from_dict({"lr": float("nan")}, "settings")
    bad = TrainConfig(train_annotations="a.json", train_images="x", iters=5, epochs=None, grad_clip=-1.0)
    with pytest.raises(MaskRCNNError, match=r"bad training settings: grad_clip must be a finite number >= 0"):
        train(bad, progress=False)  # checked before anything is read or built
    with pytest.raises(MaskRCNNError, match=r"^score_thresh must be a number between 0 and 1 \(or None\), got nan$"):
        Predictor("unused.safetensors", score_thresh=float("nan"))


# ---------------------------------------------------------------------------------------------- eval = predict

def test_eval_and_predict_share_their_detection_flags():
    parsers = command_parsers()
    actions = {name: {a.dest: a for a in parsers[name]._actions} for name in ("eval", "predict")}
    for dest in ("score_thresh", "mask_threshold", "max_detections"):
        ours, theirs = actions["eval"][dest], actions["predict"][dest]
        assert ours.type == theirs.type and ours.option_strings == theirs.option_strings
    assert actions["eval"]["mask_threshold"].default == actions["predict"]["mask_threshold"].default == 0.5
    assert actions["eval"]["max_detections"].default == actions["predict"]["max_detections"].default == 100


def test_eval_and_predict_turn_mask_probabilities_into_the_same_pixels():
    """A pixel exactly at the threshold is in the mask for both (it was in for predict, out for eval)."""
    probabilities = torch.tensor([[[0.2, 0.5], [0.7, 0.49999]]]).reshape(1, 1, 2, 2)
    output = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0]]), "labels": torch.tensor([1]),
              "scores": torch.tensor([0.9]), "masks": probabilities}
    for threshold in (0.5, 0.7):
        dets = Detections.from_model_output(output, ["__background__", "a"], mask_threshold=threshold)
        [result] = _to_coco(output, 1, (2, 2), [0, 1], threshold)
        rle = dict(result["segmentation"], counts=result["segmentation"]["counts"].encode())
        evaluated = mask_utils.decode(rle).astype(bool)
        np.testing.assert_array_equal(evaluated, dets.masks[0])
    assert dets.masks[0].tolist() == [[False, False], [True, False]]  # 0.7 >= 0.7


# ---------------------------------------------------------------------------------------------- devices

def test_device_strings(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(MaskRCNNError, match=r"^device 'tpu' is not one this tool runs on; choose auto, cpu"):
        resolve_device("tpu")
    with pytest.raises(MaskRCNNError, match="is not one this tool runs on"):
        resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(MaskRCNNError, match=r"^device 'cuda': CUDA is not available on this machine"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(MaskRCNNError, match=r"^device 'cuda:7': there is no such GPU; this machine has 2 \(cuda:0 "
                                            r"to cuda:1\)$"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("command", ["train", "eval", "predict", "inspect", "demo", "serve", "track"])
def test_bad_device_is_one_line_for_every_command(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    argv = {"train": ["--train-annotations", "a.json", "--train-images", "x"],
            "eval": ["--weights", "w.pt", "--annotations", "a.json", "--images", "x"],
            "predict": [str(image), "--weights", "w.pt", "--out", "o"],
            "inspect": [str(image), "--weights", "w.pt", "--out", "o"],
            "demo": ["--out", "d"],
            "serve": ["--weights", "w.pt"],
            "track": [str(image), "--weights", "w.pt", "--out", "o"]}[command]
    assert main([command, *argv, "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"maskrcnn {command}: error: device 'tpu' is not one this tool runs on; choose auto, cpu, cuda " \
                  "or cuda:N\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


# ---------------------------------------------------------------------------------------------- demo --fresh

def test_demo_fresh_refuses_a_folder_it_did_not_make(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("months of work")
    assert main(["demo", "--out", str(mine), "--fresh", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {mine}: --fresh deletes only a folder made by `maskrcnn demo`" in err
    assert (mine / "chapter1.tex").read_text() == "months of work"
    assert sorted(p.name for p in mine.iterdir()) == ["chapter1.tex"]

    monkeypatch.chdir(mine)  # `--out .`: the working folder
    assert main(["demo", "--out", ".", "--fresh", "--device", "cpu", "--no-progress"]) == 2
    assert "--fresh deletes only" in capsys.readouterr().err and (mine / "chapter1.tex").is_file()


def test_demo_fresh_deletes_a_folder_an_earlier_demo_made(tmp_path):
    out = tmp_path / "demo_out"
    demo.prepare_out(out, fresh=False)
    assert (out / demo.MARKER).is_file()
    (out / "run").mkdir()
    (out / "run" / "last.pt").write_bytes(b"old run")
    demo.prepare_out(out, fresh=False)  # a second run reuses what is there
    assert (out / "run" / "last.pt").is_file()
    demo.prepare_out(out, fresh=True)
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER]  # emptied, and marked again

    empty = tmp_path / "empty"
    empty.mkdir()
    demo.prepare_out(empty, fresh=True)  # nothing to delete: taken over and marked
    assert (empty / demo.MARKER).is_file()

    unmarked = tmp_path / "old_demo"  # e.g. made by a demo before the marker existed: reused, never deleted
    (unmarked / "data").mkdir(parents=True)
    demo.prepare_out(unmarked, fresh=False)
    assert not (unmarked / demo.MARKER).exists()
    with pytest.raises(MaskRCNNError, match="--fresh deletes only"):
        demo.prepare_out(unmarked, fresh=True)
    assert (unmarked / "data").is_dir()


def test_rules_take_numpy_scalars_and_refuse_bools_and_text():
    from maskrcnn.checks import COUNT, PROBABILITY

    assert PROBABILITY.check("score_thresh", np.float32(0.25)) == np.float32(0.25)
    assert COUNT.check("batch_size", np.int64(3)) == 3
    for rule, value in ((COUNT, True), (COUNT, 2.0), (PROBABILITY, "0.5"), (PROBABILITY, np.float32("nan"))):
        with pytest.raises(ValueError, match=r"^x must be "):
            rule.check("x", value)
