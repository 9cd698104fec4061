"""pytest setup: offline, the `slow` marker, the tests' helpers (tests/helpers.py) importable from every
test file, and the fixtures the test files share."""

import os
import sys

# before any Hugging Face import: a hub lookup offline would otherwise retry for ~46 s
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))

import pytest  # noqa: E402

from helpers import moving_clip  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole training runs, the full eval run, full-size output (pytest -m slow)")


@pytest.fixture(scope="session")
def tiny():
    """The tiny VLM and VDM (random weights, seed 0). Tests that change them take their own."""
    import model
    return model.load_tiny(seed=0)


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Inputs of every kind: a 40-, 10- and 2-frame clip, an image, a truncated file, a text file."""
    import data
    d = tmp_path_factory.mktemp("inputs")
    data.write_video(str(d / "clip.mp4"), moving_clip(40, 96, 160))
    data.write_video(str(d / "short.mp4"), moving_clip(10, 96, 160))
    data.write_video(str(d / "two.mp4"), moving_clip(2, 96, 160))
    from PIL import Image
    Image.fromarray(moving_clip(1, 90, 120)[0]).save(d / "image.png")
    raw = (d / "clip.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(raw[:len(raw) // 2])
    (d / "notvideo.mp4").write_text("this is not a video\n")
    return d


@pytest.fixture(scope="session")
def no_torch(tmp_path_factory):
    """A PYTHONPATH entry whose `torch` fails to import: a command that still fails with its own
    one-line error under it checked its input before importing torch."""
    d = tmp_path_factory.mktemp("no_torch")
    (d / "torch").mkdir()
    (d / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    return d


@pytest.fixture(scope="session")
def shapes_small(tmp_path_factory):
    """A small Shapes world at 32x64: 16 training and 4 validation samples."""
    import shapes
    d = tmp_path_factory.mktemp("shapes")
    shapes.make_shapes(str(d), 16, 4, 0, height=32, width=64, seed=0, workers=2)
    return d


@pytest.fixture(scope="session")
def tiny_vdm_ckpt(tmp_path_factory):
    """A tiny VDM checkpoint (random weights) for the DiT runs."""
    import checkpoint
    import model
    path = tmp_path_factory.mktemp("vdm") / "ckpt"
    _, vdm = model.load_tiny()
    checkpoint.save_checkpoint(str(path), None, vdm, {"preset": "tiny"}, ("dit", "vae", "text_encoder"))
    return path


@pytest.fixture(scope="session")
def clip():
    """CLIP ViT-B/32 with random (seeded) weights: no CLIP weights exist offline."""
    import rewards
    return rewards.CLIP(None)


@pytest.fixture(scope="session")
def i3d():
    import eval as ev
    import fvd
    return fvd.load_i3d(ev.I3D_PATH)
