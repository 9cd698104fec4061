"""Every command fails early and clearly, keeps its work, and runs as the README writes it."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import data
import model
from helpers import ROOT, train, same_weights


def test_scripts_check_their_inputs_before_torch(shapes_small, tmp_path, no_torch):
    """As a new user meets them: a preset pointing at runs not made yet, a CLIP directory that is not
    there, a manifest or a weight file misspelt, no GPU. One error line naming the flag and the path,
    before torch is imported (so within a second: the PYTHONPATH's `torch` fails to import) and no run
    directory left behind. Catches: `--model` named for `--vdm`, a CLIP traceback after minutes of
    anchor captions, a check made after the models load, an empty run directory."""
    os.symlink(os.path.join(ROOT, "config"), tmp_path / "config")
    train = ["--train", str(shapes_small / "train.jsonl")]
    val = ["--val", str(shapes_small / "val.jsonl")]
    no_such = "no such checkpoint directory (nor one of vans, base, shapes, shapes-sft, tiny, random:PRESET)"

    def run(script, *argv, env=None):
        env = env or {"PYTHONPATH": str(no_torch)}
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                           cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
        return lines[0]

    assert run("grpo_stage1.py", "--config", "config/shapes.py", "--out", "out/g1", *train) == \
        f"error: --init out/shapes/sft_vlm/last: {no_such}"
    assert run("grpo_stage1.py", "--config", "config/shapes.py", "--init", "shapes-sft", "--out", "out/g1", *train) \
        .startswith("error: --vdm out/shapes/sft_vdm/last: no such checkpoint directory")
    for script in ("grpo_stage1.py", "grpo_stage2.py"):
        flags = ["--init", "shapes-sft"] if script == "grpo_stage1.py" else ["--vlm", "shapes", *val]
        assert run(script, "--config", "config/shapes.py", *flags, "--vdm", "shapes", "--out", "out/g", *train) \
            .startswith("error: --clip data/shapes/clip: no such file or directory")
    assert run("grpo_stage2.py", "--vlm", "shapes", "--vdm", "shapes-sft", "--train", "nope.jsonl", *val) == \
        "error: --train nope.jsonl: no such manifest"
    assert run("sft_vlm.py", "--model", "nothere", "--out", "out/v", *train) == f"error: --model nothere: {no_such}"
    assert run("sft_vdm.py", "--model", "tiny", "--out", "out/d", *train, "--val", "nope.jsonl") == \
        "error: --val nope.jsonl: no such manifest"  # before the training manifest's videos are read
    for world_script in ("train-vae", "train-clip"):  # the Shapes world's own training
        assert run("shapes.py", world_script, "--train", "nope.jsonl") == "error: --train nope.jsonl: no such manifest"
    manifest = ["--manifest", str(shapes_small / "val.jsonl")]
    for flags, message in ((["--manifest", "nope.jsonl", "--model", "tiny"], "error: nope.jsonl: no such manifest"),
                           ([*manifest, "--model", "nothere"], f"error: --model nothere: {no_such}"),
                           ([*manifest, "--model", "tiny", "--i3d", "nope.safetensors"],
                            "error: --i3d nope.safetensors: I3D weights not found; run `python eval.py --fetch-i3d` once"),
                           ([*manifest, "--model", "tiny", "--clip", "nope"], "error: --clip nope: no such file or directory"),
                           ([*manifest, "--predictions", "nope"], "error: --predictions nope: no such directory")):
        assert run("eval.py", *flags).startswith(message)
    if not torch.cuda.is_available():  # the device is known once torch is there, still before any weight is read
        assert run("sft_vlm.py", "--model", "tiny", "--device", "cuda", "--out", "out/v", *train, env={"X": ""}) == \
            "error: --device cuda: no CUDA GPU is available here (use --device cpu)"
    # flags that cannot work: argparse's usage, then its error line (--rewards is read by rewards.py, with torch)
    for script, flags, message, env in (
            ("grpo_stage1.py", ["--minibatches", "3"], "--minibatches 3 must split the 8 completions", {"PYTHONPATH": str(no_torch)}),
            ("grpo_stage2.py", ["--train-fraction", "0.01"], "--train-fraction 0.01: trains int(20 x it) SDE steps",
             {"PYTHONPATH": str(no_torch)}),
            ("grpo_stage2.py", ["--rewards", "clip_v=1,clip_v=2", "--vlm", "shapes", "--vdm", "shapes-sft", *val],
             "--rewards: two rewards named 'clip_v'", {})):
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags, "--out", "out/g", *train],
                           capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env})
        assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_clip_is_checked_where_the_rewards_use_it():
    """--clip is checked before torch only when CLIP scores something: eval always, a GRPO run when its
    --rewards weights clip_v or clip_t. Catches: a pixel-reward run refused for a CLIP it never loads."""
    import common
    for spec in ("shapes:brightness=1", "format=1,rouge_l=1,clip_v=0", "clip_v=0.0,clip_t=0"):
        assert common.check_clip("nope", spec) is None
    for spec in (None, "clip_v", "format=1,clip_t=0.5", "clip_v=1e-9", "clip_v=x"):  # x: rewards.parse's error, later
        with pytest.raises(SystemExit, match="^error: --clip nope: no such file or directory"):
            common.check_clip("nope", spec)
    assert common.check_clip("openai", "clip_v=1") is None and common.check_clip(ROOT, "clip_v=1") is None


@pytest.mark.slow
def test_stopped_runs_keep_their_work(shapes_small, tmp_path):
    """Ctrl-C (SIGINT) during a training run: the step under way finishes, the run logs and saves that
    step and exits 0; --resume goes on. Under torchrun, SIGTERM stops both ranks at the same step.
    `shapes.py train-clip` stopped the same way resumes exactly. Catches: a run that loses its work,
    ranks that stop at different steps, a damaged checkpoint."""
    import signal

    def stop_midway(cmd, progress_file, sig, out, launcher=False):
        """Start cmd, wait for its tqdm bar to pass step 2, send sig to its process group. torchrun
        (launcher) exits non-zero on a signal, whatever its ranks do."""
        log = open(progress_file, "w")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            steps = [int(m) for m in re.findall(r"\| *(\d+)/\d+ \[", open(progress_file).read())]
            if steps and max(steps) >= 2:
                break
            time.sleep(0.2)
        os.killpg(p.pid, sig)
        stdout, _ = p.communicate(timeout=240)
        log.close()
        assert launcher or p.returncode == 0, open(progress_file).read()[-3000:]
        return stdout

    tiny_vlm = [os.path.join(ROOT, "sft_vlm.py"), "--model", "tiny", "--train", str(shapes_small / "train.jsonl"),
                "--steps", "400", "--batch-size", "1", "--save-every", "1000", "--log-every", "1000", "--device", "cpu",
                "--workers", "1"]
    out = tmp_path / "int"
    stop_midway([sys.executable, *tiny_vlm, "--out", str(out)], tmp_path / "int.err", signal.SIGINT, out)
    step = json.load(open(out / "last" / "meta.json"))["step"]
    assert 2 <= step < 400 and [r["step"] for r in map(json.loads, open(out / "log.jsonl"))] == [step]
    train("sft_vlm.py", tiny_vlm[1:-4] + ["--resume", "--stop-at", str(step + 1)], out)
    assert json.load(open(out / "last" / "meta.json"))["step"] == step + 1

    out = tmp_path / "term"
    stdout = stop_midway([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *tiny_vlm,
                          "--out", str(out)], tmp_path / "term.err", signal.SIGTERM, out, launcher=True)
    step = json.load(open(out / "last" / "meta.json"))["step"]
    assert 2 <= step < 400 and "weights identical on all 2 ranks" in stdout and f"stopped: step {step} of 400" in stdout

    clip = [sys.executable, os.path.join(ROOT, "shapes.py"), "train-clip", "--train", str(shapes_small / "train.jsonl"),
            "--steps", "30", "--batch-size", "8", "--height", "32", "--width", "64", "--save-every", "1000",
            "--hard-negatives", "1", "--pool", "4", "--perturbed", "2"]  # their draws resume exactly too
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # as stop_midway runs it: the same float sums
    subprocess.run(clip + ["--out", str(tmp_path / "clip_straight")], check=True, capture_output=True, cwd=ROOT, env=one_thread)
    stop_midway(clip + ["--out", str(tmp_path / "clip_split")], tmp_path / "clip.err", signal.SIGINT, None)
    assert sorted(os.listdir(tmp_path / "clip_split")) == ["train_settings.json", "train_state.pt"]  # not done, kept
    subprocess.run(clip + ["--out", str(tmp_path / "clip_split")], check=True, capture_output=True, cwd=ROOT, env=one_thread)
    assert sorted(os.listdir(tmp_path / "clip_split")) == ["clip.json", "clip.safetensors", "train_settings.json"]
    same_weights(tmp_path / "clip_straight", tmp_path / "clip_split")


def test_files_respect_the_umask(tmp_path):
    """Checkpoints are shared as any files are: the umask decides, not safetensors (0600) or mkdtemp
    (0700). Catches: owner-only checkpoints."""
    _, vdm = model.load_tiny(need=("vdm",))
    old = os.umask(0o027)
    try:
        checkpoint.save_checkpoint(str(tmp_path / "ckpt"), None, vdm, {"preset": "tiny"}, extra={"train_state.pt": {}})
    finally:
        os.umask(old)
    modes = {f: oct(os.stat(tmp_path / "ckpt" / f).st_mode & 0o777) for f in os.listdir(tmp_path / "ckpt")}
    assert oct(os.stat(tmp_path / "ckpt").st_mode & 0o777) == "0o750"
    assert modes == {f: "0o640" for f in ("dit.safetensors", "vae.safetensors", "text_encoder.safetensors",
                                          "meta.json", "train_state.pt")}


def test_quiet_lora_and_ignored_outputs():
    """Wrapping a model in a LoRA prints no deprecation warning, and what the commands write by
    default (data/, out/, eval/, answer.mp4) is not tracked by git. Catches: a warning on every
    start that users cannot act on, run outputs committed by mistake."""
    import warnings
    vlm, _ = model.load_tiny(need=("vlm",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.add_lora(vlm.model)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    r = subprocess.run(["git", "check-ignore", "data/shapes/x.mp4", "out/sft_vlm/last", "eval/vans/a.json", "answer.mp4"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.split() == ["data/shapes/x.mp4", "out/sft_vlm/last", "eval/vans/a.json", "answer.mp4"]


SEQUENCE_FLAGS = {  # added to each command of the README's Shapes sequence: its smallest size
    "shapes.py data": ["--n-train", "6", "--n-val", "2", "--n-test", "2"],
    "shapes.py train-clip": ["--steps", "2", "--batch-size", "4"],
    "shapes.py train-vae": ["--steps", "2", "--batch-size", "1", "--val-every", "0", "--val-loss-samples", "1",
                            "--val-render", "1"],
    "sft_vlm.py": ["--steps", "2", "--batch-size", "2", "--val-every", "0", "--val-generate", "2",
                   "--val-loss-samples", "2", "--max-new-tokens", "8"],
    "sft_vdm.py": ["--steps", "2", "--batch-size", "1", "--val-every", "0", "--val-loss-samples", "1", "--val-render", "1",
                   "--val-steps", "2"],
    "grpo_stage1.py": ["--steps", "1", "--prompts", "1", "--group-size", "2", "--render-steps", "2", "--max-new-tokens", "8"],
    "grpo_stage2.py": ["--steps", "1", "--group-size", "2", "--sample-steps", "2", "--sde-window-range", "0,2",
                       "--max-new-tokens", "8", "--anchor-min-rouge", "0", "--anchor-tries", "1", "--val-samples", "1",
                       "--val-steps", "2"],
    "eval.py": ["--batch-size", "2", "--steps", "2", "--max-new-tokens", "8"],
    "infer.py": ["--steps", "2", "--max-new-tokens", "8"],
}


@pytest.mark.slow
def test_readme_shapes_sequence(tmp_path):
    """The README's Shapes commands, read from the README, run in order in an empty directory (as on a
    fresh clone) at their smallest size: every one finds what the ones before it wrote. Catches: a
    documented command that does not run as written."""
    if not os.path.isfile(os.path.join(ROOT, "weights", "i3d_kinetics400.safetensors")):
        pytest.skip("eval.py needs the I3D weights: python eval.py --fetch-i3d")
    import shlex
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("<!-- shapes-sequence")[1].split("<!-- end shapes-sequence -->")[0]
    commands = [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.startswith("python ")]
    key = lambda c: " ".join(c[1:3]) if c[1] == "shapes.py" else c[1]
    assert [key(c) for c in commands] == ["shapes.py data", "shapes.py train-clip", "sft_vlm.py", "shapes.py train-vae",
                                           "sft_vdm.py", "grpo_stage1.py", "grpo_stage2.py", "eval.py", "infer.py"]
    for name in ("config", "examples"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    for cmd in commands:
        argv = [sys.executable, os.path.join(ROOT, cmd[1]), *cmd[2:], *SEQUENCE_FLAGS[key(cmd)]]
        r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
        assert "FutureWarning" not in r.stderr, (cmd, r.stderr[-3000:])  # nothing a user can act on
    res = json.loads((tmp_path / "eval" / "grpo_stage2" / "results.json").read_text())
    assert res["n"] == 2 and all(s["event_caption"] is not None and s["event_video"] is not None for s in res["samples"])
    assert data.read_frames(str(tmp_path / "answer.mp4")).shape == (33, 64, 112, 3)
