"""The training scripts: their losses against direct formulas, and their runs (DDP, FSDP2, exact resume)."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import data
import model
import rewards
import shapes
from helpers import ROOT, H, W, T, gen, moving_clip, run_infer, train, logged, same_weights


def test_settings_record_and_resumed_weights(tmp_path):
    """made_by.json / cache.json refuse other settings naming what differs; resumed weights must
    match the model key for key. Catches: outputs of two settings mixed in one directory, a silent
    partial resume."""
    import common
    from safetensors.torch import save_file
    record = str(tmp_path / "made_by.json")
    common.same_settings(record, {"model": "a", "size": (32, 64)})  # the first run writes it
    common.same_settings(record, {"model": "a", "size": [32, 64]})  # the same settings, as JSON
    with pytest.raises(SystemExit, match=r"^error: .* holds files made with other settings \(model 'a' there, 'b' now\); "
                                         r"delete it or change --out$"):
        common.same_settings(record, {"model": "b", "size": (32, 64)})  # names the flag that differs, not all of them
    with pytest.raises(SystemExit, match=r"other settings \(seed None there, 1 now; size \[32, 64\] there, \[8, 8\] now\)"):
        common.same_settings(record, {"model": "a", "size": (8, 8), "seed": 1})
    (tmp_path / "made_by.json").write_text("{")
    with pytest.raises(SystemExit, match=r"made_by\.json: not JSON"):
        common.same_settings(record, {"model": "a", "size": (32, 64)})
    assert sorted(os.listdir(tmp_path)) == ["made_by.json"]  # no temporary file left
    # weights read back on --resume must be the model's own, key for key and shape for shape
    lin, path = torch.nn.Linear(2, 3), str(tmp_path / "w.safetensors")
    save_file(lin.state_dict(), path)
    sd = common.read_weights(path, lin.state_dict())
    assert sd.keys() == lin.state_dict().keys() and all(torch.equal(sd[k], v) for k, v in lin.state_dict().items())
    with pytest.raises(SystemExit, match=r"^error: .*w\.safetensors: keys do not match the model: 2 of wrong shape"):
        common.read_weights(path, torch.nn.Linear(2, 4).state_dict())
    with pytest.raises(SystemExit, match=r"^error: .*w\.safetensors: keys do not match the model: 1 missing \(e\.g\. b2\)$"):
        common.read_weights(path, lin.state_dict() | {"b2": torch.zeros(1)})
    with pytest.raises(SystemExit, match=r"^error: .*gone\.safetensors: not a readable safetensors file"):
        common.read_weights(str(tmp_path / "gone.safetensors"), lin.state_dict())


def test_config_presets(tmp_path):
    """--config presets set defaults that the command line overrides, unknown flags are refused, and
    the shipped presets name only real flags. Catches: a preset that silently sets nothing."""
    import argparse
    import common
    cfg = tmp_path / "c.py"
    cfg.write_text("a = dict(steps=7, lr=0.5)\nb = dict(steps=9, nope=1)\n")
    def parse(argv):
        p = argparse.ArgumentParser()
        common.add_run_flags(p, out="o", steps=100)
        return common.parse_flags(p, "a", argv)
    args = parse(["--out", "o", "--config", str(cfg)])
    assert (args.steps, args.lr, args.warmup) == (7, 0.5, 0)
    assert parse([]).steps == 100
    assert parse(["--out", "o", "--config", str(cfg), "--lr", "0.1"]).lr == 0.1  # the command line wins
    with pytest.raises(SystemExit):
        parse(["--out", "o", "--config", f"{cfg}:b"])  # unknown flag in the preset
    for name in ("shapes", "paper"):  # the shipped presets name only real flags
        path = os.path.join(ROOT, "config", f"{name}.py")
        presets = __import__("runpy").run_path(path)
        scripts = ("sft_vlm", "sft_vdm", "grpo_stage1", "grpo_stage2")
        assert {"sft_vlm", "sft_vdm", "grpo_stage1"} <= set(presets)
        for script, preset in [(k, v) for k, v in presets.items() if k in scripts]:
            src = open(os.path.join(ROOT, script + ".py")).read()
            for flag in preset:
                assert f'"--{flag.replace("_", "-")}"' in src or f'"--{flag.replace("_", "-")}"' in \
                    open(os.path.join(ROOT, "common.py")).read(), (name, script, flag)


def test_sft_labels_are_the_answer_tokens(tiny):
    """SFT labels are the answer and its <|im_end|>, with the prompt, video and left padding masked.
    Catches: training on the prompt, or losing the end token (the model would never stop)."""
    vlm, _ = tiny
    answers = ["[Think]a b[/Think][Ans]red[/Ans]", "[Think]longer reasoning here[/Think][Ans]blue ball[/Ans]"]
    videos = [moving_clip(6, 56, 56, seed=s) for s in range(2)]
    inp = vlm.inputs(videos, ["What next?", "And now, what happens?"], answers)
    tok = vlm.processor.tokenizer
    for row, labels, a in zip(inp["input_ids"], inp["labels"], answers):
        assert tok.decode(labels[labels != -100]) == a + "<|im_end|>"
        assert (labels[:-1] == -100).sum() > 0 and labels[-1] != -100  # prompt masked, the end kept (left padding)


@pytest.mark.slow
def test_sft_vlm_torchrun_loss_decreases(shapes_small, tmp_path):
    """sft_vlm under 2-rank DDP, every weight trained: the loss falls, the ranks end equal, and the final
    validation's caption scores are those of the saved model's greedy captions of val[0] (rank 0) and
    val[1] (rank 1), averaged over the ranks. Catches: unsynchronised ranks, a rank's scores left out of
    the mean, validation run on other weights than the ones saved."""
    flags = ["--model", "tiny", "--finetune", "full", "--train", str(shapes_small / "train.jsonl"),
             "--val", str(shapes_small / "val.jsonl"), "--steps", "24", "--batch-size", "2", "--lr", "2e-3",
             "--warmup", "2", "--log-every", "4", "--val-loss-samples", "4", "--val-generate", "2",
             "--max-new-tokens", "16", "--metrics", "shapes:metrics"]
    r = train("sft_vlm.py", flags, tmp_path / "run", nproc=2)
    assert "weights identical on all 2 ranks" in r.stdout
    loss = logged(tmp_path / "run")
    assert len(loss) == 6 and loss[-1] < 0.8 * loss[0], loss
    val = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl") if "val/loss" in l][-1]
    assert val["val/loss"] < loss[0]
    vlm, vdm = checkpoint.load(str(tmp_path / "run" / "last"), need=("vlm",))  # the checkpoint is a --model
    assert vdm is None and not hasattr(vlm.model, "peft_config")
    samples, _ = data.read_manifest(str(shapes_small / "val.jsonl"))
    outs = vlm.generate([data.read_vlm_frames(s["input_video"]) for s in samples[:2]], [s["question"] for s in samples[:2]],
                        "greedy", max_new_tokens=16)
    want = {"val/format_reward": [rewards.format_reward(o) for o in outs],
            "val/rouge_l": [rewards.rouge_l(model.caption_of(o), s["caption"]) for o, s in zip(outs, samples)],
            "val/event_caption": [float(shapes.caption_event(model.caption_of(o), s["event"])) for o, s in zip(outs, samples)],
            "val/specific_caption": [float(shapes.caption_specific(model.caption_of(o), s["event"])) for o, s in zip(outs, samples)]}
    for k, v in want.items():
        assert val[k] == pytest.approx(sum(v) / 2, abs=1e-6), (k, val[k], v, outs)


@pytest.mark.slow
def test_sft_vlm_lora_exact_resume(shapes_small, tmp_path):
    """sft_vlm with LoRA: N steps straight equal N/2 + resume + N/2 bit for bit, with a log row cut
    by a kill dropped, a save cut between its renames recovered and the skipped count carried on.
    Catches: a resume that loses RNG, optimizer or data position."""
    flags = ["--model", "tiny", "--train", str(shapes_small / "train.jsonl"), "--steps", "8", "--batch-size", "2",
             "--lr", "1e-3", "--warmup", "2"]
    train("sft_vlm.py", flags, tmp_path / "straight")
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # an earlier run's: a fresh run drops it
    train("sft_vlm.py", flags + ["--stop-at", "4"], tmp_path / "split")
    assert json.load(open(tmp_path / "split" / "last" / "meta.json"))["step"] == 4
    state = torch.load(tmp_path / "split" / "last" / "train_state.pt", weights_only=True)
    assert state["skipped"] == 0
    state["skipped"] = 3  # as if 3 clips had failed to decode before the cut
    torch.save(state, tmp_path / "split" / "last" / "train_state.pt")
    with open(tmp_path / "split" / "log.jsonl", "a") as f:  # a run killed after step 4's checkpoint left steps 5-6
        f.write('{"step": 5, "loss": 9.0}\n{"step": 6, "lo')
    os.rename(tmp_path / "split" / "last", tmp_path / "split" / "last.old")  # and its next save, between the renames
    train("sft_vlm.py", flags + ["--resume"], tmp_path / "split")
    same_weights(tmp_path / "straight" / "last", tmp_path / "split" / "last")
    by_step = lambda out: {r["step"]: r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r}
    straight, split = by_step(tmp_path / "straight"), by_step(tmp_path / "split")
    assert straight == {8: straight[8]} and split == {4: split[4], 8: straight[8]}  # the stop at 4 logs its step too
    assert logged(tmp_path / "straight", "skipped") == [0] and logged(tmp_path / "split", "skipped") == [0, 3]  # carried on
    vlm, _ = checkpoint.load(str(tmp_path / "split" / "last"), need=("vlm",))  # peft's own adapter format
    assert "vlm_lora" in json.load(open(tmp_path / "split" / "last" / "meta.json"))["parts"]
    assert type(vlm.model).__name__ == "PeftModel"


@pytest.mark.slow
def test_sft_vlm_bad_manifest(shapes_small, tmp_path):
    """sft_vlm with a bad manifest line or a broken --model: one error line; --skip-bad counts and
    goes on. Catches: a traceback, a silent skip."""
    good = json.loads(open(shapes_small / "train.jsonl").readline())
    m = shapes_small / "bad.jsonl"
    m.write_text(json.dumps(good) + "\n" + json.dumps({**good, "input_video": "nope.mp4"}) + "\n")
    flags = ["--model", "tiny", "--train", str(m), "--steps", "1"]
    r = train("sft_vlm.py", flags, tmp_path / "a", check=False)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == \
        f"error: {m}:2: input_video 'nope.mp4' does not exist"
    r = train("sft_vlm.py", flags + ["--skip-bad"], tmp_path / "b")
    assert "train: 1 samples, 1 skipped" in r.stdout
    # a broken checkpoint as --model: one error line, from a training script and from infer.py
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "meta.json").write_text('{"preset": "big"}')
    r = train("sft_vlm.py", ["--model", str(tmp_path / "ckpt"), "--train", str(m), "--skip-bad"], tmp_path / "c", check=False)
    r2 = run_infer(shapes_small / good["input_video"], "q", "--model", str(tmp_path / "ckpt"))
    for r in (r, r2):
        assert r.returncode != 0 and re.fullmatch(r"error: .*ckpt/meta\.json: 'preset' must be one of .*, got 'big'",
                                                  r.stderr.strip().splitlines()[-1])
    assert len(r2.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_shapes_train_vae_learns_and_normalises(shapes_small, tmp_path):
    """shapes.py train-vae: the loss falls (2 ranks, gradients averaged by hand), the stored
    statistics normalise its latents, and from random weights it is a per-frame autoencoder.
    Catches: unsynchronised VAE weights, latents off scale for the DiT, time kernels that mix
    frames."""
    flags = ["--train", str(shapes_small / "train.jsonl"), "--val", "", "--frames", "9", "--height", "32", "--width", "64",
             "--steps", "12", "--batch-size", "1", "--lr", "3e-3", "--log-every", "3", "--fg-weight", "10"]
    r = train("shapes.py train-vae", flags, tmp_path / "vae", nproc=2)  # the VAE's gradients averaged by hand
    assert "weights identical on all 2 ranks" in r.stdout
    loss = logged(tmp_path / "vae")
    assert loss[-1] < 0.7 * loss[0], loss
    _, vdm = checkpoint.load(str(tmp_path / "vae" / "last"), need=("vdm",))
    samples, _ = data.read_manifest(str(shapes_small / "train.jsonl"))
    z = torch.cat([vdm.encode_video(data.to_tensor(data.load_clip(s["target_video"], 9, 32, 64))[None]) for s in samples])
    # the stored statistics normalise the trained VAE's latents (measured on these 16 clips)
    z = z.transpose(0, 1).flatten(1)
    assert z.mean(1).abs().max() < 1e-3 and (z.std(1) - 1).abs().max() < 0.01
    # trained from random weights on single frames, the VAE is a per-frame one (shapes.keyframe_init):
    # latent frame 2 of a 9-frame clip is frame 8's alone, and decodes to 4 copies of its decoding
    clip = data.to_tensor(data.load_clip(samples[0]["target_video"], 9, 32, 64))[None]
    with torch.no_grad():
        z = vdm.vae.encode(clip).latent_dist.mode()
        z8 = vdm.vae.encode(clip[:, :, 8:]).latent_dist.mode()
        torch.testing.assert_close(z[:, :, 2:], z8, atol=1e-5, rtol=1e-4)
        rec, rec8 = vdm.vae.decode(z).sample, vdm.vae.decode(z8).sample
    torch.testing.assert_close(rec[:, :, 5:], rec8.expand(-1, -1, 4, -1, -1), atol=1e-5, rtol=1e-4)
    assert (z[:, :, 1] - z[:, :, 2]).abs().max() > 0.01  # the chunk before is another frame's


@pytest.mark.slow
def test_sft_vdm_torchrun_ddp_loss_decreases(shapes_small, tiny_vdm_ckpt, tmp_path):
    """sft_vdm under 2-rank DDP with the text encoder trained: the loss falls, the ranks end equal,
    one render per rank, and the checkpoint is a --model with references. Catches: unsynchronised
    ranks, a DiT that does not learn."""
    flags = ["--model", str(tiny_vdm_ckpt), "--train", str(shapes_small / "train.jsonl"),
             "--val", str(shapes_small / "val.jsonl"), "--frames", "9", "--height", "32", "--width", "64",
             "--steps", "24", "--batch-size", "2", "--lr", "2e-3", "--warmup", "2", "--log-every", "4",
             "--train-text-encoder", "--caption-dropout", "0.2", "--val-loss-samples", "4", "--val-render", "1",
             "--val-steps", "2", "--val-every", "8", "--metrics", "shapes:metrics"]
    r = train("sft_vdm.py", flags, tmp_path / "run", nproc=2)
    assert "weights identical on all 2 ranks" in r.stdout
    assert len(logged(tmp_path / "run")) == 6
    # the validation loss (fixed samples, noise and timesteps) falls (measured 1.089, 1.015, 1.009 at steps
    # 8, 16, 24); a step's own loss, at its own random timestep, is too noisy to say
    val = logged(tmp_path / "run", "val/loss")
    assert len(val) == 3 and val[0] > val[1] > val[2] and val[-1] < 0.97 * val[0], val
    # each render is checked by --metrics: does it show the event
    shows = logged(tmp_path / "run", "val/event_video")
    assert len(shows) == 3 and all(a in (0.0, 0.5, 1.0) for a in shows), shows  # one render per rank
    assert len(os.listdir(tmp_path / "run" / "samples")) == 2 * 3  # one rendered sample per rank and validation
    _, vdm = checkpoint.load(str(tmp_path / "run" / "last"), need=("vdm",))
    assert vdm.n_refs == model.N_REFS


@pytest.mark.slow
def test_sft_vdm_fsdp_cache_ema_exact_resume(shapes_small, tiny_vdm_ckpt, tmp_path):
    """sft_vdm under FSDP2 with cached latents, EMA and caption dropout: straight equals split +
    resume bit for bit, and the checkpoint's DiT is the average. Catches: a resume that loses the
    EMA or the dropout stream, a latent cache rebuilt per run."""
    flags = ["--model", str(tiny_vdm_ckpt), "--train", str(shapes_small / "train.jsonl"), "--frames", "9",
             "--height", "32", "--width", "64", "--steps", "6", "--batch-size", "2", "--lr", "2e-3",
             "--warmup", "2", "--fsdp", "--cache-latents", "--ema", "0.5", "--caption-dropout", "0.3"]
    r = train("sft_vdm.py", flags, tmp_path / "straight", nproc=2)
    assert "FSDP2" in r.stdout and "weights identical on all 2 ranks" in r.stdout
    train("sft_vdm.py", flags + ["--stop-at", "3"], tmp_path / "split", nproc=2)
    train("sft_vdm.py", flags + ["--resume"], tmp_path / "split", nproc=2)
    same_weights(tmp_path / "straight" / "last", tmp_path / "split" / "last")
    from safetensors.torch import load_file
    ema, raw = (load_file(tmp_path / "split" / "last" / f) for f in ("dit.safetensors", "dit_raw.safetensors"))
    assert not all(torch.equal(ema[k], raw[k]) for k in ema)  # the checkpoint's DiT is the average
    assert len(os.listdir(tmp_path / "split" / "cache")) == 16 + 1  # 16 samples + cache.json


def test_grpo_loss_against_direct_formula():
    """The clipped surrogate + k3 KL against a per-token loop, per sequence and per token, and
    micro-batches summing to the whole. Catches: a sign error, the clip applied the wrong way, the
    KL estimator k1 for k3."""
    from rewards import grpo_loss
    torch.manual_seed(0)
    B, L, eps, beta = 4, 6, 0.2, 0.1
    logp, old, ref = (torch.randn(B, L) * 0.3 - 2 for _ in range(3))
    adv = torch.tensor([1.5, -0.7, 0.0, 2.0])
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5]).bool()
    per_seq, tokens, kls, clipped = [], [], [], []
    for b in range(B):
        seq = []
        for t in range(L):
            if not mask[b, t]:
                continue
            rho = math.exp(logp[b, t] - old[b, t])
            A = float(adv[b])
            surrogate = -min(rho * A, min(max(rho, 1 - eps), 1 + eps) * A)
            d = float(ref[b, t] - logp[b, t])
            k3 = math.exp(d) - d - 1
            seq.append(surrogate + beta * k3)
            kls.append(k3)
            clipped.append((rho > 1 + eps and A > 0) or (rho < 1 - eps and A < 0))
        per_seq.append(sum(seq) / len(seq))
        tokens += seq
    loss, st = grpo_loss(logp, old, ref, adv, mask, eps, beta, "sequence")
    assert loss.item() == pytest.approx(sum(per_seq) / B, rel=1e-5)
    assert st["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-5)
    assert st["clip_ratio"] == pytest.approx(sum(clipped) / len(clipped)) and 0 < st["clip_ratio"] < 1
    loss, _ = grpo_loss(logp, old, ref, adv, mask, eps, beta, "token")
    assert loss.item() == pytest.approx(sum(tokens) / len(tokens), rel=1e-5)
    # micro-batches with the whole batch's norm add up to the whole
    halves = [grpo_loss(logp[i:i + 2], old[i:i + 2], ref[i:i + 2], adv[i:i + 2], mask[i:i + 2], eps, beta,
                        "sequence", norm=B)[0] for i in (0, 2)]
    assert (halves[0] + halves[1]).item() == pytest.approx(sum(per_seq) / B, rel=1e-5)


def _rollout(vlm, n=4, seed=0, **kw):
    torch.manual_seed(seed)
    videos = [moving_clip(6, 56, 56, seed=s // 2) for s in range(n)]  # pairs share a video: two groups of 2
    return vlm.rollout(videos, ["What next?"] * n, kw.get("max_new_tokens", 10),
                       **model.sampling(kw.get("temperature", 1.0), top_p=1.0))


def test_rollout_log_probs_are_the_sampling_distribution(tiny):
    """The log-probs GRPO scores are those of the distribution the completion was sampled from
    (logits / T), replayed from generate's own scores. Catches: log-probs at another temperature,
    off by one position, vision tokens not excluded."""
    vlm, _ = tiny
    inp, texts = _rollout(vlm, temperature=0.7)
    mask = inp["completion_mask"]
    # replay generation step by step: the sampling distribution of each token is softmax(logits / T)
    torch.manual_seed(0)
    gen_inp = vlm.inputs([moving_clip(6, 56, 56, seed=s // 2) for s in range(4)], ["What next?"] * 4)
    assert mask.shape == (4, inp["input_ids"].shape[1] - gen_inp["input_ids"].shape[1])  # the completion's positions
    assert mask[:, 0].all() and not (mask[:, 1:] & ~mask[:, :-1]).any()  # each row's mask is a prefix
    out = vlm.model.generate(**gen_inp, do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=10,
                             repetition_penalty=1.0, output_scores=True, return_dict_in_generate=True,
                             suppress_tokens=vlm.processor.tokenizer.convert_tokens_to_ids(model.QWEN_SPECIAL[3:]),
                             eos_token_id=vlm.processor.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]),
                             pad_token_id=vlm.processor.tokenizer.pad_token_id)
    assert torch.equal(out.sequences, inp["input_ids"])
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, inp["input_ids"][:, -mask.shape[1]:, None])[..., 0]
    with torch.no_grad():
        lp = vlm.completion_logprobs(inp, temperature=0.7)
    assert torch.allclose(lp[mask], sampled[mask], atol=1e-4)
    assert all(t == vlm.processor.tokenizer.decode(ids[m], skip_special_tokens=True)
               for t, ids, m in zip(texts, inp["input_ids"][:, -mask.shape[1]:], mask))


def test_grpo_ratio_one_kl_zero_and_equal_rewards_no_gradient():
    """With a fresh adapter the ratio is exactly 1 and the KL 0, and equal rewards within every
    group give no gradient at all. Catches: a ratio that is not 1 at the first update, advantages
    that leak between groups."""
    from rewards import group_advantages, grpo_loss
    vlm, _ = model.load_tiny(need=("vlm",))
    vlm.model = model.add_lora(vlm.model)  # a fresh adapter: the policy equals the reference
    for m in vlm.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    inp, _ = _rollout(vlm)
    mask = inp["completion_mask"]
    with torch.no_grad():
        old = vlm.completion_logprobs(inp)
        with vlm.model.disable_adapter():
            ref = vlm.completion_logprobs(inp)
    vlm.model.train()
    lora = [p for n, p in vlm.model.named_parameters() if ".lora_B" in n]
    for r, zero in ((torch.tensor([0.3, 0.3, 1.0, 1.0]), True), (torch.tensor([0.1, 0.9, 0.5, 0.2]), False)):
        logp = vlm.completion_logprobs(inp)
        assert torch.equal(logp, old) and torch.equal(logp, ref)  # ratio exactly 1
        loss, st = grpo_loss(logp, old, ref, group_advantages(r, 2), mask)
        assert st["kl"] == 0 and st["clip_ratio"] == 0
        vlm.model.zero_grad()
        loss.backward()
        g = sum(p.grad.abs().sum() for p in lora)
        assert (g == 0) == zero, (r, g)  # equal rewards in every group: no gradient at all


def _grpo_flags(shapes, extra):
    return ["--init", "tiny", "--vdm", "tiny", "--train", str(shapes / "train.jsonl"), "--frames", "5",
            "--height", "32", "--width", "64", "--render-steps", "2", "--max-new-tokens", "8", "--log-every", "1",
            "--clip", "random"] + extra


@pytest.mark.slow
def test_grpo_stage1_update_points_the_right_way(shapes_small, tmp_path):
    """Stage 1 with a reward for the letters of 'blue': 40 steps raise it (measured 0.038 to 0.151).
    Catches: an update with the wrong sign, which lowers it."""
    # a random tiny VLM's logits stay within about +-1, which a LoRA can barely move: scale its
    # (tied) embeddings by 3 so the adapter has a distribution to reshape
    vlm, _ = model.load_tiny(need=("vlm",))
    with torch.no_grad():
        vlm.model.get_input_embeddings().weight.mul_(3)
    checkpoint.save_checkpoint(str(tmp_path / "init"), vlm, None, {"preset": "tiny"}, ("vlm",))
    (tmp_path / "word.py").write_text(
        "def letters_of_blue(completions, samples):\n"
        "    return [sum(ch in 'blue' for ch in c) / max(1, len(c)) for c in completions]\n")
    flags = _grpo_flags(shapes_small, ["--init", str(tmp_path / "init"), "--rewards", "word:letters_of_blue=1",
                                       "--steps", "40", "--prompts", "1", "--group-size", "16", "--lr", "1e-2",
                                       "--micro-batch", "16", "--minibatches", "1"])
    os.environ["PYTHONPATH"] = str(tmp_path)
    try:
        train("grpo_stage1.py", flags, tmp_path / "run")
    finally:
        del os.environ["PYTHONPATH"]
    r = logged(tmp_path / "run", "rewards/letters_of_blue/mean")
    assert len(r) == 40 and sum(r[20:]) / 20 > max(0.08, 2.5 * sum(r[:5]) / 5), r  # measured: 0.038 -> 0.151
    kl = logged(tmp_path / "run", "kl")
    assert kl[0] == 0 and kl[-1] > 0  # the first update starts at the reference


@pytest.mark.slow
def test_grpo_stage1_torchrun_with_renders_and_exact_resume(shapes_small, tmp_path):
    """Stage 1 under 2-rank DDP with renders: the field's metric names, a real ratio at the second
    optimizer step of a rollout (--minibatches 2, the default) and exactly 1 with one step,
    identical captions rendered once from one noise (all rewards equal), a checkpoint that names
    the frozen VDM instead of copying it, and exact resume. Catches: a clip that never acts, a
    group rendered from different noises, a resume that changes the run."""
    flags = _grpo_flags(shapes_small, ["--steps", "4", "--prompts", "1", "--group-size", "2", "--lr", "1e-2",
                                       "--micro-batch", "2"])
    r = train("grpo_stage1.py", flags, tmp_path / "ddp", nproc=2)
    assert "weights identical on all 2 ranks" in r.stdout
    logs = [json.loads(l) for l in open(tmp_path / "ddp" / "log.jsonl")]
    names = {"reward", "reward_std", "frac_reward_zero_std", "rewards/format/mean", "rewards/rouge_l/mean",
             "rewards/clip_v/mean", "kl", "clip_ratio", "completions/mean_length", "completions/think_length"}
    assert names <= set(logs[0]) and any("samples" in l for l in logs)
    assert all(0 <= l["completions/think_length"] <= l["completions/mean_length"] for l in logs if "kl" in l)
    # the second optimizer step of a rollout sees a real ratio, which the 1e-3 clip acts on
    assert any(l.get("clip_ratio", 0) > 0 for l in logs) and any(l.get("approx_kl", 0) > 0 for l in logs)
    meta = json.load(open(tmp_path / "ddp" / "last" / "meta.json"))
    assert meta["from"] == {"vdm": "tiny"} and "dit" not in meta["parts"]  # the frozen VDM is named, not copied
    vlm, vdm = checkpoint.load(str(tmp_path / "ddp" / "last"))  # merged VLM + LoRA, the VDM from "from": a --model
    assert type(vlm.model).__name__ == "PeftModel" and vdm.n_refs == model.N_REFS
    # near-greedy sampling: a group's completions agree, so one render serves the group and,
    # from one shared noise, every reward is equal within it; one optimizer step per rollout
    # scores with the policy that sampled, ratio exactly 1
    train("grpo_stage1.py", flags + ["--temperature", "0.01", "--steps", "2", "--minibatches", "1"], tmp_path / "sure")
    sure = [l for l in map(json.loads, open(tmp_path / "sure" / "log.jsonl")) if "kl" in l]
    assert len(sure) == 2 and all(l["renders"] == 1 and l["frac_reward_zero_std"] == 1 for l in sure), sure
    assert all(l["approx_kl"] == 0 and l["clip_ratio"] == 0 for l in sure)
    no_clip = ["--rewards", "format=1,rouge_l=1"]
    train("grpo_stage1.py", flags + no_clip, tmp_path / "straight")
    train("grpo_stage1.py", flags + no_clip + ["--stop-at", "2"], tmp_path / "split")
    train("grpo_stage1.py", flags + no_clip + ["--resume"], tmp_path / "split")
    same_weights(tmp_path / "straight" / "last", tmp_path / "split" / "last")


def test_flow_matching_loss_against_direct_computation(tiny):
    """The VDM's SFT loss against a per-sample computation from the closed forms: sigma = 5u / (1 + 4u)
    at u = 1 - i/1000, x_s = (1 - s) x0 + s eps, the DiT run on [refs, x_s] with timestep 1000 s,
    its output on the target frames only regressed on eps - x0, weighted by DiffSynth's
    exp(-2 ((t - 500) / 1000)^2) - min, mean 1. Catches: x0 and eps swapped, the target's sign
    flipped, an unshifted table, the reference frames in the loss, weights not applied."""
    _, vdm = tiny
    B, C = 3, vdm.dit.config.in_channels
    x0, refs = torch.randn(B, C, 3, 4, 6, generator=gen(1)), torch.randn(B, C, vdm.n_refs, 4, 6, generator=gen(2))
    text = vdm.encode_text(["a red ball rolls left", "a blue cube", "nothing happens"])
    for weighted in (True, False):
        with torch.no_grad():
            loss = model.flow_matching_loss(vdm, x0, text, refs, gen(0), shift=5.0, weighted=weighted)
        g = gen(0)  # the same draws: an index into the 1000-step table per sample, then the noise
        i, eps = torch.randint(1000, (B,), generator=g).double(), torch.randn(x0.shape, generator=g)
        u = 1 - i / 1000
        sigma = 5 * u / (1 + 4 * u)
        table = 5 * (1 - torch.arange(1000).double() / 1000) / (1 + 4 * (1 - torch.arange(1000).double() / 1000))
        y = torch.exp(-2 * ((table * 1000 - 500) / 1000) ** 2)
        w = (y - y.min()) * (1000 / (y - y.min()).sum())
        want = 0.0
        for b in range(B):
            s = float(sigma[b])
            x_s = (1 - s) * x0[b] + s * eps[b]
            with torch.no_grad():
                out = vdm.dit(hidden_states=torch.cat([refs[b], x_s], dim=1)[None], timestep=torch.tensor([1000 * s]),
                              encoder_hidden_states=text[b:b + 1], return_dict=False)[0][0, :, -3:]
            mse = float(((out - (eps[b] - x0[b])) ** 2).mean())
            want += (float(w[int(i[b])]) if weighted else 1.0) * mse / B
        assert loss.item() == pytest.approx(want, rel=1e-4), weighted
    # motion_weight: moving positions (off their median over the clip's frames by more than 1 in a
    # channel) weighted 1 + m, normalised per sample; here only the first two rows of sample 0 move
    still = x0[:, :, :1].repeat(1, 1, 3, 1, 1)
    still[0, 5, 1, :2] += 3.0
    with torch.no_grad():
        loss = model.flow_matching_loss(vdm, still, text, refs, gen(0), weighted=False, motion_weight=9.0)
    want = 0.0
    for b in range(B):  # the same gen(0) draws as above: sigma and eps
        s = float(sigma[b])
        with torch.no_grad():
            out = vdm.dit(hidden_states=torch.cat([refs[b], (1 - s) * still[b] + s * eps[b]], dim=1)[None],
                          timestep=torch.tensor([1000 * s]), encoder_hidden_states=text[b:b + 1], return_dict=False)[0][0, :, -3:]
        err = ((out - (eps[b] - still[b])) ** 2).mean(0)  # (3, 4, 6), over channels
        if b == 0:  # 12 of 72 positions at weight 10: (sum err + 9 sum err[moving]) / (72 + 9 * 12)
            want += float((err.sum() + 9 * err[1, :2].sum()) / (72 + 9 * 12)) / B
        else:
            want += float(err.mean()) / B
    assert loss.item() == pytest.approx(want, rel=1e-4)
    # a given sigma is unweighted and used as given
    with torch.no_grad():
        at = model.flow_matching_loss(vdm, x0, text, refs, gen(0), sigma=torch.tensor([0.3]), motion_weight=9.0)
    eps = torch.randn(x0.shape, generator=gen(0))
    with torch.no_grad():
        out = vdm.dit(hidden_states=torch.cat([refs, 0.7 * x0 + 0.3 * eps], dim=2), timestep=torch.full((B,), 300.0),
                      encoder_hidden_states=text, return_dict=False)[0][:, :, -3:]
    assert at.item() == pytest.approx(float(((out - (eps - x0)) ** 2).mean()), rel=1e-4)


def test_choose_anchors_bar_and_best_of_tries():
    """Stage 2's anchor filter: a caption at ROUGE-L exactly the bar (0.6) is kept at once, a prompt
    draws again until one reaches it, and one that never does is skipped with its best score.
    Catches: > for >=, a retry that keeps the last draw instead of the best, draws after a hit."""
    assert rewards.rouge_l("a red ball rolls over", "the red ball rolls away") == 0.6  # exactly: P = R = 3/5
    draws = {0: ["a red ball rolls over"],  # at the bar on the first draw
             1: ["blue", "red ball", "green cube", "the red ball rolls away"],  # 0.53 at draw 2, the bar at 4
             2: ["blue", "the red", "green", "cube"]}  # never: skipped, its best (draw 2) recorded
    refs = ["the red ball rolls away"] * 3
    calls = []

    def sample(need):
        calls.append(list(need))
        return [draws[i][len(calls) - 1] for i in need]
    got = rewards.choose_anchors(sample, refs, min_rouge=0.6, tries=4)
    assert calls == [[0, 1, 2], [1, 2], [1, 2], [1, 2]]  # prompt 0 is not drawn again
    assert got[0] == ("a red ball rolls over", 0.6, 1)
    assert got[1] == ("the red ball rolls away", 1.0, 4)
    best2 = rewards.rouge_l("the red", refs[2])
    assert got[2] == (None, best2, 2) and 0 < best2 < 0.6


def test_merged_lora_dit_gives_the_lora_models_outputs(tiny):
    """Stage 2 with --lora saves the DiT with its adapter folded in (model.merged_lora_state): a plain
    DiT with those weights gives the adapted DiT's outputs. Catches: the LoRA scale left out, B A
    transposed, base_layer keys that a plain DiT does not load."""
    import copy
    from peft import LoraConfig
    dit = copy.deepcopy(tiny[1].dit)
    dit.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=True,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]))
    with torch.no_grad():  # a trained adapter: B away from its zero init
        for n, p in dit.named_parameters():
            if ".lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen(len(n))) * 0.5)
    plain = copy.deepcopy(tiny[1].dit)
    plain.load_state_dict(model.merged_lora_state(dit))  # strict: the plain DiT's keys exactly
    x = torch.randn(2, dit.config.in_channels, 3, 4, 6, generator=gen(0))
    text = torch.randn(2, 7, dit.config.text_dim, generator=gen(1))
    with torch.no_grad():
        a = dit(hidden_states=x, timestep=torch.tensor([300.0, 800.0]), encoder_hidden_states=text, return_dict=False)[0]
        b = plain(hidden_states=x, timestep=torch.tensor([300.0, 800.0]), encoder_hidden_states=text, return_dict=False)[0]
        base = tiny[1].dit(hidden_states=x, timestep=torch.tensor([300.0, 800.0]), encoder_hidden_states=text,
                           return_dict=False)[0]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert (a - base).abs().max() > 1e-2  # the adapter does change the outputs


def test_checkpoints_name_their_frozen_models(tiny, tmp_path):
    """A checkpoint that records where its frozen models come from ("from") loads them from there,
    relative to itself (the tree can move), with its own parts on top; a missing source is one
    error naming it. Catches: a frozen model silently replaced by a random one, absolute paths
    that break when out/ moves, a stage-2 DiT not put on top of the SFT VDM."""
    import shutil
    vlm, vdm = model.load_tiny(seed=3)
    checkpoint.save_checkpoint(str(tmp_path / "out" / "sft_vdm"), None, vdm, {"preset": "tiny"}, ("dit", "vae", "text_encoder"))
    checkpoint.save_checkpoint(str(tmp_path / "out" / "stage1"), vlm, None, {"preset": "tiny"}, ("vlm",),
                          sources={"vdm": str(tmp_path / "out" / "sft_vdm")})
    tuned = model.load_tiny(seed=4, need=("vdm",))[1].dit  # stands in for the DiT stage 2 trained
    vdm.dit.load_state_dict(tuned.state_dict())
    checkpoint.save_checkpoint(str(tmp_path / "out" / "stage2"), None, vdm, {"preset": "tiny"}, ("dit",),
                          sources={"vlm": str(tmp_path / "out" / "stage1"), "vdm": str(tmp_path / "out" / "sft_vdm")})
    meta = json.load(open(tmp_path / "out" / "stage2" / "meta.json"))
    assert meta["parts"] == ["dit"] and meta["from"] == {"vlm": "../stage1", "vdm": "../sft_vdm"}
    shutil.move(tmp_path / "out", tmp_path / "moved")
    v2, d2 = checkpoint.load(str(tmp_path / "moved" / "stage2"))
    sft = model.load_tiny(seed=3)
    for a, b in ((v2.model, sft[0].model), (d2.vae, sft[1].vae), (d2.text_encoder, sft[1].text_encoder), (d2.dit, tuned)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(d2.dit.state_dict()["proj_out.weight"], sft[1].dit.state_dict()["proj_out.weight"])
    shutil.rmtree(tmp_path / "moved" / "sft_vdm")
    with pytest.raises(checkpoint.CheckpointError, match=r"stage2: its VDM comes from .*moved/sft_vdm \(meta.json \"from\"\), "
                                                    r"which is not there"):
        checkpoint.load(str(tmp_path / "moved" / "stage2"))
    got = checkpoint.load(str(tmp_path / "moved" / "stage1"), need=("vlm",))[0].model.state_dict()  # what it holds still loads
    assert got.keys() == sft[0].model.state_dict().keys() and all(torch.equal(v, sft[0].model.state_dict()[k]) for k, v in got.items())


def test_frozen_models_cannot_change_under_a_run(tiny, tmp_path):
    """A GRPO run may not name as a frozen model the checkpoint it writes (it would load what it
    replaces), and a resumed run must name the frozen models it started from. Catches: a stage 2
    whose KL reference or LoRA base silently changes on --resume, a checkpoint that loads itself."""
    import common
    _, vdm = tiny
    for name in ("sft_a", "sft_b"):
        checkpoint.save_checkpoint(str(tmp_path / name), None, vdm, {"preset": "tiny"}, ("dit", "vae", "text_encoder"))
    last = str(tmp_path / "run" / "last")
    checkpoint.save_checkpoint(last, None, vdm, {"preset": "tiny"}, ("dit",), sources={"vdm": str(tmp_path / "sft_a")})
    common.check_frozen(last, True, vdm=str(tmp_path / "sft_a"))  # the same: fine
    common.check_frozen(last, False, vdm=str(tmp_path / "sft_b"))  # a fresh run may start elsewhere
    with pytest.raises(SystemExit, match=r"error: --vdm .*sft_b: .*run/last was trained from .*sft_a; resume with that --vdm"):
        common.check_frozen(last, True, vdm=str(tmp_path / "sft_b"))
    with pytest.raises(SystemExit, match=r"error: --vdm .*a frozen model cannot come from the checkpoint being written"):
        common.check_frozen(last, False, vdm=last)


def test_grpo_stage1_from_an_sft_lora(shapes_small, tmp_path, monkeypatch):
    """Stage 1 from an SFT LoRA checkpoint merges the SFT adapter into the VLM, trains a fresh one on
    top, and takes the SFT model as its reference: with the adapter off, the stage-1 checkpoint
    computes the SFT model's logits exactly, with it on (trained) other logits. Catches: the SFT
    adapter dropped or trained further, a reference that is the pre-SFT base."""
    vlm, _ = model.load_tiny(need=("vlm",))
    vlm.model = model.add_lora(vlm.model)
    with torch.no_grad():  # a trained SFT adapter
        for n, p in vlm.model.named_parameters():
            if ".lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen(len(n))) * 0.3)
    checkpoint.save_checkpoint(str(tmp_path / "sft"), vlm, None, {"preset": "tiny"}, ("vlm", "vlm_lora"))
    (tmp_path / "word.py").write_text(  # a reward that differs between a group's completions
        "def length(completions, samples):\n    return [len(c) / 100 for c in completions]\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    flags = _grpo_flags(shapes_small, ["--init", str(tmp_path / "sft"), "--rewards", "word:length=1",
                                       "--steps", "2", "--group-size", "4", "--micro-batch", "4", "--lr", "1e-2"])
    train("grpo_stage1.py", flags, tmp_path / "run")
    sft, _ = checkpoint.load(str(tmp_path / "sft"), need=("vlm",))
    stage1, _ = checkpoint.load(str(tmp_path / "run" / "last"), need=("vlm",))
    inp = sft.inputs([moving_clip(6, 56, 56)], ["What happens next?"], ["[Think]x[/Think][Ans]y[/Ans]"])
    with torch.no_grad():
        want = sft.model(**inp).logits
        with stage1.model.disable_adapter():
            ref = stage1.model(**inp).logits
        policy = stage1.model(**inp).logits
        base = model.load_tiny(need=("vlm",))[0].model(**inp).logits
    torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-4)
    assert (want - base).abs().max() > 1e-2  # the SFT adapter matters
    assert (policy - want).abs().max() > 1e-4  # the fresh adapter was trained


def test_flow_grpo_loss_against_direct_formula():
    """Stage 2's loss against a per-sample loop: the clipped surrogate with advantages clipped to 5,
    plus the KL of the step means. Catches: unclipped advantages, a KL on the samples instead of the
    means."""
    from rewards import flow_grpo_loss
    torch.manual_seed(0)
    B, eps, beta = 4, 0.2, 0.1
    logp, old = torch.randn(B) * 0.3, torch.randn(B) * 0.3
    adv = torch.tensor([7.0, -0.7, 0.0, -9.0])
    mean, ref_mean = torch.randn(B, 2, 3, 2, 2), torch.randn(B, 2, 3, 2, 2)
    step_std = torch.tensor([0.5, 0.4, 0.3, 0.2]).view(B, 1, 1, 1, 1)
    want, kls = 0.0, []
    for b in range(B):
        rho, A = math.exp(logp[b] - old[b]), max(-5.0, min(5.0, float(adv[b])))
        kl = float(((mean[b] - ref_mean[b]) ** 2).mean() / (2 * float(step_std[b]) ** 2))
        kls.append(kl)
        want += (-min(rho * A, min(max(rho, 1 - eps), 1 + eps) * A) + beta * kl) / B
    loss, st = flow_grpo_loss(logp, old, adv, mean, ref_mean, step_std, eps, beta, adv_clip=5.0)
    assert loss.item() == pytest.approx(want, rel=1e-5) and st["kl"] == pytest.approx(sum(kls) / B, rel=1e-5)


def _flow_grpo_wan_step_loss(log_prob, old_log_prob, adv, prev_sample_mean, prev_sample_mean_ref, std_dev_t, sqrt_dt,
                             clip_range, beta, adv_clip_max=5.0):
    """Flow-GRPO's stage-2 loss at one timestep, transcribed from its Wan2.1 trainer (yifan123/flow_grpo,
    scripts/train_wan2_1.py at 9745241, the lines after `# grpo logic`): std_dev_t and sqrt_dt are
    what its Wan sde_step_with_logprob returns with return_dt_and_std_dev_t (the step's sigma_t and
    sqrt(-dt)), so its KL divides by the step's whole variance, as ours does."""
    advantages = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    kl_loss = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3, 4), keepdim=True) / (2 * (std_dev_t * sqrt_dt) ** 2)
    kl_loss = torch.mean(kl_loss)
    return policy_loss + beta * kl_loss, kl_loss


def test_stage2_update_is_flow_grpos_wan_update():
    """The whole stage-2 update (2 micro-batches x 3 SDE steps, gradients accumulated) against
    Flow-GRPO's Wan2.1 trainer transcribed: its per-step loss, averaged over the steps and
    micro-batches as accelerate's accumulation divides it (gradient_accumulation_steps = steps x
    batches). The gradient of a velocity parameter must match, and the KL must be Wan2.1's, which is
    |dt| times SD3's `/ (2 * std_dev_t ** 2)` (train_sd3.py): the paper's beta 0.004 and clip range 1e-3
    are the Wan2.1 config's. Catches: the SD3 KL scale, a per-step sum instead of a mean, a KL on the
    samples, a policy term averaged another way."""
    from rewards import flow_grpo_loss
    torch.manual_seed(0)
    B, steps, n_mb, clip_range, beta = 3, 3, 2, 1e-3, 0.004
    sigmas = model.flow_sigmas(steps)
    shift = (torch.randn(1, 4, 2, 2, 2) * 0.1).requires_grad_()  # a "parameter" that moves the velocity off the reference
    xs = torch.randn(n_mb, B, steps + 1, 4, 2, 2, 2)
    old = torch.randn(n_mb, B, steps) * 1e-3
    adv = torch.tensor([[6.0, -0.5, 0.2], [-7.0, 1.0, 0.0]])
    v_of = lambda m, j: (xs[m, :, j] * 0.3 + shift) * (1 + 0.1 * j)
    v_ref_of = lambda m, j: xs[m, :, j] * 0.3 * (1 + 0.1 * j)
    ours, theirs = 0.0, 0.0
    for m in range(n_mb):
        for j in range(steps):
            _, logp, mean, step_std = model.sde_step_with_logprob(v_of(m, j), xs[m, :, j], sigmas[j], sigmas[j + 1],
                                                                  prev_sample=xs[m, :, j + 1])
            ref_mean = model.sde_step_with_logprob(v_ref_of(m, j), xs[m, :, j], sigmas[j], sigmas[j + 1],
                                                   prev_sample=xs[m, :, j + 1])[2]
            loss, st = flow_grpo_loss(logp, old[m, :, j], adv[m], mean, ref_mean, step_std, clip_range, beta,
                                      norm=n_mb * B * steps)
            ours = ours + loss
            s, dt = float(sigmas[j]), float(sigmas[j + 1] - sigmas[j])
            std_dev_t = 0.7 * math.sqrt(s / (1 - (float(sigmas[1]) if s == 1 else s)))  # Flow-GRPO's sigma_max = sigmas[1]
            ref_loss, ref_kl = _flow_grpo_wan_step_loss(logp, old[m, :, j], adv[m], mean, ref_mean, std_dev_t,
                                                        math.sqrt(-dt), clip_range, beta)
            theirs = theirs + ref_loss / (n_mb * steps)
            assert st["kl"] == pytest.approx(ref_kl.item(), rel=1e-5) and ref_kl.item() > 0
            sd3_kl = (((mean - ref_mean) ** 2).mean(dim=(1, 2, 3, 4), keepdim=True) / (2 * std_dev_t ** 2)).mean()
            assert sd3_kl.item() == pytest.approx(ref_kl.item() * -dt, rel=1e-5)  # SD3's form is |dt| times smaller
    g_ours, = torch.autograd.grad(ours, shift, retain_graph=True)
    g_theirs, = torch.autograd.grad(theirs, shift)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-9)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-9)
    assert g_ours.abs().max() > 0


def test_cfg_gradient_flows_through_both_branches(tiny):
    """The update's guided velocity backpropagates through the unconditional branch too, as
    Flow-GRPO's trainers do since its "fix cfg gradient detach" (a482878, which removed
    `noise_pred_uncond.detach()` from train_sd3.py; train_wan2_1.py runs two undetached forwards):
    our one batched forward gives the gradient of its two separate ones. Catches: a detached branch."""
    _, vdm = tiny
    torch.manual_seed(0)
    x, refs = torch.randn(2, 16, 3, H // 8, W // 8), torch.randn(2, 16, 2, H // 8, W // 8)
    text, neg = vdm.encode_text(["a red square", "a blue ball"]), vdm.negative_text(2)
    p = vdm.dit.proj_out.weight

    def grad(fn):
        p.requires_grad_(True)
        try:
            return torch.autograd.grad((fn() * torch.linspace(-1, 1, x[0].numel()).view(x[0].shape)).sum(), p)[0]
        finally:
            p.requires_grad_(False)
    ours = grad(lambda: vdm.guided_velocity(x, 0.6, text, neg, refs, cfg=4.0))
    two = lambda: (lambda u, c: u + 4.0 * (c - u))(vdm.velocity(x, 0.6, neg, refs), vdm.velocity(x, 0.6, text, refs))
    detached = lambda: (lambda u, c: u + 4.0 * (c - u))(vdm.velocity(x, 0.6, neg, refs).detach(), vdm.velocity(x, 0.6, text, refs))
    scale = ours.abs().max().item()
    torch.testing.assert_close(ours, grad(two), rtol=1e-3, atol=1e-4 * scale)  # float32 rounding of two batchings
    assert (ours - grad(detached)).abs().max() > 0.1 * scale


def test_sde_window_is_flow_grpo_fast(tiny):
    """--sde-window: only the window's steps are SDE steps with log-probs, the others Euler steps
    (Flow-GRPO-Fast's noise level 0), from the same initial noise. Catches: noise outside the
    window, log-probs for deterministic steps, a window off by one."""
    _, vdm = tiny
    text = vdm.encode_text(["a red square moves right", "it stops"])
    xs_full, _ = vdm.sample_sde(text, None, None, T, H, W, steps=5, cfg=3.0, generator=gen(0))
    xs, lps = vdm.sample_sde(text, None, None, T, H, W, steps=5, cfg=3.0, generator=gen(0), window=(1, 3))
    assert torch.equal(xs[:, 0], xs_full[:, 0]) and not torch.equal(xs[:, -1], xs_full[:, -1])
    assert lps[:, [0, 3, 4]].isnan().all() and lps[:, 1:3].isfinite().all()
    neg, sigmas = vdm.negative_text(2), model.flow_sigmas(5)
    for j in range(5):
        v = vdm.guided_velocity(xs[:, j], sigmas[j], text, neg, None, 3.0)
        if j in (1, 2):  # scored as sampled
            _, logp, mean, _ = model.sde_step_with_logprob(v, xs[:, j], sigmas[j], sigmas[j + 1], prev_sample=xs[:, j + 1])
            assert torch.equal(logp, lps[:, j]) and (xs[:, j + 1] - mean).abs().max() > 1e-3
        else:  # deterministic
            torch.testing.assert_close(xs[:, j + 1], model.euler_step(v, xs[:, j], sigmas[j], sigmas[j + 1]), rtol=0, atol=1e-6)


def test_sde_rollout_replays_exactly_and_refs_stay_clean(tiny):
    """A stored SDE rollout replayed with unchanged weights gives the same log-probs (ratio 1, KL
    0); only the 9 target latents are sampled while the DiT sees the clean refs every call. Catches:
    a replay that recomputes noise, refs noised with the targets."""
    import copy
    from rewards import flow_grpo_loss
    _, vdm = tiny
    refs = vdm.ref_latents(vdm.encode_video(data.to_tensor(moving_clip(T, H, W))[None])).repeat(2, 1, 1, 1, 1)
    text = vdm.encode_text(["a red square moves right", "it stops"])
    seen = []
    hook = vdm.dit.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"]), with_kwargs=True)
    try:
        xs, lps = vdm.sample_sde(text, None, refs, T, H, W, steps=5, cfg=3.0, generator=gen(0))
        n_rollout = len(seen)
        ref_dit = copy.deepcopy(vdm.dit)
        neg = vdm.encode_text([model.NEGATIVE_PROMPT] * 2)
        sigmas = model.flow_sigmas(5)
        for j in range(4):  # the trained steps: replayed with unchanged weights, ratio 1 and KL 0 exactly
            v = vdm.guided_velocity(xs[:, j], sigmas[j], text, neg, refs, 3.0)
            _, logp, mean, std = model.sde_step_with_logprob(v, xs[:, j], sigmas[j], sigmas[j + 1], prev_sample=xs[:, j + 1])
            v_ref = vdm.guided_velocity(xs[:, j], sigmas[j], text, neg, refs, 3.0, dit=ref_dit)
            ref_mean = model.sde_step_with_logprob(v_ref, xs[:, j], sigmas[j], sigmas[j + 1], prev_sample=xs[:, j + 1])[2]
            assert torch.equal(logp, lps[:, j])
            loss, st = flow_grpo_loss(logp, lps[:, j], torch.tensor([1.0, -1.0]), mean, ref_mean, std)
            assert st["kl"] == 0 and st["clip_ratio"] == 0 and loss.item() == 0  # ratio 1: -(A1 + A2) / 2
    finally:
        hook.remove()
    # only the 9 target latent frames are sampled and scored; the DiT sees the clean refs in front every time
    assert xs.shape == (2, 6, 16, 9, H // 8, W // 8) and lps.shape == (2, 5)
    assert n_rollout == 5 and len(seen) == 5 + 8
    for h in seen:
        assert h.shape[2] == 6 + 9 and torch.equal(h[:, :, :6], torch.cat([refs, refs])[:len(h)])


def _stage2_flags(shapes, extra):
    return ["--vlm", "tiny", "--vdm", "tiny", "--train", str(shapes / "train.jsonl"), "--frames", "5", "--height", "32",
            "--width", "64", "--sample-steps", "4", "--max-new-tokens", "8", "--anchor-min-rouge", "0",
            "--anchor-tries", "1", "--cfg", "1", "--log-every", "1", "--clip", "random"] + extra


@pytest.mark.slow
def test_grpo_stage2_toy_reward_moves_the_right_way(shapes_small, tmp_path):
    """Stage 2 with a brightness reward, and from the same start with the opposite reward: the first
    step renders the same videos in both runs, then the first run's grow brighter than the second's.
    What both runs share (the drift of a random tiny DiT at lr 1e-2, the anchors' captions) cancels
    in the difference. Catches: an update with the wrong sign, a reward that does not reach it."""
    (tmp_path / "light.py").write_text(
        "def brightness(videos, samples):\n    return [float(v.mean()) / 255 for v in videos]\n"
        "def darkness(videos, samples):\n    return [1 - float(v.mean()) / 255 for v in videos]\n")
    runs = {}
    for fn in ("brightness", "darkness"):
        flags = _stage2_flags(shapes_small, ["--rewards", f"light:{fn}=1", "--steps", "32", "--prompts", "1",
                                             "--group-size", "8", "--micro-batch", "8", "--lr", "1e-2", "--minibatches", "1"])
        os.environ["PYTHONPATH"] = str(tmp_path)
        try:
            train("grpo_stage2.py", flags, tmp_path / fn)
        finally:
            del os.environ["PYTHONPATH"]
        r = logged(tmp_path / fn, f"rewards/{fn}/mean")
        runs[fn] = [x if fn == "brightness" else 1 - x for x in r]  # the videos' brightness, step by step
        motion = logged(tmp_path / fn, "motion")
        assert logged(tmp_path / fn, "kl")[0] == 0 and len(motion) == len(r) == 32 and all(m > 0 for m in motion)
    up, down = runs["brightness"], runs["darkness"]
    assert up[0] == pytest.approx(down[0], abs=1e-6)  # one start: the same rollouts before any update
    # measured: both from 0.3361, the last 12 steps 0.0080 apart (a group's std ~0.001)
    assert sum(up[20:]) / 12 - sum(down[20:]) / 12 > 0.004, (up, down)


def _brightness_of(vdm, samples, steps, cfg, seeds):
    """Brightness (mean pixel / 255) of each video that the VDM samples for each sample, as stage 2's
    rollouts are sampled (the SDE at noise level 0.7, every step stochastic), one group of len(seeds)
    per sample from its caption and references. -> (samples, len(seeds))"""
    clips = data.ClipDataset(samples, ("clip",), 33, 64, 112, ref_clip="uniform")
    out = []
    for i in range(len(samples)):
        with torch.no_grad():
            refs = vdm.ref_latents(vdm.encode_video(data.to_tensor(clips[i]["clip"][None])))
            text = vdm.encode_text([samples[i]["caption"]])
            row = []
            for s in seeds:
                xs, _ = vdm.sample_sde(text, vdm.negative_text(1), refs, 33, 64, 112, steps, cfg, generator=gen(s))
                row.append(float(vdm.decode(xs[:, -1]).mean()) / 2 + 0.5)
        out.append(row)
    return np.array(out)


@pytest.mark.slow
def test_grpo_stage2_raises_a_pixel_reward_of_the_shipped_sft_dit(tmp_path):
    """Stage 2 at the Shapes preset's settings, from the shipped SFT DiT, on a brightness reward: in
    50 steps the brightness of held-out prompts' videos, replayed on the same noise before and
    after, rises by more than 3 of the SFT DiT's in-group standard deviations (the spread GRPO's
    advantages work with). Catches: an update that does not learn, or learns too slowly to see."""
    import runpy
    world = tmp_path / "world"
    shapes.make_shapes(str(world), 48, 4, 0, height=64, width=112, seed=1, workers=2)
    (tmp_path / "light.py").write_text("def brightness(videos, samples):\n    return [float(v.mean()) / 255 for v in videos]\n")
    cfg = runpy.run_path(os.path.join(ROOT, "config", "shapes.py"))["grpo_stage2"]  # the preset's settings
    r = subprocess.run([sys.executable, "grpo_stage2.py", "--config", "config/shapes.py", "--vlm", "shapes-sft", "--vdm",
                        "shapes-sft", "--train", str(world / "train.jsonl"), "--rewards", "light:brightness=1",
                        "--anchor-min-rouge", "0", "--anchor-tries", "1", "--steps", "50", "--save-every", "50", "--val", "",
                        "--sample-every", "1000", "--workers", "0", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    val, _ = data.read_manifest(str(world / "val.jsonl"))
    replay = lambda name: _brightness_of(checkpoint.load(name, need=("vdm",))[1], val, cfg["sample_steps"], cfg["cfg"], range(8))
    before, after = replay("shapes-sft"), replay(str(tmp_path / "run" / "last"))
    sd = before.std(1).mean()
    gain = (after - before).mean() / sd
    print(f"brightness {before.mean():.4f} -> {after.mean():.4f}, in-group sd {sd:.5f}: +{gain:.2f} sd")
    assert gain > 3, (before, after)


@pytest.mark.slow
def test_grpo_stage2_torchrun_lora_anchors_and_exact_resume(shapes_small, tmp_path):
    """Stage 2 under 2-rank DDP with a LoRA DiT: the metric names, a moved ratio at the second
    optimizer step of a rollout, a merged DiT checkpoint that names the frozen models instead of
    copying them, anchors computed once, exact resume, anchors of other flags refused,
    all-skipped prompts one error; the held-out prompts scored at steps 0, 2, 4, shared over the
    ranks; a resumed run with --sde-window the same as a straight one, held-out scores included.
    Catches: stale anchors reused, a resume that changes the run."""
    flags = _stage2_flags(shapes_small, ["--steps", "4", "--prompts", "1", "--group-size", "2", "--micro-batch", "2",
                                         "--lr", "1e-2", "--cfg", "2", "--val", str(shapes_small / "val.jsonl"),
                                         "--val-every", "2", "--val-samples", "3", "--val-steps", "2"])
    r = train("grpo_stage2.py", flags + ["--lora", "4"], tmp_path / "ddp", nproc=2)
    assert "weights identical on all 2 ranks" in r.stdout and "anchors: 16 of 16 prompts kept" in r.stdout
    logs = [json.loads(l) for l in open(tmp_path / "ddp" / "log.jsonl")]
    names = {"reward", "reward_std", "frac_reward_zero_std", "rewards/clip_v/mean", "rewards/clip_t/mean", "kl",
             "clip_ratio", "approx_kl", "motion", "motion_gt"}
    assert names <= set(logs[1]) and logs[-1]["approx_kl"] > 0  # the second optimizer step saw a moved ratio
    scored = [json.loads(l) for l in open(tmp_path / "ddp" / "val.jsonl")]
    assert [v["step"] for v in scored] == [0, 2, 4] and all(len(v["prompts"]) == 3 for v in scored)
    assert [r["step"] for r in logs if "val/reward" in r] == [0, 2, 4]
    assert scored[0]["prompts"] != scored[-1]["prompts"]  # the DiT moved, the noise did not
    names = os.listdir(tmp_path / "ddp" / "samples")
    assert len(names) == 1 and names[0].startswith("step000004_"), names  # rank 0's, at the end
    _, vdm = checkpoint.load(str(tmp_path / "ddp" / "last"))  # the merged DiT, a plain --model
    meta = json.load(open(tmp_path / "ddp" / "last" / "meta.json"))
    assert meta["parts"] == ["dit", "dit_lora"] and meta["from"] == {"vlm": "tiny", "vdm": "tiny"}
    # full fine-tuning: N straight == N/2 + resume + N/2; the anchors are computed once
    no_clip = ["--rewards", "clip_t=1", "--sde-window", "1", "--sde-window-range", "0,3"]
    train("grpo_stage2.py", flags + no_clip, tmp_path / "straight")
    train("grpo_stage2.py", flags + no_clip + ["--stop-at", "2"], tmp_path / "split")
    lines = open(tmp_path / "split" / "anchors.rank0.jsonl").read()
    train("grpo_stage2.py", flags + no_clip + ["--resume"], tmp_path / "split")
    assert open(tmp_path / "split" / "anchors.rank0.jsonl").read() == lines
    same_weights(tmp_path / "straight" / "last", tmp_path / "split" / "last")
    assert open(tmp_path / "straight" / "val.jsonl").read() == open(tmp_path / "split" / "val.jsonl").read()
    # anchors cached under other flags are not reused: one error line
    bar = ["--anchor-min-rouge", "0.6", "--anchor-tries", "2"]
    r = train("grpo_stage2.py", flags + bar, tmp_path / "split", check=False)
    assert r.returncode != 0 and re.fullmatch(r"error: .*split holds files made with other settings \(min_rouge 0(\.0)? "
                                              r"there, 0\.6 now; tries 1 there, 2 now\); delete it or change --out",
                                              r.stderr.strip().splitlines()[-1])
    # a VLM whose captions never reach the bar: every prompt skipped and counted, one error line
    r = train("grpo_stage2.py", flags + bar, tmp_path / "none", check=False)
    assert r.returncode != 0 and "anchors: 0 of 16 prompts kept, 16 skipped (ROUGE-L < 0.6 after 2 tries)" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("error: no prompt has an anchor caption")


def test_training_curves_from_logs(tmp_path):
    """plot_curves draws each panel from its log key (raw and running mean), says 'not logged' where
    a key is absent, and refuses a missing run in one line. Catches: panels mislabelled or shifted
    in step."""
    import plot_curves
    runs = {1: tmp_path / "stage1", 2: tmp_path / "stage2"}
    rng = np.random.default_rng(0)
    logged = {1: {"rewards/format/mean": rng.random(30), "rewards/rouge_l/mean": rng.random(30), "reward": rng.random(30),
                  "completions/think_length": rng.integers(0, 90, 30), "event_caption": rng.random(30)},  # no clip_v
              2: {"rewards/clip_v/mean": rng.random(30), "rewards/clip_t/mean": rng.random(30), "reward": rng.random(30),
                  "motion": rng.random(30), "motion_gt": np.full(30, 0.5)}}
    for stage, run in runs.items():
        run.mkdir()
        with open(run / "log.jsonl", "w") as f:
            for i in range(30):
                f.write(json.dumps({"step": 5 * (i + 1), "time": 0.0, **{k: float(v[i]) for k, v in logged[stage].items()}}) + "\n")
                f.write(json.dumps({"step": 5 * (i + 1), "samples": [{"completion": "x"}]}) + "\n")
    fig = plot_curves.plot(plot_curves.read_log(runs[1]), plot_curves.read_log(runs[2]), smooth=4)
    panels = {title: ax for (_, _, title), ax in zip(plot_curves.PANELS, fig.axes)}
    assert len(panels) == 10
    for stage, key, title in plot_curves.PANELS:
        ax = panels[title]
        if key not in logged[stage]:
            assert [t.get_text() for t in ax.texts] == ["not logged"] and not ax.lines
            continue
        raw, avg = ax.lines[:2]
        y = logged[stage][key]
        assert np.array_equal(raw.get_xdata(), 5 * np.arange(1, 31)) and np.allclose(raw.get_ydata(), y)
        assert np.allclose(avg.get_ydata(), [y[max(0, i - 3):i + 1].mean() for i in range(30)])  # mean of the last 4
    motion = next(title for _, key, title in plot_curves.PANELS if key == "motion")
    assert np.allclose(panels[motion].lines[2].get_ydata(), 0.5)  # motion beside motion_gt
    r = subprocess.run([sys.executable, os.path.join(ROOT, "plot_curves.py"), str(runs[1]), str(runs[2]), "--out",
                        str(tmp_path / "curves.png")], capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "plot_curves.py"), str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'nope' / 'log.jsonl'} does not exist (give a training run's --out directory)"


def test_example_figure_shows_the_frames_and_the_answer():
    """plot_example.draw: the input's frames over the answer's (spread over each clip), titled with the
    question and the caption. Catches: rows swapped, frames not spread over the clip, titles lost."""
    import plot_example
    from helpers import moving_clip
    inp, ans = moving_clip(6, seed=0), moving_clip(33, seed=1, color=(30, 200, 60))
    fig = plot_example.draw(inp, ans, "What next?", "It goes on.", columns=3)
    axes = fig.axes
    assert len(axes) == 6
    assert [np.array_equal(ax.images[0].get_array(), f) for ax, f in zip(axes[:3], inp[[0, 2, 5]])] == [True] * 3
    assert [np.array_equal(ax.images[0].get_array(), f) for ax, f in zip(axes[3:], ans[[0, 16, 32]])] == [True] * 3
    assert axes[0].get_title(loc="left") == "Q: What next?" and axes[3].get_title(loc="left") == "A: It goes on."
