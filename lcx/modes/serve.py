"""`--config.mode=serve`: an OpenAI-compatible HTTP server (lcx.serve) on WORKDIR's latest
checkpoint, or on `init.hf_checkpoint` when WORKDIR has none, until SIGTERM / Ctrl-C."""

from __future__ import annotations

import os
import sys

from lcx.errors import UserError
from lcx.settings import Settings, resolve


def load_model(config: Settings, workdir: str):
    """(model, tokenizer, where from): the workdir's checkpoint, else init.hf_checkpoint."""
    from lcx.train.model_source import tokenizer_of
    from lcx.train.restore import restore_model

    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        model, step, tokenizer = restore_model(config, workdir, with_tokenizer=True)
        return model, tokenizer, f"{workdir} step {step}"
    if config.init.hf_checkpoint:
        from lcx.checkpoints import load_hf

        model = load_hf(config.init.hf_checkpoint, param_dtype=config.model.param_dtype)
        return model, tokenizer_of(config), config.init.hf_checkpoint
    raise UserError(
        f"--workdir {workdir!r} has no checkpoint and init.hf_checkpoint is empty: "
        "nothing to serve; train first or set --config.init.hf_checkpoint=DIR"
    )


def build(config, workdir: str):
    """(app, service, where from) for `config.serve`, not yet listening."""
    from lcx.modes.generate import engine_options
    from lcx.serve import Service, make_app

    config = resolve(config)
    sc = config.serve
    for key in ("max_queue", "slots", "max_context", "token_budget"):
        if getattr(sc, key) < (0 if key in ("max_queue", "max_context") else 1):
            raise UserError(
                f"serve.{key}={getattr(sc, key)} must be >= 0 (max_context: 0 is "
                "train.seq_len) and slots, token_budget >= 1"
            )
    model, tokenizer, source = load_model(config, workdir)
    service = Service(
        model,
        tokenizer,
        model_name=sc.model_name or os.path.basename(os.path.normpath(workdir)),
        max_context=sc.max_context or config.train.seq_len,
        slots=sc.slots,
        token_budget=max(sc.token_budget, sc.slots + 1),
        max_waiting=sc.max_queue,
        engine_options=engine_options(config),
    )
    api_key = sc.api_key or os.environ.get("LCX_API_KEY", "")
    return make_app(service, api_key=api_key), service, source


def run(config, workdir: str) -> dict:
    """Serve until SIGTERM / Ctrl-C; what the drain did."""
    from lcx.serve.server import run_server

    config = resolve(config)
    sc = config.serve
    app, service, source = build(config, workdir)
    url = f"http://{sc.host}:{sc.port}/v1"
    print(f"lcx: serving {service.model_name} ({source}) at {url}", file=sys.stderr, flush=True)
    drained = run_server(app, service, host=sc.host, port=sc.port, drain_seconds=sc.drain_seconds)
    return {"model": service.model_name, "url": url, **drained}


def summary(result: dict, workdir: str) -> str:
    """Where it served and how the drain went."""
    del workdir
    drain = ""
    if "in_flight" in result:
        drain = (
            f": {result['in_flight']} requests in flight at shutdown, "
            f"{result['aborted']} aborted after {result['seconds']} s"
        )
    return f"lcx: stopped serving {result['model']} at {result['url']}{drain}"
