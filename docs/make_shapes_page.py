"""
Writes the generated parts of docs/shapes.md from the small results files under docs/results/.

    python docs/make_shapes_page.py                      # rewrite the page's tables from docs/results/
    python docs/make_shapes_page.py 1 out/shapes-seed1   # first take seed 1's rows from its run's
                                                         # eval/<row>/results.json into docs/results/
    python docs/make_shapes_page.py stage2 lora out/s2-lora   # first take a stage-2 run's curve (log.jsonl,
                                                              # val.jsonl) into docs/results/stage2/, as STAGE2's
                                                              # run "lora"; the figure of them all

Each generated part of the page sits between `<!-- begin: NAME -->` and `<!-- end: NAME -->`, and
BLOCKS maps NAME to the function that writes it (markdown, from docs/results/ only). Everything
outside the markers is left as it is, so a second run changes nothing. A new generated part is one
function here, one line in BLOCKS and its two markers in the page.
"""
import glob
import json
import os
import sys

import numpy as np

DOCS = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(DOCS, "shapes.md")
RESULTS = os.path.join(DOCS, "results")

# the question world's rows: run_shapes.sh's names (OUT/eval/<name>) -> the table's number and label
ROWS = {
    "sft": ("1", "SFT"),
    "sft_more": ("2", "SFT continued"),
    "stage1_text": ("3", "stage 1, r_f + r_t1"),
    "stage1": ("4", "stage 1, + r_v1"),
    "joint_grpo": ("5", "row 4 + stage 2 (Joint-GRPO)"),
    "stage2_no_ct": ("6", "row 4 + stage 2 without r_c2"),
    "stage2_random": ("-", "row 4 + stage 2 on a random reward (control)"),
}
# eval.py's results.json keys -> column and decimals
METRICS = [("rouge_l", "ROUGE-L", 4), ("fvd", "FVD", 2), ("clip_v", "CLIP-V", 4), ("clip_t", "CLIP-T", 4),
           ("specific_caption", "specific (caption)", 3), ("event_video", "event (video)", 3)]
# reward-check's CLIPs (shapes.py reward-check --clip ...) -> how they were trained
CLIPS = {
    "weights/shapes-sft/clip": "the world's (`weights/shapes-sft/clip`: frames and captions, 1,000 steps)",
    "data/shapes/clip_hard": "with hard negatives: every future of 16 scenes in each batch, 2,000 steps",
    "data/shapes/clip_hard_perturbed": "the same, and 32 frames a batch made wrong as the DiT makes them "
                                       "(an object recoloured or doubled)",
}
# stage 2 over the paper's 1,000 steps: runs of the preset from the shipped models (docs/results/stage2/<name>.json)
STAGE2 = {
    "lora": "a LoRA r 32 on the DiT (Flow-GRPO's Wan2.1 setting)",
    "full": "every DiT weight (config/shapes.py, the paper's)",
    "random": "every DiT weight, a random reward (control)",
}
# shapes.why_not_shown's reasons -> words
WHY = {"another object lost": "another object is not found in its colour at the start or the end",
       "another object moved": "another object moved", "lost": "the acting object is lost",
       "wrong place": "the acting object ends in the wrong place"}


def load(path):
    with open(path) as f:
        return json.load(f)


def seeds():
    """docs/results/question_world/seed*.json -> {seed: {row: {metric: value}}}, by seed"""
    runs = [load(p) for p in glob.glob(os.path.join(RESULTS, "question_world", "seed*.json"))]
    return {r["seed"]: r["rows"] for r in sorted(runs, key=lambda r: r["seed"])}


def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


# --- the generated blocks: each returns the markdown between its markers

def question_table():
    """every row: mean ± standard deviation (ddof 1) over the seeds that have it"""
    runs, rows = seeds(), []
    for row, (num, label) in ROWS.items():
        have = [s for s in runs if row in runs[s]]
        cells = []
        for key, _, d in METRICS:
            x = np.array([runs[s][row][key] for s in have])
            cells.append(f"{x.mean():.{d}f}" + (f" ± {x.std(ddof=1):.{d}f}" if len(x) > 1 else ""))
        rows.append([num, label] + cells + [", ".join(map(str, have))])
    return table(["row", "run"] + [name for _, name, _ in METRICS] + ["seeds"], rows)


def seed_table():
    """each seed's captions that name the object, and its videos that show the event, in all and by caption"""
    runs, rows = seeds(), []
    cols = [("specific_caption", "specific (caption)"), ("event_video", "event (video)"),
            ("event_video_named", "event (video), named captions"), ("event_video_vague", "vague captions")]
    for row, (num, label) in ROWS.items():
        rows.append([num, label] + [" / ".join(f"{runs[s][row][k]:.3f}" if k in runs[s].get(row, {}) else "-"
                                               for s in runs) for k, _ in cols])
    return table(["row", "run"] + [f"{name}, seeds {' / '.join(map(str, runs))}" for _, name in cols], rows)


def reward_check():
    """docs/results/reward_check_sft.json: how often each reward ranks an event video above another of its group"""
    r = load(os.path.join(RESULTS, "reward_check_sft.json"))
    why = [w for p in r["videos_by_prompt"] for w in p["why"]]
    g = r["settings"]["group_size"]
    shows = np.array([w is None for w in why]).reshape(-1, g).sum(1)
    mixed = shows[(shows > 0) & (shows < g)]
    text = (f"{r['event_videos']} of the {r['videos']} videos show the event, and {len(mixed)} of the "
            f"{len(shows)} groups hold both kinds ({int((mixed * (g - mixed)).sum())} pairs of an event video and "
            f"another of its group). The others miss it because "
            + ", ".join(f"{WHY.get(k, k)} ({v})" for k, v in sorted(r["why_not"].items(), key=lambda kv: -kv[1])) + ".")
    rows = [[CLIPS.get(clip, f"`{clip}`")] + [f"{p['pairs']:.3f} ({p['r']:.2f})" for p in pref.values()]
            for clip, pref in r["preference"].items()]
    return text + "\n\n" + table(["CLIP", "r_v2 (CLIP-V)", "r_c2 (CLIP-T)", "r_v2 + r_c2 (as stage 2 sums them)"], rows)


def slope(x, y):
    """least-squares slope of y on x and its standard error"""
    b, a = np.polyfit(x, y, 1)
    return b, np.sqrt(np.sum((y - a - b * x) ** 2) / (len(x) - 2) / np.sum((x - x.mean()) ** 2))


def stage2_curve():
    """docs/results/stage2/*.json: each run's training reward trend, and its held-out reward against step 0's"""
    runs = {name: load(path) for name in STAGE2 if os.path.exists(path := os.path.join(RESULTS, "stage2", f"{name}.json"))}
    if not runs:
        return ("The preset's stage 2 over the paper's 1,000 steps has no committed results yet: `python "
                "docs/make_shapes_page.py stage2 NAME RUN` writes its curve here from the run's log.jsonl and val.jsonl.")
    rows, by_step = [], {}
    for name, r in runs.items():
        b, se = slope(np.array(r["steps"], float), np.array(r["reward"]))
        val = r["val"]  # {step: {prompt id: r_v2 + r_c2}}
        first, last = min(val, key=int), max(val, key=int)
        d = np.array([val[last][k] - val[first][k] for k in val[first]])
        dse = d.std(ddof=1) / np.sqrt(len(d))
        spread = f"{np.median(r['reward_std']):.3f} / {np.std(r['reward']):.3f}" if "reward_std" in r else "-"
        rows.append([STAGE2[name], f"`{r['command']}`", str(len(r["steps"])),
                     f"{b:.1e} ± {se:.1e} ({b / se:+.1f} SE)", spread,
                     f"{d.mean():+.4f} ± {dse:.4f} ({d.mean() / dse:+.1f} SE)"])
        for k, v in val.items():
            by_step.setdefault(int(k), {})[name] = f"{np.mean(list(v.values())):.4f}"
    n = len(next(iter(runs.values()))["val"]["0"])
    return (table(["stage 2", "command", "steps", "training reward: slope a step",
                   "its spread: in a group (median) / between steps", "held-out reward: last minus step 0"], rows)
            + "\n\nThe training reward is r_v2 + r_c2 of each step's group (a new prompt each step; the "
            "control logs them beside the random reward it trains on); its slope is a least-squares fit; its spread "
            "is the median over steps of its standard deviation within the group, against the standard deviation of "
            "the steps' means (the control's log has the spread of the random reward it trains on, not theirs). The runs "
            "shared their 2 cores with other work, so their logged times are not the preset's cost, which "
            "[performance.md](performance.md) measures on idle cores. The held-out "
            f"reward is r_v2 + r_c2 of the first {n} validation prompts, each rendered by the ODE sampler from the same "
            "noise every time, paired by prompt:\n\n"
            + table(["step", *(STAGE2[k] for k in runs)], [[str(k), *(v.get(name, "") for name in runs)]
                                                        for k, v in sorted(by_step.items())])
            + "\n\n![stage 2: the training reward's running mean and the held-out reward of each run]"
              "(../assets/shapes_stage2_curve.png)")


BLOCKS = {
    "question-table": question_table,
    "seed-table": seed_table,
    "stage2-curve": stage2_curve,
    "reward-check": reward_check,
}


def take_stage2(name, run):
    """a grpo_stage2.py run -> docs/results/stage2/<name>.json (each step's r_v2 + r_c2, each validation's
    per-prompt r_v2 + r_c2 from val.jsonl, the command), and assets/shapes_stage2_curve.png of every run there"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    assert name in STAGE2, f"stage2 NAME: one of {', '.join(STAGE2)}"
    steps = [r for r in map(json.loads, open(os.path.join(run, "log.jsonl"))) if "reward" in r]
    flags = load(os.path.join(run, "last", "meta.json"))["flags"]
    val = {str(r["step"]): {p["id"]: p["clip_v"] + p["clip_t"] for p in r["prompts"]}
           for r in map(json.loads, open(os.path.join(run, "val.jsonl")))}
    clip_rewards = flags["rewards"] == "clip_v=1,clip_t=1"  # stage 2's own; else a control's
    extra = (f" --lora {flags['lora']}" if flags["lora"] else "") + \
        ("" if clip_rewards else f" --rewards {flags['rewards']}") + \
        (f" --stop-at {steps[-1]['step']}" if steps[-1]["step"] < flags["steps"] else "")
    out = {"command": f"python grpo_stage2.py --config config/shapes.py --vlm shapes --vdm shapes-sft "
                      f"--clip weights/shapes-sft/clip --steps {flags['steps']}{extra} --out out/stage2-{name}",
           "steps": [r["step"] for r in steps],
           "reward": [r["rewards/clip_v/mean"] + r["rewards/clip_t/mean"] for r in steps], "val": val}
    if clip_rewards:  # reward_std is the spread of what the run trains on
        out["reward_std"] = [r["reward_std"] for r in steps]
    os.makedirs(os.path.join(RESULTS, "stage2"), exist_ok=True)
    with open(os.path.join(RESULTS, "stage2", f"{name}.json"), "w") as f:
        json.dump(out, f)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    for key in STAGE2:
        path = os.path.join(RESULTS, "stage2", f"{key}.json")
        if not os.path.exists(path):
            continue
        r = load(path)
        a.plot(r["steps"][49:], np.convolve(r["reward"], np.ones(50) / 50, "valid"), label=key)
        vs = sorted(r["val"], key=int)
        b.plot([int(k) for k in vs], [np.mean(list(r["val"][k].values())) for k in vs], marker="o", label=key)
    a.set(xlabel="step", ylabel="r_v2 + r_c2", title="training reward, mean of 50 steps")
    b.set(xlabel="step", ylabel="r_v2 + r_c2", title="held-out reward (fixed prompts and noise)")
    b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "..", "assets", "shapes_stage2_curve.png"), dpi=100)
    print(f"{run}: {len(steps)} steps, {len(val)} validations -> docs/results/stage2/{name}.json, "
          "assets/shapes_stage2_curve.png")


def take_seed(seed, run):
    """a run of run_shapes.sh -> docs/results/question_world/seed<seed>.json: each row's metrics from
    run/eval/<row>/results.json, and the event (video) of the captions that name the object and of
    those that state the event without naming it (as `python shapes.py split` groups them). Its
    "command" assumes the plain run; say VDM=... there, and in "note" what was done otherwise."""
    rows = {}
    for row in ROWS:
        p = os.path.join(run, "eval", row, "results.json")
        if not os.path.exists(p):
            continue
        res = load(p)
        rows[row] = {k: res[k] for k in [k for k, _, _ in METRICS] + ["event_caption", "n"]}
        named = [q["event_video"] for q in res["samples"] if q["specific_caption"]]
        vague = [q["event_video"] for q in res["samples"] if q["event_caption"] and not q["specific_caption"]]
        rows[row].update(event_video_named=float(np.mean(named)) if named else None,
                         event_video_vague=float(np.mean(vague)) if vague else None)
        rows[row] = {k: v for k, v in rows[row].items() if v is not None}
    assert rows, f"{run}: no eval/<row>/results.json of run_shapes.sh"
    names = ",".join(ROWS)
    out = {"world": "question", "seed": seed, "split": "data/shapes/test.jsonl",
           "command": f"SEED={seed} bash run_shapes.sh {run}",
           "table": f"python eval.py --table {run}/eval/{{{names}}}/results.json",
           "split_command": f"python shapes.py split {run}/eval/<row>/results.json", "note": "", "rows": rows}
    path = os.path.join(RESULTS, "question_world", f"seed{seed}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{path}: {len(rows)} rows from {run}")


def rewrite(page):
    """page text -> the same text with every block of BLOCKS regenerated between its markers"""
    for name, make in BLOCKS.items():
        begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
        assert page.count(begin) == 1 and page.count(end) == 1, f"{PAGE}: needs one {begin} and one {end}"
        i, j = page.index(begin) + len(begin), page.index(end)
        page = page[:i] + "\n" + make() + "\n" + page[j:]
    return page


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "stage2":
        take_stage2(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3:
        take_seed(int(sys.argv[1]), sys.argv[2])
    elif len(sys.argv) != 1:
        sys.exit(__doc__)
    with open(PAGE) as f:
        old = f.read()
    new = rewrite(old)
    if new != old:
        with open(PAGE + ".tmp", "w") as f:
            f.write(new)
        os.replace(PAGE + ".tmp", PAGE)
    print(f"{PAGE}: {'rewritten' if new != old else 'unchanged'} ({', '.join(BLOCKS)})")
