"""
VANS against its peer, stage by stage, in one process on the same weights: our inference path (the
stages of infer.answer) against the paper's Qwen-Wan baseline as its libraries run it (transformers'
generate, diffusers' WanPipeline); the whole answer as infer.py computes it, plain and with
--offload; one optimizer step of the VDM's SFT and one of stage 2 (8 SDE rollouts, then the
update; 20 SDE steps on a GPU, 2 on a CPU); on a GPU, the DiT with cuDNN's attention and
compiled (--attention, --compile).

    python bench.py                  # tiny random models on this machine, answers of 33x64x112, 10 steps
    python bench.py --suite gpu      # the paper's size on one GPU: random full-size weights in bf16,
                                     # 33x352x640, 50 steps, CFG 5
    python bench.py --suite load     # host memory (peak RSS) of loading the full-size models as the
                                     # scripts do, from random weights written in the hub's layout

One table: stage, ours and the peer's seconds (the median and the fastest of --repeats runs after one
to warm up, ours and the peer's taking turns), their ratios, peak memory (GB: CUDA memory allocated on
a GPU, the process's resident set on a CPU; the peak during that stage). The peer has no reference
frames: `dit, no refs` is our sampler doing the peer's work, `dit` the same with the 6 reference
latents in front, `refs` their encoding (VANS's own work: no peer does it).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

import data
import model

parser = argparse.ArgumentParser(description="VANS against diffusers' WanPipeline and transformers' generate.")
parser.add_argument("--suite", default="cpu", choices=("cpu", "gpu", "load"),
                    help="cpu: tiny models; gpu: the paper's size; load: host memory of loading the full-size models")
parser.add_argument("--snapshot", default="/tmp/vans-full-random", help="--suite load: where the random full-size "
                    "snapshots are written (37 GB, once)")
parser.add_argument("--device", default="cpu", help="--suite load: where the models are loaded (cpu | cuda)")
parser.add_argument("--repeats", type=int, default=3, help="timed runs of each stage (after one warm-up)")
parser.add_argument("--max-new-tokens", type=int, default=None, help="VLM tokens (cpu 32, gpu 256)")


class PeakMemory:
    """Peak memory during a `with` block, in GB: CUDA memory allocated, or (on a CPU) the resident
    set, read from /proc every 2 ms."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak, self.done = 0, False
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        page = 4096
        while not self.done:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            self.gb = torch.cuda.max_memory_allocated() / 1e9
        else:
            self.done = True
            self.thread.join()
            self.gb = self.peak / 1e9


def timed(fns, device, repeats):
    """-> for each of fns: ((median, min) seconds over `repeats` runs after a warm-up, peak GB, its last
    result). The fns take turns run by run, so that the machine's drift falls on each alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    outs = [fn() for fn in fns]
    times, gb = [[] for _ in fns], [0.0 for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            with PeakMemory(device) as mem:
                sync()
                t0 = time.perf_counter()
                outs[i] = fn()
                sync()
                times[i].append(time.perf_counter() - t0)
            gb[i] = max(gb[i], mem.gb)
    return [((statistics.median(t), min(t)), g, out) for t, g, out in zip(times, gb, outs)]


def build(suite, device):
    """-> (vlm, vdm, answer size (frames, height, width), steps, VLM tokens): random weights of the suite's size."""
    if suite == "cpu":
        vlm, vdm = model.load_tiny()
        return vlm, vdm, (33, 64, 112), 10, 32
    from transformers import ByT5Tokenizer
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):  # built on the GPU in bf16: no host copy of the 5.7B-parameter umT5 in fp32
        tok = model.byte_tokenizer()
        net = model.build_vlm_net("full", tok).eval()
        dit, vae, te = model.build_vdm_nets("full")
    torch.set_default_dtype(torch.float32)
    vlm = model.VLM(net, model.vlm_processor(tok, "full"))
    vdm = model.VDM(dit.eval(), vae.float().eval(), te.eval(), ByT5Tokenizer())
    return vlm, vdm, (33, 352, 640), 50, 256


def peer_pipeline(vdm):
    """diffusers' WanPipeline on our modules, with the release's schedule (shifted linspace, shift 5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    class Schedule(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps, device=None, **kw):
            super().set_timesteps(sigmas=np.linspace(1, 0, num_inference_steps + 1)[:-1], device=device)
    return WanPipeline(tokenizer=vdm.tokenizer, text_encoder=vdm.text_encoder, vae=vdm.vae, transformer=vdm.dit,
                       scheduler=Schedule(shift=5.0))


def sft_step(vdm, x0, text, refs):
    """One optimizer step of sft_vdm on the DiT: the flow-matching loss (bf16 autocast on a GPU, gradient
    checkpointing), backward, AdamW. -> (seconds, peak GB, FLOPs of the step). The FLOPs are counted
    as run, the recompute of gradient checkpointing included: the MFU printed is the hardware's."""
    from torch.utils.flop_counter import FlopCounterMode
    dit = vdm.dit.float()  # trained in float32 under bf16 autocast, as sft_vdm trains it
    x0, text = x0.float(), text.float()
    dit.train().requires_grad_(True)
    if x0.device.type == "cuda":
        dit.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-5)
    amp = torch.autocast("cuda", torch.bfloat16) if x0.device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = model.flow_matching_loss(vdm, x0, text, refs, torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        with amp:
            model.flow_matching_loss(vdm, x0, text, refs, torch.Generator().manual_seed(0)).backward()
    opt.zero_grad(set_to_none=True)
    [(seconds, gb, _)] = timed([step], x0.device, args.repeats)
    dit.eval().requires_grad_(False)
    return seconds, gb, counter.get_total_flops()


def grpo_stage2_step(vdm, text, neg, refs, size, group=8, micro=4, steps=20, cfg=5.0):
    """One step of grpo_stage2 at config/paper.py's settings: a group of 8 SDE rollouts of 20 steps
    (micro-batches of 4, CFG 5, noise level 0.7) from one caption and their VAE decode, then the
    update on the first 19 steps with the KL to the frozen starting DiT (beta 0.004) in 2 optimizer
    steps (--minibatches 2) with the gradient norm clipped, every DiT weight trained in float32 (bf16
    autocast and gradient checkpointing on a GPU), AdamW. The advantages are drawn at random: scoring
    is not what is timed. Run once, no warm-up. -> (seconds, peak GB)."""
    import copy
    import rewards
    T, H, W = size
    dev = text.device
    dit = vdm.dit.float()
    ref_dit = copy.deepcopy(dit).requires_grad_(False)
    dit.requires_grad_(True)
    if dev.type == "cuda":
        dit.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(dit.parameters(), lr=5e-5)
    amp = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    text, neg, refs = (t.float().expand(micro, *t.shape[1:]) for t in (text, neg, refs))
    sigmas = model.flow_sigmas(steps).to(dev)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with PeakMemory(dev) as mem:
        sync()
        t0 = time.perf_counter()
        dit.eval()
        with torch.no_grad(), amp:
            rollouts = [vdm.sample_sde(text, neg, refs, T, H, W, steps, cfg, generator=gen) for _ in range(group // micro)]
        with torch.no_grad():
            videos = [data.to_uint8(v) for xs, _ in rollouts for v in vdm.decode(xs[:, -1])]
        advantages = torch.randn(len(videos), generator=gen).to(dev)
        trained = range(int(steps * 0.99))
        dit.train()
        half = len(rollouts) // 2
        for part in (range(half), range(half, len(rollouts))):
            for k in part:
                xs, old_logp = rollouts[k]
                for j in trained:
                    with amp:
                        v = vdm.guided_velocity(xs[:, j], sigmas[j], text, neg, refs, cfg, dit=dit)
                    _, logp, mean, std = model.sde_step_with_logprob(v, xs[:, j], sigmas[j], sigmas[j + 1],
                                                                     prev_sample=xs[:, j + 1])
                    with torch.no_grad(), amp:
                        v_ref = vdm.guided_velocity(xs[:, j], sigmas[j], text, neg, refs, cfg, dit=ref_dit)
                    ref_mean = model.sde_step_with_logprob(v_ref, xs[:, j], sigmas[j], sigmas[j + 1],
                                                           prev_sample=xs[:, j + 1])[2]
                    loss, _ = rewards.flow_grpo_loss(logp, old_logp[:, j], advantages[k * micro:(k + 1) * micro], mean,
                                                     ref_mean, std, norm=len(part) * micro * len(trained))
                    loss.backward()
            torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        seconds = time.perf_counter() - t0
    dit.eval().requires_grad_(False)
    del ref_dit, opt
    return seconds, mem.gb


# the hub's files: Qwen2.5-VL-3B-Instruct in bf16, Wan2.1-T2V-1.3B-Diffusers all in float32
HUB_DTYPES = {"qwen": torch.bfloat16, "wan/transformer": torch.float32, "wan/vae": torch.float32,
              "wan/text_encoder": torch.float32}


def write_snapshot(preset, out, shard_gb=2.0):
    """Models of a preset written as the hub's snapshots lay them out, for checkpoint.load_base: out/qwen
    (Qwen2.5-VL and its processor) and out/wan (transformer/, vae/, text_encoder/, tokenizer/), each
    in its hub dtype (HUB_DTYPES), in safetensors shards with an index, a tied weight once. The small
    presets are written with their random initialisation (model.load_tiny's weights); the full one
    is made on the meta device and each weight drawn from N(0, 0.02) as its shard is written, so that
    no model is ever whole in memory (a float32 umT5-XXL is 23 GB): its loading is what is measured,
    not its values."""
    from safetensors.torch import save_file
    from transformers import ByT5Tokenizer
    tok = model.byte_tokenizer()
    if preset == "full":
        with torch.device("meta"):
            nets = [model.build_vlm_net(preset, tok), *model.build_vdm_nets(preset)]
    else:
        torch.manual_seed(0)
        nets = [model.build_vlm_net(preset, tok), *model.build_vdm_nets(preset)]
    for (path, dtype), net in zip(HUB_DTYPES.items(), nets):
        where = os.path.join(out, path)
        os.makedirs(where, exist_ok=True)
        (net.config.save_pretrained if path in ("qwen", "wan/text_encoder") else net.save_config)(where)
        stem = "model" if path in ("qwen", "wan/text_encoder") else "diffusion_pytorch_model"
        seen, shards, shard, size = set(), [], {}, 0
        for name, p in net.state_dict(keep_vars=True).items():
            if id(p) in seen:  # a tied weight (the same tensor under two names) is stored once
                continue
            seen.add(id(p))
            t = torch.empty(p.shape, dtype=dtype).normal_(0, 0.02) if p.is_meta else p.detach().to(dtype).contiguous()
            shard[name], size = t, size + t.numel() * t.element_size()
            if size >= shard_gb * 1e9:
                shards.append(list(shard))  # the names only: the tensors go once written
                save_file(shard, os.path.join(where, f"{stem}-{len(shards):05d}.tmp"), metadata={"format": "pt"})
                shard, size = {}, 0
        if shard:
            shards.append(list(shard))
            save_file(shard, os.path.join(where, f"{stem}-{len(shards):05d}.tmp"), metadata={"format": "pt"})
        del shard
        weight_map = {}
        for i, names in enumerate(shards, 1):  # the hub's names: <stem>-0000i-of-0000n.safetensors
            file = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
            os.replace(os.path.join(where, f"{stem}-{i:05d}.tmp"), os.path.join(where, file))
            weight_map.update(dict.fromkeys(names, file))
        with open(os.path.join(where, f"{stem}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    model.vlm_processor(tok, preset).save_pretrained(os.path.join(out, "qwen"))
    ByT5Tokenizer().save_pretrained(os.path.join(out, "wan", "tokenizer"))


# --suite load: (row, what is run after `import checkpoint`); `load` is checkpoint.load_base on the snapshot,
# onto --device. Each row runs in a process of its own.
LOADS = [("imports only", ""),
         ("VLM in bf16 (infer; grpo_stage1/2 on a GPU)", "vlm, _ = load(need=('vlm',), dtype=torch.bfloat16)"),
         ("VLM in fp32 (sft_vlm --finetune full)", "vlm, _ = load(need=('vlm',), dtype=torch.float32)"),
         ("VDM in bf16 (infer; grpo_stage1 on a GPU)", "_, vdm = load(need=('vdm',), dtype=torch.bfloat16)"),
         ("VDM: DiT fp32, umT5 bf16 (sft_vdm, grpo_stage2 on a GPU)",
          "_, vdm = load(need=('vdm',), dtype=torch.bfloat16, dit_dtype=torch.float32)"),
         ("the same as they read it before: all fp32 on the CPU, umT5 cast, moved",
          "_, vdm = load(need=('vdm',), dtype=torch.float32, device=None)\nvdm.text_encoder.to(torch.bfloat16)\n"
          "[m.to(DEVICE) for m in (vdm.dit, vdm.vae, vdm.text_encoder)]")]


def load_memory(snapshot, code, device):
    """Host memory (GB) of a fresh process that imports model and runs `code` (a LOADS row) -> (the
    peak resident set by the end of the loading; then, once every weight has been read, the
    process's private memory and its pages of the weight files, which the processes of one machine
    share in the page cache). The files are mapped lazily: a page counts once it is read."""
    st = "lambda k: int(re.search(k + r':\\s+(\\d+)', open('/proc/self/status').read())[1])"
    touch = ("for m in [x for x in (locals().get('vlm'), locals().get('vdm')) if x is not None]:\n"
             "    for net in (m.model,) if hasattr(m, 'model') else (m.dit, m.vae, m.text_encoder):\n"
             "        [p.reshape(-1)[::1024].sum() for p in net.parameters()]  # a read on every page\n")
    script = (f"import functools, re, torch, checkpoint\nst = {st}\nDEVICE = {device!r}\n"
              f"load = functools.partial(checkpoint.load_base, {os.path.join(snapshot, 'qwen')!r}, "
              f"{os.path.join(snapshot, 'wan')!r}, device=DEVICE)\n{code}\npeak = st('VmHWM')\n{touch}"
              "print(peak, st('RssAnon'), st('RssFile'))")
    # /proc/self/status: VmHWM is this process's own peak (getrusage's maxrss carries the parent's over a fork)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode:
        raise SystemExit(f"error: {code!r}: {(r.stderr.strip().splitlines() or [f'exit {r.returncode}'])[-1]}")
    return [int(x) * 1024 / 1e9 for x in r.stdout.split()[-3:]]


def load_suite(snapshot, device):
    if not os.path.isfile(os.path.join(snapshot, "wan", "tokenizer", "tokenizer_config.json")):
        print(f"writing random full-size weights to {snapshot} ...", flush=True)
        write_snapshot("full", snapshot)
    print(f"| loaded onto {device} from the hub's files | peak RSS (GB) | then private (GB) | then file pages (GB) |\n"
          "|---|---|---|---|")
    for name, code in LOADS:
        print("| " + " | ".join([name] + [f"{x:.2f}" for x in load_memory(snapshot, code, device)]) + " |", flush=True)


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s of the GPUs' data sheets

if __name__ == "__main__":
    args = parser.parse_args()
    if args.suite == "load":
        load_suite(args.snapshot, args.device)
        sys.exit(0)
    device = torch.device("cuda" if args.suite == "gpu" else "cpu")
    if args.suite == "gpu" and not torch.cuda.is_available():
        raise SystemExit("error: --suite gpu: no CUDA GPU is available here")
    torch.manual_seed(0)
    vlm, vdm, (T, H, W), steps, tokens = build(args.suite, device)
    tokens = args.max_new_tokens or tokens
    vlm.model.to(device)
    for m in (vdm.dit, vdm.vae, vdm.text_encoder):
        m.to(device)
    pipe = peer_pipeline(vdm)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    frames = clip[np.linspace(0, T - 1, model.VLM_FRAMES).round().astype(int)]
    question, caption = "What happens next?", "A red ball rolls to the left and bounces off the wall."
    neg_prompt = vdm.negative_prompt
    rows = []  # (stage, ours (median, min) s, the peer's or None, GB)

    def stage(name, ours, peer=None):
        (s, gb, out), *theirs = timed([ours, peer] if peer else [ours], device, args.repeats)
        rows.append((name, s, theirs[0][0] if peer else None, gb))
        return out

    stop, tok = vlm.stop_ids(), vlm.processor.tokenizer

    def peer_vlm():  # as transformers runs it: the processor's inputs, generate, the completion decoded
        inp = vlm.inputs([frames], [question])  # (the chat template and the processor)
        out = vlm.model.generate(**inp, do_sample=False, max_new_tokens=tokens, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)
    stage("vlm", lambda: vlm.generate([frames], [question], "greedy", tokens), peer_vlm)
    with torch.no_grad():
        text, neg = stage("text", lambda: (vdm.encode_text([caption]), vdm.encode_text([neg_prompt])),
                          lambda: pipe.encode_prompt(caption, neg_prompt, True, max_sequence_length=512, device=device))
        refs = stage("refs", lambda: vdm.ref_latents(vdm.encode_video(
            torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1).to(device))))
        gen = lambda: torch.Generator().manual_seed(0)
        latents = stage("dit", lambda: vdm.sample(text, neg, refs, T, H, W, steps=steps, cfg=5.0, generator=gen()))
        stage("dit, no refs", lambda: vdm.sample(text, neg, None, T, H, W, steps=steps, cfg=5.0, generator=gen()),
              lambda: pipe(prompt_embeds=text.to(vdm.dit.dtype), negative_prompt_embeds=neg.to(vdm.dit.dtype),
                           num_frames=T, height=H, width=W, num_inference_steps=steps, guidance_scale=5.0,
                           output_type="latent", generator=gen()).frames)
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        stage("vae", lambda: vdm.decode(latents), lambda: pipe.vae.decode(latents.to(pipe.vae.dtype) * std + mean).sample)
    total = lambda skip: [sum(r[1][i] for r in rows if r[0] not in skip) for i in (0, 1)]
    peer_total = [sum(r[2][i] for r in rows if r[2] is not None) for i in (0, 1)]
    gb = max(r[3] for r in rows)
    rows += [("answer (sum)", total({"dit, no refs"}), peer_total, gb),  # VANS's answer against the plain Qwen-Wan one
             ("answer, no refs (sum)", total({"dit", "refs"}), peer_total, gb)]  # the same work as the peer's

    # the whole answer as infer.py computes it, then with --offload (the VLM and the text encoder on the
    # CPU except while they run: the peak memory is the point)
    import infer
    video = os.path.join(tempfile.mkdtemp(), "in.mp4")
    data.write_video(video, clip, fps=11)
    flags = dict(frames=T, height=H, width=W, ref_clip="first", decoding="greedy", max_new_tokens=tokens, cfg=5.0,
                 steps=steps, offload=False)
    if device.type == "cuda":  # infer.py's default there (--precision release): bf16 latents and VAE, in tiles
        vdm.release = True
        torch.nn.Module.to(vdm.vae, torch.bfloat16)
    stage("infer.answer", lambda: infer.answer(vlm, vdm, [video], [question], argparse.Namespace(**flags), gen()))
    vlm.model.to("cpu")
    vdm.text_encoder.to("cpu")
    stage("infer.answer --offload", lambda: infer.answer(vlm, vdm, [video], [question],
                                                         argparse.Namespace(**{**flags, "offload": True}), gen()))
    vdm.release = False
    torch.nn.Module.to(vdm.vae, torch.float32)
    vdm.text_encoder.to(device)  # the VLM stays on the CPU: no training step holds one
    dit_dtype = vdm.dit.dtype
    seconds, gb, flops = sft_step(vdm, latents[:1], text, refs.float())
    rows.append(("sft_vdm step", seconds, None, gb))
    s2, gb2 = grpo_stage2_step(vdm, text, neg, refs, (T, H, W), steps=20 if args.suite == "gpu" else 2)
    rows.append(("grpo_stage2 step (8 videos)", (s2, s2), None, gb2))  # run once
    torch.nn.Module.to(vdm.dit, dit_dtype)  # the training steps train it in float32
    if device.type == "cuda":  # the DiT's kernels: cuDNN's attention, then torch.compile of its blocks
        with torch.no_grad():
            vdm.dit.set_attention_backend("_native_cudnn")
            stage("dit, --attention _native_cudnn", lambda: vdm.sample(text, neg, refs, T, H, W, steps=steps, cfg=5.0,
                                                                        generator=gen()))
            vdm.dit.set_attention_backend("native")
            vdm.dit.compile_repeated_blocks(fullgraph=True)
            stage("dit, --compile", lambda: vdm.sample(text, neg, refs, T, H, W, steps=steps, cfg=5.0, generator=gen()))

    print(f"{args.suite} suite on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}: answers of "
          f"{T}x{H}x{W}, {steps} steps, CFG 5, {tokens} VLM tokens at most; median and min of {args.repeats} runs")
    print("| stage | ours (s) | peer (s) | ours / peer | ours, min (s) | peer, min (s) | ours / peer, min | peak memory (GB) |\n"
          "|---|---|---|---|---|---|---|---|")
    cell = lambda x: "-" if x is None else f"{x:.3f}"
    for name, (s, s_min), p, g in rows:
        p, p_min = p or (None, None)
        print(f"| {name} | {s:.3f} | {cell(p)} | {'-' if not p else f'{s / p:.2f}'} | {s_min:.3f} | {cell(p_min)} | "
              f"{'-' if not p else f'{s_min / p_min:.2f}'} | {g:.2f} |")
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    print(f"sft_vdm step: {flops / 1e12:.2f} TFLOP" + (f", MFU {flops / seconds[0] / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16"
                                                      if peak else ""))
