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
