"""Helpers shared by the interpret tests: a byte-level stub tokenizer for tiny models."""

from __future__ import annotations


class ByteTok:
    """Bytes 1..255 as tokens (vocab 256, pad 0); enough for tiny random models."""

    pad_token_id = 0
    chat_template = None

    def _enc(self, text: str, max_length: int | None, offsets: bool) -> dict:
        ids, offs = [], []
        for i, ch in enumerate(text):
            b = max(1, min(255, ord(ch)))
            ids.append(b)
            offs.append((i, i + 1))
        if max_length is not None:
            ids, offs = ids[:max_length], offs[:max_length]
        out = {"input_ids": ids}
        if offsets:
            out["offset_mapping"] = offs
        return out

    def __call__(
        self,
        texts,
        add_special_tokens=True,
        truncation=False,
        max_length=None,
        return_offsets_mapping=False,
    ):
        if isinstance(texts, str):
            return self._enc(texts, max_length if truncation else None, return_offsets_mapping)
        encs = [
            self._enc(t, max_length if truncation else None, return_offsets_mapping) for t in texts
        ]
        return {"input_ids": [e["input_ids"] for e in encs]}

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


def byte_tokenizer():
    """A real (saveable) tokenizer: one token per byte (byte-level BPE without merges),
    vocab 256, pad = the token of byte 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=alphabet[0])


def tiny_model_folder(path, family: str = "llama"):
    """A tiny random model of `family` and the byte tokenizer saved to a folder, for the
    command line (`--model FOLDER`). Returns the folder."""
    from conftest import make_tiny

    make_tiny(family).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def one_line_error(result) -> str:
    """The `error: ...` line of a failed CliRunner result; fails unless it is the only line
    the command printed on stdout (stderr may hold transformers' loading bars)."""
    out = result.stdout.strip()
    assert result.exit_code == 2, result.output
    assert out.startswith("error:") and "\n" not in out, out
    assert "Traceback" not in result.output
    return out
