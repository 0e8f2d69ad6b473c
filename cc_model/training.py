"""Training CustomContrast on the export stage's shards: the loop of the ``train`` stage (cc_model.train).

Writes under ``train.out_dir``:

- ``checkpoint/``: the trainable weights and the resolved config (cc_model.checkpoint; load_model reads it);
- ``stats.json`` (a DVC metric): steps, samples, and each loss term averaged over the last steps;
- ``loss.csv`` (DVC plots): every step's loss terms; ``timing.json``: how long it took.

Every ``train.save_every`` steps, and at the end, the training state (trainable weights, AdamW
moments, the random generator, the step, the epoch and batch position, the loss history) goes to
``.work/state.pt``. A run that finds a state made from the same shards, embeddings,
near-duplicates, backbone weight files, params (all but max_steps and how the run is executed),
device type, library versions and code continues from it: a killed run loses at most
``save_every`` steps, and raising ``train.max_steps`` continues a finished run. All random draws
(dropout, timesteps, noise) come from one generator in the training process and the batches
from (seed, epoch) (cc_model.data.SubjectBatchSampler), so a resumed run ends with the weights of
an unbroken one (bit-identical on the CPU).

With ``train.processes`` > 1 the step is data-parallel (torch DDP, :func:`train_processes`): each
process takes its own batch of the epoch's batches (batches r, r + P, ...), draws from its own
generator, and contrasts within its own batch; DDP averages the gradients, so every process
holds the same weights (checked at the end). Process 0 logs and writes; the saved state holds
every process's generator.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from cc_model.backbones import clip_pixels, load_backbones
from cc_model.checkpoint import save_trainable
from cc_model.data import (ExportDataError, SubjectBatchSampler, dataset_for, hard_negative_lists,
                           near_duplicate_conflicts)
from cc_model.model import CustomContrastModel, TrainBatch, cast_frozen, diffusion_inputs
from flows.config.params import Params
from flows.errors import UserFacingError
from flows.imports import ROOT, project_files
from flows.progress import Progress
from flows.resume import device_identity, file_identity, library_versions
from flows.tables import write_stats

STATE_NAME = "state.pt"
LAST_STEPS = 10  # stats.json averages each loss term over this many final steps
# Train params that change how a run executes, not what it computes: left out of the resume key.
RUN_ONLY = ("max_steps", "save_every", "num_workers", "out_dir", "device")
logger = logging.getLogger("flows.train")
RANK_SEED_STRIDE = 1_000_003  # process r's generator starts from seed + r * this (process 0: the seed itself)


@functools.cache
def train_code() -> tuple[str, ...]:
    """The resume key's code: the project files the train stage runs (its imports, transitively), so
    editing evaluation or generation code never restarts a training run. Read when a key is made,
    not at import (the walk parses ~30 files)."""
    return tuple(sorted(project_files("cc_model.train")))


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel training processes (world 1: no torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current_ranks() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


class RankBatches(torch.utils.data.Sampler[list[int]]):
    """One process's share of the epoch's batches: r, r + world, r + 2 world, ... (equal counts on all).

    With one process, every batch. ``set_epoch(epoch, start)`` skips ``start`` of this share (resume).
    """

    def __init__(self, batches: SubjectBatchSampler, ranks: Ranks):
        self.batches, self.ranks, self.start = batches, ranks, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.batches.set_epoch(epoch)
        self.start = start

    def mine(self) -> list[list[int]]:
        every = self.batches.batches()
        used = len(every) // self.ranks.world * self.ranks.world
        return every[self.ranks.rank : used : self.ranks.world]

    def hard_rows(self) -> int:
        """Rows drawn as hard negatives into the epoch's batches that some process takes."""
        used = len(self.batches.batches()) // self.ranks.world * self.ranks.world
        return sum(self.batches.hard_counts[:used])

    @property
    def left_out(self) -> int:
        """Rows of the epoch in no process's batch."""
        every = self.batches.batches()
        return self.batches.left_out + (len(every) % self.ranks.world) * self.batches.batch_size

    def __iter__(self):
        yield from self.mine()[self.start :]

    def __len__(self) -> int:
        return len(self.mine()) - self.start


class TrainStateError(UserFacingError, ValueError):
    """A saved training state that the params cannot continue."""


def resolve_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        "cpu" if device == "auto" else device)


def state_key(params: Params, *, inputs: list[Path], device: torch.device) -> str:
    """What a saved state must have been made from to be continued (see the module docstring).

    ``inputs``: the files read (shards, embeddings, near-duplicates, backbone weights), named by
    path, size and mtime (hashing hundreds of GB is slow); a folder stands for its Parquet files.
    """
    digest = hashlib.sha256()
    train = {k: v for k, v in dataclasses.asdict(params.train).items() if k not in RUN_ONLY}
    digest.update(json.dumps({"model": dataclasses.asdict(params.model), "train": train,
                              "background_rgb": params.embed.background_rgb, "device": device_identity(device),
                              "libraries": library_versions("torch", "diffusers", "transformers")},
                             sort_keys=True, default=str).encode())
    for path in inputs:
        for file in sorted(path.rglob("*.parquet")) if path.is_dir() else [path]:
            digest.update(f"{file_identity(file)}\n".encode())
    for source in train_code():
        digest.update(source.encode() + (ROOT / source).read_bytes())
    return digest.hexdigest()


def training_batch(model: CustomContrastModel, batch: dict[str, torch.Tensor], *, device: torch.device,
                   dtype: torch.dtype, generator: torch.Generator) -> TrainBatch:
    """A loader batch (cc_model.data) -> the model's TrainBatch: VAE latents, noise, timesteps, CLIP pixels.

    Copies to the device do not wait (from the loader's pinned memory on CUDA): a blocking copy
    would wait for the previous step's backward and optimizer step to finish on the device. The
    captions stay in host memory (see CustomContrastModel.forward). The loop itself reads each
    step's loss terms after the forward, one wait per step by design: a non-finite loss stops the
    run before its update.
    """
    size = model.image_encoder.config.image_size

    def to_device(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return tensor.to(device, dtype, non_blocking=True)

    noisy, timesteps, target = diffusion_inputs(model, to_device(batch["target"]), generator=generator)
    return TrainBatch(
        reference_pixels=clip_pixels(to_device(batch["reference"]), size).to(dtype),
        input_ids=batch["input_ids"],
        noisy_latents=noisy.to(dtype),
        timesteps=timesteps,
        target=target.to(dtype),
        masks=to_device(batch["mask"], dtype),
        positive_pixels=clip_pixels(to_device(batch["positive"]), size).to(dtype),
        appearance_sim=to_device(batch["appearance_sim"]),
    )


class Resumed(NamedTuple):
    step: int  # optimizer steps done
    epoch: int  # the epoch the next batch comes from
    position: int  # batches of that epoch already used
    history: list[dict[str, float]]  # every step's loss terms


class TrainingState:
    """``.work/state.pt``: everything a run needs to continue; read with ``weights_only=True`` (no pickled code)."""

    def __init__(self, work_dir: Path, key: str, ranks: Ranks = Ranks()):
        self.path, self.key, self.ranks = work_dir / STATE_NAME, key, ranks

    def load(self, model: CustomContrastModel, optimizer: torch.optim.Optimizer,
             generator: torch.Generator) -> Resumed:
        """Restore a matching state, or start at step 0 when there is none to continue."""
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except FileNotFoundError:  # none, or a mismatched one that process 0 has just moved aside (below)
            return Resumed(0, 0, 0, [])
        if state.get("key") != self.key:
            if self.ranks.main:  # one process moves it; the others only start afresh
                kept = self.path.with_name("state.previous.pt")  # not overwritten by this run's first save
                os.replace(self.path, kept)
                logger.warning("train: %s was made from other data, params or code (state.pt's resume key: shards, "
                               "params, near-duplicates, backbone files, device type, libraries, the train "
                               "stage's code); starting afresh at step 0, the old state moved to %s", self.path, kept)
            return Resumed(0, 0, 0, [])
        trainable = model.trainable_named_parameters()
        with torch.no_grad():
            for name, value in state["trainable"].items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        # clone: a row of the stacked states is a view at an offset, which set_state misreads (segfault)
        generator.set_state(state["generators"][self.ranks.rank].clone() if self.ranks.world > 1 else state["generator"])
        history = [dict(zip(state["terms"], row)) for row in state["history"].tolist()]
        logger.info("train: continuing from step %d (%s)", state["step"], self.path)
        return Resumed(int(state["step"]), int(state["epoch"]), int(state["position"]), history)

    def save(self, model: CustomContrastModel, optimizer: torch.optim.Optimizer, generator: torch.Generator,
             at: Resumed) -> None:
        generators = [generator.get_state()]
        if self.ranks.world > 1:  # every process's draws continue where they were
            gathered = [None] * self.ranks.world
            dist.all_gather_object(gathered, (generator.get_state(), weights_digest(model)))
            generators = [state for state, _ in gathered]
            _check_digests([digest for _, digest in gathered])  # never save one process's diverged weights
        if not self.ranks.main:
            return
        terms = list(at.history[0]) if at.history else []
        state = {
            "key": self.key, "step": at.step, "epoch": at.epoch, "position": at.position,
            "generator": generators[0], "optimizer": optimizer.state_dict(),
            **({"generators": torch.stack(generators)} if self.ranks.world > 1 else {}),
            "trainable": {n: p.detach().cpu() for n, p in model.trainable_named_parameters().items()},
            "terms": terms,
            "history": torch.tensor([[row[t] for t in terms] for row in at.history], dtype=torch.float64),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{STATE_NAME}.tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)  # a run killed while saving keeps the previous state


def write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        terms = list(history[0]) if history else []
        writer.writerow(["step", *terms])
        for step, row in enumerate(history, start=1):
            writer.writerow([step, *(f"{row[t]:.6g}" for t in terms)])
    os.replace(tmp, path)


def make_optimizer(parameters, *, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable weights: on CUDA its fused kernel (a few launches per step instead of
    a foreach pass of several kernels per group of tensors); on a CPU torch's default."""
    return torch.optim.AdamW(list(parameters), lr=lr, fused=True if device.type == "cuda" else None)


def train_model(params: Params, *, export_dir: Path, embeddings: Path, near_duplicates: Path,
                hard_negatives: Path | None = None) -> dict:
    """Train for ``train.max_steps`` steps in all (continuing a matching saved state); returns the stats.

    ``hard_negatives`` (the similarity stage's table) is read when ``train.hard_negatives_per_batch`` > 0.
    """
    config = params.train
    out_dir = Path(config.out_dir)
    ranks = current_ranks()
    device = resolve_device(config.device)
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.rank)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(config.seed)  # the MFI encoder's initial weights
    backbones = load_backbones(params.model.backbone)
    model = CustomContrastModel(backbones=backbones, params=params.model, train=config)
    model.to(device)
    if dtype != torch.float32:
        cast_frozen(model, dtype)  # trainable weights stay float32 under autocast
    dataset = dataset_for(model, export_dir, "train", embeddings=embeddings, background_rgb=params.embed.background_rgb)
    conflicts = near_duplicate_conflicts(near_duplicates, dataset.subject_names) if config.avoid_near_duplicates else {}
    hard = config.hard_negatives_per_batch
    if hard and hard_negatives is None:
        raise ValueError("train.hard_negatives_per_batch > 0 needs the similarity stage's hard_negatives.parquet")
    negatives = hard_negative_lists(hard_negatives, dataset.subject_names) if hard else {}
    sampler = RankBatches(SubjectBatchSampler(dataset.row_groups(), dataset.subjects, batch_size=config.batch_size,
                                              seed=config.seed, conflicts=conflicts, hard_negatives=negatives,
                                              hard_per_batch=hard), ranks)
    # DataLoader workers are forked: they share the index and the embeddings instead of copying them
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate,
                                         num_workers=config.num_workers, pin_memory=device.type == "cuda")
    optimizer = make_optimizer(model.trainable_named_parameters().values(), lr=config.lr, device=device)
    generator = torch.Generator().manual_seed(config.seed + RANK_SEED_STRIDE * ranks.rank)
    step_model = model if ranks.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
        find_unused_parameters=True)  # a batch whose every row drops its image leaves the visual path out
    inputs = [export_dir, embeddings, *([near_duplicates] if config.avoid_near_duplicates else []),
              *([hard_negatives] if hard else []), *backbones.files]
    state = TrainingState(out_dir / ".work", state_key(params, inputs=inputs, device=device), ranks)
    at = state.load(model, optimizer, generator)
    if at.step > config.max_steps:
        raise TrainStateError(f"train.max_steps is {config.max_steps} but the saved state {state.path} has done "
                              f"{at.step} steps; raise train.max_steps, or delete {state.path.parent} to start afresh")
    step, epoch, position, history = at
    start_step = step
    progress = Progress("train", max(config.max_steps - step, 0), unit="steps",
                        every_s=15.0 if ranks.main else float("inf"))
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.train()
    while step < config.max_steps:
        sampler.set_epoch(epoch, start=position)  # a resumed run skips the batches it has used
        if position == 0 and len(sampler) == 0:
            if ranks.world > 1:
                raise ExportDataError(f"{export_dir / 'train'}: fewer than train.processes ({ranks.world}) batches of "
                                      f"{config.batch_size} samples of different subjects, none near-duplicates of "
                                      f"another, can be formed (train.processes, train.batch_size, "
                                      f"train.avoid_near_duplicates)")
            raise ExportDataError(f"{export_dir / 'train'}: no batch of {config.batch_size} samples of different "
                                  f"subjects, none near-duplicates of another, can be formed (train.batch_size, "
                                  f"train.avoid_near_duplicates)")
        if hard and position == 0 and ranks.main:
            logger.info("train: epoch %d: %d of its batches' %d rows are hard negatives", epoch, sampler.hard_rows(),
                        len(sampler.mine()) * ranks.world * config.batch_size)
        for batch in loader:
            with autocast:
                terms = step_model(training_batch(model, batch, device=device, dtype=dtype, generator=generator),
                                   generator=generator)
            values = _mean_over_ranks(terms, ranks)
            if not math.isfinite(values["total"]):
                raise FloatingPointError(f"train: loss terms {values} at step {step + 1}; the last saved state "
                                         f"(every train.save_every steps) is {state.path}")
            terms["total"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, position = step + 1, position + 1
            history.append(values)
            progress.update()
            if step % config.save_every == 0 or step == config.max_steps:
                state.save(model, optimizer, generator, Resumed(step, epoch, position, history))
            if step >= config.max_steps:
                break
        else:  # the epoch is used up
            if sampler.left_out:
                logger.info("train: epoch %d left out %d samples that fitted no batch", epoch, sampler.left_out)
            epoch, position = epoch + 1, 0
    seconds = progress.close()
    _check_in_step(model, ranks)
    if not ranks.main:
        return {}
    save_trainable(model, out_dir / "checkpoint")
    write_loss_csv(out_dir / "loss.csv", history)
    last = history[-LAST_STEPS:]
    stats = {"steps": step, "samples": step * config.batch_size * ranks.world, "train_samples": len(dataset),
             "epochs": epoch,
             **({"hard_negative_rows_last_epoch": _hard_rows_of(sampler, epoch)} if hard else {}),
             "loss_last_steps": {name: round(sum(r[name] for r in last) / len(last), 6) for name in last[0]}
             if last else {}}
    timing = {"device": str(device), "seconds": round(seconds, 3), "steps_this_run": step - start_step,
              "samples_per_s": round((step - start_step) * config.batch_size * ranks.world / max(seconds, 1e-9), 2),
              "processes": ranks.world,
              "started_at_step": start_step}
    return write_stats(out_dir, stats, timing=timing)


def _hard_rows_of(sampler: RankBatches, epoch: int) -> int:
    """Hard-negative rows of this epoch's batches (also when a resumed run had no step left to do)."""
    sampler.set_epoch(epoch)
    return sampler.hard_rows()


def _mean_over_ranks(terms: dict[str, torch.Tensor], ranks: Ranks) -> dict[str, float]:
    """Each loss term as a float, averaged over the processes (the same history on every one)."""
    if ranks.world == 1:
        return {name: float(value.detach()) for name, value in terms.items()}
    values = torch.stack([value.detach().float() for value in terms.values()]).double()
    values = values.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(values)
    return {name: float(v) / ranks.world for name, v in zip(terms, values.tolist())}


def weights_digest(model: CustomContrastModel) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.trainable_named_parameters().items()):
        digest.update(name.encode() + value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _check_digests(digests: list[str]) -> None:
    if len(set(digests)) > 1:
        raise RuntimeError(f"train: the {len(digests)} processes hold different weights ({digests}); "
                           f"data-parallel training went wrong, and nothing of this step was saved")


def _check_in_step(model: CustomContrastModel, ranks: Ranks) -> None:
    """Raise unless every process ends with the same trainable weights (DDP keeps them equal; every
    saved state was checked the same way)."""
    if ranks.world == 1:
        return
    digests = [None] * ranks.world
    dist.all_gather_object(digests, weights_digest(model))
    _check_digests(digests)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TrainProcessError(UserFacingError, RuntimeError):
    """A data-parallel training process stopped on an error the user fixes (its message, as it said it)."""


def _process_main(rank: int, world: int, port: int, params: Params, paths: dict[str, Path], errors) -> None:
    """One data-parallel training process (started by :func:`train_processes`); process 0 logs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)-7s | %(name)s - %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("flows").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    cuda = resolve_device(params.train.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        train_model(params, **paths)
    except UserFacingError as exc:  # the parent says it in one line
        errors.put(str(exc))
        raise
    finally:
        dist.destroy_process_group()


def train_processes(params: Params, *, export_dir: Path, embeddings: Path, near_duplicates: Path,
                    hard_negatives: Path | None = None) -> dict:
    """:func:`train_model` in ``train.processes`` data-parallel processes on this machine (one: here)."""
    paths = {"export_dir": export_dir, "embeddings": embeddings, "near_duplicates": near_duplicates,
             "hard_negatives": hard_negatives}
    world = params.train.processes
    if world == 1:
        return train_model(params, **paths)
    if resolve_device(params.train.device).type == "cuda" and torch.cuda.device_count() < world:
        raise TrainStateError(f"train.processes is {world} but this machine has {torch.cuda.device_count()} "
                              f"GPU(s): one process per GPU")
    logger.info("train: %d data-parallel processes of %d samples each", world, params.train.batch_size)
    errors = torch.multiprocessing.get_context("spawn").SimpleQueue()
    try:
        torch.multiprocessing.spawn(_process_main, args=(world, _free_port(), params, paths, errors), nprocs=world,
                                    join=True)
    except (torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException):
        if not errors.empty():
            raise TrainProcessError(errors.get()) from None
        raise
    out_dir = Path(params.train.out_dir)
    return {**json.loads((out_dir / "stats.json").read_text()), **json.loads((out_dir / "timing.json").read_text())}


__all__ = ["Ranks", "RankBatches", "Resumed", "TrainProcessError", "TrainStateError", "TrainingState", "current_ranks", "resolve_device",
           "make_optimizer", "state_key", "train_model", "train_processes", "training_batch"]
