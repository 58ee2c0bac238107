"""A pipeline's report.md and progress.png, drawn from pipeline.json's figures (ft/pipeline.py writes both after
every finished round).

progress.png follows the Llama 2 paper's Figure 11: per round, the win rate against the SFT model (win + tie / 2)
by each judge with its 95% interval, and beside it each judge's mean reward of the round's model. The reward models
change every round, so their mean rewards compare a round with its own reference only; an independent judge's
(compare.judge) are on one scale across rounds, and it is the one a hacked reward model cannot fool.
"""

from __future__ import annotations

from pathlib import Path

from ft import runs
from ft.compare import wilson

REPORT_FILE, PLOT_FILE = "report.md", "progress.png"


def write(out: Path, state: dict, *, log=print) -> None:
    rounds = state.get("rounds") or []
    runs.write_text(out / REPORT_FILE, markdown(state))
    if rounds:
        plot(rounds, out / PLOT_FILE)


def win_rate_interval(part: dict) -> list[float]:
    """The 95% Wilson interval of the win rate (wins + half the ties, out of n)."""
    return wilson(part["win_rate"] * part["n"], part["n"])


def markdown(state: dict) -> str:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    lines = ["# Pipeline report", "", f"Folder: `{state.get('output_dir', '')}`. Steps done: {len(state['done'])}.", ""]
    rounds = state.get("rounds") or []
    if not rounds:
        return "\n".join(lines + ["No round has finished yet.", ""])
    lines += ["![progress](progress.png)", "",
              "Each round's model against the SFT model (`vs SFT`) and against the round before (`vs previous`) on the "
              "held-out prompts (n: the answers judged). Win rate = win + tie / 2; brackets: 95% Wilson interval.", ""]
    for against in ("vs_sft", "vs_previous"):
        lines += [f"## {'Against the SFT model' if against == 'vs_sft' else 'Against the previous round'}", "",
                  "| round | method | judge | win | tie | loss | win rate [95%] | mean reward (model / reference) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rounds:
            for judge, part in r[against].items():
                low, high = win_rate_interval(part)
                lines.append(f"| {r['round']} | {r['method']} | {judge} | {pct(part['win'])} | {pct(part['tie'])} | "
                             f"{pct(part['loss'])} | {pct(part['win_rate'])} [{pct(low)}, {pct(high)}] | "
                             f"{part['mean_reward']['model']:.3f} / {part['mean_reward']['reference']:.3f} |")
        lines.append("")
    lines += ["## Reward models", "", "Accuracy on the held-out preference pairs of rounds 1..k (never trained on).", "",
              "| round | model | accuracy | pairs | preference rows this round |", "|---|---|---|---|---|"]
    for r in rounds:
        for name, acc in r["reward_accuracy"].items():
            lines.append(f"| {r['round']} | {name} | {pct(acc['accuracy'])} | {acc['pairs']} | "
                         f"{r['preferences'].get('rows')} ({r['preferences'].get('source')}) |")
    lines += ["", "## Models", "", "| round | model (a run folder: chat, merge, eval, push take it) |", "|---|---|"]
    lines += [f"| {r['round']} | `{r['model']}` |" for r in rounds]
    return "\n".join(lines) + "\n"


def plot(rounds: list[dict], path: Path) -> None:
    """progress.png: win rate against SFT per round by each judge (with intervals), and the mean reward."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    judges = list(dict.fromkeys(j for r in rounds for j in r["vs_sft"]))
    xs = [r["round"] for r in rounds]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for i, judge in enumerate(judges):
        parts = [(r["round"], r["vs_sft"][judge]) for r in rounds if judge in r["vs_sft"]]
        x = [k + (i - (len(judges) - 1) / 2) * 0.06 for k, _ in parts]
        y = [100 * p["win_rate"] for _, p in parts]
        bounds = [win_rate_interval(p) for _, p in parts]
        errors = [[v - 100 * b[0] for v, b in zip(y, bounds)], [100 * b[1] - v for v, b in zip(y, bounds)]]
        left.errorbar(x, y, yerr=errors, marker="o", capsize=4, label=judge)
        right.plot([k for k, _ in parts], [p["mean_reward"]["model"] for _, p in parts], marker="o", label=judge)
    left.axhline(50, color="grey", linestyle="--", linewidth=1)
    left.set(title="Win rate against the SFT model", xlabel="RLHF round", ylabel="win rate % (win + tie/2)",
             ylim=(0, 100), xticks=xs)
    right.set(title="Mean reward of the round's model", xlabel="RLHF round", ylabel="mean score on held-out prompts",
              xticks=xs)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
