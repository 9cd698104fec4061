"""The repository's layout as a reader meets it: the paper's files never reach the Shapes world, and the
modules import one another as a tree (every import counted, those inside functions too)."""

import ast
import os

from helpers import ROOT

PAPER = ["model.py", "checkpoint.py", "rewards.py", "data.py", "common.py", "infer.py", "eval.py", "fvd.py", "bench.py",
         "sft_vlm.py", "sft_vdm.py", "grpo_stage1.py", "grpo_stage2.py"]
SCRIPTS = ["infer.py", "eval.py", "sft_vlm.py", "sft_vdm.py", "grpo_stage1.py", "grpo_stage2.py"]


def imports(path):
    """The repository modules a file imports, anywhere in it."""
    own = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    names = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & own


def test_the_paper_files_never_import_the_shapes_world():
    """Catches: a lazy `import shapes` in the paper's path (the world plugs in by name: --model
    random:shapes, --metrics shapes:metrics, a preset's tokenizer hook)."""
    assert {f: sorted(imports(f)) for f in PAPER if "shapes" in imports(f)} == {}
    assert "shapes" in imports("tests/test_shapes.py")  # (the reader sees imports inside functions too)


def test_the_import_graph_has_no_circle():
    """Every module of the repository, every import counted: a depth-first walk meets no module twice
    on one path. Catches: model -> shapes -> model, however deep in a function."""
    graph = {f[:-3]: imports(f) for f in os.listdir(ROOT) if f.endswith(".py")}

    def walk(m, path):
        assert m not in path, " -> ".join(path + [m])
        for n in sorted(graph.get(m, ())):
            walk(n, path + [m])
    for m in graph:
        walk(m, [])


def test_a_worlds_checkpoint_loads_without_the_world():
    """A checkpoint of a world's own preset carries the preset (meta.json "config") and its tokenizers,
    so the shipped Shapes models load and answer in a process that never imports shapes.py. Catches:
    a loader that reaches for the world's code (the circle back), or a checkpoint that cannot say
    what it is."""
    import subprocess
    import sys
    code = ("import sys, checkpoint\n"
            "vlm, vdm = checkpoint.load('shapes', need=('vlm', 'vdm'))\n"
            "assert vlm.system_prompt == 'Predict the next event.' and len(vdm.tokenizer) == len(vlm.processor.tokenizer)\n"
            "print(sorted(m for m in sys.modules if m in ('shapes', 'checkpoint', 'model')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-2] == "['checkpoint', 'model']"


def test_the_shapes_page_is_what_its_script_writes():
    """docs/shapes.md's tables are docs/make_shapes_page.py's output from docs/results/, as committed.
    Catches: a number typed into the page, or results files that no longer give its tables."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_shapes_page", os.path.join(ROOT, "docs", "make_shapes_page.py"))
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    text = open(page.PAGE).read()
    assert page.rewrite(text) == text
    assert "| 5 | row 4 + stage 2 (Joint-GRPO) | 0.9423 ± 0.0057 | 258.25 ± 37.79 |" in text  # seeds 0, 1, 2 averaged


def flag_argument(path, flag, keyword):
    """The literal value of `keyword` in a file's parser.add_argument(flag, ...)."""
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and \
                node.args and getattr(node.args[0], "value", None) == flag:
            return next(ast.literal_eval(k.value) for k in node.keywords if k.arg == keyword)
    raise KeyError(f"{path}: no {flag}")


def test_what_the_scripts_know_before_torch_is_what_the_models_define(no_torch):
    """The scripts parse their flags and check their paths before torch is imported, so the names they
    need then are spelled out where torch is not: the built-in presets (checkpoint.BUILT_IN), the
    reward normalisations (--norm) and the reference frames (--n-refs). Each must be model.py's and
    rewards.py's, and every script's --help must come without torch. Catches: a preset added to
    model.CONFIGS that --model rejects, a normalisation --norm cannot select, a parser that needs torch."""
    import subprocess
    import sys

    import checkpoint
    import model
    import rewards
    assert checkpoint.BUILT_IN == tuple(model.CONFIGS)
    for script in ("grpo_stage1.py", "grpo_stage2.py"):
        assert flag_argument(script, "--norm", "choices") == rewards.NORMALISATIONS
    assert flag_argument("sft_vdm.py", "--n-refs", "default") == model.N_REFS
    for script in SCRIPTS:
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(no_torch)})
        assert r.returncode == 0 and r.stdout.startswith("usage: "), (script, r.stderr[-1000:])
