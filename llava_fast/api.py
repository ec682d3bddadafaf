"""The API programs embed: `LlavaModel` (generate, stream, chat, generate_ids, logits); `load()`
(llava_fast/checkpoints/load.py) returns one.

    model = llava_fast.load("path/to/llava-1.5-7b-hf", device="cuda", dtype="bfloat16")
    print(model.generate("What is unusual about this image?", images="extreme_ironing.jpg"))

A LLaVA-NeXT (1.6) model takes the same calls; each image becomes its AnyRes tiles (image/anyres.py) and fills
as many prompt positions as its size implies (image_token_counts), and logits / generate_ids take pixel_values
with image_sizes as transformers' LlavaNextProcessor returns them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

import torch

from llava_fast import ops
from llava_fast.checkpoints.config import LlavaConfig
from llava_fast.compiled import CompiledSteps
from llava_fast.cpu import plan
from llava_fast.errors import InputError, count
from llava_fast.generate import (
    Decoder,
    RowOutput,
    Sampling,
    batch_bucket,
    common_prefix,
    generate_token_steps,
    is_integer,
    positions_needed,
)
from llava_fast.image import AnyResProcessor, ImageProcessor, anyres, load_image
from llava_fast.model import LlavaForCausalLM
from llava_fast.prompts.messages import is_openai_messages, load_image_url, split_openai_messages
from llava_fast.prompts.templates import _checked_turns, escape_image_text, format_user_turn, get_template
from llava_fast.prompts.tokenizer import Tokenizer

# ------------------------------------------------------------------------------------------------------
# Checks of the public arguments, run before any work; each error says what was expected
# ------------------------------------------------------------------------------------------------------


def _check_max_new_tokens(value) -> int:
    if not is_integer(value) or value < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {value!r}")
    return int(value)


def _check_text_options(stop, template, system):
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
        raise InputError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    if template is not None:
        if not isinstance(template, str):
            raise InputError(f"template must be a template name (a string), got {template!r:.80}")
        get_template(template)  # an unknown name lists the known ones
    if system is not None and not isinstance(system, str):
        raise InputError(f"system must be a string, got {type(system).__name__}")


def _check_prompts(prompts):
    """One prompt (a string, or a list of (role, text) messages) or a batch (a list of those)."""
    kinds = (str, list, tuple, dict)
    if not isinstance(prompts, (str, list, tuple)) or any(not isinstance(p, kinds) for p in prompts):
        raise InputError("prompts must be a string, a list of (role, text) messages, or a list of those "
                         f"(a batch); got {prompts!r:.80}")


def _check_id_rows(rows, what) -> list[list[int]]:
    """A (B, T) tensor or a sequence of sequences of token ids -> lists of ints."""
    if isinstance(rows, torch.Tensor):
        if rows.dim() not in (1, 2) or rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise InputError(f"{what} must be an integer tensor of shape (B, T) or (T,), got {rows.dtype} "
                             f"{tuple(rows.shape)}")
        rows = rows.tolist()
    if not isinstance(rows, (list, tuple)) or any(not isinstance(r, (list, tuple)) for r in rows):
        raise InputError(f"{what} must be a list of rows of token ids (a list of lists of ints), got {rows!r:.80}")
    bad = next((t for r in rows for t in r if not is_integer(t)), None)
    if bad is not None:
        raise InputError(f"{what} must hold integer token ids, got {bad!r}")
    return [[int(t) for t in r] for r in rows]


class LlavaModel:
    """A loaded LLaVA: the network, its tokenizer and image processor, and generation."""

    def __init__(self, net: LlavaForCausalLM, tokenizer: Tokenizer, processor: ImageProcessor | AnyResProcessor,
                 compile=False):
        self.net, self.tokenizer, self.processor = net, tokenizer, processor
        self.config: LlavaConfig = net.cfg
        self.last_stats: dict = {}  # the last generation's token counts and timings (see _stream_rows)
        self.cuda_graphs = True  # decode as a captured CUDA graph on CUDA with the Triton kernels
        self._graph_decoders: dict[tuple[int, int], Decoder] = {}
        self.compiled = CompiledSteps() if compile else None  # torch.compile'd decode step and prefill

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def num_image_tokens(self) -> int:
        """Image positions per image (LLaVA v1 / 1.5); LLaVA-NeXT's depend on the size: image_token_counts."""
        if self.config.anyres:
            raise InputError("a LLaVA-NeXT image fills a number of positions that depends on its size: "
                             "use image_token_counts(image_sizes)")
        return self.config.num_image_tokens

    def image_token_counts(self, image_sizes) -> list[int]:
        """Image positions of each image of size (height, width) (LLaVA-NeXT: base tile, unpadded grid and
        newlines, image/anyres.py; otherwise num_image_tokens each)."""
        cfg = self.config
        if not cfg.anyres:
            return [cfg.num_image_tokens] * len(image_sizes)
        P = cfg.vision.image_size // cfg.vision.patch_size
        return [anyres.num_image_tokens(h, w, cfg.image_grid_pinpoints, cfg.vision.image_size, P,
                                        cfg.num_image_tokens, exact=cfg.exact_unpad)
                for h, w in _image_sizes(image_sizes, allow_empty=True).tolist()]

    @property
    def cpu_plan(self):
        """Which kernel table, decode and prefill paths and threads run this model on the CPU, and why
        (llava_fast.cpu.plan.CpuPlan; made at load, again if the kernel table is switched)."""
        return plan.for_model(self.net)

    @property
    def device(self):
        return self.net.language_model.embed_tokens.weight.device  # never quantized, unlike lm_head

    @property
    def dtype(self):
        return self.net.language_model.embed_tokens.weight.dtype

    @property
    def context_length(self) -> int:
        return self.config.text.max_position_embeddings

    # --------------------------------------------------------------------------------------------------
    # Prompts and images -> rows of ids
    # --------------------------------------------------------------------------------------------------

    def chat_template(self, template=None):
        """The checkpoint's own jinja chat template (ChatTemplate) when it ships one and `template` is None;
        else None, and prompts use the named template `template` (or the config's: llava_fast.prompts.templates)."""
        return self.tokenizer.chat_template if template is None else None

    def encode_prompt(self, prompt, num_images=0, *, template=None, system=None, image_sizes=None) -> list[int]:
        """A prompt (one user message, or a list of (role, text) messages ending with a user turn) rendered
        with the chat template and tokenized, image tokens expanded to num_image_tokens each (LLaVA-NeXT: to
        each image's count, from image_sizes, its images' (height, width)). The template is the checkpoint's
        own (chat_template.jinja etc.) unless `template` names one of llava_fast.prompts.templates's."""
        self._check_takes_images(num_images)
        if self.config.anyres and num_images and (not hasattr(image_sizes, "__len__")
                                                  or len(image_sizes) != num_images):
            raise InputError(f"a LLaVA-NeXT prompt with {count(num_images, 'image')} needs their sizes "
                             f"(image_sizes, one (height, width) per image), got {image_sizes!r:.80}")
        if not isinstance(prompt, str):
            _checked_turns(prompt)  # (role, text) pairs of strings, before the marker count below reads them
        messages = [("user", prompt)] if isinstance(prompt, str) else [tuple(m) for m in prompt]
        # Only user turns place images (as OpenAI's API has it): "<image>" in a reply is text, as is every "<image>"
        # of a text-only model, which places no image.
        text_only = self.net.vision_tower is None
        messages = [(role, escape_image_text(text) if text_only or str(role).lower() in ("assistant", "gpt") else text)
                    for role, text in messages]
        if isinstance(system, str):  # a system prompt places no image: its "<image>" is text
            system = escape_image_text(system)
        if not messages or messages[-1][0] not in ("user", "human"):
            raise InputError("a prompt given as messages must end with a user message")
        first = next(i for i, m in enumerate(messages) if m[0] in ("user", "human"))
        markers = sum(m[1].count("<image>") for m in messages)
        if markers == 0:  # no markers anywhere: one image goes in front of the first user turn (LLaVA's CLI)
            messages[first] = (messages[first][0], format_user_turn(messages[first][1], num_images))
            markers = messages[first][1].count("<image>")
        if markers != num_images:
            raise InputError(f"the prompt has {count(markers, '<image> marker')} but {count(num_images, 'image')} "
                             f"{'was' if num_images == 1 else 'were'} given")
        jinja = self.chat_template(template)
        if jinja is None:
            text = get_template(template or self.config.template).render(messages, system=system,
                                                                         add_generation_prompt=True)
        else:
            turns = ([jinja.message("system", system)] if system is not None else []) + [
                jinja.message(role, text) for role, text in _checked_turns(messages)]
            text = jinja.render(turns, add_generation_prompt=True)
            if text.count("<image>") != num_images:
                raise InputError(f"the chat template in {jinja.origin} rendered {text.count('<image>')} <image> "
                                 f"markers for {num_images} images")
        # As transformers' processors: BOS unless the rendered prompt already starts with it (LLaMA-3's template
        # writes it; ChatML's starts with <|im_start|>, SmolLM2's BOS, and its tokenizer adds none anyway).
        bos = self.tokenizer.bos_token
        add_bos = not (bos and text.startswith(bos))
        if self.tokenizer.token_to_id("<image>") == self.image_token_id:
            # llava-hf: <image> is a special token of the vocabulary, and its processor tokenizes the whole
            # prompt at once, so no "▁" (29871) follows the image as it does in the original repo's chunks.
            ids = self.tokenizer.encode(text, add_bos=add_bos)
        else:  # original LLaVA: each text chunk between images tokenized on its own (tokenizer_image_token)
            ids = self.tokenizer.encode_with_images(text, self.image_token_id, add_bos=add_bos)
        if not num_images:  # nothing to expand (and a text-only model has no image tokens at all)
            return ids
        counts = self.image_token_counts(image_sizes) if self.config.anyres else self.num_image_tokens
        return self.tokenizer.expand_image_tokens(ids, self.image_token_id, counts)

    def pixel_values(self, images):
        """A list of images (paths, PIL images, arrays) -> (N, 3, S, S) on the model's device."""
        if self.config.anyres:
            raise InputError("a LLaVA-NeXT model takes each image as several tiles: use image_inputs(images)")
        return self.processor(list(images), dtype=self.dtype, device=self.device) if images else None

    def image_inputs(self, images):
        """A list of images -> (pixel_values, image_sizes) on the model's device, (None, None) for none:
        LLaVA v1 / 1.5 (N, 3, S, S) and None; LLaVA-NeXT the tiles (sum of tiles, 3, S, S) and (N, 2) sizes."""
        if not images:
            return None, None
        if self.config.anyres:
            return self.processor(list(images), dtype=self.dtype, device=self.device)
        return self.pixel_values(images), None

    def _check_takes_images(self, num_images):
        if num_images and self.net.vision_tower is None:
            raise InputError(f"{count(num_images, 'image')} given, but this model is text-only: it has no vision "
                             "tower (for a GGUF language model, load its llama.cpp mmproj file too: --mmproj FILE on "
                             "the command line, mmproj= in llava_fast.load)")

    def _check_pixel_values(self, pixel_values) -> int:
        """None or a (N, 3, S, S) float tensor at the tower's resolution -> N."""
        if pixel_values is None:
            return 0
        self._check_takes_images(len(pixel_values))
        if self.config.anyres:
            raise InputError("a LLaVA-NeXT model needs image_sizes with pixel_values")
        size = self.config.vision.image_size
        if (not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point
                or tuple(pixel_values.shape[1:]) != (3, size, size)):
            got = (f"{pixel_values.dtype} {tuple(pixel_values.shape)}" if isinstance(pixel_values, torch.Tensor)
                   else type(pixel_values).__name__)
            raise InputError(f"pixel_values must be a float tensor of shape (N, 3, {size}, {size}) (see "
                             f"model.pixel_values), got {got}")
        _check_finite_pixels(pixel_values)
        return int(pixel_values.shape[0])

    def _anyres_inputs(self, pixel_values, image_sizes):
        """LLaVA-NeXT's (pixel_values, image_sizes) as transformers' processor returns them -> (tiles (sum of
        tiles, 3, S, S), sizes (N, 2) long) on the device. pixel_values (N, max tiles, 3, S, S), zero-padded
        after each image's own tiles (their count follows from its size), or the tiles already concatenated."""
        if pixel_values is None:
            if image_sizes is not None:
                raise InputError("image_sizes given without pixel_values")
            return None, None
        cfg, size = self.config, self.config.vision.image_size
        sizes = _image_sizes(image_sizes)
        self._check_takes_images(len(sizes))
        counts = [anyres.num_tiles(h, w, cfg.image_grid_pinpoints, size) for h, w in sizes.tolist()]
        if (not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point
                or pixel_values.dim() not in (4, 5) or tuple(pixel_values.shape[-3:]) != (3, size, size)):
            got = (f"{pixel_values.dtype} {tuple(pixel_values.shape)}" if isinstance(pixel_values, torch.Tensor)
                   else type(pixel_values).__name__)
            raise InputError(f"pixel_values must be a float tensor of shape (N, tiles, 3, {size}, {size}) or "
                             f"(tiles, 3, {size}, {size}), got {got}")
        _check_finite_pixels(pixel_values)
        if pixel_values.dim() == 5:
            if len(pixel_values) != len(sizes) or pixel_values.shape[1] < max(counts):
                raise InputError(f"pixel_values {tuple(pixel_values.shape)} do not hold {len(sizes)} images of "
                                 f"{counts} tiles (from image_sizes)")
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])
        elif len(pixel_values) != sum(counts):
            raise InputError(f"pixel_values hold {len(pixel_values)} tiles but images of sizes {sizes.tolist()} "
                             f"have {sum(counts)}")
        return pixel_values.to(self.device, self.dtype), sizes.to(self.device)

    def _check_rows(self, rows, num_images, max_new_tokens=None, image_sizes=None):
        """Rows of expanded ids fit the vocabulary, the images and the context: with max_new_tokens (generation)
        positions_needed() <= context; without (logits) len(row) <= context. LLaVA-NeXT: image_sizes, the
        images' (height, width), give their counts."""
        self._check_takes_images(num_images)
        if not rows:
            raise InputError("no prompts given")
        vocab = self.config.text.vocab_size
        for i, row in enumerate(rows):
            # "row 0" only where there are rows to tell apart: a chat turn or a single prompt is "the prompt".
            label = f"row {i}" if len(rows) > 1 else "the prompt"
            if not row:
                raise InputError(f"{label} is empty")
            bad = [t for t in row if not (0 <= t < vocab or t == self.image_token_id)]
            if bad:
                raise InputError(f"{label} has token ids outside the vocabulary (size {vocab}): {bad[:5]}")
            if max_new_tokens is None and len(row) > self.context_length:
                raise InputError(f"{label}'s {len(row)} tokens exceed the context length of {self.context_length} "
                                 "tokens")
            if max_new_tokens is not None and positions_needed(len(row), max_new_tokens) > self.context_length:
                raise InputError(f"{label} has {len(row)} tokens; with max_new_tokens={max_new_tokens} it needs "
                                 f"{positions_needed(len(row), max_new_tokens)} positions, more than the context "
                                 f"length of {self.context_length} tokens")
        image_positions = sum(row.count(self.image_token_id) for row in rows)
        if self.config.anyres:
            counts = self.image_token_counts([] if image_sizes is None else image_sizes)
            if image_positions != sum(counts):
                raise InputError(f"the rows hold {image_positions} image-token positions but {num_images} images "
                                 f"of sizes {[tuple(map(int, s)) for s in image_sizes or []]} need {counts}")
        elif image_positions != num_images * self.num_image_tokens:
            raise InputError(f"the rows hold {image_positions} image-token positions but {num_images} images "
                             f"need {num_images} x {self.num_image_tokens}")

    # --------------------------------------------------------------------------------------------------
    # Generation
    # --------------------------------------------------------------------------------------------------

    def release_workspace(self):
        """Free the KV caches and CUDA graphs kept between calls (they are rebuilt on the next call)."""
        self._graph_decoders.clear()

    def _use_cuda_graphs(self):
        # Triton's decode path and the compiled one never read lengths back to the host, so a graph can hold
        # them (the eager torch path is sync-free too, but only those two are tested under capture).
        return self.cuda_graphs and self.device.type == "cuda" and (ops.BACKEND == "triton" or self.compiled)

    def _decoder(self, batch_size, max_tokens) -> Decoder:
        """A decoder for this batch: fresh on the CPU; on CUDA with the Triton kernels, one kept per (batch
        bucket, capacity) so its captured CUDA graph is replayed across calls instead of re-captured."""
        if not self._use_cuda_graphs():
            return Decoder(self.net, batch_size, max_tokens, compiled=self.compiled)
        capacity = min(self.context_length, -(-max_tokens // 512) * 512)
        key = (batch_bucket(batch_size), capacity)
        if key not in self._graph_decoders:
            # One workspace at a time: a 7B cache is 0.5 MiB per token per row (16 GiB at 8 rows x 4k tokens).
            self._graph_decoders.clear()
            self._graph_decoders[key] = Decoder(self.net, *key, cuda_graph=True, compiled=self.compiled)
        decoder = self._graph_decoders[key]
        decoder.reset()
        return decoder

    def _stream_rows(self, rows, pixel_values, *, max_new_tokens, sampling, stop, eos_token_id, decoder=None,
                     start_pos=None, new_rows=None, sync_every=None, decode=True, image_sizes=None,
                     preprocess_s=0.0):
        """Generate for all rows; yield per step a list of text deltas (one per row; all "" with decode=False).
        Returns through StopIteration.value the generated ids per row (EOS included when it ended the row).

        New tokens stay on the device and are read back every `sync_every` steps (default: every step on the
        CPU, every 16 on a GPU, so the GPU runs ahead of the host). A row that ends mid-chunk ignores the rest
        of its chunk, so the result does not depend on sync_every; only up to sync_every - 1 steps are wasted.
        """
        if decoder is None:
            decoder = self._decoder(len(rows), positions_needed(max(map(len, rows)), max_new_tokens))
        if sync_every is None:
            sync_every = 1 if self.device.type == "cpu" else 16
        feed = list(new_rows or rows)
        pad = decoder.batch_size - len(feed)  # a CUDA-graph bucket may hold more rows than the batch
        feed += [[0 if self.tokenizer.bos_token_id is None else self.tokenizer.bos_token_id]] * pad
        starts = None if start_pos is None else list(start_pos) + [0] * pad
        outputs = [RowOutput(self.tokenizer if decode else None, stop, sampling.eos_for_row(eos_token_id))
                   for _ in rows]
        compile_before = self.compiled.compile_s if self.compiled else 0.0
        start = time.perf_counter()
        logits = decoder.prefill(feed, pixel_values, starts, image_sizes=image_sizes)
        steps = generate_token_steps(decoder, logits, max_new_tokens, sampling, eos_token_id)
        first, n, pending = None, 0, []
        for i, tokens in enumerate(steps):
            pending.append(tokens)
            if len(pending) < (1 if i == 0 else sync_every) and i + 1 < max_new_tokens:
                continue
            chunk = torch.stack(pending)[:, : len(rows)].tolist()  # the host sync: one per chunk
            pending, n = [], i + 1
            first = time.perf_counter() if first is None else first
            for step_tokens in chunk:
                yield [out.push(t) if not out.done else "" for out, t in zip(outputs, step_tokens)]
            if all(out.done for out in outputs):
                steps.close()
        end = time.perf_counter()
        self.last_stats = {
            "prompt_tokens": sum(map(len, new_rows or rows)), "new_tokens": sum(len(o.ids) for o in outputs),
            "steps": n, "time_to_first_token_s": first - start,
            # The first token's wait split: images -> pixel_values before it (generate(), stream(); 0 when the
            # caller passed pixel_values), then inside it the vision tower + projector and the prefill (its
            # layers, the first token's sampling and read-back).
            "image_preprocess_s": preprocess_s, "vision_s": decoder.embed_end - decoder.embed_start,
            "prefill_s": first - decoder.embed_end,
            "decode_tokens_per_s": (n - 1) * len(rows) / (end - first) if n > 1 else 0.0,
            "compile_s": (self.compiled.compile_s if self.compiled else 0.0) - compile_before,
        }
        yield [out.finish() for out in outputs]
        return [out.ids for out in outputs]

    def _prepare(self, prompts, images, template, system):
        if is_openai_messages(prompts):  # one request in the OpenAI chat format, images inside its parts
            turns, urls, message_system = split_openai_messages(prompts)
            if images is not None:
                raise InputError("pass images inside OpenAI-style messages (image_url parts), not as images=")
            if message_system is not None and system is not None:
                raise InputError("give the system prompt either as a system message or as system=, not both")
            images = [load_image_url(u, local_files=True) for u in urls]
            prompts, system = turns, (system if message_system is None else message_system)
        _check_prompts(prompts)
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], tuple))
        prompt_list = [prompts] if single else list(prompts)
        if single:
            image_lists = [_as_image_list(images)]
        elif images is None:
            image_lists = [[] for _ in prompt_list]
        else:
            if isinstance(images, (str, os.PathLike)) or len(images) != len(prompt_list):
                raise InputError(f"{len(prompt_list)} prompts need a list of {len(prompt_list)} image entries "
                                 "(each None, one image, or a list of images)")
            image_lists = [_as_image_list(x, f"images[{i}]") for i, x in enumerate(images)]
        if self.config.anyres:  # each image's token count depends on its size: decode them now, once
            image_lists = [[load_image(im) for im in ims] for ims in image_lists]
        rows = [self.encode_prompt(p, len(ims), template=template, system=system, image_sizes=_sizes(ims))
                for p, ims in zip(prompt_list, image_lists)]
        flat_images = [im for ims in image_lists for im in ims]
        return single, rows, flat_images

    def _stop_strings(self, stop, template):
        # A checkpoint's own template ends replies with its EOS ids alone; the named ones also by a string.
        named = None if self.chat_template(template) else get_template(template or self.config.template)
        tpl_stops = named.stop_strings if named else ()
        user = [stop] if isinstance(stop, str) else list(stop or [])
        return [s for s in dict.fromkeys(user + list(tpl_stops)) if s]

    def _generation_settings(self, max_new_tokens, temperature, top_p, top_k, seed, stop, template, system,
                             min_tokens=0, ignore_eos=False):
        """Every generation argument checked before any work: (max_new_tokens, Sampling, stop strings)."""
        max_new_tokens = _check_max_new_tokens(max_new_tokens)
        sampling = Sampling(temperature, top_p, top_k, seed, min_tokens=min_tokens, ignore_eos=ignore_eos)
        if sampling.min_tokens > max_new_tokens:
            raise InputError(f"min_tokens ({min_tokens}) must be at most max_new_tokens ({max_new_tokens})")
        _check_text_options(stop, template, system)
        return max_new_tokens, sampling, self._stop_strings(stop, template)

    def generate(self, prompts, images=None, *, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
                 stop=None, seed=None, template=None, system=None, min_tokens=0, ignore_eos=False):
        """Reply to one prompt (str -> str) or a batch (list[str] -> list[str]).

        A prompt may also be OpenAI-style chat messages ([{"role": ..., "content": str | parts}], parts
        {"type": "text"} / {"type": "image_url"} with a data: URL or a local path), as `llava-fast serve`
        takes them; their images come from the image_url parts and a system message sets the system prompt.

        images: for one prompt, None, an image or a list of images; for a batch, a list with one such entry
        per prompt. An image is a path, a PIL image or a uint8 array. A prompt without an `<image>` marker
        and exactly one image gets the marker prepended; any other mismatch raises InputError.
        max_new_tokens: a positive int; prompt + max_new_tokens may be the context length + 1 (the last new
        token is never fed back). temperature 0 (or under 1e-5, as in vLLM) is greedy; top_k 0 means no cut; all
        checked up front.
        min_tokens: EOS cannot end a reply shorter than this (its logits are -inf until then); ignore_eos: EOS
        does not end a reply at all (it runs to max_new_tokens or a stop string), as vLLM's extensions do.

        Ids the model can emit but the tokenizer does not know (llava-hf pads lm_head to 32,064 rows for
        32,002 tokens) decode to nothing, as transformers decodes them: the text is always
        `tokenizer.decode(generate_ids(...))`, and sampling is not altered.
        """
        settings = self._generation_settings(max_new_tokens, temperature, top_p, top_k, seed, stop, template, system,
                                             min_tokens, ignore_eos)
        single, rows, flat_images = self._prepare(prompts, images, template, system)
        texts = [""] * len(rows)
        for deltas in self._run_text(rows, flat_images, settings):
            texts = [t + d for t, d in zip(texts, deltas)]
        return texts[0] if single else texts

    def _run_text(self, rows, flat_images, settings, sync_every=None):
        max_new_tokens, sampling, stop = settings
        self._check_rows(rows, len(flat_images), max_new_tokens, image_sizes=_sizes(flat_images))
        start = time.perf_counter()
        pixel_values, image_sizes = self.image_inputs(flat_images)
        return self._stream_rows(rows, pixel_values, max_new_tokens=max_new_tokens,
                                 sampling=sampling, stop=stop, eos_token_id=self.tokenizer.eos_token_ids,
                                 sync_every=sync_every, image_sizes=image_sizes,
                                 preprocess_s=time.perf_counter() - start if flat_images else 0.0)

    def stream(self, prompt, image=None, *, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, stop=None,
               seed=None, template=None, system=None, min_tokens=0, ignore_eos=False) -> Iterator:
        """Yield the reply's text as it is generated, in UTF-8-safe deltas; their concatenation equals
        generate()'s text for the same arguments.

        A batch (a list of prompts, images as for generate) yields lists of deltas, one string per prompt
        ("" for a row with nothing new at that step, or that has ended); each row's concatenation equals
        generate()'s text for it. Arguments are checked here, when stream() is called, not at the first next().
        """
        settings = self._generation_settings(max_new_tokens, temperature, top_p, top_k, seed, stop, template, system,
                                             min_tokens, ignore_eos)
        single, rows, flat_images = self._prepare(prompt, image, template, system)
        steps = self._run_text(rows, flat_images, settings, sync_every=1)
        if single:
            return (deltas[0] for deltas in steps if deltas[0])
        return (deltas for deltas in steps if any(deltas))

    def chat(self, image=None, *, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, stop=None, seed=None,
             template=None, system=None) -> ChatSession:
        """A multi-turn conversation about `image` (or none) whose KV cache is kept between turns. The image is
        read here, so a missing or bad file fails now, not at the first turn."""
        max_new_tokens, sampling, stop = self._generation_settings(max_new_tokens, temperature, top_p, top_k,
                                                                   seed, stop, template, system)
        images = _as_image_list(image)
        self._check_takes_images(len(images))
        generation = dict(max_new_tokens=max_new_tokens, sampling=sampling, stop=stop)
        # Decoded now: a missing file fails here, and a NeXT image's size sets its token count.
        return ChatSession(self, [load_image(im) for im in images], generation, template, system)

    def generate_ids(self, rows: Sequence[Sequence[int]], pixel_values=None, *, max_new_tokens, temperature=0.0,
                     top_p=1.0, top_k=0, seed=None, eos_token_id="default", image_sizes=None) -> list[list[int]]:
        """Token-level generation: rows hold image tokens already expanded; returns the new tokens only
        (ending with EOS where EOS stopped the row). LLaVA-NeXT: pixel_values and image_sizes as for logits().
        eos_token_id: an id or a list of ids that end a row
        (default: the tokenizer's eos_token_ids); None disables EOS. Any id of the model's vocabulary (lm_head
        rows) may come back, including padded rows the tokenizer does not know: nothing is decoded here."""
        rows = _check_id_rows(rows, "rows")
        max_new_tokens = _check_max_new_tokens(max_new_tokens)
        sampling = Sampling(temperature, top_p, top_k, seed)
        if not (eos_token_id in ("default", None) or is_integer(eos_token_id) or (
                isinstance(eos_token_id, (list, tuple)) and eos_token_id and all(map(is_integer, eos_token_id)))):
            raise InputError(f"eos_token_id must be an int, a non-empty list of ints, None (no EOS) or 'default', "
                             f"got {eos_token_id!r}")
        if self.config.anyres:
            pv, image_sizes = self._anyres_inputs(pixel_values, image_sizes)
            self._check_rows(rows, 0 if pv is None else len(image_sizes), max_new_tokens,
                             image_sizes=None if pv is None else image_sizes.tolist())
        else:
            self._check_rows(rows, self._check_pixel_values(pixel_values), max_new_tokens)
            pv = None if pixel_values is None else pixel_values.to(self.device, self.dtype)
        eos = self.tokenizer.eos_token_ids if eos_token_id == "default" else eos_token_id
        steps = self._stream_rows(rows, pv, max_new_tokens=max_new_tokens, sampling=sampling, stop=[],
                                  eos_token_id=eos, decode=False, image_sizes=image_sizes)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    @torch.inference_mode()
    def logits(self, input_ids, pixel_values=None, image_sizes=None) -> torch.Tensor:
        """Full-sequence logits (B, T, V) in float32 for expanded ids (B, T), as transformers computes them.
        T may be the whole context (max_position_embeddings). LLaVA-NeXT: pixel_values and image_sizes as
        transformers' LlavaNextProcessor returns them ((N, tiles, 3, S, S) zero-padded, (N, 2)), or the tiles
        concatenated (sum of tiles, 3, S, S)."""
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        elif isinstance(input_ids, (list, tuple)) and input_ids and not isinstance(input_ids[0], (list, tuple)):
            input_ids = [input_ids]  # one row as a flat list
        rows = _check_id_rows(input_ids, "input_ids")
        if len({len(r) for r in rows}) > 1:
            raise InputError(f"input_ids rows must have one length, got {sorted({len(r) for r in rows})}")
        if self.config.anyres:
            pv, image_sizes = self._anyres_inputs(pixel_values, image_sizes)
            self._check_rows(rows, 0 if pv is None else len(image_sizes),
                             image_sizes=None if pv is None else image_sizes.tolist())
        else:
            self._check_rows(rows, self._check_pixel_values(pixel_values))
            pv = None if pixel_values is None else pixel_values.to(self.device, self.dtype)
        return self.net(torch.tensor(rows, dtype=torch.long, device=self.device), pv, image_sizes).float()


class ChatSession:
    """Multi-turn chat. Each turn re-renders the whole conversation with the template, finds the longest
    prefix whose K/V are already cached, and prefills only the rest: a turn costs its new tokens, and the
    result equals sending the whole conversation as one prompt (the cache never holds a token the full
    prompt would not)."""

    def __init__(self, model: LlavaModel, images, generation, template, system):
        self.model, self.images, self.generation = model, images, generation
        self.template, self.system = template, system
        self.messages: list[tuple[str, str]] = []
        self.decoder: Decoder | None = None
        self.cached_ids: list[int] = []  # the ids whose K/V sit in the cache, in order

    def ask(self, text: str) -> str:
        """The reply to `text`; the turn and its reply join the conversation."""
        return "".join(self._turn(text, sync_every=None))

    def stream(self, text: str) -> Iterator[str]:
        """Yield the reply to `text` as it is generated, in UTF-8-safe deltas that join to ask()'s reply. The
        turn joins the conversation when its reply ends; a stream left unfinished (closed, or stopped by Ctrl-C)
        leaves the conversation as it was, so the next turn continues from there. `text` is checked here, when
        stream() is called, not at the first next()."""
        return self._turn(text, sync_every=1)

    def _turn(self, text: str, sync_every):
        m = self.model
        if not isinstance(text, str):
            raise InputError(f"a chat turn must be a string, got {type(text).__name__}")
        messages = self.messages + [("user", text)]
        sizes = _sizes(self.images)
        # encode_prompt reads a reply's "<image>" as text: the chat's next turns counted one the model wrote as a
        # marker with no image and failed, every one of them. A later turn's "<image>" is text too, as in a
        # server's text part: the chat's images go to the first turn's markers.
        rendered = messages[:1] + [(role, escape_image_text(said)) for role, said in messages[1:]]
        ids = m.encode_prompt(rendered, len(self.images), template=self.template, system=self.system,
                              image_sizes=sizes)
        max_new = self.generation["max_new_tokens"]
        m._check_rows([ids], len(self.images), max_new, image_sizes=sizes)
        common = common_prefix(ids, self.cached_ids)
        image_end = max((i + 1 for i, t in enumerate(ids) if t == m.image_token_id), default=0)
        if common < image_end:  # the image's tokens are not all cached: run the vision tower again
            common = 0
        common = min(common, len(ids) - 1)  # at least one token to prefill gives the next-token logits
        need = positions_needed(len(ids), max_new)
        if self.decoder is None or self.decoder.cache.max_tokens < need:
            capacity = min(m.context_length, max(2 * need, 256))  # grow geometrically, not every turn
            old, self.decoder = self.decoder, Decoder(m.net, 1, capacity, cuda_graph=m._use_cuda_graphs(),
                                                    compiled=m.compiled)
            if old is not None and common:
                self.decoder.cache.k[:, :, :, :common] = old.cache.k[:, :, :, :common]
                self.decoder.cache.v[:, :, :, :common] = old.cache.v[:, :, :, :common]
        pixel_values, image_sizes = m.image_inputs(self.images) if common == 0 else (None, None)
        steps = m._stream_rows([ids], pixel_values, decoder=self.decoder, start_pos=[common], new_rows=[ids[common:]],
                               image_sizes=image_sizes, sync_every=sync_every,
                               eos_token_id=m.tokenizer.eos_token_ids, **self.generation)
        # From here the cache past `common` is overwritten: a turn that does not finish leaves only ids[:common]
        # cached (a larger new decoder holds only those), and the next turn prefills from there.
        self.cached_ids = ids[:common]
        return self._reply(messages, ids, steps)

    def _reply(self, messages, ids, steps):
        reply = ""
        while True:
            try:
                delta = next(steps)[0]
            except StopIteration as done:
                generated = done.value[0]
                break
            if delta:
                reply += delta
                yield delta
        # Every generated token but the last was fed back through the decoder, so its K/V is cached.
        self.cached_ids = ids + generated[:-1]
        self.messages = messages + [("assistant", reply)]


def _check_finite_pixels(pixel_values):
    """A NaN or inf pixel spreads through the tower's attention to every image feature and then to every logit:
    the model answered with NaN logits (token 0 over and over) and no word of why. Images read from files are
    always finite; tensors a caller builds may not be."""
    bad = int((~torch.isfinite(pixel_values)).sum())
    if bad:
        raise InputError(f"pixel_values hold {count(bad, 'non-finite value')} (NaN or inf) of "
                         f"{pixel_values.numel():,}: pass finite numbers (model.pixel_values(images) gives them)")


def _image_sizes(image_sizes, allow_empty=False) -> torch.Tensor:
    """LLaVA-NeXT's image_sizes, one (height, width) per image -> (N, 2) long on the CPU; none (N = 0) only where
    `allow_empty` (a text-only prompt's counts). Anything else is an InputError naming what was given: a 0 side
    divided by zero in the tile geometry, and a negative one matched no resolution (a TypeError from deep in
    image/anyres.py)."""
    try:
        sizes = torch.as_tensor(image_sizes).long().reshape(-1, 2).cpu()
    except (TypeError, ValueError, RuntimeError):
        sizes = None
    if image_sizes is None or sizes is None or (len(sizes) == 0 and not allow_empty) or bool((sizes < 1).any()):
        raise InputError(f"image_sizes must be one positive (height, width) per image, got {image_sizes!r:.80}")
    return sizes


def _sizes(images):
    """(height, width) of decoded images (LlavaModel._prepare decodes LLaVA-NeXT's), else None."""
    if images and all(hasattr(im, "height") and hasattr(im, "width") for im in images):
        return [(im.height, im.width) for im in images]
    return None


def _as_image_list(images, name="images"):
    """One prompt's images (None, an image, or a flat list of them) -> a list. A list inside the list is refused
    by name: counted as one image, `generate("<image> and <image>", [[a, b]])` said "1 image was given"."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        nested = next((i for i, im in enumerate(images) if isinstance(im, (list, tuple))), None)
        if nested is not None:
            raise InputError(f"{name}[{nested}] is a list of {len(images[nested])}: one prompt's images are None, "
                             f"an image or a flat list of images; one list per prompt goes with a list of prompts")
        return list(images)
    return [images]
