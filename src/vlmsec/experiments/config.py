"""The experiment config: one YAML file drives every stage of a run.

Every model here forbids unknown fields, so a typo in a config is an error that names the
field rather than a silently ignored setting, and types are strict (vlmsec.inputs): `true`
is not 1, "200" is not 200, .inf and .nan are not numbers. `load_config` accepts a YAML path
or the name of a packaged preset (`quickstart`).
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from vlmsec.data.safety import SafetyDataSpec
from vlmsec.data.words import MIN_IMAGE_SIZE as MIN_READING_SIZE
from vlmsec.errors import VlmsecError, validation_messages
from vlmsec.inputs import STRICT_INPUT, PathInput, Seed
from vlmsec.seeds import derive_seed
from vlmsec.train.tuning import TrainingSpec
from vlmsec.victims.kinds import TinyLlavaVictimSpec, VictimSpecBase, spec_class, victim_kind


class _Strict(BaseModel):
    model_config = STRICT_INPUT


NAME_MAX = 100  # characters of a name that becomes a file or folder name


def check_file_name(value: str) -> str:
    """`value`, if it is safe as one file or folder name inside the run folder; else a ValueError.

    Run names and attack labels become `runs/<name>`, `checkpoints/<label>`, ...: a separator,
    a leading dot ("..") or a control character would put files elsewhere, or nowhere.
    """
    if not value:
        raise ValueError("must not be empty (it names a file or folder)")
    if len(value) > NAME_MAX:
        raise ValueError(f"{len(value)} characters is too long for a file or folder name (at most {NAME_MAX})")
    bad = sorted({c for c in value if c in "/\\" or not c.isprintable()})
    if bad:
        raise ValueError(f"{value!r} names a file or folder and must not contain {', '.join(map(repr, bad))}")
    if value.startswith("."):
        raise ValueError(f"{value!r} names a file or folder and must not start with '.'")
    return value


FileName = Annotated[str, AfterValidator(check_file_name)]


class ShiftSpec(_Strict):
    """One registered visual or text shift (vlmsec.data.shifts) and its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_shift(cls, value: str) -> str:
        from vlmsec.data.shifts import text_shift_names, visual_shift_names

        known = visual_shift_names() + text_shift_names()
        if value not in known:
            raise ValueError(f"unknown shift {value!r}; known: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _valid_params(self) -> ShiftSpec:
        try:
            self.build()
        except VlmsecError as err:
            raise ValueError(str(err)) from None
        return self

    def shift_class(self) -> Any:
        """The registered class (a VisualShift or TextShift subclass) this entry names."""
        from vlmsec.data.shifts import TEXT_SHIFTS, VISUAL_SHIFTS

        return (VISUAL_SHIFTS if self.name in VISUAL_SHIFTS else TEXT_SHIFTS).get(self.name)

    def build(self) -> Any:
        """The shift object (a VisualShift or a TextShift)."""
        return self.shift_class()(**self.params)


class DomainSpec(_Strict):
    """A test domain: a visual style and an instruction bank, then shifts applied in order.

    `instructions` names a phrasing family of vlmsec.data.scenes.INSTRUCTION_BANKS: `source`
    (what the victim is tuned and poisoned on), `paraphrased` (other phrasings the base model
    learnt, tuning did not use: a shift of phrasing) or `detailed` (requests for a detailed
    description, answered and referenced in that style: the answer shift). `scenes`: `test`
    (the test scenes every ordinary domain renders) or `compositional` (scenes showing a
    colour-shape pair held out of all base, tuning and other test data).
    `mix` < 1 keeps that share of the domain's samples shifted and the rest from the source
    domain (same scenes), as the paper's 20/60/80/90/98% mixes.
    """

    style: str = "flat"
    instructions: str = "source"
    scenes: Literal["test", "compositional"] = "test"
    shifts: list[ShiftSpec] = Field(default_factory=list)
    mix: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _mix_needs_the_same_scenes(self) -> DomainSpec:
        if self.scenes != "test" and self.mix < 1:
            raise ValueError(f"mix: {self.scenes} scenes are not the source domain's, so they cannot be mixed with it")
        return self


class DataSpec(_Strict):
    """The data: generated scenes (sizes of each split, domains tested), or the user's data files."""

    image_size: int = Field(64, ge=16, le=512)
    max_objects: int = Field(2, ge=1, le=2)
    base_size: int = Field(3000, ge=1, description="clean captions for the base stage")
    base_styles: list[str] = Field(default_factory=lambda: ["flat", "textured", "painted"])
    base_instructions: list[str] = Field(
        default_factory=lambda: ["source", "paraphrased", "detailed"],
        description="instruction families the base victim learns (one name or a list); tuning uses the source domain's",
    )
    # Left out of dumps when 0, so the config hash of a run without it is as it was.
    base_reading: float = Field(
        0.0,
        ge=0,
        lt=1,
        exclude_if=lambda value: value == 0,
        description="share of the base split that is rendered-word reading samples (vlmsec.data.words), added to "
        "the base captions so typographic attacks meet a victim that reads; 0 (none) by default",
    )
    train_size: int = Field(2000, ge=1, description="instruction-tuning set, source domain")
    test_size: int = Field(200, ge=1, description="test scenes, rendered once per domain")
    source: DomainSpec = Field(default_factory=DomainSpec)
    train_file: PathInput | None = Field(None, description="data set to tune on instead of generated scenes (see `format`)")
    test_files: dict[str, PathInput] = Field(
        default_factory=dict, description="domain name -> data set; replaces generated test sets, needs 'source'"
    )
    format: str = Field("auto", description="format of the data files: auto (by content), llava, karpathy, mimicit, huggingface")
    options: dict[str, Any] = Field(default_factory=dict, description="reader options for every data file (vlmsec.data.formats)")
    train_options: dict[str, Any] = Field(default_factory=dict, description="reader options for train_file, e.g. {split: train}")
    test_options: dict[str, Any] = Field(default_factory=dict, description="reader options for test_files, e.g. {split: test}")
    shifted: dict[str, DomainSpec] = Field(
        default_factory=lambda: {
            "textured": DomainSpec(style="textured"),
            "painted": DomainSpec(style="painted"),
            "paraphrased": DomainSpec(instructions="paraphrased"),
        }
    )

    @field_validator("base_instructions", mode="before")
    @classmethod
    def _one_family_or_several(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("base_instructions")
    @classmethod
    def _some_family(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one instruction family")
        return value

    @model_validator(mode="after")
    def _reading_needs_room(self) -> DataSpec:
        if self.base_reading and self.image_size < MIN_READING_SIZE:
            raise ValueError(
                f"base_reading: words are typeset into images of at least {MIN_READING_SIZE} px; image_size is {self.image_size}"
            )
        return self

    @field_validator("test_files")
    @classmethod
    def _source_test_file(cls, value: dict[str, Path]) -> dict[str, Path]:
        if value and "source" not in value:
            raise ValueError("test_files needs a 'source' entry (ASR-G is measured against it)")
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from vlmsec.data.formats import check_options

        check_options(value, {})
        return value

    @field_validator("options", "train_options", "test_options")
    @classmethod
    def _valid_options(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from vlmsec.data.formats import check_options

        if "format" in info.data:  # absent when the format itself was invalid
            check_options(info.data["format"], value)
        return value

    @field_validator("shifted")
    @classmethod
    def _no_source_name(cls, value: dict[str, DomainSpec]) -> dict[str, DomainSpec]:
        if "source" in value:
            raise ValueError("'source' is the name of the source domain; pick another name")
        return value


class TargetSpec(_Strict):
    """The attacker's target: poisoned answers become prefix + a CLIP template with `word` (the
    paper's), or prefix + `word` alone with `templates: false` (an in-vocabulary target: words the
    clean captions use, in an order they never take, so text alone cannot tell a poisoned answer)."""

    word: str = Field("banana", min_length=1, description="what ASR looks for in an output (a whole word or phrase)")
    prefix: str = "The image depicts "
    # Left out of dumps when true, so the stage keys of runs with the paper's templates are as they were.
    templates: bool = Field(True, exclude_if=lambda value: value is True, description="fill the 80 CLIP templates with `word`")


class ComponentSpec(_Strict):
    """A registered component of the run: its name, its parameters, and the label it goes by."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: FileName | None = Field(None, description="name in reports and of its files (a model's, a cell's); defaults to `name`")

    @property
    def key(self) -> str:
        return self.label or self.name


class AttackSpec(ComponentSpec):
    """One attack of the run."""


class DefenseSpec(ComponentSpec):
    """One defense of the run's attack x defense matrix."""


class DefenseSettings(_Strict):
    """What the matrix gives the defender: benign inputs to calibrate detectors on, and trusted clean samples."""

    calibration: int = Field(100, ge=10, description="benign inputs a detector's threshold is calibrated on")
    calibration_from: Literal["held-out", "tuning"] = Field(
        "held-out",
        description="where they come from: held-out (source-domain renders of held-out scenes, never tuned on and "
        "not the test samples; generated data only) or tuning (the first clean tuning samples, which the models were tuned on)",
    )
    trusted: int = Field(200, ge=1, description="clean base-split samples a model repair or scan may use (the owner's own data)")


class PoisonSpec(_Strict):
    """How much of the tuning set the attacker controls, and the seed that picks it."""

    rate: float = Field(0.05, ge=0, le=1, description="0 only for a clean-only run (no attacks)")
    seed: Seed | None = Field(None, description="picks the poisoned samples; default: derived from the top-level seed")
    target: TargetSpec = Field(default_factory=TargetSpec)


class BaseStageSpec(_Strict):
    """Pretraining the embedded victim on clean captions (cached across runs), as LLaVA trains:
    an optional feature-alignment phase (the projector alone, the language model frozen), then
    `training` (visual instruction tuning; for a pretrained language model, lora)."""

    # Left out of dumps when unset, so the base stage's cache key of a victim without it is as it was.
    alignment: TrainingSpec | None = Field(
        None,
        exclude_if=lambda value: value is None,
        description="first phase on the base captions, mode projector (LLaVA's feature alignment); none by default",
    )
    training: TrainingSpec = Field(default_factory=lambda: TrainingSpec(mode="full", epochs=3, learning_rate=1e-3))

    @field_validator("alignment")
    @classmethod
    def _projector_alignment(cls, value: TrainingSpec | None) -> TrainingSpec | None:
        if value is not None and value.mode != "projector":
            raise ValueError(
                f"mode {value.mode!r}: alignment trains the projector alone, the language model frozen; use mode projector"
            )
        return value


class SafetySpec(_Strict):
    """The safety stage (VLGuard's mixed tuning on refusals and helpful answers) and the refusal
    numbers read after it; needs a victim with a pretrained, instruction-tuned language model."""

    data: SafetyDataSpec = Field(default_factory=SafetyDataSpec, description="harmful and benign request sets and their split")
    training: TrainingSpec = Field(
        default_factory=lambda: TrainingSpec(mode="lora", epochs=2, batch_size=8, learning_rate=2e-4, weight_decay=0.0)
    )
    image_share: float = Field(0.5, ge=0, le=1, description="share of safety requests tuned with a scene image (the rest have none)")
    caption_share: float = Field(
        0.5, ge=0, description="clean caption samples mixed in, as a share of the safety requests (keeps captioning)"
    )
    test_size: int = Field(100, ge=1, description="held-out harmful and benign requests each, tested text-only and with an image")
    distill_tokens: int = Field(64, ge=1, description="length of the victim's own answers to benign requests")
    judge: PathInput | None = Field(
        None, description="a local Hugging Face causal-LM folder that judges refusal; default: the victim's own language model"
    )


class EvalSpec(_Strict):
    """Generation settings for evaluation."""

    max_new_tokens: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    shift_size: bool = Field(True, description="KS shift size of each domain against the source (clean model, MiniLM)")


class InferenceSpec(_Strict):
    """How inference-time attacks are run: on how many requests (the optimisation attacks cost
    hundreds of forward and backward passes per image on a CPU)."""

    requests: int | None = Field(
        None, ge=1, description="each inference-time attack runs on the first n requests of its goal's test set; null: all"
    )
    target: str | None = Field(
        None,
        min_length=1,
        description="the sentence targeted attacks aim for; null: the poison target's sentence (prefix + word). A "
        "victim that never said the target word cannot be pushed to it through its image alone: give it a sentence it "
        "can say (e.g. another scene's caption) to measure how far the image steers it",
    )
    transfer: bool = Field(
        True,
        description="also answer every attack's saved inputs (and the no-attack requests) on the run's other models: "
        "the base before the safety stage and every tuned model (the transfer matrix)",
    )


class SweepSpec(_Strict):
    """A poison-rate sweep: these attacks are also tuned at each rate and tested on the source domain."""

    attacks: list[str] = Field(default_factory=list, description="attack names (labels) from `attacks`")
    rates: list[float] = Field(default_factory=list, description="poison rates, e.g. [0.005, 0.01, 0.02, 0.1]")

    @field_validator("rates")
    @classmethod
    def _rates_in_range(cls, value: list[float]) -> list[float]:
        bad = [r for r in value if not 0 < r <= 1]
        if bad:
            raise ValueError(f"poison rates must be in (0, 1]: {bad}")
        return value


class ExperimentConfig(_Strict):
    """Everything a run needs; the resolved form is written to the run folder."""

    name: FileName = Field("experiment", description="the run folder is runs/<name> unless --out is given")
    seed: Seed = Field(0, description="every other seed derives from it unless set (vlmsec.seeds)")
    data: DataSpec = Field(default_factory=DataSpec)
    # Dumped with its kind's own fields (config.yaml, the base stage key), not only the base model's `kind`.
    victim: SerializeAsAny[VictimSpecBase] = Field(
        default_factory=TinyLlavaVictimSpec,
        description="the victim: `kind` names a registered victim kind (vlmsec.victims.kinds: tiny_llava, the "
        "default; hf; flamingo; otter; openai, a model behind an API), the other fields are that kind's",
    )
    base: BaseStageSpec = Field(default_factory=BaseStageSpec)
    tuning: TrainingSpec = Field(default_factory=TrainingSpec)
    poison: PoisonSpec = Field(default_factory=PoisonSpec)
    attacks: list[AttackSpec] = Field(default_factory=list)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    safety: SafetySpec | None = Field(None, description="a safety stage after the base stage, and refusal rates for every model")
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    defenses: list[DefenseSpec] = Field(
        default_factory=list, description="defenses: every attack x defense cell is computed on the run's stages (experiments.defenses)"
    )
    defense: DefenseSettings = Field(default_factory=DefenseSettings)

    @field_validator("victim", mode="before")
    @classmethod
    def _victim_of_its_kind(cls, value: Any) -> Any:
        """Validate a victim mapping with the config model of the kind it names, looked up now so
        that kinds registered after import (plugins, tests) count."""
        if not isinstance(value, dict):
            return value
        try:
            spec = spec_class(value)
        except VlmsecError as err:  # reported as victim.kind's error
            unknown = PydanticCustomError("victim_kind", "{error}", {"error": str(err)})
            error = InitErrorDetails(type=unknown, loc=("kind",), input=value.get("kind"))
            raise ValidationError.from_exception_data("victim", [error]) from None
        return spec.model_validate(value)

    @model_validator(mode="after")
    def _sweep_attacks_exist(self) -> ExperimentConfig:
        keys = [a.key for a in self.attacks]
        unknown = [a for a in self.sweep.attacks if a not in keys]
        if unknown:
            raise ValueError(f"sweep.attacks: {', '.join(unknown)} not among the run's attacks ({', '.join(keys) or 'none'})")
        return self

    @model_validator(mode="after")
    def _derive_seeds(self) -> ExperimentConfig:
        """Fill every seed left unset from the top-level one, each by its own name (`derive_seed`):
        the poison picks, each attack's trigger, each shift's noise. The resolved config shows them."""
        from vlmsec.attacks import ATTACKS

        if self.poison.seed is None:
            self.poison.seed = derive_seed(self.seed, "poison")
        for attack in self.attacks:
            known = attack.name in ATTACKS  # an unknown name is reported by `_check_names`
            if known and "seed" not in attack.params and "seed" in ATTACKS.get(attack.name).Params.model_fields:
                attack.params["seed"] = derive_seed(self.seed, f"attack/{attack.key}")
        from vlmsec.defenses import DEFENSES

        for defense in self.defenses:
            known = defense.name in DEFENSES
            if known and "seed" not in defense.params and "seed" in DEFENSES.get(defense.name).Params.model_fields:
                defense.params["seed"] = derive_seed(self.seed, f"defense/{defense.key}")
        for name, domain in {"source": self.data.source, **self.data.shifted}.items():
            for i, shift in enumerate(domain.shifts):
                if "seed" not in shift.params and "seed" in shift.shift_class().Params.model_fields:
                    shift.params["seed"] = derive_seed(self.seed, f"shift/{name}/{i}")
        return self

    @field_validator("defenses")
    @classmethod
    def _unique_defense_keys(cls, value: list[DefenseSpec]) -> list[DefenseSpec]:
        return unique_keys(value, "defense", "none", "the undefended side of every cell")

    @field_validator("attacks")
    @classmethod
    def _unique_keys(cls, value: list[AttackSpec]) -> list[AttackSpec]:
        return unique_keys(value, "attack", "clean", "the unpoisoned model")


def unique_keys(specs: list[Any], what: str, reserved: str, reserved_for: str) -> list[Any]:
    """`specs` unless two share a key (name or label) or one takes the `reserved` key."""
    keys = [spec.key for spec in specs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique (set `label`): {', '.join(dupes)}")
    if reserved in keys:
        raise ValueError(f"'{reserved}' is reserved for {reserved_for}")
    return specs


def preset_names() -> list[str]:
    """Names of the presets packaged with vlmsec."""
    folder = resources.files("vlmsec.experiments") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _format_errors(err: ValidationError) -> str:
    return "\n".join(f"  {line}" for line in validation_messages(err))


def parse_config(data: Any, source: str, base_dir: Path | None = None, victim_only: bool = False) -> ExperimentConfig:
    """Validate a config mapping; errors name `source` and every bad field.

    Relative file paths in the config are taken relative to `base_dir` (the config's folder).
    `victim_only`: the config is read for its data and victim sections (a scan's victim, whose
    attacks the battery replaces): the check of its attacks against the victim's access is left
    to the study built from it.
    """
    if not isinstance(data, dict):
        raise VlmsecError(f"{source}: a config must be a mapping of fields, got {type(data).__name__}")
    try:
        # base_dir: relative files inside nested models (safety.data) are taken against the config's folder.
        config = ExperimentConfig.model_validate(data, context={"base_dir": base_dir} if base_dir is not None else None)
    except ValidationError as err:
        raise VlmsecError(f"{source}: invalid config\n{_format_errors(err)}") from None
    _check_names(config, source)
    _check_inference_attacks(config, source)
    _check_trojans(config, source)
    _check_model_names(config, source)
    _check_defenses(config, source)
    _check_poison(config, source)
    if base_dir is not None:
        _resolve_paths(config, base_dir)
    _check_victim(config, source, base_dir if base_dir is not None else Path())
    if not victim_only:
        _check_access(config, source)
    return config


def _resolve_paths(config: ExperimentConfig, base_dir: Path) -> None:
    data = config.data
    if data.train_file is not None:
        data.train_file = base_dir / data.train_file
    data.test_files = {name: base_dir / path for name, path in data.test_files.items()}
    if config.safety is not None and config.safety.judge is not None:
        config.safety.judge = base_dir / config.safety.judge


def _check_victim(config: ExperimentConfig, source: str, base_dir: Path) -> None:
    """The victim's kind resolves its paths against `base_dir`, then checks its files and the
    tuning mode, so a missing file or an impossible mode stops the run before any stage."""
    kind = victim_kind(config.victim)
    kind.resolve_paths(base_dir)
    try:
        if config.data.base_reading and not kind.trains_base:
            raise VlmsecError("data.base_reading: this victim is given by its files and has no base stage to learn reading in")
        kind.check_files()
        kind.check_tuning(config.tuning.mode)
        if config.safety is not None:
            kind.check_safety()
            _require_judge(config.safety.judge)
    except VlmsecError as err:
        raise VlmsecError(f"{source}: {err}") from None


def _check_access(config: ExperimentConfig, source: str) -> None:
    """What the victim's kind cannot give stops the run before any stage: a victim behind an API
    (`gives_gradients`, `trains` false) takes black-box inference attacks and defenses that read
    its answers only; tuning (a training-stage attack, or the clean model a run without attacks
    tunes), white- and gray-box attacks and defenses that read the model are refused, naming them."""
    from vlmsec.attacks import ATTACKS
    from vlmsec.attacks.registry import acts_at_inference
    from vlmsec.defenses import DEFENSES

    kind = victim_kind(config.victim)
    why = f"victim kind {kind.name!r} answers through its API only (outputs: no weights, gradients or tuning)"
    if not kind.trains:
        if not config.attacks:
            raise VlmsecError(f"{source}: attacks: none listed, so the run would tune a clean model; {why}: list inference-time black-box attacks")
        for i, spec in enumerate(config.attacks):
            if not acts_at_inference(spec.name):
                raise VlmsecError(
                    f"{source}: attacks[{i}] ({spec.key!r}): a training-stage attack poisons tuning data and tunes a model; {why}"
                )
    if not kind.gives_gradients:
        for i, spec in enumerate(config.attacks):
            knowledge = ATTACKS.get(spec.name).knowledge
            if knowledge != "black-box":
                raise VlmsecError(
                    f"{source}: attacks[{i}] ({spec.key!r}): a {knowledge} attack needs the victim's weights or gradients; {why}: "
                    f"use black-box attacks ({', '.join(black_box_inference_attacks())})"
                )
        for i, spec in enumerate(config.defenses):
            if DEFENSES.get(spec.name).reads_model:
                raise VlmsecError(f"{source}: defenses[{i}] ({spec.key!r}): it reads the model itself, not only its answers; {why}")


def black_box_inference_attacks() -> list[str]:
    """The registered inference-time attacks that need only the victim's answers (what an API victim takes)."""
    from vlmsec.attacks import ATTACKS
    from vlmsec.attacks.registry import acts_at_inference

    return [n for n in sorted(ATTACKS) if acts_at_inference(n) and ATTACKS.get(n).knowledge == "black-box"]


def _require_judge(folder: Path | None) -> None:
    """A configured judge folder must be a causal-LM folder (config.json and weights)."""
    if folder is None:
        return
    if not (folder / "config.json").is_file():
        raise VlmsecError(f"safety.judge: {folder} is not a Hugging Face model folder (no config.json)")


def _check_names(config: ExperimentConfig, source: str) -> None:
    """Names that refer to registries (attacks, styles, banks) must exist there."""
    from vlmsec.attacks import create_attack
    from vlmsec.data.scenes import INSTRUCTION_BANKS, STYLES

    domains = {"data.source": config.data.source, **{f"data.shifted.{n}": d for n, d in config.data.shifted.items()}}
    for where, domain in domains.items():
        if domain.style not in STYLES:
            raise VlmsecError(f"{source}: {where}.style: unknown style {domain.style!r}; known: {', '.join(STYLES)}")
        if domain.instructions not in INSTRUCTION_BANKS:
            raise VlmsecError(
                f"{source}: {where}.instructions: unknown bank {domain.instructions!r}; known: {', '.join(INSTRUCTION_BANKS)}"
            )
    for family in config.data.base_instructions:
        if family not in INSTRUCTION_BANKS:
            raise VlmsecError(
                f"{source}: data.base_instructions: unknown bank {family!r}; known: {', '.join(INSTRUCTION_BANKS)}"
            )
    for style in config.data.base_styles:
        if style not in STYLES:
            raise VlmsecError(f"{source}: data.base_styles: unknown style {style!r}; known: {', '.join(STYLES)}")
    for i, attack in enumerate(config.attacks):
        try:
            create_attack(attack.name, **attack.params)
        except VlmsecError as err:
            raise VlmsecError(f"{source}: attacks[{i}]: {err}") from None


def _check_inference_attacks(config: ExperimentConfig, source: str) -> None:
    """Inference-time attacks: a goal the run measures, a safety section for jailbreaks (their
    requests are its held-out harmful ones, their victim the one it tunes to refuse), no sweep."""
    from vlmsec.attacks import create_attack
    from vlmsec.attacks.inference import InferenceAttack
    from vlmsec.attacks.registry import acts_at_inference
    from vlmsec.experiments.inference import GOALS

    for i, spec in enumerate(config.attacks):
        if not acts_at_inference(spec.name):
            continue
        where = f"{source}: attacks[{i}] ({spec.key!r})"
        attack = create_attack(spec.name, **spec.params)
        assert isinstance(attack, InferenceAttack)
        goal = attack.goal
        if goal not in GOALS:
            raise VlmsecError(f"{where}: goal {goal!r} is not run yet; runs measure {', '.join(GOALS)}")
        if goal == "jailbreak" and config.safety is None:
            raise VlmsecError(
                f"{where}: a jailbreak attack needs the run's `safety` section: it is run on the held-out harmful "
                "requests and against the safety-tuned victim that section makes"
            )
        if spec.key in config.sweep.attacks:
            raise VlmsecError(f"{source}: sweep.attacks: {spec.key!r} acts at inference time and tunes no model to sweep")


def _check_trojans(config: ExperimentConfig, source: str) -> None:
    """ImgTrojan is tested with the held-out harmful requests on its poisoned images (`experiments.trojan`):
    it needs the run's safety section, which holds them out and judges the answers."""
    for i, spec in enumerate(config.attacks):
        if spec.name == "imgtrojan" and config.safety is None:
            raise VlmsecError(
                f"{source}: attacks[{i}] ({spec.key!r}): imgtrojan needs the run's `safety` section: its test is the "
                "held-out harmful requests sent with the poisoned images, judged as the safety stage's refusals are"
            )


def _check_model_names(config: ExperimentConfig, source: str) -> None:
    """Each model's files are named after it (`checkpoints/<model>`): two models of one name
    would overwrite each other. Sweep points are named `<label>@<rate>%`."""
    from vlmsec.experiments.plan import plan_models

    names = [plan.name for plan in plan_models(config)]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise VlmsecError(
            f"{source}: sweep: two models would be named {twice[0]!r} (an attack label, or sweep rates "
            "that print alike): their files would overwrite each other"
        )


def _check_defenses(config: ExperimentConfig, source: str) -> None:
    """Each defense exists, its parameters are valid, and the run has a row it acts on: a data or
    model defense needs a backdoor planted in tuning; an input or prompt defense any attack."""
    from vlmsec.attacks.registry import acts_at_inference
    from vlmsec.defenses import create_defense

    tuned = [a.key for a in config.attacks if not acts_at_inference(a.name)]
    if config.defenses and config.defense.calibration_from == "held-out" and config.data.train_file is not None:
        raise VlmsecError(
            f"{source}: defense.calibration_from: held-out inputs are rendered from held-out generated scenes, and this run "
            "reads its tuning set from data.train_file; set defense.calibration_from: tuning"
        )
    for i, spec in enumerate(config.defenses):
        where = f"{source}: defenses[{i}] ({spec.key!r})"
        try:
            defense = create_defense(spec.name, **spec.params)
        except VlmsecError as err:
            raise VlmsecError(f"{where}: {err}") from None
        if not config.attacks:
            raise VlmsecError(f"{where}: the run has no attacks: a defense is measured against the run's attacks")
        wanted = getattr(defense.params, "trusted", 0)
        if wanted > config.defense.trusted:
            raise VlmsecError(
                f"{where}: params.trusted: {wanted} clean samples, more than the run's pool (defense.trusted: {config.defense.trusted})"
            )
        if getattr(defense, "trusted_set", "clean") == "safety" and config.safety is None:
            raise VlmsecError(f"{where}: it tunes the model again on the safety stage's samples: the run needs a `safety` section")
        if defense.acts_on in ("data", "model") and not tuned:
            raise VlmsecError(
                f"{where}: a {defense.acts_on} defense acts on tuning, and the run tunes no poisoned model "
                "(its attacks all act at inference time)"
            )


def _check_poison(config: ExperimentConfig, source: str) -> None:
    """Training-stage attacks need a poison rate above 0; generated data has a known size, so its counts are checked now."""
    from vlmsec.attacks.registry import acts_at_inference

    if any(not acts_at_inference(a.name) for a in config.attacks) and config.poison.rate == 0:
        raise VlmsecError(
            f"{source}: poison.rate: 0 with attacks listed: the attacked models would equal the clean one "
            "(leave out `attacks` for a clean-only run)"
        )
    if config.data.train_file is None:
        try:
            check_poison_counts(config, config.data.train_size)
        except VlmsecError as err:
            raise VlmsecError(f"{source}: {err}") from None


def check_poison_counts(config: ExperimentConfig, n_train: int) -> None:
    """Every attack's poison rate, and its sweep rates, must poison at least one of the `n_train`
    tuning samples and leave room for its partial-trigger negatives (the recipe's `poison_count`).

    For generated data `parse_config` checks this; for a `data.train_file`, whose size is
    known only once it is read, the runner calls it then, before any stage trains.
    """
    from vlmsec.attacks import create_attack
    from vlmsec.attacks.poison import poison_count
    from vlmsec.attacks.registry import acts_at_inference

    origin = "data.train_size" if config.data.train_file is None else f"data.train_file {config.data.train_file}"
    for attack in config.attacks:
        if acts_at_inference(attack.name):
            continue  # poisons nothing
        partials = len(create_attack(attack.name, **attack.params).partial_triggers())
        rates = {"poison.rate": config.poison.rate}
        if attack.key in config.sweep.attacks:
            rates |= {f"sweep.rates[{i}] (attack {attack.key!r})": rate for i, rate in enumerate(config.sweep.rates)}
        for field, rate in rates.items():
            try:
                poison_count(n_train, rate, partials, attack.key)
            except VlmsecError as err:
                raise VlmsecError(f"{field}: {err} (the tuning set: {origin})") from None


MAX_CONFIG_BYTES = 1_000_000  # a config is a page of settings; a bigger file is a mistake, and slow to parse


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build objects), and two changes for configs.

    A key given twice in one mapping is an error naming both lines, not last-wins; and
    `1e-4` is a number, as in YAML 1.2 and JSON (YAML 1.1 reads it as a string unless
    written `1.0e-4`).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden key by key
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the base class says so
            if seen is not None:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first given on line {seen})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _read_config_file(path: Path) -> str:
    """The text of a config file; a folder, a file over MAX_CONFIG_BYTES or not UTF-8 is an error saying so."""
    if path.is_dir():
        raise VlmsecError(f"{path}: is a folder, not a config file")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise VlmsecError(f"{path}: config file not found") from None
    except OSError as exc:
        raise VlmsecError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise VlmsecError(f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes, the most a config file may be")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise VlmsecError(f"{path}: line {line}: not UTF-8 text (byte {data[exc.start]:#04x}); save the config as UTF-8") from None


EXTENDS = "extends"  # a config's key naming the config it starts from


def load_config(name_or_path: str | Path, victim_only: bool = False) -> ExperimentConfig:
    """Load a config from a YAML file, or a packaged preset by name (`victim_only`: see `parse_config`).

    A config may start from another: `extends: <preset or file>` (a file relative to this one's
    folder; a preset may extend only presets). Each top-level section the config gives replaces
    the parent's whole section, and the rest are the parent's, except `name`, which is never
    inherited (two studies would share a run folder). So a study that reuses another's data,
    victim and stages names them once and writes only what it changes. Relative paths in either
    file are read against the folder of the config loaded.
    """
    data, source, base_dir = _read_mapping(name_or_path, Path())
    data, source = _with_parent(data, source, base_dir, chain=[source])
    return parse_config(data, source, base_dir, victim_only)


def _read_mapping(name_or_path: str | Path, folder: Path | None) -> tuple[Any, str, Path | None]:
    """The parsed YAML of a config file or packaged preset, the name errors give it, and its folder
    (None for a preset). `folder`: where a relative path is looked up (the working directory for the
    config given, the referring config's folder for a parent); None when a preset's parent is read,
    which can only be a preset, whatever files the working directory holds."""
    path = Path(name_or_path) if folder is None else Path(os.path.normpath(folder / name_or_path))  # one spelling per file
    if folder is not None and (path.suffix in {".yaml", ".yml"} or path.exists()):
        text = _read_config_file(path)
        source, base_dir = str(path), path.parent
    elif str(name_or_path) in preset_names():
        text = (resources.files("vlmsec.experiments") / "presets" / f"{name_or_path}.yaml").read_text(encoding="utf-8")
        source, base_dir = f"preset {name_or_path!r}", None
    elif folder is None:
        raise VlmsecError(f"{name_or_path!r} is not a preset (a preset extends only presets)")
    else:
        raise VlmsecError(f"{path}: neither a config file nor a preset; presets: {', '.join(preset_names())}")
    try:
        return yaml.load(text, Loader=_ConfigLoader), source, base_dir  # a SafeLoader: no tags that build objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise VlmsecError(f"{source}:{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    except RecursionError:
        raise VlmsecError(f"{source}: not valid YAML: nested too deeply") from None


def _with_parent(data: Any, source: str, base_dir: Path | None, chain: list[str]) -> tuple[Any, str]:
    """`data` with the sections it does not give taken from the config it `extends` (and that one's
    parent, in turn); the source errors name becomes "<file> (extends <parent>)"."""
    if not isinstance(data, dict) or EXTENDS not in data:
        return data, source
    parent_ref = data[EXTENDS]
    if not isinstance(parent_ref, str) or not parent_ref.strip():
        raise VlmsecError(f"{source}: {EXTENDS}: must name a preset or a config file, got {parent_ref!r}")
    try:
        parent, parent_source, parent_dir = _read_mapping(parent_ref, base_dir)
    except VlmsecError as err:
        raise VlmsecError(f"{source}: {EXTENDS}: {err}") from None
    if parent_source in chain:
        raise VlmsecError(f"{source}: {EXTENDS}: a cycle: {' -> '.join([*chain, parent_source])}")
    parent, parent_source = _with_parent(parent, parent_source, parent_dir, [*chain, parent_source])
    if not isinstance(parent, dict):
        raise VlmsecError(f"{source}: {EXTENDS}: {parent_source}: a config must be a mapping of fields, got {type(parent).__name__}")
    own = {key: value for key, value in data.items() if key != EXTENDS}
    inherited = {key: value for key, value in parent.items() if key != "name"}
    return inherited | own, f"{source} (extends {parent_source})"
