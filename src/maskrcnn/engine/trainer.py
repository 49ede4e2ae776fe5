"""One training run's loop: resume, this process's slice of each batch, the optimisation step, logging,
validation and checkpoints, on one CPU or N processes under torchrun (see seeds.py for why a resumed or
distributed run computes exactly what one uninterrupted process does)."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..errors import MaskRCNNError
from . import distributed
from .checkpoint import TRAIN_FORMAT_TAG, atomic_torch_save, read_training_checkpoint
from .config import RECIPE_FIELDS, TrainConfig, plain
from .ema import WeightAverage
from .evaluate import IOU_TYPES as EVAL_TASKS
from .metrics_log import MetricsLog
from .run_folder import start_run_folder
from .schedule import build_optimizer
from .seeds import _STEP, derive_seed, sampling_generators
from .training_data import open_training_data, worker_error_message
from .training_model import build_training_model


class _Trainer:
    """One run's state. Only rank 0 (`self.main`) touches the file system or the terminal."""

    def __init__(self, config: TrainConfig, info: distributed.ProcessInfo, device: torch.device, resume: bool,
                 progress: bool):
        self.config = config
        self.info = info
        self.main = info.is_main
        self.device = device
        self.progress = progress and self.main
        self.run_dir = Path(config.out)
        if config.batch_size % info.world_size:
            raise MaskRCNNError(f"batch size {config.batch_size} does not split evenly over "
                                f"{info.world_size} processes")
        self.per_process = config.batch_size // info.world_size
        if config.amp and device.type != "cuda":
            raise MaskRCNNError("amp (float16 autocast) needs a CUDA device; use bf16 on CPU")

        data = open_training_data(config, self.main)
        self.dataset, self.batches, self.val_dataset = data.dataset, data.batches, data.val_dataset
        self.iters_per_epoch, self.total_iters = data.iters_per_epoch, data.total_iters
        # the raw model being trained (its weights are what last.pt saves)
        self.network, self.model_note = build_training_model(config, self.dataset.num_classes,
                                                             self.dataset.class_names, self.dataset.category_ids,
                                                             keypoint_names=self.dataset.keypoint_names,
                                                             skeleton=self.dataset.skeleton)
        self.network.transform.resize_in_training = False  # the data pipeline owns training-time resizing
        self.network.to(device)
        self.network.train()
        self.optimizer, self.scheduler = build_optimizer(self.network, config, device, self.total_iters)
        self.scaler = torch.amp.GradScaler("cuda") if config.amp else None
        self.autocast = contextlib.nullcontext()
        if config.amp:
            self.autocast = torch.autocast("cuda", dtype=torch.float16)
        elif config.bf16:
            self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        self.ema = WeightAverage(self.network, config.ema_decay) if config.ema_decay else None
        self.start_iter = 0
        self.best_metric: float | None = None
        self.best_iteration: int | None = None
        self.last_eval: dict | None = None
        self.last_losses: dict | None = None
        if resume:
            self._resume()

        # what the step calls: the network, wrapped in DistributedDataParallel under torchrun
        self.module = self.network
        if info.distributed:
            # Any trainable BatchNorm (backbone, FPN or heads) normalises over the whole batch on CUDA; on CPU
            # (gloo) each process normalises over its own images.
            batch_norms = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.network.modules())
            if batch_norms and device.type == "cuda":
                self.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.network)
            self.module = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None)
        self.log: MetricsLog | None = None  # main process only, from the start of run()

    @property
    def evaluated(self) -> torch.nn.Module:
        """What is evaluated and saved as the run's model: the weight average when there is one."""
        return self.ema.model if self.ema is not None else self.network

    # -- setup -------------------------------------------------------------------------------------

    def _resume(self) -> None:
        path = self.run_dir / "last.pt"
        state = read_training_checkpoint(path)
        from ..weights import load_state

        saved = state.get("train_config", {})
        current = self.config.to_dict()
        changed = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in RECIPE_FIELDS
                   if k in saved and saved.get(k) != current[k]]
        if changed and self.main:
            print(f"warning: resuming {path} with changed settings ({'; '.join(changed)}); the result will differ "
                  f"from an uninterrupted run", file=sys.stderr)
        load_state(self.network, state["model"], str(path))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                if state.get("ema") is None:
                    raise KeyError("no weight average (ema) in the checkpoint")
                self.ema.load_state_dict(state["ema"])
        except (ValueError, KeyError) as e:
            raise MaskRCNNError(f"{path}: optimizer state does not fit this run ({e})") from None
        self.start_iter = int(state["iteration"])
        self.best_metric = state.get("best_metric")
        self.best_iteration = state.get("best_iteration")
        self.last_eval = state.get("last_eval")

    def _start(self) -> None:
        """Main process: the run folder, the log, and one line saying what is about to run."""
        c = self.config
        start_run_folder(self.run_dir, c)
        self.log = MetricsLog(self.run_dir, self.start_iter)
        params = sum(p.numel() for p in self.network.parameters())
        trainable = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        where = f"{self.info.world_size} processes x {self.per_process} images" if self.info.distributed \
            else f"batch {c.batch_size}"
        print(f"{self.model_note}; {params / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trainable); "
              f"{len(self.dataset)} training images, {self.iters_per_epoch} iterations/epoch; "
              f"{self.total_iters} iterations, {where} on {self.device}"
              + (f"; resuming at iteration {self.start_iter}" if self.start_iter else ""), flush=True)

    # -- data --------------------------------------------------------------------------------------

    def _local_batches(self, start: int):
        """(images, targets) for iterations start, start+1, ...: this process's slice of each global batch."""
        from ..data.coco import collate

        epoch, skip = divmod(start, self.iters_per_epoch)
        rank, per = self.info.rank, self.per_process
        while True:
            self.dataset.set_epoch(epoch)  # before the loader copies the dataset into its workers
            local = [batch[rank * per:(rank + 1) * per] for batch in self.batches.epoch_batches(epoch)[skip:]]
            loader = DataLoader(self.dataset, batch_sampler=local, collate_fn=collate,
                                num_workers=self.config.num_workers, generator=torch.Generator().manual_seed(0),
                                pin_memory=self.device.type == "cuda")
            try:
                yield from loader
            except MaskRCNNError as e:
                raise MaskRCNNError(worker_error_message(e)) from None
            epoch, skip = epoch + 1, 0

    def _to_device(self, images, targets):
        d = self.device
        images = [im.to(d, non_blocking=True) for im in images]
        targets = [{k: (v.to(d, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        return images, targets

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, stop_after: int | None) -> dict:
        """Train to the end (or, for tests, stop after `stop_after` iterations as if killed there)."""
        c = self.config
        if self.main:
            self._start()
        from tqdm import tqdm

        bar = tqdm(total=self.total_iters, initial=self.start_iter, disable=not self.progress, unit="it",
                   dynamic_ncols=True, desc="train")
        end = self.total_iters if stop_after is None else min(self.total_iters, stop_after)
        window: list[torch.Tensor] = []
        window_start = time.perf_counter()
        data_time = 0.0
        smoothed = None
        run_start = time.perf_counter()
        iteration = self.start_iter
        batches = self._local_batches(self.start_iter) if self.start_iter < end else iter(())
        try:
            while iteration < end:
                fetch_start = time.perf_counter()
                images, targets = self._to_device(*next(batches))
                data_time += time.perf_counter() - fetch_start

                lr = self.optimizer.param_groups[0]["lr"]
                loss_names, reduced, grad_norm = self.step(images, targets, iteration)
                iteration += 1

                window.append(reduced)
                total_value = float(reduced.sum())
                smoothed = total_value if smoothed is None else 0.9 * smoothed + 0.1 * total_value
                bar.update(1)
                bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{lr:.2e}", refresh=False)

                if iteration % c.log_every == 0 or iteration == self.total_iters:
                    now = time.perf_counter()
                    self._log_train(iteration, loss_names, window, lr, grad_norm,
                                    (now - window_start) / len(window), data_time / len(window))
                    window, window_start, data_time = [], now, 0.0
                side_work = time.perf_counter()
                if c.val_annotations and (iteration == self.total_iters
                                          or (c.eval_every and iteration % c.eval_every == 0)):
                    self._evaluate(iteration, bar)
                if iteration % c.checkpoint_every == 0 or iteration == self.total_iters:
                    self._on_main(lambda: self._save_last(iteration))
                window_start += time.perf_counter() - side_work  # time_per_iter counts training steps only
        finally:
            bar.close()
            if self.log is not None:
                self.log.close()
            if hasattr(batches, "close"):
                batches.close()  # shut down DataLoader workers now, not at garbage collection
        return self._end(iteration, time.perf_counter() - run_start)

    def _end(self, iteration: int, seconds: float) -> dict:
        """Save the finished run's model and say so; the summary train() returns."""
        done = iteration >= self.total_iters
        if done:
            self._on_main(self._finish)
        summary = {
            "run_dir": str(self.run_dir),
            "iterations": iteration,
            "total_iters": self.total_iters,
            "completed": done,
            "seconds": seconds,
            "seconds_per_iter": seconds / max(iteration - self.start_iter, 1),
            "last_losses": self.last_losses,
            "last_eval": self.last_eval,
            "best_segm_ap": self.best_metric,
            "best_iteration": self.best_iteration,
            "checkpoint": str(self.run_dir / "last.pt"),
            "weights": str(self.run_dir / "model.safetensors") if done else None,
            "best_weights": str(self.run_dir / "best.safetensors") if self.best_metric is not None else None,
        }
        if self.main and done:
            ap = ""
            if self.last_eval:
                ap = "; val " + ", ".join(f"{task} AP {self.last_eval[task]['AP']:.3f}" for task in EVAL_TASKS
                                          if task in self.last_eval)
            print(f"done: {iteration} iterations in {seconds / 60:.1f} min{ap}; weights in "
                  f"{self.run_dir / 'model.safetensors'}", flush=True)
        return summary

    def step(self, images, targets, iteration: int) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        """One optimisation step at `iteration` (0-based): forward, backward, update, weight average and lr.
        Returns the loss names, the losses averaged over processes, and the gradient norm (when clipping)."""
        c = self.config
        torch.manual_seed(derive_seed(c.seed, _STEP, iteration))
        first = self.info.rank * self.per_process
        generators = sampling_generators(c.seed, iteration, range(first, first + len(images)), self.device)
        with self.autocast:
            losses = self.module(images, targets, generators=generators)
        loss_names = list(losses)
        total = sum(v * c.loss_weights.get(k, 1.0) for k, v in losses.items())
        # Each process divides its partial sums by (global count / processes), so the mean over
        # processes is the global batch loss. Every process sees the same numbers: all stop together.
        reduced = distributed.sum_across_processes(
            torch.stack([v.detach().float() for v in losses.values()]).cpu()) / self.info.world_size
        if not torch.isfinite(reduced).all():
            detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(loss_names, reduced.tolist()))
            last = self.run_dir / "last.pt"
            raise MaskRCNNError(
                f"non-finite loss at iteration {iteration + 1} ({detail}); stopped without saving "
                f"(last good checkpoint: {last if last.is_file() else 'none'}); try a lower lr, "
                f"a longer warm-up or grad_clip")

        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = None
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            if c.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            if c.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), c.grad_clip)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.network)
        self.scheduler.step()
        return loss_names, reduced, grad_norm

    def _on_main(self, work) -> None:
        """Run `work` on rank 0 while the others wait; an error there is raised on every process
        (instead of leaving the others stuck at the barrier)."""
        error = None
        if self.main:
            try:
                work()
            except Exception as e:
                error = e
        if not self.info.distributed:
            if error is not None:
                raise error
            return
        message = distributed.broadcast_object(None if error is None else str(error) or type(error).__name__)
        if error is not None:
            raise error
        if message is not None:
            raise MaskRCNNError(f"stopped because the main process failed: {message}")

    # -- outputs -----------------------------------------------------------------------------------

    def _log_train(self, iteration, names, window, lr, grad_norm, time_per_iter, data_time) -> None:
        mean = torch.stack(window).mean(0).tolist()
        self.last_losses = {"loss": sum(mean), **dict(zip(names, mean))}
        if not self.main:
            return
        values = {"loss": sum(mean), **dict(zip(names, mean)), "lr": lr, "time_per_iter": time_per_iter,
                  "data_time": data_time}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        self.log.train(iteration, values)

    def _evaluate(self, iteration: int, bar) -> None:
        def work():
            metrics = evaluate_model(self.evaluated, self.val_dataset, self.device, self.config.eval_batch_size)
            summary = {task: metrics[task] for task in EVAL_TASKS if task in metrics}
            self.last_eval = {"iteration": iteration, **summary}
            self.log.evaluation(iteration, summary)
            # the best weights by mask AP; a box + keypoint model (no mask branch) by keypoint AP
            ap = summary["segm" if "segm" in summary else "keypoints" if "keypoints" in summary else "bbox"]["AP"]
            bar.write(f"iteration {iteration}: val " + ", ".join(f"{task} AP {summary[task]['AP']:.4f}"
                                                                 for task in summary))
            if self.best_metric is None or ap > self.best_metric:
                from ..weights import save_checkpoint

                self.best_metric, self.best_iteration = float(ap), iteration
                save_checkpoint(self.evaluated, self.run_dir / "best.safetensors")

        self._on_main(work)
        # Other processes learn the best metric too, so their view of the run stays consistent.
        self.best_metric, self.best_iteration = distributed.broadcast_object((self.best_metric, self.best_iteration))

    def _save_last(self, iteration: int) -> None:
        model = self.network
        state = {
            "format": TRAIN_FORMAT_TAG,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": plain(model.config.to_dict()),
            "class_names": list(model.class_names),
            "category_ids": [int(i) for i in model.category_ids],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "iteration": iteration,
            "train_config": self.config.to_dict(),
            "best_metric": self.best_metric,
            "best_iteration": self.best_iteration,
            "last_eval": self.last_eval,
        }
        atomic_torch_save(state, self.run_dir / "last.pt")

    def _finish(self) -> None:
        from ..weights import save_checkpoint

        save_checkpoint(self.evaluated, self.run_dir / "model.safetensors")
        self.log.plot()


def evaluate_model(model, dataset, device: torch.device, batch_size: int = 4) -> dict:
    """COCO bbox + segm (+ keypoints, when both sides have them) metrics of `model` on a CocoDataset; leaves
    the model in the mode it found it."""
    from .evaluate import coco_evaluate, predict_dataset

    was_training = model.training
    model.eval()
    try:
        results = predict_dataset(model, dataset, category_ids=model.category_ids, batch_size=batch_size,
                                  device=device, progress=False)
        return coco_evaluate(dataset.coco, results, verbose=False)
    finally:
        model.train(was_training)
