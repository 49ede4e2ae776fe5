"""The ranges of TrainConfig's numeric settings (rules from maskrcnn.checks), in one table: `maskrcnn train`'s
flags take their `type=` from here, and TrainConfig checks every config against it (config file,
--model-option, flags, a resumed run's settings, the API), so a value has one rule whichever way it comes."""

from __future__ import annotations

from ..checks import COUNT, DECAY, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, PROBABILITY, Each

TRAIN_RULES = {
    "iters": COUNT, "epochs": COUNT, "batch_size": COUNT, "lr": POSITIVE, "momentum": PROBABILITY,
    "weight_decay": NON_NEGATIVE, "warmup_iters": NON_NEGATIVE_INT, "warmup_factor": PROBABILITY,
    "steps": Each(POSITIVE), "gamma": POSITIVE, "min_lr_factor": PROBABILITY, "cooldown": PROBABILITY,
    "ema_decay": DECAY, "grad_clip": NON_NEGATIVE, "num_workers": NON_NEGATIVE_INT, "threads": COUNT,
    "min_sizes": Each(COUNT), "max_size": COUNT, "lsj": COUNT, "lsj_scale": Each(POSITIVE),
    "seed": NON_NEGATIVE_INT, "checkpoint_every": COUNT, "eval_every": COUNT, "log_every": COUNT,
    "eval_batch_size": COUNT,
}
# May be None: iters/epochs (the other one is set), lr and weight_decay (the optimizer's default), ema_decay and
# grad_clip (off; 0 is off too), num_workers and threads (chosen for the device), lsj (off), eval_every (at the end).
OPTIONAL = ("iters", "epochs", "lr", "weight_decay", "ema_decay", "grad_clip", "num_workers", "threads", "lsj",
            "eval_every")


def flag(field: str):
    """argparse `type=` for the flag that sets TrainConfig `field` (one item of it for list settings)."""
    rule = TRAIN_RULES[field]
    return rule.rule.flag if isinstance(rule, Each) else rule.flag


__all__ = ["TRAIN_RULES", "OPTIONAL", "flag"]
