"""
VANS data: reading and writing clips, frame sampling, and the sample manifest.

A manifest is JSON Lines, one sample a line, paths relative to the manifest:
    {"input_video": "in/0001.mp4", "question": "What should I do next?",
     "think": "...", "caption": "...", "target_video": "out/0001.mp4",
     "id": "0001", "kind": "procedural"}          # id and kind are optional
The official release's CSV columns (input_video_path, output_video_path,
ENG_Instruction, ENG_Think, ENG_GT_Caption) are read too.

Every reader fails with a VideoError / ManifestError whose message is one line
naming the file (and manifest line) and what was expected.
"""

import contextlib
import csv
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

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
    return torch.linspace(0, n_total - 1, n).round().long().tolist()


def _open(path):
    """-> (reader, n_frames); reader(indices) -> uint8 (len(indices), H, W, 3)."""
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    if path.lower().endswith(IMAGE_EXTS):
        from PIL import Image
        try:
            with Image.open(path) as im:
                frame = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise VideoError(f"{path}: cannot read image ({type(e).__name__})") from None
        return (lambda idx: np.repeat(frame[None], len(idx), axis=0)), 1
    import decord
    try:
        with _quiet_stderr():
            vr = decord.VideoReader(path, num_threads=1)
            n = len(vr)
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
    return read, n


def read_frames(path, n=None, min_frames=1):
    """Read a clip as uint8 (T, H, W, 3): all frames, or n spread uniformly.
    An image is a static clip: its one frame repeated n times."""
    read, total = _open(path)
    is_image = path.lower().endswith(IMAGE_EXTS)
    if not is_image and total < min_frames:
        raise VideoError(f"{path}: has {total} frames, need at least {min_frames}")
    if n is None:
        return read(range(total))
    return read([0] * n) if is_image else read(uniform_indices(total, n))


def resize_crop(frames, height, width):
    """uint8 (T, H, W, 3) -> uint8 (T, height, width, 3): scale so the clip
    covers height x width (bilinear, antialiased), then center-crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    H, W = x.shape[-2:]
    if (H, W) != (height, width):
        scale = max(height / H, width / W)
        h, w = max(height, round(H * scale)), max(width, round(W * scale))
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (h - height) // 2, (w - width) // 2
        x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_clip(path, n_frames, height, width):
    """The reference clip of a sample: n_frames spread uniformly over the whole
    input, resized/cropped to height x width. uint8 (n_frames, height, width, 3).
    A video needs at least n_frames frames so no reference frame is repeated."""
    return resize_crop(read_frames(path, n_frames, min_frames=n_frames), height, width)


def to_tensor(frames):
    """uint8 (T, H, W, 3) numpy -> float (3, T, H, W) in [-1, 1], the VAE's input."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def to_uint8(video):
    """float (3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3) numpy."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def write_video(path, frames, fps=11):
    """Write uint8 (T, H, W, 3) as H.264 mp4 (yuv420p, so H and W must be even)."""
    import av
    T, H, W, _ = frames.shape
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode())


# -----------------------------------------------------------------------------
# the manifest

FIELDS = ("input_video", "question", "think", "caption", "target_video")
CSV_FIELDS = {"input_video_path": "input_video", "ENG_Instruction": "question", "ENG_Think": "think",
              "ENG_GT_Caption": "caption", "output_video_path": "target_video"}


def read_manifest(path, check_files=True):
    """Read a .jsonl (or the official .csv) manifest into a list of dicts with
    FIELDS (paths made absolute), plus id and kind. Raises ManifestError naming
    the line and the problem for a malformed line or a missing file."""
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: no such manifest")
    root = os.path.dirname(os.path.abspath(path))
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(i + 2, {CSV_FIELDS.get(k, k): v for k, v in row.items()}) for i, row in enumerate(csv.DictReader(f))]
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ManifestError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
                rows.append((i, row))
    samples = []
    for i, row in rows:
        missing = [k for k in FIELDS if not isinstance(row.get(k), str) or not row[k]]
        if missing:
            raise ManifestError(f"{path}:{i}: missing or empty field(s) {', '.join(missing)}")
        s = {k: row[k] for k in FIELDS}
        s["id"] = str(row.get("id", i))
        s["kind"] = row.get("kind") or None
        if s["kind"] not in (None, "procedural", "predictive"):
            raise ManifestError(f"{path}:{i}: kind must be procedural or predictive, got {s['kind']!r}")
        for k in ("input_video", "target_video"):
            s[k] = os.path.join(root, s[k])
            if check_files and not os.path.isfile(s[k]):
                raise ManifestError(f"{path}:{i}: {k} {row[k]!r} does not exist")
        samples.append(s)
    return samples
