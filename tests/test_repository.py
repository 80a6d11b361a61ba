"""The repository's own rules: package layering (docs/architecture.md), no references to
design documents outside docs/, and every shell command in the README and docs/ runs."""

import ast
import glob
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# docs/architecture.md, "Layers": bottom to top; a module may import its own layer and
# those below. A module belongs to the longest prefix listed.
LAYERS = (
    (
        "lcx.errors",
        "lcx.attention",
        "lcx.data",
        "lcx.optim",
        "lcx.config_loading",
        "lcx.layers",
        "lcx.lora",  # LoRA adapters and their settings, below the model that holds them
    ),
    ("lcx.cache", "lcx.paged_cache", "lcx.packing", "lcx.plots", "lcx.colab"),
    ("lcx.ttt",),
    ("lcx.model",),
    ("lcx.runtime",),  # mesh, sharding rules, abstract parameters: what the layers above share
    ("lcx.generate",),  # the serving engine: a model in, tokens out; never training's code
    ("lcx.settings",),  # the config resolved into frozen dataclasses, for every layer above
    ("lcx.checkpoints",),
    ("lcx.train",),
    ("lcx.serve",),  # the HTTP layer on the engine (lcx.generate)
    ("lcx.evals",),
    ("lcx.posttrain",),  # fine-tuning recipes over training, generation and evaluation
    ("lcx.modes",),
    ("lcx.main", "lcx.memory", "lcx"),
)


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix of `module`."""
    best, depth = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = index, len(prefix)
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best


def lcx_modules():
    """(module name, path) of every module of the lcx package."""
    for path in sorted(glob.glob(os.path.join(ROOT, "lcx", "**", "*.py"), recursive=True)):
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        yield name.removesuffix(".__init__"), path


def imported_modules(path: str, module: str):
    """(line, imported lcx module) for every import in the file, functions included;
    `from a.b import c` counts as a.b.c when that is a module, else as a.b."""
    modules = {name for name, _ in lcx_modules()}
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative imports
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]  # fmt: skip
        else:
            continue
        for name in names:
            if name == "lcx" or name.startswith("lcx."):
                yield node.lineno, name


def test_no_package_imports_from_a_layer_above_it():
    upward = []
    for module, path in lcx_modules():
        mine = layer_of(module)
        for line, target in imported_modules(path, module):
            if layer_of(target) > mine:
                upward.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_layering_check_catches_an_upward_import(tmp_path):
    path = tmp_path / "pipeline.py"
    path.write_text("def f():\n    from lcx.train.loop import Experiment\n")
    found = list(imported_modules(str(path), "lcx.packing.pipeline"))
    assert found and layer_of("lcx.train.loop") > layer_of("lcx.packing.pipeline")


def repository_files():
    """Tracked and untracked, not ignored, files of the repository."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [f for f in out.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def test_no_file_refers_to_design_documents_outside_docs():
    pattern = re.compile(r"\b(DESIGN|PAPERS|STYLE)\.md\b")
    offenders = []
    for name in repository_files():
        if name.startswith("docs/") or name == "tests/test_repository.py":
            continue
        try:
            text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        except UnicodeDecodeError:
            continue  # binary files (pictures)
        offenders += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not offenders, offenders


# ---- every shell command in the README and docs/ runs ----------------------------------

MARKDOWN = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
SHELL_FENCE = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.M | re.S)


def shell_commands(markdown: str) -> list[list[str]]:
    """The commands of the file's ```bash blocks, continuation lines joined, comments cut."""
    text = open(os.path.join(ROOT, markdown)).read()
    commands = []
    for block in SHELL_FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


DOCUMENTED_PORT = "8000"  # mode=serve's port in the docs; the test serves on a free one


def runnable(words: list[str], tmp: str, port: str = DOCUMENTED_PORT) -> list[str]:
    """A documented command as the test runs it: configs at `:smoke`, workdirs under `tmp`
    (the same documented workdir maps to the same directory), a step count left to smoke,
    the server's port `port`."""
    if words[0] == "curl":
        return [w.replace(f":{DOCUMENTED_PORT}/", f":{port}/") for w in words]
    if words[-1] == "&":  # a server, left running while the commands after it run
        # :smoke trains 64-token rows; the documented requests are for the full config's 256.
        serving = [f"--config.serve.port={port}", "--config.serve.max_context=256"]
        return [*runnable(words[:-1], tmp, port), *serving]
    if words[:2] == ["make", "test"] or (words[0] == "make" and words[1].startswith("test-")):
        return ["make", "-n", *words[1:]]  # the suite cannot run itself: check the recipe only
    if words[:2] == ["make", "train"]:
        return [*words, "CONFIG=configs/lm_tiny.py:smoke", f"WORKDIR={tmp}/runs/lm_tiny"]
    assert words[:2] == ["python", "-m"], f"no rule to run {' '.join(words)!r} in a test"
    out = [sys.executable, "-m"]
    words = iter(words[2:])
    for word in words:
        if word.startswith("--config.train.steps="):
            continue
        if word == "--workdir":
            out += [word, os.path.join(tmp, next(words).strip("/"))]
        elif word == "--config":
            config = next(words)
            out += [word, config if ":" in config else f"{config}:smoke"]
        else:
            out.append(word)
    return out


def test_the_documented_commands_are_found():
    commands = {m: shell_commands(m) for m in MARKDOWN}
    assert ["make", "train"] in commands["README.md"] and ["make", "test"] in commands["README.md"]
    assert sum(map(len, commands.values())) >= 8
    tour = runnable(["python", "-m", "lcx.main", "--config", "configs/a.py", "--workdir",
                     "runs/x", "--config.train.steps=2000"], "/t")  # fmt: skip
    assert tour[2:] == ["lcx.main", "--config", "configs/a.py:smoke", "--workdir", "/t/runs/x"]


def python_blocks(markdown: str) -> list[str]:
    text = open(os.path.join(ROOT, markdown)).read()
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


@pytest.mark.integration
@pytest.mark.parametrize("markdown", [m for m in MARKDOWN if shell_commands(m)])
def test_every_documented_command_runs(markdown, tmp_path):
    """Each command in order; a server (`... &`) stays up for the commands after it and
    the file's OpenAI client snippets, then stops on SIGTERM with exit status 0."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    port, server = str(_free_port()), None
    try:
        for words in shell_commands(markdown):
            command = runnable(words, str(tmp_path), port)
            if words[-1] == "&":
                server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)  # fmt: skip
                _wait_for_health(server, port)
                continue
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=600)  # fmt: skip
            assert done.returncode == 0, f"{markdown}: {' '.join(words)}\n{done.stderr[-3000:]}"
            if command[:2] == ["make", "-n"]:
                assert "pytest" in done.stdout
            if words[0] == "curl":
                assert json.loads(done.stdout)["choices"][0]["finish_reason"] in ("stop", "length")
            _check_what_the_mode_left(command, done.stdout)
        for snippet in [b for b in python_blocks(markdown) if "OpenAI(" in b]:
            assert server is not None, f"{markdown}: an OpenAI client snippet and no server"
            exec(snippet.replace(f":{DOCUMENTED_PORT}/", f":{port}/"), {})
        if server is not None:
            server.send_signal(signal.SIGTERM)
            assert server.wait(60) == 0, server.stderr.read()[-3000:]
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()


def _check_what_the_mode_left(command: list[str], stdout: str):
    """`mode=eval` appends its loss to the workdir's metrics; `mode=generate` prints each
    prompt's completion, then the step and the token count."""
    if command[1:3] != ["-m", "lcx.main"]:
        return
    workdir = command[command.index("--workdir") + 1]
    if "--config.mode=eval" in command:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            assert "eval_loss" in f.read().splitlines()[-1]
    if "--config.mode=generate" in command:
        lines = stdout.splitlines()
        assert lines[0].startswith("--- 0: "), stdout[-2000:]
        assert re.fullmatch(r"lcx: step \d+: \d+ tokens for \d+ prompts", lines[-1]), lines[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_health(server, port, seconds=120):
    """Until the server answers /health (or exits: then its error)."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None, server.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the documented server did not come up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def test_the_readme_tour_runs():
    """The README's Python tour, as written."""
    (tour,) = [b for b in python_blocks("README.md") if "packed_attention" in b]
    namespace = {}
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        exec(compile(tour, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert len(namespace["new_tokens"][0]) == 8 and namespace["out"].shape == (1, 8, 2, 16)
