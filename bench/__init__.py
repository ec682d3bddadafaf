"""The llava-fast benchmark harness, installed as `llava_fast.bench`, run as `llava-fast bench`.

    cli.py              llava-fast bench [generate|kernels|train|compare|validate]
    generate_bench.py   end to end: TTFT, prefill/decode tokens/s, vision images/s, memory; llava-fast's
                        Triton and torch paths and transformers' generate() side by side on the same weights
    kernel_bench.py     each Triton kernel against its torch baseline: time, TFLOP/s or GB/s, % of peak
    train_bench.py      stage-1 / stage-2 training steps: tokens/s, MFU, peak memory
    timing.py           warm-up + median of repeats; CUDA events and L2-defeating input rotation on a GPU
    device.py           device, software, commit, measured and datasheet ceilings, nvidia-ml-py telemetry
    report.py           figures, the JSON document, markdown tables, the optional plot, compare
    schema.py           the result schema (documented in SCHEMA.md) and its validator
    image_preprocess.py image preprocessing throughput (native vs transformers vs Python)
    results/            committed results, named by device and date
"""
