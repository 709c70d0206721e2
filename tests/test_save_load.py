"""A saved gtakit folder loads with remote code where gtakit is not importable, and natively after import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_CONFIGS, build_model, layer_spec
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow  # save/load round trips of converted folders in fresh processes


# The start of a child process in which `import gtakit` fails, however the package was installed.
HIDE_GTAKIT = textwrap.dedent(
    """
    import sys, importlib.abc
    class _Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "gtakit" or name.startswith("gtakit."):
                raise ModuleNotFoundError("gtakit hidden for this test")
            return None
    sys.meta_path.insert(0, _Hide())
    sys.path = [p for p in sys.path if p not in ("", ".")]
    try:
        import gtakit  # noqa: F401
        raise SystemExit("gtakit was importable")
    except ModuleNotFoundError:
        pass
    """
)
LOAD_WITHOUT_GTAKIT = HIDE_GTAKIT + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "gtakit" not in type(model).__module__.split(".")[0], type(model).__module__
    ids = torch.load(ids_path, weights_only=True)
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # the field's name before 5.24
    elements = sum(layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel() for layer in cache.layers)
    torch.save({"logits": logits, "generated": out.sequences, "cache_length": cache.get_seq_length(),
                "cache_elements": elements}, out_path)
    """
)


def run_without_gtakit(folder, ids: torch.Tensor, tmp_path) -> dict:
    """Load `folder` with remote code in a process where gtakit cannot be imported; its logits on `ids`, 4 greedy
    tokens after `ids[:1]`, the cache length and the cached elements per token."""
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_GTAKIT)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)


@pytest.mark.parametrize("name", ["gta-g2", "gla2-bias", "mla", "gla-llama3-rope", "ghla-m4-k2-bias"])
def test_load_with_remote_code_without_gtakit(tmp_path, name):
    config = TINY_CONFIGS[name]()
    # A non-default choice of RoPE frequencies must survive the round trip.
    config.gtakit_layers[0]["rope_index"] = layer_spec(config)["rope_index"][::-1]
    model = build_model(config)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "AutoModelForCausalLM" in config["auto_map"] and "AutoConfig" in config["auto_map"]
    for needed in ("configuration_gtakit.py", "attention_gtakit.py", "cache_gtakit.py", "modeling_gtakit.py"):
        assert (folder / needed).exists()

    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    remote = run_without_gtakit(folder, ids, tmp_path)
    with torch.no_grad():
        expected = model(ids).logits
        expected_generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(remote["logits"], expected)
    assert torch.equal(remote["generated"], expected_generated)
    assert remote["cache_length"] == ids.shape[1] + 4 - 1
    assert remote["cache_elements"] == model.kv_cache_elements_per_token()


@pytest.mark.parametrize("name", ["gta-g4-mha-bias", "gla4", "gta-full-rope", "ghla-m1-llama3-rope"])
def test_native_load_after_import_gives_identical_logits(tmp_path, name):
    model = build_model(TINY_CONFIGS[name]())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__module__.startswith("gtakit.")
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for (name_a, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name_a == name_b and torch.equal(a, b), name_a
