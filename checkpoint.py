"""
Loading and saving VANS models: the hub's base models, the official release's
weights put onto them, our own checkpoint directories (atomic, resumable, each
file checked against its model), and the --model names the scripts take. Importing it
does not import torch or model.py: the scripts check a --model name, and read a
checkpoint's meta.json, before they import either.

    python checkpoint.py --vlm out/shapes/sft_vlm/last --vdm out/shapes/sft_vdm/last --out weights/mine   # pack
"""

import importlib.util
import json
import os
import re
import shutil
import tempfile

HUB = {"qwen": "Qwen/Qwen2.5-VL-3B-Instruct", "wan": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vans": "KlingTeam/VANS"}
PATTERNS = {"vans": ["vdm.safetensors", "vlm.safetensors"]}  # the files we need of a hub repo (default: all)
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")  # models shipped in the repo, by name
BUILT_IN = ("full", "tiny")  # model.CONFIGS' names, here so that a name is checked without torch (a test keeps them equal)


class CheckpointError(ValueError):
    pass


# -----------------------------------------------------------------------------
# key checks and conversions

def _check_keys(own, sd, what):
    """Raise one line naming the first missing, unexpected and wrongly shaped key (own, sd: name -> tensor)."""
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    parts = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + \
            ([f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else []) + \
            ([f"{len(bad)} of wrong shape (e.g. {bad[0]}: {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})"]
             if bad else [])
    if parts:
        raise CheckpointError(f"{what}: keys do not match the model: " + "; ".join(parts))


def _read(path):
    """load_file, with an unreadable file (truncated, not safetensors) as a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _load_strict(module, sd, what):
    _check_keys(module.state_dict(), sd, what)
    module.load_state_dict(sd, strict=True)


def wan_to_diffusers(sd):
    """Original Wan / DiffSynth DiT key names -> diffusers' WanTransformer3DModel names."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    return convert_wan_transformer_to_diffusers(dict(sd))


def lora_to_peft(sd):
    """The official vlm.safetensors LoRA keys -> the keys of our peft model's state_dict.
    Handles the `mllmagent.mllm_backbone.` / `pipe.mllm.mllm_backbone.` prefixes, with or
    without `base_model.model.`, with or without the adapter name, and the pre-4.52
    transformers layout (`model.layers.*`, `visual.*`) as well as the current one
    (`model.language_model.layers.*`, `model.visual.*`)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(mllmagent\.mllm_backbone\.|pipe\.mllm\.mllm_backbone\.)", "", k)
        k = re.sub(r"^base_model\.model\.", "", k)
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            k = "model.language_model." + k[len("model."):]
        k = re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k)
        out["base_model.model." + k] = v
    return out


def load_vans_lora(peft_model, sd, what="vlm.safetensors"):
    """Load official LoRA weights into a peft model: every LoRA weight of the model
    must be given and every given weight must land (the official loader drops mismatches)."""
    sd = lora_to_peft(sd)
    _check_keys({k: v for k, v in peft_model.state_dict().items() if ".lora_" in k}, sd, what)
    peft_model.load_state_dict(sd, strict=False)


# -----------------------------------------------------------------------------
# the hub's base models and the official release

def hub_paths(**given):
    """Local paths of the hub repos named by keyword (qwen=..., wan=..., vans=...; a value
    is a local copy or None): the cache if they are there, else a download. Offline or
    unreachable, one error naming every missing repo instead of a retry loop."""
    from huggingface_hub import snapshot_download
    paths, missing = {}, []
    for key, path in given.items():
        if path is not None:
            if not os.path.isdir(path):
                raise CheckpointError(f"--{key} {path}: no such directory")
            paths[key] = path
            continue
        try:
            paths[key] = snapshot_download(HUB[key], allow_patterns=PATTERNS.get(key), local_files_only=True)
        except Exception:
            missing.append(key)
    if missing:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if offline or not _hub_reachable():
            raise CheckpointError(
                f"weights not in the local Hugging Face cache and the hub is "
                f"{'disabled (HF_HUB_OFFLINE=1)' if offline else 'unreachable'}: "
                + "; ".join(f"{HUB[k]} (download with `hf download {HUB[k]}`, or pass --{k} /local/copy)"
                            for k in missing))
        for key in missing:
            paths[key] = snapshot_download(HUB[key], allow_patterns=PATTERNS.get(key))
    return paths


def _hub_reachable(timeout=3.0):
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_base(qwen=None, wan=None, dtype=None, need=("vlm", "vdm"), dit_dtype=None, device=None):
    """Qwen2.5-VL-3B-Instruct and Wan2.1-T2V-1.3B-Diffusers from local snapshot directories;
    a model not in `need` is None. Each model is read from its files straight into its dtype
    (`dtype`, default bfloat16; the DiT in `dit_dtype`, default `dtype`; the VAE in float32) and onto
    `device` (default the CPU): a bf16 umT5-XXL never exists in float32 on the host (23 GB a process)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    import model
    dtype = dtype or torch.bfloat16
    on_gpu = device is not None and torch.device(device).type != "cpu"
    at = {"device_map": {"": torch.device(device)}} if on_gpu else {}  # (from_pretrained's default is the CPU)
    vlm = vdm = None
    if "vlm" in need:
        vlm = _load_qwen(qwen, dtype, at)
    if "vdm" in need:
        vdm = model.VDM(WanTransformer3DModel.from_pretrained(wan, subfolder="transformer", torch_dtype=dit_dtype or dtype, **at).eval(),
                  AutoencoderKLWan.from_pretrained(wan, subfolder="vae", torch_dtype=torch.float32, **at).eval(),
                  UMT5EncoderModel.from_pretrained(wan, subfolder="text_encoder", dtype=dtype, **at).eval(),
                  AutoTokenizer.from_pretrained(wan, subfolder="tokenizer"), n_refs=0)
    return vlm, vdm


def _load_qwen(qwen, dtype, at):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    import model
    processor = Qwen2_5_VLProcessor.from_pretrained(qwen)
    lo, hi = model.CONFIGS["full"]["vlm_pixels"]
    processor.video_processor.size = {"shortest_edge": lo, "longest_edge": hi}
    processor.video_processor.cap_pixels_per_frame = True
    return model.VLM(Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen, dtype=dtype, **at).eval(), processor)


def load_official(vlm, vdm, vans_dir):
    """Put the official release (vdm.safetensors: the DiT in Wan naming; vlm.safetensors:
    LoRA weights) onto base models (either may be None); turns reference conditioning on."""
    import model
    paths = {n: os.path.join(vans_dir, f"{n}.safetensors") for n, m in (("vdm", vdm), ("vlm", vlm)) if m is not None}
    for n, p in paths.items():
        if not os.path.isfile(p):
            raise CheckpointError(f"{vans_dir}: {n}.safetensors not found (expected the KlingTeam/VANS files)")
    if vdm is not None:
        sd = wan_to_diffusers(_read(paths["vdm"]))
        _load_strict(vdm.dit, {k: v.to(vdm.dit.dtype) for k, v in sd.items()}, paths["vdm"])
        vdm.n_refs = model.N_REFS
    if vlm is not None:
        vlm.model = model.add_lora(vlm.model).eval()
        load_vans_lora(vlm.model, {k: v.to(vlm.model.dtype) for k, v in _read(paths["vlm"]).items()}, paths["vlm"])
    return vlm, vdm


# -----------------------------------------------------------------------------
# our own checkpoint directory (written by save_checkpoint / the training scripts):
#   meta.json               {"preset": "full" | "tiny" | a world's, "config": {the small preset's dict}, "n_refs": 6, ...}
#   vlm.safetensors         full VLM weights (small presets: the base is random, so it is saved)
#   vlm_tokenizer/          the VLM's tokenizer (small presets, saved with vlm.safetensors)
#   vlm_lora/               peft adapter (adapter_config.json + adapter_model.safetensors)
#   dit.safetensors         DiT, diffusers naming
#   vae.safetensors, text_encoder.safetensors   (tiny preset, when trained)
#   text_tokenizer/         the text encoder's tokenizer (a preset with its own, saved with text_encoder)
# Every file is optional; whatever is present must match its model exactly. A model a training
# run kept frozen is not saved again: meta.json's "from" names where it comes from ({"vlm": ...,
# "vdm": ...}: a named model, or a checkpoint directory relative to this one), and this
# checkpoint's own parts go on top of it (stage 2's DiT onto the SFT VDM it started from).
# A small preset's dict is saved whole ("config"), so its models load without the code that defined it.

def respect_umask(path):
    """Give a file, or a directory and all in it, the permissions the umask gives new files:
    safetensors writes owner-only files (0600) and mkdtemp an owner-only directory (0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def _save(sd, path):
    """safetensors save that keeps every key: tied weights (embeddings / lm_head) share
    storage, which safetensors refuses, so repeats are saved as copies."""
    from safetensors.torch import save_file
    seen, out = set(), {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.detach().clone() if ptr in seen else v.detach().contiguous()
        seen.add(ptr)
    save_file(out, path)


def source_of(name, ckpt):
    """How checkpoint `ckpt` records the --model name a frozen model came from: a named model as
    its name, a checkpoint directory relative to `ckpt` (so that an out/ tree can move whole),
    links resolved. A checkpoint cannot come from itself (it is replaced when saved)."""
    if _named(name):
        return name
    rel = os.path.relpath(os.path.realpath(name), os.path.realpath(ckpt))
    if rel == ".":
        raise CheckpointError(f"{ckpt}: a frozen model cannot come from the checkpoint being written ({name}); "
                              "use another --out")
    return rel


def _source_path(ckpt, source):
    return source if _named(source) else os.path.normpath(os.path.join(os.path.realpath(ckpt), source))


def vlm_base_state(m):
    """The state dict of a VLM without its LoRA (a peft model's base weights, under the base's names)."""
    from peft import PeftModel
    if not isinstance(m, PeftModel):
        return m.state_dict()
    sd = {k: v for k, v in m.get_base_model().state_dict().items() if ".lora_" not in k}
    return {k.replace(".base_layer.", "."): v for k, v in sd.items()}  # peft wraps targeted Linear layers


def save_checkpoint(path, vlm, vdm, meta, parts=("vlm", "vlm_lora", "dit", "vae", "text_encoder"),
                    weights=None, extra=None, sources=None):
    """Write a checkpoint directory atomically (temp dir, then rename). vlm / vdm may be None.
    weights: {part: state dict} written instead of the module's (e.g. gathered FSDP weights).
    extra: {file name: object} written with torch.save (training state). sources: {"vlm" or
    "vdm": --model name} of the frozen models, recorded in meta.json as "from", not saved. meta["preset"]:
    the models' preset (its dict, or a built-in's name)."""
    import torch
    from peft import PeftModel

    import model
    preset = model.config_of(meta["preset"])
    meta = {**meta, "preset": preset["name"], **({"config": preset} if preset["name"] != "full" else {})}
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-ckpt-")
    weights, written = dict(weights or {}), []
    is_peft = vlm is not None and isinstance(vlm.model, PeftModel)
    if "vlm" in parts and vlm is not None and "vlm" not in weights:
        weights["vlm"] = vlm_base_state(vlm.model)
    if "vlm" in parts and vlm is not None and preset["name"] != "full":
        vlm.processor.tokenizer.save_pretrained(os.path.join(tmp, "vlm_tokenizer"))
        written.append("vlm_tokenizer")
    if "vlm_lora" in parts and is_peft:
        vlm.model.save_pretrained(os.path.join(tmp, "vlm_lora"))
        os.remove(os.path.join(tmp, "vlm_lora", "README.md"))  # peft's blank model card
        written.append("vlm_lora")
    if vdm is not None:
        for name, module in [("dit", vdm.dit), ("vae", vdm.vae), ("text_encoder", vdm.text_encoder)]:
            if name in parts and name not in weights:
                weights[name] = module.state_dict()
        if "text_encoder" in parts and "text_tokenizer" in preset:
            vdm.tokenizer.save_pretrained(os.path.join(tmp, "text_tokenizer"))
            written.append("text_tokenizer")
        meta = {"n_refs": vdm.n_refs, "latents_mean": vdm.latents_mean.flatten().tolist(),
                "latents_std": vdm.latents_std.flatten().tolist(), **meta}
    for name, sd in weights.items():
        _save(sd, os.path.join(tmp, f"{name}.safetensors"))
        written.append(name)
    for name, obj in (extra or {}).items():
        torch.save(obj, os.path.join(tmp, name))
    if sources:
        meta = {**meta, "from": {m: source_of(name, path) for m, name in sources.items()}}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({**meta, "parts": sorted(written)}, f, indent=2)
    respect_umask(tmp)
    if os.path.exists(path):
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


def checkpoint_exists(path):
    """Whether <path> holds a checkpoint. A save_checkpoint cut between its two renames left the
    previous checkpoint at <path>.old and none at <path>: it is put back first."""
    if not os.path.exists(path) and os.path.isdir(path + ".old"):
        try:
            os.rename(path + ".old", path)
        except FileNotFoundError:  # another rank put it back
            pass
    return os.path.isdir(path)


def read_meta(path):
    """A checkpoint directory's meta.json; CheckpointError if it is missing, not JSON, or names no preset
    (a built-in one, or one whose dict it carries)."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path}: not a VANS checkpoint directory (no meta.json)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or not (meta.get("preset") in BUILT_IN or isinstance(meta.get("config"), dict)):
        preset = meta.get("preset") if isinstance(meta, dict) else None
        raise CheckpointError(f"{meta_path}: 'preset' must be one of {sorted(BUILT_IN)} or come with its "
                              f"'config', got {preset!r}")
    return meta


def load_checkpoint(path, qwen=None, wan=None, vans=None, dtype=None, need=("vlm", "vdm"), dit_dtype=None, device=None):
    """Our checkpoint directory -> (vlm, vdm); a model not in `need` is None. A model the
    checkpoint records as coming from elsewhere ("from") is loaded from there; the parts the
    checkpoint holds go on top, else onto the preset's base models. A needed model must have its
    weights somewhere (a full-size VLM: the LoRA at least; a full-size VDM: the DiT at least)."""
    import model
    meta = read_meta(path)
    _check_sources(path, meta, need)
    have = set(meta.get("parts", []))
    sources = {m: _source_path(path, src) for m, src in meta.get("from", {}).items() if m in need}
    own = [m for m in need if m not in sources]
    preset = meta.get("config") or model.CONFIGS[meta["preset"]]
    tiny = preset["name"] != "full"  # random bases: every part must be here
    own_text_tokenizer = "text_tokenizer" in preset
    required = {"vlm": [{"vlm", "vlm_tokenizer"}] if tiny else [{"vlm"}, {"vlm_lora"}],
                "vdm": [{"dit", "vae", "text_encoder"} | ({"text_tokenizer"} if own_text_tokenizer else set())]
                if tiny else [{"dit"}]}
    for m in own:
        if not any(files <= have for files in required[m]):
            raise CheckpointError(f"{path}: has no {m.upper()} weights (needs {' or '.join('+'.join(sorted(f)) for f in required[m])}); "
                                  f"it holds {', '.join(sorted(have)) or 'nothing'}")
    vlm = vdm = None
    if own and tiny:
        from transformers import Qwen2Tokenizer
        # the models' own tokenizers; a throwaway model (one not needed, built for the same RNG stream) takes any
        tok = Qwen2Tokenizer.from_pretrained(os.path.join(path, "vlm_tokenizer")) if "vlm" in own else model.byte_tokenizer()
        text_tok = Qwen2Tokenizer.from_pretrained(os.path.join(path, "text_tokenizer")) if "vdm" in own and own_text_tokenizer \
            else tok if own_text_tokenizer else None
        vlm, vdm = model.load_tiny(need=own, preset=preset, tokenizer=tok, text_tokenizer=text_tok)
    elif own:
        given = {k: v for k, v in (("qwen", qwen), ("wan", wan)) if ("vlm" if k == "qwen" else "vdm") in own}
        vlm, vdm = load_base(**hub_paths(**given), dtype=dtype, need=own, dit_dtype=dit_dtype, device=device)
    for m, src in sources.items():
        got = load(src, qwen, wan, vans, dtype, need=(m,), dit_dtype=dit_dtype, device=device)
        vlm, vdm = (got[0], vdm) if m == "vlm" else (vlm, got[1])
    f = lambda name: os.path.join(path, name)
    if vlm is not None:
        if "vlm" in have:
            _load_strict(vlm.model, _read(f("vlm.safetensors")), f("vlm.safetensors"))
        if "vlm_lora" in have:
            from peft import PeftModel
            with model.quiet_peft():
                vlm.model = PeftModel.from_pretrained(vlm.model, f("vlm_lora")).eval()
            # peft only warns about adapter keys that do not match: check them ourselves
            saved = lora_to_peft(_read(f("vlm_lora/adapter_model.safetensors")))
            _check_keys({k: v for k, v in vlm.model.state_dict().items() if ".lora_" in k}, saved, f("vlm_lora"))
    if vdm is not None:
        for name, module in [("dit", vdm.dit), ("vae", vdm.vae), ("text_encoder", vdm.text_encoder)]:
            if name in have:
                sd = _read(f(f"{name}.safetensors"))
                _load_strict(module, {k: v.to(next(module.parameters()).dtype) for k, v in sd.items()},
                             f(f"{name}.safetensors"))
        if "dit" in have:
            vdm.n_refs = meta.get("n_refs", model.N_REFS)
        if "latents_mean" in meta:
            vdm.set_latent_stats(meta["latents_mean"], meta["latents_std"])
    return vlm, vdm


# -----------------------------------------------------------------------------
# --model names: vans, base, a model shipped in weights/, tiny, random:PRESET, or a checkpoint directory

def shipped():
    """The names of the models shipped in weights/ (each a checkpoint directory)."""
    return sorted(n for n in os.listdir(WEIGHTS) if os.path.isfile(os.path.join(WEIGHTS, n, "meta.json")))


def _random_preset(name):
    """The preset of a random --model: "tiny", or "random:PRESET" with PRESET a built-in preset or a
    module that defines one as PRESET (random:shapes: shapes.PRESET); None for any other name."""
    import model
    if name == "tiny":
        return model.CONFIGS["tiny"]
    if not name.startswith("random:"):
        return None
    spec = name[len("random:"):]
    return model.CONFIGS[spec] if spec in model.CONFIGS else model.hook(spec + ":PRESET")


def _named(name):
    """Whether a --model value names a model (rather than a checkpoint directory)."""
    return name in ("base", "vans", "tiny") or name.startswith("random:") or name in shipped()


def directory(name):
    """The directory a --model name is read from: weights/<name> for a shipped model, else the name."""
    return os.path.join(WEIGHTS, name) if name in shipped() else name


def meta_of(name):
    """The meta.json of a --model name's checkpoint directory; {} for a name that is not one."""
    return read_meta(directory(name)) if os.path.isfile(os.path.join(directory(name), "meta.json")) else {}


def preset_of(name):
    """The preset dict of the models a --model name loads (model.CONFIGS' "full" for the hub's)."""
    import model
    meta = meta_of(name)
    if meta:
        return meta.get("config") or model.CONFIGS[meta["preset"]]
    return _random_preset(name) or model.CONFIGS["full"]


def ref_clip_of(name):
    """The reference clip a --model's VDM was trained with (data.clip_indices): what its checkpoint's
    run recorded (--ref-clip), else its preset's default."""
    return meta_of(name).get("flags", {}).get("ref_clip") or preset_of(name)["infer"]["ref_clip"]


def check_name(name, need=("vlm", "vdm")):
    """A --model value must be a name load() knows or a checkpoint directory (whose meta.json is
    read, and whose needed models from elsewhere are there); CheckpointError otherwise. Cheap:
    nothing is loaded."""
    if name.startswith("random:"):
        spec = name[len("random:"):]
        if spec not in BUILT_IN and importlib.util.find_spec(spec) is None:
            raise CheckpointError(f"{name}: no preset {spec!r} (one of {', '.join(BUILT_IN)}, or a module that "
                                  "defines PRESET)")
        return
    if _named(name):
        return
    if not checkpoint_exists(name):
        raise CheckpointError(f"{name}: no such checkpoint directory (nor one of vans, base, "
                              f"{', '.join(shipped())}, tiny, random:PRESET)")
    _check_sources(name, read_meta(name), need)


def _check_sources(path, meta, need=("vlm", "vdm")):
    """The needed models a checkpoint takes from elsewhere ("from") must be there."""
    for m, src in meta.get("from", {}).items():
        src = _source_path(path, src)
        if m in need and not (_named(src) or checkpoint_exists(src)):
            raise CheckpointError(f"{path}: its {m.upper()} comes from {src} (meta.json \"from\"), which is not there "
                                  f"(a training run records the frozen models it used instead of copying them: keep "
                                  f"them where they were)")


def load(name, qwen=None, wan=None, vans=None, dtype=None, need=("vlm", "vdm"), dit_dtype=None, device=None):
    """-> (VLM, VDM) for "vans" (official release), "base" (Qwen-Wan baseline, no refs),
    a model shipped in weights/ by its name (shapes, shapes-sft), "tiny" / "random:PRESET" (random models
    of a preset, _random_preset), or a checkpoint directory of
    ours. Full-size weights are read in `dtype` (default bfloat16; the DiT in `dit_dtype` when given, the VAE in
    float32) onto `device` (load_base); the small presets' are float32 on the CPU. A model not
    in `need` is not loaded (None)."""
    import model
    if (preset := _random_preset(name)) is not None:
        return model.load_tiny(need=need, preset=preset)
    if name in shipped():
        return load_checkpoint(directory(name), qwen, wan, vans, dtype, need, dit_dtype, device)
    if name in ("base", "vans"):  # only the repos of the needed models are looked up
        given = {k: v for k, v in (("qwen", qwen), ("wan", wan)) if ("vlm" if k == "qwen" else "vdm") in need}
        p = hub_paths(**given, **({"vans": vans} if name == "vans" else {}))
        vlm, vdm = load_base(p.get("qwen"), p.get("wan"), dtype, need, dit_dtype, device)
        return load_official(vlm, vdm, p["vans"]) if name == "vans" else (vlm, vdm)
    check_name(name, need)
    return load_checkpoint(name, qwen, wan, vans, dtype, need, dit_dtype, device)


def pack(out, vlm_path, vdm_path, clip=None, on=None):
    """One checkpoint directory from the VLM of one checkpoint and the VDM of another, with no
    training state (what the models in weights/ are); `clip`, a tiny-CLIP directory, is copied to
    out/clip. `on`: a packed checkpoint (or a --model name) whose models these are but for the
    VLM's LoRA and the DiT, as the SFT models are under Joint-GRPO's: only those two are written,
    the rest is read from `on` (meta.json "from"; weights/shapes is packed on shapes-sft)."""
    import torch

    import model
    metas = {part: read_meta(path) for part, path in (("vlm", vlm_path), ("vdm", vdm_path))}
    presets = {json.dumps(m.get("config") or model.CONFIGS[m["preset"]], sort_keys=True) for m in metas.values()}
    if len(presets) != 1 or metas["vlm"]["preset"] == "full":
        raise CheckpointError(f"pack: {vlm_path} and {vdm_path} must be of one small preset, got "
                              f"{sorted({m['preset'] for m in metas.values()})}")
    vlm, _ = load_checkpoint(vlm_path, dtype=torch.float32, need=("vlm",))
    _, vdm = load_checkpoint(vdm_path, dtype=torch.float32, need=("vdm",))
    origin = {part: {k: v for k, v in m.items() if k in ("script", "step", "git")} for part, m in metas.items()}
    flags = {"ref_clip": ref_clip_of(vdm_path)}  # how the VDM reads its reference clip goes with it
    parts = ("vlm", "vlm_lora", "dit", "vae", "text_encoder")
    if on:
        _check_same_but_lora_and_dit(vlm, vdm, on)
        parts = ("vlm_lora", "dit")
    save_checkpoint(out, vlm, vdm, {"preset": json.loads(presets.pop()), "script": "pack", "flags": flags, **origin}, parts,
                    sources={"vlm": on, "vdm": on} if on else None)
    if clip:  # its weights, not its training run's records
        os.makedirs(os.path.join(out, "clip"))
        for f in ("clip.json", "clip.safetensors"):
            shutil.copy(os.path.join(clip, f), os.path.join(out, "clip", f))


def _check_same_but_lora_and_dit(vlm, vdm, on):
    """pack --on: everything but the VLM's LoRA and the DiT must be `on`'s, exactly."""
    import torch
    from peft import PeftModel
    vlm0, vdm0 = load(on, dtype=torch.float32)
    if isinstance(vlm0.model, PeftModel):
        raise CheckpointError(f"pack --on {on}: its VLM has a LoRA; the models under a LoRA must have none")
    differs = lambda a, b: a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a)
    for what, a, b in (("the VLM's weights", vlm_base_state(vlm.model), vlm0.model.state_dict()),
                       ("the VAE's weights", vdm.vae.state_dict(), vdm0.vae.state_dict()),
                       ("the text encoder's weights", vdm.text_encoder.state_dict(), vdm0.text_encoder.state_dict()),
                       ("the latent statistics", dict(m=vdm.latents_mean, s=vdm.latents_std),
                        dict(m=vdm0.latents_mean, s=vdm0.latents_std))):
        if differs(a, b):
            raise CheckpointError(f"pack --on {on}: {what} are not the same as its (only the VLM's LoRA and the DiT may differ)")
    for what, a, b in (("VLM's", vlm.processor.tokenizer, vlm0.processor.tokenizer), ("text", vdm.tokenizer, vdm0.tokenizer)):
        if a.get_vocab() != b.get_vocab():
            raise CheckpointError(f"pack --on {on}: the {what} tokenizer differs from {on}'s")
    if vdm.n_refs != vdm0.n_refs:
        raise CheckpointError(f"pack --on {on}: n_refs {vdm.n_refs} differs from its {vdm0.n_refs}")


if __name__ == "__main__":
    import argparse
    import sys
    parser = argparse.ArgumentParser(description="Pack a VLM and a VDM checkpoint into one --model directory.")
    parser.add_argument("--vlm", required=True, help="checkpoint directory holding the VLM")
    parser.add_argument("--vdm", required=True, help="checkpoint directory holding the VDM")
    parser.add_argument("--clip", default=None, help="a tiny-CLIP directory to ship alongside (out/clip)")
    parser.add_argument("--on", default=None, help="a packed checkpoint (or --model name) holding all but the VLM's "
                                                   "LoRA and the DiT: only those are written, the rest is read from it")
    parser.add_argument("--out", required=True, help="the new checkpoint directory")
    args = parser.parse_args()
    try:
        pack(args.out, args.vlm, args.vdm, args.clip, args.on)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"-> {args.out}")
