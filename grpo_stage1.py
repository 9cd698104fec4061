"""
Joint-GRPO stage 1: the VLM learns captions that are right and that the VDM renders well.
The VDM is frozen; it only turns each sampled caption into the video that CLIP-V scores.

    # one GPU: the paper's 800 steps from out/sft_vlm/last and out/sft_vdm/last into out/grpo_stage1
    python grpo_stage1.py --train data/train.jsonl
    # one node, 8 GPUs (the paper's settings)
    torchrun --standalone --nproc_per_node=8 grpo_stage1.py --config config/paper.py
    # two nodes: run on each, with NODE_RANK 0 / 1 and MASTER_ADDR the first node
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_ADDR:29500 grpo_stage1.py --config config/paper.py
    # the tiny models on the Shapes world, on a CPU
    python grpo_stage1.py --config config/shapes.py --out out/shapes/grpo_stage1

One step, on every rank, for each of its --prompts prompts (video, question):
  1. sample G completions from the LoRA VLM (softmax(logits / --temperature), untruncated);
  2. render each completion's caption with the frozen VDM: --render-steps Euler steps, CFG
     --render-cfg, the reference latents of the prompt's input clip (model.VDM.sample), every
     render of a group from the same noise, so a caption repeated in the group renders once;
  3. rewards r_f = format, r_t1 = ROUGE-L(caption, ground-truth caption), r_v1 = CLIP-V(render,
     ground-truth video); each normalised (--norm, see rewards.normalise) and summed with the
     lambda weights of --rewards;
  4. A = (r - mean_group) / (std_group + eps) of the sum (rewards.group_advantages);
  5. the old and reference log-probs of every completion token are computed, then the
     completions are split into --minibatches (2) parts and each part is one optimizer step on
     the clipped surrogate + beta k3 KL (rewards.grpo_loss), averaged per sequence then over
     the part (--loss-mean token: over its tokens); --updates-per-rollout passes over them.
     As in Flow-GRPO, the second part is scored by a policy the first step has moved, so its
     ratio differs from 1 and the clip range acts. With --minibatches 1 and one pass the ratio
     is exactly 1 and the objective is REINFORCE with a group baseline, plus the KL.

Choices the paper leaves open, made here:
- The SFT LoRA is merged into the base weights and a fresh LoRA (r 8, alpha 32) is trained on
  top, so the KL reference, "the model with the adapter disabled", is the SFT model. The
  checkpoint therefore holds the merged VLM (vlm.safetensors) and the new adapter (vlm_lora/,
  peft format); the frozen VDM is not copied, its meta.json names --vdm instead, and
  `infer.py --model <out>/last` loads it from there.
- Dropout is off (LoRA dropout is an SFT regulariser): the recomputed old log-probs equal the
  policy's, so the ratio is exactly 1 at the first optimizer step of a rollout, and the log's
  approx_kl (mean of (log ratio)^2 / 2) measures how far the later ones moved.
- Each reward is normalised by its within-group spread pooled over the whole step, all ranks
  (--norm pooled, rewards.normalise): a reward whose in-group differences are noise then counts
  little there, where a per-group z-score (--norm group) would give noise full weight.
- Rollouts sample softmax(logits / T) whole, and the log-probs score that same distribution:
  no top-p (a nucleus cut would make the scored distribution another than the sampled one), no
  top-k, no repetition penalty (model.sampling). The release's generate call, on Qwen's
  generation_config.json (top_k 1), would give a group G identical completions.
- A group's renders share one noise (common random numbers): r_v1 then ranks the captions
  of a group by what they render, not by the luck of their noise, and identical captions,
  common once the VLM is sure, cost one render.
- Groups never straddle ranks: a rank samples all G completions of its prompts, so every
  advantage is computed within its group.
"""

import argparse
import contextlib
import math
import os
import time

import checkpoint
import common
import data

# -----------------------------------------------------------------------------
# flags

parser = argparse.ArgumentParser(description="Joint-GRPO stage 1: tune the VLM, the VDM frozen.")
# data
parser.add_argument("--train", default="data/train.jsonl", help="training manifest (.jsonl or the official .csv)")
parser.add_argument("--skip-bad", action="store_true", help="skip and count bad manifest lines / clips instead of stopping")
# models
parser.add_argument("--init", default="out/sft_vlm/last", help="the SFT VLM: a checkpoint directory, vans or tiny")
parser.add_argument("--vdm", default="out/sft_vdm/last", help="the frozen VDM: a checkpoint directory, vans or tiny")
parser.add_argument("--qwen", default=None, help="local copy of Qwen/Qwen2.5-VL-3B-Instruct")
parser.add_argument("--wan", default=None, help="local copy of Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
parser.add_argument("--vans", default=None, help="local copy of KlingTeam/VANS")
parser.add_argument("--clip", default=None, help="CLIP-V weights: openai | a local ViT-B/32 file | a tiny-CLIP dir | random (tests); "
                                                "default: the --vdm checkpoint's own clip/ (the Shapes models'), else openai")
# rollouts
parser.add_argument("--prompts", type=int, default=1, help="prompts per rank per step (each gives a group of G)")
parser.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use the same)")
parser.add_argument("--max-new-tokens", type=int, default=512, help="completion budget")
parser.add_argument("--micro-batch", type=int, default=8, help="sequences per generation / log-prob forward "
                                                               "(at most a minibatch's share of a step)")
parser.add_argument("--frames", type=int, default=33, help="rendered frames (4k + 1)")
parser.add_argument("--ref-clip", default=None, choices=data.REF_CLIPS,
                    help="which input frames make the reference clip (data.clip_indices; default: what --vdm was trained with)")
parser.add_argument("--height", type=int, default=352, help="rendered height (multiple of 16)")
parser.add_argument("--width", type=int, default=640, help="rendered width (multiple of 16)")
parser.add_argument("--render-steps", type=int, default=20, help="Euler steps of the renders (inference uses 50)")
parser.add_argument("--render-cfg", type=float, default=5.0, help="guidance scale of the renders")
parser.add_argument("--render-batch", type=int, default=8, help="videos per VDM sampling batch")
# rewards and loss
parser.add_argument("--rewards", default="format=1,rouge_l=1,clip_v=1",
                    help="name=lambda list: format, rouge_l, clip_v, or module:function (fn(completions, samples) -> floats)")
parser.add_argument("--norm", default="pooled", choices=("pooled", "group", "batch", "none"),
                    help="how each reward is normalised before the sum (rewards.normalise, rewards.NORMALISATIONS)")
parser.add_argument("--metrics", default=None, help="module:function checking the rollouts' captions, logged under its "
                                               "names (e.g. shapes:metrics)")
parser.add_argument("--clip-range", type=float, default=1e-3, help="epsilon of the clipped ratio")
parser.add_argument("--beta", type=float, default=0.004, help="weight of the k3 KL to the reference (SFT) model")
parser.add_argument("--loss-mean", default="sequence", choices=["sequence", "token"], help="average per sequence, or over all tokens")
parser.add_argument("--minibatches", type=int, default=2, help="optimizer steps per pass over a rollout, each on its share "
                                                                   "of the completions (Flow-GRPO's 2: the later ones see a ratio != 1)")
parser.add_argument("--updates-per-rollout", type=int, default=1, help="passes over each rollout")
parser.add_argument("--log-samples", type=int, default=2, help="completions written to the log at each log step")
common.add_run_flags(parser, out="out/grpo_stage1", steps=800)  # the paper's steps
args = common.parse_flags(parser, "grpo_stage1")
mb = common.minibatches(parser, args, "completions")  # sequences per micro-batch

# -----------------------------------------------------------------------------
# the models and the data checked before torch is imported: a wrong path is one error line at once

last = os.path.join(args.out, "last")
resume = args.resume and checkpoint.checkpoint_exists(last)
common.check_models(**({} if resume else {"init": args.init}), vdm=args.vdm)
common.check_frozen(last, resume, vdm=args.vdm)
common.check_clip(args.clip, args.rewards)
train, _ = data.read_manifests(args, min_frames=args.frames)

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from tqdm import tqdm  # noqa: E402

import model  # noqa: E402
import rewards  # noqa: E402

# -----------------------------------------------------------------------------
# compute

rank, world, device = common.compute_init(args.device)
master = rank == 0
amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
G = args.group_size
rep = lambda xs: [x for x in xs for _ in range(G)]  # a prompt's value for each of its G completions
try:
    reward_fns = rewards.parse(args.rewards, ("format", "rouge_l", "clip_v"))
except (ValueError, ImportError, AttributeError) as e:
    parser.error(f"--rewards: {e}")
weights = {k: w for k, (w, _) in reward_fns.items()}
render = "clip_v" in reward_fns
metrics_fn = common.hook("metrics", args.metrics) if args.metrics else None

# -----------------------------------------------------------------------------
# data: each prompt's VLM frames, and (for CLIP-V) its reference clip and ground-truth video. CLIP is
# loaded before any heavy work.

args.ref_clip = args.ref_clip or checkpoint.ref_clip_of(args.vdm)
clip = common.load_clip(args.clip, [args.vdm], device) if render else None
os.makedirs(args.out, exist_ok=True)
dataset = data.ClipDataset(train, ("vlm", "clip", "target") if render else ("vlm",), args.frames, args.height,
                           args.width, model.VLM_FRAMES, args.ref_clip)

# -----------------------------------------------------------------------------
# models: a fresh LoRA on the (merged) SFT VLM; the VDM and CLIP frozen

preset, (vlm, _) = common.load_model(last if resume else args.init, qwen=args.qwen, wan=args.wan, vans=args.vans,
                                     dtype=dtype, device=device, need=("vlm",))
if not resume:
    if hasattr(vlm.model, "merge_and_unload"):  # the SFT adapter becomes part of the reference
        vlm.model = vlm.model.merge_and_unload()
    torch.manual_seed(args.seed)  # a fresh LoRA's init follows --seed (the same on every rank)
    vlm.model = model.add_lora(vlm.model)
for name, p in vlm.model.named_parameters():
    p.requires_grad_(".lora_" in name)
for m in vlm.model.modules():
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0
net = vlm.model.to(device)
if args.grad_checkpointing:
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
params = [p for p in net.parameters() if p.requires_grad]
ddp_net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
common.print0(f"{preset['name']} VLM: {sum(p.numel() for p in params):,} LoRA parameters trained")

_, (_, vdm) = common.load_model(args.vdm, qwen=args.qwen, wan=args.wan, vans=args.vans, dtype=dtype, device=device,
                                need=("vdm",))
for m in (vdm.dit, vdm.vae, vdm.text_encoder):
    m.to(device).eval().requires_grad_(False)


@torch.no_grad()
def render_videos(captions, clips, step):
    """Captions (P * G, group after group) -> uint8 videos (T, H, W, 3), in batches of
    --render-batch. A group's renders share its prompt's reference latents and one noise
    (from seed, step, rank and group), so r_v1 differs within a group only as the captions
    do, and a caption repeated in its group is rendered once. -> (videos, renders made)"""
    refs = vdm.ref_latents(vdm.encode_video(data.to_tensor(clips))) if vdm.n_refs else None  # (P, 16, n, h, w)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    noise = torch.randn(len(clips), vdm.dit.config.in_channels, (args.frames - 1) // 4 + 1, args.height // 8,
                        args.width // 8, generator=gen)
    jobs = list(dict.fromkeys((k // G, c) for k, c in enumerate(captions)))  # (group, caption), each once
    videos = {}
    for i in range(0, len(jobs), args.render_batch):
        chunk = jobs[i:i + args.render_batch]
        g = [j for j, _ in chunk]
        z = vdm.sample(vdm.encode_text([c for _, c in chunk]), vdm.negative_text(len(g)) if args.render_cfg != 1.0 else None,
                       None if refs is None else refs[g], args.frames, args.height, args.width,
                       steps=args.render_steps, cfg=args.render_cfg, latents=noise[g])
        videos.update(zip(chunk, map(data.to_uint8, vdm.decode(z))))
    return [videos[(k // G, c)] for k, c in enumerate(captions)], len(jobs)


def samples_of(batch):
    """A batch's prompts as manifest rows (what a reward or metric of your own reads)."""
    return [{k: batch[k][i] for k in ("id", "question", "think", "caption", "event")} for i in range(len(batch["id"]))]


def score(completions, batch, step):
    """-> ({reward name: raw values (P * G,)}, group after group; the number of renders made)."""
    captions = [model.caption_of(c) for c in completions]
    raw, renders = {}, 0
    for name, (_, fn) in reward_fns.items():
        if fn is not None:  # a reward of your own
            raw[name] = fn(completions, rep(samples_of(batch)))
        elif name == "format":
            raw[name] = [rewards.format_reward(c) for c in completions]
        elif name == "rouge_l":
            raw[name] = [rewards.rouge_l(c, gt) for c, gt in zip(captions, rep(batch["caption"]))]
        elif name == "clip_v":
            videos, renders = render_videos(captions, batch["clip"], step)
            raw[name] = clip.clip_v(videos, rep(list(batch["target"].numpy())))
    return {k: torch.as_tensor(v, dtype=torch.float32).flatten().cpu() for k, v in raw.items()}, renders


# -----------------------------------------------------------------------------
# optimizer and state

optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
start, skipped = common.start_state(last, resume, optimizer, args.seed)  # skipped: clips that failed to decode
logger = common.Logger(args.out, args, rank, start)


def save(step):
    """<out>/last: merged VLM + GRPO LoRA + meta (naming --vdm, the frozen VDM, in "from") + training
    state, atomically."""
    state = common.train_state(step, optimizer.state_dict(), {"skipped": int(common.all_sum(skipped))})
    if master:
        meta = {"preset": preset, "script": "grpo_stage1", "step": step, "flags": vars(args), "git": common.git_hash()}
        checkpoint.save_checkpoint(last, vlm, None, meta, ("vlm", "vlm_lora"), extra={"train_state.pt": state},
                              sources={"vdm": args.vdm})
    if world > 1:
        torch.distributed.barrier()


def completion_metrics(rollouts, batch):
    """The completions' lengths (tokens up to the stop, as TRL counts them; inside [Think]), the share
    that ran out of --max-new-tokens (no stop token), and a world's own checks of their captions
    (--metrics: the Shapes world's event accuracy, where a prompt has an event), every rank's together."""
    completions = [c for r in rollouts for c in r["completions"]]
    stop_ids = torch.tensor(vlm.stop_ids())
    lengths, ended = [], []
    for r in rollouts:
        mask, ids = r["inputs"]["completion_mask"], r["inputs"]["input_ids"]
        lengths += mask.sum(1).tolist()
        ended += torch.isin(ids[:, -mask.shape[1]:].cpu(), stop_ids).any(1).tolist()
    think = [len(vlm.processor.tokenizer(model.extract(c, "Think") or "").input_ids) for c in completions]
    checks = metrics_fn(rep(samples_of(batch)), captions=[model.caption_of(c) for c in completions]) if metrics_fn else {}
    return {"completions/mean_length": common.all_mean(lengths), "completions/think_length": common.all_mean(think),
            "completions/clipped_ratio": common.all_mean([float(not e) for e in ended]),
            **{k: m for k, vs in checks.items() if not math.isnan(m := common.all_mean([float(v) for v in vs if v is not None]))}}


# -----------------------------------------------------------------------------
# training loop

end = min(args.steps, args.stop_at) if args.stop_at else args.steps
sampler = data.StepSampler(len(dataset), args.prompts, rank, world, args.seed, start, end)
loader = common.loader(dataset, sampler, args.workers, data.collate)
t0 = time.time()
stop = common.Stop()  # Ctrl-C / SIGTERM: finish the step, log, save, end
progress = tqdm(total=args.steps, initial=start, disable=not master, desc="grpo_stage1")
for step, batch in zip(range(start, end), loader):
    lr = common.set_lr(optimizer, step, args)
    skipped += batch["skipped"]
    videos, questions = rep(batch["vlm"]), rep(batch["question"])

    # 1. rollouts, in micro-batches of mb: each its inputs (prompt + completion, completion_mask) and completions
    net.eval()
    rollouts = []
    for i in range(0, len(videos), mb):
        with amp:  # the precision the log-probs are scored in
            inputs, texts = vlm.rollout(videos[i:i + mb], questions[i:i + mb], args.max_new_tokens,
                                        **model.sampling(args.temperature, top_p=1.0))
        rollouts.append({"inputs": inputs, "completions": texts})
    completions = [c for r in rollouts for c in r["completions"]]

    # 2-4. rewards, their normalised lambda-weighted sum, and the group advantage
    raw, renders = score(completions, batch, step)
    total = rewards.combine(raw, weights, G, args.norm, common.all_sum)
    advantages = rewards.group_advantages(total, G).to(device)

    # 5. old and reference log-probs (no grad; beta 0: no reference), then the updates
    net.train()  # dropout is 0: train mode only lets gradient checkpointing work
    with torch.no_grad(), amp:
        for i, r in enumerate(rollouts):
            r["advantages"] = advantages[i * mb:(i + 1) * mb]
            r["old_logp"] = vlm.completion_logprobs(r["inputs"], args.temperature)
            r["ref_logp"] = None
        if args.beta:
            with net.disable_adapter():
                for r in rollouts:
                    r["ref_logp"] = vlm.completion_logprobs(r["inputs"], args.temperature)
    per_minibatch = len(rollouts) // args.minibatches  # micro-batches per optimizer step
    stats = []
    for minibatch in [rollouts[i:i + per_minibatch] for i in range(0, len(rollouts), per_minibatch)] * args.updates_per_rollout:
        norm = (sum(len(r["completions"]) for r in minibatch) if args.loss_mean == "sequence"
                else sum(int(r["inputs"]["completion_mask"].sum()) for r in minibatch))
        for r in minibatch:  # gradients add up; DDP averages them over the ranks at the minibatch's last
            with ddp_net.no_sync() if world > 1 and r is not minibatch[-1] else contextlib.nullcontext():
                with amp:
                    logp = vlm.completion_logprobs(r["inputs"], args.temperature, ddp_net)
                loss, st = rewards.grpo_loss(logp, r["old_logp"], r["ref_logp"], r["advantages"],
                                             r["inputs"]["completion_mask"], args.clip_range, args.beta, args.loss_mean,
                                             norm)
                loss.backward()
            stats.append(st)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    progress.update(1)

    done = step + 1
    if stop():
        end = done
    if done % args.log_every == 0 or done == end:
        metrics = {**common.group_metrics(raw, weights, total, G, stats),  # approx_kl: 0 at a rollout's first update
                   **completion_metrics(rollouts, batch), **({"renders": common.all_mean([renders])} if render else {}),
                   "grad_norm": float(grad_norm), "lr": lr, "skipped": int(common.all_sum(skipped)),
                   "sec_per_step": (time.time() - t0) / (done - start)}
        logger.log(metrics, done)
        reward = sum(weights[k] * v for k, v in raw.items())  # each completion's un-normalised reward
        logger.log({"samples": [{"question": q, "completion": c, "reward": round(float(r), 4)} for q, c, r in
                                zip(questions, completions, reward)][:args.log_samples]}, done)
        progress.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}")
    if done % args.save_every == 0 or done == end:
        save(done)
    if done == end:
        break
progress.close()

# -----------------------------------------------------------------------------
# cleanup

common.finish(params, end, args.steps, t0, last, logger)
