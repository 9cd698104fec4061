"""
The paper's settings (VANS supplement, "Implementation details"), for 8 GPUs:

    torchrun --standalone --nproc_per_node=8 sft_vlm.py --config config/paper.py
    torchrun --standalone --nproc_per_node=8 sft_vdm.py --config config/paper.py --fsdp
    torchrun --standalone --nproc_per_node=8 grpo_stage1.py --config config/paper.py
    torchrun --standalone --nproc_per_node=8 grpo_stage2.py --config config/paper.py

Given by the paper (and the scripts' defaults): LoRA r 8 / alpha 32 on the VLM for 10K SFT
steps, full DiT fine-tuning for 20K steps, Joint-GRPO stage 1 for 800 steps and stage 2
(full DiT) for 1000, lr 5e-5 throughout, G = 8, beta 0.004, clip range 1e-3, anchors with
ROUGE-L >= 0.6, 33 frames at 352x640, 6 reference latents. From Flow-GRPO's Wan2.1 setup:
20 SDE steps, noise level 0.7, training on the first 99% of them, advantages clipped to 5.
Not given, and chosen here: batch sizes, warmup, gradient clipping, the flow-matching
timestep shift (the sampling schedule's 5), no EMA, one prompt (one group of 8) per GPU and
20-step renders in stage 1, CFG 5 (the paper's inference scale) in stage 2's rollouts, two
optimizer steps per rollout (Flow-GRPO's), each reward normalised by its pooled in-group spread.
"""

data = dict(train="data/train.jsonl", frames=33)

sft_vlm = dict(data, val="data/val.jsonl", finetune="lora", lr=5e-5, warmup=200, batch_size=4, grad_clip=1.0,
               grad_checkpointing=True, val_every=1000, save_every=1000)

sft_vdm = dict(data, val="data/val.jsonl", lr=5e-5, warmup=200, batch_size=1, height=352, width=640, n_refs=6,
               grad_clip=1.0, grad_checkpointing=True, cache_latents=True, timestep_shift=5.0, val_every=2000,
               save_every=1000)

grpo_stage1 = dict(data, init="out/sft_vlm/last", vdm="out/sft_vdm/last", lr=5e-5, group_size=8, prompts=1,
                   temperature=1.0, render_steps=20, render_cfg=5.0, height=352, width=640, clip_range=1e-3,
                   beta=0.004, grad_checkpointing=True, save_every=100, log_every=1)

grpo_stage2 = dict(data, vlm="out/grpo_stage1/last", vdm="out/sft_vdm/last", lr=5e-5, group_size=8, prompts=1,
                   micro_batch=4, sample_steps=20, noise_level=0.7, cfg=5.0, train_fraction=0.99, height=352,
                   width=640, clip_range=1e-3, adv_clip=5.0, beta=0.004, anchor_min_rouge=0.6,
                   grad_checkpointing=True, save_every=100, log_every=1)
