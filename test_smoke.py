"""
The quick smoke suite: the models, the sampler, reference conditioning, loading the release's and
our checkpoints, and infer.py end to end, on tiny random models of the real classes, offline, on
a CPU. The rest is in tests/ by subject.

    python -m pytest -q                 # the quick suite (this file and tests/), under 5 minutes on 2 cores
    python -m pytest -q -m slow         # the long runs: training scripts end to end, the eval run, full size
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import model
from helpers import ROOT, H, W, T, gen, moving_clip, RELEASE_SYSTEM_PROMPT, RELEASE_NEGATIVE_PROMPT, diffusers_to_wan, official_lora_keys, dit_out, vlm_logits, randomize_lora, run_infer


def test_full_presets_parameter_counts():
    """The full presets are the hub models: their parameter counts on the meta device. Catches: a
    config that no longer matches Qwen2.5-VL-3B, Wan2.1-1.3B, its VAE or umT5-XXL (the official
    weights would not load)."""
    tok = model.byte_tokenizer()  # the token ids only matter for config fields, not for counts
    with torch.device("meta"):
        vlm = model.build_vlm_net("full", tok)
        dit, vae, text = model.build_vdm_nets("full")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(vlm) == 3_754_622_976
    assert count(dit) == 1_418_996_800
    assert count(vae) == 126_892_531
    assert count(text) == 5_680_910_336


def test_vlm_inputs_and_greedy_generation(tiny):
    """Catches: the paper's system prompt instead of the release's; the video presented at another
    frame rate than the release's processor assumed (2 fps: 1 s per temporal patch); the token types
    dropped (1-D RoPE); padding changing a batched answer."""
    vlm, _ = tiny
    frames = moving_clip(model.VLM_FRAMES)
    inp = vlm.inputs([frames], ["What happens next?"])
    # 3-D RoPE needs the token types and the time per temporal patch: 2 frames at the release's 2 fps = 1 s
    assert "mm_token_type_ids" in inp and inp["second_per_grid_ts"].tolist() == [1.0]
    t, h, w = inp["video_grid_thw"][0].tolist()
    assert t == model.VLM_FRAMES // 2
    n_video = (inp["input_ids"] == vlm.model.config.video_token_id).sum().item()
    assert n_video == t * h * w // 4  # 2x2 spatial merge
    # and the model uses them: without the token types it falls back to 1-D positions, and 1 fps
    # (2 s per patch) moves the video's temporal positions
    with torch.no_grad():
        logits = vlm.model(**inp).logits
        flat = vlm.model(**{k: v for k, v in inp.items() if k != "mm_token_type_ids"}).logits
        slow = vlm.model(**{**inp, "second_per_grid_ts": torch.tensor([2.0])}).logits
    assert not torch.allclose(logits, flat, atol=1e-4) and not torch.allclose(logits, slow, atol=1e-4)
    text = vlm.processor.tokenizer.decode(inp["input_ids"][0])
    assert text == (f"<|im_start|>system\n{RELEASE_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                    + "<|video_pad|>" * n_video + "<|vision_end|>What happens next?<|im_end|>\n<|im_start|>assistant\n")
    a = vlm.generate([frames, frames[::-1]], ["q1", "a longer question"], "greedy", max_new_tokens=12)
    b = vlm.generate([frames, frames[::-1]], ["q1", "a longer question"], "greedy", max_new_tokens=12)
    assert a == b and len(a) == 2
    # batched (left-padded) generation equals one-at-a-time generation
    assert vlm.generate([frames[::-1]], ["a longer question"], "greedy", max_new_tokens=12)[0] == a[1]


def test_caption_extraction():
    """The VDM's caption is the text inside [Ans]...[/Ans], or the whole output. Catches: the
    reasoning passed to the VDM, or an answer lost for want of tags."""
    out = "[Think]The block is on the left.[/Think][Ans] Put the red block on top. [/Ans]"
    assert model.caption_of(out) == "Put the red block on top."
    assert model.extract(out, "Think") == "The block is on the left."
    assert model.caption_of("  no tags here ") == "no tags here"
    assert model.extract("no tags", "Think") is None


def _pipeline(vdm):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    class Schedule(FlowMatchEulerDiscreteScheduler):  # the release's schedule: shifted linspace(1, 0, n + 1)[:-1]
        def set_timesteps(self, num_inference_steps, device=None, **kw):
            super().set_timesteps(sigmas=torch.linspace(1, 0, num_inference_steps + 1)[:-1].numpy(), device=device)

    return WanPipeline(tokenizer=vdm.tokenizer, text_encoder=vdm.text_encoder, vae=vdm.vae, transformer=vdm.dit,
                       scheduler=Schedule(shift=5.0))


def test_ode_sampler_reproduces_wan_pipeline_exactly(tiny):
    """With no references and CFG 1 the sampler is diffusers' WanPipeline bit for bit (same
    scheduler, seed). Catches: an off-by-one schedule, noise drawn differently, a wrong timestep
    scale."""
    _, vdm = tiny
    prompt = "a red ball bounces off the floor"
    ref = _pipeline(vdm)(prompt=prompt, num_frames=T, height=H, width=W, num_inference_steps=6, guidance_scale=1.0,
                         output_type="latent", generator=gen(3)).frames
    ours = vdm.sample(vdm.encode_text([prompt]), frames=T, height=H, width=W, steps=6, cfg=1.0, generator=gen(3))
    assert ours.shape == (1, 16, 9, H // 8, W // 8)
    assert torch.equal(ours, ref)
    # training runs the text encoder at the prompts' longest length, not 512: the same embeddings
    prompts = [prompt, "a blue square"]
    torch.testing.assert_close(vdm.encode_text(prompts, grad=True), vdm.encode_text(prompts), atol=1e-6, rtol=1e-5)


def test_cfg_matches_wan_pipeline(tiny):
    """CFG against diffusers' WanPipeline given the release's negative prompt. Catches: another
    negative prompt for the unconditional branch (e.g. diffusers' example text), a wrong guidance sum."""
    _, vdm = tiny
    prompt = "a blue square slides to the right"
    ref = _pipeline(vdm)(prompt=prompt, negative_prompt=RELEASE_NEGATIVE_PROMPT, num_frames=T, height=H, width=W,
                         num_inference_steps=5, guidance_scale=5.0, output_type="latent", generator=gen(1)).frames
    ours = vdm.sample(vdm.encode_text([prompt]), frames=T, height=H, width=W, steps=5, cfg=5.0, generator=gen(1))
    # our two branches run as one batch: equal up to float32 rounding
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, vdm.sample(vdm.encode_text([prompt]), frames=T, height=H, width=W, steps=5,
                                               cfg=1.0, generator=gen(1)), atol=1e-3)


def _flow_grpo_reference(v, x, s, s_next, a):
    """Flow-GRPO's step written in its own (expanded) form, for comparison."""
    std = a * math.sqrt(s / (1 - (s_next if s == 1 else s)))
    dt = s_next - s
    mean = x * (1 + std ** 2 / (2 * s) * dt) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * dt
    return mean, std * math.sqrt(-dt)


@pytest.mark.parametrize("s, s_next", [(1.0, 0.96), (0.7, 0.62), (0.2, 0.1)])
def test_sde_step(s, s_next):
    """Flow-GRPO's SDE step: its mean against the expanded formula, its log-prob against torch's
    Normal, its samples against that Gaussian, replay giving ratio 1. Catches: a wrong std or drift
    term, a log-density off by a constant or a sign."""
    g = gen(0)
    x, v = torch.randn(3, 16, 9, 4, 6, generator=g), torch.randn(3, 16, 9, 4, 6, generator=g)
    # noise level 0: the mean is the Euler step
    _, _, mean0, _ = model.sde_step_with_logprob(v, x, s, s_next, noise_level=0.0)
    torch.testing.assert_close(mean0, model.euler_step(v, x, s, s_next), rtol=0, atol=1e-6)
    # log-prob against an independent Gaussian log-density
    prev, logp, mean, std = model.sde_step_with_logprob(v, x, s, s_next, noise_level=0.7, generator=gen(1))
    ref_mean, ref_std = _flow_grpo_reference(v, x, s, s_next, 0.7)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    ref_logp = torch.distributions.Normal(ref_mean, ref_std).log_prob(prev).flatten(1).mean(1)
    assert logp.shape == (3,)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    # the sample is that Gaussian: standardised residuals have mean ~0, std ~1 (3 * 3456 draws)
    z = (prev - ref_mean) / ref_std
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    # replaying the transition scores it to the same log-prob: ratio exactly 1
    _, logp2, _, _ = model.sde_step_with_logprob(v, x, s, s_next, noise_level=0.7, prev_sample=prev)
    assert torch.equal(torch.exp(logp2 - logp), torch.ones(3))
    # per-sample sigmas give the same as scalars
    _, logp3, _, _ = model.sde_step_with_logprob(v, x, torch.full((3,), s), torch.full((3,), s_next), prev_sample=prev)
    torch.testing.assert_close(logp3, logp)


def test_sde_log_prob_has_gradient_through_velocity():
    """The log-prob's gradient through the velocity equals the closed form (x' - mean) / std^2 / N *
    dt (1 + std^2 (1 - s) / (2 s)). Catches: a detached velocity (no learning in stage 2) or a wrong
    chain rule."""
    s, s_next, a = 0.5, 0.4, 0.7
    x, v = torch.randn(2, 4, 3, 2, 2, generator=gen(1)), torch.randn(2, 4, 3, 2, 2, generator=gen(2)).requires_grad_()
    prev, _, _, _ = model.sde_step_with_logprob(v.detach(), x, s, s_next, a, generator=gen(0))
    _, logp, mean, step_std = model.sde_step_with_logprob(v, x, s, s_next, a, prev_sample=prev)
    logp.sum().backward()
    std, dt, n = a * math.sqrt(s / (1 - s)), s_next - s, x[0].numel()
    want = (prev - mean.detach()) / step_std ** 2 / n * dt * (1 + std ** 2 * (1 - s) / (2 * s))
    torch.testing.assert_close(v.grad, want, rtol=1e-4, atol=1e-7)


def test_reference_frames(tiny):
    """Reference conditioning: latents [0, 1, 3, 4, 6, 8] of the input's 9, clean in front of the
    noisy targets at every step, one timestep, and they change the output. Catches: other ref
    indices, refs that get noised, refs ignored."""
    _, vdm = tiny
    clip = moving_clip()
    lat = vdm.encode_video(data.to_tensor(clip)[None])
    assert lat.shape == (1, 16, 9, H // 8, W // 8)
    refs = vdm.ref_latents(lat)
    assert torch.equal(refs, lat[:, :, [0, 1, 3, 4, 6, 8]])
    # the VAE is causal in chunks of 1 + 4k frames: changing the last 4 frames changes only latent 8 = ref 5
    clip2 = clip.copy()
    clip2[29:] = 255 - clip2[29:]
    refs2 = vdm.ref_latents(vdm.encode_video(data.to_tensor(clip2)[None]))
    torch.testing.assert_close(refs2[:, :, :5], refs[:, :, :5], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(refs2[:, :, 5], refs[:, :, 5], atol=1e-3)

    # the DiT sees [refs, noisy targets] with clean refs and one timestep at every step
    seen = []
    hook = vdm.dit.register_forward_pre_hook(
        lambda m, args, kw: seen.append((kw["hidden_states"].clone(), kw["timestep"].clone())), with_kwargs=True)
    text = vdm.encode_text(["the square keeps sliding"])
    out = vdm.sample(text, refs=refs, frames=T, height=H, width=W, steps=4, cfg=1.0, generator=gen(0))
    hook.remove()
    assert out.shape == (1, 16, 9, H // 8, W // 8) and len(seen) == 4
    for hs, t in seen:
        assert hs.shape == (1, 16, 15, H // 8, W // 8) and t.shape == (1,)
        assert torch.equal(hs[:, :, :6], refs)
    # the refs matter, and the same refs give the same output
    again = vdm.sample(text, refs=refs, frames=T, height=H, width=W, steps=4, cfg=1.0, generator=gen(0))
    other = vdm.sample(text, refs=refs2, frames=T, height=H, width=W, steps=4, cfg=1.0, generator=gen(0))
    plain = vdm.sample(text, refs=None, frames=T, height=H, width=W, steps=4, cfg=1.0, generator=gen(0))
    assert torch.equal(out, again)
    assert not torch.allclose(out, other, atol=1e-4) and not torch.allclose(out, plain, atol=1e-4)


def test_vae_batches_match_one_video_at_a_time(tiny, monkeypatch):
    """The VAE takes at most one 352x640 video's latent pixels at once (model.vae_chunk); a batch,
    whole or in chunks, encodes and decodes as its videos do one at a time, to float rounding.
    Catches: videos of a batch mixed up or reordered."""
    _, vdm = tiny
    assert (model.vae_chunk(44, 80), model.vae_chunk(88, 160), model.vae_chunk(8, 14)) == (1, 1, 31)
    clips = torch.stack([data.to_tensor(moving_clip(seed=s, color=c)) for s, c in
                         ((0, (255, 60, 30)), (1, (30, 200, 60)), (2, (40, 60, 255)))])
    one = torch.cat([vdm.encode_video(c[None]) for c in clips])
    whole = vdm.encode_video(clips)
    assert one.shape == (3, 16, 9, H // 8, W // 8)
    torch.testing.assert_close(whole, one, rtol=1e-4, atol=1e-5)
    decoded = torch.cat([vdm.decode(z[None]) for z in one])
    torch.testing.assert_close(vdm.decode(one), decoded, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(model, "vae_chunk", lambda h, w: 2)  # chunks of 2, 1
    torch.testing.assert_close(vdm.encode_video(clips), one, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vdm.decode(one), decoded, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(one[0], one[1], atol=1e-3)  # the videos differ, so the order is checked too


@pytest.mark.parametrize("prefix, old_layout, adapter_name", [("mllmagent.mllm_backbone.", True, False),
                                                              ("pipe.mllm.mllm_backbone.", False, False),
                                                              ("pipe.mllm.mllm_backbone.", True, True)])
def test_official_checkpoint_round_trip(tmp_path, prefix, old_layout, adapter_name):
    """The last case is the layout the release's own loader needs:
    pipe.mllm.mllm_backbone.base_model.model.<pre-4.52 layout>.lora_{A,B}.default.weight. Catches: a
    layout whose keys load nothing (the release's own loader would drop them silently) or land in
    the wrong modules."""
    from safetensors.torch import save_file
    # a "trained" VANS: a different DiT and a random LoRA on the tiny VLM
    src_vlm, src_vdm = model.load_tiny(seed=0)
    torch.manual_seed(1)
    src_dit = model.build_vdm_nets("tiny")[0].eval()
    src_vlm.model = model.add_lora(src_vlm.model).eval()
    randomize_lora(src_vlm.model, 2)
    lora = {k: v for k, v in src_vlm.model.state_dict().items() if ".lora_" in k}
    assert any(".visual." in k and "gate_proj" in k for k in lora)  # peft matches the vision MLP too
    save_file(diffusers_to_wan(src_dit.state_dict()), str(tmp_path / "vdm.safetensors"))
    official = official_lora_keys(lora, prefix, old_layout, adapter_name)
    if adapter_name and old_layout:
        assert "pipe.mllm.mllm_backbone.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in official
        assert "pipe.mllm.mllm_backbone.base_model.model.visual.blocks.0.mlp.gate_proj.lora_B.default.weight" in official
    save_file(official, str(tmp_path / "vlm.safetensors"))

    vlm, vdm = model.load_tiny(seed=0)
    vdm.n_refs = 0
    assert not torch.equal(dit_out(vdm.dit), dit_out(src_dit))
    checkpoint.load_official(vlm, vdm, str(tmp_path))
    assert vdm.n_refs == 6
    assert torch.equal(dit_out(vdm.dit), dit_out(src_dit))
    assert torch.equal(vlm_logits(vlm), vlm_logits(src_vlm))
    # the VDM alone needs only its own file
    os.remove(tmp_path / "vlm.safetensors")
    _, vdm = checkpoint.load_official(None, model.load_tiny(seed=0, need=("vdm",))[1], str(tmp_path))
    assert torch.equal(dit_out(vdm.dit), dit_out(src_dit))


def test_official_checkpoint_mismatch_is_an_error():
    """A release checkpoint with a key missing or extra is one error naming it. Catches: the
    release's own silent partial load (it drops what does not match)."""
    vlm, vdm = model.load_tiny(seed=0)
    wan = diffusers_to_wan(vdm.dit.state_dict())
    missing = dict(wan)
    missing.pop("blocks.1.ffn.2.weight")
    with pytest.raises(checkpoint.CheckpointError, match=r"1 missing \(e\.g\. blocks\.1\.ffn\.net\.2\.weight\)"):
        checkpoint._load_strict(vdm.dit, checkpoint.wan_to_diffusers(missing), "vdm.safetensors")
    extra = {**wan, "blocks.0.extra_gate.weight": torch.zeros(2)}
    with pytest.raises(checkpoint.CheckpointError, match=r"1 unexpected \(e\.g\. blocks\.0\.extra_gate\.weight\)"):
        checkpoint._load_strict(vdm.dit, checkpoint.wan_to_diffusers(extra), "vdm.safetensors")

    peft_vlm = model.add_lora(vlm.model)
    lora = official_lora_keys({k: v for k, v in peft_vlm.state_dict().items() if ".lora_" in k})
    key = next(k for k in lora if "layers.1.mlp.up_proj.lora_B" in k)
    lora.pop(key)
    with pytest.raises(checkpoint.CheckpointError, match=r"1 missing \(e\.g\. .*layers\.1\.mlp\.up_proj\.lora_B"):
        checkpoint.load_vans_lora(peft_vlm, lora)
    lora[key.replace("up_proj", "side_proj")] = torch.zeros(1)
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected \(e\.g\. .*side_proj"):
        checkpoint.load_vans_lora(peft_vlm, lora)


def test_our_checkpoint_round_trip(tmp_path):
    """Our checkpoints: written atomically, loaded to the same outputs, and every way they can be
    broken (a LoRA key gone, a wrong shape, a cut file, bad meta, a missing model) is one error
    naming it. Catches: a silent partial load, a checkpoint completed with random weights."""
    vlm, vdm = model.load_tiny(seed=0)
    torch.manual_seed(4)
    vdm.dit = model.build_vdm_nets("tiny")[0].eval()
    vlm.model = model.add_lora(vlm.model).eval()
    randomize_lora(vlm.model, 3)
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), vlm, vdm, {"preset": "tiny", "step": 7})
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), vlm, vdm, {"preset": "tiny", "step": 7})  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    vlm2, vdm2 = checkpoint.load(str(tmp_path / "ckpt"))
    assert torch.equal(dit_out(vdm2.dit), dit_out(vdm.dit))
    assert torch.equal(vlm_logits(vlm2), vlm_logits(vlm))
    from safetensors.torch import load_file, save_file
    adapter = str(tmp_path / "ckpt" / "vlm_lora" / "adapter_model.safetensors")
    lora = load_file(adapter)
    save_file({k: v for k, v in lora.items() if "layers.0.self_attn.v_proj.lora_A" not in k}, adapter)
    with pytest.raises(checkpoint.CheckpointError, match=r"vlm_lora: .*1 missing \(e\.g\. .*layers\.0\.self_attn\.v_proj\.lora_A"):
        checkpoint.load(str(tmp_path / "ckpt"))
    save_file(lora, adapter)
    sd = load_file(str(tmp_path / "ckpt" / "dit.safetensors"))
    sd["proj_out.weight"] = sd["proj_out.weight"][:, :-1].contiguous()
    save_file(sd, str(tmp_path / "ckpt" / "dit.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=r"dit\.safetensors: .*1 of wrong shape \(e\.g\. proj_out\.weight"):
        checkpoint.load(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "dit.safetensors").write_bytes(b"\0" * 100)  # cut short
    with pytest.raises(checkpoint.CheckpointError, match=r"dit\.safetensors: not a readable safetensors file"):
        checkpoint.load(str(tmp_path / "ckpt"))
    meta = (tmp_path / "ckpt" / "meta.json").read_text()
    for bad, msg in (("{", r"meta\.json: not valid JSON"), ('{"preset": "big"}', r"meta\.json: 'preset' must be one of .*got 'big'")):
        (tmp_path / "ckpt" / "meta.json").write_text(bad)
        for load in (checkpoint.load, checkpoint.preset_of):
            with pytest.raises(checkpoint.CheckpointError, match=msg):
                load(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "meta.json").write_text(meta)
    # a checkpoint holding one model is not silently completed with random or base weights
    checkpoint.save_checkpoint(str(tmp_path / "vlm_only"), vlm, None, {"preset": "tiny"}, ("vlm", "vlm_lora"))
    assert checkpoint.load(str(tmp_path / "vlm_only"), need=("vlm",))[1] is None
    with pytest.raises(checkpoint.CheckpointError, match=r"vlm_only: has no VDM weights \(needs dit\+text_encoder\+vae\); "
                                                    r"it holds vlm, vlm_lora, vlm_tokenizer"):
        checkpoint.load(str(tmp_path / "vlm_only"))
    # checkpoint.pack: the VLM of one checkpoint and the VDM of another as one --model directory, no training state
    _, vdm_b = model.load_tiny(seed=1, need=("vdm",))
    checkpoint.save_checkpoint(str(tmp_path / "vdm_only"), None, vdm_b, {"preset": "tiny"}, extra={"train_state.pt": {}})
    checkpoint.pack(str(tmp_path / "packed"), str(tmp_path / "vlm_only"), str(tmp_path / "vdm_only"))
    vlm3, vdm3 = checkpoint.load(str(tmp_path / "packed"))
    assert torch.equal(vlm_logits(vlm3), vlm_logits(vlm)) and torch.equal(dit_out(vdm3.dit), dit_out(vdm_b.dit))
    assert not torch.equal(dit_out(vdm3.dit), dit_out(vdm.dit))
    assert "train_state.pt" not in os.listdir(tmp_path / "packed")
    with pytest.raises(checkpoint.CheckpointError, match=r"nowhere: not a VANS checkpoint directory"):
        checkpoint.pack(str(tmp_path / "p2"), str(tmp_path / "nowhere"), str(tmp_path / "vdm_only"))
    # pack --on: models that differ from a packed pair's in the VLM's LoRA and the DiT only (Joint-GRPO's
    # over SFT's) are written as those two parts and "from" the pair, and load as themselves
    vlm0, vdm0 = model.load_tiny(seed=0)
    checkpoint.save_checkpoint(str(tmp_path / "sft"), vlm0, vdm0, {"preset": "tiny"})
    checkpoint.save_checkpoint(str(tmp_path / "rl"), vlm, vdm, {"preset": "tiny"}, extra={"train_state.pt": {}})
    checkpoint.pack(str(tmp_path / "rl_packed"), str(tmp_path / "rl"), str(tmp_path / "rl"), on=str(tmp_path / "sft"))
    assert sorted(os.listdir(tmp_path / "rl_packed")) == ["dit.safetensors", "meta.json", "vlm_lora"]
    assert checkpoint.read_meta(str(tmp_path / "rl_packed"))["from"] == {"vlm": "../sft", "vdm": "../sft"}
    vlm4, vdm4 = checkpoint.load(str(tmp_path / "rl_packed"))
    assert torch.equal(vlm_logits(vlm4), vlm_logits(vlm)) and torch.equal(dit_out(vdm4.dit), dit_out(vdm.dit))
    assert not torch.equal(vlm_logits(vlm4), vlm_logits(vlm0))
    checkpoint.save_checkpoint(str(tmp_path / "other"), vlm0, vdm_b, {"preset": "tiny"})  # another VAE and text encoder
    with pytest.raises(checkpoint.CheckpointError, match=r"pack --on .*other: the VAE's weights are not the same as its \(only the VLM's LoRA"):
        checkpoint.pack(str(tmp_path / "p3"), str(tmp_path / "rl"), str(tmp_path / "rl"), on=str(tmp_path / "other"))
    with pytest.raises(checkpoint.CheckpointError, match=r"pack --on .*rl: its VLM has a LoRA"):
        checkpoint.pack(str(tmp_path / "p3"), str(tmp_path / "rl"), str(tmp_path / "rl"), on=str(tmp_path / "rl"))


@pytest.mark.parametrize("name", ["clip.mp4", "short.mp4", "two.mp4", "image.png"])
def test_infer_tiny_end_to_end(files, tmp_path, name):
    """The whole path on CPU for a 40-, 10- and 2-frame clip and an image (short clips are held to
    33 frames). Catches: a short clip or an image refused, or an answer of another size."""
    out = tmp_path / "answer.mp4"
    r = run_infer(files / name, "What happens next?", "--model", "tiny", "--height", H, "--width", W,
                  "--max-new-tokens", 16, "--out", out, "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res) == {"think", "caption", "completion", "output", "timings"} and res["output"] == str(out)
    want, _ = tiny_answer(files, "--max-new-tokens", "16", name=name, question="What happens next?")
    assert (res["completion"], res["caption"], res["think"]) == (want["completion"], want["caption"], want["think"])
    assert list(res["timings"]) == ["read", "vlm", "encode", "dit", "vae", "total"] and res["timings"]["total"] > 0
    video = data.read_frames(str(out))
    assert video.shape == (T, H, W, 3)


def tiny_answer(files, *flags, name="clip.mp4", question="q"):
    """infer.py's path in this process on the tiny models, with extra flags -> (its answer, its VDM)."""
    import infer
    args = infer.parser.parse_args([str(files / name), question, "--model", "tiny", "--height", str(H), "--width",
                                    str(W), "--max-new-tokens", "8", "--steps", "2", "--device", "cpu", *flags])
    infer.settle_flags(args)
    vlm, vdm = infer.load_models(args)
    torch.manual_seed(0)
    (out,), _ = infer.answer(vlm, vdm, [args.video], [args.question], args, torch.Generator().manual_seed(0))
    return out, vdm


def test_offload_and_the_cached_negative_prompt_change_nothing(files):
    """--offload (the VLM and the text encoder on the device only while they run) gives the same
    caption and video; the negative prompt is encoded once and kept, and encoded again when the text
    encoder changes dtype. Catches: --offload's path failing or changing the answer (on a CPU it
    moves nothing: test_cuda_loading_and_the_vlm_in_bf16 is where placement is seen), a cached
    embedding that differs from encoding the prompt, or one kept for another encoder."""
    plain, _ = tiny_answer(files)
    offload, vdm = tiny_answer(files, "--offload")
    assert plain["caption"] == offload["caption"] and (plain["video"] == offload["video"]).all()
    neg = vdm.negative_text(3)
    assert neg.shape[0] == 3 and torch.equal(neg[2], vdm.encode_text([vdm.negative_prompt])[0])
    assert vdm.negative_text(1).data_ptr() == neg.data_ptr()  # kept, not encoded again
    vdm.text_encoder.to(torch.bfloat16)
    again = vdm.negative_text(1)
    assert again.data_ptr() != neg.data_ptr() and torch.equal(again, vdm.encode_text([vdm.negative_prompt]))


@pytest.mark.slow
def test_compile_and_attention_backends_keep_the_answer(files, tmp_path):
    """--compile (torch.compile of the DiT's blocks) and --attention (a diffusers attention backend;
    PyTorch's math kernel here) give the plain path's video to within one level of 255; a backend
    that cannot run is one error line. Catches: a compiled graph or a kernel that computes
    something else, a missing flash-attn found mid-answer."""
    videos = []
    try:
        for extra in ([], ["--compile"], ["--attention", "_native_math"]):
            out, vdm = tiny_answer(files, *extra)
            videos.append(out["video"].astype(int))
    finally:
        vdm.dit.set_attention_backend("native")  # (it is also diffusers' process-wide default)
    assert all(abs(v - videos[0]).max() <= 1 for v in videos[1:])
    if importlib.util.find_spec("flash_attn") is None:
        r = run_infer(files / "clip.mp4", "q", "--model", "tiny", "--attention", "flash", "--out", tmp_path / "a.mp4")
        assert r.returncode == 1 and re.fullmatch(r"error: --attention flash: .*flash.*", r.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["missing.mp4", "notvideo.mp4", "truncated.mp4"])
def test_infer_bad_input_one_line(files, name):
    """A missing, non-video or truncated input is one error line naming the file. Catches: a
    traceback."""
    r = run_infer(files / name, "What next?", "--model", "tiny")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], r.stderr


def test_infer_checks_its_input_before_torch(files, tmp_path, no_torch):
    """A wrong input, an empty question, an unusable --out or --model is one error line, before torch is
    imported (so within a second) and before anything is written. Catches: a check done after the
    models load, a traceback, a junk answer for a frame nothing can be read from, a silently created
    directory."""
    from PIL import Image
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (5001, 37)).save(tmp_path / "strip.png")
    (tmp_path / "out_dir").mkdir()
    clip = files / "clip.mp4"
    cases = [([files / "missing.mp4", "q"], "missing.mp4: no such file"),
             ([tmp_path / "dot.png", "q"], "dot.png: frames of 1x1 pixels; need at least 28 a side"),
             ([tmp_path / "strip.png", "q"], "strip.png: frames of 5001x37 pixels; need at least 28 a side and at most 4:1"),
             ([clip, "   "], "the question is empty"),
             ([clip, "q", "--out", tmp_path / "out_dir"], "out_dir: is a directory"),
             ([clip, "q", "--out", tmp_path / "answer.txt"], "answer.txt: the answer is a video"),
             ([clip, "q", "--out", tmp_path / "no" / "where" / "a.mp4"], "no such directory"),
             ([clip, "q", "--model", tmp_path / "nothere"], f"--model {tmp_path / 'nothere'}: no such checkpoint "
              "directory (nor one of vans, base, shapes, shapes-sft, tiny, random:PRESET)")]
    for argv, msg in cases:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--model", "tiny", *map(str, argv)],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(no_torch)})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (argv, r.stderr)
    assert sorted(os.listdir(tmp_path)) == ["dot.png", "out_dir", "strip.png"]  # nothing written, no directory made
    # the device is checked once torch is there, still before any weight is read
    if not torch.cuda.is_available():
        r = run_infer(clip, "q", "--model", "tiny", "--device", "cuda")
        assert r.returncode == 1 and r.stderr.strip() == "error: --device cuda: no CUDA GPU is available here (use --device cpu)"


def test_infer_official_weights_offline_fail_fast(files, tmp_path):
    """Offline without the weights, --model vans stops at once with one line naming every missing
    repository and the flags that point at local copies. Catches: minutes of hub retries, a
    traceback."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), str(files / "clip.mp4"), "q"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    for repo in checkpoint.HUB.values():
        assert repo in lines[0]
    assert "--vans" in lines[0] and "--qwen" in lines[0] and "--wan" in lines[0]


def test_infer_defaults_follow_the_model(tmp_path):
    """Unset generation flags come from the model: the release's decoding and reference clip for the
    paper-size presets, the Shapes models' own, and the reference clip a checkpoint's VDM run records.
    Catches: a default that silently differs from what the weights were trained or released with."""
    import infer

    def settled(*argv):
        args = infer.parser.parse_args(["in.mp4", "q", *argv])
        infer.settle_flags(args)
        return args.decoding, args.ref_clip, args.precision, args.steps

    assert set(infer.DECODINGS) == set(model.DECODING)  # infer names them before importing model
    assert settled("--model", "tiny", "--device", "cpu") == ("release", "first", "fp32", 50)
    with pytest.MonkeyPatch.context() as mp:  # on a GPU, here or not: the release's numerics for its own models
        mp.setattr(torch.cuda, "is_available", lambda: True)
        assert settled("--model", "vans") == ("release", "first", "release", 50)
        assert settled("--model", "shapes")[2] == "fp32"  # small models load in float32
    assert settled("--model", "shapes", "--device", "cpu") == ("sample", "uniform", "fp32", 20)
    assert settled("--model", "shapes", "--decoding", "greedy", "--ref-clip", "last") == ("greedy", "last", "fp32", 20)
    _, vdm = model.load_tiny(need=("vdm",))
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), None, vdm, {"preset": "tiny", "flags": {"ref_clip": "uniform"}})
    assert settled("--model", "tiny", "--vdm", str(tmp_path / "ckpt"))[1] == "uniform"
    assert settled("--model", str(tmp_path / "ckpt"), "--ref-clip", "first")[1] == "first"
    # packed, the VDM's reference clip goes with it
    vlm, _ = model.load_tiny(need=("vlm",))
    checkpoint.save_checkpoint(str(tmp_path / "vlm"), vlm, None, {"preset": "tiny"}, ("vlm",))
    checkpoint.pack(str(tmp_path / "packed"), str(tmp_path / "vlm"), str(tmp_path / "ckpt"))
    assert settled("--model", str(tmp_path / "packed"))[1] == "uniform"


@pytest.mark.slow
def test_infer_tiny_at_paper_size(files, tmp_path):
    """The default output size, 33 x 352 x 640 at 11 fps (tiny models: ~1 min for the VAE on 2
    cores). Catches: a path that only works at the test size."""
    out = tmp_path / "answer.mp4"
    r = run_infer(files / "clip.mp4", "What happens next?", "--model", "tiny", "--max-new-tokens", 8,
                  "--steps", 2, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    want, _ = tiny_answer(files, question="What happens next?")  # the answer does not depend on the video's size
    assert r.stdout.startswith(f"[Think] {want['think'] or ''}\n[Ans] {want['caption']}\n-> {out}  "), r.stdout
    import decord
    vr = decord.VideoReader(str(out))
    assert len(vr) == 33 and vr[0].shape == (352, 640, 3) and round(vr.get_avg_fps()) == 11


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_sampler_close_to_cpu_fp32(tiny):
    """On a GPU, the bf16 DiT samples what the float32 CPU DiT does, to bf16 tolerance. Catches: a
    CUDA-only path that diverges."""
    _, vdm = tiny
    text = vdm.encode_text(["a green ball rolls"])
    cpu = vdm.sample(text, frames=T, height=H, width=W, steps=4, cfg=5.0, generator=gen(0))
    vdm.dit.to("cuda", torch.bfloat16)
    vdm.text_encoder.to("cuda")
    try:
        gpu = vdm.sample(vdm.encode_text(["a green ball rolls"]), frames=T, height=H, width=W, steps=4, cfg=5.0,
                         generator=gen(0))
    finally:
        vdm.dit.to("cpu", torch.float32)
        vdm.text_encoder.to("cpu")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0.05, atol=0.05)
