"""``lrpkit.crp.reference_samples``: relevance and activation maximisation over a data set.

- a hand-derived case where the two modes disagree (arithmetic in the comments);
- the relevance at the layer is LRP's (the layerwise relevance of a top-level layer, the Tape's ``relevance_at`` of
  a layer in a residual branch), the activation is the original model's (a forward hook);
- batch size, data given as a Dataset or as batches: the same result;
- resumption (an interrupted scan resumed from its cache equals one uninterrupted scan, nothing recomputed), the
  cache refuses other arguments;
- a real 2-process ``torchrun`` scan equals 1 process (a Dataset and an iterable of batches);
- clear errors: unknown layer (and one that BatchNorm fusion removed), channel out of range, k larger than the data;
- crops: a tiny CNN's receptive field derived by hand (with a residual block), a tiny ViT's patches.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import lrpkit
from lrpkit.canonize.core import flatten, join, make_chain
from lrpkit.crp import reference_samples
from lrpkit.crp import reference as reference_module
from lrpkit.crp.crops import crop_boxes
from lrpkit.crp.locate import locate
from lrpkit.rules import EpsilonRule

DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


# -- a hand-derived case ------------------------------------------------------------------------------------------
def two_pixel_model():
    """x (B, 1, 1, 2), pixels x0, x1. Layer "0": a 1x1 convolution with two channels that both copy the image,
    c0 = c1 = (x0, x1) at positions p0, p1. Then Flatten (c0p0, c0p1, c1p0, c1p1) and one logit
    z = 1·c0p0 + 0·c0p1 + 0·c1p0 + 1·c1p1 = x0 + x1: channel 0 counts at p0 only, channel 1 at p1 only."""
    conv, head = nn.Conv2d(1, 2, 1, bias=False), nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.ones(2, 1, 1, 1))
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    return nn.Sequential(conv, nn.Flatten(), head).double().eval()


def test_relevance_and_activation_maximisation_by_hand():
    model = two_pixel_model()
    lrp = lrpkit.LRP(model, lrpkit.Composite(lrpkit.GlobalMap(EpsilonRule(1e-12))))
    x = torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 0.0]], dtype=torch.float64).view(3, 1, 1, 2)
    # ε-LRP at the head with R_out = 1: R_i = a_i w_i / z, z = x0 + x1; Flatten passes it back to (c, p):
    #   s0 = (1, 3): z = 4, R c0 = (1/4, 0), R c1 = (0, 3/4); activations c0 = c1 = (1, 3)
    #   s1 = (2, 2): z = 4, R c0 = (1/2, 0), R c1 = (0, 1/2); activations (2, 2)
    #   s2 = (3, 0): z = 3, R c0 = (1, 0),   R c1 = (0, 0);   activations (3, 0)
    rel = reference_samples(lrp, x, "0", k=2, mode="relevance", batch_size=2, progress=False)
    # relevance, channel 0: max_p R = 1/4, 1/2, 1 -> s2 (1, at p0), s1 (1/2, at p0)
    # relevance, channel 1: max_p R = 3/4, 1/2, 0 -> s0 (3/4, at p1), s1 (1/2, at p1)
    assert rel.concepts.tolist() == [0, 1]
    assert rel.indices.tolist() == [[2, 1], [0, 1]]
    assert torch.allclose(rel.scores, torch.tensor([[1.0, 0.5], [0.75, 0.5]], dtype=torch.float64), rtol=1e-9)
    assert rel.positions.tolist() == [[0, 0], [1, 1]]
    act = reference_samples(lrp, x, "0", k=2, mode="activation", batch_size=2, progress=False)
    # activation, both channels: max_p a = 3 (s0, at p1), 2 (s1, at p0: the first of equal values), 3 (s2, at p0)
    # -> s0 and s2 tie at 3: the smaller index first -> [s0, s2], although s0 used channel 0 least of all
    assert act.indices.tolist() == [[0, 2], [0, 2]]
    assert act.scores.tolist() == [[3.0, 3.0], [3.0, 3.0]]
    assert act.positions.tolist() == [[1, 0], [1, 0]]
    # statistic="sum": Σ_p a = 4 (s0), 4 (s1), 3 (s2) -> [s0, s1]; the position is still the argmax
    total = reference_samples(lrp, x, "0", k=2, mode="activation", statistic="sum", progress=False)
    assert total.indices.tolist() == [[0, 1], [0, 1]] and total.scores.tolist() == [[4.0, 4.0], [4.0, 4.0]]
    assert total.positions.tolist() == [[1, 0], [1, 0]]
    # a 1x1 convolution sees one pixel: the crop of position p is that pixel
    assert rel.boxes[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert rel.boxes[1].tolist() == [[0, 1, 1, 2], [0, 1, 1, 2]]
    # one channel, and a fixed target (the only class), give the same numbers
    one = reference_samples(lrp, x, "0", concepts=[1], k=2, target=0, progress=False)
    assert one.concepts.tolist() == [1] and one.indices.tolist() == [[0, 1]]
    assert one.row(1) == 0 and one.crop(torch.arange(2.0).view(1, 1, 2), 0, 0).tolist() == [[[1.0]]]


# -- the relevance is LRP's, the activation the model's -------------------------------------------------------------
def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


def data(n=10, size=8, seed=1, classes=3):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def expected(maps: torch.Tensor, k: int):
    """Top-k per channel of (N, C, P) maps, by max over P, ties by index: (indices, scores, positions)."""
    values, positions = maps.max(-1)  # (N, C)
    rows = []
    for c in range(maps.shape[1]):
        order = sorted(range(maps.shape[0]), key=lambda i: (-values[i, c].item(), i))[:k]
        rows.append((order, [values[i, c].item() for i in order], [positions[i, c].item() for i in order]))
    return rows


def check_against(result, maps, k):
    for r, (order, scores, positions) in enumerate(expected(maps, k)):
        assert result.indices[r].tolist() == order
        assert torch.allclose(result.scores[r], torch.tensor(scores, dtype=torch.float64), rtol=1e-5, atol=1e-7)
        assert result.positions[r].tolist() == positions


def test_cnn_relevance_is_the_layerwise_lrp_relevance_and_activation_the_models():
    model, ds = small_cnn(), data()
    lrp = lrpkit.LRP(model)
    x = ds.tensors[0]
    expl = lrp(x, layerwise=True)
    ref = locate(lrp, "3")  # the second convolution: top-level index 3, its output enters index 4
    R = expl.layerwise[ref.index + 1]
    check_against(reference_samples(lrp, ds, "3", k=4, batch_size=3, progress=False), R.flatten(2), 4)
    seen = {}
    model[3].register_forward_hook(lambda m, i, o: seen.setdefault("a", o.detach()))
    model(x)
    check_against(reference_samples(lrp, ds, "3", k=4, mode="activation", batch_size=4, progress=False),
                  seen["a"].flatten(2), 4)


def tiny_vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=3).eval()


def test_vit_relevance_in_a_residual_branch_is_the_tapes_and_tokens_use_the_last_dim():
    model = tiny_vit()
    lrp = lrpkit.LRP(model)
    ds = data(n=6, size=16)
    x = ds.tensors[0]
    ref = locate(lrp, "blocks.0.mlp.fc1")  # inside the residual branch of block 0's MLP
    act_step = next(s for s in lrp.all_steps if s.name == "blocks.0.mlp.act")
    assert act_step.index == ref.index + 1  # the GELU after fc1: its input relevance is fc1's output relevance
    tape = lrpkit.tape.Tape(lrp.plan, relevance_at=[act_step.index])
    with torch.enable_grad():
        out = tape.forward(lrp.steps, x)
    tape.backward(lrp.steps, torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0))
    R = tape.relevances[act_step.index]  # (B, N, hidden): channels are the last dim
    result = reference_samples(lrp, ds, "blocks.0.mlp.fc1", k=3, batch_size=4, progress=False)
    assert result.concepts.tolist() == list(range(32)) and result.layer_shape == (5, 32)
    check_against(result, R.transpose(1, 2), 3)
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("a", o.detach()))
    model(x)
    act = reference_samples(lrp, ds, "blocks.1", k=3, mode="activation", batch_size=4, progress=False)
    check_against(act, seen["a"].transpose(1, 2), 3)


def test_batch_size_and_batches_or_dataset_give_one_result():
    lrp, ds = lrpkit.LRP(small_cnn()), data(n=11)
    a = reference_samples(lrp, ds, "0", k=5, batch_size=11, progress=False)
    b = reference_samples(lrp, ds, "0", k=5, batch_size=2, progress=False)
    x, y = ds.tensors
    batches = [(x[i:i + 3], y[i:i + 3]) for i in range(0, 11, 3)]
    c = reference_samples(lrp, batches, "0", k=5, progress=False)
    for other in (b, c):
        assert torch.equal(a.indices, other.indices) and torch.equal(a.positions, other.positions)
        assert torch.allclose(a.scores, other.scores, rtol=1e-6)
        assert torch.equal(a.labels, other.labels) and torch.equal(a.boxes, other.boxes)
    assert torch.equal(a.labels, y[a.indices])
    assert a.samples == c.samples == 11


def test_target_label_explains_each_samples_label():
    lrp, ds = lrpkit.LRP(small_cnn()), data(n=6)
    x, y = ds.tensors
    by_label = reference_samples(lrp, ds, "3", k=2, target="label", progress=False)
    R = lrp(x, y, layerwise=True).layerwise[4]
    check_against(by_label, R.flatten(2), 2)
    with pytest.raises(ValueError, match="needs one integer label per sample"):
        reference_samples(lrp, x, "3", k=2, target="label", progress=False)


def test_load_samples_from_a_dataset_a_tensor_and_batches():
    from lrpkit.crp import load_samples

    ds = data(n=7)
    x, y = ds.tensors
    idx = torch.tensor([[6, 0], [3, 3]])
    for source in (ds, x, [(x[i:i + 3], y[i:i + 3]) for i in range(0, 7, 3)], [x[:4], x[4:]]):
        assert torch.equal(load_samples(source, idx), x[idx])
    with pytest.raises(IndexError, match="sample 9 is beyond the 7 samples"):
        load_samples([x[:4], x[4:]], [9])


def test_a_crp_analyzer_gives_its_lrp_layer_and_channels():
    """Needs the CRP analyzer (``lrpkit.crp.CRP``, ``IndexedConcepts``)."""
    from lrpkit.crp import CRP, IndexedConcepts

    lrp, ds = lrpkit.LRP(small_cnn()), data(n=6)
    crp = CRP(lrp, layer="3", concepts=IndexedConcepts(4, 1))
    via_crp = reference_samples(crp, ds, k=2, progress=False)
    direct = reference_samples(lrp, ds, "3", concepts=[4, 1], k=2, progress=False)
    assert via_crp.concepts.tolist() == [4, 1] and torch.equal(via_crp.indices, direct.indices)
    assert torch.equal(via_crp.scores, direct.scores)


# -- resumption -----------------------------------------------------------------------------------------------------
class Interrupted(Dataset):
    """A Dataset that fails at sample ``fail_at`` (an interrupted scan) and counts what it loads."""

    def __init__(self, base, fail_at=None):
        self.base, self.fail_at, self.loaded = base, fail_at, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        self.loaded.append(i)
        return self.base[i]


def test_an_interrupted_scan_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    lrp, base = lrpkit.LRP(small_cnn()), data(n=10)
    whole = reference_samples(lrp, base, "3", k=3, batch_size=2, progress=False)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        reference_samples(lrp, Interrupted(base, fail_at=7), "3", k=3, batch_size=2, cache=cache, progress=False)
    assert (cache / "state.rank0.pt").is_file()  # batches 0, 1, 2 (samples 0..5) were saved
    computed = []
    real = reference_module._scores
    monkeypatch.setattr(reference_module, "_scores", lambda *a: computed.append(a[3].shape[0]) or real(*a))
    again = Interrupted(base)
    resumed = reference_samples(lrp, again, "3", k=3, batch_size=2, cache=cache, progress=False)
    assert computed == [2, 2]  # batches 3 and 4 only
    assert again.loaded == [0, 6, 7, 8, 9]  # the first sample (shapes and the cache's check), then what was left
    for f in ("indices", "scores", "positions", "labels", "boxes"):
        assert torch.equal(getattr(whole, f), getattr(resumed, f)), f
    assert sorted(p.name for p in cache.iterdir()) == ["config.json", "state.pt"]
    computed.clear()
    done = reference_samples(lrp, base, "3", k=3, batch_size=2, cache=cache, progress=False)
    assert computed == [] and torch.equal(done.indices, whole.indices)  # all done: nothing computed


def test_an_interrupted_iterable_scan_resumes(tmp_path):
    lrp, base = lrpkit.LRP(small_cnn()), data(n=9)
    x, y = base.tensors
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 9, 2)]

    def failing():
        for b, batch in enumerate(batches):
            if b == 3:
                raise RuntimeError("the loader died")
            yield batch

    whole = reference_samples(lrp, batches, "0", k=4, mode="activation", progress=False)
    with pytest.raises(RuntimeError, match="loader died"):
        reference_samples(lrp, failing(), "0", k=4, mode="activation", cache=tmp_path, progress=False)
    resumed = reference_samples(lrp, batches, "0", k=4, mode="activation", cache=tmp_path, progress=False)
    assert torch.equal(whole.indices, resumed.indices) and torch.equal(whole.scores, resumed.scores)


def test_the_cache_refuses_other_arguments(tmp_path):
    lrp, ds = lrpkit.LRP(small_cnn()), data(n=6)
    reference_samples(lrp, ds, "3", k=2, cache=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different configuration \(k: 2 there, 3 now\)"):
        reference_samples(lrp, ds, "3", k=3, cache=tmp_path, progress=False)
    with pytest.raises(ValueError, match="mode: 'relevance' there, 'activation' now"):
        reference_samples(lrp, ds, "3", k=2, mode="activation", cache=tmp_path, progress=False)
    with pytest.raises(ValueError, match="parameters"):
        reference_samples(lrpkit.LRP(small_cnn(seed=1)), ds, "3", k=2, cache=tmp_path, progress=False)
    fresh = reference_samples(lrp, ds, "3", k=3, cache=tmp_path, overwrite=True, progress=False)
    assert fresh.k == 3
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="holds a scan's state but no config.json"):
        reference_samples(lrp, ds, "3", k=3, cache=tmp_path, progress=False)


# -- torchrun -------------------------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent('''
    import sys, torch
    from torch import nn
    from torch.utils.data import TensorDataset
    import lrpkit
    from lrpkit.crp import reference as reference_module, reference_samples

    BATCHES = []  # the sizes of the batches this process computed
    real = reference_module._scores
    reference_module._scores = lambda *a: BATCHES.append(a[3].shape[0]) or real(*a)

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(13, 3, 8, 8, generator=g), torch.randint(0, 3, (13,), generator=g)
        return lrpkit.LRP(model), TensorDataset(x, y), [(x[i:i + 2], y[i:i + 2]) for i in range(0, 13, 2)]

    def scan(cache=None):
        lrp, ds, batches = setup()
        a = reference_samples(lrp, ds, "3", k=4, batch_size=2, cache=cache, progress=False)
        b = reference_samples(lrp, batches, "0", k=3, mode="activation", progress=False)
        return {f"{name}.{f}": getattr(r, f) for name, r in (("ds", a), ("it", b))
                for f in ("indices", "scores", "positions", "labels", "boxes")}, list(BATCHES)

    if __name__ == "__main__":
        result, batches = scan(sys.argv[1])
        rank = torch.distributed.get_rank()
        torch.save({"result": result, "batches": batches}, f"{sys.argv[2]}.rank{rank}")
        torch.distributed.destroy_process_group()  # the group reference_samples created (and kept for more calls)
''')


def test_torchrun_two_processes_equal_one(tmp_path, monkeypatch):
    script = tmp_path / "scan.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out, cache = tmp_path / "two", tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(cache), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    namespace: dict = {}
    monkeypatch.setattr(reference_module, "_scores", reference_module._scores)  # the script wraps it: restored after
    exec(compile(SCRIPT, str(script), "exec"), namespace)  # the same setup in this one process
    one, batches = namespace["scan"]()
    assert batches == [2] * 6 + [1] + [2] * 6 + [1]  # one process: the 7 batches of each scan
    ranks = [torch.load(f"{out}.rank{r}") for r in (0, 1)]
    # 7 batches (13 samples by 2): rank 0 computes batches 0, 2, 4, 6, rank 1 batches 1, 3, 5 (of each scan)
    assert ranks[0]["batches"] == [2, 2, 2, 1] * 2 and ranks[1]["batches"] == [2, 2, 2] * 2
    for rank, two in enumerate(ranks):  # every rank returns the merged result
        assert sorted(two["result"]) == sorted(one)
        for key, value in one.items():
            assert torch.equal(value, two["result"][key]), (rank, key)
    assert sorted(p.name for p in cache.iterdir()) == ["config.json", "state.pt"]  # the shards merged
    state = torch.load(cache / "state.pt", weights_only=True)
    assert state["done"] == list(range(7))  # 13 samples in 7 batches of 2, every one done once


# -- errors ---------------------------------------------------------------------------------------------------------
def test_clear_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    lrp, x = lrpkit.LRP(model.eval()), torch.randn(5, 3, 8, 8)
    with pytest.raises(ValueError, match=r"no layer '1'.*fuses each BatchNorm.*Layers that can be chosen: 0, 2, 3, 4"):
        reference_samples(lrp, x, "1", progress=False)  # the BatchNorm, fused into the convolution
    with pytest.raises(ValueError, match=r"no layer 'conv'"):
        reference_samples(lrp, x, "conv", progress=False)
    with pytest.raises(ValueError, match=r"layer index 9 is out of range: the rule table has indices 0..3"):
        reference_samples(lrp, x, 9, progress=False)
    with pytest.raises(ValueError, match=r"channel 4 is out of range: the layer has 4 channels \(0..3\)"):
        reference_samples(lrp, x, "0", concepts=[1, 4], k=2, progress=False)
    with pytest.raises(ValueError, match=r"k=6 is larger than the data set \(5 samples\)"):
        reference_samples(lrp, x, "0", k=6, progress=False)
    with pytest.raises(ValueError, match=r"k=6 is larger than the data set \(5 samples\)"):
        reference_samples(lrp, [x[:2], x[2:]], "0", k=6, progress=False)  # batches: known after the pass
    with pytest.raises(ValueError, match="mode must be 'relevance' or 'activation'"):
        reference_samples(lrp, x, "0", mode="gradient", progress=False)
    with pytest.raises(ValueError, match="statistic must be 'max' or 'sum'"):
        reference_samples(lrp, x, "0", statistic="mean", progress=False)
    with pytest.raises(ValueError, match="k must be a positive int"):
        reference_samples(lrp, x, "0", k=0, progress=False)
    with pytest.raises(TypeError, match="needs an lrpkit.LRP or an lrpkit.CRP"):
        reference_samples(model, x, "0", progress=False)
    with pytest.raises(ValueError, match="name the layer"):
        reference_samples(lrp, x, progress=False)


# -- crops ----------------------------------------------------------------------------------------------------------
class Residual(nn.Module):
    """``y = x + conv(x)`` with a 3x3 convolution, padding 1 (canonized to a SkipConnection)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def crop_cnn():
    """12x12 input -> conv 3x3 pad 1 (12x12) -> ReLU -> maxpool 2 (6x6) -> conv 3x3 stride 2 pad 1 (3x3) -> ReLU
    -> head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(2, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(18, 2)).eval()


def test_receptive_field_crops_by_hand():
    lrp = lrpkit.LRP(crop_cnn())
    ref = locate(lrp, "4")  # the ReLU after the second convolution, 3x3 positions
    boxes = crop_boxes(lrp, ref, torch.tensor([0, 5, 4]), (1, 12, 12))
    # position 0 = (0, 0). conv 3x3, stride 2, pad 1 (6x6 in): rows [0·2 − 1, 0·2 − 1 + 2] = [−1, 1] -> [0, 1];
    # maxpool 2 (12x12 in): [0·2, 1·2 + 1] = [0, 3]; conv 3x3 pad 1: [0 − 1, 3 − 1 + 2] = [−1, 4] -> [0, 4].
    # Columns the same: the box is rows 0..4, cols 0..4 -> (0, 0, 5, 5).
    # position 5 = (1, 2). rows: [1, 3] -> [2, 7] -> [1, 8]; cols: [3, 5] -> [6, 11] -> [5, 12] clipped to [5, 11]
    # -> (1, 5, 9, 12). position 4 = (1, 1): rows and cols [1, 8] -> (1, 1, 9, 9).
    assert boxes.tolist() == [[0, 0, 5, 5], [1, 5, 9, 12], [1, 1, 9, 9]]
    # the scan gives each sample the box of its own position
    ds = data(n=6, size=12)
    ds = TensorDataset(ds.tensors[0][:, :1], ds.tensors[1])
    result = reference_samples(lrp, ds, "4", k=3, mode="activation", progress=False)
    assert torch.equal(result.boxes, crop_boxes(lrp, ref, result.positions, (1, 12, 12)))
    # the box is exact: every pixel in it moves the position's pre-activation, none outside it does
    x = torch.randn(1, 1, 12, 12, requires_grad=True)
    net = crop_cnn()
    with torch.no_grad():  # all-positive weights and avg pooling: no ReLU is off, no max hides a pixel
        for m in (net[0], net[3]):
            m.weight.abs_()
            m.bias.fill_(1.0)
    probe = nn.Sequential(net[0], net[1], nn.AvgPool2d(2), net[3])
    probe(x.abs() + 1)[0, 0, 1, 2].backward()
    rows, cols = (x.grad[0, 0] != 0).nonzero().T
    assert (rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1) == (1, 5, 9, 12)


def test_receptive_field_of_a_residual_block_is_the_union():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), Residual(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 64, 2)).eval()
    def canonize_residual(m, path):
        return [(path, lrpkit.SkipConnection(make_chain(flatten(m.conv, join(path, "conv")))))]

    lrp = lrpkit.LRP(model, registry=lrpkit.registered(canonizers={Residual: canonize_residual}))
    # the block's output at (3, 5): identity (3, 5) ∪ conv 3x3 pad 1 rows [2, 4], cols [4, 6]; the 1x1 conv
    # below keeps the box -> (2, 4, 5, 7). The convolution inside the block alone has the same box; the 1x1
    # conv at the bottom is one pixel.
    for layer in ("2", "2.conv", "3"):
        ref = locate(lrp, layer)
        assert crop_boxes(lrp, ref, torch.tensor([3 * 8 + 5]), (1, 8, 8)).tolist() == [[2, 4, 5, 7]], layer
    assert crop_boxes(lrp, locate(lrp, "0"), torch.tensor([3 * 8 + 5]), (1, 8, 8)).tolist() == \
        [[3, 5, 4, 6]]


def test_one_resolver_for_crp_and_the_scan():
    # CRP and the scan resolve names with the same function: the same step for a module path and an index; an
    # inner site (CRP conditions there) is refused by the scan with the layer it belongs to, and a misspelt name
    # gets the close ones suggested
    lrp, x = lrpkit.LRP(tiny_vit()), torch.randn(3, 3, 16, 16)
    crp = lrpkit.CRP(lrp, "blocks.1.mlp.fc1", lrpkit.crp.TopConcepts(1))
    assert crp.step is locate(lrp, "blocks.1.mlp.fc1").step is locate(lrp, crp.step.index).step
    assert locate(lrp, "blocks.1.attn.values").site == "values"
    with pytest.raises(ValueError, match=r"'blocks.1.attn.values' is a rule's inner site.*choose a layer, e.g. "
                                         r"'blocks.1.attn'"):
        reference_samples(lrp, x, "blocks.1.attn.values", progress=False)
    with pytest.raises(ValueError, match=r"no layer 'blocks.1.mlp.fc3'.*did you mean .*'blocks.1.mlp.fc1'"):
        reference_samples(lrp, x, "blocks.1.mlp.fc3", progress=False)


def test_vit_crops_are_patches_and_the_class_token_the_image():
    model = tiny_vit()  # 16x16 input, patch 8: a 2x2 grid after the class token, tokens 0 (class), 1..4
    lrp = lrpkit.LRP(model)
    ref = locate(lrp, "blocks.1")
    boxes = crop_boxes(lrp, ref, torch.tensor([0, 1, 2, 3, 4]), (3, 16, 16))
    # token t >= 1: patch t − 1 = r·2 + c -> rows [8r, 8r + 8), cols [8c, 8c + 8); token 0: the whole image
    assert boxes.tolist() == [[0, 0, 16, 16], [0, 0, 8, 8], [0, 8, 8, 16], [8, 0, 16, 8], [8, 8, 16, 16]]
    # the patch embedding (a 8x8 convolution with stride 8, a (B, C, 2, 2) map) gives the same patches
    embed = locate(lrp, "patch_embed.proj")
    assert crop_boxes(lrp, embed, torch.arange(4), (3, 16, 16)).tolist() == boxes[1:].tolist()
    ds = data(n=5, size=16)
    result = reference_samples(lrp, ds, "blocks.1", k=2, mode="activation", progress=False)
    assert torch.equal(result.boxes, boxes[result.positions])


# -- the figure -----------------------------------------------------------------------------------------------------
def test_concept_grid_cuts_the_boxes_and_overlays_the_heatmaps(tmp_path):
    from lrpkit.viz import concept_grid, concept_panels

    refs = torch.rand(2, 2, 3, 8, 8)  # 2 concepts x 2 references
    boxes = torch.tensor([[[0, 0, 4, 4], [2, 3, 6, 8]], [[0, 0, 8, 8], [7, 7, 8, 8]]])
    heat = torch.zeros(2, 2, 8, 8)
    heat[0, 1, 2, 3] = 1.0  # the top-left pixel of the crop (2, 3, 6, 8)
    image, image_heat = torch.rand(3, 8, 8), torch.zeros(2, 3, 8, 8)
    image_heat[1, :, 0, 0] = -1.0  # summed over the channels: -3 at (0, 0) of concept 1's map
    panels = concept_panels(refs, heatmaps=heat, boxes=boxes, image=image, image_heatmaps=image_heat, alpha=1.0)
    assert [[tuple(p.shape) for p in row] for row in panels] == [[(3, 8, 8), (3, 4, 4), (3, 4, 5)],
                                                                [(3, 8, 8), (3, 8, 8), (3, 1, 1)]]
    assert torch.equal(panels[0][1], refs[0, 0, :, :4, :4])  # zero relevance: the crop itself
    assert torch.equal(panels[0][2][:, 0, 0], torch.tensor([1.0, 0, 0]))  # the relevant pixel, red at alpha 1
    assert torch.equal(panels[0][2][:, 1:, 1:], refs[0, 1, :, 3:6, 4:8])
    assert torch.equal(panels[1][0][:, 0, 0], torch.tensor([0.0, 0, 1]))  # negative: blue
    assert torch.equal(panels[1][0][:, 1:], image[:, 1:])
    assert concept_panels(None, image=image, image_heatmaps=image_heat)[0][0].shape == (3, 8, 8)
    path = concept_grid([[refs[0, 0]], [refs[1, 0]]], tmp_path / "grid.png", row_titles=["ch 3", "ch 5"],
                        image=image, image_heatmaps=image_heat[:, 0], column_titles=["image", "reference"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="row_titles has 1 entries for 2 concepts"):
        concept_grid(refs, tmp_path / "bad.png", row_titles=["one"])
    with pytest.raises(ValueError, match="2 concept heatmaps of the image but 1 rows of references"):
        concept_panels(refs[:1], image=image, image_heatmaps=image_heat)
