"""`Predictor`: images of any common kind in, `Detections` out.

The model itself wants a list of (3,H,W) float tensors on its device; this class is the thin layer that
gets any path, PIL image, numpy array or tensor into that form, batches them, and turns the raw
output into numpy `Detections` with boolean masks.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch

from .checks import COUNT, PROBABILITY, check_fields
from .data.images import DEFAULT_MAX_PIXELS, read_image, to_float_tensor
from .devices import resolve_device
from .errors import MaskRCNNError, first_line
from .export.runtime import ExportedModel, is_exported_file
from .modeling.model import MaskRCNN
from .modeling.settings import InferenceSettings
from .precision import AUTO, cpu_has_native_bf16, resolve_precision

if TYPE_CHECKING:
    from .results import Detections


class Predictor:
    """Run a Mask R-CNN on images.

        predictor = Predictor("model.safetensors", score_thresh=0.5)
        dets = predictor("street.jpg")              # one image -> Detections
        many = predictor([array, pil_image, path])  # a list -> list of Detections, batch_size at a time

    `weights_or_model` is anything `maskrcnn.load` accepts (checkpoint path or registered name), a file
    written by `maskrcnn export` (.onnx, run by ONNX Runtime, or TorchScript; both CPU and fp32 only), or an
    already built `MaskRCNN` or `ExportedModel`. `device=None` means "cpu" for a checkpoint and the model's
    own device for a model (so passing a model never moves it); "auto" picks CUDA when present.
    A TorchScript file is a program that runs its own code: it is loaded only with `trust_torchscript=True`
    (checkpoints are read as tensors and .onnx files by ONNX Runtime, neither runs code from the file).
    Any model runs in eval mode during our calls and gets its own mode back afterwards.
    `score_thresh`, `max_detections` and `precision` ("fp32", "fp32-fast", "bf16", "fp16", or "auto": the
    fastest with agreement on this device, see maskrcnn/precision.py; None keeps the model's)
    are fixed here, once, as `self.settings` (an `InferenceSettings`, the model's defaults where None) and
    passed to the model on each call: the model and its config are never changed, so one model can serve
    several Predictors with different settings, from several threads.
    `max_pixels` refuses image *files* with more pixels (read from the header, before decoding; None: no
    limit); the default, 64 million, is explained in `maskrcnn predict --help`. Arrays are not checked.
    """

    def __init__(self, weights_or_model, *, device: str | torch.device | None = None,
                 score_thresh: float | None = None, mask_threshold: float = 0.5, batch_size: int = 1,
                 max_detections: int | None = None, precision: str | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, trust_torchscript: bool = False):
        problems = check_fields(
            dict(batch_size=batch_size, mask_threshold=mask_threshold, score_thresh=score_thresh,
                 max_detections=max_detections, max_pixels=max_pixels),
            dict(batch_size=COUNT, mask_threshold=PROBABILITY, score_thresh=PROBABILITY, max_detections=COUNT,
                 max_pixels=COUNT),
            optional=("score_thresh", "max_detections", "max_pixels"))
        if problems:
            raise MaskRCNNError("; ".join(problems))
        if isinstance(weights_or_model, MaskRCNN):
            self.model = weights_or_model
            if device is not None:
                self.model.to(resolve_device(device))
            if precision == AUTO:
                precision = resolve_precision(precision, next(self.model.parameters()).device)
        elif isinstance(weights_or_model, ExportedModel):
            self.model = weights_or_model
            precision = self.model.precision if precision == AUTO else precision
        elif is_exported_file(weights_or_model):
            self.model = ExportedModel.load(weights_or_model, trust_torchscript=trust_torchscript,
                                            precision=exported_precision(weights_or_model, precision))
            precision = self.model.precision
        elif isinstance(weights_or_model, torch.nn.Module):
            raise MaskRCNNError(f"expected a maskrcnn MaskRCNN model, got {type(weights_or_model).__name__}; "
                                "convert torchvision models by saving their state_dict and loading that file")
        else:
            from .weights import load

            self.model = load(weights_or_model, device=resolve_device(device or "cpu"),
                              precision=precision or "fp32")
            precision = self.model.precision if precision == AUTO else precision
        self.score_thresh = score_thresh
        self.max_detections = max_detections
        self.precision = precision
        try:
            self.settings = InferenceSettings.defaults_of(self.model).with_overrides(
                score_thresh=score_thresh, detections_per_img=max_detections, precision=precision)
        except ValueError as error:
            raise MaskRCNNError(str(error)) from None
        self.mask_threshold = mask_threshold
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    # ------------------------------------------------------------------------------------------ basics

    @property
    def device(self) -> torch.device:
        if isinstance(self.model, ExportedModel):
            return torch.device("cpu")
        return next(self.model.parameters()).device

    @property
    def class_names(self) -> list[str]:
        return list(self.model.class_names)

    def __call__(self, images):
        """One image -> `Detections`; a list or tuple of images (or an (N,C,H,W) tensor) -> list of
        `Detections`."""
        if isinstance(images, (list, tuple)):
            return self.predict_batch(images)
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            return self.predict_batch(list(images))
        return self.predict_batch([images])[0]

    def predict_batch(self, images: Sequence) -> list[Detections]:
        """A list of images, run `batch_size` at a time; read errors raise (see predict_files to skip)."""
        results: list[Detections] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            tensors, names = zip(*(self._prepare(x) for x in chunk)) if chunk else ((), ())
            results.extend(self._run(list(tensors), list(names)))
        return results

    # ------------------------------------------------------------------------------------------ files

    def predict_files(self, paths: Iterable[str | os.PathLike], progress: bool = True,
                      with_images: bool = False) -> Iterator[tuple]:
        """Yield `(path, Detections)` per file in order, or `(path, MaskRCNNError)` for one that cannot be
        read, is over `max_pixels` or runs out of memory, so that one bad file never loses the others (a
        batch that runs out of memory is retried one image at a time). `with_images=True` yields
        `(path, image, result)` with the decoded HxWx3 image (None on failure), which drawing overlays needs."""
        from tqdm import tqdm

        paths = list(paths)
        bar = tqdm(total=len(paths), unit="image", disable=not progress, dynamic_ncols=True)
        pending: list[tuple] = []  # (path, image, tensor) waiting for a full batch

        def flush():
            if not pending:
                return
            batch = list(pending)
            pending.clear()
            outputs = self._run_or_errors(batch)
            for (path, image, _), result in zip(batch, outputs):
                bar.update(1)
                yield (path, image, result) if with_images else (path, result)

        try:
            for path, image, tensor, error in self._read_ahead(paths):
                if error is not None:
                    yield from flush()  # keep the output in input order
                    bar.update(1)
                    yield (path, None, error) if with_images else (path, error)
                    continue
                pending.append((path, image, tensor))
                if len(pending) >= self.batch_size:
                    yield from flush()
            yield from flush()
        finally:
            bar.close()

    def _read_ahead(self, paths: list) -> Iterator[tuple]:
        """(path, image, tensor, None) or (path, None, None, one-line error) per path, in order. A background
        thread decodes the next files (up to one batch ahead) while the model runs on the current batch:
        decoding releases the GIL, so it overlaps the model instead of adding to it; memory stays bounded
        by two batches of images."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskrcnn-read")
        try:
            upcoming = iter(paths)
            queue = deque((path, pool.submit(self._read_file, path))
                          for path in itertools.islice(upcoming, self.batch_size + 1))
            while queue:
                path, future = queue.popleft()
                following = next(upcoming, None)
                if following is not None:
                    queue.append((following, pool.submit(self._read_file, following)))
                yield (path, *future.result())
        finally:  # also when the caller stops early: files not started yet are not read
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_file(self, path) -> tuple:
        """(image, tensor, None), or (None, None, one-line error) for a file that cannot be read, is over
        max_pixels or does not fit in memory; anything else is a bug and raises."""
        try:
            image = read_image(path, self.max_pixels)
            return image, to_float_tensor(image), None
        except (MaskRCNNError, ValueError, MemoryError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and not is_out_of_memory(error):
                raise
            return None, None, as_user_error(path, error)

    # ------------------------------------------------------------------------------------------ internals

    def _run_or_errors(self, batch: list[tuple]) -> list:
        """`_run` over (path, image, tensor) triples, with a one-line error in place of the Detections of
        an image that cannot be run; after running out of memory, a batch is retried one image at a time."""
        try:
            return self._run([t for _, _, t in batch], [str(p) for p, _, _ in batch])
        except (MaskRCNNError, MemoryError, RuntimeError) as error:  # e.g. an image too large for the GPU
            if isinstance(error, RuntimeError) and not is_out_of_memory(error):
                raise
            if len(batch) == 1 or isinstance(error, MaskRCNNError):
                return [as_user_error(p, error) for p, _, _ in batch]
        # Retried outside the except block, whose traceback still holds the failed batch's memory.
        return [result for one in batch for result in self._run_or_errors([one])]

    def _prepare(self, image) -> tuple[torch.Tensor, str | None]:
        """Any accepted input -> ((3,H,W) float tensor in [0,1], file name or None)."""
        if isinstance(image, (str, os.PathLike)):
            return to_float_tensor(read_image(image, self.max_pixels)), str(image)
        try:
            return to_float_tensor(image), None
        except ValueError as error:
            raise MaskRCNNError(str(error)) from None

    def _run(self, tensors: list[torch.Tensor], names: list[str | None]) -> list[Detections]:
        from .results import Detections  # here, not at the top: `import maskrcnn` stays light

        if not tensors:
            return []
        device = self.device
        with torch.inference_mode(), self._eval_mode():
            # Masks pasted into their crops only: memory follows the objects, not image size x detections.
            outputs = self.model.predict([t.to(device) for t in tensors], masks="crops",
                                         mask_threshold=self.mask_threshold, settings=self.settings)
        return [
            Detections.from_model_output(out, self.model.class_names, self.model.category_ids,
                                         mask_threshold=self.mask_threshold, file_name=name,
                                         keypoint_names=getattr(self.model, "keypoint_names", None),
                                         skeleton=getattr(self.model, "skeleton", None))
            for out, name in zip(outputs, names)
        ]

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode for the duration of a call only, so a model the caller handed us in training mode
        gets it back (a model already in eval mode, as `load` returns it, is not changed at all)."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            yield
        finally:
            if was_training:
                self.model.train()


def exported_precision(path, precision: str | None) -> str:
    """What an exported file runs in: fp32, or for OpenVINO files also bf16 ("auto": where the CPU has it)."""
    if precision == AUTO:
        return "bf16" if str(path).lower().endswith(".xml") and cpu_has_native_bf16() else "fp32"
    return precision or "fp32"


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, or torch failing to allocate (CUDA's OutOfMemoryError, the CPU allocator's
    "can't allocate memory" RuntimeError, other backends' "out of memory")."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("can't allocate memory" in message or "out of memory" in message)


def as_user_error(path, error: Exception) -> MaskRCNNError:
    """A one-line error that names the file (read_image's errors already do)."""
    if isinstance(error, MaskRCNNError) and str(path) in str(error):
        return error
    if is_out_of_memory(error):
        return MaskRCNNError(f"{path}: not enough memory to process this image "
                             f"({type(error).__name__}: {first_line(error)})")
    return MaskRCNNError(f"{path}: {first_line(error)}")


__all__ = ["Predictor"]
