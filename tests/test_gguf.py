"""GGUF loading (llava_fast/checkpoints/gguf.py) against files written by llama.cpp's own converters
(tests/llama_cpp.py).

A tiny random LLaVA (transformers) is converted to text-model GGUFs in F32, F16 and Q8_0 plus an mmproj. Its
weights are first rounded to float16 values, so F32 and F16 files hold them exactly and the oracle is the
transformers model itself (logits within 1e-4 in float32). For Q8_0 the oracle is the same LLaVA whose
language model transformers loaded from that GGUF (its own dequantizer and Q/K un-permutation). Bad files
(unsupported architecture or type, mismatched mmproj, no EOS, truncated or corrupt) raise one CheckpointError
naming the file and the problem.
"""

import os

import checkpoints as ck
import llama_cpp
import numpy as np
import pytest
import torch

import llava_fast
from llava_fast.errors import CheckpointError, InputError
from llava_fast.prompts.tokenizer import Tokenizer

TEXT_TYPES = ["f32", "f16", "q8_0"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers LLaVA, {outtype: text GGUF path}, mmproj path, the llava-hf directory)."""
    root = tmp_path_factory.mktemp("gguf")
    hf = llama_cpp.round_to_fp16(ck.make_hf_model(seed=3, text={"intermediate_size": 128}))  # Q8_0: rows of 32k
    hf_dir = ck.write_checkpoint(hf, str(root / "llava-hf"), "save_pretrained")
    original_dir = ck.write_checkpoint(hf, str(root / "original"), "original", shards=1)
    texts = {t: llama_cpp.convert_text(hf_dir, t, str(root / f"text-{t}.gguf")) for t in TEXT_TYPES}
    mmproj = llama_cpp.convert_mmproj(hf, original_dir, str(root / "mmproj"))
    return hf, texts, mmproj, hf_dir


@pytest.fixture(scope="module")
def load_converted(converted):
    """load_converted(outtype, with_mmproj) -> LlavaModel (fp32, CPU), each loaded once per module."""
    _, texts, mmproj, _ = converted
    models = {}

    def get(outtype, with_mmproj=True):
        if (outtype, with_mmproj) not in models:
            models[outtype, with_mmproj] = llava_fast.load(texts[outtype], mmproj=mmproj if with_mmproj else None,
                                                           device="cpu", dtype="float32")
        return models[outtype, with_mmproj]

    return get


def _oracle(hf, text_gguf, outtype):
    """transformers' LLaVA on the weights the file holds: the model itself where the file is lossless."""
    if outtype != "q8_0":
        return hf
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(os.path.dirname(text_gguf), gguf_file=os.path.basename(text_gguf),
                                             dtype=torch.float32)
    ref = ck.make_hf_model(seed=3, text={"intermediate_size": 128})
    ref.load_state_dict(hf.state_dict())
    ref.model.language_model.load_state_dict(llama.model.state_dict())
    ref.lm_head.load_state_dict(llama.lm_head.state_dict())
    assert not torch.equal(ref.lm_head.weight, hf.lm_head.weight)  # Q8_0 really changed the weights
    return ref.eval()


def _rows(model, seed=0):
    """One row: text, an image, text. Ours marks images with the GGUF's id (vocab size), transformers 32000."""
    g = torch.Generator().manual_seed(seed)
    text = lambda k: torch.randint(3, 32000, (k,), generator=g).tolist()  # noqa: E731
    before, after = [1] + text(6), text(5)
    ours = before + [model.image_token_id] * model.num_image_tokens + after
    theirs = before + [32000] * model.num_image_tokens + after
    return ours, theirs, ck.random_pixels(1, 28, seed)


@pytest.mark.parametrize("outtype", TEXT_TYPES)
def test_llava_logits_equal_transformers(converted, load_converted, outtype):
    hf, texts, _, _ = converted
    model = load_converted(outtype)
    cfg = model.config
    assert (cfg.vision.num_layers, cfg.vision_feature_layer, cfg.projector_type) == (2, 2, "mlp2x_gelu")
    assert cfg.text.num_kv_heads == 2 and cfg.text.intermediate_size == 128 and model.num_image_tokens == 4
    assert model.processor.image_size == 28 and model.processor.image_mean == pytest.approx(
        (0.48145466, 0.4578275, 0.40821073))
    ref = _oracle(hf, texts[outtype], outtype)
    ours, theirs, pixels = _rows(model)
    got = model.logits([ours], pixels)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([theirs]), pixel_values=pixels).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_greedy_ids_equal_transformers(converted, load_converted):
    hf = converted[0]
    model = load_converted("f32")
    ours, theirs, pixels = _rows(model, seed=1)
    got = model.generate_ids([ours], pixels, max_new_tokens=20, eos_token_id=None)[0]
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor([theirs]), pixel_values=pixels, max_new_tokens=20,
                           do_sample=False)[0, len(theirs):].tolist()
    assert got == want


def test_text_only_gguf_has_no_vision_tower(converted, load_converted):
    hf = converted[0]
    model = load_converted("f16", with_mmproj=False)
    assert model.net.vision_tower is None and model.net.multi_modal_projector is None and model.processor is None
    ids = [1] + torch.randint(3, 32000, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(model.logits([ids]), want, atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="^1 image given, but this model is text-only.*--mmproj FILE"):
        model.generate("What is this?", images=ck.random_pixels(1, 28)[0].mul(40).add(128).clamp(0, 255)
                       .to(torch.uint8).permute(1, 2, 0).numpy(), max_new_tokens=2)
    with pytest.raises(InputError, match="text-only"):
        model.generate_ids([ids], torch.zeros(1, 3, 28, 28), max_new_tokens=2)
    # "<image>" in a text-only model's prompt is text (it was a marker with no image: an InputError), tokenized as
    # the tokenizer reads it with special tokens split.
    question = "What does <image> mean in <image> tags?"
    row = model.encode_prompt(question)
    assert model.image_token_id not in row and question in model.tokenizer.decode(row)
    assert model.generate(question, max_new_tokens=3) == model.tokenizer.decode(
        model.generate_ids([row], max_new_tokens=3)[0])


def test_sentencepiece_tokenizer_from_metadata_matches_tokenizer_json(converted, load_converted):
    hf_dir = converted[3]
    model = load_converted("f16", with_mmproj=False)
    ours, reference = model.tokenizer, Tokenizer.from_dir(hf_dir)
    # The file holds the tokenizer's 32,002 tokens (32,000 + <image>, <pad>); the model pads its rows to 32,064.
    assert (ours.bos_token_id, ours.eos_token_ids, ours.vocab_size) == (1, (2,), 32002)
    for text in ["Hello world, how are you?", "USER: What is unusual? ASSISTANT:", "naïve café 中文 🦙 <0x41>",
                 "two  spaces\n\nand\ttabs"]:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text)) == text
    # After a special token llama.cpp prefixes the next text with SentencePiece's space ("▁" = 29871), as the
    # original LLaVA's tokenizer (legacy=True) did; llava-hf's tokenizer.json (legacy=false) does not.
    assert ours.encode("USER: <image>\nWhat")[5:] == [32000, 29871, 13, 5618]
    assert reference.encode("USER: <image>\nWhat")[5:] == [32000, 13, 5618]


def test_memory_is_one_copy_per_weight(converted, load_converted):
    """The parameters hold exactly the files' elements (less CLIP's unused post_ln): nothing doubled."""
    _, texts, mmproj, _ = converted
    model = load_converted("f32")
    import gguf

    elements = sum(int(t.n_elements) for path in (texts["f32"], mmproj) for t in gguf.GGUFReader(path).tensors
                   if not t.name.startswith("v.post_ln"))
    assert sum(p.numel() for p in model.net.parameters()) == elements


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------


def _rewrite(src, dst, *, drop_keys=(), set_keys=None, tensors=None):
    """Copy a GGUF with edited metadata / replaced tensors ({name: array or None to drop}), through the `gguf`
    package's writer: the bad files below differ from llama.cpp's output in exactly one thing."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_keys:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
    for name, value in (set_keys or {}).items():
        writer.add_key_value(name, value, gguf.GGUFValueType.STRING)
    for t in reader.tensors:
        replacement = (tensors or {}).get(t.name, t)
        if replacement is None:
            continue
        if replacement is t:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        else:
            writer.add_tensor(t.name, replacement)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_unsupported_architecture(converted, tmp_path):
    _, texts, _, _ = converted
    import gguf

    path = str(tmp_path / "falcon.gguf")
    writer = gguf.GGUFWriter(path, "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"falcon\.gguf: architecture 'falcon' is not supported"):
        llava_fast.load(path, device="cpu")
    with pytest.raises(CheckpointError, match=r"text-f32\.gguf.*not an mmproj file"):
        llava_fast.load(texts["f32"], mmproj=texts["f32"], device="cpu")


def test_unsupported_quantization_type(converted, tmp_path):
    _, texts, _, _ = converted
    # I32 (integer tensors, never weights): a type gguf.quants.dequantize does not read.
    path = _rewrite(texts["f32"], str(tmp_path / "i32.gguf"),
                    tensors={"blk.0.ffn_up.weight": np.ones((128, 64), dtype=np.int32)})
    with pytest.raises(CheckpointError, match=r"i32\.gguf: tensor blk\.0\.ffn_up\.weight has quantization type "
                                              r"I32, which the gguf package cannot dequantize"):
        llava_fast.load(path, device="cpu")


def test_mmproj_width_must_match_the_text_model(converted, tmp_path):
    _, texts, mmproj, _ = converted
    narrow = _rewrite(mmproj, str(tmp_path / "mmproj-48.gguf"), tensors={
        "mm.2.weight": np.zeros((48, 64), dtype=np.float16), "mm.2.bias": np.zeros(48, dtype=np.float32)})
    with pytest.raises(CheckpointError, match=r"mmproj-48\.gguf: the projector outputs 48-wide embeddings, but "
                                              r"the text model .*text-f32\.gguf is 64 wide"):
        llava_fast.load(texts["f32"], mmproj=narrow, device="cpu")


def test_tokenizer_without_eos(converted, tmp_path):
    _, texts, _, _ = converted
    path = _rewrite(texts["f32"], str(tmp_path / "no-eos.gguf"), drop_keys={"tokenizer.ggml.eos_token_id"})
    with pytest.raises(CheckpointError, match=r"no-eos\.gguf: the tokenizer has no end-of-sequence token"):
        llava_fast.load(path, device="cpu")


def test_unknown_byte_level_pre_tokenizer(converted, tmp_path):
    _, texts, _, _ = converted
    path = _rewrite(texts["f32"], str(tmp_path / "pre.gguf"), drop_keys={"tokenizer.ggml.model"},
                    set_keys={"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(CheckpointError, match=r"pre\.gguf: byte-level BPE pre-tokenizer 'qwen2'"):
        llava_fast.load(path, device="cpu")


@pytest.mark.parametrize("damage", ["truncated-header", "truncated-data", "not-gguf"])
def test_truncated_or_corrupt_file(converted, tmp_path, damage):
    _, texts, _, _ = converted
    data = open(texts["f32"], "rb").read()
    path = tmp_path / f"{damage}.gguf"
    path.write_bytes({"truncated-header": data[:5000], "truncated-data": data[: len(data) // 2],
                      "not-gguf": b"PK\x03\x04" + data[4:]}[damage])
    with pytest.raises(CheckpointError, match=rf"{damage}\.gguf: .*(truncated or corrupt|not a readable GGUF)"):
        llava_fast.load(str(path), device="cpu")


def test_missing_file_and_mmproj_without_gguf(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.gguf: file not found"):
        llava_fast.load(str(tmp_path / "nothing.gguf"), device="cpu")
    with pytest.raises(InputError, match="mmproj= goes with a GGUF text model"):
        llava_fast.load(str(tmp_path), mmproj="x.gguf", device="cpu")
