"""
Video-as-Answer: give a video (or an image) and a question; the VLM reasons about
what happens next and writes a caption, the VDM renders it as the answer video.

    python infer.py in.mp4 "What should I do next?"                 # official VANS weights
    python infer.py in.mp4 "What happens next?" --model base        # Qwen-Wan baseline, no references
    python infer.py examples/balls.mp4 "What happens if the purple ball is pushed to the left?" --model shapes   # offline
    python infer.py in.mp4 "What happens next?" --model tiny        # random tiny models, offline (noise)
    python infer.py photo.png "Leave it for a week." --json         # an image is a static clip
    python infer.py in.mp4 "..." --model out/grpo_stage2/last       # a checkpoint of our training scripts

Weights come from the Hugging Face cache (downloaded on first use); --qwen, --wan
and --vans point at local copies instead. The command line, the input, --out and the
model names are checked before torch is imported, so a mistake is one error line within a second.
"""

import argparse
import contextlib
import json
import os
import sys
import time

import common
import data

# -----------------------------------------------------------------------------
# flags

DECODINGS = ("release", "sample", "greedy")  # model.DECODING's names
VIDEO_EXTS = (".mp4", ".mkv", ".mov")  # what --out may be


def add_flags(parser):
    """The model and generation flags, shared with eval.py."""
    parser.add_argument("--model", default="vans", help="vans | base | shapes | shapes-sft | tiny | path to a checkpoint directory")
    parser.add_argument("--vdm", default=None, help="take the VDM from this --model instead (e.g. an SFT VLM with an SFT VDM)")
    parser.add_argument("--seed", type=int, default=0, help="seed for caption sampling and video noise")
    # VLM; defaults of None come from the model's preset (its "infer" dict)
    parser.add_argument("--decoding", default=None, choices=DECODINGS,
                        help="release: greedy with repetition penalty 1.05, what the release computes; sample: the "
                             "paper's temperature 0.7 / top_p 0.9; greedy (default: release; shapes: sample)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="VLM generation budget (1024; shapes 160)")
    # VDM
    parser.add_argument("--steps", type=int, default=None, help="Euler flow-matching steps (50; shapes 20)")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale, 1 = off (5; shapes 3)")
    parser.add_argument("--height", type=int, default=None, help="output height, a multiple of 16 (352; shapes 64)")
    parser.add_argument("--width", type=int, default=None, help="output width, a multiple of 16 (640; shapes 112)")
    parser.add_argument("--frames", type=int, default=33, help="output frames (4k + 1)")
    parser.add_argument("--fps", type=int, default=11, help="fps of the written video")
    parser.add_argument("--ref-clip", default=None, choices=data.REF_CLIPS,
                        help="which input frames make the reference clip (data.clip_indices; default: first, as "
                             "DiffSynth's reader; shapes and our checkpoints: what the VDM was trained with)")
    parser.add_argument("--precision", default=None, choices=("release", "fp32"),
                        help="release: bf16 latents, timesteps and tiled VAE, as the release on a GPU; fp32: float32 "
                             "sampler state and VAE (default: release for the full-size models on cuda, else fp32)")
    # weights and compute
    parser.add_argument("--qwen", default=None, help="local copy of Qwen/Qwen2.5-VL-3B-Instruct")
    parser.add_argument("--wan", default=None, help="local copy of Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    parser.add_argument("--vans", default=None, help="local copy of KlingTeam/VANS (vdm.safetensors, vlm.safetensors)")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda if there is a GPU)")
    parser.add_argument("--attention", default="native",
                        help="the DiT's attention kernel, one of diffusers' attention backends: native (PyTorch's SDPA "
                             "picks), _native_flash, _native_cudnn, flash (needs flash-attn), sage, ...")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks (the first answer compiles)")
    parser.add_argument("--offload", action="store_true",
                        help="keep the VLM and the text encoder on the CPU except while they run: less GPU memory, and "
                             "their weights copied to the GPU and back for every batch")


parser = argparse.ArgumentParser(description="VANS: answer a question about a video with a video.")
parser.add_argument("video", help="input video (.mp4, ...) or image (.png/.jpg)")
parser.add_argument("question", help="the question, e.g. 'What should I do next?'")
parser.add_argument("--out", default="answer.mp4", help="where to write the answer video (.mp4)")
parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
add_flags(parser)


def check_out(path):
    """--out: a video file name in an existing, writable directory; not a directory."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(f"--out {path}: is a directory; give a file name ending in {' or '.join(VIDEO_EXTS)}")
    if not path.lower().endswith(VIDEO_EXTS):
        fail(f"--out {path}: the answer is a video; give a file name ending in {' or '.join(VIDEO_EXTS)}")
    if not os.path.isdir(parent):
        fail(f"--out {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        fail(f"--out {path}: not writable")


def settle_flags(args):
    """Fill the generation flags left unset with the model's preset defaults (the reference clip: the
    one the VDM's training run used, where its checkpoint records it), check the size and the device.
    Imports torch."""
    import torch
    import checkpoint
    try:
        preset = checkpoint.preset_of(args.model)
        args.ref_clip = args.ref_clip or checkpoint.ref_clip_of(args.vdm or args.model)
    except checkpoint.CheckpointError as e:
        fail(e)
    for k, v in preset["infer"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.height % 16 or args.width % 16 or (args.frames - 1) % 4:
        fail(f"--height/--width must be multiples of 16 and --frames of the form 4k + 1, "
             f"got {args.height}x{args.width}x{args.frames}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device}: expected cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: no CUDA GPU is available here (use --device cpu)")
    from diffusers.models.attention_dispatch import AttentionBackendName
    if args.attention not in {b.value for b in AttentionBackendName}:
        fail(f"--attention {args.attention}: not one of diffusers' attention backends "
             f"({', '.join(b.value for b in AttentionBackendName)})")
    if args.precision is None:  # the release's numerics are those of its own models on a GPU
        args.precision = "release" if device.type == "cuda" and preset["name"] == "full" else "fp32"
    args.preset = preset


def size_warning(path, size, args):
    """A small preset's VLM reads the pixels of clips of its data's size (the Shapes world's): another size
    is worth a warning (the full-size VLM and VDM take any size)."""
    trained = tuple(args.preset["infer"][k] for k in ("height", "width"))
    if args.preset["name"] != "full" and tuple(size) != trained:
        print(f"warning: {path} is {size[1]}x{size[0]}; the {args.preset['name']} models were trained on "
              f"{trained[1]}x{trained[0]} clips, and answer others less well", file=sys.stderr)


def load_models(args):
    """-> (vlm, vdm) on args.device (bf16 on GPU or with --precision release); with --offload the VLM
    and the text encoder stay on the CPU. A loading problem is one error line."""
    import torch
    import checkpoint
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" or args.precision == "release" else torch.float32
    at = None if args.offload else device  # with --offload, read onto the CPU and only the DiT and VAE moved
    try:
        if args.vdm:
            vlm, _ = checkpoint.load(args.model, qwen=args.qwen, wan=args.wan, vans=args.vans, dtype=dtype, device=at, need=("vlm",))
            _, vdm = checkpoint.load(args.vdm, qwen=args.qwen, wan=args.wan, vans=args.vans, dtype=dtype, device=at, need=("vdm",))
        else:
            vlm, vdm = checkpoint.load(args.model, qwen=args.qwen, wan=args.wan, vans=args.vans, dtype=dtype, device=at)
    except checkpoint.CheckpointError as e:
        fail(e)
    for m in (vdm.dit, vdm.vae, *(() if args.offload else (vlm.model, vdm.text_encoder))):
        m.to(device)
    if args.precision == "release":  # everything in bf16, the VAE too (a small preset loads in float32)
        vdm.release = True
        for m in (vlm.model, vdm.dit, vdm.text_encoder, vdm.vae):  # (diffusers' own .to warns about nothing here)
            torch.nn.Module.to(m, dtype)
    if args.attention != "native":
        try:
            vdm.dit.set_attention_backend(args.attention)
        except (ValueError, RuntimeError, ImportError) as e:
            fail(f"--attention {args.attention}: {str(e).splitlines()[0]}")
    if args.compile:
        vdm.dit.compile_repeated_blocks(fullgraph=True)
    return vlm, vdm


def answer(vlm, vdm, video_paths, questions, args, generator, progress=False, captions=None):
    """The whole VANS path for a batch of inputs -> (list of dicts with think, caption, completion
    and video uint8 (T, H, W, 3), timings in seconds for the batch). captions: render these
    instead of the VLM's (the VDM alone; think and completion are then None)."""
    import numpy as np
    import torch
    import model
    timings, t0 = {}, time.perf_counter()

    def tick(name):
        nonlocal t0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings[name] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()

    # the VLM sees up to 6 frames spread over each input; the VDM's reference clip is `frames` frames
    vlm_frames = [data.read_vlm_frames(p, model.VLM_FRAMES) for p in video_paths] if captions is None else None
    clips = np.stack([data.load_clip(p, args.frames, args.height, args.width, args.ref_clip) for p in video_paths])
    tick("read")
    @contextlib.contextmanager
    def working(m):  # --offload: a model on the DiT's device while it works, on the CPU before and after
        if args.offload:
            m.to(vdm.device)
        try:
            yield
        finally:
            if args.offload:
                m.to("cpu")

    if captions is None:
        with working(vlm.model):
            completions = vlm.generate(vlm_frames, questions, args.decoding, args.max_new_tokens)
        captions = [model.caption_of(c) for c in completions]
    else:
        completions = [None] * len(captions)
    tick("vlm")
    with working(vdm.text_encoder):
        text = vdm.encode_text(captions)
        neg = vdm.negative_text(len(captions)) if args.cfg != 1.0 else None
    refs = vdm.ref_latents(vdm.encode_video(data.to_tensor(clips, vdm.vae.dtype))) if vdm.n_refs else None
    tick("encode")
    latents = vdm.sample(text, neg, refs, frames=args.frames, height=args.height, width=args.width,
                         steps=args.steps, cfg=args.cfg, generator=generator, progress=progress)
    tick("dit")
    videos = [data.to_uint8(v, truncate=vdm.release) for v in vdm.decode(latents)]
    tick("vae")
    timings["total"] = round(sum(timings.values()), 3)
    return [dict(think=None if c is None else model.extract(c, "Think"), caption=cap, completion=c, video=v)
            for c, cap, v in zip(completions, captions, videos)], timings


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    args = parser.parse_args()
    # the input, the question, --out and the model names first: a mistake fails in a fraction of a second
    try:
        _, size = data.probe(args.video)
    except data.VideoError as e:
        fail(e)
    if not args.question.strip():
        fail("the question is empty")
    check_out(args.out)
    common.check_models(model=args.model, vdm=args.vdm)
    settle_flags(args)
    size_warning(args.video, size, args)

    import torch
    vlm, vdm = load_models(args)
    torch.manual_seed(args.seed)  # the VLM's sampling
    generator = torch.Generator("cpu").manual_seed(args.seed)  # the video noise
    try:
        (out,), timings = answer(vlm, vdm, [args.video], [args.question], args, generator, progress=not args.json)
    except data.VideoError as e:
        fail(e)
    data.write_video(args.out, out.pop("video"), fps=args.fps)
    out.update(output=os.path.abspath(args.out), timings=timings)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"[Think] {out['think'] or ''}\n[Ans] {out['caption']}\n-> {args.out}  "
              + "  ".join(f"{k} {v:.2f}s" for k, v in out["timings"].items()))
