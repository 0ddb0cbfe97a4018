"""The `hf-gqa` command: help, convert end to end, eval and bench on tiny models, and its error messages."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_gqa
import hf_gqa.data
from hf_gqa.cli import main
from tests.tokenizer_fixture import load_tokenizer, tiny_llama


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny 4-head Llama with SmolLM2's tokenizer, saved as a transformers folder."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(num_heads=4).save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def _fail(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["convert", "eval", "bench", "uptrain"])
def test_help_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: hf-gqa {command}" in out and "--groups" in out and "--model" in out


def test_runs_as_a_module():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "hf_gqa.cli", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0 and "convert" in done.stdout and "bench" in done.stdout


def test_convert_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", "--model", str(model_dir), "--groups", "2", "--out", str(out)]) == 0
    assert "saved to" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(out)  # a uniform Llama conversion is a standard checkpoint
    assert loaded.config.num_key_value_heads == 2
    expected = hf_gqa.patch(copy.deepcopy(AutoModelForCausalLM.from_pretrained(model_dir)), groups=2)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
    assert (
        AutoTokenizer.from_pretrained(out)("Hello world").input_ids
        == load_tokenizer()("Hello world").input_ids
    )


def test_convert_per_layer_groups(model_dir, tmp_path):
    out = tmp_path / "per_layer"
    assert (
        main(["convert", "--model", str(model_dir), "--groups", "2,1", "--merge", "first", "--out", str(out)])
        == 0
    )
    loaded = hf_gqa.from_pretrained(out)
    assert [layer.kv_heads_after for layer in hf_gqa.describe(loaded).layers] == [2, 1]


@pytest.mark.parametrize("scope", [None, "attention"])
def test_convert_with_calibration_text(model_dir, tmp_path, scope):
    """`--calibration` runs the data-aware default (score + refine) and matches hf_gqa.patch with the same text;
    `--refine-scope attention` leaves every weight outside attention as it was."""
    text = tmp_path / "corpus.txt"
    text.write_text(hf_gqa.data.calibration_text()[:20000])
    out = tmp_path / "calibrated"
    argv = ["convert", "--model", str(model_dir), "--groups", "1", "--calibration", str(text)]
    argv += ["--calibration-tokens", "1024", "--refine-steps", "5", "--out", str(out)]
    argv += ["--refine-scope", scope] if scope else []
    assert main(argv) == 0
    loaded = hf_gqa.from_pretrained(out)
    assert loaded.config.hf_gqa["merge"] == "score+refine"
    tok = load_tokenizer()
    expected = hf_gqa.patch(
        AutoModelForCausalLM.from_pretrained(model_dir),
        groups=1,
        calibration=text.read_text(),
        tokenizer=tok,
        calibration_tokens=1024,
        refine_steps=5,
        show_progress=False,
        refine_scope=scope or "layer",
    )
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, atol=1e-5, rtol=0)
    original = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    mlp = {k: v for k, v in loaded.state_dict().items() if ".mlp." in k}
    assert mlp and all(torch.equal(v, original[k]) for k, v in mlp.items()) == (scope == "attention")


def test_convert_with_builtin_wikipedia_calibration(model_dir, tmp_path):
    """`--calibration builtin:wikipedia` calibrates on the shipped Wikipedia calibration articles."""
    out = tmp_path / "wiki"
    argv = ["convert", "--model", str(model_dir), "--groups", "1", "--merge", "score"]
    argv += ["--calibration", "builtin:wikipedia", "--calibration-tokens", "512", "--out", str(out)]
    assert main(argv) == 0
    expected = hf_gqa.patch(
        AutoModelForCausalLM.from_pretrained(model_dir),
        groups=1,
        merge="score",
        calibration=hf_gqa.data.calibration_text("wikipedia"),
        tokenizer=load_tokenizer(),
        calibration_tokens=512,
        show_progress=False,
    )
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_gqa.from_pretrained(out)(ids).logits, expected(ids).logits)


def test_convert_calibration_errors(model_dir, tmp_path, capsys):
    err = _fail(
        [
            "convert",
            "--model",
            str(model_dir),
            "--groups",
            "1",
            "--calibration",
            "nope.txt",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert "no such calibration file" in err
    argv = ["convert", "--model", str(model_dir), "--groups", "1", "--out", str(tmp_path)]
    err = _fail(argv + ["--calibration", "builtin:shakespeare"], capsys)
    assert "builtin:shakespeare" in err and "wikipedia" in err
    err = _fail(["convert", "--model", str(model_dir), "--groups", "auto", "--out", str(tmp_path)], capsys)
    assert "--kv-budget" in err


def test_eval_writes_a_report(model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    argv = [
        "eval",
        "--model",
        str(model_dir),
        "--groups",
        "4,2",
        "--tasks",
        "hf_gqa_arc_easy",
        "--limit",
        "2",
    ]
    argv += [
        "--speed-context",
        "16",
        "--speed-new-tokens",
        "2",
        "--speed-repeats",
        "1",
        "--fidelity-tokens",
        "32",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hf_gqa_arc_easy" in printed and "kv=2" in printed
    report = json.loads((out / "report.json").read_text())
    # 4 is the model's own KV head count: the original, evaluated once
    assert [v["name"] for v in report["variants"]] == ["original", "kv=2"]
    assert report["settings"]["command"].startswith("hf-gqa eval --model")
    assert (out / "report.md").exists() and (out / "quality_vs_speed.png").exists()


def test_bench_writes_results(model_dir, tmp_path, capsys):
    argv = ["bench", "--model", str(model_dir), "--groups", "4,2,1", "--batch", "1", "--context", "8"]
    argv += ["--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path), "--name", "tiny"]
    assert main(argv) == 0
    assert "patched / native" in capsys.readouterr().out
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert [r["variant"] for r in data["rows"]] == [
        "original",
        "kv=2 patched",
        "kv=2 native",
        "kv=1 patched",
        "kv=1 native",
    ]
    assert data["settings"]["command"].startswith("hf-gqa bench")


def test_error_missing_model_path(tmp_path, capsys):
    err = _fail(
        ["convert", "--model", str(tmp_path / "nope"), "--groups", "2", "--out", str(tmp_path / "o")], capsys
    )
    assert "hf-gqa convert: error: no such model folder" in err and "Traceback" not in err
    err = _fail(["bench", "--model", str(tmp_path), "--groups", "2"], capsys)
    assert "no config.json" in err


@pytest.mark.parametrize("groups", ["2,x", "0", "", "2,,1"])
def test_error_bad_groups_list(model_dir, tmp_path, groups, capsys):
    err = _fail(["convert", "--model", str(model_dir), "--groups", groups, "--out", str(tmp_path)], capsys)
    assert "argument --groups: invalid groups" in err
    err = _fail(["eval", "--model", str(model_dir), "--groups", groups], capsys)
    assert "argument --groups: invalid groups" in err


def test_error_groups_that_do_not_fit_the_model(model_dir, tmp_path, capsys):
    err = _fail(["convert", "--model", str(model_dir), "--groups", "3", "--out", str(tmp_path)], capsys)
    assert "does not divide the 4 query heads" in err and "[1, 2, 4]" in err


def test_error_unknown_task_lists_the_available_ones(model_dir, capsys):
    err = _fail(["eval", "--model", str(model_dir), "--groups", "2", "--tasks", "hf_gqa_wikipeda"], capsys)
    assert "unknown task 'hf_gqa_wikipeda'" in err and "did you mean: hf_gqa_wikipedia" in err
    for name in ("hf_gqa_wikipedia", "hf_gqa_hellaswag", "hf_gqa_arc_easy", "hf_gqa_winogrande"):
        assert name in err


def test_uptrain_method_choices_match_training_methods():
    """`hf-gqa uptrain --method` lists its choices without importing the Trainer: they must stay
    `hf_gqa.training.METHODS`."""
    from hf_gqa.cli import build_parser
    from hf_gqa.training import METHODS

    uptrain = build_parser()._subparsers._group_actions[0].choices["uptrain"]
    method = next(a for a in uptrain._actions if a.dest == "method")
    assert tuple(method.choices) == METHODS


def test_per_layer_groups_are_spelled_alike_in_every_subcommand(model_dir, tmp_path, capsys):
    """`4:4:2:2` is a per-layer list everywhere; the older comma spelling in `convert` still works, with a note."""
    new = tmp_path / "new"
    assert (
        main(["convert", "--model", str(model_dir), "--groups", "2:1", "--merge", "first", "--out", str(new)])
        == 0
    )
    assert [layer.kv_heads_after for layer in hf_gqa.describe(hf_gqa.from_pretrained(new)).layers] == [2, 1]
    capsys.readouterr()
    old = tmp_path / "old"
    assert (
        main(["convert", "--model", str(model_dir), "--groups", "2,1", "--merge", "first", "--out", str(old)])
        == 0
    )
    assert "now written 2:1" in capsys.readouterr().err
    from hf_gqa.cli.options import groups_variants

    assert groups_variants("4,2:1,auto") == [4, [2, 1], "auto"]


def test_every_subcommand_takes_the_same_conversion_options():
    from hf_gqa.cli import build_parser

    subparsers = build_parser()._subparsers._group_actions[0].choices
    shared = {
        "--merge",
        "--grouping",
        "--calibration",
        "--calibration-tokens",
        "--conversion-seed",
        "--refine-steps",
        "--refine-scope",
        "--kv-budget",
        "--model",
        "--gguf-file",
        "--dtype",
        "--device",
        "--groups",
    }
    for name in ("convert", "eval", "bench", "uptrain"):
        options = {s for a in subparsers[name]._actions for s in a.option_strings}
        assert shared <= options, (name, shared - options)


def test_builtin_text_names_are_one_spelling(capsys):
    from hf_gqa.cli.options import read_sources

    assert read_sources(["builtin"], "calibration") == [hf_gqa.data.calibration_text("mixed")]
    assert read_sources(["builtin:calibration-austen"], "training") == [
        hf_gqa.data.calibration_text("austen")
    ]
    assert read_sources(["builtin:heldout"], "training") == hf_gqa.data.heldout_documents()
    assert read_sources(["builtin:austen"], "calibration") == [hf_gqa.data.calibration_text("austen")]
    assert "builtin:calibration-austen" in capsys.readouterr().err
    assert read_sources(["builtin:austen"], "training") == [hf_gqa.data.train_text("austen")]
    assert "builtin:train-austen" in capsys.readouterr().err


def test_eval_converts_with_calibration_before_loading_checks(model_dir, tmp_path, capsys):
    """A missing calibration file fails before the model is loaded, in eval as in convert."""
    err = _fail(
        ["eval", "--model", str(model_dir), "--groups", "2", "--calibration", str(tmp_path / "no.txt")],
        capsys,
    )
    assert "no such calibration file" in err
    err = _fail(["bench", "--model", str(model_dir), "--groups", "2", "--merge", "nope"], capsys)
    assert "unknown merge 'nope'" in err and "refine" in err


def test_convert_streams_a_safetensors_folder_by_default(model_dir, tmp_path, capsys):
    """Data-free on a local safetensors folder: streamed, the same tensors as loading and patching (--no-stream)."""
    streamed, loaded = tmp_path / "streamed", tmp_path / "loaded"
    assert main(["convert", "--model", str(model_dir), "--groups", "2", "--out", str(streamed)]) == 0
    assert "streamed 2 attention layers" in capsys.readouterr().out
    assert (
        main(["convert", "--model", str(model_dir), "--groups", "2", "--out", str(loaded), "--no-stream"])
        == 0
    )
    a, b = hf_gqa.from_pretrained(streamed).state_dict(), hf_gqa.from_pretrained(loaded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    err = _fail(
        [
            "convert",
            "--model",
            str(model_dir),
            "--groups",
            "auto",
            "--kv-budget",
            "0.5",
            "--out",
            str(loaded),
            "--stream",
            "--calibration",
            "builtin",
        ],
        capsys,
    )
    assert "--stream converts a local safetensors folder" in err and "not --groups auto" in err


def test_lm_eval_command_line_knows_the_model_and_the_offline_tasks(model_dir, tmp_path):
    """`hf-gqa lm-eval <lm-eval's arguments>`: lm-eval's CLI, run in a subprocess, with `hf-gqa` and our tasks."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hf_gqa.cli", "lm-eval"]
    shown = subprocess.run([*command, "run", "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0 and "--model_args" in shown.stdout and "--include_path" in shown.stdout
    out = tmp_path / "results"
    args = [
        "--model",
        "hf-gqa",
        "--model_args",
        f"pretrained={model_dir},groups=2",
        "--tasks",
        "hf_gqa_arc_easy",
    ]
    args += ["--limit", "4", "--device", "cpu", "--batch_size", "2", "--output_path", str(out)]
    done = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "hf_gqa_arc_easy" in done.stdout and "acc" in done.stdout
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["model"] == "hf-gqa" and results["config"]["model_args"]["groups"] == 2
    assert set(results["results"]["hf_gqa_arc_easy"]) >= {"acc,none", "acc_norm,none"}


@pytest.mark.parametrize("command", ["convert", "eval", "bench", "uptrain"])
def test_groups_that_do_not_fit_fail_before_any_weight_loads(
    command, model_dir, tmp_path, capsys, monkeypatch
):
    import hf_gqa.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before --groups was checked")

    monkeypatch.setattr(hf_gqa.loading, "load_model", no_loading)
    argv = [command, "--model", str(model_dir), "--groups", "3"]
    argv += {
        "convert": ["--out", str(tmp_path)],
        "uptrain": ["--data", "builtin:train-austen", "--out", str(tmp_path)],
    }.get(command, [])
    err = _fail(argv, capsys)
    assert "does not divide the 4 query heads" in err


def test_convert_dry_run_prints_the_plan_and_writes_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["convert", "--model", str(model_dir), "--groups", "2", "--out", str(out), "--dry-run"]) == 0
    assert "weights in memory at most about" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize(
    "options", [["--merge", "score"], ["--grouping", "similarity"], ["--refine-steps", "5"]]
)
def test_calibrated_options_without_text_name_the_flag(options, model_dir, tmp_path, capsys):
    err = _fail(
        ["convert", "--model", str(model_dir), "--groups", "2", "--out", str(tmp_path), *options], capsys
    )
    assert "needs calibration text: add --calibration builtin" in err and "tokenizer=" not in err
