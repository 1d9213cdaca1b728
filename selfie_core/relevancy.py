"""Relevancy: ``|P_inject(token) - P_no_inject(token)|`` for every generated token.

``P_no_inject`` is the teacher-forced probability of each generated token after the same interpretation prompt
with its placeholders left as they are. The prompt is shared by all rows, so its KV cache (``PromptState``) is
computed once and gives the first token's probability directly. The rest comes from one batched pass over the
generated tokens, packed as a prefix tree: rows often start the same way ("The message is ..."), and a shared
prefix is computed once. Each packed lane holds the distinct prefixes of a few rows; a 4D attention mask lets a
position see the whole prompt and its own ancestors only, and its position id is the prompt length plus its depth,
so every logit equals the one of a plain teacher-forced run of that row.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .generation import PromptState
from .modelcall import CUSTOM_MASK_ATTENTION, attention_implementation, custom_mask, forward, make_cache, wide


def _pack(sequences: Sequence[Sequence[int]], rows: list[int], width: int):
    """Group rows into lanes of at most ``width`` distinct prefix nodes.

    Returns lanes as (tokens, parents, depths, row -> [node per target position]).
    """
    lanes = []
    current = None
    for i in sorted(rows, key=lambda r: tuple(sequences[r])):
        seq = sequences[i][:-1]  # the last token is only a target
        if current is not None:
            extra = _new_nodes(current["index"], seq)
            if len(current["tokens"]) + extra > width:
                current = None
        if current is None:
            current = {"tokens": [], "parents": [], "depths": [], "index": {}, "targets": {}}
            lanes.append(current)
        nodes, parent = [], -1
        for depth, tok in enumerate(seq):
            key = (parent, tok)
            node = current["index"].get(key)
            if node is None:
                node = len(current["tokens"])
                current["index"][key] = node
                current["tokens"].append(tok)
                current["parents"].append(parent)
                current["depths"].append(depth)
            nodes.append(node)
            parent = node
        current["targets"][i] = nodes
    return lanes


def _tree_masks(lanes: list[dict], width: int) -> torch.Tensor:
    """(lanes, width, width) bool: node i may attend to node j iff j is i or one of its ancestors.

    Nodes are numbered parents first, so filling depth by depth (a node inherits its parent's row) is exact; each
    depth is one gather over every lane at once. Padding positions see only themselves.
    """
    tree = torch.eye(width, dtype=torch.bool).repeat(len(lanes), 1, 1)
    parents = torch.zeros((len(lanes), width), dtype=torch.long)
    depths = torch.full((len(lanes), width), -1, dtype=torch.long)  # -1: padding
    for lane_i, lane in enumerate(lanes):
        parents[lane_i, : len(lane["parents"])] = torch.tensor(lane["parents"], dtype=torch.long)
        depths[lane_i, : len(lane["depths"])] = torch.tensor(lane["depths"], dtype=torch.long)
    for depth in range(1, int(depths.max()) + 1):
        lane_idx, node_idx = (depths == depth).nonzero(as_tuple=True)
        tree[lane_idx, node_idx] |= tree[lane_idx, parents[lane_idx, node_idx]]
    return tree


def _new_nodes(index: dict, seq: Sequence[int]) -> int:
    parent = -1
    for depth, tok in enumerate(seq):
        node = index.get((parent, tok))
        if node is None:
            return len(seq) - depth
        parent = node
    return 0


@torch.inference_mode()
def no_inject_probs(model, state: PromptState, sequences: Sequence[Sequence[int]], device: torch.device,
                    lane_width: int = 256, max_logit_elements: int = 1 << 27) -> list[list[float]]:
    """P_no_inject of every token of every sequence (each a list of generated ids)."""
    result: list[list[float]] = [[float(state.last_probs[s[0]])] if s else [] for s in sequences]
    todo = [i for i, s in enumerate(sequences) if len(s) > 1]
    if not todo:
        return result
    if attention_implementation(model) not in CUSTOM_MASK_ATTENTION:  # plain right-padded rows instead
        return _plain_pass(model, state, sequences, todo, result, device, max_logit_elements)
    width = max(lane_width, max(len(sequences[i]) - 1 for i in todo))
    lanes = _pack(sequences, todo, width)
    width = max(len(lane["tokens"]) for lane in lanes)
    vocab = state.last_probs.shape[0]
    plen = state.length
    lanes_per_pass = max(1, max_logit_elements // (width * vocab))
    for start in range(0, len(lanes), lanes_per_pass):
        group = lanes[start : start + lanes_per_pass]
        n = len(group)
        ids = torch.zeros((n, width), dtype=torch.long)
        pos = torch.full((n, width), plen, dtype=torch.long)
        mask = torch.zeros((n, 1, width, plen + width), dtype=torch.bool)
        mask[:, :, :, :plen] = True
        mask[:, 0, :, plen:] = _tree_masks(group, width)
        lane_of, node_of, target_of, owner = [], [], [], []
        for lane_i, lane in enumerate(group):
            m = len(lane["tokens"])
            ids[lane_i, :m] = torch.tensor(lane["tokens"])
            pos[lane_i, :m] += torch.tensor(lane["depths"])
            for row, nodes in lane["targets"].items():
                lane_of += [lane_i] * len(nodes)
                node_of += nodes
                target_of += sequences[row][1:]
                owner.append((row, len(nodes)))
        cache = make_cache(model, state.kv, n)
        mask = custom_mask(model, mask, state.kv[0][0].dtype)
        logits, _, _ = forward(model, ids.to(device), cache=cache, attention_mask=mask.to(device),
                               position_ids=pos.to(device), use_cache=True)
        del cache
        # one gather and one transfer for the whole pass (a per-row .tolist() would wait for the device each time)
        lane_idx = torch.tensor(lane_of, device=logits.device)
        node_idx = torch.tensor(node_of, device=logits.device)
        tgt = torch.tensor(target_of, device=logits.device)
        logits = wide(logits)
        logz = torch.logsumexp(logits, -1)
        probs = (logits[lane_idx, node_idx, tgt] - logz[lane_idx, node_idx]).exp().tolist()
        at = 0
        for row, count in owner:
            result[row].extend(probs[at : at + count])
            at += count
        del logits, logz
    return result


def _plain_pass(model, state, sequences, todo, result, device, max_logit_elements):
    """One right-padded teacher-forced pass per chunk of rows (no prefix sharing), after the cached prompt."""
    vocab = state.last_probs.shape[0]
    width = max(len(sequences[i]) for i in todo) - 1
    rows_per_pass = max(1, max_logit_elements // (width * vocab))
    for start in range(0, len(todo), rows_per_pass):
        chunk = todo[start : start + rows_per_pass]
        inputs = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seq = torch.tensor(sequences[i])
            inputs[row, : len(seq) - 1] = seq[:-1]
            targets[row, : len(seq) - 1] = seq[1:]
        cache = make_cache(model, state.kv, len(chunk))
        logits, _, _ = forward(model, inputs.to(device), cache=cache, use_cache=True)
        logits = wide(logits)
        targets = targets.to(logits.device)
        probs = (logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, -1)).exp().cpu()
        del logits, cache
        for row, i in enumerate(chunk):
            result[i].extend(probs[row, : len(sequences[i]) - 1].tolist())
    return result


def relevancy_scores(p_inject: Sequence[float], p_no_inject: Sequence[float]) -> list[float]:
    return [abs(a - b) for a, b in zip(p_inject, p_no_inject)]
