"""The attention methods on a 'map'-pooled timm ViT (SigLIP's attention pooling), where the explained row is the pool
query's attention over the tokens (no class token needed).

References: rollout, gradient rollout, raw attention, attention GradCAM and generic attention against the attention
probabilities and gradients that timm's own modules compute (a deep copy with the blocks' fused attention off and
hooks on ``attn_drop``; the pool's forward re-written after timm's to keep its attention); TransformerAttribution and
PartialLRP against a direct implementation of Chefer et al.'s algorithm extended by the pool (the structure of
tests/test_chefer.py's reference). The attention pool's Chefer rule on a hand-derived case.
"""

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from test_chefer import _add, _lin
from test_family_timm_vit_map import TOKENS, _tiny_pool, image, small_map_vit

import lrpkit
from lrpkit import Composite, GlobalTypeMap
from lrpkit.layers import AttentionPool
from lrpkit.methods import (AttentionGradCAM, AttentionRollout, GenericAttention, Gradient, GradientRollout,
                            InputXGradient, IntegratedGradients, PartialLRP, RawAttention, SmoothGrad,
                            TransformerAttribution, ViTCX, chefer_composite)
from lrpkit.methods.rollout import pool_readout
from lrpkit.rules.chefer import ATTENTION_RELEVANCE, safe_divide
from lrpkit.rules.pooling import CheferAttentionPoolRule


def _recording_pool(store):
    """timm ``AttentionPoolLatent.forward`` (non-fused path), keeping the attention probabilities with their grad."""
    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, self.latent_len, self.num_heads, self.head_dim)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q.transpose(1, 2)), self.k_norm(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        attn.retain_grad()
        store.append(attn)
        x = self.proj((attn @ v).transpose(1, 2).reshape(B, self.latent_len, C))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        return x[:, 0] if self.pool == "token" else x.mean(1)
    return forward


def timm_attention(model, x, target):
    """Logits, the blocks' A_b and ∂y_t/∂A_b, and the pool's A and ∂y_t/∂A, from timm's modules."""
    model = copy.deepcopy(model)
    store, pool = [], []

    def hook(module, inp, out):
        out.retain_grad()
        store.append(out)

    for blk in model.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(hook)
    model.attn_pool.forward = types.MethodType(_recording_pool(pool), model.attn_pool)
    logits = model(x)
    logits[:, target].sum().backward()
    return (logits.detach(), [a.detach() for a in store], [a.grad for a in store], pool[0].detach(),
            pool[0].grad)


def _pool_row(model, fused):
    """The read-out row from a fused pool attention (B, L, N'): latent 0 ('token') or the latents' mean ('avg'),
    zeros for the prefix tokens the pool leaves out."""
    row = fused[:, 0] if model.attn_pool.pool == "token" else fused.mean(1)
    start = 0 if model.pool_include_prefix else model.num_prefix_tokens
    return F.pad(row, (start, 0))


def _patches(model, rows):
    return rows[:, model.num_prefix_tokens:].reshape(rows.shape[0], 4, 4)


CONFIGS = ["siglip", "cls-left-out", "cls+reg-included", "latents2-avg+pool-qknorm"]


@pytest.mark.parametrize("config", CONFIGS)
def test_attention_methods_read_the_pool_query_row(config):
    model = small_map_vit(config)
    x = image(3)
    logits, attns, grads, pool_a, pool_g = timm_attention(model, x, target=2)
    n = attns[0].shape[-1]
    eye = torch.eye(n)

    raw = RawAttention(model)(x, target=2)
    assert torch.allclose(raw.token_relevance, _patches(model, _pool_row(model, pool_a.mean(1))), atol=1e-6)

    matrix = eye.expand(3, n, n)
    for a in attns:
        m = (a.mean(1) + eye) / 2
        matrix = (m / m.sum(-1, keepdim=True)) @ matrix
    rollout = AttentionRollout(model)(x, target=2)
    expected = torch.einsum("bn,bnm->bm", _pool_row(model, pool_a.mean(1)), matrix)
    assert torch.allclose(rollout.token_relevance, _patches(model, expected), atol=1e-6)

    matrix = eye.expand(3, n, n)
    for a, g in zip(attns, grads):
        m = ((a * g).mean(1).clamp(min=0) + eye) / 2
        matrix = (m / m.sum(-1, keepdim=True)) @ matrix
    grad_rollout = GradientRollout(model)(x, target=2)
    expected = torch.einsum("bn,bnm->bm", _pool_row(model, (pool_a * pool_g).mean(1).clamp(min=0)), matrix)
    assert torch.allclose(grad_rollout.token_relevance, _patches(model, expected), atol=1e-6)

    cam = AttentionGradCAM(model)(x, target=2)
    prefix_in_pool = model.num_prefix_tokens if model.pool_include_prefix else 0
    alpha = pool_g[..., prefix_in_pool:].mean(-1, keepdim=True)  # per head and latent, over the patch tokens
    a = pool_a[:, :, 0] if model.attn_pool.pool == "token" else pool_a.mean(2)
    alpha = alpha[:, :, 0] if model.attn_pool.pool == "token" else alpha.mean(2)
    expected = _pool_row(model, (alpha * a).mean(1, keepdim=True).clamp(min=0))
    assert torch.allclose(cam.token_relevance, _patches(model, expected), atol=1e-6)

    r = eye.expand(3, n, n)
    for a, g in zip(attns, grads):
        r = r + (g * a).clamp(min=0).mean(1) @ r
    generic = GenericAttention(model)(x, target=2)
    expected = torch.einsum("bn,bnm->bm", _pool_row(model, (pool_g * pool_a).clamp(min=0).mean(1)), r)
    assert torch.allclose(generic.token_relevance, _patches(model, expected), atol=1e-6)

    for e in (raw, rollout, grad_rollout, cam, generic):
        assert torch.allclose(e.output, logits, atol=1e-5) and e.target.tolist() == [2, 2, 2]
        assert e.patch_relevance.shape == (3, 4, 4)
        # (GradCAM's map can be all zero: with target 2 on "cls-left-out" both heads' α are negative)
        assert e is cam or e.token_relevance.abs().max() > 0


def test_pool_readout_by_hand():
    # two latents over three tokens, the first prefix token left out of the pool; pool_type 'avg' (TokenMean)
    chain = lrpkit.canonize(small_map_vit("latents2-avg+pool-qknorm"))
    fused = torch.tensor([[[0.2, 0.8], [0.6, 0.4]]])  # (B=1, L=2, N'=2)
    # (0.2 + 0.6)/2 = 0.4, (0.8 + 0.4)/2 = 0.6
    assert torch.allclose(pool_readout(chain, fused), torch.tensor([[0.4, 0.6]]))
    (pool,) = [m for m in chain.modules() if isinstance(m, AttentionPool)]
    pool.start = 1
    assert torch.allclose(pool_readout(chain, fused), torch.tensor([[0.0, 0.4, 0.6]]))
    with pytest.raises(ValueError, match="attention pool"):
        pool_readout(lrpkit.canonize(small_map_vit().__class__(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                                              num_heads=2, num_classes=5)), fused)


def test_batch_equals_single_samples():
    model = small_map_vit("cls-left-out")
    x = image(3)
    for method in (AttentionRollout(model), GradientRollout(model), GenericAttention(model),
                   TransformerAttribution(model), PartialLRP(model)):
        whole = method(x, target=[1, 4, 0])
        singles = torch.cat([method(x[i:i + 1], target=t).token_relevance for i, t in enumerate([1, 4, 0])])
        assert torch.allclose(whole.token_relevance, singles, rtol=1e-4, atol=1e-7), method.name


# -- Chefer et al.: the pool's rule by hand, and the methods against a direct implementation ---------------------------

def test_chefer_pool_rule_by_hand():
    # the tiny pool of test_family_timm_vit_map: q = (ln 3, 0), k = v = x, x1 = (1, 1), x2 = (0, 2), A = (3/4, 1/4),
    # y = (0.75, 1.25), R_y = (1, 1)
    composite = Composite(GlobalTypeMap({AttentionPool: CheferAttentionPoolRule()}))
    e = lrpkit.LRP(_tiny_pool(), composite)(TOKENS, R=torch.ones(1, 2, dtype=torch.float64))
    # A v, halved: s = R_y / 2 / y = (2/3, 0.4); R_A = A ⊙ (v s) = (3/4 · 16/15, 1/4 · 0.8) = (0.8, 0.2);
    # R_v1 = 3/4 (1, 1) ⊙ s = (0.5, 0.3), R_v2 = 1/4 (0, 2) ⊙ s = (0, 0.2)
    ((_, R_A),) = e.extras[ATTENTION_RELEVANCE]
    assert torch.allclose(R_A.flatten(), torch.tensor([0.8, 0.2], dtype=torch.float64), atol=1e-8)
    # q kᵀ = (ln 3, 0): s' = (0.8 / ln 3, 0) (a zero score drops its relevance: 0.2 lost);
    # R_k1 = x1 ⊙ q s'_1 / 2 = (0.4, 0), the latent's half q ⊙ x1 s'_1 / 2 = (0.4, 0): 0.4
    # tokens through W_kv = [I; I] (α1β0 on non-negative inputs passes it): R_x1 = (0.9, 0.3), R_x2 = (0, 0.2)
    expected = torch.tensor([[[0.9, 0.3], [0.0, 0.2]]], dtype=torch.float64)
    assert torch.allclose(e.relevance, expected, atol=1e-8)
    assert math.isclose(e.accounting.parts["latent_query"].item(), 0.4, abs_tol=1e-8)
    assert math.isclose(e.accounting.parts["stabilizer"].item(), 0.2, abs_tol=1e-8)


def reference(model, x, target, start_layer):
    """One image of a 'map'-pooled ViT without prefix tokens: the forward with saved activations, Chefer et al.'s
    relprop (their reference code's structure, extended by the pool: its MLP residual, projection, A v and q kᵀ with
    the query's half dropped, the key/value projection) and the product of the blocks' (I + Ā_b) from the pool
    query's row."""
    H, d = model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim
    p = model.attn_pool
    with torch.enable_grad():
        t = model.patch_embed(x) + model.pos_embed
        saved, attns = [], []
        for blk in model.blocks:
            a = blk.attn
            h = blk.norm1(t)
            q, k, v = a.qkv(h).reshape(1, -1, 3, H, d).permute(2, 0, 3, 1, 4)
            A = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
            y = (A @ v).transpose(1, 2).reshape(1, -1, H * d)
            o = a.proj(y)
            t1 = t + o
            h2 = blk.norm2(t1)
            g = blk.mlp.act(blk.mlp.fc1(h2))
            f2 = blk.mlp.fc2(g)
            saved.append(dict(t=t, h=h, q=q, k=k, v=v, A=A, y=y, o=o, t1=t1, h2=h2, g=g, f2=f2))
            attns.append(A)
            t = t1 + f2
        hp = model.norm(t)
        qp = p.q(p.latent).reshape(1, 1, H, d).transpose(1, 2)
        kp, vp = p.kv(hp).reshape(1, -1, 2, H, d).permute(2, 0, 3, 1, 4)
        Ap = ((qp * p.scale) @ kp.transpose(-2, -1)).softmax(-1)
        yp = (Ap @ vp).transpose(1, 2).reshape(1, 1, H * d)
        op = p.proj(yp)
        hp2 = p.norm(op)
        gp = p.mlp.act(p.mlp.fc1(hp2))
        mp = p.mlp.fc2(gp)
        zp = op + mp
        out = model.head(zp[:, 0])
        grads = torch.autograd.grad(out[0, target], attns + [Ap])
    with torch.no_grad():
        R = _lin(zp[:, 0], model.head, F.one_hot(torch.tensor([target]), out.shape[1]).to(x))[:, None]
        ra, rb = _add(op, mp, R)
        rb = _lin(hp2, p.mlp.fc1, _lin(gp, p.mlp.fc2, rb))
        R = _lin(yp, p.proj, ra + rb).reshape(1, 1, H, d).transpose(1, 2)
        S = safe_divide(R, Ap @ vp)
        R_Ap, R_v = Ap * (S @ vp.transpose(-2, -1)) / 2, vp * (Ap.transpose(-2, -1) @ S) / 2
        S = safe_divide(R_Ap, qp @ kp.transpose(-2, -1))
        R_k = kp * (S.transpose(-2, -1) @ qp) / 2  # the query's half stays with the latent
        R_kv = torch.cat([R_k.transpose(1, 2).reshape(1, -1, H * d), R_v.transpose(1, 2).reshape(1, -1, H * d)], -1)
        R = _lin(hp, p.kv, R_kv)
        cams = []
        for blk, s in zip(reversed(model.blocks), reversed(saved)):
            ra, rb = _add(s["t1"], s["f2"], R)
            rb = _lin(s["g"], blk.mlp.fc2, rb)
            rb = _lin(s["h2"], blk.mlp.fc1, rb)
            R = ra + rb
            ra, rb = _add(s["t"], s["o"], R)
            rb = _lin(s["y"], blk.attn.proj, rb).reshape(1, -1, H, d).transpose(1, 2)
            S = safe_divide(rb, s["A"] @ s["v"])
            R_A, R_v = s["A"] * (S @ s["v"].transpose(-2, -1)) / 2, s["v"] * (s["A"].transpose(-2, -1) @ S) / 2
            cams.insert(0, R_A)
            S = safe_divide(R_A, s["q"] @ s["k"].transpose(-2, -1))
            R_q, R_k = s["q"] * (S @ s["k"]) / 2, s["k"] * (S.transpose(-2, -1) @ s["q"]) / 2
            R_qkv = torch.stack([R_q, R_k, R_v]).permute(1, 3, 0, 2, 4).reshape(1, -1, 3 * H * d)
            R = ra + _lin(s["h"], blk.attn.qkv, R_qkv)
        row = (grads[-1][0] * R_Ap[0]).clamp(min=0).mean(0)[0]  # the pool query's row (N,)
        for g, c in list(zip(grads[:-1], cams))[start_layer:][::-1]:
            row = row + row @ (g[0] * c[0]).clamp(min=0).mean(0)
        partial = R_Ap[0].clamp(min=0).mean(0)[0]
    return row, partial


@pytest.mark.parametrize("start_layer", [0, 1, 2])
def test_chefer_methods_match_independent_implementation(start_layer):
    model = small_map_vit("siglip", dtype=torch.float64)
    x = image(2, dtype=torch.float64)
    targets = [1, 3]
    expl = TransformerAttribution(model, start_layer=start_layer)(x, target=targets)
    partial = PartialLRP(model)(x, target=targets)
    assert torch.allclose(expl.output, model(x)) and expl.target.tolist() == targets
    for i in range(2):
        ref_map, ref_partial = reference(model, x[i:i + 1], targets[i], start_layer)
        assert torch.allclose(expl.token_relevance[i].flatten(), ref_map, rtol=1e-9, atol=0)
        assert torch.allclose(partial.token_relevance[i].flatten(), ref_partial, rtol=1e-9, atol=0)
    assert expl.token_relevance.abs().max() > 0


def test_chefer_composite_with_lrp_on_a_map_model():
    model = small_map_vit("cls-left-out", dtype=torch.float64)
    expl = lrpkit.LRP(model, chefer_composite())(image(2, dtype=torch.float64))
    rel = dict(expl.extras[ATTENTION_RELEVANCE])
    assert len(rel) == 3 and rel[max(rel)].shape == (2, 2, 1, 16)  # two blocks and the pool (one query, 16 patches)
    acc = expl.accounting
    assert set(acc.parts) <= {"class_token", "positional_embedding", "latent_query", "stabilizer"}
    assert torch.allclose(acc.total(), torch.ones(2, dtype=torch.float64))
    assert (acc.parts["latent_query"].abs() > 0).all()


def test_vitcx_and_the_gradient_methods_run():
    model = small_map_vit("siglip")
    x = image(1)
    for method in (Gradient(model), InputXGradient(model), SmoothGrad(model, n=4, seed=0),
                   IntegratedGradients(model, steps=4)):
        assert torch.isfinite(method(x).heatmap).all()
    e = ViTCX(model, batch_size=32, seed=0, progress=False)(x)
    assert e.heatmap.shape == (1, 32, 32) and torch.isfinite(e.heatmap).all()


def test_lrpkit_evaluate_runs_the_vit_methods_on_a_map_model(tmp_path):
    """``lrpkit evaluate``'s default methods for the timm-vit family all apply to a 'map'-pooled model (none is
    skipped as inapplicable) and give a complete result."""
    from lrpkit.app.preprocess import Preprocess
    from lrpkit.evaluate.runner import DEFAULT_METHODS_VIT, run_evaluation

    logs = []
    prep = Preprocess(size=(32, 32), resize=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    result = run_evaluation(tmp_path, model=small_map_vit("siglip"), preprocess=prep, n=2, batch_size=2, steps=4,
                            deletion_steps=4, log=logs.append)
    assert result.complete and result.methods == list(DEFAULT_METHODS_VIT)
    assert not [line for line in logs if line.startswith("skipping")]
    assert "transformer-attribution" in result.methods and "rollout" in result.methods
