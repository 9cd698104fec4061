"""bench.py runs, so that its table cannot rot between the GPU runs it is written for."""

import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_bench_table_on_cpu():
    """`python bench.py` (tiny models, CPU) prints one row a stage with our time, the peer's where
    there is one, their ratio and a peak memory. Catches: a bench broken by a change to the models
    or the sampler's signature, a ratio that is not ours over the peer's."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--repeats", "1"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    cell = r" \| ([\d.-]+)"
    rows = {m[0]: m[1:] for m in re.findall(r"^\| ([^|]+?)" + cell * 7 + r" \|$", r.stdout, re.M)}
    assert list(rows) == ["vlm", "text", "refs", "dit", "dit, no refs", "vae", "answer (sum)", "answer, no refs (sum)",
                          "infer.answer", "infer.answer --offload", "sft_vdm step", "grpo_stage2 step (8 videos)"], r.stdout
    for name, (ours, peer, ratio, ours_min, peer_min, ratio_min, gb) in rows.items():
        assert 0 < float(ours_min) <= float(ours) and float(gb) > 0.1
        if peer != "-":
            assert float(ratio) == pytest.approx(float(ours) / float(peer), rel=0.05, abs=0.01)
            assert float(ratio_min) == pytest.approx(float(ours_min) / float(peer_min), rel=0.05, abs=0.01)
    assert all(rows[k][1] == "-" for k in ("refs", "dit", "infer.answer", "infer.answer --offload",
                                           "sft_vdm step", "grpo_stage2 step (8 videos)"))  # no peer does these
    sums = {k: float(rows[k][0]) for k in rows}  # the sums are of the rows they name, ours and the peer's
    assert sums["answer (sum)"] == pytest.approx(sums["vlm"] + sums["text"] + sums["refs"] + sums["dit"] + sums["vae"], abs=0.003)
    assert sums["answer, no refs (sum)"] == pytest.approx(sums["vlm"] + sums["text"] + sums["dit, no refs"] + sums["vae"],
                                                          abs=0.003)
    assert rows["answer (sum)"][1] == rows["answer, no refs (sum)"][1]
    assert "sft_vdm step: " in r.stdout and "TFLOP" in r.stdout


def test_base_models_load_in_their_own_dtypes(tmp_path):
    """checkpoint.load_base reads the hub's layout (written by bench.write_snapshot in the hub's dtypes and
    shards, here of the tiny preset) straight into each model's dtype: the trained DiT in float32
    beside a bf16 umT5 and VLM, the VAE in float32, every weight the one written. Catches: a frozen encoder read in float32 and
    cast afterwards (2x its size in host memory), a DiT trained in bf16, a weight lost on the way."""
    import torch
    sys.path.insert(0, ROOT)
    import bench
    import checkpoint
    import model
    bench.write_snapshot("tiny", str(tmp_path), shard_gb=0.0005)  # several shards a model
    vlm, vdm = checkpoint.load("base", qwen=str(tmp_path / "qwen"), wan=str(tmp_path / "wan"), dtype=torch.bfloat16,
                          dit_dtype=torch.float32)
    ref_vlm, ref_vdm = model.load_tiny()
    pairs = [(vlm.model, ref_vlm.model, "qwen", torch.bfloat16), (vdm.dit, ref_vdm.dit, "wan/transformer", torch.float32),
             (vdm.text_encoder, ref_vdm.text_encoder, "wan/text_encoder", torch.bfloat16),
             (vdm.vae, ref_vdm.vae, "wan/vae", torch.float32)]
    for net, ref, path, dtype in pairs:
        got, want = net.state_dict(), ref.state_dict()
        assert got.keys() == want.keys() and {v.dtype for v in got.values() if v.is_floating_point()} == {dtype}
        for k, v in want.items():  # written in the hub's dtype, read in the script's
            assert torch.equal(got[k], v.to(bench.HUB_DTYPES[path]).to(dtype)), k
    assert torch.equal(vdm.encode_text(["a red ball"]), model.VDM(ref_vdm.dit, ref_vdm.vae, vdm.text_encoder,
                                                                   ref_vdm.tokenizer).encode_text(["a red ball"]))


def test_cuda_loading_and_the_vlm_in_bf16(tmp_path):
    """On a GPU: the hub layout read straight onto the GPU (from_pretrained's device_map) in the
    scripts' dtypes, and the bf16 VLM's logits and generation there against float32 on the CPU, to
    bf16 tolerance. Catches: a CUDA-only loading path that fails or lands on the CPU, a VLM whose
    bf16 GPU path diverges."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sys.path.insert(0, ROOT)
    import bench
    import checkpoint
    from helpers import vlm_logits
    bench.write_snapshot("tiny", str(tmp_path), shard_gb=0.0005)  # several shards a model
    vlm, vdm = checkpoint.load("base", qwen=str(tmp_path / "qwen"), wan=str(tmp_path / "wan"), dtype=torch.bfloat16,
                          dit_dtype=torch.float32, device="cuda")
    for net, dtype in ((vlm.model, torch.bfloat16), (vdm.dit, torch.float32), (vdm.text_encoder, torch.bfloat16),
                       (vdm.vae, torch.float32)):
        assert {(p.device.type, p.dtype) for p in net.parameters()} == {("cuda", dtype)}
    ref, _ = checkpoint.load("base", qwen=str(tmp_path / "qwen"), wan=str(tmp_path / "wan"), dtype=torch.float32,
                        need=("vlm",))
    torch.testing.assert_close(vlm_logits(vlm).float().cpu(), vlm_logits(ref), rtol=0.05, atol=0.05)
    frames = [bench.np.zeros((4, 56, 56, 3), dtype=bench.np.uint8)]
    (text,) = vlm.generate(frames, ["What next?"], "greedy", 8)
    assert isinstance(text, str)
