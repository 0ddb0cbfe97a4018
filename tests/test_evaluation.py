"""compare(), the lm-eval model "hf-gqa", the offline tasks and metrics, bench() and the report files."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

import hf_gqa
from hf_gqa.data import heldout_paragraph
from hf_gqa.evaluation import BUNDLED_TASKS, TASKS_DIR, load_metric, metric_path, task_manager
from hf_gqa.evaluation.bench import bench
from hf_gqa.evaluation.compare import UnknownTaskError, compare
from hf_gqa.evaluation.fidelity import kl_divergence, next_token_agreement
from hf_gqa.evaluation.lm_eval_model import HFGQALM
from hf_gqa.evaluation.report import Report
from tests.tokenizer_fixture import load_tokenizer, tiny_llama

SPEED = {"batch": 1, "context": 16, "new_tokens": 2, "warmup": 0, "repeats": 1}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot to it on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def report(tokenizer) -> tuple[Report, torch.nn.Module, dict]:
    model = tiny_llama(num_heads=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compare(
        model,
        tokenizer,
        groups=[4, 2],
        tasks=["hf_gqa_wikipedia"],
        limit=2,
        speed=SPEED,
        fidelity_tokens=64,
        progress=False,
    )
    return result, model, before


# -- compare -----------------------------------------------------------------------------------------------------------
def test_compare_report_structure(report):
    result, _, _ = report
    assert [v.name for v in result.variants] == ["original", "kv=4 (unchanged)", "kv=2"]
    assert [v.kv_heads for v in result.variants] == [[4, 4], [4, 4], [2, 2]]
    assert result.n_samples == {"hf_gqa_wikipedia": 2}
    metrics = {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for v in result.variants:
        assert set(v.scores["hf_gqa_wikipedia"]) == metrics
        assert v.speed["prefill_tokens_per_s"] > 0 and v.speed["decode_tokens_per_s"] > 0
    assert result.higher_is_better["hf_gqa_wikipedia"] == {m: False for m in metrics}
    # KV bytes per token: 2 layers * 2 (K and V) * kv_heads * head_dim 16 * 4 bytes
    assert [v.kv_bytes_per_token for v in result.variants] == [1024, 1024, 512]
    speed = result.speed_rows()
    assert speed[2]["kv_bytes_ratio"] == 0.5 and speed[0]["decode_ratio"] == 1.0
    rows = result.quality_rows()
    assert len(rows) == 2 * 3 and {r["variant"] for r in rows} == {"kv=4 (unchanged)", "kv=2"}


def test_compare_identity_variant_has_zero_delta(report):
    result, _, _ = report
    rows = [r for r in result.quality_rows() if r["variant"] == "kv=4 (unchanged)"]
    assert rows and all(r["delta"] == 0.0 and r["before"] == r["after"] for r in rows)
    identity = result.variants[1]
    assert identity.fidelity["next_token_agreement"] == 1.0
    assert identity.fidelity["kl_divergence"] == pytest.approx(0.0, abs=1e-7)
    # mean pooling changes a random model: a nonzero delta and KL
    merged = [r for r in result.quality_rows() if r["variant"] == "kv=2"]
    assert any(r["delta"] != 0.0 for r in merged)
    assert result.variants[2].fidelity["kl_divergence"] > 0


def test_compare_leaves_the_model_unchanged(report):
    _, model, before = report
    assert not hf_gqa.is_patched(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_compare_rejects_bad_input_before_running(tokenizer):
    model = tiny_llama(num_heads=4)
    with pytest.raises(hf_gqa.GroupsError):
        compare(model, tokenizer, groups=[3], tasks=["hf_gqa_wikipedia"], limit=1, progress=False)
    with pytest.raises(UnknownTaskError, match="hf_gqa_wikipedia"):  # listed among the bundled tasks
        compare(model, tokenizer, groups=[2], tasks=["hf_gqa_wikipedia", "no_such_task"], progress=False)


def test_report_save_and_reload(report, tmp_path):
    result, _, _ = report
    paths = result.save(tmp_path / "out")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["markdown"].read_text()
    assert "| hf_gqa_wikipedia | word_perplexity" in markdown and "kv=2" in markdown
    data = json.loads(paths["json"].read_text())
    assert {"torch", "transformers", "lm_eval", "hf-gqa"} <= set(data["environment"]["versions"])
    assert data["environment"]["device"] == "cpu"
    assert data["settings"]["dtype"] == "float32" and data["settings"]["limit"] == 2
    assert data["settings"]["tasks"] == ["hf_gqa_wikipedia"] and data["settings"]["seed"] == 1234
    again = Report.load(tmp_path / "out")
    assert again.quality_rows() == result.quality_rows()
    assert "word_perplexity" in str(again)


# -- lm-eval model --------------------------------------------------------------------------------------------------
def _requests() -> tuple[list[Instance], list[Instance]]:
    pairs = [("The cat sat on the", " mat"), ("Anarchism is a political", " philosophy that"), ("", "Hello")]
    ll = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    text = heldout_paragraph(min_chars=600)
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    return ll, rolling


def test_registry_resolves_hf_gqa():
    assert get_model("hf-gqa") is HFGQALM and issubclass(HFGQALM, HFLM)
    assert get_model("hf") is HFLM  # lm-eval's own models still register after ours


def test_hf_gqa_loglikelihoods_equal_hflm_on_the_unpatched_model(tokenizer):
    model = tiny_llama(num_heads=4)
    ll, rolling = _requests()
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=64)
    ours = HFGQALM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=64)
    assert not hf_gqa.is_patched(ours.model)
    assert ours.loglikelihood(ll) == reference.loglikelihood(ll)
    assert ours.loglikelihood_rolling(rolling) == reference.loglikelihood_rolling(rolling)
    unchanged = HFGQALM(
        pretrained=model, tokenizer=tokenizer, groups=4, max_length=64
    )  # the model's own count
    assert not hf_gqa.is_patched(unchanged.model)
    assert unchanged.loglikelihood(ll) == reference.loglikelihood(ll)


def test_hf_gqa_from_a_path_converts(tokenizer, tmp_path):
    model = tiny_llama(num_heads=4)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ll, _ = _requests()
    ours = get_model("hf-gqa")(pretrained=str(tmp_path), groups="2", device="cpu", max_length=64)
    assert hf_gqa.is_patched(ours.model) and ours.model.config.num_key_value_heads == 2
    patched = hf_gqa.patch(copy.deepcopy(model), groups=2)
    reference = HFLM(pretrained=patched, tokenizer=tokenizer, max_length=64)
    state, expected_state = ours.model.state_dict(), patched.state_dict()
    assert state.keys() == expected_state.keys()
    assert all(
        torch.equal(state[k], expected_state[k]) for k in state
    )  # the same conversion, tensor for tensor
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.model(ids).logits, patched(ids).logits)
    got, expected = ours.loglikelihood(ll), reference.loglikelihood(ll)
    # through lm-eval's two model classes the scores differ in float rounding on some machines (1e-6 on an AMD
    # EPYC, bit-equal on others), so: greedy flags exactly, log-likelihoods to float32 precision
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    assert [value for value, _ in got] == pytest.approx([value for value, _ in expected], rel=1e-6, abs=1e-5)
    per_layer = HFGQALM(pretrained=copy.deepcopy(model), tokenizer=tokenizer, groups="2:1", max_length=64)
    assert hf_gqa.describe(per_layer.model).layers[1].kv_heads_after == 1

    import lm_eval  # the documented one-liner: a model name and a model_args string

    out = lm_eval.simple_evaluate(
        model="hf-gqa",
        model_args=f"pretrained={tmp_path},groups=2,max_length=64",
        device="cpu",
        tasks=["hf_gqa_arc_easy"],
        limit=2,
        task_manager=task_manager(["hf_gqa_arc_easy"]),
    )
    assert out["config"]["model"] == "hf-gqa" and "acc,none" in out["results"]["hf_gqa_arc_easy"]


# -- offline tasks ----------------------------------------------------------------------------------------------------
def _yaml(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return yaml.load(path.read_text(), Loader=Loader)


def test_offline_tasks_load_with_task_manager():
    manager = task_manager(list(BUNDLED_TASKS))
    assert set(BUNDLED_TASKS) <= set(manager.all_tasks)
    tasks = manager.load(list(BUNDLED_TASKS))["tasks"]
    sizes = {name: len(list(task.eval_docs)) for name, task in tasks.items()}
    assert sizes == {
        "hf_gqa_wikipedia": 223,
        "hf_gqa_hellaswag": 1000,
        "hf_gqa_arc_easy": 570,
        "hf_gqa_winogrande": 1267,
    }
    wiki = tasks["hf_gqa_wikipedia"]
    doc = next(iter(wiki.eval_docs))
    assert wiki.OUTPUT_TYPE == "loglikelihood_rolling" and wiki.doc_to_target(doc).startswith("= Anarchism =")


def test_offline_tasks_use_lm_eval_prompts_and_metrics():
    import lm_eval

    from hf_gqa.evaluation.tasks import utils

    installed = Path(lm_eval.__file__).parent / "tasks"
    pairs = {
        "hf_gqa_hellaswag": installed / "hellaswag" / "hellaswag.yaml",
        "hf_gqa_arc_easy": installed / "arc" / "arc_easy.yaml",
        "hf_gqa_winogrande": installed / "winogrande" / "default.yaml",
    }
    for ours_name, theirs_path in pairs.items():
        ours, theirs = _yaml(TASKS_DIR / f"{ours_name}.yaml"), _yaml(theirs_path)
        for key in ("output_type", "metric_list", "doc_to_target", "doc_to_choice", "doc_to_text"):
            a, b = ours.get(key), theirs.get(key)
            if isinstance(b, str) and b.startswith("!function"):  # same function name, prefixed with the task
                assert a.rsplit(".", 1)[-1].endswith(b.rsplit(".", 1)[-1]), (ours_name, key)
            else:
                assert a == b, (ours_name, key)

    from lm_eval.tasks.hellaswag import utils as hellaswag_utils
    from lm_eval.tasks.winogrande import preprocess_winogrande as winogrande_utils

    hellaswag = utils.hellaswag()["validation"].select(range(50))
    assert list(utils.hellaswag_process_docs(hellaswag)) == list(hellaswag_utils.process_docs(hellaswag))
    for doc in utils.winogrande()["validation"].select(range(50)):
        assert utils.winogrande_doc_to_text(doc) == winogrande_utils.doc_to_text(doc)
        assert utils.winogrande_doc_to_target(doc) == winogrande_utils.doc_to_target(doc)
        assert utils.winogrande_doc_to_choice(doc) == winogrande_utils.doc_to_choice(doc)


# -- metrics ------------------------------------------------------------------------------------------------------------
def test_metrics_load_offline_and_give_known_values(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    agreement = evaluate.load(metric_path("next_token_agreement"))
    assert agreement.compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4]) == {
        "next_token_agreement": 0.75
    }
    rows = agreement.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[[0.2, 0.7], [0.1, 0.3]])
    assert rows == {"next_token_agreement": 0.5}

    kl = load_metric("kl_divergence")
    assert kl.compute(predictions=[[1.0, 2.0, 3.0]], references=[[1.0, 2.0, 3.0]])[
        "kl_divergence"
    ] == pytest.approx(0.0, abs=1e-7)
    # P = (3/4, 1/4) from logits (ln 3, 0); Q uniform: KL(P || Q) = 3/4 ln(3/2) + 1/4 ln(1/2)
    value = kl.compute(predictions=[[0.0, 0.0]], references=[[math.log(3.0), 0.0]])["kl_divergence"]
    assert value == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)

    logits = torch.randn(5, 7)
    assert next_token_agreement(logits, logits) == 1.0 and kl_divergence(logits, logits) == pytest.approx(
        0, abs=1e-6
    )


# -- bench ---------------------------------------------------------------------------------------------------------------
def test_bench_report_warns_when_runs_spread_too_wide():
    from hf_gqa.evaluation.bench import BenchReport, BenchRow

    def rows(decode_original, decode_patched):
        return [
            BenchRow("original", "original", None, [2, 2], 1, 8, 4, [1.0, 1.0, 1.0], decode_original, 100),
            BenchRow("kv=1 patched", "patched", 1, [1, 1], 1, 8, 4, [1.0, 1.0, 1.0], decode_patched, 50),
        ]

    quiet = BenchReport(rows([2.0, 2.02, 1.99], [1.0, 1.01, 1.0]), {}, {})
    assert quiet.warnings() == [] and "WARNING" not in quiet.table()
    assert quiet.rows[0].decode_spread == pytest.approx(0.03 / 2.0)
    busy = BenchReport(rows([2.0, 2.02, 1.99], [1.0, 1.5, 1.0]), {}, {})
    warnings = busy.warnings()
    assert any(
        w.startswith("kv=1 patched (batch 1, context 8): decode runs 1-1.5 s, 50% apart") for w in warnings
    )
    assert any("speedup over the original x1.35-x2.00" in w for w in warnings)
    assert "WARNING" in busy.table() and "## Warnings" in busy.to_markdown()
    assert busy.to_dict()["warnings"] == warnings


@pytest.mark.parametrize("lockstep", [True, False])
def test_bench_times_original_patched_and_native(lockstep):
    model = tiny_llama(num_heads=4, vocab_size=256)
    result = bench(
        model,
        groups=[4, 2, 1],
        batch=[2],
        context=[8],
        new_tokens=2,
        warmup=1,
        repeats=2,
        prefill_repeats=1,
        lockstep=lockstep,
        progress=False,
    )
    assert all(len(r.prefill_s) == 1 and len(r.decode_s) == 2 for r in result.rows)
    assert result.settings["lockstep"] is lockstep
    assert [(r.variant, r.kind) for r in result.rows] == [
        ("original", "original"),
        ("kv=2 patched", "patched"),
        ("kv=2 native", "native"),
        ("kv=1 patched", "patched"),
        ("kv=1 native", "native"),
    ]
    assert all(diff == 0.0 for diff in result.checks.values()) and len(result.checks) == 2
    kv = {r.variant: r.kv_bytes for r in result.rows}
    # batch 2 * (8 + 2) tokens * 2 layers * 2 (K, V) * kv_heads * 16 * 4 bytes
    assert kv == {
        "original": 20480,
        "kv=2 patched": 10240,
        "kv=2 native": 10240,
        "kv=1 patched": 5120,
        "kv=1 native": 5120,
    }
    native = [r for r in result.rows if r.kind == "native"]
    assert native[0].kv_heads == [2, 2] and native[1].kv_heads == [1, 1]
    summary = result.summary()
    assert [s["groups"] for s in summary] == [2, 1] and summary[0]["decode_patched_over_native"] > 0
    assert not hf_gqa.is_patched(model)
    assert "patched / native" in result.to_markdown()


def test_report_of_the_original_alone_lists_its_scores():
    """`hf-gqa eval --groups <the model's own KV heads>` scores one model: the quality table shows its scores
    (there is no before/after to compare)."""
    from hf_gqa.evaluation.report import Report, Score, VariantResult

    original = VariantResult(
        name="original",
        groups=None,
        kv_heads=[1, 1],
        kv_bytes_per_token=1024,
        scores={"hf_gqa_arc_easy": {"acc": Score(0.446), "acc_norm": Score(0.338, 0.02)}},
    )
    report = Report([original], higher_is_better={"hf_gqa_arc_easy": {"acc": True, "acc_norm": True}})
    lines = [line for line in report.to_markdown().splitlines() if line.startswith("| hf_gqa_arc_easy")]
    assert len(lines) == 2
    assert "acc ↑" in lines[0] and "0.446" in lines[0]
    assert "acc_norm ↑" in lines[1] and "0.338" in lines[1] and "0.02" in lines[1]
    assert "0.446" in str(report)
