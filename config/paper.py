"""
The paper's settings (VANS supplement, "Implementation details"), for 8 GPUs:

    torchrun --standalone --nproc_per_node=8 sft_vlm.py --config config/paper.py --out out/sft_vlm
    torchrun --standalone --nproc_per_node=8 sft_vdm.py --config config/paper.py --out out/sft_vdm --fsdp

Given by the paper: LoRA r 8 / alpha 32 on the VLM for 10K steps, full DiT fine-tuning for
20K steps, lr 5e-5 for both, 33 frames at 352x640, 6 reference latents. Not given, and
chosen here: batch size, warmup, weight decay, gradient clipping, the timestep shift of
the flow-matching loss (the sampling schedule's 5), and no EMA.
"""

data = dict(train="data/vans/train.jsonl", val="data/vans/val.jsonl", frames=33)

sft_vlm = dict(data, model="base", finetune="lora", steps=10_000, lr=5e-5, warmup=200, batch_size=4,
               grad_clip=1.0, grad_checkpointing=True, val_every=1000, save_every=1000)

sft_vdm = dict(data, model="base", steps=20_000, lr=5e-5, warmup=200, batch_size=1, height=352, width=640,
               n_refs=6, grad_clip=1.0, grad_checkpointing=True, cache_latents=True, timestep_shift=5.0,
               val_every=2000, save_every=1000)
