"""A dataset made inside the tests (nothing downloaded): a generated corpus of varied lengths, a word-level
tokenizer trained on it by the `tokenizers` library (with a chat template), and the files the data options
read: train.jsonl (text), chat.parquet (messages), corpus.txt (data=text)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu")
SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")
CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s>{% endfor %}"


@dataclass(frozen=True)
class DataFiles:
    texts: list[str]  # the examples of train.jsonl, in file order
    jsonl: Path  # {"id", "text"} per line
    parquet: Path  # a "messages" column: user and assistant turns
    text: Path  # the examples as one text file (data=text)
    tokenizer: Path  # the trained tokenizer's folder, with a chat template


def make_data_files(folder: Path, examples: int = 64, seed: int = 0) -> DataFiles:
    """Examples of 1 to 150 words (a few longer than the default batch.seq_len of 128 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    lengths = [rng.choice((rng.randint(1, 20), rng.randint(1, 60), rng.randint(100, 150))) for _ in range(examples)]
    texts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([*texts, "user assistant"], trainers.WordLevelTrainer(special_tokens=list(SPECIAL)))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    files = DataFiles(texts, folder / "train.jsonl", folder / "chat.parquet", folder / "corpus.txt", folder / "tok")
    fast.save_pretrained(files.tokenizer)
    files.jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    files.text.write_text("\n".join(texts))
    _write_chat(files.parquet, texts)
    return files


def _write_chat(path: Path, texts: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [[{"role": "user", "content": texts[i]}, {"role": "assistant", "content": texts[i + 1]}]
             for i in range(0, len(texts) - 1, 2)]
    pq.write_table(pa.table({"messages": chats}), path)


if __name__ == "__main__":  # docs/data.md's dataset: python tests/datafiles.py FOLDER [EXAMPLES]
    import sys

    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    made = make_data_files(target, examples=int(sys.argv[2]) if len(sys.argv) > 2 else 64)
    print(f"{made.jsonl}, {made.parquet}, {made.text}, {made.tokenizer}/ ({len(made.texts)} examples)")
