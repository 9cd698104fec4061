"""Reading clips and manifests, the reference clip, the training data's batches."""

import json
import os
import re

import numpy as np
import pytest
import torch

import data
from helpers import H, W, T, moving_clip


def test_clip_reading(files):
    """Reading clips: all frames, a uniform reference clip whose first frame is the input's first,
    an image as a static clip, aspect-preserving crop. Catches: frames read out of order, an image
    that moves, a stretched frame."""
    frames = data.read_frames(str(files / "clip.mp4"))
    assert frames.shape == (40, 96, 160, 3)
    clip = data.load_clip(str(files / "clip.mp4"), T, H, W)
    assert clip.shape == (T, H, W, 3) and clip.dtype == np.uint8
    # first and last input frames are the clip's first and last; the square moves right
    torch.testing.assert_close(torch.from_numpy(clip[0]).float(), torch.from_numpy(
        data.resize_crop(frames[:1], H, W)[0]).float(), rtol=0, atol=0)
    cols = lambda f: np.nonzero((f[..., 0] > 200) & (f[..., 1] < 120))[1].mean()
    assert cols(clip[-1]) > cols(clip[0]) + 40
    img = data.load_clip(str(files / "image.png"), T, H, W)  # a still clip of the picture (conftest's moving_clip frame)
    assert np.array_equal(img, data.resize_crop(np.repeat(moving_clip(1, 90, 120), T, 0), H, W))
    assert data.uniform_indices(40, 6) == [0, 8, 16, 23, 31, 39]
    # the aspect-ratio crop keeps the centre: bands at both sides are cut away
    side = np.full((1, 90, 300, 3), 77, np.uint8)
    side[:, :, :50] = side[:, :, -50:] = 0
    r = data.resize_crop(side, H, W)
    assert r.shape == (1, H, W, 3) and (r == 77).all()


def test_reference_clip_choices(files):
    """Which input frames make the 33-frame reference clip, for a long and a short input. Catches: a
    mode reading other frames than it says, a short clip refused or of another length."""
    assert data.clip_indices(40, 5, "first") == [0, 1, 2, 3, 4]
    assert data.clip_indices(40, 5, "last") == [35, 36, 37, 38, 39]
    assert data.clip_indices(40, 5, "uniform") == [0, 10, 20, 29, 39]
    assert data.clip_indices(3, 5, "first") == [0, 1, 2, 2, 2]  # held at its last frame
    assert data.clip_indices(3, 5, "last") == [0, 0, 0, 1, 2]  # its first frame repeated in front
    assert data.clip_indices(3, 5, "uniform") == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="expected one of first, last, uniform"):
        data.clip_indices(3, 5, "middle")
    frames = data.resize_crop(data.read_frames(str(files / "clip.mp4")), H, W)  # all 40 frames
    for mode, idx in (("first", range(T)), ("last", range(40 - T, 40))):
        assert np.array_equal(data.load_clip(str(files / "clip.mp4"), T, H, W, mode), frames[list(idx)])
    two = data.resize_crop(data.read_frames(str(files / "two.mp4")), H, W)
    clip = data.load_clip(str(files / "two.mp4"), T, H, W, "first")
    assert clip.shape == (T, H, W, 3) and np.array_equal(clip[0], two[0]) and (clip[1:] == two[1]).all()


@pytest.mark.parametrize("name, msg", [("missing.mp4", "no such file"), ("notvideo.mp4", "not a readable video"),
                                       ("truncated.mp4", "not a readable video")])
def test_bad_video_errors(files, name, msg):
    """A missing, non-video or truncated file is a VideoError naming it. Catches: decord's C-level
    errors leaking through."""
    with pytest.raises(data.VideoError, match=re.escape(msg)):
        data.load_clip(str(files / name), T, H, W)


def test_manifest(tmp_path, files):
    """The JSON Lines manifest: paths relative to it, optional fields, one error per kind of bad line;
    the release's CSV with and without its byte-order mark. Catches: a CSV whose first column is
    lost to the mark, a bad line found later, paths taken relative to the working directory."""
    good = {"input_video": "clip.mp4", "question": "q", "think": "t", "caption": "c", "target_video": "clip.mp4"}
    os.symlink(files / "clip.mp4", tmp_path / "clip.mp4")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({**good, "kind": "predictive", "id": "a"}) + "\n\n" + json.dumps(good) + "\n")
    s, skipped = data.read_manifest(str(m))
    assert skipped == []
    assert [x["id"] for x in s] == ["a", "3"] and s[0]["kind"] == "predictive" and s[1]["kind"] is None
    assert s[0]["input_video"] == str(tmp_path / "clip.mp4")
    cases = [("{not json", r"m\.jsonl:2: not valid JSON"),
             (json.dumps({**good, "caption": ""}), r"m\.jsonl:2: missing or empty field\(s\) caption"),
             (json.dumps({**good, "target_video": "nope.mp4"}), r"m\.jsonl:2: target_video 'nope\.mp4' does not exist"),
             (json.dumps({**good, "kind": "other"}), r"m\.jsonl:2: kind must be")]
    for line, msg in cases:
        m.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(data.ManifestError, match=msg):
            data.read_manifest(str(m))
    # the official CSV, as the release writes it (utf-8-sig: a byte-order mark before its first column,
    # which a plain utf-8 reader sees as part of the name '\ufeffoutput_video_path'), and without the mark
    os.symlink(files / "short.mp4", tmp_path / "short.mp4")
    header, line = "output_video_path,input_video_path,ENG_Instruction,ENG_Think,ENG_GT_Caption\n", \
        "short.mp4,clip.mp4,What next?,Because.,It falls.\n"
    for encoding in ("utf-8-sig", "utf-8"):
        c = tmp_path / "m.csv"
        c.write_text(header + line, encoding=encoding)
        assert c.read_bytes().startswith(b"\xef\xbb\xbf") == (encoding == "utf-8-sig")
        (row,), _ = data.read_manifest(str(c))
        assert (row["question"], row["think"], row["caption"]) == ("What next?", "Because.", "It falls.")
        assert row["target_video"] == str(tmp_path / "short.mp4") and row["input_video"] == str(tmp_path / "clip.mp4")


def test_large_frames_decode_at_a_bounded_size(tmp_path):
    """A 4000x4000 JPEG (and any frame over data.MAX_PIXELS) is decoded at most MAX_PIXELS large, so
    reading 33 copies of it stays small; the picture is the same, only smaller. Catches: decoding at
    full size and repeating before resizing (an 8000x8000 JPEG then asks for 25 GB)."""
    from PIL import Image
    yy, xx = np.mgrid[0:4000, 0:4000]
    big = np.stack([(xx * 255 // 3999), (yy * 255 // 3999), np.full_like(xx, 128)], -1).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    n, (h, w) = data.probe(str(tmp_path / "big.jpg"))
    side = int(4000 * (data.MAX_PIXELS / 4000 ** 2) ** 0.5 / 2) * 2  # 1444
    assert n == 1 and (h, w) == (side, side) and h * w <= data.MAX_PIXELS
    frames = data.read_vlm_frames(str(tmp_path / "big.jpg"))
    assert frames.shape == (6, h, w, 3)
    small = np.asarray(Image.fromarray(big).resize((w, h), Image.BILINEAR)).astype(float)
    assert np.abs(frames[0].astype(float) - small).mean() < 2  # the same picture (JPEG loss aside)
    clip = data.load_clip(str(tmp_path / "big.jpg"), T, 352, 640)
    assert clip.shape == (T, 352, 640, 3) and (clip == clip[0]).all()


def test_manifest_validation_and_skip_bad(tmp_path, files):
    """Every bad manifest line is one error naming its line; --skip-bad keeps the good ones and
    counts the rest. Catches: a bad line found hours into training, a silently dropped sample."""
    good = {"input_video": "clip.mp4", "question": "q", "think": "t", "caption": "c", "target_video": "clip.mp4"}
    for name in ("clip.mp4", "short.mp4", "truncated.mp4"):
        os.symlink(files / name, tmp_path / name)
    lines = [good, {**good, "question": None}, {**good, "input_video": "short.mp4"},
             {**good, "target_video": "truncated.mp4"}, {**good, "input_video": "gone.mp4"}, good]
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(x) for x in lines) + "\n{oops\n")
    # the first bad line stops the read; with skip_bad every bad line is skipped, its error kept
    with pytest.raises(data.ManifestError, match=r"m\.jsonl:2: missing or empty field\(s\) question"):
        data.read_manifest(str(m), check_videos=True, min_frames=33)
    kept, skipped = data.read_manifest(str(m), check_videos=True, min_frames=33, skip_bad=True)
    assert [s["id"] for s in kept] == ["1", "6"] and len(skipped) == 5
    want = [r"m\.jsonl:2: missing or empty field\(s\) question",
            r"m\.jsonl:3: input_video 'short\.mp4' has 10 frames, need at least 33",
            r"m\.jsonl:4: .*truncated\.mp4: not a readable video",
            r"m\.jsonl:5: input_video 'gone\.mp4' does not exist",
            r"m\.jsonl:7: not valid JSON"]
    for msg, pattern in zip(skipped, want):
        assert re.search(pattern, msg) and "\n" not in msg, msg
    kept, skipped = data.read_manifest(str(m), check_files=False, skip_bad=True)  # only the text is checked
    assert [s["id"] for s in kept] == ["1", "3", "4", "5", "6"] and len(skipped) == 2


def test_step_sampler_is_a_resumable_sharded_permutation():
    """The batch order: a fresh permutation each epoch, ranks disjoint within a step, a resumed
    sampler continuing the same order, another seed another order. Catches: ranks training on the
    same samples, a resume that restarts the epoch."""
    n, B, world = 10, 2, 2
    rank_batches = [list(data.StepSampler(n, B, r, world, seed=3, steps=10)) for r in range(world)]
    stream = [i for s in range(10) for r in range(world) for i in rank_batches[r][s]]
    for e in range(4):  # the global order is a fresh permutation every epoch ...
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]
    # ... ranks never share a sample within a step, and a resumed sampler continues the same order
    assert all(not set(rank_batches[0][s]) & set(rank_batches[1][s]) for s in range(2))
    assert list(data.StepSampler(n, B, 1, world, seed=3, start=6, steps=10)) == rank_batches[1][6:]
    assert rank_batches[0] == list(data.StepSampler(n, B, 0, world, seed=3, steps=10))
    assert rank_batches[0] != list(data.StepSampler(n, B, 0, world, seed=4, steps=10))


def test_clip_dataset_and_workers(shapes_small, files, capfd):
    """ClipDataset: the same items with or without workers, and a clip that breaks mid-run replaced
    by the next sample, with a warning and a count. Catches: batches that depend on worker
    scheduling, a crash or a shrunken batch on one bad clip."""
    samples, _ = data.read_manifest(str(shapes_small / "train.jsonl"))
    ds = data.ClipDataset(samples, ("vlm", "clip", "target"), frames=9, height=32, width=48, vlm_frames=6)
    item = ds[0]
    assert item["vlm"].shape == (6, 32, 64, 3) and item["clip"].shape == (9, 32, 48, 3)
    assert np.array_equal(item["target"], data.load_clip(samples[0]["target_video"], 9, 32, 48))
    sampler = lambda: data.StepSampler(len(ds), 3, seed=1, steps=4)
    batches = [list(torch.utils.data.DataLoader(ds, batch_sampler=sampler(), num_workers=w, collate_fn=data.collate))
               for w in (0, 2)]
    assert len(batches[0]) == len(batches[1]) == 4
    for a, b in zip(*batches):
        assert a["id"] == b["id"] and torch.equal(a["clip"], b["clip"]) and a["clip"].shape == (3, 9, 32, 48, 3)
    # a clip that breaks after validation: a warning naming it, the next sample in its place, counted
    broken = {**samples[1], "target_video": str(files / "truncated.mp4")}
    ds = data.ClipDataset([samples[0], broken, samples[2]], ("target",), frames=9, height=32, width=48)
    batch = data.collate([ds[i] for i in range(3)])
    assert batch["skipped"] == 1 and batch["id"] == [samples[0]["id"], samples[2]["id"], samples[2]["id"]]
    assert batch["index"] == [0, 2, 2]  # the sample actually loaded
    assert re.fullmatch(r"warning: .*truncated\.mp4: not a readable video.*; using the next sample\n",
                        capfd.readouterr().err)
    assert ds.try_load(broken) is None and ds.try_load(samples[0])["id"] == samples[0]["id"]  # validation's way
    assert re.fullmatch(r"warning: .*truncated\.mp4: not a readable video.*; left out\n", capfd.readouterr().err)


def test_small_frames_are_refused_as_inputs_only(tmp_path):
    """An input of 16x20 frames is refused (by probe and by a manifest's input_video), but the same file
    as a target or a model's output reads as it is. Catches: eval failing on its own small outputs after
    generating them, or a size check that lets an unusable input through."""
    data.write_video(str(tmp_path / "small.mp4"), np.zeros((5, 16, 20, 3), np.uint8))
    data.write_video(str(tmp_path / "ok.mp4"), np.zeros((5, 32, 48, 3), np.uint8))
    with pytest.raises(data.VideoError, match=r"small\.mp4: frames of 20x16 pixels; need at least 28 a side"):
        data.probe(str(tmp_path / "small.mp4"))
    assert data.read_frames(str(tmp_path / "small.mp4")).shape == (5, 16, 20, 3)
    row = {"question": "q", "think": "t", "caption": "c"}
    for name, inp, tgt, ok in (("a", "small.mp4", "ok.mp4", False), ("b", "ok.mp4", "small.mp4", True)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({**row, "input_video": inp, "target_video": tgt}) + "\n")
        if ok:
            assert len(data.read_manifest(str(tmp_path / f"{name}.jsonl"), check_videos=True)[0]) == 1
        else:
            with pytest.raises(data.ManifestError, match=r"a\.jsonl:1: .*small\.mp4: frames of 20x16 pixels"):
                data.read_manifest(str(tmp_path / f"{name}.jsonl"), check_videos=True)
