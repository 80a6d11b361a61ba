"""lcx's engine against `transformers`' `generate` on the CPU, the same random Llama weights.

    python benchmarks/hf_generate.py            # the BENCHMARKS.md run (both shapes)
    python benchmarks/hf_generate.py --smoke    # seconds
    python benchmarks/hf_generate.py --shapes 768x8 --step_times   # + prefill, decode steps

Needs the `reference` extra (torch and transformers: `make` installs it on Python 3.11);
neither is a run-time dependency of lcx.

For each shape (hidden 256 with 4 layers, hidden 768 with 8 layers; Llama-2's layout:
multi-head attention with head_dim 64, SwiGLU of 8/3 x hidden, vocabulary 32,000),
transformers builds a random `LlamaForCausalLM` and saves it; `lcx.checkpoints.load_hf`
loads the saved files, so both sides hold the same float32 weights. The workload: 32
prompts of random token ids, log-uniform lengths in [16, 270] (long-tailed, mean about
90, the longest 270), 64 greedy new tokens each, no stop token.

- `transformers`: one left-padded batch of all 32 prompts through `model.generate`
  (greedy, its dynamic KV cache, torch's SDPA attention, torch's default threads).
- `lcx_generate`: `lcx.generate.generate`, the continuous-batching engine as a user calls
  it (32 slots; prompt chunks piggybacked on decodes, 256 tokens a step).
- `lcx_prepacked`: the engine's prepacked prefill of the batch (prompts packed first fit
  decreasing into rows as long as the longest, each attending only itself), then its
  decode steps; `lcx_paged` the same with a paged cache of 16-token pages, whose decode
  reads follow each sequence's own length.

Every variant runs once untimed (compilations, torch's first-call costs), then the
variants take turns `--repeats` times, so drift in the machine's speed falls on all of
them; median and spread of the end-to-end seconds (token ids in, token ids out). The
outputs are compared token for token with transformers'.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.generate import spread  # noqa: E402
from lcx.checkpoints import load_hf  # noqa: E402
from lcx.generate import Engine, Request, generate  # noqa: E402

VOCAB = 32_000
# name -> (hidden size, layers); heads of 64, SwiGLU width 8/3 x hidden rounded up to 16.
SHAPES = {"256x4": (256, 4), "768x8": (768, 8)}
SMOKE_SHAPES = {"64x2": (64, 2)}
# Weights drawn with this std (transformers' `initializer_range`; its default is 0.02):
# wider logits put greedy choices far from ties, so float32 rounding on either side
# cannot flip one, and a token-for-token comparison means something.
INIT_STD = 0.1
PAGE_SIZE = 16


def llama_config(hidden: int, layers: int, vocab: int):
    """A Llama-2-layout `transformers.LlamaConfig` of this size, no end-of-text token."""
    import transformers

    mlp = -(-(8 * hidden // 3) // 16) * 16
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
        max_position_embeddings=4096, initializer_range=INIT_STD, bos_token_id=None,
        eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip


def build_pair(directory: str, hidden: int, layers: int, vocab: int, seed: int):
    """(transformers model, lcx model) with the same random weights, via saved files."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = llama_config(hidden, layers, vocab)
    torch_model = transformers.LlamaForCausalLM(config).eval()
    torch_model.generation_config.eos_token_id = None
    torch_model.generation_config.pad_token_id = 0
    torch_model.save_pretrained(directory)
    return torch_model, load_hf(directory)


def make_prompts(rng, n: int, shortest: int, longest: int, vocab: int) -> list[list[int]]:
    """n prompts of random token ids, lengths log-uniform in [shortest, longest], the
    longest always present (so every run pads to the same width)."""
    lengths = np.exp(rng.uniform(math.log(shortest), math.log(longest), n)).astype(int)
    lengths[0] = longest
    return [rng.integers(1, vocab, int(k)).tolist() for k in lengths]


def run_transformers(model, prompts, new_tokens: int) -> list[list[int]]:
    """transformers' greedy `generate` of one left-padded batch; the new tokens."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
    return out[:, width:].tolist()


def prefilled_engine(model, prompts, new_tokens: int, page_size: int | None) -> Engine:
    """An engine (one stretch per slot, or pages) after its prepacked prefill of the batch."""
    length = -(-(max(map(len, prompts)) + new_tokens) // PAGE_SIZE) * PAGE_SIZE
    engine = Engine(model, slots=len(prompts), max_length=length,
                    token_budget=len(prompts) + 1, page_size=page_size)  # fmt: skip
    engine.prefill([Request(p, new_tokens) for p in prompts])
    return engine


def run_engine(model, prompts, new_tokens: int, page_size: int | None) -> list[list[int]]:
    """The engine's prepacked prefill of the whole batch, then its decode steps."""
    results = prefilled_engine(model, prompts, new_tokens, page_size).run()
    return [results[i] for i in range(len(prompts))]


def step_times(model, prompts, new_tokens: int, repeats: int) -> dict:
    """Where lcx's time goes: the prepacked prefill's seconds and each decode step's
    milliseconds, one stretch per slot and paged (an untimed run first; the steps of
    every repeat pooled)."""
    out = {}
    for name, page_size in (("lcx_prepacked", None), ("lcx_paged", PAGE_SIZE)):
        prefill, steps = [], []
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            engine = prefilled_engine(model, prompts, new_tokens, page_size)
            prefill.append(time.perf_counter() - start)
            while not engine.idle:
                start = time.perf_counter()
                engine.step()
                steps.append(1e3 * (time.perf_counter() - start))
            if repeat == 0:  # compilations
                prefill, steps = [], []
        out[name] = {"prefill_seconds": spread(prefill), "decode_step_ms": spread(steps)}
    return out


def variants(torch_model, model, new_tokens: int) -> dict:
    """name -> a function of the prompts that returns each prompt's new tokens."""
    return {
        "transformers": lambda prompts: run_transformers(torch_model, prompts, new_tokens),
        "lcx_generate": lambda prompts: generate(model, prompts, max_new_tokens=new_tokens),
        "lcx_prepacked": lambda prompts: run_engine(model, prompts, new_tokens, None),
        "lcx_paged": lambda prompts: run_engine(model, prompts, new_tokens, PAGE_SIZE),
    }


def agreement(outputs, reference) -> dict:
    """How many sequences equal the reference's, and the share of equal tokens."""
    same = sum(a == b for a, b in zip(outputs, reference, strict=True))
    tokens = np.mean([np.mean(np.asarray(a) == np.asarray(b))
                      for a, b in zip(outputs, reference, strict=True)])  # fmt: skip
    return {"identical_sequences": int(same), "identical_tokens": float(tokens)}


def bench_shape(torch_model, model, prompts, new_tokens: int, repeats: int) -> dict:
    """Each variant's end-to-end seconds (turns, after an untimed run) and agreement."""
    runs = variants(torch_model, model, new_tokens)
    outputs = {name: fn(prompts) for name, fn in runs.items()}  # warm-up
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn(prompts)
            seconds[name].append(time.perf_counter() - start)
    reference = outputs["transformers"]
    out = {
        "prompt_tokens": sum(map(len, prompts)),
        "padded_tokens": len(prompts) * max(map(len, prompts)),
    }
    for name in runs:
        out[name] = {
            "seconds": spread(seconds[name]),
            "tokens_per_sec": len(prompts) * new_tokens / statistics.median(seconds[name]),
            **agreement(outputs[name], reference),
        }
    for name in runs:
        out[name]["speedup"] = (
            out["transformers"]["seconds"]["median"] / out[name]["seconds"]["median"]
        )
    return out


def main(argv=None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--shortest", type=int, default=16, help="prompt tokens")
    parser.add_argument("--longest", type=int, default=270, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="of " + ", ".join(SHAPES))
    parser.add_argument(
        "--step_times", action="store_true",
        help="also time lcx's prefill and each decode step (one stretch, paged)",
    )  # fmt: skip
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    vocab = VOCAB
    if args.smoke:
        shapes, vocab = SMOKE_SHAPES, 512
        args.repeats, args.prompts, args.shortest, args.longest, args.new_tokens = 1, 4, 4, 24, 6
    rng = np.random.default_rng(args.seed)
    prompts = make_prompts(rng, args.prompts, args.shortest, args.longest, vocab)
    results = {"settings": vars(args), "torch_threads": torch.get_num_threads()}
    for name, (hidden, layers) in shapes.items():
        with tempfile.TemporaryDirectory() as directory:
            torch_model, model = build_pair(directory, hidden, layers, vocab, args.seed)
        results[name] = bench_shape(torch_model, model, prompts, args.new_tokens, args.repeats)
        if args.step_times:
            results[name]["steps"] = step_times(model, prompts, args.new_tokens, args.repeats)
        del torch_model, model
    report(results, shapes, argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def report(results, shapes, argv):
    """One markdown table: each shape's variants, seconds, tokens/s, ratio, agreement."""
    print(f"\n`python benchmarks/hf_generate.py {' '.join(argv or sys.argv[1:])}`".rstrip())
    print(f"torch threads: {results['torch_threads']}\n")
    print("| shape | variant | seconds median (min-max) | new tokens/s | x transformers | "
          "sequences identical to transformers' |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        row = results[shape]
        for name in ("transformers", "lcx_generate", "lcx_prepacked", "lcx_paged"):
            r, s = row[name], row[name]["seconds"]
            print(f"| {shape} | {name} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
                  f"{r['tokens_per_sec']:,.0f} | {r['speedup']:.2f}x | "
                  f"{r['identical_sequences']}/{results['settings']['prompts']} |")  # fmt: skip
    timed = [shape for shape in shapes if "steps" in results[shape]]
    if timed:
        print(
            "\n| shape | variant | prefill s median (min-max) | decode step ms median (min-max) |"
        )
        print("|---|---|---|---|")
    for shape in timed:
        for name, row in results[shape]["steps"].items():
            p, d = row["prefill_seconds"], row["decode_step_ms"]
            print(f"| {shape} | {name} | {p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f}) | "
                  f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
