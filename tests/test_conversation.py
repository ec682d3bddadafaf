"""llava_fast.prompts.templates: exact prompt strings of every template (written out here from the original
repo's conversation.py semantics and llava-hf's chat template), the token ids they produce on the real
tokenizer (computed independently with transformers' LlamaTokenizer, and pinned), segments, stop strings."""

import json
import os

import pytest

from llava_fast.errors import InputError
from llava_fast.prompts.templates import TEMPLATES, default_template_for, format_user_turn, get_template
from llava_fast.prompts.tokenizer import Tokenizer

SYSTEM_USER = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions.")
SYSTEM_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")
SYSTEM_LLAMA_2 = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")

Q1, A1, Q2 = "What is unusual about this image?", "A man is ironing clothes on the back of a taxi.", "Is it safe?"
IMAGE_Q1 = "<image>\n" + Q1
ONE_TURN = [("user", IMAGE_Q1)]
TWO_TURNS = [("user", IMAGE_Q1), ("assistant", A1), ("user", Q2)]

EXPECTED_PROMPTS = {
    "llava_v0": (
        SYSTEM_HUMAN + "###Human: <image>\nWhat is unusual about this image?###Assistant:",
        SYSTEM_HUMAN + "###Human: <image>\nWhat is unusual about this image?###Assistant: A man is ironing clothes "
                       "on the back of a taxi.###Human: Is it safe?###Assistant:"),
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is unusual about this image? "
        "ASSISTANT:",
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is unusual about this image? "
        "ASSISTANT: A man is ironing clothes on the back of a taxi.</s>USER: Is it safe? ASSISTANT:"),
    "llava_v1": (
        SYSTEM_HUMAN + " USER: <image>\nWhat is unusual about this image? ASSISTANT:",
        SYSTEM_HUMAN + " USER: <image>\nWhat is unusual about this image? ASSISTANT: A man is ironing clothes on "
                       "the back of a taxi.</s>USER: Is it safe? ASSISTANT:"),
    "llava_llama_2": (
        "[INST] <<SYS>>\n" + SYSTEM_LLAMA_2 + "\n<</SYS>>\n\n<image>\nWhat is unusual about this image? [/INST]",
        "[INST] <<SYS>>\n" + SYSTEM_LLAMA_2 + "\n<</SYS>>\n\n<image>\nWhat is unusual about this image? [/INST] "
        "A man is ironing clothes on the back of a taxi. </s><s>[INST] Is it safe? [/INST]"),
    "mistral_instruct": (
        "[INST] <image>\nWhat is unusual about this image? [/INST]",
        "[INST] <image>\nWhat is unusual about this image? [/INST] A man is ironing clothes on the back of a taxi. "
        "</s>[INST] Is it safe? [/INST]"),
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is unusual about this "
        "image?<|im_end|><|im_start|>assistant\n",
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is unusual about this "
        "image?<|im_end|><|im_start|>assistant\nA man is ironing clothes on the back of a taxi.<|im_end|>"
        "<|im_start|>user\nIs it safe?<|im_end|><|im_start|>assistant\n"),
    "plain": (
        "<image>\nWhat is unusual about this image?\n",
        "<image>\nWhat is unusual about this image?\nA man is ironing clothes on the back of a taxi.\nIs it safe?\n"),
    "llava_hf": (
        "USER: <image>\nWhat is unusual about this image? ASSISTANT:",
        "USER: <image>\nWhat is unusual about this image? ASSISTANT: A man is ironing clothes on the back of a "
        "taxi. USER: Is it safe? ASSISTANT:"),
}

# How each template closes a reply: the text the model generates after the prompt's role prefix.
EXPECTED_REPLY = {
    "llava_v0": " {}###", "vicuna_v1": " {}</s>", "llava_v1": " {}</s>", "llava_llama_2": " {} </s>",
    "mistral_instruct": " {} </s>", "chatml_direct": "{}<|im_end|>", "plain": "{}\n", "llava_hf": " {} ",
}

# Pinned ids (image as -200 for the original templates, llava-hf's <image> = 32000 for llava_hf).
VICUNA_SYSTEM_IDS = [1, 319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076,
                     8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 1404, 29915, 29879, 5155, 29889]
# "\n" "What" "▁is" "▁unusual" "▁about" "▁this" "▁image" "?"
Q1_IDS = [13, 5618, 338, 22910, 1048, 445, 1967, 29973]
A1_IDS = [319, 767, 338, 13977, 292, 22095, 373, 278, 1250, 310, 263, 8818, 29875, 29889]  # "▁A" "▁man" ...
Q2_IDS = [1317, 372, 9109, 29973]  # "▁Is" "▁it" "▁safe" "?"
USER_IDS = [3148, 1001, 29901]  # "▁US" "ER" ":"
ASSISTANT_IDS = [319, 1799, 9047, 13566, 29901]  # "▁A" "SS" "IST" "ANT" ":"
PINNED_IDS = {
    ("vicuna_v1", 1): VICUNA_SYSTEM_IDS + USER_IDS + [29871, -200, 29871] + Q1_IDS + ASSISTANT_IDS,
    ("vicuna_v1", 2): VICUNA_SYSTEM_IDS + USER_IDS + [29871, -200, 29871] + Q1_IDS + ASSISTANT_IDS + A1_IDS
    + [2, 11889, 29901] + Q2_IDS + ASSISTANT_IDS,  # "</s>" then "USER" (11889) with no "▁" after the special
    ("plain", 1): [1, -200, 29871] + Q1_IDS + [13],
    ("plain", 2): [1, -200, 29871] + Q1_IDS + [13, 29909] + A1_IDS[1:] + [13, 3624] + Q2_IDS[1:] + [13],
    ("llava_hf", 1): [1] + USER_IDS + [29871, 32000] + Q1_IDS + ASSISTANT_IDS,
    ("llava_hf", 2): [1] + USER_IDS + [29871, 32000] + Q1_IDS + ASSISTANT_IDS + A1_IDS + USER_IDS + Q2_IDS
    + ASSISTANT_IDS,
}


@pytest.fixture(scope="module")
def tok(reference_dir):
    return Tokenizer.from_dir(os.path.join(reference_dir, "tokenizer"))


@pytest.fixture(scope="module")
def hf_tok(reference_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.join(reference_dir, "tokenizer"))


def prompt_ids(tok, name, text):
    """How the engine tokenizes each format: llava-hf's processor takes the whole prompt (<image> is an added
    token); the original repo tokenizes the chunks between <image> markers separately."""
    return tok.encode(text) if name == "llava_hf" else tok.encode_with_images(text, -200)


def independent_ids(hf_tok, name, text):
    if name == "llava_hf":
        return hf_tok(text).input_ids
    chunks = [hf_tok(chunk).input_ids for chunk in text.split("<image>")]  # tokenizer_image_token, restated
    return chunks[0] + [i for chunk in chunks[1:] for i in [-200] + chunk[1:]]


def test_templates_and_names():
    assert list(TEMPLATES) == ["llava_v0", "vicuna_v1", "llava_v1", "llava_llama_2", "mistral_instruct",
                               "chatml_direct", "plain", "llava_hf"]
    assert get_template("vicuna_v1").system == SYSTEM_USER
    assert (get_template("vicuna_v1").sep, get_template("vicuna_v1").sep2) == (" ", "</s>")
    assert get_template("llava_v0").sep == "###" and get_template("plain").sep == "\n"


@pytest.mark.parametrize("name", list(EXPECTED_PROMPTS))
def test_render_exact_strings(name):
    template = get_template(name)
    single, two = EXPECTED_PROMPTS[name]
    assert template.render(ONE_TURN) == single
    assert template.render(TWO_TURNS) == two
    # LLaVA's data roles are accepted as aliases.
    assert template.render([("human", IMAGE_Q1), ("gpt", A1), ("human", Q2)]) == two


@pytest.mark.parametrize("name", list(EXPECTED_PROMPTS))
def test_prompt_token_ids(name, tok, hf_tok):
    for turns, messages in ((1, ONE_TURN), (2, TWO_TURNS)):
        text = get_template(name).render(messages)
        ids = prompt_ids(tok, name, text)
        assert ids == independent_ids(hf_tok, name, text), (name, turns)
        if (name, turns) in PINNED_IDS:
            assert ids == PINNED_IDS[name, turns], (name, turns)


def test_prompt_token_ids_pinned_for_the_other_templates(tok):
    # llava_v0 / llava_v1 differ from vicuna_v1 in the system prompt ("human" 5199 for "user" 1404) and v0's
    # "###Human:" / "###Assistant:"; llama_2 puts the image right after "<</SYS>>\n\n".
    v1 = prompt_ids(tok, "llava_v1", EXPECTED_PROMPTS["llava_v1"][0])
    assert v1 == [5199 if i == 1404 else i for i in PINNED_IDS["vicuna_v1", 1]]
    v0 = prompt_ids(tok, "llava_v0", EXPECTED_PROMPTS["llava_v0"][0])
    assert v0[31:40] == [2277, 29937, 29950, 7889, 29901, 29871, -200, 29871, 13]  # "##" "#" "H" "uman" ":" "▁" IMG
    assert v0[-5:] == [2277, 29937, 7900, 22137, 29901]  # "##" "#" "Ass" "istant" ":"
    llama_2 = prompt_ids(tok, "llava_llama_2", EXPECTED_PROMPTS["llava_llama_2"][1])
    assert llama_2[:4] == [1, 518, 25580, 29962]  # <s> "▁[" "INST" "]"
    assert llama_2.index(-200) == 52  # "\n<</SYS>>\n\n" then the image, then "▁" "\n" "What"
    assert llama_2[43:56] == [29889, 13, 29966, 829, 14816, 29903, 6778, 13, 13, -200, 29871, 13, 5618]
    assert llama_2[-14:] == [29871, 2, 1, 29961, 25580, 29962, 1317, 372, 9109, 29973, 518, 29914, 25580, 29962]
    # "▁" "</s>" "<s>" "[" "INST" "]" "▁Is" "▁it" "▁safe" "?" "▁[" "/" "INST" "]"


SYSTEMS = [None, "", "Answer briefly."]
CONVERSATIONS = [
    [("user", "Hi")],
    [("user", IMAGE_Q1), ("assistant", A1)],
    [("user", IMAGE_Q1), ("assistant", A1), ("user", Q2), ("assistant", "Not really.")],
    [("user", IMAGE_Q1), ("assistant", A1), ("user", Q2), ("assistant", "No."), ("user", "Why?")],
]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_segments_concatenate_to_render(name):
    template = get_template(name)
    for messages in CONVERSATIONS:
        for system in SYSTEMS:
            segments = template.segments(messages, system=system)
            assert "".join(text for text, _ in segments) == template.render(
                messages, system=system, add_generation_prompt=False)
            replies = [text for text, is_reply in segments if is_reply]
            assert replies == [EXPECTED_REPLY[name].format(t) for r, t in messages if r == "assistant"]
            # The text before reply k is the generation prompt the model sees for that reply.
            before = ""
            for k, (text, is_reply) in enumerate(segments):
                if is_reply:
                    rounds = sum(1 for _, r in segments[:k] if r)
                    assert before == template.render(messages[:2 * rounds + 1], system=system)
                before += text
            assert all(a[1] != b[1] for a, b in zip(segments, segments[1:]))  # alternating, never empty


def test_system_override():
    assert get_template("vicuna_v1").render([("user", "Hi")], system="Be brief.") == "Be brief. USER: Hi ASSISTANT:"
    assert get_template("llava_hf").render([("user", "Hi")], system="Be brief.") == "Be brief. USER: Hi ASSISTANT:"
    assert get_template("llava_v0").render([("user", "Hi")], system="") == "###Human: Hi###Assistant:"
    assert get_template("llava_llama_2").render([("user", "Hi")], system="S") == (
        "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]")


def test_stop_strings():
    assert {name: t.stop_strings for name, t in TEMPLATES.items()} == {
        "llava_v0": ("###",), "vicuna_v1": ("</s>",), "llava_v1": ("</s>",), "llava_llama_2": ("</s>",),
        "mistral_instruct": ("</s>",), "chatml_direct": ("<|im_end|>",), "plain": ("\n",), "llava_hf": ("</s>",)}


def test_bad_input():
    with pytest.raises(InputError, match="unknown chat template 'vicuna'.*llava_v0, vicuna_v1, llava_v1, "
                                         "llava_llama_2, mistral_instruct, chatml_direct, plain, llava_hf"):
        get_template("vicuna")
    template = get_template("vicuna_v1")
    with pytest.raises(InputError, match="no messages"):
        template.render([])
    with pytest.raises(InputError, match="message 0 is from the assistant, expected the user"):
        template.render([("assistant", "Hi")])
    with pytest.raises(InputError, match="message 1 is from the user, expected the assistant"):
        template.render([("user", "a"), ("user", "b")])
    with pytest.raises(InputError, match="role 'system'.*system="):
        template.render([("system", "x"), ("user", "Hi")])
    with pytest.raises(InputError, match="needs the conversation to end with a user message"):
        template.render([("user", "Hi"), ("assistant", "Hello")])
    with pytest.raises(InputError, match="must be a string"):
        template.render([("user", None)])
    with pytest.raises(InputError, match="must be a \\(role, text\\) pair"):
        template.render(["Hi"])


def test_format_user_turn():
    assert format_user_turn(Q1, 1) == "<image>\n" + Q1
    assert format_user_turn(Q1, 0) == Q1
    assert format_user_turn("Compare <image> with <image>", 2) == "Compare <image> with <image>"
    assert format_user_turn("<image>\n" + Q1, 1) == "<image>\n" + Q1
    with pytest.raises(InputError, match="has 0 <image> markers but 2 images were given"):
        format_user_turn(Q1, 2)
    with pytest.raises(InputError, match="has 1 <image> marker but 0 images were given"):
        format_user_turn(IMAGE_Q1, 0)


def test_default_template_for(reference_dir):
    def config(name):
        with open(os.path.join(reference_dir, "configs", name, "config.json")) as f:
            return json.load(f)

    assert default_template_for(config("llava-1.5-7b-hf")) == "llava_hf"
    original = config("llava-v1.5-7b-original")
    assert default_template_for(original) == "vicuna_v1"
    assert default_template_for({**original, "mm_projector_type": "linear"}) == "llava_v0"
    assert default_template_for({k: v for k, v in original.items() if k != "mm_projector_type"}) == "llava_v0"
    with pytest.raises(InputError, match="model_type 'llama'.*name one: llava_v0"):
        default_template_for({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    # LLaVA-NeXT: the original CLI's conv modes for llava-v1.6-vicuna / -mistral
    assert default_template_for({"model_type": "llava_next", "text_config": {}, "vision_config": {}}) == "llava_v1"
    assert default_template_for({"architectures": ["LlavaNextForConditionalGeneration"],
                                 "text_config": {"model_type": "mistral"}}) == "mistral_instruct"


@pytest.mark.parametrize("name", ["llava_v1", "mistral_instruct", "chatml_direct", "vicuna_v1", "llava_llama_2"])
def test_render_equals_the_original_get_prompt(name):
    """The original's Conversation.get_prompt() (llava-torch 1.2.2.post1) for one to three rounds, ending with the
    assistant's empty turn as its CLI renders a prompt, and for whole conversations as its trainer does."""
    from original_llava import original_llava

    original = original_llava().conversation_lib.conv_templates[name]
    for messages in CONVERSATIONS:
        conv = original.copy()
        for role, text in messages:
            conv.append_message(conv.roles[0 if role == "user" else 1], text)
        ends_with_user = messages[-1][0] == "user"
        if ends_with_user:
            conv.append_message(conv.roles[1], None)
        assert get_template(name).render(messages, add_generation_prompt=ends_with_user) == conv.get_prompt(), messages
