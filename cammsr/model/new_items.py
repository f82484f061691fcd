"""ID rows for items a model was not trained on, from the trained items most like them in content.

A model that reads IDs scores an item it never trained on (added to the catalog after training, or held out
of it) with the learned unknown-ID vector in place of an ID row: one vector for every such item, so their ID
score term says nothing about them and they rank below the trained items whose ID rows carry their
popularity and co-occurrence. `impute_new_item_ids` gives each of them instead the softmax(cos / T)-weighted
mean of the ID rows of its ``neighbours`` most similar trained items, by the cosine of the frozen features the
model reads (averaged over the feature modalities both items have). Measured in the cold-item study
(`cammsr experiments --cold-items`): cold items then rank several times better, at a small cost to the
trained ones they now compete with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cammsr.model.cammsr import CAMMSR

NEIGHBOUR_TEMPERATURE = 0.05  # softmax temperature over the neighbours' cosines
CHUNK = 1024  # new items compared with every trained item at a time


@torch.no_grad()
def impute_new_item_ids(model: CAMMSR, trained: int, neighbours: int,
                        temperature: float = NEIGHBOUR_TEMPERATURE) -> int:
    """Give items ``trained + 1 .. N`` of ``model`` (marked unknown) an ID row from their ``neighbours`` most
    similar trained items (items ``1 .. trained``) in content, and unmark them; returns how many got one.

    An item with no feature modality in common with any trained item keeps the unknown-ID vector; a model
    without IDs or without feature modalities is left as it is (0).
    """
    n = model.cfg.num_items
    feature_mods = list(model.frozen)
    if neighbours <= 0 or "id" not in model.mods or not feature_mods or trained >= n or trained < 1:
        return 0
    feats = {m: (F.normalize(model.frozen[m].features.float(), dim=1), model.frozen[m].present)
             for m in feature_mods}  # [N+1, D_m], [N+1]
    table = model.id_emb.weight  # [N+1, d]
    k = min(neighbours, trained)
    imputed = 0
    for start in range(trained + 1, n + 1, CHUNK):
        rows = torch.arange(start, min(start + CHUNK, n + 1), device=table.device)  # [c]
        total = torch.zeros(len(rows), trained, device=table.device)  # [c, W] summed cosines
        shared = torch.zeros_like(total)  # [c, W] modalities both items have
        for f, present in feats.values():
            both = (present[rows, None] & present[None, 1:trained + 1]).float()  # [c, W]
            total += (f[rows] @ f[1:trained + 1].T) * both
            shared += both
        sim = (total / shared.clamp_min(1)).masked_fill(shared == 0, float("-inf"))  # [c, W] mean cosine
        top = sim.topk(k, dim=1)  # [c, k]
        found = torch.isfinite(top.values[:, 0])  # [c] at least one trained item shares a modality
        weights = torch.softmax(top.values / temperature, dim=1).nan_to_num(0.0)  # [c, k], -inf -> 0
        rows_new = (weights[:, :, None] * table[1 + top.indices]).sum(1)  # [c, d]
        table[rows[found]] = rows_new[found]
        model.id_unknown[rows[found]] = False
        imputed += int(found.sum())
    return imputed
