"""Convert a PaddleNLP ERNIE 3.0 checkpoint into a Hugging Face ``ErnieModel`` directory.

Input folder (as ``ErnieModel.save_pretrained`` in PaddleNLP writes it):
``model_state.pdparams`` (a pickle of ``{name: ndarray}``; newer Paddle stores
``(name, ndarray)`` tuples), ``model_config.json`` (or ``config.json``; the fields may be nested
under ``"init_args"``), ``vocab.txt`` and optionally ``tokenizer_config.json``.

Output folder: ``config.json`` + ``model.safetensors`` (``ErnieModel.from_pretrained`` loads it),
BertTokenizerFast files, ``conversion_report.json``, and with ``keep_heads`` the task heads in
``paddle_heads.safetensors``.

Key mapping (Paddle names after the optional ``ernie.`` prefix -> HF ``ErnieModel`` names).
Paddle ``nn.Linear`` stores ``weight`` as ``[in, out]``; torch as ``[out, in]``, so every
Linear weight is transposed ("T"). Embedding tables and LayerNorm parameters are copied.

==============================================================  ==============================================  ==
Paddle                                                          Hugging Face                                    T
==============================================================  ==============================================  ==
embeddings.word_embeddings.weight                               embeddings.word_embeddings.weight
embeddings.position_embeddings.weight                           embeddings.position_embeddings.weight
embeddings.token_type_embeddings.weight                         embeddings.token_type_embeddings.weight
embeddings.task_type_embeddings.weight                          embeddings.task_type_embeddings.weight
embeddings.layer_norm.{weight,bias}                             embeddings.LayerNorm.{weight,bias}
encoder.layers.{i}.self_attn.q_proj.{weight,bias}               encoder.layer.{i}.attention.self.query.*        T
encoder.layers.{i}.self_attn.k_proj.{weight,bias}               encoder.layer.{i}.attention.self.key.*          T
encoder.layers.{i}.self_attn.v_proj.{weight,bias}               encoder.layer.{i}.attention.self.value.*        T
encoder.layers.{i}.self_attn.out_proj.{weight,bias}             encoder.layer.{i}.attention.output.dense.*      T
encoder.layers.{i}.norm1.{weight,bias}                          encoder.layer.{i}.attention.output.LayerNorm.*
encoder.layers.{i}.linear1.{weight,bias}                        encoder.layer.{i}.intermediate.dense.*          T
encoder.layers.{i}.linear2.{weight,bias}                        encoder.layer.{i}.output.dense.*                T
encoder.layers.{i}.norm2.{weight,bias}                          encoder.layer.{i}.output.LayerNorm.*
pooler.dense.{weight,bias}                                      pooler.dense.*                                  T
==============================================================  ==============================================  ==

(T applies to ``weight`` only; biases are 1-D.) Explicitly skipped: ``embeddings.position_ids``
(a buffer) and ``StructuredToParameterName@@`` (paddle.save metadata). Task heads
(``classifier.*``, ``qa_outputs.*``, ``cls.*``, ``lm_head.*``) are reported and skipped unless
``keep_heads``. Any other key, or any HF parameter left unfilled, raises ToolkitError listing
the names; every shape is checked against the config.

Paddle's LayerNorms use ``epsilon=1e-5`` (not BERT's 1e-12), so the HF config gets
``layer_norm_eps=1e-5`` unless the Paddle config says otherwise. Paddle's default ``gelu`` is the
exact erf form, like HF's ``"gelu"``.

Command line: ``python -m toolkit.models.convert_paddle SRC_DIR OUT_DIR [--keep-heads]``.
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from toolkit.errors import DataError, ToolkitError
from toolkit.utils.fsio import publish_dir

PathLike = Union[str, Path]

# (Paddle regex, HF template, transpose weight). Matched against names without "ernie.".
KEY_RULES: Tuple[Tuple[str, str, bool], ...] = (
    (r"embeddings\.(word|position|token_type|task_type)_embeddings\.weight", r"embeddings.\1_embeddings.weight", False),
    (r"embeddings\.layer_norm\.(weight|bias)", r"embeddings.LayerNorm.\1", False),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"encoder.layer.\1.attention.self.query.\2", True),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"encoder.layer.\1.attention.self.key.\2", True),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"encoder.layer.\1.attention.self.value.\2", True),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2", True),
    (r"encoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"encoder.layer.\1.attention.output.LayerNorm.\2", False),
    (r"encoder\.layers\.(\d+)\.linear1\.(weight|bias)", r"encoder.layer.\1.intermediate.dense.\2", True),
    (r"encoder\.layers\.(\d+)\.linear2\.(weight|bias)", r"encoder.layer.\1.output.dense.\2", True),
    (r"encoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"encoder.layer.\1.output.LayerNorm.\2", False),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1", True),
)
SKIPPED_KEYS = ("embeddings.position_ids", "StructuredToParameterName@@")
HEAD_PREFIXES = ("classifier.", "qa_outputs.", "cls.", "lm_head.")
ENCODER_PREFIX = "ernie."

# PaddleNLP config field -> HF ErnieConfig field (same names; listed so unknown ones are dropped).
CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "task_type_vocab_size", "use_task_id", "pad_token_id", "initializer_range",
    "layer_norm_eps",
)
REQUIRED_CONFIG = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
PADDLE_LAYER_NORM_EPS = 1e-5

# Globals a numpy-only pickle may reference; anything else is refused before it can run.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"), ("_codecs", "encode"),
    ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "complex"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and builtin containers, and nothing else."""

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataError(self._path, f"refusing to unpickle '{module}.{name}': only numpy arrays are allowed",
                        hint="re-save the state dict from Paddle as numpy arrays: "
                             "paddle.save({k: v.numpy() for k, v in model.state_dict().items()}, path)")


@dataclass
class ConversionReport:
    """What the conversion did (also written as ``conversion_report.json``)."""

    mapped: int = 0
    skipped: List[str] = field(default_factory=list)
    heads: List[str] = field(default_factory=list)
    heads_kept: bool = False
    config: Dict[str, Any] = field(default_factory=dict)


def load_pdparams(path: PathLike) -> Dict[str, np.ndarray]:
    """Read ``model_state.pdparams`` safely.

    Returns:
        name -> ndarray. ``(name, ndarray)`` tuple values are unwrapped; non-array entries
        (``StructuredToParameterName@@``) are returned as-is for the caller to skip.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found", hint="expected PaddleNLP's model_state.pdparams")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # corrupt pickles raise many different types
        raise DataError(path, f"cannot read as a Paddle state dict ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a dict of parameters, got {type(obj).__name__}")
    out: Dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]
        out[str(key)] = value
    return out


def _unwrap_config(cfg: Any) -> Dict[str, Any]:
    """Follow PaddleNLP's ``init_args`` nesting (dict or list-of-dict) down to the model fields."""
    while isinstance(cfg, dict) and "hidden_size" not in cfg and "init_args" in cfg:
        inner = cfg["init_args"]
        if isinstance(inner, list):
            inner = next((x for x in inner if isinstance(x, dict)), None)
        cfg = inner
    return cfg if isinstance(cfg, dict) else {}


def read_paddle_config(src_dir: PathLike) -> Dict[str, Any]:
    """HF ``ErnieConfig`` kwargs from ``model_config.json`` (or ``config.json``) in ``src_dir``."""
    src = Path(src_dir)
    path = next((src / n for n in ("model_config.json", "config.json") if (src / n).is_file()), None)
    if path is None:
        raise DataError(src / "model_config.json", "model config not found",
                        hint="PaddleNLP writes model_config.json next to model_state.pdparams")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON ({e.msg})", line=e.lineno) from None
    cfg = _unwrap_config(raw)
    missing = [k for k in REQUIRED_CONFIG if k not in cfg]
    if missing:
        raise DataError(path, f"missing model field(s): {', '.join(missing)}",
                        hint="expected a PaddleNLP ErnieModel config (possibly under 'init_args')")
    out = {k: cfg[k] for k in CONFIG_FIELDS if k in cfg}
    out.setdefault("layer_norm_eps", PADDLE_LAYER_NORM_EPS)
    return out


def map_key(name: str) -> Optional[Tuple[str, bool]]:
    """HF name and transpose flag for a Paddle encoder name (without ``ernie.``), else None."""
    for pattern, template, transpose in KEY_RULES:
        m = re.fullmatch(pattern, name)
        if m:
            return m.expand(template), transpose and name.endswith(".weight")
    return None


def _to_float32(name: str, arr: Any) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise ToolkitError(f"parameter '{name}' is a {type(arr).__name__}, not an array")
    if arr.dtype == np.uint16:  # Paddle stores bfloat16 as raw uint16 bits
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def _split_state(state: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], List[str], List[str]]:
    """Split Paddle keys into (encoder params, heads, skipped, unknown)."""
    prefixed = any(k.startswith(ENCODER_PREFIX) for k in state)
    encoder: Dict[str, Any] = {}
    heads: Dict[str, Any] = {}
    skipped: List[str] = []
    unknown: List[str] = []
    for key, value in state.items():
        in_encoder = not prefixed or key.startswith(ENCODER_PREFIX)
        name = key[len(ENCODER_PREFIX):] if prefixed and in_encoder else key
        if key in SKIPPED_KEYS or name in SKIPPED_KEYS:
            skipped.append(key)
        elif in_encoder and map_key(name) is not None:
            encoder[name] = value
        elif name.startswith(HEAD_PREFIXES):
            heads[key] = value
        else:
            unknown.append(key)
    return encoder, heads, skipped, unknown


def convert_state_dict(state: Dict[str, Any], expected: Dict[str, Tuple[int, ...]]
                       ) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], List[str]]:
    """Map a Paddle state dict onto HF names, checking coverage and shapes.

    Args:
        state: Paddle name -> array (from :func:`load_pdparams`).
        expected: HF parameter name -> shape (from the target model's ``state_dict``).

    Returns:
        (HF name -> float32 array in torch layout, head name -> array, skipped key names).

    Raises:
        ToolkitError: listing unknown Paddle keys, unfilled HF parameters or shape mismatches.
    """
    encoder, heads, skipped, unknown = _split_state(state)
    if unknown:
        raise ToolkitError(f"{len(unknown)} Paddle parameter(s) have no HF ErnieModel counterpart: "
                           f"{', '.join(sorted(unknown))}. Is this an ERNIE 3.0 checkpoint?")
    out: Dict[str, np.ndarray] = {}
    problems: List[str] = []
    for name, value in encoder.items():
        hf_name, transpose = map_key(name)  # type: ignore[misc]
        arr = _to_float32(name, value)
        if transpose:
            arr = np.ascontiguousarray(arr.T)
        if hf_name not in expected:
            problems.append(f"'{name}' -> '{hf_name}' is not a parameter of the configured model "
                            f"(check num_hidden_layers / use_task_id in the config)")
        elif tuple(arr.shape) != tuple(expected[hf_name]):
            problems.append(f"'{name}' has shape {list(value.shape)} but the config implies "
                            f"{list(expected[hf_name][::-1] if transpose else expected[hf_name])}")
        out[hf_name] = arr
    if problems:
        raise ToolkitError("checkpoint does not match model_config.json: " + "; ".join(problems))
    unfilled = sorted(set(expected) - set(out))
    if unfilled:
        raise ToolkitError(f"{len(unfilled)} HF parameter(s) not found in the Paddle checkpoint: "
                           f"{', '.join(unfilled)}")
    return out, heads, skipped


def _vocab_tokens(path: Path) -> List[str]:
    # Read like BERT's load_vocab: only newlines separate tokens (str.splitlines would also
    # split on U+0085 / U+2028, which are tokens in the Chinese vocab).
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _read_vocab(src: Path, vocab_size: int) -> Path:
    path = src / "vocab.txt"
    if not path.is_file():
        raise DataError(path, "vocab.txt not found", hint="PaddleNLP's tokenizer.save_pretrained writes it")
    tokens = _vocab_tokens(path)
    if len(tokens) > vocab_size:
        raise DataError(path, f"{len(tokens)} tokens but the model has vocab_size={vocab_size}",
                        hint="the vocab does not belong to this checkpoint")
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in set(tokens)]
    if missing:
        raise DataError(path, f"special token(s) missing: {', '.join(missing)}")
    return path


def _save_tokenizer(vocab: Path, out: Path, max_len: int) -> None:
    from transformers import BertTokenizerFast

    src = vocab.parent
    tk_cfg: Dict[str, Any] = {}
    cfg_path = src / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            raw = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(cfg_path, f"invalid JSON ({e.msg})", line=e.lineno) from None
        tk_cfg = raw if isinstance(raw, dict) else {}
    specials = {k: tk_cfg[k] for k in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
                if isinstance(tk_cfg.get(k), str)}
    # Loading from a folder reads vocab.txt the same way in transformers 4.x and 5.x (the
    # constructor's vocab argument changed name between them).
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vocab, out / "vocab.txt")
    tok = BertTokenizerFast.from_pretrained(str(out), do_lower_case=bool(tk_cfg.get("do_lower_case", True)),
                                            model_max_length=max_len, **specials)
    if len(tok) < len(_vocab_tokens(vocab)):
        raise ToolkitError(f"tokenizer built from {vocab} has only {len(tok)} tokens; vocab.txt was not read")
    tok.save_pretrained(str(out))


def convert_paddle_ernie(src_dir: PathLike, out_dir: PathLike, keep_heads: bool = False) -> ConversionReport:
    """Convert a PaddleNLP ERNIE 3.0 folder into an HF ``ErnieModel`` + tokenizer folder.

    Args:
        src_dir: folder with ``model_state.pdparams``, ``model_config.json``, ``vocab.txt``.
        out_dir: created if needed; ``ErnieModel.from_pretrained(out_dir)`` loads the result.
        keep_heads: also save task-head parameters (``classifier.*`` ...) in torch layout to
            ``paddle_heads.safetensors`` instead of skipping them.

    Returns:
        A :class:`ConversionReport`.
    """
    import torch
    from safetensors.numpy import save_file
    from transformers import ErnieConfig, ErnieModel

    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise DataError(src, "source folder not found")
    cfg_kwargs = read_paddle_config(src)
    vocab = _read_vocab(src, int(cfg_kwargs["vocab_size"]))
    state = load_pdparams(src / "model_state.pdparams")
    has_task = any(k.endswith("embeddings.task_type_embeddings.weight") for k in state)
    if cfg_kwargs.get("use_task_id") is False and has_task:
        raise ToolkitError("model_config.json says use_task_id=false but the checkpoint has "
                           "task_type_embeddings; set use_task_id to true")
    cfg_kwargs.setdefault("use_task_id", has_task)
    config = ErnieConfig(**cfg_kwargs)
    config.architectures = ["ErnieModel"]
    model = ErnieModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors, heads, skipped = convert_state_dict(state, expected)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)

    report = ConversionReport(mapped=len(tensors), skipped=sorted(skipped), heads=sorted(heads),
                              heads_kept=keep_heads and bool(heads), config=cfg_kwargs)
    # The converted folder appears whole (COMPLETE.json last) or not at all.
    with publish_dir(out, kind="converted_ernie") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer(vocab, tmp, config.max_position_embeddings)
        if keep_heads and heads:
            save_file({k: np.ascontiguousarray(_to_float32(k, v).T if np.ndim(v) == 2 else _to_float32(k, v))
                       for k, v in heads.items()}, str(tmp / "paddle_heads.safetensors"))
        (tmp / "conversion_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: ``python -m toolkit.models.convert_paddle SRC OUT [--keep-heads]``."""
    parser = argparse.ArgumentParser(description="Convert a PaddleNLP ERNIE 3.0 checkpoint to a HF ErnieModel folder.")
    parser.add_argument("src_dir", help="folder with model_state.pdparams, model_config.json, vocab.txt")
    parser.add_argument("out_dir", help="output folder (ErnieModel.from_pretrained loads it)")
    parser.add_argument("--keep-heads", action="store_true",
                        help="save task heads (classifier.* ...) to paddle_heads.safetensors instead of skipping")
    args = parser.parse_args(argv)
    try:
        report = convert_paddle_ernie(args.src_dir, args.out_dir, keep_heads=args.keep_heads)
    except ToolkitError as e:
        print(f"error: {e}")
        return 2
    heads = f"; heads {'kept' if report.heads_kept else 'skipped'}: {', '.join(report.heads)}" if report.heads else ""
    print(f"converted {report.mapped} tensors to {args.out_dir}{heads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
