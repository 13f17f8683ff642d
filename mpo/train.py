"""The MPO trainer: torch + transformers, single process or under ``torchrun`` (DDP).

What it does, per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` pairs
(chosen and rejected in one forward, one vision pass per pair, chunked log-probs),
the MPO loss against reference log-probs read from the pairs table (``mpo ref-logps``)
or computed online, AdamW (weight decay 0.05 on matrices) with linear warm-up then
cosine decay, gradient clipping.

Everything a resumed run needs is in each checkpoint: weights in HF format (the LoRA
adapter when training one), the processor, and ``trainer_state.pt`` with the optimizer,
scheduler, BCO reward shift δ, data position and every RNG state (one file per rank).
Re-running the same command resumes from the newest checkpoint; on CPU, N steps
straight and N/2 + resume + N/2 give the same weights. ``metrics.jsonl`` gets one line
per optimizer step (and one per evaluation), trimmed back to the checkpoint on resume.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mpo import distributed, parallel
from mpo.io import atomic_write_text, publish_dir
from mpo.logps import PairLogps, autocast, load_vlm, precision, split_pairs, unwrap
from mpo.loss import MPOLossConfig, MPOLossOutput, RewardShift, mpo_loss
from mpo.model_identity import model_fingerprint
from mpo.pair_data import PairBatch, PairTable, encode_batch
from mpo.ref_logps import reference_specs
from mpo.results import TrainingResult

VISION_MODULES = ("vision_tower", "vision_model", "visual")
PROJECTOR_MODULES = ("multi_modal_projector", "mm_projector", "connector", "merger")
STATE_FILE = "trainer_state.pt"


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field("all-linear", description="peft target_modules")


class TrainConfig(BaseModel):
    """Every knob of ``mpo train``; defaults follow the MPO paper where it says."""

    model_config = ConfigDict(extra="forbid")

    loss: MPOLossConfig = Field(default_factory=MPOLossConfig)
    learning_rate: float = Field(5e-6, gt=0, description="peak lr (paper 5e-6; InternVL2.5 used 1e-6)")
    weight_decay: float = Field(0.05, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of steps with linear warm-up")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(4, ge=1, description="pairs per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_length: int = Field(2048, ge=8, description="tokens per sequence; responses are cut at the end")
    max_grad_norm: float | None = Field(1.0, gt=0)
    reference: Literal["precomputed", "online"] = Field(
        "precomputed",
        description="read ref log-probs from the pairs (mpo ref-logps) or compute them each step",
    )
    ref_model: str | None = Field(
        None, description="online reference model dir (default: the starting model)"
    )
    vision_pass: Literal["shared", "repeat"] = Field("shared", description="one vision pass per pair, or two")
    logp_chunk_tokens: int = Field(1024, ge=1, description="response tokens per LM-head chunk")
    freeze_vision: bool = False
    freeze_projector: bool = False
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = False
    disable_dropout: bool = Field(
        True,
        description="set every dropout of the policy (LoRA's too) to 0, as TRL does: with dropout on, the "
        "policy's log-probs are noisy and an online LoRA reference (the policy, adapter off) is random",
    )
    bf16: bool | None = Field(
        None, description="bf16 autocast; default on with CUDA (the reference must match)"
    )
    allow_other_reference: bool = Field(
        False,
        description="accept precomputed reference log-probs of another model than the starting (or ref_model) "
        "one: for a deliberately different reference",
    )
    seed: int = 0
    save_every: int | None = Field(None, ge=1, description="checkpoint every N steps (always at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int | None = Field(
        None, ge=1, description="evaluate held-out pairs every N steps (and at the end)"
    )
    processes: int = Field(
        1,
        ge=1,
        description="processes the DAG's training stage runs under torch.distributed.run (one per GPU of "
        "the worker, `parallel` says DDP or FSDP2); batch_size is per process",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: DDP (full model per process) or FSDP2 (sharded; no LoRA)"
    )
    device: str | None = None

    @model_validator(mode="after")
    def _lora_is_ddp_only(self) -> TrainConfig:
        if self.lora is not None and self.parallel == "fsdp":
            raise ValueError(
                "LoRA adapters train with parallel='ddp' (they are small); FSDP is for full fine-tuning"
            )
        return self


# --- model set-up ---------------------------------------------------------------------------------


def _find_module(model: Any, names: tuple[str, ...], what: str) -> torch.nn.Module:
    for holder in (model, getattr(model, "model", None)):
        for name in names:
            module = getattr(holder, name, None) if holder is not None else None
            if isinstance(module, torch.nn.Module):
                return module
    raise ValueError(f"{type(model).__name__} has no {what} (looked for {', '.join(names)})")


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout: ``nn.Dropout`` modules (LoRA's included) and the float rates attention
    layers read in train mode (``attention_dropout``, ``dropout``, ...), which are no modules."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)


def prepare_policy(model: Any, config: TrainConfig, adapter_dir: Path | None = None) -> Any:
    """Apply LoRA / freezing / gradient checkpointing / no dropout; returns the model to train."""
    if config.lora is not None:
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        else:
            model = get_peft_model(
                model,
                LoraConfig(
                    r=config.lora.r,
                    lora_alpha=config.lora.alpha,
                    lora_dropout=config.lora.dropout,
                    target_modules=config.lora.target_modules,
                    task_type=None,
                ),
            )
    hf = unwrap(model)
    if config.freeze_vision:
        _find_module(hf, VISION_MODULES, "vision tower").requires_grad_(False)
    if config.freeze_projector:
        _find_module(hf, PROJECTOR_MODULES, "projector").requires_grad_(False)
    if config.gradient_checkpointing:
        if hasattr(hf, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.disable_dropout:  # after the LoRA wrap, so that the adapter's dropout goes too
        disable_dropout(model)
    return model


def build_optimizer(model: Any, config: TrainConfig, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW, weight decay on matrices only; linear warm-up then cosine to zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check the freeze and LoRA options")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.adam_betas)
    warmup = int(math.ceil(config.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- data order -----------------------------------------------------------------------------------


def epoch_rows(size: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's pair indices for an epoch: a seeded shuffle, padded so every rank gets as many."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = math.ceil(size / world)
    order += order[: per_rank * world - size]
    return order[rank::world]


def micro_batches(rows: list[int], batch_size: int) -> list[list[int]]:
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


# --- checkpoints ----------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists()) if root.is_dir() else []


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro: int = 0  # micro-batches done in this epoch


def save_checkpoint(
    out: Path,
    forward: PairLogps,
    processor: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    shift: RewardShift,
    position: Position,
    config: TrainConfig,
    info: distributed.DistInfo,
) -> Path:
    """Write ``out/checkpoints/step-N`` atomically: rank 0 saves weights and state, each rank its RNG."""
    final = out / "checkpoints" / f"step-{position.step:06d}"
    optimizer_state = parallel.optimizer_state(forward, optimizer)  # collectives first, on every rank
    model_state = parallel.full_model_state(forward)
    staging = out / "checkpoints" / f".staging-{position.step:06d}"
    if info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    torch.save(_rng_state(), staging / f"rng-rank{info.rank}.pt")
    distributed.barrier()
    if info.is_main:

        def fill(tmp: Path) -> None:
            for item in staging.iterdir():
                item.rename(tmp / item.name)
            _save_model(tmp, forward, model_state)
            processor.save_pretrained(tmp)
            torch.save(
                {
                    "position": position.__dict__,
                    "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(),
                    "shift": shift.state_dict(),
                    "config": config.model_dump(mode="json"),
                    "world_size": info.world_size,
                },
                tmp / STATE_FILE,
            )

        publish_dir(final, fill)
        staging.rmdir()
        for old in checkpoints(out)[: -config.keep_checkpoints]:
            shutil.rmtree(old)
    distributed.barrier()
    return final


def _save_model(
    directory: Path, forward: PairLogps, full_state: dict[str, Any] | None, merge_lora: bool = False
) -> None:
    """HF ``save_pretrained`` of the policy; from the gathered full state when it is sharded."""
    model: Any = forward.model  # the peft model (saves the adapter only) or the transformers model
    if merge_lora:
        model = model.merge_and_unload()
    if full_state is None:
        model.save_pretrained(directory)
    else:
        state = {k.removeprefix("model."): v for k, v in full_state.items()}
        # The gathered state lists tied weights (lm_head = embeddings) twice; save them once, as HF does.
        named = dict(model.named_parameters(remove_duplicate=False))
        tied = getattr(model, "_tied_weights_keys", None)
        for target, source in tied.items() if isinstance(tied, dict) else []:
            if target in named and source in named and named[target] is named[source]:
                state.pop(target, None)
        model.save_pretrained(directory, state_dict=state)


# --- metrics --------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            kept = []
            if path.exists() and resume_step > 0:
                kept = [
                    line
                    for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step
                ]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- the loop -------------------------------------------------------------------------------------

METRIC_KEYS = (
    "loss",
    "dpo",
    "bco",
    "sft",
    "reward_chosen",
    "reward_rejected",
    "reward_margin",
    "reward_accuracy",
)


class _Filler:
    """One pair that fits ``max_length``, encoded on first use: what a rank trains at weight zero
    when its own micro-batch holds only over-long pairs."""

    def __init__(self, pairs: PairTable, processor: Any, max_length: int) -> None:
        self.pairs, self.processor, self.max_length = pairs, processor, max_length
        self.encoded: PairBatch | None = None

    def batch(self) -> PairBatch:
        row = 0
        while self.encoded is None:
            if row == len(self.pairs):
                raise ValueError(f"{self.pairs.source}: no pair fits max_length {self.max_length}")
            self.encoded, _ = encode_batch(self.pairs, self.processor, [row], self.max_length)
            row += 1
        return self.encoded


class _Reference:
    """Where reference log-probs come from: the pairs tables, or a frozen model run each batch.

    One instance serves the training pairs and the held-out pairs, so an online
    reference model is loaded once. Either way the reference computes as the policy does
    (``numerics``: float32 weights, the same autocast), so that at step 0 the policy's
    log-probs equal the reference's exactly.
    """

    def __init__(
        self,
        config: TrainConfig,
        model_dir: Path,
        policy: Any,
        device: torch.device,
        numerics: dict[str, str | None],
    ) -> None:
        self.config = config
        self.model_dir = Path(config.ref_model or model_dir)
        self.numerics = numerics
        self.forward: PairLogps | None = None
        self.adapter_off = False
        if config.reference == "precomputed":
            return
        if config.lora is not None and config.ref_model is None:
            self.forward, self.adapter_off = (
                PairLogps(policy, config.vision_pass, config.logp_chunk_tokens),
                True,
            )
        else:
            ref_model, _ = load_vlm(self.model_dir, device, dtype=torch.float32)
            self.forward = PairLogps(
                ref_model.eval().requires_grad_(False), config.vision_pass, config.logp_chunk_tokens
            )

    def check(self, pairs: PairTable) -> None:
        """Refuse, before training starts, a table whose precomputed log-probs are missing or do not fit:
        another max_length, another precision, or (unless allowed) another model's weights."""
        if self.forward is not None:
            return
        rerun = f"re-run `mpo ref-logps --pairs {pairs.source} --model {self.model_dir}`"
        if pairs.ref is None:
            raise ValueError(
                f"{pairs.source}: no reference log-probs; {rerun} first, or train with --reference online"
            )
        specs = [s for s in reference_specs(pairs.source) if s]
        lengths = {s["max_length"] for s in specs}
        if lengths != {self.config.max_length}:
            raise ValueError(
                f"{pairs.source}: reference log-probs were computed with max_length "
                f"{sorted(lengths)}, training uses {self.config.max_length}; {rerun} "
                f"--max-length {self.config.max_length}"
            )
        computed = {json.dumps(s.get("precision"), sort_keys=True) for s in specs}
        if computed != {json.dumps(self.numerics, sort_keys=True)}:
            raise ValueError(
                f"{pairs.source}: reference log-probs were computed under {sorted(computed)}, training "
                f"computes under {self.numerics}; {rerun} on the training device with the same bf16 "
                "setting, or the step-0 margin is not zero"
            )
        expected = model_fingerprint(self.model_dir)
        others = {(s["model"], s["fingerprint"]) for s in specs if s["fingerprint"] != expected}
        if others and not self.config.allow_other_reference:
            named = ", ".join(f"{model} (weights {fingerprint})" for model, fingerprint in sorted(others))
            raise ValueError(
                f"{pairs.source}: reference log-probs come from {named}, but the reference of this run "
                f"is {self.model_dir} (weights {expected}); {rerun}, or set allow_other_reference "
                "(--allow-other-reference) if the other model is the reference you mean"
            )

    @torch.no_grad()
    def logps(self, pairs: PairTable, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.forward is None:
            assert pairs.ref is not None
            ref = pairs.ref[batch.rows]
            if torch.isnan(ref).any():
                bad = [
                    pairs.pair_ids[r] for r, v in zip(batch.rows, ref, strict=True) if torch.isnan(v).any()
                ]
                raise ValueError(
                    f"{pairs.source}: pair {bad[0]} has no reference log-probs; re-run "
                    "`mpo ref-logps` with the same --max-length"
                )
            return ref[:, 0], ref[:, 1]
        peft_model: Any = self.forward.model
        context = peft_model.disable_adapter() if self.adapter_off else nullcontext()
        with context, autocast(self.numerics):
            return split_pairs(self.forward.batch_logps(batch).double())


def evaluate(
    forward: PairLogps,
    reference: _Reference,
    pairs: PairTable,
    processor: Any,
    config: TrainConfig,
    shift: RewardShift,
    device: torch.device,
) -> dict[str, float]:
    """Loss terms and reward accuracy on held-out pairs; δ is read, never updated."""
    was_training = forward.training
    forward.eval()
    outputs: list[MPOLossOutput] = []
    weights: list[int] = []
    dtype = next(forward.parameters()).dtype
    with torch.no_grad(), autocast(precision(device, config.bf16)):
        for rows in micro_batches(list(range(len(pairs))), config.batch_size):
            batch, _ = encode_batch(pairs, processor, rows, config.max_length)
            if batch is None:
                continue
            batch = batch.to(device, dtype)
            ref_c, ref_r = reference.logps(pairs, batch)
            chosen, rejected = split_pairs(forward.batch_logps(batch))
            outputs.append(
                mpo_loss(
                    chosen,
                    rejected,
                    ref_c.to(device),
                    ref_r.to(device),
                    batch.chosen_tokens(),
                    config.loss,
                    shift,
                    update_shift=False,
                )
            )
            weights.append(batch.pairs)
    forward.train(was_training)
    if not outputs:
        return {}
    total = sum(weights)
    metrics = [o.metrics() for o in outputs]
    return {k: sum(m[k] * w for m, w in zip(metrics, weights, strict=True)) / total for k in metrics[0]} | {
        "pairs": float(total)
    }


@dataclass
class _Session:
    """One training run's state: the data, the policy and its wrapper, the reference, the optimizer
    and where the run stands. ``_open_session`` builds it (resuming from a checkpoint), ``_step``
    advances it by one optimizer step."""

    config: TrainConfig
    info: distributed.DistInfo
    pairs: PairTable
    held_out: PairTable | None
    processor: Any
    model: Any
    forward: Any  # the PairLogps module (unwrapped): checkpoints and evaluation use it
    module: Any  # what the step calls: ``forward``, wrapped for DDP/FSDP across ranks
    reference: _Reference
    numerics: dict[str, str | None]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    shift: RewardShift
    position: Position
    total_steps: int

    def micro_batches(self) -> Iterator[list[int]]:
        """This rank's micro-batches, epoch after epoch, from where the run stands."""
        position, config, info = self.position, self.config, self.info
        while True:
            rows = micro_batches(
                epoch_rows(len(self.pairs), config.seed, position.epoch, info.rank, info.world_size),
                config.batch_size,
            )
            while position.micro < len(rows):
                position.micro += 1  # counted when handed out, so a checkpoint never replays it
                yield rows[position.micro - 1]
            position.epoch, position.micro = position.epoch + 1, 0


def _open_session(
    pairs_dir: Path | str, model_dir: Path, out: Path, config: TrainConfig, eval_pairs: Path | str | None
) -> _Session:
    """Data, policy (wrapped across ranks), reference, optimizer; resumed from ``out``'s newest checkpoint."""
    info = distributed.setup(config.device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    pairs = PairTable.read(pairs_dir)
    if len(pairs) == 0:
        raise ValueError(f"{pairs_dir}: no pairs to train on")
    held_out = PairTable.read(eval_pairs) if eval_pairs is not None else None

    resume_from = checkpoints(out)[-1] if checkpoints(out) else None
    model, processor = load_vlm(model_dir if resume_from is None or config.lora else resume_from, "cpu")
    model = prepare_policy(model, config, adapter_dir=resume_from if config.lora else None).to(info.device)
    model.train()
    forward: Any = PairLogps(model, config.vision_pass, config.logp_chunk_tokens)
    module = forward
    if info.enabled:
        # Text-only pairs leave the vision tower unused in their step.
        text_only = any(not images for images in pairs.images)
        module = parallel.wrap(forward, config.parallel, info.device, find_unused_parameters=text_only)
    numerics = precision(info.device, config.bf16)
    reference = _Reference(config, model_dir, model, info.device, numerics)
    for table in (pairs, held_out):
        if table is not None:
            reference.check(table)

    batches_per_epoch = math.ceil(math.ceil(len(pairs) / info.world_size) / config.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // config.grad_accum)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    optimizer, scheduler = build_optimizer(model, config, total_steps)
    session = _Session(
        config, info, pairs, held_out, processor, model, forward, module, reference, numerics,
        optimizer, scheduler, RewardShift(config.loss.delta_mode, config.loss.delta_momentum), Position(),
        total_steps,
    )  # fmt: skip
    if resume_from is not None:
        _resume(session, resume_from)
    return session


def _resume(session: _Session, checkpoint: Path) -> None:
    """Optimizer, schedule, δ, data position and this rank's random state as the checkpoint left them."""
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    if state["world_size"] != session.info.world_size:
        raise ValueError(
            f"{checkpoint} was written by {state['world_size']} processes, this run has "
            f"{session.info.world_size}; resume with the same number"
        )
    parallel.load_optimizer_state(session.forward, session.optimizer, state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    session.shift.load_state_dict(state["shift"])
    session.position = Position(**state["position"])
    _set_rng_state(torch.load(checkpoint / f"rng-rank{session.info.rank}.pt", weights_only=False))


def _step(session: _Session, stream: Iterator[list[int]], filler: _Filler) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches; returns its metrics record (summed over
    ranks: metrics weighted by pairs, the pairs trained, tokens, pairs skipped as too long)."""
    config, info, pairs = session.config, session.info, session.pairs
    started = time.perf_counter()
    rejected_grad = config.loss.dpo_weight > 0 or config.loss.bco_weight > 0
    # Fixed length, so every rank all-reduces alike.
    totals = torch.zeros(len(METRIC_KEYS) + 3, dtype=torch.float64)
    for micro in range(config.grad_accum):
        batch, too_long = encode_batch(pairs, session.processor, next(stream), config.max_length)
        totals[-1] += too_long
        if batch is None and not info.enabled:
            continue
        # Under DDP/FSDP a rank with nothing to train still takes part in every collective (the
        # gradient all-reduce, δ's all-reduce): it runs one pair that fits at weight zero.
        counted = batch is not None
        batch = (batch if batch is not None else filler.batch()).to(info.device)
        ref_c, ref_r = session.reference.logps(pairs, batch)
        sync = micro == config.grad_accum - 1 or not info.enabled
        with parallel.gradient_sync(session.module, sync), autocast(session.numerics):
            logps = session.module(
                batch.input_ids,
                batch.attention_mask,
                batch.response_mask,
                batch.pixel_values,
                rejected_grad=rejected_grad,
            )
            chosen, rejected = split_pairs(logps.float())
            output = mpo_loss(
                chosen,
                rejected,
                ref_c.to(info.device),
                ref_r.to(info.device),
                batch.chosen_tokens(),
                config.loss,
                session.shift,
                counted=counted,
            )
            (output.loss * float(counted) / config.grad_accum).backward()
        if counted:
            metrics = output.metrics()
            totals[: len(METRIC_KEYS)] += (
                torch.tensor([metrics[k] for k in METRIC_KEYS], dtype=torch.float64) * batch.pairs
            )
            totals[-3] += batch.pairs
            totals[-2] += int(batch.attention_mask.sum())
    grad_norm = parallel.clip_gradients(
        [p for p in session.model.parameters() if p.requires_grad], config.max_grad_norm
    )
    lr = session.scheduler.get_last_lr()[0]
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    session.position.step += 1
    totals = distributed.sum_across_ranks(totals)
    trained, tokens, skipped = (float(v) for v in totals[-3:])
    means = (totals[: len(METRIC_KEYS)] / trained).tolist() if trained else [math.nan] * len(METRIC_KEYS)
    return {
        "step": session.position.step,
        "epoch": session.position.epoch,
        "lr": lr,
        "grad_norm": grad_norm,
        **dict(zip(METRIC_KEYS, means, strict=True)),
        "pairs": int(trained),
        "skipped_too_long": int(skipped),
        "tokens_per_s": tokens / (time.perf_counter() - started),
        "delta": session.shift.value,  # this rank's δ (in sync: it is all-reduced)
    }


def train(
    pairs_dir: Path | str,
    model_dir: Path | str,
    out: Path | str,
    config: TrainConfig | None = None,
    eval_pairs: Path | str | None = None,
    stop_after: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainingResult:
    """Train with MPO on ``pairs_dir`` starting from ``model_dir``; resume from ``out`` if it holds checkpoints.

    ``stop_after`` ends the run (with a checkpoint) after that many steps in total, as
    a kill would, to train in slices; the next call resumes. The result's ``stage`` is ``train``
    (the pipeline names MPO and the SFT baseline apart).
    """
    started = time.perf_counter()
    config = config or TrainConfig()
    out, model_dir = Path(out), Path(model_dir)
    session = _open_session(pairs_dir, model_dir, out, config, eval_pairs)
    info, position = session.info, session.position
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl", position.step, info.is_main)
    resumed_from, skipped = position.step, 0
    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    evaluation: dict[str, float] = {}
    stream = session.micro_batches()
    end = min(session.total_steps, stop_after) if stop_after else session.total_steps
    filler = _Filler(session.pairs, session.processor, config.max_length)
    while position.step < end:
        record = _step(session, stream, filler)
        skipped += record["skipped_too_long"]
        log.write(record)
        if on_step:
            on_step(record)
        first, last = first or record, record
        done = position.step >= end
        if session.held_out is not None and (
            done or (config.eval_every and position.step % config.eval_every == 0)
        ):
            evaluation = evaluate(
                session.forward, session.reference, session.held_out, session.processor, config,
                session.shift, info.device,
            )  # fmt: skip
            log.write({"step": position.step, "split": "eval", **evaluation})
        if done or (config.save_every and position.step % config.save_every == 0):
            save_checkpoint(
                out, session.forward, session.processor, session.optimizer, session.scheduler,
                session.shift, position, config, info,
            )  # fmt: skip
    if position.step >= session.total_steps:
        _save_final(out / "final", session.forward, session.processor, config, info)
    distributed.barrier()
    return TrainingResult(
        stage="train",
        out_dir=str(out),
        counts={"steps": position.step},
        drops={"too_long": skipped} if skipped else {},
        seconds=time.perf_counter() - started,
        final_model=str(out / "final"),
        metrics_file=str(log.path),
        first={k: float(v) for k, v in first.items() if isinstance(v, (int, float))},
        last={k: float(v) for k, v in last.items() if isinstance(v, (int, float))},
        resumed_from=resumed_from,
        evaluation=evaluation,
    )


def _save_final(
    final: Path, forward: PairLogps, processor: Any, config: TrainConfig, info: distributed.DistInfo
) -> None:
    """The trained model in plain HF format (LoRA merged) for sampling and evaluation stages."""
    full_state = parallel.full_model_state(forward)  # a collective when sharded
    if not info.is_main:
        return

    def fill(tmp: Path) -> None:
        _save_model(tmp, forward, full_state, merge_lora=config.lora is not None)
        processor.save_pretrained(tmp)

    publish_dir(final, fill)


__all__ = ["LoraSettings", "TrainConfig", "checkpoints", "evaluate", "read_metrics", "train"]
