"""Victim kinds: what `victim.kind` can name, each owning its config, files, cache key and loader.

A victim kind is a `VictimKind` subclass registered in `VICTIM_KINDS`. It holds its `name`
and its config model (`Spec`, whose `kind` field is `Literal[name]`), and, wrapped around one
such config, answers everything the config check and the runner ask about the victim:

    resolve_paths / check_files / check_tuning   before any stage (errors name the field)
    tower_key                                    which frozen-tower feature cache it uses
    trains_base -> base_key, untrained           the base stage pretrains it from scratch, or
    trains_base -> given_base                    the base is given by files, keyed by them
    load                                         a base or tuned victim from its folder
    gives_gradients, trains                      what its victim gives besides answers (false for
                                                 `openai`, a model behind an API: black box only)

`ExperimentConfig.victim` picks the `Spec` by `kind` when it validates, so a kind registered
later, from outside the package, is configurable and runnable like the packaged ones:

    @VICTIM_KINDS.register
    class MyKind(VictimKind[MySpec]):
        name = "mine"
        Spec = MySpec
        ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from pydantic import BaseModel, Field, model_validator

from vlmsec.artifacts import stable_hash
from vlmsec.errors import VlmsecError
from vlmsec.experiments.stages import folder_signature, path_signature
from vlmsec.inputs import STRICT_INPUT, PathInput
from vlmsec.registry import Registry
from vlmsec.victims import hf
from vlmsec.victims.api import ApiVictim, api_key
from vlmsec.victims.architectures import architecture, model_types_where
from vlmsec.victims.base import Victim
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.flamingo import CONFIG_FILE as TUNED_FLAMINGO_FILE
from vlmsec.victims.flamingo import FlamingoVictim, load_flamingo, load_otter
from vlmsec.victims.flamingo_files import FlamingoParts, FlamingoSpec
from vlmsec.victims.language_models import (
    TINY,
    check_language_model,
    language_model_folder,
    language_model_key,
    load_language_model,
    resolve_language_model,
)
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_pretrained_llava, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer
from vlmsec.victims.vision import HFTowerSpec, OpenClipTowerSpec, check_checkpoint

DEFAULT_KIND = "tiny_llava"


class VictimSpecBase(BaseModel):
    """The `victim` config of any kind: `kind` names the registered `VictimKind`; each kind's `Spec` adds its fields."""

    model_config = STRICT_INPUT

    kind: str


SpecT = TypeVar("SpecT", bound=VictimSpecBase)


class VictimKind(Generic[SpecT]):
    """One kind of victim, wrapped around its config. Subclasses set `name` and `Spec` and
    implement `load` and either `given_base` or `untrained`; the other methods have defaults
    that suit a kind with no files of its own."""

    name: ClassVar[str]
    Spec: ClassVar[type[VictimSpecBase]]
    # What the kind's victim gives besides answers: gradients and representations (white- and gray-box
    # attacks, defenses that read the model), and tuning (training-stage attacks, the clean model,
    # data and model defenses). An API victim gives neither: the config check refuses what needs them.
    gives_gradients: ClassVar[bool] = True
    trains: ClassVar[bool] = True

    def __init__(self, spec: SpecT) -> None:
        self.spec = spec

    # ---- before any stage ---------------------------------------------------------------------
    def resolve_paths(self, base_dir: Path) -> None:
        """Take the config's relative file paths relative to `base_dir` (the config's folder)."""

    def check_files(self) -> None:
        """Raise a VlmsecError naming the field (`victim.checkpoint: /x not found`) if a file the victim needs is missing."""

    def check_tuning(self, mode: str, download: bool = False) -> None:
        """Raise a VlmsecError naming `tuning.mode` if this victim cannot train in `mode`.

        Parsing a config calls it with `download=False`; the runner again before any stage
        with `download=True`, for kinds that learn their architecture from a downloaded file.
        """

    # ---- the runner's questions ---------------------------------------------------------------
    def tower_key(self) -> str:
        """What the victim's frozen-tower features depend on: its FeatureCache file is named by it."""
        return stable_hash({"victim": self.spec.model_dump(mode="json")})

    @property
    def trains_base(self) -> bool:
        """Whether the base stage pretrains this victim on clean captions (`untrained`), rather than
        taking it as given (`given_base`)."""
        return False

    def given_base(self) -> tuple[Path, str]:
        """The given base victim: the path `load` takes, and a stage key over its files."""
        raise NotImplementedError(f"victim kind {self.name!r} trains its base: see untrained")

    def base_key(self) -> dict[str, Any]:
        """What a pretrained base depends on besides its data, training recipe and seed."""
        return {"victim": self.spec.model_dump(mode="json")}

    def untrained(self, corpus: list[str], features: FeatureCache, seed: int, cache_dir: Path | None = None) -> Victim:
        """A freshly initialised victim for the base stage; `corpus` holds every text it must be able to write.

        `cache_dir` is the run's stage cache, for what the kind reads once and keeps (a dequantised
        language model); None: `experiments.stages.default_cache_dir()`."""
        raise NotImplementedError(f"victim kind {self.name!r} has a given base: see given_base")

    def load(self, folder: Path, features: FeatureCache) -> Victim:
        """The victim saved in `folder`: the base (`given_base`'s path, or a pretrained base) or a tuned one."""
        raise NotImplementedError

    def check_safety(self) -> None:
        """Raise a VlmsecError naming the field if this victim cannot take a safety stage: it needs an
        instruction-tuned language model that reads requests with and without an image."""
        raise VlmsecError(
            f"safety: victim kind {self.name!r} cannot take the safety stage yet (it needs text-only requests); "
            "use the embedded victim with victim.language_model: smollm2 or a local causal-LM folder"
        )

    def language_model_folder(self, cache_dir: Path) -> Path | None:
        """The victim's own language model as a causal-LM folder (the default refusal judge), if it has one apart."""
        return None


VICTIM_KINDS: Registry[type[VictimKind[Any]]] = Registry("victim kind")


def spec_class(data: dict[str, Any]) -> type[VictimSpecBase]:
    """The config model of the kind a `victim` mapping names (the embedded tiny LLaVA when it names none)."""
    return VICTIM_KINDS.get(data.get("kind", DEFAULT_KIND)).Spec


def victim_kind(spec: VictimSpecBase) -> VictimKind[Any]:
    """The registered kind of a validated `victim` config, wrapped around it."""
    return VICTIM_KINDS.get(spec.kind)(spec)


def _under(base_dir: Path, path: Path) -> Path:
    """`path` taken relative to `base_dir` (an absolute or ~ path stays where it is)."""
    return base_dir / Path(path).expanduser()


def _require(fields: dict[str, Path | None]) -> None:
    """A VlmsecError naming the first field whose path does not exist."""
    for field, path in fields.items():
        if path is not None and not Path(path).exists():
            raise VlmsecError(f"{field}: {path} not found")


def _folder_base(folder: Path) -> tuple[Path, str]:
    """A given checkpoint folder and its stage key (where it is and its files' names, sizes and times)."""
    return folder, stable_hash({"checkpoint": str(folder.resolve()), "files": folder_signature(folder)})


# ---- the embedded tiny LLaVA, or a LLaVA-format folder --------------------------------------------


# The sizes of the tiny Llama, which a pretrained language model brings with it.
LANGUAGE_MODEL_SIZES = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size")


class TinyLlavaVictimSpec(TinyLlavaSpec, VictimSpecBase):
    """The embedded LLaVA, built from these sizes (or around a pretrained `language_model`) and
    pretrained in the base stage, or a local LLaVA-format checkpoint folder that replaces the base stage."""

    kind: Literal["tiny_llava"] = "tiny_llava"
    checkpoint: PathInput | None = Field(None, description="local LLaVA-format folder (replaces the base stage)")
    # Left out of dumps when default, so the base stage's cache key of a tiny victim is as it was.
    language_model: str = Field(
        TINY,
        exclude_if=lambda value: value == TINY,
        description="tiny (a Llama of these sizes, trained from scratch), smollm2 (the packaged "
        "SmolLM2-135M-Instruct GGUF), or a path to a .gguf file or a Hugging Face causal-LM folder",
    )

    @model_validator(mode="after")
    def _vision_only_when_built(self) -> TinyLlavaVictimSpec:
        if self.vision.kind != "efficientnet_lite0" and self.checkpoint is not None:
            raise ValueError(
                "victim.vision picks the embedded tiny_llava's tower; it has no effect with a victim.checkpoint"
            )
        return self

    @model_validator(mode="after")
    def _sizes_only_for_tiny(self) -> TinyLlavaVictimSpec:
        if self.language_model == TINY:
            return self
        if self.checkpoint is not None:
            raise ValueError("victim.language_model builds the embedded victim; it has no effect with a victim.checkpoint")
        for name in LANGUAGE_MODEL_SIZES:  # a dump of the config writes the defaults back: those are let through
            if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(
                    f"victim.{name}: a pretrained language_model ({self.language_model}) has its own sizes; leave {name} out"
                )
        return self


@VICTIM_KINDS.register
class TinyLlavaKind(VictimKind[TinyLlavaVictimSpec]):
    """The embedded tiny LLaVA (pretrained in the base stage, cached) or a user's LLaVA-format folder."""

    name = "tiny_llava"
    Spec = TinyLlavaVictimSpec

    def resolve_paths(self, base_dir: Path) -> None:
        spec = self.spec
        if spec.checkpoint is not None:
            spec.checkpoint = _under(base_dir, spec.checkpoint)
        spec.language_model = resolve_language_model(spec.language_model, base_dir)
        if isinstance(spec.vision, OpenClipTowerSpec | HFTowerSpec):
            spec.vision.checkpoint = _under(base_dir, spec.vision.checkpoint)

    def check_files(self) -> None:
        _require({"victim.checkpoint": self.spec.checkpoint})
        check_language_model(self.spec.language_model)
        if isinstance(self.spec.vision, OpenClipTowerSpec | HFTowerSpec):
            try:
                check_checkpoint(self.spec.vision)
            except VlmsecError as err:
                raise VlmsecError(f"victim.{err}") from None

    def check_tuning(self, mode: str, download: bool = False) -> None:
        if mode == "xattn":
            raise VlmsecError(
                "tuning.mode: 'xattn' needs gated cross-attention layers; the tiny LLaVA has none: "
                "use projector, lora or full"
            )

    def _vision_files(self) -> dict[str, Any]:
        """`path_signature` of the embedded victim's tower checkpoint, if its tower has one (else nothing)."""
        checkpoint = getattr(self.spec.vision, "checkpoint", None)
        return {"vision_files": path_signature(checkpoint)} if checkpoint is not None else {}

    def tower_key(self) -> str:
        """The embedded tower's packaged ImageNet weights at the configured size (or whatever tower a
        user's LLaVA checkpoint carries), or another tower of the embedded victim with its checkpoint."""
        spec = self.spec
        if spec.vision.kind != "efficientnet_lite0":
            # A ViT's cache entries also carry its trained weights (LlavaVictim).
            vision = {"vision": spec.vision.model_dump(mode="json"), **self._vision_files()}
            return stable_hash({"tower": spec.vision.kind, "image_size": spec.image_size, **vision})
        checkpoint = spec.checkpoint
        tower = {"checkpoint": folder_signature(checkpoint)} if checkpoint is not None and checkpoint.is_dir() else {}
        return stable_hash({"tower": "efficientnet-lite0-imagenet", "image_size": spec.image_size, **tower})

    @property
    def trains_base(self) -> bool:
        return self.spec.checkpoint is None

    def given_base(self) -> tuple[Path, str]:
        assert self.spec.checkpoint is not None  # trains_base otherwise
        LlavaVictim.check_folder(self.spec.checkpoint)
        return _folder_base(self.spec.checkpoint)

    def base_key(self) -> dict[str, Any]:
        # tokenizer and flamingo: fields every kind's victim config had when they shared one model,
        # kept so the bases cached before are found again.
        victim = {**self.spec.model_dump(mode="json"), "tokenizer": None, "flamingo": None}
        language = language_model_key(self.spec.language_model) if self.spec.language_model != TINY else {}
        return {"victim": victim, **self._vision_files(), **language}

    def untrained(self, corpus: list[str], features: FeatureCache, seed: int, cache_dir: Path | None = None) -> Victim:
        """The tiny Llama with a BPE trained on `corpus`, or the pretrained language model with its own tokenizer."""
        if self.spec.language_model == TINY:
            tokenizer = train_tokenizer(corpus, self.spec.vocab_size)
            model = build_tiny_llava(self.spec, tokenizer, seed=seed)
        else:
            language_model, tokenizer = load_language_model(self.spec.language_model, cache_dir)
            model = build_pretrained_llava(self.spec, language_model, tokenizer, seed=seed)
        return LlavaVictim(model, tokenizer, features, train_tower=self.spec.vision.from_scratch)

    def load(self, folder: Path, features: FeatureCache) -> Victim:
        return LlavaVictim.load(folder, features)

    def check_safety(self) -> None:
        if self.spec.language_model == TINY:
            raise VlmsecError(
                "safety: the tiny language model trained here has never seen a request it should refuse; set "
                "victim.language_model to smollm2 or a local instruction-tuned causal-LM folder (or a GGUF file)"
            )

    def language_model_folder(self, cache_dir: Path) -> Path | None:
        if self.spec.language_model == TINY:
            return None
        return language_model_folder(self.spec.language_model, cache_dir)


# ---- any Hugging Face image-text-to-text checkpoint -----------------------------------------------

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hf_offline() -> bool:
    """Whether Hugging Face offline mode is set (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), read now."""
    return any(os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"} for name in OFFLINE_VARIABLES)


def hf_local_path(value: str | Path, base_dir: Path) -> Path | None:
    """The local folder an hf `checkpoint` value names (under `base_dir` when relative), or None for a hub id.

    A value names a local path when it is a Path already, is absolute, starts with ./, ../ or ~,
    exists under `base_dir`, has a slash and an existing parent folder there, or cannot be a hub
    id; anything else (`org/name`) is a hub id.
    """
    if isinstance(value, Path):
        return value
    path = _under(base_dir, Path(value))
    local = (
        Path(value).expanduser().is_absolute()
        or value.startswith(("./", "../", "~"))
        or path.exists()
        or ("/" in value and path.parent.is_dir())
    )
    if not local:
        try:
            validate_repo_id(value)
        except HFValidationError:
            local = True
    return path if local else None


class HFVictimSpec(VictimSpecBase):
    """Any Hugging Face image-text-to-text checkpoint, prompted with its own chat template."""

    kind: Literal["hf"] = "hf"
    checkpoint: Path | str = Field(
        description="a local checkpoint folder or a hub id (`org/name`); once the config is parsed, a Path is "
        "a local folder and a str a hub id"
    )


@VICTIM_KINDS.register
class HFKind(VictimKind[HFVictimSpec]):
    """`AutoModelForImageTextToText` with its `AutoProcessor`, from a local folder or the hub."""

    name = "hf"
    Spec = HFVictimSpec

    def resolve_paths(self, base_dir: Path) -> None:
        local = hf_local_path(self.spec.checkpoint, base_dir)
        if local is not None:
            self.spec.checkpoint = local

    def check_files(self) -> None:
        checkpoint = self.spec.checkpoint
        if isinstance(checkpoint, Path):
            _require({"victim.checkpoint": checkpoint})
            try:
                hf.check_folder(checkpoint)
            except VlmsecError as err:
                raise VlmsecError(f"victim.checkpoint: {err}") from None
        elif hf_offline() and self._cached_config() is None:
            raise VlmsecError(
                f"victim.checkpoint: {checkpoint!r} is no local folder, so it is a hub id, but Hugging Face offline "
                f"mode is set ({' / '.join(OFFLINE_VARIABLES)}) and it is not in the Hugging Face cache"
            )

    def _cached_config(self) -> str | None:
        """The hub checkpoint's config.json in the Hugging Face cache, if it is there."""
        found = try_to_load_from_cache(str(self.spec.checkpoint), "config.json")
        return found if isinstance(found, str) else None

    def _config_file(self, download: bool) -> Path | None:
        """The checkpoint's config.json: the folder's, the cached one, or (`download`, online) fetched now."""
        checkpoint = self.spec.checkpoint
        if isinstance(checkpoint, Path):
            return checkpoint / "config.json"
        cached = self._cached_config()
        if cached is not None:
            return Path(cached)
        if not download or hf_offline():
            return None
        try:
            return Path(hf_hub_download(str(checkpoint), "config.json"))
        except (OSError, ValueError, EntryNotFoundError) as err:
            raise VlmsecError(f"victim.checkpoint: cannot fetch {checkpoint}'s config.json from the hub: {err}") from None

    def check_tuning(self, mode: str, download: bool = False) -> None:
        """Refuse xattn on architectures without cross-attention, from config.json's model_type, before loading."""
        config = self._config_file(download)
        if config is None or not config.is_file():
            return  # not known yet: the loaded model is checked before training
        model_type = json.loads(config.read_text()).get("model_type", "")
        try:
            arch = architecture(model_type)
        except VlmsecError as err:
            raise VlmsecError(f"victim.checkpoint: {err}") from None
        if mode == "xattn" and not arch.cross_attention:
            with_xattn = model_types_where(lambda a: bool(a.cross_attention))
            raise VlmsecError(
                f"tuning.mode: 'xattn' needs gated cross-attention layers; {model_type} has none "
                f"(hf model types with them: {with_xattn}): use projector, lora or full"
            )

    def tower_key(self) -> str:
        """The HF victim runs its tower inside its own forward and caches no features: a key of its own."""
        return stable_hash({"tower": "hf", "checkpoint": str(self.spec.checkpoint)})

    def given_base(self) -> tuple[Path, str]:
        checkpoint = self.spec.checkpoint
        if not isinstance(checkpoint, Path):
            return Path(checkpoint), stable_hash({"checkpoint": checkpoint})  # a hub id
        hf.check_folder(checkpoint)
        return _folder_base(checkpoint)

    def load(self, folder: Path, features: FeatureCache) -> Victim:
        return hf.HFVictim.load(folder)


# ---- OpenFlamingo and Otter, read by our own loader -----------------------------------------------

FLAMINGO_MODES = ("xattn", "full")


class FlamingoVictimSpec(VictimSpecBase):
    """A released OpenFlamingo model: its open_clip tower, language model, tokenizer and checkpoint.pt."""

    kind: Literal["flamingo"] = "flamingo"
    checkpoint: PathInput = Field(description="OpenFlamingo's checkpoint.pt (perceiver + gated cross-attention)")
    tokenizer: PathInput | None = Field(None, description="tokenizer folder (default: flamingo.lang_model)")
    flamingo: FlamingoParts = Field(
        description="vision_checkpoint (open_clip), lang_model (HF causal-LM folder), cross_attn_every_n_layers "
        "and the rest of OpenFlamingo's architecture"
    )

    def flamingo_spec(self) -> FlamingoSpec:
        """Every OpenFlamingo file, as `load_flamingo` takes them."""
        return FlamingoSpec(**self.flamingo.model_dump(), tokenizer=self.tokenizer, checkpoint=self.checkpoint)


class OtterVictimSpec(VictimSpecBase):
    """An Otter-Image Hugging Face folder, read as a Flamingo."""

    kind: Literal["otter"] = "otter"
    checkpoint: PathInput = Field(description="the Otter-Image Hugging Face folder")
    tokenizer: PathInput | None = Field(None, description="the base LM's tokenizer folder (default: the Otter folder)")


FlamingoFamilySpec = TypeVar("FlamingoFamilySpec", FlamingoVictimSpec, OtterVictimSpec)


class _FlamingoFamily(VictimKind[FlamingoFamilySpec]):
    """What OpenFlamingo and Otter share: xattn or full tuning, tuned folders saved with flamingo.json."""

    def check_tuning(self, mode: str, download: bool = False) -> None:
        if mode not in FLAMINGO_MODES:
            raise VlmsecError(
                f"tuning.mode: {mode!r} is not available for Flamingo (OpenFlamingo / Otter): it has no projector "
                "to tune alone, and LoRA is not wired to its language model; use xattn (gated cross-attention "
                "+ perceiver, the paper's mode) or full"
            )

    def released(self) -> tuple[dict[str, Any], dict[str, Path]]:
        """The config part of the base's stage key, and every file the base is read from, by role."""
        raise NotImplementedError

    def given_base(self) -> tuple[Path, str]:
        described, files = self.released()
        key = stable_hash({**described, "files": {role: path_signature(path) for role, path in files.items()}})
        return self.spec.checkpoint, key

    def load(self, folder: Path, features: FeatureCache) -> Victim:
        if (folder / TUNED_FLAMINGO_FILE).is_file():
            return FlamingoVictim.load(folder, features)
        return self.load_released(folder, features)

    def load_released(self, folder: Path, features: FeatureCache) -> Victim:
        """The base victim from the released files (`folder` is `given_base`'s path)."""
        raise NotImplementedError


@VICTIM_KINDS.register
class FlamingoKind(_FlamingoFamily[FlamingoVictimSpec]):
    """OpenFlamingo from its released parts: open_clip tower, causal LM, checkpoint.pt."""

    name = "flamingo"
    Spec = FlamingoVictimSpec

    def resolve_paths(self, base_dir: Path) -> None:
        spec = self.spec
        spec.checkpoint = _under(base_dir, spec.checkpoint)
        if spec.tokenizer is not None:
            spec.tokenizer = _under(base_dir, spec.tokenizer)
        spec.flamingo.vision_checkpoint = _under(base_dir, spec.flamingo.vision_checkpoint)
        spec.flamingo.lang_model = _under(base_dir, spec.flamingo.lang_model)

    def check_files(self) -> None:
        spec = self.spec
        _require(
            {
                "victim.checkpoint": spec.checkpoint,
                "victim.tokenizer": spec.tokenizer,
                "victim.flamingo.vision_checkpoint": spec.flamingo.vision_checkpoint,
                "victim.flamingo.lang_model": spec.flamingo.lang_model,
            }
        )

    def tower_key(self) -> str:
        """OpenFlamingo's open_clip checkpoint and how it is read."""
        vision = self.spec.flamingo
        return stable_hash(
            {
                "tower": "open_clip",
                "checkpoint": path_signature(vision.vision_checkpoint),
                "heads": vision.vision_heads,
                "act": vision.vision_act,
                "tokens_after_ln_post": vision.vision_tokens_after_ln_post,
            }
        )

    def released(self) -> tuple[dict[str, Any], dict[str, Path]]:
        spec = self.spec.flamingo_spec()
        files = {
            "vision": spec.vision_checkpoint,
            "lang_model": spec.lang_model,
            "tokenizer": spec.tokenizer or spec.lang_model,
            "checkpoint": spec.checkpoint,
        }
        return {"flamingo": spec.model_dump(mode="json")}, files

    def load_released(self, folder: Path, features: FeatureCache) -> Victim:
        return load_flamingo(self.spec.flamingo_spec(), features)


@VICTIM_KINDS.register
class OtterKind(_FlamingoFamily[OtterVictimSpec]):
    """Otter-Image from its Hugging Face folder, read as a Flamingo."""

    name = "otter"
    Spec = OtterVictimSpec

    def resolve_paths(self, base_dir: Path) -> None:
        self.spec.checkpoint = _under(base_dir, self.spec.checkpoint)
        if self.spec.tokenizer is not None:
            self.spec.tokenizer = _under(base_dir, self.spec.tokenizer)

    def check_files(self) -> None:
        _require({"victim.checkpoint": self.spec.checkpoint, "victim.tokenizer": self.spec.tokenizer})
        if not self.spec.checkpoint.is_dir():
            raise VlmsecError(
                f"victim.checkpoint: {self.spec.checkpoint} is not a folder (kind otter needs the Otter folder)"
            )

    def tower_key(self) -> str:
        """The tower inside the Otter folder."""
        return stable_hash({"tower": "otter", "checkpoint": path_signature(self.spec.checkpoint)})

    def released(self) -> tuple[dict[str, Any], dict[str, Path]]:
        folder = self.spec.checkpoint
        return {"otter": str(folder)}, {"otter": folder, "tokenizer": self.spec.tokenizer or folder}

    def load_released(self, folder: Path, features: FeatureCache) -> Victim:
        return load_otter(folder, self.spec.tokenizer, features)


# ---- any model behind an OpenAI-compatible chat-completions API -------------------------------------


class OpenAIVictimSpec(VictimSpecBase):
    """A black-box victim over an OpenAI-compatible API (`victims.api`): outputs only."""

    kind: Literal["openai"] = "openai"
    base_url: str = Field(
        pattern=r"^https?://\S+$",
        description="the API's base URL, e.g. http://127.0.0.1:8000/v1 (requests go to <base_url>/chat/completions); "
        "nothing is sent anywhere else",
    )
    model: str = Field(min_length=1, description="the model name the API serves")
    api_key_env: str | None = Field(
        None, min_length=1, description="the environment variable holding the API key (the key itself is never stored)"
    )
    max_requests_per_second: float | None = Field(None, gt=0, description="request pacing; null: as fast as answers come")
    retries: int = Field(3, ge=0, le=20, description="retries of a failed request (timeout, refused, 429, 5xx, garbage)")
    backoff_seconds: float = Field(1.0, ge=0, le=60, description="the first retry's wait, doubled at each retry (or the server's Retry-After)")
    timeout_seconds: float = Field(60.0, gt=0, description="how long one request may take")
    max_requests: int | None = Field(None, ge=1, description="the run's request budget (retries count); null: no limit")


@VICTIM_KINDS.register
class OpenAIKind(VictimKind[OpenAIVictimSpec]):
    """A model reached only through an OpenAI-compatible API: no gradients, no tuning, no base stage."""

    name = "openai"
    Spec = OpenAIVictimSpec
    gives_gradients = False
    trains = False

    def check_files(self) -> None:
        api_key(self.spec.api_key_env)  # an unset key variable stops the run before any request

    def tower_key(self) -> str:
        return stable_hash({"tower": "openai", "base_url": self.spec.base_url, "model": self.spec.model})

    def given_base(self) -> tuple[Path, str]:
        """The API's model as deployed: keyed by where it is and its name (a hosted model changed behind
        the same name is not noticed: start a fresh run folder)."""
        return Path(self.spec.base_url), stable_hash({"openai": self.spec.base_url, "model": self.spec.model})

    def load(self, folder: Path, features: FeatureCache) -> Victim:
        s = self.spec
        return ApiVictim(  # type: ignore[return-value]  # generate only: the config check keeps the rest from being asked
            s.base_url, s.model, api_key(s.api_key_env), retries=s.retries, timeout_seconds=s.timeout_seconds,
            max_requests_per_second=s.max_requests_per_second, max_requests=s.max_requests, backoff_seconds=s.backoff_seconds,
        )

    def check_safety(self) -> None:
        """The API's model is deployed as it is: a `safety` section gives the held-out requests jailbreak
        attacks run on and the judge, and no safety stage is trained."""
