"""`vlmsec serve`: any victim vlmsec loads, behind an OpenAI-compatible chat-completions endpoint,
with defenses optionally in front, so a defended model can be attacked as a black box (by the
`openai` victim kind, or any client).

Endpoints: `GET /v1/models` and `POST /v1/chat/completions`. A request is one user turn (system
messages' text goes first, joined by newlines; no assistant turns): `text` parts, joined by
newlines, and at most one `image_url` part holding a base64 PNG data URL
(`data:image/png;base64,...`; the server fetches nothing). Decoding is greedy whatever
`temperature` says; `max_tokens` (or `max_completion_tokens`) bounds the answer. The response is
OpenAI's `chat.completion` with `usage` (the prompt's text tokens as the victim's template writes
it, and the answer's text re-encoded, both by the victim's tokenizer: the victims return text, so
an answer that does not re-encode to the tokens generated, as a random model's may not, is counted
as it re-encodes; `finish_reason` is "length" when that count reaches `max_tokens`) and a `vlmsec` field saying
which defenses acted and which detector flagged the input. A bad request (not JSON, a field
missing or of the wrong type, an image that is not a decodable PNG) gets HTTP 400 with the
reason in OpenAI's error schema.

Defenses in front act where they act in a deployment (`defenses.base`): purifiers rewrite the
image, then detectors score the purified input and a flagged one gets the deployment's refusal
(thresholds calibrated at start-up on clean tuning samples, at each detector's `fpr`), then a
prompt defense (at most one) answers in place of the plain victim. Data filters and model repairs
or scans act on tuning or on a checkpoint, not on a request, and defenses that read the model
itself cannot sit in front of an endpoint either: they are refused at start-up.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from vlmsec.data.images import decode_image
from vlmsec.data.sample import Sample
from vlmsec.defenses.base import Defense, Detector, PromptDefense, Purifier
from vlmsec.errors import VlmsecError
from vlmsec.experiments.defenses import REFUSAL  # a flagged input gets the matrix's deployment's refusal
from vlmsec.seeds import derive_seed
from vlmsec.victims.base import Victim

DEFAULT_MAX_TOKENS = 32  # as `Victim.generate`'s default
MAX_TOKENS_LIMIT = 4096
PNG_DATA_URL = "data:image/png;base64,"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BadRequest(VlmsecError):
    """A request the endpoint cannot answer as sent: HTTP 400 (or `status`) with the reason and the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass(frozen=True)
class ChatRequest:
    """What the endpoint answers: one instruction, its image (None: text only), the answer's token bound."""

    instruction: str
    image: np.ndarray | None
    max_tokens: int


def check_in_front(label: str, defense: Defense) -> None:
    """A VlmsecError unless `defense` acts on a request (a purifier, a detector, a prompt defense that reads answers only)."""
    kind = defense.kind()
    if defense.acts_on in ("data", "model"):
        raise VlmsecError(
            f"--defense {label}: a {kind} acts on {'the tuning data' if defense.acts_on == 'data' else 'a tuned model'}, "
            "not on a request: it cannot sit in front of an endpoint (in front: purifiers, detectors, prompt defenses)"
        )
    if defense.reads_model:
        raise VlmsecError(f"--defense {label}: it reads the model's internals, not a request and answers: it cannot sit in front of an endpoint")
    if defense.unavailable() is not None:
        raise VlmsecError(f"--defense {label}: not available here: {defense.unavailable()}")


class Served:
    """The victim as the endpoint serves it: its defenses in front (in the order purifiers, detectors,
    the prompt defense), detector thresholds calibrated on `calibration` clean samples."""

    def __init__(self, victim: Victim, name: str, defenses: dict[str, Defense], calibration: Sequence[Sample] = ()) -> None:
        from vlmsec.defenses.detect import calibrate_threshold

        for label, defense in defenses.items():
            check_in_front(label, defense)
        prompts = [label for label, d in defenses.items() if isinstance(d, PromptDefense)]
        if len(prompts) > 1:
            raise VlmsecError(f"--defense: at most one prompt defense answers a request; got {', '.join(prompts)}")
        self.victim, self.name, self.defenses = victim, name, dict(defenses)
        self.lock = threading.Lock()  # one request at a time through the model
        self.thresholds: dict[str, float] = {}
        for label, defense in defenses.items():
            if isinstance(defense, Detector):
                if not calibration:
                    raise VlmsecError(f"--defense {label}: a detector needs clean samples to calibrate its threshold on")
                scores = defense.scores(victim, [s.image for s in calibration], [s.instruction for s in calibration], self.seed(label))
                self.thresholds[label] = float(calibrate_threshold(scores, defense.params.fpr))  # type: ignore[attr-defined]

    @staticmethod
    def seed(label: str) -> int:
        return derive_seed(0, f"serve/{label}")

    def answer(self, request: ChatRequest) -> tuple[str, dict[str, Any]]:
        """The deployment's answer to one request, and what its defenses did (`applied`, `flagged_by`)."""
        image, instruction = request.image, request.instruction
        applied: list[str] = []
        with self.lock:
            for label, defense in self.defenses.items():
                if isinstance(defense, Purifier) and image is not None:
                    image = defense.purify([image], self.seed(label))[0]
                    applied.append(label)
            for label, defense in self.defenses.items():
                if isinstance(defense, Detector):
                    if image is None:
                        raise BadRequest(f"the detector {label} in front scores image inputs: send an image_url part", "messages")
                    score = float(defense.scores(self.victim, [image], [instruction], self.seed(label))[0])
                    applied.append(label)
                    if score > self.thresholds[label]:
                        return REFUSAL, {"applied": applied, "flagged_by": label, "score": score}
            prompt = next(((label, d) for label, d in self.defenses.items() if isinstance(d, PromptDefense)), None)
            images: list[Any] = [image]
            if prompt is not None:
                answer = prompt[1].answer(self.victim, images, [instruction], request.max_tokens, 1)[0]
                applied.append(prompt[0])
            else:
                answer = self.victim.generate(images, [instruction], max_new_tokens=request.max_tokens, batch_size=1)[0]
        return answer, {"applied": applied, "flagged_by": None}

    def count_tokens(self, text: str) -> int:
        """`text`'s tokens by the victim's tokenizer (0 for a victim without one: an API victim served again)."""
        tokenizer = getattr(self.victim, "tokenizer", None)
        return len(tokenizer(text, add_special_tokens=False).input_ids) if tokenizer is not None else 0

    def prompt_tokens(self, request: ChatRequest) -> int:
        """The prompt's text tokens as the victim's template writes it (image placeholders unexpanded)."""
        if request.image is None:
            return self.count_tokens(self.victim.prompt(request.instruction, image=False))  # type: ignore[call-arg]
        return self.count_tokens(self.victim.prompt(request.instruction))


# ---- the request -----------------------------------------------------------------------------------


def _image(url: Any, where: str) -> np.ndarray:
    """The uint8 RGB image of a base64 PNG data URL; BadRequest saying what is wrong with it."""
    if not isinstance(url, str):
        raise BadRequest(f"{where}: the url must be a string", where)
    if not url.startswith(PNG_DATA_URL):
        raise BadRequest(
            f"{where}: only base64 PNG data URLs ({PNG_DATA_URL}...) are taken; the server fetches nothing and "
            f"decodes no lossy format (got {url[:40]!r})", where,
        )
    try:
        data = base64.b64decode(url[len(PNG_DATA_URL):], validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"{where}: not valid base64: {err}", where) from None
    if not data.startswith(PNG_SIGNATURE):
        raise BadRequest(f"{where}: the data is not a PNG file (no PNG signature)", where)
    try:
        return decode_image(data)[0]
    except VlmsecError as err:
        raise BadRequest(f"{where}: {err}", where) from None


def parse_chat(payload: Any, model: str) -> ChatRequest:
    """A chat-completions body as one request to the served victim; BadRequest naming the field at fault."""
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object")
    if "model" not in payload:
        raise BadRequest("model: missing (GET /v1/models names the served model)", "model")
    if payload["model"] != model:
        raise BadRequest(f"model: {payload['model']!r} is not served here; this server serves {model!r}", "model", 404, "model_not_found")
    if payload.get("n", 1) != 1:
        raise BadRequest("n: one greedy answer per request", "n")
    if payload.get("stream"):
        raise BadRequest("stream: streaming is not served; send stream: false", "stream")
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens", DEFAULT_MAX_TOKENS))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise BadRequest(f"max_tokens: an integer from 1 to {MAX_TOKENS_LIMIT}, got {max_tokens!r}", "max_tokens")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: missing or empty (a list of {role, content})", "messages")
    texts: list[str] = []
    images: list[np.ndarray] = []
    users = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "content" not in message:
            raise BadRequest(f"{where}: a message is an object with role and content", where)
        role = message.get("role")
        if role not in ("system", "user", "developer"):
            raise BadRequest(f"{where}.role: {role!r}: the served victim answers one user turn (system and user messages only)", f"{where}.role")
        users += role == "user"
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise BadRequest(f"{where}.content: a string or a list of parts", f"{where}.content")
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                images.append(_image(part["image_url"].get("url"), f"{at}.image_url.url"))
            else:
                raise BadRequest(f"{at}: a part is {{type: text, text}} or {{type: image_url, image_url: {{url}}}}", at)
    if users != 1:
        raise BadRequest(f"messages: one user message is answered, got {users}", "messages")
    if len(images) > 1:
        raise BadRequest(f"messages: at most one image per request, got {len(images)}", "messages")
    return ChatRequest("\n".join(texts), images[0] if images else None, max_tokens)


def _error(err: BadRequest | VlmsecError, status: int = 400) -> JSONResponse:
    """OpenAI's error schema."""
    param = getattr(err, "param", None)
    code = getattr(err, "code", None)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": str(err), "type": kind, "param": param, "code": code}}, status_code=status)


def create_app(served: Served) -> FastAPI:
    """The FastAPI app serving `served` under /v1."""
    app = FastAPI(title="vlmsec serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "vlmsec"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return _error(BadRequest(f"the body is not JSON: {err}"))
        try:
            chat_request = parse_chat(payload, served.name)
            text, acted = await run_in_threadpool(served.answer, chat_request)
        except BadRequest as err:
            return _error(err, err.status)
        except VlmsecError as err:  # the victim refused the request as sent (a text-only one it cannot answer)
            return _error(err)
        completion = served.count_tokens(text)
        prompt = served.prompt_tokens(chat_request)
        digest = hashlib.sha256(raw).hexdigest()[:24]
        return JSONResponse(
            {
                "id": f"chatcmpl-{digest}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": served.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "length" if completion >= chat_request.max_tokens else "stop",
                    }
                ],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
                "vlmsec": acted,
            }
        )

    return app


# ---- what is served --------------------------------------------------------------------------------


def load_checkpoint(folder: Path) -> Victim:
    """A saved victim folder, by what it holds: a tuned Flamingo/Otter (flamingo.json), a Hugging Face
    checkpoint with its processor (preprocessor_config.json or processor_config.json), else the
    embedded LLaVA layout (`vlmsec run`'s tiny_llava models and cache stages)."""
    from vlmsec.victims.features import FeatureCache
    from vlmsec.victims.flamingo import CONFIG_FILE as FLAMINGO_FILE
    from vlmsec.victims.flamingo import FlamingoVictim
    from vlmsec.victims.hf import HFVictim
    from vlmsec.victims.llava import LlavaVictim

    if (folder / FLAMINGO_FILE).is_file():
        return FlamingoVictim.load(folder, FeatureCache())
    if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
        return HFVictim.load(folder)
    return LlavaVictim.load(folder, FeatureCache())


def load_served(target: str, cache: Path | None, calibration: int | None = None) -> tuple[Victim, str, list[Sample]]:
    """The victim `target` names (a checkpoint folder, or a config/preset: its base victim after its
    safety stage, from the stage cache, built there if missing), the name it is served under, and
    clean samples detectors calibrate on: `calibration` (default: the config's `defense.calibration`)
    of the config's tuning samples, or of generated clean scenes for a checkpoint folder."""
    from vlmsec.experiments.config import ExperimentConfig, load_config
    from vlmsec.experiments.runner import Runner
    from vlmsec.experiments.splits import build_splits

    path = Path(target)
    if path.is_dir():
        victim = load_checkpoint(path)
        victim.model.eval()
        count = calibration if calibration is not None else ExperimentConfig().defense.calibration
        if count == 0:
            return victim, path.resolve().name, []
        scenes = ExperimentConfig.model_validate({"data": {"base_size": 4, "train_size": count, "test_size": 4, "shifted": {}}})
        return victim, path.resolve().name, build_splits(scenes).train[:count]
    config = load_config(target)
    runner = Runner(config, Path("runs") / config.name, cache)
    splits = build_splits(config)
    base = runner.base_victim(splits)
    if config.safety is not None and runner.kind.trains:
        base = runner.safety_victim(splits, base, config.safety.data.split(seed=derive_seed(config.seed, "safety/split")))
    victim = runner.kind.load(base[0], runner.features)
    if victim.model is not None:
        victim.model.eval()
    return victim, config.name, splits.train[: calibration if calibration is not None else config.defense.calibration]


def serve(
    target: str, host: str, port: int, defenses: Sequence[str], cache: Path | None, name: str | None = None,
    calibration: int | None = None,
) -> None:
    """Load `target`, put `defenses` (registered names) in front, and serve until interrupted."""
    import uvicorn

    from vlmsec.defenses import create_defense
    from vlmsec.progress import console

    chosen = {}
    for label in defenses:
        if label in chosen:
            raise VlmsecError(f"--defense {label}: given twice")
        chosen[label] = create_defense(label)
        check_in_front(label, chosen[label])  # before the model loads
    if not any(isinstance(d, Detector) for d in chosen.values()):
        calibration = 0  # nothing to calibrate: no samples drawn
    victim, default_name, samples = load_served(target, cache, calibration)
    served = Served(victim, name or default_name, chosen, samples)
    url = f"http://{host}:{port}/v1"
    front = ", ".join(chosen) or "none"
    console.print(f"serving {served.name!r} at {url} (defenses in front: {front})", highlight=False, soft_wrap=True)
    uvicorn.run(create_app(served), host=host, port=port, log_level="warning")
