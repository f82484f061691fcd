"""Frozen text encoder (BERT family via transformers): item text -> one vector per item.

The text fed to the model comes from ``features.text.template`` over the item's title, brand,
categories and description. Its sha256 is the row's content hash, so editing a title (or the
template) re-encodes exactly the items whose text changed.
"""

from __future__ import annotations

import importlib
import logging
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cammsr.core.config import TextFeatureParams
from cammsr.core.device import autocast, pick_device
from features.store import EncodedChunk

log = logging.getLogger(__name__)

TEMPLATE_FIELDS = ("title", "brand", "categories", "description", "category")
CATEGORY_JOIN = " > "
_PUNCT = ".,;:|>-/"  # separator characters a template puts between fields


class ModelLoadError(RuntimeError):
    """A model could not be loaded (wrong name, offline hub, broken directory)."""


class TextTemplate:
    """``params.template`` rendered per item, without dangling separators for empty fields.

    Each literal in the template belongs to the field after it: when that field is empty the
    literal is dropped, so ``"{title}. {brand}. {categories}"`` with no brand renders
    ``"Title. Toys > Puzzles"``, not ``"Title. . Toys > Puzzles"``. Whitespace is collapsed.
    """

    def __init__(self, template: str):
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"features.text.template {template!r}: {exc}") from exc
        self.pieces: list[tuple[str, str | None]] = []
        for literal, name, _spec, _conv in parsed:
            if name is not None and name not in TEMPLATE_FIELDS:
                raise ValueError(
                    f"features.text.template {template!r}: unknown field {{{name}}}, "
                    f"expected some of {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}"
                )
            self.pieces.append((literal, name))
        if not any(name for _, name in self.pieces):
            raise ValueError(f"features.text.template {template!r}: uses no item field")

    def render(self, item: Mapping[str, object]) -> str:
        """The text for one item (a mapping with some of `TEMPLATE_FIELDS`; None means empty)."""
        out = ""
        for literal, name in self.pieces:
            value = _field_text(item.get(name)) if name is not None else ""
            if name is not None and not value:
                continue
            if name is None and not out:
                continue
            out += _separator(out, literal) + value
        return " ".join(out.split())


def _field_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, Sequence | np.ndarray):  # categories: list<str>
        return CATEGORY_JOIN.join(t for t in (_field_text(v) for v in value) if t)
    return " ".join(str(value).split())


def _separator(out: str, literal: str) -> str:
    """The literal before a field, trimmed so it neither leads the text nor doubles a mark."""
    if not out:
        return literal.lstrip(_PUNCT + " \t\n")
    head = literal.lstrip()
    if head and head[0] in _PUNCT and out.rstrip().endswith(head[0]):
        return literal.replace(head[0], "", 1)  # "Great toy." + ". " -> "Great toy. "
    return literal


def resolve_model(name: str) -> str:
    """Hub name, local directory, or ``package:<module>`` -> what ``from_pretrained`` takes.

    ``package:<module>`` is a model shipped inside an installed Python package: the module's
    ``get_model_path()`` when it has one, else the ``model/`` folder next to its ``__init__``.
    """
    if not name.startswith("package:"):
        return name
    module_name = name.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"text model {name!r}: Python package {module_name!r} is not installed") from exc
    if callable(getattr(module, "get_model_path", None)):
        path = Path(module.get_model_path())
    else:
        path = Path(module.__file__).parent / "model"
    if not path.is_dir():
        raise ModelLoadError(f"text model {name!r}: {path} is not a directory")
    return str(path)


def package_version(name: str) -> str | None:
    """``__version__`` of the package behind a ``package:`` model (part of the model identity)."""
    if not name.startswith("package:"):
        return None
    module = importlib.import_module(name.removeprefix("package:"))
    return getattr(module, "__version__", None)


class TextEncoder:
    """Tokenizer + frozen model; ``encode(texts)`` -> float32 [N, d] pooled hidden states."""

    def __init__(self, params: TextFeatureParams, device: torch.device):
        from transformers import AutoModel, AutoTokenizer  # heavy import, only when encoding

        self.params = params
        self.device = device
        source = resolve_model(params.model)
        kwargs = {"revision": params.revision} if params.revision else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            self.model = AutoModel.from_pretrained(source, dtype=torch.float32, **kwargs)
        except Exception as exc:  # hub/OS/config errors all mean: this model is not usable here
            raise ModelLoadError(
                f"could not load text model {params.model!r} (from {source!r}, revision "
                f"{params.revision or 'default'}): {type(exc).__name__}: {exc}. Check the name, "
                "or download it first when running offline (HF_HUB_OFFLINE=1)"
            ) from exc
        self.model.to(device).eval()
        self.dim = int(self.model.config.hidden_size)
        log.info("text model %s loaded on %s (d=%d, pooling=%s)", params.model, device, self.dim, params.pooling)

    def batches(self, texts: Sequence[str]) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """Tokenize once, then yield length-sorted padded batches: (indices into texts, tensors).

        Longest first, so padding is small and a too-large batch fails at once; ties keep
        input order. Tensors are on the CPU, [B, T] each.
        """
        if not texts:
            return
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.params.max_length)
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
        lengths = [len(ids) for ids in enc["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        pad = {"input_ids": self.tokenizer.pad_token_id or 0, "token_type_ids": 0, "attention_mask": 0}
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for begin in range(0, len(order), self.params.batch_size):
            idx = order[begin : begin + self.params.batch_size]
            width = lengths[idx[0]]
            batch = {}
            for key in keys:
                out = np.full((len(idx), width), pad[key], np.int64)  # (B, T)
                for row, i in enumerate(idx):
                    values = enc[key][i]
                    if left:
                        out[row, width - len(values) :] = values
                    else:
                        out[row, : len(values)] = values
                batch[key] = torch.from_numpy(out)
            if "attention_mask" not in batch:  # pooling needs it even if the tokenizer gives none
                real = torch.tensor([lengths[i] for i in idx])[:, None]  # (B, 1)
                batch["attention_mask"] = (torch.arange(width) < real).long()
            yield idx, batch

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One padded batch -> pooled float32 [B, d] on the CPU."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.inference_mode(), autocast(self.device, self.params.dtype):
            hidden = self.model(**batch).last_hidden_state.float()  # (B, T, d); pool in fp32
            return pool(hidden, batch["attention_mask"], self.params.pooling).cpu()  # (B, d)

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embed ``texts`` -> float32 [N, d], in the given order."""
        out = np.empty((len(texts), self.dim), np.float32)
        for idx, batch in self.batches(texts):
            out[idx] = self.forward(batch).numpy()
            if progress is not None:
                progress(len(idx))
        return out


@dataclass(frozen=True)
class TextSpec:
    """How to build and run the text encoder; picklable, so each Dask worker builds its own.

    ``device`` is the preference (``auto``, ``cpu``, ``cuda``), resolved where the model loads.
    """

    params: TextFeatureParams
    device: str = "auto"

    def build(self) -> TextEncoder:
        return TextEncoder(self.params, pick_device(self.device))

    def encode(
        self, encoder: TextEncoder, texts: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> EncodedChunk:
        """-> rows for every text (positions are indices into ``texts``; text never fails)."""
        return EncodedChunk(list(range(len(texts))), encoder.encode(texts, progress))


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden: [B, T, d], mask: [B, T] (1 = token) -> [B, d] by ``cls`` or mask-aware ``mean``."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    raise ValueError(f"features.text.pooling {how!r}: expected 'cls' or 'mean'")
