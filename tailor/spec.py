"""The job spec: one YAML file that says everything about a fine-tuning job.

Each field is typed, defaulted and described once; the description is the documentation
(`tailor spec`, docs/job-spec.md) and what error messages point to. Unknown keys are rejected
with the closest valid name, and every problem in a file is reported at once, before any weights
load. Only recipes (tailor/techniques/) read a Job; library functions take explicit arguments.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from tailor.errors import TailorError

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"


class SpecError(TailorError, ValueError):
    """A job file (or a --set override) that does not describe a valid job."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the job spec:\n{lines}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    base: str = Field(
        EMBEDDED_DEFAULT,
        description="Base model: 'embedded:smollm2-135m-instruct' (ships with Tailor, works offline), "
        "a Hugging Face hub id ('HuggingFaceTB/SmolLM2-360M-Instruct'), a local model folder, or a .gguf file.",
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Compute dtype. auto: bfloat16 where the CPU has AMX/AVX512-BF16 or the GPU supports it "
        "(matmuls about 2x faster with AVX512-BF16, about 7x with AMX; half the memory for frozen weights), "
        "float32 otherwise.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub to run. Only for models you trust."
    )
    from_run: str | None = Field(
        None, description="A finished run folder to continue from (its LoRA adapter, or its weights): continual "
        "fine-tuning on new data, such as `tailor feedback export` writes. It must have trained model.base with the "
        "same adapter.kind. `tailor train JOB --from-run RUN` sets it.")


# A setting Tailor chooses at the start of training, from the model and the data (tailor/train/auto.py).
Auto = Literal["auto"]

FormatName = Literal["auto", "chat", "alpaca", "sharegpt", "prompt_completion", "preference", "openai_preference",
                     "text"]


class SourceSpec(Section):
    path: str = Field(description="A file (JSONL/JSON, CSV/TSV, Parquet, text) or a folder of them, or a saved "
                      "Hugging Face dataset folder.")
    format: FormatName = Field("auto", description="Record format; auto: detected per record from its keys.")
    task: str | None = Field(None, description="Task name for every record of this input (multi-task training).")
    task_column: str | None = Field(None, description="Column or key that holds each record's task name.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Canonical field name → the input's column name, e.g. {prompt: question, completion: answer}.",
    )


class CleanSpec(Section):
    unicode: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalization. NFKC also folds look-alikes (ﬁ → fi, ² → 2), which can change "
        "meaning."
    )
    fix_encoding: bool = Field(True, description="Repair mojibake such as 'cafÃ©' → 'café' (ftfy).")
    strip_html: bool = Field(False, description="Remove HTML tags and decode entities in every text.")
    min_tokens: int = Field(
        2, ge=0, description="Drop records shorter than this many tokens (of the base model's tokenizer).")
    max_tokens: int | None = Field(
        None, ge=1, description="Drop records longer than this many tokens; null: keep them (training truncates).")
    languages: list[str] = Field(
        default_factory=list,
        description="Keep only records in these languages (ISO 639-1 codes, detected offline); empty: keep all.",
    )


class DedupSpec(Section):
    exact: bool = Field(True, description="Remove records identical after normalization (case, whitespace, Unicode).")
    near: bool = Field(True, description="Remove near-duplicates (MinHash LSH), keeping the first of each cluster.")
    threshold: float = Field(
        0.8, gt=0.0, le=1.0,
        description="Near-duplicate when the estimated Jaccard similarity of word n-grams reaches this. "
        "Lower: more removed.")
    ngram: int = Field(3, ge=1, description="Words per shingle for near-duplicate detection.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations. More: a sharper threshold, slower.")


class PrivacySpec(Section):
    enabled: bool = Field(True, description="Find and replace personal data before anything is written.")
    ner: bool = Field(
        True, description="Also find names with spaCy's NER model (installed with Tailor); false: patterns only "
        "(emails, phones, cards, IBANs, IPs, id numbers).")
    entities: list[str] | None = Field(
        None, description="Entity types to replace; null: Tailor's default list (see docs/data.md).")
    strategy: Literal["placeholder", "mask", "pseudonym", "drop"] = Field(
        "placeholder",
        description="placeholder: <EMAIL>; mask: ****; pseudonym: a consistent fake value; drop: drop the record.")
    allow: list[str] = Field(
        default_factory=list, description="Strings never replaced: your support address, brand or agent names.")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Minimum detector confidence to replace a match.")
    spacy_model: str | None = Field(
        None, description="The spaCy pipeline that finds names: an installed package or a folder (./, / or ~: "
        "relative to the job file); null: the English model installed with Tailor. Its NER must use OntoNotes "
        "(PERSON) or WikiNER (PER) labels, e.g. a model for your data's language.")
    allow_from: list[str] = Field(
        default_factory=list, description="Files of more allowed values, one per line ('#' comments): the review "
        "file `tailor prepare` writes, once you have deleted the private people's lines from it. Relative to the "
        "job file.")
    keep_emptied_answers: bool = Field(
        False, description="false: a record with an answer (an assistant turn that is trained on) that "
        "anonymization left as nothing but replaced values (\"<PERSON>.\") goes to rejects.jsonl, since a model "
        "trained on it learns to answer \"<PERSON>\"; true: keep it (public names: better list them in allow).")


class SplitSpec(Section):
    validation: float = Field(0.1, ge=0.0, description="Validation split: a share (< 1) or a number of records (≥ 1).")
    test: float = Field(0.1, ge=0.0, description="Test split: a share (< 1) or a number of records (≥ 1).")
    seed: int = Field(42, description="Seed of the split; the same data and seed give the same split.")
    stratify: bool = Field(True, description="Split each task in the same proportions.")


class CardSpec(Section):
    perplexity_sample: int = Field(
        32, ge=0, description="Records on which the base model's perplexity is measured (0: skip; loads the model).")
    html: bool = Field(True, description="Also write card.html with interactive charts (works offline).")


class DataSpec(Section):
    train: list[str | SourceSpec] = Field(
        default_factory=list,
        description="Training data: files or folders in any supported format (chat JSONL, Alpaca, ShareGPT, "
        "prompt/completion, preference pairs, CSV/TSV/Parquet, text, saved HF datasets), or a folder written by "
        "`tailor prepare`. An entry may be {path, format, task, task_column, columns}. Relative to the job file.",
    )
    validation: list[str | SourceSpec] = Field(
        default_factory=list,
        description="Validation data, as train. Empty: the prepared folder's validation split, "
        "or validation_fraction of train.",
    )
    validation_fraction: float = Field(
        0.1, ge=0.0, lt=0.5,
        description="Share of train examples held out for validation when no validation data is given.",
    )
    prepare: bool = Field(
        False, description="true: prepare data.train first (clean, de-duplicate, anonymize, split) into the run "
        "folder's data/, then train on its train split and validate on its validation split.")
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="Preparing: skip writes bad records to rejects.jsonl with the reason; fail stops at them.")
    clean: CleanSpec = Field(default_factory=CleanSpec, description="Preparing: text cleaning and filters.")
    dedup: DedupSpec = Field(default_factory=DedupSpec, description="Preparing: duplicate removal.")
    privacy: PrivacySpec = Field(default_factory=PrivacySpec, description="Preparing: personal data.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="Preparing: train/validation/test split.")
    card: CardSpec = Field(default_factory=CardSpec, description="Preparing: the data card.")

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, dict)) else value


class AdapterSpec(Section):
    kind: Literal["lora", "qlora", "full", "freeze"] = Field(
        "lora",
        description="What trains. lora: small low-rank matrices beside frozen weights (least memory, "
        "adapter of a few MB). qlora: LoRA on a base whose linear layers are stored in 4-bit NF4 "
        "(bitsandbytes): those weights take about a quarter of their bf16 memory, at some speed and a small "
        "loss in precision; the adapter is a LoRA adapter like any other. full: every weight (most memory: "
        "weights + gradients + 2 Adam states in float32). freeze: only the top train_top_blocks blocks (and "
        "optionally head and final norm).",
    )
    double_quant: bool = Field(
        False, description="qlora: also quantize the 4-bit weights' scales (about 0.4 bit per weight less: "
        "~3 GB on a 65B model, nothing worth having below 1B), for a little more compute.")
    rank: PositiveInt | Auto = Field(
        16, description="LoRA rank r. Higher: more capacity, more memory and time. auto: chosen at the start of "
        "training from the model's size and the data (16 below 1B parameters, 8 from 1B; doubled from 10,000 "
        "examples), recorded with the reason in the manifest.")
    alpha: PositiveFloat | Auto = Field(
        32.0, description="LoRA scaling alpha; the update is scaled by alpha / rank. auto: 2 x rank.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout on the LoRA input. 0.05-0.1 can regularise very small datasets, at about "
        "-15% speed on CPU (drawing the random mask costs as much as a third of the matmuls).",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules that get LoRA: 'all-linear' (every projection in every block, not the head) "
        "or a list of module names such as [q_proj, v_proj].",
    )
    lora_top_blocks: int | None = Field(
        None, ge=1, description="lora: put adapters only in the last N transformer blocks (transfer learning: the "
        "lower blocks' features are kept as they are). null: every block.")
    train_top_blocks: int = Field(
        2, ge=0, description="freeze: how many of the last transformer blocks train."
    )
    train_head: bool = Field(
        False,
        description="freeze: also train the output head. With tied embeddings (SmolLM2, Qwen) this "
        "trains the input embeddings too.",
    )
    train_norm: bool = Field(True, description="freeze: also train the final norm.")


class TransferSpec(Section):
    domain_text: list[str | SourceSpec] = Field(
        default_factory=list,
        description="technique transfer: plain-text documents of your domain (manuals, policies, product pages) to "
        "continue pre-training on (loss on every token) before the task. Empty: train the task only.")
    domain_epochs: float = Field(1.0, gt=0, description="transfer: passes over domain_text.")
    domain_learning_rate: float | None = Field(
        None, gt=0, description="transfer: learning rate on domain_text (null: training.learning_rate).")

    @field_validator("domain_text", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, dict)) else value


class MultitaskSpec(Section):
    sampling: Literal["proportional", "temperature", "weights"] = Field(
        "temperature", description="How each step's rows are drawn from the tasks. proportional: by task size (a big "
        "task drowns a small one); temperature: p ∝ size^(1/T), T>1 evens them out; weights: multitask.weights.")
    temperature: float = Field(2.0, gt=0, description="T of sampling: temperature (1 = proportional; large = uniform).")
    weights: dict[str, float] = Field(
        default_factory=dict, description="sampling: weights — task name → relative weight, every task named.")
    instructions: dict[str, str] = Field(
        default_factory=dict, description="Task name → a system prompt given to that task's conversations that have "
        "none (in training, validation and evaluation), so one model tells the tasks apart.")


class PreferenceSpec(Section):
    loss: Literal["dpo", "ipo", "orpo"] = Field(
        "dpo", description="Preference loss on chosen/rejected pairs. dpo: the standard; ipo: bounded, for noisy "
        "labels; orpo: no reference model, adds the chosen answers' loss (can skip the demonstration phase).")
    beta: float = Field(
        0.1, gt=0, description="How far from the reference the model may move (dpo, ipo), or the weight of the "
        "preference term (orpo). Higher: stays closer to the reference.")
    sft_weight: float = Field(
        1.0, ge=0, description="dpo, ipo: add the chosen answers' language-model loss (per token) times this "
        "(RPO; TRL's rpo_alpha). Keeps the chosen answers likely: on pairs that differ only in style, DPO alone "
        "lowers both answers and the model starts repeating itself. 0: the plain loss.")


class BehavioralSpec(Section):
    demonstration_epochs: float = Field(
        1.0, ge=0, description="technique behavioral: epochs of supervised training on the demonstrations (the "
        "conversations in data.train) before the preference phase. 0: skip it.")
    sft_on_chosen: bool = Field(
        True, description="behavioral: with no conversations in data.train, demonstrate with the chosen answers.")
    preference_epochs: float = Field(1.0, gt=0, description="behavioral: epochs over the preference pairs.")
    preference_learning_rate: float | None = Field(
        None, gt=0, description="behavioral: learning rate of the preference phase "
        "(null: training.learning_rate / 20). "
        "Preference losses want a far smaller step than supervised training: on the quickstart, a quarter of the "
        "rate for 2 epochs made the model repeat its sign-off; a twentieth kept it fluent.")


class StageSpec(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][\w.-]*$", description="Stage name (its folder: RUN/stages/N-NAME).")
    technique: Literal["task", "multitask", "preference"] = Field(
        "task", description="What the stage trains: task (conversations, plain text), multitask, or preference "
        "(chosen/rejected pairs with the preference loss).")
    data: DataSpec | None = Field(None, description="The stage's data, as the job's data section (null: the job's).")
    training: dict[str, Any] = Field(
        default_factory=dict, description="Keys of the training section that differ in this stage, e.g. "
        "{learning_rate: 1.0e-4, epochs: 1}.")


class SequentialSpec(Section):
    max_regression: float | None = Field(
        0.10, ge=0, description="After each stage, every earlier stage's validation loss is measured again; a rise of "
        "more than this share (0.10: +10 %) over its value when that stage ended is a regression. null: not checked.")
    on_regression: Literal["stop", "warn"] = Field(
        "stop", description="stop: the later stages do not run, and the run's result is the stage before the one that "
        "regressed (every stage's folder is kept); warn: say so and go on.")


class ReplaySpec(Section):
    enabled: bool | None = Field(
        None, description="Mix the base model's own answers to general prompts into training (generated once per "
        "base model, greedily, and cached). null: on for conversations in technique task, transfer, sequential "
        "task stages and behavioral's demonstrations; off for multitask and preference pairs.")
    share: float = Field(
        0.2, ge=0.0, lt=0.9, description="Share of the mixed training examples that are replayed answers "
        "(0.2: one replayed example for every four of yours), at most one per prompt.")
    prompts: list[str] = Field(
        default_factory=list, description="Text files of your own general prompts, one per line (relative to the "
        "job file); empty: Tailor's 174 general prompts (tailor/train/replay/general_prompts.txt).")
    max_new_tokens: int = Field(96, ge=8, description="Longest replayed answer, in tokens.")


class TrainingSpec(Section):
    learning_rate: PositiveFloat | Auto = Field(
        2e-4, description="Peak learning rate. LoRA: 1e-4 to 1e-3; full fine-tuning: 1e-5 to 5e-5. auto: chosen at "
        "the start of training from the size of the model actually trained (LoRA: 5e-4 below 0.5B parameters, 2e-4 "
        "to 3B, 1e-4 to 14B, 5e-5 above) and recorded with the reason in the manifest.")
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1.0,
        description="Layer-wise decay: block i of L gets learning_rate x decay^(L-1-i), embeddings "
        "decay^L, head and final norm the full rate. Below 1 the layers near the output change most.",
    )
    epochs: PositiveFloat | Auto = Field(
        3.0, description="Passes over the training data (ignored when max_steps is set). auto: from the number of "
        "training examples (4 below 300, 3 below 2,000, 2 below 20,000, else 1).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: PositiveInt | Auto = Field(
        4, description="Rows per device per micro-step (a row packs several examples). auto: 2 on a CPU, 4 on a GPU.")
    grad_accum: PositiveInt | Auto = Field(
        1, description="Micro-steps per optimizer step. Global batch = batch_size x grad_accum x devices. auto: about "
        "a tenth of the training rows per step (at most 16 rows), so an epoch has 10 steps or more.")
    max_seq_len: int = Field(
        1024, ge=16,
        description="Longest row in tokens. Longer examples are truncated (and counted in the run summary).",
    )
    packing: bool = Field(
        True,
        description="Pack whole examples into rows of max_seq_len without cross-attention between them. "
        "false: one example per row, padded to the longest in its batch (slower on varied lengths).",
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the gradient norm to this value; null: no clipping.")
    seed: int = Field(42, description="Seed for adapter initialisation, data order, splits and dropout.")
    log_every: int = Field(5, ge=1, description="Write a metrics row every N optimizer steps.")
    eval_every: int = Field(
        0, ge=0, description="Validate every N steps (0: only at the end of each epoch and of the run)."
    )
    val_generate: int = Field(
        0, ge=0, description="At each validation, also answer the first N validation conversations by greedy "
        "generation and log val_rouge_l, val_chrf, val_exact_match (and val_label_accuracy, val_macro_f1 for "
        "label answers). 0: loss and token accuracy only.")
    val_generate_tokens: int = Field(64, ge=1, description="Longest answer generated for val_generate, in tokens.")
    early_stopping_patience: int = Field(
        0, ge=0, description="Stop after this many validations in a row without improving early_stopping_metric "
        "(0: never). The best validation's checkpoint is kept, named in checkpoints/best.json, and becomes the result.")
    early_stopping_metric: Literal["val_loss", "val_token_accuracy", "val_rouge_l", "val_chrf", "val_exact_match",
                                   "val_label_accuracy", "val_macro_f1"] = Field(
        "val_loss", description="What early stopping watches: val_loss goes down, the others up. Generation "
        "metrics need val_generate.")
    early_stopping_min_delta: float = Field(
        0.0, ge=0.0, description="How much early_stopping_metric must improve to count as better.")
    save_every: int = Field(
        50, ge=0, description="Checkpoint every N steps (0: only at the end). Checkpoints make --resume possible."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    gradient_checkpointing: bool = Field(
        False, description="Keep only each decoder block's input for the backward pass and compute the rest "
        "again there: activation memory falls from every block's to one block's plus the inputs, for about a "
        "third more compute per step. For long rows or a big model on a small device; the losses are the same.")
    compile: bool = Field(
        False,
        description="torch.compile every decoder block, with an attention whose backward is hand-written and "
        "whose element-wise work is compiled: about +35% tokens/s and -20% memory on a CPU, after a one-time "
        "compile of about 40 s (pays after ~100 steps of the 135M model). Needs a C++ compiler.",
    )
    threads: int | None = Field(
        None, ge=1,
        description="CPU threads for torch (null: all cores divided by the processes on this machine).",
    )
    replay: ReplaySpec = Field(
        default_factory=ReplaySpec,
        description="Forgetting protection: the base model's own answers to general prompts, mixed into the "
        "training data so the tuned model keeps its general skills.")

    @model_validator(mode="after")
    def _generation_metric_needs_samples(self) -> "TrainingSpec":
        generated = ("val_rouge_l", "val_chrf", "val_exact_match", "val_label_accuracy", "val_macro_f1")
        if self.early_stopping_patience and self.early_stopping_metric in generated and not self.val_generate:
            raise ValueError(f"early_stopping_metric {self.early_stopping_metric} is measured on generated answers: "
                             "set training.val_generate to how many validation conversations to answer (e.g. 8)")
        return self


METRICS = ("rouge_l", "chrf", "bleu", "exact_match", "token_accuracy", "label_accuracy", "macro_f1",
           "preferred_style")


class DistributedSpec(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="How several processes (torchrun, accelerate launch) share the work. ddp: each holds the "
        "whole model and a share of each batch (fastest while the model, its gradients and optimizer fit one "
        "device). fsdp: PyTorch FSDP2, the weights, gradients and optimizer states sharded per decoder block "
        "across the processes (memory per device falls with their number). deepspeed: DeepSpeed ZeRO (stage 2 "
        "shards gradients and optimizer states; 3 also the weights; pip install \"tailor-llm[deepspeed]\"). "
        "With one process fsdp and deepspeed run unsharded, the same code path: a check before a bigger launch.")
    reshard_after_forward: bool = Field(
        True, description="fsdp: free each block's gathered weights after its forward and gather them again for "
        "the backward (ZeRO-3-like, least memory); false: keep them until the backward (ZeRO-2-like, one "
        "all-gather less per block and step).")
    cpu_offload: bool = Field(
        False, description="fsdp: keep the sharded weights, gradients and optimizer states in CPU memory; "
        "deepspeed: the optimizer states (and at stage 3 the weights). Least GPU memory, much slower.")
    zero_stage: Literal[2, 3] = Field(
        3, description="deepspeed: ZeRO stage. 2: gradients and optimizer states sharded; 3: the weights too.")
    deepspeed_config: str | None = Field(
        None, description="deepspeed: your own DeepSpeed JSON (relative to the job file) instead of the one "
        "Tailor writes from zero_stage and cpu_offload; batch sizes and precision still come from the job.")


class GateSpec(Section):
    metric: Literal[METRICS] = Field(
        "rouge_l", description="The task metric the gain is measured on (tuned minus base, 0-1). label_accuracy "
        "and macro_f1 exist only when the test answers come from a small label set; preferred_style (the share of "
        "answers closer to the chosen than to the rejected answer) only for preference pairs.")
    min_gain: float | None = Field(
        0.0, description="The tuned model must beat the base by at least this on gate.metric (0: no worse). "
        "null: not checked.")
    max_retention_drop: float | None = Field(
        0.10, ge=0.0, le=1.0, description="Largest allowed drop in the share of general questions answered "
        "(base minus tuned, 0-1). null: not checked.")
    max_perplexity_increase: float | None = Field(
        None, ge=0.0, description="Largest allowed relative rise of perplexity on general text (0.2: +20 %). "
        "null: not checked.")


class JudgeSpec(Section):
    endpoint: str = Field(..., description="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., description="The judge model's name at that endpoint.")
    criteria: dict[str, str] = Field(
        ..., description="The rubric: criterion name -> what a 5 looks like, e.g. {tone: 'warm, brief, signs off "
        "as Wick'}. Each answer gets 1-5 per criterion.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (sent as a bearer token).")
    max_examples: int = Field(20, ge=1, description="Test answers judged, base and tuned each.")


class EvalSpec(Section):
    enabled: bool = Field(True, description="Evaluate at the end of training (tailor eval RUN runs it any time).")
    data: list[str | SourceSpec] = Field(
        default_factory=list,
        description="Test data, as data.train. Empty: the test split of the prepared data (the run's data/ with "
        "data.prepare, or prepared folders in data.train).")
    max_examples: int = Field(100, ge=1, description="Test conversations scored (the first N).")
    max_new_tokens: int = Field(128, ge=1, description="Longest generated answer, in tokens.")
    batch_size: int = Field(16, ge=1, description="Conversations generated at once.")
    retention: bool = Field(True, description="Score base and tuned model on the general-skills probe "
                            "(120 questions, general text perplexity).")
    gate: GateSpec = Field(default_factory=GateSpec, description="When the evaluation fails (exit status 1).")
    judge: JudgeSpec | None = Field(
        None, description="Optional: a judge model scores base and tuned answers against a written rubric "
        "(reported as a model's judgement; the gate does not read it).")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, dict)) else value


class OutputSpec(Section):
    dir: str = Field("runs", description="Where run folders go: DIR/NAME/RUN-ID/. Relative to the working directory.")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking store for tracking: [mlflow] (null: sqlite:///DIR/mlflow.db, a file "
        "next to the runs).")


class Job(Section):
    name: str = Field("job", description="Job name; runs go to output.dir/name/.", pattern=r"^[A-Za-z0-9][\w.-]*$")
    technique: Literal["task", "transfer", "multitask", "sequential", "behavioral", "preference"] = Field(
        "task", description="Fine-tuning recipe (docs/techniques.md). task: supervised training on one task. transfer: "
        "only the top blocks train, after optional pre-training on domain text. multitask: several tasks in one "
        "model, sampled by weight. sequential: the stages, one after the other, each gated. behavioral: "
        "demonstrations, then preference pairs. preference: the preference phase alone (e.g. on a model you "
        "already tuned on demonstrations).")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The base model.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training and validation data.")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec, description="Which weights train and how.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="The training parameters.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Several processes or machines: how they share the model.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation of the tuned model against its base.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results go.")
    transfer: TransferSpec = Field(default_factory=TransferSpec, description="technique transfer.")
    multitask: MultitaskSpec = Field(default_factory=MultitaskSpec,
                                     description="technique multitask (and multitask stages).")
    preference: PreferenceSpec = Field(default_factory=PreferenceSpec,
                                       description="The preference loss (technique behavioral, preference stages).")
    behavioral: BehavioralSpec = Field(default_factory=BehavioralSpec, description="technique behavioral.")
    stages: list[StageSpec] = Field(
        default_factory=list, description="technique sequential: the stages in order; each starts from the weights "
        "(or adapter) the one before it ended with.")
    sequential: SequentialSpec = Field(default_factory=SequentialSpec,
                                       description="The gate between stages (sequential, transfer, behavioral).")
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="Also send the metrics to these experiment trackers (optional extras: "
        "pip install \"tailor-llm[tensorboard]\" or \"tailor-llm[mlflow]\").")

    @model_validator(mode="after")
    def _needs_data(self) -> "Job":
        if not self.data.train and not (self.technique == "sequential" and self.stages
                                        and all(st.data for st in self.stages)):
            raise ValueError("data.train is empty: name at least one training file (data.train: [train.jsonl])")
        return self

    @model_validator(mode="after")
    def _technique_settings(self) -> "Job":
        problems = []
        if self.technique == "sequential" and not self.stages:
            problems.append("stages: technique sequential needs at least one stage ({name, technique, data, training})")
        if self.stages and self.technique != "sequential":
            problems.append(f"stages: only technique sequential runs stages (technique is {self.technique})")
        for i, stage in enumerate(self.stages):
            try:
                TrainingSpec.model_validate(self.training.model_dump() | stage.training)
            except ValidationError as exc:
                problems += [f"stages.{i}.training.{'.'.join(map(str, e['loc']))}: " + (
                    _unknown_key_hint(str(e["loc"][-1]), list(TrainingSpec.model_fields))
                    if e["type"] == "extra_forbidden" else e["msg"]) for e in exc.errors()]
        if [st.name for st in self.stages] != list(dict.fromkeys(st.name for st in self.stages)):
            problems.append("stages: two stages have the same name; give each its own")
        if self.technique == "transfer" and self.adapter.kind == "full":
            problems.append("adapter.kind: technique transfer keeps the lower blocks as they are; use kind freeze "
                            "(with train_top_blocks) or lora (with lora_top_blocks)")
        if (self.technique == "transfer" and self.adapter.kind in ("lora", "qlora")
                and self.adapter.lora_top_blocks is None):
            problems.append("adapter.lora_top_blocks: technique transfer with LoRA puts adapters in the top blocks "
                            "only; say how many (e.g. 8)")
        if self.adapter.kind == "qlora" and self.distributed.strategy != "ddp":
            problems.append(f"distributed.strategy: {self.distributed.strategy} shards full-precision weights; a qlora "
                            "base is already 4-bit and each process holds it whole: use strategy ddp, or adapter.kind "
                            "lora to shard")
        if self.distributed.strategy != "ddp" and self.training.val_generate:
            problems.append(f"training.val_generate: answering during training needs the whole model in one process, "
                            f"and strategy {self.distributed.strategy} shards it; set it to 0 (tailor eval answers "
                            "the test set after training)")
        if self.distributed.deepspeed_config and self.distributed.strategy != "deepspeed":
            problems.append("distributed.deepspeed_config: set distributed.strategy: deepspeed to use it")
        if self.multitask.sampling == "weights" and not self.multitask.weights:
            problems.append("multitask.weights: sampling weights needs a weight per task ({support: 2, routing: 1})")
        if any(w < 0 for w in self.multitask.weights.values()) or (
                self.multitask.weights and not any(self.multitask.weights.values())):
            problems.append("multitask.weights: weights must be ≥ 0 and not all 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def stage_job(self, index: int) -> "Job":
        """Stage `index` of `stages:` as a job of its own."""
        stage = self.stages[index]
        return self.as_stage(stage.name, stage.technique, stage.data, stage.training)

    def as_stage(self, name: str, technique: str, data: DataSpec | None = None,
                 training: dict[str, Any] | None = None) -> "Job":
        """A stage of this job as a job of its own: its technique, and its data and training keys
        over the job's. Its evaluation is off: a staged run evaluates once, on the stage it keeps."""
        stage = self.model_copy(update={
            "name": f"{self.name}.{name}", "technique": technique, "stages": [], "data": data or self.data,
            "training": TrainingSpec.model_validate(self.training.model_dump() | (training or {})),
        }, deep=True)
        stage.eval.enabled = False
        return stage


# --- loading -----------------------------------------------------------------------------------


def load_job(path: str | Path, overrides: list[str] = ()) -> Job:
    """Read a job file, apply `key=value` overrides, validate everything, resolve data paths."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found; pass the path of a job YAML file (see examples/)"]) from None
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"not valid YAML: {exc}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(str(path), [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    raw = apply_overrides(raw, overrides, str(path))
    job = parse_job(raw, str(path))
    return resolve_paths(job, path.parent, str(path))


def load_data_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[DataSpec, str | None]:
    """The options of `tailor prepare`: a data.yaml (the keys of a job's `data:` section) or a whole
    job file (its `data:` section and its model). Returns the section and the job's model, if any."""
    raw: dict = {}
    source = str(path) if path else "--set"
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise SpecError(source, ["file not found; pass a data.yaml or a job file"]) from None
        except yaml.YAMLError as exc:
            raise SpecError(source, [f"not valid YAML: {exc}"]) from None
        if not isinstance(raw, dict):
            raise SpecError(source, [f"the top level must be a mapping, got {type(raw).__name__}"])
    model = None
    if "data" in raw:  # a job file
        section = raw.get("model") or {}
        model = section.get("base") if isinstance(section, dict) else None  # a bad model: section is train's to report
        raw = raw["data"] or {}
        if not isinstance(raw, dict):
            raise SpecError(source, [f"data: must be a mapping of settings (train:, privacy:, …), "
                                     f"got {type(raw).__name__}"])
    raw = apply_overrides(raw, overrides, source)
    try:
        data = DataSpec.model_validate(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("data", *e["loc"])} for e in exc.errors()]
        raise SpecError(source, [_describe(e).removeprefix("data.") for e in _union_errors(errors)]) from None
    if path is not None:
        data = resolve_paths(Job.model_construct(data=data, model=ModelSpec()), Path(path).parent, source).data
    return data, model


def parse_job(raw: dict, source: str = "<job>") -> Job:
    try:
        return Job.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(source, [_describe(err) for err in _union_errors(exc.errors())]) from None


def _union_errors(errors: list[dict]) -> list[dict]:
    """A `str | SourceSpec` entry fails once per member; keep the member the input was meant for
    (an object → SourceSpec, anything else → str) and drop the member's name from the key."""
    kept, auto_seen = [], set()
    for err in errors:
        loc = list(err["loc"])
        if loc and str(loc[-1]).startswith(("constrained-", "literal['auto']")):  # a number | "auto" setting
            if tuple(loc[:-1]) not in auto_seen:
                auto_seen.add(tuple(loc[:-1]))
                kept.append({**err, "loc": tuple(loc[:-1]), "type": "value_error",
                             "msg": f"must be a number above 0, or auto (Tailor chooses it from the model and the "
                                    f"data); got {err.get('input')!r}"})
            continue
        if "str" in loc or "SourceSpec" in loc:
            member = "str" if "str" in loc else "SourceSpec"
            at = loc.index(member)
            meant = "SourceSpec" if isinstance(_input_at(errors, loc[:at]), dict) else "str"
            if member != meant:
                continue
            err = {**err, "loc": tuple(loc[:at] + loc[at + 1:])}
        kept.append(err)
    return kept


def _input_at(errors: list[dict], prefix: list) -> Any:
    for err in errors:  # the 'str' member's error carries the entry itself as its input
        if list(err["loc"])[:len(prefix)] == prefix and list(err["loc"])[len(prefix):] == ["str"]:
            return err.get("input")
    return {}


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """`training.learning_rate=1e-4` style overrides; values are parsed as YAML scalars/lists."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, for example training.learning_rate=1e-4")
            continue
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"--set {item!r}: {part} is not a section")
                break
            node = child
        else:
            try:
                node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError as exc:
                problems.append(f"--set {item!r}: the value is not a YAML scalar or list "
                                f"({str(exc).splitlines()[0]}); put it in single quotes, for example "
                                f"{key.strip()}='\"text\"'")
    if problems:
        raise SpecError(source, problems)
    return raw


def resolve_paths(job: Job, base_dir: Path, source: str = "<job>") -> Job:
    def resolve(p: str) -> str:
        if "\0" in p:  # no file system accepts it: say so here rather than fail deep in os.stat
            raise SpecError(source, [f"{p!r}: a path cannot contain a NUL character (\\0); check the file's encoding"])
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base_dir / q).resolve())

    def resolve_source(src):
        return resolve(src) if isinstance(src, str) else src.model_copy(update={"path": resolve(src.path)})

    for data in [job.data] + [st.data for st in job.stages if st.data is not None]:
        data.train = [resolve_source(p) for p in data.train]
        data.validation = [resolve_source(p) for p in data.validation]
        if (data.privacy.spacy_model or "").startswith((".", "/", "~")):
            data.privacy.spacy_model = resolve(data.privacy.spacy_model)
        data.privacy.allow_from = [resolve(p) for p in data.privacy.allow_from]
    job.training.replay.prompts = [resolve(p) for p in job.training.replay.prompts]
    if job.distributed.deepspeed_config:
        job.distributed.deepspeed_config = resolve(job.distributed.deepspeed_config)
    job.eval.data = [resolve_source(p) for p in job.eval.data]
    job.transfer.domain_text = [resolve_source(p) for p in job.transfer.domain_text]
    if job.model.from_run:
        job.model.from_run = resolve(job.model.from_run)
    base = job.model.base
    if base.startswith((".", "/", "~")) or base.endswith(".gguf"):
        job.model.base = resolve(base)
    return job


def dump_job(job: Job) -> str:
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)


# --- error messages ----------------------------------------------------------------------------


def _describe(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: {_unknown_key_hint(loc[-1], _fields_at(loc[:-1]))}"
    if kind == "missing":
        return f"{key}: required; add it to the job file"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg if msg.startswith(key) or not loc else f"{key}: {msg}"
    field = _field_at(loc)
    doc = f" ({field.description})" if field is not None and field.description else ""
    return f"{key}: {msg}, got {err.get('input')!r}{doc}"


def _unknown_key_hint(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return "unknown key; " + (f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(valid)}")


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Job
    parts = [p for p in loc if not str(p).isdigit()]  # list entries: data.train.1.columns → data.train.columns
    for part in parts:
        field = model.model_fields.get(part)
        inner = _section_in(field.annotation) if field is not None else None
        if inner is None:
            return None
        model = inner
    return model


def _section_in(ann) -> type[BaseModel] | None:
    """The section type in an annotation: X, list[str | X], X | None."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in get_args(ann):
        found = _section_in(arg)
        if found is not None:
            return found
    return None


def _fields_at(loc: list[str]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _field_at(loc: list[str]):
    model = _model_at(loc[:-1]) if loc else None
    return model.model_fields.get(loc[-1]) if model else None


def describe_fields(model: type[BaseModel] = Job, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every field: the source of `tailor spec` and the docs."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, _type_name(ann),
                     yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n..."),
                     field.description or ""))
    return rows


def _type_name(ann) -> str:
    if get_origin(ann) is Literal:
        return "one of: " + ", ".join(map(str, get_args(ann)))
    if get_origin(ann) is Annotated:  # PositiveInt, PositiveFloat
        base, *meta = get_args(ann)
        bound = next((f" > {m.gt}" for m in meta if getattr(m, "gt", None) is not None), "")
        return _type_name(base) + bound
    if get_origin(ann) in (Union, UnionType):
        return " or ".join(_type_name(a) for a in get_args(ann))
    return str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("NoneType", "null")


def spec_markdown() -> str:
    """docs/job-spec.md's table, generated from the schema (a test keeps the file in step)."""
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for key, type_name, default, doc in describe_fields():
        cells = [f"`{key}`", type_name.replace("|", "or"), f"`{default}`", doc]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
