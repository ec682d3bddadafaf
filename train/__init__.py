"""The llava-fast trainer (both LLaVA stages), installed as `llava_fast.train`. Not written yet."""
