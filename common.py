"""
Plumbing shared by the training scripts: flags and config presets, torch.distributed
setup, the learning-rate schedule, logging, and resumable training state. Importing it
does not import torch (its functions that need torch import it), so a script checks its
flags and paths first and answers a mistake within a second.
"""

import argparse
import datetime
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import time

# -----------------------------------------------------------------------------
# flags


def parse_flags(parser, script, argv=None):
    """Parse flags. `--config config/shapes.py` first sets the defaults from the file's dict
    named after the script (e.g. `sft_vlm = dict(steps=300)`), `--config FILE:NAME` from the
    dict NAME; flags given on the command line win."""
    parser.add_argument("--config", default=None, help="config/*.py[:NAME]: its dict for this script (or NAME) sets defaults")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    args, _ = pre.parse_known_args(argv)
    if args.config:
        path, _, name = args.config.partition(":")
        if not os.path.isfile(path):
            parser.error(f"--config {path}: no such file")
        preset = runpy.run_path(path).get(name or script)
        if not isinstance(preset, dict):
            parser.error(f"{path}: no dict named {name or script}")
        unknown = sorted(set(preset) - {a.dest for a in parser._actions})
        if unknown:
            parser.error(f"{path}: {name or script} sets unknown flag(s) {', '.join(unknown)}")
        parser.set_defaults(**preset)
    return parser.parse_args(argv)


def add_run_flags(parser, out, steps):
    """Flags every training script has: output, schedule, logging, compute. Defaults: the
    paper's number of steps, and out/<script> as the run directory."""
    parser.add_argument("--out", default=out, help="run directory: checkpoints and log.jsonl")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last if it exists")
    parser.add_argument("--seed", type=int, default=0, help="seed for data order, noise and a fresh LoRA (rank r uses seed + r)")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup", type=int, default=0, help="linear warmup steps, then cosine decay to 0")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    parser.add_argument("--save-every", type=int, default=500, help="write <out>/last every N steps (and at the end)")
    parser.add_argument("--stop-at", type=int, default=0, help="save and stop at step N (a job's time slot, or an early stop that --resume honours); --resume goes on to N or --steps")
    parser.add_argument("--log-every", type=int, default=10, help="log metrics every N steps")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--wandb", default=None, help="wandb project to log to (off by default)")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda if there is a GPU)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")


def check_models(**flags):
    """Before any heavy work: each flag=value names a model that checkpoint.load knows (vans, base, a
    model shipped in weights/, tiny, random:PRESET) or an existing checkpoint directory; else one error
    line naming the flag and the path. A value of None (a flag not given) is skipped."""
    import checkpoint
    for flag, name in flags.items():
        if name is None:
            continue
        try:
            checkpoint.check_name(name)
        except checkpoint.CheckpointError as e:
            sys.exit(f"error: --{flag.replace('_', '-')} {e}")


def check_clip(weights, rewards=None):
    """--clip before any heavy work: a named weight (openai, random) or a file or directory that is there.
    rewards: a --rewards spec (name=lambda,...); then only if it weights clip_v or clip_t (rewards.parse
    reads the spec in full once torch is imported, and reports a malformed one)."""
    def weighted(w):
        try:
            return float(w or 1) != 0
        except ValueError:
            return True
    if rewards is not None:
        lambdas = dict(item.partition("=")[::2] for item in rewards.split(",") if item)
        if not any(weighted(lambdas[k]) for k in ("clip_v", "clip_t") if k in lambdas):
            return
    if weights not in (None, "openai", "random") and not os.path.exists(weights):
        sys.exit(f"error: --clip {weights}: no such file or directory (expected openai, random, a local open_clip "
                 "ViT-B/32 weights file or a tiny-CLIP directory)")


def check_frozen(last, resume, **flags):
    """The frozen models a GRPO run names in its checkpoint instead of saving them ({"vlm" | "vdm":
    --model name}): never the checkpoint it writes, and on --resume the ones it started from (the
    KL reference and a LoRA's base must not change under a run). One error line otherwise."""
    import checkpoint
    for flag, name in flags.items():
        try:
            recorded = checkpoint.source_of(name, last)
        except checkpoint.CheckpointError as e:
            sys.exit(f"error: --{flag} {e}")
        was = checkpoint.read_meta(last).get("from", {}).get(flag) if resume else None
        if was is not None and was != recorded:
            sys.exit(f"error: --{flag} {name}: {last} was trained from {checkpoint._source_path(last, was)}; resume with "
                     f"that --{flag}, or change --out")


def hook(flag, spec):
    """--flag module:function -> that function (model.hook); one error line if it is not there."""
    import model
    try:
        return model.hook(spec)
    except (ImportError, AttributeError, ValueError) as e:
        sys.exit(f"error: --{flag} {spec}: {e} (expected module:function)")


def load_model(name, **kw):
    """(preset dict, checkpoint.load(name, ...)) for the training scripts: a bad checkpoint is one error line."""
    import checkpoint
    try:
        return checkpoint.preset_of(name), checkpoint.load(name, **kw)
    except checkpoint.CheckpointError as e:
        sys.exit(f"error: {e}")


def load_clip(weights, models, device):
    """rewards.CLIP for --clip `weights`; None (the default) takes the tiny CLIP that the first of
    `models` ships in its checkpoint directory (clip/, as weights/shapes does), else OpenAI's.
    Called before any heavy work: a missing file or weights not in the cache is one error line."""
    import checkpoint
    import rewards
    weights = weights or next((d for d in (os.path.join(checkpoint.directory(m), "clip") for m in models)
                               if os.path.isdir(d)), "openai")
    try:
        clip = rewards.CLIP(None if weights == "random" else weights, device=device)
    except rewards.CLIPError as e:
        sys.exit(f"error: --clip {e}")
    clip.weights = weights  # what scored the run, for its record
    return clip


def read_weights(path, own):
    """The safetensors file at `path`, whose keys and shapes must be those of `own` (name -> tensor,
    e.g. a module's state_dict()): a missing, truncated or mismatched file is one error line."""
    import checkpoint
    try:
        sd = checkpoint._read(path)
        checkpoint._check_keys(own, sd, path)
        return sd
    except checkpoint.CheckpointError as e:
        sys.exit(f"error: {e}")


def same_settings(path, settings, write=True):
    """Files made under one set of settings are never reused under another. The first run writes
    `settings` to `path` (JSON, atomically, before the files it describes; every rank may call
    this; write=False only checks); a later run with other settings is a one-line error naming the
    settings that differ."""
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except json.JSONDecodeError:
            sys.exit(f"error: {path}: not JSON; delete its directory or change --out")
        new = json.loads(json.dumps(settings))  # compared as JSON, where a tuple is a list
        if old != new:
            diff = "; ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                             if old.get(k) != new.get(k))
            sys.exit(f"error: {os.path.dirname(path) or '.'} holds files made with other settings ({diff}); "
                     "delete it or change --out")
    elif write:
        tmp = f"{path}.{os.getpid()}.tmp"  # ranks write the same settings, each through its own file
        with open(tmp, "w") as f:
            json.dump(settings, f)
        os.replace(tmp, path)


# -----------------------------------------------------------------------------
# distributed


def compute_init(device):
    """-> (rank, world, device); device None: cuda if there is a GPU. Under torchrun, joins the
    process group: NCCL on GPUs, gloo on CPUs."""
    import torch
    import torch.distributed as dist
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {device}: no CUDA GPU is available here (use --device cpu)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ:
        # one-off phases (caching latents, sampling anchors) take unequal time on each rank before
        # a barrier: an hour, not NCCL's default 10 minutes, before a rank is declared hung
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    return rank, world, device


def compute_cleanup():
    """The last call of a training script. Under torchrun it leaves the process group and ends the
    process at once, without interpreter shutdown: DDP keeps the gloo group, and its worker
    threads, alive past destroy_process_group, and those threads running into interpreter
    shutdown now and then abort a finished run (SIGABRT, "terminate called without an active
    exception")."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still talks to it
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class Stop:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop: the step under way finishes, then the run
    logs, saves and ends as at --stop-at, so a stopped run keeps its last step. A repeated signal
    changes nothing (torchrun forwards the terminal's Ctrl-C to ranks that already have it);
    Ctrl-\\ (SIGQUIT) ends a run at once, and the last complete checkpoint stays whole (written to
    a temporary name, then renamed). torchrun kills its ranks --shutdown_timeout seconds (30) after
    a signal: give it more for steps and saves longer than that. Calling the object (every step, on every rank) -> whether
    any rank was asked: all ranks stop at the same step."""

    def __init__(self):
        self.asked = False
        self.before = {sig: signal.signal(sig, self._ask) for sig in (signal.SIGINT, signal.SIGTERM)}

    def close(self):
        """Put the handlers there were before back (for a caller that goes on)."""
        for sig, handler in self.before.items():
            signal.signal(sig, handler)

    def _ask(self, signum, frame):
        if not self.asked:
            print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (Ctrl-\\ quits at once)",
                  file=sys.stderr, flush=True)
        self.asked = True

    def __call__(self):
        import torch.distributed as dist
        return all_sum(float(self.asked)) > 0 if dist.is_initialized() else self.asked


class Phases:
    """Wall time of a step's phases, logged as time/<phase>: mark(name) ends the phase that ran since
    the last mark (or start()), adding to name's total. On a GPU it waits for the queued kernels first."""

    def __init__(self):
        self.start()

    def start(self):
        self.seconds, self.t = {}, time.perf_counter()

    def mark(self, name):
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        self.t = now


def _leave_signals_to_the_main_process(worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(dataset, sampler, workers, collate_fn):
    """The training DataLoader: a StepSampler's batches, a generator of its own (the global RNG stays
    the run's), and workers that ignore Ctrl-C and SIGTERM: those are for Stop, in the main
    process, which ends the workers once it has saved (a signal to the process group reaches them too)."""
    import torch
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                                       generator=torch.Generator(), worker_init_fn=_leave_signals_to_the_main_process)


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def all_sum(x):
    """Sum over ranks of the number x (or element-wise, of the list x: every rank gives as many)."""
    import torch
    import torch.distributed as dist
    t = torch.tensor(x, dtype=torch.float64)
    if dist.is_initialized():
        t = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(t)
    return t.tolist()


def all_mean(xs):
    """Mean of the floats xs held by every rank together (ranks may hold different numbers)."""
    total, n = all_sum([float(sum(xs)), float(len(xs))])
    return total / n if n > 0 else float("nan")


def check_in_sync(params):
    """Raise unless every rank holds bit-identical parameters (a sha256 over their bytes)."""
    import hashlib
    import torch.distributed as dist
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    digest = h.hexdigest()
    if dist.is_initialized():
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different weights: {digests}")
        print0(f"weights identical on all {len(digests)} ranks (sha256 {digest[:16]})")


def git_hash():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


# -----------------------------------------------------------------------------
# optimisation


def set_lr(optimizer, step, args):
    """The learning rate of a step, set on every parameter group: linear warmup for --warmup steps,
    then cosine decay from --lr to 0 at --steps. A function of the step alone, so the step is the
    scheduler's whole state. -> the rate"""
    if step < args.warmup:
        lr = args.lr * (step + 1) / args.warmup
    else:
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# -----------------------------------------------------------------------------
# logging


class Logger:
    """Metrics to <out>/log.jsonl and stdout, and to wandb when a project is given; rank 0 only.
    The same calls whether wandb is on or off. A fresh run starts a new log; a run resumed at step
    `start` keeps the rows of steps 1..start and drops the later ones, which it is about to redo."""

    def __init__(self, out, args, rank, start=0):
        self.on = rank == 0
        self.path = os.path.join(out, "log.jsonl")
        self.wandb = None
        if self.on:
            rows = []
            if start and os.path.isfile(self.path):
                with open(self.path) as f:
                    rows = f.read().splitlines()
            with open(self.path + ".tmp", "w") as f:
                f.writelines(row + "\n" for row in rows if row and _step(row) <= start)
            os.replace(self.path + ".tmp", self.path)
        if self.on and args.wandb:
            import wandb
            self.wandb = wandb.init(project=args.wandb, name=os.path.basename(os.path.abspath(out)), config=vars(args))

    def log(self, metrics, step):
        if not self.on:
            return
        metrics = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in metrics.items()}  # 6 significant digits
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 1), **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def _step(row):
    """A log row's step; a row that is not JSON (cut short by a kill) counts as after any checkpoint."""
    try:
        return json.loads(row)["step"]
    except json.JSONDecodeError:
        return float("inf")


# -----------------------------------------------------------------------------
# training state: what --resume needs beyond the weights


def rng_states():
    """This rank's torch RNG states, gathered to a list over ranks (every rank gets the list)."""
    import torch
    import torch.distributed as dist
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if not dist.is_initialized():
        return [state]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def minibatches(parser, args, what):
    """--minibatches must split a step's --prompts x --group-size rollouts into equal parts, each made of
    whole micro-batches: -> the micro-batch size (at most --micro-batch); a parser error otherwise."""
    n = args.prompts * args.group_size  # rollouts per rank and step
    per_minibatch = n // args.minibatches if args.minibatches >= 1 else 0
    if per_minibatch < 1 or per_minibatch * args.minibatches != n or per_minibatch % min(args.micro_batch, per_minibatch):
        parser.error(f"--minibatches {args.minibatches} must split the {n} {what} of a step (--prompts x "
                     f"--group-size) into equal parts, each made of whole --micro-batch chunks")
    return min(args.micro_batch, per_minibatch)


def start_state(last, resume, optimizer, seed):
    """Where a run starts -> (step, skipped): on --resume, <last>'s step with its optimizer state, RNG
    and count of skipped clips (rank 0 carries the total of earlier runs); else step 0, torch's RNG
    seeded with seed + rank (each rank draws its own samples and noise)."""
    import torch
    rank = int(os.environ.get("RANK", 0))
    if not resume:
        torch.manual_seed(seed + rank)
        return 0, 0
    state = load_train_state(last)
    optimizer.load_state_dict(state["optimizer"])
    print0(f"resumed from {last} at step {state['step']}")
    return state["step"], state["skipped"] if rank == 0 else 0


def group_metrics(raw, weights, total, group_size, stats):
    """The GRPO step's reward metrics, every rank's together: reward (the lambda-weighted raw sum) and its
    in-group std, the share of groups whose combined reward does not vary (no gradient from them), each
    reward's mean, and the loss's kl / clip_ratio / approx_kl (stats: rewards.grpo_loss' dicts)."""
    weighted = sum(weights[k] * v for k, v in raw.items()).view(-1, group_size)
    return {"reward": all_mean(weighted.flatten().tolist()),
            "reward_std": all_mean(weighted.std(1, unbiased=False).tolist()),
            "frac_reward_zero_std": all_mean((total.view(-1, group_size).std(1) < 1e-6).float().tolist()),
            **{f"rewards/{k}/mean": all_mean(v.tolist()) for k, v in raw.items()},
            **{k: all_mean([s[k] for s in stats]) for k in ("kl", "clip_ratio", "approx_kl")}}


def finish(params, end, steps, t0, last, logger):
    """A training run's end: every rank's weights checked equal, one line saying where it stopped, the
    log closed, the process group left."""
    check_in_sync(params)
    print0(f"{'done' if end == steps else 'stopped'}: step {end} of {steps}, {time.time() - t0:.0f} s; checkpoint {last}")
    logger.finish()
    compute_cleanup()


def train_state(step, optimizer_state, extra=None):
    """The resumable state saved beside the weights (train_state.pt, loaded with weights_only=True):
    step (= data position and schedule position), optimizer state, every rank's RNG."""
    return {"step": step, "optimizer": optimizer_state, "rng": rng_states(), **(extra or {})}


def load_train_state(ckpt):
    """-> the dict of train_state(), with this rank's RNG restored. A different world size
    cannot continue the same random streams: then each rank is reseeded and a note printed."""
    path = os.path.join(ckpt, "train_state.pt")
    if not os.path.isfile(path):
        sys.exit(f"error: {ckpt}: no train_state.pt, cannot resume from it")
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if len(state["rng"]) == world:
        torch.set_rng_state(state["rng"][rank]["cpu"])
        if "cuda" in state["rng"][rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"])
    else:
        print0(f"note: {ckpt} was written by {len(state['rng'])} ranks, now {world}: random streams reseeded")
        torch.manual_seed(1000 * state["step"] + rank)
    return state
