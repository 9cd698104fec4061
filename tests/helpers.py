"""What the test files share: sizes, inputs, the release's strings, and running the scripts."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W, T = 64, 112, 33  # tiny test size: latents (16, 9, 8, 14)

# the release's system prompt (its agent_mllm.py), which the official checkpoint was trained with
RELEASE_SYSTEM_PROMPT = (
    "You will be given a video. Your task is to predict the next event based on the input video and the user's "
    "instructions. Please begin by providing your detailed reasoning between the [Think][/Think] tags, followed by "
    "your description of the next event within the [Ans][/Ans] tags.")
# the release's negative prompt (its inference.py and app.py)
RELEASE_NEGATIVE_PROMPT = (
    "vivid colors, overexposed, static, blurry details, subtitles, style, artwork, painting, frame, stationary, overall "
    "grayish, worst quality, low quality, JPEG compression artifacts, ugly, incomplete, extra fingers, poorly drawn "
    "hands, poorly drawn face, deformed, disfigured, malformed limbs, fused fingers, stationary frame, cluttered "
    "background, three legs, crowded background people, walking backwards")


def gen(seed):
    """A CPU generator seeded with seed."""
    return torch.Generator().manual_seed(seed)


def moving_clip(n=T, h=H, w=W, seed=0, color=(255, 60, 30)):
    """A square sliding right over a grey background: uint8 (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    frames = np.full((n, h, w, 3), 90, np.uint8) + rng.integers(0, 20, (1, h, w, 3), dtype=np.uint8)
    s = h // 4
    for i in range(n):
        x = int(i * (w - s) / max(n - 1, 1))
        frames[i, h // 3:h // 3 + s, x:x + s] = color
    return frames


# -----------------------------------------------------------------------------
# the official release's key names

def diffusers_to_wan(sd):
    """The inverse of diffusers' Wan key conversion, written out independently: diffusers names -> original Wan."""
    rules = [(r"^condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
             (r"^condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
             (r"^condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
             (r"^condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
             (r"^condition_embedder\.time_proj", "time_projection.1"),
             (r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."),
             (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".o."),
             (r"\.norm2\.", ".norm3."), (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
             (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
             (r"^scale_shift_table$", "head.modulation"), (r"^proj_out\.", "head.head.")]
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def official_lora_keys(sd, prefix="mllmagent.mllm_backbone.", old_layout=True, adapter_name=False):
    """Our peft state dict -> an official vlm.safetensors naming (prefix, with or without the adapter
    name, and optionally the pre-4.52 transformers layout). The release's loader strips the prefix and
    keeps a key only if its peft model has it: adapter name and old layout included."""
    out = {}
    for k, v in sd.items():
        if not adapter_name:
            k = k.replace(".default.weight", ".weight")
        if old_layout:
            k = k.replace("base_model.model.model.language_model.", "base_model.model.model.")
            k = k.replace("base_model.model.model.visual.", "base_model.model.visual.")
        out[prefix + k] = v
    return out


def dit_out(dit):
    g = gen(5)
    x = torch.randn(1, 16, 15, 4, 6, generator=g)
    text = torch.randn(1, 7, dit.config.text_dim, generator=g)
    return dit(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample


def vlm_logits(vlm):
    import model
    with torch.no_grad():
        return vlm.model(**vlm.inputs([moving_clip(model.VLM_FRAMES)], ["What next?"])).logits


def randomize_lora(peft_model, seed):
    g = gen(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# -----------------------------------------------------------------------------
# running the scripts

def run_infer(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def train(script, args, out, nproc=1, check=True):
    script, *command = script.split()  # "shapes.py train-vae": a script and its command
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable]) + [os.path.join(ROOT, script), *command, "--out", str(out), "--device", "cpu",
                                     "--workers", "0"] + args
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert not check or r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def logged(out, key="loss"):
    return [r[key] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if key in r]


def same_weights(a, b):
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(a) if f.endswith(".safetensors"))
    if os.path.isdir(os.path.join(a, "vlm_lora")):
        files.append("vlm_lora/adapter_model.safetensors")
    assert files
    for f in files:
        x, y = load_file(os.path.join(a, f)), load_file(os.path.join(b, f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
