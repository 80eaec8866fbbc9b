"""A black-box victim behind an OpenAI-compatible chat-completions API (vLLM, Ollama, a hosted
model, or `vlmsec serve`): `generate` is all it gives.

Each request is one user turn: the instruction as a `text` part and the image as a uint8 PNG
`data:image/png;base64,...` URL (`png_data_url`: PNG is lossless, so the server decodes exactly
the pixels the bench scored), greedy (`temperature: 0`), `max_tokens` as asked. Nothing is sent
anywhere but the configured `base_url`; the API key is read from the environment variable the
config names, never written to a config dump or a record.

Failures are retried with exponential backoff (`backoff_seconds`, doubled each attempt, or the
server's `Retry-After`) up to `retries` times: a connection refused or reset, a timeout, HTTP 429
and 5xx, and an answer that is not a chat completion. A 4xx other than 429 is the request's own
fault and is not retried. What still fails raises `ApiFailure` (a VlmsecError), which the runner
records as the attack's failure while the rest of the run goes on.

The client is httpx (a dependency of the bench already needed for the tests' servers) rather
than the `openai` package: the retry budget, the pacing, what counts as garbage and the cost
counter must be the bench's own, measured the same way whatever server answers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from PIL import Image

from vlmsec.artifacts import write_json_atomic
from vlmsec.errors import VlmsecError

COST_FILE = "api_cost.json"  # the run folder's cost counter of an API victim


class ApiFailure(VlmsecError):
    """The API did not answer a request within the configured retries (or the request budget is spent)."""


def png_data_url(image: np.ndarray) -> str:
    """A uint8 H x W x 3 image as a base64 PNG data URL (lossless: the server decodes these exact pixels)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise VlmsecError(f"an API victim sends H x W x 3 uint8 images, got {image.shape} {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_request(model: str, instruction: str, image: np.ndarray | None, max_tokens: int) -> dict[str, Any]:
    """The chat-completions body of one greedy request: one user turn, the text then the image (if any)."""
    content: list[dict[str, Any]] = [{"type": "text", "text": instruction}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": png_data_url(image)}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}


def completion_text(body: Any) -> tuple[str, dict[str, int]]:
    """The answer and token usage of a chat-completions response body; ValueError saying what is
    wrong when it is not one (garbage)."""
    try:
        message = body["choices"][0]["message"]
        text = message["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"not a chat completion (no choices[0].message.content): {str(body)[:200]!r}") from None
    if not isinstance(text, str):
        raise ValueError(f"choices[0].message.content is {type(text).__name__}, not text")
    usage = body.get("usage") if isinstance(body, dict) else None
    counts = {}
    if isinstance(usage, dict):
        counts = {k: int(usage[k]) for k in ("prompt_tokens", "completion_tokens") if isinstance(usage.get(k), int)}
    return text, counts


@dataclass
class ApiCost:
    """What the run paid the API: requests sent (retries included), those that failed, the tokens the
    server reported, and the wall seconds spent in requests (backoff waits included)."""

    requests: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def read(cls, path: Path) -> ApiCost:
        """The counter kept at `path` by earlier sessions of the run folder (a resumed run adds to it); zero if none."""
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in asdict(cls()) if k in data})
        except (OSError, ValueError, TypeError):
            return cls()


class ApiVictim:
    """The `openai` victim kind's victim: `generate` over HTTP; no weights, gradients or representations.

    `cost_file` (set by the runner to the run folder's `api_cost.json`) receives the cost counter
    after every `generate` call, so even a failed run leaves what it spent.
    """

    answers_text_only = True  # a text-only request is sent without an image part; the server decides
    model = None  # no weights here: nothing to move to a device, save, or read gradients from

    def __init__(
        self,
        base_url: str,
        model_name: str,
        api_key: str | None = None,
        retries: int = 3,
        timeout_seconds: float = 60.0,
        max_requests_per_second: float | None = None,
        max_requests: int | None = None,
        backoff_seconds: float = 1.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.retries = retries
        self.timeout = timeout_seconds
        self.interval = 1 / max_requests_per_second if max_requests_per_second else 0.0
        self.max_requests = max_requests
        self.backoff = backoff_seconds
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_seconds)
        self.cost = ApiCost()
        self.cost_file: Path | None = None
        self._last_start = 0.0

    def describe(self) -> str:
        return f"the openai victim ({self.model_name} at {self.base_url})"

    def keep_cost(self, path: Path) -> None:
        """Add this victim's requests to the counter at `path` (earlier sessions' counts kept)."""
        self.cost_file = path
        self.cost = ApiCost.read(path)

    def _write_cost(self) -> None:
        if self.cost_file is not None:
            write_json_atomic(self.cost_file, {**asdict(self.cost), "base_url": self.base_url, "model": self.model_name})

    # ---- what a black-box attacker has ---------------------------------------------------------
    def prompt(self, instruction: str, image: bool = True) -> str:
        """The text sent: the instruction itself (the server applies its model's chat template)."""
        return instruction

    @property
    def max_sequence_length(self) -> int | None:
        return None

    def generate(
        self,
        images: Sequence[np.ndarray | None],
        instructions: Sequence[str],
        max_new_tokens: int = 32,
        batch_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Greedy answers, one request per image-instruction pair (`batch_size` is the in-process victims' only)."""
        answers = []
        try:
            for image, instruction in zip(images, instructions, strict=True):
                answers.append(self.ask(image, instruction, max_new_tokens))
                if on_batch is not None:
                    on_batch(1)
        finally:
            self._write_cost()
        return answers

    def ask(self, image: np.ndarray | None, instruction: str, max_tokens: int) -> str:
        """One greedy answer, retried with backoff within the budget; ApiFailure with the last reason."""
        body = chat_request(self.model_name, instruction, image, max_tokens)
        reason = ""
        for attempt in range(self.retries + 1):
            if self.max_requests is not None and self.cost.requests >= self.max_requests:
                raise ApiFailure(f"{self.describe()}: the request budget (victim.max_requests: {self.max_requests}) is spent")
            self._pace()
            start = time.perf_counter()
            wait = self.backoff * 2**attempt
            self.cost.requests += 1
            try:
                outcome, text, retry_after = self._post(body)
            finally:
                self.cost.seconds += time.perf_counter() - start
            if outcome == "answer":
                return text
            reason = text
            self.cost.failed_requests += 1
            if outcome == "fatal" or attempt == self.retries:
                break
            delay = retry_after if retry_after is not None else wait
            time.sleep(delay)
            self.cost.seconds += delay
        tries = f"after {attempt + 1} attempt{'s' if attempt else ''}"
        raise ApiFailure(f"{self.describe()}: request failed {tries}: {reason}")

    def _post(self, body: dict[str, Any]) -> tuple[Literal["answer", "retry", "fatal"], str, float | None]:
        """One attempt: ("answer", the answer, None), or ("retry" | "fatal", the reason, the server's Retry-After)."""
        url = f"{self.base_url}/chat/completions"
        try:
            response = self.client.post("/chat/completions", json=body)
        except httpx.TimeoutException:
            return "retry", f"no answer from {url} within {self.timeout:g} s (victim.timeout_seconds)", None
        except httpx.TransportError as err:
            return "retry", f"cannot reach {url}: {type(err).__name__}: {err}", None
        if response.status_code == 429 or response.status_code >= 500:
            return "retry", f"HTTP {response.status_code} from {url}: {response.text[:200]}", _retry_after(response)
        if response.status_code != 200:
            return "fatal", f"HTTP {response.status_code} from {url} (not retried: the request itself was refused): {response.text[:300]}", None
        try:
            text, usage = completion_text(response.json())
        except ValueError as err:
            return "retry", f"garbage answer from {url}: {err}", None
        self.cost.prompt_tokens += usage.get("prompt_tokens", 0)
        self.cost.completion_tokens += usage.get("completion_tokens", 0)
        return "answer", text, None

    def _pace(self) -> None:
        """Sleep so request starts are at least 1 / max_requests_per_second apart."""
        if self.interval:
            left = self._last_start + self.interval - time.monotonic()
            if left > 0:
                time.sleep(left)
            self._last_start = time.monotonic()

    # ---- what it cannot give --------------------------------------------------------------------
    def _refuse(self, what: str, attack: str | None = None) -> VlmsecError:
        who = f"attack {attack!r} needs" if attack else "this needs"
        return VlmsecError(
            f"{who} {what}; {self.describe()} answers through its API only (outputs, no weights): "
            "use black-box attacks and defenses that read outputs only"
        )

    def check_pixel_gradients(self, attack: str) -> None:
        raise self._refuse("the victim's pixel gradients", attack)

    def check_token_gradients(self, attack: str) -> None:
        raise self._refuse("the victim's token-embedding gradients", attack)

    def check_image_text(self) -> None:
        raise self._refuse("the victim's image and text embeddings")

    def check_answer_representations(self) -> None:
        raise self._refuse("the victim's hidden states")

    def save(self, folder: str | Path) -> None:
        raise self._refuse("a checkpoint to save")

    # The rest of the Victim protocol: what white- and gray-box attacks, data filters and tuning call.
    # The config check refuses them first (`experiments.config._check_access`); reached another way
    # (`vlmsec trigger`), each stops with the same error instead of an AttributeError.
    def vision_embedding(self, images: Any) -> Any:
        raise self._refuse("the victim's vision tower")

    def vision_tokens(self, images: Any) -> Any:
        raise self._refuse("the victim's vision tower")

    def answer_loss(self, images: Any, instructions: Any, answers: Any) -> Any:
        raise self._refuse("the victim's loss and its gradients")

    def vision_key(self) -> dict[str, Any]:
        raise self._refuse("the victim's vision tower")

    def token_problem(self, images: Any, instructions: Any, answers: Any) -> Any:
        raise self._refuse("the victim's token embeddings")

    def embedding_matrix(self) -> Any:
        raise self._refuse("the victim's token embeddings")

    def loss_from_embeddings(self, problem: Any, inputs_embeds: Any) -> Any:
        raise self._refuse("the victim's loss and its gradients")

    def image_text_vectors(self, images: Any, texts: Any) -> Any:
        raise self._refuse("the victim's image and text embeddings")

    def image_vectors(self, images: Any) -> Any:
        raise self._refuse("the victim's image embeddings and their gradients")

    def answer_representations(self, samples: Any, batch_size: int = 32) -> Any:
        raise self._refuse("the victim's hidden states")

    def prepare_training(self, samples: Any, label: str) -> Any:
        raise self._refuse("tuning")

    def batch_loss(self, prepared: Any, index: Any, samples: Any) -> Any:
        raise self._refuse("tuning")

    def select_trainable(self, spec: Any) -> Any:
        raise self._refuse("tuning")

    def tuning_modes(self, spec: Any) -> Any:
        raise self._refuse("tuning")

    def sequence_length(self, instruction: str, answer: str) -> int:
        raise self._refuse("the victim's tokenizer")


def _retry_after(response: httpx.Response) -> float | None:
    """The server's Retry-After in seconds (a number; HTTP dates are ignored), capped at a minute."""
    value = response.headers.get("retry-after")
    try:
        return min(max(float(value), 0.0), 60.0) if value is not None else None
    except ValueError:
        return None


def api_key(variable: str | None) -> str | None:
    """The API key from environment variable `variable` (None: no key); an unset variable is an error naming it."""
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise VlmsecError(f"victim.api_key_env: the environment variable {variable} is not set (it holds the API key)")
    return value
