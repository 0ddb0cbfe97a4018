"""Uptraining on several processes: FSDP2, FSDP1 and DDP under `accelerate launch`, 2 CPU processes over gloo.

Every test converts a tiny random model (no dropout), saves it, trains it for 20 steps with 2 processes x 2 blocks
per step, and compares with one process x 4 blocks per step (the same global batch: accelerate hands process `r`
the `r`-th half of each batch the single process draws, from the same seeded sampler):

- the loss of every step (`loss_log.jsonl`) agrees within `LOSS_ATOL`;
- the checkpoint the run saves (full weights, or a PEFT adapter) reloads to the logits of the one-process model
  within `LOGIT_ATOL`, and, where the launched script reports them, to the logits of the trained model in rank 0
  within `SAME_WEIGHTS_ATOL`.

Tolerances: everything is float32. Two processes compute each half of the batch in separate, smaller matmuls and
sum the gradients by all-reduce / reduce-scatter, in a different order than one process does, so results differ
in the last bits (~1e-7 relative) and 20 Adam steps carry that along; measured: at most 9.5e-7 between per-step
losses of about 5.5 (a few float32 ulps) and 1.8e-7 between logits. 1e-5 leaves a 10x margin, while a real
mismatch (another global batch, another data order, gradients summed instead of averaged, an unsharded save)
moves the losses by far more: one process with 2 blocks per step instead of 4 differs by 3e-3 at step 1 and up to
0.026 over the 20 steps. The same bound holds for FSDP2, FSDP1 and DDP, full weights and LoRA (all measured at most
9.5e-7).

`test_fsdp2_cli_full_matches_one_process` runs by default (measured 37 s, 46 s with other jobs running, on a shared
2-core machine; most of it the two processes starting); the six others are `slow` (27-47 s each; 235 s for the
whole file). The file also runs as the script the API tests launch (`accelerate launch tests/test_distributed.py
...`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
FSDP_YAML = REPO / "examples" / "accelerate" / "fsdp.yaml"
DDP_YAML = REPO / "examples" / "accelerate" / "ddp.yaml"
STEPS = 20
BLOCK = 32
LOSS_ATOL = 1e-5
LOGIT_ATOL = 1e-5
SAME_WEIGHTS_ATOL = 1e-6  # the same weights, scored in another process (another thread count)


def probe_ids() -> torch.Tensor:
    return torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(7))


def api_run(model_dir: Path, text: Path, out: Path, method: str, batch_size: int, merge: bool) -> None:
    """What the launched script does (and the one-process reference): `hf_gqa.uptrain` on the saved converted
    model; the main process saves the result to `out/model`, its logits on `probe_ids()` to `out/logits.pt`, and
    how the decoder layers were held during training to `out/sharding.json`."""
    from accelerate import PartialState
    from transformers import AutoTokenizer, TrainerCallback

    import hf_gqa

    class Sharding(TrainerCallback):
        """Records, at the first step, whether the decoder layers are FSDP2 units and the shard of a weight."""

        def __init__(self) -> None:
            self.seen: dict = {}

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if self.seen or model is None:
                return
            from torch.distributed.fsdp import FSDPModule
            from torch.distributed.tensor import DTensor

            layers = [m for m in model.modules() if type(m).__name__.startswith("FSDP") and m is not model]
            weight = next(p for n, p in model.named_parameters() if "layers.0." in n or ".h.0." in n)
            self.seen = {
                "root_fsdp2": isinstance(model, FSDPModule),
                "units": sorted({type(m).__name__ for m in layers}),
                "dtensor": isinstance(weight, DTensor),
                "local_rows": weight.to_local().shape[0] if isinstance(weight, DTensor) else weight.shape[0],
                "full_rows": weight.shape[0],
            }

    model = hf_gqa.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sharding = Sharding()
    trained = hf_gqa.uptrain(
        model,
        tokenizer,
        text,
        method=method,
        max_steps=STEPS,
        block_size=BLOCK,
        merge_adapter=merge,
        output_dir=str(out),
        callbacks=[sharding],
        per_device_train_batch_size=batch_size,
        logging_steps=1,
        disable_tqdm=True,
    )
    state = PartialState()
    if state.is_main_process:
        with torch.no_grad():
            torch.save(trained(input_ids=probe_ids()).logits, out / "logits.pt")
        trained.save_pretrained(out / "model")
        (out / "sharding.json").write_text(json.dumps(sharding.seen))
    else:  # the other processes get no weights back
        assert all(p.device.type == "meta" for p in trained.parameters()) or not sharding.seen.get("dtensor")
    state.wait_for_everyone()


# -- helpers ---------------------------------------------------------------------------------------------------
def converted_model(tmp_path: Path, family: str, groups: int = 2) -> tuple[Path, Path]:
    """A tiny random model of `family` (no dropout) converted to `groups` KV heads, saved with a byte tokenizer;
    and a text file of 172 blocks of 32 tokens."""
    import hf_gqa
    from tests.cases import all_cases
    from tests.test_training import TEXTS, byte_tokenizer, zero_dropout

    case = next(c for c in all_cases() if c.name == family)
    model_dir, text = tmp_path / family, tmp_path / "corpus.txt"
    model = hf_gqa.patch(zero_dropout(case.make()), groups=groups)
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text.write_text("\n\n".join(TEXTS * 8))
    return model_dir, text


def environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def launch(config: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file config --num_processes 2 args...`, which must succeed."""
    command = [str(ACCELERATE), "launch", "--config_file", str(config), "--num_processes", "2", *args]
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def cli_args(model_dir: Path, text: Path, out: Path, method: str, batch_size: int, *extra: str) -> list[str]:
    return [
        *("uptrain", "--model", str(model_dir), "--data", str(text), "--method", method),
        *("--steps", str(STEPS), "--block-size", str(BLOCK), "--batch-size", str(batch_size)),
        *("--logging-steps", "1", "--out", str(out), "--no-progress", *extra),
    ]


def one_process_cli(args: list[str]) -> None:
    from hf_gqa.cli import main

    assert main(args) == 0


def step_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines() if line.strip()]
    return [row["loss"] for row in rows if "loss" in row]


def assert_same_losses(two: Path, one: Path, atol: float = LOSS_ATOL) -> None:
    a, b = step_losses(two), step_losses(one)
    assert len(a) == len(b) == STEPS
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


def assert_trained(model, start: Path) -> None:
    """The trained `model` computes other logits than the converted model it started from."""
    assert (logits_of(model) - logits_of(reloaded(start))).abs().max() > 1e-3


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=probe_ids()).logits


def reloaded(out: Path, base: Path | None = None):
    """The checkpoint in `out`: full weights (`hf_gqa.from_pretrained`), or a PEFT adapter on the converted `base`."""
    import hf_gqa

    if base is None:
        return hf_gqa.from_pretrained(out)
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_gqa.from_pretrained(base), out)


needs_launcher = pytest.mark.skipif(
    not ACCELERATE.exists() or not torch.distributed.is_gloo_available(),
    reason="needs the accelerate CLI and torch.distributed with gloo",
)


# -- tests -----------------------------------------------------------------------------------------------------
@needs_launcher
def test_fsdp2_cli_full_matches_one_process(tmp_path):
    """`accelerate launch --config_file examples/accelerate/fsdp.yaml -m hf_gqa.cli uptrain` on a converted Llama:
    FSDP2 over 2 CPU processes trains like one process with the same global batch, and saves full weights."""
    model_dir, text = converted_model(tmp_path, "llama-mha")
    two, one = tmp_path / "two", tmp_path / "one"
    launch(FSDP_YAML, ["-m", "hf_gqa.cli", *cli_args(model_dir, text, two, "full", 2)], tmp_path)
    one_process_cli(cli_args(model_dir, text, one, "full", 4))

    summary = json.loads((two / "uptrain_summary.json").read_text())
    assert (summary["parallel"], summary["processes"]) == ("FSDP2", 2)
    assert json.loads((one / "uptrain_summary.json").read_text())["parallel"] == "none"
    assert_same_losses(two, one)
    first = json.loads((two / "loss_log.jsonl").read_text().splitlines()[0])
    assert first["train_tokens"] == 2 * 2 * BLOCK  # processes x blocks per process x tokens
    trained = reloaded(two)
    assert_trained(trained, model_dir)
    torch.testing.assert_close(logits_of(trained), logits_of(reloaded(one)), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
@needs_launcher
def test_fsdp2_lora_adapter_from_the_python_api(tmp_path):
    """`hf_gqa.uptrain` in a launched script, LoRA under FSDP2: the decoder layers are sharded FSDP2 units while
    training, the main process gets the whole `PeftModel` back, and its saved adapter reloads to its logits."""
    model_dir, text = converted_model(tmp_path, "llama-mha")
    two, one = tmp_path / "two", tmp_path / "one"
    script = [str(Path(__file__)), str(model_dir), str(text), str(two), "lora", "2", "0"]
    launch(FSDP_YAML, script, tmp_path)
    api_run(model_dir, text, one, "lora", 4, merge=False)

    seen = json.loads((two / "sharding.json").read_text())
    assert seen["root_fsdp2"] and seen["dtensor"] and "FSDPLlamaDecoderLayer" in seen["units"], seen
    assert seen["local_rows"] * 2 == seen["full_rows"]  # each process holds half of each decoder layer weight
    assert_same_losses(two, one)
    rank0 = torch.load(two / "logits.pt")
    adapter = reloaded(two / "model", base=model_dir)
    assert (two / "model" / "adapter_config.json").exists()
    assert_trained(adapter, model_dir)
    torch.testing.assert_close(logits_of(adapter), rank0, atol=SAME_WEIGHTS_ATOL, rtol=0)
    torch.testing.assert_close(rank0, torch.load(one / "logits.pt"), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
@needs_launcher
def test_fsdp2_merged_lora_from_the_python_api(tmp_path):
    """`merge_adapter=True` under FSDP2: the main process merges the gathered adapter into a plain model."""
    import hf_gqa

    model_dir, text = converted_model(tmp_path, "llama-mha")
    two = tmp_path / "two"
    launch(FSDP_YAML, [str(Path(__file__)), str(model_dir), str(text), str(two), "lora", "2", "1"], tmp_path)
    merged = reloaded(two / "model")
    assert hf_gqa.is_patched(merged) and not (two / "model" / "adapter_config.json").exists()
    assert_trained(merged, model_dir)
    torch.testing.assert_close(
        logits_of(merged), torch.load(two / "logits.pt"), atol=SAME_WEIGHTS_ATOL, rtol=0
    )
    one = tmp_path / "one"
    api_run(model_dir, text, one, "lora", 4, merge=True)
    torch.testing.assert_close(
        torch.load(two / "logits.pt"), torch.load(one / "logits.pt"), atol=LOGIT_ATOL, rtol=0
    )


@pytest.mark.slow
@needs_launcher
def test_fsdp2_kv_on_gpt2_keeps_query_rows(tmp_path):
    """A multi-head family with a fused q/k/v projection and tied embeddings (GPT-2), `method="kv"` under FSDP2:
    the K/V masks act on the sharded gradients, so the query columns of `c_attn` stay bit-identical."""
    import hf_gqa

    model_dir, text = converted_model(tmp_path, "gpt2")
    two, one = tmp_path / "two", tmp_path / "one"
    launch(FSDP_YAML, ["-m", "hf_gqa.cli", *cli_args(model_dir, text, two, "kv", 2)], tmp_path)
    one_process_cli(cli_args(model_dir, text, one, "kv", 4))

    assert json.loads((two / "uptrain_summary.json").read_text())["parallel"] == "FSDP2"
    assert_same_losses(two, one)
    start, trained = hf_gqa.from_pretrained(model_dir), reloaded(two)
    assert trained.lm_head.weight is trained.transformer.wte.weight
    hidden = start.config.n_embd
    for (name, before), (_, after) in zip(start.named_parameters(), trained.named_parameters()):
        if name.endswith("c_attn.weight"):  # Conv1D [hidden, q | k | v]
            assert torch.equal(before[:, :hidden], after[:, :hidden]), name
            assert not torch.equal(before[:, hidden:], after[:, hidden:]), name
        elif name.endswith("c_attn.bias"):  # [q | k | v]
            assert torch.equal(before[:hidden], after[:hidden]), name
        else:
            assert torch.equal(before, after), name
    torch.testing.assert_close(logits_of(trained), logits_of(reloaded(one)), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
@needs_launcher
def test_ddp_cli_lora_matches_one_process(tmp_path):
    """`examples/accelerate/ddp.yaml`: data parallel over 2 CPU processes, LoRA adapter saved by the main process."""
    model_dir, text = converted_model(tmp_path, "llama-mha")
    two, one = tmp_path / "two", tmp_path / "one"
    launch(DDP_YAML, ["-m", "hf_gqa.cli", *cli_args(model_dir, text, two, "lora", 2)], tmp_path)
    one_process_cli(cli_args(model_dir, text, one, "lora", 4))

    summary = json.loads((two / "uptrain_summary.json").read_text())
    assert (summary["parallel"], summary["processes"]) == ("DDP", 2)
    assert_same_losses(two, one)
    trained = reloaded(two, base=model_dir)
    assert_trained(trained, model_dir)
    torch.testing.assert_close(
        logits_of(trained), logits_of(reloaded(one, base=model_dir)), atol=LOGIT_ATOL, rtol=0
    )


@pytest.mark.slow
@needs_launcher
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp1_cli_matches_one_process(tmp_path, method):
    """FSDP1 (`fsdp_version: 1`, `use_orig_params`, no module-state broadcast on CPU) trains alike too."""
    import yaml

    config = yaml.safe_load(FSDP_YAML.read_text())
    config["fsdp_config"].update(
        fsdp_version=1,
        fsdp_use_orig_params=True,
        fsdp_sync_module_states=False,
        fsdp_sharding_strategy="FULL_SHARD",
    )
    config["fsdp_config"].pop("fsdp_reshard_after_forward")
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text(yaml.safe_dump(config))
    model_dir, text = converted_model(tmp_path, "llama-mha")
    two, one = tmp_path / "two", tmp_path / "one"
    launch(fsdp1, ["-m", "hf_gqa.cli", *cli_args(model_dir, text, two, method, 2)], tmp_path)
    one_process_cli(cli_args(model_dir, text, one, method, 4))

    assert json.loads((two / "uptrain_summary.json").read_text())["parallel"] == "FSDP1"
    assert_same_losses(two, one)
    base = model_dir if method == "lora" else None
    trained = reloaded(two, base=base)
    assert_trained(trained, model_dir)
    torch.testing.assert_close(
        logits_of(trained), logits_of(reloaded(one, base=base)), atol=LOGIT_ATOL, rtol=0
    )


if __name__ == "__main__":  # launched by the API tests: model_dir text out method batch_size merge(0/1)
    sys.path.insert(0, str(REPO))
    model_dir, text, out, method, batch_size, merge = sys.argv[1:7]
    api_run(Path(model_dir), Path(text), Path(out), method, int(batch_size), merge == "1")
