"""A live `llava-fast serve` for tests: uvicorn on 127.0.0.1 at a free port, in a thread of the test process,
and helpers to build OpenAI-style messages with images as data: URLs."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import PIL.Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_data_url(image: PIL.Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def random_image(seed, width=64, height=48) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def user(text, *image_urls):
    if not image_urls:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


class LiveServer:
    """create_app(model, config) served by uvicorn in a background thread until stop()."""

    def __init__(self, model, config):
        import uvicorn

        from llava_fast.serve.app import create_app

        self.model, self.config = model, config
        self.app = create_app(model, config)
        self.scheduler = self.app.state.scheduler
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout=60):
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)

    def metric(self, name) -> float:
        """The value of an unlabelled metric on /metrics."""
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=30).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             timeout=120, **kwargs)
