"""The token side of an attention call: how many projection rows each key stands for, and which
projections fill the same sequence positions (the streams of a joint attention).

Example:
    >>> from dynconvert.analysis import analyze
    >>> from dynconvert.testing import mmdit
    >>> model, inputs = mmdit()
    >>> site = analyze(model, inputs).attention[0]
    >>> 1 + len(site.streams), site.tokens_q + site.streams[0].tokens_q  # text + image tokens
    (2, 22)
"""

from __future__ import annotations

import math
from fractions import Fraction

from dynconvert.analysis.headlocal import InputLayout, Source
from dynconvert.analysis.headout import OutTarget
from dynconvert.analysis.layout import ChainError
from dynconvert.plan import AttentionStream


def kv_stride(layout: InputLayout, batch: int) -> int:
    """Projection tokens per attention key: 1, or the factor by which keys and values are
    downsampled between their projections and the attention (key/value compression), read as
    the rows a Linear computes per position it fills and per row of the attention's ``batch``
    (so an axis folded into the batch, or a sequence-first layout, counts as it should).

    Queries must reach the attention one projection row per query, and keys and values a
    whole number of rows per key: anything else (queries resampled, a context repeated to
    every frame) would be miscounted, and is refused."""

    def ratio(s: Source) -> Fraction:
        return Fraction(math.prod(s.node.shape[:-1]), len(s.tokens) * batch)

    q = {ratio(s) for s in layout.sources["q"]}
    if q != {1}:
        raise ChainError(
            f"the queries are resampled between their projection and the attention ({min(q)} "
            "projection rows per query): their cost could not be counted"
        )
    found = {ratio(s) for role in "kv" for s in layout.sources[role]}
    if len(found) != 1:
        raise ChainError("keys and values are resampled by different factors before the attention")
    stride = found.pop()
    if stride.denominator != 1:
        raise ChainError(
            "keys and values are repeated or broadcast between their projections and the "
            "attention "
            f"({stride} projection rows per key): their cost could not be counted"
        )
    return int(stride)


def group_streams(
    layout: InputLayout, targets: list[OutTarget], stride: int = 1
) -> list[AttentionStream]:
    """Group the projections into streams: those filling the same sequence positions
    (``stride``: projection tokens per attention key, see :func:`kv_stride`).

    Self-attention has one stream (q, k and v fill every position); cross-attention one stream
    whose k and v fill the context's positions; joint attention one stream per projection set,
    and a stream of keys and values only for a context that is attended to but has no queries.
    """
    qs, ks, vs = layout.sources["q"], layout.sources["k"], layout.sources["v"]
    if len(qs) == 1 and len(ks) == 1 and len(vs) == 1 and len(targets) == 1:
        pairs = [(qs[0], ks[0], vs[0], targets[0])]
    else:
        pairs = []
        used_k, used_v, used_o = set(), set(), set()

        def partner(q: Source, found: list[Source], used: set[int]) -> Source | None:
            # The projection reading the same input tensor (PRX's image queries attend over
            # text keys, then the image's own keys), else the one filling the same positions.
            free = [s for s in found if id(s) not in used]
            return next((s for s in free if s.node.args[0] is q.node.args[0]), None) or next(
                (s for s in free if s.tokens == q.tokens), None
            )

        for q in qs:
            k, v = partner(q, ks, used_k), partner(q, vs, used_v)
            o = next((t for t in targets if t.tokens == q.tokens and id(t) not in used_o), None)
            if k is None or v is None:
                raise ChainError("joint attention streams whose q, k and v fill different tokens")
            used_k.add(id(k))
            used_v.add(id(v))
            if o is not None:
                used_o.add(id(o))
            pairs.append((q, k, v, o))
        # Keys and values of a stream with no queries (a context attended to, not attending).
        for k in [s for s in ks if id(s) not in used_k]:
            v = next((s for s in vs if id(s) not in used_v and s.tokens == k.tokens), None)
            if v is None:
                raise ChainError("extra key tokens with no values of their own")
            used_k.add(id(k))
            used_v.add(id(v))
            pairs.append((None, k, v, None))
        if len(used_v) != len(vs):
            raise ChainError("extra value tokens with no keys of their own")
        if len(used_o) != len(targets):
            raise ChainError("an out-projection reads tokens of several streams")
    out = []
    for q, k, v, o in pairs:
        out.append(
            AttentionStream(
                q=q.node.linear if q is not None else "",
                k=k.node.linear,
                v=v.node.linear,
                out=o.node.linear if o is not None else "",
                q_in=q.node.args[0].shape[-1] if q is not None else 0,
                kv_in=k.node.args[0].shape[-1],
                out_features=o.node.shape[-1] if o is not None else 0,
                tokens_q=len(q.tokens) if q is not None else 0,
                tokens_kv=len(k.tokens) * stride,
                v_in=v.node.args[0].shape[-1]
                if v.node.args[0].shape[-1] != k.node.args[0].shape[-1]
                else 0,
            )
        )
    if not any(s.out for s in out):
        raise ChainError("no stream of the joint attention has an out-projection")
    return out
