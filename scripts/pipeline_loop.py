"""Draw docs/images/pipeline-loop.png, the picture of `llama-ft pipeline`'s loop in docs/pipeline.md:
python scripts/pipeline_loop.py (matplotlib; rerun it when the loop changes)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {  # name: (x, y, text)
    "sft": (0.12, 0.52, "round 0\nSFT\nround-0/sft"),
    "prefs": (0.38, 0.82, "preferences\nlatest vs previous model,\ntwo temperatures;\njudge, people or file\nround-k/prefs.jsonl"),
    "reward": (0.72, 0.82, "reward models\nhelpful (+ safety)\non rounds 1..k's pairs\nround-k/reward-*"),
    "policy": (0.72, 0.22, "rejection sampling\n(then PPO on it)\nfrom the latest model\nround-k/rejection, ppo"),
    "compare": (0.38, 0.22, "measure\nvs SFT and vs round k-1\nheld-out prompts, each judge\nround-k/compare-*"),
}
ARROWS = [("sft", "prefs", ""), ("prefs", "reward", ""), ("reward", "policy", "scores K samples"),
          ("policy", "compare", ""), ("compare", "prefs", "round k+1")]

fig, ax = plt.subplots(figsize=(9, 4.6), dpi=100)
ax.set_axis_off()
ax.set_xlim(-0.04, 1)
ax.set_ylim(0, 1.05)
for name, (x, y, text) in BOXES.items():
    colour = "#dbe9f6" if name != "sft" else "#e8e8e8"
    ax.add_patch(FancyBboxPatch((x - 0.13, y - 0.13), 0.26, 0.26, boxstyle="round,pad=0.01", fc=colour, ec="#34495e"))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)
for a, b, label in ARROWS:
    (xa, ya, _), (xb, yb, _) = BOXES[a], BOXES[b]
    arrow = FancyArrowPatch((xa + (0.13 if xb > xa else -0.13 if xb < xa else 0), ya + (0.13 if yb > ya else -0.13 if yb < ya else 0) * (xa == xb)),
                            (xb - (0.13 if xb > xa else -0.13 if xb < xa else 0), yb - (0.13 if yb > ya else -0.13 if yb < ya else 0) * (xa == xb)),
                            arrowstyle="-|>", mutation_scale=14, color="#34495e", lw=1.4)
    ax.add_patch(arrow)
    if label:
        ax.text((xa + xb) / 2 + (0.02 if xa == xb else 0), (ya + yb) / 2 + (0.0 if xa == xb else 0.03), label,
                fontsize=8, style="italic", ha="left" if xa == xb else "center")
ax.text(0.5, 1.02, "llama-ft pipeline: one RLHF round k = 1, 2, ...  (pipeline.json, report.md, progress.png after each)",
        ha="center", fontsize=10, weight="bold")
out = Path(__file__).resolve().parent.parent / "docs" / "images" / "pipeline-loop.png"
fig.savefig(out, bbox_inches="tight")
print(out)
