import base64
import json
import shutil
import sys

import pytest

from eval import stdlib_texts
from tokenizer import LLAMA3_SPECIAL, load_tokenizer


@pytest.fixture
def sp_folder(tmp_path, sp_model_file):
    shutil.copy(sp_model_file, tmp_path / "tokenizer.model")
    return tmp_path


@pytest.fixture(scope="module")
def tiktoken_folder(tmp_path_factory):
    """A Llama 3 style tiktoken file: every byte, then a few merges."""
    pytest.importorskip("tiktoken")
    folder = tmp_path_factory.mktemp("tt") / "original"
    folder.mkdir()
    tokens = [bytes([b]) for b in range(256)] + [b"de", b"def", b" f", b"ello", b"Hello", b"\n\n", b"us", b"user"]
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return folder.parent


def test_sentencepiece_round_trip(sp_folder):
    tok = load_tokenizer(sp_folder)
    for text in stdlib_texts("heldout")[20:25]:
        assert tok.decode(tok.encode(text)) == text  # code keeps every space, tab and newline
    ids = tok.encode("x = 1", bos=True)
    assert ids[0] == tok.bos_id and tok.stop_ids == {tok.eos_id}


def test_llama2_chat_format(sp_folder, tmp_path):
    (sp_folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "... <<SYS>> ... [INST] ..."}))
    tok = load_tokenizer(sp_folder)
    (sp_folder / "tokenizer_config.json").unlink()
    assert tok.chat_format == "llama2"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    expected = (tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. ", bos=True) + [tok.eos_id]
                + tok.encode("[INST] Bye [/INST]", bos=True))  # Meta's reference format
    assert tok.chat_prompt(messages) == expected


def test_chat_format_detection(sp_folder):
    for template, name in [("{{ '<|user|>\\n' }}", "zephyr"), ("[INST] {{ m }} [/INST]", "mistral"), ("", "none")]:
        (sp_folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        assert load_tokenizer(sp_folder).chat_format == name
    (sp_folder / "tokenizer_config.json").unlink()
    tok = load_tokenizer(sp_folder)
    assert tok.chat_prompt([{"role": "user", "content": "def f():"}]) == tok.encode("def f():", bos=True)


def test_llama3_tokenizer(tiktoken_folder):
    tok = load_tokenizer(tiktoken_folder)  # finds original/tokenizer.model
    n = 264
    assert tok.bos_id == n and tok.eos_id == n + 1 and tok.vocab_size == n + len(LLAMA3_SPECIAL)
    assert tok.stop_ids == {n + 1, n + 8, n + 9}  # end_of_text, eom, eot
    text = "def Hello(user):\n\n  return 'héllo' <|eot_id|>"
    assert tok.decode(tok.encode(text)) == text
    assert n + 9 not in tok.encode(text)  # special-token text typed by a user stays text
    ids = tok.chat_prompt([{"role": "user", "content": " Hello "}])
    start, end, eot = n + 6, n + 7, n + 9
    assert ids == ([n, start] + tok.encode("user") + [end] + tok.encode("\n\n") + tok.encode("Hello") + [eot, start]
                   + tok.encode("assistant") + [end] + tok.encode("\n\n"))


def test_missing_tiktoken_names_the_fix(tiktoken_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # what an environment without it looks like
    with pytest.raises(ValueError, match="pip install tiktoken"):
        load_tokenizer(tiktoken_folder)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.sh"):
        load_tokenizer(tmp_path)
