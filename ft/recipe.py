"""The recipe: a YAML file validated by a strict schema before anything heavy is imported.

Every section forbids unknown keys (with a "did you mean" hint) and checks types, so a typo
fails in a second instead of after an hour on the GPU. `--set dotted.key=value` overrides
are parsed as YAML and applied before validation. The resolved recipe is what a run folder
stores and what later commands read back.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ft.errors import UserError
from ft.stages.registry import STAGES

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field(description="Hub id (meta-llama/Llama-2-7b-hf), a local checkpoint folder, or builtin:tiny-llama-2.")
    quantization: Literal["4bit", "8bit", "none"] = Field(
        "4bit", description="Weights of the frozen base: 4-bit NF4 with double quantisation (QLoRA), 8-bit, or unquantised."
    )
    adapter: str | None = Field(None, description="Start from the LoRA adapter of an earlier run folder (continues training it).")
    chat_format: Literal["auto", "llama2", "model"] = Field(
        "auto", description="Chat format: llama2 (Meta's [INST] format and ids), model (the checkpoint's own "
        "chat_template), or auto: llama2 for a checkpoint with no template or a Llama 2 [INST] one, else its own."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Compute dtype. auto: bfloat16 where the GPU supports it, float16 on other GPUs (T4), float32 on CPU."
    )
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel (SDPA works on a T4).")
    upcast_frozen: bool = Field(
        False, description="With a 4-bit or 8-bit base: upcast the frozen embeddings, norms and LM head to float32 as "
        "peft's prepare_model_for_kbit_training does (the residual stream then runs in float32: ~2 GiB more on a 7B "
        "T4 run). Default: they stay in the compute dtype; the logits and the loss are float32 either way."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the checkpoint. Llama 2 needs none; only for a repository you trust."
    )


class LoraSection(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="Linear layers that get adapters (default: every attention and MLP projection).",
    )


Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"]


class DataSource(Section):
    path: str = Field(description="A local .jsonl/.json/.csv/.parquet file, or a Hub dataset id.")
    format: Format = Field("auto", description="Row format; auto detects it from the columns.")
    split: str = Field("train", description="Split to read (Hub datasets and Parquet/CSV loaded through datasets).")
    data_dir: str | None = Field(None, description="Subfolder of a Hub dataset (e.g. helpful-base of Anthropic/hh-rlhf).")

    @field_validator("path")
    @classmethod
    def _shipped_sample(cls, value: str, info: ValidationInfo) -> str:
        """In a shipped recipe, a sample file the current directory lacks (datasets/tiny_chat.jsonl run outside
        a clone) is the shipped one (see ft/shipped.py)."""
        if (info.context or {}).get("shipped"):
            from ft import shipped

            found = shipped.sample_file(value)
            if found is not None:
                return str(found)
        return value


class DataSection(Section):
    train: list[DataSource] = Field(description="Training data: a path or Hub id, {path, format, split}, or a list of them.")
    eval: list[DataSource] | None = Field(None, description="Optional evaluation data, same forms as train.")
    max_length: int = Field(4096, gt=8, description="Longest sequence in tokens (Llama 2's context is 4096).")
    packing: bool = Field(True, description="Pack several examples per sequence; attention never crosses examples.")
    skip_invalid: bool = Field(False, description="Skip (and count) invalid rows instead of stopping with an error.")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        """Accept one source or a list; a bare string is a path or Hub id."""
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        return [{"path": item} if isinstance(item, str) else item for item in items]


class TrainSection(Section):
    epochs: float = Field(2.0, gt=0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimiser steps.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of peak, for cosine_with_min_lr.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2 (Llama 2: 0.95).")
    adam_epsilon: float = Field(1e-5, gt=0, description="AdamW epsilon (Llama 2: 1e-5).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"] = Field(
        "adamw_torch", description="Optimiser (the paged ones need a CUDA GPU)."
    )
    batch_size: int | Literal["auto"] = Field(
        1, description="Sequences per device per forward pass (with packing, packs; ppo: answers). auto: the largest "
        "micro-batch whose planned peak (llama-ft plan) fits this GPU with the plan's 10% margin, chosen at start-up "
        "and printed (a small fixed default on the CPU)."
    )

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value <= 0:
            raise ValueError("must be a positive number of sequences, or auto")
        return value
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimiser step.")
    gradient_checkpointing: bool = Field(True, description="Non-reentrant activation checkpointing (saves memory).")
    save_steps: int = Field(200, gt=0, description="Write checkpoint-N/ every N steps.")
    save_total_limit: int | None = Field(3, gt=0, description="Keep at most this many checkpoints.")
    logging_steps: int = Field(10, gt=0, description="Log loss every N steps (progress bar, TensorBoard).")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (default: at save_steps).")
    seed: int = Field(42, description="Seed for initialisation and data order.")
    report_to: Literal["tensorboard", "none"] = Field("tensorboard", description="Local TensorBoard logs in the run folder.")
    generate_samples: int = Field(
        0, ge=0, description="After training, answer this many training prompts greedily and report exact matches."
    )


class RewardSection(Section):
    margin: Literal["none", "small", "large", "row"] = Field(
        "none",
        description="Margin in the ranking loss: Llama 2's small (1, 2/3, 1/3, 0) or large (3, 2, 1, 0) by strength, "
        "or each row's numeric margin.",
    )


class DPOSection(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference policy.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="DPO loss (TRL's names).")
    sft_weight: float = Field(
        0.0, ge=0, description="Add this weight times the NLL of the chosen answers (RPO); keeps small models stable."
    )


class RejectionSection(Section):
    reward_model: str = Field(description="Run folder of a reward model (llama-ft reward).")
    safety_model: str | None = Field(None, description="Run folder of a safety reward model, combined as in Llama 2.")
    safety_threshold: float = Field(0.15, ge=0, le=1, description="Use the safety score when it is below this (0..1).")
    k: int = Field(4, ge=1, description="Answers sampled per prompt.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_new_tokens: int = Field(256, gt=0, description="Longest sampled answer in tokens.")
    batch_size: int = Field(8, gt=0, description="Prompts per generation batch.")


class PPOSection(Section):
    algorithm: Literal["ppo", "rloo", "grpo"] = Field(
        "ppo", description="ppo: llama-ft's PPO (policy, reference, value and reward models on one 4-bit base); "
        "rloo, grpo: TRL's trainers with the same reward."
    )
    reward_models: list[str] = Field(
        default_factory=list, description="Reward run folders (llama-ft reward); the first is the helpfulness model."
    )
    safety_model: str | None = Field(None, description="Safety reward run folder, combined with helpfulness as in Llama 2.")
    reward_function: str | None = Field(
        None, description="FILE.py:NAME, a Python reward function fn(prompts, completions, **kwargs) -> list[float] "
        "(TRL's signature) instead of reward models."
    )
    safety_threshold: float = Field(0.15, ge=0, le=1, description="Use the safety score when sigmoid(safety) is below this.")
    kl_coef: float = Field(
        0.01, ge=0, description="beta of the KL penalty to the reference (Llama 2: 0.01 for 7B/13B, 0.005 for 70B); "
        "with ppo.kl_target, the beta the adaptive controller starts from. rloo, grpo: TRL's beta."
    )
    kl_target: float | None = Field(
        None, gt=0, description="KL to the reference per answer (nats: log pi - log pi_ref summed over its tokens, "
        "mean over the iteration's answers) that an adaptive beta holds (Ziegler et al. 2019); null: beta stays "
        "ppo.kl_coef (Llama 2). ppo only: rloo and grpo refuse it (TRL's beta is fixed)."
    )
    kl_horizon: int = Field(
        1000, gt=0, description="Answers over which the adaptive beta moves: after each iteration beta *= 1 + "
        "clip(KL / kl_target - 1, -0.2, 0.2) x answers / kl_horizon (Ziegler et al. and TRL: 10000 answers with "
        "512-answer batches; 1000 gives the same ~1% step per iteration at 64 answers)."
    )
    batch_size: int = Field(64, gt=0, description="Prompts per iteration (Llama 2: 512).")
    samples_per_prompt: int | None = Field(
        None, gt=0, description="Answers per prompt in an iteration (default 1 for ppo, 4 for rloo and grpo)."
    )
    mini_batch_size: int = Field(8, gt=0, description="Answers per optimiser step (Llama 2: 64); train.batch_size per forward pass.")
    epochs: int = Field(1, gt=0, description="Passes over each iteration's answers (Llama 2: one step per mini-batch).")
    generation_batch_size: int = Field(8, gt=0, description="Prompts per generate call.")
    max_new_tokens: int = Field(256, gt=0, description="Longest answer; one without </s> by then is truncated.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use the same).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (GAE).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_range: float = Field(0.2, gt=0, description="PPO policy clip (Llama 2: 0.2).")
    value_clip_range: float = Field(0.2, gt=0, description="Clip of the value update around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    missing_eos_penalty: float = Field(
        1.0, ge=0, description="Subtracted from the (whitened) score of an answer without </s> within max_new_tokens."
    )
    whiten_rewards: bool = Field(True, description="Whiten the combined score over each iteration's answers (Llama 2).")
    eval_every: int | None = Field(
        10, gt=0, description="With data.eval (ppo only): every this many iterations (and before the first and after "
        "the last), one sampled answer per held-out prompt: mean reward, KL to the reference, entropy; the policy with "
        "the best held-out reward is the one kept. null: held-out prompts are only scored at the start and the end."
    )
    eval_patience: int | None = Field(
        3, gt=0, description="Stop when the held-out reward has not beaten its best for this many evaluations in a row "
        "(or has fallen while the KL climbed at two evaluations in a row). null: never stop early."
    )

    @model_validator(mode="after")
    def _one_reward_source(self):
        if bool(self.reward_models) == bool(self.reward_function):
            raise ValueError("ppo: give exactly one reward source: ppo.reward_models (reward run folders) or "
                             "ppo.reward_function (FILE.py:NAME); unset the other with [] / null")
        if self.safety_model and not self.reward_models:
            raise ValueError("ppo.safety_model is combined with a helpfulness model: set ppo.reward_models too")
        if self.samples_per_prompt is None:
            self.samples_per_prompt = 1 if self.algorithm == "ppo" else 4
        if self.algorithm != "ppo" and self.samples_per_prompt < 2:
            raise ValueError(f"ppo.algorithm {self.algorithm} compares answers to the same prompt: "
                             "ppo.samples_per_prompt must be at least 2")
        if (self.batch_size * self.samples_per_prompt) % self.mini_batch_size:
            raise ValueError(f"ppo.mini_batch_size {self.mini_batch_size} must divide the answers per iteration "
                             f"(batch_size x samples_per_prompt = {self.batch_size * self.samples_per_prompt})")
        return self

    def check_recipe(self, recipe: "Recipe") -> None:
        """What the ppo: section needs of the rest of the recipe (Recipe's validator calls a stage section's check)."""
        if recipe.train.batch_size != "auto" and self.mini_batch_size % recipe.train.batch_size:
            raise ValueError(f"train.batch_size {recipe.train.batch_size} (answers per forward pass) must divide "
                             f"ppo.mini_batch_size {self.mini_batch_size}")
        if recipe.train.gradient_accumulation_steps != 1:
            raise ValueError("stage ppo: leave train.gradient_accumulation_steps at 1; an optimiser step takes "
                             "ppo.mini_batch_size answers, train.batch_size per forward pass")


class GAttSection(Section):
    instructions: str | None = Field(
        None, description="A JSONL/YAML file of {instruction, short, check} rows; unset: the built-in set (hobby, "
        "language, public figure)."
    )
    combine: int = Field(2, ge=1, description="Each dialog gets 1 to this many instructions, never two that conflict.")
    max_turns: int = Field(4, ge=1, description="Training dialogs are cut to 1..max_turns user turns, at random.")
    short_probability: float = Field(0.5, ge=0, le=1, description="How often the system message is the short form.")
    plain_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of dialogs answered and trained without any instruction, so the model does "
        "not start following an instruction nobody gave (0: every dialog gets one, as in the paper)."
    )
    temperature: float = Field(0.7, gt=0, description="Sampling temperature of the answers.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling.")
    max_new_tokens: int = Field(256, gt=0, description="Longest answer per turn in tokens.")
    retries: int = Field(2, ge=0, description="Re-samples of a final answer that fails its checks before the dialog is dropped.")
    batch_size: int = Field(8, gt=0, description="Dialogs per generate call.")
    eval_turns: int = Field(6, ge=1, description="Adherence is measured at turns 1..eval_turns (20 on a real model).")
    eval_dialogs: int = Field(
        16, ge=0, description="Held-out dialogs for the evaluation, taken from the end of data.train (never trained on) "
        "when data.eval is not given; 0: no evaluation."
    )


class OutputSection(Section):
    push: bool = Field(False, description="Push the finished run to the Hub (needs repo_id and a write token).")
    repo_id: str | None = Field(None, description="OWNER/NAME of the Hub repo to push to.")
    private: bool = Field(False, description="Create the Hub repo private.")

    @model_validator(mode="after")
    def _push_needs_repo(self):
        if self.push and not self.repo_id:
            raise ValueError("output.push is true but output.repo_id is not set (OWNER/NAME)")
        if self.repo_id is not None and self.repo_id.count("/") != 1:
            raise ValueError(f"output.repo_id {self.repo_id!r}: expected OWNER/NAME")
        return self


class EvalSection(Section):
    tasks: list[str] = Field(
        min_length=1, description="lm-eval tasks (names or task YAML files) run at the end of training, with and without "
        "the adapter (as `llama-ft eval RUN --base`); the results go into metrics.json under eval."
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per question (default: each task's own).")
    limit: int | float | None = Field(
        None, gt=0, description="Examples per task: a count, or a fraction of the task below 1 (default: all of it)."
    )
    system: str | None = Field(None, description="System message of the Llama 2 chat format during the evaluation.")

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """Accept `tasks: mmlu,arc_easy` as --tasks does."""
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value


# the stages and their own sections are declared once, in ft/stages/registry.py
class Recipe(Section):
    stage: Literal[tuple(STAGES)] = Field("sft", description="Which stage this recipe is for.")
    model: ModelSection = Field(description="The base model and how it is loaded.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The LoRA adapter trained on the frozen base.")
    data: DataSection = Field(description="Training and evaluation data.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimiser, schedule, batches, checkpoints, logging.")
    reward: RewardSection | None = Field(None, description="Reward-model settings (stage: reward).")
    dpo: DPOSection | None = Field(None, description="DPO settings (stage: dpo).")
    rejection: RejectionSection | None = Field(None, description="Rejection-sampling settings (stage: rejection).")
    ppo: PPOSection | None = Field(None, description="PPO / RLOO / GRPO settings (stage: ppo).")
    gatt: GAttSection | None = Field(None, description="Ghost Attention settings (stage: gatt).")
    eval: EvalSection | None = Field(None, description="Benchmarks at the end of training (lm-eval; stages that tune a chat model).")
    output_dir: str = Field(description="The run folder (relative to the current directory).")
    output: OutputSection = Field(default_factory=OutputSection, description="Publishing the finished run to the Hub.")

    @field_validator("stage", mode="plain")
    @classmethod
    def _a_registered_stage(cls, value: Any) -> str:
        """Any stage in the registry, also one registered after this module was imported (the Literal above is the
        keys page's list)."""
        if not isinstance(value, str) or value not in STAGES:
            raise ValueError(f"expected one of {', '.join(STAGES)}")
        return value

    @model_validator(mode="after")
    def _sections_match_stage(self):
        """Read from the registry, for every stage alike: a stage's own section belongs only to its recipes; absent, it
        is its defaults, or an error naming what it needs; the section checks the recipe around it (`check_recipe`);
        eval: benchmarks only a chat model."""
        info = STAGES[self.stage]
        for other in STAGES.values():
            if other.section and other.name != self.stage and getattr(self, other.section) is not None:
                raise ValueError(f"section '{other.section}' belongs to stage {other.name}, but this recipe's stage is "
                                 f"{self.stage}")
        if self.eval is not None and not info.chat_model:
            raise ValueError(f"section 'eval' benchmarks a chat model; a {self.stage} model is not one (score answers "
                             "with `llama-ft score`)")
        section = getattr(self, info.section) if info.section else None
        if info.section and section is None:
            try:
                section = section_type(type(self).model_fields[info.section].annotation)()
            except ValidationError as e:
                needed = [".".join(map(str, err["loc"])) for err in e.errors() if err["type"] == "missing"]
                why = f"at least {info.section}.{needed[0]}" if needed else e.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"stage {self.stage} needs a '{info.section}' section ({why})") from None
            setattr(self, info.section, section)
        if hasattr(section, "check_recipe"):
            section.check_recipe(self)
        return self


# ---------------------------------------------------------------- loading


def load(path: str | Path, overrides: Sequence[str] | None = None, *, output_dir: str | Path | None = None,
         stage: str | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises UserError with file and key on any problem.

    `overrides` are `--set dotted.key=value` strings; `output_dir` replaces the recipe's output_dir (--output-dir);
    with `stage`, a recipe for another stage is refused, naming the command that runs it. A path that is no file but
    names a shipped recipe (tiny, chat.yaml, recipes/chat.yaml) loads the shipped one, and says so on stderr; a
    shipped recipe's sample data paths resolve as ft/shipped.py says.
    """
    from ft import shipped

    path = Path(path).expanduser()
    if not path.is_file():
        found = shipped.find_recipe(path)
        if found is None:
            raise UserError(f"{path}: recipe file not found (shipped recipes, usable by name: {shipped.names()})")
        import sys

        print(f"note: {path} is not a file here: using the shipped recipe {found.name} ({found}); "
              f"to edit a copy: llama-ft recipes --copy {found.stem}", file=sys.stderr, flush=True)
        path = found
    raw = read_yaml(path)
    if raw.get("stage") == "pipeline":  # a recipe of its own kind: ft/pipeline_recipe.py
        raise UserError(f"{path}: a pipeline recipe (stage: pipeline); run it with `llama-ft pipeline {path}`")
    overrides = list(overrides or []) + ([f"output_dir={output_dir}"] if output_dir is not None else [])
    for item in overrides:
        apply_override(raw, item)
    loaded = validate(raw, source=str(path), shipped=shipped.is_shipped(path))
    if stage is not None and loaded.stage != stage:
        raise UserError(f"{path}: this is a {loaded.stage} recipe; run it with `llama-ft {loaded.stage}`")
    return loaded


def read_yaml(path: Path) -> dict:
    """The mapping a recipe file holds (safe_load), or a UserError naming the file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (model:, data:, ...), got {type(raw).__name__}")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.max_steps=20")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"--set {item!r}: value is not valid YAML: {e}") from None
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def validate(raw: dict, source: str = "recipe", *, shipped: bool = False) -> Recipe:
    """The Recipe for `raw`; `shipped`: it is a shipped recipe, whose sample data paths may be the shipped files."""
    try:
        return Recipe.model_validate(raw, context={"shipped": shipped})
    except ValidationError as e:
        raise UserError(f"{source}: invalid recipe\n" + "\n".join(_describe(err) for err in e.errors())) from None


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every key, defaults included)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _describe(err: dict) -> str:
    keys = [str(p) for p in err["loc"]]
    where = ".".join(keys) or "(top level)"
    if err["type"] == "extra_forbidden":
        name = keys[-1]
        model = _section_at(keys[:-1])
        hint = ""
        if model is not None:
            close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(model.model_fields)})"
        return f"  {where}: unknown key{hint}"
    if err["type"] == "missing":
        return f"  {where}: required key is missing"
    got = err.get("input")
    got_text = f", got {got!r}" if not isinstance(got, (dict, BaseModel)) else ""
    return f"  {where}: {err['msg']}{got_text}"


def _section_at(keys: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for key in keys:
        if key.isdigit():
            continue
        field = model.model_fields.get(key)
        if field is None:
            return None
        if model is DataSection and key in ("train", "eval"):
            model = DataSource
        elif section_type(field.annotation) is not None:
            model = section_type(field.annotation)
        else:
            return None
    return model


def section_type(annotation) -> type[BaseModel] | None:
    """The Section class of a field typed `Section`, `Section | None` or `list[Section]`."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None
