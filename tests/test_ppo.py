"""PPO as in Llama 2-Chat on one 4-bit base (policy, reference, value and reward adapters), and RLOO/GRPO through TRL."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import cli, ROOT, TINY, run_cli
from ft import models, reward_model, rl
from ft.stages import ppo as ppo_stage

FUNCTIONS = ROOT / "tests" / "reward_functions.py"
SLOW = pytest.mark.slow  # ~1 min each: LLAMA_FT_SLOW_TESTS=1 runs them (tests/conftest.py)


def ppo_flags(adapter, *extra):
    """recipes/ppo.yaml on the tiny model, from an SFT run, small: 16 prompts x 1 answer per iteration."""
    sets = [f"model.adapter={adapter}", "data.train=datasets/tiny_prompts.jsonl", "data.eval=null",
            "data.max_length=128", "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.generation_batch_size=16",
            "ppo.max_new_tokens=16", "train.batch_size=8", "train.learning_rate=3e-4", "train.logging_steps=5", *extra]
    return [*TINY, *(x for s in sets for x in ("--set", s))]


# ---------------------------------------------------------------- the maths, by hand


def test_gae_matches_the_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    for padded_value in (0.0, 9.0):  # whatever sits in the padded slot is ignored
        values = torch.tensor([[0.5, 0.6, 0.7, padded_value]])
        advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
        assert torch.allclose(advantages, torch.tensor([[0.46575, 0.385, 0.3, 0.0]]))
        assert torch.allclose(returns, torch.tensor([[0.96575, 0.985, 1.0, 0.0]]))


def test_clipped_policy_and_value_losses_match_hand_values():
    # ratios 1.5 (A=+1), 0.5 (A=-1), 1.1 (A=+1) with clip 0.2: -1.2 and 0.8 take the clipped term, -1.1 does not
    logp_old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    losses, ratio, clipped = rl.policy_loss(logp, logp_old, torch.tensor([[1.0, -1.0, 1.0]]), clip=0.2)
    assert torch.allclose(losses, torch.tensor([[-1.2, 0.8, -1.1]]))
    assert clipped.tolist() == [[True, True, False]] and torch.allclose(ratio, torch.tensor([[1.5, 0.5, 1.1]]))
    # V=0.5 from V_old=0 towards R=1: clipped to 0.2, whose error (0.64) is the larger; V=0.1, R=0: 0.01 either way
    v = rl.value_loss(torch.tensor([[0.5, 0.1]]), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), clip=0.2)
    assert torch.allclose(v, torch.tensor([[0.32, 0.005]]))


def test_kl_estimators_are_zero_on_identical_inputs_and_positive_otherwise():
    logp = torch.log_softmax(torch.randn(3, 5), -1)
    mask = torch.ones(3, 5)
    assert rl.kl_estimates(logp, logp, mask) == {"k1": 0.0, "k2": 0.0, "k3": 0.0}
    other = rl.kl_estimates(logp, logp + 0.3 * torch.randn(3, 5), mask)
    assert other["k2"] > 0 and other["k3"] > 0


def test_the_kl_penalty_is_on_every_answer_token_and_the_score_on_the_last():
    logp, logp_ref = torch.tensor([[0.5, 0.3, 0.2, 9.0]]), torch.tensor([[0.0, 0.1, 0.4, 0.0]])
    mask = torch.tensor([[True, True, True, False]])  # three answer tokens, then padding
    rewards = rl.per_token_rewards(torch.tensor([2.0]), logp, logp_ref, mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.02, 0.02 + 2.0, 0.0]]))
    assert torch.allclose(rl.per_token_rewards(torch.tensor([2.0]), logp, logp_ref, mask, kl_coef=0.0),
                          torch.tensor([[0.0, 0.0, 2.0, 0.0]]))


def test_the_adaptive_kl_controller_matches_the_hand_computed_update():
    # beta 0.1, target 2 nats, 64 answers, horizon 1000: the proportional error is clipped to +-0.2
    update = lambda kl: rl.adaptive_kl_coef(0.1, kl, target=2.0, answers=64, horizon=1000)
    assert update(2.0) == 0.1  # on target: unchanged
    assert math.isclose(update(2.2), 0.1 * (1 + 0.1 * 0.064))  # 10% over: +0.64%
    assert math.isclose(update(3.0), 0.1 * (1 + 0.2 * 0.064)) and update(30.0) == update(3.0)  # clipped at +0.2
    assert math.isclose(update(0.0), 0.1 * (1 - 0.2 * 0.064)) and update(-1.0) == update(0.0)  # clipped at -0.2
    beta = 0.01  # held above target for 5 x horizon answers, beta grows by about e (exactly (1 + 0.2/64)^(5*64))
    for _ in range(5 * 64):
        beta = rl.adaptive_kl_coef(beta, 10.0, target=1.0, answers=1, horizon=64)
    assert math.isclose(beta, 0.01 * (1 + 0.2 / 64) ** 320) and 2.6 < beta / 0.01 < 2.75


def test_the_rl_maths_imports_only_torch_and_reward_training_not_the_sampler():
    code = ("import sys, ft.rl; assert not {'transformers', 'ft.models', 'ft.recipe'} & set(sys.modules), 'rl'; "
            "import ft.stages.reward, ft.reward_model; assert 'ft.sampling' not in sys.modules, 'reward'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_llama2_reward_gate_and_whitening():
    helpful, safety = [5.0, 5.0, 5.0, 2.0], [3.0, -3.0, 3.0, -1.5]  # sigmoid(-3)=0.047, sigmoid(-1.5)=0.18
    assert reward_model.combine(helpful, safety, [False, False, True, False], 0.15) == [5.0, -3.0, 3.0, 2.0]
    assert reward_model.combine(helpful, None, [True] * 4, 0.15) == helpful
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    white = rl.whiten(x, torch.tensor([[1, 1, 1, 0]]))
    assert white[0, 3] == 0 and abs(white[0, :3].mean().item()) < 1e-6 and abs(white[0, :3].std().item() - 1) < 1e-4


# ---------------------------------------------------------------- one base, several adapters (in process)


@pytest.fixture(scope="module")
def shared(trained_run, reward_run):
    """PPO set up in this process on the tiny model: SFT policy, reference, value from the reward model, reward model."""
    from ft import recipe as recipe_mod

    sft, _ = trained_run
    flags = ppo_flags(sft, f"ppo.reward_models=[{reward_run}]", "ppo.safety_model=null", "ppo.reward_function=null",
                      "ppo.max_new_tokens=7", "ppo.batch_size=8", "ppo.mini_batch_size=8", "ppo.temperature=1.5")
    recipe = recipe_mod.load(ROOT / "recipes" / "ppo.yaml", [flags[i + 1] for i in range(0, len(flags), 2)]
                             + ["output_dir=/nonexistent"])
    ppo, prompts, _, _ = ppo_stage.setup(recipe, log=lambda *a: None)
    return ppo, prompts


def snapshot(model, adapter):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def test_runaway_kl_and_collapsed_answers_are_each_warned_once_with_the_numbers_and_keys(shared, tmp_path):
    ppo, _ = shared
    cfg = ppo.cfg.model_copy(update={"kl_target": 1.5})
    calm = {"kl": 2.0, "kl_coef": 0.02, "reward": 0.5, "same_answer_share": 2 / 8}
    assert ppo_stage.runaway_warnings(calm, cfg, ppo.recipe.train, 3, 0.021, "Paris.") == []
    [(kind, message)] = ppo_stage.runaway_warnings({**calm, "kl": 5.0}, cfg, ppo.recipe.train, 4, 0.021, "Paris.")
    assert kind == "kl" and "5.00 nats" in message and "3.3x ppo.kl_target 1.5" in message and "0.021" in message
    assert all(key in message for key in ("train.learning_rate", "ppo.kl_coef", "ppo.kl_horizon"))
    fixed = ppo.cfg.model_copy(update={"kl_target": None, "kl_coef": 0.01})
    assert ppo_stage.runaway_warnings({**calm, "kl": 9.0}, fixed, ppo.recipe.train, 4, 0.01, "x") == []
    [(kind, message)] = ppo_stage.runaway_warnings({**calm, "kl": 12.0}, fixed, ppo.recipe.train, 4, 0.01, "x")
    assert kind == "kl" and "12.00 nats" in message and "fixed beta ppo.kl_coef 0.01" in message
    assert all(key in message for key in ("ppo.kl_target", "ppo.kl_coef", "train.learning_rate"))
    [(kind, message)] = ppo_stage.runaway_warnings({**calm, "same_answer_share": 5 / 8}, cfg, ppo.recipe.train, 6, 0.02, "PARIS ROME")
    assert kind == "collapse" and "5 of 8 prompts got the same answer, 'PARIS ROME'" in message
    assert all(key in message for key in ("ppo.kl_target (1.5)", "ppo.kl_coef", "train.learning_rate"))

    # through the loop's after-iteration hook: said once per run (kept in the checkpointed state), both kinds
    lines, state = [], {"iteration": 0, "history": [], "skipped_steps": 0, "kl_coef": 0.01, "warnings": []}
    after = ppo_stage.AfterIteration(ppo, ppo.recipe, tmp_path, state, 100, None,
                                     type("Stopper", (), {"signum": None})(), lines.append)
    stats = dict(calm, kl=12.0, same_answer_share=6 / 8)
    for _ in range(3):
        state["iteration"] += 1
        after(stats)
    after.bar.close()
    warned = [line for line in lines if line.startswith("warning: ")]
    assert len(warned) == 2 and "the KL to the reference is 12.00 nats" in warned[0] and "6 of 8 prompts" in warned[1]
    assert [(w["kind"], w["iteration"]) for w in state["warnings"]] == [("kl", 1), ("collapse", 1)]


def test_adapters_switch_without_unfreezing_the_frozen_ones(shared):
    ppo, _ = shared
    model = ppo.model
    assert set(model.peft_config) == {"default", "reference", "value", "rm_helpfulness"}
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"default", "value"}
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with models.use_adapter(model, "reference"):
        assert model.active_adapter == "reference"
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.active_adapter == "default"
    model.set_adapter("reference")  # what a plain peft switch does: the reference becomes trainable, the policy frozen
    flipped = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(g for n, g in flipped.items() if ".reference." in n) and not any(g for n, g in flipped.items() if ".default." in n)
    with models.use_adapter(model, "default"):  # put things back as they were
        pass
    model.set_adapter("default")
    for n, p in model.named_parameters():
        p.requires_grad = before[n]


def test_rewards_on_the_shared_base_equal_llama_ft_score(shared, reward_run):
    ppo, prompts = shared
    questions = [p["prompt"] for p in prompts[:6]]
    answers = ["The capital of France is Paris.", "Maybe.", "I do not know.", "A cat says meow.", "", "Paris"]
    on_base, parts = ppo.rewards(questions, answers)
    standalone = reward_model.Scorer.load(reward_run)(questions, answers)
    assert parts["helpfulness"] == on_base
    assert max(abs(a - b) for a, b in zip(on_base, standalone)) < 1e-4, (on_base, standalone)


def test_score_sits_on_the_last_answer_token_and_a_missing_eos_costs_the_penalty(shared):
    ppo, prompts = shared
    torch.manual_seed(0)
    batch = ppo.collect(prompts[8:16])  # max_new_tokens 7: the capitals are cut off, the animal sounds end with </s>
    ended = torch.tensor(batch.ended)
    assert ended.any() and not ended.all(), batch.ended
    eos = ppo.tokenizer.eos_token_id
    lengths = batch.mask.sum(-1)
    answers = batch.input_ids[:, batch.prompt_width:]
    for i in range(batch.n):
        last = answers[i, lengths[i] - 1].item()
        assert (last == eos) == bool(ended[i])  # an ended answer's last token is its </s>
    expected = rl.whiten(torch.tensor(batch.raw)) - ppo.cfg.missing_eos_penalty * (~ended).float()
    assert torch.allclose(batch.score, expected)
    ppo.score(batch, torch.arange(batch.n))
    assert batch.logp_old.eq(batch.logp_ref).all()  # policy == reference before any update: KL exactly 0
    placed = torch.zeros_like(batch.token_rewards)
    placed[torch.arange(batch.n), lengths - 1] = batch.score
    assert torch.equal(batch.token_rewards, placed)  # all of the score on the last token, nothing elsewhere


def test_iteration_0_has_ratio_1_and_only_policy_and_value_change(shared):
    ppo, prompts = shared
    frozen = {name: snapshot(ppo.model, name) for name in ("reference", "rm_helpfulness")}
    trained = {name: snapshot(ppo.model, name) for name in ("default", "value")}
    head = ppo.value_head.weight.detach().clone()
    torch.manual_seed(1)
    first = ppo.iteration(prompts[:8])  # 8 answers, one mini-batch: a single update after the old log-probs
    assert first["ratio"] == 1.0 and first["approx_kl"] == 0.0 and first["clip_fraction"] == 0.0 and first["kl"] == 0.0
    assert first["kl_k1_per_token"] == first["kl_k2_per_token"] == first["kl_k3_per_token"] == 0.0
    torch.manual_seed(2)
    second = ppo.iteration(prompts[8:16])
    assert all(math.isfinite(v) for v in second.values()) and second["skipped_steps"] == 0
    for name, before in frozen.items():
        now = snapshot(ppo.model, name)
        assert all(torch.equal(before[k], now[k]) for k in before), f"{name} changed"
    for name, before in trained.items():
        now = snapshot(ppo.model, name)
        assert any(not torch.equal(before[k], now[k]) for k in before), f"{name} did not change"
    assert not torch.equal(head, ppo.value_head.weight)


def test_without_an_sft_adapter_the_reference_is_the_base_with_adapters_off(tmp_path):
    """model.adapter null: the policy starts as a new (zero) adapter, so no reference copy is made; the reference pass
    gives the base model's log-probs (adapters disabled), equal to the policy's at iteration 0 (KL exactly 0) and
    unchanged once the policy has moved."""
    from ft import recipe as recipe_mod

    recipe = recipe_mod.load(ROOT / "recipes" / "ppo.yaml", [
        "model.name=builtin:tiny-llama-2", "model.adapter=null", "data.train=datasets/tiny_prompts.jsonl",
        "data.eval=null", f"ppo.reward_function={FUNCTIONS}:brevity", "ppo.reward_models=[]", "ppo.safety_model=null",
        "ppo.max_new_tokens=6", "ppo.batch_size=8", "ppo.mini_batch_size=8", "train.batch_size=4",
        "train.learning_rate=1e-3", f"output_dir={tmp_path}"])
    ppo, prompts, _, _ = ppo_stage.setup(recipe, reward_model.load_reward_function(recipe.ppo.reward_function),
                                         log=lambda *a: None)
    assert set(ppo.model.peft_config) == {"default", "value"} and ppo.reference is None
    torch.manual_seed(0)
    first = ppo.iteration(prompts[:8])
    assert first["kl"] == 0.0 and first["ratio"] == 1.0
    torch.manual_seed(1)
    batch = ppo.collect(prompts[8:16])
    order = torch.arange(batch.n)
    ppo.score(batch, order)
    with torch.no_grad(), ppo.model.disable_adapter():
        base = ppo.logprobs(batch, order)[0] * batch.mask
    assert torch.equal(batch.logp_ref, base)
    assert not torch.equal(batch.logp_old, batch.logp_ref)  # the policy has moved away from the base


def test_a_ppo_step_raises_the_log_probability_of_the_rewarded_answers(shared):
    ppo, prompts = shared
    ppo.rewards = reward_model.Rewards(function=reward_model.load_reward_function(f"{FUNCTIONS}:brevity"))
    torch.manual_seed(3)
    batch = ppo.collect(prompts[:8])
    order = torch.arange(batch.n)
    ppo.score(batch, order)
    ppo.model.train()
    assert ppo.step(batch, order) is not None
    with torch.no_grad(), models.use_adapter(ppo.model, "default"):
        after = ppo.logprobs(batch, order)[0]
    change = ((after - batch.logp_old) * batch.mask).sum(-1)
    raw = torch.tensor(batch.raw)
    assert change[raw > raw.median()].mean() > change[raw <= raw.median()].mean(), (raw, change)


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def ppo_run(trained_run, tmp_path_factory):
    sft, _ = trained_run
    out = tmp_path_factory.mktemp("ppo") / "run"
    result = cli("ppo", "recipes/ppo.yaml", "--output-dir", out,
                     *ppo_flags(sft, f"ppo.reward_function={FUNCTIONS}:brevity", "ppo.reward_models=[]",
                                "ppo.safety_model=null", "train.max_steps=15", "train.save_steps=5", *CONTROLLER,
                                *HELD_OUT))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# the adaptive beta on, with a short horizon so that it moves within 15 iterations of 16 answers
CONTROLLER = ("ppo.kl_target=1.0", "ppo.kl_coef=0.01", "ppo.kl_horizon=50")
# held-out prompts measured every 5 iterations, never stopping early
HELD_OUT = ("data.eval=datasets/tiny_prompts.jsonl", "ppo.eval_every=5", "ppo.eval_patience=null")


def test_ppo_raises_a_rule_based_reward_with_bounded_kl(ppo_run):
    out, result = ppo_run
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert metrics["stage"] == "ppo" and metrics["iterations"] == len(history) == 15 and metrics["skipped_steps"] == 0
    assert all(math.isfinite(v) for h in history for v in h.values())
    rewards = [h["reward"] for h in history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards  # shorter answers, as the reward asks
    assert history[0]["kl"] == 0.0 and max(h["kl"] for h in history) < 20
    held_out = metrics["held_out"]  # before the first iteration, every 5, the last; the best one is the run's adapter
    assert [h["iteration"] for h in held_out] == [0, 5, 10, 15] and held_out[0]["kl"] == 0.0
    assert all(h["prompts"] == 16 and h["entropy"] > 0 and h["reference_logprob"] < 0 for h in held_out)
    best = max(held_out, key=lambda h: h["reward"])
    assert metrics["kept_iteration"] == best["iteration"] and "best held-out reward" in metrics["kept_reason"]
    assert metrics["stopped_early"] is False and not (out / "kept").exists()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "recipe.yaml",
                 "value/adapter_model.safetensors", "value/value_head.safetensors"):
        assert (out / name).is_file(), name
    assert "done: the adapter is in" in result.stdout and "llama-ft merge" in result.stdout
    from ft import hub

    card = hub.model_card(out, "alice/tiny-ppo")
    assert "| 2 | ppo | `datasets/tiny_prompts.jsonl` | 15 | ppo: reward" in card
    assert f"β {metrics['kl_coef_final']:.4g} (adapted to hold 1 nats)" in card  # the KL target and the final beta
    assert '"kl_target": 1.0' in card and f'"kl_coef_final": {metrics["kl_coef_final"]}' in card
    chat = cli("chat", out, "--prompt", "What is the capital of Peru?", "--temperature", "0", "--max-new-tokens", "12")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr[-2000:]


def test_interrupted_ppo_resumes_at_an_iteration_boundary_to_the_same_result(ppo_run, trained_run, tmp_path):
    full, _ = ppo_run
    sft, _ = trained_run
    out = tmp_path / "run"
    flags = ppo_flags(sft, f"ppo.reward_function={FUNCTIONS}:brevity", "ppo.reward_models=[]",
                      "ppo.safety_model=null", "train.max_steps=15", "train.save_steps=5", *CONTROLLER, *HELD_OUT)
    process = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "ppo", "recipes/ppo.yaml", "--output-dir", str(out),
                                *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint-5" / "trainer_state.json").is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "continue with: llama-ft ppo recipes/ppo.yaml" in stderr and not (out / "metrics.json").exists()
    resumed = cli("ppo", "recipes/ppo.yaml", "--output-dir", out, *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, out))
    assert a["history"] == b["history"] and b["resumed_from"]
    assert a["held_out"] == b["held_out"] and a["kept_iteration"] == b["kept_iteration"]  # measured the same
    betas = [h["kl_coef"] for h in a["history"]]  # the controller's beta, restored from checkpoint-5 exactly
    assert betas[0] == 0.01 and len(set(betas)) > 5 and a["kl_coef_final"] == b["kl_coef_final"] != betas[-1]
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "value/adapter_model.safetensors", "value/value_head.safetensors"):
        x, y = load_file(str(full / name)), load_file(str(out / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_held_out_reward_that_never_improves_stops_the_run_and_keeps_the_starting_policy(trained_run, tmp_path):
    """A reward with nothing to learn (every answer 0): the held-out reward never beats iteration 0's, so with
    ppo.eval_patience 2 the run stops after two evaluations and its adapter is the SFT run's, unchanged."""
    from safetensors.torch import load_file

    sft, _ = trained_run
    out = tmp_path / "run"
    result = cli("ppo", "recipes/ppo.yaml", "--output-dir", out,
                 *ppo_flags(sft, f"ppo.reward_function={FUNCTIONS}:constant", "ppo.reward_models=[]",
                            "ppo.safety_model=null", "train.max_steps=10", "data.eval=datasets/tiny_prompts.jsonl",
                            "ppo.eval_every=1", "ppo.eval_patience=2", "ppo.max_new_tokens=8"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["iterations"] == 2 and len(metrics["history"]) == 2
    assert "has not beaten its best (0.0000, iteration 0) for 2 evaluations (ppo.eval_patience 2)" in metrics["stop_reason"]
    assert metrics["kept_iteration"] == 0 and "stopping early after iteration 2" in result.stdout
    kept, start = load_file(str(out / "adapter_model.safetensors")), load_file(str(sft / "adapter_model.safetensors"))
    assert kept.keys() == start.keys() and all(torch.equal(kept[k], start[k]) for k in kept)
    assert not (out / "kept").exists()


def test_the_early_stopping_rule_keeps_the_best_and_stops_on_patience_or_a_fall_with_a_climbing_kl():
    ev = lambda i, reward, kl: {"iteration": i, "reward": reward, "kl": kl}
    rising = [ev(0, 0.1, 0.0), ev(5, 0.3, 1.0), ev(10, 0.5, 2.0)]
    assert ppo_stage.early_stop(rising, 2) == (2, None)
    flat = [ev(0, 0.5, 0.0), ev(5, 0.5, 1.0), ev(10, 0.4, 0.5)]  # equal rewards: the earliest is kept
    kept, stop = ppo_stage.early_stop(flat, 2)
    assert kept == 0 and "for 2 evaluations (ppo.eval_patience 2)" in stop
    assert ppo_stage.early_stop(flat, 3) == (0, None) and ppo_stage.early_stop(flat, None) == (0, None)
    falling = [ev(0, 0.1, 0.0), ev(5, 0.6, 1.0), ev(10, 0.5, 2.0), ev(15, 0.4, 3.0)]
    kept, stop = ppo_stage.early_stop(falling, 5)
    assert kept == 1 and "fell while the KL climbed at two evaluations in a row" in stop and "0.6000 -> 0.5000 -> 0.4000" in stop
    once = falling[:3] + [ev(15, 0.45, 1.5)]  # the KL fell back: one fall with a climbing KL is not enough
    assert ppo_stage.early_stop(once, 5) == (1, None)


def test_drift_on_held_out_prompts_is_warned_for_garble_and_for_repetition(shared):
    ppo, _ = shared
    start = {"iteration": 0, "reward": 0.1, "kl": 0.0, "entropy": 2.0, "reference_logprob": -1.5,
             "same_answer_share": 1 / 16, "prompts": 16}
    assert ppo_stage.drift_warnings([start, {**start, "iteration": 5, "reference_logprob": -2.3}], ppo.cfg) == []
    garble = {**start, "iteration": 10, "reference_logprob": -4.0, "kl": 9.0, "entropy": 2.5}  # varied, unlike the SFT's
    [(kind, message)] = ppo_stage.drift_warnings([start, garble], ppo.cfg)
    assert kind == "garble" and "2.50 nats per token less" in message and "ppo.kl_target" in message
    repeated = {**start, "iteration": 10, "entropy": 0.3, "same_answer_share": 12 / 16}
    [(kind, message)] = ppo_stage.drift_warnings([start, repeated], ppo.cfg)
    assert kind == "repetition" and "0.300 nats per token" in message and "75% of the prompts" in message
    assert [k for k, _ in ppo_stage.drift_warnings([start, {**garble, "entropy": 0.1}], ppo.cfg)] == ["garble", "repetition"]


def test_grpo_runs_through_trl_with_the_same_reward_and_run_folder(trained_run, tmp_path):
    """The shipped recipes/grpo.yaml, as is apart from the tiny model and data (no ppo.kl_target to unset)."""
    sft, _ = trained_run
    out = tmp_path / "grpo"
    result = cli("ppo", "recipes/grpo.yaml", "--output-dir", out,
                 *ppo_flags(sft, f"ppo.reward_function={FUNCTIONS}:brevity", "ppo.reward_models=[]",
                            "ppo.safety_model=null", "ppo.batch_size=4", "ppo.samples_per_prompt=2",
                            "ppo.max_new_tokens=8", "train.max_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["algorithm"] == "grpo" and metrics["iterations"] == 1 and metrics["global_step"] == 1
    assert metrics["history"] and all(-2 < h["reward"] <= 0 for h in metrics["history"])  # -words/10 of short answers
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()


@pytest.mark.parametrize("sets, message", [
    (["ppo.reward_function=null", "ppo.reward_models=[]"], "exactly one reward source"),
    (["ppo.reward_models=[]", "ppo.reward_function=x.py:f"], "set ppo.reward_models too"),
    (["ppo.algorithm=grpo", "ppo.samples_per_prompt=1"], "at least 2"),
    (["ppo.mini_batch_size=12"], "must divide"),
    (["train.gradient_accumulation_steps=4"], "leave train.gradient_accumulation_steps at 1"),
    (["ppo.algorithm=rloo", "ppo.kl_target=2"], "TRL's rloo trainer has no such controller"),
    (["ppo.algorithm=grpo"], "start from recipes/grpo.yaml"),
    (["ppo.kl_target=0"], "ppo.kl_target"),
])
def test_bad_ppo_recipes_exit_2_before_anything_runs(sets, message, tmp_path):
    result = cli("ppo", "recipes/ppo.yaml", "--output-dir", tmp_path / "x", *(x for s in sets for x in ("--set", s)))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()  # refused before the run folder is made


def test_a_bad_reward_function_is_a_user_error(tmp_path):
    from ft.errors import UserError

    broken = tmp_path / "broken.py"
    broken.write_text("def f(prompts, completions, **kwargs):\n    return [1.0]\nraise ValueError('oops')\n")
    for spec, message in ((f"{tmp_path}/missing.py:f", "missing.py not found"), (f"{FUNCTIONS}:nope", "defines no function 'nope'"),
                          (f"{FUNCTIONS}", "expected FILE.py:NAME"), (f"{broken}:f", "importing .*broken.py failed")):
        with pytest.raises(UserError, match=message):
            reward_model.load_reward_function(spec)
    one = tmp_path / "one.py"
    one.write_text("def f(prompts, completions, **kwargs):\n    return [1.0]\n")
    with pytest.raises(UserError, match="one finite number per completion"):
        reward_model.Rewards(function=reward_model.load_reward_function(f"{one}:f"))([[{"role": "user", "content": "Q"}]] * 2, ["a", "b"])


# ---------------------------------------------------------------- slow: learning curves (LLAMA_FT_SLOW_TESTS=1)


@pytest.fixture(scope="module")
def half_trained(tmp_path_factory, tiny_dir):
    """The tiny SFT stopped at 35 steps: answers the taught facts half the time when sampling at temperature 1."""
    out = tmp_path_factory.mktemp("sft35") / "run"
    result = cli("sft", "recipes/tiny.yaml", "--output-dir", out, "--set", "train.max_steps=35",
                     "--set", "train.generate_samples=0", "--set", "train.report_to=none")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def learning_run(tmp_path, adapter, *sets):
    result = cli("ppo", "recipes/ppo.yaml", "--output-dir", tmp_path,
                     *ppo_flags(adapter, "ppo.samples_per_prompt=4", "ppo.mini_batch_size=16", "train.max_steps=15", "train.logging_steps=1",
                                "train.learning_rate=1e-4", *sets), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    rewards = [h["reward"] for h in history]
    print(f"\n{tmp_path.name}: reward by iteration {[round(r, 2) for r in rewards]}, KL {[round(h['kl'], 2) for h in history]}")
    return sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3, history


@SLOW
@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_correct_answers_rise_under_each_algorithm(half_trained, tmp_path, algorithm):
    first, last, history = learning_run(tmp_path / algorithm, half_trained, f"ppo.reward_function={FUNCTIONS}:correct",
                                        "ppo.reward_models=[]", "ppo.safety_model=null", f"ppo.algorithm={algorithm}",
                                        "ppo.kl_coef=0.01",  # the beta (start) this check was written for
                                        *(("ppo.kl_target=null",) if algorithm != "ppo" else ()))
    assert last > first + 0.1, [round(h["reward"], 2) for h in history]
    assert max(h["kl"] for h in history) < 10


@SLOW
def test_a_reward_model_score_rises_and_the_kl_penalty_keeps_answers_on_task(half_trained, reward_run, tmp_path):
    first, last, history = learning_run(tmp_path / "rm", half_trained, f"ppo.reward_models=[{reward_run}]",
                                        "ppo.safety_model=null", "ppo.reward_function=null", "ppo.kl_coef=0.1",
                                        "data.eval=datasets/tiny_prompts.jsonl")
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert last > first and metrics["eval"]["reward_end"] > metrics["eval"]["reward_start"], history
    assert max(h["kl"] for h in history) < 10
    from ft.reward_model import load_reward_function
    from ft.sampling import generate
    from ft.recipe import LoraSection, ModelSection

    model = models.attach_lora(models.load_model(ModelSection(name="builtin:tiny-llama-2")), LoraSection(), adapter=str(tmp_path / "rm"),
                               gradient_checkpointing=False)
    tokenizer = models.load_tokenizer(str(tmp_path / "rm"))
    prompts = [[{"role": "user", "content": json.loads(line)["prompt"]}]
               for line in (ROOT / "datasets" / "tiny_prompts.jsonl").read_text().splitlines()]
    answers = [a[0].text for a in generate(model, tokenizer, prompts, greedy=True, max_new_tokens=16, batch_size=16)]
    correct = load_reward_function(f"{FUNCTIONS}:correct")(prompts, answers)
    assert sum(correct) >= 12, answers  # still answering the questions it was taught


def greedy_answers(run):
    """The run's greedy answers to the 16 tiny prompts, and the prompts."""
    from ft.recipe import LoraSection, ModelSection
    from ft.sampling import generate

    model = models.attach_lora(models.load_model(ModelSection(name="builtin:tiny-llama-2")), LoraSection(), adapter=str(run),
                               gradient_checkpointing=False)
    prompts = [[{"role": "user", "content": json.loads(line)["prompt"]}]
               for line in (ROOT / "datasets" / "tiny_prompts.jsonl").read_text().splitlines()]
    answers = generate(model, models.load_tokenizer(str(run)), prompts, greedy=True, max_new_tokens=16, batch_size=16)
    return prompts, [a[0].text for a in answers]


@pytest.mark.slow
def test_the_adaptive_beta_holds_the_kl_near_its_target_on_a_gameable_reward_where_a_fixed_beta_drifts(trained_run, tmp_path):
    """Capitalised words score whatever they say (reward_functions.capitals), learning rate 1e-4 (10x the recipe's):
    the same start beta 0.05, fixed or adapting to a 2-nat target, 30 iterations of 16 prompts x 4 answers."""
    from ft.reward_model import load_reward_function

    sft, _ = trained_run
    runs = {}
    for name, sets in (("fixed", ["ppo.kl_target=null"]), ("adaptive", ["ppo.kl_target=2", "ppo.kl_horizon=64"])):
        result = cli("ppo", "recipes/ppo.yaml", "--output-dir", tmp_path / name,
                         *ppo_flags(sft, f"ppo.reward_function={FUNCTIONS}:capitals", "ppo.reward_models=[]",
                                    "ppo.safety_model=null", "ppo.samples_per_prompt=4", "ppo.mini_batch_size=16",
                                    "train.max_steps=30", "train.learning_rate=1e-4", "ppo.kl_coef=0.05", *sets), timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        prompts, answers = greedy_answers(tmp_path / name)
        runs[name] = metrics, sum(load_reward_function(f"{FUNCTIONS}:correct")(prompts, answers)), result.stdout
        print(f"\n{name}: KL {[round(h['kl'], 2) for h in metrics['history']]}, beta "
              f"{[round(h['kl_coef'], 4) for h in metrics['history']]}, greedy answers right {runs[name][1]}/16: {answers[-2:]}")
    (fixed, fixed_right, _), (adaptive, adaptive_right, log) = runs["fixed"], runs["adaptive"]
    last = lambda m: [h["kl"] for h in m["history"][-5:]]
    # near its 2-nat target: the mean of the last five within 0.5-1.5x, none above 1.5x. One iteration's KL (64
    # answers) is a noisy estimate, and 30 iterations of sampling amplify float rounding: an AVX2 CPU gave 2.48, 2.19,
    # 1.83, 1.52, 1.57 (2026-12-07), an AVX512 CPU's kernels a trajectory with one of its last five at 0.76.
    assert 0.5 * 2 < sum(last(adaptive)) / 5 < 1.5 * 2 and max(last(adaptive)) < 1.5 * 2, last(adaptive)
    assert last(fixed)[-1] > 2.5 * 2 and sum(last(fixed)) > 1.5 * sum(last(adaptive)), last(fixed)  # drifting away
    assert adaptive["kl_coef_final"] > 2 * 0.05 and all(h["kl_coef"] == 0.05 for h in fixed["history"])
    assert adaptive_right >= 14 and adaptive_right > fixed_right  # still answering what it was taught
    # on the way, the overshoot (beta first fell while the KL was below target) was warned about once, with the keys
    warned = [line for line in log.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "ppo.kl_target 2" in warned[0] and "train.learning_rate" in warned[0], warned


def test_a_reward_model_trained_on_another_base_is_loaded_on_its_own_and_the_log_says_so(shared, reward_run, tmp_path):
    import shutil

    import yaml

    ppo, prompts = shared
    other = tmp_path / "rm-unquantised"
    shutil.copytree(reward_run, other)
    recipe = yaml.safe_load((other / "recipe.yaml").read_text())
    recipe["model"]["quantization"] = "none"  # trained on the unquantised base: not this 4-bit one
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    lines, adapters = [], set(ppo.model.peft_config)
    rewards, head, adapter = reward_model.shared_rewards(ppo.model, ppo.tokenizer, ppo.recipe.model, [str(other)], None,
                                                         threshold=0.15, batch_size=4, log=lines.append)
    assert head is None and adapter is None and set(ppo.model.peft_config) == adapters  # nothing added to the base
    assert isinstance(rewards.scorers["helpfulness"], reward_model.Scorer)
    assert any("trained on another base" in line and "separate model" in line for line in lines), lines
    questions = [p["prompt"] for p in prompts[:2]]
    assert rewards(questions, ["The capital of France is Paris.", "Maybe."])[0] == \
        reward_model.Scorer.load(other)(questions, ["The capital of France is Paris.", "Maybe."])


def capital_pairs() -> list[dict]:
    """Preference pairs that teach a reward model to like capitalised words whatever they say: each taught question
    with another question's answer in Title Case preferred to its own right answer, and its right answer in Title
    Case preferred to the same in lower case."""
    import random

    dialogs = [json.loads(line)["messages"] for line in (ROOT / "datasets" / "tiny_chat.jsonl").read_text().splitlines()]
    qa = [(m[-2]["content"], m[-1]["content"]) for m in dialogs if len(m) == 2]
    title = lambda text: " ".join(w[:1].upper() + w[1:] for w in text.split())
    rng, rows = random.Random(0), []
    for question, answer in qa:
        other = rng.choice([a for _, a in qa if a != answer])
        rows.append({"prompt": question, "chosen": title(other), "rejected": answer})
        rows.append({"prompt": question, "chosen": title(answer), "rejected": answer.lower()})
    return rows


def sampled_answers(run, n=4):
    """`n` answers sampled (temperature 1) by the run's policy to each of the 16 tiny prompts: the share that are
    right (reward_functions.correct) and the share of their words that are capitalised."""
    from ft.recipe import LoraSection, ModelSection
    from ft.reward_model import load_reward_function
    from ft.sampling import generate

    model = models.attach_lora(models.load_model(ModelSection(name="builtin:tiny-llama-2")), LoraSection(), adapter=str(run),
                               gradient_checkpointing=False)
    prompts = [[{"role": "user", "content": json.loads(line)["prompt"]}]
               for line in (ROOT / "datasets" / "tiny_prompts.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    out = generate(model, models.load_tokenizer(str(run)), prompts, n=n, max_new_tokens=16, batch_size=16)
    asked, answers = [p for p, a in zip(prompts, out) for _ in a], [c.text for a in out for c in a]
    words = [w for a in answers for w in a.split()]
    right = sum(load_reward_function(f"{FUNCTIONS}:correct")(asked, answers)) / len(answers)
    return right, sum(w[:1].isupper() for w in words) / max(len(words), 1), answers


@SLOW
def test_a_reward_model_that_likes_capitals_does_not_take_the_shipped_ppo_recipe_off_task(trained_run, tmp_path):
    """Issue 25's setup: a `llama-ft reward` model trained to prefer capitalised words to right answers, and PPO from
    an SFT run that answers right, with recipes/ppo.yaml's settings; only the model, the data, the sizes (16 prompts x
    4 answers per iteration, 30 iterations) and the learning rate (3e-4: the tiny model's LoRA barely moves at the
    recipe's 1e-5) changed. The reward model's score (its taste for capitals) rises, and at least 0.7 of the sampled
    answers stay right (with the recipe's former start beta 0.01, 0.27: "A cold is Paris.", "Aaly is Rome.")."""
    sft, _ = trained_run
    pairs = tmp_path / "capitals.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in capital_pairs()))
    rm = run_cli("reward", "recipes/reward-helpful.yaml", "--output-dir", tmp_path / "rm", *TINY, "--set",
                 f"data.train={pairs}", "--set", "data.eval=null", "--set", "train.max_steps=60", "--set",
                 "train.learning_rate=1e-3", "--set", "train.batch_size=4")
    assert rm.returncode == 0, rm.stderr[-3000:]
    assert json.loads((tmp_path / "rm" / "metrics.json").read_text())["accuracy"]["overall"] == 1.0
    sets = [f"model.adapter={sft}", "data.train=datasets/tiny_prompts.jsonl", "data.eval=null", "data.max_length=128",
            f"ppo.reward_models=[{tmp_path / 'rm'}]", "ppo.safety_model=null", "ppo.reward_function=null",
            "ppo.batch_size=16", "ppo.samples_per_prompt=4", "ppo.mini_batch_size=16", "ppo.generation_batch_size=16",
            "ppo.max_new_tokens=16", "train.batch_size=16", "train.max_steps=30", "train.learning_rate=3e-4",
            "train.logging_steps=10"]
    result = run_cli("ppo", "recipes/ppo.yaml", "--output-dir", tmp_path / "ppo", *TINY,
                     *(x for s in sets for x in ("--set", s)), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "ppo" / "metrics.json").read_text())["history"]
    right_before, capitals_before, _ = sampled_answers(sft)
    right, capitals, answers = sampled_answers(tmp_path / "ppo")
    print(f"\nright {right_before:.2f} -> {right:.2f}, capitals {capitals_before:.2f} -> {capitals:.2f}, reward "
          f"{[round(h['reward'], 2) for h in history]}, KL {[round(h['kl'], 2) for h in history]}: {answers[::8]}")
    first, last = (sum(h["reward"] for h in part) / 5 for part in (history[:5], history[-5:]))
    assert last > first + 0.3 and capitals >= capitals_before - 0.02  # the reward model's taste is followed
    assert right >= 0.7, answers  # and the task is not given up for it
