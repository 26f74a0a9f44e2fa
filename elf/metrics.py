"""Evaluation metrics (elf-method.md §9), each exactly as the protocol says, plus the demo's oracle likelihood.

- `gen_ppl`: generative perplexity of samples under a judge LM (GPT-2 Large in the paper), with entropy.
- `unigram_entropy` / `mean_entropy`: the diversity check that must accompany Gen PPL; `distinct_n`: diversity
  across samples, which per-sample entropy cannot see.
- `oracle_ppl`: the demo LM corpus's exact per-word perplexity (`elf.data.demo.Grammar`).
- `bleu` (WMT14) and `rouge` (XSum) through the reference libraries.
- `mean_se`: mean ± standard error over evaluation seeds or examples.

JSON safety: every result is a flat dict of plain numbers. A value that is not finite (an infinite
perplexity, a standard error of one value) is reported as None (JSON null), never as inf/nan, which
`json.dumps` would write as non-standard `Infinity`/`NaN`.

Numbers are only comparable under the same protocol (§9): SEDD averages per-sample PPL without
retokenising, some evaluators score in bf16; this module scores token-weighted, retokenised, fp32.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from elf.errors import ElfError

JUDGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# Summary statistics
# ---------------------------------------------------------------------------------------------------------


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error = sample std (ddof 1) / √n); the SE of a single value is undefined → None."""
    values = [float(v) for v in values]
    if not values:
        raise ElfError("mean_se: no values to summarise")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _perplexity(nll_sum: float, count: int) -> float | None:
    """exp(mean NLL), None when there is nothing to average or the result is not finite (JSON-safe)."""
    if count == 0:
        return None
    mean = nll_sum / count
    return _finite_or_none(math.exp(mean)) if mean < 700.0 else None


# ---------------------------------------------------------------------------------------------------------
# §9 Entropy
# ---------------------------------------------------------------------------------------------------------


def unigram_entropy(ids: Sequence[int] | Tensor, pad_id: int | None = None) -> float:
    """Entropy (nats) of the token-frequency distribution of one sample: −Σ p log p over its distinct ids.

    Positions equal to `pad_id` are left out (§9: "over non-pad positions"); an empty sample has entropy 0.
    Repetitive text has low entropy, which is why it must be reported next to Gen PPL.
    """
    tokens = ids.flatten().tolist() if isinstance(ids, Tensor) else list(ids)
    if pad_id is not None:
        tokens = [tok for tok in tokens if tok != pad_id]
    if not tokens:
        return 0.0
    n = len(tokens)
    return -math.fsum(c / n * math.log(c / n) for c in Counter(tokens).values())


def mean_entropy(samples: Sequence[Sequence[int] | Tensor], pad_id: int | None = None) -> float | None:
    """§9: the mean over samples of their unigram entropy; None when there is no sample."""
    if not samples:
        return None
    return math.fsum(unigram_entropy(ids, pad_id) for ids in samples) / len(samples)


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float | None:
    """Diversity *across* samples: distinct n-grams / all n-grams, pooled over every sample (Li et al., 2016).

    Per-sample entropy cannot see a set of identical samples (each may be varied on its own); pooled distinct-n
    falls towards 1 / #samples when every sample is the same. It also falls as samples get longer or more
    numerous, so compare it only with text of the same count and length (elf/selection.py). None when no
    sample has n tokens.
    """
    grams: Counter = Counter()
    for ids in samples:
        ids = list(ids)
        grams.update(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else None


# ---------------------------------------------------------------------------------------------------------
# §9 Gen PPL under a judge LM
# ---------------------------------------------------------------------------------------------------------


def load_judge(name_or_path: str, device: torch.device | str = "cpu", dtype: str = "float32"):
    """(model in eval mode on `device`, tokenizer) of a causal judge LM, by hub name or local directory.

    fp32 by default (§9: bf16 judges give different numbers). The tokenizer's pad is set to its EOS (§9).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in JUDGE_DTYPES:
        raise ElfError(f"evaluate.judge_dtype: unknown dtype {dtype!r} (known: {', '.join(JUDGE_DTYPES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=JUDGE_DTYPES[dtype],
                                                     trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - hub, file and config errors come in many types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ElfError(f"judge '{name_or_path}' cannot be loaded: {first}") from None
    if tokenizer.eos_token_id is None:
        raise ElfError(f"judge '{name_or_path}': its tokenizer has no EOS token (needed as pad and end mark)")
    tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def scored_positions(ids: Tensor, eos_id: int) -> Tensor:
    """§9 counting rule on [B, N] ids: every non-EOS token plus the first EOS of the row, position 0 excluded.

    Returned for the predicted positions 1..N−1 ([B, N − 1] bool): position i is predicted from i − 1; the
    first token has no context (no BOS) and is never scored.
    """
    is_eos = ids == eos_id
    first_eos = is_eos & (is_eos.cumsum(dim=-1) == 1)
    return (~is_eos | first_eos)[:, 1:]


def judge_nll(model, ids: Tensor, attention: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """Teacher-forced NLL of a causal LM on [B, N] ids ([B, N − 1] float32, position i + 1 predicted from
    ≤ i) and the §9 scored positions ([B, N − 1] bool, `scored_positions`): the one scoring path of Gen PPL
    and of the trained judge's training (elf/judge.py)."""
    logits = model(input_ids=ids, attention_mask=attention).logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return nll, scored_positions(ids, eos_id)


def gen_ppl(
    texts: Sequence[str],
    judge_model,
    judge_tokenizer,
    batch_size: int = 8,
    max_length: int = 1024,
    device: torch.device | str = "cpu",
) -> dict:
    """§9 Gen PPL: exp(Σ NLL / Σ counted tokens) over all samples together, with mean unigram entropy.

    Protocol, step by step:
    1. Empty texts — whose stripped text is empty, as the authors' evaluator decides — and texts the judge
       tokenizer maps to no token are skipped and counted as skipped.
    2. Each text is retokenised with the judge tokenizer, no special tokens added (no BOS), truncated to
       `max_length` tokens.
    3. EOS rule. §9 pads with EOS (pad = EOS) and counts "every non-EOS token plus the first EOS". We apply
       it as if every sample were padded to `max_length`: a sample shorter than `max_length` is followed by
       one EOS, whose prediction (the judge's "the text ends here") is scored; a sample truncated to
       `max_length` has no room and no EOS scored. An EOS already inside a text is the first EOS and is
       counted; later EOS are not. This makes each sample's score independent of the batch it lands in:
       padding only to the batch's longest sample (as MDLM/Duo's evaluators do) would silently drop the
       end-of-text prediction of the longest sample in every batch.
    4. Teacher forcing: position i predicts i + 1, the first token is unscored; NLL summed in fp32/fp64.
    Entropy (§9) is the mean unigram entropy of the retokenised (truncated) ids, the appended EOS excluded.
    Returns dict(ppl, nll_sum, tokens, samples_scored, samples_skipped, entropy); ppl and entropy are None
    when nothing could be scored, ppl and nll_sum when not finite (e.g. an fp16 judge overflowing).
    """
    eos_id = judge_tokenizer.eos_token_id
    if eos_id is None:
        raise ElfError("gen_ppl: the judge tokenizer has no EOS token")
    if batch_size < 1 or max_length < 2:
        raise ElfError(f"gen_ppl: batch_size must be >= 1 and max_length >= 2 (got {batch_size}, {max_length})")
    nonempty = [text for text in texts if text.strip()]
    encoded = judge_tokenizer(nonempty, add_special_tokens=False, truncation=True,
                              max_length=max_length)["input_ids"] if nonempty else []
    samples = [ids for ids in encoded if ids]
    skipped = len(texts) - len(samples)

    # Append the end mark where there is room (step 3), then score in batches of similar length.
    rows = [ids + [eos_id] if len(ids) < max_length else ids for ids in samples]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    nll_sum, counted = 0.0, 0
    judge_model.eval()
    with torch.no_grad():
        for first in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[first:first + batch_size]]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), eos_id, dtype=torch.long)  # pad = EOS
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for j, row in enumerate(batch):
                ids[j, : len(row)] = torch.tensor(row)
                attention[j, : len(row)] = 1
            ids, attention = ids.to(device), attention.to(device)
            nll, mask = judge_nll(judge_model, ids, attention, eos_id)
            nll_sum += float(nll[mask].double().sum())
            counted += int(mask.sum())

    return {
        "ppl": _perplexity(nll_sum, counted),
        "nll_sum": _finite_or_none(nll_sum),
        "tokens": counted,
        "samples_scored": len(samples),
        "samples_skipped": skipped,
        "entropy": mean_entropy(samples),
    }


# ---------------------------------------------------------------------------------------------------------
# Demo oracle: exact per-word likelihood under the generating grammar
# ---------------------------------------------------------------------------------------------------------


ORACLE_FLOOR = 1e-4
"""The probability `oracle_ppl`'s `ppl_floored` charges for each event the demo grammar forbids: the same for every
model, about 1/50 of a uniform guess over the ~190-word demo lexicon, so a broken text costs ~9.2 nats a fault."""


def oracle_ppl(texts: Sequence[str], grammar, stream: bool = False, floor: float = ORACLE_FLOOR) -> dict:
    """Per-word perplexity of texts under the demo grammar: exp(−Σ log p / Σ (words + 1)).

    Same formula as `elf.data.demo.oracle_perplexity` (the +1 is the end-of-document event).
    `stream` (for models trained on rows packed across documents, `tokenize.packing: paragraphs`): a text
    is a stream of documents with no separator, scored by `Grammar.log_prob_stream` = log P(the document
    stream begins with these words and a document ends right after them); otherwise one document each.
    A text the grammar cannot produce — an empty text or a word outside the lexicon included — has log p = −inf.
    Rather than let one such text make the whole number infinite, we report:
      ppl               over all texts; None (JSON null) when some text is impossible (finite_fraction < 1),
      ppl_finite_only   over the texts with finite log p; None when there is none (flattering: it drops the
                        broken texts, so never compare models by it alone),
      ppl_floored       over all texts, each forbidden event costing log `floor` (`Grammar.log_prob_floored`):
                        finite, and comparable across models scored with the same floor,
      finite_fraction   share of texts with finite log p (a quality figure of its own),
      words, texts      word events (words + 1 per text) and texts behind `ppl_finite_only` / in all.
    """
    from elf.data.demo import text_to_words

    if not texts:
        raise ElfError("oracle_ppl: no texts to score")
    finite_logp, finite_events, finite_texts = 0.0, 0, 0
    floored_logp, all_events = 0.0, 0
    for text in texts:
        words = text_to_words(text)
        logp, forbidden = grammar.log_prob_floored(words, stream, floor)
        floored_logp += logp
        all_events += len(words) + 1
        if not forbidden:  # then logp is the exact log-probability
            finite_logp += logp
            finite_events += len(words) + 1
            finite_texts += 1
    ppl_finite = _perplexity(-finite_logp, finite_events)
    return {
        "ppl": ppl_finite if finite_texts == len(texts) else None,
        "ppl_finite_only": ppl_finite,
        "ppl_floored": _perplexity(-floored_logp, all_events),
        "finite_fraction": finite_texts / len(texts),
        "words": finite_events,
        "texts": len(texts),
    }


# ---------------------------------------------------------------------------------------------------------
# §9 BLEU and ROUGE
# ---------------------------------------------------------------------------------------------------------


def _check_pairs(name: str, hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ElfError(f"{name}: {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ElfError(f"{name}: no hypotheses to score")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """sacreBLEU corpus BLEU (0–100), 13a: `bleu` is the paper's lowercase + effective-order setting (§9),
    `bleu_cased` the standard cased sacreBLEU reported beside it."""
    import sacrebleu

    _check_pairs("bleu", hypotheses, references)
    hyps, refs = list(hypotheses), [list(references)]
    paper = sacrebleu.corpus_bleu(hyps, refs, tokenize="13a", lowercase=True, use_effective_order=True)
    cased = sacrebleu.corpus_bleu(hyps, refs, tokenize="13a")
    return {"bleu": paper.score, "bleu_cased": cased.score, "sentences": len(hyps)}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """§9 ROUGE-1/2/L F-measure ×100 with stemming, mean over examples and its standard error.

    Flat keys for metric loggers: rouge1, rouge1_example_se, rouge2, …, examples. The SE is over examples
    (`_example_se`): the evaluation's `<metric>_se` is the SE over seeds (elf/evaluate.py).
    """
    from rouge_score import rouge_scorer

    _check_pairs("rouge", hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per_type: dict[str, list[float]] = {name: [] for name in ROUGE_TYPES}
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        scores = scorer.score(reference, hypothesis)  # rouge_score's order: (target, prediction)
        for name in ROUGE_TYPES:
            per_type[name].append(100.0 * scores[name].fmeasure)
    out: dict = {}
    for name, values in per_type.items():
        out[name], out[f"{name}_example_se"] = mean_se(values)
    out["examples"] = len(hypotheses)
    return out
