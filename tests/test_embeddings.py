"""Textual-inversion embeddings in prompts and captions (trainer.models.embeddings, trainer.models.prompts)
and standalone `--embeddings-dir`: an embedding's name encodes to its vectors, as a text encoder whose
vocabulary had grown by those vectors would encode it; they fill chunk positions; they stay frozen; only
.safetensors files are read, a pickle is refused naming its file."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from trainer.__main__ import main
from trainer.models.embeddings import Embeddings, attach, load_embeddings_dir
from trainer.models.prompts import CHUNK, encode_prompts, tokenize_batch
from trainer.models.tiny import tiny_components
from trainer.models.tokenizer import BOS_ID, EOS_ID, tokenize
from trainer.networks.files import load_network_file

from _modes_helpers import PRESETS, SMALL_ARGS


def _core(te):
    return getattr(te, "text_model", te)


def grown_vocabulary_hidden(te, tokenizer, before: str, vectors: torch.Tensor, after: str, layer: int,
                            final_norm: bool) -> torch.Tensor:
    """The reference: a copy of ``te`` whose token embedding has the vectors appended as new tokens,
    fed ``BOS before <new tokens> after EOS pad…``."""
    te = copy.deepcopy(te)
    emb = _core(te).embeddings.token_embedding
    vocab = emb.num_embeddings
    grown = torch.nn.Embedding(vocab + vectors.shape[0], emb.embedding_dim)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([emb.weight, vectors.to(emb.weight)]))
    _core(te).embeddings.token_embedding = grown
    body = tokenize(tokenizer, before) + list(range(vocab, vocab + vectors.shape[0])) + tokenize(tokenizer, after)
    ids = [BOS_ID, *body, EOS_ID] + [int(tokenizer.pad_token_id)] * (CHUNK - len(body))
    with torch.no_grad():
        z = te(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer]
        return _core(te).final_layer_norm(z) if final_norm else z


def _dim(te):
    return _core(te).embeddings.token_embedding.embedding_dim


def test_an_embedding_name_encodes_to_its_vectors_sd1():
    torch.manual_seed(0)
    c = tiny_components()
    te, tok = c.text_encoders[0], c.tokenizers[0]
    vec = torch.randn(3, _dim(te))
    plain = encode_prompts(c, "a photo of myemb cat").hidden
    attach(c, Embeddings(vectors={"myemb": vec}))
    with torch.no_grad():
        got = encode_prompts(c, "a photo of MyEmb cat").hidden  # names match case-insensitively, as CLIP reads
    want = grown_vocabulary_hidden(te, tok, "a photo of", vec, "cat", -1, True)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # without the embedding, the name was just text
    # a prompt without the name encodes exactly as before
    fresh = tiny_components()
    assert torch.equal(encode_prompts(c, "a photo of a cat").hidden, encode_prompts(fresh, "a photo of a cat").hidden)


def test_an_sdxl_embedding_gives_clip_l_and_clip_g_their_own_vectors():
    torch.manual_seed(0)
    c = tiny_components(family="sdxl")
    te1, te2 = c.text_encoders
    vec = {"clip_l": torch.randn(2, _dim(te1)), "clip_g": torch.randn(2, _dim(te2))}
    attach(c, Embeddings(vectors={"xlemb": vec}))
    with torch.no_grad():
        got = encode_prompts(c, "xlemb, dog").hidden
    h1 = grown_vocabulary_hidden(te1, c.tokenizers[0], "", vec["clip_l"], ", dog", -2, False)
    h2 = grown_vocabulary_hidden(te2, c.tokenizers[1], "", vec["clip_g"], ", dog", -2, False)
    assert torch.allclose(got, torch.cat([h1, h2], dim=-1), atol=1e-5)


def test_embedding_vectors_count_toward_the_75_token_chunk_and_are_not_split():
    c = tiny_components()
    attach(c, Embeddings(vectors={"myemb": torch.randn(4, _dim(c.text_encoders[0]))}))
    from trainer.models.prompts import EmbeddingVocab

    vocab = EmbeddingVocab(c.embeddings)
    words = " ".join(["cat"] * 73)
    ids, _ = tokenize_batch(c.tokenizers[0], [words + " myemb"], vocab=vocab)
    # 73 + 4 > 75: the embedding starts the second chunk whole
    assert ids.shape[1] == 2
    assert (ids[0, 0, 1:74] != EOS_ID).all() and ids[0, 0, 74] == EOS_ID
    assert ids[0, 1, 1:5].tolist() == [1 << 24, (1 << 24) + 1, (1 << 24) + 2, (1 << 24) + 3]
    ids, _ = tokenize_batch(c.tokenizers[0], [" ".join(["cat"] * 71) + " myemb"], vocab=vocab)
    assert ids.shape[1] == 1  # 71 + 4 = 75 fits one chunk


def test_embedding_vectors_stay_frozen_while_the_text_encoder_trains():
    c = tiny_components()
    vec = torch.randn(2, _dim(c.text_encoders[0]), requires_grad=True)
    attach(c, Embeddings(vectors={"myemb": vec}))
    te = c.text_encoders[0]
    for p in te.parameters():
        p.requires_grad_(True)
    encode_prompts(c, "myemb cat").hidden.square().sum().backward()
    assert vec.grad is None
    assert any(p.grad is not None for p in te.parameters())  # the text encoder (its LoRA) still learns


def test_an_embedding_of_another_family_is_refused_with_its_name():
    c = tiny_components()
    attach(c, Embeddings(vectors={"xlemb": {"clip_l": torch.randn(1, 8), "clip_g": torch.randn(1, 8)}}))
    with pytest.raises(ValueError, match=r"embedding 'xlemb'.*another model family"):
        encode_prompts(c, "xlemb cat")


def _write_embeddings(folder, dim):
    folder.mkdir(parents=True, exist_ok=True)
    vec = torch.randn(2, dim, generator=torch.Generator().manual_seed(1))
    save_file({"emb_params": vec}, str(folder / "mystyle.safetensors"))
    torch.save({"string_to_param": {"*": vec}}, folder / "oldstyle.pt")  # an A1111 pickle
    return vec


def test_embeddings_dir_reads_safetensors_and_never_unpickles(tmp_path, monkeypatch):
    vec = _write_embeddings(tmp_path / "emb", 32)

    def no_unpickling(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    e = load_embeddings_dir(tmp_path / "emb")
    assert list(e.vectors) == ["mystyle"] and torch.equal(e.vectors["mystyle"], vec)
    assert "oldstyle.pt" in e.refused["oldstyle"] and "pickle" in e.refused["oldstyle"]


def test_cli_embeddings_dir_trains_with_the_embedding_and_refuses_a_pickle_by_name(tmp_path, capsys):
    dim = _dim(tiny_components().text_encoders[0])
    _write_embeddings(tmp_path / "emb", dim)
    args = ["train", "--preset", str(PRESETS / "iLECO.json"), "--original-prompt", "mystyle cat",
            "--target-prompt", "dog", *SMALL_ARGS, "--set", "train_iterations=3"]
    assert main([*args, "--name", "with_emb", "--workdir", str(tmp_path / "a"),
                 "--embeddings-dir", str(tmp_path / "emb")]) == 0
    err = capsys.readouterr().err
    assert "not read (pickles; only .safetensors are): oldstyle" in err
    assert main([*args, "--name", "without", "--workdir", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    with_emb, _ = load_network_file(tmp_path / "a" / "output" / "with_emb.safetensors")
    without, _ = load_network_file(tmp_path / "b" / "output" / "without.safetensors")
    # same seed, same prompt text: the embedding's vectors changed what was learned
    assert any(not torch.equal(with_emb[k], without[k]) for k in with_emb if "lora_up" in k)

    rc = main(["train", "--preset", str(PRESETS / "iLECO.json"), "--original-prompt", "oldstyle cat",
               "--target-prompt", "dog", *SMALL_ARGS, "--name", "pickled", "--workdir", str(tmp_path / "c"),
               "--embeddings-dir", str(tmp_path / "emb")])
    err = capsys.readouterr().err
    assert rc == 2 and "oldstyle.pt is a pickle" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "output" / "pickled.safetensors").exists()


def test_the_standalone_app_host_reads_its_embeddings_dir(tmp_path):
    """`python -m trainer ui --embeddings-dir` sets the host's folder; every job's model gets its embeddings."""
    from trainer.config import Config
    from trainer.jobs import StandaloneHost

    dim = _dim(tiny_components().text_encoders[0])
    vec = _write_embeddings(tmp_path / "emb", dim)
    host = StandaloneHost(tmp_path)
    host.embeddings_dir = tmp_path / "emb"
    lines = []

    class Control:
        log = staticmethod(lines.append)

    with host.session(Config.defaults(), Control()) as comps, torch.no_grad():
        got = encode_prompts(comps, "mystyle").hidden
        want = grown_vocabulary_hidden(comps.text_encoders[0], comps.tokenizers[0], "", vec, "", -1, True)
    assert torch.allclose(got, want, atol=1e-5)
    assert lines == ["embeddings_dir: not read (pickles; only .safetensors are): oldstyle"]
