"""Prompt parsing, chunking and encoding (Web-UI semantics)."""
import pytest
import torch

from trainer.models import tiny_components
from trainer.models.configs import CLIP_TEXT, CLIP_TEXT_PROJ, build_text_encoder
from trainer.models.families import Family, ModelInfo
from trainer.models.loading import Components
from trainer.models.prompts import (
    BREAK,
    Conditioning,
    chunk_prompt,
    encode_prompts,
    parse_emphasis,
    tokenize_batch,
)
from trainer.models.tokenizer import clip_tokenizer

W = 1.1


# ---------------------------------------------------------------- parsing (pure)


@pytest.mark.parametrize("text,expected", [
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("(cat)", [("cat", W)]),
    ("((cat))", [("cat", W * W)]),
    ("[cat]", [("cat", 1 / W)]),
    ("(cat:1.5)", [("cat", 1.5)]),
    ("( cat : 0.5 )", [(" cat ", 0.5)]),
    ("a (b (c:2) d) e", [("a ", 1.0), ("b ", W), ("c", 2 * W), (" d", W), (" e", 1.0)]),
    ("\\(literal\\) \\[x\\] \\\\", [("(literal) [x] \\", 1.0)]),
    ("(unclosed", [("unclosed", W)]),
    ("[unclosed", [("unclosed", 1 / W)]),
    ("stray) and] brackets", [("stray) and] brackets", 1.0)]),
    ("time 3:00", [("time 3:00", 1.0)]),
    ("a:1.2)", [("a:1.2)", 1.0)]),
    ("one BREAK two", [("one", 1.0), (BREAK, -1.0), ("two", 1.0)]),
    ("(a BREAK b)", [("a", W), (BREAK, -1.0), ("b", W)]),
])
def test_parse_emphasis(text, expected):
    got = parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_parse_merges_equal_weights():
    assert parse_emphasis("a (b) (c)") == [("a ", 1.0), ("b", pytest.approx(W)), (" ", 1.0), ("c", pytest.approx(W))]
    assert parse_emphasis("(b)(c)") == [("bc", pytest.approx(W))]


# ---------------------------------------------------------------- chunking


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def test_chunk_layout(tok):
    ids, ws = tokenize_batch(tok, ["a photo of a (cat:1.5)"])
    assert ids.shape == (1, 1, 77) and ws.shape == (1, 1, 77)
    assert ids[0, 0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 0, 7:] == 49407).all()
    assert ws[0, 0, :7].tolist() == pytest.approx([1, 1, 1, 1, 1, 1.5, 1])
    zero = clip_tokenizer("!")
    ids0, _ = tokenize_batch(zero, ["a photo of a cat"])
    assert ids0[0, 0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids0[0, 0, 7:] == 0).all()


def test_chunks_of_75_and_batch_padding(tok):
    long = " ".join(["cat"] * 80)  # 80 tokens -> 2 chunks
    ids, ws = tokenize_batch(tok, [long, "dog"])
    assert ids.shape == (2, 2, 77)
    assert ids[0, 0, 0] == 49406 and ids[0, 0, 76] == 49407 and (ids[0, 0, 1:76] == 2368).all()
    assert (ids[0, 1, 1:6] == 2368).all() and ids[0, 1, 6] == 49407
    assert ids[1, 1, :2].tolist() == [49406, 49407]  # empty padding chunk
    exactly = tokenize_batch(tok, [" ".join(["cat"] * 75)])[0]
    assert exactly.shape == (1, 1, 77)


def test_comma_backtrack_and_break(tok):
    words = ["cat"] * 70 + [","] + ["dog"] * 10
    chunks = chunk_prompt(tok, " ".join(words))
    assert len(chunks) == 2
    assert len(chunks[0][0]) == 71 and chunks[0][0][-1] == 267
    assert chunks[1][0] == [1929] * 10  # "dog"
    far = ["cat"] * 10 + [","] + ["dog"] * 70  # comma too far back: hard split
    assert len(chunk_prompt(tok, " ".join(far))[0][0]) == 75
    br = chunk_prompt(tok, "a cat BREAK a dog")
    assert [c[0] for c in br] == [[320, 2368], [320, 1929]]


# ---------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def tiny():
    return tiny_components()


def test_plain_prompt_equals_text_encoder(tiny):
    cond = encode_prompts(tiny, ["a photo of a cat", "a dog"])
    assert isinstance(cond, Conditioning) and cond.pooled is None
    assert cond.hidden.shape == (2, 77, 32)
    ids, _ = tokenize_batch(tiny.tokenizers[0], ["a photo of a cat", "a dog"])
    with torch.no_grad():
        ref = tiny.text_encoders[0](input_ids=ids[:, 0]).last_hidden_state
    assert torch.allclose(cond.hidden, ref, atol=1e-6)


def test_emphasis_changes_and_mean_restored(tiny):
    plain = encode_prompts(tiny, ["a photo of a cat"]).hidden
    strong = encode_prompts(tiny, ["a photo of a (cat:1.5)"]).hidden
    assert not torch.allclose(plain, strong)
    assert strong.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4, abs=1e-6)
    # the emphasized token changed most
    diff = (strong - plain).abs().sum(-1)[0]
    assert diff.argmax().item() == 5


def test_batch_does_not_change_a_prompt(tiny):
    alone = encode_prompts(tiny, ["a (cat:1.2)"]).hidden
    together = encode_prompts(tiny, ["a (cat:1.2)", "x " * 100]).hidden
    assert together.shape == (2, 154, 32)
    assert torch.allclose(together[0, :77], alone[0], atol=1e-6)


def test_clip_skip_sd1(tiny):
    te = tiny.text_encoders[0]
    ids, _ = tokenize_batch(tiny.tokenizers[0], ["a cat"])
    out = te(input_ids=ids[:, 0], output_hidden_states=True)
    core = getattr(te, "text_model", te)
    skip2 = encode_prompts(tiny, ["a cat"], clip_skip=2).hidden
    assert torch.allclose(skip2, core.final_layer_norm(out.hidden_states[-2]), atol=1e-6)
    with pytest.raises(ValueError):
        encode_prompts(tiny, ["a cat"], clip_skip=5)
    with pytest.raises(ValueError):
        encode_prompts(tiny, ["a cat"], clip_skip=0)


def test_differentiable(tiny):
    te = tiny.text_encoders[0]
    w = te.get_input_embeddings().weight
    w.requires_grad_(True)
    try:
        encode_prompts(tiny, ["a (photo:1.2) of a cat"]).hidden.square().sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
    finally:
        w.requires_grad_(False)
        w.grad = None


def _small_te(hidden, layers, cls, act="gelu", proj=None, seed=0):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
               projection_dim=proj or hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    return build_text_encoder(cfg, cls).eval()


def _fake(family, tes, pads):
    return Components(info=ModelInfo(family, False), unet=None, vae=None, text_encoders=tes,
                      tokenizers=[clip_tokenizer(p) for p in pads], scaling_factor=1.0, name="fake")


def test_sd2_penultimate_with_final_norm():
    te = _small_te(16, 3, CLIP_TEXT)
    comps = _fake(Family.SD2, [te], ["!"])
    ids, _ = tokenize_batch(comps.tokenizers[0], ["a cat"])
    assert ids[0, 0, :4].tolist() == [49406, 320, 2368, 49407] and ids[0, 0, 4:].eq(0).all()
    with torch.no_grad():
        out = te(input_ids=ids[:, 0], output_hidden_states=True)
        core = getattr(te, "text_model", te)
        want = core.final_layer_norm(out.hidden_states[-2])
        got = encode_prompts(comps, ["a cat"]).hidden
    assert torch.allclose(got, want, atol=1e-6)


def test_sdxl_concat_and_pooled():
    te1 = _small_te(16, 3, CLIP_TEXT, act="quick_gelu", seed=1)
    te2 = _small_te(24, 3, CLIP_TEXT_PROJ, proj=1280, seed=2)
    comps = _fake(Family.SDXL, [te1, te2], ["<|endoftext|>", "!"])
    prompts = ["a photo of a cat", "x " * 90 + "(dog)"]
    with torch.no_grad():
        cond = encode_prompts(comps, prompts)
    assert cond.hidden.shape == (2, 154, 16 + 24)
    assert cond.pooled.shape == (2, 1280)
    ids, _ = tokenize_batch(comps.tokenizers[1], prompts)
    with torch.no_grad():
        ref = te2(input_ids=ids[:, 0]).text_embeds  # transformers' own pooled projection (first EOS)
        h1 = te1(input_ids=tokenize_batch(comps.tokenizers[0], prompts[:1])[0][:, 0],
                 output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(cond.pooled, ref, atol=1e-5)
    assert torch.allclose(cond.hidden[:1, :77, :16], h1, atol=1e-6)  # penultimate, no final norm


def test_zero_mean_chunk_gives_no_nan():
    # A plain layer norm (weight 1, bias 0) makes every token vector's mean 0, so the chunk's mean is 0:
    # restoring the mean after emphasis must not divide by it (found on transformers 4.30 as NaN).
    te = _small_te(16, 3, CLIP_TEXT)
    core = getattr(te, "text_model", te)
    with torch.no_grad():
        core.final_layer_norm.weight.fill_(1.0)
        core.final_layer_norm.bias.zero_()
    comps = _fake(Family.SD1, [te], ["<|endoftext|>"])
    with torch.no_grad():
        for prompt in ["a cat", "a (cat:1.3) on [grass]"]:
            assert torch.isfinite(encode_prompts(comps, [prompt]).hidden).all(), prompt


def test_a_caption_over_the_first_chunk_is_encoded_whole_not_cut(tiny, tok):
    # issue 10 reported long captions "cut silently": here nothing is cut, so there is nothing to warn
    # about. The Web-UI encodes every 75-token chunk of a prompt, and so does training: each token of a
    # 400-token caption reaches the text encoder (the original TrainTrain truncated at 75).
    from trainer.models.tokenizer import tokenize

    caption = ", ".join(f"tag{i} word{i}" for i in range(60))
    n = len(tokenize(tok, caption))
    assert n > 3 * 75
    chunks = chunk_prompt(tok, caption)
    assert sum(len(ids) for ids, _ in chunks) == n and len(chunks) >= -(-n // 75)  # (commas may break early)
    assert encode_prompts(tiny, [caption]).hidden.shape[1] == 77 * len(chunks)
