"""The llava-fast trainer (both LLaVA stages), installed as `llava_fast.train`.

TASK FOR THE TRAINER ENGINEER: the full text of issue 4 (what to build) is in train/ISSUE_4.md (also
`issues show 4`). The lead's prompt lost it ("EOF_PLACEHOLDER"); build exactly what ISSUE_4.md asks.
Delete this paragraph and ISSUE_4.md when done.
"""
