"""`InferenceSettings`: what a caller may change per prediction call, without touching the model.

The weights fix the architecture (ModelConfig); the knobs below only choose which detections a call keeps
and in what arithmetic it runs. They are passed to `MaskRCNN.predict(..., settings=...)` as one frozen value,
so the model and its config are never rewritten for a call and one model can serve several callers (threads)
with different settings at once. `None` there means the model's defaults: its config's score_thresh,
nms_thresh and detections_per_img (set from a checkpoint by `maskrcnn.load`) and `model.precision`.

The RPN's proposal count (`config.rpn.post_nms_top_n_test`, `load(..., proposals=)`) stays a model default
only: exported graphs bake it in, so it is not a per-call setting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..checks import COUNT, PROBABILITY, check_fields
from .plan import PRECISIONS

_RULES = {"score_thresh": PROBABILITY, "nms_thresh": PROBABILITY, "detections_per_img": COUNT}


@dataclass(frozen=True)
class InferenceSettings:
    score_thresh: float = 0.05     # detections scoring below are dropped
    nms_thresh: float = 0.5        # per-class NMS IoU threshold of the final detections
    detections_per_img: int = 100  # at most this many detections per image, best first
    precision: str = "fp32"        # fp32 (torchvision's arithmetic) | bf16 | fp16 (see modeling/plan.py)

    def __post_init__(self):
        problems = check_fields(vars(self), _RULES)
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def defaults_of(cls, model) -> "InferenceSettings":
        """The defaults stored on a model (MaskRCNN or ExportedModel): its config's thresholds and its
        `precision`."""
        c = model.config
        return cls(score_thresh=c.score_thresh, nms_thresh=c.nms_thresh, detections_per_img=c.detections_per_img,
                   precision=model.precision)

    def with_overrides(self, **overrides) -> "InferenceSettings":
        """A copy with the given fields replaced; a field given as None keeps its value here."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


__all__ = ["InferenceSettings"]
