"""llava_fast.prompts.chat_template against transformers' apply_chat_template on real templates: SmolLM2's ChatML
(string content) and llava-hf's llava-1.5 template (content parts, images first, `{% generation %}` blocks);
where a checkpoint keeps its template; and the errors a bad template gives."""

import json
import os
import shutil

import checkpoints as ck
import pytest

from llava_fast.errors import CheckpointError, InputError
from llava_fast.prompts.chat_template import ChatTemplate
from llava_fast.prompts.tokenizer import Tokenizer

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
CONVERSATIONS = [
    [{"role": "user", "content": "What is unusual about this image?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Grass? ünïcödé 你好 😀"}],
]


def _parts(conversation, images_in_first_user=1):
    out, pending = [], images_in_first_user
    for message in conversation:
        parts = [{"type": "image"}] * (pending if message["role"] == "user" else 0)
        pending = 0 if message["role"] == "user" else pending
        out.append({"role": message["role"], "content": parts + [{"type": "text", "text": message["content"]}]})
    return out


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(ck.TOKENIZER_DIR)


@pytest.mark.parametrize("name, template, content", [("chatml", ck.CHATML_SMOLLM2, "string"),
                                                      ("llava-1.5-hf", ck.LLAVA_15_HF, "parts")])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers_apply_chat_template(hf_tok, name, template, content, add_generation_prompt):
    ours = ChatTemplate(template, f"{name}.jinja", SPECIALS)
    assert ours.content_format == content
    for conversation in CONVERSATIONS:
        messages = conversation if content == "string" else _parts(conversation)
        expected = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
        assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_message_puts_images_where_the_template_reads_them(hf_tok):
    llava = ChatTemplate(ck.LLAVA_15_HF, "chat_template.json", SPECIALS)
    message = llava.message("user", "<image>\nWhat is this?")
    assert message["content"] == [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    assert llava.render([message]) == "USER: <image>\nWhat is this? ASSISTANT:"
    assert llava.render([message]) == hf_tok.apply_chat_template(
        [message], chat_template=ck.LLAVA_15_HF, tokenize=False, add_generation_prompt=True)
    two = llava.message("user", "<image>\n<image>\nCompare.")
    assert [p["type"] for p in two["content"]] == ["image", "image", "text"]
    chatml = ChatTemplate(ck.CHATML_SMOLLM2, "tokenizer_config.json", SPECIALS)
    assert chatml.message("user", "<image>\nHi") == {"role": "user", "content": "<image>\nHi"}


def test_template_variables_and_helpers():
    text = ("{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
            "{% if add_generation_prompt %}{{ eos_token }}{% endif %}{% generation %}g{% endgeneration %}")
    template = ChatTemplate(text, "t.jinja", SPECIALS)
    assert template.render([{"role": "user", "content": "é\"<"}]) == '<s>"é\\"<"</s>g'
    assert template.render([{"role": "user", "content": "x"}], add_generation_prompt=False) == '<s>"x"g'


def test_a_template_that_raises_names_the_file():
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
              "supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    template = ChatTemplate(strict, "/ckpt/chat_template.jinja")
    with pytest.raises(InputError, match=r"chat template in /ckpt/chat_template.jinja rejected the conversation: "
                                         r"System role not supported"):
        template.render([{"role": "system", "content": "x"}])
    escape = "{{ messages.__class__.__mro__ }}"  # the sandbox refuses Python internals
    with pytest.raises(InputError, match="chat_template.json"):
        ChatTemplate(escape, "chat_template.json").render([{"role": "user", "content": "x"}])
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: the chat template is not valid jinja"):
        ChatTemplate("{% for m in messages %}", "tokenizer_config.json")


def _tokenizer_dir(tmp_path, **files):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ck.TOKENIZER_DIR, name), tmp_path / name)
    for name, content in files.items():
        (tmp_path / name.replace("_dot_", ".")).write_text(content)
    return str(tmp_path)


def test_where_a_checkpoint_keeps_its_template(tmp_path):
    config = json.loads(open(os.path.join(ck.TOKENIZER_DIR, "tokenizer_config.json")).read())
    assert Tokenizer.from_dir(ck.TOKENIZER_DIR).chat_template is None
    listed = {**config, "chat_template": [{"name": "tool_use", "template": "T"},
                                          {"name": "default", "template": ck.CHATML_SMOLLM2}]}
    os.makedirs(tmp_path / "a")
    tok = Tokenizer.from_dir(_tokenizer_dir(tmp_path / "a", tokenizer_config_dot_json=json.dumps(listed)))
    assert tok.chat_template.text == ck.CHATML_SMOLLM2 and tok.chat_template.origin.endswith("tokenizer_config.json")
    os.makedirs(tmp_path / "b")
    tok = Tokenizer.from_dir(_tokenizer_dir(tmp_path / "b", chat_template_dot_json=json.dumps(
        {"chat_template": ck.LLAVA_15_HF})))
    assert tok.chat_template.text == ck.LLAVA_15_HF and tok.chat_template.content_format == "parts"
    assert tok.chat_template.render([{"role": "user", "content": "Hi"}]) == "USER: ASSISTANT:"  # no parts: no text
    os.makedirs(tmp_path / "c")  # chat_template.jinja wins over chat_template.json
    tok = Tokenizer.from_dir(_tokenizer_dir(tmp_path / "c", chat_template_dot_jinja="{{ bos_token }}J",
                                            chat_template_dot_json=json.dumps({"chat_template": "N"})))
    assert tok.chat_template.render([]) == "<s>J"
    os.makedirs(tmp_path / "d")
    bad = {**config, "chat_template": [{"name": "tool_use", "template": "T"}]}
    with pytest.raises(CheckpointError, match="no \"default\" one"):
        Tokenizer.from_dir(_tokenizer_dir(tmp_path / "d", tokenizer_config_dot_json=json.dumps(bad)))
