"""llava-fast: a performance-first engine for LLaVA."""
