"""Checkpoints: one file per save, written atomically, loaded without running pickled code: a plain
dict of tensors, numbers, strings, lists and dicts, which `torch.load(weights_only=True)` reads (a
full unpickle could run code). Keys:
    format            "yarn-from-scratch" and version  FORMAT_VERSION
    model_config      ModelConfig.to_dict() (rope config included), enough to rebuild the model
    model             the raw module's state_dict (never a compiled or DDP wrapper's)
    tokenizer         the model's tokenizer: a name (data.tokenizer), "gpt2" if absent, or an
                      imported model's vocabulary (a dict, `hf.py import --gguf`)
    and, from train.py: optimizer, run_config, step, data_state, metrics, provenance
"""

import os
import pickle
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

import flags
from model import ModelConfig, Transformer
from rope import RopeConfig
from system import atomic_write

FORMAT = "yarn-from-scratch"
FORMAT_VERSION = 2  # 2: stacked wqkv and w13 weights


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or not one of ours; the message says which and what
    to do."""


def save(state: dict, path: str | os.PathLike) -> None:
    """Write state atomically (system.atomic_write), after removing temporary files a killed save
    left behind."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    atomic_write(
        path, lambda f: torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **state}, f)
    )


def save_numbered(state: dict, out_dir: Path, step: int, keep: int) -> None:
    """out_dir/ckpt.pt, and ckpt_<step>.pt for the last `keep` saves (older numbered ones are
    removed)."""
    path = out_dir / "ckpt.pt"
    save(state, path)
    if keep > 0:
        numbered = out_dir / f"ckpt_{step}.pt"
        numbered.unlink(missing_ok=True)
        try:
            os.link(
                path, numbered
            )  # a second name for the same file; the next save replaces ckpt.pt, not it
        except OSError:
            save(state, numbered)  # a filesystem without hard links
    saved = sorted((int(p.stem[5:]), p) for p in out_dir.glob("ckpt_*.pt") if p.stem[5:].isdigit())
    for _, old in saved[: max(0, len(saved) - keep)]:
        old.unlink(missing_ok=True)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and check a checkpoint; raises CheckpointError naming the problem."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise CheckpointError(
            f"no checkpoint at {path}: check the path, or train one with `python train.py`"
        )
    if not zipfile.is_zipfile(
        path
    ):  # torch.save has written zip archives since torch 1.6; ours always are
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch checkpoint (not a zip archive); "
            "use an earlier checkpoint or retrain"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            "use an earlier checkpoint or retrain"
        ) from None
    # what the weights-only unpickler refuses, or random bytes inside a valid-looking archive
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "weights only" not in str(e).lower():
            raise CheckpointError(
                f"checkpoint {path} is corrupt ({str(e).splitlines()[0]}); "
                "use an earlier checkpoint or retrain"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} holds pickled objects that are not plain data (tensors, numbers, "
            "strings, lists, dicts); refused, since unpickling them could run code"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (no 'format' key saying so)")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, this code reads version "
            f"{FORMAT_VERSION}; use the matching version of this repository"
        )
    for key in ("model_config", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks the key {key!r}; it is incomplete")
    return state


def model_from_state(state: dict) -> Transformer:
    """Rebuild the model a checkpoint describes and load its weights."""
    try:
        config = ModelConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint's model config is invalid: {e}") from None
    model = Transformer(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint's weights do not fit its model config: {str(e).splitlines()[0]}"
        ) from None
    return model


def load_model(path, device="cpu") -> tuple[Transformer, dict]:
    """(model on device in eval mode, the checkpoint dict)."""
    state = load(path)
    return model_from_state(state).to(device).eval(), state


# A checkpoint's model under another RoPE config: eval.py and sample.py swap it (--rope.<field>),
# train.py extends it
def rope_with_overrides(config: ModelConfig, overrides: dict) -> RopeConfig:
    """The model's RoPE config with some fields replaced, for model.set_rope. L (original_context),
    unless given, stays the model's, or is its block_size where it has none, since a model without
    scaling was pretrained at its block size. Raises RopeConfig's ValueError for invalid values."""
    L = overrides.get("original_context", config.rope.original_context or config.block_size)
    return config.rope.replace(**{**overrides, "original_context": L})


def extended_config(base: ModelConfig, given: dict) -> ModelConfig:
    """A pretrained model (train.py's extension) with a new block_size and the RoPE fields given."""
    check_kept(
        base,
        {k: v for k, v in given.items() if k not in ("rope", "block_size")},
        "extension keeps the architecture (it changes only --block_size and --rope.*)",
    )
    rope = rope_with_overrides(base, given.get("rope", {}))
    return replace(base, block_size=given.get("block_size", base.block_size), rope=rope)


def check_kept(saved: ModelConfig, given: dict, why: str) -> None:
    """Model flags that may only repeat the checkpoint's values: a ValueError naming the first that
    does not."""
    pairs = [(f"rope.{k}", v, getattr(saved.rope, k)) for k, v in given.get("rope", {}).items()]
    pairs += [(k, v, getattr(saved, k)) for k, v in given.items() if k != "rope"]
    for name, value, have in pairs:
        if value != have:
            raise ValueError(f"--{name}={value} differs from the checkpoint's {have}; {why}")


def kept_vocabulary(state: dict | None, data_tokenizer: str) -> str | dict:
    """What a checkpoint trained from state keeps as its tokenizer: an imported model's vocabulary
    (hf.py), so that eval and sampling decode with it, else the data's tokenizer's name. A
    ValueError when the data was tokenized by another tokenizer."""
    vocab = (state or {}).get("tokenizer")
    if not isinstance(vocab, dict):
        return data_tokenizer
    if vocab.get("name") != data_tokenizer:
        raise ValueError(
            f"the checkpoint's vocabulary is {vocab.get('name')!r} but the data was "
            f"tokenized by {data_tokenizer!r}: prepare it with --tokenizer CKPT"
        )
    return vocab


def rope_summary(cfg: RopeConfig) -> str:
    """'yarn (factor=4.0, original_context=512)': the type and the fields that differ from the
    defaults."""
    default = asdict(RopeConfig())
    changed = [f"{k}={v}" for k, v in asdict(cfg).items() if k != "type" and v != default[k]]
    return cfg.type + (f" ({', '.join(changed)})" if changed else "")


def parse_rope_swap(argv, cls, prog: str, description: str) -> tuple:
    """(cls from the flags, {rope field: value} of the --rope.<field> flags given): the settings of
    a script that loads a checkpoint and may replace fields of its RoPE config (eval.py, sample.py),
    as rope_with_overrides."""
    rope_flags = {
        f"rope.{key}": (typ, "the checkpoint's", meaning)
        for key, (typ, _, meaning) in flags.flag_table((RopeConfig, "")).items()
    }
    values = flags.parse(argv, {**flags.flag_table((cls, "")), **rope_flags}, prog, description)
    overrides = {k[len("rope.") :]: v for k, v in values.items() if k.startswith("rope.")}
    return flags.build(
        cls, {k: v for k, v in values.items() if not k.startswith("rope.")}
    ), overrides
