import os

# before any Hugging Face import: a hub lookup offline would otherwise retry for ~46 s
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-output-size tests (deselect with -m 'not slow')")
