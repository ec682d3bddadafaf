"""Prompt building: conversations and chat messages in, token ids out (and generated ids back to text).

In: a prompt string, a (role, text) conversation or OpenAI-style chat messages with image parts. Out: the
token ids a checkpoint was trained on, with the image marker where its image tokens go. Tested against
transformers' tokenizers and `apply_chat_template`, and the original LLaVA repo's conversation templates.

    tokenizer.py      `Tokenizer`: tokenizer.json (SentencePiece BPE or byte-level BPE), special tokens, decoding
    templates.py      LLaVA's own conversation templates (vicuna_v1, llava_v1, llama_2, ...)
    chat_template.py  a checkpoint's own Jinja chat template, rendered as transformers renders it
    messages.py       OpenAI chat messages -> (role, text) turns and the image list
"""
