"""The train stage: AdamW, early stopping on validation NDCG@10, best checkpoint, resume, dvclive."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from cammsr.core.atomic import atomic_path
from cammsr.core.config import EvaluateParams, ProjectParams, SplitParams, TrainParams
from cammsr.core.device import pick_device, resolve_precision
from cammsr.core.malloc import release_free_memory, tune_glibc_malloc
from cammsr.core.paths import CatalogPaths
from cammsr.core.summary import StageSummary
from cammsr.data.batches import bucketed_batches, pad_right, training_pairs
from cammsr.data.splits import SplitData, load_splits
from cammsr.evaluate.buckets import training_counts
from cammsr.evaluate.metrics import metrics_from_ranks
from cammsr.evaluate.ranking import model_scores, rank_targets
from cammsr.model import CAMMSR
from cammsr.model.chunked_ce import release_workspace
from cammsr.model.content_neighbours import IdSmoother
from cammsr.model.io import build_model, item_ids_sha256, save_checkpoint

log = logging.getLogger(__name__)
SELECT_METRIC = "ndcg@10"  # model selection; HM4SR uses NDCG@5, 10 is steadier on small catalogs


@dataclass
class EpochResult:
    epoch: int
    loss: dict[str, float]
    valid: dict[str, float]
    seconds: float
    sequences_per_s: float


def seed_everything(seed: int, deterministic: bool = False) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def validate(model: CAMMSR, split: SplitData, max_len: int, params: EvaluateParams,
             device: torch.device, part: str = "valid") -> dict[str, float]:
    """Full-ranking metrics of ``model`` on the valid (or test) targets."""
    hist, targets, _ = split.held_out(part, max_len)
    model.eval()
    ranks = rank_targets(model_scores(model), hist, targets, params.batch_size, params.mask_history, device,
                         resolve_precision(params.precision, device, auto_on=("cpu",)), cap=max(params.ks))
    return metrics_from_ranks(ranks, params.ks)


@torch.no_grad()
def weight_stats(model: CAMMSR, device: torch.device) -> dict[str, float]:
    """How informative the modality weights w are over all items: their mean entropy as a share of
    log M (1 = uniform, the "w/o category guidance" setting), and the mean weight of each modality.
    Empty without CAMoE or with a single modality."""
    if not model.use_moe or len(model.mods) < 2:
        return {}
    model.eval()
    _, w, _ = model.camoe(torch.arange(1, model.cfg.num_items + 1, device=device))  # [N, M]
    entropy = -(w * w.clamp(min=1e-12).log()).sum(-1) / np.log(len(model.mods))  # [N]
    return {"weight_entropy": float(entropy.mean()),
            **{f"w_{m}": float(w[:, j].mean()) for j, m in enumerate(model.mods)}}


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on CUDA) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_pref)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, inputs: list[np.ndarray],
                targets: list[np.ndarray], batch_size: int, gen: torch.Generator, device: torch.device, desc: str,
                dist: Dist = Dist(), batch_targets: int | None = None, bucket_batches: int = 32,
                precision: torch.dtype = torch.float32) -> dict[str, float]:
    """One pass over every training sequence; returns the mean of each loss part.

    Under DDP every rank draws the same global batches and takes every world-th sequence of each;
    the CE is normalised by the global target count so gradients match a single process.
    ``precision`` bfloat16 runs the forward under autocast (weights, gradients and the optimizer stay float32).
    """
    model.train()
    lengths = np.array([int(np.count_nonzero(t)) for t in targets])  # targets per sequence (windows score some)
    sums: dict[str, float] = {}
    n_batches = 0
    batches = list(bucketed_batches(lengths, batch_size, gen, bucket_batches, batch_targets))
    # disable=None: a bar on a terminal, none in logs (DVC, CI); per-epoch lines are logged anyway
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, mininterval=1.0, disable=None if dist.main else True)
    for global_idx in bar:
        if len(global_idx) < dist.world:  # a tail batch too small to give every rank a sequence
            continue
        idx = global_idx[dist.rank :: dist.world]
        normalizer = float(lengths[global_idx].sum()) / dist.world
        seq = pad_right([inputs[i] for i in idx]).to(device, non_blocking=True)
        tgt = pad_right([targets[i] for i in idx]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
            loss, parts = model(seq, tgt, normalizer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        n_batches += 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {k: v / max(n_batches, 1) for k, v in sums.items()}


def run_train(name: str, train: TrainParams, split_params: SplitParams, evaluate: EvaluateParams,
              project: ProjectParams, paths: CatalogPaths, resume: bool = False,
              deterministic: bool = False, split: SplitData | None = None) -> StageSummary:
    """Train on the split of catalog ``name``; the best epoch by validation NDCG@10 is kept.

    ``split``: train on this split instead of the one under ``paths.splits_dir`` (the cold-item study
    trains on a split without its held-out items; see `cammsr.train.cold`).
    """
    t0 = time.perf_counter()
    tune_glibc_malloc()
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    seed_everything(project.seed, deterministic)
    dist, device = setup_distributed(project.device)
    # auto: bfloat16 autocast on CUDA only. On CPU (AMX) it matched float32's accuracy but trained CAMMSR
    # ~1.7x slower: oneDNN compiles a bf16 kernel per new matmul shape and training shapes vary per batch.
    precision = resolve_precision(train.precision, device, auto_on=("cuda",))
    split = split if split is not None else load_splits(paths.splits_dir)
    model = build_model(train, split_params, split, paths, project.seed).to(device)
    # the CE's three [targets x items] matmuls alone in bfloat16 on an AMX CPU: 1.7-2.7x faster, and its
    # shapes are few (chunked_ce pads them), unlike whole-forward autocast
    model.ce_dtype = resolve_precision(train.ce_precision, device, auto_on=("cpu",)) if device.type == "cpu" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model
    # fused: one kernel per parameter instead of a dozen elementwise passes; measured on CPU for SASRec's
    # 0.87M parameters 7.6 ms per step against 62.7 ms for the default single-tensor AdamW. Same update rule.
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                            fused=device.type in ("cpu", "cuda"))
    gen = torch.Generator().manual_seed(project.seed)
    inputs, targets = training_pairs(split.train_sequences(), split_params.max_seq_len, windows=train.windows)
    log.info("train[%s]: %s on %s (rank %d of %d, %s, CE %s), modalities %s, %d parameters, %d training "
             "sequences, %d items", name, train.model, device, dist.rank, dist.world,
             str(precision).removeprefix("torch."), str(model.ce_dtype or precision).removeprefix("torch."),
             ",".join(model.mods), model.num_parameters(), len(inputs), split.num_items)

    last_path, best_path = paths.models_dir / "last.pt", paths.checkpoint
    start_epoch, best, best_epoch, bad_epochs = 0, -1.0, -1, 0
    history: list[EpochResult] = []
    if resume and last_path.exists():
        state = torch.load(last_path, map_location=device, weights_only=True)
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best, best_epoch, bad_epochs = (state["epoch"] + 1, state["best"], state["best_epoch"],
                                                     state["bad_epochs"])
        log.info("resumed from %s at epoch %d (best %s %.4f at epoch %d)", last_path, start_epoch,
                 SELECT_METRIC, best, best_epoch)

    live = _live(paths, resume and start_epoch > 0) if dist.main else None
    for epoch in range(start_epoch, train.epochs):
        te = time.perf_counter()
        loss = train_epoch(ddp, opt, inputs, targets, train.batch_size, gen, device, desc=f"epoch {epoch}",
                           dist=dist, batch_targets=train.batch_targets, bucket_batches=train.bucket_batches,
                           precision=precision)
        train_s = time.perf_counter() - te
        release_free_memory()  # the epoch's fragmented heap, before the ranking pass
        valid = validate(model, split, split_params.max_seq_len, evaluate, device)
        weights = weight_stats(model, device)
        res = EpochResult(epoch, loss, valid, train_s, len(inputs) / max(train_s, 1e-9))
        history.append(res)
        improved = valid[SELECT_METRIC] > best
        if improved:
            best, best_epoch, bad_epochs = valid[SELECT_METRIC], epoch, 0
            if dist.main:
                save_checkpoint(best_path, model, epoch=epoch, valid=valid, model_name=train.model,
                                item_ids_sha256=item_ids_sha256(split.item_ids))
        else:
            bad_epochs += 1
        log.info("epoch %d loss %s valid %s %.4f hr@10 %.4f%s (%.1f s, %.0f seq/s)%s", epoch,
                 " ".join(f"{k}={v:.4f}" for k, v in loss.items()), SELECT_METRIC, valid[SELECT_METRIC],
                 valid["hr@10"], "".join(f" {k} {v:.3f}" for k, v in weights.items()), train_s,
                 res.sequences_per_s, " *" if improved else "")
        if live is not None:
            for k, v in loss.items():
                live.log_metric(f"train/loss_{k}", v)
            for k, v in valid.items():
                live.log_metric(f"valid/{k}", v)
            for k, v in weights.items():
                live.log_metric(f"train/{k}", v)
            live.log_metric("train/epoch_seconds", train_s)
            live.next_step()
        if dist.main:
            _save_last(last_path, model, opt, gen, epoch, best, best_epoch, bad_epochs)
        if bad_epochs >= train.patience:
            log.info("early stop: no better %s for %d epochs", SELECT_METRIC, train.patience)
            break
    if live is not None:
        live.end()
    release_workspace()  # the CE's score blocks: not needed by what follows (smoothing, the caller's ranking)
    release_free_memory()
    if best_epoch < 0:
        raise RuntimeError(f"train[{name}]: no epoch ran (epochs={train.epochs}, resumed at {start_epoch})")
    smoothing = None
    if dist.main and train.id_smoothing and IdSmoother.applies(model):
        smoothing = fit_id_smoothing(model, best_path, split, split_params.max_seq_len, evaluate, device,
                                     train.id_smoothing)

    secs = [h.seconds for h in history]
    summary = StageSummary(
        stage="train", catalog=name,
        counts={"model": train.model, "modalities": ",".join(model.mods), "parameters": model.num_parameters(),
                "epochs_run": len(history) + start_epoch, "best_epoch": best_epoch,
                f"best_valid_{SELECT_METRIC}": round(best, 5),
                **({"id_smoothing": smoothing[0], f"smoothed_valid_{SELECT_METRIC}": round(smoothing[1], 5)}
                   if smoothing else {}),
                "epoch_seconds": round(float(np.mean(secs)), 3) if secs else None,
                "sequences_per_s": round(float(np.mean([h.sequences_per_s for h in history])), 1) if history else None,
                "device": str(device), "precision": str(precision).removeprefix("torch."),
                "world_size": dist.world},
        seconds=time.perf_counter() - t0,
    )
    if dist.main:
        summary.write(paths.summary("train"))
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def fit_id_smoothing(model: CAMMSR, best_path, split: SplitData, max_len: int, evaluate: EvaluateParams,
                     device: torch.device, lambdas: list[float]) -> tuple[float, float]:
    """Pick the ID-row smoothing (`cammsr.model.content_neighbours.IdSmoother`) of the best checkpoint on
    validation NDCG@10 among 0 and ``lambdas``; rewrite the checkpoint with the smoothed rows when one beats 0.
    Returns (lambda, its validation NDCG@10)."""
    ckpt = torch.load(best_path, map_location=device, weights_only=True)
    if "id_smoothing" in ckpt:  # smoothed already (a resumed run that had finished): not twice
        return float(ckpt["id_smoothing"]), float(ckpt["valid"][SELECT_METRIC])
    model.load_state_dict(ckpt["state_dict"])
    counts = torch.from_numpy(training_counts(split.train_sequences(), split.num_items))
    smoother = IdSmoother(model, counts)
    tried: dict[float, dict[str, float]] = {0.0: ckpt["valid"]}
    for lam in sorted(set(lambdas)):
        smoother.apply(lam)
        tried[lam] = validate(model, split, max_len, evaluate, device)
    lam = max(tried, key=lambda k: (tried[k][SELECT_METRIC], -k))  # ties: the smaller lambda
    log.info("ID-row smoothing towards content neighbours, valid %s by lambda: %s -> %s", SELECT_METRIC,
             " ".join(f"{k:g}:{v[SELECT_METRIC]:.4f}" for k, v in tried.items()), f"{lam:g}")
    smoother.apply(lam)
    if lam > 0:
        extras = {k: v for k, v in ckpt.items() if k not in ("state_dict", "config", "valid")}
        save_checkpoint(best_path, model, **extras, valid=tried[lam], valid_unsmoothed=ckpt["valid"], id_smoothing=lam)
    return lam, tried[lam][SELECT_METRIC]


def _save_last(path, model, opt, gen, epoch, best, best_epoch, bad_epochs) -> None:
    """Everything needed to resume exactly where this epoch ended (weights_only-loadable)."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "epoch": epoch, "best": best, "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs}, tmp)


def _live(paths: CatalogPaths, resume: bool):
    """A dvclive logger writing per-epoch metrics under ``train_log/`` (DVC plots), or None."""
    try:
        from dvclive import Live
    except ImportError:  # pragma: no cover - dvclive is a dependency; keep training usable without it
        return None
    return Live(dir=str(paths.train_log_dir), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)
