"""The command line: streams to stdout, and bad input is exit code 2 with one line on stderr."""

import os
import subprocess
import sys

import checkpoints as ck
import pytest
from checkpoints import DEVICE

IMAGE = os.path.join(ck.IMAGE_DIR, "waterview.jpg")


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "llava_fast", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return ck.write_checkpoint(ck.make_hf_model(seed=4), str(tmp_path_factory.mktemp("cli")), "hub")


def test_generate_streams_the_same_text_as_the_api(ckpt_dir):
    import llava_fast

    r = run("generate", "--model", ckpt_dir, "--image", IMAGE, "--prompt", "Describe it.", "--max-new-tokens", "9",
            "--device", DEVICE)
    assert r.returncode == 0, r.stderr
    expected = llava_fast.load(ckpt_dir, device=DEVICE).generate("Describe it.", IMAGE, max_new_tokens=9)
    assert r.stdout == expected + "\n"
    assert "tokens/s" in r.stderr


def test_generate_default_runs_the_builtin_random_model():
    r = run("generate", "--max-new-tokens", "4", "--device", DEVICE)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr and "tokens/s" in r.stderr


def test_several_images_go_to_their_markers_in_order(ckpt_dir, capsys, monkeypatch):
    """--image twice kept only the last one: a prompt without markers silently answered about one image, and one
    with two markers was refused as "1 image was given". Each --image now joins the list, in order."""
    import llava_fast
    from llava_fast.cli import main

    other = os.path.join(ck.IMAGE_DIR, "extreme_ironing.jpg")
    prompt = "<image> First. <image> Second: which is brighter?"
    model = llava_fast.load(ckpt_dir, device=DEVICE)
    for images in ([IMAGE, other], [other, IMAGE]):
        argv = ["generate", "--model", ckpt_dir, "--prompt", prompt, "--max-new-tokens", "6", "--device", DEVICE]
        code = main(argv + [arg for image in images for arg in ("--image", image)])
        out = capsys.readouterr().out
        assert code == 0 and out == model.generate(prompt, images=images, max_new_tokens=6) + "\n"
        assert model.last_stats["prompt_tokens"] > 2 * model.config.num_image_tokens
    # A marker count that does not match is refused before the weights load, naming both counts.
    monkeypatch.setattr("llava_fast.cli._load", lambda args: pytest.fail("the weights loaded first"))
    code, line = in_process(capsys, "generate", "--model", ckpt_dir, "--image", IMAGE, "--image", other,
                            "--prompt", "Which is brighter?")
    assert code == 2 and line == ("llava-fast: error: the message has 0 <image> markers but 2 images were given; "
                                  "write one <image> in the message where each image goes")
    r = run("chat", "--model", ckpt_dir, "--image", IMAGE, "--image", other, "--max-new-tokens", "3", "--device",
            DEVICE, stdin=f"{prompt}\nAnd now?\n")
    assert r.returncode == 0 and r.stdout.count("\n") == 2, r.stderr


def test_chat_reads_one_turn_per_line(ckpt_dir):
    r = run("chat", "--model", ckpt_dir, "--image", IMAGE, "--max-new-tokens", "5", "--device", DEVICE,
            stdin="Hello\nWhat now?\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip("\n").split("\n")) >= 2


def test_a_refused_chat_turn_keeps_the_conversation(ckpt_dir, capsys, monkeypatch):
    """A bad turn (here one past the context length) ended the whole chat, losing every turn before it: it is one
    error line, the chat goes on as if that turn was never sent, and the exit code still says 2. A later turn's
    typed "<image>" is text, as in a server's text part, not a refused image."""
    import io

    import llava_fast
    from llava_fast.cli import main

    model = llava_fast.load(ckpt_dir, device=DEVICE)
    too_long = "word " * model.context_length
    turns = ["Hello", too_long, "Is <image> a tag?", "What now?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(turn + "\n" for turn in turns)))
    code = main(["chat", "--model", ckpt_dir, "--image", IMAGE, "--max-new-tokens", "5", "--device", DEVICE])
    out, err = capsys.readouterr()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("llava-fast: error:") and "context length" in err, err
    chat = model.chat(IMAGE, max_new_tokens=5)
    assert out == "".join(chat.ask(turn) + "\n" for turn in turns if turn != too_long)


@pytest.mark.parametrize("args, needle", [
    (["--image", "/no/such/image.jpg"], "/no/such/image.jpg"),
    (["--template", "bogus"], "bogus"),
    (["--max-new-tokens", "100000"], "context length"),
    (["--dtype", "float7"], "float7"),
    (["--prompt", "<image> <image>"], "2 <image> markers"),
    (["--temperature", "nan"], "temperature must be a finite number"),
])
def test_bad_input_is_exit_2_and_one_line(ckpt_dir, args, needle):
    base = ["generate", "--model", ckpt_dir, "--image", IMAGE, "--device", DEVICE]
    r = run(*base, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-fast: error:") and needle in lines[0]
    assert "Traceback" not in r.stderr


def test_bad_checkpoint_is_exit_2(tmp_path):
    r = run("generate", "--model", str(tmp_path), "--image", IMAGE)
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr


def in_process(capsys, *args, stdin=None, monkeypatch=None):
    """llava_fast.cli.main in this process (the code that turns errors into exit code 2 and one stderr line)."""
    from llava_fast.cli import main

    if stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_every_subcommand_reports_bad_input_in_one_line(ckpt_dir, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "r.json"
    existing.write_text("{}")
    cases = [
        (["bench", "generate", "--json", str(existing)], f"--json {existing} already exists; pass --overwrite"),
        (["bench", "gemv", "--json", str(existing)], f"--json {existing} already exists; pass --overwrite"),
        (["bench", "real", "--json", str(existing)], f"--json {existing} already exists; pass --overwrite"),
        (["bench", "generate", "--model", "/no/such/dir"], "/no/such/dir: not a checkpoint directory"),
        (["bench", "generate", "--json", str(tmp_path)], f"--json {tmp_path} is a directory"),
        (["bench", "real", "--json", f"{existing}/sub/r.json"], f"{existing} is not a writable directory"),
        (["bench", "real", "--shape", "llava-1.5-7b", "--layers", "4", "--formats", "float32"],
         "holds 3 float32 copies of the weights, 12.9 GB, more than the 8.0 GB of memory available"),
        (["bench", "real", "--shape", "llava-1.5-7b", "--layers", "33"], "llava-1.5-7b has 32 decoder layers"),
        (["bench", "real", "--llama-cpp-build", "avx2"], "--llama-cpp-build 'avx2': expected LABEL=DIR"),
        (["bench", "real", "--llama-cpp-build", f"avx2={tmp_path}"], f"{tmp_path} holds no llama_cpp package"),
        (["bench", "compare", str(existing), "/no/such.json"], "not a llava-fast bench result"),
        (["bench", "kernel"], "unknown benchmark 'kernel': expected one of generate, kernels, gemv, train, real"),
        (["generate", "--model", "/nope", "--no-image"], "/nope: not a checkpoint directory"),
        (["generate", "--model", ckpt_dir, "--no-image", "--top-k", "-1"], "top_k must be an integer >= 0"),
        (["chat", "--model", ckpt_dir, "--max-new-tokens", "600", "--device", DEVICE], "context length of 512"),
        (["merge-lora", "--adapter", str(tmp_path), "--output", str(tmp_path / "o")], "adapter_config.json"),
        # a byte that is not UTF-8 reaches argv as a lone surrogate; it was a TypeError traceback
        (["generate", "--model", ckpt_dir, "--no-image", "--prompt", "caf\udcff"], "not valid UTF-8: byte 0xff after"),
        (["bench", "gemv", "--isa", "bogus"], "argument --isa: CPU kernels 'bogus' are unknown; use avx512, avx2 or"),
        (["bench", "real", "--isa", "scalar,avx9"], "argument --isa: CPU kernels 'avx9' are unknown"),
        (["bench", "gemv", "--isa", "scalar,avx2,scalar"], "argument --isa: names scalar more than once"),
    ]
    from llava_fast import _C
    from llava_fast.bench import cli as bench_cli

    monkeypatch.setattr(bench_cli, "available_memory_bytes", lambda: 8_000_000_000)
    in_use = _C.cpu_isa_variant()
    for args, needle in cases:
        code, line = in_process(capsys, *args, stdin="Hello there\n", monkeypatch=monkeypatch)
        assert code == 2 and line.startswith("llava-fast: error:") and needle in line, (args, line)
    assert _C.cpu_isa_variant() == in_use  # --isa's check switched back to the table in use


def test_serve_and_generate_flags_are_checked_before_the_model_loads(capsys, monkeypatch):
    """Settings that can never work fail at once in one line (a 7B load would take a minute first)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:  # a port some other program holds
        port = busy.getsockname()[1]
        # The busy port makes a check that let a bad value through fail by its message, not start a server.
        cases = [
            (["serve", "--max-batch", "0"], "--max-batch must be at least 1, got 0"),
            (["serve", "--max-waiting", "-3"], "--max-waiting must be at least 1, got -3"),
            (["serve", "--port", "99999"], "--port must be in 0..65535, got 99999"),
            (["serve", "--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
            (["generate", "--no-image", "--image", IMAGE], "--no-image and --image contradict"),
        ] + [(["serve", f"--{flag}", value, "--port", str(port)], f"--{flag} must be a finite number >= 0, got {shown}")
             for flag in ("image-cache-mb", "shutdown-timeout")
             for value, shown in (("nan", "nan"), ("inf", "inf"), ("-1", "-1.0"))]
        cases += [(["serve", "--api-key", key, "--port", str(port)], "--api-key is empty or has spaces around it")
                  for key in ("", "  ", " key")]
        cases += [(["serve", "--served-model-name", name, "--port", str(port)], "--served-model-name is empty")
                  for name in ("", " ")]
        for args, needle in cases:
            code, line = in_process(capsys, *args, monkeypatch=monkeypatch)
            assert code == 2 and line.startswith("llava-fast: error:") and needle in line, (args, line)


def test_serve_kv_cache_memory_under_one_block_is_refused_before_the_load(capsys, monkeypatch):
    """--kv-cache-memory 1KiB was refused after the load (a minute at 7B), as "kv_cache_memory (1024 bytes) holds no
    block", the keyword's name, not the flag's; the block's size is known from the config."""
    import socket

    import torch

    import llava_fast.cli
    from llava_fast.presets import preset_config
    from llava_fast.serve.kv_memory import KVMemory

    monkeypatch.setattr(llava_fast.cli, "_load", lambda args: pytest.fail("the model loaded"))
    with socket.create_server(("127.0.0.1", 0)) as busy:  # a budget that passes reaches the port's check
        port = str(busy.getsockname()[1])
        for preset in ("tiny", "tiny-next"):
            text = preset_config(preset).text
            blocks = {dtype: KVMemory(text, 1, 32, dtype, 1 << 30).block_bytes for dtype in (torch.float32,
                                                                                             torch.bfloat16)}
            block = min(blocks.values())
            assert block % 1024 == 0  # whole pages
            under = block - 1024
            code, line = in_process(capsys, "serve", "--preset", preset, "--kv-cache-memory", f"{under // 1024}KiB",
                                    "--port", port)
            assert (code, line) == (2, f"llava-fast: error: --kv-cache-memory {under:,} bytes is less than one "
                                       f"block of this model's K/V cache ({block:,} bytes): give at least that")
            code, line = in_process(capsys, "serve", "--preset", preset, "--kv-cache-memory", f"{block // 1024}KiB",
                                    "--dtype", "bfloat16", "--port", port)
            assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in line, line


def test_serve_max_model_len_above_the_context_is_refused_before_the_load(ckpt_dir, capsys, monkeypatch):
    """The context length is in the config: a 7B checkpoint's minute-long load came first, then the refusal."""
    import json

    import llava_fast.cli
    from llava_fast.presets import preset_config

    monkeypatch.setattr(llava_fast.cli, "_load", lambda args: pytest.fail("the model loaded"))
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        context = json.load(f)["text_config"]["max_position_embeddings"]
    tiny_next = preset_config("tiny-next").text.max_position_embeddings
    for args, limit in ((["--model", ckpt_dir], context), (["--preset", "tiny-next"], tiny_next)):
        code, line = in_process(capsys, "serve", *args, "--max-model-len", str(limit + 1), "--port", "0")
        assert (code, line) == (2, f"llava-fast: error: --max-model-len must be from 1 to the model's context "
                                   f"length of {limit} tokens, got {limit + 1}"), args


def test_help_lists_every_subcommand_and_bench_help_renders():
    r = run("--help")
    assert r.returncode == 0
    for name in ("generate", "chat", "serve", "train", "merge-lora", "bench", "make-data", "eval"):
        assert name in r.stdout, name
    r = run("bench", "--help")  # a '%' in a subcommand's help once broke argparse's formatting
    assert r.returncode == 0 and "kernels" in r.stdout, r.stderr


CTRL_C_WHILE_IMPORTING = """
import os, signal, sys


class CtrlC:  # Ctrl-C as torch's import reaches numpy (the first ~1.5 s of every command)
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            os.kill(os.getpid(), signal.SIGINT)


sys.meta_path.insert(0, CtrlC())
from llava_fast.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [["generate", "--max-new-tokens", "2"], ["merge-lora", "--help"]])
def test_ctrl_c_while_torch_imports_exits_130_quietly(args):
    """Ctrl-C in a command's first seconds printed a 30-line traceback from torch's import (or, raised inside
    numpy's extension init, "ImportError: cannot load module more than once per process"), or was lost and the
    command ran on."""
    r = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_IMPORTING, *args], capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (130, "", "")


def test_importing_the_command_line_does_not_import_torch():
    """`llava-fast --help` and a bad command line answer without waiting for torch (1.5-2 s)."""
    r = subprocess.run([sys.executable, "-c", "import sys, llava_fast.cli; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout == "False\n", r.stderr


def test_preset_help_names_every_preset():
    """The help is written out (building the presets imports torch): this keeps it from missing one."""
    import argparse

    from llava_fast.cli import build_parser
    from llava_fast.presets import PRESETS

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("generate", "chat", "serve"):
        text = next(a.help for a in commands[command]._actions if "--preset" in a.option_strings)
        assert [name for name in PRESETS if name not in text] == [], command


def test_model_help_names_every_kind_of_model():
    """The README's --model takes a directory, a .gguf file or smollm2; the help left out the .gguf file."""
    import argparse

    from llava_fast.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("generate", "chat", "serve"):
        text = next(a.help for a in commands[command]._actions if "--model" in a.option_strings)
        assert "checkpoint directory" in text and ".gguf" in text and "--mmproj" in text and "smollm2" in text


def test_arguments_and_files_are_checked_before_the_model_loads(ckpt_dir, tmp_path, capsys, monkeypatch):
    """Everything a command can check without the weights fails before they load: the load itself is made to fail
    here, so a check that came after it would report that instead."""
    import PIL.Image

    from llava_fast.image import loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("llava_fast.cli._load", no_load)
    # --max-image-pixels sets process-wide state (ours and Pillow's): put both back after the test
    monkeypatch.setattr(loading, "_max_image_pixels", loading._max_image_pixels)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", PIL.Image.MAX_IMAGE_PIXELS)
    big = tmp_path / "big.png"
    PIL.Image.new("1", (12000, 12000)).save(big)  # 144 M pixels in an 18 kB file
    small = tmp_path / "small.png"
    PIL.Image.new("RGB", (30, 20)).save(small)
    cases = [
        (["generate", "--max-new-tokens", "100000000"],
         "--max-new-tokens 100000000 does not fit the context length of 2048 tokens"),
        (["generate", "--model", ckpt_dir, "--no-image", "--max-new-tokens", "600"], "context length of 512 tokens"),
        (["chat", "--model", ckpt_dir, "--max-new-tokens", "600"], "context length of 512 tokens"),
        (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["chat", "--image", "/no/such/missing.jpg"], "image file not found: /no/such/missing.jpg"),
        (["generate", "--image", str(big)], "12000x12000 = 144,000,000 pixels, more than the limit of 67,108,864"),
        (["generate", "--image", str(small), "--max-image-pixels", "599"], "30x20 = 600 pixels, more than the limit "
         "of 599 pixels"),
        (["generate", "--max-image-pixels", "0"], "--max-image-pixels must be at least 1, got 0"),
        (["serve", "--max-image-pixels", "-1"], "--max-image-pixels must be at least 1, got -1"),
        (["generate", "--top-p", "0"], "top_p must be a number in (0, 1]"),
        (["chat", "--template", "bogus"], "unknown chat template 'bogus'"),
        (["generate", "--quantize", "int3"], "int3"),
        (["serve", "--quantize", "int3"], "int3"),
        (["serve", "--preset", "huge"], "unknown preset 'huge'"),
        (["serve", "--dtype", "float7"], "float7"),
        (["generate", "--vision-tower", "/clip"], "--vision-tower goes with an original-LLaVA --model checkpoint, not "
         "the built-in preset 'tiny'"),  # it was ignored
        (["serve", "--vision-tower", "/clip"], "not the built-in preset 'tiny'"),
        (["train", "--stage", "1", "--model", ckpt_dir, "--data", "d.json", "--output", str(tmp_path / "run"),
          "--max-image-pixels", "0"], "--max-image-pixels must be at least 1, got 0"),
    ]
    data = tmp_path / "data.json"
    data.write_text("[]")
    train = ["train", "--stage", "2", "--model", ckpt_dir, "--output", str(tmp_path / "run")]
    cases += [  # the trainer and merge-lora: their base model loads through train.checkpoint, made to fail too
        (train + ["--data", str(tmp_path / "nope.json")], f"--data {tmp_path / 'nope.json'}: file not found"),
        (train + ["--data", str(data), "--image-folder", "/no/such/dir"], "--image-folder /no/such/dir: not a "
         "directory"),
        (train + ["--data", str(data), "--template", "bogus"], "unknown chat template 'bogus'"),
        (train + ["--data", str(data), "--device", "bogus"], "unknown device 'bogus'"),
        (["merge-lora", "--adapter", str(tmp_path), "--output", str(tmp_path / "o"), "--device", "bogus"],
         "unknown device 'bogus'"),
    ]
    monkeypatch.setattr("llava_fast.train.checkpoint.load_base", no_load)
    for args, needle in cases:
        code, line = in_process(capsys, *args, stdin="", monkeypatch=monkeypatch)
        assert code == 2 and line.startswith("llava-fast: error:") and needle in line, (args, line)


def test_an_unknown_flag_is_reported_by_its_subcommand(capsys):
    """argparse hands a subcommand's unknown flags to the top-level parser, which showed its own usage."""
    from llava_fast.cli import main

    for argv, prog, unknown in ((["generate", "--foo"], "llava-fast generate", "--foo"),
                                (["chat", "--foo", "1"], "llava-fast chat", "--foo 1"),
                                (["make-data", "captions", "--input", "a", "--output", "b", "--foo"],
                                 "llava-fast make-data captions", "--foo")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, err
        assert err == f"{prog}: error: unrecognized arguments: {unknown} (see {prog} --help)\n", err
    code, line = in_process(capsys, "bench", "generate", "--foo")  # bench words its errors as one line
    assert code == 2 and line == "llava-fast: error: llava-fast bench generate: unrecognized arguments: --foo", line


def test_a_bad_command_line_is_one_line_in_every_subcommand(capsys):
    """argparse's own errors (a type, a choice, a missing required flag) printed its whole usage block before the
    error line (4 to 22 lines); every bad input gets one line and exit 2."""
    from llava_fast.cli import main

    for argv, prog, needle in ((["generate", "--seed", "abc"], "llava-fast generate", "invalid int value: 'abc'"),
                               (["generate", "--max-new-tokens", "1.5"], "llava-fast generate", "'1.5'"),
                               (["serve", "--port", "abc"], "llava-fast serve", "invalid int value"),
                               (["merge-lora"], "llava-fast merge-lora", "required: --adapter"),
                               (["train", "--stage", "1"], "llava-fast train", "required: --model"),
                               (["make-data", "instruct", "--type", "bogus"], "llava-fast make-data instruct",
                                "invalid choice: 'bogus'"),
                               (["eval", "nosuch"], "llava-fast eval", "invalid choice: 'nosuch'"),
                               ([], "llava-fast", "required: command")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, (argv, err)
        assert err.startswith(f"{prog}: error: ") and needle in err and "usage" not in err, (argv, err)


def test_gguf_vision_flags_are_checked_before_the_load(capsys, tmp_path):
    """--mmproj without a GGUF model was ignored; an image for a GGUF text model was refused only after the load."""
    fake = tmp_path / "text.gguf"
    fake.write_bytes(b"")  # never read: both checks come first
    code, line = in_process(capsys, "generate", "--mmproj", str(tmp_path / "missing.gguf"))
    assert code == 2 and "--mmproj goes with a --model .gguf text model" in line, line
    code, line = in_process(capsys, "generate", "--model", str(fake), "--mmproj", str(tmp_path / "missing.gguf"))
    assert code == 2 and "missing.gguf: file not found" in line, line
    image = os.path.join(os.path.dirname(os.path.dirname(__file__)), "llava_fast", "assets", "extreme_ironing.jpg")
    code, line = in_process(capsys, "generate", "--model", str(fake), "--image", image)
    assert code == 2 and "is a GGUF text model with no vision tower" in line and "--mmproj FILE" in line, line


def test_model_and_preset_together_are_refused_before_the_load(ckpt_dir, tmp_path, capsys, monkeypatch):
    """--preset picks a random-weight model in place of a checkpoint: beside --model it was ignored without a
    word (`serve --model ckpt --preset tiny-next` served the checkpoint). Each command that takes both refuses
    the pair before anything loads; --preset alone and neither (the tiny preset) still work."""
    import llava_fast.cli
    from llava_fast.errors import LlavaFastError

    monkeypatch.setattr(llava_fast.cli, "_load", lambda args: pytest.fail("the model loaded"))
    both = ["--model", ckpt_dir, "--preset", "tiny-next"]
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "image": "a.jpg", "text": "What?"}\n')
    for args in (["generate", *both, "--no-image"], ["chat", *both], ["serve", *both, "--port", "0"],
                 ["eval", "llava-bench", "answer", *both, "--questions", str(questions), "--images", str(tmp_path),
                  "--output", str(tmp_path / "a.jsonl")]):
        code, line = in_process(capsys, *args, stdin="Hi\n", monkeypatch=monkeypatch)
        assert code == 2 and line.startswith("llava-fast: error:"), (args, line)
        assert f"--model {ckpt_dir} and --preset tiny-next contradict each other" in line, (args, line)

    def load(args):  # where the load would start: the preset it would build
        raise LlavaFastError(f"would build the {args.preset} preset")

    monkeypatch.setattr(llava_fast.cli, "_load", load)
    for preset, name in ((["--preset", "tiny-next"], "tiny-next"), ([], "tiny")):
        code, line = in_process(capsys, "generate", *preset, "--no-image", monkeypatch=monkeypatch)
        assert (code, line) == (2, f"llava-fast: error: would build the {name} preset")
