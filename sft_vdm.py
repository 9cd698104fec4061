"""
Supervised fine-tuning of the VANS VDM: the Wan DiT learns to render the ground-truth
caption as the target clip, given the reference latents of the input clip.

    # one GPU
    python sft_vdm.py --train data/train.jsonl --val data/val.jsonl   # 20K steps into out/sft_vdm
    # one node, 8 GPUs (the paper's settings); --fsdp shards the DiT per block (FSDP2)
    torchrun --standalone --nproc_per_node=8 sft_vdm.py --config config/paper.py --fsdp
    # two nodes: run on each, with NODE_RANK 0 / 1 and MASTER_ADDR the first node
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_ADDR:29500 sft_vdm.py --config config/paper.py --fsdp
    # the Shapes world on a CPU: the DiT (with the tiny text encoder) on the VAE `python shapes.py train-vae` made
    python sft_vdm.py --config config/shapes.py --out out/shapes/sft_vdm --model out/shapes/vae/last

The loss (flow matching, as model.py samples, and as DiffSynth's Wan training computes it, which
the release's VDM came from): target latents x0 (B, 16, 9, h, w) of the 33-frame target clip,
noise eps, a sigma s drawn uniformly from the 1000 sigmas of the shifted schedule
(model.flow_sigmas(1000, 5); --timestep-shift 1 is plain uniform), x_s = (1 - s) x0 + s eps,
    loss = mean_b w(s_b) mean (DiT([refs, x_s], s, caption) - (eps - x0))^2   over the 9 target frames,
with the 6 clean reference latents of the input clip in front (model.VDM.velocity) and
DiffSynth's weight w(t) = exp(-2 ((t - 500) / 1000)^2) at t = 1000 s, shifted to 0 at its
minimum and scaled to mean 1 over the table (model.training_schedule; --loss-weight none: w = 1).
--motion-weight m weights the latent positions that move within the target clip (model.motion_mask)
1 + m in the mean, normalised per sample: where the event is a small object's motion, as in the
Shapes world, the plain mean leaves it a hundredth of the loss (docs/shapes.md).
The DiT is fully fine-tuned (fp32 weights, bf16 autocast on GPU); the text encoder and
VAE are frozen, their outputs computed on the fly or once into <out>/cache (--cache-latents).
--caption-dropout replaces a caption by the model's negative prompt, so classifier-free guidance
has an unconditional branch to push against (the pretrained Wan has one; a tiny DiT trained
from scratch needs this). --ema keeps an exponential moving average of the DiT: the
checkpoint's dit.safetensors is then the average, and dit_raw.safetensors holds the raw
weights (for --resume).
--train-text-encoder trains the text encoder jointly with the DiT through the same loss (a small
preset's encoder starts from random weights: the Shapes world's).
"""

import argparse
import contextlib
import copy
import hashlib
import math
import os
import time

import checkpoint
import common
import data

# -----------------------------------------------------------------------------
# flags

parser = argparse.ArgumentParser(description="Flow-matching SFT of the VANS VDM.")
# data
parser.add_argument("--train", default="data/train.jsonl", help="training manifest (.jsonl or the official .csv)")
parser.add_argument("--val", default=None, help="validation manifest")
parser.add_argument("--skip-bad", action="store_true", help="skip and count bad manifest lines / clips instead of stopping")
parser.add_argument("--frames", type=int, default=33, help="frames of the reference and target clips (4k + 1)")
parser.add_argument("--ref-clip", default=None, choices=data.REF_CLIPS,
                    help="which input frames make the reference clip (data.clip_indices; default: --model's, first for Wan)")
parser.add_argument("--height", type=int, default=352, help="training height (multiple of 16)")
parser.add_argument("--width", type=int, default=640, help="training width (multiple of 16)")
parser.add_argument("--cache-latents", action="store_true", help="encode every sample once into <out>/cache and train from it")
# model
parser.add_argument("--model", default="base", help="base (Wan2.1-T2V-1.3B) | tiny | a checkpoint directory")
parser.add_argument("--wan", default=None, help="local copy of Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
parser.add_argument("--n-refs", type=int, default=6, help="reference latent frames (0 = plain text-to-video; 6: model.N_REFS)")
parser.add_argument("--fsdp", action="store_true", help="shard the DiT per block with FSDP2 instead of DDP")
# the loss
parser.add_argument("--timestep-shift", type=float, default=5.0, help="shift of the training sigmas: u -> shift u / (1 + (shift - 1) u)")
parser.add_argument("--loss-weight", default="diffsynth", choices=("diffsynth", "none"), help="weight of each timestep's loss (see the docstring)")
parser.add_argument("--motion-weight", type=float, default=0.0,
                    help="extra weight of the latent positions that move (model.motion_mask) in the loss")
parser.add_argument("--caption-dropout", type=float, default=0.0, help="probability a caption is replaced by the negative prompt")
parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the DiT weights (0 = off)")
parser.add_argument("--batch-size", type=int, default=1, help="samples per rank per step")
# validation
parser.add_argument("--val-every", type=int, default=1000, help="validate every N steps (0 = only at the end)")
parser.add_argument("--val-loss-samples", type=int, default=32, help="validation samples for the loss (fixed noise and timesteps)")
parser.add_argument("--val-render", type=int, default=2, help="validation samples rendered to <out>/samples, shared out over the ranks (at least one each)")
parser.add_argument("--val-steps", type=int, default=20, help="sampling steps of the rendered samples")
parser.add_argument("--val-cfg", type=float, default=5.0, help="guidance scale of the rendered samples")
parser.add_argument("--metrics", default=None, help="module:function checking the rendered samples, logged as val/<name> "
                                               "(e.g. shapes:metrics)")
parser.add_argument("--train-text-encoder", action="store_true", help="train the text encoder with the DiT (a random one)")
common.add_run_flags(parser, out="out/sft_vdm", steps=20_000)  # the paper's steps
args = common.parse_flags(parser, "sft_vdm")

# -----------------------------------------------------------------------------
# the model and the data checked before torch is imported: a wrong path is one error line at once

last = os.path.join(args.out, "last")
resume = args.resume and checkpoint.checkpoint_exists(last)
if not resume:
    common.check_models(model=args.model)
train, val = data.read_manifests(args, min_frames=args.frames)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from tqdm import tqdm  # noqa: E402

import model  # noqa: E402

# -----------------------------------------------------------------------------
# compute

rank, world, device = common.compute_init(args.device)
master = rank == 0
amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
args.ref_clip = args.ref_clip or checkpoint.ref_clip_of(last if resume else args.model)
metrics_fn = common.hook("metrics", args.metrics) if args.metrics else None
os.makedirs(args.out, exist_ok=True)
clips = data.ClipDataset(train, ("clip", "target"), args.frames, args.height, args.width, ref_clip=args.ref_clip)

# -----------------------------------------------------------------------------
# model: fp32 trained weights, bf16 frozen encoders on GPU

frozen_text = device.type == "cuda" and not args.train_text_encoder  # read in bf16, never held in fp32
preset, (_, vdm) = common.load_model(last if resume else args.model, wan=args.wan, need=("vdm",), device=device,
                                     dtype=torch.bfloat16 if frozen_text else torch.float32, dit_dtype=torch.float32)
vdm.n_refs = args.n_refs
if frozen_text:  # (the small presets are read in float32 on the CPU whatever the dtype)
    vdm.text_encoder.to(torch.bfloat16)
for m in (vdm.dit, vdm.vae, vdm.text_encoder):
    m.to(device).requires_grad_(False).eval()
trained = torch.nn.ModuleDict({"dit": vdm.dit, **({"text_encoder": vdm.text_encoder} if args.train_text_encoder else {})})
trained.requires_grad_(True).train()
ema, raw = None, os.path.join(last, "dit_raw.safetensors")  # with --ema, dit.safetensors is the average
if resume and os.path.isfile(raw) != bool(args.ema):
    raise SystemExit(f"error: {last} was saved {'with' if os.path.isfile(raw) else 'without'} --ema; resume it the same way")
if args.ema:
    ema = copy.deepcopy(vdm.dit).requires_grad_(False)
    if resume:
        vdm.dit.load_state_dict(common.read_weights(raw, vdm.dit.state_dict()))
if args.grad_checkpointing:
    vdm.dit.enable_gradient_checkpointing()
dit = vdm.dit
if args.fsdp:  # FSDP2: every transformer block a shard unit, then the rest
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for net in [vdm.dit] + ([ema] if ema is not None else []):
        for block in net.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(net, mp_policy=mp)
elif world > 1:
    dit = DDP(vdm.dit, device_ids=[device.index] if device.type == "cuda" else None)
manual_sync = [p for n, m in trained.items() if n != "dit" for p in m.parameters()]  # the text encoder's, by hand
common.print0(f"{preset['name']} VDM, training {', '.join(trained)}: {sum(p.numel() for p in trained.parameters()):,} parameters"
              + (" (FSDP2)" if args.fsdp else ""))

# -----------------------------------------------------------------------------
# latents: encoded on the fly, or once into <out>/cache (--cache-latents)



@torch.no_grad()
def encode(clip, target, captions):
    """uint8 clips (B, T, H, W, 3) + captions -> (refs (B, 16, n, h, w) or None, x0 (B, 16, 9, h, w), text (B, 512, D))."""
    refs = vdm.ref_latents(vdm.encode_video(data.to_tensor(clip))) if vdm.n_refs else None
    text = vdm.encode_text(captions) if not args.train_text_encoder else None  # trained: encoded in the step
    return refs, vdm.encode_video(data.to_tensor(target)), text


class LatentCache(torch.utils.data.Dataset):
    """The samples' reference latents, target latents and caption embeddings (trimmed of Wan's
    zero padding), one safetensors file per sample, computed once by all ranks together. A
    sample whose clip fails to decode is left out, and counted."""

    def __init__(self, samples, root):
        self.root = root
        key = dict(model=os.path.abspath(args.model), height=args.height, width=args.width, frames=args.frames,
                   n_refs=args.n_refs, ref_clip=args.ref_clip, text=not args.train_text_encoder)
        os.makedirs(root, exist_ok=True)
        common.same_settings(os.path.join(root, "cache.json"), key)  # before any latent
        todo = [i for i in range(len(samples))[rank::world] if not os.path.isfile(self.path(samples[i]))]
        for j in tqdm(range(0, len(todo), args.batch_size), disable=not master, desc="cache latents"):
            idx = todo[j:j + args.batch_size]
            b = data.collate([clips[i] for i in idx])
            refs, x0, text = encode(b["clip"], b["target"], b["caption"])
            for k, i in enumerate(idx):
                if b["index"][k] != i:  # sample i failed to decode (warned); another took its place in b
                    continue
                t = {"x0": x0[k]} | ({"refs": refs[k]} if refs is not None else {})
                if text is not None:
                    keep = text[k].abs().sum(-1) > 0
                    t["text"] = text[k, :int(keep.nonzero().max()) + 1 if keep.any() else 1]
                file = self.path(samples[i])
                save_file({n: v.to(torch.bfloat16).contiguous().cpu() for n, v in t.items()}, file + ".tmp")
                os.replace(file + ".tmp", file)
        if world > 1:
            dist.barrier()
        self.samples = [s for s in samples if os.path.isfile(self.path(s))]
        if len(self.samples) < len(samples):
            common.print0(f"cache: {len(samples) - len(self.samples)} samples left out (their clips failed to decode)")

    def path(self, s):
        h = hashlib.sha1("\0".join([s["input_video"], s["target_video"], s["caption"]]).encode()).hexdigest()[:16]
        return os.path.join(self.root, f"{h}.safetensors")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return {**load_file(self.path(s)), "caption": s["caption"], "skipped": 0}


def collate_latents(items):
    batch = {"caption": [it["caption"] for it in items], "skipped": 0}
    for k in ("x0", "refs"):
        if k in items[0]:
            batch[k] = torch.stack([it[k] for it in items]).float()
    if "text" in items[0]:  # pad back to Wan's 512 tokens with zeros
        batch["text"] = torch.stack([F.pad(it["text"], (0, 0, 0, model.TEXT_LEN - len(it["text"]))) for it in items])
    return batch


dataset, collate = (LatentCache(train, os.path.join(args.out, "cache")), collate_latents) if args.cache_latents \
    else (clips, data.collate)
neg_text = vdm.encode_text([vdm.negative_prompt]) if not args.train_text_encoder else None  # (1, 512, D)

# -----------------------------------------------------------------------------
# the losses


def flow_matching_loss(refs, x0, text, captions, generator=None, sigma=None, dropout=args.caption_dropout):
    """model.flow_matching_loss on a batch, after caption dropout (captions are encoded here when
    the text encoder is trained)."""
    B = x0.shape[0]
    drop = torch.rand(B, generator=generator) < dropout  # drawn always: same RNG stream either way
    captions = [vdm.negative_prompt if d else c for c, d in zip(captions, drop.tolist())]
    if args.train_text_encoder:
        text = vdm.encode_text(captions, grad=torch.is_grad_enabled())
    else:
        text = text.to(device)
        text = torch.where(drop.to(device)[:, None, None], neg_text.to(text), text)
    with amp:
        return model.flow_matching_loss(vdm, x0.to(device), text.to(device, torch.float32), refs, generator, sigma,
                                        args.timestep_shift, args.loss_weight == "diffsynth", dit=dit,
                                        motion_weight=args.motion_weight)


def step_loss(batch):
    if args.cache_latents:
        return flow_matching_loss(batch.get("refs"), batch["x0"], batch.get("text"), batch["caption"])
    refs, x0, text = encode(batch["clip"], batch["target"], batch["caption"])
    return flow_matching_loss(refs, x0, text, batch["caption"])


# -----------------------------------------------------------------------------
# optimizer and state

optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 (plain modules too)
start, skipped = 0, 0  # skipped: clips that failed to decode; rank 0 carries the total of earlier runs
if resume:
    state = common.load_train_state(last)
    set_optimizer_state_dict(trained, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    start = state["step"]
    skipped = state["skipped"] if master else 0
    common.print0(f"resumed from {last} at step {start}")
else:
    torch.manual_seed(args.seed + rank)  # noise, timesteps and caption dropout differ by rank
logger = common.Logger(args.out, args, rank, start)


def save(step):
    """<out>/last: the VDM's weights (all three parts for the tiny preset, whose base is random;
    the DiT alone for the full one) + meta + training state, atomically. Called on every rank."""
    weights = {n: {k[len(n) + 1:]: v for k, v in get_model_state_dict(trained, options=full).items() if k.startswith(n + ".")}
               for n in trained}
    if ema is not None:
        weights["dit_raw"], weights["dit"] = weights["dit"], get_model_state_dict(ema, options=full)
    state = common.train_state(step, get_optimizer_state_dict(trained, optimizer, options=full),
                               {"skipped": int(common.all_sum(skipped))})
    if master:
        parts = ("dit", "vae", "text_encoder") if preset["name"] != "full" else ("dit",)
        meta = {"preset": preset, "script": "sft_vdm", "step": step, "flags": vars(args), "git": common.git_hash()}
        checkpoint.save_checkpoint(last, None, vdm, meta, parts, weights=weights, extra={"train_state.pt": state})
    if world > 1:
        dist.barrier()


@torch.no_grad()
def validate(step):
    """Loss at fixed noise and timesteps (comparable across steps), and a few samples rendered from
    their captions, written next to their ground truth and checked by --metrics (the Shapes world's:
    does the video show the event, val/event_video). Every rank takes the same number of samples."""
    trained.eval()
    mine = lambda n: [val[(rank + world * i) % len(val)] for i in range((n + world - 1) // world)]
    g = torch.Generator().manual_seed(1234 + rank)
    losses = []
    for s in mine(args.val_loss_samples):
        if (item := clips.try_load(s)) is None:
            continue
        b = data.collate([item])
        refs, x0, text = encode(b["clip"], b["target"], b["caption"])
        sigma = torch.rand(1, generator=g)
        losses.append(flow_matching_loss(refs, x0, text, b["caption"], g, sigma, dropout=0.0).item())
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    checks = {k: [] for k in metrics_fn([], videos=[])} if metrics_fn else {}  # the same names on every rank
    for s in mine(args.val_render):
        if (item := clips.try_load(s)) is None:
            continue
        b = data.collate([item])
        refs, _, _ = encode(b["clip"], b["target"], b["caption"])
        video = vdm.decode(vdm.sample(vdm.encode_text([s["caption"]]), None, refs, args.frames, args.height, args.width,
                                      steps=args.val_steps, cfg=args.val_cfg,
                                      generator=torch.Generator().manual_seed(0))).clamp(-1, 1)  # (1, 3, T, H, W)
        for k, values in (metrics_fn([s], videos=[data.to_uint8(video[0])]) if metrics_fn else {}).items():
            checks[k] += [float(v) for v in values if v is not None]
        side_by_side = torch.cat([data.to_tensor(b["target"]).to(video), video], dim=-1)[0]
        data.write_video(os.path.join(args.out, "samples", f"step{step:06d}_{s['id']}.mp4"), data.to_uint8(side_by_side))
    trained.train()
    # every rank joins the all-reduces; a check is left out where no sample has a value
    return {"val/loss": common.all_mean(losses),
            **{f"val/{k}": m for k, v in checks.items() if not math.isnan(m := common.all_mean(v))}}


# -----------------------------------------------------------------------------
# training loop

end = min(args.steps, args.stop_at) if args.stop_at else args.steps
sampler = data.StepSampler(len(dataset), args.batch_size, rank, world, args.seed, start, end)
loader = common.loader(dataset, sampler, args.workers, collate)
params = list(trained.parameters())
t0 = time.time()
stop = common.Stop()  # Ctrl-C / SIGTERM: finish the step, log, save, end
progress = tqdm(total=args.steps, initial=start, disable=not master, desc="sft_vdm")
for step, batch in zip(range(start, end), loader):
    lr = common.set_lr(optimizer, step, args)
    loss = step_loss(batch)
    loss.backward()
    if world > 1:
        for p in manual_sync:  # the parts outside DDP / FSDP (tiny text encoder or VAE)
            if p.grad is not None:  # None on every rank alike (the VAE's time convolutions, on single frames)
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema.parameters(), vdm.dit.parameters()):
                e.lerp_(p, 1 - args.ema)
    skipped += batch["skipped"]
    progress.update(1)

    done = step + 1
    stopped = stop() and done < end  # asked to stop before the planned end: no validation, just save
    if stopped:
        end = done
    if done % args.log_every == 0 or done == end:
        metrics = {"loss": common.all_mean([loss.item()]), "grad_norm": float(grad_norm), "lr": lr,
                   "skipped": int(common.all_sum(skipped)), "sec_per_step": (time.time() - t0) / (done - start)}
        logger.log(metrics, done)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
    if val and ((args.val_every and done % args.val_every == 0) or done == end) and not stopped:
        metrics = validate(done)
        logger.log(metrics, done)
        common.print0(f"step {done}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if done % args.save_every == 0 or done == end:
        save(done)
    if done == end:
        break
progress.close()

# -----------------------------------------------------------------------------
# cleanup

common.check_in_sync([v for v in get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True)).values()])
common.print0(f"{'done' if end == args.steps else 'stopped'}: step {end} of {args.steps}, {time.time() - t0:.0f} s; "
              f"checkpoint {last}")
logger.finish()
common.compute_cleanup()
