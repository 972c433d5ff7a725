"""From (prompt, images, response tokens) to :class:`ModelBatch` micro-batches.

- :func:`encode_all` runs the processor once per batch on its distinct prompts
  (:class:`PromptCache`: the samples of a group, which have the same prompt and image, share
  one entry).
- :func:`plan_layout` groups sequences into micro-batches under a token budget (similar
  lengths together, so padding stays small; :func:`padding_share` is the metric).
- :func:`collate` lays a micro-batch out in rows, right-padded:

  * one sequence per row (``Packing()``): plain causal attention, no mask needed (causal
    attention never looks right, so padding changes nothing);
  * ``share_prompts``: the G responses of a group share one copy of their prompt. A row is
    ``prompt[:-1] | prompt[-1] r_1 | prompt[-1] r_2 | ...``: each branch repeats the prompt's
    last token at its own position so that it scores the branch's first response token, and
    attends to the shared prefix and to its own branch only. Every token sees exactly what it
    sees in its own unpacked row, at the same MRoPE position, so log-probs and gradients are
    those of the unpacked batch; a group of G costs ``P + G (R + 1)`` tokens instead of
    ``G (P + R)``.
  * ``pack_length > 0``: several such units (groups or single sequences) share one row up
    to that many tokens, each attending only to itself (block-diagonal causal mask).
  * ``thd``: Transformer Engine's packed format. Every unit of the micro-batch goes back to
    back in a single row, and ``cu_seqlens`` (the units' boundaries, with any row padding as
    a last segment of its own, so that the boundaries cover every token) take the place of
    a mask. THD cannot express a prefix shared by several branches, so it takes single
    sequences only (``share_prompts=False``).

  MRoPE positions are computed per unit by transformers' ``get_rope_index`` on the unit's
  own prompt and image grids *before* packing, image features are scattered per unit in row
  order, and per-response values are read back through ``ModelBatch.responses``.
- :func:`response_values` / :func:`pad_responses` move per-response vectors in and out of
  the ``[N, T]`` response layout the losses take.

Packed rows need an explicit attention mask, which megatron-core's local attention spec takes
(``[B, 1, S, S]``); Transformer Engine's fused attention takes THD ``cu_seqlens`` instead
(``Packing(thd=True)``), which the local spec's attention also takes (a block-diagonal mask
built from them), so the THD path runs, and is tested, on a CPU too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from PIL import Image

from megatron_ivr.model_providers.block_attention import BlockMask
from megatron_ivr.model_providers.logprobs import ModelBatch
from megatron_ivr.model_providers.qwen_vl import position_ids
from megatron_ivr.prompts import chat_prompt


@dataclass
class ScoredSequence:
    prompt: str  # user text, without chat markup
    images: list[Image.Image] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    # MoE: the engine's k experts per layer for every token it fed (the prompt, then the response
    # but its last token), ``[P + R - 1, layers, k]``; None: the trainer routes by itself
    routed_experts: Optional[torch.Tensor] = None


@dataclass
class EncodedPrompt:
    ids: list[int]
    mm_types: list[int]
    pixel_values: Optional[torch.Tensor] = None
    grid: Optional[torch.Tensor] = None


@dataclass
class Encoded:
    """One sequence after the processor: prompt ids (image placeholders expanded), the
    multimodal token types, the image tensors, and the response ids."""

    prompt: EncodedPrompt
    response_ids: list[int]
    routed_experts: Optional[torch.Tensor] = None  # as ScoredSequence's, its length checked

    @property
    def length(self) -> int:
        return len(self.prompt.ids) + len(self.response_ids)


class PromptCache:
    """Processor outputs by (prompt text, image identities): a group's G samples share one
    entry, and :meth:`warm` encodes all missing prompts of a batch in one processor call."""

    def __init__(self, processor):
        self.processor = processor
        self._cache: dict = {}

    @staticmethod
    def _key(prompt: str, images: list[Image.Image]) -> tuple:
        return prompt, tuple(id(image) for image in images)

    def warm(self, requests: list[tuple[str, list[Image.Image]]]) -> None:
        """Encode every (prompt, images) not cached yet, together: one processor call (its
        padding removed per prompt, its image tensors split per prompt by their grids)."""
        unique = {}
        for prompt, images in requests:
            unique.setdefault(self._key(prompt, images), (prompt, images))
        missing = [value for key, value in unique.items() if key not in self._cache]
        if not missing:
            return
        texts = [chat_prompt(self.processor, prompt, len(images)) for prompt, images in missing]
        images = [image for _, prompt_images in missing for image in prompt_images]
        out = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        per_image = iter(())  # (pixel values, grid) per image, in prompt order
        if images:
            grids = out["image_grid_thw"]
            per_image = iter(zip(torch.split(out["pixel_values"], grids.prod(-1).tolist()), grids.split(1)))
        for row, (prompt, prompt_images) in enumerate(missing):
            keep = out["attention_mask"][row].bool()
            parts = [next(per_image) for _ in prompt_images]
            encoded = EncodedPrompt(out["input_ids"][row][keep].tolist(), out["mm_token_type_ids"][row][keep].tolist(),
                                    torch.cat([pixels for pixels, _ in parts]) if parts else None,
                                    torch.cat([grid for _, grid in parts]) if parts else None)
            self._cache[self._key(prompt, prompt_images)] = (encoded, prompt_images)  # images stay alive

    def __call__(self, prompt: str, images: list[Image.Image]) -> EncodedPrompt:
        key = self._key(prompt, images)
        if key not in self._cache:
            self.warm([(prompt, images)])
        return self._cache[key][0]


def encode(prompts: PromptCache, item: ScoredSequence) -> Encoded:
    prompt = prompts(item.prompt, item.images)
    routed = item.routed_experts
    if routed is not None and routed.shape[0] != len(prompt.ids) + len(item.response_ids) - 1:
        raise ValueError(f"the engine routed {routed.shape[0]} tokens of a sequence of {len(prompt.ids)} prompt and "
                         f"{len(item.response_ids)} response tokens (it feeds all but the last response token): "
                         "the engine's prompt is not the trainer's")
    return Encoded(prompt, list(item.response_ids), routed)


def encode_all(prompts: PromptCache, items: list[ScoredSequence]) -> list[Encoded]:
    """:func:`encode` for a batch, its distinct prompts through one processor call."""
    prompts.warm([(item.prompt, item.images) for item in items])
    return [encode(prompts, item) for item in items]


@dataclass(frozen=True)
class Packing:
    """How sequences are laid out in rows (see the module docstring)."""

    share_prompts: bool = False
    pack_length: int = 0  # > 0: units share rows of at most this many tokens
    # > 0: a shared-prompt unit holds at most this many tokens; a larger group is split into
    # several units, each with its own prompt copy (a cap on row length)
    unit_tokens: int = 0
    thd: bool = False  # a micro-batch's rows back to back in one row, split by cu_seqlens

    def __post_init__(self):
        if self.thd and self.share_prompts:
            raise ValueError("THD packing (Transformer Engine) cannot share a prompt between responses: "
                             "set trainer.share_prompts=false")

    @property
    def masked(self) -> bool:
        """Whether rows need an attention mask (THD rows carry ``cu_seqlens`` instead)."""
        return self.share_prompts or (self.pack_length > 0 and not self.thd)

    @classmethod
    def from_config(cls, trainer, transformer_engine: bool = False) -> Packing:
        """From the run's :class:`~megatron_ivr.config.schema.TrainerConfig`: row packing
        (``trainer.pack_length``) in THD format when ``trainer.packed_format`` says so, or
        when it is ``auto`` and the layers are Transformer Engine's."""
        thd = trainer.packed_format == "thd" or (trainer.packed_format == "auto" and transformer_engine)
        return cls(trainer.share_prompts, trainer.pack_length, trainer.shared_row_tokens,
                   thd=thd and trainer.pack_length > 0)


def units_of(items: list[Encoded], packing: Packing) -> list[list[int]]:
    """Item indices grouped into units that share one prompt copy (first-appearance order)."""
    if not packing.share_prompts:
        return [[i] for i in range(len(items))]
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(id(item.prompt), []).append(i)
    if packing.unit_tokens <= 0:
        return list(groups.values())
    units = []
    for group in groups.values():
        units.append([group[0]])
        for i in group[1:]:
            if unit_length(items, units[-1] + [i]) > packing.unit_tokens:
                units.append([i])
            else:
                units[-1].append(i)
    return units


def unit_length(items: list[Encoded], unit: list[int]) -> int:
    """Tokens of a unit laid out with its prompt shared: ``P - 1 + sum(1 + R_i)``."""
    return len(items[unit[0]].prompt.ids) - 1 + sum(1 + len(items[i].response_ids) for i in unit)


def rows_of(items: list[Encoded], packing: Packing) -> list[list[list[int]]]:
    """Rows, each a list of units: one unit per row, or first-fit (longest first) into rows of
    ``pack_length`` tokens. A function of the items alone, so every rank lays out alike."""
    units = units_of(items, packing)
    if packing.pack_length <= 0:
        return [[unit] for unit in units]
    rows: list[list[list[int]]] = []
    room: list[int] = []
    for unit in sorted(units, key=lambda u: (-unit_length(items, u), u[0])):
        need = unit_length(items, unit)
        slot = next((k for k, free in enumerate(room) if free >= need), None)
        if slot is None:
            rows.append([unit])
            room.append(packing.pack_length - need)
        else:
            rows[slot].append(unit)
            room[slot] -= need
    return rows


def plan_layout(items: list[Encoded], packing: Packing, max_tokens: int, min_count: int = 1) -> list[list[int]]:
    """Item indices per micro-batch: rows (see :func:`rows_of`) grouped under ``max_tokens``
    padded tokens by :func:`plan_micro_batches`. When there are fewer rows than ``min_count``
    (one micro-batch per data-parallel rank), shared-prompt units are split first."""
    rows = rows_of(items, packing)
    while len(rows) < min(min_count, len(items)):
        # split the largest unit in two: its halves become separate units with their own prompt copy
        units = [unit for row in rows for unit in row]
        largest = max(range(len(units)), key=lambda k: (len(units[k]), -k))
        if len(units[largest]) == 1:
            break
        unit = units.pop(largest)
        units[largest:largest] = [unit[:len(unit) // 2], unit[len(unit) // 2:]]
        rows = [[unit] for unit in units]
    lengths = [sum(unit_length(items, unit) for unit in row) for row in rows]
    plan = plan_micro_batches(lengths, max_tokens, min_count)
    return [[i for r in group for unit in rows[r] for i in unit] for group in plan]


def _unit_positions(family, hf_config, items: list[Encoded], units: list[list[int]]) -> list[torch.Tensor]:
    """``[3, P + R_max]`` MRoPE positions of each unit's prompt followed by its longest response,
    from one transformers ``get_rope_index`` call over all units (responses are text: their
    positions depend only on their index, so every branch reads its slice of these)."""
    lengths = [len(items[u[0]].prompt.ids) + max(len(items[i].response_ids) for i in u) for u in units]
    width = max(lengths)
    input_ids = torch.zeros((len(units), width), dtype=torch.long)
    attention = torch.zeros((len(units), width), dtype=torch.long)
    mm_types = torch.zeros((len(units), width), dtype=torch.long)
    grids = []
    for k, unit in enumerate(units):
        prompt = items[unit[0]].prompt
        longest = max((items[i].response_ids for i in unit), key=len)
        row = prompt.ids + longest
        input_ids[k, :len(row)] = torch.tensor(row)
        attention[k, :len(row)] = 1
        mm_types[k, :len(prompt.ids)] = torch.tensor(prompt.mm_types)
        if prompt.grid is not None:
            grids.append(prompt.grid)
    positions = position_ids(family, hf_config, input_ids, attention, mm_types, torch.cat(grids) if grids else None)
    return [positions[:, k, :n] for k, n in enumerate(lengths)]


def collate(family, hf_config, items: list[Encoded], pad_id: int, pad_to_multiple: int = 1,
            packing: Packing = Packing()) -> ModelBatch:
    """Lay ``items`` out in right-padded rows (see the module docstring). ``loss_mask [B, S]``
    marks the positions that score response tokens; ``responses(x)`` reads any ``[B, S]``
    tensor back as ``[N, T]`` in the order of ``items``."""
    rows = rows_of(items, packing)
    if packing.thd:
        rows = [[unit for row in rows for unit in row]]  # one row: the units split by cu_seqlens
    units = [unit for row in rows for unit in row]
    unit_positions = iter(_unit_positions(family, hf_config, items, units))
    width = max(sum(unit_length(items, unit) for unit in row) for row in rows)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    mm_types = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    positions = torch.zeros((3, *shape), dtype=torch.long)
    unit_id = torch.full(shape, -1, dtype=torch.long)  # which unit a token belongs to (-1: padding)
    branch_id = torch.zeros(shape, dtype=torch.long)  # 0: the shared prefix, b + 1: branch b
    longest = max(len(item.response_ids) for item in items)
    index_rows = torch.zeros((len(items), max(longest, 1)), dtype=torch.long)
    index_cols = torch.zeros((len(items), max(longest, 1)), dtype=torch.long)
    response_mask = torch.zeros((len(items), max(longest, 1)), dtype=torch.float32)
    pixel_values, grids = [], []
    routed = _RoutingLayout(items, shape)
    count = 0
    for r, row in enumerate(rows):
        cursor = 0
        for unit in row:
            prompt, unit_pos = items[unit[0]].prompt, next(unit_positions)
            p = len(prompt.ids) - 1  # the shared prefix: the prompt without its last token
            span = slice(cursor, cursor + p)
            routed.prefix(r, span, unit)
            input_ids[r, span] = torch.tensor(prompt.ids[:-1])
            mm_types[r, span] = torch.tensor(prompt.mm_types[:-1])
            positions[:, r, span] = unit_pos[:, :p]
            unit_id[r, span] = count
            cursor += p
            for b, i in enumerate(unit):
                response = items[i].response_ids
                n = 1 + len(response)
                span = slice(cursor, cursor + n)
                input_ids[r, span] = torch.tensor(prompt.ids[-1:] + response)
                mm_types[r, cursor] = prompt.mm_types[-1]
                positions[:, r, span] = unit_pos[:, p:p + n]
                unit_id[r, span], branch_id[r, span] = count, b + 1
                loss_mask[r, cursor:cursor + len(response)] = 1.0  # position t scores token t + 1
                index_rows[i], index_cols[i, :len(response)] = r, torch.arange(cursor, cursor + len(response))
                response_mask[i, :len(response)] = 1.0
                routed.branch(r, cursor, i, p)
                cursor += n
            if prompt.pixel_values is not None:
                pixel_values.append(prompt.pixel_values)
                grids.append(prompt.grid)
            count += 1
    attention = (unit_id >= 0).long()
    mask = cu_seqlens = None
    if packing.masked:  # each token sees its unit's prefix and its own branch, causally
        mask = BlockMask.from_segments(unit_id, branch_id)
    extra = {"attention_mask": attention, "mm_token_type_ids": mm_types,
             "response_lengths": [len(item.response_ids) for item in items]}
    extra.update(routed.extra())
    if packing.thd:
        lengths = [unit_length(items, unit) for unit in units]
        cu_seqlens = thd_boundaries(lengths, width)
        extra["max_seqlen"] = max(lengths + [width - sum(lengths)])  # known here: no read-back in the forward
    if grids:  # the model checks the same on the device; here the counts can be named
        merge = hf_config.vision_config.spatial_merge_size
        features, placeholders = int(torch.cat(grids).prod(-1).sum()) // merge**2, int((mm_types == 1).sum())
        if features != placeholders:
            raise ValueError(f"{placeholders} image tokens in the batch but {features} image features")
    return ModelBatch(input_ids, positions, loss_mask, torch.cat(pixel_values) if pixel_values else None,
                      torch.cat(grids) if grids else None, attention_mask=mask, cu_seqlens=cu_seqlens,
                      response_index=(index_rows, index_cols), response_mask=response_mask, extra=extra)


class _RoutingLayout:
    """The engine's expert choices (``Encoded.routed_experts``) laid out like the tokens of a
    collated batch: ``routed_experts [B, S, layers, k]`` and ``routing_known [B, S]``. A shared
    prefix takes the unit's first routed member's prompt routing; a branch, its prompt's last
    token and its response tokens but the last (which the engine never fed)."""

    def __init__(self, items: list[Encoded], shape: tuple[int, int]):
        self.items = items
        sample = next((item.routed_experts for item in items if item.routed_experts is not None), None)
        self.experts = self.known = None
        if sample is not None:
            self.experts = torch.zeros((*shape, *sample.shape[1:]), dtype=sample.dtype)
            self.known = torch.zeros(shape, dtype=torch.bool)

    def prefix(self, row: int, span: slice, unit: list[int]) -> None:
        source = next((self.items[i].routed_experts for i in unit if self.items[i].routed_experts is not None), None)
        if self.experts is not None and source is not None:
            self.experts[row, span] = source[:span.stop - span.start]
            self.known[row, span] = True

    def branch(self, row: int, cursor: int, item: int, prefix_length: int) -> None:
        source = self.items[item].routed_experts
        if self.experts is not None and source is not None:
            fed = source[prefix_length:]  # the prompt's last token, then the response tokens fed
            self.experts[row, cursor:cursor + fed.shape[0]] = fed
            self.known[row, cursor:cursor + fed.shape[0]] = True

    def extra(self) -> dict:
        return {} if self.experts is None else {"routed_experts": self.experts, "routing_known": self.known}


def thd_boundaries(lengths: list[int], width: int) -> torch.Tensor:
    """``cu_seqlens`` (int32) of sequences of ``lengths`` back to back in a row of ``width``
    tokens; the row's padding, if any, is one more sequence. The boundaries then cover the
    whole row: megatron's THD rotary embedding splits the row by them, and reads each token's
    own MRoPE angle only when they end at the row's length (otherwise it re-counts 0, 1, 2,
    ... in each sequence)."""
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    if bounds[-1] < width:
        bounds.append(width)
    return torch.tensor(bounds, dtype=torch.int32)


def build_model_batch(processor, family, hf_config, items: list[ScoredSequence],
                      pad_to_multiple: int = 1, packing: Packing = Packing()) -> ModelBatch:
    """One batch straight from (prompt, images, response) triples."""
    return collate(family, hf_config, encode_all(PromptCache(processor), items), processor.tokenizer.pad_token_id,
                   pad_to_multiple, packing)


def plan_micro_batches(lengths: list[int], max_tokens: int, min_count: int = 1) -> list[list[int]]:
    """Indices grouped into micro-batches whose padded size (rows x longest) stays within
    ``max_tokens`` (a longer single sequence gets a micro-batch of its own). Sequences are
    taken longest first, so each micro-batch holds similar lengths. At least ``min_count``
    micro-batches are made (one per data-parallel rank) while sequences allow. The plan
    depends only on the lengths, so every layout makes the same one."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    for index in order:
        if plan and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= max_tokens:
            plan[-1].append(index)
        else:
            plan.append([index])
    while len(plan) < min(min_count, len(lengths)):
        largest = max(range(len(plan)), key=lambda k: (len(plan[k]), -k))
        group = plan.pop(largest)
        plan[largest:largest] = [group[:len(group) // 2], group[len(group) // 2:]]
    return plan


def layout_stats(items: list[Encoded], plan: list[list[int]], packing: Packing) -> dict:
    """Padding share of the micro-batches of ``plan`` as :func:`collate` lays them out, their
    real tokens, the rows, and the share of tokens that shared prompts saved against one sequence per row."""
    row_lengths: list[int] = []
    row_plan: list[list[int]] = []
    for group in plan:
        members = [items[i] for i in group]
        lengths = [sum(unit_length(members, unit) for unit in row) for row in rows_of(members, packing)]
        if packing.thd:  # collate lays the micro-batch out as one row
            lengths = [sum(lengths)]
        row_plan.append(list(range(len(row_lengths), len(row_lengths) + len(lengths))))
        row_lengths += lengths
    real = sum(row_lengths)
    unpacked = sum(items[i].length for group in plan for i in group)
    return {"batch/padding_share": padding_share(row_lengths, row_plan), "batch/tokens": float(real),
            "batch/rows": float(len(row_lengths)),
            "batch/shared_prompt_savings": 1.0 - real / unpacked if unpacked else 0.0}


def padding_share(lengths: list[int], plan: list[list[int]]) -> float:
    """Share of the padded micro-batch tokens that are padding."""
    padded = sum(len(group) * max(lengths[i] for i in group) for group in plan)
    return 1.0 - sum(lengths) / padded if padded else 0.0


def response_values(tensor: torch.Tensor, batch: ModelBatch) -> list[torch.Tensor]:
    """Per response, the values of ``tensor [B, S]`` at the positions that score its tokens."""
    rows, cols = batch.response_index
    return [tensor[rows[i, :n], cols[i, :n]] for i, n in enumerate(batch.extra["response_lengths"])]


def pad_responses(values: list, width: int) -> torch.Tensor:
    """Per-response vectors into the right-padded ``[N, width]`` response layout."""
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for row, vector in enumerate(values):
        vector = torch.as_tensor(vector, dtype=torch.float32)
        out[row, :vector.numel()] = vector
    return out
