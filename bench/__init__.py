"""The llava-fast benchmark harness, installed as `llava_fast.bench`."""
