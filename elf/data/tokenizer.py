"""The tokenizer stage: a T5-style tokenizer saved as a Hugging Face directory in `data/tokenizer/`.

Either a pretrained tokenizer (the paper: `t5-small`, by hub name or local path) is copied, or one is
trained on the raw training text (the offline demo default): BPE (`tokenizers`) or a SentencePiece Unigram
model like T5's. All follow the T5 conventions elf-method §2 relies on: <pad>=0, </s>=1, <unk>=2, EOS
appended to every text, and 100 `<extra_id_*>` sentinels after the pieces (so len(tokenizer) has T5's layout).
Later stages load only from `data/tokenizer/`, never from the hub.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from elf.errors import ElfError
from elf.files import atomic_output_dir
from elf.hashing import directory_hash
from elf.vocab import EOS_ID, NUM_SENTINELS, NUM_SPECIAL_TOKENS, PAD_ID, UNK_ID

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
TOKENIZER_ALGORITHMS = ("bpe", "unigram")


def _sentinels() -> list[str]:
    """T5's order: <extra_id_99> gets the lowest sentinel id, <extra_id_0> the highest."""
    return [f"<extra_id_{i}>" for i in reversed(range(NUM_SENTINELS))]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a BPE tokenizer with SentencePiece-style word boundaries ("▁") and T5's special-token layout.

    Why BPE for trained tokenizers: on a small corpus (the demo's few hundred distinct words) SentencePiece's
    Unigram trainer stops at a few hundred pieces and splits even frequent words into fragments ("h" "is"),
    which makes every task harder for a small model; BPE keeps merging up to `vocab_size` and ends with
    whole words. The `tokenizers` BPE trainer is deterministic (same text, same bytes, same hash).
    Punctuation is split off words, so "river." is "▁river" + "."; decoding restores the spacing.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - NUM_SENTINELS, special_tokens=[PAD, EOS, UNK],
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() <= NUM_SPECIAL_TOKENS:
        raise ElfError("tokenizer: no training text (every raw train split is empty)")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   additional_special_tokens=_sentinels())


def train_unigram_tokenizer(texts: Iterable[str], vocab_size: int, work_dir: str | Path):
    """Train a SentencePiece Unigram model with T5's layout and wrap it as a `T5Tokenizer`.

    SentencePiece (not the `tokenizers` Unigram trainer, whose output varies from run to run) keeps the
    stage reproducible: same text, same bytes, same hash. `vocab_size` is an upper bound for small
    corpora. Like `t5-small`, the tokenizer carries 100 `<extra_id_*>` sentinels after the pieces.
    """
    import io

    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size - 100,
            hard_vocab_limit=False, model_type="unigram", pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
        )
    except RuntimeError as error:
        raise ElfError(f"tokenizer: SentencePiece training failed ({str(error).splitlines()[0]})") from None
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "spiece.model").write_bytes(model.getvalue())
    return T5Tokenizer.from_pretrained(work_dir)


def load_pretrained_tokenizer(name_or_path: str):
    """A pretrained tokenizer by hub name or local directory; failures name it in one line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ElfError(f"tokenizer.pretrained: cannot load tokenizer '{name_or_path}' ({first})") from None


def check_t5_conventions(tokenizer, where: str) -> None:
    """Fail early if a tokenizer breaks the id layout the model and the packing rely on."""
    if tokenizer.pad_token_id != PAD_ID or tokenizer.eos_token_id != EOS_ID:
        raise ElfError(
            f"{where}: tokenizer must have pad id {PAD_ID} and eos id {EOS_ID} "
            f"(got pad {tokenizer.pad_token_id}, eos {tokenizer.eos_token_id})"
        )


def save_tokenizer(tokenizer, out_dir: str | Path) -> str:
    """Write a `save_pretrained` directory atomically and return its content hash."""
    check_t5_conventions(tokenizer, str(out_dir))
    with atomic_output_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer_hash(out_dir)


def load_tokenizer(directory: str | Path):
    """Load `data/tokenizer/` (what every later stage uses)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise ElfError(f"{directory}: tokenizer directory not found (run the tokenizer stage first)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ElfError(f"{directory}: not a loadable tokenizer directory ({str(error).splitlines()[0]})") from None
    check_t5_conventions(tokenizer, str(directory))
    return tokenizer


def tokenizer_hash(directory: str | Path) -> str:
    """Content hash of a tokenizer directory: manifests record it so mismatched inputs are caught."""
    return directory_hash(directory)


def training_texts(raw_files: dict[str, tuple[Path, tuple[str, ...]]], per_dataset: int) -> Iterable[str]:
    """Non-blank text of each dataset's raw train split (every column), at most `per_dataset` rows each."""
    from elf.data.shards import iter_parquet_batches

    for path, columns in raw_files.values():
        seen = 0
        for batch in iter_parquet_batches(path, list(columns), 1000):
            for row in zip(*(batch.column(c).to_pylist() for c in columns), strict=True):
                if seen >= per_dataset:
                    break
                seen += 1
                yield from (text for text in row if text and text.strip())
            if seen >= per_dataset:
                break


def build_tokenizer(kind: str, pretrained: str, vocab_size: int, texts: Iterable[str] | None,
                    out_dir: str | Path, algorithm: str = "bpe") -> str:
    """The tokenizer stage: copy a pretrained tokenizer or train one; returns the directory's hash."""
    import tempfile

    if kind == "pretrained":
        return save_tokenizer(load_pretrained_tokenizer(pretrained), out_dir)
    if algorithm not in TOKENIZER_ALGORITHMS:
        raise ElfError(f"tokenizer.algorithm: unknown {algorithm!r} (known: {', '.join(TOKENIZER_ALGORITHMS)})")
    if algorithm == "bpe":
        return save_tokenizer(train_bpe_tokenizer(texts, vocab_size), out_dir)
    with tempfile.TemporaryDirectory() as work_dir:
        return save_tokenizer(train_unigram_tokenizer(texts, vocab_size, work_dir), out_dir)
