"""`llava-fast make-data ...` and `llava-fast eval ...`: the paper's data and evaluation pipelines.

    llava-fast make-data instruct --type conversation|detail|complex --captions-boxes FILE.jsonl
        --endpoint URL --model NAME --output FILE.json [--prompts DIR] [--workers N] [--seed S] [--limit N]
    llava-fast make-data captions --input PAIRS --output FILE.json [--seed S]
    llava-fast eval llava-bench answer --model DIR --questions Q.jsonl --images DIR --output answers.jsonl
    llava-fast eval llava-bench review --questions Q --context CAPS.jsonl --reference A1.jsonl
        --answers A2.jsonl --rule rule.json --endpoint URL --model NAME --output reviews.jsonl
    llava-fast eval llava-bench summarize reviews.jsonl [--json OUT]
    llava-fast eval scienceqa answer --model DIR --problems problems.json --splits pid_splits.json
        --split test --images DIR --output answers.jsonl
    llava-fast eval scienceqa score --problems problems.json --splits pid_splits.json --split test
        --answers answers.jsonl [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llava_fast.cli import SubcommandParser
from llava_fast.errors import InputError


def _log(message):
    print(message, file=sys.stderr, flush=True)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def make_data_parser():
    from llava_fast.pipelines.client import add_endpoint_args

    parser = SubcommandParser(prog="llava-fast make-data", description="Generate LLaVA training data.")
    sub = parser.add_subparsers(dest="what", required=True, parser_class=SubcommandParser)
    p = sub.add_parser("instruct", help="captions + boxes -> instruction data through a chat model (paper, Sec. 3)")
    p.add_argument("--type", required=True, choices=("conversation", "detail", "complex"))
    p.add_argument("--captions-boxes", required=True, help="JSONL of {id, image, captions, instances}")
    p.add_argument("--output", required=True, help="LLaVA JSON records (resumed when it exists)")
    p.add_argument("--prompts", help="prompt directory in haotian-liu/LLaVA's playground/data/prompts layout "
                   "(default: the paper's, packaged with llava-fast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=_positive_int, help="only the first N input records")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the endpoint's)")
    p.add_argument("--max-tokens", type=int, default=2048, help="reply token limit; longer replies are rejected")
    add_endpoint_args(p)
    c = sub.add_parser("captions", help="(image, caption) pairs -> stage-1 records (the paper's naive expansion)")
    c.add_argument("--input", required=True, help="JSONL or CSV with image and caption columns, or a LLaVA "
                   "JSON such as CC-595K's chat.json")
    c.add_argument("--output", required=True)
    c.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--limit", type=_positive_int, help="only the first N input pairs")
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def make_data_main(argv=None):
    from llava_fast.pipelines import instruct

    args = make_data_parser().parse_args(argv)
    if args.what == "captions":
        if os.path.exists(args.output) and not args.overwrite:
            raise InputError(f"--output {args.output} already exists; pass --overwrite to replace it")
        instruct.make_captions(input_path=args.input, output=args.output, seed=args.seed, limit=args.limit,
                               log=_log)
        return 0
    from llava_fast.pipelines.client import client_from_args

    client = client_from_args(args)
    instruct.make_instruct(client, kind=args.type, captions_boxes=args.captions_boxes, output=args.output,
                           prompts=args.prompts, workers=args.workers, seed=args.seed, limit=args.limit,
                           temperature=args.temperature, max_tokens=args.max_tokens, log=_log)
    return 0


def _add_answer_args(p, max_new_tokens):
    from llava_fast.cli import _add_model_args

    _add_model_args(p)
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--output", required=True, help="answers JSONL (resumed when it exists)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--template", help="chat template (default: the checkpoint's)")


def eval_parser():
    from llava_fast.pipelines.client import add_endpoint_args

    parser = SubcommandParser(prog="llava-fast eval", description="The paper's evaluations.")
    bench_sub = parser.add_subparsers(dest="bench", required=True, parser_class=SubcommandParser)
    lb = bench_sub.add_parser("llava-bench", help="LLaVA-Bench: answer, GPT-judged review, relative score")
    lb_sub = lb.add_subparsers(dest="step", required=True)
    a = lb_sub.add_parser("answer", help="the model answers the questions")
    a.add_argument("--questions", required=True)
    _add_answer_args(a, max_new_tokens=1024)
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r = lb_sub.add_parser("review", help="a chat model judges reference vs. our answers")
    r.add_argument("--questions", required=True)
    r.add_argument("--context", required=True, help="JSONL of {image, caption or captions}")
    r.add_argument("--reference", required=True, help="reference answers (answer 1), e.g. GPT-4's")
    r.add_argument("--answers", required=True, help="the answers to score (answer 2)")
    r.add_argument("--rule", required=True, help="rule.json (judge prompts by llava_bench_<category>)")
    r.add_argument("--output", required=True, help="reviews JSONL (resumed when it exists)")
    r.add_argument("--retries", type=int, default=3, help="asks again when the reply has no two scores")
    r.add_argument("--max-tokens", type=int, default=1024)
    add_endpoint_args(r, model_help="judge model name the endpoint serves (the paper: gpt-4-0314)")
    s = lb_sub.add_parser("summarize", help="relative scores per category")
    s.add_argument("reviews")
    s.add_argument("--json", help="also write the figures as JSON")

    sq = bench_sub.add_parser("scienceqa", help="ScienceQA: answer, score")
    sq_sub = sq.add_subparsers(dest="step", required=True)
    for name in ("answer", "score"):
        p = sq_sub.add_parser(name, help="the model answers (greedy)" if name == "answer" else "accuracy")
        p.add_argument("--problems", required=True, help="ScienceQA's problems.json")
        p.add_argument("--splits", required=True, help="ScienceQA's pid_splits.json")
        p.add_argument("--split", default="test")
        if name == "answer":
            _add_answer_args(p, max_new_tokens=128)
        else:
            p.add_argument("--answers", required=True)
            p.add_argument("--json", help="also write the figures as JSON")
    return parser


def eval_main(argv=None):
    args = eval_parser().parse_args(argv)
    if args.bench == "llava-bench":
        from llava_fast.pipelines import llava_bench

        if args.step == "summarize":
            summary = llava_bench.summarize(args.reviews)
            print(llava_bench.format_summary(summary))
            if args.json:
                _write_json(args.json, summary)
            return 0
        if args.step == "review":
            from llava_fast.pipelines.client import client_from_args

            llava_bench.review(client_from_args(args), questions=args.questions, context=args.context,
                               reference=args.reference, answers=args.answers, rule=args.rule, output=args.output,
                               workers=args.workers, retries=args.retries, max_tokens=args.max_tokens, log=_log)
            return 0
        get_model, model_id = _model_loader(args)
        llava_bench.answer(get_model, questions=args.questions, images=args.images, output=args.output,
                           model_id=model_id, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, template=args.template, log=_log)
        return 0
    from llava_fast.pipelines import scienceqa

    if args.step == "score":
        result = scienceqa.score(problems=args.problems, splits=args.splits, split=args.split, answers=args.answers)
        print(scienceqa.format_score(result))
        if args.json:
            _write_json(args.json, result)
        return 0
    get_model, model_id = _model_loader(args)
    scienceqa.answer(get_model, problems=args.problems, splits=args.splits, split=args.split, images=args.images,
                     output=args.output, model_id=model_id, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, template=args.template, log=_log)
    return 0


def _model_loader(args):
    from llava_fast.cli import _check_model_choice, _load
    from llava_fast.pipelines.answering import model_id_of

    _check_model_choice(args)
    return (lambda: _load(args)), model_id_of(args)
