"""Draw docs/pipeline.svg, the figure of docs/index.md: the Shears pipeline, stage by stage.

    python docs/make_pipeline_figure.py [OUT]

Needs matplotlib (the ``plot`` extra). Text stays text in the SVG (``svg.fonttype: none``)
and the file carries no date, so it is small and rerunning it changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

# (title, public functions, room) of each stage, left to right, as data flows.
STAGES = [
    ("pretrained\ncausal LM", "any HF\n*ForCausalLM", None),
    ("1. prune", "calibration_data\nwanda_prune", "pruning"),
    ("2a. elastic\nLoRA", "add_elastic_lora\nranks [32, 24, 16]", "adapters"),
    ("2b. NLS training", "NLSTrainer\none random\nsub-adapter a step", "training"),
    ("3. sub-adapter\nsearch", "heuristic_config\nhill_climb\nnsga2_search", "search"),
    ("4. export", "save_adapter\nexport_peft\nmerge_adapters\nto_semi_structured", "export"),
]
INPUTS = {1: "calibration text\n(WikiText-2)", 3: "instruction data\n(math, commonsense)"}
JUDGE = ("evaluation", "perplexity · evaluate_loss · evaluate_generation")
JUDGED = {1: "perplexity\nbefore / after", 4: "the judge:\nconfig → score"}


def draw(out: Path) -> Path:
    import matplotlib
    from matplotlib.figure import Figure

    style = {"svg.fonttype": "none", "svg.hashsalt": "shears", "font.family": "sans-serif",
             "font.size": 9}
    with matplotlib.rc_context(style):  # no pyplot, and the caller's settings stay as they were
        fig = Figure(figsize=(11, 3.6))
        _draw(fig.add_subplot())
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, bbox_inches="tight", metadata={"Date": None})
    return out


def _draw(ax) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.set(xlim=(0, 12), ylim=(0, 4.2))
    ax.axis("off")
    w, h, y = 1.75, 1.5, 1.9  # box width, height, bottom
    centres = [1 + 2 * i for i in range(len(STAGES))]
    for i, (title, body, room) in enumerate(STAGES):
        x = centres[i] - w / 2
        colour = "#e8eef7" if room else "#f2f2f2"
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04",
                                    fc=colour, ec="#3b5b8c" if room else "#888888"))
        ax.text(centres[i], y + h - 0.12, title, ha="center", va="top", weight="bold")
        ax.text(centres[i], y + 0.12, body, ha="center", va="bottom", family="monospace",
                fontsize=7.5)
        if room:
            ax.text(centres[i], y - 0.1, f"shears.{room}", ha="center", va="top",
                    fontsize=7, color="#3b5b8c")
        if i:
            ax.annotate("", (x - 0.06, y + h / 2), (centres[i - 1] + w / 2 + 0.06, y + h / 2),
                        arrowprops=dict(arrowstyle="-|>", color="#333333"))
    for i, text in INPUTS.items():
        ax.annotate(text, (centres[i], y + h + 0.06), (centres[i], y + h + 0.55),
                    ha="center", va="bottom", fontsize=7.5, color="#555555",
                    arrowprops=dict(arrowstyle="-|>", color="#777777"))
    judge_x, judge_w, judge_y = centres[1] - w / 2, centres[4] + w / 2 - centres[1] + w / 2, 0.15
    ax.add_patch(FancyBboxPatch((judge_x, judge_y), judge_w, 0.7, boxstyle="round,pad=0.04",
                                fc="#fbf1e4", ec="#b07020"))
    ax.text(judge_x + judge_w / 2, judge_y + 0.35, f"{JUDGE[0]}:  {JUDGE[1]}",
            ha="center", va="center", fontsize=8.5)
    for i, text in JUDGED.items():
        ax.annotate("", (centres[i], y - 0.35), (centres[i], judge_y + 0.74),
                    arrowprops=dict(arrowstyle="-|>", color="#b07020", ls="--"))
        ax.text(centres[i] + 0.1, (y + judge_y + 0.4) / 2 + 0.1, text, fontsize=7,
                color="#b07020", va="center")


if __name__ == "__main__":
    default = Path(__file__).resolve().parent / "pipeline.svg"
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
