"""CAMMSR, in the order of the paper's framework figure, top to bottom:

1. item representations: ID embedding; frozen text/image features -> Linear; learned missing vectors;
   one position table added to every modality's sequence
2. CAMoE: K shared experts, an attentive gate per modality, category-guided modality weights w_m
3. modality swap: text and image items exchanged at random positions -> two mixed views (training only)
4. sequence encoder: input DyT -> dropout -> Transformer blocks, shared by every modality and view
5. scores against the item tables, and the loss L_SR + lambda_cat * L_cat + lambda_cl * L_MSCL

"CAMMSR: Category-Guided Attentive Mixture of Experts for Multimodal Sequential Recommendation"
(Xu et al., ICDE 2026). What the paper states and what is inferred: shared/design/PAPER.md.
SASRec is this model with switches: ID only, no CAMoE, no swap-CL, LayerNorm (`ModelConfig.sasrec`).

Shapes: B users, L positions (right-padded, item 0 = padding), N items (+1 padding row),
U unique items in a batch, M active modalities, K experts, C categories, d hidden size,
D_m the width of a frozen feature store, P positions that have a target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from cammsr.model.checks import check_features, check_items, check_lengths, check_seq, check_table, check_targets
from cammsr.model.chunked_ce import chunked_softmax_ce
from cammsr.model.dropout import Dropout, attention
from cammsr.model.dyt import make_norm
from cammsr.model.losses import info_nce

MODALITIES = ("id", "text", "image")
FEATURE_MODALITIES = ("text", "image")  # the modalities read from frozen feature stores
CHOICES = {  # ModelConfig fields that take one of a few names
    "norm": ("dyt", "layernorm"),
    "dyt_scope": ("input", "all"),
    "weight_mode": ("confidence", "learned"),
    "feature_norm": ("none", "center_l2"),
    "score_scale": ("none", "learned"),
    "feature_init": ("normal", "pca"),
    "content_table": ("learned", "frozen"),
    "category_loss": ("ce", "bce"),
}


@dataclass(frozen=True)
class ModelConfig:
    num_items: int  # N, real items (indices 1..N)
    num_categories: int  # C
    text_dim: int = 0  # width of the frozen text features; 0 = no text store
    image_dim: int = 0  # width of the frozen image features; 0 = no image store
    feature_norm: str = "center_l2"  # how the frozen features were prepared (cammsr.model.io.padded_features)
    hidden_size: int = 64  # d; SASRec/RecBole default
    num_layers: int = 2
    num_heads: int = 2
    ffn_size: int = 256
    dropout: float = 0.5  # hidden and attention (RecBole SASRec / HM4SR)
    max_seq_len: int = 50
    use_id: bool = True
    use_text: bool = True
    use_image: bool = True
    num_experts: int = 4  # K; 0 switches CAMoE off (SASRec)
    category_guidance: bool = True  # False: fixed equal modality weights (ablation)
    weight_mode: str = "confidence"  # "confidence": softmax_m log p_m(true category); "learned": MLP
    lambda_cat: float = 0.1
    swap_cl: bool = True
    swap_prob: float = 0.5
    lambda_cl: float = 0.1
    cl_temperature: float = 0.2
    norm: str = "dyt"  # "dyt" | "layernorm"
    dyt_scope: str = "input"  # "input": only the input norm; "all": every norm in the blocks too
    dyt_alpha_init: float = 0.5
    weight_temperature: float = 1.0  # "confidence" weights: softmax_m(log p_m / T); T < 1 sharpens them
    score_scale: str = "none"  # "learned": a trained scale per modality on its score term
    score_refined: bool = False  # score against the CAMoE-refined item tables ē_m instead of e_m
    feature_init: str = "normal"  # "pca": feature projections start as the features' top-d principal directions
    modality_dropout: float = 0.0  # training: chance a modality's score term is left out for a sequence
    content_table: str = "learned"  # "frozen": text/image items are scored on a fixed projection of their features
    shared_encoder: bool = True  # False: one Transformer per modality (HM4SR-style)
    category_loss: str = "ce"  # "ce": single label; "bce": multi-hot over the item's category path tokens
    num_path_tokens: int = 0  # T, category path tokens (for "bce")
    fast_dropout: bool = False  # masks from 15-bit random integers instead of bernoulli_ (dropout.py); same law
    # Unknown item IDs (see `CAMMSR.id_rows`): the fraction of items whose ID row is replaced by the learned
    # unknown vector at each training step; 0 leaves the vector untrained (zeros).
    id_dropout: float = 0.0

    def __post_init__(self) -> None:
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"ModelConfig.{key}: expected one of {allowed}, found {getattr(self, key)!r}")
        for key in ("num_items", "num_categories", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"ModelConfig.{key}: expected a positive int, found {getattr(self, key)!r}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"ModelConfig.modality_dropout: expected a value in [0, 1), "
                             f"found {self.modality_dropout!r}")
        if self.weight_temperature <= 0:
            raise ValueError(f"ModelConfig.weight_temperature: expected > 0, found {self.weight_temperature!r}")
        if self.category_loss == "bce" and self.category_guidance and self.num_experts > 0 \
                and self.num_path_tokens < 1:
            raise ValueError("ModelConfig: category_loss 'bce' needs num_path_tokens >= 1 (the split's path tokens)")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"ModelConfig.id_dropout: expected a value in [0, 1), found {self.id_dropout!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ModelConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities that are switched on and have features."""
        on = {"id": self.use_id, "text": self.use_text and self.text_dim > 0,
              "image": self.use_image and self.image_dim > 0}
        active = tuple(m for m in MODALITIES if on[m])
        if not active:
            raise ValueError("no modality is active: switch on use_id or provide text/image features")
        return active

    def sasrec(self) -> ModelConfig:
        """The SASRec baseline: ID only, no CAMoE, no swap-CL, LayerNorm everywhere."""
        return replace(self, use_text=False, use_image=False, num_experts=0, category_guidance=False,
                       swap_cl=False, norm="layernorm", score_scale="none", shared_encoder=True, score_refined=False)

    @property
    def category_outputs(self) -> int:
        """Width of the category head: C labels ("ce") or T path tokens ("bce")."""
        return self.num_path_tokens if self.category_loss == "bce" else self.num_categories

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelOutput:
    """What `CAMMSR.encode_views` returns; modalities are in `CAMMSR.mods` order.

    Attributes:
        z: FloatTensor [M, B, L, d] each modality's sequence output Z_m, or [M, B, 1, d] when only
            the ``last`` position of each sequence was computed.
        swap_views: FloatTensor [2, B, L, d] the encoded modality-swap views (text-based, image-based),
            [2, B, 1, d] when encoded only at one position (``swap_last``), or None (not training,
            swap-CL off, or text or image inactive).
        cat_logits: FloatTensor [M, U, C] each modality's category logits, or None without guidance (or
            from `refined_tables`).
        unique_items: LongTensor [U] the batch's sorted unique item indices (0 when there is padding), or None
            (from `refined_tables`).
        weights: FloatTensor [U, M] the modality weights w_m of those items ([U, 1] ones without CAMoE), or
            None (from `refined_tables`).
    """

    z: torch.Tensor
    swap_views: torch.Tensor | None
    cat_logits: torch.Tensor | None
    unique_items: torch.Tensor | None
    weights: torch.Tensor | None


def take_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (LongTensor [...]) of ``table`` [R, d]: [..., d]. ``table[idx]`` gives the same, but with an
    index of more than one dimension its forward and backward measured 5x slower on CPU than this gather."""
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[-1])


class FrozenFeatures(nn.Module):
    """One modality's frozen encoder outputs: they move with the model but are neither trained nor saved
    (they are re-read from the feature store on load).

    Args:
        features: FloatTensor [N+1, D_m] (row 0 = padding).
        present: BoolTensor [N+1], False where the item lacks this modality.
    """

    def __init__(self, features: torch.Tensor, present: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("features", features.float(), persistent=False)  # [N+1, D_m]
        self.register_buffer("present", present.bool(), persistent=False)  # [N+1]
        self._converted: tuple[tuple, torch.Tensor] | None = None
        self._projected: tuple[tuple, torch.Tensor] | None = None
        self._absent: tuple[tuple, torch.Tensor] | None = None

    def absent_rows(self) -> torch.Tensor:
        """The real items (row 0, padding, left out) without this modality: LongTensor [R], kept while
        ``present`` is unchanged."""
        key = (self.present.data_ptr(), self.present._version, self.present.device)
        if self._absent is None or self._absent[0] != key:
            self._absent = (key, (~self.present[1:]).nonzero().squeeze(1) + 1)
        return self._absent[1]

    def features_for_matmul(self) -> torch.Tensor:
        """The features in the dtype autocast gives a Linear here (float32 without autocast), converted once
        and kept: under CPU autocast the projection would otherwise convert all N+1 rows every step."""
        device = self.features.device.type
        if not torch.is_autocast_enabled(device):
            return self.features
        dtype = torch.get_autocast_dtype(device)
        key = (self.features.data_ptr(), self.features.device, dtype)
        if self._converted is None or self._converted[0] != key:
            self._converted = (key, self.features.to(dtype))
        return self._converted[1]  # [N+1, D_m]

    def projected(self, basis: torch.Tensor) -> torch.Tensor:
        """The features times ``basis.T`` ([d, D_m] fixed directions): [N+1, d], in `features_for_matmul`'s
        dtype, computed once and kept while neither tensor changes (their in-place version counters and
        storage are part of the key, so loading weights into ``basis`` recomputes it). Not differentiable:
        both are buffers."""
        feats = self.features_for_matmul()
        key = (feats.data_ptr(), feats._version, feats.dtype, basis.data_ptr(), basis._version, basis.device)
        if self._projected is None or self._projected[0] != key:
            with torch.no_grad():
                self._projected = (key, feats @ basis.T.to(feats.dtype))
        return self._projected[1]  # [N+1, d]


class Block(nn.Module):
    """Post-norm Transformer layer as in SASRec/RecBole: x = norm(x + drop(f(x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, block_norm = cfg.hidden_size, cfg.norm if cfg.dyt_scope == "all" else "layernorm"
        self.heads, self.attn_dropout, self.fast_dropout = cfg.num_heads, cfg.dropout, cfg.fast_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm1 = make_norm(block_norm, d, cfg.dyt_alpha_init)
        self.ff = nn.Sequential(nn.Linear(d, cfg.ffn_size), nn.GELU(), nn.Linear(cfg.ffn_size, d))
        self.norm2 = make_norm(block_norm, d, cfg.dyt_alpha_init)
        self.drop = Dropout(cfg.dropout, cfg.fast_dropout)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """x: [S, L, d] -> [S, L, d]; with ``last`` (LongTensor [S]) only that position's output, [S, 1, d].

        ``last`` serves scoring, which needs one position per sequence: keys and values still come
        from every position up to it, but the query, projection, norms and feed-forward run on one.
        """
        S, L, d = x.shape
        q, k, v = self.qkv(x).view(S, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [S, h, L, d/h]
        if last is None:
            # Right padding + a causal mask: a real position never sees a later one, nor padding.
            a = attention(q, k, v, None, self.attn_dropout, self.training, self.fast_dropout)  # [S, h, L, d/h]
            a = a.transpose(1, 2).reshape(S, L, d)  # [S, L, d]
        else:
            rows = torch.arange(S, device=x.device)
            q = q[rows, :, last][:, :, None]  # [S, h, 1, d/h]
            visible = torch.arange(L, device=x.device)[None, :] <= last[:, None]  # [S, L] causal row of `last`
            a = attention(q, k, v, visible[:, None, None, :], self.attn_dropout, self.training, self.fast_dropout)
            a = a.reshape(S, 1, d)  # [S, h, 1, d/h] -> [S, 1, d]
            x = x[rows, last][:, None]  # [S, 1, d]
        x = self.norm1(x + self.drop(self.proj(a)))  # [S, L or 1, d]
        return self.norm2(x + self.drop(self.ff(x)))  # [S, L or 1, d]


class CAMMSR(nn.Module):
    """The whole model (or SASRec, by the config's switches).

    Args:
        cfg: sizes and switches.
        item_category: LongTensor [N+1] each item's category (row 0 = -1); saved with the weights,
            because it may carry the training run's category noise.
        text_features, image_features: FloatTensor [N+1, D_m] frozen features (row 0 = padding), needed
            for each active feature modality; D_m must be ``cfg.text_dim`` / ``cfg.image_dim``.
        text_present, image_present: BoolTensor [N+1], False where an item lacks that modality.
        item_path: LongTensor [N+1, D_p] each item's category path tokens, -1 padded (for
            ``category_loss="bce"``; saved with the weights like ``item_category``).

    Raises:
        ValueError, TypeError: a tensor of the wrong shape or type, or an active modality without features.
    """

    def __init__(self, cfg: ModelConfig, item_category: torch.Tensor,
                 text_features: torch.Tensor | None = None, text_present: torch.Tensor | None = None,
                 image_features: torch.Tensor | None = None, image_present: torch.Tensor | None = None,
                 item_path: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg, d, n = cfg, cfg.hidden_size, cfg.num_items + 1
        self.mods = cfg.modalities
        M = len(self.mods)
        check_table("item_category", item_category, n)
        self.register_buffer("item_category", item_category.long().clone())  # [N+1]
        if cfg.category_loss == "bce":
            if item_path is None:
                raise ValueError("category_loss 'bce' needs item_path, the items' category path tokens")
            check_table("item_path", item_path, n)
            self.register_buffer("item_path", item_path.long().clone())  # [N+1, D_p], -1 = none
        given = {"text": (text_features, text_present, cfg.text_dim),
                 "image": (image_features, image_present, cfg.image_dim)}
        feature_mods = [m for m in FEATURE_MODALITIES if m in self.mods]
        for m in feature_mods:
            check_features(m, *given[m], n)

        # The order below is the order of random initialisation (construction, then `self.apply`):
        # changing it changes every trained number.

        # 1. Item representations (STATED): ID embedding; frozen text/image -> Linear.
        if "id" in self.mods:
            self.id_emb = nn.Embedding(n, d, padding_idx=0)  # [N+1, d]
        self.frozen = nn.ModuleDict({m: FrozenFeatures(*given[m][:2]) for m in feature_mods})
        self.feature_proj = nn.ModuleDict({m: nn.Linear(given[m][2], d) for m in feature_mods})  # D_m -> d
        # A learned vector stands in where an item lacks a modality.
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m in feature_mods})  # [d] each
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)  # [L_max, d] one table, added to each modality

        # 2. CAMoE (STATED): K shared experts, one attentive gate per modality; category heads -> w_m.
        self.use_moe = cfg.num_experts > 0
        if self.use_moe:
            K = cfg.num_experts
            self.experts = nn.ModuleList(nn.Linear(M * d, M * d) for _ in range(K))  # INFERRED (HM4SR)
            self.gates = nn.ModuleDict({m: nn.Linear(d, K) for m in self.mods})
            if cfg.category_guidance:
                self.cat_proj = nn.ModuleDict({m: nn.Linear(d, d) for m in self.mods})
                self.cat_head = nn.Linear(d, cfg.category_outputs)  # category predictor shared by modalities
                if cfg.weight_mode == "learned":
                    self.weight_mlp = nn.Linear(M * cfg.category_outputs, M)

        # 3. Modality swap (STATED): no parameters (`swap_views`).
        # 4. User interest learning (STATED): per modality DyT -> Dropout -> Transformer (shared).
        self.input_norm = nn.ModuleDict({m: make_norm(cfg.norm, d, cfg.dyt_alpha_init) for m in self.mods})
        self.drop = Dropout(cfg.dropout, cfg.fast_dropout)
        if cfg.shared_encoder:
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        else:  # one Transformer per modality; a swap view goes through its starting modality's
            self.encoders = nn.ModuleDict({m: nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
                                           for m in self.mods})
        # 5. Scores and loss: against the item tables of 1, optionally scaled per modality.
        if cfg.score_scale == "learned":
            self.log_score_scale = nn.Parameter(torch.zeros(M))  # [M], exp() = 1 at the start
        self.apply(self._init)
        if cfg.feature_init == "pca":  # after the random init, which it overwrites without drawing
            for m in feature_mods:
                self._pca_init(self.feature_proj[m], self.frozen[m].features[self.frozen[m].present])
        if cfg.content_table == "frozen":  # the scored side of text/image: fixed, saved with the weights
            for m in feature_mods:
                basis = torch.zeros(d, given[m][2])  # [d, D_m]
                self._pca_basis(basis, self.frozen[m].features[self.frozen[m].present])
                self.frozen[m].register_buffer("score_basis", basis)

        # Unknown item IDs (`id_rows`): one learned vector stands in for the ID embedding of every item
        # without training interactions (items added after training, the cold-item study) and, with
        # id_dropout, of a random fraction of the items at each training step, which is what trains it.
        # Created after the initialisation above (zeros, no random draw), so the other weights are unchanged.
        if "id" in self.mods:
            self.missing["id"] = nn.Parameter(torch.zeros(d))  # [d]
            self.register_buffer("id_unknown", torch.zeros(n, dtype=torch.bool), persistent=False)  # [N+1]
        self._id_dropped: torch.Tensor | None = None  # [N+1] this training step's dropped IDs (`drop_ids`)
        # dtype of the next-item CE's matmuls (`chunked_softmax_ce`); None = that of the autocast around `loss`.
        # A training choice (the trainer sets it), not part of the config: it does not change the model.
        self.ce_dtype: torch.dtype | None = None

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)  # N(0, 0.02) as in SASRec/RecBole
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @staticmethod
    @torch.no_grad()
    def _pca_basis(out: torch.Tensor, feats: torch.Tensor) -> None:
        """Write into ``out`` [d, D_m] the top principal directions of ``feats`` [n, D_m] (orthonormal rows;
        rows beyond the features' rank stay as they are)."""
        if len(feats) < 2:
            return
        _, _, vh = torch.linalg.svd(feats - feats.mean(0), full_matrices=False)  # [min(n, D_m), D_m]
        k = min(out.shape[0], vh.shape[0])
        out[:k] = vh[:k]

    @staticmethod
    @torch.no_grad()
    def _pca_init(proj: nn.Linear, feats: torch.Tensor) -> None:
        """Start ``proj`` (D_m -> d) as the projection on the top principal directions of ``feats`` [n, D_m].

        The frozen features' own similarity (consecutive items are far more alike than random pairs) is
        then in the item tables from the first step, instead of being relearned through a random projection.
        """
        CAMMSR._pca_basis(proj.weight, feats)  # rows beyond the features' rank keep their random init
        proj.bias.zero_()

    # ---- 1. item representations ---------------------------------------------------------------
    def item_table(self, m: str, idx: torch.Tensor | None = None) -> torch.Tensor:
        """e_m for items ``idx`` (LongTensor [...]): [..., d]; without ``idx`` for all items: [N+1, d]."""
        if m == "id":
            return self.id_rows(idx)
        feats, present = self.frozen[m].features_for_matmul(), self.frozen[m].present  # [N+1, D_m], [N+1]
        if idx is not None:
            feats, present = take_rows(feats, idx), present[idx]  # [..., D_m], [...]
        e = self.feature_proj[m](feats)  # [..., d]
        return torch.where(present[..., None], e, self.missing[m])  # [..., d]

    def item_tables(self) -> dict[str, torch.Tensor]:
        """e_m of every item, each [N+1, d], for the modalities whose whole table the score table reads:
        projected once per batch and shared by CAMoE's inputs and the score table (projecting the batch's
        items again would repeat the Linear on U of the N rows). With ``content_table="frozen"`` (and no
        ``score_refined``) text and image are scored on `frozen_table` instead: CAMoE then projects only
        the batch's rows of them.
        """
        frozen = self.cfg.content_table == "frozen" and not (self.cfg.score_refined and self.use_moe)
        return {m: self.item_table(m) for m in self.mods if not (frozen and m in self.frozen)}

    def frozen_table(self, m: str) -> torch.Tensor:
        """The scored table of feature modality ``m`` with ``content_table="frozen"``: [N+1, d].

        The features on their top-d principal directions, fixed, so training cannot raise or lower an item
        by its identity (popular items by how often they were targets): a text or image score says only how
        alike the item's content is to what the sequence asks for. Items without the modality get the
        learned missing vector.
        """
        f = self.frozen[m]
        proj = f.projected(f.score_basis)  # [N+1, d]; bfloat16 under autocast; fixed, so computed once
        return torch.where(f.present[:, None], proj, self.missing[m])  # [N+1, d]

    # ---- 2. CAMoE and the category-guided modality weights -------------------------------------
    def camoe(self, items: torch.Tensor, tables: dict[str, torch.Tensor] | None = None
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """Refined ē_m = e_m + w_m * ê_m of the unique items ``items`` (LongTensor [U]).

        ``tables`` (`item_tables`) gives the feature modalities' e_m by row (those it holds); the ID stays an
        embedding lookup (`id_rows`), which costs no more than a row gather.

        Returns:
            ē (each modality's [U, d]), the weights w [U, M] ([U, 1] ones without CAMoE) and the
            category logits [M, U, C] (None without category guidance).
        """
        e = {m: take_rows(tables[m], items) if tables is not None and m in tables and m != "id"
             else self.item_table(m, items)
             for m in self.mods}  # each [U, d]
        if not self.use_moe:
            return e, e[self.mods[0]].new_ones((len(items), 1)), None
        d = self.cfg.hidden_size
        x = torch.cat([e[m] for m in self.mods], dim=-1)  # [U, M*d]
        expert_out = torch.stack([f(x) for f in self.experts], dim=1)  # [U, K, M*d]
        w, logits = self.modality_weights(e, items)  # [U, M], [M, U, C]
        refined = {}
        slices = expert_out.view(len(items), -1, len(self.mods), d).unbind(2)  # M x [U, K, d]: slice m of each expert
        for j, m in enumerate(self.mods):
            gate = self.gates[m](e[m]).softmax(-1)  # [U, K] attentive gate over the shared experts
            e_hat = (gate[:, :, None] * slices[j]).sum(1)  # [U, d] slice m of the mix
            refined[m] = e[m] + w[:, j:j + 1] * e_hat  # [U, d]
        return refined, w, logits

    def modality_weights(self, e: dict[str, torch.Tensor], items: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-item modality weights w [U, M] and the category logits [M, U, C] (None without guidance)."""
        M = len(self.mods)
        if not self.cfg.category_guidance:
            return e[self.mods[0]].new_full((len(items), M), 1.0 / M), None
        logits = torch.stack([self.cat_head(self.cat_proj[m](e[m])) for m in self.mods])  # [M, U, C]
        if self.cfg.weight_mode == "learned":
            w = self.weight_mlp(logits.softmax(-1).permute(1, 0, 2).flatten(1)).softmax(-1)  # [U, M]
        else:  # "confidence": how sure each modality's head is of the item's true category
            logp = self.true_category_logp(logits, items)  # [M, U]
            w = (logp.T / self.cfg.weight_temperature).softmax(-1)  # [U, M]
        return w, logits

    def true_category_logp(self, logits: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """log p_m(true category) of each item from each modality's logits [M, U, C or T] -> [M, U].

        With the multi-hot path loss ("bce") it is the mean log-sigmoid over the item's path tokens.
        """
        M = logits.shape[0]
        if self.cfg.category_loss == "bce":
            path = self.item_path[items]  # [U, D_p], -1 = none
            has = path >= 0
            lp = F.logsigmoid(logits).gather(2, path.clamp(min=0)[None].expand(M, -1, -1))  # [M, U, D_p]
            return (lp * has).sum(-1) / has.sum(-1).clamp(min=1)  # [M, U]
        cat = self.item_category[items].clamp(min=0)  # [U]
        return logits.log_softmax(-1).gather(2, cat[None, :, None].expand(M, -1, 1)).squeeze(2)  # [M, U]

    @torch.no_grad()
    def refined_tables(self, tables: dict[str, torch.Tensor] | None = None, chunk: int = 65536
                       ) -> dict[str, torch.Tensor]:
        """ē_m of every item, each [N+1, d], in eval mode (``tables``: `item_tables`, when computed).

        CAMoE is a function of the item alone, so a ranking pass computes it once for every item (in
        chunks of ``chunk`` items) and looks the users' items up, instead of computing it per batch for the
        batch's items: on toys most items recur in every batch of 1,024 users.
        """
        if self.training:
            raise RuntimeError("refined_tables: eval mode only (training computes CAMoE per batch, with dropout)")
        n = self.cfg.num_items + 1
        ids = torch.arange(n, device=self.pos_emb.weight.device)
        parts = [self.camoe(ids[i:i + chunk], tables)[0] for i in range(0, n, chunk)]
        return {m: torch.cat([p[m] for p in parts]) if len(parts) > 1 else parts[0][m] for m in self.mods}

    # ---- 3. modality swap ----------------------------------------------------------------------
    def swap_views(self, seq: torch.Tensor, text: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
        """Exchange the text and image items at random non-padding positions (probability swap_prob).

        seq: LongTensor [B, L]; text, image: [B, L, d] -> two complementary mixed sequences, [B, L, d]
        each: the text sequence with some image items, and the image sequence with the matching text items.
        """
        swap = (torch.rand(seq.shape, device=seq.device) < self.cfg.swap_prob) & (seq > 0)  # [B, L]
        return [torch.where(swap[..., None], image, text), torch.where(swap[..., None], text, image)]

    # ---- 4. sequence encoder -------------------------------------------------------------------
    def encode(self, seqs: torch.Tensor, norms: list[str], last: torch.Tensor | None = None, full: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked sequences [S, B, L, d] (one per entry of ``norms``) through the encoder.

        Returns:
            Without ``last``: (outputs [S, B, L, d], None). With ``last`` (LongTensor [B]): the first ``full``
            sequences at every position [full, B, L, d] and the others only at position ``last`` [S-full, B, 1, d].
        """
        S, B, L, d = seqs.shape
        x = seqs + self.pos_emb.weight[:L]  # [S, B, L, d] one learned position table for every sequence
        x = torch.stack([self.input_norm[n](x[i]) for i, n in enumerate(norms)])  # [S, B, L, d] DyT
        x = self.drop(x)
        if self.cfg.shared_encoder:  # all modalities and views in one pass: shared weights
            return self._transformer(self.blocks, x, last, full if last is not None else S)
        every, at_last = [], []
        out = {}
        for m in dict.fromkeys(norms):  # each modality's sequences (and views) through its own encoder
            rows = [i for i, n in enumerate(norms) if n == m]
            n_full = sum(i < full for i in rows) if last is not None else len(rows)
            a, b = self._transformer(self.encoders[m], x[rows], last, n_full)
            out.update(zip(rows, [*a, *(b if b is not None else [])], strict=True))
        every = [out[i] for i in range(S) if last is None or i < full]
        at_last = [out[i] for i in range(S) if last is not None and i >= full]
        return (torch.stack(every) if every else x.new_zeros(0, B, L, d),
                torch.stack(at_last) if at_last else None)

    @staticmethod
    def _transformer(blocks: nn.ModuleList, x: torch.Tensor, last: torch.Tensor | None, full: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [S, B, L, d] through ``blocks`` as one batch -> the first ``full`` sequences [full, B, L, d] and,
        with ``last``, the others at that position only ([S-full, B, 1, d]; the final block runs on one query)."""
        S, B, L, d = x.shape
        x = x.reshape(S * B, L, d)  # [S*B, L, d]
        for block in blocks[:-1]:
            x = block(x)  # [S*B, L, d]
        every = blocks[-1](x[: full * B]).view(full, B, L, d) if full else x.new_zeros(0, B, L, d)
        if last is None or full == S:
            return every, None
        return every, blocks[-1](x[full * B :], last.repeat(S - full)).view(S - full, B, 1, d)

    def forward(self, seq: torch.Tensor, targets: torch.Tensor | None = None, normalizer: float | None = None
                ) -> ModelOutput | tuple[torch.Tensor, dict[str, float]]:
        """`encode_views` of ``seq`` (LongTensor [B, L], right-padded), or with ``targets`` the training `loss`.

        Going through ``forward`` for the loss lets DistributedDataParallel hook in.
        """
        if targets is not None:
            return self.loss(seq, targets, normalizer)
        return self.encode_views(seq)

    def encode_views(self, seq: torch.Tensor, last: torch.Tensor | None = None,
                     tables: dict[str, torch.Tensor] | None = None, swap_last: torch.Tensor | None = None,
                     refined: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        """Items -> CAMoE -> (swap views when training) -> encoder, for a batch of sequences.

        Args:
            seq: LongTensor [B, L] right-padded item indices, L <= max_seq_len.
            last: LongTensor [B]: compute ``z`` only at that position of each sequence ([M, B, 1, d]).
            tables: `item_tables`, when the caller needs them too (the score table).
            swap_last: LongTensor [B]: compute the swap views only at that position ([2, B, 1, d]): the
                contrastive loss reads one position, so their final block runs on one query.
            refined: `refined_tables` (eval mode): every item's CAMoE output, looked up instead of computed
                for the batch's items; the output then has no category logits, weights or unique items.

        Raises:
            TypeError, ValueError: ``seq`` is not a 2-D LongTensor of at most max_seq_len positions, or
                (for a CPU tensor; checking on a GPU would cost a sync per step) holds an index outside 0..N.
        """
        check_seq(seq, self.cfg.max_seq_len)
        if refined is not None:
            if self.training:
                raise RuntimeError("refined tables are for eval mode: training computes CAMoE per batch")
            if seq.device.type == "cpu" and seq.numel():
                check_items(torch.stack([seq.min(), seq.max()]), self.cfg.num_items)
            views = [take_rows(refined[m], seq) for m in self.mods]  # M x [B, L, d]
            items, w, cat_logits = None, None, None
        else:
            items, inverse = torch.unique(seq, return_inverse=True)  # [U], [B, L]
            check_items(items, self.cfg.num_items)  # sorted: its ends are the smallest and largest index
            refined, w, cat_logits = self.camoe(items, tables)  # each [U, d]
            views = [take_rows(refined[m], inverse) for m in self.mods]  # M x [B, L, d]
        norms = list(self.mods)
        swapped = self.training and self.cfg.swap_cl and {"text", "image"} <= set(self.mods)
        if swapped:  # each view keeps the input norm of the modality it starts from
            views += self.swap_views(seq, views[self.mods.index("text")], views[self.mods.index("image")])
            norms += ["text", "image"]
        M = len(self.mods)
        if last is None and swapped and swap_last is not None:  # main views everywhere, swap views at one position
            z, swap = self.encode(torch.stack(views), norms, swap_last, full=M)  # [M, B, L, d], [2, B, 1, d]
        else:
            every, at_last = self.encode(torch.stack(views), norms, last)  # [M (+2), B, L or 1, d]
            z = every if last is None else at_last
            swap = z[M:] if swapped else None
        return ModelOutput(z=z[:M], swap_views=swap, cat_logits=cat_logits, unique_items=items, weights=w)

    # ---- 5. scores and loss --------------------------------------------------------------------
    def score_table(self, tables: dict[str, torch.Tensor] | None = None,
                    refined: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Item tables of all modalities side by side: [N+1, M*d] (scored against concat Z).

        ``tables``: the `item_tables` of this batch, when already computed; ``refined``: `refined_tables`, when
        already computed (eval mode), read instead of running CAMoE over every item again with ``score_refined``.
        """
        parts = self.score_parts(tables, refined)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # one modality: no copy

    def score_grad_rows(self) -> list[torch.Tensor | None]:
        """Per block of `score_parts`, the rows training learns (None: all). A frozen content table
        (``content_table="frozen"``, no learned scale) is fixed but for the missing vector of the items that
        lack the modality: the CE then computes that block's gradient at those items only."""
        fixed = (self.cfg.content_table == "frozen" and not (self.cfg.score_refined and self.use_moe)
                 and self.cfg.score_scale != "learned")
        return [self.frozen[m].absent_rows() if fixed and m in self.frozen else None for m in self.mods]

    def score_parts(self, tables: dict[str, torch.Tensor] | None = None,
                    refined: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """`score_table`'s blocks, one [N+1, d] per modality in order."""
        if self.cfg.score_refined and self.use_moe:  # the same refinement as the sequence side's items
            if refined is None:
                refined, _, _ = self.camoe(torch.arange(self.cfg.num_items + 1, device=self.pos_emb.weight.device),
                                           tables)
            tables = [refined[m] for m in self.mods]  # M x [N+1, d]
        else:  # (frozen text/image are not in `item_tables`: replaced below)
            frozen = self.cfg.content_table == "frozen"
            tables = [None if frozen and m in self.frozen else self.item_table(m) if tables is None else tables[m]
                      for m in self.mods]  # M x [N+1, d]
        if self.cfg.content_table == "frozen":  # text/image: the features on their fixed principal directions
            tables = [self.frozen_table(m) if m in self.frozen else t for m, t in zip(self.mods, tables, strict=True)]
        if self.cfg.score_scale == "learned":  # scaling the table scales that modality's score term
            scale = self.log_score_scale.exp()  # [M]
            tables = [t * scale[j] for j, t in enumerate(tables)]
        return tables

    def scores(self, z: torch.Tensor, tables: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Sum over modalities of <Z_m, table_m>: z [M, P, d] -> scores [P, N+1] (padding at -inf)."""
        h = z.permute(1, 0, 2).flatten(1)  # [P, M*d]
        s = h @ self.score_table(tables).T  # [P, N+1]
        s[:, 0] = float("-inf")
        return s

    @torch.no_grad()
    def score_last(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores of every item after each user's last position: seq [B, L], lengths [B] -> [B, N+1].

        Raises:
            TypeError, ValueError: ``lengths`` is not a LongTensor with one length per sequence, or
                (CPU) one is outside 1..L (and see `encode_views`).
        """
        tables = self.item_tables()  # each [N+1, d]
        h = self.user_vectors(seq, lengths, tables)  # [B, M*d]
        s = h @ self.score_table(tables).T  # [B, N+1]
        s[:, 0] = float("-inf")
        return s

    @torch.no_grad()
    def user_vectors(self, seq: torch.Tensor, lengths: torch.Tensor,
                     tables: dict[str, torch.Tensor] | None = None,
                     refined: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Each user's concatenated Z_m after its last position, the vector scored against `score_table`:
        seq [B, L], lengths [B] -> [B, M*d] (``tables``: `item_tables`, ``refined``: `refined_tables`, when
        already computed)."""
        check_seq(seq, self.cfg.max_seq_len)
        check_lengths(lengths, seq)
        z = self.encode_views(seq, last=lengths - 1, tables=tables, refined=refined).z  # [M, B, 1, d]: last only
        return z[:, :, 0].permute(1, 0, 2).flatten(1)  # [B, M*d]

    def loss(self, seq: torch.Tensor, targets: torch.Tensor, normalizer: float | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-item CE at every position with a target + lambda_cat * L_cat + lambda_cl * L_MSCL.

        Args:
            seq, targets: LongTensor [B, L]; targets[b, t] is the item after seq[b, :t+1], 0 = none.
            normalizer: divide the summed CE by this instead of the local target count (DDP: the global
                count / world size, so that averaged gradients equal those of one process on the whole batch).

        Returns:
            The loss (a scalar tensor) and its detached parts as floats: ``rec``, and ``cat`` / ``cl``
            when those losses are on.

        Raises:
            TypeError, ValueError: ``targets`` is not a LongTensor of ``seq``'s shape (and see `encode_views`).
        """
        check_seq(seq, self.cfg.max_seq_len)
        check_targets(targets, seq)
        self.drop_ids()  # item-ID dropout for this step (unknown item IDs); before the tables read the IDs
        pos = targets > 0  # [B, L]
        last = pos.long().cumsum(1).argmax(1)  # [B] last position with a target: the contrastive loss's
        tables = self.item_tables()  # each [N+1, d]
        out = self.encode_views(seq, tables=tables, swap_last=last)
        at = pos.flatten().nonzero().squeeze(1)  # [P] flat positions with a target
        z = self.drop_modalities(out.z).flatten(1, 2).index_select(1, at)  # [M, P, d]
        h = z.permute(1, 0, 2).flatten(1)  # [P, M*d]
        # CE over the real items only (the padding row's score -inf): the same loss as `scores`, computed a
        # block of targets at a time so that the [P, N] score matrix is never held whole (see chunked_ce.py).
        ce = chunked_softmax_ce(h, self.score_parts(tables), targets.flatten()[at], compute_dtype=self.ce_dtype,
                                padding_row=True, grad_rows=self.score_grad_rows())  # summed over P targets
        loss_rec = ce / (normalizer if normalizer is not None else max(int(pos.sum()), 1))
        parts = {"rec": loss_rec.detach()}
        loss = loss_rec
        if out.cat_logits is not None and self.cfg.lambda_cat > 0:
            items = out.unique_items  # [U], sorted: the padding item, when present, comes first
            skip = int(items[0] == 0) if len(items) else 0  # a slice: a boolean mask's backward cost ~10x more
            loss_cat = self.category_loss(out.cat_logits[:, skip:], items[skip:])  # logits [M, U', C or T]
            loss = loss + self.cfg.lambda_cat * loss_cat
            parts["cat"] = loss_cat.detach()
        if out.swap_views is not None and self.cfg.lambda_cl > 0:
            rows = torch.arange(len(seq), device=seq.device)
            a, b = out.swap_views[0, :, 0], out.swap_views[1, :, 0]  # [B, d] each, at `last`
            t = targets[rows, last]  # [B]
            loss_cl = info_nce(a, b, self.cfg.cl_temperature, same_target=t[:, None] == t[None, :])
            loss = loss + self.cfg.lambda_cl * loss_cl
            parts["cl"] = loss_cl.detach()
        return loss, {k: float(v) for k, v in parts.items()}

    def drop_modalities(self, z: torch.Tensor) -> torch.Tensor:
        """Modality dropout for the next-item loss: z [M, B, L, d] with each modality's output zeroed for a
        sequence with probability ``modality_dropout`` (never all of a sequence's), so its score term is left
        out and the others must rank the target without it: no modality can let the rest coast.
        """
        M, B = z.shape[:2]
        if not self.training or self.cfg.modality_dropout <= 0 or M < 2:
            return z
        keep = torch.rand(M, B, device=z.device) >= self.cfg.modality_dropout  # [M, B]
        none = ~keep.any(0)  # [B] sequences that lost every modality keep a random one
        keep[torch.randint(M, (B,), device=z.device), torch.arange(B, device=z.device)] |= none
        return z * keep[:, :, None, None].to(z.dtype)

    def category_loss(self, logits: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """L_cat of the real items ``items`` [U'] from every modality's logits [M, U', C or T].

        "ce": cross-entropy on the item's label. "bce": binary cross-entropy on the multi-hot path,
        summed over tokens and averaged over items (so its scale is close to the CE's).
        """
        M = logits.shape[0]
        if self.cfg.category_loss == "bce":
            path = self.item_path[items]  # [U', D_p]
            target = torch.zeros_like(logits[0])  # [U', T]
            # add, not assign: the -1 padding lands on token 0 with 0 and must not erase a real token 0
            target.scatter_add_(1, path.clamp(min=0), (path >= 0).to(target.dtype)).clamp_(max=1)
            bce = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="sum")
            return bce / max(M * len(items), 1)
        cat = self.item_category[items].clamp(min=0)  # [U']
        return F.cross_entropy(logits.flatten(0, 1), cat.repeat(M))
    # ---- unknown item IDs ----------------------------------------------------------------------
    def id_rows(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """e_id of items ``idx`` (LongTensor [...]): [..., d]; without ``idx`` for all items: [N+1, d].

        The ID embedding, or the learned unknown vector ``missing["id"]`` for the items marked unknown
        (`mark_unknown_ids`) and, in training, for this step's dropped IDs (`drop_ids`). Applied to every
        row, marked or not, so the vector always takes part in the graph (DDP needs every parameter used).
        """
        e = self.id_emb.weight if idx is None else self.id_emb(idx)  # [N+1 or ..., d]
        unknown = self.id_unknown  # [N+1]
        if self.training and self._id_dropped is not None:
            unknown = unknown | self._id_dropped  # [N+1]
        if idx is not None:
            unknown = unknown[idx]  # [...]
        return torch.where(unknown[..., None], self.missing["id"], e)  # [..., d]

    def mark_unknown_ids(self, unknown: torch.Tensor) -> None:
        """Score and encode the items where ``unknown`` (BoolTensor [N+1]) is True with the unknown ID vector.

        For items the model has no trained ID row for: added to the item table after training (serving),
        or held out of training (the cold-item study). Row 0 (padding) is never unknown. A model without
        the ID modality has nothing to replace: a no-op.
        """
        if "id" not in self.mods:
            return
        check_table("unknown", unknown, self.cfg.num_items + 1)
        self.id_unknown.copy_(unknown.to(self.id_unknown.device, torch.bool))
        self.id_unknown[0] = False

    def drop_ids(self) -> None:
        """Draw this training step's item-ID dropout: each real item's ID row is replaced by the unknown
        vector with probability ``id_dropout``, in the sequences and in the score table alike, so the model
        learns to encode and to rank an item from its content with the unknown vector in place of its ID.
        Draws nothing (and changes no random state) when off.
        """
        self._id_dropped = None
        if self.training and self.cfg.id_dropout > 0 and "id" in self.mods:
            drop = torch.rand(self.cfg.num_items + 1, device=self.id_unknown.device) < self.cfg.id_dropout  # [N+1]
            drop[0] = False
            self._id_dropped = drop

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
