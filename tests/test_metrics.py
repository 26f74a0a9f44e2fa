"""Evaluation metrics (elf-method.md §9): Gen PPL protocol on a tiny local judge, entropy, oracle, BLEU, ROUGE."""

import json
import math
import time

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from elf.data.demo import build_grammar, generate_lm, oracle_perplexity, text_to_words, words_to_text
from elf.errors import ElfError
from elf.metrics import (
    bleu,
    gen_ppl,
    load_judge,
    mean_entropy,
    mean_se,
    oracle_ppl,
    rouge,
    unigram_entropy,
)

EOS = "<|endoftext|>"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A GPT-2-shaped judge saved like a hub checkpoint: byte-level BPE trained here, tiny random GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = list(generate_lm(build_grammar(0), seed=1, n=200))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    eos_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos_id, eos_token_id=eos_id)
    out = tmp_path_factory.mktemp("judge")
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def judge(judge_dir):
    return load_judge(str(judge_dir))


def hand_score(model, tokenizer, text, max_length):
    """§9 for one text, written out: retokenise without BOS, truncate, EOS as the end mark where it fits,
    then sum −log p(ids[i] | ids[:i]) over i ≥ 1 where ids[i] is not EOS or is the first EOS."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
    if len(ids) < max_length:
        ids = ids + [eos]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    nll, count, eos_seen = 0.0, 0, 0
    for i, tok in enumerate(ids):
        eos_seen += tok == eos
        if i > 0 and (tok != eos or eos_seen == 1):
            nll -= logp[i - 1, tok].item()
            count += 1
    return nll, count


TEXTS = [
    "Karl buys the red ball.",
    "",  # skipped
    "A dog sees the cat. My tree follows Rosa. Your clever cold needs.",
    "Anna walks.",
    f"Ben reads.{EOS}Clara paints a house.",  # an EOS inside the text is the first EOS
    "",
]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_gen_ppl_matches_the_hand_computed_protocol_in_any_batching(judge, batch_size):
    model, tokenizer = judge
    result = gen_ppl(TEXTS, model, tokenizer, batch_size=batch_size, max_length=64)
    scores = [hand_score(model, tokenizer, text, 64) for text in TEXTS if text]
    nll, count = sum(s[0] for s in scores), sum(s[1] for s in scores)
    assert result["samples_scored"] == 4 and result["samples_skipped"] == 2
    assert result["tokens"] == count
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-5)
    # Token-weighted over all samples together, not a mean of per-sample perplexities.
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    per_sample = sum(math.exp(n / c) for n, c in scores) / len(scores)
    assert result["ppl"] != pytest.approx(per_sample, rel=1e-3)


def test_first_eos_is_counted_and_later_ones_are_not(judge):
    model, tokenizer = judge
    plain = "Anna walks."
    n_plain = len(tokenizer(plain, add_special_tokens=False)["input_ids"])
    # n − 1 predicted tokens + the appended end mark.
    assert gen_ppl([plain], model, tokenizer)["tokens"] == n_plain
    inside = f"Ben reads.{EOS}Clara paints."
    ids = tokenizer(inside, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 1
    # The EOS inside is the first one and counts; the appended one does not.
    assert gen_ppl([inside], model, tokenizer)["tokens"] == len(ids) - 1
    twice = f"Ben reads.{EOS}{EOS}Clara paints."
    n_twice = len(tokenizer(twice, add_special_tokens=False)["input_ids"])
    assert gen_ppl([twice], model, tokenizer)["tokens"] == n_twice - 2


def test_truncated_samples_have_no_end_mark(judge):
    model, tokenizer = judge
    text = TEXTS[2]
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n > 10
    result = gen_ppl([text], model, tokenizer, max_length=10)
    nll, count = hand_score(model, tokenizer, text, 10)
    assert result["tokens"] == count == 9
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-5)
    # Exactly max_length tokens: truncated or not, no room for the end mark either.
    assert gen_ppl([text], model, tokenizer, max_length=n)["tokens"] == n - 1
    assert gen_ppl([text], model, tokenizer, max_length=n + 1)["tokens"] == n


def test_gen_ppl_reports_entropy_of_the_judge_ids_and_survives_no_samples(judge):
    model, tokenizer = judge
    result = gen_ppl(TEXTS, model, tokenizer)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS if t]
    assert result["entropy"] == pytest.approx(sum(map(unigram_entropy, ids)) / len(ids))
    empty = gen_ppl(["", ""], model, tokenizer)
    assert empty == {"ppl": None, "nll_sum": 0.0, "tokens": 0, "samples_scored": 0, "samples_skipped": 2,
                     "entropy": None}
    json.dumps(empty)


def test_whitespace_only_samples_are_skipped_like_empty_ones(judge):
    """§9 / the authors' evaluator: a sample whose stripped text is empty is not scored (nor in the entropy)."""
    model, tokenizer = judge
    alone = gen_ppl(["Karl buys the red ball."], model, tokenizer)
    with_blank = gen_ppl(["Karl buys the red ball.", "   ", "\n\t "], model, tokenizer)
    assert with_blank["samples_skipped"] == 2
    assert {k: v for k, v in with_blank.items() if k != "samples_skipped"} == {
        k: v for k, v in alone.items() if k != "samples_skipped"}


def test_load_judge_sets_pad_to_eos_and_eval_mode(judge):
    model, tokenizer = judge
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_unloadable_judge_is_a_quick_one_line_error(tmp_path):
    began = time.perf_counter()
    with pytest.raises(ElfError, match=r"^judge 'gpt2-large' cannot be loaded: ") as error:
        load_judge("gpt2-large")
    assert "\n" not in str(error.value)
    with pytest.raises(ElfError, match="cannot be loaded"):
        load_judge(str(tmp_path / "missing"))
    with pytest.raises(ElfError, match="judge_dtype"):
        load_judge("gpt2-large", dtype="fp8")
    assert time.perf_counter() - began < 20


# ---------------------------------------------------------------------------------------------------------
# Entropy and summary statistics
# ---------------------------------------------------------------------------------------------------------


def test_unigram_entropy_by_hand():
    # Frequencies 2/4, 1/4, 1/4.
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert unigram_entropy([5, 5, 6, 7]) == pytest.approx(expected)
    assert unigram_entropy(torch.tensor([5, 0, 5, 6, 0, 7, 0]), pad_id=0) == pytest.approx(expected)
    assert unigram_entropy([3, 3, 3]) == 0.0 and unigram_entropy([]) == 0.0
    assert unigram_entropy(range(8)) == pytest.approx(math.log(8))
    assert mean_entropy([[5, 5, 6, 7], [1, 2]]) == pytest.approx((expected + math.log(2)) / 2)
    assert mean_entropy([]) is None


def test_mean_and_standard_error():
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_se([7.0]) == (7.0, None)
    with pytest.raises(ElfError, match="no values"):
        mean_se([])


# ---------------------------------------------------------------------------------------------------------
# Demo oracle
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammar():
    return build_grammar(0)


def test_oracle_ppl_on_demo_text_is_the_exact_per_word_perplexity(grammar):
    texts = list(generate_lm(grammar, seed=3, n=20))
    result = oracle_ppl(texts, grammar)
    assert result["ppl"] == pytest.approx(oracle_perplexity(grammar, texts))
    assert result["ppl_finite_only"] == result["ppl"] and result["finite_fraction"] == 1.0
    assert result["words"] == sum(grammar.log_prob_text(t)[1] + 1 for t in texts)


def test_oracle_ppl_handles_texts_the_grammar_cannot_produce(grammar):
    good = list(generate_lm(grammar, seed=3, n=3))
    impossible = ["the the the.", ""]
    assert all(grammar.log_prob_text(t)[0] == -math.inf for t in impossible)
    result = oracle_ppl(good + impossible, grammar)
    assert result["ppl"] is None  # infinite over all texts
    assert result["finite_fraction"] == pytest.approx(3 / 5)
    assert result["ppl_finite_only"] == pytest.approx(oracle_perplexity(grammar, good))
    json.loads(json.dumps(result, allow_nan=False))
    none_finite = oracle_ppl(impossible, grammar)
    assert none_finite["ppl"] is None and none_finite["ppl_finite_only"] is None
    assert none_finite["finite_fraction"] == 0.0


def test_floored_oracle_counts_every_text_with_a_fixed_penalty_per_forbidden_event(grammar):
    good = list(generate_lm(grammar, seed=3, n=3))
    exact = oracle_ppl(good, grammar)
    assert exact["ppl_floored"] == pytest.approx(exact["ppl"])  # nothing forbidden: the exact perplexity
    words = text_to_words(good[0])
    broken = words[:2] + words[:2] + words[2:]  # a determiner and noun repeated mid-sentence
    logp, forbidden = grammar.log_prob_floored(broken, stream=False, floor=1e-4)
    assert grammar.log_prob(broken) == -math.inf and forbidden >= 1 and math.isfinite(logp)
    cheaper, again = grammar.log_prob_floored(broken, stream=False, floor=1e-2)
    assert again == forbidden and cheaper - logp == pytest.approx(forbidden * (math.log(1e-2) - math.log(1e-4)))
    assert grammar.log_prob_floored([], stream=False, floor=1e-4) == (pytest.approx(math.log(1e-4)), 1)
    mixed = oracle_ppl(good + [words_to_text(broken), ""], grammar)
    events = sum(len(text_to_words(t)) + 1 for t in good) + len(broken) + 1 + 1
    total = sum(grammar.log_prob_text(t)[0] for t in good) + logp + math.log(1e-4)
    assert mixed["ppl"] is None and mixed["ppl_floored"] == pytest.approx(math.exp(-total / events))
    assert mixed["ppl_floored"] > mixed["ppl_finite_only"]  # the broken texts cost, instead of being dropped
    with pytest.raises(ElfError, match="floor"):
        grammar.log_prob_floored(words, stream=False, floor=0.0)
    # a word outside the lexicon does not parse (log_prob floors it at 1e-6 instead): an untrained model's
    # "nahe nahe …" no longer counts as grammatical
    unknown = words[:1] + ["nahe"] + words[1:]
    assert math.isfinite(grammar.log_prob(unknown)) and grammar.log_prob_floored(unknown, False, 1e-4)[1] >= 1
    assert oracle_ppl([words_to_text(unknown)], grammar)["finite_fraction"] == 0.0


def test_oracle_ppl_scores_packed_samples_as_document_streams(grammar):
    """Under paragraph packing a sample is documents with no separator: the stream likelihood scores it."""
    texts = list(generate_lm(grammar, seed=4, n=40))
    packed = ["".join(texts[i:i + 4]) for i in range(0, 40, 4)]
    single = oracle_ppl(packed, grammar)
    stream = oracle_ppl(packed, grammar, stream=True)
    assert stream["finite_fraction"] == 1.0 and stream["ppl"] == pytest.approx(
        oracle_perplexity(grammar, packed, stream=True))
    assert single["finite_fraction"] < 1.0  # read as one document, most packed samples are impossible
    assert stream["words"] == sum(grammar.log_prob_text(t)[1] + 1 for t in packed)  # +1: the final end
    assert oracle_ppl(["the the the.", ""], grammar, stream=True)["finite_fraction"] == 0.0


@pytest.mark.parametrize("packing", ["paragraphs", "documents"])
def test_evaluate_scores_the_oracle_as_the_rows_were_packed(grammar, tmp_path, packing):
    from elf.config import DatasetConfig, EvaluateConfig
    from elf.evaluate import GRAMMAR_FILE, Scorer

    (tmp_path / GRAMMAR_FILE).write_text(json.dumps(grammar.to_dict()))
    dataset = DatasetConfig(task="lm", source="demo", max_length=32,
                            demo={"generator": "lm", "train_size": 1, "validation_size": 1})
    words = lambda text, add_special_tokens: {"input_ids": list(range(len(text.split())))}  # noqa: E731
    scorer = Scorer(dataset, EvaluateConfig(), tmp_path, words, "cpu", packing)
    texts = list(generate_lm(grammar, seed=4, n=40))
    packed = ["".join(texts[i:i + 4]) for i in range(0, 40, 4)]
    expected = oracle_ppl(packed, grammar, stream=packing == "paragraphs")
    assert scorer.score(packed)["oracle_ppl_finite_only"] == pytest.approx(expected["ppl_finite_only"])
    assert (scorer.score(packed)["oracle_finite_fraction"] == 1.0) == (packing == "paragraphs")


# ---------------------------------------------------------------------------------------------------------
# BLEU, ROUGE
# ---------------------------------------------------------------------------------------------------------

HYPS = ["the cat sat on the mat .", "Anna reads a book", "a dog"]
REFS = ["The cat sat on the mat .", "Anna reads the book today", "The dog runs"]


def test_bleu_is_sacrebleu_with_the_paper_settings_and_cased_beside():
    result = bleu(HYPS, REFS)
    paper = sacrebleu.corpus_bleu(HYPS, [REFS], lowercase=True, use_effective_order=True, tokenize="13a")
    assert result["bleu"] == pytest.approx(paper.score)
    assert result["bleu_cased"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert result["bleu"] > result["bleu_cased"]  # "the" vs "The" only matches lowercased
    assert bleu(REFS, REFS)["bleu"] == pytest.approx(100.0)
    with pytest.raises(ElfError, match="bleu: 2 hypotheses but 3 references"):
        bleu(HYPS[:2], REFS)


def test_rouge_is_rouge_score_f_measure_with_stemming():
    result = rouge(HYPS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        values = [100 * scorer.score(ref, hyp)[name].fmeasure for hyp, ref in zip(HYPS, REFS, strict=True)]
        mean = sum(values) / len(values)
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
        assert result[name] == pytest.approx(mean) and result[f"{name}_example_se"] == pytest.approx(se)
    assert result["examples"] == 3
    # Stemming: "reads" and "read" match.
    assert rouge(["Anna read"], ["Anna reads"])["rouge1"] == pytest.approx(100.0)


def test_the_se_of_a_figure_is_over_seeds_and_the_per_example_se_keeps_its_own_name():
    """eval.json's `<metric>_se` is the SE over evaluation seeds (elf-method §9), for ROUGE too."""
    from elf.evaluate import _aggregate

    per_seed = [rouge(HYPS, REFS), rouge(HYPS[::-1], REFS)]
    summary = _aggregate(per_seed)
    values = [s["rougeL"] for s in per_seed]
    assert summary["rougeL_se"] == pytest.approx(abs(values[0] - values[1]) / 2)  # SE of two seeds
    assert summary["rougeL_example_se"] == pytest.approx((per_seed[0]["rougeL_example_se"]
                                                          + per_seed[1]["rougeL_example_se"]) / 2)
    assert not any(key.endswith("_se_se") for key in summary)
