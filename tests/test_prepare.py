"""Preparing a real checkpoint (`vlcot-grpo prepare`) on the Emu3 look-alike: the look-alike is shaped like the
published checkpoint, the tags become single tokens, and nothing else changes."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from vlcot_grpo.cli import main as cli
from vlcot_grpo.models import add_vlcot_tokens, check_vlcot_tokens, load_backend, load_model
from vlcot_grpo.models.lookalike import EMU3_EXTRAS
from vlcot_grpo.models.prepare import RECORD_FILE
from vlcot_grpo.vlcot import TAGS

#: The input embedding and the head, as Emu3's converted checkpoints name them on disk.
MATRICES = ("text_model.model.embed_tokens.weight", "text_model.lm_head.weight")


def _state(path):
    """Every weight of the checkpoint at ``path``, read from its safetensors files (not through a model)."""
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


# ----- the look-alike --------------------------------------------------------------------------------------------


def test_lookalike_is_published_like_emu3_hf(lookalike_path):
    names = {p.name for p in lookalike_path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", "vocab.json",
            "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"} <= names  # fmt: skip
    assert len([n for n in names if n.startswith("model-000") and n.endswith(".safetensors")]) > 1  # sharded
    assert json.loads((lookalike_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(lookalike_path)
    assert type(tokenizer).__name__ == "GPT2Tokenizer"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|extra_203|>",
        "<|extra_204|>",
        "<|endoftext|>",
    )
    vocab = tokenizer.get_vocab()
    # Emu3's order: BPE ranks, <|endoftext|>, <|im_start|>, <|im_end|>, the extras (<image> in <|extra_0|>'s place),
    # then <|image token|>, <|image start|>, <|image end|> and the visual tokens up to the vocabulary size
    first = vocab["<|endoftext|>"]
    assert [vocab["<|im_start|>"], vocab["<|im_end|>"], vocab["<image>"]] == [first + 1, first + 2, first + 3]
    assert "<|extra_0|>" not in vocab and vocab[f"<|extra_{EMU3_EXTRAS - 1}|>"] == first + 2 + EMU3_EXTRAS
    assert [vocab[t] for t in ("<|image token|>", "<|image start|>", "<|image end|>")] == [
        first + 3 + EMU3_EXTRAS + i for i in range(3)
    ]
    assert vocab["<|visual token 000000|>"] == first + 6 + EMU3_EXTRAS
    assert len(vocab) == max(vocab.values()) + 1 == vocab["<|visual token 000255|>"] + 1
    config = AutoConfig.from_pretrained(lookalike_path)
    assert config.vocabulary_map == vocab and config.text_config.vocab_size == len(vocab)
    assert config.text_config.bos_token_id == tokenizer.bos_token_id
    assert config.image_token_id == vocab["<image>"]
    assert type(AutoProcessor.from_pretrained(lookalike_path)).__name__ == "Emu3Processor"
    # no VLCoT tag is a token: training refuses it, naming the preparation step
    assert tokenizer.tokenize("<rough_image>") != ["<rough_image>"]
    backend = load_backend(load_model(str(lookalike_path)), tokenizer)
    with pytest.raises(ValueError, match=r"'<degradation>'.*vlcot-grpo prepare --model SRC --out DST"):
        _ = backend.tag_ids
    with pytest.raises(ValueError, match=r"'<degradation>' tokenises to \['<', .*vlcot-grpo prepare"):
        check_vlcot_tokens(tokenizer)


# ----- preparation -----------------------------------------------------------------------------------------------


def test_prepare_repurposes_emu3_reserved_tokens(lookalike_path, prepared_path):
    before, after = AutoTokenizer.from_pretrained(lookalike_path), AutoTokenizer.from_pretrained(prepared_path)
    old_vocab, new_vocab = before.get_vocab(), after.get_vocab()
    reserved = [f"<|extra_{i}|>" for i in range(1, 15)]
    ids = check_vlcot_tokens(after)
    assert list(ids.values()) == [old_vocab[r] for r in reserved]  # the tags took the reserved ids, in TAGS order
    renamed = {r: t for r, t in zip(reserved, TAGS)}
    assert new_vocab == {renamed.get(k, k): v for k, v in old_vocab.items()}  # nothing else moved
    assert len(after) == len(before)
    text = "Perceive the degradation, 16*16 <|image start|><|visual token 000007|> <image> done"
    assert after(text)["input_ids"] == before(text)["input_ids"]
    assert after.tokenize("<rough_image>heavy blur</rough_image>")[0] == "<rough_image>"
    assert AutoConfig.from_pretrained(prepared_path).vocabulary_map == new_vocab
    assert type(AutoProcessor.from_pretrained(prepared_path)).__name__ == "Emu3Processor"  # its files came along

    old, new = _state(lookalike_path), _state(prepared_path)
    assert set(old) == set(new)
    rows = sorted(ids.values())
    for name, tensor in old.items():
        if name not in MATRICES:
            assert torch.equal(tensor, new[name]), name  # bit-identical
            continue
        other = [i for i in range(tensor.shape[0]) if i not in rows]
        assert torch.equal(tensor[other], new[name][other]), name
        for tag, tag_id in ids.items():  # the mean of the rows of the pieces the tag used to tokenise into
            pieces = before(tag, add_special_tokens=False)["input_ids"]
            assert len(pieces) > 1
            assert torch.allclose(new[name][tag_id], tensor[pieces].mean(0)), (name, tag)
            assert not torch.equal(new[name][tag_id], tensor[tag_id])
    record = json.loads((prepared_path / RECORD_FILE).read_text())
    assert (
        record["how"] == "repurposed" and record["ids"] == ids and record["replaced"]["</final_image>"] == reserved[-1]
    )

    backend = load_backend(load_model(str(prepared_path)), after)
    assert backend.tag_ids == ids
    mask = backend.text_token_mask  # the tags and EOS are text; the remaining reserved tokens are not
    assert mask[rows].all() and mask[after.eos_token_id]
    assert not mask[[new_vocab["<|extra_15|>"], new_vocab["<|im_start|>"], new_vocab["<image>"]]].any()


def test_prepare_with_new_tokens_resizes(lookalike_path, tmp_path):
    out = tmp_path / "new"
    assert cli(["prepare", "--model", str(lookalike_path), "--out", str(out), "--new-tokens"]) == 0
    before, after = AutoTokenizer.from_pretrained(lookalike_path), AutoTokenizer.from_pretrained(out)
    ids = check_vlcot_tokens(after)
    assert sorted(ids.values()) == list(range(len(before), len(before) + len(TAGS)))
    assert {k: v for k, v in after.get_vocab().items() if k not in TAGS} == before.get_vocab()
    config = AutoConfig.from_pretrained(out)
    assert config.text_config.vocab_size == len(before) + len(TAGS) and config.vocabulary_map["<degradation>"] > 0
    old, new = _state(lookalike_path), _state(out)
    for name, tensor in old.items():
        if name in MATRICES:
            assert new[name].shape[0] == tensor.shape[0] + len(TAGS)
            assert torch.equal(new[name][: tensor.shape[0]], tensor), name
            pieces = before("<final_image>", add_special_tokens=False)["input_ids"]
            assert torch.allclose(new[name][ids["<final_image>"]], tensor[pieces].mean(0))
        else:
            assert torch.equal(tensor, new[name]), name
    assert load_model(str(out)).get_output_embeddings().weight.shape[0] == len(after)


def test_preparing_a_prepared_checkpoint_writes_nothing(prepared_path, tmp_path, capsys):
    assert cli(["prepare", "--model", str(prepared_path), "--out", str(tmp_path / "again")]) == 0
    assert "already has the 14 VLCoT tags" in capsys.readouterr().out and not (tmp_path / "again").exists()
    model, tokenizer = load_model(str(prepared_path)), AutoTokenizer.from_pretrained(prepared_path)
    _, same, record = add_vlcot_tokens(model, tokenizer)
    assert record.how == "present" and same is tokenizer


def test_bad_input_is_named(lookalike_path, tmp_path, capsys):
    assert cli(["prepare", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere: not a checkpoint folder" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli(["prepare", "--model", str(lookalike_path), "--out", str(tmp_path / "full")]) == 2
    assert "full exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert cli(["prepare", "--model", str(lookalike_path), "--out", str(lookalike_path)]) == 2
    assert "is the source folder" in capsys.readouterr().err
    # a tokenizer that has some of the tags already (another tag set): not guessed at
    model, tokenizer = load_model(str(lookalike_path)), AutoTokenizer.from_pretrained(lookalike_path)
    tokenizer.add_tokens(["<degradation>"], special_tokens=True)
    with pytest.raises(ValueError, match=r"some VLCoT tags as tokens \(\['<degradation>'\]\) but not all 14"):
        add_vlcot_tokens(model, tokenizer)


def test_reserved_tokens_with_a_role_are_never_repurposed(lookalike_path, monkeypatch):
    from vlcot_grpo.models import Emu3Backend

    reserved = ("<|extra_203|>", *Emu3Backend.reserved_tag_tokens[1:])  # <|extra_203|> is the BOS
    monkeypatch.setattr(Emu3Backend, "reserved_tag_tokens", reserved)
    with pytest.raises(ValueError, match=r"reserved token '<\|extra_203\|>' \(id \d+\) has a role"):
        add_vlcot_tokens(load_model(str(lookalike_path)), AutoTokenizer.from_pretrained(lookalike_path))


def test_tags_that_still_split_after_preparation_are_an_error(lookalike_path, monkeypatch):
    """Should renaming not take (a tokenizer that ignores its added tokens, say), preparation stops, naming the
    tags and their pieces, instead of saving a checkpoint the scripts would reject later."""
    from vlcot_grpo.models import prepare

    monkeypatch.setattr(prepare, "_rename_tokens", lambda tokenizer, renames: tokenizer)
    with pytest.raises(ValueError, match=r"'<degradation>' tokenises to \['<', .*'</final_image>' tokenises to"):
        add_vlcot_tokens(load_model(str(lookalike_path)), AutoTokenizer.from_pretrained(lookalike_path))
