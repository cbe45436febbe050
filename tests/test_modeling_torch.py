"""StreamingLM: the stream computation of docs/format.md, checked against a direct reference."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402
from hf_tiny import tiny_hf_config  # noqa: E402
from ss_mlx_convert.loss import ss_loss  # noqa: E402
from ss_mlx_convert.modeling import StreamingLM, hf_causal_lm  # noqa: E402

from ss_mlx.config import ADAPTER_MODULES as ALLOWED_MODULES  # noqa: E402

pytestmark = pytest.mark.torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def tiny_base(model_type: str, seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_hf_config(model_type, eos_token_id=3, bos_token_id=0, pad_token_id=1, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, torch_dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
    return model.eval()


def ss_block(G=3, Ns=2, mode="shifted", rank=0, modules=(), prune=0):
    return {
        "num_streams": G,
        "stream_layers": Ns,
        "stream_position_mode": mode,
        "adapter_rank": rank,
        "adapter_scale": 2.0,
        "adapter_modules": list(modules),
        "prune_rank": prune,
    }


def randomize(model: StreamingLM, seed: int = 1) -> None:
    """Non-zero values for every stream parameter (fresh adapters have b = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.ss_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def reference_streams(model: StreamingLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 written out as one long sequence (main rows, then stream rows) through the real HF
    decoder layers with an explicit (L + L*G)^2 mask. No adapters.
    -> (stream logits, main hidden)."""
    hf = hf_causal_lm(model.base)
    B, L = ids.shape
    G, s, N = model.num_streams, model.first_stream_layer, model.num_layers
    hs = hf(input_ids=ids, output_hidden_states=True).hidden_states
    P = model.stream_embeddings.detach()
    x = torch.cat([hs[s], (hs[s][:, :, None] + P).reshape(B, L * G, -1)], dim=1)
    t_main = torch.arange(L)
    t_str = torch.arange(L).repeat_interleave(G)
    j_str = torch.arange(1, G + 1).repeat(L)
    shift = j_str if model.ss["stream_position_mode"] == "shifted" else torch.zeros_like(j_str)
    pos = torch.cat([t_main, t_str + shift])[None].expand(B, -1)
    q_t, q_j = torch.cat([t_main, t_str]), torch.cat([torch.zeros(L, dtype=torch.long), j_str])
    k_t, k_j = q_t, q_j
    is_main_k = (k_j == 0)[None, :]
    allowed = (is_main_k & (k_t[None] <= q_t[:, None])) | (
        (~is_main_k)
        & (q_j[:, None] > 0)
        & (k_t[None] == q_t[:, None])
        & (k_j[None] <= q_j[:, None])
    )
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]
    pe = hf.model.rotary_emb(x, pos)
    for layer in hf.model.layers[s:N]:
        x = layer(x, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        if isinstance(x, tuple):
            x = x[0]
    streams = hf.lm_head(hf.model.norm(x[:, L:])).view(B, L, G, -1)
    return streams, x[:, :L]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("mode", ["shifted", "anchor"])
def test_matches_reference_sequence_formulation(model_type, mode):
    base = tiny_base(model_type)
    model = StreamingLM(base, ss_block(G=3, Ns=2, mode=mode))
    randomize(model)
    ids = torch.randint(4, 96, (2, 9))
    with torch.no_grad():
        main, streams, exit_logits = model(ids)
        ref, ref_main_hidden = reference_streams(model, ids)
        base_out = hf_causal_lm(model.base)(input_ids=ids, output_hidden_states=True)
    assert exit_logits is None
    assert torch.equal(main, base_out.logits)
    # The main rows of the long sequence are blind to the streams.
    torch.testing.assert_close(
        hf_causal_lm(model.base).model.norm(ref_main_hidden), base_out.hidden_states[-1]
    )
    torch.testing.assert_close(streams, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_all_layers_carry_streams(model_type):
    model = StreamingLM(tiny_base(model_type), ss_block(G=2, Ns=4))
    randomize(model)
    ids = torch.randint(4, 96, (1, 6))
    with torch.no_grad():
        _, streams, _ = model(ids)
        ref, _ = reference_streams(model, ids)
    torch.testing.assert_close(streams, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_main_layer_inputs_recompute_the_base_states_from_the_first(model_type):
    # What a trunk cache stores (one layer's input) must give back every stream layer's input,
    # for the real tokens of a right-padded batch.
    model = StreamingLM(tiny_base(model_type), ss_block(G=2, Ns=3))
    ids = torch.randint(4, 96, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        out = model.base_forward(ids, mask)
        again = model.main_layer_inputs(out.stream_inputs[0], out.position_ids)
    assert len(again) == len(out.stream_inputs) == 3
    for got, want in zip(again, out.stream_inputs, strict=True):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, :5], want[1, :5], atol=1e-5, rtol=1e-5)
    # Not vacuous: the layers above the first do change the states.
    assert not torch.allclose(again[2], again[0], atol=1e-2)


def full_model(model_type="llama", seed=0):
    modules = ALLOWED_MODULES[model_type]
    model = StreamingLM(
        tiny_base(model_type, seed), ss_block(G=3, Ns=2, rank=4, modules=modules, prune=4)
    )
    randomize(model)
    return model


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_streams_are_causal_in_time(model_type):
    model = full_model(model_type)
    ids = torch.randint(4, 96, (1, 10))
    ids2 = ids.clone()
    ids2[:, 6:] = torch.randint(4, 96, (1, 4))
    with torch.no_grad():
        m1, s1, e1 = model(ids)
        m2, s2, e2 = model(ids2)
    torch.testing.assert_close(s1[:, :6], s2[:, :6], atol=1e-6, rtol=0)
    torch.testing.assert_close(e1[:, :6], e2[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(s1[:, 6:], s2[:, 6:])


def test_stream_params_never_touch_main_logits():
    model = full_model()
    ids = torch.randint(4, 96, (2, 8))
    with torch.no_grad():
        main1, s1, _ = model(ids)
        randomize(model, seed=7)
        main2, s2, _ = model(ids)
    assert torch.equal(main1, main2)
    assert not torch.allclose(s1, s2)


def test_stream_j_is_blind_to_higher_streams():
    model = full_model()
    ids = torch.randint(4, 96, (1, 8))
    with torch.no_grad():
        _, s1, _ = model(ids)
        model.stream_embeddings[2] += 1.0  # P_3
        for per_module in model.adapters.values():  # stream 3's adapters
            for ad in per_module.values():
                ad.b[2] += 0.5
        _, s2, _ = model(ids)
        model.stream_embeddings[1] += 1.0  # P_2 reaches streams 2 and 3, not 1
        _, s3, _ = model(ids)
    torch.testing.assert_close(s1[:, :, :2], s2[:, :, :2], atol=1e-6, rtol=0)
    assert not torch.allclose(s1[:, :, 2], s2[:, :, 2])
    torch.testing.assert_close(s2[:, :, 0], s3[:, :, 0], atol=1e-6, rtol=0)
    assert not torch.allclose(s2[:, :, 1], s3[:, :, 1])


def test_zero_adapters_are_off():
    base = tiny_base("qwen2")
    plain = StreamingLM(base, ss_block(G=2, Ns=2))
    adapted = StreamingLM(base, ss_block(G=2, Ns=2, rank=4, modules=ALLOWED_MODULES["qwen2"]))
    with torch.no_grad():
        adapted.stream_embeddings.copy_(plain.stream_embeddings)
        ids = torch.randint(4, 96, (1, 6))
        assert torch.equal(plain(ids)[1], adapted(ids)[1])


def test_padding_left_and_right():
    model = full_model("qwen3")
    a = torch.randint(4, 96, (1, 7))
    b = torch.randint(4, 96, (1, 4))
    with torch.no_grad():
        _, sa, ea = model(a)
        _, sb, eb = model(b)
        right = torch.cat([a, torch.cat([b, torch.full((1, 3), 1)], 1)])
        mask_r = torch.cat([torch.ones(1, 7), torch.cat([torch.ones(1, 4), torch.zeros(1, 3)], 1)])
        _, sr, _ = model(right, attention_mask=mask_r.long())
        left = torch.cat([torch.full((1, 3), 1), b], 1)
        mask_l = torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], 1).long()
        _, sl, el = model(left, attention_mask=mask_l)
    torch.testing.assert_close(sr[0], sa[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sr[1, :4], sb[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sl[0, 3:], sb[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(el[0, 3:], eb[0], atol=1e-4, rtol=1e-4)


def test_early_exit_formula():
    model = full_model()
    ids = torch.randint(4, 96, (1, 5))
    with torch.no_grad():
        _, _, exit_logits = model(ids)
        hf = hf_causal_lm(model.base)
        h = hf(input_ids=ids, output_hidden_states=True).hidden_states[model.first_stream_layer]
        want = hf.lm_head(hf.model.norm(h + (h @ model.prune.a) @ model.prune.b))
    torch.testing.assert_close(exit_logits, want)


def test_ss_state_dict_names_and_strict_load():
    model = full_model("phi3")
    sd = model.ss_state_dict()
    names = set(sd)
    assert "stream_embeddings" in names and "prune.a" in names and "prune.b" in names
    assert "adapters.2.self_attn.qkv_proj.a" in names and "adapters.3.mlp.down_proj.b" in names
    assert sd["adapters.2.mlp.gate_up_proj.a"].shape == (3, 64, 4)
    assert sd["adapters.2.mlp.gate_up_proj.b"].shape == (3, 4, 256)
    assert sd["prune.a"].shape == (64, 4) and sd["stream_embeddings"].shape == (3, 64)
    other = full_model("phi3", seed=5)
    other.load_ss_state_dict({k: v.clone() for k, v in sd.items()})
    assert all(torch.equal(v, other.ss_state_dict()[k]) for k, v in sd.items())
    with pytest.raises(ValueError, match="unexpected"):
        other.load_ss_state_dict({**sd, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        other.load_ss_state_dict({k: v for k, v in sd.items() if k != "prune.a"})


def test_unsupported_model_type_lists_supported():
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(ValueError, match="llama.*qwen2.*qwen3"):
        StreamingLM(transformers.GPT2LMHeadModel(cfg), ss_block())


def test_bad_adapter_module_rejected():
    with pytest.raises(ValueError, match="not allowed"):
        StreamingLM(tiny_base("llama"), ss_block(rank=2, modules=["self_attn.qkv_proj"]))


def test_loss_targets_and_masking():
    V, L, G = 11, 6, 2
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    # Logits that put all mass on the right target: main at i -> ids[i+1], stream j -> ids[i+1+j].
    main = torch.full((1, L, V), -30.0)
    streams = torch.full((1, L, G, V), -30.0)
    for i in range(L):
        if i + 1 < L:
            main[0, i, ids[0, i + 1]] = 30.0
        for j in range(1, G + 1):
            if i + 1 + j < L:
                streams[0, i, j - 1, ids[0, i + 1 + j]] = 30.0
    loss, m = ss_loss(main, streams, ids, mask)
    assert loss.item() < 1e-6
    assert m["main_acc"] == 1.0 and m["stream1_acc"] == 1.0 and m["stream2_acc"] == 1.0
    # targets with mask 1: main -> 3 positions; stream1 (shift 2) -> 3; stream2 (shift 3) -> 3
    assert (m["main_n"], m["stream1_n"], m["stream2_n"]) == (3.0, 3.0, 3.0)
    streams[0, 0, 1] = 0.0  # stream 2 at i=0 targets ids[3], a response token
    _, m2 = ss_loss(main, streams, ids, mask)
    assert m2["stream2_acc"] < 1.0 and m2["stream1_acc"] == 1.0
    streams2 = streams.clone()
    streams2[0, 0, 0] = 0.0  # stream 1 at i=0 targets ids[2], a prompt token: not scored
    _, m3 = ss_loss(main, streams2, ids, mask)
    assert m3["stream1_acc"] == 1.0


def test_soft_targets_are_a_distributions_cross_entropy():
    from ss_mlx_convert.hidden_cache import one_hot_soft

    g = torch.Generator().manual_seed(0)
    V, L, G, K = 13, 7, 2, 3
    ids = torch.randint(0, V, (2, L), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0]])
    streams = torch.randn(2, L, G, V, generator=g)
    anchors = torch.tensor([[0, 2, 3], [1, 2, 6]])
    s_at = streams.gather(1, anchors[:, :, None, None].expand(-1, -1, G, V))
    for a, st in ((None, streams), (anchors, s_at)):
        # The ids as a one-point distribution: exactly the hard loss.
        hard, mh = ss_loss(None, st, ids, mask, anchors=a)
        soft, ms = ss_loss(None, st, ids, mask, anchors=a, soft=one_hot_soft(ids, K))
        torch.testing.assert_close(hard, soft)
        assert mh == pytest.approx(ms)
    # A real distribution: -sum_k p_k log q_k with p renormalised over its K tokens, per scored
    # position; hits still count the ids.
    top_ids = torch.randint(0, V, (2, L, K), generator=g)
    top_p = torch.rand(2, L, K, generator=g)
    _, m = ss_loss(None, streams, ids, mask, soft=(top_ids, top_p))
    for j in range(1, G + 1):
        shift, want, n = j + 1, [], 0
        for b in range(2):
            for i in range(L - shift):
                if mask[b, i + shift]:
                    logq = streams[b, i, j - 1].log_softmax(-1)
                    p = top_p[b, i + shift] / top_p[b, i + shift].sum()
                    want.append(-(p * logq[top_ids[b, i + shift]]).sum())
                    n += 1
        assert m[f"stream{j}_n"] == n
        assert m[f"stream{j}_loss"] == pytest.approx(float(torch.stack(want).mean()), rel=1e-5)


@pytest.mark.parametrize("model_type", ["qwen2", "phi3"])
def test_loss_on_hidden_rows_equals_loss_on_logits(model_type):
    model = full_model(model_type)
    ids = torch.randint(4, 96, (2, 10))
    mask = torch.zeros_like(ids)
    mask[0, 4:] = 1
    mask[1, 2:8] = 1
    with torch.no_grad():
        logits = model(ids)
        hidden = model(ids, return_hidden=True)
    assert hidden[1].shape == (2, 10, 3, 64)
    torch.testing.assert_close(model.lm_head(hidden[1]), logits[1])
    a, ma = ss_loss(logits[0], logits[1], ids, mask, exit_logits=logits[2])
    b, mb = ss_loss(hidden[0], hidden[1], ids, mask, exit_logits=hidden[2], head=model.lm_head)
    torch.testing.assert_close(a, b)
    assert ma.keys() == mb.keys()
    assert all(ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6) for k in ma)


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_streams_of_sampled_positions_equal_those_of_every_position(model_type):
    # Training on a sample of positions (--stream-positions) must compute the very streams the
    # runtime computes at those positions, padding and early exit included.
    model = full_model(model_type)
    ids = torch.randint(4, 96, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    anchors = torch.tensor([[0, 3, 8], [1, 2, 5]])
    with torch.no_grad():
        _, s_all, e_all = model(ids, attn, return_hidden=True)
        _, s_at, e_at = model(ids, attn, return_hidden=True, anchors=anchors)
    assert s_at.shape == (2, 3, model.num_streams, 64)
    want = s_all.gather(1, anchors[:, :, None, None].expand(-1, -1, *s_all.shape[2:]))
    torch.testing.assert_close(s_at, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e_at, e_all.gather(1, anchors[:, :, None].expand(-1, -1, 64)))


def test_loss_on_sampled_positions_scores_exactly_their_targets():
    from ss_mlx_convert.loss import sample_anchors

    model = full_model("llama")
    L = 12
    ids = torch.randint(4, 96, (2, L))
    mask = torch.zeros_like(ids)
    mask[0, 3:] = 1
    mask[1, 5:10] = 1
    anchors = sample_anchors(mask, 4, torch.Generator().manual_seed(3))
    assert anchors.shape == (2, 4)
    # Drawn positions are distinct and have a scored first-stream target (both rows have at
    # least 4 such positions, so neither is filled).
    for b in range(2):
        real = [a for a in anchors[b].tolist() if a != L - 1]
        assert len(set(real)) == len(real) == 4
        assert all(mask[b, a + 2] == 1 for a in real)
    with torch.no_grad():
        _, streams, _ = model(ids, return_hidden=True)
        _, s_at, e_at = model(ids, return_hidden=True, anchors=anchors)
        _, m_at = ss_loss(None, s_at, ids, mask, exit_logits=e_at, head=model.lm_head,
                          anchors=anchors)  # fmt: skip
        for j in range(1, model.num_streams + 1):
            # The full rows scored on the anchors' targets only give the same count and hits.
            keep = torch.zeros_like(mask)
            for b in range(2):
                for a in anchors[b].tolist():
                    if a + 1 + j < L:
                        keep[b, a + 1 + j] = mask[b, a + 1 + j]
            _, m_full = ss_loss(None, streams, ids, keep, head=model.lm_head)
            assert m_at[f"stream{j}_n"] == m_full[f"stream{j}_n"] == float(keep.sum())
            assert m_at[f"stream{j}_correct"] == m_full[f"stream{j}_correct"]
            assert m_at[f"stream{j}_loss"] == pytest.approx(m_full[f"stream{j}_loss"], rel=1e-5)


def test_sample_anchors_fills_short_rows_with_the_last_position():
    from ss_mlx_convert.loss import sample_anchors

    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
    a = sample_anchors(mask, 3, torch.Generator().manual_seed(0))
    assert a.tolist() == [[1, 2, 5], [5, 5, 5]]


def test_stream_counts_top3_and_echo():
    from ss_mlx_convert.loss import stream_counts

    V = 8
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    main = torch.zeros(1, 5, V)
    streams = torch.zeros(1, 5, 1, V)
    for i in range(5):
        main[0, i, (i + 2) % V] = 5.0  # main's guess at i: ids[i + 1] (= i + 2)
    # stream 1 (target ids[i + 2] = i + 3): i=0 echoes main (top-1 2, target 3 only 2nd);
    # i=1 right; i=2 target 5 nowhere in its top 3.
    streams[0, 0, 0, 2], streams[0, 0, 0, 3] = 5.0, 4.0
    streams[0, 1, 0, 4] = 5.0
    streams[0, 2, 0, 7], streams[0, 2, 0, 6], streams[0, 2, 0, 0] = 5.0, 4.0, 3.0
    [(top3, echo, n)] = stream_counts(main, streams, ids, mask, head=lambda x: x)
    assert (top3, echo, n) == (2, 1, 3)


def test_tree_metric_matches_a_brute_force_count_of_accepted_nodes():
    # Random stream logits: the best tree of every budget, from the joint-rank histogram, equals
    # an exhaustive search over prefix-closed trees scored by counting accepted nodes directly.
    from itertools import combinations, product

    from ss_mlx_convert.loss import TREE_WIDTH, best_tree_tokens, chain_acceptance

    g = torch.Generator().manual_seed(0)
    B, L, G, V = 3, 40, 2, 6
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.2).long()
    logits = torch.randn(B, L, G, V, generator=g) * 2
    chain, count, hist = chain_acceptance(logits, ids, mask, chunk=7)
    assert hist.shape == (TREE_WIDTH + 1,) * G and float(hist.sum()) == count > 0

    n = L - 1 - G
    ranks = []  # per scored position: the rank of each true token in its stream's ranking
    for b, i in product(range(B), range(n)):
        if mask[b, 1 + i] and mask[b, 1 + G + i]:
            row = []
            for j in range(G):
                target = ids[b, i + 1 + (j + 1)]
                row.append(int((logits[b, i, j] > logits[b, i, j, target]).sum()))
            ranks.append(tuple(row))
    assert len(ranks) == count
    lead = [next((j for j, r in enumerate(rs) if r != 0), G) for rs in ranks]
    assert chain == sum(lead)

    nodes = [p for d in range(1, G + 1) for p in product(range(TREE_WIDTH), repeat=d)]
    rate = {p: sum(rs[: len(p)] == p for rs in ranks) / count for p in nodes}
    best = {}
    for size in (1, 2, 3, 5):
        top = 0.0
        for tree in map(set, combinations(nodes, size)):
            if all(p[:-1] in tree or len(p) == 1 for p in tree):
                top = max(top, sum(rate[p] for p in tree))
        best[size] = 1 + top
    got = best_tree_tokens(hist, (1, 2, 3, 5))
    assert got == pytest.approx({str(k): v for k, v in best.items()})

