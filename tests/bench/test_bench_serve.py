"""`llava-fast bench serve` end to end through the CLI on the tiny preset: 3 requests, 1 and 3 clients (the
loader the CLI shares with it once broke this command before any request was sent)."""

import json

import pytest

from llava_fast.bench import cli, schema

pytestmark = pytest.mark.slow


def test_bench_serve_writes_a_valid_document(tmp_path, capsys):
    pytest.importorskip("fastapi", reason="the server extra is not installed")
    out = tmp_path / "serve.json"
    assert cli.main(["serve", "--requests", "3", "--clients", "1,3", "--max-tokens", "12", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == [] and doc["kind"] == "serve"
    clients = {f["labels"]["clients"] for f in doc["figures"] if f["name"] == "serve_output_throughput"
               and f["labels"]["engine"] == "llava-fast/serve"}
    assert clients == {1, 3}
    speedup = [f for f in doc["figures"] if f["name"] == "serve_speedup"]
    assert len(speedup) == 2 and all(f["value"] > 0 for f in speedup)
    assert "| llava-fast/serve | 3 |" in capsys.readouterr().out


def test_a_server_error_mid_stream_is_reported_with_its_message():
    """The server answers 200 and then an error event (a decode step failed): the benchmark's clients, in their
    child process, must fail naming the server's message (they raised KeyError: 'choices' on that event)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from llava_fast.bench import serve_bench

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}, "finish_reason": None}]}
            error = {"error": {"message": "decode step failed: simulated", "type": "internal_error"}}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(RuntimeError, match="server reported an error: decode step failed: simulated"):
            serve_bench._run_clients(url, serve_bench.workload(2, 0), 2)
    finally:
        server.shutdown()
