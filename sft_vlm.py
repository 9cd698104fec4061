"""
Supervised fine-tuning of the VANS VLM: for a video and a question, Qwen2.5-VL learns
to write [Think]reasoning[/Think][Ans]caption of the next event[/Ans].

    # one GPU
    python sft_vlm.py --train data/train.jsonl --val data/val.jsonl   # 10K steps into out/sft_vlm
    # one node, 8 GPUs (the paper's settings)
    torchrun --standalone --nproc_per_node=8 sft_vlm.py --config config/paper.py
    # two nodes: run on each, with NODE_RANK 0 / 1 and MASTER_ADDR the first node
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_ADDR:29500 sft_vlm.py --config config/paper.py
    # the tiny VLM on the Shapes world, on a CPU
    python sft_vlm.py --config config/shapes.py --out out/shapes/sft_vlm

What is trained: LoRA (r 8, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down, matched across
the whole model as the release) on Qwen2.5-VL-3B-Instruct. --finetune full trains every
weight instead: a VLM that starts from random weights (the Shapes world's) is more than a
low-rank update can turn into a captioner.
Loss: cross-entropy on the assistant tokens only ([Think]...[/Think][Ans]...[/Ans]<|im_end|>;
system prompt, question, video tokens and padding are masked), mean over those tokens on
each rank, averaged over ranks by DDP. AdamW, linear warmup + cosine decay, gradient
clipping, bf16 autocast on GPU. Every --val-every steps: loss on the validation set and
greedy captions for --val-generate samples, scored with the format reward and ROUGE-L
(and with a world's own checks, --metrics: the Shapes world's event accuracy).
Writes <out>/last (a checkpoint loadable as --model, with its training state) and
<out>/log.jsonl. The paper does not give a batch size: --batch-size is per rank.
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

parser = argparse.ArgumentParser(description="LoRA SFT of the VANS VLM.")
# data
parser.add_argument("--train", default="data/train.jsonl", help="training manifest (.jsonl or the official .csv)")
parser.add_argument("--val", default=None, help="validation manifest")
parser.add_argument("--skip-bad", action="store_true", help="skip and count bad manifest lines / clips instead of stopping")
parser.add_argument("--frames", type=int, default=33, help="an input video needs at least this many frames (as infer.py)")
# model
parser.add_argument("--model", default="base", help="base (Qwen2.5-VL-3B-Instruct) | tiny | a checkpoint directory")
parser.add_argument("--qwen", default=None, help="local copy of Qwen/Qwen2.5-VL-3B-Instruct")
parser.add_argument("--batch-size", type=int, default=1, help="samples per rank per step")
# validation
parser.add_argument("--val-every", type=int, default=500, help="validate every N steps (0 = only at the end)")
parser.add_argument("--val-loss-samples", type=int, default=64, help="validation samples for the loss")
parser.add_argument("--val-generate", type=int, default=8, help="validation samples to caption greedily")
parser.add_argument("--max-new-tokens", type=int, default=512, help="generation budget at validation")
parser.add_argument("--metrics", default=None, help="module:function checking the captions at validation, logged as "
                                               "val/<name> (e.g. shapes:metrics)")
# what is trained
parser.add_argument("--finetune", default="lora", choices=["lora", "full"], help="train a LoRA adapter or every weight")
common.add_run_flags(parser, out="out/sft_vlm", steps=10_000)  # the paper's steps
args = common.parse_flags(parser, "sft_vlm")

# -----------------------------------------------------------------------------
# the model and the data checked before torch is imported: a wrong path is one error line at once

last = os.path.join(args.out, "last")
resume = args.resume and checkpoint.checkpoint_exists(last)
if not resume:
    common.check_models(model=args.model)
train, val = data.read_manifests(args, min_frames=args.frames)

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
metrics_fn = common.hook("metrics", args.metrics) if args.metrics else None
os.makedirs(args.out, exist_ok=True)
dataset = data.ClipDataset(train, parts=("vlm",), frames=args.frames, vlm_frames=model.VLM_FRAMES)

# -----------------------------------------------------------------------------
# model

dtype = torch.bfloat16 if device.type == "cuda" and args.finetune == "lora" else torch.float32  # full: fp32 master weights
preset, (vlm, _) = common.load_model(last if resume else args.model, qwen=args.qwen, dtype=dtype, device=device, need=("vlm",))
if args.finetune == "lora":
    from peft import PeftModel
    if not isinstance(vlm.model, PeftModel):
        torch.manual_seed(args.seed)  # a fresh LoRA's init follows --seed (the same on every rank)
        vlm.model = model.add_lora(vlm.model)
    for name, p in vlm.model.named_parameters():
        p.requires_grad_(".lora_" in name)
elif hasattr(vlm.model, "peft_config"):
    raise SystemExit(f"error: --finetune full: {args.model} holds a LoRA adapter; give the model it was trained on")
else:
    vlm.model.requires_grad_(True)
net = vlm.model.to(device).train()
if args.grad_checkpointing:
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
params = [p for p in net.parameters() if p.requires_grad]
common.print0(f"{preset['name']} VLM, {args.finetune}: {sum(p.numel() for p in params):,} trained parameters "
              f"of {sum(p.numel() for p in net.parameters()):,}")
ddp_net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net


def batch_loss(batch, net):
    answers = [model.answer_text(t, c) for t, c in zip(batch["think"], batch["caption"])]
    inp = vlm.inputs(batch["vlm"], batch["question"], answers)  # labels: the answer tokens only
    with amp:
        return net(**inp, use_cache=False).loss


# -----------------------------------------------------------------------------
# optimizer and state

optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
start, skipped = 0, 0  # skipped: clips that failed to decode; rank 0 carries the total of earlier runs
if resume:
    state = common.load_train_state(last)
    optimizer.load_state_dict(state["optimizer"])
    start = state["step"]
    skipped = state["skipped"] if master else 0
    common.print0(f"resumed from {last} at step {start}")
else:
    torch.manual_seed(args.seed + rank)  # dropout streams differ by rank
logger = common.Logger(args.out, args, rank, start)


def save(step):
    """<out>/last: weights (LoRA in peft's format; the full VLM when it is trained or random-based)
    + meta + training state, atomically. Called on every rank (the RNG states are gathered)."""
    state = common.train_state(step, optimizer.state_dict(), {"skipped": int(common.all_sum(skipped))})
    if master:
        parts = ("vlm_lora",) if args.finetune == "lora" else ()
        parts += ("vlm",) if args.finetune == "full" or preset["name"] != "full" else ()
        meta = {"preset": preset, "script": "sft_vlm", "step": step, "flags": vars(args), "git": common.git_hash()}
        checkpoint.save_checkpoint(last, vlm, None, meta, parts, extra={"train_state.pt": state})
    if world > 1:
        torch.distributed.barrier()


@torch.no_grad()
def validate():
    """Val loss and greedy-caption scores; every rank takes its share of the val set."""
    net.eval()
    mine = lambda n: [(s, it) for s in val[:n][rank::world] if (it := dataset.try_load(s)) is not None]
    chunks = lambda xs: [xs[i:i + args.batch_size] for i in range(0, len(xs), args.batch_size)]
    losses = [batch_loss(data.collate([it for _, it in c]), net).item() for c in chunks(mine(args.val_loss_samples))]
    fmt, rouge = [], []
    checks = {k: [] for k in metrics_fn([], captions=[])} if metrics_fn else {}  # the same names on every rank
    for c in chunks(mine(args.val_generate)):
        outs = vlm.generate([it["vlm"] for _, it in c], [s["question"] for s, _ in c], decoding="greedy",
                            max_new_tokens=args.max_new_tokens)
        captions = [model.caption_of(out) for out in outs]
        fmt += [rewards.format_reward(out) for out in outs]
        rouge += [rewards.rouge_l(cap, s["caption"]) for cap, (s, _) in zip(captions, c)]
        for k, values in (metrics_fn([s for s, _ in c], captions=captions) if metrics_fn else {}).items():
            checks[k] += [float(v) for v in values if v is not None]
    net.train()
    return {"val/loss": common.all_mean(losses), "val/format_reward": common.all_mean(fmt),
            "val/rouge_l": common.all_mean(rouge),  # and each check where some sample has a value (every rank joins)
            **{f"val/{k}": m for k, v in checks.items() if not math.isnan(m := common.all_mean(v))}}


# -----------------------------------------------------------------------------
# training loop

end = min(args.steps, args.stop_at) if args.stop_at else args.steps
sampler = data.StepSampler(len(dataset), args.batch_size, rank, world, args.seed, start, end)
loader = common.loader(dataset, sampler, args.workers, data.collate)
t0 = time.time()
stop = common.Stop()  # Ctrl-C / SIGTERM: finish the step, log, save, end
progress = tqdm(total=args.steps, initial=start, disable=not master, desc="sft_vlm")
for step, batch in zip(range(start, end), loader):
    lr = common.set_lr(optimizer, step, args)
    loss = batch_loss(batch, ddp_net)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    skipped += batch["skipped"]
    progress.update(1)

    done = step + 1
    stopped = stop() and done < end  # asked to stop before the planned end: no validation, just save
    if stopped:
        end = done
    if done % args.log_every == 0 or done == end:
        metrics = {"loss": common.all_mean([loss.item()]), "grad_norm": grad_norm.item(), "lr": lr,
                   "skipped": int(common.all_sum(skipped)), "sec_per_step": (time.time() - t0) / (done - start)}
        logger.log(metrics, done)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
    if val and ((args.val_every and done % args.val_every == 0) or done == end) and not stopped:
        metrics = validate()
        logger.log(metrics, done)
        common.print0(f"step {done}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if done % args.save_every == 0 or done == end:
        save(done)
    if done == end:
        break
progress.close()

# -----------------------------------------------------------------------------
# cleanup

common.check_in_sync(params)
common.print0(f"{'done' if end == args.steps else 'stopped'}: step {end} of {args.steps}, {time.time() - t0:.0f} s; checkpoint {last}")
logger.finish()
common.compute_cleanup()
