"""One vLLM engine, in vLLM's own virtual environment: the worker half of `benchmarks/vllm_serve.py`.

    .venv-vllm/bin/python benchmarks/_vllm_worker.py SPEC.json RESULT.json

SPEC.json (written by `vllm_serve.py`): `model` (a checkpoint folder), `prompt_token_ids` (lists of ids for the
greedy check), `check_tokens`, `decode_prompt_token_ids`, `decode_tokens`, `dtype`, `enforce_eager`, `seed`,
`max_model_len`, and optionally `trust_remote_code` and `model_impl`. RESULT.json: the engine start time
(construction of `LLM`), the KV-cache capacity from the engine's cache config, the greedy token ids, the timed
generation, and vLLM / torch / transformers versions.

Imports only the standard library at module level: vLLM's engine process is spawned and re-imports this file, so
everything that starts an engine runs under `if __name__ == "__main__":`. `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache
on CPU) is set by the parent in the environment.
"""

from __future__ import annotations

import json
import sys
import time


def run(spec: dict) -> dict:
    import torch
    import transformers
    import vllm
    from vllm import LLM, SamplingParams

    kwargs = {
        "model": spec["model"],
        "dtype": spec["dtype"],
        "seed": spec["seed"],
        "enforce_eager": spec["enforce_eager"],
        "max_model_len": spec["max_model_len"],
        "trust_remote_code": spec.get("trust_remote_code", False),
    }
    for optional in ("model_impl", "skip_tokenizer_init"):
        if spec.get(optional):
            kwargs[optional] = spec[optional]
    start = time.perf_counter()
    llm = LLM(**kwargs)
    engine_start_s = time.perf_counter() - start

    vllm_config = llm.llm_engine.vllm_config
    cache = vllm_config.cache_config
    model_config = vllm_config.model_config
    arch = model_config.model_arch_config
    layers = model_config.get_total_num_hidden_layers()
    result: dict = {
        "versions": {
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "engine_kwargs": kwargs,
        "engine_start_s": round(engine_start_s, 2),
        # set by the engine core from the KV cache it allocated (vllm/v1/core/kv_cache_utils.py
        # `update_kv_cache_capacity`) and copied to the front end's config at the handshake
        "kv_cache_size_tokens": getattr(cache, "kv_cache_size_tokens", None),
        "kv_cache_max_concurrency": getattr(cache, "kv_cache_max_concurrency", None),
        "num_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "max_model_len": model_config.max_model_len,
        "architecture": model_config.architecture,
        "kv_heads_per_layer": [
            model_config.get_num_kv_heads(vllm_config.parallel_config, arch[i]) for i in range(layers)
        ],
        "attention_heads": model_config.get_num_attention_heads(vllm_config.parallel_config),
        "head_size": model_config.get_head_size(),
    }

    def generate(prompts: list[list[int]], max_tokens: int, ignore_eos: bool):
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos, seed=spec["seed"]
        )
        inputs = [{"prompt_token_ids": ids} for ids in prompts]
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs], time.perf_counter() - start

    # Greedy check: stops at the end-of-sequence token as transformers' generate() does.
    result["greedy_tokens"], _ = generate(spec["prompt_token_ids"], spec["check_tokens"], ignore_eos=False)

    # Throughput: a warm-up, then one prefill-only pass (1 new token) and the full pass; the difference is decode.
    decode_prompts, n = spec["decode_prompt_token_ids"], spec["decode_tokens"]
    if not decode_prompts:
        return result
    generate(decode_prompts, n, ignore_eos=True)
    _, prefill_s = generate(decode_prompts, 1, ignore_eos=True)
    produced, total_s = generate(decode_prompts, n, ignore_eos=True)
    new_tokens = sum(len(t) for t in produced)
    result["throughput"] = {
        "prompts": len(decode_prompts),
        "new_tokens_per_prompt": n,
        "new_tokens": new_tokens,
        "generate_s": round(total_s, 3),
        "first_token_s": round(prefill_s, 3),
        "generate_tokens_per_s": round(new_tokens / total_s, 2),
        "decode_tokens_per_s": round((new_tokens - len(decode_prompts)) / max(total_s - prefill_s, 1e-9), 2),
    }
    return result


if __name__ == "__main__":
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        outcome = run(json.load(f))
    with open(result_path, "w") as f:
        json.dump(outcome, f, indent=2)
