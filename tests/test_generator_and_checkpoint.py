"""Loading goes through from_pretrained like a user's folder; checkpoints are atomic and restore exactly."""

import json

import pytest
import torch

from diffrl.algos.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffrl.errors import UserError
from diffrl.policies.generator import load_generator
from diffrl.policies.layout_adapter import LayoutAdapter, LayoutAdapterConfig, box_token_mask
from diffrl.shapes.world import sample_layouts


def test_saved_generator_loads_back_with_identical_outputs(tiny_generator, saved_generator):
    assert json.loads((saved_generator / "model_index.json").read_text())["_class_name"] == "diffrl.LayoutGenerator"
    for part in ("transformer/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json",
                 "layout_adapter/model.safetensors"):
        assert (saved_generator / part).is_file()
    loaded = load_generator(str(saved_generator))
    layouts = sample_layouts(3, [1, 4], seed=0)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        expected = tiny_generator.velocity(x, t, tiny_generator.encode_layouts(layouts))
        got = loaded.velocity(x, t, loaded.encode_layouts(layouts))
    torch.testing.assert_close(got, expected)


def test_the_loader_table_picks_the_backbone_by_pipeline_class_and_a_new_one_is_a_row(tmp_path, saved_generator,
                                                                                      monkeypatch):
    from diffrl.policies.generator import LOADERS, Denoiser

    assert isinstance(load_generator(str(saved_generator)).denoiser, Denoiser)
    assert list(LOADERS) == ["diffrl.LayoutGenerator", "StableDiffusion3Pipeline", "FluxPipeline",
                             "StableDiffusionPipeline", "StableDiffusionGLIGENPipeline"]
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MyPipeline"}))
    with pytest.raises(UserError, match=r"model_index.json is for 'MyPipeline'; diffrl loads diffrl.LayoutGenerator, "
                                        r"StableDiffusion3Pipeline, FluxPipeline, StableDiffusionPipeline"):
        load_generator(str(tmp_path))
    seen = []

    def my_loader(path, **options):
        seen.append((path, options))
        return load_generator(str(saved_generator))

    monkeypatch.setitem(LOADERS, "MyPipeline", my_loader)
    generator = load_generator(str(tmp_path), dtype="bfloat16", t5=None)
    assert seen == [(tmp_path, {"dtype": "bfloat16"})] and generator.source == str(tmp_path)


def test_fresh_adapter_is_the_identity_and_grounding_changes_the_output_once_gates_open(tiny_generator):
    layouts = sample_layouts(2, [2], seed=0)
    cond = tiny_generator.encode_layouts(layouts)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.7, 0.7])
    transformer = tiny_generator.denoiser.transformer
    with torch.no_grad():
        plain = transformer(hidden_states=x, encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled,
                            timestep=t * 1000, return_dict=False)[0]
        assert torch.equal(tiny_generator.velocity(x, t, cond), plain)  # zero gates: the backbone alone
        for fuser in tiny_generator.denoiser.adapter.fusers:
            fuser.gate_attn.fill_(0.5)
        opened = tiny_generator.velocity(x, t, cond)
        for fuser in tiny_generator.denoiser.adapter.fusers:
            fuser.gate_attn.fill_(0.0)
    assert not torch.allclose(opened, plain)


def test_box_token_mask_marks_the_cells_a_box_overlaps():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0]]])
    mask = box_token_mask(boxes, torch.tensor([[True, False]]), 4, 4)  # [1, 16, 2]
    grid = mask[0, :, 0].view(4, 4)
    assert grid.tolist() == [[True, True, False, False]] + [[False] * 4] * 3
    assert not mask[0, :, 1].any()  # padded instance is never visible


def test_checkpoint_roundtrip_is_atomic_and_restores_weights_optimizer_and_rng(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    rng = {"torch": torch.get_rng_state()}
    save_checkpoint(tmp_path, 1, {"net": net}, opt, rng)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 2, {"net": net}, opt, rng)
    save_checkpoint(tmp_path, 3, {"net": net}, opt, rng)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["checkpoint-000002.safetensors", "checkpoint-000003.safetensors"]
    (tmp_path / ".checkpoint-000004.safetensors.tmp").write_bytes(b"torn")  # an interrupted write
    assert latest_checkpoint(tmp_path).name == "checkpoint-000003.safetensors"
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    iteration, restored_rng = load_checkpoint(latest_checkpoint(tmp_path), {"net": other}, other_opt)
    assert iteration == 3 and torch.equal(restored_rng["torch"], rng["torch"])
    assert torch.equal(other.weight, net.weight)
    a, b = opt.state_dict(), other_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for key in a["state"][pid]:
            assert torch.equal(torch.as_tensor(a["state"][pid][key]), torch.as_tensor(b["state"][pid][key]))


def test_adapter_config_roundtrip():
    cfg = LayoutAdapterConfig(dim=16, phrase_dim=8, num_blocks=2, num_heads=2)
    assert LayoutAdapter(LayoutAdapterConfig(**cfg.to_dict())).config == cfg


def test_text_cache_serves_a_batch_larger_than_the_cache(tiny_generator):
    from diffrl.policies.text import TextEncoder

    small = TextEncoder(tiny_generator.text.tokenizer, tiny_generator.text.model, cache_size=2)
    texts = ["a red square", "a blue circle", "a green triangle", "a red square"]
    hidden, pooled = small.encode(texts)
    full_hidden, full_pooled = tiny_generator.text.encode(texts)
    torch.testing.assert_close(hidden, full_hidden)
    torch.testing.assert_close(pooled, full_pooled)
    assert len(small._cache) == 2


def test_reference_copy_keeps_its_own_grounding(tiny_generator):
    """The frozen reference (a deepcopy) must run *its own* adapter: same output at first, independent after."""
    import copy

    from diffrl.algos.replica import frozen_copy

    generator = copy.deepcopy(tiny_generator)
    for fuser in generator.denoiser.adapter.fusers:  # open the gates so grounding matters
        fuser.gate_attn.data.fill_(0.5)
    reference = frozen_copy(generator)
    cond = generator.encode_layouts(sample_layouts(2, [3], seed=1))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        torch.testing.assert_close(reference.velocity(x, t, cond), generator.velocity(x, t, cond), rtol=0, atol=0)
        before = generator.velocity(x, t, cond)
        for fuser in reference.denoiser.adapter.fusers:
            fuser.gate_attn.fill_(0.0)
        assert torch.equal(generator.velocity(x, t, cond), before)  # the policy is untouched
        assert not torch.allclose(reference.velocity(x, t, cond), before)  # the reference lost its grounding
