"""`llama-ft push`: publish a run folder (LoRA adapter) or a merged folder to the Hugging Face Hub.

What is uploaded is an allow-list (ALLOWED), never "the folder": weights as safetensors, configs,
tokenizer files, the resolved recipe, GGUF files and a model card generated here (README.md).
Checkpoints (optimizer, scheduler and RNG state, training_args.bin), TensorBoard logs, metrics,
samples, .env files and anything else lying in the folder stay on the machine; the command lists them.

The token comes from huggingface_hub: HF_TOKEN, else the `hf auth login` file, else Colab's secret.
It is handed to the client and to nothing else: never printed, logged, written to the folder, the
card or the commit. Every file goes up in ONE commit, so a push is all or nothing on the Hub; network
failures and Hub errors 5xx/429 are retried; the push is reported done only once the Hub lists every
file at the target revision.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from pathlib import Path

import yaml

from ft import runs
from ft.errors import UserError, first_line
from ft.hub_id import REPO_ID, hub_cache_file, is_hub_id
from ft.stages.registry import metric_keys

# (pattern, what it is): top-level files only; subfolders (checkpoint-N/, runs/) are never uploaded
ALLOWED = [
    ("adapter_config.json", "LoRA adapter config"),
    ("adapter_model.safetensors", "LoRA adapter weights"),
    ("config.json", "model config"),
    ("generation_config.json", "generation config"),
    ("model.safetensors", "model weights"),
    ("model-*-of-*.safetensors", "model weights"),
    ("model.safetensors.index.json", "weights index"),
    ("tokenizer.json", "tokenizer"),
    ("tokenizer.model", "tokenizer"),
    ("tokenizer_config.json", "tokenizer"),
    ("special_tokens_map.json", "tokenizer"),
    ("added_tokens.json", "tokenizer"),
    ("chat_template.jinja", "chat template"),
    ("recipe.yaml", "the resolved recipe"),
    ("*.gguf", "GGUF for llama.cpp"),
]
CARD = "README.md"
# seconds before the 2nd, 3rd, ... attempt; LLAMA_FT_PUSH_RETRY_DELAYS=5,30,120 for a flaky connection
RETRY_DELAYS = tuple(float(x) for x in os.environ.get("LLAMA_FT_PUSH_RETRY_DELAYS", "2,8,30").split(",") if x.strip())
LICENSE_NOTICE = (
    "Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta Platforms, Inc. All Rights "
    "Reserved. This model is derived from Llama 2 and is distributed under the same licence "
    "(https://ai.meta.com/llama/license/); its use must follow Meta's Acceptable Use Policy "
    "(https://ai.meta.com/llama/use-policy/)."
)
LLAMA2_NAMES = ("llama-2", "llama2", "builtin:tiny-llama-2")  # a base whose name says Llama 2 (the tiny model stands in)


def select(folder: Path) -> tuple[list[Path], list[str]]:
    """(files to upload, names left out) for a run or merged folder. Symlinks are never followed."""
    chosen, left = [], []
    for item in sorted(folder.iterdir()):
        if item.is_file() and not item.is_symlink() and any(fnmatch.fnmatch(item.name, p) for p, _ in ALLOWED):
            chosen.append(item)
        else:
            left.append(item.name + ("/" if item.is_dir() else " (replaced by the generated card)" if item.name == CARD else ""))
    return chosen, left


def kind_of(folder: Path) -> str:
    """'adapter' (a finished run folder) or 'merged'; anything else is refused with what to push instead."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if runs.is_run(folder):
        if not (folder / runs.METRICS_FILE).is_file():
            raise UserError(f"{folder}: this run has not finished (no {runs.METRICS_FILE}); "
                            "finish it (--resume) or push a finished run")
        return "adapter"
    if (folder / "config.json").is_file() and any(folder.glob("model*.safetensors")):
        return "merged"
    if runs.is_run(folder / "sft"):
        raise UserError(f"{folder}: a rejection-sampling or Ghost Attention run; its trained adapter is in {folder / 'sft'}: push that")
    raise UserError(f"{folder}: neither a finished llama-ft run folder (adapter + recipe.yaml + metrics.json) "
                    "nor a merged model folder (config.json + model*.safetensors)")


# ---------------------------------------------------------------- the model card


def model_card(folder: Path, repo_id: str) -> str:
    """README.md for the repo, from what the folder knows: recipe(s), metrics, merge report, GGUF files."""
    kind = kind_of(folder)
    report = runs.read_json(folder / "merge_report.json") if kind == "merged" else {}
    recipe = runs.read_recipe(folder) if (folder / runs.RECIPE_FILE).is_file() else None
    metrics = report.get("run_metrics", {}) if kind == "merged" else runs.read_json(folder / runs.METRICS_FILE)
    base = recipe.model.name if recipe else report.get("base", "unknown")
    lineage = _lineage(recipe)
    datasets = sorted({s.path for r in lineage for s in r.data.train + (r.data.eval or []) if is_hub_id(s.path)})
    stages = [r.stage for r in lineage]
    gguf = sorted(p.name for p in folder.glob("*.gguf"))
    reward = bool(recipe and not runs.is_chat_model(recipe))

    license, notice = base_license(base)
    front = {
        "license": license,
        **({"base_model": base} if is_hub_id(base) else {}),
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "text-classification" if reward else "text-generation",
        "tags": [*(["llama-2"] if license == "llama2" else []), "peft", "trl", "llama-ft", *dict.fromkeys(stages),
                 *(["gguf"] if gguf else [])],
        **({"datasets": datasets} if datasets else {}),
    }
    what = "LoRA adapter" if kind == "adapter" else "merged model (LoRA adapter folded into the full-precision weights)"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {repo_id.split('/')[1]}", "",
             f"A {'reward model ' if reward else ''}{what} fine-tuned from `{base}` with "
             f"[llama-ft](https://github.com/llama-ft/llama-ft) (QLoRA: transformers, PEFT, bitsandbytes, TRL).", ""]

    lines += ["## Training", "", "| # | stage | data | steps | result |", "|---|---|---|---|---|"]
    for i, r in enumerate(lineage, 1):
        data = ", ".join(f"`{s.path}`" for s in r.data.train)
        m = metrics if r is recipe else {}
        lines.append(f"| {i} | {r.stage} | {data} | {m.get('global_step', r.train.max_steps or '')} | {_result(r.stage, m)} |")
    if recipe:
        lora = runs.trained_lora(recipe, missing_ok=True)
        lines += ["", f"LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout} on "
                  f"{', '.join(lora.target_modules)}; base weights {recipe.model.quantization} during training; "
                  f"learning rate {recipe.train.learning_rate:g} ({recipe.train.lr_scheduler}), "
                  f"{recipe.train.batch_size}×{recipe.train.gradient_accumulation_steps} sequences per step, "
                  f"max length {recipe.data.max_length}."]
    if metrics:
        shown = {k: metrics[k] for k in metric_keys(recipe and recipe.stage) if metrics.get(k) is not None}
        lines += ["", "Final metrics:", "", "```json", json.dumps(shown, indent=2), "```"]

    if kind == "merged":
        lines += ["", "## Merge verification", ""] + _verification(report)

    own_template = _own_template(folder)
    lines += ["", "## Usage", ""] + _usage(repo_id, kind, reward, gguf, llama2=own_template is None)
    if own_template is None:
        lines += ["", "## Prompt format", "", "The Llama 2-Chat format (the tokenizer's chat template produces it):", "",
                  "```", "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]",
                  "```"]
    else:
        lines += ["", "## Prompt format", "", "The base model's own chat template, as trained (the tokenizer's chat "
                  "template produces it); a dialog renders as:", "", "```", own_template, "```"]
    if recipe:
        lines += ["", "## Recipe", "", "The resolved recipe (also in `recipe.yaml`); run it with `llama-ft "
                  f"{recipe.stage} recipe.yaml`:", "", "```yaml", yaml.safe_dump(recipe.model_dump(mode="json"),
                                                                               sort_keys=False).strip(), "```"]
    lines += ["", "## Licence", "", notice, ""]
    return "\n".join(lines)


def base_license(base: str) -> tuple[str, str]:
    """(the card's `license:`, the Licence section) for a model derived from `base`: the licence its own model card
    declares (README.md in the base's folder, or in the local Hub cache), else Llama 2's for a base named Llama 2,
    else `other`, with a sentence sending the reader to the base's card. Never a licence the base did not state."""
    card = hub_cache_file(base, CARD) if is_hub_id(base) else Path(base) / CARD
    declared = _card_metadata(card).get("license") if card is not None and card.is_file() else None
    declared = declared[0] if isinstance(declared, list) and declared else declared
    if declared == "llama2" or (declared is None and any(n in base.lower() for n in LLAMA2_NAMES)):
        return "llama2", LICENSE_NOTICE
    if isinstance(declared, str) and declared:
        return declared, (f"Derived from `{base}`, whose model card declares the licence `{declared}`; this model is "
                          "distributed under the same licence, and its use follows that licence's terms.")
    return "other", (f"Derived from `{base}`: its licence is the base model's, stated on that model's card (llama-ft "
                     "found no licence for it on this machine). Replace `license: other` above with it before sharing.")


def _card_metadata(card: Path) -> dict:
    """The YAML metadata block of a model card (huggingface_hub's reader); {} if it has none or it does not parse."""
    from huggingface_hub import metadata_load

    try:
        return metadata_load(card) or {}
    except (ValueError, yaml.YAMLError):
        return {}


def _result(stage: str, m: dict) -> str:
    """One cell of the training table: pairwise accuracy for a reward model, else the loss curve's ends."""
    if m.get("reward_first") is not None:  # ppo / rloo / grpo
        beta = m.get("kl_coef_final")
        beta = "" if beta is None else (f", β {beta:.4g}" + (f" (adapted to hold {m['kl_target']:g} nats)"
                                                            if m.get("kl_target") is not None else " (fixed)"))
        return (f"{m.get('algorithm', 'ppo')}: reward {m['reward_first']:.3f} → {m['reward_last']:.3f}, "
                f"KL {m.get('kl_last') or 0:.3f}{beta}")
    if isinstance(m.get("accuracy"), dict):
        return f"pairwise accuracy {m['accuracy']['overall']:.1%} ({m.get('accuracy_split', '')})"
    losses = m.get("losses") or [x for x in (m.get("loss_first"), m.get("loss_last")) if x is not None]
    return f"loss {losses[0]:.3f} → {losses[-1]:.3f}" if losses else ""


def _verification(report: dict) -> list[str]:
    v = report.get("verification", {})
    weights = {"as-trained": "the de-quantised 4-bit weights it was trained on", "original": "the unquantised weights"}
    into = weights.get(report.get("into", "original"), report.get("into"))
    out = [f"Merged into {into} of `{report.get('base')}`, stored in {report.get('dtype')}, LoRA scale "
           f"{report.get('lora', {}).get('scale')}."]
    if "skipped" in v:
        return out + [f"Verification skipped ({v['skipped']})."]
    t, lg = v.get("tensors", {}), v.get("logits", {})
    if t:
        out.append(f"- every merged weight against PEFT's LoRA forward pass: max relative error {t.get('max_rel_error', 0):.1e} "
                   f"(tolerance {t.get('tolerance', 0):.0e}) over {t.get('modules')} weights")
    if "mean_kl" in lg:
        out.append(f"- logits against {lg.get('reference', 'base + adapter')} on {lg.get('probes')} chat prompts: "
                   f"mean KL {lg['mean_kl']:.1e}, max |Δlogit| {lg.get('max_abs_diff', 0):.1e}")
        q = lg.get("vs_quantized")
        for variant in ("as-trained", "original"):
            if q and variant in q:
                written = " (this model)" if q.get("merged") == variant else ""
                out.append(f"- distance of the {variant} merge{written} to the {q['quantization']} model the adapter was "
                           f"trained on: mean KL {q[variant]['mean_kl']:.1e}, greedy next-token agreement "
                           f"{q[variant]['next_token_agreement']:.0%}")
    elif "skipped" in lg:
        out.append(f"- logit check skipped: {lg['skipped']}")
    out.append(f"- passed: {'yes' if v.get('passed') else 'no'}")
    return out


def _own_template(folder: Path) -> str | None:
    """A sample dialog in the folder's chat template, or None for the Llama 2 format (or no tokenizer)."""
    if not (folder / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    from ft import chat_format

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not isinstance(tokenizer.chat_template, str) or chat_format.is_llama2_template(tokenizer.chat_template):
        return None
    sample = [{"role": "system", "content": "{system}"}, {"role": "user", "content": "{user}"},
              {"role": "assistant", "content": "{answer}"}, {"role": "user", "content": "{user}"}]
    return tokenizer.apply_chat_template(sample, tokenize=False, add_generation_prompt=True)


def _usage(repo_id: str, kind: str, reward: bool, gguf: list[str], *, llama2: bool = True) -> list[str]:
    if reward:
        return ["```python", "from peft import AutoPeftModelForSequenceClassification", "from transformers import AutoTokenizer",
                "", f'model = AutoPeftModelForSequenceClassification.from_pretrained("{repo_id}", num_labels=1)',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
                f"or score answers with llama-ft: download the repo (`hf download {repo_id} --local-dir reward`), then "
                "`llama-ft score reward --prompt TEXT --response TEXT`."]
    load = ("from peft import AutoPeftModelForCausalLM\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}", device_map="auto")'
            if kind == "adapter" else
            "from transformers import AutoModelForCausalLM\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", device_map="auto")')
    lines = ["```python", "from transformers import AutoTokenizer", load,
             f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "",
             'messages = [{"role": "user", "content": "Hello!"}]',
             'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
             'out = model.generate(**ids.to(model.device), max_new_tokens=256)',
             'print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))', "```", "",
             f"With llama-ft: `hf download {repo_id} --local-dir model` then `llama-ft chat model`."]
    if gguf:
        run = f"-p \"[INST] Hello! [/INST]\"" if llama2 else "-cnv (its chat template is in the file)"
        lines += ["", f"With llama.cpp: `llama-cli -m {gguf[0]} {run}` (files: {', '.join(gguf)})."]
    return lines


def _lineage(recipe) -> list:
    """The recipes of the runs this one continues (model.adapter chain, oldest first), then this one."""
    chain, seen = [], set()
    while recipe is not None:
        chain.insert(0, recipe)
        parent = recipe.model.adapter
        if not parent or parent in seen or not (Path(parent).expanduser() / runs.RECIPE_FILE).is_file():
            break
        seen.add(parent)
        recipe = runs.read_recipe(Path(parent).expanduser())
    return chain


# ---------------------------------------------------------------- talking to the Hub


def token() -> tuple[str, str]:
    """(token, where it came from); the token itself is never shown."""
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise UserError("no Hugging Face token: set HF_TOKEN to a token with write access "
                        "(https://huggingface.co/settings/tokens), or run `hf auth login`")
    return found, "HF_TOKEN" if os.environ.get("HF_TOKEN") else "the saved login (hf auth login)"


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.match(repo_id):
        raise UserError(f"--repo-id {repo_id!r}: expected OWNER/NAME, e.g. alice/llama-2-7b-chat-lora")


def check_access(repo_id: str) -> tuple[object, str]:
    """An HfApi for the token, after checking the token is valid and may write under repo_id's owner."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    secret, source = token()
    api = HfApi(token=secret)
    me = _call(lambda: api.whoami(), f"checking the token from {source}", repo_id)
    user, orgs = me.get("name"), [o.get("name") for o in me.get("orgs", [])]
    role = (me.get("auth", {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise UserError(f"the token from {source} is read-only; create one with write access "
                        "(https://huggingface.co/settings/tokens)")
    owner = repo_id.split("/")[0]
    if owner != user and owner not in orgs:
        raise UserError(f"{repo_id} belongs to '{owner}', and the token from {source} is {user}'s "
                        f"(organisations: {', '.join(orgs) or 'none'}); push to {user}/{repo_id.split('/')[1]} instead")
    return api, user


def push(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False, log=print, delays=RETRY_DELAYS) -> dict:
    """Upload the allowed files of `folder` and a generated card to repo_id in one commit."""
    from huggingface_hub import CommitOperationAdd

    check_repo_id(repo_id)  # before the card, which is named after it
    folder = Path(folder)
    kind = kind_of(folder)
    files, left_out = select(folder)
    card = model_card(folder, repo_id)
    api, user = (None, None) if dry_run else check_access(repo_id)  # refusals before anything is listed as uploading
    log(f"{'would upload' if dry_run else 'uploading'} to {repo_id}"
        f"{f' (branch {revision})' if revision else ''}: {CARD} (generated), " + ", ".join(p.name for p in files))
    if left_out:
        log(f"not uploaded (not on the allow-list): {', '.join(left_out)}")
    base = runs.read_json(folder / runs.ADAPTER_CONFIG).get("base_model_name_or_path") or ""
    if kind == "adapter" and not is_hub_id(base):
        log(f"note: adapter_config.json names the base model by a local path ({base}); others need that base "
            "themselves (or push a merged folder instead)")
    if dry_run:
        return {"files": [CARD] + [p.name for p in files], "left_out": left_out, "card": card}

    _call(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"), "creating the repo",
          repo_id, delays)
    if private and not _call(lambda: api.repo_info(repo_id).private, "reading the repo", repo_id, delays):
        raise UserError(f"{repo_id} already exists and is public; --private would not hide it. Make it private on "
                        "the Hub first, or push to a new repo")
    if revision and revision != "main":
        _call(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), f"creating branch {revision}",
              repo_id, delays)
    operations = [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode("utf-8"))]
    operations += [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    message = commit_message or f"llama-ft push: {kind} ({len(operations)} files)"
    commit = _call(lambda: api.create_commit(repo_id, operations, commit_message=message, revision=revision),
                   "uploading", repo_id, delays)
    try:
        listed = set(_call(lambda: api.list_repo_files(repo_id, revision=revision), "checking the upload", repo_id, delays))
    except UserError as e:
        raise UserError(f"commit {commit.oid[:12]} was made ({commit.commit_url}), but reading it back failed: {e}. "
                        "Check the repo on the Hub, or run the same command again") from None
    missing = sorted({op.path_in_repo for op in operations} - listed)
    if missing:
        raise UserError(f"the Hub does not list {', '.join(missing)} after the push; run the command again")
    log(f"pushed {len(operations)} files to {repo_id} as {user}, commit {commit.oid[:12]}")
    return {"files": [op.path_in_repo for op in operations], "left_out": left_out, "commit": commit.oid,
            "url": commit.commit_url}


class Unreachable(UserError):
    """The Hub could not be reached (or kept failing) after the retries."""


def _call(fn, doing: str, repo_id: str, delays=RETRY_DELAYS):
    """fn() with retries on network failures and Hub 5xx/429; Hub refusals become UserErrors that say why."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status is not None and status < 500 and status != 429:
                raise UserError(_refusal(status, doing, repo_id, e)) from None
            problem = f"the Hub answered {status}"
        except (httpx2.TransportError, OSError) as e:  # refused, dropped, timed out
            problem = f"{type(e).__name__}: {first_line(e, 200, empty='no answer')}"
        if attempt == len(delays):
            raise Unreachable(f"{doing} failed {attempt + 1} times ({problem}); nothing was published for this push "
                            "(a Hub commit is all or nothing): run the same command again")
        print(f"{doing}: {problem}; retrying in {delays[attempt]:g}s", flush=True)
        time.sleep(delays[attempt])


def _refusal(status: int, doing: str, repo_id: str, error) -> str:
    detail = (getattr(error, "server_message", None) or first_line(error))[:300]
    if status == 401:
        return f"{doing}: the Hub rejected the token (invalid or expired): {detail}"
    if status == 403:
        return (f"{doing}: permission denied for {repo_id}: the token cannot write there (a read-only or fine-grained "
                f"token without write access to this repo?): {detail}")
    if status == 404:
        return f"{doing}: {repo_id} not found on the Hub, or the token cannot see it: {detail}"
    return f"{doing}: the Hub refused ({status}): {detail}"
