"""A character-level tokenizer for the tiny models (vocabulary < 128), built without a hub.

Other evaluation tests import :func:`char_tokenizer` from here.
"""

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]


def char_tokenizer(
    pad: bool = True, bos: bool = False, merge_newlines: bool = False
) -> PreTrainedTokenizerFast:
    """One token per character; ``<pad>`` = 0 (when ``pad``), ``<s>`` = 1, ``</s>`` = 2.

    ``bos`` makes the tokenizer prepend ``<s>``, like Llama's does; ``merge_newlines`` adds
    one BPE merge, "\n" + "\n" -> "\n\n", for tests of tokens spanning a text boundary.
    """
    extra = ["\n\n"] if merge_newlines else []
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + extra)}
    merges = [("\n", "\n")] if merge_newlines else []
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    if bos:
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>" if pad else None,
    )
    return tok


def test_round_trip():
    tok = char_tokenizer()
    text = "### Response:\nThe answer is 5."
    ids = tok(text).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert max(ids) < 128
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)


def test_bos_and_no_pad():
    tok = char_tokenizer(pad=False, bos=True)
    assert tok("ab").input_ids == [1, *char_tokenizer()("ab").input_ids]
    assert tok.pad_token is None
    assert tok.decode(tok("ab").input_ids, skip_special_tokens=True) == "ab"


def test_merge_newlines():
    tok = char_tokenizer(merge_newlines=True)
    assert len(tok("a\n\nb").input_ids) == 3
    assert tok.decode(tok("a\n\nb").input_ids) == "a\n\nb"
