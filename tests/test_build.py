"""python data.py build: shot cuts, pairs, the annotators, the manifests it writes, resume, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
from helpers import ROOT, logged, train

FPS = 11  # data.write_video's rate


def shot(seed, n, H=72, W=128):
    """A shot: a smooth random scene the camera pans across (1 to 2 px a frame) with a ball
    crossing it. uint8 (n, H, W, 3)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    field = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 12, 3), dtype=np.uint8)).resize((2 * W, H), Image.BICUBIC))
    pan, color = float(rng.uniform(1, 2)), rng.integers(0, 256, 3)
    yy, xx = np.ogrid[:H, :W]
    frames = []
    for t in range(n):
        x0 = int(t * pan) % W
        f = field[:, x0:x0 + W].copy()
        f[(yy - H / 2) ** 2 + (xx - (10 + 3 * t) % W) ** 2 <= 36] = color
        frames.append(f)
    return np.stack(frames)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Raw videos with known cuts: a.mp4 is three shots of 73 frames (cuts at 73 and 146), b.mp4 two
    of 60 and a last one of 10 frames, too short to be a target; bad.mp4 does not decode."""
    d = tmp_path_factory.mktemp("raw")
    data.write_video(str(d / "a.mp4"), np.concatenate([shot(s, 73) for s in (1, 2, 3)]))
    data.write_video(str(d / "sub" / "b.mp4"), np.concatenate([shot(4, 60), shot(5, 60), shot(6, 10)]))
    (d / "bad.mp4").write_bytes(b"not a video")
    return d


def build(*flags, check=None):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "build", *map(str, flags)],
                       capture_output=True, text=True, cwd=ROOT)
    assert check is None or r.returncode == check, r.stdout + r.stderr
    return r


def rows(path):
    return [json.loads(line) for line in open(path)]


def test_shot_cuts_found_where_they_are(raw, tmp_path):
    """The shot detector finds every cut of videos with cuts at known frames, within one frame, and
    invents none inside a shot, though the camera pans and a ball moves in every shot; a shot shorter
    than --min-shot joins the one before. Catches: a threshold that fires on motion, or misses cuts."""
    starts, n, fps = data.shot_starts(str(raw / "a.mp4"))
    assert (n, fps) == (219, FPS) and len(starts) == 3 and starts[0] == 0
    assert all(abs(s - want) <= 1 for s, want in zip(starts, (0, 73, 146))), starts
    starts, n, _ = data.shot_starts(str(raw / "sub" / "b.mp4"))
    assert n == 130 and [abs(s - w) <= 1 for s, w in zip(starts, (0, 60, 120))] == [True] * 3 and len(starts) == 3
    assert len(data.shot_starts(str(raw / "sub" / "b.mp4"), min_shot=1.0)[0]) == 2  # 10 frames < 1 s: merged
    with pytest.raises(data.VideoError, match="bad.mp4: not a readable video"):
        data.shot_starts(str(raw / "bad.mp4"))


def test_annotation_replies_parsed_or_refused():
    """A reply is used only in the asked form: three tagged parts, none empty, none mentioning the
    videos in the question or the reasoning. Catches: a reply that leaks the answer's video, or a
    half reply, entering the data."""
    ok = "[Question]What next?[/Question][Think]The egg is\n cracked.[/Think][Caption]A hand whisks the egg.[/Caption]"
    assert data.parse_annotation(ok) == {"question": "What next?", "think": "The egg is cracked.",
                                         "caption": "A hand whisks the egg."}
    for bad in (ok.replace("[/Caption]", ""), ok.replace("What next?", " "), ok + ok,
                ok.replace("The egg is", "In Video 2 the egg is"), "whatever"):
        assert data.parse_annotation(bad) is None, bad


def test_build_predictive_and_procedural_then_train(raw, tmp_path):
    """Both ways of building data with --annotator tiny: consecutive shots of raw videos, and the
    steps of a COIN-format file. The manifests hold the pairs in the reader's format (and the
    official CSV), each source video in one split only; the clips are the end of one shot and the
    start of the next; what is bad is skipped with one line and counted, the exit status 0 since pairs
    were written (1 with --strict); a rerun redoes nothing; sft_vlm trains a step on the result. Catches: pairs across the wrong
    boundary, a video in two splits, a bad input that stops the run or vanishes silently."""
    out = tmp_path / "shots"
    r = build("--videos", raw, "--out", out, "--annotator", "tiny", "--csv", "--val-fraction", "0.4",
              "--test-fraction", "0.3", check=0)
    # a: 3 shots -> 2 pairs; b: 3 shots -> 1 pair, the other too short; bad.mp4 does not decode
    assert "skipped: " in r.stderr and "bad.mp4: not a readable video" in r.stderr and "b_001: " in r.stderr
    assert "3 pairs from 3 videos in all; skipped in this run: 1 videos that do not decode, 1 pairs too short" in r.stdout
    r = build("--videos", raw, "--out", tmp_path / "strict", "--annotator", "tiny", "--val-fraction", "0.4",
              "--test-fraction", "0.3", "--strict", check=1)  # the same pairs, and the skips refused
    assert r.stderr.strip().splitlines()[-1] == \
        "error: skipped (--strict): 1 videos that do not decode, 1 pairs too short"
    assert (tmp_path / "strict" / "train.jsonl").read_text() == (out / "train.jsonl").read_text()
    split = {s: rows(out / f"{s}.jsonl") for s in ("train", "val", "test")}
    got = [x for s in split.values() for x in s]
    assert sorted(x["id"] for x in got) == ["a_000", "a_001", "b_000"]
    assert all(len({x["source"] for x in split[s]} & {x["source"] for x in split[t]}) == 0
               for s in split for t in split if s < t)  # a source video is in one split only
    for s in split:
        samples, _ = data.read_manifest(str(out / f"{s}.jsonl"), check_videos=True)
        csv_samples, _ = data.read_manifest(str(out / f"{s}.csv"))
        assert [c["caption"] for c in csv_samples] == [x["caption"] for x in samples]
    pair = next(x for x in got if x["id"] == "a_001")
    assert pair["kind"] == "predictive" and pair["caption"] == "Shot 3 of a begins."
    x, y = (data.read_frames(str(out / pair[k])) for k in ("input_video", "target_video"))
    full = data.read_frames(str(raw / "a.mp4"))
    assert len(x) == 73 and len(y) == 44  # the whole second shot (6.6 s <= 10 s), then 4 s of the third
    assert np.abs(x.astype(int) - full[73:146]).mean() < 3 and np.abs(y.astype(int) - full[146:190]).mean() < 3
    # a rerun redoes nothing, even after a run killed in the middle of a line; other settings are refused
    before = {n: (out / n).read_text() for n in os.listdir(out) if n.endswith(".jsonl")}
    with open(out / "pairs.rank0.jsonl", "a") as f:
        f.write('{"key": "b_0')
    build("--videos", raw, "--out", out, "--annotator", "tiny", "--val-fraction", "0.4", "--test-fraction", "0.3")
    assert {n: (out / n).read_text() for n in before if n != "pairs.rank0.jsonl"} == \
        {n: v for n, v in before.items() if n != "pairs.rank0.jsonl"}
    assert (out / "pairs.rank0.jsonl").read_text() == before["pairs.rank0.jsonl"] + '{"key": "b_0\n'
    r = build("--videos", raw, "--out", out, "--annotator", "tiny", "--min-shot", "1.0")
    assert r.returncode == 1 and "holds files made with other settings (min_shot 0.5 there, 1.0 now)" in r.stderr

    # procedural: COIN's format; one step outside its video, one video with no file
    coin = {"database": {"a": {"class": "MakeTea", "annotation": [
        {"id": "1", "segment": [0.0, 6.6], "label": "boil the water"},
        {"id": "2", "segment": [6.7, 13.2], "label": "put the tea bag in the cup"},
        {"id": "3", "segment": [13.3, 19.9], "label": "pour the water into the cup"},
        {"id": "4", "segment": [30.0, 40.0], "label": "drink the tea"}]},
        "missing": {"annotation": [{"segment": [0, 5], "label": "x"}, {"segment": [5, 9], "label": "y"}]}}}
    (tmp_path / "coin.json").write_text(json.dumps(coin))
    out = tmp_path / "steps"
    r = build("--videos", raw, "--annotations", tmp_path / "coin.json", "--out", out, "--annotator", "tiny", check=0)
    assert "'drink the tea' at 30-40 s, outside the video's 0-19.9 s" in r.stderr
    assert "missing: no video file" in r.stderr
    got = rows(out / "train.jsonl") + rows(out / "val.jsonl") + rows(out / "test.jsonl")
    assert [(x["kind"], x["think"], x["caption"]) for x in got] == [
        ("procedural", "The step just done is: boil the water.", "Put the tea bag in the cup."),
        ("procedural", "The step just done is: put the tea bag in the cup.", "Pour the water into the cup.")]
    # the data train the VLM as they are
    manifest = out / ("train.jsonl" if rows(out / "train.jsonl") else "val.jsonl" if rows(out / "val.jsonl") else "test.jsonl")
    train("sft_vlm.py", ["--model", "tiny", "--finetune", "full", "--train", str(manifest), "--steps", "1",
                         "--batch-size", "2", "--max-new-tokens", "8"], tmp_path / "sft")
    loss = logged(tmp_path / "sft")
    assert (tmp_path / "sft" / "last" / "vlm.safetensors").exists() and len(loss) == 1 and 0 < loss[0] < float("inf")


def test_vlm_annotator_path_retries_then_drops(raw, tmp_path, tiny):
    """The VLM annotator runs a Qwen2.5-VL loaded from a directory as from the hub (here the tiny
    random one, whose replies never parse): both clips go into one prompt, each reply not in the
    asked form is drawn again --retries times, then the pair is dropped and counted, and nothing
    of it is written. Catches: a model path that does not load, a reply used unparsed."""
    vlm, _ = tiny
    vlm.model.save_pretrained(tmp_path / "annotator")
    vlm.processor.save_pretrained(tmp_path / "annotator")
    (tmp_path / "one").mkdir()
    os.link(raw / "a.mp4", tmp_path / "one" / "a.mp4")
    r = build("--videos", tmp_path / "one", "--out", tmp_path / "out", "--annotator", tmp_path / "annotator",
              "--device", "cpu", "--retries", "1", check=1)
    assert r.stderr.count("the annotator's reply was not in the asked form after 2 tries") == 2
    assert "0 pairs from 1 videos in all; skipped in this run: 2 replies not in the asked form" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == "error: no pairs written: 2 replies not in the asked form"
    assert not os.listdir(tmp_path / "out" / "clips")
    annotator = data.VLMAnnotator(str(tmp_path / "annotator"), __import__("torch").device("cpu"), max_new_tokens=4)
    pair = {"steps": None, "kind": "predictive", "fps": 11.0, "input_frames": data.read_frames(str(raw / "a.mp4"))[:73],
            "target_frames": data.read_frames(str(raw / "a.mp4"))[73:117]}
    inp = annotator.processor(text=[annotator.prompt(pair)], videos=[pair["input_frames"][:8], pair["target_frames"][:8]],
                              return_tensors="pt")
    vpad = annotator.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert annotator.prompt(pair).count("<|video_pad|>") == 2  # both clips, one prompt, each its tokens
    assert (inp["input_ids"] == vpad).sum().item() == inp["video_grid_thw"].prod(1).sum().item() // 4
    assert len(annotator([pair])) == 1


def test_build_shards_over_ranks_and_reads_youcook2(raw, tmp_path):
    """Under torchrun each rank takes every other video and writes its own pairs file; the manifests
    are those of one process. YouCook2's format reads as COIN's; an annotation file of neither is one
    error line. Catches: ranks doing the same videos twice, or a rank's pairs missing from the split."""
    one, two = tmp_path / "one", tmp_path / "two"
    build("--videos", raw, "--out", one, "--annotator", "tiny", check=0)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "data.py"), "build", "--videos", str(raw), "--out", str(two), "--annotator",
                        "tiny", "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "3 pairs from 3 videos in all" in r.stdout, r.stdout + r.stderr
    assert {x["key"] for x in rows(two / "pairs.rank0.jsonl")} == {"a_000", "a_001"}  # rank 0: a.mp4 (and bad.mp4)
    assert {x["key"] for x in rows(two / "pairs.rank1.jsonl")} == {"b_000", "b_001"}  # rank 1: b.mp4
    for split in ("train", "val", "test"):
        assert (one / f"{split}.jsonl").read_text() == (two / f"{split}.jsonl").read_text()
    yc = {"database": {"v": {"recipe_type": "113", "annotations": [{"segment": [5, 9], "id": 1, "sentence": "add salt"},
                                                                   {"segment": [0, 4], "id": 0, "sentence": "cut onions"}]}}}
    (tmp_path / "yc.json").write_text(json.dumps(yc))
    assert data.read_steps(str(tmp_path / "yc.json")) == {"v": {"task": "113", "steps": [(0.0, 4.0, "cut onions"),
                                                                                        (5.0, 9.0, "add salt")]}}
    (tmp_path / "bad.json").write_text("[1, 2]")
    r = build("--videos", raw, "--annotations", tmp_path / "bad.json", "--out", tmp_path / "x", "--annotator", "tiny")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "error: --annotations ") and "not a COIN or YouCook2 annotation file" in r.stderr
