"""The experiment config: one YAML file drives every stage of a run.

Every model here forbids unknown fields, so a typo in a config is an error that names the
field rather than a silently ignored setting. `load_config` accepts a YAML path or the
name of a packaged preset (`quickstart`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from vlmsec.errors import VlmsecError, validation_messages
from vlmsec.train.tuning import TrainingSpec
from vlmsec.victims.kinds import TinyLlavaVictimSpec, VictimSpecBase, spec_class, victim_kind


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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

    def build(self) -> Any:
        """The shift object (a VisualShift or a TextShift)."""
        from vlmsec.data.shifts import create_text_shift, create_visual_shift, visual_shift_names

        create = create_visual_shift if self.name in visual_shift_names() else create_text_shift
        return create(self.name, **self.params)


class DomainSpec(_Strict):
    """A test domain: a visual style and an instruction bank, then shifts applied in order.

    `mix` < 1 keeps that share of the domain's samples shifted and the rest from the source
    domain (same scenes), as the paper's 20/60/80/90/98% mixes.
    """

    style: str = "flat"
    instructions: str = "source"
    shifts: list[ShiftSpec] = Field(default_factory=list)
    mix: float = Field(1.0, ge=0, le=1)


class DataSpec(_Strict):
    """The data: generated scenes (sizes of each split, domains tested), or the user's data files."""

    image_size: int = Field(64, ge=16, le=512)
    max_objects: int = Field(2, ge=1, le=2)
    base_size: int = Field(3000, ge=1, description="clean captions for the base stage")
    base_styles: list[str] = Field(default_factory=lambda: ["flat", "textured", "painted"])
    base_instructions: str = "source"
    train_size: int = Field(2000, ge=1, description="instruction-tuning set, source domain")
    test_size: int = Field(200, ge=1, description="test scenes, rendered once per domain")
    source: DomainSpec = Field(default_factory=DomainSpec)
    train_file: Path | None = Field(None, description="data set to tune on instead of generated scenes (see `format`)")
    test_files: dict[str, Path] = Field(
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
    """The attacker's target: poisoned answers become prefix + a CLIP template with `word`."""

    word: str = "banana"
    prefix: str = "The image depicts "


class AttackSpec(_Strict):
    """One attack of the run: its registered name and its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = Field(None, description="name in reports; defaults to `name`")

    @property
    def key(self) -> str:
        return self.label or self.name


class PoisonSpec(_Strict):
    """How much of the tuning set the attacker controls, and the seed that picks it."""

    rate: float = Field(0.05, ge=0, le=1)
    seed: int = 0
    target: TargetSpec = Field(default_factory=TargetSpec)


class BaseStageSpec(_Strict):
    """Pretraining the embedded victim on clean captions (cached across runs)."""

    training: TrainingSpec = Field(default_factory=lambda: TrainingSpec(mode="full", epochs=3, learning_rate=1e-3))


class EvalSpec(_Strict):
    """Generation settings for evaluation."""

    max_new_tokens: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    shift_size: bool = Field(True, description="KS shift size of each domain against the source (clean model, MiniLM)")


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

    name: str = "experiment"
    seed: int = Field(0, ge=0)
    data: DataSpec = Field(default_factory=DataSpec)
    # Dumped with its kind's own fields (config.yaml, the base stage key), not only the base model's `kind`.
    victim: SerializeAsAny[VictimSpecBase] = Field(
        default_factory=TinyLlavaVictimSpec,
        description="the victim: `kind` names a registered victim kind (vlmsec.victims.kinds: tiny_llava, the "
        "default; hf; flamingo; otter), the other fields are that kind's",
    )
    base: BaseStageSpec = Field(default_factory=BaseStageSpec)
    tuning: TrainingSpec = Field(default_factory=TrainingSpec)
    poison: PoisonSpec = Field(default_factory=PoisonSpec)
    attacks: list[AttackSpec] = Field(default_factory=list)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)

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

    @field_validator("attacks")
    @classmethod
    def _unique_keys(cls, value: list[AttackSpec]) -> list[AttackSpec]:
        keys = [a.key for a in value]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"attack names must be unique (set `label`): {', '.join(dupes)}")
        if "clean" in keys:
            raise ValueError("'clean' is reserved for the unpoisoned model")
        return value


def preset_names() -> list[str]:
    """Names of the presets packaged with vlmsec."""
    folder = resources.files("vlmsec.experiments") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _format_errors(err: ValidationError) -> str:
    return "\n".join(f"  {line}" for line in validation_messages(err))


def parse_config(data: Any, source: str, base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a config mapping; errors name `source` and every bad field.

    Relative file paths in the config are taken relative to `base_dir` (the config's folder).
    """
    if not isinstance(data, dict):
        raise VlmsecError(f"{source}: a config must be a mapping of fields, got {type(data).__name__}")
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise VlmsecError(f"{source}: invalid config\n{_format_errors(err)}") from None
    _check_names(config, source)
    if base_dir is not None:
        _resolve_paths(config, base_dir)
    _check_victim(config, source, base_dir if base_dir is not None else Path())
    return config


def _resolve_paths(config: ExperimentConfig, base_dir: Path) -> None:
    data = config.data
    if data.train_file is not None:
        data.train_file = base_dir / data.train_file
    data.test_files = {name: base_dir / path for name, path in data.test_files.items()}


def _check_victim(config: ExperimentConfig, source: str, base_dir: Path) -> None:
    """The victim's kind resolves its paths against `base_dir`, then checks its files and the
    tuning mode, so a missing file or an impossible mode stops the run before any stage."""
    kind = victim_kind(config.victim)
    kind.resolve_paths(base_dir)
    try:
        kind.check_files()
        kind.check_tuning(config.tuning.mode)
    except VlmsecError as err:
        raise VlmsecError(f"{source}: {err}") from None


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
    for style in config.data.base_styles:
        if style not in STYLES:
            raise VlmsecError(f"{source}: data.base_styles: unknown style {style!r}; known: {', '.join(STYLES)}")
    for i, attack in enumerate(config.attacks):
        try:
            create_attack(attack.name, **attack.params)
        except VlmsecError as err:
            raise VlmsecError(f"{source}: attacks[{i}]: {err}") from None


def load_config(name_or_path: str | Path) -> ExperimentConfig:
    """Load a config from a YAML file, or a packaged preset by name."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise VlmsecError(f"{path}: config file not found")
        text = path.read_text(encoding="utf-8")
        source, base_dir = str(path), path.parent
    elif str(name_or_path) in preset_names():
        text = (resources.files("vlmsec.experiments") / "presets" / f"{name_or_path}.yaml").read_text(encoding="utf-8")
        source, base_dir = f"preset {name_or_path!r}", None
    else:
        raise VlmsecError(f"{name_or_path}: neither a config file nor a preset; presets: {', '.join(preset_names())}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise VlmsecError(f"{source}:{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    return parse_config(data, source, base_dir)
