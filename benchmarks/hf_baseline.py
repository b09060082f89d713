"""transformers' continuous batching (``generate_batch``) on the engine benchmark's offline workload.

Run as a subprocess of ``benchmarks/engine.py`` so that the two engines never share GPU memory.
Settings: transformers' defaults (``ContinuousBatchingConfig()``, the model's default attention, which
continuous batching switches to a paged implementation), greedy, no EOS, random bf16 weights.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--config", required=True, help="model config.json contents")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.generation import GenerationConfig

    config = LlamaConfig(**{k: v for k, v in json.loads(args.config).items() if k != "architectures"})
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    prompts = [[(r * 131 + j * 7) % 50000 + 1 for j in range(args.prompt_len)] for r in range(args.requests)]
    gen = GenerationConfig(max_new_tokens=args.output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    kwargs = {}
    if "progress_bar" in inspect.signature(model.generate_batch).parameters:
        kwargs["progress_bar"] = False
    model.generate_batch(inputs=prompts[:4], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False,
                                                                               eos_token_id=None, pad_token_id=0),
                         **kwargs)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=gen, **kwargs)
    sync()
    elapsed = time.perf_counter() - t0
    generated = sum(len(getattr(o, "generated_tokens", [])) for o in outputs.values())
    result = {"transformers": transformers.__version__, "settings": "defaults (ContinuousBatchingConfig())",
              "attn_implementation": getattr(model.config, "_attn_implementation", None),
              "requests": args.requests, "seconds": round(elapsed, 2), "output_tokens": generated,
              "output_tokens_per_s": round(generated / elapsed, 1)}
    with open(args.json, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
