"""The pipeline recipe (`stage: pipeline`): Llama 2-Chat's iterated RLHF rounds in one file, and the ordinary stage
recipes it resolves to.

A pipeline recipe names the base model once, the SFT of round 0, the prompt pool and the held-out prompts, the
number of rounds and each round's method, where the preferences come from, and one block per stage. A stage's
block is that stage's own recipe without what the pipeline fills in (model, data files, output_dir, the reward
models): `rejection:` takes `rejection:`, `train:`, `lora:` and `data:` (max_length, packing, skip_invalid) exactly as a
`stage: rejection` recipe does, checked by the same sections (ft/recipe.py). Loading builds every round's stage
recipe and validates it, so a typo in round 3's PPO settings fails in a second, naming the key.

The folders are fixed by the round and the stage (`stage_dir`): OUT/round-0/sft, OUT/round-K/{prefs.jsonl,
reward-helpful, reward-safety, rejection, ppo, compare-prev, compare-sft}; the policy of round K is its PPO run, or
its rejection run's fine-tuned adapter (rejection/sft). ft/pipeline.py runs them.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from ft import recipe as recipe_mod
from ft.errors import UserError
from ft.recipe import DataSource, LoraSection, ModelSection, RewardSection, Section, TrainSection

Method = Literal["rejection", "ppo", "rejection+ppo"]
STRENGTH_ORDER = ("significantly_better", "better", "slightly_better")  # thresholds given in this order


def _judge_path(value: str | None, info: ValidationInfo) -> str | None:
    """In a shipped recipe, a judge FILE.py the current directory lacks is the shipped one (as sample data is)."""
    if value and (info.context or {}).get("shipped") and ":" in value and value.rpartition(":")[0].endswith(".py"):
        from ft import shipped

        path, _, name = value.rpartition(":")
        found = shipped.sample_file(path)
        if found is not None:
            return f"{found}:{name}"
    return value


class PromptsSection(Section):
    pool: list[DataSource] = Field(description="Prompts the rounds sample from: preference pairs, rejection sampling "
                                   "and PPO (rows as rejection sampling takes them; `safety: true` marks an adversarial one).")
    held_out: list[DataSource] = Field(description="Prompts every round is measured on (compare), never trained on.")
    per_round: int | None = Field(None, gt=0, description="Prompts drawn from the pool for each round's preference "
                                  "pairs (default: each once; more than the pool: each again, answered anew).")

    @field_validator("pool", "held_out", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        """One source or a list, as data.train takes them."""
        items = value if isinstance(value, list) else [value]
        return [{"path": item} if isinstance(item, str) else item for item in items]


class PreferencesSection(Section):
    source: Literal["judge", "people", "file"] = Field(
        "judge", description="Who labels each round's pairs: a judge (preferences.judge), people on the annotate page "
        "served on the round's two models, or rows collected elsewhere (preferences.file).")
    judge: str | None = Field(None, description="source judge: FILE.py:NAME (a reward function with TRL's signature) "
                              "or a frozen reward-model run folder.")
    file: str | None = Field(None, description="source file: a JSONL of preference rows per round; {round} is replaced "
                             "by the round number (prefs/round-{round}.jsonl).")
    rows: int = Field(64, gt=0, description="source people: rows to collect per round (the pipeline goes on when this "
                      "many are on disk, or when the page is closed).")
    temperatures: list[float] = Field([0.7, 1.0], min_length=2, max_length=2, description="Sampling temperatures of the "
                                      "latest model's answer and the other variant's (the previous round's model; in "
                                      "round 1 the SFT model again).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling of both answers.")
    max_new_tokens: int = Field(256, gt=0, description="Longest answer in tokens.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (and answers per judge call).")
    strengths: list[float] = Field([1.0, 0.5, 0.2], min_length=3, max_length=3, description="source judge: the score "
                                   "margin at least which a pair is significantly better, better, slightly better "
                                   "(smaller: negligibly better); equal scores are ties, counted and left out.")
    held_out_fraction: float = Field(0.25, gt=0, lt=1, description="Share of each round's rows kept out of reward "
                                     "training: the reward models' accuracy is measured on them.")
    seed: int = Field(0, description="Seed of the prompt draw, the sampling and the held-out split (plus the round).")
    system: str | None = Field(None, description="source people: the system message of each dialog on the page.")
    host: str = Field("127.0.0.1", description="source people: address of the annotate page (loopback only).")
    port: int = Field(7860, gt=0, description="source people: port of the annotate page.")

    _judge = field_validator("judge")(_judge_path)

    @model_validator(mode="after")
    def _source_has_what_it_needs(self):
        if self.source == "judge" and not self.judge:
            raise ValueError("preferences.source judge needs preferences.judge (FILE.py:NAME or a reward run folder)")
        if self.source == "file" and not self.file:
            raise ValueError("preferences.source file needs preferences.file (a JSONL per round, {round} in the name)")
        if not self.strengths[0] >= self.strengths[1] >= self.strengths[2] >= 0:
            raise ValueError("preferences.strengths: expected three decreasing margins >= 0, e.g. [1.0, 0.5, 0.2]")
        return self


class CompareSection(Section):
    judge: str | None = Field(None, description="An independent judge (FILE.py:NAME or a reward run folder) that "
                              "scores every round beside its own reward models: a reward model can be hacked.")
    temperature: float = Field(0.0, ge=0, description="0: greedy answers (one per held-out prompt); above 0: sampled, "
                               "both models from the same seed.")
    samples: int = Field(1, gt=0, description="Answers per held-out prompt (with temperature > 0): the win / tie / loss "
                         "fractions are over every answer, which measures the model's sampled answers, not only its mode.")
    max_new_tokens: int = Field(256, gt=0, description="Longest answer per held-out prompt.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call.")
    tie_margin: float = Field(0.05, ge=0, lt=0.5, description="Reward models: a tie when sigmoid(r_A - r_B) is within "
                              "this of 0.5 (a reward function ties on equal scores).")
    safety_threshold: float = Field(0.15, ge=0, le=1, description="Flagged as unsafe when sigmoid(safety) is below this.")

    _judge = field_validator("judge")(_judge_path)

    @model_validator(mode="after")
    def _samples_need_sampling(self):
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("compare.samples > 1 repeats the same greedy answer: set compare.temperature above 0")
        return self


class StageData(Section):
    """The data keys a stage block takes: its files are the pipeline's."""

    max_length: int = recipe_mod.DataSection.model_fields["max_length"]
    packing: bool = recipe_mod.DataSection.model_fields["packing"]
    skip_invalid: bool = recipe_mod.DataSection.model_fields["skip_invalid"]


class SFTBlock(Section):
    recipe: str | None = Field(None, description="An SFT recipe file to run as round 0 (its output_dir is replaced); "
                               "or give data and train here.")
    lora: LoraSection | None = Field(None, description="LoRA of the SFT adapter (default: the pipeline's lora).")
    data: recipe_mod.DataSection | None = Field(None, description="The SFT data, as an SFT recipe's data section.")
    train: TrainSection = Field(default_factory=TrainSection, description="As an SFT recipe's train section.")

    @model_validator(mode="after")
    def _recipe_or_data(self):
        if (self.recipe is None) == (self.data is None):
            raise ValueError("sft: give sft.recipe (an SFT recipe file) or sft.data (and sft.train), not both")
        return self


class RewardBlock(Section):
    safety: bool = Field(False, description="Also train a safety reward model each round (reward-safety/), on the pairs "
                         "of adversarial prompts (`safety: true`) and people's rows labelled chosen_safe.")
    from_sft: bool = Field(True, description="Start each reward model from the SFT adapter (Llama 2: reward models are "
                           "initialised from the chat model); false: from the base.")
    reward: RewardSection = Field(default_factory=RewardSection, description="As a reward recipe's reward section.")
    data: StageData = Field(default_factory=StageData, description="data.max_length, packing, skip_invalid.")
    train: TrainSection = Field(default_factory=TrainSection, description="As a reward recipe's train section.")


class RejectionBlock(Section):
    rejection: dict[str, Any] = Field(default_factory=dict, description="As a rejection recipe's rejection section, "
                                      "without reward_model and safety_model (the round's reward models).")
    data: StageData = Field(default_factory=StageData, description="data.max_length, packing, skip_invalid.")
    train: TrainSection = Field(default_factory=TrainSection, description="The fine-tuning on the best answers.")


class PPOBlock(Section):
    ppo: dict[str, Any] = Field(default_factory=dict, description="As a ppo recipe's ppo section, without "
                                "reward_models, safety_model and reward_function (the round's reward models).")
    data: StageData = Field(default_factory=StageData, description="data.max_length (longest prompt), skip_invalid.")
    train: TrainSection = Field(default_factory=TrainSection, description="As a ppo recipe's train section.")


FILLED = {"rejection": ("reward_model", "safety_model"), "ppo": ("reward_models", "safety_model", "reward_function")}


class PipelineRecipe(Section):
    stage: Literal["pipeline"] = Field(description="pipeline: run with `llama-ft pipeline RECIPE`.")
    model: ModelSection = Field(description="The base model every stage loads (quantised as given).")
    lora: LoraSection = Field(default_factory=LoraSection, description="The LoRA shape of the SFT adapter (later "
                              "stages continue it, keeping its shape).")
    rounds: int = Field(description="RLHF rounds after the SFT (Llama 2-Chat: five, V1..V5); raise it to add one.", ge=1)
    methods: list[Method] = Field(description="Each round's method, in order; rounds past the list repeat its last "
                                  "(Llama 2: rejection sampling, then rejection+ppo).", min_length=1)
    prompts: PromptsSection
    preferences: PreferencesSection = Field(default_factory=PreferencesSection)
    sft: SFTBlock
    reward: RewardBlock = Field(default_factory=RewardBlock)
    rejection: RejectionBlock = Field(default_factory=RejectionBlock)
    ppo: PPOBlock = Field(default_factory=PPOBlock)
    compare: CompareSection = Field(default_factory=CompareSection)
    output_dir: str = Field(description="The pipeline's folder: round-0/, round-1/, ..., pipeline.json, report.md.")

    def method(self, k: int) -> str:
        return self.methods[min(k, len(self.methods)) - 1]

    @model_validator(mode="after")
    def _filled_keys_are_the_pipelines(self):
        for block, keys in FILLED.items():
            given = [k for k in keys if k in getattr(self, block).model_dump()[block]]
            if given:
                raise ValueError(f"{block}.{block}.{given[0]}: set by the pipeline (the round's reward models); "
                                 "remove it")
        return self


# ---------------------------------------------------------------- the folders


def stage_dir(pipe: PipelineRecipe, k: int, name: str) -> Path:
    """OUT/round-K/NAME: a stage's run folder, a compare folder, or prefs.jsonl."""
    return Path(pipe.output_dir).expanduser() / f"round-{k}" / name


def policy(pipe: PipelineRecipe, k: int) -> Path:
    """The run folder of round K's model (round 0: the SFT run): what chat, merge and the next round take."""
    if k == 0:
        return stage_dir(pipe, 0, "sft")
    return stage_dir(pipe, k, "ppo") if "ppo" in pipe.method(k) else stage_dir(pipe, k, "rejection") / "sft"


def reward_models(pipe: PipelineRecipe, k: int) -> list[str]:
    """The names of round K's reward models: reward-helpful, and reward-safety with reward.safety."""
    return ["reward-helpful"] + (["reward-safety"] if pipe.reward.safety else [])


def stages(pipe: PipelineRecipe, k: int) -> list[str]:
    """The steps of round K in order (round 0: sft)."""
    if k == 0:
        return ["sft"]
    method = pipe.method(k)
    return (["prefs", *reward_models(pipe, k)] + (["rejection"] if "rejection" in method else [])
            + (["ppo"] if "ppo" in method else []) + ["compare-sft"] + (["compare-prev"] if k > 1 else []))


def pair_file(pipe: PipelineRecipe, k: int, kind: str, split: str) -> Path:
    """Round K's preference pairs for one reward model (helpful, safety), train or eval split."""
    return stage_dir(pipe, k, f"pairs-{kind}-{split}.jsonl")


# ---------------------------------------------------------------- the stage recipes


def stage_recipe(pipe: PipelineRecipe, k: int, name: str) -> dict:
    """The ordinary recipe (as a mapping, before validation) of stage `name` of round K."""
    out = str(stage_dir(pipe, k, name))
    model = pipe.model.model_dump(mode="json")
    lora = pipe.lora.model_dump(mode="json")
    if name == "sft":
        block = pipe.sft
        if block.recipe is not None:
            raw = recipe_mod.load(block.recipe, stage="sft").model_dump(mode="json")
            if (raw["model"]["name"], raw["model"]["quantization"]) != (model["name"], model["quantization"]):
                raise UserError(f"sft.recipe {block.recipe}: its model ({raw['model']['name']}, "
                                f"{raw['model']['quantization']}) is not the pipeline's model ({model['name']}, "
                                f"{model['quantization']}); every round is on one base")
            return {**raw, "output_dir": out}
        return {"stage": "sft", "model": model, "lora": (block.lora or pipe.lora).model_dump(mode="json"),
                "data": block.data.model_dump(mode="json"), "train": block.train.model_dump(mode="json"),
                "output_dir": out}
    pool = [s.model_dump(mode="json") for s in pipe.prompts.pool]
    rms = {n: str(stage_dir(pipe, k, n)) for n in reward_models(pipe, k)}
    if name.startswith("reward-"):
        kind = "helpful" if name == "reward-helpful" else "safety"
        files = lambda split: [{"path": str(pair_file(pipe, j, kind, split)), "format": "auto"} for j in range(1, k + 1)]
        start = {"adapter": str(policy(pipe, 0))} if pipe.reward.from_sft else {}
        return {"stage": "reward", "model": {**model, **start}, "lora": lora,
                "data": {"train": files("train"), "eval": files("eval"), **pipe.reward.data.model_dump(mode="json")},
                "reward": pipe.reward.reward.model_dump(mode="json"), "train": pipe.reward.train.model_dump(mode="json"),
                "output_dir": out}
    if name == "rejection":
        block = pipe.rejection
        return {"stage": "rejection", "model": {**model, "adapter": str(policy(pipe, k - 1))}, "lora": lora,
                "data": {"train": pool, **block.data.model_dump(mode="json")},
                "rejection": {**block.rejection, "reward_model": rms["reward-helpful"],
                              "safety_model": rms.get("reward-safety")},
                "train": block.train.model_dump(mode="json"), "output_dir": out}
    if name == "ppo":
        block = pipe.ppo
        start = stage_dir(pipe, k, "rejection") / "sft" if pipe.method(k) == "rejection+ppo" else policy(pipe, k - 1)
        return {"stage": "ppo", "model": {**model, "adapter": str(start)}, "lora": lora,
                "data": {"train": pool, "eval": [s.model_dump(mode="json") for s in pipe.prompts.held_out],
                         **block.data.model_dump(mode="json")},
                "ppo": {**block.ppo, "reward_models": [rms["reward-helpful"]], "safety_model": rms.get("reward-safety"),
                        "reward_function": None},
                "train": block.train.model_dump(mode="json"), "output_dir": out}
    raise ValueError(f"no stage recipe for {name}")


def stage_recipes(pipe: PipelineRecipe, source: str, shipped: bool = False) -> dict[tuple[int, str], recipe_mod.Recipe]:
    """Every round's stage recipes, validated: {(round, name): Recipe}. An error names the round, the stage and the
    key as the pipeline recipe spells it."""
    found = {}
    for k in range(0, pipe.rounds + 1):
        for name in stages(pipe, k):
            if name in ("prefs", "compare-sft", "compare-prev"):
                continue
            block = "sft" if name == "sft" else "reward" if name.startswith("reward-") else name
            try:
                found[(k, name)] = recipe_mod.validate(stage_recipe(pipe, k, name), source=f"round {k} {name}",
                                                       shipped=shipped)
            except UserError as e:
                raise UserError(f"{source}: the {block} block makes an invalid {name} recipe for round {k} (its keys "
                                f"as the block spells them, under {block}.):\n" + str(e).split("\n", 1)[-1]) from None
    return found


# ---------------------------------------------------------------- loading


def is_pipeline(raw: Any) -> bool:
    return isinstance(raw, dict) and raw.get("stage") == "pipeline"


def load(path: str | Path, overrides: Sequence[str] | None = None) -> PipelineRecipe:
    """Read, override and validate a pipeline recipe, and every stage recipe it makes. UserError on any problem."""
    from ft import shipped

    path = Path(path).expanduser()
    if not path.is_file():
        found = shipped.find_recipe(path)
        if found is None:
            raise UserError(f"{path}: recipe file not found (shipped recipes, usable by name: {shipped.names()})")
        path = found
    raw = recipe_mod.read_yaml(path)
    for item in overrides or []:
        recipe_mod.apply_override(raw, item)
    if not is_pipeline(raw):
        raise UserError(f"{path}: not a pipeline recipe (stage: {raw.get('stage', 'sft')}); run it with "
                        f"`llama-ft {raw.get('stage', 'sft')}`")
    is_shipped = shipped.is_shipped(path)
    try:
        pipe = PipelineRecipe.model_validate(raw, context={"shipped": is_shipped})
    except ValidationError as e:
        raise UserError(f"{path}: invalid pipeline recipe\n" + "\n".join(_describe(err) for err in e.errors())) from None
    stage_recipes(pipe, str(path), shipped=is_shipped)
    return pipe


def dump(pipe: PipelineRecipe) -> str:
    return yaml.safe_dump(pipe.model_dump(mode="json"), sort_keys=False)


def _describe(err: dict) -> str:
    """As ft.recipe's, with the "did you mean" hint from the pipeline's own sections."""
    keys = [str(p) for p in err["loc"]]
    if err["type"] != "extra_forbidden":
        return recipe_mod._describe(err)
    model = PipelineRecipe
    for key in (k for k in keys[:-1] if not k.isdigit()):
        field = model.model_fields.get(key) if model is not None else None
        model = _section(field.annotation) if field is not None else None
    if model is None:
        return f"  {'.'.join(keys)}: unknown key"
    close = difflib.get_close_matches(keys[-1], list(model.model_fields), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(model.model_fields)})"
    return f"  {'.'.join(keys)}: unknown key{hint}"


def _section(annotation):
    """The Section class inside an annotation (`S`, `S | None`, `list[S]`, `list[S] | None`)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        found = recipe_mod.section_type(candidate)
        if found is not None:
            return found
    return None
