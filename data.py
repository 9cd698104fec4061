"""
VANS data: reading and writing clips, frame sampling, and the sample manifest.

A manifest is JSON Lines, one sample a line, paths relative to the manifest:
    {"input_video": "in/0001.mp4", "question": "What should I do next?",
     "think": "...", "caption": "...", "target_video": "out/0001.mp4",
     "id": "0001", "kind": "procedural"}          # id, kind (and event) are optional
The official release's CSV columns (input_video_path, output_video_path,
ENG_Instruction, ENG_Think, ENG_GT_Caption) are read too.

Every reader fails with a VideoError / ManifestError whose message is one line
naming the file (and manifest line) and what was expected.
"""

import contextlib
import csv
import json
import os
import re
import sys

import numpy as np

# torch is imported where it is used, so that infer.py can check its inputs in a fraction of a second

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class VideoError(ValueError):
    pass


class ManifestError(ValueError):
    pass


# -----------------------------------------------------------------------------
# reading clips

@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (ffmpeg / decord log lines) for a block: our own
    one-line error replaces them."""
    fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)


def uniform_indices(n_total, n):
    """n indices spread uniformly over [0, n_total - 1], first and last included
    (as qwen-vl-utils samples video frames)."""
    import torch
    return torch.linspace(0, n_total - 1, n).round().long().tolist()


MAX_PIXELS = 1920 * 1088  # larger frames are decoded downscaled: the models need at most 768 x 28 x 28 (VLM) pixels
MIN_SIDE, MAX_ASPECT = 28, 4.0  # an input with smaller or more elongated frames is refused: nothing can be read from it


def _fit(h, w):
    """The size to decode an h x w frame at: at most MAX_PIXELS, so memory stays bounded however
    large the file."""
    s = min(1.0, (MAX_PIXELS / (h * w)) ** 0.5)
    return (h, w) if s == 1 else (int(h * s / 2) * 2, int(w * s / 2) * 2)  # even sides, at most MAX_PIXELS


def check_usable(path, size):
    """VideoError unless frames of size (h, w) can be answered about (an input: not the models' outputs)."""
    h, w = size
    if min(h, w) < MIN_SIDE or max(h, w) / min(h, w) > MAX_ASPECT:
        raise VideoError(f"{path}: frames of {w}x{h} pixels; need at least {MIN_SIDE} a side and at most {MAX_ASPECT:g}:1")


def _open(path):
    """-> (reader, n_frames, (height, width) of the frames it returns); reader(indices) -> uint8
    (len(indices), height, width, 3). Frames over MAX_PIXELS are decoded downscaled."""
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    if path.lower().endswith(IMAGE_EXTS):
        from PIL import Image
        try:
            with Image.open(path) as im:
                h, w = _fit(im.height, im.width)
                im.draft("RGB", (w, h))  # a JPEG decodes at 1/2, 1/4 or 1/8 of its size if that is enough
                frame = np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR))
        except Exception as e:
            raise VideoError(f"{path}: cannot read image ({type(e).__name__})") from None
        return (lambda idx: np.repeat(frame[None], len(idx), axis=0)), 1, (h, w)
    import decord
    try:
        with _quiet_stderr():
            vr = decord.VideoReader(path, num_threads=1)
            n = len(vr)
            if n:
                native = tuple(vr[0].shape[:2])
                h, w = _fit(*native)
                if (h, w) != native:
                    vr = decord.VideoReader(path, num_threads=1, height=h, width=w)
    except Exception:
        raise VideoError(f"{path}: not a readable video (corrupt, truncated, or not a video file)") from None
    if n == 0:
        raise VideoError(f"{path}: video has no frames")

    def read(idx):
        try:
            with _quiet_stderr():
                return vr.get_batch(list(idx)).asnumpy()
        except Exception:
            raise VideoError(f"{path}: decoding failed (the file is corrupt or truncated)") from None
    return read, n, (h, w)


def probe(path):
    """Check that a video or image can be answered about, in a fraction of a second: it exists,
    decodes, and its frames are of a usable size. -> (n_frames, (height, width)); VideoError if not."""
    read, n, size = _open(path)
    check_usable(path, size)
    read([0])
    return n, size


def read_frames(path, n=None, min_frames=1):
    """Read a clip as uint8 (T, H, W, 3): all frames, or n spread uniformly.
    An image is a static clip: its one frame repeated n times."""
    read, total, _ = _open(path)
    is_image = path.lower().endswith(IMAGE_EXTS)
    if not is_image and total < min_frames:
        raise VideoError(f"{path}: has {total} frames, need at least {min_frames}")
    if n is None:
        return read(range(total))
    return read([0] * n) if is_image else read(uniform_indices(total, n))


def vlm_frame_indices(total, n=6):
    """The frames the VLM sees, as the release's qwen-vl-utils picks them (fps 1, min = max = 6
    frames, an even count): n spread uniformly, or for a clip of fewer than n frames its largest even
    number of frames (2 of 2 or 3, 4 of 4 or 5); a single frame (an image) is repeated n times."""
    k = n if total >= n else total - total % 2
    return uniform_indices(total, k) if k >= 2 else [0] * n


def read_vlm_frames(path, n=6):
    """The VLM's frames of a video or image: uint8 (k, H, W, 3) at the file's size (vlm_frame_indices)."""
    read, total, _ = _open(path)
    return read(vlm_frame_indices(1 if path.lower().endswith(IMAGE_EXTS) else total, n))


REF_CLIPS = ("first", "last", "uniform")


def clip_indices(total, n, mode):
    """Which n frames of a total-frame input make the reference clip:
        first    frames 0..n-1 at the clip's own rate (DiffSynth's video reader, from the start)
        last     the last n frames, the ones just before what is to be predicted
        uniform  n frames spread over the whole input, first and last included
    A clip shorter than n is held: first repeats its last frame at the end, last its first frame
    in front, uniform repeats frames throughout (a slower clip)."""
    if mode == "uniform":
        return uniform_indices(total, n)
    if mode == "first":
        return [min(i, total - 1) for i in range(n)]
    if mode == "last":
        return [max(total - n + i, 0) for i in range(n)]
    raise ValueError(f"reference clip {mode!r}: expected one of {', '.join(REF_CLIPS)}")


def resize_crop(frames, height, width):
    """uint8 (T, H, W, 3) -> uint8 (T, height, width, 3): scale so the clip
    covers height x width (bilinear, antialiased), then center-crop."""
    import torch
    import torch.nn.functional as F
    T, H, W, _ = frames.shape
    if (H, W) == (height, width):
        return np.ascontiguousarray(frames)
    scale = max(height / H, width / W)
    h, w = max(height, round(H * scale)), max(width, round(W * scale))
    top, left = (h - height) // 2, (w - width) // 2
    out = []
    for i in range(0, T, 8):  # 8 frames at a time: float copies of large frames stay small
        x = torch.from_numpy(np.ascontiguousarray(frames[i:i + 8])).permute(0, 3, 1, 2).float()  # (t, 3, H, W)
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        out.append(x[:, :, top:top + height, left:left + width].round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out).permute(0, 2, 3, 1).numpy()


def load_clip(path, n_frames, height, width, mode="uniform"):
    """A clip of n_frames (clip_indices' mode) resized/cropped to height x width: uint8
    (n_frames, height, width, 3). An image is a static clip."""
    read, total, _ = _open(path)
    idx = [0] * n_frames if path.lower().endswith(IMAGE_EXTS) else clip_indices(total, n_frames, mode)
    return resize_crop(read(idx), height, width)


def to_tensor(frames, dtype=None):
    """uint8 (T, H, W, 3) -> (3, T, H, W) in [-1, 1], the VAE's input, computed in dtype (default
    float32; in bf16 as the release does); a batch (B, T, H, W, 3) -> (B, 3, T, H, W). numpy or torch."""
    import torch
    return torch.as_tensor(np.ascontiguousarray(frames)).movedim(-1, -4).to(dtype or torch.float32) / 127.5 - 1.0


def to_uint8(video, truncate=False):
    """(3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3) numpy: rounded in float32, or with truncate in
    the video's own dtype and truncated (the release's conversion)."""
    import torch
    x = (video + 1) * 127.5 if truncate else ((video.float().clamp(-1, 1) + 1) * 127.5).round()
    return x.clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def write_video(path, frames, fps=11):
    """Write uint8 (T, H, W, 3) as H.264 mp4 (yuv420p, so H and W must be even). The same frames
    give the same file: x264's lookahead and macroblock tree are off, since with them the
    bitstream varies from run to run."""
    import av
    T, H, W, _ = frames.shape
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18", "x264-params": "rc-lookahead=0:mbtree=0"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode())


# -----------------------------------------------------------------------------
# the manifest

FIELDS = ("input_video", "question", "think", "caption", "target_video")
CSV_FIELDS = {"input_video_path": "input_video", "ENG_Instruction": "question", "ENG_Think": "think",
              "ENG_GT_Caption": "caption", "output_video_path": "target_video"}


def _video_frames(path, usable=False):
    """Frame count of a video (an image counts as a clip of any length); VideoError if unreadable, or
    with usable if its frames cannot be answered about (check_usable)."""
    _, n, size = _open(path)
    if usable:
        check_usable(path, size)
    return 10 ** 9 if path.lower().endswith(IMAGE_EXTS) else n


def read_manifest(path, check_files=True, check_videos=False, min_frames=1, skip_bad=False):
    """Read a .jsonl (or the official .csv) manifest -> (samples, skipped).

    samples: dicts with FIELDS (paths made absolute), id, kind and event. Each line is
    validated: required fields present, video files exist (check_files), open as videos
    with at least min_frames frames (check_videos). A bad line raises ManifestError naming
    the line and the problem; with skip_bad it is skipped instead and its error appended
    to `skipped`."""
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: no such manifest")
    root = os.path.dirname(os.path.abspath(path))
    if path.endswith(".csv"):  # the release writes its CSVs with a byte-order mark (utf-8-sig)
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(i + 2, {CSV_FIELDS.get(k.lstrip("\ufeff"), k): v for k, v in row.items()})
                    for i, row in enumerate(csv.DictReader(f))]
    else:
        with open(path, encoding="utf-8") as f:
            rows = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    samples, skipped = [], []
    for i, row in rows:
        try:
            samples.append(_sample(row, i, root, check_files, check_videos, min_frames))
        except (ManifestError, VideoError) as e:
            msg = f"{path}:{i}: {e}"
            if not skip_bad:
                raise ManifestError(msg) from None
            skipped.append(msg)
    return samples, skipped


def read_manifests(args, min_frames):
    """(train, val) samples of --train / --val (if the script has it), validated down to the videos; a bad line is a
    one-line error, or with --skip-bad skipped and counted."""
    import common
    for flag, path in (("train", args.train), ("val", getattr(args, "val", None))):  # both before any video is read
        if path and not os.path.isfile(path):
            sys.exit(f"error: --{flag} {path}: no such manifest")
    try:
        train, bad = read_manifest(args.train, check_videos=True, min_frames=min_frames, skip_bad=args.skip_bad)
        val, bad_val = read_manifest(args.val, check_videos=True, min_frames=min_frames,
                                     skip_bad=args.skip_bad) if getattr(args, "val", None) else ([], [])
    except (ManifestError, VideoError) as e:
        sys.exit(f"error: {e}")
    for name, kept, skipped in (("train", train, bad), ("val", val, bad_val)):
        if kept or skipped:
            common.print0(f"{name}: {len(kept)} samples" + (f", {len(skipped)} skipped (first: {skipped[0]})" if skipped else ""))
    if not train:
        sys.exit(f"error: {args.train}: no usable samples")
    return train, val


def _sample(row, line, root, check_files, check_videos, min_frames):
    """One manifest row (a JSON line or a CSV dict) -> a sample dict; ManifestError / VideoError if bad."""
    if isinstance(row, str):
        try:
            row = json.loads(row)
        except json.JSONDecodeError as e:
            raise ManifestError(f"not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in FIELDS if not isinstance(row.get(k), str) or not row[k]]
    if missing:
        raise ManifestError(f"missing or empty field(s) {', '.join(missing)}")
    s = {k: row[k] for k in FIELDS}
    s["id"] = str(row.get("id", line))
    s["kind"] = row.get("kind") or None
    s["event"] = row.get("event")  # the Shapes world's ground-truth event (optional)
    s["caption_specific"] = row.get("caption_specific")  # and its fully specified caption (optional)
    if s["kind"] not in (None, "procedural", "predictive"):
        raise ManifestError(f"kind must be procedural or predictive, got {s['kind']!r}")
    for k in ("input_video", "target_video"):
        s[k] = os.path.join(root, s[k])
        if (check_files or check_videos) and not os.path.isfile(s[k]):
            raise ManifestError(f"{k} {row[k]!r} does not exist")
        if check_videos:
            n = _video_frames(s[k], usable=k == "input_video")
            if n < min_frames:
                raise VideoError(f"{k} {row[k]!r} has {n} frames, need at least {min_frames}")
    return s


# -----------------------------------------------------------------------------
# training data: decoded samples, and a resumable batch order sharded by rank

class ClipDataset:
    """Decoded manifest samples for training. Item i: the text fields, plus what `parts` asks for
        vlm     uint8 (k, H0, W0, 3)              the VLM's frames (read_vlm_frames), native size
        clip    uint8 (frames, height, width, 3)  the reference clip, read as infer.py reads it (ref_clip)
        target  uint8 (frames, height, width, 3)  the target, uniform over the target video
    Decoding is deterministic, so DataLoader workers need no seeding. A clip that fails to
    decode mid-run (read_manifest checked it opens) does not stop training: a one-line warning
    names it and the next sample takes its place (item["skipped"] counts the replacements,
    item["index"] is the sample's index), so a batch never shrinks and DDP ranks stay in step."""

    def __init__(self, samples, parts, frames=33, height=352, width=640, vlm_frames=6, ref_clip="uniform"):
        self.samples, self.parts, self.ref_clip = samples, parts, ref_clip
        self.frames, self.height, self.width, self.vlm_frames = frames, height, width, vlm_frames

    def __len__(self):
        return len(self.samples)

    def load(self, s):
        item = {k: s[k] for k in ("id", "question", "think", "caption", "event")}
        if "vlm" in self.parts:
            item["vlm"] = read_vlm_frames(s["input_video"], self.vlm_frames)
        if "clip" in self.parts:
            item["clip"] = load_clip(s["input_video"], self.frames, self.height, self.width, self.ref_clip)
        if "target" in self.parts:
            item["target"] = load_clip(s["target_video"], self.frames, self.height, self.width)
        return item

    def try_load(self, s):
        """load(s), or None with a one-line warning if a clip fails to decode (for validation)."""
        try:
            return self.load(s)
        except VideoError as e:
            print(f"warning: {e}; left out", file=sys.stderr, flush=True)
            return None

    def __getitem__(self, i):
        for skipped in range(len(self.samples)):
            try:
                j = (i + skipped) % len(self.samples)
                return {**self.load(self.samples[j]), "index": j, "skipped": skipped}
            except VideoError as e:
                print(f"warning: {e}; using the next sample", file=sys.stderr, flush=True)
        raise VideoError("every sample of the dataset failed to decode")


def collate(items):
    """List of items -> dict: lists of texts and VLM frames, stacked uint8 clip / target (B, T, H, W, 3)."""
    import torch
    batch = {k: [it[k] for it in items] for k in items[0] if k not in ("clip", "target", "skipped")}
    for k in ("clip", "target"):
        if k in items[0]:
            batch[k] = torch.from_numpy(np.stack([it[k] for it in items]))
    batch["skipped"] = sum(it.get("skipped", 0) for it in items)
    return batch


class StepSampler:
    """Batch order for training: an endless stream of seeded permutations of the dataset
    (epoch e is randperm(n) with seed + e), cut into global batches of batch_size * world;
    rank r takes the r-th slice of each. Step s's batch depends on (seed, s) only, so the
    step is the whole data-position state: a resumed run reads on exactly where it stopped.
    Yields this rank's index lists for steps start..steps-1 (a DataLoader batch_sampler)."""

    def __init__(self, n, batch_size, rank=0, world=1, seed=0, start=0, steps=10 ** 12):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start, self.steps, self._perms = start, steps, {}

    def batch(self, step):
        """Rank's dataset indices for a step."""
        import torch
        first = (step * self.world + self.rank) * self.batch_size  # position in the endless stream
        out = []
        for p in range(first, first + self.batch_size):
            epoch = p // self.n
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
            out.append(int(self._perms[epoch][p % self.n]))
        return out

    def __iter__(self):
        return (self.batch(s) for s in range(self.start, self.steps))

    def __len__(self):
        return self.steps - self.start


# -----------------------------------------------------------------------------
# building training data from raw videos: python data.py build
#
#   predictive  --videos DIR: every video cut into shots (shot_starts), each shot paired with the
#               next; the input clip is the end of the first (its last --input-seconds), the target
#               the start of the second (its first --target-seconds)
#   procedural  --annotations FILE --videos DIR: COIN's or YouCook2's JSON, each step paired with
#               the next, cut the same way
# An annotator sees both clips, as the paper's did, and writes the question, the reasoning and the
# caption of the second (annotate). Rank r of a torchrun job takes every r-th video; every pair is
# appended to <out>/pairs.rank<r>.jsonl as it is done, so a rerun skips it; at the end rank 0
# splits the pairs by source video into train / val / test manifests.

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")

# Our prompt, written for this job (the release's Gemini prompts are not reused). {hint} carries the
# step labels of an annotated video, or nothing for two consecutive shots.
ANNOTATION_PROMPT = """Video 1 shows what has happened so far; Video 2 shows what happens right after it.{hint}
Write training data for a model that watches only Video 1, reads a user's question, and must answer with
a description of what happens next, which a video generator then turns into a clip like Video 2.
- Question: what a user watching Video 1 would ask, {ask}. It must not reveal what happens in Video 2.
- Think: two to four sentences of reasoning from what Video 1 shows (people, objects, where things
  are, what was just done) to what must come next. Do not mention Video 2 or any clip.
- Caption: one or two sentences describing the event of Video 2 as a camera sees it: who does what,
  to which objects, where. Name the objects and their look (colour, shape) so that the event could be
  filmed from the caption alone.
Answer in exactly this form:
[Question]...[/Question][Think]...[/Think][Caption]...[/Caption]"""
ASK = {"procedural": "such as what to do next toward the task's goal",
       "predictive": "such as what will happen next, or what would happen if something changed"}
LEAKS = ("video 1", "video 2", "second video", "first video", "the clip", "next clip")


def parse_annotation(text):
    """An annotator's reply -> {"question", "think", "caption"}, or None if it is not in the asked
    form: every tag present once, every part non-empty, no mention of the videos themselves in
    the question or the reasoning, at most 80 words a part."""
    parts = {}
    for key, tag in (("question", "Question"), ("think", "Think"), ("caption", "Caption")):
        found = re.findall(rf"\[{tag}\](.*?)\[/{tag}\]", text, re.S)
        if len(found) != 1 or not found[0].strip() or len(found[0].split()) > 80:
            return None
        parts[key] = " ".join(found[0].split())
    if any(leak in parts[k].lower() for k in ("question", "think") for leak in LEAKS):
        return None
    return parts


class TemplateAnnotator:
    """--annotator tiny: no model; writes the three parts from what the pair is given (the step
    labels of an annotated video, else the shot numbers). For tests and dry runs of the pipeline."""

    def __call__(self, pairs):
        out = []
        for p in pairs:
            if p["steps"]:
                done, todo = p["steps"]
                out.append(f"[Question]What should I do next?[/Question][Think]The step just done is: {done}."
                           f"[/Think][Caption]{todo[:1].upper() + todo[1:]}.[/Caption]")
            else:
                out.append(f"[Question]What happens next?[/Question][Think]This is shot {p['index'] + 1} of "
                           f"{p['source']}.[/Think][Caption]Shot {p['index'] + 2} of {p['source']} begins.[/Caption]")
        return out


class VLMAnnotator:
    """A Qwen2.5-VL instruct model through transformers (hub id or local directory, loaded with
    safetensors, no remote code), shown both clips: 8 frames each at their own frame rate."""

    def __init__(self, name, device, frames=8, max_new_tokens=400, temperature=0.7):
        import torch
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, dtype=dtype, use_safetensors=True).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(name)
        self.processor.tokenizer.padding_side = "left"
        self.frames, self.max_new_tokens, self.temperature = frames, max_new_tokens, temperature

    def prompt(self, p):
        hint = (f" The steps, as annotated: Video 1 is \"{p['steps'][0]}\", Video 2 is \"{p['steps'][1]}\"."
                if p["steps"] else "")
        task = f" The task: {p['task']}." if p.get("task") else ""
        text = ANNOTATION_PROMPT.format(hint=hint + task, ask=ASK[p["kind"]])
        return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "Video 1: <|vision_start|><|video_pad|><|vision_end|>\n"
                "Video 2: <|vision_start|><|video_pad|><|vision_end|>\n"
                f"{text}<|im_end|>\n<|im_start|>assistant\n")

    def __call__(self, pairs):
        import torch
        videos, meta = [], []
        for p in pairs:
            for clip, fps in ((p["input_frames"], p["fps"]), (p["target_frames"], p["fps"])):
                idx = uniform_indices(len(clip), min(self.frames, len(clip)))
                videos.append(np.ascontiguousarray(clip[idx]))
                meta.append({"fps": fps * len(idx) / len(clip), "total_num_frames": len(idx)})
        inp = self.processor(text=[self.prompt(p) for p in pairs], videos=videos, video_metadata=meta, padding=True,
                             return_tensors="pt").to(self.model.device)
        tok = self.processor.tokenizer
        with torch.no_grad():
            out = self.model.generate(**inp, max_new_tokens=self.max_new_tokens, do_sample=True,
                                      temperature=self.temperature, top_p=0.9, top_k=0,
                                      eos_token_id=tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]),
                                      pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)


def shot_starts(path, min_shot=0.5, min_score=4.0, ratio=3.0, window=12, height=64):
    """The frames where a new shot begins (frame 0 first). Each frame is compared with the one
    before on a small copy (height px): the mean absolute difference of their pixels, 0..255.
    A cut is a difference of at least min_score that is also `ratio` times the mean difference
    (+1) around it (window frames each side): a sudden jump, not steady motion or a camera pan.
    Shots shorter than min_shot seconds are merged into the one before. -> (starts, n_frames, fps)"""
    import decord
    try:
        with _quiet_stderr():
            vr = decord.VideoReader(path, num_threads=1)
            n, fps, (h, w) = len(vr), float(vr.get_avg_fps()), vr[0].shape[:2]
            small = decord.VideoReader(path, num_threads=1, height=height, width=max(2, round(w * height / h / 2) * 2))
    except Exception:
        raise VideoError(f"{path}: not a readable video (corrupt, truncated, or not a video file)") from None
    scores, prev = np.zeros(n), None
    for first in range(0, n, 256):
        try:
            with _quiet_stderr():
                chunk = small.get_batch(list(range(first, min(n, first + 256)))).asnumpy().astype(np.float32)
        except Exception:
            raise VideoError(f"{path}: decoding failed at frame {first} (the file is corrupt or truncated)") from None
        frames = chunk if prev is None else np.concatenate([prev[None], chunk])
        d = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
        scores[first + (prev is None):first + len(chunk)] = d
        prev = chunk[-1]
    starts = [0]
    for t in range(1, n):
        around = np.concatenate([scores[max(1, t - window):t], scores[t + 1:t + 1 + window]])
        if scores[t] >= min_score and scores[t] >= ratio * ((around.mean() if len(around) else 0) + 1):
            starts.append(t)
    ends = starts[1:] + [n]
    return [s for i, (s, e) in enumerate(zip(starts, ends)) if i == 0 or e - s >= min_shot * fps], n, fps


def read_steps(path):
    """COIN's or YouCook2's annotation JSON -> {video id: {"task", "steps": [(start s, end s, text), ...]}}
    ({"database": {id: {"annotation" | "annotations": [{"segment": [s, e], "label" | "sentence": text}]}}})."""
    try:
        with open(path, encoding="utf-8") as f:
            db = json.load(f)["database"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: not a COIN or YouCook2 annotation file ({type(e).__name__}: expected "
                            "{\"database\": {video id: {\"annotation(s)\": [...]}}})") from None
    out = {}
    for vid, v in db.items():
        steps = []
        for a in v.get("annotation", v.get("annotations", [])):
            text = a.get("label", a.get("sentence"))
            seg = a.get("segment")
            if isinstance(text, str) and isinstance(seg, list) and len(seg) == 2:
                steps.append((float(seg[0]), float(seg[1]), text.strip()))
        out[vid] = {"task": v.get("class") or v.get("recipe_type"), "steps": sorted(steps)}
    return out


def build(args):
    """python data.py build: see the section's comment. -> (pairs in the manifests, {what: count skipped in
    this run}), the same on every rank."""
    import fractions
    import zlib

    import torch
    from tqdm import tqdm

    import common
    rank, world, device = common.compute_init(args.device)
    os.makedirs(os.path.join(args.out, "clips"), exist_ok=True)
    steps = read_steps(args.annotations) if args.annotations else None
    files = {}
    for root, _, names in os.walk(args.videos):
        for name in sorted(names):
            if name.lower().endswith(VIDEO_EXTS):
                files.setdefault(os.path.splitext(name)[0], os.path.join(root, name))
    sources = sorted(steps) if steps is not None else sorted(files)
    common.same_settings(os.path.join(args.out, "settings.json"), {  # a rerun must cut and pair the same way
        k: getattr(args, k) for k in ("annotations", "input_seconds", "target_seconds", "min_input_seconds",
                                      "min_target_seconds", "min_target_frames", "min_shot")})
    done = read_pairs(args.out)
    if world > 1:
        torch.distributed.barrier()  # no rank appends before every rank has read
    annotator = TemplateAnnotator() if args.annotator == "tiny" else \
        VLMAnnotator(args.annotator, device, temperature=args.temperature)
    torch.manual_seed(args.seed + rank)  # the annotator's draws
    skipped = {}  # kind -> count

    def skip(kind, message):
        skipped[kind] = skipped.get(kind, 0) + 1
        tqdm.write(f"skipped: {message}", file=sys.stderr)

    path = os.path.join(args.out, f"pairs.rank{rank}.jsonl")
    log = open(path, "a")
    if log.tell():  # a killed run may have cut its last line short: ours start on a new one
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read() != b"\n":
                log.write("\n")
    for source in tqdm(sources[rank::world], disable=rank != 0, desc="videos"):
        path = files.get(source)
        if path is None:
            skip("videos not found", f"{source}: no video file {args.videos}/{source}.*")
            continue
        try:
            if steps is None:
                starts, n, fps = shot_starts(path, args.min_shot)
                spans = [(a, b, None) for a, b in zip(starts, starts[1:] + [n])]
            else:
                n, fps = video_info(path)
                spans = []
                for s, e, text in steps[source]["steps"]:
                    if not 0 <= s < e <= n / fps + 0.5:
                        skip("steps outside their video", f"{args.annotations}: {source}: step {text!r} at {s:g}-{e:g} s, "
                                                          f"outside the video's 0-{n / fps:.1f} s")
                        continue
                    spans.append((round(s * fps), min(n, round(e * fps)), text))
            read = _open(path)[0]
        except VideoError as e:
            skip("videos that do not decode", str(e))
            continue
        todo = []  # spans only: a batch's frames are read when it is annotated, and let go after
        for i, ((a0, a1, t0), (b0, b1, t1)) in enumerate(zip(spans, spans[1:])):
            key = f"{source}_{i:03d}"
            if key in done:
                continue
            if (a1 - a0) < args.min_input_seconds * fps or (b1 - b0) < max(args.min_target_seconds * fps, args.min_target_frames):
                skip("pairs too short", f"{key}: {(a1 - a0) / fps:.1f} s then {(b1 - b0) / fps:.1f} s; need "
                                        f"{args.min_input_seconds:g} s, then {args.min_target_seconds:g} s and "
                                        f"{args.min_target_frames} frames")
                done[key] = {"key": key, "dropped": "too short"}
                log.write(json.dumps(done[key]) + "\n")
                log.flush()
                continue
            a0 = max(a0, a1 - round(args.input_seconds * fps))  # the end of the first
            b1 = min(b1, b0 + max(round(args.target_seconds * fps), args.min_target_frames))  # the start of the second
            todo.append({"key": key, "source": source, "index": i, "fps": fps, "steps": (t0, t1) if steps else None,
                         "task": steps[source]["task"] if steps else None,
                         "kind": "procedural" if steps else "predictive", "spans": ((a0, a1), (b0, b1))})
        for c in range(0, len(todo), args.batch_size):
            batch, parsed = todo[c:c + args.batch_size], {}
            try:
                for p in batch:
                    p["input_frames"], p["target_frames"] = (read(range(*span)) for span in p["spans"])
            except VideoError as e:
                skip("videos that do not decode", str(e))
                break
            for attempt in range(1 + args.retries):
                need = [p for p in batch if p["key"] not in parsed]
                if not need:
                    break
                for p, reply in zip(need, annotator(need)):
                    if (fields := parse_annotation(reply)) is not None:
                        parsed[p["key"]] = fields
            for p in batch:
                rel = lambda part: os.path.join("clips", f"{p['key']}_{part}.mp4")
                if p["key"] not in parsed:
                    skip("replies not in the asked form", f"{p['key']}: the annotator's reply was not in the asked "
                                                            f"form after {1 + args.retries} tries")
                    row = {"key": p["key"], "dropped": "unparsed"}
                else:
                    for part, frames in (("in", p["input_frames"]), ("out", p["target_frames"])):
                        tmp = os.path.join(args.out, rel(part) + ".tmp.mp4")
                        write_video(tmp, frames[:, :frames.shape[1] // 2 * 2, :frames.shape[2] // 2 * 2],
                                    fps=fractions.Fraction(p["fps"]).limit_denominator(1001))
                        os.replace(tmp, os.path.join(args.out, rel(part)))
                    row = {"key": p["key"], "id": p["key"], "kind": p["kind"], "source": p["source"],
                           "input_video": rel("in"), "target_video": rel("out"), **parsed[p["key"]]}
                    if p["steps"]:
                        row["steps"] = list(p["steps"])
                done[p["key"]] = row
                log.write(json.dumps(row) + "\n")
                log.flush()
                del p["input_frames"], p["target_frames"]
    log.close()
    kinds = ["videos not found", "videos that do not decode", "steps outside their video", "pairs too short",
             "replies not in the asked form"]
    counts = dict(zip(kinds, map(int, common.all_sum([float(skipped.get(k, 0)) for k in kinds]))))
    if world > 1:
        torch.distributed.barrier()
    kept = [r for _, r in sorted(read_pairs(args.out).items()) if "dropped" not in r]  # every rank's pairs
    if rank == 0:  # split by source video
        split_of = lambda s: ("test" if (h := zlib.crc32(s.encode()) / 2 ** 32) < args.test_fraction
                              else "val" if h < args.test_fraction + args.val_fraction else "train")
        for split in ("train", "val", "test"):
            mine = [{k: v for k, v in r.items() if k != "key"} for r in kept if split_of(r["source"]) == split]
            with open(os.path.join(args.out, f"{split}.jsonl.tmp"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in mine)
            os.replace(os.path.join(args.out, f"{split}.jsonl.tmp"), os.path.join(args.out, f"{split}.jsonl"))
            if args.csv:
                with open(os.path.join(args.out, f"{split}.csv"), "w", newline="", encoding="utf-8-sig") as f:
                    w = csv.writer(f)
                    w.writerow(list(CSV_FIELDS))
                    w.writerows([[r[CSV_FIELDS[c]] for c in CSV_FIELDS] for r in mine])
            print(f"{split}: {len(mine)} samples -> {os.path.join(args.out, split + '.jsonl')}")
        said = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none"
        print(f"{len(kept)} pairs from {len(sources)} videos in all; skipped in this run: {said}")
    return len(kept), counts


def read_pairs(out):
    """{key: row} of every rank's pairs file in out; a line cut short by a killed run is left out
    (its pair is done again)."""
    rows = {}
    for name in sorted(os.listdir(out)):
        if name.startswith("pairs.rank") and name.endswith(".jsonl"):
            with open(os.path.join(out, name)) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    rows[r["key"]] = r
    return rows


def video_info(path):
    """-> (frames, frame rate) of a video; VideoError if it does not open."""
    import decord
    try:
        with _quiet_stderr():
            vr = decord.VideoReader(path, num_threads=1)
            return len(vr), float(vr.get_avg_fps())
    except Exception:
        raise VideoError(f"{path}: not a readable video (corrupt, truncated, or not a video file)") from None


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="VANS data tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="training pairs from raw videos (shots) or step-annotated videos (COIN, YouCook2)")
    b.add_argument("--videos", required=True, help="directory of videos (searched recursively; a file's name without "
                                                   "its extension is its video id)")
    b.add_argument("--annotations", default=None, help="COIN or YouCook2 annotation JSON (procedural pairs); "
                                                       "without it, consecutive shots (predictive pairs)")
    b.add_argument("--out", required=True, help="output directory: clips/, pairs.rank*.jsonl, {train,val,test}.jsonl")
    b.add_argument("--annotator", default="Qwen/Qwen2.5-VL-7B-Instruct",
                   help="a Qwen2.5-VL instruct model (hub id or local directory), or tiny (no model: tests)")
    b.add_argument("--input-seconds", type=float, default=10.0, help="longest input clip (the end of the first shot or step)")
    b.add_argument("--target-seconds", type=float, default=4.0, help="longest target clip (the start of the next)")
    b.add_argument("--min-input-seconds", type=float, default=2.0, help="shortest input clip kept")
    b.add_argument("--min-target-seconds", type=float, default=2.0, help="shortest target clip kept")
    b.add_argument("--min-target-frames", type=int, default=33, help="fewest target frames kept (the VDM trains on 33)")
    b.add_argument("--min-shot", type=float, default=0.5, help="shortest shot, in seconds (shorter ones join the one before)")
    b.add_argument("--val-fraction", type=float, default=0.05, help="share of source videos whose pairs go to val")
    b.add_argument("--test-fraction", type=float, default=0.05, help="share of source videos whose pairs go to test")
    b.add_argument("--csv", action="store_true", help="also write the official CSV ({split}.csv, utf-8-sig)")
    b.add_argument("--batch-size", type=int, default=4, help="pairs per annotator call")
    b.add_argument("--retries", type=int, default=2, help="new draws for a reply not in the asked form, then it is dropped")
    b.add_argument("--temperature", type=float, default=0.7, help="the annotator's sampling temperature")
    b.add_argument("--seed", type=int, default=0, help="sampling seed (plus the rank)")
    b.add_argument("--device", default=None, help="where the annotator runs (default: cuda when there is a GPU, under "
                                                  "torchrun each rank its own)")
    b.add_argument("--strict", action="store_true", help="exit 1 if anything was skipped (default: only if no pair was "
                                                         "written; skipping short shots is filtering)")
    a = parser.parse_args()
    for flag, value in (("--videos", a.videos), ("--annotations", a.annotations)):
        if value is not None and not os.path.exists(value):
            sys.exit(f"error: {flag} {value}: no such file or directory")
    try:
        pairs, skipped = build(a)
    except ManifestError as e:
        sys.exit(f"error: --annotations {e}")
    # the exit status: 1 when there is nothing to train on, or with --strict when anything was skipped
    code = 0
    if not pairs or (a.strict and any(skipped.values())):
        said = ", ".join(f"{v} {k}" for k, v in skipped.items() if v) or "nothing skipped"
        print(f"error: {'no pairs written' if not pairs else 'skipped (--strict)'}: {said}", file=sys.stderr)
        code = 1
    import torch.distributed as dist
    if dist.is_initialized():  # as common.compute_cleanup: gloo's threads must not meet interpreter shutdown
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
