"""Converted checkpoints of the multi-head-only families load without hf_gqa (transformers remote code).

Every multi-head-only family case is converted (per-layer KV heads), saved with `save_pretrained` and, separately,
streamed with `convert_checkpoint`. One subprocess that cannot import hf_gqa (`python -I -S` with this interpreter's
import path less the folders holding hf_gqa: no `.pth` file runs, so neither does the editable install's finder;
it asserts that `import hf_gqa` fails) loads each folder with `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` and writes logits, greedy tokens (dynamic and static cache) and the cache's key shapes, and
with `AutoModel.from_pretrained(path, trust_remote_code=True)` (the base model) and writes its hidden states; this
process compares them with the converted model in memory. Natively-GQA families must stay standard checkpoints.

vLLM's Transformers backend builds the `AutoModel` class and calls its attention modules through a function of its
own; `test_base_models_meet_vllms_attention_contract` checks what it requires (read from vLLM 0.32's source: see
benchmarks/results/vllm.md) without vLLM.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

import hf_gqa
from hf_gqa.architectures import ADAPTERS
from hf_gqa.attention import set_attention
from hf_gqa.remote import KV_HEADS_KEYS, add_remote_code, kv_heads_config, modeling_hf_gqa, remote_class_name
from hf_gqa.streaming import convert_checkpoint

from .cases import FamilyCase, all_cases

MHA_CASES = [c for c in all_cases() if not c.native_gqa]
NATIVE = {c.name: c for c in all_cases() if c.native_gqa}
NEW_TOKENS = 8
#: Cases whose transformers class generates nothing with a static cache, converted or not (Falcon with ALiBi: its
#: bias has the current length, the static cache's keys their full length).
STATIC_UNSUPPORTED = {"falcon-old-alibi"}

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
from transformers import AutoModel, AutoModelForCausalLM

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


def run_static(model, ids):
    # Greedy tokens with a static cache that transformers initializes before the chunked prefill: its shape comes
    # from the config's KV heads (`num_key_value_heads` / `per_layer_config`), not from the first keys.
    with torch.no_grad():
        gen = model.generate(
            ids,
            max_new_tokens=job["new_tokens"],
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
            prefill_chunk_size=4,
            return_dict_in_generate=True,
        )
    return gen.sequences, key_heads(cache_of(gen))


def run_base(path, ids):
    model, info = AutoModel.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "mismatched_keys")), (path, info)
    with torch.no_grad():
        hidden = model.eval()(input_ids=ids).last_hidden_state
    return {"base_class": type(model).__name__, "base_module": type(model).__module__, "hidden": hidden}


results = {}
for label, path in job["folders"].items():
    model, results[label] = run(path, job["ids"], job["padded"], job["mask"], None)
    results[label].update(run_base(path, job["ids"]))
    if label in job["static"]:
        results[label]["static_tokens"], results[label]["static_cache_heads"] = run_static(model, job["ids"])
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
        r["hidden"] = model.base_model(input_ids=x["ids"]).last_hidden_state
    return r


def run_without_hf_gqa(
    folders: dict[str, Path], resave: dict[str, Path], static: list[str], x: dict, work: Path
) -> dict:
    """Load each folder in a child Python that cannot import hf_gqa; its outputs per folder label (`static`: the
    labels whose greedy tokens are also generated with a static cache)."""
    job = {
        "folders": {k: str(v) for k, v in folders.items()},
        "resave": {k: str(v) for k, v in resave.items()},
        "static": static,
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
    static = [f"saved/{c.name}" for c in MHA_CASES if c.name not in STATIC_UNSUPPORTED]
    child = run_without_hf_gqa(folders, resave, static, x, work)
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
    base = modeling_hf_gqa.BASE_MODEL_CLASSES[config["model_type"]].__name__
    assert config["auto_map"] == {
        "AutoModel": f"modeling_hf_gqa.{base}",
        "AutoModelForCausalLM": f"modeling_hf_gqa.{name}",
    }
    assert config["architectures"] == [name]
    heads = per_layer_groups(case)
    assert {k: config[k] for k in KV_HEADS_KEYS if k in config} == kv_heads_config(heads)
    assert (folder / "modeling_hf_gqa.py").read_bytes() == Path(modeling_hf_gqa.__file__).read_bytes()

    got = converted["child"][f"{how}/{case.name}"]
    assert got["class"] == name and got["module"].startswith("transformers_modules.")
    assert got["base_class"] == base and got["base_module"].startswith("transformers_modules.")
    assert_same_outputs(got, converted["expected"][case.name])
    torch.testing.assert_close(got["hidden"], converted["expected"][case.name]["hidden"], atol=1e-5, rtol=0)
    assert got["cache_heads"] == heads and got["generate_cache_heads"] == heads
    if how == "saved" and case.name not in STATIC_UNSUPPORTED:
        assert torch.equal(got["static_tokens"], converted["expected"][case.name]["tokens"])
        assert got["static_cache_heads"] == heads


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
    assert roots <= {"__future__", "collections", "contextlib", "math", "torch", "transformers"}, roots


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


@pytest.mark.parametrize("label", ["saved/gpt2", "streamed/falcon-old-mqa"])
def test_transformers_reads_the_kv_heads_per_layer_from_the_saved_config(converted, label: str):
    """`config.json` states the KV heads in transformers' terms: `num_key_value_heads` when all layers agree, the
    heterogeneous `per_layer_config` otherwise; transformers reads one count per layer either way."""
    folder = converted["folders"][label]
    case = next(c for c in MHA_CASES if c.name == label.split("/")[1])
    heads = per_layer_groups(case)
    config = transformers.AutoConfig.from_pretrained(folder)
    assert [c.num_key_value_heads for c in config.per_layer_config] == heads
    assert getattr(config, "is_heterogeneous", False) == (len(set(heads)) > 1)
    assert config.hf_gqa["kv_heads"] == heads


def test_kv_heads_config():
    assert kv_heads_config([2, 2, 2]) == {"num_key_value_heads": 2}
    layers = kv_heads_config([4, 2] + [1] * 9)["per_layer_config"]
    assert list(layers) == [f"{i:02d}" for i in range(11)]  # zero-padded as transformers writes them
    assert [v["num_key_value_heads"] for v in layers.values()] == [4, 2] + [1] * 9


def test_stale_remote_code_entries_are_dropped_from_a_multi_head_checkpoint(tmp_path):
    """A checkpoint of ours saved again as a plain multi-head model (no hf_gqa metadata) loses the `auto_map` and
    the KV-head entries, which would otherwise tell vLLM it has fewer KV heads than it has."""
    MHA_CASES[0].make().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_hf_gqa.X", "AutoModelForCausalLM": "modeling_hf_gqa.Y"}
    config["num_key_value_heads"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert add_remote_code(tmp_path) == [tmp_path / "config.json"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert not {"auto_map", "num_key_value_heads", "per_layer_config"} & set(config)


# -- vLLM's Transformers backend, without vLLM ---------------------------------------------------------------------
# What vLLM 0.32 requires of the `AutoModel` class (vllm/model_executor/models/transformers/, read from the source):
# `_supports_attention_backend`; per layer one attention module whose forward calls, exactly once, a local assigned
# from `ALL_ATTENTION_FUNCTIONS.get_interface(...)` / `ALL_ATTENTION_FUNCTIONS[...]`, with an integer `layer_idx`
# and `scaling=` a literal or `self.<attribute>`; that call gets vLLM's function, which takes query `[1, H, s, d]`
# and key / value `[1, K, s, d]` (the layer's own K), ignores the mask and returns `[s, H * d]`. Checkpoint keys
# matching the model's `_keys_to_ignore_on_load_unexpected` (searched unanchored) are dropped.
INTERFACE_CASES = [c for c in MHA_CASES if c.name in modeling_hf_gqa.ATTENTION_INTERFACE_FAMILIES]
VLLM_LIKE = "hf_gqa_test_vllm_like"


def interface_call(forward) -> ast.Call:
    """The one call of an attention-interface local in `forward`'s source (vLLM's `interface_call`)."""
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))

    def is_lookup(node):
        node = node.func if isinstance(node, ast.Call) else node
        return (
            isinstance(node, (ast.Attribute, ast.Subscript))
            and isinstance(node.value, ast.Name)
            and node.value.id == "ALL_ATTENTION_FUNCTIONS"
        )

    names = {
        t.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and is_lookup(node.value)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in names
    ]
    assert len(calls) == 1, f"{len(calls)} attention-interface calls"
    return calls[0]


def static_scaling(call: ast.Call, module: torch.nn.Module) -> float:
    """The `scaling=` of the interface call as vLLM resolves it: a literal or `self.<attribute>`."""
    (expr,) = [kw.value for kw in call.keywords if kw.arg == "scaling"]
    if isinstance(expr, ast.Constant):
        return expr.value
    assert isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == "self", (
        f"vLLM cannot resolve scaling={ast.unparse(expr)}"
    )
    return getattr(module, expr.attr)


def vllm_like_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """vLLM's attention function's contract, on torch's SDPA: `query [1, H, s, d]`, `key` / `value` `[1, K, s, d]`,
    causal (the mask is ignored) -> `([s, H * d], None)`."""
    assert query.shape[0] == 1 and key.shape[1] == value.shape[1] == module.num_key_value_heads
    module.seen = (key.shape[1], scaling)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).reshape(query.shape[2], -1), None


@pytest.mark.parametrize("case", INTERFACE_CASES, ids=[c.name for c in INTERFACE_CASES])
def test_base_models_meet_vllms_attention_contract(converted, case: FamilyCase):
    from transformers import AttentionInterface

    AttentionInterface.register(VLLM_LIKE, vllm_like_attention)
    cls = modeling_hf_gqa.BASE_MODEL_CLASSES[case.name]
    base = cls.from_pretrained(converted["folders"][f"saved/{case.name}"]).eval()
    assert cls._supports_attention_backend
    ids = converted["inputs"]["ids"][:1]
    with torch.no_grad():
        want = base(input_ids=ids).last_hidden_state
        base.set_attn_implementation(VLLM_LIKE)
        got = base(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False)
    torch.testing.assert_close(got.last_hidden_state, want, atol=1e-5, rtol=0)

    layers = [m for m in base.modules() if hasattr(m, "num_key_value_groups")]
    assert [m.layer_idx for m in layers] == list(range(len(layers)))
    assert [m.seen[0] for m in layers] == per_layer_groups(case)
    for module in layers:
        call = interface_call(type(module).forward)
        assert static_scaling(call, module) == module.seen[1]

    patterns = [re.compile(p) for p in base._keys_to_ignore_on_load_unexpected]
    keys = converted["models"][case.name].state_dict()
    assert not [k for k in keys if any(p.search(k) for p in patterns)]
