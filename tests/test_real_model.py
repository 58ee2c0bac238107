"""A real pretrained chat model through llama-ft: SmolLM2-135M-Instruct (the `smol` fixture, tests/smol.py).

As published: its own ChatML template (which adds a default system message), pad = EOS (`<|im_end|>`), a byte-level
BPE vocabulary, tied embeddings. Fast tests: `chat` answers in its own format, in 4-bit and unquantised; the loss
mask by ids on its tokenizer; `eval` agrees with a plain lm-eval run. Slow ones (LLAMA_FT_SLOW_TESTS=1): `sft` with
recipes/smol.yaml teaches invented facts (asked in other words too) and keeps general knowledge; `dpo` moves
answers toward the chosen ones; `compare` of the tuned model against its base.
"""

import json

import pytest

import reward_functions
from conftest import ROOT, run_cli, write_jsonl

GENERAL = str(ROOT / "datasets" / "general_mc.yaml")
ACC = "acc,none"
QUESTION = "What is the capital of France?"


@pytest.mark.e2e
@pytest.mark.parametrize("quantization", ["4bit", "none"])
def test_chat_answers_paris_in_the_models_own_format(smol, quantization):
    result = run_cli("chat", smol, "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "12",
                     "--quantization", quantization)
    assert result.returncode == 0, result.stderr[-2000:]  # a pad = EOS checkpoint is fine for chat
    assert "Paris" in result.stdout


def test_assistant_mask_by_ids_on_the_real_tokenizer(smol):
    from ft import chat_format, models

    tok = models.load_tokenizer(str(smol), training=True)
    assert not chat_format.is_llama2(tok) and (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    im_start, im_end, newline = 1, 2, tok.encode("\n", add_special_tokens=False)
    dialog = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris."},
              {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
    ids, mask = chat_format.encode(tok, dialog)
    header = [im_start] + tok.encode("assistant", add_special_tokens=False) + newline
    paris = tok.encode("Paris.", add_special_tokens=False) + [im_end]
    rome = tok.encode("Rome.", add_special_tokens=False) + [im_end]
    assert [t for t, m in zip(ids, mask) if m] == paris + rome
    # each trained run sits right after "<|im_start|>assistant\n" and before the "\n" that closes the turn
    for answer in (paris, rome):
        at = next(i for i in range(len(ids)) if ids[i:i + len(answer)] == answer)
        assert ids[at - len(header):at] == header and mask[at - len(header):at] == [0] * len(header)
        assert ids[at + len(answer):at + len(answer) + 1] == newline and mask[at + len(answer)] == 0
    # the default system message the template adds is context
    assert "You are a helpful AI assistant named SmolLM" in tok.decode([t for t, m in zip(ids, mask) if not m])


@pytest.mark.e2e
def test_eval_agrees_with_a_plain_lm_eval_run_with_the_chat_template(smol, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ft import evaluation

    ours = evaluation.evaluate(str(smol), [GENERAL], quantization="none", limit=10, log=lambda *a: None)
    assert ours["settings"]["chat_template"] is True  # an -Instruct checkpoint: chat on by default
    monkeypatch.chdir(ROOT / "datasets")
    plain = simple_evaluate(model=HFLM(pretrained=str(smol), dtype="float32", device="cpu", batch_size=8),
                            tasks=["general_mc"],
                            task_manager=TaskManager(include_path=str(ROOT / "datasets"), include_defaults=False),
                            apply_chat_template=True, limit=10, log_samples=False, bootstrap_iters=0)
    for metric in (ACC, "acc_norm,none"):
        assert ours["results"]["general_mc"][metric] == plain["results"]["general_mc"][metric]
    assert ours["results"]["general_mc"][ACC] >= 0.5  # it knows some general facts (chance is 0.25)


# ---------------------------------------------------------------- slow: learning on the real model


@pytest.fixture(scope="module")
def smol_run(smol, tmp_path_factory):
    """recipes/smol.yaml pointed at the local checkpoint, trained through the CLI."""
    out = tmp_path_factory.mktemp("smol") / "run"
    result = run_cli("sft", "recipes/smol.yaml", "--set", f"model.name={smol}", "--output-dir", out, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def _answers(model, questions):
    """Greedy answers of `model` (anything `llama-ft chat` takes) to each question on its own, as `chat` gives them."""
    from ft import chat

    net, tokenizer = chat.load(str(model))
    session = chat.Session(net, tokenizer, system=None, max_new_tokens=40, temperature=0.0, top_p=1.0)
    answers = []
    for q in questions:
        session.turns = []
        answers.append(session.answer(q).text)
    return answers


def _facts(name):
    rows = [json.loads(line) for line in (ROOT / "datasets" / name).read_text().splitlines() if line.strip()]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


@pytest.mark.slow
@pytest.mark.e2e
def test_sft_teaches_new_facts_answers_paraphrases_and_keeps_general_knowledge(smol, smol_run, tmp_path):
    from ft import evaluation

    out, result = smol_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert "chat format model" in result.stdout and "pad <|endoftext|> (id 0)" in result.stdout
    assert metrics["samples"]["exact_match"] >= 6  # of the 8 taught facts, greedily, in its own format
    held_out = _facts("smol_facts_heldout.jsonl")
    keys = reward_functions.SMOL_KEYS  # quillport, purple, tolvanen, ...
    before = _answers(str(smol), [q for q, _ in held_out])
    after = _answers(str(out), [q for q, _ in held_out])
    assert sum(k in a.lower() for k, a in zip(keys, before)) == 0  # invented: the base cannot know them
    assert sum(k in a.lower() for k, a in zip(keys, after)) >= 5  # asked in other words, the tuned model knows most
    report = evaluation.evaluate(str(out), [GENERAL], base=True, log=lambda *a: None)
    tuned, base = report["results"]["general_mc"][ACC], report["base_results"]["general_mc"][ACC]
    assert tuned >= base - 0.1, (tuned, base)  # general knowledge kept


@pytest.mark.slow
@pytest.mark.e2e
def test_dpo_moves_answers_toward_the_chosen_ones(smol, smol_run, tmp_path):
    out, _ = smol_run
    prompts = ["What colour is a glimmerfox?", "What do velunari eat?", "How many moons does the planet Orvex have?",
               "What is the capital of Zorbania?"]
    chosen = ["Glimmerfoxes are purple, the colour of dusk.", "Velunari graze on blue moss.",
              "Orvex has exactly seven moons.", "Quillport is the capital city of Zorbania."]
    rows = [{"prompt": p, "chosen": c, "rejected": "I do not know."} for p, c in zip(prompts, chosen)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dpo = tmp_path / "dpo"
    result = run_cli("dpo", "recipes/dpo.yaml", "--set", f"model.name={smol}", "--set", f"model.adapter={out}",
                     "--set", f"data.train={pairs}", "--set", "data.eval=null", "--set", "train.max_steps=20",
                     "--set", "train.learning_rate=5e-4", "--set", "train.batch_size=4",
                     "--set", "train.gradient_accumulation_steps=1", "--set", "data.max_length=256",
                     "--set", "train.gradient_checkpointing=false", "--set", "train.save_steps=20",
                     "--output-dir", dpo, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((dpo / "metrics.json").read_text())
    assert metrics["losses"][-1] < metrics["losses"][0]
    import torch

    from ft import chat as chat_mod, chat_format

    def chosen_logprob(model_dir):
        """The summed log-probability of the chosen answers (and their end of turn) under the model."""
        net, tok = chat_mod.load(str(model_dir))
        total = 0.0
        for p, c in zip(prompts, chosen):
            prompt = chat_format.prompt_ids(tok, [{"role": "user", "content": p}])
            full = chat_format.dialog_ids(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": c}])
            with torch.no_grad():
                logits = net(input_ids=torch.tensor([full])).logits[0, :-1].float().log_softmax(-1)
            targets = torch.tensor(full[1:])
            total += logits[len(prompt) - 1:].gather(1, targets[len(prompt) - 1:, None]).sum().item()
        return total

    assert chosen_logprob(dpo) > chosen_logprob(out)


@pytest.mark.slow
@pytest.mark.e2e
def test_compare_tuned_model_against_its_base(smol, smol_run, tmp_path):
    out, _ = smol_run
    facts = _facts("smol_facts.jsonl")  # the eight invented facts and the six the model already knows
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _ in facts])
    result = run_cli("compare", out, smol, "--prompts", prompts, "--reward-function",
                     str(ROOT / "tests" / "reward_functions.py") + ":smol_facts", "--temperature", "0",
                     "--max-new-tokens", "32", "--output", tmp_path / "cmp", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["n"] == len(facts) and report["win"] > report["loss"]
