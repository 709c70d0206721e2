"""Per-layer conversion of one MHA/GQA attention layer into GHLA (grouped-head latent attention), in float64.

Keys: the source KV heads are split into `num_key_heads` contiguous blocks; each block's heads are merged into
one fully rotary key of width `head_dim` by the shared-RoPE selection of `rope.py` (per frequency, an orthogonal
mix of the block's heads that commutes with the rotation; the strongest components are kept, the rest dropped).
A block with one source head and a full-width key keeps the source key exactly.

Maps: the query heads of a block are partitioned into maps of H / num_maps heads, heads whose attention maps
agree most on a calibration sample together (query-weight similarity without one). When a map fits inside the
heads of one source KV head, maps never straddle KV heads. A map's query is either the least-squares shared
query (the members' mean: it minimises the summed squared score error) or its most central member; `auto`
measures both on the sample and keeps the one whose map agrees better with the members' source maps. `fit`
instead fits a per-frequency complex combination of the members' queries to their maps (cross-entropy).

Values: one latent by PCA of all KV heads' values (under the calibration input moment and the optional
output weighting of the init method); each output head decodes it by the least-squares map back to its source
value, minus the model's fixed residual. The gate starts closed-form neutral: zero weight, bias `GATE_BIAS`,
and the constant sigmoid(GATE_BIAS) is divided out of W_o so that the initial model is exactly the linear one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gtakit.errors import GtakitError
from gtakit.families.base import SourceAttention, SourceShape
from gtakit.models.attention_gtakit import apply_rope, rotate_half

from .base import ConvertedLayer, FormConverter, TensorNames, as_width, check_rope_dim, divisors, scaled_widths
from .linalg import LayerMetric, fold_value_bias, moment, sqrt_psd, top_basis
from .rope import select_shared_rope

GATE_BIAS = 6.0  # sigmoid(6) = 0.9975: the gate passes (nearly) everything and still has gradient to train
QUERY_CHOICES = ("auto", "mean", "central", "fit")
FIT_STEPS = 60  # Adam steps of the fitted shared query; float32 (the fit needs no float64 precision)


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of `x` [n, L, w] at positions 0..L-1 with frequencies `freqs` [w/2]."""
    positions = torch.arange(x.shape[1], dtype=torch.float64)
    angles = positions[:, None] * freqs.double()[None, :]
    return apply_rope(x, torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1))


def attention_probs(
    x: torch.Tensor, q_rows: torch.Tensor, q_bias, k_rows: torch.Tensor, k_bias, freqs: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention probabilities `[n, L, L]` of n query heads `q_rows` [n, w, D] against the keys `k_rows`
    [n, w, D] (one per query head), on the sample `x` [L, D] at positions 0..L-1."""
    q = torch.einsum("ld,nwd->nlw", x, q_rows)
    k = torch.einsum("ld,nwd->nlw", x, k_rows)
    if q_bias is not None:
        q = q + q_bias[:, None, :]
    if k_bias is not None:
        k = k + k_bias[:, None, :]
    scores = (_rope(q, freqs) @ _rope(k, freqs).transpose(-1, -2)) * scale
    length = x.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def map_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of sum_t min(a, b): 1 for identical attention maps, 0 for disjoint ones."""
    return torch.minimum(a, b).sum(dim=-1).mean(dim=-1)


def partition_heads(heads: list[int], similarity: torch.Tensor, size: int) -> list[list[int]]:
    """Split `heads` into groups of `size`, greedily: the head least like the others starts a group, which then
    takes the remaining head most similar to its members on average, until full. `similarity` is indexed by
    position in `heads`."""
    remaining = list(range(len(heads)))
    groups = []
    while remaining:
        sub = similarity[remaining][:, remaining]
        seed = remaining[int(torch.argmin(sub.sum(dim=1)))]
        members = [seed]
        remaining.remove(seed)
        while len(members) < size:
            scores = similarity[remaining][:, members].mean(dim=1)
            pick = remaining[int(torch.argmax(scores))]
            members.append(pick)
            remaining.remove(pick)
        groups.append(sorted(heads[i] for i in members))
    return groups


def _block_attention(src: SourceAttention, kv_heads: list[int]) -> tuple[SourceAttention, list[int]]:
    """The part of `src` made of the KV heads `kv_heads` and the query heads that read them."""
    groups = src.group_of_head
    q_heads = [h for h in range(src.num_heads) if groups[h] in kv_heads]
    q_idx = torch.cat([torch.arange(src.q_rows(h).start, src.q_rows(h).stop) for h in q_heads])
    kv_idx = torch.cat([torch.arange(src.kv_rows(g).start, src.kv_rows(g).stop) for g in kv_heads])
    sub = SourceAttention(
        wq=src.wq[q_idx],
        wk=src.wk[kv_idx],
        wv=src.wv[kv_idx],
        wo=src.wo[:, q_idx],
        bq=src.bq[q_idx] if src.bq is not None else None,
        bk=src.bk[kv_idx] if src.bk is not None else None,
        bv=src.bv[kv_idx] if src.bv is not None else None,
        bo=src.bo,
        num_heads=len(q_heads),
        num_kv_heads=len(kv_heads),
        head_dim=src.head_dim,
        inv_freq=src.inv_freq,
    )
    return sub, q_heads


def _source_probs(src: SourceAttention, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Source attention maps of every query head on the sample: `[H, L, L]`."""
    H, d = src.num_heads, src.head_dim
    groups = src.group_of_head
    q_rows = src.wq.view(H, d, -1)
    k_rows = src.wk.view(src.num_kv_heads, d, -1)[groups]
    q_bias = src.bq.view(H, d) if src.bq is not None else None
    k_bias = src.bk.view(src.num_kv_heads, d)[groups] if src.bk is not None else None
    return attention_probs(x, q_rows, q_bias, k_rows, k_bias, src.inv_freq, scale)


def _pairwise_overlap(probs: torch.Tensor) -> torch.Tensor:
    n = probs.shape[0]
    sim = torch.ones(n, n, dtype=probs.dtype)
    for a in range(n):
        for b in range(a + 1, n):
            sim[a, b] = sim[b, a] = map_overlap(probs[a], probs[b])
    return sim


def _weight_similarity(rows: list[torch.Tensor], cov: torch.Tensor | None) -> torch.Tensor:
    """Cosine similarity of query rows that read the same key (under the input moment when known)."""
    n = len(rows)
    sim = torch.ones(n, n, dtype=rows[0].dtype)
    norms = [float(torch.trace(moment(r, cov))) ** 0.5 for r in rows]
    for a in range(n):
        for b in range(a + 1, n):
            inner = torch.trace(rows[a] @ rows[b].T if cov is None else rows[a] @ cov @ rows[b].T)
            sim[a, b] = sim[b, a] = float(inner) / max(norms[a] * norms[b], 1e-300)
    return sim


def _group_similarity(maps: list[list[int]], similarity: torch.Tensor, position: dict[int, int]) -> float:
    """Mean pairwise similarity of heads that share a map."""
    values = [float(similarity[position[a], position[b]]) for m in maps for i, a in enumerate(m) for b in m[i + 1 :]]
    return sum(values) / len(values) if values else 1.0


def _agreement(x, candidate, key, key_bias, freqs, scale, targets) -> float:
    """Mean map overlap between the map of the shared query `candidate` (rows, bias) and the members' maps."""
    rows, bias = candidate
    probs = attention_probs(
        x, rows[None], bias[None] if bias is not None else None, key[None],
        key_bias[None] if key_bias is not None else None, freqs, scale,
    )[0]
    return float(torch.stack([map_overlap(probs, target) for target in targets]).mean())


def _rotate_half_rows(rows: torch.Tensor) -> torch.Tensor:
    """rotate_half of the rows' output coordinates (dimension 0)."""
    return rotate_half(rows.transpose(0, -1)).transpose(0, -1)


def _fit_shared_query(
    x, member_rows, member_biases, start_index, key, key_bias, freqs, scale, targets
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared query as a per-frequency complex combination of the members' queries, sum_h (a_h + i b_h) q_h,
    fitted by cross-entropy to the members' maps on the sample. A complex factor per RoPE pair commutes with the
    rotation, so the result is again a plain query; it contains the mean (a = 1/n) and every single member, and
    starts from the better of mean and central (`start_index`)."""
    n, width = len(member_rows), member_rows[0].shape[0]
    half = width // 2
    q = torch.einsum("ld,nwd->nlw", x, torch.stack(member_rows))
    if member_biases is not None:
        q = q + torch.stack(member_biases)[:, None, :]
    k = x @ key.T + (key_bias if key_bias is not None else 0.0)
    q, k = _rope(q, freqs).float(), _rope(k[None], freqs)[0].float()
    targets = targets.float()
    q_turned = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    real = torch.full((n, half), 1.0 / n)
    if start_index is not None:
        real = torch.zeros(n, half)
        real[start_index] = 1.0
    real.requires_grad_(True)
    imag = torch.zeros(n, half, requires_grad=True)
    # Fit on the later half of the query rows (longer contexts, half the cost); agreement is measured on all.
    length = x.shape[0]
    rows_from = length // 2
    q, q_turned, targets = q[:, rows_from:], q_turned[:, rows_from:], targets[:, rows_from:]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[rows_from:]
    optimizer = torch.optim.Adam([real, imag], lr=0.02)
    with torch.enable_grad():
        for _ in range(FIT_STEPS):
            a, b = real.repeat(1, 2)[:, None, :], imag.repeat(1, 2)[:, None, :]
            shared = (a * q + b * q_turned).sum(dim=0)
            logits = (shared @ k.T * scale).masked_fill(~causal, float("-inf"))
            log_probs = torch.log_softmax(logits, dim=-1).masked_fill(~causal, 0.0)
            loss = -(targets * log_probs).sum(dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    real, imag = real.detach().double().repeat(1, 2), imag.detach().double().repeat(1, 2)
    rows = sum(real[h][:, None] * r + imag[h][:, None] * _rotate_half_rows(r) for h, r in enumerate(member_rows))
    bias = None
    if member_biases is not None:
        bias = sum(real[h] * b + imag[h] * _rotate_half_rows(b) for h, b in enumerate(member_biases))
    return rows, bias


@dataclass
class SharedQueries:
    """What choosing each map's shared query produced, map after map: the query rows and biases, the source head
    behind each output slot, and the measured agreements (with a calibration sample)."""

    query_choice: str
    rows: list[torch.Tensor] = field(default_factory=list)
    biases: list[torch.Tensor | None] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # output slot -> source query head
    agreements: list[float] = field(default_factory=list)
    member_agreements: list[float] = field(default_factory=list)
    candidate_agreements: dict[str, list[float]] = field(
        default_factory=lambda: {"mean": [], "central": [], "fit": []})
    chosen: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("mean", "central", "fit"), 0))

    def add(self, members: list[int], candidates: dict, scores: dict[str, float], similarity: torch.Tensor) -> None:
        """Record one map: the candidate `query_choice` picks (auto: the best measured; mean without data)."""
        if self.query_choice == "fit" and "fit" not in candidates:
            choice = "mean"  # one head per map (nothing to fit) or no calibration sample
        elif self.query_choice != "auto":
            choice = self.query_choice
        elif scores:
            choice = max(scores, key=scores.get)
        else:
            choice = "mean"  # least squares in score space is the safer default without data
        self.chosen[choice] += 1
        if scores:
            self.agreements.append(scores[choice])
            for name, value in scores.items():
                self.candidate_agreements[name].append(value)
            pairs = [float(similarity[a, b]) for a in range(len(members)) for b in range(a + 1, len(members))]
            self.member_agreements.append(sum(pairs) / len(pairs) if pairs else 1.0)
        self.rows.append(candidates[choice][0])
        self.biases.append(candidates[choice][1])
        self.order += members

    def metrics(self, num_maps: int) -> dict[str, float]:
        metrics = {f"{name}_query_share": count / num_maps for name, count in self.chosen.items()}
        if self.agreements:
            metrics["map_agreement"] = sum(self.agreements) / len(self.agreements)
            metrics["member_agreement"] = sum(self.member_agreements) / len(self.member_agreements)
            # Both shared-query candidates, measured, so reports show which one wins where.
            for name, values in self.candidate_agreements.items():
                if values:
                    metrics[f"map_agreement_{name}_query"] = sum(values) / len(values)
        return metrics


def group_maps(src: SourceAttention, q_heads: list[int], kv_heads: list[int], similarity: torch.Tensor,
               per_map: int) -> list[list[int]]:
    """The query heads of one key block partitioned into maps of `per_map` similar heads. Maps stay inside one
    source KV head (those heads were trained against the same key) unless the block merges several KV heads into
    one key and a free grouping agrees better."""
    position = {h: i for i, h in enumerate(q_heads)}
    maps = partition_heads(q_heads, similarity, per_map)
    if (src.num_heads // src.num_kv_heads) % per_map:
        return maps
    within = []
    for g in kv_heads:
        part = [h for h in q_heads if src.group_of_head[h] == g]
        index = torch.tensor([position[h] for h in part])
        within += partition_heads(part, similarity[index][:, index], per_map)
    if len(kv_heads) == 1 or _group_similarity(within, similarity, position) >= _group_similarity(
            maps, similarity, position):
        return within
    return maps


def map_candidates(members: list[int], rows: dict, biases: dict | None, central: int, query_choice: str,
                   x: torch.Tensor | None, targets: torch.Tensor | None, rope, scale: float) -> tuple[dict, dict]:
    """The shared-query candidates of one map (mean, central head, and with `fit` the fitted one) and, with a
    calibration sample `x`, each one's measured agreement with the members' source attention maps `targets`."""
    candidates = {
        "mean": (torch.stack([rows[h] for h in members]).mean(dim=0),
                 torch.stack([biases[h] for h in members]).mean(dim=0) if biases else None),
        "central": (rows[central], biases[central] if biases else None),
    }
    if x is None:
        return candidates, {}
    key, key_b = rope.key_rows, rope.key_bias
    measure = lambda cand: _agreement(x, cand, key, key_b, rope.freqs, scale, targets)  # noqa: E731
    scores = {name: measure(cand) for name, cand in candidates.items()}
    # Measured on SmolLM2 the fit raises map agreement by < 0.01 and leaves perplexity unchanged, at minutes of
    # CPU: only on request, not part of auto.
    if query_choice == "fit" and len(members) > 1:
        best = max(scores, key=scores.get)
        candidates["fit"] = _fit_shared_query(
            x, [rows[h] for h in members], [biases[h] for h in members] if biases else None,
            members.index(central) if best == "central" else None, key, key_b, rope.freqs, scale, targets)
        scores["fit"] = measure(candidates["fit"])
    return candidates, scores


def latent_value(src: SourceAttention, metric: LayerMetric, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        float]:
    """The latent value: PCA of all KV heads' values (output-weighted when the method gives weights). Returns
    the down-projection [c, D], the least-squares decoders of each KV head's values [G d, c] and the relative
    value error."""
    cov, values, vw = metric.input_cov, src.wv, metric.value_out_weight  # values [G d, D]
    weight = torch.block_diag(*[sqrt_psd(vw[g]) for g in range(src.num_kv_heads)]) if vw else None
    weighted = values if weight is None else weight @ values
    basis = top_basis(moment(weighted, cov), latent_dim)  # [G d, c]
    down = basis.T @ weighted  # [c, D]
    cross = values @ down.T if cov is None else values @ cov @ down.T
    decoders = cross @ torch.linalg.pinv(moment(down, cov), hermitian=True)
    resid = decoders @ down - values
    value_err = float(torch.trace(moment(resid, cov)).clamp(min=0) / torch.trace(moment(values, cov))) ** 0.5
    return down, decoders, value_err


def convert_ghla_layer(src: SourceAttention, spec: dict, metric: LayerMetric, names: TensorNames,
                       sample: torch.Tensor | None = None, query_choice: str = "auto") -> ConvertedLayer:
    """GHLA weights of one layer of `spec`; the output heads are reordered so that the members of a map are
    adjacent.

    `sample` [L, D] is a calibration sequence's normalised layer input: with it heads are grouped by measured
    attention-map agreement and the reported agreement is measured; without it grouping uses query weights.
    """
    if query_choice not in QUERY_CHOICES:
        raise ValueError(f"query_choice must be one of {QUERY_CHOICES}, got {query_choice!r}")
    H, G, d = src.num_heads, src.num_kv_heads, src.head_dim
    num_maps, num_key_heads, key_dim = spec["num_maps"], spec["num_key_heads"], spec["head_dim"]
    scale = spec.get("softmax_scale") or d**-0.5
    per_map, kv_per_block = H // num_maps, G // num_key_heads
    x = sample.double() if sample is not None else None
    source_probs = _source_probs(src, x, scale) if x is not None else None
    queries = SharedQueries(query_choice)
    keys, key_biases, key_kept, rope_index = [], [], [], []
    for block in range(num_key_heads):
        kv_heads = list(range(block * kv_per_block, (block + 1) * kv_per_block))
        sub, q_heads = _block_attention(src, kv_heads)
        # Every dropped component is lost outright (GHLA keys have no position-free part): rank by plain
        # score energy, not by what a mean rotation could stand in for.
        rope = select_shared_rope(sub, key_dim // 2, metric.input_cov, None, None, input_mean=metric.input_mean)
        rows = {h: rope.query_rows[i] for i, h in enumerate(q_heads)}
        biases = {h: rope.query_bias[i] for i, h in enumerate(q_heads)} if rope.query_bias is not None else None
        if source_probs is not None and per_map > 1:
            similarity = _pairwise_overlap(source_probs[q_heads])
        else:
            similarity = _weight_similarity([rows[h] for h in q_heads], metric.input_cov)
        position = {h: i for i, h in enumerate(q_heads)}
        for members in group_maps(src, q_heads, kv_heads, similarity, per_map):
            index = torch.tensor([position[h] for h in members])
            sim = similarity[index][:, index]
            central = members[int(torch.argmax(sim.sum(dim=1)))]
            targets = source_probs[members] if source_probs is not None else None
            candidates, scores = map_candidates(members, rows, biases, central, query_choice, x, targets, rope,
                                                scale)
            queries.add(members, candidates, scores, sim)
        keys.append(rope.key_rows)
        key_biases.append(rope.key_bias)
        key_kept.append(rope.score_energy_kept)
        rope_index += rope.index
    down, decoders, value_err = latent_value(src, metric, spec["latent_dim"])
    tensors = ghla_tensors(src, names, queries, keys, key_biases, down, decoders)
    metrics = {"value_rel_error": value_err, "key_score_kept": min(key_kept), **queries.metrics(num_maps)}
    return ConvertedLayer(tensors, metrics, {"rope_index": rope_index})


def ghla_tensors(src: SourceAttention, names: TensorNames, queries: SharedQueries, keys: list[torch.Tensor],
                 key_biases: list[torch.Tensor | None], down: torch.Tensor, decoders: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """The module's tensors: the output heads in map order, the gate open at its initial bias (o_proj divided by
    it), each head's decoder less the residual the model adds itself (a_m[:v], zero-padded)."""
    H, d, latent_dim = src.num_heads, src.head_dim, down.shape[0]
    residual = torch.eye(d, latent_dim, dtype=decoders.dtype)
    gate = torch.sigmoid(torch.tensor(GATE_BIAS, dtype=torch.float64))
    tensors = {
        names.q_proj.weight: torch.cat(queries.rows),
        names.k_proj.weight: torch.cat(keys),
        names.latent_proj.weight: down,
        names.value_decoder.weight: torch.cat([decoders[src.kv_rows(src.group_of_head[h])] - residual
                                               for h in queries.order]),
        names.gate_proj.weight: src.wq.new_zeros(H * d, src.wq.shape[1]),
        names.gate_proj.bias: src.wq.new_full((H * d,), GATE_BIAS),
        names.o_proj.weight: torch.cat([src.wo[:, src.q_rows(h)] / gate for h in queries.order], dim=1),
    }
    if src.bq is not None or src.bk is not None:
        zeros = src.wq.new_zeros(keys[0].shape[0])
        tensors[names.q_proj.bias] = torch.cat([b if b is not None else zeros for b in queries.biases])
        tensors[names.k_proj.bias] = torch.cat([b if b is not None else zeros for b in key_biases])
        tensors[names.latent_proj.bias] = src.wq.new_zeros(latent_dim)
    o_bias = fold_value_bias(src)
    if o_bias is not None:
        tensors[names.o_proj.bias] = o_bias
    return tensors


class GHLAConverter(FormConverter):
    name = "ghla"
    title = "GHLA (grouped-head latent attention: shared attention maps, one latent value)"
    options = ("maps", "key_heads", "latent_dim", "ghla_query")
    report_fields = ("num_maps", "num_key_heads", "head_dim", "latent_dim", "v_head_dim")

    def plan(self, shape: SourceShape, options: Any) -> dict:
        """`--maps` maps sharing `--key-heads` fully rotary keys of width `--rope-dim`, one latent value."""
        H, G, d, D = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size
        # One map per head by default: zero-shot, shared maps cost far more than the budget does (SmolLM2 at 50%:
        # 78x the source perplexity with 3 maps, 2.3x with 9, same cache; benchmarks/RESULTS.md).
        maps = options.maps if options.maps is not None else H
        if maps < 1 or H % maps:
            raise GtakitError(f"--maps {maps} must divide the {H} query heads; valid: {divisors(H)}")
        key_heads = options.key_heads if options.key_heads is not None else 1
        valid_keys = [k for k in divisors(G) if maps % k == 0]
        if key_heads not in valid_keys:
            raise GtakitError(f"--key-heads {key_heads} must divide both the {G} source KV heads and --maps {maps}; "
                              f"valid: {valid_keys}")
        max_key = (G // key_heads) * d
        rope_dim = as_width(options.rope_dim, "rope-dim")
        rope_dim = d if rope_dim is None else max_key if rope_dim == "full" else rope_dim
        check_rope_dim(rope_dim, max_key)
        full_latent = min(G * d, D)
        latent = as_width(options.latent_dim, "latent-dim")
        if latent is None:
            # Half the source cache in total (their 1B model: 64 key + 128 latent), at least one head dim.
            latent = min(full_latent, max(d, shape.cache_elements // 2 - key_heads * rope_dim))
        elif latent == "full":
            latent = full_latent
        if not 1 <= latent <= full_latent:
            raise GtakitError(f"--latent-dim {latent} is out of range: it must be between 1 and {full_latent}")
        if options.ghla_query not in QUERY_CHOICES:
            raise GtakitError(f"--ghla-query must be auto, mean, central or fit; got {options.ghla_query!r}")
        return self.make_spec(shape, num_maps=maps, num_key_heads=key_heads, head_dim=rope_dim, latent_dim=latent,
                              v_head_dim=d)

    def width_candidates(self, shape: SourceShape, spec: dict) -> list[dict[str, Any]]:
        return [{"latent_dim": width} for width in scaled_widths(spec["latent_dim"])]

    def convert_layer(self, attn: SourceAttention, spec: dict, metric: LayerMetric, stats: Any,
                      options: Any, names: TensorNames) -> ConvertedLayer:
        sample = getattr(stats, "attention_sample", None)
        return convert_ghla_layer(attn, spec, metric, names, sample, options.ghla_query)
