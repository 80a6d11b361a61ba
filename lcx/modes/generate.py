"""`--config.mode=generate`: complete prompts with a workdir's latest checkpoint, streamed.

Only the parameters are restored (`lcx.train.restore.restore_model`: no optimizer state,
no data iterator). Prompts come from `generate.prompts` (several separated by a literal
`\\n` or a newline) or `generate.prompts_file` (one per line); each becomes [BOS] + its
tokens under the run's tokenizer (`data.tokenizer`) and generation stops at EOS. The
first completion streams as its tokens arrive; each later one is printed as soon as those
before it are done, so the output reads in prompt order.

This adapter lives here, above training, so that `lcx.generate` (the engine) never
imports `lcx.train`.
"""

from __future__ import annotations

import os
import sys

from lcx.data.tokenizer import prompt_ids
from lcx.errors import UserError
from lcx.generate.api import generate
from lcx.settings import resolve
from lcx.train.restore import restore_model


def engine_options(config) -> dict:
    """`config.engine` as Engine keyword arguments, a draft model loaded from its
    `draft_checkpoint` (a Hugging Face directory, `lcx.checkpoints.load_hf`)."""
    options = config.engine.engine_options()
    speculative = options["speculative"]
    if speculative and isinstance(speculative.get("draft"), str):
        from lcx.checkpoints import load_hf

        path = speculative["draft"]
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(
                f"engine.draft_checkpoint={path!r} has no config.json: give a Hugging Face "
                "checkpoint directory (mode=export writes one from a workdir)"
            )
        speculative["draft"] = load_hf(path, param_dtype=config.model.param_dtype)
    return options


def read_prompts(gc) -> list[str]:
    """The prompts of a `config.generate`: from the file if given, else the string."""
    if gc.prompts_file:
        if not os.path.isfile(gc.prompts_file):
            raise UserError(f"generate.prompts_file={gc.prompts_file!r} is not a file")
        with open(gc.prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = gc.prompts.replace("\\n", "\n").split("\n")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(
            "no prompts: set --config.generate.prompts='text' (several separated by \\n) or "
            "--config.generate.prompts_file=FILE (one per line)"
        )
    return prompts


def generate_from_workdir(config, workdir: str, out=sys.stdout) -> dict:
    """Complete `config.generate`'s prompts; a summary record {step, prompts, tokens}."""
    config = resolve(config)
    gc = config.generate
    prompts = read_prompts(gc)
    model, step, tokenizer = restore_model(config, workdir, with_tokenizer=True)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    printer = _OrderedPrinter(prompts, tokenizer, out)
    completions = generate(
        model,
        ids,
        max_new_tokens=gc.max_new_tokens,
        temperature=gc.temperature,
        top_k=gc.top_k or None,
        top_p=gc.top_p if gc.top_p < 1 else None,
        seed=gc.seed,
        shared_prefix=True if gc.share_prefix and len(ids) > 1 else None,
        slots=gc.slots or None,
        token_budget=gc.token_budget,
        stop_ids=() if tokenizer.eos_id is None else (tokenizer.eos_id,),
        on_event=printer,
        **engine_options(config),
    )
    return {"step": step, "prompts": len(prompts), "tokens": sum(map(len, completions))}


class _OrderedPrinter:
    """Streams completion 0 live; completion i once 0..i-1 are done."""

    def __init__(self, prompts, tokenizer, out):
        self.prompts, self.tokenizer, self.out = prompts, tokenizer, out
        self.pending = {i: [] for i in range(len(prompts))}
        self.done = set()
        self.current = 0
        self._start(0)

    def _start(self, i):
        """The header of completion i."""
        self.out.write(f"--- {i}: {self.prompts[i]}")
        self.out.flush()

    def _text(self, tokens):
        """Printable text of generated tokens (special ids dropped)."""
        return self.tokenizer.decode(tokens).decode("utf-8", errors="replace")

    def __call__(self, event):
        self.pending[event.request_id].append(event.token)
        if event.done:
            self.done.add(event.request_id)
        if event.request_id == self.current:
            self.out.write(self._text([event.token]))
            self.out.flush()
        while self.current in self.done:
            self.out.write("\n")
            self.current += 1
            if self.current == len(self.prompts):
                break
            self._start(self.current)
            self.out.write(self._text(self.pending[self.current]))
            self.out.flush()


# run(config, workdir) -> {step, prompts, tokens}
run = generate_from_workdir


def summary(result: dict, workdir: str) -> str:
    """The checkpoint's step and how many tokens were generated for how many prompts."""
    del workdir
    tokens, prompts = result["tokens"], result["prompts"]
    return f"lcx: step {result['step']}: {tokens} tokens for {prompts} prompts"
