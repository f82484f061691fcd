"""ID rows from the trained items most like an item in content: for new items, and to smooth rare ones.

An item's *content neighbours* are the trained items with the highest cosine of the frozen features the
model reads (averaged over the feature modalities both items have); their ID rows are averaged with weights
softmax(cos / NEIGHBOUR_TEMPERATURE).

- `impute_new_item_ids`: an item the model was not trained on (added to the catalog after training, or held
  out of it) is scored with the learned unknown-ID vector in place of an ID row: one vector for every such
  item, so their ID score term says nothing about them and they rank below the trained items. It gets the
  neighbours' mean instead (`recommend.new_item_neighbours`).
- `IdSmoother`: an item seen c times in training has an ID row fitted on c examples. Each row is shrunk
  towards its neighbours' mean, (c e + lambda m) / (c + lambda): rare items borrow from the items they look
  like, frequent ones keep their own; an item of the split never seen in training (only a valid or test
  target) takes the neighbours' mean. lambda is picked on validation after training (`train.id_smoothing`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cammsr.model.cammsr import CAMMSR

NEIGHBOUR_TEMPERATURE = 0.05  # softmax temperature over the neighbours' cosines
SMOOTHING_NEIGHBOURS = 3  # neighbours whose rows an item's ID row is shrunk towards
CHUNK = 1024  # items compared with every candidate at a time


@torch.no_grad()
def neighbour_rows(model: CAMMSR, items: torch.Tensor, candidates: torch.Tensor, neighbours: int,
                   temperature: float = NEIGHBOUR_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax(cos / T)-weighted mean of the ID rows of each of ``items``' (LongTensor [c]) ``neighbours``
    most similar ``candidates`` (BoolTensor [N+1]; an item is never its own neighbour): rows [c, d] and
    ``found`` [c], False where an item shares no feature modality with any candidate (its row is 0)."""
    device = model.id_emb.weight.device
    feats = [(F.normalize(model.frozen[m].features.float(), dim=1), model.frozen[m].present) for m in model.frozen]
    pool = candidates.to(device).nonzero().squeeze(1)  # [W] candidate item indices
    table = model.id_emb.weight  # [N+1, d]
    k = min(neighbours, len(pool))
    out, found = table.new_zeros(len(items), table.shape[1]), torch.zeros(len(items), dtype=torch.bool, device=device)
    if k == 0 or not feats:
        return out, found
    for start in range(0, len(items), CHUNK):
        rows = items[start:start + CHUNK].to(device)  # [c]
        total = torch.zeros(len(rows), len(pool), device=device)  # [c, W] summed cosines
        shared = torch.zeros_like(total)  # [c, W] modalities both items have
        for f, present in feats:
            both = (present[rows, None] & present[None, pool]).float()  # [c, W]
            total += (f[rows] @ f[pool].T) * both
            shared += both
        shared[rows[:, None] == pool[None, :]] = 0  # not its own neighbour
        sim = (total / shared.clamp_min(1)).masked_fill(shared == 0, float("-inf"))  # [c, W] mean cosine
        top = sim.topk(k, dim=1)  # [c, k]
        weights = torch.softmax(top.values / temperature, dim=1).nan_to_num(0.0)  # [c, k], all -inf -> 0
        out[start:start + len(rows)] = (weights[:, :, None] * table[pool[top.indices]]).sum(1)
        found[start:start + len(rows)] = torch.isfinite(top.values[:, 0])
    return out, found


def _reads_ids_and_content(model: CAMMSR) -> bool:
    return "id" in model.mods and len(model.frozen) > 0


@torch.no_grad()
def impute_new_item_ids(model: CAMMSR, trained: int, neighbours: int,
                        temperature: float = NEIGHBOUR_TEMPERATURE) -> int:
    """Give items ``trained + 1 .. N`` of ``model`` (marked unknown) an ID row from their ``neighbours`` most
    similar trained items (items ``1 .. trained``) in content, and unmark them; returns how many got one.

    An item with no feature modality in common with any trained item keeps the unknown-ID vector; a model
    without IDs or without feature modalities is left as it is (0).
    """
    n = model.cfg.num_items
    if neighbours <= 0 or not _reads_ids_and_content(model) or trained >= n or trained < 1:
        return 0
    device = model.id_emb.weight.device
    candidates = (torch.arange(n + 1, device=device) >= 1) & (torch.arange(n + 1, device=device) <= trained)
    new = torch.arange(trained + 1, n + 1, device=device)
    rows, found = neighbour_rows(model, new, candidates, neighbours, temperature)
    model.id_emb.weight[new[found]] = rows[found]
    model.id_unknown[new[found]] = False
    return int(found.sum())


class IdSmoother:
    """Shrinks ``model``'s ID rows towards their content neighbours' rows by training count (module docstring).

    Args:
        counts: FloatTensor [N+1] each item's occurrences in the training sequences (row 0 = padding).
    """

    def __init__(self, model: CAMMSR, counts: torch.Tensor, neighbours: int = SMOOTHING_NEIGHBOURS,
                 temperature: float = NEIGHBOUR_TEMPERATURE) -> None:
        self.model = model
        device = model.id_emb.weight.device
        self.counts = counts.to(device).float()[:, None]  # [N+1, 1]
        self.original = model.id_emb.weight.detach().clone()  # [N+1, d]
        items = torch.arange(1, model.cfg.num_items + 1, device=device)
        rows, self.found = neighbour_rows(model, items, self.counts[:, 0] > 0, neighbours, temperature)
        self.means = torch.cat([rows.new_zeros(1, rows.shape[1]), rows])  # [N+1, d]
        self.found = torch.cat([self.found.new_zeros(1), self.found])  # [N+1]

    @staticmethod
    def applies(model: CAMMSR) -> bool:
        """Whether ``model`` has both an ID table and content to find neighbours by."""
        return _reads_ids_and_content(model)

    @torch.no_grad()
    def apply(self, lam: float) -> None:
        """Set the ID rows to (c e + lam m) / (c + lam) where a neighbour was found (lam = 0: the trained rows)."""
        table = self.model.id_emb.weight
        table.copy_(self.original)
        if lam > 0:
            smoothed = (self.counts * self.original + lam * self.means) / (self.counts + lam)  # [N+1, d]
            table[self.found] = smoothed[self.found]
