"""lcx as a service: an OpenAI-compatible HTTP API on the serving engine.

`Service` (lcx.serve.service) puts a model's engine in a thread of its own and turns
requests into engine requests and events back into text; `make_app` (lcx.serve.app) is
the FastAPI app with OpenAI's endpoints, errors and SSE streams; `run_server`
(lcx.serve.server) runs it on uvicorn with a graceful drain. `--config.mode=serve`
(lcx.modes.serve) does all three for a workdir.
"""

from lcx.serve.app import make_app
from lcx.serve.service import Service

__all__ = ["Service", "make_app"]
