import json

import pytest
import torch
from conftest import search_config
from transformers import AutoModelForCausalLM

from evocomp.cli import main
from evocomp.supernet.sublayers import skip
from evocomp.supernet.units import find_sublayer_units


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "search",
    [
        {"name": "drop-last", "tokens": 128},
        {"name": "sleb", "tokens": 128},
        {"name": "shortgpt", "tokens": 128, "batch_size": 2},
        {
            "name": "evopress",
            "generations": 3,
            "offspring": 4,
            "stages": [{"tokens": 64, "keep": 2}, {"tokens": 128, "keep": 1}],
        },
        {"name": "random", "samples": 4, "tokens": 128},
    ],
)
def test_depth_search_and_export(tmp_path, uneven_model_dir, search):
    cfg = search_config(
        tmp_path,
        uneven_model_dir,
        name=search["name"],
        space={"name": "depth", "remove": 3},
        search=search,
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / search["name"]
    best = json.loads((run / "best.json").read_text())
    assert best["cost"] == best["budget"] == 3
    ev = json.loads((run / "eval.json").read_text())
    print(search["name"], best["genome"], ev["ppl"])
    assert set(ev["ppl"]) == {"dense", "drop-last", "searched"}
    # resume: nothing re-evaluated
    assert main(["-q", "search", "--resume", str(run), "--no-eval"]) == 0
    out = tmp_path / "export"
    assert main(["-q", "export", str(run), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = AutoModelForCausalLM.from_pretrained(uneven_model_dir).eval()
    units = find_sublayer_units(dense)
    removed = [u for u, g in zip(units, best["genome"], strict=True) if g]
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad(), skip(dense, removed):
        want = dense(x, use_cache=False).logits
    with torch.no_grad():
        got = exported(x, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_whole_removed_blocks_leave_the_exported_model(tmp_path, uneven_model_dir):
    cfg = search_config(
        tmp_path,
        uneven_model_dir,
        space={"name": "depth", "remove": 4, "granularity": "block"},
        search={"name": "sleb", "tokens": 128},
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    best = json.loads((run / "best.json").read_text())
    out = tmp_path / "export"
    assert main(["-q", "export", str(run), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.num_hidden_layers == 2 and len(exported.model.layers) == 2
    assert len(json.loads((out / "evocomp.json").read_text())["removed_blocks"]) == 2
    dense = AutoModelForCausalLM.from_pretrained(uneven_model_dir).eval()
    removed = [u for u, g in zip(find_sublayer_units(dense), best["genome"], strict=True) if g]
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad(), skip(dense, removed):
        want = dense(x, use_cache=False).logits
    with torch.no_grad():
        got = exported(x, use_cache=False).logits
        # The smaller model also generates with a KV cache (layer indices rewritten).
        exported.generate(x[:1, :4], max_new_tokens=3, do_sample=False)
    assert torch.allclose(got, want, atol=1e-5)
