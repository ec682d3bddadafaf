"""`llava-fast serve`: an OpenAI-compatible HTTP server over one continuous-batching scheduler."""
