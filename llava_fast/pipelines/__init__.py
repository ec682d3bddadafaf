"""The paper's data and evaluation pipelines, installed as `llava_fast.pipelines` (`llava-fast make-data`,
`llava-fast eval`). Every chat-model call goes to an OpenAI-compatible endpoint (a hosted GPT, or a local
`llava-fast serve` / vLLM / llama.cpp server); nothing is downloaded.

| module | in -> out |
| --- | --- |
| `client.py` | messages -> a reply, through the `openai` client, with retries and back-off |
| `instruct.py` | captions + boxes -> instruction records (conversation, detail, complex); pairs -> stage-1 records |
| `answering.py` | a model + questions -> LLaVA's answer JSONL, batched and resumable |
| `llava_bench.py` | LLaVA-Bench: answers -> GPT-judged reviews -> relative scores |
| `scienceqa.py` | ScienceQA: problems -> answers -> accuracy by the paper's columns |
| `records.py` | JSON / JSONL / CSV in (bad lines named), atomic and append-only writes out |
| `cli.py` | the `make-data` and `eval` subcommands |
| `prompts/` | the paper's few-shot prompts (haotian-liu/LLaVA playground/data/prompts, Apache-2.0) |
"""
