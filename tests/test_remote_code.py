"""Converted checkpoints of the multi-head-only families load without hf_gqa (transformers remote code).

Every multi-head-only family case is converted (per-layer KV heads), saved with `save_pretrained` and, separately,
streamed with `convert_checkpoint`. One subprocess that cannot import hf_gqa (`python -I -S` with this interpreter's
import path less the folders holding hf_gqa: no `.pth` file runs, so neither does the editable install's finder;
it asserts that `import hf_gqa` fails) loads each folder with `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` and writes logits, greedy tokens and the cache's key shapes; this process compares them
with the converted model in memory. Natively-GQA families must stay standard checkpoints.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import hf_gqa
from hf_gqa.architectures import ADAPTERS
from hf_gqa.attention import set_attention
from hf_gqa.remote import add_remote_code, modeling_hf_gqa, remote_class_name
from hf_gqa.streaming import convert_checkpoint

from .cases import FamilyCase, all_cases

MHA_CASES = [c for c in all_cases() if not c.native_gqa]
NATIVE = {c.name: c for c in all_cases() if c.native_gqa}
NEW_TOKENS = 8

# Runs in a Python that cannot import hf_gqa: argv = [import paths (JSON), job file, output file].
CHILD = r"""
import sys, json
sys.path.extend(json.loads(sys.argv[1]))
import importlib.util
assert importlib.util.find_spec("hf_gqa") is None, "hf_gqa is importable in the child"
try:
    import hf_gqa  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("hf_gqa imported in the child")
import torch
from transformers import AutoModelForCausalLM

job = torch.load(sys.argv[2])
torch.set_num_threads(job["threads"])


def cache_of(out):
    return next(out[k] for k in ("cache", "past_key_values") if k in out)


def key_heads(cache):
    return [layer.keys.shape[1] for layer in cache.layers]


def run(path, ids, padded, mask, attn):
    model, info = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, attn_implementation=attn, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (path, info)
    model.eval()
    r = {"class": type(model).__name__, "module": type(model).__module__}
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        r["logits"], r["cache_heads"] = out.logits, key_heads(cache_of(out))
        r["padded_logits"] = model(input_ids=padded, attention_mask=mask).logits
        gen = model.generate(
            ids, max_new_tokens=job["new_tokens"], do_sample=False, return_dict_in_generate=True, pad_token_id=0
        )
        r["tokens"], r["generate_cache_heads"] = gen.sequences, key_heads(cache_of(gen))
        r["padded_tokens"] = model.generate(
            padded, attention_mask=mask, max_new_tokens=job["new_tokens"], do_sample=False, pad_token_id=0
        )
    return model, r


results = {}
for label, path in job["folders"].items():
    model, results[label] = run(path, job["ids"], job["padded"], job["mask"], None)
    eager = run(path, job["ids"], job["padded"], job["mask"], "eager")[1]
    results[label]["eager_padded_logits"] = eager["padded_logits"]
    if label in job["resave"]:  # a remote-code model saves its own code along (transformers' custom_object_save)
        model.save_pretrained(job["resave"][label])
        again = run(job["resave"][label], job["ids"], job["padded"], job["mask"], None)[1]
        results[label]["resaved_logits"] = again["logits"]
assert not [m for m in sys.modules if m.split(".")[0] == "hf_gqa"]
import transformers

torch.save({"transformers": transformers.__version__, "results": results}, sys.argv[3])
"""


def per_layer_groups(case: FamilyCase) -> list[int]:
    """Two layers with different KV head counts where the case allows it (e.g. `[4, 1]`), `[1, 1]` for MQA."""
    return [case.groups[0], case.groups[-1]]


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 200, (2, 10), generator=g)
    padded = torch.randint(3, 200, (2, 10), generator=g)
    mask = torch.ones_like(padded)
    padded[0, :3], mask[0, :3] = 0, 0
    return {"ids": ids, "padded": padded, "mask": mask}


def outputs(model, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the child computes, from the converted model in memory (its attention as `patch` set it, then eager)."""
    r: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        r["logits"] = model(input_ids=x["ids"]).logits
        r["padded_logits"] = model(input_ids=x["padded"], attention_mask=x["mask"]).logits
        r["tokens"] = model.generate(x["ids"], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        r["padded_tokens"] = model.generate(
            x["padded"], attention_mask=x["mask"], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
        implementation = model.config._attn_implementation
        set_attention(model, "eager")
        r["eager_padded_logits"] = model(input_ids=x["padded"], attention_mask=x["mask"]).logits
        set_attention(model, implementation)
    return r


def run_without_hf_gqa(folders: dict[str, Path], resave: dict[str, Path], x: dict, work: Path) -> dict:
    """Load each folder in a child Python that cannot import hf_gqa; its outputs per folder label."""
    job = {
        "folders": {k: str(v) for k, v in folders.items()},
        "resave": {k: str(v) for k, v in resave.items()},
        "threads": torch.get_num_threads(),  # the same as here: the same arithmetic
        "new_tokens": NEW_TOKENS,
        **x,
    }
    torch.save(job, work / "job.pt")
    (work / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # This interpreter's path (site-packages, and any PYTHONPATH entry such as another transformers release) less
    # every folder that holds hf_gqa; `-S` skips the `.pth` files, so the editable install's finder is not there.
    paths = json.dumps([p for p in sys.path if p and not (Path(p) / "hf_gqa").exists()])
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            str(work / "child.py"),
            paths,
            str(work / "job.pt"),
            str(work / "out.pt"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = torch.load(work / "out.pt")
    # the child ran the transformers release tested here (a PYTHONPATH entry included)
    assert out["transformers"] == transformers.__version__
    return out["results"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """Every multi-head-only case converted, saved and streamed; the in-memory outputs, the child's outputs and
    the folders."""
    work = tmp_path_factory.mktemp("remote")
    x = inputs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster on a busy 2-core machine
    try:
        return _convert_and_load(work, x)
    finally:
        torch.set_num_threads(threads)


def _convert_and_load(work: Path, x: dict[str, torch.Tensor]) -> dict:
    folders, expected, models = {}, {}, {}
    for case in MHA_CASES:
        groups = per_layer_groups(case)
        model = hf_gqa.patch(case.make(), groups=groups)
        models[case.name] = model
        folders[f"saved/{case.name}"] = work / "saved" / case.name
        model.save_pretrained(folders[f"saved/{case.name}"])
        case.make().save_pretrained(work / "src" / case.name, max_shard_size="60KB")
        folders[f"streamed/{case.name}"] = work / "streamed" / case.name
        convert_checkpoint(
            work / "src" / case.name, folders[f"streamed/{case.name}"], groups, show_progress=False
        )
        expected[case.name] = outputs(model, x)
    resave = {f"saved/{MHA_CASES[0].name}": work / "resaved"}
    child = run_without_hf_gqa(folders, resave, x, work)
    return {"expected": expected, "child": child, "folders": folders, "models": models, "inputs": x}


def assert_same_outputs(got: dict, want: dict) -> None:
    for key in ("logits", "padded_logits", "eager_padded_logits"):
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)
    for key in ("tokens", "padded_tokens"):
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("how", ["saved", "streamed"])
@pytest.mark.parametrize("case", MHA_CASES, ids=[c.name for c in MHA_CASES])
def test_loads_without_hf_gqa_with_identical_outputs(converted, case: FamilyCase, how: str):
    folder = converted["folders"][f"{how}/{case.name}"]
    config = json.loads((folder / "config.json").read_text())
    name = modeling_hf_gqa.CAUSAL_LM_CLASSES[config["model_type"]].__name__
    assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_hf_gqa.{name}"}
    assert config["architectures"] == [name]
    assert (folder / "modeling_hf_gqa.py").read_bytes() == Path(modeling_hf_gqa.__file__).read_bytes()

    got = converted["child"][f"{how}/{case.name}"]
    assert got["class"] == name and got["module"].startswith("transformers_modules.")
    assert_same_outputs(got, converted["expected"][case.name])
    heads = per_layer_groups(case)
    assert got["cache_heads"] == heads and got["generate_cache_heads"] == heads


def test_a_remote_code_model_saves_again_with_its_code(converted):
    label = f"saved/{MHA_CASES[0].name}"
    got = converted["child"][label]
    torch.testing.assert_close(got["resaved_logits"], got["logits"], atol=0, rtol=0)


@pytest.mark.parametrize("case", MHA_CASES, ids=[c.name for c in MHA_CASES])
def test_hf_gqa_from_pretrained_still_loads_them(converted, case: FamilyCase):
    model = converted["models"][case.name]
    ids = converted["inputs"]["ids"]
    for how in ("saved", "streamed"):
        loaded = hf_gqa.from_pretrained(converted["folders"][f"{how}/{case.name}"])
        assert type(loaded) is type(model) and loaded.config.hf_gqa["kv_heads"] == per_layer_groups(case)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0
            )


@pytest.mark.parametrize("name", ["llama-mha", "falcon-new-mha"])
def test_natively_gqa_checkpoints_stay_standard(name: str, tmp_path, ids):
    case = NATIVE[name]
    model = hf_gqa.patch(case.make(), groups=2)
    model.save_pretrained(tmp_path / "saved")
    case.make().save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "streamed", 2, show_progress=False)
    for folder in (tmp_path / "saved", tmp_path / "streamed"):
        config = json.loads((folder / "config.json").read_text())
        assert "auto_map" not in config and not list(folder.glob("*.py"))
        plain = AutoModelForCausalLM.from_pretrained(folder)
        assert type(plain).__module__.startswith("transformers.models.")
        with torch.no_grad():
            torch.testing.assert_close(
                plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0
            )


def test_per_layer_natively_gqa_checkpoints_need_hf_gqa_and_carry_no_code(tmp_path, caplog):
    """A natively-GQA family with different KV heads per layer has no transformers class to load it, remote or
    built in: it stays an hf_gqa checkpoint (no `auto_map`), loaded with `hf_gqa.from_pretrained`, and saving it
    says so."""
    model = hf_gqa.patch(NATIVE["llama-mha"].make(), groups=[4, 2])
    with caplog.at_level("WARNING", logger="hf_gqa"):
        model.save_pretrained(tmp_path)
    assert "hf_gqa.from_pretrained only" in caplog.text
    assert hf_gqa.needs_hf_gqa_to_load(model) and remote_class_name(model.config) is None
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    assert not list(tmp_path.glob("*.py"))


def test_every_multi_head_only_family_has_a_remote_class_that_reads_the_metadata_written():
    from hf_gqa.patch import FORMAT_VERSION, META_KEY

    assert modeling_hf_gqa.META_KEY == META_KEY and FORMAT_VERSION in modeling_hf_gqa.FORMAT_VERSIONS
    for adapter in ADAPTERS:
        if not adapter.native_gqa:
            for model_type in adapter.model_types:
                assert model_type in modeling_hf_gqa.CAUSAL_LM_CLASSES, model_type


def test_remote_classes_rename_checkpoint_keys_as_their_transformers_classes():
    """transformers skips the key renamings of classes outside it (GPT-NeoX's legacy `embed_out.`) unless they are
    registered: the remote classes get exactly their base classes' transforms."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    for case in MHA_CASES:
        model = hf_gqa.patch(case.make(), groups=per_layer_groups(case))
        with torch.device("meta"):
            remote = modeling_hf_gqa.CAUSAL_LM_CLASSES[model.config.model_type](model.config)
        assert [repr(t) for t in get_model_conversion_mapping(remote)] == [
            repr(t) for t in get_model_conversion_mapping(model)
        ], case.name


def test_the_modeling_file_imports_only_torch_transformers_and_the_standard_library():
    tree = ast.parse(Path(modeling_hf_gqa.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "collections", "math", "torch", "transformers"}, roots


def test_add_remote_code_upgrades_an_older_checkpoint_and_is_idempotent(tmp_path, ids):
    case = MHA_CASES[0]
    model = hf_gqa.patch(case.make(), groups=2)
    type(model).save_pretrained(model, tmp_path)  # what an hf_gqa without remote code wrote
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    assert add_remote_code(tmp_path)
    first = (tmp_path / "config.json").read_text()
    add_remote_code(tmp_path)
    assert (tmp_path / "config.json").read_text() == first and "auto_map" in json.loads(first)
    # the class auto_map names (imported from the package here) holds exactly the saved tensors, computes the same
    cls = modeling_hf_gqa.CAUSAL_LM_CLASSES[model.config.model_type]
    assert cls.__name__ == remote_class_name(model.config)
    remote = cls.from_pretrained(tmp_path).eval()
    assert {k: v.shape for k, v in remote.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    with torch.no_grad():
        torch.testing.assert_close(
            remote(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_the_cli_streamed_conversion_carries_the_code(tmp_path):
    from hf_gqa.cli import main

    MHA_CASES[0].make().save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["convert", "--model", str(tmp_path / "src"), "--groups", "2", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith(
        "modeling_hf_gqa."
    )
    assert (out / "modeling_hf_gqa.py").exists()
