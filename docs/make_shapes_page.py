"""
Writes the generated parts of docs/shapes.md from the small results files under docs/results/.

    python docs/make_shapes_page.py                      # rewrite the page's tables from docs/results/
    python docs/make_shapes_page.py 1 out/shapes-seed1   # first take seed 1's rows from its run's
                                                         # eval/<row>/results.json into docs/results/
    python docs/make_shapes_page.py stage2 out/s2-1000   # first take a stage-2 run's curve (log.jsonl,
                                                         # val.jsonl) into docs/results/, and its figure

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
    """docs/results/stage2_curve.json: the training reward's trend, and the held-out reward against step 0's"""
    path = os.path.join(RESULTS, "stage2_curve.json")
    if not os.path.exists(path):
        return ("The preset's stage 2 over the paper's 1,000 steps has no committed results yet: `python "
                "docs/make_shapes_page.py stage2 RUN` writes its curve here from the run's log.jsonl and val.jsonl.")
    r = load(path)
    x, y = np.array(r["steps"], float), np.array(r["reward"])
    b, se = slope(x, y)
    val = r["val"]  # {step: {prompt id: reward}}
    first, last = min(val, key=int), max(val, key=int)
    d = np.array([val[last][k] - val[first][k] for k in val[first]])
    rows = [[k, f"{np.mean(list(v.values())):.4f}"] for k, v in sorted(val.items(), key=lambda kv: int(kv[0]))]
    return (f"`{r['command']}` ({len(x)} steps, {r['hours']:.1f} h on 2 cores). The training reward (r_v2 + r_c2, "
            f"a new prompt each step) has a least-squares slope of {b:.2e} ± {se:.1e} a step ({b / se:+.1f} standard "
            f"errors); the held-out reward (the first {len(d)} validation prompts, each rendered by the ODE sampler "
            f"from the same noise) goes from {np.mean(list(val[first].values())):.4f} at step {first} to "
            f"{np.mean(list(val[last].values())):.4f} at step {last}, a paired difference of {d.mean():+.4f} ± "
            f"{d.std(ddof=1) / np.sqrt(len(d)):.4f} ({d.mean() / (d.std(ddof=1) / np.sqrt(len(d))):+.1f} standard "
            f"errors).\n\n" + table(["step", "held-out reward"], rows)
            + "\n\n![stage 2 over 1,000 steps: the training reward and its running mean, and the held-out reward]"
              "(../assets/shapes_stage2_curve.png)")


BLOCKS = {
    "question-table": question_table,
    "seed-table": seed_table,
    "stage2-curve": stage2_curve,
    "reward-check": reward_check,
}


def take_stage2(run):
    """a grpo_stage2.py run -> docs/results/stage2_curve.json (each step's training reward, each validation's
    per-prompt reward from val.jsonl, the flags) and assets/shapes_stage2_curve.png"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    steps = [r for r in log if "reward" in r]
    flags = load(os.path.join(run, "last", "meta.json"))["flags"]
    weights = {k: float(w or 1) for k, _, w in (kv.partition("=") for kv in flags["rewards"].split(","))}
    val = {str(r["step"]): {p["id"]: sum(w * p[k] for k, w in weights.items()) for p in r["prompts"]}
           for r in map(json.loads, open(os.path.join(run, "val.jsonl")))}
    out = {"command": f"python grpo_stage2.py --config config/shapes.py --vlm shapes --vdm shapes-sft "
                      f"--clip weights/shapes-sft/clip --steps {steps[-1]['step']} --out {run}",
           "hours": sum(r["time/rollout"] + r["time/decode"] + r["time/rewards"] + r["time/update"] for r in steps) / 3600,
           "steps": [r["step"] for r in steps], "reward": [r["reward"] for r in steps], "val": val}
    with open(os.path.join(RESULTS, "stage2_curve.json"), "w") as f:
        json.dump(out, f)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    y = np.array(out["reward"])
    a.plot(out["steps"], y, lw=0.5, alpha=0.5, label="each step")
    a.plot(out["steps"][49:], np.convolve(y, np.ones(50) / 50, "valid"), label="mean of 50")
    a.set(xlabel="step", ylabel="r_v2 + r_c2", title="training reward")
    a.legend()
    vs = sorted(val, key=int)
    b.plot([int(k) for k in vs], [np.mean(list(val[k].values())) for k in vs], marker="o")
    b.set(xlabel="step", ylabel="r_v2 + r_c2", title=f"held-out reward ({len(val[vs[0]])} prompts, fixed noise)")
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "..", "assets", "shapes_stage2_curve.png"), dpi=100)
    print(f"{run}: {len(steps)} steps, {len(val)} validations -> docs/results/stage2_curve.json, assets/shapes_stage2_curve.png")


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
    if len(sys.argv) == 3 and sys.argv[1] == "stage2":
        take_stage2(sys.argv[2])
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
