"""A local OpenAI-compatible chat-completions server for the pipeline tests: 127.0.0.1, a free port, scripted
replies, every request recorded.

    with OpenAIStub(lambda request, n: "reply text") as stub:     # n: 0-based index of this request
        ... ChatClient(model="m", endpoint=stub.url) ...
        stub.requests  # the JSON bodies received, in order

A script returns a str (a 200 reply, finish_reason "stop"), a dict {"text", "finish_reason"}, an int status
(an error answer with that HTTP status), or ("sleep", seconds) to stall past the client's time-out.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OpenAIStub:
    def __init__(self, script):
        self.script = script
        self.requests = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with stub.lock:
                    index = len(stub.requests)
                    stub.requests.append({"path": self.path, "body": body})
                action = stub.script(body, index)
                if isinstance(action, tuple) and action[0] == "sleep":
                    time.sleep(action[1])
                    action = "late"
                if isinstance(action, int):
                    self._send(action, {"error": {"message": f"scripted {action}", "type": "stub"}})
                    return
                if isinstance(action, str):
                    action = {"text": action, "finish_reason": "stop"}
                self._send(200, {
                    "id": f"chatcmpl-{index}", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": action["finish_reason"],
                                 "message": {"role": "assistant", "content": action["text"]}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (time-out test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def messages(self):
        return [r["body"]["messages"] for r in self.requests]
