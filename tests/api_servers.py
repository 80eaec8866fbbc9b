"""Helpers of the API tests: a real local HTTP server that misbehaves on cue, a free port, a small study."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Reply = tuple[int, dict[str, str], bytes, float]  # status, headers, body, seconds to wait first


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def study(victim: dict, attacks: list[dict]) -> dict:
    """An inference-only study on a given victim: nothing tuned, no safety stage."""
    return {
        "name": "api",
        "data": {"base_size": 16, "train_size": 16, "test_size": 4, "image_size": 32, "shifted": {}},
        "victim": victim,
        "poison": {"rate": 0.0},
        "attacks": attacks,
        "eval": {"max_new_tokens": 6, "batch_size": 1, "shift_size": False},
        "inference": {"requests": 3},
    }


class Misbehaving(ThreadingHTTPServer):
    """A real local HTTP server whose answer to the n-th POST (from 1) is `script(n)`: (status, headers,
    body, seconds to wait first). Counts what it was sent."""

    daemon_threads = True

    def __init__(self, script: Callable[[int], Reply]) -> None:
        self.script, self.posts, self.bodies = script, 0, []
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.server.bodies.append(self.rfile.read(int(self.headers.get("content-length", 0))))  # type: ignore[attr-defined]
        self.server.posts += 1  # type: ignore[attr-defined]
        status, headers, body, wait = self.server.script(self.server.posts)  # type: ignore[attr-defined]
        time.sleep(wait)
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (a timeout test)

    def log_message(self, *args: object) -> None:
        pass


def answer(text: str) -> Reply:
    body = {"choices": [{"message": {"role": "assistant", "content": text}}], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    return 200, {"content-type": "application/json"}, json.dumps(body).encode(), 0.0
