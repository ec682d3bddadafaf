"""The tokenizer: a thin layer over `tokenizers.Tokenizer` (any tokenizer.json it reads: LLaMA's SentencePiece
BPE with byte fallback, byte-level BPE as in LLaMA-3 or SmolLM2) that knows LLaVA's image marker, the
checkpoint's special tokens (BOS, every EOS id, pad) and chat template, and decodes a token stream without ever
splitting a character (StreamDecoder, over tokenizers' DecodeStream).

Loading. `Tokenizer.from_dir` reads `tokenizer.json` (what llava-hf ships) plus the special-token settings in
`tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json`. The original LLaVA checkpoints
(liuhaotian/llava-v1.5-7b) ship only the SentencePiece `tokenizer.model`; we convert it with `tokenizers`
alone (a 40-line protobuf reader below) into the same BPE that llava-hf's tokenizer.json holds: the same
vocabulary and merges, merge priority by piece id.

Two ways to tokenize a prompt with images (ids for the vicuna_v1 prompt "... USER: <image>\\nWhat ..."):

    original LLaVA (tokenizer_image_token)   ..., 29901, 29871, IMG, 29871, 13, 5618, ...
    llava-hf (LlavaProcessor)                ..., 29901, 29871, 32000,      13, 5618, ...

The original repo splits the prompt at each "<image>" and tokenizes every chunk separately; SentencePiece
prepends its dummy-prefix space "▁" (29871) to every chunk, so the "\\n" after an image arrives as "▁", "\\n".
llava-hf tokenizes the whole prompt, where `<image>` is an added special token, and this tokenizer.json adds
the dummy prefix only at the start of the text (Metaspace prepend_scheme "first", i.e. `legacy: false`), so
no "▁" follows the image. `encode_with_images` reproduces the first, `encode` + `expand_image_tokens` the
second. Original checkpoints were trained on the first; llava-hf's conversion of the same weights is run on
the second; each model should be fed its own format.

Known gaps: HF-style BPE (here and in llava-hf) is not identical to SentencePiece in two whitespace cases.
LLaMA's whitespace pieces ("▁▁", "▁▁▁▁", ...) have score -1e9, so by its scores SentencePiece merges them
last, whereas id-ordered merges take them first ("a  b": here "▁a","▁▁","b"; SentencePiece should give
"▁a","▁","▁b"). And Metaspace adds no dummy prefix to a text (or an `encode_with_images` chunk) that already
starts with a space, where SentencePiece adds one. LLaVA's templates produce neither; a user prompt with a
double space or "<image> describe" does. (sentencepiece is not installed here to measure against.)
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers.decoders import DecodeStream
from tokenizers.models import BPE

from llava_fast.checkpoints.config import read_json
from llava_fast.errors import CheckpointError, InputError
from llava_fast.prompts.chat_template import ChatTemplate, read_chat_template
from llava_fast.prompts.templates import ESCAPED_IMAGE_TEXT, IMAGE_MARKER

# Where "<image>" is an added token (llava-hf), text holding both image markers and the text "<image>" is
# tokenized by a copy of the backend whose added token reads this instead (_literal_image_backend).
_IMAGE_STAND_IN = "\ue002image\ue003"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback pieces, as ByteFallback reads them


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the character a byte-level BPE vocabulary writes each byte as -> the
    byte. The 188 printable Latin-1 bytes stand for themselves; the other 68 (controls, space, NBSP, soft hyphen)
    take U+0100 onwards in byte order, so a space is "Ġ" (U+0120) and a newline "Ċ" (U+010A)."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(0x100 + i): b for i, b in enumerate(moved)}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the checkpoint's special tokens and chat template. Build it with
    `Tokenizer.from_dir(path)` (a checkpoint directory) or directly from a ready backend and explicit ids:

        Tokenizer(backend, bos_token_id=1, eos_token_ids=[2], pad_token_id=2, add_bos_token=False,
                  chat_template=template_text, source="model.gguf")

    backend: any `tokenizers.Tokenizer` (SentencePiece-style BPE with byte fallback, byte-level BPE, ...); its
    post-processor is never used: BOS is added here, per `add_bos_token`. eos_token_ids: every id that ends a
    reply (LLaMA-3 and ChatML models have several); at least one is required. `source` names where the
    tokenizer came from, for errors. Raises CheckpointError for an id outside the vocabulary or no EOS.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Iterable[int] = (), pad_token_id: int | None = None, unk_token_id: int | None = None,
                 add_bos_token: bool = True, chat_template: str | None = None, chat_template_origin: str | None = None,
                 source: str = "the tokenizer"):
        self.backend, self.source = backend, source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for what, token_id in (("bos", bos_token_id), ("pad", pad_token_id), ("unk", unk_token_id),
                               *(("eos", i) for i in eos_token_ids)):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise CheckpointError(f"{source}: the {what} token id {token_id} is outside the vocabulary "
                                      f"(size {self.vocab_size})")
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        if not self.eos_token_ids:
            raise CheckpointError(f"{source}: the tokenizer names no end-of-sequence token (eos_token in "
                                  "tokenizer_config.json, eos_token_id in generation_config.json); generation "
                                  "could never stop")
        self.bos_token_id, self.unk_token_id = bos_token_id, unk_token_id
        # No pad token named: LLaVA's trainer pads with unk (`tokenizer.pad_token = tokenizer.unk_token`, and
        # the original configs say pad_token_id 0); without unk, eos. Padding positions are masked anyway.
        self.pad_token_id = next(i for i in (pad_token_id, unk_token_id, self.eos_token_id) if i is not None)
        self.add_bos_token = bool(add_bos_token) and bos_token_id is not None
        added = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, token in added.items() if token.special)
        self._added_ids = frozenset(added)
        self._fallback_byte_ids = None  # built on the first stream_decoder() call: a scan of the whole vocabulary
        self._literal_image = None  # built on the first text holding the text "<image>": a copy of the backend
        self.chat_template = None if chat_template is None else ChatTemplate(
            chat_template, chat_template_origin or source, {
                name: None if i is None else backend.id_to_token(i) for name, i in (
                    ("bos_token", bos_token_id), ("eos_token", self.eos_token_id), ("unk_token", unk_token_id),
                    ("pad_token", pad_token_id))})

    @property
    def eos_token_id(self) -> int:
        """The first (primary) end-of-sequence id; generation stops on any of `eos_token_ids`."""
        return self.eos_token_ids[0]

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    # ---------------------------------------------------------------------------------------------------
    # Loading
    # ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        """Load from a checkpoint directory: tokenizer.json, or failing that tokenizer.model (converted); special
        tokens from tokenizer_config.json / special_tokens_map.json, extra EOS ids from generation_config.json
        (else config.json), the chat template from chat_template.jinja / chat_template.json /
        tokenizer_config.json."""
        if not os.path.isdir(path):
            raise CheckpointError(f"tokenizer directory not found: {path}")
        config = _read_json_if_present(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json_if_present(os.path.join(path, "special_tokens_map.json"))
        json_path, model_path = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
        if os.path.isfile(json_path):
            try:
                backend = tokenizers.Tokenizer.from_file(json_path)
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise CheckpointError(f"cannot read {json_path}: {e}") from e
            source = json_path
        elif os.path.isfile(model_path):
            # transformers' LlamaTokenizer treated a config without `legacy` as legacy=True when the original
            # LLaVA repo ran it: every text piece between special tokens gets the dummy prefix.
            backend = backend_from_sentencepiece(model_path, legacy=config.get("legacy", True))
            source = model_path
        else:
            raise CheckpointError(
                f"no tokenizer.json or tokenizer.model in {path}: llava-fast needs one of them "
                "(tokenizer.json as llava-hf ships it, or the SentencePiece tokenizer.model)")
        _add_declared_tokens(backend, path, config)

        def named(key, default):
            # tokenizer_config.json first; an explicit null there defers to special_tokens_map.json
            # (the original LLaVA checkpoints say pad_token null in one and "<unk>" in the other).
            value = config.get(key)
            if value is None:
                value = special_map.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None and default is not None and backend.token_to_id(default) is not None:
                value = default
            if value is None:
                return None
            token_id = backend.token_to_id(value)
            if token_id is None:
                raise CheckpointError(f"{path}: the tokenizer's {key} is {value!r}, which is not in its vocabulary")
            return token_id

        bos_id = named("bos_token", "<s>")
        eos_ids = [named("eos_token", "</s>"), *_declared_eos_ids(path)]
        if "add_bos_token" in config:
            add_bos = config["add_bos_token"]
        else:  # byte-level BPE checkpoints say it in tokenizer.json's post-processor; LLaMA's SentencePiece adds it
            add_bos = source == model_path or _post_processor_starts_with(backend, bos_id)
        template = read_chat_template(path, config)
        return cls(backend, bos_token_id=bos_id, eos_token_ids=[i for i in eos_ids if i is not None],
                   pad_token_id=named("pad_token", None), unk_token_id=named("unk_token", "<unk>"),
                   add_bos_token=add_bos, chat_template=template and template[0],
                   chat_template_origin=template and template[1], source=source)

    # ---------------------------------------------------------------------------------------------------
    # Encoding and decoding
    # ---------------------------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` adds to decoded text (OpenAI's logprobs `bytes`; their join over a reply's
        tokens is its UTF-8 even where a character spans several tokens): an added token's text, a
        SentencePiece byte-fallback piece ("<0xE4>") as its byte, a byte-level BPE token through GPT-2's byte
        alphabet ("Ġis" is b" is", not the 4 UTF-8 bytes of "Ġis"), another piece with "▁" as a space. b"" for an
        id past the vocabulary (a padded lm_head row), as decode() gives it no text."""
        piece = self.backend.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode()
        if self._byte_level:
            alphabet = _byte_level_alphabet()
            return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()
        if _BYTE_TOKEN.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def _decoder_spec(self) -> str:
        """The backend's decoder as JSON text ("" without one): which decoding steps it runs."""
        return self.backend.decoder.__getstate__().decode() if self.backend.decoder else ""

    @functools.cached_property
    def _byte_level(self) -> bool:
        """Whether the decoder reads tokens in GPT-2's byte alphabet (byte-level BPE: LLaMA-3, SmolLM2)."""
        return "ByteLevel" in self._decoder_spec()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`. Added tokens written in the text ("</s>", llava-hf's "<image>") become their ids."""
        ids = self._encode_text(_unicode_text(text))
        return [self.bos_token_id] + ids if add_bos and self.add_bos_token else ids

    def _encode_text(self, text: str) -> list[int]:
        """The backend's ids of `text`, where ESCAPED_IMAGE_TEXT is the text "<image>" (as tokenized without
        an added "<image>" token) and "<image>" itself the added token, if the vocabulary has one."""
        if ESCAPED_IMAGE_TEXT not in text:
            return self.backend.encode(text, add_special_tokens=False).ids
        backend = self._literal_image_backend()
        if backend is not self.backend:
            text = text.replace(IMAGE_MARKER, _IMAGE_STAND_IN)
        return backend.encode(text.replace(ESCAPED_IMAGE_TEXT, IMAGE_MARKER), add_special_tokens=False).ids

    def _literal_image_backend(self) -> tokenizers.Tokenizer:
        """The backend if "<image>" is not one of its added tokens; else a copy whose added token of that id
        reads _IMAGE_STAND_IN, so that "<image>" in the text is tokenized as text, and the stand-in as the id."""
        if self._literal_image is None:
            image_id = self.backend.token_to_id(IMAGE_MARKER)
            self._literal_image = self.backend
            if image_id is not None and image_id in self.backend.get_added_tokens_decoder():
                data = json.loads(self.backend.to_str())
                for token in data["added_tokens"]:
                    if token["content"] == IMAGE_MARKER:
                        token["content"] = _IMAGE_STAND_IN
                vocab = data["model"].get("vocab")
                if isinstance(vocab, dict) and vocab.pop(IMAGE_MARKER, None) is not None:
                    vocab[_IMAGE_STAND_IN] = image_id
                self._literal_image = tokenizers.Tokenizer.from_str(json.dumps(data))
        return self._literal_image

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`. An id past the tokenizer's vocabulary decodes to nothing, as in transformers and
        `tokenizers`: a model's lm_head may have more rows than the tokenizer has tokens (llava-hf pads
        32,002 tokens to 32,064 rows), and a model can emit those ids. A negative id (the original LLaVA's
        image placeholder -200) is an error."""
        ids = list(ids)
        if ids and min(ids) < 0:
            raise InputError(f"token id {min(ids)} is outside the vocabulary (0..{self.vocab_size - 1}); image "
                             "placeholder ids must be removed or mapped before decoding")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_with_images(self, text: str, image_token_id: int, add_bos: bool = True) -> list[int]:
        """Token ids with one `image_token_id` per "<image>" marker, as the original LLaVA's
        `tokenizer_image_token` builds them: each chunk between markers is tokenized on its own (so each gets
        the dummy-prefix "▁"), BOS only at the start. Works whether or not "<image>" is in the vocabulary."""
        ids = [self.bos_token_id] if add_bos and self.add_bos_token else []
        for index, chunk in enumerate(_unicode_text(text).split(IMAGE_MARKER)):
            if index > 0:
                ids.append(image_token_id)
            if chunk:
                ids.extend(self._encode_text(chunk))
        return ids

    @staticmethod
    def expand_image_tokens(ids, image_token_id: int, num_image_tokens) -> list[int]:
        """Replace each `image_token_id` by `num_image_tokens` copies: the positions the projected image
        features fill (576 for CLIP ViT-L/14 at 336 px). A list gives each image's own count, in order
        (LLaVA-NeXT's depend on the image's size)."""
        markers = sum(1 for t in ids if t == image_token_id)
        counts = list(num_image_tokens) if isinstance(num_image_tokens, (list, tuple)) else [num_image_tokens] * markers
        if len(counts) != markers:
            raise InputError(f"{markers} image markers but {len(counts)} image-token counts")
        if any(n < 1 for n in counts):
            raise InputError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
        expanded, image = [], 0
        for token_id in ids:
            if token_id == image_token_id:
                expanded.extend([image_token_id] * counts[image])
                image += 1
            else:
                expanded.append(token_id)
        return expanded

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def fallback_byte_ids(self) -> frozenset:
        """Ids of SentencePiece byte-fallback pieces ("<0xE4>") when the decoder joins them (ByteFallback),
        else empty. Computed once per tokenizer."""
        if self._fallback_byte_ids is None:
            byte_ids = ()
            if "ByteFallback" in self._decoder_spec():
                byte_ids = (i for token, i in self.backend.get_vocab(with_added_tokens=False).items()
                            if _BYTE_TOKEN.fullmatch(token))
            self._fallback_byte_ids = frozenset(byte_ids)
        return self._fallback_byte_ids


class StreamDecoder:
    """Turns token ids, one at a time, into text deltas whose concatenation (after `flush()`) is exactly
    `tokenizer.decode(all_ids, skip_special_tokens)`, and never splits a character: a delta holds U+FFFD only
    where the full decode does (ids that are not valid UTF-8).

    The incremental decoding is `tokenizers.decoders.DecodeStream`, which works for every decoder (byte-level
    BPE, SentencePiece byte fallback, WordPiece): it decodes a short window of recent tokens and emits the
    window's new text once that text does not end in U+FFFD (an unfinished multi-byte character).

    One case needs holding back on top of it. The SentencePiece decoder (ByteFallback) turns a whole run of
    byte tokens into U+FFFD per byte if the run as a whole is not valid UTF-8, so a valid "中" (<0xE4><0xB8>
    <0xAD>) becomes "\ufffd" x 4 if a stray continuation byte follows; DecodeStream would already have
    emitted "中" (and then fail on a changed prefix). So byte-fallback tokens are held until a non-byte token
    closes the run and go to DecodeStream together with it (one token of latency for characters spelled in
    bytes, none otherwise). Byte-level BPE needs no holding: its decoder replaces only the invalid bytes, so
    emitted text never changes. Skipped special tokens are invisible (the decoder drops them before joining
    runs), so they neither close a run nor reach DecodeStream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._byte_ids = tokenizer.fallback_byte_ids()
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._held: list[int] = []
        self._ids: list[int] = []  # every id pushed: flush() decodes them once to emit what DecodeStream held
        self._emitted = 0  # characters emitted so far

    def push(self, token_id: int) -> str:
        """Feed one token id; returns the text that became final (often "" while a character is unfinished)."""
        tok = self.tokenizer
        if token_id < 0:
            raise InputError(f"token id {token_id} is outside the vocabulary (0..{tok.vocab_size - 1})")
        if token_id >= tok.vocab_size:  # a padded lm_head row: nothing, as Tokenizer.decode
            return ""
        self._ids.append(token_id)
        if self.skip_special_tokens and token_id in tok.special_token_ids:
            return ""
        if token_id in self._byte_ids:
            self._held.append(token_id)
            return ""
        ids, self._held = self._held + [token_id], []
        text = self._stream.step(tok.backend, ids) or ""
        self._emitted += len(text)
        return text

    def flush(self) -> str:
        """End of stream: the text DecodeStream still holds (an unfinished character decodes to U+FFFD)."""
        full = self.tokenizer.backend.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        text = full[self._emitted:]
        self._emitted = len(full)
        return text


# -------------------------------------------------------------------------------------------------------
# Checkpoint files
# -------------------------------------------------------------------------------------------------------


def _unicode_text(text: str) -> str:
    """`text` if it is valid Unicode, else InputError naming the first bad character. A lone UTF-16 surrogate
    cannot be tokenized (tokenizers raised a bare TypeError): Python puts one in a str for each byte that is not
    UTF-8 in a command-line argument or piped stdin (U+DC80..U+DCFF, its surrogateescape), and JSON's "\\ud800"
    escape without its pair decodes to one."""
    if text.isascii():  # the common case, without the encode below
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        # Where: the characters before it (an offset would count the chat template's text too).
        where = f"after {text[max(0, e.start - 24):e.start]!r}" if e.start else "at the start"
        if 0xDC80 <= code <= 0xDCFF:
            raise InputError(f"the text is not valid UTF-8: byte 0x{code - 0xDC00:02x} {where} (as read from the "
                             "command line, a file or stdin); give UTF-8 text") from None
        raise InputError(f"the text holds a lone UTF-16 surrogate U+{code:04X} {where} (half of a pair, e.g. a "
                         "JSON \\u escape without its partner); give valid Unicode text") from None
    return text


def _read_json_if_present(path):
    return read_json(path) if os.path.isfile(path) else {}


def _declared_eos_ids(path) -> list[int]:
    """The EOS ids generation stops on, as transformers' generate() takes them: generation_config.json's
    eos_token_id (an int or a list: LLaMA-3 Instruct lists 128001, 128008, 128009), else config.json's (or its
    text_config's)."""
    generation = _read_json_if_present(os.path.join(path, "generation_config.json"))
    if "eos_token_id" in generation:
        eos = generation["eos_token_id"]
    else:
        config = _read_json_if_present(os.path.join(path, "config.json"))
        eos = config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in eos if isinstance(i, int)]


def _post_processor_starts_with(backend, token_id) -> bool:
    """Whether tokenizer.json's post-processor (TemplateProcessing, possibly inside a Sequence) puts the token
    `token_id` at the start of a single sequence: how byte-level BPE checkpoints say they add BOS."""
    if token_id is None or backend.post_processor is None:
        return False
    spec = json.loads(backend.post_processor.__getstate__())
    processors = spec.get("processors", [spec]) if spec.get("type") == "Sequence" else [spec]
    token = backend.id_to_token(token_id)
    for processor in processors:
        single = processor.get("single") if processor.get("type") == "TemplateProcessing" else None
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"].get("id") == token
    return False


def _add_declared_tokens(backend, path, config):
    """Tokens declared beside the vocabulary (added_tokens.json, tokenizer_config's added_tokens_decoder):
    add those the backend lacks, at the declared ids; a token at a different id is a broken checkpoint."""
    declared = {}  # id -> (content, special)
    for content, token_id in _read_json_if_present(os.path.join(path, "added_tokens.json")).items():
        declared[int(token_id)] = (content, True)
    for token_id, spec in config.get("added_tokens_decoder", {}).items():
        declared[int(token_id)] = (spec["content"], spec.get("special", True))
    for token_id in sorted(declared):
        content, special = declared[token_id]
        existing = backend.token_to_id(content)
        if existing is None and token_id == backend.get_vocab_size(with_added_tokens=True):
            backend.add_tokens([AddedToken(content, special=special, normalized=False)])
        elif existing != token_id:
            raise CheckpointError(f"{path} declares token {content!r} as id {token_id}, but the vocabulary "
                                  f"has it at {existing} (size {backend.get_vocab_size(with_added_tokens=True)})")


# SentencePiece's ModelProto, the fields we read (sentencepiece/src/sentencepiece_model.proto).
_PIECES, _TRAINER_SPEC, _NORMALIZER_SPEC = 1, 2, 3
_PIECE_TEXT, _PIECE_TYPE = 1, 3
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_USER_DEFINED = 1, 2, 3, 4
_TRAINER_MODEL_TYPE, _TRAINER_BYTE_FALLBACK, _MODEL_TYPE_BPE = 3, 35, 2
_NORMALIZER_NAME, _NORMALIZER_ADD_DUMMY_PREFIX, _NORMALIZER_REMOVE_EXTRA_WHITESPACES = 1, 3, 4


def _protobuf_fields(buf: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes for the rest."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            value, pos = buf[pos:pos + width], pos + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield field, value


def _varint(buf, pos):
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def backend_from_sentencepiece(model_path: str, legacy: bool = True) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the BPE SentencePiece model at `model_path`.

    Merges: every split of a piece into two pieces that are both in the vocabulary, ranked by the merged
    piece's id (then the left part's length), which is the ranking llava-hf's tokenizer.json was built with.
    `legacy` (tokenizer_config.json) decides whether text after a special token gets the dummy prefix too.
    """
    try:
        with open(model_path, "rb") as f:
            buf = f.read()
        pieces, trainer, normalizer = [], {}, {}
        for field, value in _protobuf_fields(buf):
            if field == _PIECES:
                piece = dict(_protobuf_fields(value))
                pieces.append((piece[_PIECE_TEXT].decode("utf-8"), piece.get(_PIECE_TYPE, _TYPE_NORMAL)))
            elif field == _TRAINER_SPEC:
                trainer = dict(_protobuf_fields(value))
            elif field == _NORMALIZER_SPEC:
                normalizer = dict(_protobuf_fields(value))
    except (OSError, ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read the SentencePiece model {model_path}: {e}") from e

    unsupported = []
    if trainer.get(_TRAINER_MODEL_TYPE, 1) != _MODEL_TYPE_BPE:
        unsupported.append("a Unigram model (LLaMA's is BPE)")
    if normalizer.get(_NORMALIZER_NAME, b"nmt_nfkc") != b"identity":
        unsupported.append(f"text normalization {normalizer.get(_NORMALIZER_NAME, b'nmt_nfkc').decode()!r}")
    if normalizer.get(_NORMALIZER_REMOVE_EXTRA_WHITESPACES, 1):
        unsupported.append("remove_extra_whitespaces")
    if unsupported:
        raise CheckpointError(f"cannot convert {model_path}: it uses {', '.join(unsupported)}; "
                              "provide the checkpoint's tokenizer.json instead")

    return sentencepiece_backend(pieces, byte_fallback=bool(trainer.get(_TRAINER_BYTE_FALLBACK, 0)),
                                 add_dummy_prefix=bool(normalizer.get(_NORMALIZER_ADD_DUMMY_PREFIX, 1)), legacy=legacy)


def sentencepiece_backend(pieces, *, byte_fallback: bool, add_dummy_prefix: bool, legacy: bool) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` for a SentencePiece BPE vocabulary given as (piece, type) in id order; types
    are SentencePiece's (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), which GGUF's
    tokenizer.ggml.token_type reuses."""
    vocab = {text: i for i, (text, _) in enumerate(pieces)}
    ranked = []
    for merged_id, (text, _) in enumerate(pieces):
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((merged_id, cut, left, right))
    ranked.sort()
    merges = [(left, right) for _, _, left, right in ranked]

    unk = next((text for text, kind in pieces if kind == _TYPE_UNKNOWN), None)
    backend = tokenizers.Tokenizer(BPE(vocab, merges, unk_token=None if byte_fallback else unk,
                                       fuse_unk=True, byte_fallback=byte_fallback))
    prepend_scheme = ("always" if legacy else "first") if add_dummy_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    # SentencePiece never matches control or user-defined pieces inside text; transformers' slow tokenizer
    # does, and so do llava-hf's added tokens: make them added tokens (control ones special).
    backend.add_tokens([AddedToken(text, special=kind in (_TYPE_CONTROL, _TYPE_UNKNOWN), normalized=False)
                        for text, kind in pieces if kind in (_TYPE_CONTROL, _TYPE_UNKNOWN, _TYPE_USER_DEFINED)])
    return backend
