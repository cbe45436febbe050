"""The Speculative Streaming training loss (eq. 5) and per-stream metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Soft = tuple[torch.Tensor, torch.Tensor]  # top-K target ids (..., K) and their probabilities


def masked_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    soft: Soft | None = None,
    vocab: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Mean CE over mask==1 positions, their count and the number of top-1 hits.

    logits (..., V) (or (..., D) LM-head inputs when `head` is given), targets/mask (...).
    With `soft` ((..., K) ids, (..., K) probabilities) the CE is against that distribution,
    renormalised over its K tokens (HASS's top-K distillation); hits still count `targets`.
    With `vocab` ((V,) each token's index in a draft vocabulary, -1 outside) the logits are over
    that vocabulary: a target outside it counts as a miss and drops out of the mean (nothing
    there to learn), as do soft targets' tokens outside it. An empty mask (or no target left)
    gives a zero loss that still has a graph.
    """
    sel = mask.bool()
    n = int(sel.sum())
    if n == 0:
        return logits.sum() * 0.0, 0, 0
    # Select rows first: no logits (and no gradient buffers) for prompt and padding rows.
    rows = logits[sel]
    lg = (rows if head is None else head(rows)).float()  # (n, V or V_d)
    tg = targets[sel] if vocab is None else vocab[targets[sel]]  # (n,)
    if soft is None:
        keep = tg >= 0
        loss = F.cross_entropy(lg[keep], tg[keep]) if bool(keep.any()) else lg.sum() * 0.0
    else:
        ids, p = soft[0][sel].long(), soft[1][sel].float()  # (n, K)
        if vocab is not None:
            ids = vocab[ids]
            p = p * (ids >= 0)
            ids = ids.clamp_min(0)
        mass = p.sum(-1, keepdim=True)  # (n, 1)
        keep = mass[:, 0] > 0
        p = p / mass.clamp_min(1e-12)
        ce = -(p * lg.log_softmax(-1).gather(-1, ids)).sum(-1)  # (n,)
        loss = ce[keep].mean() if bool(keep.any()) else lg.sum() * 0.0
    correct = int((lg.argmax(-1) == tg).sum())
    return loss, n, correct


def ss_loss(
    main_logits: torch.Tensor | None,
    stream_logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    alpha0: float = 1.0,
    alpha_streams: float | Sequence[float] = 0.1,
    exit_logits: torch.Tensor | None = None,
    exit_weight: float = 0.1,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    anchors: torch.Tensor | None = None,
    soft: Soft | None = None,
    stream_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stream_vocab: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """eq. 5: alpha0 * CE(main_i -> x_{i+1}) + sum_j alpha_j * CE(stream_{i,j} -> x_{i+1+j}).

    main_logits (B,L,V) or None (term skipped, e.g. a frozen base whose stats come from a cache);
    stream_logits (B,L,G,V); input_ids, loss_mask (B,L), loss_mask 1 on response tokens. With
    `head` (e.g. `model.lm_head`) the three "logits" are LM-head inputs (last dim D) and only
    scored rows go through the head. Each term is a mean over the positions whose target is a
    response token. Metrics per term:
    `{name}_loss`, `{name}_acc`, `{name}_n` (count) and `{name}_correct`, with name in main,
    stream1..streamG, exit; plus `loss`.
    anchors (B,P): the positions the stream (and exit) rows belong to, when the model computed
    the streams of a sample of positions only (`StreamingLM.forward(anchors=...)`).
    soft: (B,L,K) ids and probabilities, position i a distribution over token i (aligned like
    input_ids): the stream terms' targets instead of the ids (the main and exit terms keep ids).
    stream_head, stream_vocab: the stream terms' head (default `head`) and, when it covers a
    draft vocabulary, each token's index in it (`masked_ce`'s `vocab`).
    """
    L, G = input_ids.shape[1], stream_logits.shape[2]
    weights = (
        [alpha_streams] * G if isinstance(alpha_streams, (int, float)) else list(alpha_streams)
    )
    if len(weights) != G:
        raise ValueError(f"alpha_streams has {len(weights)} weights for {G} streams")
    metrics: dict[str, float] = {}
    total = stream_logits.sum() * 0.0

    def add(
        name: str, weight: float, logits: torch.Tensor, shift: int, anchored: bool, sf: Soft | None,
        hd: Callable[[torch.Tensor], torch.Tensor] | None = head, vocab: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        # Position i predicts token i + shift; positions without a target drop out.
        nonlocal total
        if anchored and anchors is not None:
            at = anchors + shift  # (B, P)
            inside = at < L
            at = at.clamp(max=L - 1)
            tg, mk = input_ids.gather(1, at), loss_mask.gather(1, at) * inside
            if sf is not None:
                ix = at[..., None].expand(-1, -1, sf[0].shape[-1])  # (B, P, K)
                sf = (sf[0].gather(1, ix), sf[1].gather(1, ix))
            loss, n, correct = masked_ce(logits, tg, mk, hd, sf, vocab)
        else:
            if sf is not None:
                sf = (sf[0][:, shift:], sf[1][:, shift:])
            loss, n, correct = masked_ce(
                logits[:, : L - shift], input_ids[:, shift:], loss_mask[:, shift:], hd, sf, vocab
            )
        total = total + weight * loss
        metrics.update(term_metrics(name, float(loss.detach()), n, correct))

    if main_logits is not None:
        add("main", alpha0, main_logits, 1, False, None)
    for j in range(1, G + 1):
        if j + 1 < L:
            add(f"stream{j}", weights[j - 1], stream_logits[:, :, j - 1], j + 1, True, soft,
                stream_head or head, stream_vocab)  # fmt: skip
        else:
            metrics.update(term_metrics(f"stream{j}", 0.0, 0, 0))
    if exit_logits is not None:
        add("exit", exit_weight, exit_logits, 1, True, None)
    metrics["loss"] = float(total.detach())
    return total, metrics


def sample_anchors(
    loss_mask: torch.Tensor, per_row: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, per_row) positions drawn without replacement, uniformly from those whose first
    stream target (i + 2) is scored; a row with fewer fills up with L - 1, which has no
    stream target and so drops out of the loss. loss_mask (B, L)."""
    B, L = loss_mask.shape
    ok = torch.zeros(B, L, dtype=torch.bool)
    ok[:, : L - 2] = loss_mask[:, 2:].bool().cpu()
    keys = torch.rand(B, L, generator=generator).masked_fill(~ok, 2.0)  # invalid sort last
    order = keys.argsort(dim=1)[:, :per_row]  # (B, P)
    taken = torch.gather(ok, 1, order)
    out = torch.where(taken, order, torch.full_like(order, L - 1))
    if out.shape[1] < per_row:
        pad = torch.full((B, per_row - out.shape[1]), L - 1, dtype=out.dtype)
        out = torch.cat([out, pad], dim=1)
    return out.sort(dim=1).values.to(loss_mask.device)


def term_metrics(name: str, loss: float, n: int, correct: int) -> dict[str, float]:
    return {
        f"{name}_loss": loss,
        f"{name}_acc": correct / n if n else 0.0,
        f"{name}_n": float(n),
        f"{name}_correct": float(correct),
    }


def aggregate_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Turn summed `{name}_loss_sum`, `{name}_n`, `{name}_correct` into per-term loss/acc."""
    names = sorted({k[: -len("_n")] for k in sums if k.endswith("_n")}, key=_order)
    out: dict[str, float] = {}
    for name in names:
        n = sums[f"{name}_n"]
        out[f"{name}_loss"] = sums.get(f"{name}_loss_sum", 0.0) / n if n else float("nan")
        out[f"{name}_acc"] = sums.get(f"{name}_correct", 0.0) / n if n else float("nan")
        out[f"{name}_n"] = n
    return out


def accumulate(sums: dict[str, float], metrics: dict[str, float]) -> None:
    """Add one batch's metrics to running sums (loss weighted by count) for aggregate_metrics."""
    for key, value in metrics.items():
        if key.endswith("_n"):
            name = key[: -len("_n")]
            sums[key] = sums.get(key, 0.0) + value
            sums[f"{name}_correct"] = sums.get(f"{name}_correct", 0.0) + metrics[f"{name}_correct"]
            sums[f"{name}_loss_sum"] = (
                sums.get(f"{name}_loss_sum", 0.0) + metrics[f"{name}_loss"] * value
            )


def _order(name: str) -> tuple[int, int]:
    if name == "main":
        return (0, 0)
    if name.startswith("stream"):
        return (1, int(name[len("stream") :]))
    return (2, 0)


TREE_WIDTH = 4  # ranks 0..3 of each stream are tree candidates; a rank >= 4 is a miss
TREE_DEPTH = 4  # streams the tree metric looks at (deeper trees are rare at these accuracies)
TREE_BUDGETS = (4, 8, 16, 32)  # draft nodes of the trees scored in eval


def empty_rank_hist(num_streams: int) -> torch.Tensor:
    """Zero counts of `chain_acceptance`'s joint-rank histogram for this many streams."""
    return torch.zeros((TREE_WIDTH + 1,) * min(num_streams, TREE_DEPTH), dtype=torch.float64)


@torch.no_grad()
def chain_acceptance(
    stream_logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk: int = 256,
) -> tuple[float, int, torch.Tensor]:
    """Greedy-chain and tree acceptance of the streams at every scorable position.

    Counted at positions i whose main target x_{i+1} and last stream target x_{i+1+G} are both
    response tokens. Returns the sum of the leading run of correct streams (1 + its mean is the
    tokens per step a width-1 draft gives), the count of positions, and a histogram of the joint
    ranks of the true tokens in the first D = min(G, TREE_DEPTH) streams' rankings, shape
    (TREE_WIDTH + 1,) * D (rank TREE_WIDTH = "not in the top TREE_WIDTH"): a tree node
    (r1, .., rd) is accepted exactly where the ranks start with r1, .., rd, so any tree's
    expected length follows from it (`best_tree_tokens`).
    stream_logits (B,L,G,V), or LM-head inputs (B,L,G,D) with `head`.
    """
    B, L, G, _ = stream_logits.shape
    D = min(G, TREE_DEPTH)
    hist = empty_rank_hist(G).flatten()
    n = L - 1 - G  # positions whose every stream target exists
    if n <= 0:
        return 0.0, 0, hist.reshape((TREE_WIDTH + 1,) * D)
    valid = loss_mask[:, 1 : 1 + n].bool() & loss_mask[:, 1 + G : 1 + G + n].bool()  # (B, n)
    rows = stream_logits[:, :n][valid]  # (m, G, V or D)
    targets = torch.stack([input_ids[:, 1 + j : 1 + j + n] for j in range(1, G + 1)], dim=-1)
    targets = targets[valid]  # (m, G)
    run_sum = 0.0
    place = (TREE_WIDTH + 1) ** torch.arange(D - 1, -1, -1)  # (D,) mixed-radix digits
    for s in range(0, rows.shape[0], chunk):  # bounded (chunk, G, V) logits
        lg = rows[s : s + chunk] if head is None else head(rows[s : s + chunk])
        tg = targets[s : s + chunk]
        run_sum += float((lg.argmax(-1) == tg).long().cumprod(dim=-1).sum())
        true = lg[:, :D].gather(-1, tg[:, :D, None])  # (c, D, 1)
        rank = (lg[:, :D] > true).sum(-1).clamp(max=TREE_WIDTH)  # (c, D)
        hist += torch.bincount((rank * place).sum(-1), minlength=hist.numel()).double()
    return run_sum, int(valid.sum()), hist.reshape((TREE_WIDTH + 1,) * D)


def best_tree_tokens(hist: torch.Tensor, budgets: Sequence[int] = TREE_BUDGETS) -> dict[str, float]:
    """Expected tokens per pass (1 + accepted draft nodes) of the best draft tree of each node
    budget on the positions `hist` (from `chain_acceptance`) counts.

    A node's acceptance rate is the share of positions whose ranks start with its path; it never
    exceeds its parent's, so growing the tree best-first by that rate gives the best tree of
    every size. The tree is fit to the same positions it is scored on: a little optimistic
    against a tree chosen on other text. Keys are the budgets as strings (JSON).
    """
    total = float(hist.sum())
    out = {str(b): float("nan") for b in budgets}
    if total == 0 or not budgets:
        return out
    W, D = TREE_WIDTH, hist.dim()

    def rate(path: tuple[int, ...]) -> float:
        return float(hist[path].sum()) / total  # the rest of the ranks summed over

    frontier = [(-rate((r,)), (r,)) for r in range(W)]
    accepted, size = 0.0, 0
    for budget in sorted(budgets):
        while size < budget and frontier:
            frontier.sort()
            neg, path = frontier.pop(0)
            accepted += -neg
            size += 1
            if len(path) < D:
                frontier += [(-rate(path + (r,)), path + (r,)) for r in range(W)]
        out[str(budget)] = 1.0 + accepted
    return out


@torch.no_grad()
def stream_counts(
    main_hidden: torch.Tensor,
    stream_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    k: int = 3,
    stream_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[tuple[int, int, int]]:
    """Per stream j: (top-k hits, echoes, scored positions). An echo is a stream top-1 that
    repeats the main head's top-1 at the same position (its guess for x_{i+1}) while the
    target x_{i+1+j} is another token: the failure of streams that learned to copy the current
    prediction. main_hidden (B,L,D), stream_hidden (B,L,G,D) LM-head inputs."""
    L, G = input_ids.shape[1], stream_hidden.shape[2]
    out = []
    for j in range(1, G + 1):
        n = L - 1 - j
        if n <= 0:
            out.append((0, 0, 0))
            continue
        sel = loss_mask[:, 1 + j :].bool()  # (B, n): scored targets x_{i+1+j}
        main_top = head(main_hidden[:, :n][sel]).argmax(-1)  # (m,)
        top = (stream_head or head)(stream_hidden[:, :n, j - 1][sel]).topk(k, dim=-1).indices
        target = input_ids[:, 1 + j :][sel]
        echo = (top[:, 0] == main_top) & (top[:, 0] != target)
        hits = (top == target[:, None]).any(-1)
        out.append((int(hits.sum()), int(echo.sum()), int(sel.sum())))
    return out
