"""Chat templates: how a conversation becomes the prompt text a LLaVA checkpoint was trained on.

The system prompts and separators are those of the original repo (haotian-liu/LLaVA, llava/conversation.py),
reproduced exactly; `llava_hf` is the chat template llava-hf ships with llava-1.5-*-hf. Every template renders
a conversation as the original `Conversation.get_prompt()` does after `append_message(roles[1], None)`, which
ends the text with the assistant's role prefix ("ASSISTANT:"). The model then generates the reply *with* its
leading space (" The image ...") and the closing separator ("</s>"), so a reply segment is exactly that text:

    vicuna_v1   "{system} USER: {q1} ASSISTANT:" + " {a1}</s>" + "USER: {q2} ASSISTANT:" + " {a2}</s>"
    llava_v0    "{system}###Human: {q1}###Assistant:" + " {a1}###" + ...
    llava_llama_2  "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q1} [/INST]" + " {a1} </s>"
                   + "<s>[INST] {q2} [/INST]" ...
    mistral_instruct  "[INST] {q1} [/INST]" + " {a1} </s>" + "[INST] {q2} [/INST]" ...   (LLaVA-1.6 Mistral)
    chatml_direct  "<|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{q1}<|im_end|><|im_start|>assistant\\n"
                   + "{a1}<|im_end|>" + ...   (LLaVA-1.6 34B; no newline after <|im_end|>, as the original has it)
    plain       "{q1}\\n" + "{a1}\\n"            (pretraining; no system, no roles)
    llava_hf    "USER: {q1} ASSISTANT:" + " {a1} " + "USER: {q2} ASSISTANT:" ...

`Template.segments` returns these pieces flagged (text, is_reply); the trainer puts loss on reply tokens only.
The text before reply k is exactly `render(messages[:2k+1])`, the prompt the model sees at inference.

The trainer does not always train on `render()`'s text: as the original's train.py, plain rows are
"<image>{caption}\\n" (preprocess_plain) and llava_v0 rows use "### Human: " lines (train/data.py,
`training_segments`). llava-hf's template puts no "</s>" after a reply; the model still ends its replies with
EOS.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from llava_fast.errors import InputError, count

IMAGE_MARKER = "<image>"
# The text "<image>" where a person or the model wrote it (an OpenAI text part, a chat reply), not where an image
# goes: escaped to these two private-use characters around "image", so that nothing between the messages and the
# tokenizer (the marker count, a chat template, the split at markers) takes it for an image's position, and
# tokenized as the text "<image>" (Tokenizer.encode). Only image parts and images= / --image make image positions.
ESCAPED_IMAGE_TEXT = "\ue000image\ue001"
USER, ASSISTANT = "user", "assistant"
# LLaVA's training data says "human"/"gpt"; chat APIs say "user"/"assistant".
_ROLE_ALIASES = {"user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT}


@dataclass(frozen=True)
class Template:
    """One chat format. `style` picks how turns are joined (the original's SeparatorStyle): "single" (sep after
    every turn), "two" (sep after user turns, sep2 after replies), "llama_2", "mpt" (roles are whole prefixes,
    sep after every turn), "plain", "llava_hf"."""

    name: str
    style: str
    system: str  # the default system prompt
    roles: tuple[str, str]  # (user, assistant) as written in the prompt
    sep: str
    sep2: str | None
    stop_strings: tuple[str, ...]  # end a reply when generated text contains one (EOS ends it regardless)

    def render(self, messages, system: str | None = None, add_generation_prompt: bool = True) -> str:
        """The prompt text. `messages`: (role, text) pairs, roles "user"/"assistant" (or "human"/"gpt"),
        alternating, starting with the user. With add_generation_prompt the last message must be the user's
        and the text ends with the assistant's role prefix, ready for generation."""
        return "".join(text for text, _ in self._pieces(messages, system, add_generation_prompt))

    def segments(self, messages, system: str | None = None) -> list[tuple[str, bool]]:
        """`render(messages, system, add_generation_prompt=False)` cut into (text, is_reply) pieces; a reply
        piece holds the reply's leading space (if the format has one) and its closing separator."""
        merged: list[tuple[str, bool]] = []
        for text, is_reply in self._pieces(messages, system, add_generation_prompt=False):
            if merged and merged[-1][1] == is_reply:
                merged[-1] = (merged[-1][0] + text, is_reply)
            elif text:
                merged.append((text, is_reply))
        return merged

    def _pieces(self, messages, system, add_generation_prompt):
        turns = _checked_turns(messages)
        if add_generation_prompt and turns[-1][0] != USER:
            raise InputError("add_generation_prompt needs the conversation to end with a user message; "
                             f"it ends with an {turns[-1][0]} message")
        system = self.system if system is None else system
        pieces = [(self._head(system), False)]
        for index, (role, text) in enumerate(turns):
            if role == USER:
                pieces.append((self._user_turn(index // 2, text, system), False))
                if index + 1 < len(turns) or add_generation_prompt:
                    pieces.append((self._reply_prefix(), False))
            else:
                pieces.append((self._reply(text), True))
        return pieces

    def _head(self, system):
        if self.style in ("single", "two"):
            return system + self.sep
        if self.style == "llava_hf":  # a system message renders as its text and a space, with no role
            return system + " " if system else ""
        if self.style == "plain":
            return system
        if self.style == "mpt":  # ChatML: the original's system string includes this role prefix
            return f"<|im_start|>system\n{system}{self.sep}" if system else ""
        return ""  # llama_2: the system prompt sits inside the first [INST]

    def _user_turn(self, round_index, text, system):
        user = self.roles[0]
        if self.style in ("single", "two"):
            return f"{user}: {text}{self.sep}"
        if self.style == "llava_hf":
            return f"{user}: {text} "
        if self.style == "plain":
            return text + self.sep
        if self.style == "mpt":
            return f"{user}{text}{self.sep}"
        if round_index == 0:  # llama_2; the original strips the leading "<s>" of the first round
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""  # none for an empty system prompt
            return f"[INST] {sys_block}{text} [/INST]"
        return f"{self.sep}[INST] {text} [/INST]"

    def _reply_prefix(self):
        if self.style == "mpt":
            return self.roles[1]
        return f"{self.roles[1]}:" if self.style in ("single", "two", "llava_hf") else ""

    def _reply(self, text):
        if self.style == "single":
            return f" {text}{self.sep}"
        if self.style == "two":
            return f" {text}{self.sep2}"
        if self.style == "llava_hf":
            return f" {text} "
        if self.style == "plain":
            return text + self.sep2
        if self.style == "mpt":
            return text + self.sep
        return f" {text} {self.sep2}"  # llama_2


def _checked_turns(messages):
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, (tuple, list)) or len(message) != 2:
            raise InputError(f"message {index} must be a (role, text) pair, got {message!r}")
        role, text = message
        canonical = _ROLE_ALIASES.get(str(role).lower())
        if canonical is None:
            raise InputError(f"message {index} has role {role!r}; roles are user/assistant (or human/gpt); "
                             "pass a system prompt with system=")
        if not isinstance(text, str):
            raise InputError(f"message {index} text must be a string, got {type(text).__name__}")
        expected = USER if index % 2 == 0 else ASSISTANT
        if canonical != expected:
            raise InputError(f"message {index} is from the {canonical}, expected the {expected}: messages "
                             "alternate user/assistant, starting with the user")
        turns.append((canonical, text))
    if not turns:
        raise InputError("no messages given")
    return turns


_VICUNA_SYSTEM_USER = ("A chat between a curious user and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_VICUNA_SYSTEM_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. "
                        "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. "
                         "You are able to understand the visual content that the user provides, "
                         "and assist the user with a variety of tasks using natural language.")

TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("llava_v0", "single", _VICUNA_SYSTEM_HUMAN, ("Human", "Assistant"), "###", None, ("###",)),
    Template("vicuna_v1", "two", _VICUNA_SYSTEM_USER, ("USER", "ASSISTANT"), " ", "</s>", ("</s>",)),
    Template("llava_v1", "two", _VICUNA_SYSTEM_HUMAN, ("USER", "ASSISTANT"), " ", "</s>", ("</s>",)),
    # The original CLI stops llama_2 replies at sep "<s>"; a reply really ends with EOS "</s>".
    Template("llava_llama_2", "llama_2", _LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>", ("</s>",)),
    # LLaVA-1.6 Mistral: llama_2's [INST] turns with no system prompt and no separator between rounds.
    Template("mistral_instruct", "llama_2", "", ("USER", "ASSISTANT"), "", "</s>", ("</s>",)),
    # LLaVA-1.6 34B (Nous-Hermes-2-Yi): ChatML with the original's system prompt.
    Template("chatml_direct", "mpt", "Answer the questions.", ("<|im_start|>user\n", "<|im_start|>assistant\n"),
             "<|im_end|>", None, ("<|im_end|>",)),
    # The original leaves plain's sep2 unset (get_prompt would fail on a reply); a reply ends with "\n" in its
    # pretraining data, so sep2 = sep.
    Template("plain", "plain", "", ("", ""), "\n", "\n", ("\n",)),
    Template("llava_hf", "llava_hf", "", ("USER", "ASSISTANT"), " ", " ", ("</s>",)),
)}


def get_template(name: str) -> Template:
    template = TEMPLATES.get(name)
    if template is None:
        raise InputError(f"unknown chat template {name!r}; known templates: {', '.join(TEMPLATES)}")
    return template


def escape_image_text(text: str) -> str:
    """`text` with every "<image>" in it kept as text, never an image's position (ESCAPED_IMAGE_TEXT)."""
    return text.replace(IMAGE_MARKER, ESCAPED_IMAGE_TEXT)


def format_user_turn(text: str, num_images: int) -> str:
    """The first user message with its image markers checked: as LLaVA's CLI does, one image and no marker
    puts "<image>\\n" in front (llava-hf's template also puts images first, each followed by "\\n"); otherwise
    the number of "<image>" markers must equal the number of images."""
    markers = text.count(IMAGE_MARKER)
    if markers == 0 and num_images == 1:
        return IMAGE_MARKER + "\n" + text
    if markers != num_images:
        hint = "; write one <image> in the message where each image goes" if num_images > markers else ""
        raise InputError(f"the message has {count(markers, IMAGE_MARKER + ' marker')} but {count(num_images, 'image')} "
                         f"{'was' if num_images == 1 else 'were'} given{hint}")
    return text


def checkpoint_name(config_path: str) -> str:
    """A checkpoint's name as the original LLaVA code takes it (get_model_name_from_path): its directory's name,
    or "<run>_checkpoint-N" for a trainer's intermediate checkpoint directory."""
    parts = os.path.dirname(os.path.abspath(config_path)).rstrip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def _is_yi_34b(config: dict, name: str) -> bool:
    """LLaVA-1.6 34B: the original's CLI picks chatml_direct when the model name holds "v1.6-34b"; its base,
    Nous-Hermes-2-Yi-34B, may also be named by the config's _name_or_path."""
    names = f"{name} {config.get('_name_or_path') or ''}".lower()
    return "v1.6-34b" in names or re.search(r"(?<![a-z])yi(?![a-z])", names) is not None


def default_template_for(config: dict, name: str = "") -> str:
    """The chat template a checkpoint's config.json implies:

    - llava-hf (LlavaForConditionalGeneration: model_type "llava" with text_config/vision_config) -> llava_hf
    - llava-hf LLaVA-NeXT (LlavaNextForConditionalGeneration) -> mistral_instruct for a Mistral backbone,
      llava_v1 for Vicuna, as the original's CLI picks them for llava-v1.6-mistral / -vicuna (their llava-hf
      checkpoints ship their own chat template, which is used first)
    - original LLaVA (LlavaLlamaForCausalLM with mm_* fields) and an MLP projector (mm_projector_type
      "mlp2x_gelu": LLaVA-1.5, trained with conv "v1") -> vicuna_v1
    - original LLaVA-1.6 (image_aspect_ratio "anyres") -> mistral_instruct (LlavaMistralForCausalLM), chatml_direct
      for the 34B on Nous-Hermes-2-Yi-34B (the checkpoint `name` holds "v1.6-34b", or its config names Yi), as
      the original's CLI picks them, else llava_v1
    - original LLaVA with a linear projector (LLaVA v0) -> llava_v0. LLaVA-v1 "Lightning" and LLaMA-2 based
      checkpoints also have a linear projector but were trained with llava_v1 / llava_llama_2: name the
      template explicitly for them; a config does not say which.
    """
    architectures = config.get("architectures") or []
    if config.get("model_type") == "llava_next" or "LlavaNextForConditionalGeneration" in architectures:
        text_type = (config.get("text_config") or {}).get("model_type", "llama")
        return "mistral_instruct" if text_type == "mistral" else "llava_v1"
    if "text_config" in config or "vision_config" in config or "LlavaForConditionalGeneration" in architectures:
        if config.get("model_type") == "llava":
            return "llava_hf"
    elif any(key.startswith("mm_") for key in config) or any(
            a.startswith("Llava") and a.endswith("ForCausalLM") for a in architectures):
        if config.get("image_aspect_ratio") == "anyres":  # LLaVA-1.6, as for llava-hf's above
            mistral = config.get("model_type") == "llava_mistral" or "LlavaMistralForCausalLM" in architectures
            if mistral:
                return "mistral_instruct"
            return "chatml_direct" if _is_yi_34b(config, name) else "llava_v1"
        projector = config.get("mm_projector_type", "linear")
        return "vicuna_v1" if projector.startswith("mlp") else "llava_v0"
    raise InputError(f"cannot tell the chat template of a config with model_type {config.get('model_type')!r} "
                     f"and architectures {architectures}; name one: {', '.join(TEMPLATES)}")
