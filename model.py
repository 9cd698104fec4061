"""
VANS models: the VLM that reasons about what happens next and writes a caption,
the VDM that renders the caption as a video, and the flow-matching steps that
sampling and Joint-GRPO stage 2 are built on.

    VLM  Qwen2.5-VL-3B-Instruct (+ LoRA r8/alpha32)    6 frames + question -> [Think]..[/Think][Ans]..[/Ans]
    VDM  Wan2.1-T2V-1.3B: umT5 text encoder, Wan VAE, Wan DiT
         caption + 6 reference latents of the input clip -> 9 latent frames -> 33 frames

Reference-frame conditioning (as the official release): the input clip's 33
frames are VAE-encoded to 9 latent frames; 6 of them, linspace(0, 8, 6) =
[0, 1, 3, 4, 6, 8], are concatenated in front of the 9 noisy target frames on
the time axis (RoPE positions 0-5 refs, 6-14 targets), the DiT sees one global
timestep, and only its output on the 9 target frames is used. The refs stay
clean at every step.

Presets: "full" (hub weights; the configs below let tests build it on the meta
device) and "tiny" (same classes, small random configs, tokenizers built in
process: no files needed; for tests). A preset is a dict: a world of its own
brings its own (loaded by `--model random:MODULE`), and a checkpoint of a small
preset carries its preset in meta.json (checkpoint.py).
"""

import contextlib
import copy
import math
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# The release's strings (its agent_mllm.py and inference.py): what the official checkpoint was
# trained and run with. The paper's wording of the system prompt differs ("[Think]/[/Think]", "detailed").
SYSTEM_PROMPT = (
    "You will be given a video. Your task is to predict the next event based on the input video and the "
    "user's instructions. Please begin by providing your detailed reasoning between the [Think][/Think] "
    "tags, followed by your description of the next event within the [Ans][/Ans] tags."
)
NEGATIVE_PROMPT = (
    "vivid colors, overexposed, static, blurry details, subtitles, style, artwork, painting, frame, stationary, "
    "overall grayish, worst quality, low quality, JPEG compression artifacts, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn face, deformed, disfigured, malformed limbs, fused fingers, stationary frame, "
    "cluttered background, three legs, crowded background people, walking backwards"
)
VLM_FRAMES = 6        # frames the VLM sees, spread uniformly (the release's qwen-vl-utils: min = max = 6)
VLM_FPS = 2.0         # the frame rate the release's processor assumed (its default): second_per_grid_ts = 2 / 2 = 1 s
N_REFS = 6            # reference latent frames given to the DiT
TEXT_LEN = 512        # umT5 max text length
LORA = dict(r=8, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


# Architecture configs. "full" mirrors the hub configs (used on the meta device
# and to check parameter counts); "tiny" is for tests. Keys a small preset may add: vlm_norm (the VLM
# processor's pixel mean and std), system_prompt, vlm_fps, negative_prompt, and tokenizer /
# text_tokenizer ("module:function" building the VLM's / the text encoder's tokenizer; default bytes).
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CONFIGS = {
    "full": dict(
        name="full",
        vlm=dict(text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                  num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                  rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
                 vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                    out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31], window_size=112,
                                    tokens_per_second=2),
                 tie_word_embeddings=True),
        dit=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        vae=dict(),  # AutoencoderKLWan defaults are Wan2.1's VAE
        text=dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        vlm_pixels=(128 * 28 * 28, 768 * 28 * 28),  # qwen-vl-utils' video min/max pixels per frame
        # infer.py's defaults: the release's decoding and reference clip (see the README's "Release and paper")
        infer=dict(max_new_tokens=1024, steps=50, cfg=5.0, height=352, width=640, decoding="release", ref_clip="first"),
    ),
    "tiny": dict(
        name="tiny",
        vlm=dict(text_config=dict(vocab_size=256 + len(QWEN_SPECIAL), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True,
                                  rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                 vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                    fullatt_block_indexes=[1], window_size=112, tokens_per_second=2),
                 tie_word_embeddings=True),
        dit=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16,
                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        vae=dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                 latents_mean=[0.0] * 16, latents_std=[1.0] * 16),
        text=dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        vlm_pixels=(4 * 28 * 28, 16 * 28 * 28),
        infer=dict(max_new_tokens=1024, steps=50, cfg=5.0, height=352, width=640, decoding="release", ref_clip="first"),
    ),
}


@contextlib.contextmanager
def quiet_peft():
    """peft reads transformers' deprecated is_gradient_checkpointing alias whenever it wraps a model:
    a FutureWarning on every start that says nothing about this code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


# -----------------------------------------------------------------------------
# building the networks

def byte_tokenizer():
    """Qwen2's byte-level BPE with no merges (one token per byte) and Qwen's special
    tokens: the tiny VLM's tokenizer, built without any file."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({s: 256 + i for i, s in enumerate(QWEN_SPECIAL)})
    return Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=QWEN_SPECIAL[1:])


def config_of(preset):
    """A preset's dict, given it or the name of a built-in one."""
    return CONFIGS[preset] if isinstance(preset, str) else preset


def hook(spec):
    """"module:name" -> that module's object: how a world of its own plugs in its tokenizer,
    preset or metrics, named in a config file or a preset, never imported here."""
    import importlib
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def vlm_processor(tokenizer, preset):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    c = config_of(preset)
    lo, hi = c["vlm_pixels"]
    norm = dict(image_mean=[c["vlm_norm"][0]] * 3, image_std=[c["vlm_norm"][1]] * 3) if "vlm_norm" in c else {}
    video = Qwen2VLVideoProcessor(size={"shortest_edge": lo, "longest_edge": hi}, cap_pixels_per_frame=True, **norm)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**norm), tokenizer=tokenizer, video_processor=video)


def build_vlm_net(preset, tokenizer):
    """Random-init Qwen2.5-VL of a preset (under `with torch.device("meta")` for counting)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    ids = {f"{n}_token_id": tokenizer.convert_tokens_to_ids(t) for n, t in
           [("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>")]}
    cfg = copy.deepcopy(config_of(preset)["vlm"])  # (transformers writes into rope_scaling)
    special = dict(bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                   pad_token_id=tokenizer.pad_token_id)
    cfg["text_config"] = {**cfg["text_config"], **special}
    cfg["text_config"]["vocab_size"] = cfg["text_config"]["vocab_size"] or len(tokenizer)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg, **ids, **special))


def build_vdm_nets(preset, text_tokenizer=None):
    """Random-init (DiT, VAE, umT5 encoder) of a preset; a text vocabulary of None is the tokenizer's."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    c = config_of(preset)
    text = dict(c["text"], vocab_size=c["text"]["vocab_size"] or len(text_tokenizer))
    return WanTransformer3DModel(**c["dit"]), AutoencoderKLWan(**c["vae"]), UMT5EncoderModel(UMT5Config(**text))


def load_tiny(seed=0, need=("vlm", "vdm"), preset="tiny", tokenizer=None, text_tokenizer=None):
    """Random models of a small preset (a name or a dict; deterministic for a seed); a model not in
    `need` is None. tokenizer: the VLM's, text_tokenizer: the text encoder's (default: the preset's
    own, built in process: its "tokenizer" / "text_tokenizer" hook, else bytes)."""
    from transformers import ByT5Tokenizer
    torch.manual_seed(seed)
    c = config_of(preset)
    built = {}  # a hook named twice builds one tokenizer

    def own(key, default):
        if key not in c:
            return default()
        if c[key] not in built:
            built[c[key]] = hook(c[key])()
        return built[c[key]]

    tok = tokenizer or own("tokenizer", byte_tokenizer)
    text_tok = text_tokenizer or own("text_tokenizer", ByT5Tokenizer)
    vlm = VLM(build_vlm_net(c, tok).eval(), vlm_processor(tok, c),  # built either way: same RNG stream
              c.get("system_prompt", SYSTEM_PROMPT), c.get("vlm_fps", VLM_FPS))
    dit, vae, te = build_vdm_nets(c, text_tok)
    vdm = VDM(dit.eval(), vae.eval(), te.eval(), text_tok, negative_prompt=c.get("negative_prompt", NEGATIVE_PROMPT))
    return (vlm if "vlm" in need else None), (vdm if "vdm" in need else None)


def add_lora(model):
    from peft import LoraConfig, get_peft_model
    with quiet_peft():
        return get_peft_model(model, LoraConfig(**LORA))


def merged_lora_state(module):
    """The state dict of a module with peft adapters injected (add_adapter), with each LoRA folded
    into its base weight (W + scale B A): the plain module's keys, for every loader."""
    from peft.tuners.lora import LoraLayer
    sd = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}
    for name, m in module.named_modules():
        if isinstance(m, LoraLayer):
            sd[f"{name}.weight"] = (m.base_layer.weight + m.get_delta_weight("default")).detach()
    return sd


# -----------------------------------------------------------------------------
# the VLM

def chat_prompt(question, answer=None, system=SYSTEM_PROMPT):
    """Qwen2.5-VL's chat format with the system prompt and the video in front of the
    question (what the release's apply_chat_template writes); with an answer, the full
    SFT sequence."""
    p = (f"<|im_start|>system\n{system}<|im_end|>\n"
         f"<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\n"
         f"<|im_start|>assistant\n")
    return p if answer is None else p + answer + "<|im_end|>"


def answer_text(think, caption):
    """The VLM's target output: [Think]{think}[/Think][Ans]{caption}[/Ans]."""
    return f"[Think]{think}[/Think][Ans]{caption}[/Ans]"


def extract(text, tag):
    m = re.search(rf"\[{tag}\](.*?)\[/{tag}\]", text, re.S)
    return m.group(1).strip() if m else None


def caption_of(text):
    """The VDM's caption: the text inside [Ans]...[/Ans], or the whole output if absent."""
    ans = extract(text, "Ans")
    return ans if ans is not None else text.strip()


# How the VLM decodes (generate's settings; generation stops at <|im_end|> or <|endoftext|>):
#   release  what the release's call computes: it passes temperature 0.7 / top_p 0.9 only, so the hub's
#            generation_config.json still sets top_k 1 and repetition_penalty 1.05: greedy on the penalised logits
#   sample   the paper's nominal sampling: temperature 0.7, top_p 0.9, no top-k, no penalty (GRPO's rollouts)
#   greedy   greedy on the raw logits
def sampling(temperature=0.7, top_p=0.9):
    """generate() settings that sample from softmax(logits / temperature) cut to top_p, with top-k and the
    repetition penalty explicitly off, so a hub generation_config.json (top_k 1) does not make them greedy."""
    return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0)


DECODING = {"release": dict(do_sample=False, repetition_penalty=1.05), "sample": sampling(),
            "greedy": dict(do_sample=False, repetition_penalty=1.0)}


class VLM:
    """Qwen2.5-VL (optionally a peft LoRA model around it) + its processor. fps: the frame rate the
    video is presented at (3-D RoPE spaces its temporal patches by 2 / fps seconds)."""

    def __init__(self, model, processor, system_prompt=SYSTEM_PROMPT, fps=VLM_FPS):
        self.model, self.processor, self.system_prompt, self.fps = model, processor, system_prompt, fps
        self.processor.tokenizer.padding_side = "left"  # generation appends on the right

    @property
    def device(self):
        return next(self.model.parameters()).device

    def stop_ids(self):
        return self.processor.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])

    def inputs(self, videos, questions, answers=None):
        """Processor inputs for a batch. videos: uint8 (n, H, W, 3) each (data.read_vlm_frames),
        presented at self.fps. With answers, the full sequences and their SFT labels: the answer
        tokens and the closing <|im_end|>; -100 on the prompt, the video and the (left) padding."""
        texts = [chat_prompt(q, a, self.system_prompt) for q, a in zip(questions, answers or [None] * len(questions))]
        videos = [np.ascontiguousarray(v) for v in videos]
        meta = [{"fps": self.fps, "total_num_frames": len(v)} for v in videos]
        inp = self.processor(text=texts, videos=videos, video_metadata=meta, padding=True, return_tensors="pt").to(self.device)
        if answers is not None:
            inp["labels"] = torch.where(self.answer_mask(inp["input_ids"]), inp["input_ids"], -100)
        return inp

    def answer_mask(self, ids):
        """True after the last '<|im_start|>assistant\n' of each row: the assistant's tokens."""
        tok = self.processor.tokenizer
        turns = (ids == tok.convert_tokens_to_ids("<|im_start|>")).int().cumsum(1)
        last_turn = turns == turns[:, -1:]
        tag = 1 + len(tok("assistant\n", add_special_tokens=False).input_ids)  # <|im_start|>assistant\n
        return last_turn & (last_turn.int().cumsum(1) > tag)

    @torch.no_grad()
    def generate(self, videos, questions, decoding="release", max_new_tokens=1024):
        """-> list of completions (text after the assistant tag, special tokens removed). decoding: a DECODING name.
        transformers' generate on the processor's inputs, as the release calls it."""
        tok = self.processor.tokenizer
        inp = self.inputs(videos, questions)
        out = self.model.generate(**inp, max_new_tokens=max_new_tokens, **DECODING[decoding], eos_token_id=self.stop_ids(),
                                  pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, inp["input_ids"].shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def rollout(self, videos, questions, max_new_tokens=1024, **settings):
        """Generate with generate() settings (e.g. DECODING["sample"] or a temperature and top_p of
        GRPO's), and keep what GRPO needs -> (inputs of the whole sequences, completions). The inputs
        hold prompt + completion tokens (the prompt left-padded, the completion right-padded) and
        "completion_mask" (B, n): the completion's tokens up to and including its stop token;
        n = the longest completion. The vision tokens are never sampled: the sequence is read again
        by the model, which would take one for a vision slot."""
        tok = self.processor.tokenizer
        stops = self.stop_ids()
        inp = self.inputs(videos, questions)
        vision = tok.convert_tokens_to_ids(QWEN_SPECIAL[3:])
        out = self.model.generate(**inp, max_new_tokens=max_new_tokens, **settings, eos_token_id=stops,
                                  pad_token_id=tok.pad_token_id, suppress_tokens=vision)
        completion = out[:, inp["input_ids"].shape[1]:]  # (B, n)
        is_stop = torch.isin(completion, torch.tensor(stops, device=completion.device))
        ended = is_stop.int().cumsum(1)
        mask = (ended == 0) | ((ended == 1) & is_stop)  # up to and including the first stop token
        inp["input_ids"] = out
        inp["attention_mask"] = torch.cat([inp["attention_mask"], mask.to(inp["attention_mask"].dtype)], 1)
        inp["mm_token_type_ids"] = torch.cat([inp["mm_token_type_ids"], torch.zeros_like(completion)], 1)
        inp["completion_mask"] = mask
        return inp, tok.batch_decode(completion, skip_special_tokens=True)

    def completion_logprobs(self, inp, temperature=1.0, net=None):
        """Per-token log-probabilities (B, n) of the completions of `rollout` inputs under the
        distribution they were sampled from: logits / T, vision tokens excluded. net: the
        network to call instead of self.model (its DDP wrapper). Only the last n + 1 positions'
        logits are computed."""
        n = inp["completion_mask"].shape[1]
        kwargs = {k: v for k, v in inp.items() if k != "completion_mask"}
        logits = (net or self.model)(**kwargs, use_cache=False, logits_to_keep=n + 1).logits[:, :-1].float()
        logits[..., self.processor.tokenizer.convert_tokens_to_ids(QWEN_SPECIAL[3:])] = -math.inf
        return torch.log_softmax(logits / temperature, -1).gather(-1, inp["input_ids"][:, -n:, None]).squeeze(-1)


# -----------------------------------------------------------------------------
# the VDM

def flow_sigmas(steps, shift=5.0):
    """The Euler flow-matching schedule of the official release (DiffSynth's Wan
    scheduler): s = linspace(1, 0, steps + 1)[:-1], shifted s' = shift s / (1 + (shift - 1) s),
    then a final 0. (steps + 1,) float32; the DiT is given timestep 1000 s."""
    s = torch.linspace(1, 0, steps + 1)[:-1]  # float32, as DiffSynth's FlowMatchScheduler
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, s.new_zeros(1)])


def training_schedule(shift=5.0, n=1000):
    """DiffSynth's flow-matching training table (FlowMatchScheduler.set_timesteps(n, training=True)),
    which the release's VDM was trained with -> (sigmas (n,), loss weights (n,)): the sampler's
    schedule at n steps, and at each t = 1000 sigma the weight exp(-2 ((t - n/2) / n)^2), minus its
    minimum, scaled to mean 1."""
    sigmas = flow_sigmas(n, shift)[:-1]
    w = torch.exp(-2 * ((sigmas * 1000 - n / 2) / n) ** 2)
    w = w - w.min()
    return sigmas, w * (n / w.sum())


def motion_mask(x0, threshold=1.0):
    """(B, 1, T, h, w): the latent positions where something moves, those off their own median over the
    clip's T latent frames by more than threshold (in normalised latent units) in any channel."""
    return ((x0 - x0.median(2, keepdim=True).values).abs().amax(1, keepdim=True) > threshold).float()


def flow_matching_loss(vdm, x0, text, refs=None, generator=None, sigma=None, shift=5.0, weighted=True, dit=None,
                       motion_weight=0.0):
    """The VDM's SFT loss, as DiffSynth's Wan training (which the release's VDM came from) computes
    it. Per sample: sigma drawn from the shifted 1000-step table (training_schedule) unless given,
    noise eps, x_s = (1 - s) x0 + s eps, and the DiT's velocity on the target frames (the clean
    refs in front, never noised) regressed on eps - x0, the direction sampling integrates along:
        loss = mean_b w(s_b) mean (v - (eps - x0))^2
    w: DiffSynth's weight in t (weighted), else 1. With motion_weight m > 0 the mean over latent
    positions is weighted too, 1 + m on the moving ones (motion_mask), normalised per sample:
        mean (1 + m M) (v - (eps - x0))^2 / mean (1 + m M)
    (for an event that is a small object's motion; sft_vdm --motion-weight).
    A given sigma (validation) is unweighted in both. x0: (B, C, T, h, w) clean target latents;
    text: (B, L, D). -> scalar"""
    B = x0.shape[0]
    weight, pixel = torch.ones(B), torch.ones_like(x0[:, :1])
    if sigma is None:
        sigmas, weights = training_schedule(shift)
        i = torch.randint(len(sigmas), (B,), generator=generator)
        sigma, weight = sigmas[i], (weights[i] if weighted else weight)
        pixel = pixel + motion_weight * motion_mask(x0)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(B).to(x0.device)
    s = sigma.view(-1, 1, 1, 1, 1)
    v = vdm.velocity((1 - s) * x0 + s * eps, sigma, text, refs, dit=dit)
    per_sample = (pixel * (v.float() - (eps - x0)) ** 2).flatten(1).mean(1) / pixel.flatten(1).mean(1)  # (B,)
    return (weight.to(x0.device) * per_sample).mean()


def euler_step(v, x, sigma, sigma_next):
    """Deterministic ODE step x' = x + v (s' - s), in x's dtype. As DiffSynth writes it, with the sigmas
    0-dim CPU tensors: in bf16 the product is then rounded once (s' - s first cast to bf16 is not)."""
    return x + v * (sigma_next - sigma)


def sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=0.7, prev_sample=None, generator=None):
    """One ODE->SDE step of Flow-GRPO (Liu et al. 2025, Eq. 9-10), with the log-density of its sample.

    With dt = s' - s < 0 and a = noise_level:
        std  = a sqrt(s / (1 - s))                 (s' in the denominator when s == 1)
        mean = x + dt (v + std^2 / (2 s) (x + (1 - s) v))
        x'   = mean + std sqrt(-dt) eps
        log p(x') = mean over non-batch elements of
                    -(x' - mean)^2 / (2 std^2 |dt|) - log(std sqrt|dt|) - log sqrt(2 pi)
    sigma / sigma_next: floats or (B,) tensors. If prev_sample is given it is scored,
    not sampled. Returns (prev_sample, log_prob (B,), mean, std * sqrt(-dt)).
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(shape)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device).reshape(shape)
    v, x = v.float(), x.float()
    dt = s_next - s
    std = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))
    mean = x + dt * (v + std ** 2 / (2 * s) * (x + (1 - s) * v))
    step_std = std * torch.sqrt(-dt)
    if prev_sample is None:  # noise drawn on the generator's device (the CPU without one), as the samplers do
        eps = torch.randn(x.shape, generator=generator, device=generator.device if generator else "cpu").to(x)
        prev_sample = mean + step_std * eps
    log_prob = (-(prev_sample.detach() - mean) ** 2 / (2 * step_std ** 2) - torch.log(step_std)
                - math.log(math.sqrt(2 * math.pi)))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.dim()))), mean, step_std


def vae_chunk(h, w):
    """How many videos of latent size h x w the VAE takes at once: as many as fit in one 352x640
    video's latent pixels (44 x 80): its memory at the paper's size stays that of one video, and
    small videos go in batches (31 at 64x112), which is faster on a CPU (docs/design.md)."""
    return max(1, 44 * 80 // (h * w))


def _tile_spans(n, size, stride):
    """DiffSynth's tiles along one axis: a start every `stride` until a tile has reached the end."""
    spans = []
    for a in range(0, n, stride):
        if a >= stride and a - stride + size >= n:
            break
        spans.append((a, min(a + size, n)))
    return spans


def _tile_ramp(n, first, last, border):
    """Blend weights along one axis of a tile: 1, and (1..border) / border rising into (falling out of)
    a side shared with another tile; first / last: the side is the frame's edge."""
    w = torch.ones(n)
    if not first:
        w[:border] = (torch.arange(border) + 1) / border
    if not last:
        w[-border:] = ((torch.arange(border) + 1) / border).flip(0)
    return w


def tiled(fn, x, size, stride, scale):
    """fn (a VAE encoder or decoder: (B, C, T, H, W) -> (B, C', T', H * scale, W * scale)) run on
    overlapping spatial tiles of x and blended as the release's VAE does (DiffSynth's WanVideoVAE,
    tiled=True): tiles of `size` every `stride` (x's units), each weighted by a ramp over the
    overlap, the weighted sum and the weights accumulated in the output's dtype, then divided."""
    H, W = x.shape[-2:]
    border = [round((sz - st) * scale) for sz, st in zip(size, stride)]
    out = weight = None
    for h0, h1 in _tile_spans(H, size[0], stride[0]):
        for w0, w1 in _tile_spans(W, size[1], stride[1]):
            y = fn(x[..., h0:h1, w0:w1])
            if out is None:
                out = y.new_zeros(*y.shape[:3], round(H * scale), round(W * scale))
                weight = y.new_zeros(out.shape[-2:])
            mask = torch.minimum(_tile_ramp(y.shape[-2], h0 == 0, h1 >= H, border[0])[:, None],
                                 _tile_ramp(y.shape[-1], w0 == 0, w1 >= W, border[1])[None]).to(y)
            top, left = round(h0 * scale), round(w0 * scale)
            out[..., top:top + y.shape[-2], left:left + y.shape[-1]] += y * mask
            weight[top:top + y.shape[-2], left:left + y.shape[-1]] += mask
    return out / weight


class VDM:
    """Wan2.1: umT5 text encoder + VAE + DiT, with reference-frame conditioning.
    n_refs = 0 is plain text-to-video (the Qwen-Wan baseline).

    release = True computes as the release does on a GPU (DiffSynth's pipeline in bf16): noise cast to
    the DiT's dtype and the latents, the CFG combination and the Euler step kept in it, the timestep
    rounded to it (by up to 2 of 1000), and the VAE run in tiles (self.tile: size and stride in latent
    pixels) in its own dtype. Otherwise the sampler state and the VAE are float32."""

    def __init__(self, dit, vae, text_encoder, tokenizer, n_refs=N_REFS, negative_prompt=NEGATIVE_PROMPT):
        self.dit, self.vae, self.text_encoder, self.tokenizer, self.n_refs = dit, vae, text_encoder, tokenizer, n_refs
        self.negative_prompt = negative_prompt
        self.release, self.tile = False, ((30, 52), (15, 26))  # the release's tile_size and tile_stride
        self.set_latent_stats(vae.config.latents_mean, vae.config.latents_std)

    def set_latent_stats(self, mean, std):
        """Per-channel statistics that normalise the VAE's latents (Wan's, or measured on a trained tiny VAE)."""
        z = self.vae.config.z_dim
        self.latents_mean = torch.as_tensor(mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.latents_std = torch.as_tensor(std, dtype=torch.float32).view(1, z, 1, 1, 1)

    @property
    def device(self):
        return next(self.dit.parameters()).device

    def encode_text(self, prompts, grad=False):
        """umT5 embeddings (B, 512, D), zero past each prompt's length (as Wan). grad: keep the
        graph (training the tiny text encoder), and run the encoder on the longest prompt's length,
        not 512: masked padding changes only the rounding of what comes before it."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean
        t = self.tokenizer([prompt_clean(p) for p in prompts], padding="longest" if grad else "max_length",
                           padding_side="right", max_length=TEXT_LEN, truncation=True, add_special_tokens=True,
                           return_tensors="pt")
        dev = next(self.text_encoder.parameters()).device
        with torch.set_grad_enabled(grad):
            h = self.text_encoder(t.input_ids.to(dev), t.attention_mask.to(dev)).last_hidden_state
        h = F.pad(h * t.attention_mask.to(dev)[..., None], (0, 0, 0, TEXT_LEN - h.shape[1]))
        return h.to(self.device, self.dit.dtype)

    def negative_text(self, n):
        """The negative prompt's embedding for n samples, (n, 512, D): encoded once and kept while the
        prompt, the text encoder (the module, its device and dtype) and the DiT's device and dtype stay
        the same. Weights changed in place are not seen: a text encoder being trained must not use it."""
        key = (self.negative_prompt, id(self.text_encoder), next(self.text_encoder.parameters()).device,
               self.text_encoder.dtype, self.device, self.dit.dtype)
        if getattr(self, "_negative", (None,))[0] != key:
            self._negative = (key, self.encode_text([self.negative_prompt]))
        return self._negative[1].expand(n, -1, -1)

    @torch.no_grad()
    def encode_video(self, video):
        """float (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, 16, 1 + (T - 1) / 4, H / 8, W / 8),
        the posterior mean (as DiffSynth encodes). In chunks of vae_chunk videos."""
        dev = next(self.vae.parameters()).device
        mean, std = self.latents_mean.to(dev), self.latents_std.to(dev)
        chunks = video.split(vae_chunk(video.shape[-2] // 8, video.shape[-1] // 8))
        if self.release:  # normalised per tile, in the VAE's dtype, as DiffSynth does
            dt = self.vae.dtype
            enc = lambda v: (self.vae.encode(v).latent_dist.mode() - mean.to(dt)) * (1 / std).to(dt)
            (th, tw), (sh, sw) = self.tile
            return torch.cat([tiled(enc, c.to(dev, dt), (th * 8, tw * 8), (sh * 8, sw * 8), 1 / 8) for c in chunks])
        z = torch.cat([self.vae.encode(c.to(dev, self.vae.dtype)).latent_dist.mode().float() for c in chunks])
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, latents):
        """normalised latents -> (B, 3, T, H, W) in [-1, 1], float32 (release: the VAE's dtype).
        In chunks of vae_chunk videos."""
        dev = next(self.vae.parameters()).device
        mean, std = self.latents_mean.to(dev), self.latents_std.to(dev)
        chunks = latents.to(dev).split(vae_chunk(*latents.shape[-2:]))
        if self.release:
            dt = self.vae.dtype
            dec = lambda z: self.vae.decode(z / (1 / std).to(dt) + mean.to(dt)).sample
            return torch.cat([tiled(dec, c.to(dt), *self.tile, 8).clamp(-1, 1) for c in chunks])
        return torch.cat([self.vae.decode((c.float() * std + mean).to(self.vae.dtype)).sample.float().clamp(-1, 1)
                          for c in chunks])

    def ref_latents(self, clip_latents):
        """The N_REFS reference frames of the input clip's latents, linspace(0, T - 1, n).long():
        [0, 1, 3, 4, 6, 8] of 9. None when the model takes no references."""
        if self.n_refs == 0:
            return None
        idx = torch.linspace(0, clip_latents.shape[2] - 1, self.n_refs).long()
        return clip_latents[:, :, idx]

    def velocity(self, x, sigma, text, refs=None, dit=None):
        """DiT velocity on the target frames, in x's dtype. x: (B, C, T, h, w) noisy targets; refs:
        (B, C, n, h, w) clean references placed in front on the time axis; sigma: float or (B,); the
        timestep 1000 sigma is given in x's dtype. dit: the network to call instead of self.dit (its
        DDP / FSDP wrapper when training)."""
        B, T = x.shape[0], x.shape[2]
        inp = x if refs is None else torch.cat([refs.to(x), x], dim=2)  # (B, C, n + T, h, w)
        t = (torch.as_tensor(sigma, dtype=torch.float32, device=x.device) * 1000).to(x.dtype).expand(B)
        out = (dit or self.dit)(hidden_states=inp.to(self.dit.dtype), timestep=t, encoder_hidden_states=text,
                       return_dict=False)[0]
        return out[:, :, -T:].to(x.dtype)

    def guided_velocity(self, x, sigma, text, neg, refs=None, cfg=5.0, dit=None):
        """Classifier-free guidance, both branches in one batched forward."""
        if cfg == 1.0:
            return self.velocity(x, sigma, text, refs, dit)
        r2 = None if refs is None else torch.cat([refs, refs])
        v_cond, v_neg = self.velocity(torch.cat([x, x]), sigma, torch.cat([text, neg]), r2, dit).chunk(2)
        return v_neg + cfg * (v_cond - v_neg)

    @torch.no_grad()
    def sample(self, text, neg=None, refs=None, frames=33, height=352, width=640, steps=50, cfg=5.0,
               shift=5.0, generator=None, latents=None, progress=False):
        """Euler flow-matching ODE from noise to normalised latents (B, 16, 1 + (frames - 1) / 4, h, w).
        Noise is drawn in float32 on the generator's device, as diffusers and DiffSynth do; the state is
        float32, or the DiT's dtype with self.release."""
        B = text.shape[0]
        shape = (B, self.dit.config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
        if latents is None:
            gen_dev = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn(shape, generator=generator, device=gen_dev, dtype=torch.float32)
        x = latents.to(self.device, self.dit.dtype if self.release else torch.float32)
        if neg is None and cfg != 1.0:
            neg = self.encode_text([self.negative_prompt] * B)
        sigmas = flow_sigmas(steps, shift)  # float32 on the CPU, as the release's scheduler keeps them
        for i in tqdm(range(steps), disable=not progress, desc="denoise"):
            v = self.guided_velocity(x, sigmas[i], text, neg, refs, cfg)
            x = euler_step(v, x, sigmas[i], sigmas[i + 1])
        return x

    @torch.no_grad()
    def sample_sde(self, text, neg=None, refs=None, frames=33, height=352, width=640, steps=20, cfg=5.0, shift=5.0,
                   noise_level=0.7, generator=None, window=None):
        """Flow-GRPO's stochastic sampler: the schedule of `sample`, every step an
        sde_step_with_logprob. window = (start, end): only steps start..end-1 are stochastic, the
        others Euler (ODE) steps, as Flow-GRPO-Fast samples. -> (xs (B, steps + 1, C, T, h, w), the
        trajectory from the noise to the final latents; log_probs (B, steps) of each transition, nan
        for an ODE step)."""
        B = text.shape[0]
        shape = (B, self.dit.config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn(shape, generator=generator, device=gen_dev, dtype=torch.float32).to(self.device)
        if neg is None and cfg != 1.0:
            neg = self.encode_text([self.negative_prompt] * B)
        sigmas = flow_sigmas(steps, shift).to(x.device)
        start, end = window or (0, steps)
        xs, log_probs = [x], []
        for i in range(steps):
            v = self.guided_velocity(x, sigmas[i], text, neg, refs, cfg)
            if start <= i < end:
                x, lp, _, _ = sde_step_with_logprob(v, x, sigmas[i], sigmas[i + 1], noise_level, generator=generator)
            else:
                x, lp = euler_step(v, x, sigmas[i], sigmas[i + 1]), x.new_full((B,), math.nan)
            xs.append(x)
            log_probs.append(lp)
        return torch.stack(xs, 1), torch.stack(log_probs, 1)
