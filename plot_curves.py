"""
Joint-GRPO training curves from the runs' logs, laid out as the paper's Figure 2:
stage 1 (a) format reward r_f, (b) text fidelity r_t1, (c) video fidelity r_v1,
(d) total reward, (e) thinking length; stage 2 (f) video fidelity r_v2,
(g) semantic alignment r_c2, (h) total reward, plus (i) the motion statistic
against the ground truth's (a DiT that buys reward with static frames shows there), and,
in the Shapes world, (j) the share of stage 1's completions that state the right event.

    python plot_curves.py out/shapes/grpo_stage1 out/shapes/grpo_stage2 --out curves.png

Each panel shows the logged values and their moving average (--smooth steps).
A quantity the run did not log (a reward it was not given) leaves its panel empty,
with a note. The total reward is the lambda-weighted sum of the raw rewards.
"""

import argparse
import json
import os

import numpy as np

PANELS = [  # (stage, log key, title)
    (1, "rewards/format/mean", "(a) stage 1: format reward $r_f$"),
    (1, "rewards/rouge_l/mean", "(b) stage 1: text fidelity $r_{t1}$ (ROUGE-L)"),
    (1, "rewards/clip_v/mean", "(c) stage 1: video fidelity $r_{v1}$ (CLIP-V)"),
    (1, "reward", "(d) stage 1: total reward"),
    (1, "completions/think_length", "(e) stage 1: thinking length (tokens)"),
    (2, "rewards/clip_v/mean", "(f) stage 2: video fidelity $r_{v2}$ (CLIP-V)"),
    (2, "rewards/clip_t/mean", "(g) stage 2: semantic alignment $r_{c2}$ (CLIP-T)"),
    (2, "reward", "(h) stage 2: total reward"),
    (2, "motion", "(i) stage 2: motion (mean |frame difference|)"),
    (1, "event_caption", "(j) stage 1: caption event accuracy (Shapes)"),
]


def read_log(run):
    """<run>/log.jsonl -> {key: (steps, values)} for every numeric key."""
    path = os.path.join(run, "log.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist (give a training run's --out directory)")
    series = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"error: {path}:{n}: not valid JSON") from None
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    series.setdefault(k, ([], []))
                    series[k][0].append(row["step"])
                    series[k][1].append(float(v))
    return series


def moving_average(y, n):
    """Mean of the last n values at every point (fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(y, float), 0, 0.0))
    i = np.arange(1, len(y) + 1)
    return (c[i] - c[np.maximum(i - n, 0)]) / np.minimum(i, n)


def plot(stage1, stage2, smooth=10):
    """-> a matplotlib Figure with the 10 panels; stage1 / stage2: read_log outputs (or None)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 5, figsize=(20, 7), constrained_layout=True)
    axes = axes.flatten()
    for ax, (stage, key, title) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"stage {stage} step")
        series = (stage1 if stage == 1 else stage2) or {}
        if key not in series:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        x, y = series[key]
        ax.plot(x, y, color="tab:blue", alpha=0.3, lw=1, label="logged")
        ax.plot(x, moving_average(y, smooth), color="tab:blue", lw=2, label=f"mean of {smooth}")
        if key == "motion" and "motion_gt" in series:
            ax.plot(*series["motion_gt"], color="tab:green", ls="--", lw=1.5, label="ground truth")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Joint-GRPO training curves (the paper's Figure 2) from run logs.")
    parser.add_argument("stage1", help="grpo_stage1.py --out directory (or - for none)")
    parser.add_argument("stage2", nargs="?", default="-", help="grpo_stage2.py --out directory (or - for none)")
    parser.add_argument("--out", default="curves.png", help="PNG to write")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window, in logged points")
    args = parser.parse_args()
    logs = [None if run == "-" else read_log(run) for run in (args.stage1, args.stage2)]
    plot(*logs, smooth=args.smooth).savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
