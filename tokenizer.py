"""One small tokenizer interface over sentencepiece (Llama 2, CodeLlama, Mistral, TinyLlama, our tiny model) and
tiktoken (Llama 3), with each family's chat template.

    tok = load_tokenizer("checkpoints/tiny-py")        # a folder holding tokenizer.model, or the file itself
    ids = tok.encode("def f():", bos=True); text = tok.decode(ids)
    ids = tok.chat_prompt([{"role": "user", "content": "Hi"}])   # ready for the assistant's reply
    tok.stop_ids                                         # every id that ends a reply
"""
import base64
import binascii
import json
import re
from pathlib import Path

import sentencepiece

# Llama 3.1's special tokens, in id order after the 128000 byte-pair ranks (Llama 3.0 names 128008 and 128010
# reserved_special_token_4/5; the ids that matter are the same in both).
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


class SentencePieceTokenizer:
    def __init__(self, path: Path, chat_format: str):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a readable tokenizer ({str(e).strip()[:120]}): download it again with "
                             f"scripts/download.py") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.stop_ids = {self.eos_id}
        self.vocab_size = self.sp.vocab_size()
        self.chat_format = chat_format

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))

    def piece_id(self, piece: str):
        """The id of a control piece such as Mistral v0.3's [INST], or None when it is plain text."""
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() else i

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        system = "".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        if self.chat_format == "llama2":  # Meta's format: every user/assistant pair is its own <s>...</s>
            ids = []
            for i in range(0, len(turns), 2):
                user = turns[i]["content"].strip()
                if i == 0 and system:
                    user = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user}"
                if i + 1 < len(turns):
                    ids += self.encode(f"[INST] {user} [/INST] {turns[i + 1]['content'].strip()} ", bos=True)
                    ids.append(self.eos_id)
                else:
                    ids += self.encode(f"[INST] {user} [/INST]", bos=True)
            return ids
        if self.chat_format == "mistral":  # one <s>; v0.3 has [INST] and [/INST] as control tokens
            inst, end = self.piece_id("[INST]"), self.piece_id("[/INST]")
            ids = [self.bos_id]
            for i, m in enumerate(turns):
                if m["role"] == "user":
                    text = (system.strip() + "\n\n" if system and i == len(turns) - 1 else "") + m["content"].strip()
                    if inst is None:
                        ids += self.encode(f"[INST] {text} [/INST]")
                    else:
                        ids += [inst] + self.encode(f" {text}") + [end]
                else:
                    ids += self.encode(m["content"].strip()) + [self.eos_id]
            return ids
        if self.chat_format == "zephyr":  # TinyLlama-Chat
            ids = [self.bos_id]
            for m in messages:
                ids += self.encode(f"<|{m['role']}|>\n{m['content']}") + [self.eos_id] + self.encode("\n")
            return ids + self.encode("<|assistant|>\n")
        # No chat template (a base or code model): the conversation is one running text to continue.
        return self.encode("".join(m["content"] for m in messages), bos=True)


class TiktokenTokenizer:
    def __init__(self, path: Path):
        try:
            import tiktoken
        except ImportError:
            raise ValueError(f"{path} is a Llama 3 (tiktoken) tokenizer: pip install tiktoken") from None
        ranks = {}
        try:
            for line in path.read_text().splitlines():
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        except (ValueError, binascii.Error) as e:  # a wrong field count, rank or base64 (UnicodeDecodeError too)
            raise ValueError(f"{path} is a damaged tiktoken file ({e}): download it again with "
                             f"scripts/download.py") from None
        special = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL)}
        self.model = tiktoken.Encoding(path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        self.special = special
        self.bos_id, self.eos_id = special["<|begin_of_text|>"], special["<|end_of_text|>"]
        self.stop_ids = {self.eos_id, special["<|eom_id|>"], special["<|eot_id|>"]}
        self.vocab_size = len(ranks) + len(special)
        self.chat_format = "llama3"

    def encode(self, text: str, bos: bool = False) -> list[int]:
        # Special-token text in user input stays text: only chat_prompt inserts special ids.
        return [self.bos_id] * bos + self.model.encode(text, disallowed_special=())

    def decode(self, ids) -> str:
        return self.model.decode(list(ids))

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        s = self.special
        ids = [self.bos_id]
        for m in messages + [{"role": "assistant", "content": None}]:
            ids += [s["<|start_header_id|>"]] + self.encode(m["role"]) + [s["<|end_header_id|>"]] + self.encode("\n\n")
            if m["content"] is not None:
                ids += self.encode(m["content"].strip()) + [s["<|eot_id|>"]]
        return ids


def chat_format_of(folder: Path) -> str:
    """Which chat format a sentencepiece model uses, read from the Hugging Face template files beside it."""
    template = ""
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").is_file():
        try:
            template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template") or ""
        except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, or not a JSON object
            raise ValueError(f"{folder / 'tokenizer_config.json'} is damaged ({e}): download it again") from None
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    if "<|user|>" in template:
        return "zephyr"
    if "<<SYS>>" in template:
        return "llama2"
    if "[INST]" in template:
        return "mistral"
    return "none"


def load_tokenizer(path):
    """A folder holding tokenizer.model (or original/tokenizer.model), or the tokenizer file itself."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "tokenizer.model", path / "original" / "tokenizer.model"]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: scripts/prepare.sh downloads it with the weights")
    with open(path, "rb") as f:
        head = f.read(64)
    # A tiktoken file is text lines "<base64 bytes> <rank>"; a sentencepiece model is a binary protobuf.
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", head):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path, chat_format_of(path.parent))
