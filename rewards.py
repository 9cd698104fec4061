"""
The scores Joint-GRPO trains on, each written once:

    stage 1 (VLM):  r_f  format_reward      [Think]..[/Think][Ans]..[/Ans], and nothing else
                    r_t1 rouge_l            caption vs ground-truth caption
                    r_v1 CLIP.clip_v        video rendered from the caption vs ground-truth video
    stage 2 (DiT):  r_v2 CLIP.clip_v        generated vs ground-truth video
                    r_c2 CLIP.clip_t        generated video vs anchor caption

then per-reward normalisation, the lambda-weighted sum, and GRPO's group advantage.
"""

import json
import os
import re
import string
import warnings

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# text rewards

TAGS = ("[Think]", "[/Think]", "[Ans]", "[/Ans]")


def format_reward(text):
    """1.0 iff the text is exactly [Think]...[/Think][Ans]...[/Ans] (whitespace around the
    tags allowed) with both parts non-empty and no stray tags inside; else 0.0."""
    m = re.fullmatch(r"\s*\[Think\](.*?)\[/Think\]\s*\[Ans\](.*?)\[/Ans\]\s*", text, re.S)
    if not m:
        return 0.0
    parts = [p.strip() for p in m.groups()]
    return float(all(parts) and not any(t in p for p in parts for t in TAGS))


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def tokenize(text):
    """Lowercased words with punctuation dropped (the COCO caption evaluation convention;
    punctuation inside a word splits it: "don't" -> "don", "t")."""
    return _PUNCT.sub(" ", text.lower()).split()


def lcs(a, b):
    """Length of the longest common subsequence of two token lists (O(len(a) len(b)) DP)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate, reference, beta=1.2):
    """ROUGE-L F-measure as the COCO caption code: P = LCS / |cand|, R = LCS / |ref|,
    F = (1 + beta^2) P R / (R + beta^2 P); 0 when there is no overlap."""
    c, r = tokenize(candidate), tokenize(reference)
    n = lcs(c, r) if c and r else 0
    if n == 0:
        return 0.0
    p, rec = n / len(c), n / len(r)
    return (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p)


def choose_anchors(sample, references, min_rouge=0.6, tries=4):
    """Stage 2's anchor filter. sample(indices) -> one fresh caption for each index given. Each
    prompt gets up to `tries` draws and stops at the first with ROUGE-L >= min_rouge against its
    reference; the best draw is kept if it reaches min_rouge (the prompt is skipped otherwise).
    -> [(caption or None, its best ROUGE-L, the draw that gave it: 1..tries)] per reference"""
    best = [(-1.0, None, 0)] * len(references)
    for attempt in range(1, tries + 1):
        need = [i for i, (score, _, _) in enumerate(best) if score < min_rouge]
        if not need:
            break
        for i, caption in zip(need, sample(need)):
            score = rouge_l(caption, references[i])
            if score > best[i][0]:
                best[i] = (score, caption, attempt)
    return [(caption if score >= min_rouge else None, score, found_at) for score, caption, found_at in best]


# -----------------------------------------------------------------------------
# CLIP-V and CLIP-T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPError(ValueError):
    pass


# A tiny-CLIP directory: open_clip's own CLIP class at small sizes (clip.json, its config) and its
# weights (clip.safetensors); it reads whole frames at its image size (no crop) and byte tokens. For a
# world OpenAI's CLIP never saw: shapes.py trains one.

def byte_tokens(texts, length=96):
    """The tiny CLIP's tokenizer: 257 (start), UTF-8 bytes + 1, 258 (end, the largest id: open_clip
    pools the text at its argmax), zero padding, cut to `length`. -> long (N, length)"""
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [257] + [b + 1 for b in t.encode("utf-8")][:length - 2] + [258]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def build_tiny_clip(cfg):
    """open_clip's CLIP class at the sizes of `cfg` (clip.json: embed_dim, quick_gelu, vision_cfg, text_cfg)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    return open_clip.CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]),
                          quick_gelu=cfg["quick_gelu"])


def load_tiny_clip(path):
    from safetensors.torch import load_file
    files = [os.path.join(path, f) for f in ("clip.json", "clip.safetensors")]
    if not all(os.path.isfile(f) for f in files):
        raise CLIPError(f"{path}: not a tiny-CLIP directory (needs clip.json and clip.safetensors)")
    with open(files[0]) as f:
        net = build_tiny_clip(json.load(f))
    sd = load_file(files[1])
    own = net.state_dict()
    bad = sorted(set(own) ^ set(sd)) + sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if bad:
        raise CLIPError(f"{files[1]}: {len(bad)} keys missing, unexpected or misshapen (e.g. {bad[0]})")
    net.load_state_dict(sd)
    return net



class CLIP:
    """CLIP-V and CLIP-T: raw cosines, no grad, float32 on every device (rewards and published
    metrics must not depend on the GPU's precision). weights: "openai" (open_clip ViT-B/32
    with QuickGELU, OpenAI's weights from the hub or its local cache), a local open_clip weights file
    for that model (.safetensors / .bin, open_clip's loader with weights_only), a tiny-CLIP directory
    (clip.json + clip.safetensors, load_tiny_clip), or None (random ViT-B/32: tests only)."""

    def __init__(self, weights="openai", device="cpu", batch_size=256):
        import logging
        import open_clip
        if weights not in (None, "openai") and not os.path.exists(weights):
            raise CLIPError(f"{weights}: no such file or directory (expected openai, a local open_clip ViT-B/32 "
                            f"weights file, or a tiny-CLIP directory: `python shapes.py train-clip --out {weights}` "
                            "trains one, and the Shapes models ship theirs in weights/shapes/clip)")
        if isinstance(weights, str) and os.path.isdir(weights):
            self.model, self.tokenizer, self.crop = load_tiny_clip(weights), byte_tokens, False
        else:
            logging.disable(logging.ERROR)  # open_clip logs its own download failure; ours is the one-line error
            try:
                with torch.random.fork_rng(devices=[]):  # random weights (None) are the same in every process
                    torch.manual_seed(0)
                    self.model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=weights, device=device)
            except Exception as e:
                raise CLIPError(f"CLIP ViT-B/32 weights {weights!r} could not be loaded ({type(e).__name__}): "
                                f"with no network, pass a local open_clip weights file (e.g. open_clip_model.safetensors "
                                f"of timm/vit_base_patch32_clip_224.openai) instead") from None
            finally:
                logging.disable(logging.NOTSET)
            self.tokenizer, self.crop = open_clip.get_tokenizer("ViT-B-32-quickgelu"), True
        self.size = tuple(self.model.visual.image_size)
        self.device = torch.device(device)
        self.model.to(self.device, torch.float32).eval().requires_grad_(False)
        self.batch_size = batch_size

    def preprocess(self, frames):
        """uint8 (N, H, W, 3) -> (N, 3, 224, 224): bicubic (antialiased) shortest side 224,
        center crop, CLIP mean/std, as CLIP's own transform. A tiny CLIP takes the whole frame,
        resized to its image size."""
        x = torch.as_tensor(frames).permute(0, 3, 1, 2).float().to(self.device)
        H, W = x.shape[-2:]
        if not self.crop:
            x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 255) / 255.0
            mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
            return (x - mean) / std
        s = 224 / min(H, W)
        h, w = max(224, round(H * s)), max(224, round(W * s))
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
        top, left = (h - 224) // 2, (w - 224) // 2
        x = x[:, :, top:top + 224, left:left + 224] / 255.0
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_features(self, frames):
        """uint8 (N, H, W, 3) -> unit-norm float32 (N, 512), in batches."""
        out = [self.model.encode_image(self.preprocess(frames[i:i + self.batch_size]))
               for i in range(0, len(frames), self.batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts):
        """list of str -> unit-norm float32 (N, 512)."""
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)

    def clip_v(self, videos, gt_videos):
        """Per pair: mean over frames of cos(generated frame t, ground-truth frame t). Videos are
        uint8 (T, H, W, 3); a ground truth with another frame count is resampled uniformly to T.
        -> float32 (N,)"""
        gts = []
        for v, g in zip(videos, gt_videos):
            if len(g) != len(v):
                warnings.warn(f"CLIP-V: ground truth has {len(g)} frames, generated {len(v)}: "
                              f"ground truth resampled uniformly to {len(v)}")
                g = g[torch.linspace(0, len(g) - 1, len(v)).round().long().numpy()]
            gts.append(g)
        a = self._per_frame(videos)
        b = self._per_frame(gts)
        return torch.stack([(x * y).sum(-1).mean() for x, y in zip(a, b)])

    def clip_t(self, videos, captions):
        """Per pair: mean over frames of cos(frame, caption). -> float32 (N,)"""
        t = self.text_features(list(captions))
        return torch.stack([(f @ c).mean() for f, c in zip(self._per_frame(videos), t)])

    def _per_frame(self, videos):
        """Frame features of all videos in one batched pass, split back per video. A video given more
        than once (the same object: a group's ground truth, repeated for each of its G samples) is
        encoded once."""
        import numpy as np
        unique = list({id(v): v for v in videos}.values())
        feats = self.image_features(np.concatenate([np.asarray(v) for v in unique])).split([len(v) for v in unique])
        by_id = {id(v): f for v, f in zip(unique, feats)}
        return [by_id[id(v)] for v in videos]


# -----------------------------------------------------------------------------
# which rewards, normalisation, the weighted sum, and the group advantage

def parse(spec, builtin):
    """--rewards 'name=lambda,...' -> {name: (lambda, fn or None)}: each name one of the stage's
    built-in rewards, or module:function for a reward of your own (fn(outputs, samples) -> floats,
    logged as rewards/<function>/mean). A lambda of 0 drops the reward; ValueError names an unknown one,
    or a name given twice (a function named like a built-in included)."""
    import model
    out = {}
    for item in filter(None, spec.split(",")):
        name, _, w = item.partition("=")
        fn = None
        if ":" in name:
            fn = model.hook(name)
        elif name not in builtin:
            raise ValueError(f"unknown reward {name!r} ({', '.join(builtin)} or module:function)")
        key = name.rpartition(":")[2]
        if key in out or (fn is not None and key in builtin):
            raise ValueError(f"two rewards named {key!r}: rename the function")
        if float(w or 1) != 0:
            out[key] = (float(w or 1), fn)
    return out


NORMALISATIONS = ("pooled", "group", "batch", "none")


def normalise(r, group_size, mode="pooled", eps=1e-4, all_sum=None):
    """Put one reward on a common scale before the lambda-weighted sum (the paper sums
    "normalised" rewards with all lambda = 1 but does not say how). r: (N,) laid out group after
    group; all_sum sums a list of floats over ranks (common.all_sum), so that the statistics are
    the whole step's, every rank's groups together.

    pooled (default): r minus its group's mean, divided by the reward's within-group std pooled
        over all groups of the step. The rewards differ in scale by orders of magnitude (r_f is
        0/1, ROUGE-L spreads ~0.1 inside a group, CLIP-V ~0.01): summed raw, the widest one
        decides and CLIP-V is noise. Pooling gives each reward the same say on average, which
        is what lambda = 1 ("equal importance") asks, while a group where a reward barely varies
        (its spread there is noise) gets a small contribution from it, not a full one.
    group: z-score inside each group. Every reward gets unit spread in every group, so a reward
        whose in-group spread is noise (1e-4 of CLIP-V between near-identical captions) gets as
        much weight as a real difference, and the update follows noise (docs/design.md, where
        this broke a run that batch, from the same start, did not).
    batch: z-score over the step's batch. Also robust to noise, but the scale then includes the
        spread between prompts, which the group advantage removes anyway: a reward that varies
        mostly across prompts (CLIP-V: some clips are easier) is down-weighted inside every group.
    none: raw values.
    """
    reduce = all_sum or (lambda xs: xs)
    if mode == "none":
        return r
    if mode == "group":
        return group_advantages(r, group_size, eps)  # the same z-score GRPO applies to the sum
    if mode == "pooled":
        centred = (r.view(-1, group_size) - r.view(-1, group_size).mean(1, keepdim=True)).view(-1)
    elif mode == "batch":
        total, n = reduce([float(r.double().sum()), float(len(r))])
        centred = r - total / n
    else:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {mode!r}")
    squares, n = reduce([float(centred.double().pow(2).sum()), float(len(r))])
    return centred / ((squares / n) ** 0.5 + eps)


def combine(rewards, weights, group_size, mode="pooled", all_sum=None):
    """sum_k lambda_k * normalise(r_k). rewards: name -> (N,) laid out group after group."""
    return sum(weights.get(k, 1.0) * normalise(r.float(), group_size, mode, all_sum=all_sum) for k, r in rewards.items())


def group_advantages(rewards, group_size, eps=1e-4):
    """GRPO advantage (paper Eq. 1): A_i = (r_i - mean_group) / (std_group + eps), std with
    ddof 0, for rewards (N,) laid out group after group. -> (N,)"""
    g = rewards.float().view(-1, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + eps)).view(-1)


# -----------------------------------------------------------------------------
# the GRPO policy loss

def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_range=1e-3, beta=0.004, mean="sequence", norm=None):
    """Clipped surrogate + k3 KL, per token (stage 1) or per SDE step (stage 2):
        rho  = exp(logp - logp_old)
        loss = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta (exp(ref - logp) - (ref - logp) - 1)
    logp, old_logp, ref_logp, mask: (B, L); advantages: (B,). ref_logp None = no KL term.
    mean="sequence": average over each sequence's masked tokens, then over sequences;
    "token": average over all masked tokens. norm: the number of sequences (or tokens) of the
    whole batch when it is processed in micro-batches (default: this call's).
    -> (loss, {"kl", "clip_ratio", "approx_kl"} as floats over the masked tokens)."""
    m = mask.float()
    A = advantages.float()[:, None]
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - clip_range, 1 + clip_range) * A)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token = per_token + beta * kl
    if mean == "sequence":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp_min(1)).sum() / (norm or len(m))
    elif mean == "token":
        loss = (per_token * m).sum() / (norm or m.sum().clamp_min(1))
    else:
        raise ValueError(f"mean must be sequence or token, got {mean!r}")
    # clipped: where the clip is what the min picks (the gradient is zero there)
    clipped = ((ratio < 1 - clip_range) & (A < 0)) | ((ratio > 1 + clip_range) & (A > 0))
    n = m.sum().clamp_min(1)
    approx_kl = 0.5 * (logp.detach() - old_logp) ** 2  # how far the policy moved since the rollout
    return loss, {"kl": ((kl * m).sum() / n).item(), "clip_ratio": ((clipped.float() * m).sum() / n).item(),
                  "approx_kl": ((approx_kl * m).sum() / n).item()}


def flow_grpo_loss(logp, old_logp, advantages, mean, ref_mean, step_std, clip_range=1e-3, beta=0.004, adv_clip=5.0,
                   norm=None):
    """Stage 2's loss at one SDE step (Flow-GRPO): the same clipped surrogate with one "token"
    per sample, advantages clipped to +-adv_clip, and the KL to the reference DiT on the step means
        KL = mean over non-batch elements of ||mean - mean_ref||^2 / (2 std^2 |dt|)
    logp, old_logp, advantages: (B,); mean, ref_mean: (B, C, T, h, w); step_std = std sqrt(-dt)
    as model.sde_step_with_logprob returns it. ref_mean None = no KL. norm: the number of
    samples x steps the whole update averages over (default: B).
    -> (loss, {"kl", "clip_ratio", "approx_kl"})"""
    A = advantages.float().clamp(-adv_clip, adv_clip)
    ones = torch.ones_like(logp)[:, None]
    loss, stats = grpo_loss(logp[:, None], old_logp[:, None], None, A, ones, clip_range, mean="sequence",
                            norm=norm or len(logp))
    kl = torch.zeros_like(logp)
    if ref_mean is not None:
        kl = ((mean.float() - ref_mean.float()) ** 2 / (2 * step_std.float() ** 2)).mean(dim=tuple(range(1, mean.dim())))
        loss = loss + beta * kl.sum() / (norm or len(logp))
    return loss, {"kl": kl.mean().item(), "clip_ratio": stats["clip_ratio"], "approx_kl": stats["approx_kl"]}
