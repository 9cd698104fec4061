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
MIN_SIDE, MAX_ASPECT = 28, 4.0  # smaller or more elongated frames are refused: nothing can be read from them


def _fit(path, h, w):
    """The size to decode an h x w frame at: at most MAX_PIXELS, so memory stays bounded however
    large the file; VideoError if the frame is too small or too elongated to answer about."""
    if min(h, w) < MIN_SIDE or max(h, w) / min(h, w) > MAX_ASPECT:
        raise VideoError(f"{path}: frames of {w}x{h} pixels; need at least {MIN_SIDE} a side and at most {MAX_ASPECT:g}:1")
    s = min(1.0, (MAX_PIXELS / (h * w)) ** 0.5)
    return (h, w) if s == 1 else (int(h * s / 2) * 2, int(w * s / 2) * 2)  # even sides, at most MAX_PIXELS


def _open(path):
    """-> (reader, n_frames, (height, width) of the frames it returns); reader(indices) -> uint8
    (len(indices), height, width, 3). Frames over MAX_PIXELS are decoded downscaled."""
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    if path.lower().endswith(IMAGE_EXTS):
        from PIL import Image
        try:
            with Image.open(path) as im:
                h, w = _fit(path, im.height, im.width)
                im.draft("RGB", (w, h))  # a JPEG decodes at 1/2, 1/4 or 1/8 of its size if that is enough
                frame = np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR))
        except VideoError:
            raise
        except Exception as e:
            raise VideoError(f"{path}: cannot read image ({type(e).__name__})") from None
        return (lambda idx: np.repeat(frame[None], len(idx), axis=0)), 1, (h, w)
    import decord
    try:
        with _quiet_stderr():
            vr = decord.VideoReader(path, num_threads=1)
            n = len(vr)
            if n:
                h, w = _fit(path, *vr[0].shape[:2])
                if (h, w) != tuple(vr[0].shape[:2]):
                    vr = decord.VideoReader(path, num_threads=1, height=h, width=w)
    except VideoError:
        raise
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


def _video_frames(path):
    """Frame count of a video (an image counts as a clip of any length); VideoError if unreadable."""
    n = _open(path)[1]
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
            n = _video_frames(s[k])
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
# the Shapes world: a synthetic VNEP task with known ground truth
#
#   procedural  a tower is built block by block; the input clip shows the last block
#               placed, the row on the table holds the rest in order. "What should I
#               do next?" -> the leftmost waiting block goes on top.
#   predictive  a ball rolls along the ground: toward a wall (it bounces), toward an
#               open side (it leaves the frame), or slowing down (it stops).
#   multi-future every 4th scene asks a second, hypothetical question about the same
#               input clip whose answer differs: "...if I want to take the tower
#               apart?" (the top block goes back), "...if the wall is removed?" (the
#               ball leaves), "...if a wall appears on the <side>?" (it bounces).
# Everything is scaled to the frame height, so any size renders the same scene.

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (150, 60, 190), "orange": (240, 130, 20)}
# No floor is drawn (objects stand on the line y = H * 14/16): a floor next to every object
# would share the VLM's vision tokens with it and hide it from a VLM trained from scratch.
BACKGROUND, WALL = (235, 235, 235), (60, 60, 60)
N_IN, N_OUT = 40, 33  # input and target clip lengths


def _canvas(n, H, W):
    f = np.empty((n, H, W, 3), np.uint8)
    f[:] = BACKGROUND
    return f


def _box(f, cx, cy, half, color):
    """Fill the square centred at (cx, cy) with half-size `half` (clipped to the frame)."""
    H, W = f.shape[:2]
    y0, y1, x0, x1 = (max(0, round(v)) for v in (cy - half, cy + half, cx - half, cx + half))
    f[min(y0, H):min(y1, H), min(x0, W):min(x1, W)] = color


def _disc(f, cx, cy, r, color):
    H, W = f.shape[:2]
    yy, xx = np.ogrid[:H, :W]
    f[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = color


def _path(a, b, n, lift):
    """n positions from a to b: up by `lift`, across, down (a block carried by hand)."""
    (ax, ay), (bx, by) = a, b
    top = min(ay, by) - lift
    legs = [abs(ay - top), abs(bx - ax), abs(by - top)]
    total = sum(legs) or 1.0
    out = []
    for t in np.linspace(0, total, n):
        if t <= legs[0]:
            out.append((ax, ay - t))
        elif t <= legs[0] + legs[1]:
            out.append((ax + np.sign(bx - ax) * (t - legs[0]), top))
        else:
            out.append((bx, top + (t - legs[0] - legs[1])))
    return out


def stack_scene(rng, H, W, hypothetical):
    """-> (input frames, [(question, think, caption, target frames, event), ...])."""
    u = H / 16
    half, floor_y = u, H * 14 / 16
    names = [str(c) for c in rng.permutation(list(COLORS))[:rng.integers(3, 6)]]
    n = len(names)
    k = int(rng.integers(1, n))  # blocks on the tower after the input clip (1..n-1)
    tower_x = W * 0.22
    slot_x = [W * 0.45 + j * (2 * half + u) for j in range(n)]  # block j waits at slot j
    on_tower = lambda i: (tower_x, floor_y - half - 2 * half * i)
    on_table = lambda j: (slot_x[j], floor_y - half)

    def frames(moving, path, placed, waiting, count):
        f = _canvas(count, H, W)
        for t in range(count):
            for i, c in enumerate(placed):
                _box(f[t], *on_tower(i), half, COLORS[c])
            for j in waiting:
                _box(f[t], *on_table(j), half, COLORS[names[j]])
            _box(f[t], *path[t], half, COLORS[moving])
        return f

    # input: block k-1 is carried from its slot onto the tower (still at the start and the end)
    hold = 8
    p = _path(on_table(k - 1), on_tower(k - 1), N_IN - 2 * hold, 3 * half)
    x = frames(names[k - 1], [p[0]] * hold + p + [p[-1]] * hold, names[:k - 1], range(k, n), N_IN)
    said_tower = ", ".join(names[:k])
    think = (f"A tower is being built from the blocks on the table, taken from left to right. The tower holds "
             f"{k} block{'s' * (k > 1)} ({said_tower}, bottom to top); the {names[k - 1]} block was just put on top. "
             f"Waiting on the table: {', '.join(names[k:])}.")
    out = []
    q = "What should I do next?"
    p = _path(on_table(k), on_tower(k), N_OUT - hold, 3 * half)
    y = frames(names[k], p + [p[-1]] * hold, names[:k], range(k + 1, n), N_OUT)
    out.append((q, think + f" The next block in line is the {names[k]} one.",
                f"Pick up the {names[k]} block and put it on top of the {names[k - 1]} block.", y,
                {"world": "stack", "action": "place", "color": names[k], "onto": names[k - 1], "height": k}))
    if hypothetical:
        q = "What should I do next if I want to take the tower apart?"
        p = _path(on_tower(k - 1), on_table(k - 1), N_OUT - hold, 3 * half)
        y = frames(names[k - 1], p + [p[-1]] * hold, names[:k - 1], range(k, n), N_OUT)
        out.append((q, think + f" To take the tower apart, the top block comes off first: the {names[k - 1]} one.",
                    f"Take the {names[k - 1]} block off the top of the tower and put it back on the table.", y,
                    {"world": "stack", "action": "remove", "color": names[k - 1], "height": k - 1}))
    return x, out


def ball_scene(rng, H, W, hypothetical):
    u = H / 16
    r, floor_y, wall_w = u, H * 14 / 16, u / 2
    color = str(rng.choice(list(COLORS)))
    side = str(rng.choice(["left", "right"]))
    d = 1 if side == "right" else -1
    outcome = str(rng.choice(["bounce", "leave", "stop"]))
    wall = outcome == "bounce" or (outcome == "stop" and rng.random() < 0.5)
    v0 = W / float(rng.uniform(80, 110))  # px per frame
    edge = W - wall_w - r if d > 0 else wall_w + r  # where the ball touches the wall
    if outcome == "stop":
        t_stop = float(rng.uniform(8, 20))  # frames into the target when it stops
        a = v0 / (N_IN + t_stop)
        stop_at = edge - d * float(rng.uniform(1, 3)) * r
        x0 = stop_at - d * v0 * (N_IN + t_stop) / 2
        pos = lambda t: x0 + d * (v0 * min(t, N_IN + t_stop) - a * min(t, N_IN + t_stop) ** 2 / 2)
    else:
        t_hit = float(rng.uniform(6, 16))
        x0 = edge - d * v0 * (N_IN + t_hit)

        def pos(t, wall=wall):  # constant speed; reflected at the wall when there is one
            x = x0 + d * v0 * t
            return edge - (x - edge) if wall and d * (x - edge) > 0 else x

    def frames(t0, count, pos, wall):
        f = _canvas(count, H, W)
        for t in range(count):
            if wall:
                f[t, :round(floor_y), round(W - wall_w) if d > 0 else 0:W if d > 0 else round(wall_w)] = WALL
            _disc(f[t], pos(t0 + t), floor_y - r, r, COLORS[color])
        return f

    x = frames(0, N_IN, pos, wall)
    there = f"There is a wall on the {side}." if wall else f"Nothing blocks the {side} side."
    motion = (f"The {color} ball is slowing down as it rolls to the {side}." if outcome == "stop"
              else f"The {color} ball rolls to the {side} at a steady speed.")
    caption = {"bounce": f"The {color} ball hits the wall on the {side} and bounces back.",
               "leave": f"The {color} ball rolls out of the frame on the {side}.",
               "stop": f"The {color} ball slows down and stops before reaching the {side} side."}
    reason = {"bounce": "It will reach the wall soon, and the wall will push it back.",
              "leave": "Nothing will stop it, so it keeps going past the edge.",
              "stop": "It is losing speed every moment, so it will come to rest."}
    event = lambda o: {"world": "ball", "outcome": o, "color": color, "side": side}
    out = [("What happens next?", f"{motion} {there} {reason[outcome]}", caption[outcome],
            frames(N_IN, N_OUT, pos, wall), event(outcome))]
    if hypothetical and outcome != "stop":
        flip = "leave" if outcome == "bounce" else "bounce"
        q = "What happens next if the wall is removed?" if outcome == "bounce" else \
            f"What happens next if a wall appears on the {side}?"
        alt = lambda t: pos(t, wall=not wall)
        out.append((q, f"{motion} {there} In this case the wall is {'gone' if wall else 'there'}: {reason[flip]}",
                    caption[flip], frames(N_IN, N_OUT, alt, not wall), event(flip)))
    return x, out


def shapes_scene(seed, split, i, H, W):
    """Scene i of a split, deterministic for (seed, split, i). Every 4th scene is multi-future."""
    rng = np.random.default_rng([seed, ["train", "val", "test"].index(split), i])
    scene = stack_scene if rng.random() < 0.5 else ball_scene
    return scene(rng, H, W, hypothetical=(i % 4 == 3))


def shapes_texts(n_scenes, seed=0):
    """(question, think, caption) of the first n_scenes training scenes (rendered at 16x28: cheap)."""
    return [(q, think, caption) for i in range(n_scenes)
            for q, think, caption, _, _ in shapes_scene(seed, "train", i, 16, 28)[1]]


# -----------------------------------------------------------------------------
# event accuracy: does a caption state, and does a video show, the generator's event?

def caption_event(text):
    """The event a Shapes caption states, read with the keywords of the generator's templates:
    {"world", "action" | "outcome", "color", "onto" | "side"} with the fields it finds, or None."""
    t = text.lower()
    by_place = lambda words: [w for _, w in sorted((m.start(), w) for w in words for m in re.finditer(rf"\b{w}\b", t))]
    colors, sides = by_place(COLORS), by_place(["left", "right"])
    if re.search(r"\bblock\b", t):
        action = "remove" if re.search(r"\boff the top\b|\bback on the table\b", t) else \
            "place" if re.search(r"\bon top of\b", t) else None
        return {"world": "stack", "action": action, "color": colors[0] if colors else None,
                **({"onto": colors[1] if len(colors) > 1 else None} if action == "place" else {})}
    if re.search(r"\bball\b", t):
        outcome = "bounce" if "bounce" in t else "leave" if re.search(r"\bout of the frame\b", t) else \
            "stop" if re.search(r"\bstops?\b", t) else None
        return {"world": "ball", "outcome": outcome, "color": colors[0] if colors else None,
                "side": sides[0] if sides else None}
    return None


def caption_correct(text, event):
    """True iff the caption states the event: the same action / outcome, colour, and block below or side."""
    got = caption_event(text)
    keys = ("world", "action", "color", "onto") if event["world"] == "stack" else ("world", "outcome", "color", "side")
    return got is not None and all(got.get(k) == event.get(k) for k in keys if k in event)


def _blob(frame, color, min_px):
    """Centroid (x, y) of the pixels whose nearest palette colour is `color`, or None if fewer than min_px."""
    palette = np.array([COLORS[color]] + [c for n, c in COLORS.items() if n != color] + [BACKGROUND, WALL], np.float32)
    d = ((frame[:, :, None, :].astype(np.float32) - palette) ** 2).sum(-1)  # (H, W, colours)
    ys, xs = np.nonzero((d.argmin(-1) == 0) & (d[..., 0] < 80 ** 2))
    return (float(xs.mean()), float(ys.mean())) if len(xs) >= min_px else None


def video_shows(frames, event):
    """True iff the uint8 clip (T, H, W, 3) shows the event, by tracking the event's coloured blob
    (pixels nearest that palette colour) against the generator's geometry: a placed block ends on
    the tower at its height, a removed one on the table away from the tower; a bouncing ball comes
    back from the side by at least its radius, a leaving ball is gone at the end, a stopping ball
    is still in the last 5 frames and short of the side."""
    T, H, W, _ = frames.shape
    u = H / 16
    track = [_blob(f, event["color"], min_px=max(4, int(u * u))) for f in frames]
    end = track[-1]
    if event["world"] == "stack":
        if end is None:
            return False
        if event["action"] == "place":
            return abs(end[0] - W * 0.22) < u and abs(end[1] - (H * 14 / 16 - u - 2 * u * event["height"])) < u
        return abs(end[1] - (H * 14 / 16 - u)) < u and abs(end[0] - W * 0.22) > 2 * u
    d = 1 if event["side"] == "right" else -1
    xs = [p[0] for p in track if p is not None]
    if event["outcome"] == "leave":
        return end is None and len(xs) > 0 and d * (xs[-1] - xs[0]) > 0
    if end is None or not xs:
        return False
    if event["outcome"] == "bounce":
        return d * (max(xs, key=lambda x: d * x) - end[0]) > u
    last = [p for p in track[-5:] if p is not None]
    still = len(last) == 5 and max(abs(p[0] - end[0]) for p in last) < u / 4
    return still and (W - end[0] if d > 0 else end[0]) > u


def _write_scene(job):
    seed, split, i, H, W, out = job
    x, answers = shapes_scene(seed, split, i, H, W)
    rel = lambda name: os.path.join("videos", split, name)
    write_video(os.path.join(out, rel(f"{i:06d}_in.mp4")), x)
    rows = []
    for a, (q, think, caption, y, event) in enumerate(answers):
        write_video(os.path.join(out, rel(f"{i:06d}_{a}.mp4")), y)
        rows.append({"id": f"{split}{i:06d}_{a}", "kind": "procedural" if event["world"] == "stack" else "predictive",
                     "input_video": rel(f"{i:06d}_in.mp4"), "question": q, "think": think, "caption": caption,
                     "target_video": rel(f"{i:06d}_{a}.mp4"), "event": event})
    return rows


def make_shapes(out, n_train, n_val, n_test, height=64, width=112, seed=0, workers=2):
    """Write out/{train,val,test}.jsonl and their clips; n_* count samples (a multi-future scene gives 2)."""
    import multiprocessing
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        os.makedirs(os.path.join(out, "videos", split), exist_ok=True)
        scenes, count = 0, 0
        while count < n:
            count += 2 if scenes % 4 == 3 else 1  # a multi-future scene may give 1 (a stopping ball): topped up below
            scenes += 1
        jobs = [(seed, split, i, height, width, out) for i in range(scenes)]
        with multiprocessing.Pool(workers) as pool:
            rows = [r for rs in pool.imap(_write_scene, jobs, chunksize=16) for r in rs]
        while len(rows) < n:  # a few scenes gave one answer instead of two: add scenes
            rows += _write_scene((seed, split, scenes, height, width, out))
            scenes += 1
        with open(os.path.join(out, f"{split}.jsonl.tmp"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[:n])
        os.replace(os.path.join(out, f"{split}.jsonl.tmp"), os.path.join(out, f"{split}.jsonl"))
        print(f"{split}: {n} samples from {scenes} scenes -> {os.path.join(out, split + '.jsonl')}")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="VANS data tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sh = sub.add_parser("shapes", help="generate the Shapes world")
    sh.add_argument("--out", default="data/shapes", help="output directory")
    # the defaults are what config/shapes.py and the shipped Shapes models were made with
    sh.add_argument("--n-train", type=int, default=4000, help="training samples")
    sh.add_argument("--n-val", type=int, default=100, help="validation samples")
    sh.add_argument("--n-test", type=int, default=200, help="test samples")
    sh.add_argument("--height", type=int, default=64, help="frame height")
    sh.add_argument("--width", type=int, default=112, help="frame width")
    sh.add_argument("--seed", type=int, default=0, help="the world's seed")
    sh.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes")
    args = parser.parse_args()
    make_shapes(args.out, args.n_train, args.n_val, args.n_test, args.height, args.width, args.seed, args.workers)
