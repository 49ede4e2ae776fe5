"""The model behind the server: loaded in the background (so /healthz can say 503 until it is ready), one
`Predictor` per distinct request settings (all sharing the one model; a Predictor never changes it), and the
function the batcher's worker calls."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from ..errors import MaskRCNNError
from .limits import HTTPProblem

log = logging.getLogger("maskrcnn.serve")

_PREDICTORS_KEPT = 16  # Predictors for distinct (score_thresh, max_detections) pairs, least recently used out


class ModelService:
    """`load()` builds the server's base `Predictor` (the command's flags: weights, device, precision, the
    default score threshold and detections per image, the mask threshold)."""

    def __init__(self, load: Callable[[], object]):
        self._load = load
        self.predictor = None
        self.error: str | None = None
        self._predictors: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.predictor is not None

    def load_in_background(self, on_failure: Callable[[str], None] | None = None) -> threading.Thread:
        def work():
            try:
                self.predictor = self._load()
                log.info("model loaded: %s on %s", type(self.predictor.model).__name__, self.predictor.device)
            except MaskRCNNError as error:
                self.error = str(error)
            except Exception as error:  # reported as the command's one line; the traceback goes to the log
                log.exception("loading the model failed")
                self.error = f"cannot load the model: {type(error).__name__}: {error}"
            if self.error is not None and on_failure is not None:
                on_failure(self.error)

        self._loading = threading.Thread(target=work, name="maskrcnn-load", daemon=True)
        self._loading.start()
        return self._loading

    def wait_for_loading(self, timeout: float) -> None:
        """At shutdown: an interpreter that exits while torch is still loading can abort instead of exiting."""
        if self._loading is not None:
            self._loading.join(timeout)

    def check_ready(self) -> None:
        if self.error is not None:
            raise HTTPProblem(503, f"the model failed to load: {self.error}")
        if not self.ready:
            raise HTTPProblem(503, "the model is still loading", {"Retry-After": "1"})

    def describe(self, limits: dict, batching: dict) -> dict:
        from ..viz import class_color

        predictor = self.predictor
        model = predictor.model
        settings = predictor.settings
        return {
            "class_names": predictor.class_names,
            "class_colors": [list(class_color(i)) for i in range(len(predictor.class_names))],  # as in overlays
            "architecture": {"runtime": "onnx/torchscript" if type(model).__name__ == "ExportedModel" else "pytorch",
                             **model.config.to_dict()},
            "precision": settings.precision, "device": str(predictor.device),
            "defaults": {"score_thresh": settings.score_thresh, "max_detections": settings.detections_per_img,
                         "mask_threshold": predictor.mask_threshold, "mask_format": "rle"},
            "input_limits": limits, "batching": batching,
        }

    def predictor_for(self, key: tuple):
        """The Predictor for (score_thresh, max_detections); None in the key keeps the server's default."""
        from ..predictor import Predictor

        score_thresh, max_detections = key
        base = self.predictor
        if score_thresh is None and max_detections is None:
            return base
        with self._lock:
            if key not in self._predictors:
                self._predictors[key] = Predictor(
                    base.model, score_thresh=base.settings.score_thresh if score_thresh is None else score_thresh,
                    max_detections=base.settings.detections_per_img if max_detections is None else max_detections,
                    mask_threshold=base.mask_threshold, precision=base.precision, max_pixels=None)
                while len(self._predictors) > _PREDICTORS_KEPT:
                    self._predictors.popitem(last=False)
            self._predictors.move_to_end(key)
            return self._predictors[key]

    def run_batch(self, images: list, key: tuple) -> list:
        """Detections per image; when a batch fails, each image is run alone, so one image's failure (e.g.
        out of memory) is that image's answer only."""
        predictor = self.predictor_for(key)
        try:
            return predictor.predict_batch(images)
        except Exception as error:
            if len(images) == 1:
                return [error]
        results = []
        for image in images:
            try:
                results.extend(predictor.predict_batch([image]))
            except Exception as error:
                results.append(error)
        return results
