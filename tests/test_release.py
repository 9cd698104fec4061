"""What the official release computes, written out from its code and compared with ours bit for bit:
the VLM's frames and decoding, the schedule, the bf16 sampler and tiled VAE, the training table."""

import math

import numpy as np
import torch

import data
import model
from helpers import H, W, T, gen, moving_clip, RELEASE_NEGATIVE_PROMPT


def test_vlm_frames_as_the_release_picks_them(files):
    """The release's qwen-vl-utils (fps 1, min = max = 6 frames): smart_nframes written out here,
    then linspace(0, total - 1, n).round(). Catches: a short clip refused, or given 6 frames with
    repeats where the release gives it 2 or 4."""
    def release_nframes(total, video_fps=30.0):
        floor2 = lambda x: math.floor(x / 2) * 2
        n = min(min(max(total / video_fps * 1.0, 6), floor2(min(6, total))), total)
        return floor2(n)

    for total in range(2, 60):
        n = release_nframes(total)
        assert data.vlm_frame_indices(total) == torch.linspace(0, total - 1, n).round().long().tolist(), total
    assert data.vlm_frame_indices(1) == [0] * 6  # a still (the release has no image input): 6 copies
    assert [len(data.read_vlm_frames(str(files / f))) for f in ("two.mp4", "short.mp4", "clip.mp4", "image.png")] == [2, 6, 6, 6]


def test_release_decoding_is_what_the_release_call_computes():
    """The release calls generate(do_sample=True, temperature=0.7, top_p=0.9) on Qwen2.5-VL, whose hub
    generation_config.json sets top_k 1, repetition_penalty 1.05 and two stop tokens. --decoding
    release must give the same tokens with no generation_config at all. Catches: the penalty
    dropped (plain greedy), top_k overridden (real sampling), a stop token missing."""
    from transformers import GenerationConfig
    vlm, _ = model.load_tiny(seed=0, need=("vlm",))
    with torch.no_grad():  # random signs on the final norm: a random tiny LM otherwise repeats its last input token
        vlm.model.model.language_model.norm.weight.mul_(torch.randn(64, generator=gen(1)))
    tok = vlm.processor.tokenizer
    videos = [moving_clip(model.VLM_FRAMES, seed=s) for s in range(3)]
    questions = ["What happens next?", "q", "Which block goes on top?"]
    ours = vlm.generate(videos, questions, "release", max_new_tokens=24)
    saved = vlm.model.generation_config
    vlm.model.generation_config = GenerationConfig(  # Qwen/Qwen2.5-VL-3B-Instruct's generation_config.json
        do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05,
        eos_token_id=tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]), pad_token_id=tok.pad_token_id)
    try:
        inp = vlm.inputs(videos, questions)
        torch.manual_seed(123)  # the release does not seed its VLM: top_k 1 makes the draw irrelevant
        out = vlm.model.generate(**inp, max_new_tokens=24, do_sample=True, temperature=0.7, top_p=0.9)
    finally:
        vlm.model.generation_config = saved
    completion = out[:, inp["input_ids"].shape[1]:]
    assert not torch.isin(completion, torch.tensor(tok.convert_tokens_to_ids(model.QWEN_SPECIAL[3:]))).any()
    assert tok.batch_decode(completion, skip_special_tokens=True) == ours
    # the penalty matters for this model: plain greedy answers differently
    assert vlm.generate(videos, questions, "greedy", max_new_tokens=24) != ours


def _release_sigmas(n, shift=5.0):
    """DiffSynth's FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True).set_timesteps(n), written
    out: float32 linspace(1, 0, n + 1)[:-1], shifted; its step goes to 0 after the last."""
    s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
    return shift * s / (1 + (shift - 1) * s)


def test_flow_sigmas_are_the_release_schedule():
    """Catches: a schedule off by even one float32 ulp from the release's (numpy's linspace is, at 9
    of 50 sigmas), or diffusers' default schedule, which ends at 0.024 instead of 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    s = FlowMatchEulerDiscreteScheduler(shift=5.0)
    for n in (4, 20, 50, 1000):
        assert torch.equal(model.flow_sigmas(n, 5.0), torch.cat([_release_sigmas(n), torch.zeros(1)]))
        s.set_timesteps(sigmas=torch.linspace(1, 0, n + 1)[:-1].numpy())
        assert torch.equal(model.flow_sigmas(n, 5.0), s.sigmas)
    np_sigmas = torch.from_numpy(np.linspace(1, 0, 51)[:-1].astype(np.float32))
    assert not torch.equal(model.flow_sigmas(50)[:-1], 5 * np_sigmas / (1 + 4 * np_sigmas))


def test_training_schedule_is_diffsynths():
    """DiffSynth's training table (set_timesteps(1000, training=True)): timesteps 1000 sigma of the
    1000-step schedule, weights y - min(y) scaled to sum 1000 with y = exp(-2 ((t - 500) / 1000)^2),
    computed here in float64. Catches: unweighted or mis-centred weights, another table."""
    sigmas, w = model.training_schedule(5.0)
    assert torch.equal(sigmas, _release_sigmas(1000))
    t = sigmas.double().numpy() * 1000
    y = np.exp(-2 * ((t - 500) / 1000) ** 2)
    ref = (y - y.min()) * (1000 / (y - y.min()).sum())
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert w[0] == 0 and abs(w.mean().item() - 1) < 1e-5  # t = 1000 is the farthest from 500
    assert 0.49 < sigmas[w.argmax()] < 0.51 and w.max() > 1.4


def _bf16_vdm(vdm):
    """A copy of a VDM with the DiT, text encoder and VAE in bf16 and the release's numerics on."""
    import copy
    dit, te, vae = (torch.nn.Module.to(copy.deepcopy(m), torch.bfloat16) for m in (vdm.dit, vdm.text_encoder, vdm.vae))
    out = model.VDM(dit, vae, te, vdm.tokenizer)
    out.release = True
    return out


def test_release_numerics_are_the_release_loop(tiny):
    """vdm.release against DiffSynth's WanVideoPipeline loop written out here as the release runs it in
    bf16: noise drawn in float32 on the CPU and cast, timestep 1000 sigma cast to bf16, the two CFG
    branches run apart and combined in bf16, the step x + v (s' - s) kept in bf16, the clean refs in
    front. (The DiT is diffusers' class, standing in for DiffSynth's.) Catches: a float32 state, a
    timestep not rounded as the release rounds it, CFG or the step in float32."""
    vdm = _bf16_vdm(tiny[1])
    text, neg = vdm.encode_text(["a red ball rolls left"]), vdm.encode_text([RELEASE_NEGATIVE_PROMPT])
    refs = torch.randn(1, 16, 6, H // 8, W // 8, generator=gen(7)).to(torch.bfloat16)
    steps, cfg = 6, 5.0
    sig = _release_sigmas(steps)
    lat = torch.randn(1, 16, 9, H // 8, W // 8, generator=gen(3), dtype=torch.float32).to(torch.bfloat16)
    for i in range(steps):
        t = (sig[i] * 1000).unsqueeze(0).to(torch.bfloat16)
        x = torch.cat([refs, lat], dim=2)
        with torch.no_grad():
            posi = vdm.dit(hidden_states=x, timestep=t, encoder_hidden_states=text).sample[:, :, 6:]
            nega = vdm.dit(hidden_states=x, timestep=t, encoder_hidden_states=neg).sample[:, :, 6:]
        pred = nega + cfg * (posi - nega)
        lat = lat + pred * ((sig[i + 1] if i + 1 < steps else 0) - sig[i])
    ours = vdm.sample(text, None, refs, frames=T, height=H, width=W, steps=steps, cfg=cfg, generator=gen(3))
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, lat, rtol=0, atol=0)
    assert any((sig[i] * 1000).to(torch.bfloat16).float() != sig[i] * 1000 for i in range(steps))  # rounding happens
    vdm.release = False  # a float32 state gives other latents
    assert not torch.allclose(vdm.sample(text, None, refs, frames=T, height=H, width=W, steps=steps, cfg=cfg,
                                         generator=gen(3)), lat.float(), atol=1e-3)


def _diffsynth_tiled(fn, x, size, stride, up):
    """DiffSynth's WanVideoVAE.tiled_encode (up = 1/8) / tiled_decode (up = 8), written out: tiles every
    stride until one reaches the edge, a linear ramp over (size - stride) output pixels on shared
    sides, min of the two axes' masks, sums and weights in x's dtype, then divided."""
    _, _, _, Hx, Wx = x.shape
    tasks = []
    for h in range(0, Hx, stride[0]):
        if h - stride[0] >= 0 and h - stride[0] + size[0] >= Hx:
            continue
        for w in range(0, Wx, stride[1]):
            if w - stride[1] >= 0 and w - stride[1] + size[1] >= Wx:
                continue
            tasks.append((h, h + size[0], w, w + size[1]))
    border = (int((size[0] - stride[0]) * up), int((size[1] - stride[1]) * up))
    values = weight = None
    for h, h_, w, w_ in tasks:
        y = fn(x[:, :, :, h:h_, w:w_])
        if values is None:
            values = torch.zeros(*y.shape[:3], int(Hx * up), int(Wx * up), dtype=x.dtype)
            weight = torch.zeros(1, 1, 1, int(Hx * up), int(Wx * up), dtype=x.dtype)

        def ramp(n, lo, hi, b):
            r = torch.ones(n)
            if not lo:
                r[:b] = (torch.arange(b) + 1) / b
            if not hi:
                r[-b:] = torch.flip((torch.arange(b) + 1) / b, dims=(0,))
            return r
        mh, mw = ramp(y.shape[3], h == 0, h_ >= Hx, border[0]), ramp(y.shape[4], w == 0, w_ >= Wx, border[1])
        mask = torch.stack([mh[:, None].expand(-1, y.shape[4]), mw[None].expand(y.shape[3], -1)]).min(0).values.to(x.dtype)
        th, tw = int(h * up), int(w * up)
        values[:, :, :, th:th + y.shape[3], tw:tw + y.shape[4]] += y * mask
        weight[:, :, :, th:th + y.shape[3], tw:tw + y.shape[4]] += mask
    return values / weight


def test_release_vae_tiles_as_diffsynth(tiny):
    """vdm.release runs the VAE as the release's (tiled=True): bf16 tiles blended as DiffSynth's
    tiled_encode / tiled_decode, written out above, each tile normalised with Wan's statistics in
    bf16 (mean and 1 / std cast to bf16, as DiffSynth's scale). Small tiles here, so a 64x112 clip has
    3 x 4 of them. Catches: no tiling, diffusers' own tiling, a float32 VAE."""
    vdm = _bf16_vdm(tiny[1])
    vdm.tile = ((4, 6), (2, 3))  # latent pixels; 8x in video pixels
    clip = data.to_tensor(moving_clip()[None], torch.bfloat16)  # (1, 3, 33, 64, 112)
    mean, inv_std = vdm.latents_mean.to(torch.bfloat16), (1 / vdm.latents_std).to(torch.bfloat16)
    with torch.no_grad():
        enc = lambda v: (vdm.vae.encode(v).latent_dist.mode() - mean) * inv_std
        dec = lambda z: vdm.vae.decode(z / inv_std + mean).sample
        ref_z = _diffsynth_tiled(enc, clip, (32, 48), (16, 24), 1 / 8)
        ref_x = _diffsynth_tiled(dec, ref_z, (4, 6), (2, 3), 8).clamp(-1, 1)
        z = vdm.encode_video(clip)
        x = vdm.decode(z)
        whole = enc(clip)
    assert z.shape == (1, 16, 9, 8, 14) and z.dtype == torch.bfloat16 and x.shape == clip.shape
    torch.testing.assert_close(z, ref_z, rtol=0, atol=0)
    torch.testing.assert_close(x, ref_x, rtol=0, atol=0)
    assert not torch.allclose(z.float(), whole.float(), atol=1e-2)  # the tiles change the latents
    # the release's pixel conversion: uint8 -> bf16, then / 127.5 - 1 in bf16 (DiffSynth multiplies by 2 / 255)
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16, 1).expand(1, 1, 16, 16, 3)
    assert torch.equal(data.to_tensor(u8, torch.bfloat16), (u8.movedim(-1, -4).to(torch.bfloat16) * (2 / 255) - 1))
    # and its output conversion: ((x + 1) * 127.5) in the video's dtype, truncated
    v = torch.linspace(-1, 1, 3 * 7 * 5 * 4).to(torch.bfloat16).reshape(3, 7, 5, 4)
    ref = ((v - (-1)) * (255 / 2)).clip(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(data.to_uint8(v, truncate=True), ref) and not np.array_equal(data.to_uint8(v), ref)
