"""I-DRUID's IDM and IDC loss: the pure math by hand, the adapter with IDM off (unchanged) and on, and λ_dis in the
learners (RL, SFT) and in `diffrl pretrain --idm`."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torchrl.envs.utils import ExplorationType, set_exploration_type

from diffrl.algos.grpo import GRPO
from diffrl.algos.sft_learner import SFT
from diffrl.algos.replica import frozen_copy
from diffrl.algos.trainer import paired_renders
from diffrl.cli import main
from diffrl.config import AlgoConfig, JointConfig
from diffrl.errors import UserError
from diffrl.policies.actor import OBSERVATION_KEYS, SDEPolicyNet
from diffrl.policies.backbones.tiny import PACKAGED
from diffrl.policies.generator import LayoutGenerator, load_generator
from diffrl.policies.idm import InstanceDisentangler, cross_attention_score, disentangle_loss, split
from diffrl.policies.layout_adapter import GatedFuser, LayoutAdapter, LayoutAdapterConfig, box_token_mask
from diffrl.shapes.world import sample_layouts
from tests.test_env_and_actor import make


# --- the pure functions, by hand ------------------------------------------------------------------------------

def test_cas_and_l_dis_on_a_small_map_by_hand():
    # One instance whose box is the left column of a 2×3 map.
    #   R⁺ = 0.4 0.1 0.3     M = 1 0 0     outside values: 0.1, 0.3, 0.2, 0.0 → AVG = 0.6 / 4 = 0.15
    #        0.0 0.2 0.0         1 0 0     |0.1−.15| + |0.3−.15| + |0.2−.15| + |0.0−.15| = .05+.15+.05+.15 = 0.4
    # (the 0.4 and 0.0 inside the box do not count). R⁻ is flat outside the box (0.2 everywhere) → CAS = 0.
    # (Reading AVG literally as the mean of R⊙(1−M) over all 6 cells would give 0.1 instead of 0.15: we use the
    # mean outside the box, see diffrl/policies/idm.py.)
    pos = torch.tensor([[[[0.4, 0.1, 0.3], [0.0, 0.2, 0.0]]]], requires_grad=True)  # [N=1, n=1, 2, 3]
    neg = torch.tensor([[[[0.1, 0.2, 0.2], [0.1, 0.2, 0.2]]]])
    mask = torch.tensor([[[[1.0, 0, 0], [1.0, 0, 0]]]])
    valid = torch.tensor([[True]])
    torch.testing.assert_close(cross_attention_score(pos, mask, valid), torch.tensor([0.4]))
    torch.testing.assert_close(cross_attention_score(neg, mask, valid), torch.tensor([0.0]))
    # L_dis = softplus(0.4 − 0) = ln(1 + e^0.4) = ln(2.4918247) = 0.9130153
    loss = disentangle_loss(pos, neg, mask, valid)
    assert abs(float(loss.detach()) - 0.9130153) < 1e-6
    # dL/dR⁺ = sigmoid(0.4) · dCAS/dR⁺; at cell (0, 2) (above the average): +1 − (1/4)·Σ outside signs
    # (−1 + 1 + 1 − 1 = 0) = 1, so 0.5986877; inside the box: 0; at (0, 1) (below): −1.
    loss.backward()
    assert abs(float(pos.grad[0, 0, 0, 2]) - 0.5986877) < 1e-6
    assert abs(float(pos.grad[0, 0, 0, 1]) + 0.5986877) < 1e-6
    assert pos.grad[0, 0, :, 0].abs().max() == 0


def test_cas_leaves_out_padding_and_boxes_that_cover_the_map_and_l_dis_averages_the_batch():
    pos = torch.tensor([[[0.4, 0.1, 0.3], [0.0, 0.2, 0.0]]])
    flat = torch.full((2, 3), 0.2)
    garbage = torch.tensor([[9.0, -3.0, 5.0], [1.0, 0.0, 7.0]])
    left, everywhere = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]), torch.ones(2, 3)
    # sample 0: the hand example + a padded instance with a wild map; sample 1: a box covering the whole map
    maps_pos = torch.stack([torch.stack([pos[0], garbage]), torch.stack([garbage, garbage])])  # [2, 2, 2, 3]
    maps_neg = torch.stack([torch.stack([flat, garbage]), torch.stack([flat, flat])])
    masks = torch.stack([torch.stack([left, left]), torch.stack([everywhere, left])])
    valid = torch.tensor([[True, False], [True, False]])
    torch.testing.assert_close(cross_attention_score(maps_pos, masks, valid), torch.tensor([0.4, 0.0]))
    # mean of softplus(0.4) = 0.9130153 and softplus(0) = ln 2 = 0.6931472 → 0.8030812
    assert abs(float(disentangle_loss(maps_pos, maps_neg, masks, valid)) - 0.8030812) < 1e-6


def test_split_is_alpha_times_e_and_its_complement():
    e = torch.full((1, 2, 3, 2, 2), 4.0)  # [N, m, C, H, W]
    alpha = torch.tensor([[[0.25, 0.5, 1.0], [0.75, 0.5, 0.0]]])  # [N, m, C]
    pos, neg = split(alpha, e)
    assert pos[0, 0, :, 0, 0].tolist() == [1.0, 2.0, 4.0] and neg[0, 0, :, 0, 0].tolist() == [3.0, 2.0, 0.0]
    assert torch.equal(pos + neg, e)


def test_idm_weights_are_a_softmax_over_the_valid_features_uniform_at_init():
    torch.manual_seed(0)
    idm = InstanceDisentangler(channels=4)
    e = torch.randn(2, 3, 4, 6, 6)  # [N, m = 2 instances + global, C, H, W]
    masks = torch.zeros(2, 3, 6, 6)
    masks[:, 0, :2, :2] = 1  # instance 0: the top-left 2×2 cells
    masks[:, 1, 3:, 3:] = 1
    masks[:, 2] = 1  # the global feature: all ones
    valid = torch.tensor([[True, True, True], [True, False, True]])  # sample 1: instance 1 is padding
    alpha = idm(e, masks, valid)
    assert alpha.shape == (2, 3, 4)
    torch.testing.assert_close(alpha[0], torch.full((3, 4), 1 / 3))  # zero-initialised last FC: α = 1/m
    torch.testing.assert_close(alpha[1, [0, 2]], torch.full((2, 4), 1 / 2))
    assert alpha[1, 1].abs().max() == 0
    torch.nn.init.normal_(idm.fc[-1].weight)  # a trained IDM: weights differ per feature and channel
    alpha = idm(e, masks, valid)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(2, 4))
    assert alpha[0].std() > 0.01
    # the feature branch pools inside each feature's own mask: instance 0 ignores features ≥ 2 cells (one
    # conv radius + 1) away from its box, while the mask branch makes a moved box change α
    changed = e.clone()
    changed[:, 0, :, 4:, 4:] += 10
    torch.testing.assert_close(idm(changed, masks, valid), alpha, rtol=0, atol=0)
    moved = masks.clone()
    moved[:, 0] = 0
    moved[:, 0, :4, :4] = 1
    assert not torch.allclose(idm(e, moved, valid)[:, 0], alpha[:, 0])


# --- the adapter with IDM off: unchanged ------------------------------------------------------------------------

def _pre_idm_fuser_forward(fuser, x, grounding, key_mask):
    """`GatedFuser.forward` verbatim as it was before IDM existed (commit 5d421b4)."""
    n, t, d = x.shape
    h = fuser.num_heads
    both = fuser.norm1(torch.cat([x, grounding], dim=1))
    q = fuser.to_q(both[:, :t]).view(n, t, h, d // h).transpose(1, 2)
    k, v = fuser.to_kv(both).view(n, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
    sees_image = key_mask.new_ones(n, t, t)
    attn_mask = torch.cat([sees_image, key_mask], dim=2)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = fuser.to_out(out.transpose(1, 2).reshape(n, t, d))
    x = x + torch.tanh(fuser.gate_attn).to(x.dtype) * out
    return x + torch.tanh(fuser.gate_dense).to(x.dtype) * fuser.ff(fuser.norm2(x))


def _fuser_inputs(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]][:k]] * 2)
    instance_mask = torch.tensor([[True, True, False][:k], [True, False, False][:k]])
    return (torch.randn(2, 16, 128, generator=g), torch.randn(2, k, 128, generator=g),
            box_token_mask(boxes, instance_mask, 4, 4), instance_mask)


def test_shapes_tiny_loads_with_idm_off_and_its_outputs_are_unchanged():
    generator = load_generator("shapes-tiny")
    adapter = generator.denoiser.adapter
    config = json.loads((PACKAGED / "layout_adapter" / "config.json").read_text())
    assert "idm" not in config and adapter.config.idm is False  # an adapter saved before IDM existed
    assert not any("idm" in key for key in adapter.state_dict()) and all(f.idm is None for f in adapter.fusers)
    layouts = sample_layouts(3, [2, 5], seed=0)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = generator.velocity(x, torch.tensor([0.9, 0.5, 0.1]), generator.encode_layouts(layouts))
    # every 1000th value and the mean |v|, as the pre-IDM code computed them (commit 5d421b4, one CPU thread)
    expected = [-1.1958038806915283, 0.41101574897766113, -0.29365813732147217, 1.7861894369125366, 2.1434836387634277,
                -0.8676457405090332, 4.834475994110107, 0.48106205463409424, -2.3548943996429443, -2.1788814067840576]
    torch.testing.assert_close(v.flatten()[::1000], torch.tensor(expected), rtol=0, atol=2e-5)
    assert abs(float(v.double().abs().mean()) - 1.2900971891427464) < 1e-5
    assert adapter.last_dis is None
    # and bit for bit: each fuser of the shipped model, gates opened, against the pre-IDM forward
    x, grounding, key_mask, _ = _fuser_inputs()
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.gate_attn.fill_(0.7)
            assert torch.equal(fuser(x, grounding, key_mask), _pre_idm_fuser_forward(fuser, x, grounding, key_mask))


# --- the adapter with IDM on ------------------------------------------------------------------------------------

def test_enhanced_features_split_the_fusers_attention_by_key():
    torch.manual_seed(0)
    fuser = GatedFuser(128, 4)
    with torch.no_grad():
        fuser.gate_attn.fill_(0.5)
    x, grounding, key_mask, instance_mask = _fuser_inputs()
    q, e = fuser.features(x, grounding, key_mask)  # e: [N, K+1, D, T]
    assert q.shape == (2, 4, 16, 32) and e.shape == (2, 4, 128, 16)
    # Σ over the K instances and the global part is the attention output `forward` feeds to to_out
    with torch.no_grad():
        expected = fuser(x, grounding, key_mask)
        got = x + torch.tanh(fuser.gate_attn) * fuser.to_out(e.sum(dim=1).transpose(1, 2))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # an instance adds nothing where its key is masked: padding everywhere, box 0 outside its top-left 2×2 cells
    assert e[:, 2].abs().max() == 0 and e[1, 1].abs().max() == 0
    outside_box0 = ~key_mask[0, :, 0]
    assert outside_box0.sum() == 12 and e[0, 0][:, outside_box0].abs().max() == 0
    assert e[0, 0][:, ~outside_box0].abs().sum(dim=0).gt(0).all()


def test_a_fresh_idm_leaves_a_trained_adapter_unchanged_and_reports_l_dis(tiny_generator):
    generator = copy.deepcopy(tiny_generator)
    for fuser in generator.denoiser.adapter.fusers:
        fuser.gate_attn.data.fill_(0.5)
        fuser.gate_dense.data.fill_(0.3)
    cond = generator.encode_layouts(sample_layouts(2, [3], seed=1))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        before = generator.velocity(x, t, cond)
    adapter = generator.denoiser.adapter
    adapter.enable_idm()
    assert adapter.config.idm and all(isinstance(f.idm, InstanceDisentangler) for f in adapter.fusers)
    after = generator.velocity(x, t, cond)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)  # α = 1/m: m·Σ R⁺ = Σ E
    dis = adapter.last_dis
    # a sum of softplus terms over 4 fusers, per sample: finite, positive, near ln 2 while R⁺ and R⁻ are alike
    assert dis.ndim == 0 and 0.3 < float(dis.detach()) < 1.2 and dis.requires_grad
    dis.backward()
    grads = {name: p.grad for name, p in adapter.named_parameters() if "idm.fc.2.weight" in name}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # the L_dis of another forward replaces it; a deepcopy (the frozen reference) does not carry its graph
    with torch.no_grad():
        generator.velocity(x[:1], t[:1], cond[torch.tensor([0])])
    assert not adapter.last_dis.requires_grad
    generator.velocity(x, t, cond)
    reference = frozen_copy(generator)
    assert reference.denoiser.adapter.last_dis is None and reference.denoiser.adapter.config.idm


def test_idm_adapter_saves_its_flag_and_loads_back_with_identical_outputs(tmp_path, tiny_generator):
    generator = copy.deepcopy(tiny_generator)
    generator.denoiser.adapter.enable_idm()
    with torch.no_grad():
        for fuser in generator.denoiser.adapter.fusers:
            fuser.gate_attn.fill_(0.5)
            torch.nn.init.normal_(fuser.idm.fc[-1].weight, std=0.1)  # a trained IDM: α no longer uniform
    generator.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "layout_adapter" / "config.json").read_text())["idm"] is True
    loaded = LayoutGenerator.from_pretrained(tmp_path)
    assert loaded.denoiser.adapter.config.idm
    cond = generator.encode_layouts(sample_layouts(2, [2], seed=3))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.8, 0.3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, t, cond), generator.velocity(x, t, cond), rtol=0, atol=0)
        torch.testing.assert_close(loaded.denoiser.adapter.last_dis, generator.denoiser.adapter.last_dis)
    # the old format (no "idm" key) still loads, with IDM off
    old = LayoutAdapterConfig(dim=16, phrase_dim=8, num_blocks=2).to_dict()
    del old["idm"]
    assert LayoutAdapter(LayoutAdapterConfig(**old)).config.idm is False


# --- λ_dis in the learners and in pretrain ----------------------------------------------------------------------

def _idm_generator(tiny_generator):
    generator = copy.deepcopy(tiny_generator)
    generator.denoiser.adapter.enable_idm()
    return generator


def test_rl_learner_adds_dis_coef_times_l_dis_of_each_minibatch_forward_and_logs_it(tiny_generator):
    generator = _idm_generator(tiny_generator)
    env, policy, actor, store = make(generator)
    learner = GRPO(policy, SDEPolicyNet(frozen_copy(generator), store, 0.7, 2), actor,
                   AlgoConfig(minibatch_size=1000, lr=0.0), joint=JointConfig(dis_coef=0.5))
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
    expected = []  # lr = 0: each window step's minibatch forward, redone by hand
    with torch.no_grad():
        for step in range(2):
            policy(*(rollout[:, step][k] for k in OBSERVATION_KEYS))
            expected.append(0.5 * float(generator.denoiser.adapter.last_dis))
    logs = learner.update(rollout)
    assert abs(logs["loss_dis"] - sum(expected) / 2) < 1e-5, (logs["loss_dis"], expected)
    plain = GRPO(policy, SDEPolicyNet(frozen_copy(generator), store, 0.7, 2), actor,
                 AlgoConfig(minibatch_size=1000, lr=0.0))
    assert "loss_dis" not in plain.update(rollout)  # dis_coef 0 (the default): no L_dis term


def test_dis_coef_without_idm_is_a_one_line_user_error(tiny_generator, saved_generator, tmp_path, capsys):
    env, policy, actor, store = make(tiny_generator)
    with pytest.raises(UserError, match="diffrl pretrain --idm"):
        GRPO(policy, SDEPolicyNet(frozen_copy(tiny_generator), store, 0.7, 2), actor, AlgoConfig(),
             joint=JointConfig(dis_coef=0.1))
    code = main(["train", "--model", str(saved_generator), "--algo", "grpo", "--iterations", "1",
                 "--out", str(tmp_path / "run"), "--quiet", "joint.dis_coef=0.1", "env.layouts_per_iter=2",
                 "env.num_steps=3", "eval.layouts=2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "joint.dis_coef=0.1 needs a generator with IDM" in err[0], err
    assert not (tmp_path / "run").exists()  # caught before the run folder is made
    assert main(["train", "--algo", "ppo", "joint.dis_coef=-1"]) == 2
    assert "joint.dis_coef: must be ≥ 0" in capsys.readouterr().err


@pytest.mark.parametrize("dis_coef", [0.0, 1.0])
def test_sft_trains_on_l_ldm_plus_dis_coef_times_l_dis(tiny_generator, dis_coef):
    generator = _idm_generator(tiny_generator)
    env, policy, actor, store = make(generator)
    learner = SFT(policy, SDEPolicyNet(frozen_copy(generator), store, 0.7, 2), actor,
                  AlgoConfig(minibatch_size=1000, lr=1e-3, epochs=1), joint=JointConfig(dis_coef=dis_coef))
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        rollout = env.rollout(5, actor, auto_reset=True)
    idm_fc = generator.denoiser.adapter.fusers[0].idm.fc[-1].weight
    before = idm_fc.detach().clone()
    logs = learner.update(rollout, paired_renders(generator, store))
    if dis_coef:
        assert set(logs) == {"loss_ldm", "loss_dis", "grad_norm"} and 0 < logs["loss_dis"] < 1.5
    else:
        assert set(logs) == {"loss_ldm", "grad_norm"}
    # the fresh tiny generator's gates are closed, so L_ldm cannot reach α yet: only L_dis moves the IDM
    assert torch.equal(idm_fc, before) == (dis_coef == 0)


def test_pretrain_idm_writes_an_idm_generator_and_logs_l_dis(tmp_path, capsys):
    from diffrl.algos.pretrain import PretrainConfig, pretrain

    out = tmp_path / "idm"
    pretrain(PretrainConfig(out=str(out), steps=2, batch_size=4, levels=(2,), idm=True, dis_coef=0.2, eval_every=2,
                            eval_layouts=2, num_steps=2))
    log = json.loads((out / "pretrain.json").read_text())
    assert log["config"]["idm"] is True and log["config"]["dis_coef"] == 0.2
    assert 0 < log["log"][-1]["loss_dis"] < 1.5 and log["log"][-1]["loss"] > 0
    generator = load_generator(str(out))
    assert generator.denoiser.adapter.config.idm
    capsys.readouterr()
    assert main(["pretrain", "--dis-coef", "0.2", "--out", str(tmp_path / "x"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "add --idm" in err[0]
    # --init from a generator without IDM (the shipped one, by its registered name) gets a fresh one
    assert main(["pretrain", "--idm", "--init", "shapes-tiny", "--out", str(tmp_path / "added"), "--steps", "1",
                 "--batch-size", "2", "--eval-every", "0"]) == 0
    assert load_generator(str(tmp_path / "added")).denoiser.adapter.config.idm
    assert json.loads((tmp_path / "added" / "pretrain.json").read_text())["config"]["dis_coef"] == 0.1
