"""The training loop: one function that reads top to bottom.

Every rank knows the whole plan (which rows go into which optimizer step), so the loss can be
normalised by the label tokens of the whole optimizer step. That makes gradient accumulation,
data parallelism and one large batch give the same gradient, and makes a resumed run replay the
uninterrupted one exactly.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from torch import nn

from tailor.runs import Run
from tailor.train.adapters import param_groups
from tailor.train.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    mark_best,
    newest_complete,
    save_checkpoint,
)
from tailor.train.distributed import Sharding, parallel_for
from tailor.train.encode import Encoded
from tailor.train.loss import CausalLMLoss
from tailor.train.packing import collate, epoch_order
from tailor.train.progress import progress_bar


@dataclass(frozen=True)
class TrainSettings:
    learning_rate: float = 2e-4
    layer_lr_decay: float = 1.0
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    seed: int = 42
    log_every: int = 5
    eval_every: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    early_stopping_patience: int = 0
    early_stopping_metric: str = "val_loss"
    early_stopping_min_delta: float = 0.0
    bf16_autocast: bool = False
    compile: bool = False  # training.compile: the blocks are compiled by the recipe, the loss's kernel here
    sharding: Sharding = Sharding()


@dataclass
class Plan:
    """Which rows each optimizer step uses: a pure function of (rows, settings, world size)."""

    n_rows: int
    rows_per_step: int
    steps_per_epoch: int
    total_steps: int
    seed: int

    @classmethod
    def make(cls, n_rows: int, s: TrainSettings, world: int) -> "Plan":
        per_step = s.batch_size * s.grad_accum * world
        per_epoch = math.ceil(n_rows / per_step)
        total = s.max_steps if s.max_steps else math.ceil(s.epochs * per_epoch)
        return cls(n_rows, per_step, per_epoch, total, s.seed)

    def step_rows(self, step: int) -> list[int]:
        """Row indices of optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.n_rows, self.seed, epoch)
        return order[k * self.rows_per_step:(k + 1) * self.rows_per_step]


def make_scheduler(optimizer, kind: str, total: int, warmup: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def train(model: nn.Module, examples: list[Encoded], rows: list[list[int]], val_examples: list[Encoded],
          val_rows: list[list[int]], settings: TrainSettings, run: Run, accelerator, pad_id: int,
          resume: bool = False, show_progress: bool = True, score_samples=None, trackers=(),
          objective: nn.Module | None = None, plan=None, row_units: list[int] | None = None,
          val_groups: dict[str, list[int]] | None = None, say=None) -> dict:
    """run: the run folder whose metrics.jsonl and checkpoints/ this writes (and reads on resume).
    score_samples: model -> {"val_rouge_l": …} from generated answers, added to each validation
    (computed on the main process and shared). trackers: also receive every metrics row. say:
    prints a line for the user on the main process (default: to stderr).

    What the techniques change, each with the plain default:
    objective   forward(**batch, weight) -> (loss sum, sums of `stat_names`, units); CausalLMLoss
    plan        step -> row indices (see Plan); Plan.make: every row once per epoch, shuffled
    row_units   what each row's loss is a sum over (the step's loss is divided by their total);
                label tokens by default, preference pairs for a preference loss
    val_groups  name -> validation row indices, each also reported on its own (val_loss/NAME …)
    """
    s = settings
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    say = say or (Console(stderr=True).print if is_main else lambda *a, **k: None)
    plan = plan or Plan.make(len(rows), s, world)
    row_units = row_units or [sum(examples[i].n_labels for i in row) for row in rows]

    # --- set up ---------------------------------------------------------------------------------
    plain_objective = objective or CausalLMLoss(model, compiled=s.compile)
    stat_names = plain_objective.stat_names
    groups = []

    def make_optimizer():  # after sharding: FSDP2 and DeepSpeed replace or partition the parameters
        groups.extend(param_groups(model, s.learning_rate, s.layer_lr_decay, s.weight_decay))
        # fused: one kernel for all of the parameters' updates; for LoRA's 420 small tensors on a CPU it
        # takes 4 ms a step where the per-tensor loop takes 16 (foreach: 19)
        return torch.optim.AdamW(groups, lr=s.learning_rate, betas=tuple(s.adam_betas), weight_decay=s.weight_decay,
                                 fused=True)

    parallel = parallel_for(s.sharding, accelerator, s, run)
    objective, optimizer = parallel.prepare(plain_objective, model, make_optimizer)
    trainable = [p for g in groups for p in g["params"]]
    weights_mb = held_weights_mb(model, accelerator)
    scheduler = make_scheduler(optimizer, s.scheduler, plan.total_steps, int(s.warmup_ratio * plan.total_steps))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=s.bf16_autocast)
    metrics = run.metrics_log(enabled=is_main, trackers=trackers)
    ckpt_dir = run.checkpoints_dir

    start, last_train, last_eval = 0, None, None
    early = EarlyStopping(s.early_stopping_metric, s.early_stopping_patience, s.early_stopping_min_delta)
    # The newest checkpoint whose files match their checksums; one cut short or damaged is skipped, and said so.
    checkpoint = newest_complete(ckpt_dir, is_main, say) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, parallel, rank)
        start = state["step"]
        early.load(state.get("early_stopping"))
        metrics.truncate_after(start)
        # A run killed after its last checkpoint has nothing left to train; its summary comes from here.
        last_train, last_eval = _last_rows(run)
    else:
        metrics.truncate_after(0)

    def batch_of(indices: list[int]) -> dict:
        return _to_device(collate([rows[i] for i in indices], examples, pad_id), device)

    def validate(step: int) -> dict | None:
        if not val_rows:
            return None
        model.eval()
        groups = val_groups or {"": list(range(len(val_rows)))}
        totals = torch.zeros(len(groups), 2 + len(stat_names), dtype=torch.float64, device=device)
        with torch.no_grad(), torch.autocast(**autocast):
            for g, indices in enumerate(groups.values()):
                # Every rank runs as many forwards as the busiest: under FSDP and ZeRO-3 each forward
                # gathers weights from all ranks, so one rank short of a chunk would leave the others
                # waiting. A rank past its rows repeats one and does not count it.
                rounds = math.ceil(len(indices) / (world * s.batch_size))
                for k in range(rounds):
                    a = (k * world + rank) * s.batch_size
                    mine = indices[a:a + s.batch_size]
                    chunk = [val_rows[i] for i in mine or indices[:1]]
                    loss_sum, stats, count = plain_objective(**_to_device(collate(chunk, val_examples, pad_id), device))
                    if mine:
                        totals[g] += torch.cat([loss_sum.double().view(1), torch.atleast_1d(stats).double(),
                                                count.double().view(1)])
        totals = accelerator.reduce(totals, "sum")
        model.train()
        row = {"type": "eval", "step": step, "epoch": round(step / plan.steps_per_epoch, 4),
               **_val_numbers(totals.sum(0), stat_names, plain_objective)}
        if val_groups:
            for name, numbers in zip(groups, totals):
                row.update({f"{k}/{name}": v for k, v in _val_numbers(numbers, stat_names, plain_objective).items()})
        if score_samples is not None:
            shared = [score_samples(model) if is_main else None]
            if world > 1:  # every rank must take the same early-stopping decision
                torch.distributed.broadcast_object_list(shared, src=0)
            row.update(shared[0])
            model.train()
        metrics.write(row)
        return row

    # --- train ----------------------------------------------------------------------------------
    model.train()
    window = {"loss": 0.0, "labels": 0, "tokens": 0, "time": 0.0, "grad_norm": 0.0, "steps": 0,
              "stats": torch.zeros(len(stat_names), dtype=torch.float64)}
    speeds = []
    done = start
    with progress_bar(plan.total_steps, start, show_progress and is_main) as bar:
        for step in range(start, plan.total_steps):
            t0 = time.perf_counter()
            step_rows = plan.step_rows(step)
            step_labels = sum(row_units[i] for i in step_rows)
            micro = s.batch_size * world
            chunks = [step_rows[a:a + micro] for a in range(0, len(step_rows), micro)]
            totals = torch.zeros(2 + len(stat_names), dtype=torch.float64, device=device)  # loss, tokens, stats
            for a, chunk in enumerate(chunks):
                mine = chunk[rank * s.batch_size:(rank + 1) * s.batch_size]
                weight = 1.0 if mine else 0.0  # a rank left without rows still joins the all-reduce
                b = batch_of(mine or chunk[:1])
                with parallel.accumulate(objective, last=a == len(chunks) - 1):
                    with torch.autocast(**autocast):
                        loss_sum, stats, _ = objective(**b, weight=weight)
                    # The strategies average gradients over ranks; scaling by world restores the sum, and
                    # dividing by the step's label tokens gives the per-token mean of the whole global batch.
                    parallel.backward(loss_sum * world / step_labels)
                real_tokens = sum(len(examples[i]) for r in mine for i in rows[r])
                totals += torch.cat([torch.tensor([loss_sum.item(), real_tokens], dtype=torch.float64),
                                     torch.atleast_1d(stats).detach().double().cpu() * weight]).to(device)
            max_norm = s.max_grad_norm if s.max_grad_norm else float("inf")
            lr = optimizer.param_groups[-1]["lr"]
            norm = parallel.step(optimizer, trainable, max_norm)
            scheduler.step()

            totals = accelerator.reduce(totals, "sum")
            dt = time.perf_counter() - t0
            window["loss"] += totals[0].item()
            window["labels"] += step_labels
            window["tokens"] += int(totals[1].item())
            window["time"] += dt
            window["grad_norm"] = max(window["grad_norm"], norm)
            window["steps"] += 1
            window["stats"] += totals[2:].cpu()
            if step > start:  # the first step pays for warm-up allocations
                speeds.append(totals[1].item() / dt)
            done = step + 1

            if done % s.log_every == 0 or done == plan.total_steps:
                last_train = {"type": "train", "step": done, "epoch": round(done / plan.steps_per_epoch, 4),
                              "loss": window["loss"] / window["labels"], "lr": lr, "grad_norm": window["grad_norm"],
                              "tokens_per_s": window["tokens"] / window["time"], "tokens": window["tokens"],
                              **{k: v / window["labels"] for k, v in zip(stat_names, window["stats"].tolist())}}
                metrics.write(last_train)
                bar.update(done, loss=f"{last_train['loss']:.4f}", lr=f"{lr:.2e}",
                           tps=f"{last_train['tokens_per_s']:.0f}")
                window = dict.fromkeys(window, 0.0) | {"labels": 0, "tokens": 0, "steps": 0,
                                                       "stats": torch.zeros(len(stat_names), dtype=torch.float64)}
            else:
                bar.update(done)

            epoch_end = done % plan.steps_per_epoch == 0
            improved = stop = False
            if (s.eval_every and done % s.eval_every == 0) or epoch_end or done == plan.total_steps:
                row = validate(done)
                last_eval = row or last_eval
                if row:
                    shown = f" · val {row['val_loss']:.4f}" + (f" · ROUGE-L {row['val_rouge_l']:.3f}"
                                                              if row.get("val_rouge_l") is not None else "")
                    bar.update(done, val=shown)
                    improved, stop = early.update(done, row)
            if (s.save_every and done % s.save_every == 0) or done == plan.total_steps or improved or stop:
                save_checkpoint(ckpt_dir, done, model, optimizer, scheduler,
                                {"step": done, "total_steps": plan.total_steps, "early_stopping": early.state()},
                                parallel, rank, is_main, s.keep_checkpoints)
            if improved and is_main:
                mark_best(ckpt_dir, done, early.metric, early.best)
            if stop:
                break

    stopped_at = done if start < plan.total_steps and done < plan.total_steps else None
    if early.enabled and early.best_step is not None and early.best_step != (stopped_at or plan.total_steps):
        parallel.load(checkpoint_path(ckpt_dir, early.best_step), model, None)  # the result: the best validation's
        last_eval = next((r for r in run.metrics()
                          if r.get("type") == "eval" and r["step"] == early.best_step), last_eval)
    return {
        "steps": stopped_at or plan.total_steps, "resumed_from_step": start, "steps_per_epoch": plan.steps_per_epoch,
        "stopped_early": stopped_at is not None,
        "best": {"step": early.best_step, "metric": early.metric, "value": early.best} if early.enabled else None,
        "final_train_loss": last_train["loss"] if last_train else None,
        "final_val_loss": last_eval["val_loss"] if last_eval else None,
        "final_val_token_accuracy": last_eval.get("val_token_accuracy") if last_eval else None,
        "final_val": {k: v for k, v in last_eval.items() if k.startswith("val_")} if last_eval else None,
        "tokens_per_s_median": statistics.median(speeds) if speeds else None,
        "weights_mb": weights_mb,
        **peak_memory(accelerator),
    }


def held_weights_mb(model: nn.Module, accelerator) -> float:
    """The weights one process holds, in MB (the largest over the processes): its shards under FSDP
    and ZeRO-3, 4-bit codes for a QLoRA base (their per-block scales left out: about 3 % more)."""
    held = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)  # FSDP2, ZeRO-3
        held += local.numel() * local.element_size()
    return round(_largest(accelerator, held) / 2 ** 20, 1)


def peak_memory(accelerator) -> dict:
    """The most memory one process held: resident memory on a CPU (the whole process since it
    started, the model's loading included), allocated memory on a GPU (what PyTorch's caching
    allocator reserved may be more). The largest over the processes."""
    if accelerator.device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(accelerator.device), "gpu_allocated"
    else:
        import resource

        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_resident"  # Linux: KiB
    return {"peak_memory_mb": round(_largest(accelerator, peak) / 2 ** 20), "peak_memory_kind": kind}


def _largest(accelerator, value: float) -> float:
    """The largest of each process's value (every process must call it)."""
    return accelerator.reduce(torch.tensor([float(value)], device=accelerator.device), "max").item()


class EarlyStopping:
    """Watches one validation metric: `update` says whether it improved and whether to stop."""

    def __init__(self, metric: str, patience: int, min_delta: float):
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.lower_is_better = metric == "val_loss"
        self.best, self.best_step, self.bad = None, None, 0

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def update(self, step: int, row: dict) -> tuple[bool, bool]:
        if not self.enabled or row.get(self.metric) is None:
            return False, False
        value = row[self.metric]
        better = (self.best is None or (value < self.best - self.min_delta if self.lower_is_better
                                        else value > self.best + self.min_delta))
        if better:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return better, self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load(self, state: dict | None) -> None:
        if state:
            self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]


def _val_numbers(totals: torch.Tensor, stat_names: tuple[str, ...], objective) -> dict:
    """[loss sum, stat sums…, units] -> {val_loss, val_perplexity (language-model losses), val_STAT}."""
    units = max(totals[-1].item(), 1.0)
    numbers = {"val_loss": totals[0].item() / units}
    if getattr(objective, "perplexity", False):
        numbers["val_perplexity"] = math.exp(min(numbers["val_loss"], 50))
    numbers.update({f"val_{k}": v.item() / units for k, v in zip(stat_names, totals[1:-1])})
    return numbers


def _last_rows(run: Run) -> tuple[dict | None, dict | None]:
    last = {r.get("type"): r for r in run.metrics()}
    return last.get("train"), last.get("eval")


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
