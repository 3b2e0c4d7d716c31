"""Sorted (S2D) training, `tools.train_sorted`: the training forward equals the truncated
model at every exit, the sorted loss lowers every exit's loss, init/save round trips into
the serving drafter, and a tiny end-to-end run of the CLI path that made the demo drafter."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import LlamaForCausalLM

from drafter_service.sorted import SortedExitsConfig, SortedProposerFactory
from shared.config import DrafterConfig
from shared.loading import tokenizer_hash
from shared.paths import models_dir
from shared.sampling import SamplingParams
from tests.drafter_service.test_sorted import (
    EXITS,
    VOCAB,
    context,
    tiny_config,
    tiny_model,
    truncated,
    write_fake_tokenizer,
)
from tools.train_sorted import (
    TrainSortedConfig,
    init_drafter,
    save_drafter,
    sorted_exit_hidden,
    sorted_loss,
    target_log_probs,
    train,
)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


@pytest.mark.parametrize("n", EXITS)
def test_training_forward_equals_truncated_model(model, n):
    # exit n of the training forward == an HF model built from the first n layers
    ids = torch.tensor([context(20), context(20, seed=2)])
    with torch.no_grad():
        h = sorted_exit_hidden(model, ids, EXITS)[EXITS.index(n)]
        ours = model.lm_head(h)
        ref = truncated(model, n)(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)



def test_tiny_training_lowers_every_exit_loss():
    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_config(3)).train()
    teacher = tiny_model(2, seed=5)
    exits = [1, 2, 3]
    # learnable data: repeated random motifs
    rng = random.Random(0)
    motifs = [[rng.randrange(1, VOCAB) for _ in range(5)] for _ in range(4)]
    seqs = [[t for _ in range(6) for t in motifs[rng.randrange(4)]] for _ in range(8)]
    ids = torch.tensor(seqs)
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    logp = target_log_probs([teacher], ids, mask)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    _, before, _ = sorted_loss(student, exits, ids, mask, logp, kd_weight=0.5)
    for _ in range(25):
        loss, _, _ = sorted_loss(student, exits, ids, mask, logp, kd_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, after, kls = sorted_loss(student, exits, ids, mask, logp, kd_weight=0.5)
    assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)
    assert all(k > 0 for k in kls)


def test_init_from_checkpoint_layers_and_save_roundtrip(tmp_path):
    src = tiny_model(4, seed=3)
    src_dir = tmp_path / "src"
    src.save_pretrained(str(src_dir))
    write_fake_tokenizer(src_dir)
    cfg = TrainSortedConfig(
        output_dir=tmp_path / "out", exits=[1, 2], init_from=src_dir, init_layers=[0, 3],
        targets=[src_dir],
    )
    model = init_drafter(cfg)
    sd, ref = model.state_dict(), src.state_dict()
    for new, old in [
        ("model.layers.1.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"),
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
    ]:
        assert torch.equal(sd[new], ref[old]), new
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied

    save_drafter(model, cfg, {1: 0.6}, {"note": "test"})
    out = cfg.output_dir
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    saved = SortedExitsConfig.load(out)
    assert saved.exits == [1, 2] and saved.thresholds == {1: 0.6}
    assert saved.tokenizer_hash == tokenizer_hash(src_dir)
    factory = SortedProposerFactory(DrafterConfig(name="t", model_dir=out, kind="sorted"))
    assert factory.exits == [1, 2] and factory.default_thresholds == [0.6, 0.0]
    draft = factory.new_session([], SamplingParams()).propose(context(6), 3)
    assert len(draft) == 3


def test_scratch_init_takes_vocab_from_the_target(tmp_path):
    target_dir = tmp_path / "target"
    tiny_model(2).save_pretrained(str(target_dir))
    cfg = TrainSortedConfig(
        output_dir=tmp_path / "out", exits=[1, 3], init="scratch", targets=[target_dir],
        scratch_hidden_size=16, scratch_intermediate_size=24, scratch_num_heads=2,
        scratch_num_kv_heads=1,
    )
    model = init_drafter(cfg)
    assert model.config.num_hidden_layers == 3 and model.config.vocab_size == VOCAB
    assert model.config.hidden_size == 16


@pytest.mark.skipif(
    not (models_dir() / "codelm-target-s" / "tokenizer.json").is_file(),
    reason="needs the demo tokenizer",
)
def test_train_end_to_end_tiny(tmp_path):
    # generate -> cache -> train -> calibrate -> save -> load, on a tiny 4096-vocab target
    target_dir = tmp_path / "target"
    torch.manual_seed(0)
    config = tiny_config(2)
    config.vocab_size = 4096
    LlamaForCausalLM(config).save_pretrained(str(target_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target_dir / name).write_bytes((models_dir() / "codelm-target-s" / name).read_bytes())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(8)
    ))
    cfg = TrainSortedConfig(
        output_dir=tmp_path / "out", exits=[1, 2], init_from=target_dir, targets=[target_dir],
        prompts=prompts, num_prompts=8, gen_modes=["greedy", "sample"], max_new_tokens=6,
        gen_batch_size=4, cache_dir=tmp_path / "cache", batch_size=4, max_steps=3,
        val_fraction=0.25,
    )
    info = train(cfg)
    assert info["steps"] == 3 and info["data"]["num_sequences"] == 16
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one file per (target, mode)
    saved = SortedExitsConfig.load(cfg.output_dir)
    assert saved.exits == [1, 2] and set(saved.thresholds) == {1}
    factory = SortedProposerFactory(
        DrafterConfig(name="e2e", model_dir=cfg.output_dir, kind="sorted")
    )
    factory.attach_target("target", tokenizer_hash(target_dir))
    assert len(factory.new_session([], SamplingParams()).propose([5, 6, 7], 2)) == 2


def test_train_config_rejects_bad_exits(tmp_path):
    with pytest.raises(ValueError, match="increasing"):
        TrainSortedConfig(output_dir=tmp_path, exits=[2, 1])
    with pytest.raises(ValueError, match="init_layers"):
        TrainSortedConfig(output_dir=tmp_path, exits=[1, 2], init_layers=[0, 1, 2])


# ============================================================== tokenizer safety


