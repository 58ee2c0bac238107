"""The llama-ft command line: one thin command per verb.

Nothing heavy is imported at module level, so `llama-ft --help` and `llama-ft validate` answer
at once. Exit codes: 0 success, 2 a user error (a message on stderr, no traceback), 1 a bug.
The training stages' commands are made from their declarations in ft/stages/registry.py.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ft.errors import UserError
from ft.stages.registry import STAGES, Stage

app = typer.Typer(
    help="Fine-tune Llama 2 with QLoRA on one small GPU. Recipes are YAML files; see `llama-ft recipes`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SetOption = typer.Option(None, "--set", help="Override a recipe key, parsed as YAML: --set train.max_steps=20")
OutputDirOption = typer.Option(None, "--output-dir", help="Overrides output_dir.")
ResumeOption = typer.Option(False, "--resume", help="Continue the run in output_dir from its last checkpoint.")
# the web pages (chat --web, annotate): loopback only unless asked, a password whenever others can reach them
HostOption = typer.Option("127.0.0.1", "--host", help="Address to serve the page on; other than loopback needs --auth.")
PortOption = typer.Option(7860, "--port", help="Port of the page.")
ShareOption = typer.Option(False, "--share", help="Also publish a public gradio.live link (needs --auth).")
AuthOption = typer.Option(None, "--auth", metavar="USER:PASS", help="Ask for this login (default: env LLAMA_FT_WEB_AUTH).")
NoAuthOption = typer.Option(False, "--no-auth", help="Allow --share or a public --host without a password, on purpose.")


def _quantization(value: Optional[str]) -> Optional[str]:
    """--quantization of chat, annotate and eval: the values of the recipe key model.quantization, checked once here."""
    from typing import get_args

    from ft.recipe import ModelSection

    allowed = get_args(ModelSection.model_fields["quantization"].annotation)
    if value is not None and value not in allowed:
        raise UserError(f"--quantization {value}: expected {', '.join(allowed[:-1])} or {allowed[-1]}")
    return value


QuantizationOption = typer.Option(None, "--quantization", callback=_quantization,
                                  help="4bit | 8bit | none (default: as trained).")
ForceOption = typer.Option(False, "--force", help="Train even if `llama-ft plan` says the GPU has too little free memory.")


def _stage_command(stage: Stage):
    """The command `llama-ft NAME RECIPE [--set]... [--output-dir] [--resume] [--force]` (+ --no-train for a stage that
    samples, then fine-tunes) for one declared stage."""

    def command(recipe: Path = typer.Argument(..., help=f"The recipe YAML file (stage: {stage.name})."),
                set_: Optional[List[str]] = SetOption, output_dir: Optional[Path] = OutputDirOption,
                resume: bool = ResumeOption, force: bool = ForceOption,
                no_train: bool = typer.Option(False, "--no-train", help=f"Only sample: write {stage.then_sft}, train nothing.")):
        from ft.errors import Interrupted
        from ft.runner import run_stage

        try:
            run_stage(stage.name, recipe, overrides=set_ or [], output_dir=output_dir, resume=resume, force=force,
                      train=no_train is not True, say=typer.echo)  # a stage without --no-train gets the Option
        except Interrupted as e:
            from ft import distributed

            if distributed.is_main():
                saved = f"saved {e.checkpoint}" if e.checkpoint else "no checkpoint could be saved"
                typer.echo(f"\ninterrupted: {saved}\ncontinue with: {e.again}", err=True)
            raise typer.Exit(128 + e.signum)  # 130 for Ctrl-C, 143 for SIGTERM

    signature = inspect.signature(command)
    if not stage.then_sft:  # --no-train only where there is sampling to keep
        signature = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "no_train"])
    command.__signature__ = signature
    command.__name__ = stage.name
    command.__doc__ = stage.help
    return command


def add_stage_command(stage: Stage) -> None:
    """Add `llama-ft NAME` for a declared stage (every stage of the registry is added at import; a stage registered
    later, as tests/test_stages.py's toy stage is, is added by calling this)."""
    app.command(name=stage.name)(_stage_command(stage))


for _stage in STAGES.values():
    add_stage_command(_stage)


@app.command()
def pipeline(
    recipe: Path = typer.Argument(..., help="The pipeline recipe YAML file (stage: pipeline)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the pipeline in output_dir where it stopped."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1, help="RLHF rounds (overrides rounds; raise it to add one)."),
    until: Optional[str] = typer.Option(None, "--until", metavar="ROUND/STAGE", help="Stop after this step, e.g. 1/reward or 2/rejection."),
    set_: Optional[List[str]] = SetOption,
):
    """The Llama 2-Chat recipe in one command: SFT, then RLHF rounds (preferences, reward models, rejection sampling
    and PPO), each measured against the SFT model and the round before."""
    from ft.errors import Interrupted
    from ft.pipeline import run_pipeline

    try:
        run_pipeline(recipe, overrides=set_ or [], rounds=rounds, until=until, resume=resume, log=typer.echo)
    except Interrupted as e:
        saved = f"saved {e.checkpoint}" if e.checkpoint else "no checkpoint could be saved"
        again = " ".join(["llama-ft pipeline", str(recipe), *(f"--set {s}" for s in set_ or []),
                          *([f"--rounds {rounds}"] if rounds else []), "--resume"])
        typer.echo(f"\ninterrupted: {saved}\ncontinue with: {again}", err=True)
        raise typer.Exit(128 + e.signum)


@app.command()
def score(
    run_dir: Path = typer.Argument(..., help="A reward model run folder."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The user message."),
    response: Optional[str] = typer.Option(None, "--response", help="The answer to score."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="JSONL of {prompt, response} rows."),
    output_file: Optional[Path] = typer.Option(None, "--output", help="Where to write the rows with a score (default: stdout)."),
):
    """Score answers with a trained reward model: one pair, or a JSONL file."""
    import json

    from ft import data
    from ft import runs as runs_mod
    from ft.recipe import DataSource
    from ft.reward_model import Scorer

    if (prompt is None) == (input_file is None) or (prompt is not None and response is None):
        raise UserError("give either --prompt TEXT --response TEXT, or --input FILE.jsonl")
    if prompt is not None:
        try:
            items = [data.to_score_row({"prompt": prompt, "response": response})]
        except data.RowError as e:
            raise UserError(f"--prompt/--response: {e}") from None
    else:
        items, _ = data.check_rows([DataSource(path=str(input_file))], lambda row, source: data.to_score_row(row),
                                   skip_invalid=False, hint="fix the row")
    scorer = Scorer.load(run_dir)
    scores = scorer([item["prompt"] for item in items], [item["row"]["response"] for item in items])
    if prompt is not None:
        typer.echo(f"{scores[0]:.6f}")
        return
    text = "".join(json.dumps({**item["row"], "score": s}) + "\n" for item, s in zip(items, scores))
    if output_file:
        runs_mod.write_text(Path(output_file), text)
    else:
        typer.echo(text, nl=False)


@app.command()
def merge(
    run_dir: Path = typer.Argument(..., help="A finished run folder (adapter + recipe.yaml)."),
    output: Path = typer.Option(..., "--output", help="Folder to write the merged model to."),
    into: str = typer.Option("as-trained", "--into", help="as-trained: into the de-quantised 4-bit weights the "
                             "adapter was trained on (keeps what was trained) | original: into the unquantised weights."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 | bfloat16 | float32"),
    base: Optional[str] = typer.Option(None, "--base", help="Base model to merge into (default: the run's)."),
    gguf: bool = typer.Option(False, "--gguf", help="Also write GGUF files for llama.cpp."),
    gguf_types: str = typer.Option("f16,q8_0", "--gguf-types", help="Comma-separated GGUF types: f16, q8_0."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the merged weights against base + adapter."),
):
    """Merge a run's LoRA adapter into a float copy of its base: sharded safetensors (and GGUF), verified."""
    if dtype not in ("float16", "bfloat16", "float32"):
        raise UserError(f"--dtype {dtype}: expected float16, bfloat16 or float32")
    if into not in ("as-trained", "original"):
        raise UserError(f"--into {into}: expected as-trained or original")
    types = [t.strip() for t in gguf_types.split(",") if t.strip()] if gguf else []
    from ft import export_gguf
    from ft import merge as merge_mod

    bad = [t for t in types if t not in export_gguf.TYPES]
    if bad:
        raise UserError(f"--gguf-types: unknown type {bad[0]!r} (expected {', '.join(export_gguf.TYPES)})")
    try:
        merge_mod.merge(run_dir, output, into=into, dtype=dtype, base=base, force=force, verify_logits=verify,
                        gguf_types=types)
    except merge_mod.VerificationError as e:
        typer.echo(f"error: merge verification failed: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(f"\ndone: merged model in {output}\nnext: llama-ft chat {output}")


@app.command()
def chat(
    model: str = typer.Argument(..., help="A run folder, a merged folder, or a checkpoint (folder or Hub id)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A LoRA adapter folder to apply to MODEL."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Answer this one message and exit."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, help="0 = greedy, deterministic."),
    top_p: float = typer.Option(0.9, "--top-p", min=0.0, max=1.0),
    quantization: Optional[str] = QuantizationOption,
    interactive: bool = typer.Option(False, "--interactive", help="Interactive even when stdin is not a terminal (one message per line)."),
    web: bool = typer.Option(False, "--web", help=r"Serve the chat as a web page (pip install 'llama-ft\[web]')."),
    host: str = HostOption,
    port: int = PortOption,
    share: bool = ShareOption,
    auth: Optional[str] = AuthOption,
    no_auth: bool = NoAuthOption,
):
    """Chat with a model in the Llama 2 chat format: interactive, one-shot with --prompt (or piped text), or --web."""
    if web:
        if prompt is not None or interactive:
            raise UserError("--web serves a page; --prompt and --interactive are for the terminal")
        from ft import web as web_mod

        web_mod.chat(model, adapter=str(adapter) if adapter else None, quantization=quantization, system=system,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, host=host, port=port,
                     share=share, auth=auth, no_auth=no_auth, block=True)
        return
    if prompt is None and not interactive and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise UserError("no prompt: pass --prompt TEXT, pipe text on stdin, or run in a terminal")
    from ft import chat as chat_mod

    net, tokenizer = chat_mod.load(model, adapter=str(adapter) if adapter else None, quantization=quantization)
    session = chat_mod.Session(net, tokenizer, system=system, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p)
    if prompt is not None:
        chat_mod.one_shot(session, prompt)
    else:
        chat_mod.interactive(session)


@app.command()
def compare(
    a: str = typer.Argument(..., metavar="A", help="Model A: anything `llama-ft chat` takes (run folder, merged folder, checkpoint, Hub id)."),
    b: str = typer.Argument(..., metavar="B", help="Model B, the reference A is measured against."),
    prompts: Path = typer.Option(..., "--prompts", help="JSONL/JSON/CSV/Parquet of prompts (the rows rejection sampling takes)."),
    reward_model: Optional[List[str]] = typer.Option(None, "--reward-model", help="A reward model run judging (repeatable; the first is helpfulness)."),
    safety_model: Optional[str] = typer.Option(None, "--safety-model", help="A safety reward model run, gating as in Llama 2."),
    reward_function: Optional[str] = typer.Option(None, "--reward-function", help="FILE.py:NAME with TRL's reward signature, instead of reward models."),
    tie_margin: float = typer.Option(0.05, "--tie-margin", help="A tie when sigmoid(r_A - r_B) is within this of 0.5."),
    safety_threshold: float = typer.Option(0.15, "--safety-threshold", help="An answer is flagged when sigmoid(safety score) is below this."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (default); else sampled, same seed for A and B."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts generated (and answers scored) at a time."),
    seed: int = typer.Option(0, "--seed"),
    output: Optional[Path] = typer.Option(None, "--output", help="Folder for compare.json and compare.jsonl (default: a new runs/compare/A-vs-B)."),
):
    """Head to head: A and B answer the same prompts, reward models (or a reward function) judge; win / tie / loss of A."""
    from ft import compare as compare_mod

    result = compare_mod.run(a, b, prompts, reward_models=reward_model, safety_model=safety_model,
                             reward_function=reward_function, tie_margin=tie_margin, safety_threshold=safety_threshold,
                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             seed=seed, output=output, log=lambda m: typer.echo(m, err=True))
    typer.echo(compare_mod.table(result))
    typer.echo(f"\nwritten: {result['files']['result']}, {result['files']['rows']}", err=True)


@app.command()
def annotate(
    model: str = typer.Argument(..., help="The model to collect preferences on (a run folder, merged folder or checkpoint)."),
    output: Path = typer.Option(..., "--output", help="The JSONL file the rows are appended to (never truncated)."),
    against: Optional[str] = typer.Option(None, "--against", help="A second model for the other answer."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="One temperature for both answers (0 = greedy)."),
    temperatures: Optional[str] = typer.Option(None, "--temperatures", help="T1,T2: MODEL's (first) and the other answer's."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt of each dialog."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    quantization: Optional[str] = QuantizationOption,
    host: str = HostOption,
    port: int = PortOption,
    share: bool = ShareOption,
    auth: Optional[str] = AuthOption,
    no_auth: bool = NoAuthOption,
):
    """Collect Llama 2-style preferences in a web page: two answers, A or B is better and by how much; rows for
    `llama-ft reward` and `llama-ft dpo`."""
    from ft import web as web_mod

    web_mod.annotate(model, output=output, against=against, temperature=temperature, temperatures=temperatures,
                     system=system, max_new_tokens=max_new_tokens, quantization=quantization, host=host, port=port,
                     share=share, auth=auth, no_auth=no_auth, block=True)


@app.command()
def push(
    folder: Path = typer.Argument(..., help="A finished run folder (LoRA adapter) or a merged model folder."),
    repo_id: str = typer.Option(..., "--repo-id", help="OWNER/NAME on the Hugging Face Hub."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (refused if it exists and is public)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created if missing; default main)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="The Hub commit message."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded and print the model card; send nothing."),
):
    """Publish a run or merged folder to the Hub: allow-listed files and a generated model card, in one commit."""
    from ft import hub

    result = hub.push(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                      dry_run=dry_run, log=lambda m: typer.echo(m, err=dry_run))
    if dry_run:
        typer.echo(result["card"], nl=False)
    else:
        typer.echo(f"\ndone: {result['url']}")


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    set_: Optional[List[str]] = SetOption,
    output_dir: Optional[Path] = OutputDirOption,
):
    """Check a recipe (keys, types, data files present) without loading any model; print it resolved."""
    from ft import recipe as recipe_mod
    from ft.hub_id import is_hub_id

    if _is_pipeline(recipe):
        from ft import pipeline_recipe

        pipe = pipeline_recipe.load(recipe, (set_ or []) + ([f"output_dir={output_dir}"] if output_dir else []))
        sft = [] if pipe.sft.data is None else pipe.sft.data.train + (pipe.sft.data.eval or [])
        for source in pipe.prompts.pool + pipe.prompts.held_out + sft:
            if not is_hub_id(source.path) and not Path(source.path).expanduser().exists():
                raise UserError(f"{recipe}: data file {source.path} not found (paths are relative to the current directory)")
        typer.echo(pipeline_recipe.dump(pipe), nl=False)
        typer.echo(f"# {recipe}: valid pipeline recipe ({pipe.rounds} rounds; every stage recipe it makes is valid)",
                   err=True)
        return
    loaded = recipe_mod.load(recipe, set_ or [], output_dir=output_dir)
    for source in loaded.data.train + (loaded.data.eval or []):
        if not is_hub_id(source.path) and not Path(source.path).expanduser().exists():
            raise UserError(f"{recipe}: data file {source.path} not found (paths are relative to the current directory)")
    typer.echo(recipe_mod.dump(loaded), nl=False)
    typer.echo(f"# {recipe}: valid {loaded.stage} recipe", err=True)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="The recipe YAML file (any stage)."),
    gpu: str = typer.Option("t4", "--gpu", help="A GPU name (t4, l4, a10g, v100, a100-40g, a100-80g, h100, ...) or its memory in GiB."),
    set_: Optional[List[str]] = SetOption,
    session_hours: float = typer.Option(12.0, "--session-hours", min=0.1, help="Length of one session (Colab: ~12 h)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
):
    """Will the recipe fit the GPU, and how long will it take? From the recipe and model config alone, no download.
    Exit 0 if it fits, 3 if it does not."""
    import json

    from ft import plan as plan_mod
    from ft import recipe as recipe_mod

    if _is_pipeline(recipe):
        _plan_pipeline(recipe, plan_mod.parse_gpu(gpu), set_ or [], session_hours, json_out)
    loaded = recipe_mod.load(recipe, set_ or [])
    result = plan_mod.make(loaded, plan_mod.parse_gpu(gpu), session_hours=session_hours)
    if json_out:
        typer.echo(json.dumps({"recipe": str(recipe), **result.to_json()}, indent=2))
    else:
        typer.echo(plan_mod.render(result, loaded, str(recipe)))
    raise typer.Exit(0 if result.fits else 3)


def _is_pipeline(recipe: Path) -> bool:
    """Whether the recipe file (or the shipped recipe it names) is a pipeline recipe (stage: pipeline)."""
    from ft import pipeline_recipe, shipped
    from ft import recipe as recipe_mod

    path = Path(recipe).expanduser()
    path = path if path.is_file() else shipped.find_recipe(path)
    return path is not None and pipeline_recipe.is_pipeline(recipe_mod.read_yaml(path))


def _plan_pipeline(recipe: Path, gpu, sets: list[str], session_hours: float, json_out: bool) -> None:
    """`llama-ft plan` of a pipeline: its largest stage in full, then every stage's peak and hours, and each round's."""
    import json

    from ft import pipeline, pipeline_recipe
    from ft import plan as plan_mod

    pipe = pipeline_recipe.load(recipe, sets)
    result = pipeline.plan(pipe, gpu, session_hours=session_hours)
    largest = result["largest"]
    fits = all(s["plan"].fits for s in result["stages"])
    if json_out:
        typer.echo(json.dumps({"recipe": str(recipe), "fits": fits,
                               "largest": {"round": largest["round"], "stage": largest["stage"], **largest["plan"].to_json()},
                               "stages": [{"round": s["round"], "stage": s["stage"], "fits": s["plan"].fits,
                                           "peak_bytes": s["plan"].peak_bytes, "hours": s["plan"].hours}
                                          for s in result["stages"]],
                               "round_hours": result["round_hours"]}, indent=2))
    else:
        GiB = 1024 ** 3
        typer.echo(plan_mod.render(largest["plan"], largest["recipe"], f"{recipe} (its largest stage: round "
                                                                      f"{largest['round']} {largest['stage']})"))
        typer.echo(f"\nevery stage on {gpu.key} ({gpu.memory / GiB:.1f} GiB), one at a time:")
        typer.echo(f"  {'round':<6}{'stage':<16}{'peak GiB':>9}{'hours':>8}  fits")
        for s in result["stages"]:
            p = s["plan"]
            hours = "?" if p.hours is None else f"{p.hours:.1f}"
            typer.echo(f"  {s['round']:<6}{s['stage']:<16}{p.peak_bytes / GiB:>9.1f}{hours:>8}  {'yes' if p.fits else 'NO'}")
        typer.echo("\nhours per round (training stages; sampling the preference pairs and the comparisons come on top): "
                   + ", ".join(f"round {k}: {'?' if h is None else f'{h:.1f}'}" for k, h in result["round_hours"].items()))
    raise typer.Exit(0 if fits else 3)


@app.command()
def recipes(
    copy: Optional[str] = typer.Option(None, "--copy", metavar="NAME",
                                       help="Write the shipped recipe NAME to DEST (default ./NAME.yaml) to edit."),
    dest: Optional[Path] = typer.Argument(None, help="With --copy: the file (or existing folder) to write."),
):
    """List the shipped recipes, one line each; --copy NAME [DEST] writes one to edit."""
    from ft import shipped
    from ft.recipe_copy import copy_recipe

    if copy is None:
        if dest is not None:
            raise UserError(f"{dest}: a destination goes with --copy NAME (llama-ft recipes --copy tiny {dest})")
        for path in shipped.recipes():
            first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")), "#")
            typer.echo(f"{'recipes/' + path.name:<28} {first.lstrip('# ').strip()}")
        typer.echo(f"\n(shipped in {shipped.root() / 'recipes'}: run one by name, e.g. `llama-ft sft tiny`; "
                   "copy one to edit: `llama-ft recipes --copy tiny`)", err=True)
        return
    written = copy_recipe(copy, dest)
    recipe_file = written[0][1]
    for _, path in written[1:]:
        typer.echo(f"wrote {path} (sample data the recipe names; paths in a recipe are relative to the current directory)")
    typer.echo(f"wrote {recipe_file}\nedit it, then: llama-ft validate {recipe_file}")


@app.command()
def keys(
    markdown: bool = typer.Option(False, "--markdown", help="Print the Markdown page docs/recipe-keys.md instead "
                                  "(type, default and meaning of every key, by section)."),
):
    """Every recipe key with its default and meaning."""
    from ft.recipe_keys import field_docs, keys_markdown

    if markdown:
        typer.echo(keys_markdown(), nl=False)
        return
    for key, default, doc in field_docs():
        typer.echo(f"{key:<34} {default:<14} {doc}")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="A run folder, a merged folder, or a checkpoint (folder or Hub id)."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval tasks, groups or task YAML files: mmlu,arc_easy"),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="A folder of task YAMLs (as lm_eval's flag)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="Few-shot examples (default: each task's own)."),
    limit: Optional[float] = typer.Option(None, "--limit", min=0.0, help="Examples per task: a count, or a fraction below 1."),
    batch_size: str = typer.Option("auto", "--batch-size", help="Requests per forward pass, or auto (the largest that fits)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message of the Llama 2 chat format."),
    chat_template: str = typer.Option("auto", "--chat-template", help="auto (on for a model tuned on dialogs) | on | off"),
    base: bool = typer.Option(False, "--base", help="Also evaluate the base with the adapter switched off, and the difference."),
    output: Optional[Path] = typer.Option(None, "--output", help="The JSON to write (default for a run: a new file in RUN/eval/)."),
    quantization: Optional[str] = QuantizationOption,
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A LoRA adapter folder to apply to MODEL."),
):
    """Benchmark a model with lm-evaluation-harness, in the Llama 2 chat format it was tuned on; --base compares with
    the base, and beside a Llama 2 base the paper's figures are printed."""
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        raise UserError(f"--batch-size {batch_size}: expected a positive number or auto")
    from ft import evaluation

    evaluation.evaluate(model, [t.strip() for t in tasks.split(",") if t.strip()],
                        include_path=str(include_path) if include_path else None, num_fewshot=num_fewshot,
                        limit=int(limit) if limit is not None and limit >= 1 and limit == int(limit) else limit,
                        batch_size=batch_size if batch_size == "auto" else int(batch_size), system=system,
                        chat_template=chat_template, base=base, output=str(output) if output else None,
                        quantization=quantization, adapter=str(adapter) if adapter else None, log=typer.echo)


def _quiet_third_party() -> None:
    """Library output a llama-ft user cannot act on, kept out of the way of llama-ft's own lines. Each entry
    says why; every other warning stays, and so would a deprecation raised by llama-ft's own calls."""
    import logging
    import warnings

    # peft 0.21 (PeftModel.__init__) and TRL 1.16 read the deprecated `is_gradient_checkpointing` property, and
    # transformers 5.24 warns on each read: their calls, not llama-ft's or the user's
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module=r"transformers\.modeling_utils")
    # bitsandbytes 0.49's kernels call torch._check_is_size, which torch 2.13 deprecates (0.50 no longer does)
    warnings.filterwarnings("ignore", message=r"_check_is_size will be removed", category=FutureWarning,
                            module=r"bitsandbytes\.")
    # bitsandbytes on a CPU with AVX512-BF16 looks for an optional faster 4-bit kernel (the `kernels` package, which
    # downloads it from the Hub) and logs its absence; the built-in CPU kernel is used and works
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_third_party()
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code instead of raising it here
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # with several processes, each raises it: the main process says it
            typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code if isinstance(code, int) else 1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as e:  # bad flag, missing argument: typer's (click's) usage errors
        if hasattr(e, "show"):
            e.show()
        else:
            typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Exception as e:
        import pickle

        from ft.errors import disk_error, first_line

        if isinstance(e, pickle.UnpicklingError):  # torch.load(weights_only=True) met a file that would run code
            typer.echo(f"error: refused to load a file that holds more than tensors (it could run code): "
                       f"{first_line(e)}. Was a checkpoint tampered with? Resume from another one, "
                       "or start a new run", err=True)
            sys.exit(2)
        problem = disk_error(e)
        if problem is None:
            raise
        typer.echo(f"error: disk or permission problem: {problem}. Free some space or choose a location you can "
                   "write to; nothing this command left behind is marked finished", err=True)
        sys.exit(2)
