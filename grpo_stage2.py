"""
Joint-GRPO stage 2: the DiT learns videos faithful to the input clip and to the stage-1
VLM's captions, by Flow-GRPO through the ODE->SDE sampler. The VLM is frozen: it only
writes the anchor captions.

    # one GPU: the paper's 1000 steps, the stage-1 VLM out/grpo_stage1/last writing the anchors for the
    # SFT VDM out/sft_vdm/last, into out/grpo_stage2
    python grpo_stage2.py --train data/train.jsonl
    # one node, 8 GPUs (the paper's settings)
    torchrun --standalone --nproc_per_node=8 grpo_stage2.py --config config/paper.py
    # two nodes: run on each, with NODE_RANK 0 / 1 and MASTER_ADDR the first node
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_ADDR:29500 grpo_stage2.py --config config/paper.py
    # a 24 GB GPU: train a LoRA on the DiT instead of every weight
    python grpo_stage2.py --train data/train.jsonl --lora 64

1. Anchors, once (cached in <out>/anchors.rank*.jsonl, so a restart does not redo them; their
   settings are in <out>/anchors.json, and another --vlm or other anchor flags is an error): the
   stage-1 VLM's caption of every training prompt. A caption with ROUGE-L below
   --anchor-min-rouge (0.6) against the ground truth is sampled again, --anchor-tries (4) draws
   in all; then the prompt is skipped and counted.
2. Rollouts: for each of a rank's --prompts prompts, G videos sampled with
   model.VDM.sample_sde (--sample-steps 20, noise level 0.7, CFG --cfg) from the anchor caption,
   the reference latents of the input clip in front as at inference. The trajectory and each
   transition's log-prob are kept; only the 9 target latent frames are ever noised or scored.
3. Rewards: r_v2 = CLIP-V(video, ground-truth video), r_c2 = CLIP-T(video, anchor caption),
   each normalised (--norm), summed with the lambdas of --rewards; A = the group z-score.
4. Update, on the first --train-fraction (99%) of the SDE steps, each step's
   rewards.flow_grpo_loss: ratio against the rollout's log-prob, clip range 1e-3, A clipped
   to +-5 (Flow-GRPO's guard; a group z-score of G = 8 never exceeds sqrt(7)), beta 0.004 times
   the KL of the step means to the reference DiT (the starting weights, frozen; with --lora, the
   adapter disabled), divided by the transition's variance as Flow-GRPO's Wan2.1 trainer does.
   The guided velocity keeps the gradient of both CFG branches, as Flow-GRPO's does. The videos
   are split into --minibatches (2) parts, as in Flow-GRPO; gradients add up over a part's
   videos and steps, and each part is one optimizer step, so the second sees a ratio != 1 and
   the clip acts (--updates-per-rollout passes over the parts). With --sde-window K (Flow-GRPO-
   Fast) only K consecutive steps, placed at random within --sde-window-range each step, are
   SDE steps and trained; the others are ODE steps. docs/design.md compares every term with
   Flow-GRPO's code.

Each step logs the seconds of its rollout, decode, rewards and update as time/<phase>.
The anti-hacking guard: `motion`, the mean absolute frame-to-frame difference of the
generated videos (pixels in [0, 1]), is logged beside the rewards with the ground truth's
`motion_gt`. A DiT drifting to static frames to please CLIP shows as motion falling.
Every --sample-every steps rank 0 writes a generated video beside its ground truth to
<out>/samples. Checkpoints hold the DiT (merged, with --lora; the adapter rides along for
--resume); the frozen VLM and the rest of the VDM are named in meta.json ("from"), not copied.
The DiT trains, and takes its KL against, the weights --vdm holds (fp32 from sft_vdm), never a
copy another run saved in bf16.
"""

import argparse
import contextlib
import copy
import json
import os
import time

import checkpoint
import common
import data

# -----------------------------------------------------------------------------
# flags

parser = argparse.ArgumentParser(description="Joint-GRPO stage 2: tune the DiT, the VLM frozen as the anchor.")
# data
parser.add_argument("--train", default="data/train.jsonl", help="training manifest (.jsonl or the official .csv)")
parser.add_argument("--skip-bad", action="store_true", help="skip and count bad manifest lines / clips instead of stopping")
parser.add_argument("--val", default=None, help="held-out manifest: its rewards at fixed noise are logged as val/*")
parser.add_argument("--val-every", type=int, default=100, help="score the held-out prompts every N steps (and at steps 0 and the last)")
parser.add_argument("--val-samples", type=int, default=16, help="held-out prompts scored (the manifest's first)")
parser.add_argument("--val-steps", type=int, default=50, help="ODE steps of the held-out renders")
# models
parser.add_argument("--vlm", default="out/grpo_stage1/last", help="the stage-1 VLM (anchor captions): a checkpoint, vans or tiny")
parser.add_argument("--vdm", default="out/sft_vdm/last", help="the VDM to tune (as trained: fp32 from SFT), also the KL reference: "
                                                             "a checkpoint, vans or tiny")
parser.add_argument("--qwen", default=None, help="local copy of Qwen/Qwen2.5-VL-3B-Instruct")
parser.add_argument("--wan", default=None, help="local copy of Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
parser.add_argument("--vans", default=None, help="local copy of KlingTeam/VANS")
parser.add_argument("--clip", default=None, help="CLIP weights: openai | a local ViT-B/32 file | a tiny-CLIP dir | random (tests); "
                                                "default: the --vdm checkpoint's own clip/ (the Shapes models'), else openai")
parser.add_argument("--lora", type=int, default=0, help="train a LoRA of this rank on the DiT (alpha = 2 rank) instead of every weight")
# anchors
parser.add_argument("--anchor-min-rouge", type=float, default=0.6, help="keep an anchor caption with at least this ROUGE-L")
parser.add_argument("--anchor-tries", type=int, default=4, help="captions sampled per prompt before it is skipped")
parser.add_argument("--max-new-tokens", type=int, default=512, help="anchor caption budget")
# rollouts
parser.add_argument("--prompts", type=int, default=1, help="prompts per rank per step (each gives a group of G)")
parser.add_argument("--group-size", type=int, default=8, help="G: videos per prompt")
parser.add_argument("--micro-batch", type=int, default=8, help="videos per DiT forward, rollouts and updates alike (at most a "
                                                               "minibatch's share of a step; CFG doubles the forward's batch)")
parser.add_argument("--frames", type=int, default=33, help="frames (4k + 1)")
parser.add_argument("--ref-clip", default=None, choices=data.REF_CLIPS,
                    help="which input frames make the reference clip (data.clip_indices; default: what --vdm was trained with)")
parser.add_argument("--height", type=int, default=352, help="height (multiple of 16)")
parser.add_argument("--width", type=int, default=640, help="width (multiple of 16)")
parser.add_argument("--sample-steps", type=int, default=20, help="SDE sampling steps")
parser.add_argument("--noise-level", type=float, default=0.7, help="a of the SDE step")
parser.add_argument("--cfg", type=float, default=5.0, help="guidance scale of rollouts and updates")
parser.add_argument("--train-fraction", type=float, default=0.99, help="train on the first int(steps * f) SDE steps")
parser.add_argument("--sde-window", type=int, default=0, help="Flow-GRPO-Fast: only this many consecutive steps are SDE "
                                                              "steps, and trained; the rest ODE (0: every step, the paper)")
parser.add_argument("--sde-window-range", type=lambda s: tuple(int(x) for x in s.split(",")), default=(0, 10),
                    help="first,end: the window lies within these steps, its start drawn uniformly each step")
# rewards and loss
parser.add_argument("--rewards", default="clip_v=1,clip_t=1",
                    help="name=lambda list: clip_v, clip_t, or module:function (fn(videos, samples) -> floats)")
parser.add_argument("--norm", default="pooled", choices=("pooled", "group", "batch", "none"),
                    help="how each reward is normalised before the sum (rewards.normalise, rewards.NORMALISATIONS)")
parser.add_argument("--clip-range", type=float, default=1e-3, help="epsilon of the clipped ratio")
parser.add_argument("--adv-clip", type=float, default=5.0, help="advantages clipped to +-this (binds only for groups over 26)")
parser.add_argument("--beta", type=float, default=0.004, help="weight of the KL of the step means to the reference DiT")
parser.add_argument("--minibatches", type=int, default=2, help="optimizer steps per pass over a rollout, each on its share "
                                                                   "of the videos (Flow-GRPO's 2: the later ones see a ratio != 1)")
parser.add_argument("--updates-per-rollout", type=int, default=1, help="passes over each rollout")
parser.add_argument("--sample-every", type=int, default=50, help="write a generated video to <out>/samples every N steps")
common.add_run_flags(parser, out="out/grpo_stage2", steps=1000)  # the paper's steps
args = common.parse_flags(parser, "grpo_stage2")
mb = common.minibatches(parser, args, "videos")  # videos per micro-batch
if not 1 <= int(args.sample_steps * args.train_fraction) <= args.sample_steps:
    parser.error(f"--train-fraction {args.train_fraction}: trains int({args.sample_steps} x it) SDE steps, which must be "
                 f"1 to --sample-steps")
first, end_of_range = args.sde_window_range
if args.sde_window and not (0 <= first and first + args.sde_window <= end_of_range <= args.sample_steps):
    parser.error(f"--sde-window {args.sde_window} --sde-window-range {first},{end_of_range}: the window must fit in the "
                 f"range, and the range in the {args.sample_steps} --sample-steps")

# -----------------------------------------------------------------------------
# the models and the data checked before torch is imported: a wrong path is one error line at once

last = os.path.join(args.out, "last")
resume = args.resume and checkpoint.checkpoint_exists(last)
common.check_models(vlm=args.vlm, vdm=args.vdm)
common.check_frozen(last, resume, vlm=args.vlm, vdm=args.vdm)
common.check_clip(args.clip, args.rewards)
train, val = data.read_manifests(args, min_frames=args.frames)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from tqdm import tqdm  # noqa: E402

import model  # noqa: E402
import rewards  # noqa: E402

# -----------------------------------------------------------------------------
# compute

rank, world, device = common.compute_init(args.device)
master = rank == 0
amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
G = args.group_size
rep = lambda xs: [x for x in xs for _ in range(G)]  # a prompt's value for each of its G videos
try:
    reward_fns = rewards.parse(args.rewards, ("clip_v", "clip_t"))
except (ValueError, ImportError, AttributeError) as e:
    parser.error(f"--rewards: {e}")
weights = {k: w for k, (w, _) in reward_fns.items()}

# -----------------------------------------------------------------------------
# data; CLIP is loaded before any heavy work (the anchors)

args.ref_clip = args.ref_clip or checkpoint.ref_clip_of(args.vdm)
clip = common.load_clip(args.clip, [args.vdm], device) if {"clip_v", "clip_t"} & set(reward_fns) else None
os.makedirs(args.out, exist_ok=True)

# -----------------------------------------------------------------------------
# anchors: the stage-1 VLM's captions, kept when ROUGE-L >= --anchor-min-rouge

torch.manual_seed(args.seed + rank)  # anchor captions are sampled
_, (vlm, _) = common.load_model(args.vlm, qwen=args.qwen, wan=args.wan, vans=args.vans, dtype=frozen_dtype, device=device,
                                need=("vlm",))
vlm.model.to(device).eval().requires_grad_(False)
vlm_frames = data.ClipDataset(train, ("vlm",), args.frames, vlm_frames=model.VLM_FRAMES)
key = lambda i: f"{i}:{train[i]['id']}"  # a changed manifest does not reuse stale anchors
common.same_settings(os.path.join(args.out, "anchors.json"), {"vlm": args.vlm, "min_rouge": args.anchor_min_rouge,
                                                               "tries": args.anchor_tries, "max_new_tokens": args.max_new_tokens})


def read_anchors():
    found = {}
    for name in sorted(os.listdir(args.out)):
        if name.startswith("anchors.rank") and name.endswith(".jsonl"):
            with open(os.path.join(args.out, name)) as f:
                found.update((r["key"], r) for r in map(json.loads, f))
    return found


anchors = read_anchors()
todo = [i for i in range(len(train))[rank::world] if key(i) not in anchors]
with open(os.path.join(args.out, f"anchors.rank{rank}.jsonl"), "a") as f:
    for c in tqdm(range(0, len(todo), args.micro_batch), disable=not master or not todo, desc="anchors"):
        idx = todo[c:c + args.micro_batch]
        frames = {i: it["vlm"] for i in idx if (it := vlm_frames.try_load(train[i])) is not None}  # else no anchor
        ok = list(frames)
        sample = lambda need: [model.caption_of(out) for out in vlm.generate(  # a retry needs a new draw: sampled
            [frames[ok[j]] for j in need], [train[ok[j]]["question"] for j in need], decoding="sample",
            max_new_tokens=args.max_new_tokens)]
        chosen = dict(zip(ok, rewards.choose_anchors(sample, [train[i]["caption"] for i in ok], args.anchor_min_rouge,
                                                     args.anchor_tries)))
        for i in idx:
            caption, score, found_at = chosen.get(i, (None, -1.0, 0))
            r = {"key": key(i), "caption": caption, "rouge_l": round(score, 4), "found_at": found_at}
            anchors[r["key"]] = r
            f.write(json.dumps(r) + "\n")
            f.flush()
if world > 1:
    dist.barrier()
    anchors = read_anchors()  # every rank reads every rank's anchors
usable = [i for i in range(len(train)) if anchors[key(i)]["caption"] is not None]
common.print0(f"anchors: {len(usable)} of {len(train)} prompts kept, {len(train) - len(usable)} skipped "
              f"(ROUGE-L < {args.anchor_min_rouge} after {args.anchor_tries} tries)")
if not usable:
    raise SystemExit("error: no prompt has an anchor caption; lower --anchor-min-rouge or train stage 1 further")
vlm = None  # freed: the checkpoint names it in "from"
# training data: the prompts with an anchor. A clip that fails to decode is replaced by the next
# such prompt, and item["index"] fetches the caption of the prompt actually loaded.
clips = data.ClipDataset([train[i] for i in usable], ("clip", "target"), args.frames, args.height, args.width,
                         ref_clip=args.ref_clip)
anchor_captions = [anchors[key(i)]["caption"] for i in usable]

# -----------------------------------------------------------------------------
# models: the DiT (every weight, or a LoRA), its frozen reference, the frozen encoders and CLIP

preset, (_, vdm) = common.load_model(args.vdm, qwen=args.qwen, wan=args.wan, vans=args.vans, dtype=frozen_dtype,
                                     dit_dtype=torch.float32, device=device, need=("vdm",))
vdm.text_encoder.to(device, frozen_dtype).eval().requires_grad_(False)
vdm.vae.to(device).eval().requires_grad_(False)
dit = vdm.dit.to(device).requires_grad_(False)
ref_dit = None
if args.lora:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    dit.add_adapter(LoraConfig(r=args.lora, lora_alpha=2 * args.lora, init_lora_weights=True,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]))
    if resume:
        set_peft_model_state_dict(dit, common.read_weights(os.path.join(last, "dit_lora.safetensors"),
                                                           get_peft_model_state_dict(dit)))
    for n, p in dit.named_parameters():
        p.requires_grad_(".lora_" in n)
else:
    ref_dit = copy.deepcopy(dit).eval()  # the starting weights, frozen
    if resume:
        dit.load_state_dict(common.read_weights(os.path.join(last, "dit.safetensors"), dit.state_dict()))
    dit.requires_grad_(True)
if args.grad_checkpointing:
    dit.enable_gradient_checkpointing()
dit.train()
params = [p for p in dit.parameters() if p.requires_grad]
ddp_dit = DDP(dit, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else dit
common.print0(f"{preset['name']} DiT: {sum(p.numel() for p in params):,} parameters trained" + (f" (LoRA r{args.lora})" if args.lora else ""))


def ref_velocity(x, sigma, text, neg, refs):
    """The reference DiT's guided velocity: the frozen copy, or the DiT with its adapter off."""
    if ref_dit is not None:
        return vdm.guided_velocity(x, sigma, text, neg, refs, args.cfg, dit=ref_dit)
    dit.disable_adapters()
    try:
        return vdm.guided_velocity(x, sigma, text, neg, refs, args.cfg)
    finally:
        dit.enable_adapters()


def score(videos, captions, samples, targets):
    """-> {reward name: raw values (N,)} of N videos, each with the caption it was made from, its
    sample's text fields and its ground-truth video."""
    raw = {}
    for name, (_, fn) in reward_fns.items():
        if fn is not None:  # a reward of your own
            raw[name] = fn(videos, [dict(s, anchor=c) for s, c in zip(samples, captions)])
        elif name == "clip_v":
            raw[name] = clip.clip_v(videos, targets)
        elif name == "clip_t":
            raw[name] = clip.clip_t(videos, captions)
    return {k: torch.as_tensor(v, dtype=torch.float32).flatten().cpu() for k, v in raw.items()}


TEXT_FIELDS = ("id", "question", "think", "caption", "event")
held_out = data.ClipDataset(val[:args.val_samples], ("clip", "target"), args.frames, args.height, args.width,
                            ref_clip=args.ref_clip)


def validate(step):
    """The rewards of the held-out prompts (--val), each rendered once by the ODE sampler from its
    ground-truth caption and prompt i's noise (seed i): the same videos at every call but for the
    DiT. Rank r scores prompts r, r + world, ...; rank 0 appends each prompt's raw rewards to
    <out>/val.jsonl. -> {val/reward: the lambda-weighted raw sum, val/rewards/<name>/mean}"""
    dit.eval()
    rows = []
    for i in range(rank, len(held_out), world):
        item = held_out[i]
        with torch.no_grad(), amp:
            refs = vdm.ref_latents(vdm.encode_video(data.to_tensor(item["clip"][None])))
            x = vdm.sample(vdm.encode_text([item["caption"]]), vdm.negative_text(1), refs, args.frames, args.height,
                           args.width, args.val_steps, args.cfg, generator=torch.Generator().manual_seed(i))
            video = data.to_uint8(vdm.decode(x)[0])
        raw = score([video], [item["caption"]], [{k: item[k] for k in TEXT_FIELDS}], [item["target"]])
        rows.append({"id": item["id"], **{k: float(v[0]) for k, v in raw.items()}})
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if master:
        with open(os.path.join(args.out, "val.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "prompts": rows}) + "\n")
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    return {"val/reward": sum(weights[k] * mean(k) for k in reward_fns),
            **{f"val/rewards/{k}/mean": mean(k) for k in reward_fns}}


def step_loss(r, j, norm):
    """Flow-GRPO's loss on SDE step j of a micro-batch r of rollouts: the trained DiT's log-prob of the
    step the rollout took and its mean, against the rollout's log-prob and the reference DiT's mean
    (rewards.flow_grpo_loss), divided by norm, the minibatch's number of terms."""
    x, x_next = r["xs"][:, j], r["xs"][:, j + 1]  # (mb, C, T, h, w)
    with amp:
        v = vdm.guided_velocity(x, sigmas[j], r["text"], r["neg"], r["refs"], args.cfg, dit=ddp_dit)
    _, logp, mean, std = model.sde_step_with_logprob(v, x, sigmas[j], sigmas[j + 1], args.noise_level, prev_sample=x_next)
    ref_mean = None  # beta 0: no KL term
    if args.beta:
        with torch.no_grad(), amp:
            v_ref = ref_velocity(x, sigmas[j], r["text"], r["neg"], r["refs"])
        _, _, ref_mean, _ = model.sde_step_with_logprob(v_ref, x, sigmas[j], sigmas[j + 1], args.noise_level,
                                                        prev_sample=x_next)
    return rewards.flow_grpo_loss(logp, r["old_logp"][:, j], r["advantages"], mean, ref_mean, std, args.clip_range,
                                  args.beta, args.adv_clip, norm)


def motion(videos):
    """Mean absolute frame-to-frame difference, pixels in [0, 1]: one value per video."""
    return [float((torch.as_tensor(v[1:]).float() - torch.as_tensor(v[:-1]).float()).abs().mean() / 255) for v in videos]


# -----------------------------------------------------------------------------
# optimizer and state

optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
start, skipped = common.start_state(last, resume, optimizer, args.seed)  # skipped: clips that failed to decode
logger = common.Logger(args.out, args, rank, start)
if master and val:  # the held-out scores of a resumed run's later steps are redone, as its log's
    path = os.path.join(args.out, "val.jsonl")
    rows = [r for r in map(json.loads, open(path)) if r["step"] <= start] if start and os.path.isfile(path) else []
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def save(step):
    """<out>/last: the tuned DiT, meta (naming the frozen VLM and the rest of the VDM, --vlm and
    --vdm, in "from") and training state, atomically."""
    state = common.train_state(step, optimizer.state_dict(), {"skipped": int(common.all_sum(skipped))})
    if master:
        lora = {"dit": model.merged_lora_state(dit), "dit_lora": get_peft_model_state_dict(dit)} if args.lora else {}
        meta = {"preset": preset, "script": "grpo_stage2", "step": step, "flags": vars(args), "git": common.git_hash(),
                "anchors_kept": len(usable), "anchors_skipped": len(train) - len(usable)}
        checkpoint.save_checkpoint(last, None, vdm, meta, ("dit",), weights=lora, extra={"train_state.pt": state},
                              sources={"vlm": args.vlm, "vdm": args.vdm})
    if world > 1:
        dist.barrier()


# -----------------------------------------------------------------------------
# training loop

end = min(args.steps, args.stop_at) if args.stop_at else args.steps
sampler = data.StepSampler(len(usable), args.prompts, rank, world, args.seed, start, end)
loader = common.loader(clips, sampler, args.workers, data.collate)
sigmas = model.flow_sigmas(args.sample_steps).to(device)
trained_steps = range(int(args.sample_steps * args.train_fraction))  # with --sde-window: the step's window
phases = common.Phases()  # the wall time of each step's rollout, decode, rewards and update, logged
stop = common.Stop()  # Ctrl-C / SIGTERM: finish the step, log, save, end
progress = tqdm(total=args.steps, initial=start, disable=not master, desc="grpo_stage2")
if val and start == 0:
    logger.log(validate(0), 0)
t0, val_seconds = time.time(), 0.0  # sec_per_step leaves the held-out scoring out
for step, batch in zip(range(start, end), loader):
    phases.start()
    lr = common.set_lr(optimizer, step, args)
    skipped += batch["skipped"]
    captions = rep([anchor_captions[i] for i in batch["index"]])
    with torch.no_grad():  # a group's G videos share its prompt's caption and references
        text = vdm.encode_text(captions[::G]).repeat_interleave(G, 0)  # (P * G, 512, D)
        refs = vdm.ref_latents(vdm.encode_video(data.to_tensor(batch["clip"]))) if vdm.n_refs else None
        refs = refs.repeat_interleave(G, 0) if refs is not None else None  # (P * G, 16, n, h, w)

    # 1. rollouts in micro-batches of mb videos, the layout the update reuses: each its conditions (text, neg,
    # refs), trajectory xs (mb, S + 1, C, T, h, w) and log-probs (mb, S) (NaN at the ODE steps of a window)
    dit.eval()
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    window = None
    if args.sde_window:  # Flow-GRPO-Fast: one window for all of the step's rollouts
        start_at = int(torch.randint(first, end_of_range - args.sde_window + 1, (1,), generator=gen))
        window = (start_at, start_at + args.sde_window)
        trained_steps = range(*window)
    rollouts = []
    for i in range(0, len(captions), mb):
        r = {"text": text[i:i + mb], "refs": None if refs is None else refs[i:i + mb],
             "neg": vdm.negative_text(len(captions[i:i + mb])) if args.cfg != 1.0 else None}
        with torch.no_grad(), amp:
            r["xs"], r["old_logp"] = vdm.sample_sde(r["text"], r["neg"], r["refs"], args.frames, args.height, args.width,
                                                   args.sample_steps, args.cfg, noise_level=args.noise_level,
                                                   generator=gen, window=window)
        rollouts.append(r)
    phases.mark("rollout")
    with torch.no_grad():
        videos = [data.to_uint8(v) for r in rollouts for v in vdm.decode(r["xs"][:, -1])]
    phases.mark("decode")

    # 2-3. rewards, their normalised sum, the group advantage
    samples = rep([{k: batch[k][i] for k in TEXT_FIELDS} for i in range(len(batch["id"]))])
    raw = score(videos, captions, samples, rep(list(batch["target"].numpy())))
    total = rewards.combine(raw, weights, G, args.norm, common.all_sum)
    advantages = rewards.group_advantages(total, G).to(device)
    for i, r in enumerate(rollouts):
        r["advantages"] = advantages[i * mb:(i + 1) * mb]
    phases.mark("rewards")

    # 4. the update: each minibatch's gradient added up over its videos and trained SDE steps, then one
    # optimizer step; DDP averages over the ranks at the minibatch's last term
    dit.train()
    per_minibatch = len(rollouts) // args.minibatches  # micro-batches per optimizer step
    stats = []
    for minibatch in [rollouts[i:i + per_minibatch] for i in range(0, len(rollouts), per_minibatch)] * args.updates_per_rollout:
        terms = [(r, j) for r in minibatch for j in trained_steps]
        norm = sum(len(r["old_logp"]) for r in minibatch) * len(trained_steps)
        for n, (r, j) in enumerate(terms):
            with contextlib.nullcontext() if n == len(terms) - 1 or world == 1 else ddp_dit.no_sync():
                loss, st = step_loss(r, j, norm)
                loss.backward()
            stats.append(st)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    phases.mark("update")
    progress.update(1)

    done = step + 1
    if stop():
        end = done
    metrics = {}
    if val and (done % args.val_every == 0 or done == end):
        metrics = validate(done)
        phases.mark("val")
        val_seconds += phases.seconds["val"]
    if done % args.log_every == 0 or done == end:
        metrics |= {**common.group_metrics(raw, weights, total, G, stats),
                   "motion": common.all_mean(motion(videos)),
                   "motion_gt": common.all_mean(motion(list(batch["target"].numpy()))),
                   "grad_norm": float(grad_norm), "lr": lr, "skipped": int(common.all_sum(skipped)),
                   "sec_per_step": (time.time() - t0 - val_seconds) / (done - start),
                   **{f"time/{k}": round(v, 3) for k, v in phases.seconds.items()}}
        progress.set_postfix(reward=f"{metrics['reward']:.3f}", motion=f"{metrics['motion']:.4f}")
    if metrics:
        logger.log(metrics, done)
    if master and (done % args.sample_every == 0 or done == end):
        side_by_side = torch.cat([torch.as_tensor(batch["target"][0]), torch.as_tensor(videos[0])], dim=2).numpy()
        data.write_video(os.path.join(args.out, "samples", f"step{done:06d}_{batch['id'][0]}.mp4"), side_by_side)
    if done % args.save_every == 0 or done == end:
        save(done)
    if done == end:
        break
progress.close()

# -----------------------------------------------------------------------------
# cleanup

common.finish(params, end, args.steps, t0, last, logger)
