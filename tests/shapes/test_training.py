"""Training code: small, fast versions of each stage (the real recipe is `dallebot train shapes`)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.config import VQGANConfig
from inference.shapes.evaluate import sample_prompts
from inference.training import pipeline
from inference.training.common import StepBudget, lr_at
from inference.training.data import build_dataset
from inference.training.text import GrammarTokenizer, encode_prompts, load_tokenizer, train_tokenizer
from inference.training.transformer import (
    TransformerTrainConfig, make_token_data, sample_codes, shapes_model_config, train_transformer,
)
from inference.training.vq import EMAQuantizer, VQTrainConfig, encode_images, load_vq, train_vq

TINY_VQ = VQGANConfig(ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=0, attn_resolutions=(), z_channels=16,
                      embed_dim=8, n_embed=32, resolution=32, norm_groups=4)
TINY_VQ_TRAIN = VQTrainConfig(steps=4, batch=4, eval_every=1000, eval_scenes=4, checkpoint_every=2,
                              reseed_every=2, ae_warmup=2)


@pytest.fixture(scope="module")
def scenes():
    return build_dataset(40, 32, seed=3, workers=1)


def test_dataset_is_seeded_and_excludes_held_out_pairs(scenes):
    again = build_dataset(40, 32, seed=3, workers=1)
    assert scenes.prompts == again.prompts and np.array_equal(scenes.images, again.images)
    assert scenes.images.shape == (40, 32, 32, 3)
    from inference.shapes.grammar import parse
    assert not any(parse(p).has_unseen_pair for p in scenes.prompts)


def test_ema_quantizer_initialises_updates_and_reseeds():
    codebook = torch.zeros(8, 2)
    q = EMAQuantizer(codebook, decay=0.5)
    gen = torch.Generator().manual_seed(0)
    flat = torch.tensor([[0.0, 0.0], [10.0, 10.0]]).repeat(8, 1)
    q.initialise(flat, gen)
    assert bool(q.initialised) and set(map(tuple, codebook.tolist())) <= {(0.0, 0.0), (10.0, 10.0)}
    idx = q.nearest(flat)
    assert torch.equal(codebook[idx], flat)
    for _ in range(30):
        q.update(flat + 1.0, q.nearest(flat + 1.0))
    used = q.cluster_size > 0.03
    assert torch.allclose(codebook[used], codebook[used].round(), atol=0.05)   # moved to the new means
    dead = int((~used).sum())
    assert q.reseed_dead(flat, gen) == dead


def test_vq_training_resumes_exactly(tmp_path, scenes):
    straight = train_vq(tmp_path / "a", scenes, TINY_VQ_TRAIN, TINY_VQ, progress=False)
    train_vq(tmp_path / "b", scenes, replace(TINY_VQ_TRAIN, steps=2), TINY_VQ, progress=False)
    (tmp_path / "b" / "final.pt").unlink()            # an interrupted run: only ckpt.pt at step 2
    ck = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    ck["total"] = 4
    torch.save(ck, tmp_path / "b" / "ckpt.pt")
    resumed = train_vq(tmp_path / "b", scenes, TINY_VQ_TRAIN, TINY_VQ, progress=False)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b), k
    assert (tmp_path / "a" / "loss.png").is_file() and (tmp_path / "a" / "recon_sheet.png").is_file()
    history = [json.loads(line) for line in (tmp_path / "a" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 4 and "recon_fully_correct" in history[-1]
    loaded = load_vq(tmp_path / "a")
    codes = encode_images(loaded, scenes.images[:3], torch.device("cpu"))
    assert codes.shape == (3, 16) and codes.max() < 32


def test_tokenizer_is_reproducible_and_grammar_fallback_agrees(tmp_path):
    train_tokenizer(tmp_path)
    for f in ("vocab.json", "merges.txt"):
        assert (tmp_path / f).read_bytes() == (pipeline.TOKENIZER_DIR / f).read_bytes()
    bart = load_tokenizer(pipeline.TOKENIZER_DIR, 24)
    plain = GrammarTokenizer(pipeline.TOKENIZER_DIR / "vocab.json", 24)
    prompts = sample_prompts(500, 4)
    for a, b in zip(encode_prompts(bart, prompts), encode_prompts(plain, prompts)):
        assert np.array_equal(a, b)
    assert np.array_equal(bart.unconditional().ids, plain.unconditional().ids)
    assert bart.vocab_size <= pipeline.TEXT_VOCAB_ROWS


def test_transformer_trains_resumes_and_samples_like_teacher_forcing(tmp_path, scenes):
    from inference.model import VQGANDecoder

    tok = load_tokenizer(pipeline.TOKENIZER_DIR, 24)
    cfg = replace(shapes_model_config(512, 32, 4), d_model=64, encoder_heads=2, decoder_heads=2,
                  encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64)
    codes = np.random.default_rng(0).integers(0, 32, (len(scenes), 16))
    data = make_token_data(tok, scenes.prompts, codes)
    vqgan = VQGANDecoder(TINY_VQ)
    tcfg = TransformerTrainConfig(steps=4, batch=8, eval_every=4, eval_prompts=2, checkpoint_every=2, warmup=1)
    enc, dec = train_transformer(tmp_path / "t", data, tok, vqgan, tcfg, cfg, progress=False)
    train_transformer(tmp_path / "u", data, tok, vqgan, replace(tcfg, steps=2), cfg, progress=False)
    (tmp_path / "u" / "final.pt").unlink()
    ck = torch.load(tmp_path / "u" / "ckpt.pt", weights_only=False)
    ck["total"] = 4
    torch.save(ck, tmp_path / "u" / "ckpt.pt")
    enc2, dec2 = train_transformer(tmp_path / "u", data, tok, vqgan, replace(tcfg, eval_every=0), cfg,
                                   progress=False)
    for a, b in zip(dec.state_dict().values(), dec2.state_dict().values()):
        assert torch.allclose(a, b)
    assert (tmp_path / "t" / "loss.png").is_file() and (tmp_path / "t" / "sample_sheet.png").is_file()
    # greedy KV-cached sampling picks the argmax of the teacher-forced logits at every position
    out = sample_codes(enc, dec, tok, ["a red circle", "two blue stars"], seed=1, condition_scale=1.0, top_k=1)
    ids, mask = (torch.from_numpy(a) for a in encode_prompts(tok, ["a red circle", "two blue stars"]))
    with torch.no_grad():
        start = torch.full((2, 1), cfg.decoder_start_token_id)
        logits = dec(torch.cat([start, out[:, :-1]], 1), enc(ids, mask), mask)[..., :cfg.num_codes]
    assert torch.equal(logits.argmax(-1), out)


def test_caption_dropout_uses_the_runtime_unconditional_row():
    tok = load_tokenizer(pipeline.TOKENIZER_DIR, 24)
    u = tok.unconditional()
    assert list(u.ids[:3]) == [0, 2, 1] and u.mask.sum() == 2


def test_lr_schedule_and_budget():
    assert lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, warmup=10) == pytest.approx(0.1)
    b = StepBudget(1000, None)
    b.start(0)
    assert all(b.update(i) == 1000 for i in range(1, 100))


def test_pack_roundtrip(tmp_path):
    out = tmp_path / "out"
    for stage, state in (("vq", {"model": {"w": torch.ones(2)}, "steps": 3}),
                         ("transformer", {"encoder": {"w": torch.full((2,), 0.1)}, "decoder": {"i": torch.ones(2, dtype=torch.long)},
                                          "steps": 5})):
        (out / stage).mkdir(parents=True)
        torch.save(state, out / stage / "final.pt")
    (out / "training.json").write_text("{}")
    files = pipeline.pack(out, tmp_path / "packed")
    assert len(files) <= 7 and "transformer.pt" in files
    pipeline.unpack(tmp_path / "packed", tmp_path / "restored")
    tf = torch.load(tmp_path / "restored" / "transformer" / "final.pt", weights_only=False)
    assert tf["encoder"]["w"].dtype == torch.float32 and torch.allclose(tf["encoder"]["w"], torch.full((2,), 0.1), atol=1e-4)
    assert tf["decoder"]["i"].dtype == torch.long
