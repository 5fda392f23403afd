"""The paper's predictor architectures: shapes, save/load beside a model, and they train."""

from __future__ import annotations

import torch

from dynllava.predictors import PREDICTORS_FILE, Predictors


def test_shapes_and_pooling_ignore_padding():
    torch.manual_seed(0)
    p = Predictors(64).eval()
    hidden = torch.randn(2, 10, 64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        logits = p.image(hidden, mask)
        alone = p.image(hidden[1:, :6], mask[1:, :6])
    assert logits.shape == (2, 10, 2)
    torch.testing.assert_close(logits[1, :6], alone[0], atol=1e-5, rtol=1e-5)
    assert p.text(hidden[:, 0]).shape == (2, 2)


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    p = Predictors(64, layer=3, image_width=128)
    path = p.save(tmp_path)
    assert path.name == PREDICTORS_FILE
    q = Predictors.load(tmp_path)
    assert q is not None and q.layer == 3 and q.image.width == 128
    for (name, a), (_, b) in zip(p.state_dict().items(), q.state_dict().items()):
        assert torch.equal(a, b), name
    assert Predictors.load(tmp_path / "missing") is None


def test_predictors_learn():
    """A few steps of gradient descent fit a token-level keep target: the modules are trainable."""
    torch.manual_seed(0)
    p = Predictors(16)
    hidden = torch.randn(4, 12, 16)
    target = (hidden[..., 0] > 0).long()  # keep tokens whose first channel is positive
    mask = torch.ones(4, 12, dtype=torch.bool)
    opt = torch.optim.Adam(p.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(p.image(hidden, mask).flatten(0, 1), 1 - target.flatten())
        loss = loss + torch.nn.functional.cross_entropy(p.text(hidden).flatten(0, 1), 1 - target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_image_predictor_flops_follow_its_width():
    """The cost model charges the predictor that is loaded, not always the paper's 512-wide one: per token, the
    two blocks cost 2 FLOPs per matrix weight plus the attention products (4 * n * W per block, n = 1 here)."""
    import dataclasses

    from dynllava import costs
    from dynllava.config import ModelSpec
    from dynllava.loading import hf_config_from_spec

    dims = costs.ModelDims.from_hf_config(hf_config_from_spec(ModelSpec()))
    for width in (512, 128):
        d = dataclasses.replace(dims, predictor_width=width)
        block_weights = sum(x.numel() for n, x in Predictors(dims.hidden, image_width=width).image.named_parameters()
                            if x.dim() == 2 and n.startswith("blocks"))
        blocks_only = costs.image_predictor_flops(d, 1) - costs.image_predictor_flops(d, 1, blocks=0)
        assert blocks_only == 2 * block_weights + 2 * 4 * width
