"""The README's code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_library_in_one_screen_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["logits"].shape[-1] == 256
    assert int(namespace["state"].step) == 1 and (tmp_path / "model.safetensors").exists()
    assert namespace["cfg"] == namespace["fm"].ModelConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4,
                                                            n_embd=128)


def test_the_metamorphic_kit_example_runs():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
              if "assert_loss_scale_invariant" in b]
    assert len(blocks) == 1, "the README's kit example is missing"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # each assertion raises if its relation fails
    assert float(namespace["batch"].mask.sum()) < float((namespace["batch"].targets != -100).sum())
